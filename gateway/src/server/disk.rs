//! Per-disk state shared by the sessions of one disk: its key, volume, durable point, last
//! checkpoint, and the slot that lets a newer session supersede an older one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backend::{Snapshot, SnapshotInfo, Volume};
use crate::durable::{self, DurablePoint, SeqRecord};
use crate::protocol::auth::DiskKey;

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

    /// Persists a completed checkpoint (before its durable point moves past it).
    pub fn store_checkpoint(&mut self, c: CheckpointRecord) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&c).map_err(std::io::Error::other)?;
        durable::atomic_write(&self.checkpoint_path, &json, 0o600)?;
        self.checkpoint = Some(c);
        Ok(())
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
    key: DiskKey,
    pub volume: Arc<Volume>,
    pub state: Mutex<DiskState>,
    /// Held by the active session for its whole life, writer drain included.
    pub active: Arc<tokio::sync::Mutex<()>>,
    slot: Mutex<SessionSlot>,
    /// Snapshots whose content is still being copied; writes preserve through each first.
    in_flight: Mutex<Vec<Snapshot>>,
}

/// A claim on a disk by a session that may still be superseded.
#[derive(Debug)]
pub struct SessionClaim {
    pub id: u64,
    pub token: CancellationToken,
}

impl Disk {
    pub fn new(id: String, size: u64, key: DiskKey, volume: Volume, state: DiskState) -> Self {
        Disk {
            id,
            size,
            key,
            volume: Arc::new(volume),
            state: Mutex::new(state),
            active: Arc::new(tokio::sync::Mutex::new(())),
            slot: Mutex::new(SessionSlot::default()),
            in_flight: Mutex::new(Vec::new()),
        }
    }

    /// Snapshots still being filled (finished ones are dropped from the list here).
    ///
    /// Several may be in flight: a part changed between two checkpoints was preserved for the
    /// older snapshot when it changed, so preserving the current content for every snapshot
    /// that still lacks a part is right for all of them.
    pub fn snapshots_in_flight(&self) -> Vec<Snapshot> {
        let mut g = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|s| !s.is_done());
        g.clone()
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

    pub fn key(&self) -> &DiskKey {
        &self.key
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
