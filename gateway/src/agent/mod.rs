//! Reference agent: scans a source disk and streams its changes to a gateway.
//!
//! One run is one pass ending in a checkpoint:
//!
//! ```text
//! load state ─▶ connect (Welcome) ─▶ plan ─▶ persist pass ─▶ scan ⇉ send ─▶ Checkpoint
//!     ─▶ CheckpointAck ─▶ blockmap.bin ─▶ state.json (pass done)
//! ```
//!
//! - [`plan`]: full, incremental, delta, resume or "already landed", from state and `Welcome`.
//! - [`scan`]: read, hash, diff, compress and encode, on threads, in order.
//! - [`delta`]: the pass without a baseline: ask the gateway which blocks differ (hash queries),
//!   send only those.
//! - [`link`]: the connection, send window, acks, reconnect and resend.
//! - [`state`]: what survives between runs; [`report`]: what a run tells its caller.

pub mod delta;
pub mod error;
mod handshake;
pub mod link;
pub mod plan;
pub mod report;
pub mod scan;
pub mod state;
pub mod throttle;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;

pub use error::AgentError;
use link::{CheckpointOutcome, Link, LinkConfig};
use plan::{Force, Plan};
pub use report::Report;
use scan::{Pending, ScanConfig};
use state::{BlockMap, CheckpointRecord, PassKind, PassRecord, StateDir};

use crate::protocol::auth::DiskKey;
use crate::protocol::frame::CHECKPOINT_VERIFY;
use crate::protocol::{valid_disk_id, Checkpoint, BLOCK_SIZE, MAX_BLOCK_LEN};

/// Everything `sync-agent replicate` takes.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    pub gateway: String,
    pub disk_id: String,
    pub key_file: PathBuf,
    pub state_dir: PathBuf,
    pub source: PathBuf,
    pub verify: bool,
    /// Wire bytes per second.
    pub bandwidth_limit: Option<u64>,
    pub full: bool,
    /// `--rescan`: a delta pass even with a usable baseline (verify and repair the gateway's
    /// copy). Not together with `full`.
    pub rescan: bool,
    pub retry_timeout: Duration,
    /// Largest block per frame; capped by the gateway's `max_payload`.
    pub block_size: u64,
    /// Granularity of a delta pass's first comparison (a multiple of 4 KiB); differing blocks
    /// are then compared per 4 KiB.
    pub delta_block_size: u64,
    pub progress: bool,
}

