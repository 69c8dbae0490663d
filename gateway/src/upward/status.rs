//! The status report: each disk's replication state and figures, and the gateway's own.
//!
//! A disk's state, progress and lag are classified by [`Disk::progress`] (shared with the
//! metrics port); this module adds rates, snapshots, launches and the gateway's own figures.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::api::{
    CheckpointSummary, DiskPhase, DiskState, DiskStatus, GatewayStatus, SnapshotSummary,
    StatusReport,
};
use crate::backend::{SnapshotInfo, SnapshotState};
use crate::server::disk::{unix_ms, Disk};
use crate::server::Control;

/// Builds status reports; remembers the previous one's counters for rates.
#[derive(Debug)]
pub struct StatusSource {
    control: Control,
    data_port: u16,
    started_unix_ms: u64,
    started: Instant,
    hostname: String,
    rates: Mutex<Rates>,
}

#[derive(Debug, Default)]
struct Rates {
    /// Per disk: when, and bytes received then.
    received: HashMap<String, (Instant, u64, u64)>,
    /// When, and process CPU seconds then.
    cpu: Option<(Instant, f64)>,
}

impl StatusSource {
    pub fn new(control: Control, data_port: u16) -> Arc<Self> {
        Arc::new(StatusSource {
            control,
            data_port,
            started_unix_ms: unix_ms(),
            started: Instant::now(),
            hostname: hostname(),
            rates: Mutex::new(Rates::default()),
        })
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    pub fn data_port(&self) -> u16 {
        self.data_port
    }

    pub fn backend_kind(&self) -> &'static str {
        self.control.shared().backend.kind()
    }

    /// The cloud's signed identity document of this VM, for registration.
    pub fn identity(&self) -> Option<crate::api::IdentityDocument> {
        self.control.shared().backend.identity()
    }

