//! Per-disk state shared by the sessions of one disk: its key, volume, durable point, last
//! checkpoint, and the slot that lets a newer session supersede an older one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::api::DiskPhase;
use crate::backend::{Snapshot, SnapshotInfo, Volume};
use crate::durable::{self, DurablePoint, SeqRecord};
use crate::protocol::auth::DiskKey;
use crate::protocol::ErrorCode;

/// The last completed checkpoint of a disk, persisted next to its durable point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub seq: u64,
    pub label: String,
    pub snapshot: SnapshotInfo,
}

/// Mutable replication state of a disk. Only the writer of the active session changes it.
#[derive(Debug)]
pub struct DiskState {
    record: SeqRecord,
    checkpoint: Option<CheckpointRecord>,
    checkpoint_path: PathBuf,
}

impl DiskState {
    /// Loads (or starts) the state files of `disk_id` under `state_dir`.
    pub fn load(state_dir: &Path, disk_id: &str) -> std::io::Result<Self> {
        durable::create_dir_all_durable(state_dir)?;
        let record = SeqRecord::open(&state_dir.join(format!("{disk_id}.seq")))?;
        let checkpoint_path = state_dir.join(format!("{disk_id}.checkpoint.json"));
        let checkpoint = match std::fs::read(&checkpoint_path) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", checkpoint_path.display()),
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(DiskState {
            record,
            checkpoint,
            checkpoint_path,
        })
    }

    pub fn point(&self) -> DurablePoint {
        self.record.get()
    }

    pub fn checkpoint(&self) -> Option<&CheckpointRecord> {
        self.checkpoint.as_ref()
    }

    /// Persists a new durable point (one `fdatasync`). The point never moves backwards.
    pub fn store_point(&mut self, p: DurablePoint) -> std::io::Result<()> {
        let now = self.record.get();
        if p.seq < now.seq {
            return Err(std::io::Error::other(format!(
                "refusing to move the durable point back from seq {} to {}",
                now.seq, p.seq
            )));
        }
        self.record.store(p)
    }

    /// Deletes the state files of `disk_id` (finalize: a later assignment starts afresh).
    pub fn remove_files(state_dir: &Path, disk_id: &str) -> std::io::Result<()> {
        for name in [
            format!("{disk_id}.seq"),
            format!("{disk_id}.checkpoint.json"),
        ] {
            match std::fs::remove_file(state_dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        durable::sync_dir(state_dir)
    }

    /// Persists a completed checkpoint (before its durable point moves past it).
    pub fn store_checkpoint(&mut self, c: CheckpointRecord) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&c).map_err(std::io::Error::other)?;
        durable::atomic_write(&self.checkpoint_path, &json, 0o600)?;
        self.checkpoint = Some(c);
        Ok(())
    }
}

/// Counts of [`ErrorCode`]s, one relaxed atomic per wire number. Codes beyond the table (from a
/// newer peer) share slot 0, which no code uses on the wire.
#[derive(Debug, Default)]
pub struct ErrorCounts([AtomicU64; ErrorCounts::SLOTS]);

impl ErrorCounts {
    const SLOTS: usize = 32;

    pub fn record(&self, code: ErrorCode) {
        let i = usize::from(code.as_u16());
        let i = if i < Self::SLOTS { i } else { 0 };
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// `(code name, count)` for every code seen at least once, in wire-number order. Codes this
    /// build does not know are all `unknown_error`.
    pub fn nonzero(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for (i, c) in self.0.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let name = ErrorCode::from_u16(i as u16).name();
            match out.iter_mut().find(|(k, _)| *k == name) {
                Some((_, total)) => *total += n,
                None => out.push((name, n)),
            }
        }
        out
    }
}

