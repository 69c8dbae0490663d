//! The metrics port, end to end: a real `sync-gateway` with `[metrics]`, the real agent, and
//! scrapes over a plain TCP socket on loopback. Also checks from `/proc` that the gateway
//! listens on nothing but its data port and (when configured) the loopback metrics port: the
//! gateway accepts no inbound control.

#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;
#[path = "common/proc_net.rs"]
mod proc_net;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use proc_net::{listening_sockets, parse_proc_addr};

const AGENT_DEADLINE: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// A gateway with a [metrics] table

/// Starts a gateway whose config has a `[metrics]` table listening on `metrics`; returns it
/// with the bound metrics address (written before `listen.addr`, so it is there already).
fn start_with_metrics(cfg: GatewayConfig, metrics: &str, t: &TestDir) -> (Gateway, SocketAddr) {
    let cfg = cfg.extra_toml(&format!("[metrics]\nlisten = \"{metrics}\""));
    let gw = Gateway::start(&cfg, &t.path("gateway.toml"), &t.path("gateway.log"));
    let text = std::fs::read_to_string(t.data_dir().join("metrics.addr"))
        .expect("metrics.addr before listen.addr");
    let addr = text.trim().parse().expect("metrics.addr holds an address");
    (gw, addr)
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 by hand, and the text exposition format

/// One request on a fresh connection; returns the status code and the body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("no end of headers");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, head.to_string(), body.to_string())
}

/// A parsed scrape: `name{labels}` (as written) → value, and each family's type.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    fn get(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in\n{}", self.text))
    }

    fn disk(&self, name: &str, disk: &str) -> u64 {
        self.get(&format!("sync_gateway_disk_{name}{{disk=\"{disk}\"}}")) as u64
    }
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, head, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} lacks _total");
            }
            types.insert(name.to_string(), kind.to_string());
        } else if !line.is_empty() {
            let (key, value) = line.rsplit_once(' ').unwrap();
            let name = key.split('{').next().unwrap();
            assert!(types.contains_key(name), "sample before its TYPE: {line}");
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            assert!(
                samples.insert(key.to_string(), v).is_none(),
                "duplicate {key}"
            );
        }
    }
    Scrape {
        samples,
        types,
        text: body,
    }
}