    /// The gateway's state now.
    pub async fn report(&self, gateway_id: &str, reports_dropped: u64) -> StatusReport {
        let shared = self.control.shared().clone();
        let now_ms = unix_ms();
        let mut by_disk: BTreeMap<String, Vec<SnapshotInfo>> = BTreeMap::new();
        match shared.backend.list_snapshots(None).await {
            Ok(all) => {
                for s in all {
                    by_disk.entry(s.disk_id.clone()).or_default().push(s);
                }
            }
            Err(e) => tracing::warn!(error = %e, "status: cannot list snapshots"),
        }
        let mut disks: Vec<DiskStatus> = Vec::new();
        for disk in shared.disks.all() {
            let snaps = by_disk.remove(&disk.id).unwrap_or_default();
            disks.push(self.disk_status(&disk, &snaps, now_ms));
        }
        // Finalized disks: gone from the registry, their snapshots kept by policy.
        for (id, a) in self.control.assignments() {
            if a.phase == DiskPhase::Finalized {
                let snaps = by_disk.remove(&id).unwrap_or_default();
                disks.push(finalized_status(&id, a.size_bytes, &snaps));
            }
        }
        disks.sort_by(|a, b| a.disk_id.cmp(&b.disk_id));
        let launches = shared.backend.list_launches().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "status: cannot list launches");
            Vec::new()
        });
        let (mem_total, mem_avail) = meminfo();
        let (free, total) = fs_space(&self.control);
        let open_sessions = shared
            .disks
            .all()
            .iter()
            .map(|d| d.stats.open_sessions.load(Ordering::Relaxed))
            .sum();
        StatusReport {
            gateway: GatewayStatus {
                gateway_id: gateway_id.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                hostname: self.hostname.clone(),
                backend: self.backend_kind().to_string(),
                data_port: self.data_port,
                reported_unix_ms: now_ms,
                started_unix_ms: self.started_unix_ms,
                uptime_secs: self.started.elapsed().as_secs(),
                cpu_percent: self.cpu_percent(),
                memory_rss_bytes: rss_bytes(),
                memory_total_bytes: mem_total,
                memory_available_bytes: mem_avail,
                data_free_bytes: free,
                data_total_bytes: total,
                open_sessions,
                policy: shared.policy.snapshot(),
                reports_dropped,
                cloud: shared.backend.cloud_status(),
            },
            disks,
            launches,
        }
    }

    /// Rate of disk bytes covered (written or zeroed), so it compares with the backlog.
    fn throughput(&self, disk: &Disk) -> u64 {
        let received = disk.stats.bytes_written.load(Ordering::Relaxed)
            + disk.stats.bytes_zeroed.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let entry = rates
            .received
            .entry(disk.id.clone())
            .or_insert((now, received, 0));
        let secs = now.duration_since(entry.0).as_secs_f64();
        // Reports closer together than a second keep the last rate (a burst of change
        // reports would otherwise show noise).
        if secs >= 1.0 {
            let rate = (received.saturating_sub(entry.1) as f64 / secs) as u64;
            *entry = (now, received, rate);
        }
        entry.2
    }

    fn cpu_percent(&self) -> f64 {
        let Some(cpu) = process_cpu_secs() else {
            return 0.0;
        };
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let pct = match rates.cpu {
            Some((then, was)) => {
                let wall = now.duration_since(then).as_secs_f64();
                if wall > 0.0 {
                    ((cpu - was) / wall * 100.0).max(0.0)
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        rates.cpu = Some((now, cpu));
        (pct * 10.0).round() / 10.0
    }

    fn disk_status(&self, disk: &Disk, snaps: &[SnapshotInfo], now_ms: u64) -> DiskStatus {
        let (point, ckpt) = {
            let st = disk.state();
            (st.point(), st.checkpoint().cloned())
        };
        let stats = &disk.stats;
        let connected = stats.connected();
        let phase = disk.phase();
        let last_error = disk.last_error();
        let p = disk.progress(now_ms);
        let (state, replicated, backlog, lag_secs) = (p.state, p.replicated, p.backlog, p.lag_secs);
        let throughput = self.throughput(disk);
        let eta_secs = (backlog > 0 && throughput > 0 && connected).then(|| backlog / throughput);
        let errors = stats
            .errors
            .nonzero()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        DiskStatus {
            disk_id: disk.id.clone(),
            state,
            phase,
            connected,
            bytes_total: disk.size,
            bytes_replicated: replicated,
            bytes_backlogged: backlog,
            bytes_received: stats.bytes_received.load(Ordering::Relaxed),
            throughput_bytes_per_sec: throughput,
            eta_secs,
            lag_secs,
            durable_seq: point.seq,
            last_checkpoint: ckpt.map(|c| CheckpointSummary {
                seq: c.seq,
                label: c.label,
                snapshot_id: c.snapshot.id,
                created_unix_ms: c.snapshot.created_unix_ms,
            }),
            last_snapshot: snaps.last().map(SnapshotSummary::from),
            snapshots: recent(snaps),
            // The newer of the last session error and the last snapshot failure.
            last_error: match (last_error, disk.snapshot_error()) {
                (Some((at, code, msg)), Some((sat, _))) if at >= sat => {
                    Some(format!("{code}: {msg}"))
                }
                (_, Some((_, snap))) => Some(snap),
                (Some((_, code, msg)), None) => Some(format!("{code}: {msg}")),
                (None, None) => None,
            },
            errors,
            volume_id: self.control.shared().backend.volume_id(&disk.id),
        }
    }
}

/// Snapshots listed per disk in a report: the newest ones. Without retention a disk can hold
/// thousands, and a report must stay well under a control plane's body limit (1 MiB for
/// `sync-control`); the full list is `sync-gateway snapshots`.
pub const REPORTED_SNAPSHOTS: usize = 50;

fn recent(snaps: &[SnapshotInfo]) -> Vec<SnapshotSummary> {
    let from = snaps.len().saturating_sub(REPORTED_SNAPSHOTS);
    snaps[from..].iter().map(SnapshotSummary::from).collect()
}

fn finalized_status(id: &str, size: u64, snaps: &[SnapshotInfo]) -> DiskStatus {
    let last_completed = snaps
        .iter()
        .rev()
        .find(|s| s.state == SnapshotState::Completed);
    DiskStatus {
        disk_id: id.to_string(),
        state: DiskState::Paused,
        phase: DiskPhase::Finalized,
        connected: false,
        bytes_total: size,
        bytes_replicated: size,
        bytes_backlogged: 0,
        bytes_received: 0,
        throughput_bytes_per_sec: 0,
        eta_secs: None,
        lag_secs: None,
        durable_seq: 0,
        last_checkpoint: None,
        last_snapshot: last_completed.map(SnapshotSummary::from),
        snapshots: recent(snaps),
        last_error: None,
        errors: BTreeMap::new(),
        volume_id: None,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// User + system CPU seconds of this process, from `/proc/self/stat`.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some((utime + stime) / hz.max(1.0))
}

fn rss_bytes() -> u64 {
    proc_kib("/proc/self/status", "VmRSS:").unwrap_or(0) * 1024
}

fn meminfo() -> (u64, u64) {
    (
        proc_kib("/proc/meminfo", "MemTotal:").unwrap_or(0) * 1024,
        proc_kib("/proc/meminfo", "MemAvailable:").unwrap_or(0) * 1024,
    )
}

fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn fs_space(control: &Control) -> (u64, u64) {
    match rustix::fs::statvfs(control.data_dir()) {
        Ok(s) => (
            s.f_bavail.saturating_mul(s.f_frsize),
            s.f_blocks.saturating_mul(s.f_frsize),
        ),
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn proc_figures_are_read() {
        assert!(process_cpu_secs().is_some());
        assert!(rss_bytes() > 0);
        let (total, avail) = meminfo();
        assert!(total > 0 && avail <= total);
    }
}
