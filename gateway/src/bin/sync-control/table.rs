//! Plain-text tables of a [`ControlStatus`] for `sync-control status` and `gateway list`.

use std::fmt::Write as _;

use sync_gateway::api::ControlStatus;

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn opt_secs(s: Option<u64>) -> String {
    s.map_or_else(|| "-".into(), |s| format!("{s}s"))
}

pub fn gateways(st: &ControlStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<20} {:<10} {:<8} {:>8} {:>6} {:>10} {:>10}",
        "GATEWAY", "HOSTNAME", "VERSION", "ONLINE", "UPTIME", "CPU%", "RSS", "FREE"
    );
    for g in &st.gateways {
        let s = g.status.as_ref();
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:<10} {:<8} {:>8} {:>6} {:>10} {:>10}",
            g.gateway_id,
            g.hostname,
            s.map_or("-", |s| s.version.as_str()),
            if g.online { "online" } else { "offline" },
            s.map_or_else(|| "-".into(), |s| format!("{}s", s.uptime_secs)),
            s.map_or_else(|| "-".into(), |s| format!("{:.1}", s.cpu_percent)),
            s.map_or_else(|| "-".into(), |s| bytes(s.memory_rss_bytes)),
            s.map_or_else(|| "-".into(), |s| bytes(s.data_free_bytes)),
        );
    }
    // Where cloud gateways run and how their cloud API calls go.
    for g in &st.gateways {
        if let Some(c) = g.status.as_ref().and_then(|s| s.cloud.as_ref()) {
            let _ = write!(
                out,
                "  {}: {} {} {} {}; API retries {} ({} throttled), snapshots retaken {}",
                g.gateway_id,
                c.provider,
                c.region,
                c.availability_zone,
                c.instance_id,
                c.api_retries,
                c.api_throttled,
                c.snapshots_retried
            );
            if let Some(e) = &c.api_last_error {
                let _ = write!(out, "; last: {e}");
            }
            out.push('\n');
        }
    }
    out
}

pub fn everything(st: &ControlStatus) -> String {
    let mut out = gateways(st);
    let _ = writeln!(
        out,
        "\n{:<20} {:<20} {:<18} {:>7} {:>10} {:>7} {:>7} {:>12}  LAST SNAPSHOT / ERROR",
        "DISK", "GATEWAY", "STATE", "DONE%", "BACKLOG", "LAG", "ETA", "RATE/s"
    );
    for d in &st.disks {
        let Some(s) = &d.status else {
            let _ = writeln!(
                out,
                "{:<20} {:<20} {:<18}",
                d.disk_id, d.gateway_id, "(no report yet)"
            );
            continue;
        };
        let pct = if s.bytes_total == 0 {
            0.0
        } else {
            100.0 * s.bytes_replicated as f64 / s.bytes_total as f64
        };
        let snap = s
            .last_snapshot
            .as_ref()
            .map_or_else(|| "-".into(), |x| format!("{} ({})", x.id, x.state));
        let err = s
            .last_error
            .as_deref()
            .map_or(String::new(), |e| format!(" error: {e}"));
        let snap = match &s.volume_id {
            Some(v) => format!("{snap} on {v}"),
            None => snap,
        };
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:<18} {:>6.1}% {:>10} {:>7} {:>7} {:>12}  {snap}{err}",
            d.disk_id,
            d.gateway_id,
            s.state.as_str(),
            pct,
            bytes(s.bytes_backlogged),
            opt_secs(s.lag_secs),
            opt_secs(s.eta_secs),
            bytes(s.throughput_bytes_per_sec),
        );
    }
    if !st.launches.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<20} {:<20} {:<8} {:<10} {:<22} DISKS",
            "INSTANCE", "GATEWAY", "KIND", "STATE", "IMAGE"
        );
        for l in &st.launches {
            let disks: Vec<&str> = l.launch.disks.iter().map(|d| d.disk_id.as_str()).collect();
            let _ = writeln!(
                out,
                "{:<20} {:<20} {:<8} {:<10} {:<22} {}",
                l.launch.instance_id,
                l.gateway_id,
                if l.launch.test { "test" } else { "cutover" },
                l.launch.state,
                l.launch.image_id.as_deref().unwrap_or("-"),
                disks.join(",")
            );
        }
    }
    let _ = writeln!(
        out,
        "\n{:<22} {:<20} {:<14} {:<10} MESSAGE",
        "COMMAND", "GATEWAY", "KIND", "STATE"
    );
    for c in &st.commands {
        let state = serde_json::to_value(c.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<22} {:<20} {:<14} {:<10} {}",
            c.command_id,
            c.gateway_id,
            c.kind,
            state,
            c.result.as_ref().map_or("", |r| r.message.as_str())
        );
    }
    out
}