#[test]
fn proc_addresses_parse() {
    assert_eq!(
        parse_proc_addr("0100007F:1F90"),
        "127.0.0.1:8080".parse().unwrap()
    );
    assert_eq!(
        parse_proc_addr("00000000000000000000000001000000:0050"),
        "[::1]:80".parse().unwrap()
    );
    assert_eq!(
        parse_proc_addr("0000000000000000FFFF00000100007F:01BB"),
        "[::ffff:127.0.0.1]:443".parse().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------

fn nonzero_blocks(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    data.chunks(BLOCK as usize)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
}

#[test]
fn scrape_counts_a_replication_and_a_refused_agent() {
    let _g = serial();
    let t = TestDir::new("metrics");
    let size = 8 * MIB;
    let key = t.key_path("disk-1");
    write_key(&key, 41);
    let cfg = GatewayConfig::new(t.data_dir()).disk("disk-1", size, &key);
    let (gw, metrics) = start_with_metrics(cfg, "127.0.0.1:0", &t);
    assert!(metrics.ip().is_loopback(), "{metrics}");
    let src = t.source_path("disk-1");
    make_image(&src, size, 41);
    let data_blocks = nonzero_blocks(&src);

    // Before any agent: every family is there, the disk is idle.
    let m = scrape(metrics);
    assert_eq!(
        m.get(&format!(
            "sync_gateway_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert_eq!(m.types["sync_gateway_build_info"], "gauge");
    assert!(m.get("sync_gateway_uptime_seconds") >= 0.0);
    assert_eq!(m.disk("connected", "disk-1"), 0);
    assert_eq!(m.disk("bytes_written_total", "disk-1"), 0);
    assert_eq!(m.disk("checkpoint_seq", "disk-1"), 0);
    assert_eq!(
        m.get("sync_gateway_disk_state{disk=\"disk-1\",state=\"initiating\"}"),
        1.0
    );
    assert_eq!(m.disk("backlog_bytes", "disk-1"), size);
    assert!(
        !m.text.contains("sync_gateway_disk_lag_seconds{"),
        "no lag before a checkpoint"
    );

    // Other paths and methods.
    assert_eq!(http(metrics, "GET", "/").0, 404);
    assert_eq!(http(metrics, "GET", "/metrics/x").0, 404);
    let (status, head, _) = http(metrics, "POST", "/metrics");
    assert_eq!(status, 405, "{head}");
    assert_eq!(http(metrics, "DELETE", "/metrics").0, 405);

    let run =
        AgentCmd::new(gw.addr, "disk-1", &key, &t.state_dir("disk-1"), &src).run(AGENT_DEADLINE);
    run.note("replicate");
    let report = run.expect_verified().clone();
    let d = run.describe();
    let field = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("no {k}: {d}"));

    // The session closes shortly after the agent exits.
    let m = wait_for(Duration::from_secs(30), "connected == 0", || {
        let m = scrape(metrics);
        (m.disk("connected", "disk-1") == 0).then_some(m)
    });
    let written = m.disk("bytes_written_total", "disk-1");
    let zeroed = m.disk("bytes_zeroed_total", "disk-1");
    assert_eq!(
        written,
        data_blocks * BLOCK,
        "non-zero data of the image\n{d}"
    );
    assert_eq!(written, field("blocks_sent") * BLOCK, "{d}");
    assert_eq!(zeroed, field("blocks_zero") * BLOCK, "{d}");
    assert_eq!(written + zeroed, field("bytes_changed"), "{d}");
    let frames = m.disk("frames_total", "disk-1");
    assert!(frames > 0);
    if field("reconnects") == 0 {
        assert_eq!(frames, field("frames_sent"), "{d}");
        assert_eq!(m.disk("sessions_total", "disk-1"), 1);
    }
    let received = m.disk("bytes_received_total", "disk-1");
    assert!(received > 0, "{d}");
    assert_eq!(m.disk("checkpoints_total", "disk-1"), 1);
    assert_eq!(m.disk("checkpoint_seq", "disk-1"), field("checkpoint_seq"));
    assert_eq!(m.disk("durable_seq", "disk-1"), field("checkpoint_seq"));
    assert!(m.disk("syncs_total", "disk-1") >= 1);
    // At its checkpoint: exactly one state set, no backlog, a lag of seconds.
    let m = wait_for(Duration::from_secs(30), "state continuous", || {
        let m = scrape(metrics);
        (m.get("sync_gateway_disk_state{disk=\"disk-1\",state=\"continuous\"}") == 1.0).then_some(m)
    });
    let states: f64 = sync_gateway::api::DiskState::ALL
        .iter()
        .map(|s| {
            m.get(&format!(
                "sync_gateway_disk_state{{disk=\"disk-1\",state=\"{}\"}}",
                s.as_str()
            ))
        })
        .sum();
    assert_eq!(states, 1.0);
    assert_eq!(m.disk("backlog_bytes", "disk-1"), 0);
    assert!(m.disk("lag_seconds", "disk-1") < 300);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let acked = m.get("sync_gateway_disk_last_ack_timestamp_seconds{disk=\"disk-1\"}");
    assert!(
        acked > now - 300.0 && acked <= now + 1.0,
        "{acked} vs {now}"
    );
    assert!(m.get("sync_gateway_connections_accepted_total") >= 1.0);
    assert!(!m.text.contains("sync_gateway_handshakes_refused_total{"));
    assert!(!m.text.contains("sync_gateway_disk_errors_total{"));

    // A wrong key is refused in the handshake, with auth_failed.
    let wrong = t.key_path("wrong");
    write_key(&wrong, 12345);
    let bad = AgentCmd::new(gw.addr, "disk-1", &wrong, &t.state_dir("wrong"), &src)
        .run(Duration::from_secs(60));
    assert!(!bad.status.success(), "{}", bad.describe());
    let m = scrape(metrics);
    assert_eq!(
        m.get("sync_gateway_handshakes_refused_total{code=\"auth_failed\"}"),
        1.0,
        "{}",
        m.text
    );
    assert!(m.get("sync_gateway_connections_accepted_total") >= 2.0);
    // Nothing was written by the refused agent.
    assert_eq!(m.disk("bytes_written_total", "disk-1"), written);
}

#[test]
fn the_gateway_listens_only_on_its_data_and_metrics_ports() {
    let _g = serial();
    let t = TestDir::new("metrics-listen");
    let key = t.key_path("disk-1");
    write_key(&key, 7);
    let cfg = GatewayConfig::new(t.data_dir()).disk("disk-1", 4 * MIB, &key);

    let (gw, metrics) = start_with_metrics(cfg.clone(), "127.0.0.1:0", &t);
    assert_eq!(metrics.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(metrics.port(), 0);
    scrape(metrics); // the port serves before we look
    let want: BTreeSet<SocketAddr> = [gw.addr, metrics].into();
    assert_eq!(listening_sockets(gw.pid()), want);
    drop(gw);

    // Without [metrics]: the data port only, and no stale metrics.addr.
    let gw = Gateway::start(&cfg, &t.path("plain.toml"), &t.path("plain.log"));
    assert_eq!(listening_sockets(gw.pid()), [gw.addr].into());
    assert!(!t.data_dir().join("metrics.addr").exists());
}

#[test]
fn a_metrics_address_off_loopback_is_refused() {
    let t = TestDir::new("metrics-config");
    let key = t.key_path("disk-1");
    write_key(&key, 3);
    let cfg = GatewayConfig::new(t.data_dir()).disk("disk-1", 4 * MIB, &key);
    for addr in ["0.0.0.0:9500", "[::]:0", "192.0.2.1:9500"] {
        let path = t.path("off-loopback.toml");
        std::fs::write(
            &path,
            format!("{}[metrics]\nlisten = \"{addr}\"\n", cfg.to_toml()),
        )
        .unwrap();
        let out = Command::new(GATEWAY_BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("SYNC_GATEWAY_METRICS__LISTEN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{addr}: {stderr}");
        assert!(stderr.contains("not a loopback address"), "{stderr}");
    }
}