/// Live counters of one disk for the metrics port. Writers update them with relaxed atomics
/// (a few nanoseconds on the data path); readers never take a lock the data path holds.
/// Counters start at zero with each gateway process; the gauges start from the persisted state.
#[derive(Debug, Default)]
pub struct DiskStats {
    /// Payload bytes of data frames as received (compressed when the agent compressed).
    pub bytes_received: AtomicU64,
    /// Bytes of data blocks written to the volume.
    pub bytes_written: AtomicU64,
    /// Bytes of zero runs applied to the volume (hole punching).
    pub bytes_zeroed: AtomicU64,
    /// Frames received from authenticated agents.
    pub frames: AtomicU64,
    /// `fdatasync`s that made data durable and were acked.
    pub syncs: AtomicU64,
    /// Checkpoints completed (snapshot initiated and acked).
    pub checkpoints: AtomicU64,
    /// Delta-resync hash queries answered.
    pub hash_queries: AtomicU64,
    /// Sessions that ended with an error, by code.
    pub errors: ErrorCounts,
    /// Sessions that authenticated.
    pub sessions: AtomicU64,
    /// Authenticated sessions open right now (a superseded one may briefly overlap its successor).
    pub open_sessions: AtomicU64,
    /// Newest durable sequence number.
    pub durable_seq: AtomicU64,
    /// Sequence number of the last completed checkpoint (0: none).
    pub checkpoint_seq: AtomicU64,
    /// Wall-clock time of the last ack or checkpoint ack, Unix milliseconds (0: none yet).
    pub last_ack_unix_ms: AtomicU64,
    /// Highest sequence number received (not necessarily durable yet).
    pub received_seq: AtomicU64,
    /// When the open session authenticated, ms since the epoch.
    pub session_started_unix_ms: AtomicU64,
    /// Set while the open session answers hash queries (delta resync); cleared by a checkpoint
    /// and when the session ends.
    pub rescanning: AtomicBool,
}

impl DiskStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records a newly durable point and the time of its ack.
    pub fn acked(&self, durable_seq: u64) {
        self.durable_seq.fetch_max(durable_seq, Ordering::Relaxed);
        self.last_ack_unix_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Marks an authenticated session open until the returned guard drops (panics included).
    pub fn session_opened(self: &Arc<Self>) -> OpenSession {
        self.session_started_unix_ms
            .store(unix_ms(), Ordering::Relaxed);
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.open_sessions.fetch_add(1, Ordering::Relaxed);
        OpenSession(self.clone())
    }

    /// Whether an agent is connected and authenticated.
    pub fn connected(&self) -> bool {
        self.open_sessions.load(Ordering::Relaxed) > 0
    }
}

/// An open authenticated session, counted in [`DiskStats::open_sessions`] while it lives.
#[derive(Debug)]
pub struct OpenSession(Arc<DiskStats>);

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct SessionSlot {
    latest: u64,
    token: Option<CancellationToken>,
}

/// One replicated disk.
#[derive(Debug)]
pub struct Disk {
    pub id: String,
    pub size: u64,
    /// `None` once revoked.
    key: RwLock<Option<DiskKey>>,
    pub volume: Arc<Volume>,
    pub state: Mutex<DiskState>,
    /// Held by the active session for its whole life, writer drain included.
    pub active: Arc<tokio::sync::Mutex<()>>,
    slot: Mutex<SessionSlot>,
    /// Snapshots whose content is still being copied; writes preserve through each first.
    in_flight: Mutex<Vec<Snapshot>>,
    /// Counters for the metrics port.
    pub stats: Arc<DiskStats>,
    /// Where the disk is in its life (replicating, revoked, cut over).
    phase: Mutex<DiskPhase>,
    /// The newest session error: when (ms since the epoch), its code and message.
    last_error: Mutex<Option<(u64, ErrorCode, String)>>,
    /// The newest snapshot that failed after it was initiated (a local copy cut short, a cloud
    /// snapshot the cloud failed): when, and why.
    snapshot_error: Mutex<Option<(u64, String)>>,
    /// The command queue of the active session's writer, for snapshots taken on command
    /// between two writes. Weak, so the session's end still closes the channel.
    writer: Mutex<Option<(u64, tokio::sync::mpsc::WeakSender<super::writer::WriterCmd>)>>,
}

/// Received data waiting this long for an ack makes the disk `stalled`.
const STALL_AFTER_MS: u64 = 30_000;

/// Where a disk's replication stands, as the status and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub state: crate::api::DiskState,
    /// Bytes of the disk covered (all of it at a checkpoint).
    pub replicated: u64,
    /// Bytes the current pass has still to cover (0 at a checkpoint).
    pub backlog: u64,
    /// Age of the newest checkpoint's snapshot, seconds (none before the first).
    pub lag_secs: Option<u64>,
}

/// A claim on a disk by a session that may still be superseded.
#[derive(Debug)]
pub struct SessionClaim {
    pub id: u64,
    pub token: CancellationToken,
}