/// Runs one pass and its checkpoint. A verify mismatch is a successful run with
/// `verified == Some(false)`; the caller decides the exit code.
pub async fn replicate(opts: &ReplicateOptions) -> Result<Report, AgentError> {
    let started = std::time::Instant::now();
    if !valid_disk_id(&opts.disk_id) {
        return Err(AgentError::InvalidDiskId(opts.disk_id.clone()));
    }
    if opts.block_size < BLOCK_SIZE {
        return Err(AgentError::BlockSize(opts.block_size));
    }
    let delta_block = delta::check_block_size(opts.delta_block_size)?;
    if opts.full && opts.rescan {
        return Err(AgentError::FullAndRescan);
    }
    let key = DiskKey::load(&opts.key_file)?;
    let (source, size) = open_source(&opts.source)?;
    let dir = StateDir::open(&opts.state_dir, &opts.disk_id)?;
    let mut saved = dir.load()?;
    let saved_map = dir.load_map()?;

    let (mut link, welcome) = Link::connect(LinkConfig {
        addr: opts.gateway.clone(),
        disk_id: opts.disk_id.clone(),
        disk_size: size,
        key,
        retry_timeout: opts.retry_timeout,
        bandwidth_limit: opts.bandwidth_limit,
    })
    .await?;
    let chunk = frame_block_size(opts.block_size, welcome.max_payload)?;
    let force = if opts.rescan {
        Force::Rescan
    } else if opts.full {
        Force::Full
    } else {
        Force::Auto
    };
    let plan = plan::decide(&saved, saved_map.as_ref(), size, &welcome, force);
    tracing::debug!(?plan, ?welcome, "plan");
    let landed = matches!(plan, Plan::Landed(_));

    let (pass, send_from, resumed_from_seq) = match plan {
        Plan::Landed(pass) => (pass, size, Some(welcome.durable_seq)),
        Plan::Resume { pass, from } => (pass, from, Some(welcome.durable_seq)),
        Plan::Fresh { kind, warning } => {
            if let Some(w) = warning {
                tracing::warn!("{w}");
            }
            let pass = PassRecord {
                label: format!("{}-{}", kind.label_prefix(), unix_ms()),
                kind,
                started_at: state::now_rfc3339(),
            };
            (pass, 0, None)
        }
    };
    if !landed {
        saved.pass = Some(pass.clone());
        dir.save(&saved)?;
    }
    let baseline = match (pass.kind, saved_map) {
        (PassKind::Incremental, Some(m)) if !landed => Some(m.hashes),
        _ => None,
    };

    let progress = opts.progress.then(|| progress_bar(size));
    let first_seq = welcome.durable_seq.max(welcome.checkpoint_seq) + 1;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    let mut report = Report {
        disk_id: opts.disk_id.clone(),
        mode: pass.kind.as_str().to_string(),
        bytes_total: size,
        resumed_from_seq,
        ..Report::default()
    };
    let scanned = if pass.kind == PassKind::Delta && !landed {
        delta::run(
            &mut link,
            delta::DeltaConfig {
                source: Arc::new(source),
                path: opts.source.clone(),
                size,
                block_size: delta_block,
                chunk,
                first_seq,
                verify: opts.verify,
                workers,
                progress: progress.clone(),
            },
            &mut report,
        )
        .await?
    } else {
        let mut scan = scan::start(ScanConfig {
            source: Arc::new(source),
            path: opts.source.clone(),
            size,
            chunk,
            send_from,
            first_seq,
            baseline,
            verify: opts.verify,
            workers,
            progress: progress.clone(),
        });
        stream(&mut link, &mut scan.frames, &mut report).await?;
        scan.done
            .await
            .map_err(|_| AgentError::Internal("scan thread stopped".into()))??
    };
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    report.bytes_scanned = scanned.bytes_scanned;
    report.digest = scanned.digest.map(hex::encode);

    if landed {
        report.checkpoint_seq = welcome.checkpoint_seq;
        report.checkpoint_label = welcome.checkpoint_label.clone();
        report.snapshot_id = welcome.snapshot_id.clone();
        if opts.verify {
            tracing::warn!(
                "checkpoint {} landed before this run; not verified",
                pass.label
            );
        }
    } else {
        let cp = Checkpoint {
            seq: scanned.next_seq,
            flags: if opts.verify { CHECKPOINT_VERIFY } else { 0 },
            label: pass.label.clone(),
        };
        report.frames_sent += 1;
        report.checkpoint_seq = cp.seq;
        report.checkpoint_label = pass.label.clone();
        match link.checkpoint(cp).await? {
            CheckpointOutcome::Acked(ack) => {
                report.snapshot_id = ack.snapshot_id;
                if let Some(ours) = scanned.digest.filter(|_| opts.verify) {
                    report.verified = Some(ack.digest == Some(ours));
                    if ack.digest.is_none() {
                        tracing::warn!("gateway answered the verify checkpoint without a digest");
                    }
                }
            }
            CheckpointOutcome::Landed(w) => {
                tracing::warn!(
                    "connection lost before the checkpoint ack; the gateway reports it landed{}",
                    if opts.verify { " (not verified)" } else { "" }
                );
                report.snapshot_id = w.snapshot_id;
            }
        }
    }
    dir.save_map(&BlockMap {
        source_size: size,
        checkpoint_seq: report.checkpoint_seq,
        hashes: scanned.map,
    })?;
    saved.checkpoint = Some(CheckpointRecord {
        seq: report.checkpoint_seq,
        label: report.checkpoint_label.clone(),
        snapshot_id: report.snapshot_id.clone(),
        time: state::now_rfc3339(),
        source_size: size,
    });
    saved.pass = None;
    dir.save(&saved)?;

    let stats = link.stats();
    link.close().await;
    report.bytes_sent_wire = stats.bytes_sent_wire;
    report.reconnects = stats.reconnects;
    report.duration_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Sends the scan's frames in order.
async fn stream(
    link: &mut Link,
    frames: &mut mpsc::Receiver<Pending>,
    report: &mut Report,
) -> Result<(), AgentError> {
    while let Some(p) = frames.recv().await {
        let out = match p {
            Pending::Ready(o) => o,
            Pending::Later(rx) => rx
                .await
                .map_err(|_| AgentError::Internal("encode worker stopped".into()))?,
        };
        link.send(out.seq, out.bytes).await?;
        report.frames_sent += 1;
        report.blocks_sent += out.data_blocks;
        report.blocks_zero += out.zero_blocks;
        report.bytes_changed += out.len;
    }
    Ok(())
}

/// Opens the source; a block device's size comes from seeking to its end.
fn open_source(path: &Path) -> Result<(File, u64), AgentError> {
    let err = |source| AgentError::Source {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let size = f.seek(SeekFrom::End(0)).map_err(err)?;
    Ok((f, size))
}

/// The block per frame: the requested size, capped by the gateway, in whole 4 KiB blocks.
fn frame_block_size(requested: u64, max_payload: u32) -> Result<usize, AgentError> {
    let cap = u64::from(max_payload.min(MAX_BLOCK_LEN));
    if cap < BLOCK_SIZE {
        return Err(AgentError::Protocol(format!(
            "gateway max payload {max_payload} is below one block"
        )));
    }
    let size = requested.min(cap) / BLOCK_SIZE * BLOCK_SIZE;
    if size == 0 {
        return Err(AgentError::BlockSize(requested));
    }
    Ok(size as usize)
}

fn progress_bar(size: u64) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Writes a fresh key file (64 hex characters and a newline, mode 0600); never overwrites.
pub fn keygen(out: &Path) -> Result<(), AgentError> {
    if out.exists() {
        return Err(AgentError::KeyFile {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "file exists; refusing to overwrite a key",
            ),
        });
    }
    let text = format!("{}\n", DiskKey::generate().to_hex());
    // A bare file name has an empty parent, which atomic_write cannot fsync: anchor it at ".".
    let anchored = match out.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new(".").join(out),
        _ => out.to_path_buf(),
    };
    crate::durable::atomic_write(&anchored, text.as_bytes(), 0o600).map_err(|source| {
        AgentError::KeyFile {
            path: out.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_is_capped_and_aligned() {
        assert_eq!(frame_block_size(1 << 20, 1 << 20).ok(), Some(1 << 20));
        assert_eq!(frame_block_size(1 << 20, 256 << 10).ok(), Some(256 << 10));
        assert_eq!(frame_block_size(10_000, 1 << 20).ok(), Some(8192));
        assert_eq!(frame_block_size(1 << 30, u32::MAX).ok(), Some(8 << 20));
        assert!(frame_block_size(1 << 20, 100).is_err());
    }
}

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod fake_gateway;