impl Disk {
    pub fn new(id: String, size: u64, key: DiskKey, volume: Volume, state: DiskState) -> Self {
        let stats = DiskStats::default();
        stats
            .durable_seq
            .store(state.point().seq, Ordering::Relaxed);
        stats.checkpoint_seq.store(
            state.checkpoint().map(|c| c.seq).unwrap_or(0),
            Ordering::Relaxed,
        );
        Disk {
            id,
            size,
            key: RwLock::new(Some(key)),
            volume: Arc::new(volume),
            state: Mutex::new(state),
            active: Arc::new(tokio::sync::Mutex::new(())),
            slot: Mutex::new(SessionSlot::default()),
            in_flight: Mutex::new(Vec::new()),
            stats: Arc::new(stats),
            phase: Mutex::new(DiskPhase::Replicating),
            last_error: Mutex::new(None),
            snapshot_error: Mutex::new(None),
            writer: Mutex::new(None),
        }
    }

    /// Classifies the disk's replication, in this order of precedence:
    ///
    /// | state | when |
    /// |---|---|
    /// | `paused` | the key is revoked, or the disk is cut over |
    /// | `stalled` | the last session failed on storage since the last ack, or received data has waited > 30 s for an ack |
    /// | `rescan` | a connected agent is comparing block hashes (delta resync) |
    /// | `creating-snapshot` | a snapshot's content is still being captured |
    /// | `initial-sync` | an agent is connected and no checkpoint was reached yet |
    /// | `backlog` | an agent is connected and streaming changes since the last checkpoint |
    /// | `disconnected` | no agent, and the last pass stopped before its checkpoint |
    /// | `initiating` | nothing received yet |
    /// | `continuous` | at a checkpoint: every byte received is in a snapshot |
    ///
    /// Protocol v1 agents announce nothing about their backlog, so progress is what the gateway
    /// sees: agents scan in ascending offsets, so the end of the newest durable write of the
    /// current pass (`resume_offset`) is how far the pass has got, and the backlog is what lies
    /// beyond it. Lag is the age of the newest checkpoint: what a launch now would lose.
    pub fn progress(&self, now_ms: u64) -> Progress {
        use crate::api::DiskState as S;
        let (point, ckpt_created) = {
            let st = self.state();
            (
                st.point(),
                st.checkpoint().map(|c| c.snapshot.created_unix_ms),
            )
        };
        let stats = &self.stats;
        let connected = stats.connected();
        let has_ckpt = ckpt_created.is_some();
        let last_ack = stats.last_ack_unix_ms.load(Ordering::Relaxed);
        let received_seq = stats.received_seq.load(Ordering::Relaxed);
        let at_checkpoint = has_ckpt && point.seq == point.checkpoint_seq;
        let storage_failed = matches!(
            self.last_error(),
            Some((at, ErrorCode::Storage, _)) if at >= last_ack
        );
        // Waiting since the newest ack, or since the session began if none came in it.
        let waiting_since = last_ack.max(stats.session_started_unix_ms.load(Ordering::Relaxed));
        let unacked_too_long = connected
            && received_seq > point.seq
            && now_ms.saturating_sub(waiting_since) > STALL_AFTER_MS;
        let state = if self.phase() != DiskPhase::Replicating || self.is_revoked() {
            S::Paused
        } else if storage_failed || unacked_too_long {
            S::Stalled
        } else if connected && stats.rescanning.load(Ordering::Relaxed) {
            S::Rescan
        } else if self
            .snapshots_in_flight()
            .iter()
            .any(Snapshot::is_local_work)
        {
            // A cloud snapshot completes in the cloud for minutes while replication goes on;
            // its state is in the snapshot list, not here.
            S::CreatingSnapshot
        } else if connected && !has_ckpt {
            S::InitialSync
        } else if connected && !at_checkpoint {
            S::Backlog
        } else if !at_checkpoint && (point.seq > 0 || has_ckpt) {
            S::Disconnected
        } else if !has_ckpt {
            S::Initiating
        } else {
            S::Continuous
        };
        let (replicated, backlog) = if at_checkpoint {
            (self.size, 0)
        } else {
            let done = point.resume_offset.min(self.size);
            (done, self.size - done)
        };
        Progress {
            state,
            replicated,
            backlog,
            lag_secs: ckpt_created.map(|c| now_ms.saturating_sub(c) / 1000),
        }
    }

    /// Snapshots retention must keep whatever the tiers say: the current checkpoint's.
    pub fn protected_snapshots(&self) -> Vec<String> {
        self.state()
            .checkpoint()
            .map(|c| vec![c.snapshot.id.clone()])
            .unwrap_or_default()
    }

    /// Where the disk is in its life.
    pub fn phase(&self) -> DiskPhase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_phase(&self, phase: DiskPhase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    /// Records how the newest failed session ended.
    pub fn set_last_error(&self, code: ErrorCode, message: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((unix_ms(), code, message.to_string()));
    }

    /// The newest session error: time (ms since the epoch), code, message.
    pub fn last_error(&self) -> Option<(u64, ErrorCode, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Publishes the writer queue of session `session` (its claim id).
    pub fn set_writer(
        &self,
        session: u64,
        w: tokio::sync::mpsc::WeakSender<super::writer::WriterCmd>,
    ) {
        *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some((session, w));
    }

    /// Withdraws session `session`'s writer queue, unless a newer session has already
    /// published its own.
    pub fn clear_writer(&self, session: u64) {
        let mut g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_some_and(|(id, _)| *id == session) {
            *g = None;
        }
    }

    /// The active session's writer queue, while one runs.
    pub fn writer(&self) -> Option<tokio::sync::mpsc::Sender<super::writer::WriterCmd>> {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|(_, w)| w.upgrade())
    }

    /// Snapshots still being filled (finished ones are dropped from the list here).
    ///
    /// Several may be in flight: a part changed between two checkpoints was preserved for the
    /// older snapshot when it changed, so preserving the current content for every snapshot
    /// that still lacks a part is right for all of them.
    pub fn snapshots_in_flight(&self) -> Vec<Snapshot> {
        let mut g = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|s| {
            if !s.is_done() {
                return true;
            }
            // Settled: a failure is the operator's to see (done, so wait() returns at once).
            if let Err(why) = s.wait() {
                tracing::warn!(disk = %self.id, snapshot = %s.info().id, error = %why,
                    "snapshot failed after it was initiated");
                *self
                    .snapshot_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) =
                    Some((unix_ms(), format!("snapshot {} failed: {why}", s.info().id)));
            }
            false
        });
        g.clone()
    }

    /// The newest snapshot failure: when (ms since the epoch) and what.
    pub fn snapshot_error(&self) -> Option<(u64, String)> {
        self.snapshot_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a newly initiated (or resumed) snapshot.
    pub fn add_snapshot_in_flight(&self, s: Snapshot) {
        if !s.is_done() {
            self.in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s);
        }
    }

    /// The agent key, `None` when revoked.
    pub fn key(&self) -> Option<DiskKey> {
        self.key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the key was revoked (and not replaced since).
    pub fn is_revoked(&self) -> bool {
        self.key.read().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// Replaces the agent key (re-assignment).
    /// A session authenticated with the old key ends (it reconnects with the new one), so a
    /// rotation cuts off a leaked key at once.
    pub fn set_key(&self, key: DiskKey) {
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &slot.token {
            t.cancel();
        }
    }

    /// Forgets the key and ends the open session, which reports `revoked` to its agent.
    pub fn revoke(&self) {
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = None;
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &slot.token {
            t.cancel();
        }
    }

    /// Registers a new session as the latest one and cancels the previous session, so a
    /// reconnecting agent is never locked out by its own half-open old connection.
    pub fn claim(&self, parent: &CancellationToken) -> SessionClaim {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.token.take() {
            old.cancel();
        }
        slot.latest += 1;
        let token = parent.child_token();
        slot.token = Some(token.clone());
        SessionClaim {
            id: slot.latest,
            token,
        }
    }

    /// Whether `claim` is still the latest session.
    pub fn is_latest(&self, claim: &SessionClaim) -> bool {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.latest == claim.id && !claim.token.is_cancelled()
    }

    /// Locks the state (poison means a writer panicked mid-update; the files are still
    /// consistent because every update is atomic on disk).
    pub fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The disks this gateway serves, by id.
#[derive(Debug, Default)]
pub struct DiskRegistry {
    disks: RwLock<HashMap<String, Arc<Disk>>>,
}

impl DiskRegistry {
    /// Stops serving a disk (finalize).
    pub fn remove(&self, id: &str) -> Option<Arc<Disk>> {
        self.disks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    pub fn insert(&self, disk: Disk) {
        self.disks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(disk.id.clone(), Arc::new(disk));
    }

    pub fn get(&self, id: &str) -> Option<Arc<Disk>> {
        self.disks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.disks.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every disk.
    pub fn all(&self) -> Vec<Arc<Disk>> {
        self.disks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
