//! Run-time control of the gateway: what the control plane's commands do. Disks are assigned
//! and revoked, snapshots taken on command, instances launched, disks cut over and finalized,
//! and the policy changed, all while agents keep streaming.
//!
//! Everything a command changes is persisted under `DATA_DIR/state` before the command reports
//! success, so a restart comes back to the same disks, keys, phases and policy:
//!
//! | file | what | mode |
//! |---|---|---|
//! | `assignments.json` | disks assigned by command: size, agent key (hex), phase | 0600 |
//! | `policy.json` | retention tiers and bandwidth limit set by command | 0600 |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::disk::unix_ms;
use super::disk::{Disk, DiskState};
use super::writer::WriterCmd;
use super::{open_disk, GatewayError, Shared};
use crate::api::{DiskPhase, Policy};
use crate::backend::{LaunchInfo, Snapshot, SnapshotInfo, SnapshotRequest, SnapshotState};
use crate::config::ConfigError;
use crate::durable;
use crate::protocol::auth::DiskKey;
use crate::retention::RetentionPolicy;

/// Lowest bandwidth cap accepted (64 KiB/s): below it one 1 MiB block takes minutes, and a
/// session would sit in its pacer long after the policy changed again.
pub const MIN_BANDWIDTH: u64 = 64 << 10;

/// Retention and bandwidth, readable by every session and changeable by command.
#[derive(Debug)]
pub struct LivePolicy {
    retention: RwLock<Option<RetentionPolicy>>,
    bandwidth: AtomicU64,
    path: PathBuf,
    /// Signalled on every change of disk state worth reporting at once.
    pub changed: Notify,
}

impl LivePolicy {
    /// The policy saved by an earlier `set_policy`, else the config's (`configured` is the
    /// config's retention, or the DRS-like default under a control plane).
    pub fn load(state_dir: &Path, configured: Option<RetentionPolicy>) -> Result<Self, String> {
        let path = state_dir.join("policy.json");
        let saved: Option<Policy> = match std::fs::read(&path) {
            Ok(b) => {
                Some(serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let saved = saved.unwrap_or_default();
        Ok(LivePolicy {
            retention: RwLock::new(saved.retention.or(configured)),
            bandwidth: AtomicU64::new(saved.bandwidth_limit_bytes_per_sec.unwrap_or(0)),
            path,
            changed: Notify::new(),
        })
    }

    pub fn retention(&self) -> Option<RetentionPolicy> {
        self.retention
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Per-disk replication bandwidth cap, bytes/s (0: none).
    pub fn bandwidth(&self) -> u64 {
        self.bandwidth.load(Ordering::Relaxed)
    }

    /// The effective policy.
    pub fn snapshot(&self) -> Policy {
        let bw = self.bandwidth();
        Policy {
            retention: self.retention(),
            bandwidth_limit_bytes_per_sec: Some(bw),
        }
    }

    /// Applies the fields present in `p` and persists the result.
    fn apply(&self, p: &Policy) -> std::io::Result<()> {
        if let Some(r) = &p.retention {
            *self.retention.write().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
        }
        if let Some(bw) = p.bandwidth_limit_bytes_per_sec {
            self.bandwidth.store(bw, Ordering::Relaxed);
        }
        let json = serde_json::to_vec_pretty(&self.snapshot()).map_err(std::io::Error::other)?;
        durable::atomic_write(&self.path, &json, 0o600)
    }
}

/// A disk assigned by command, as persisted.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub size_bytes: u64,
    /// Hex agent key; absent once revoked or cut over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_key: Option<String>,
    #[serde(default)]
    pub phase: DiskPhase,
}

impl std::fmt::Debug for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assignment")
            .field("size_bytes", &self.size_bytes)
            .field("agent_key", &self.agent_key.as_ref().map(|_| "<redacted>"))
            .field("phase", &self.phase)
            .finish()
    }
}

/// Why a command could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("disk {0} is not on this gateway")]
    UnknownDisk(String),
    #[error("{0}")]
    Invalid(String),
    #[error("disk {disk}: {message}")]
    Snapshot { disk: String, message: String },
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error("cannot save {what}: {source}")]
    Persist {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Changes the set of disks and keys of a running gateway: what the control plane's commands
/// call.
#[derive(Debug, Clone)]
pub struct Control {
    pub(super) shared: Arc<Shared>,
    pub(super) state_dir: PathBuf,
    assignments: Arc<Mutex<BTreeMap<String, Assignment>>>,
    /// Serializes changes of the assignment set (open volume, persist) between commands.
    assign_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Control {
    /// The control handle of a gateway whose `shared` state is built; reopens the disks an
    /// earlier run had assigned by command.
    pub(super) async fn restore(
        shared: Arc<Shared>,
        state_dir: PathBuf,
    ) -> Result<Control, GatewayError> {
        let path = state_dir.join("assignments.json");
        let saved: BTreeMap<String, Assignment> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                GatewayError::Config(ConfigError::Invalid(format!("{}: {e}", path.display())))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(GatewayError::Write {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        for (id, a) in &saved {
            let key = match &a.agent_key {
                Some(hex) => Some(parse_key(id, hex).map_err(|e| {
                    GatewayError::Config(ConfigError::Invalid(format!("{}: {e}", path.display())))
                })?),
                None => None,
            };
            if let Some(disk) = shared.disks.get(id) {
                // A `[[disks]]` disk the control plane acted on: its record wins over the
                // config (a revoked or rotated key stays so; a cut-over disk stays stopped).
                if a.phase == DiskPhase::Finalized {
                    warn!(disk = %id, "disk in [[disks]] was finalized by the control plane; \
                        not serving it (remove it from the config)");
                    shared.disks.remove(id);
                    continue;
                }
                match key {
                    Some(k) => disk.set_key(k),
                    None => disk.revoke(),
                }
                disk.set_phase(a.phase);
                continue;
            }
            if a.phase == DiskPhase::Finalized {
                continue;
            }
            // A revoked disk keeps its volume and state; it just accepts no agent.
            let disk = open_disk(
                &shared.backend,
                &state_dir,
                id,
                a.size_bytes,
                key.clone().unwrap_or_else(|| DiskKey::from_bytes([0; 32])),
            )
            .await?;
            if key.is_none() {
                disk.revoke();
            }
            disk.set_phase(a.phase);
            shared.disks.insert(disk);
        }
        Ok(Control {
            shared,
            state_dir,
            assignments: Arc::new(Mutex::new(saved)),
            assign_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The data dir (the parent of the state dir).
    pub fn data_dir(&self) -> &Path {
        self.state_dir.parent().unwrap_or(&self.state_dir)
    }

    /// What every session shares (disks, backend, policy, counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn persist(&self, a: &BTreeMap<String, Assignment>) -> Result<(), ControlError> {
        let json = serde_json::to_vec_pretty(a).map_err(|e| ControlError::Persist {
            what: "assignments",
            source: std::io::Error::other(e),
        })?;
        durable::atomic_write(&self.state_dir.join("assignments.json"), &json, 0o600).map_err(
            |source| ControlError::Persist {
                what: "assignments",
                source,
            },
        )
    }

    /// Changes (or, for a `[[disks]]` disk, creates) the persisted record of disk `id`.
    fn update(&self, disk: &Disk, f: impl FnOnce(&mut Assignment)) -> Result<(), ControlError> {
        let mut all = self.assignments.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = all.clone();
        let a = next.entry(disk.id.clone()).or_insert_with(|| Assignment {
            size_bytes: disk.size,
            agent_key: disk.key().map(|k| k.to_hex()),
            phase: disk.phase(),
        });
        f(a);
        self.persist(&next)?;
        *all = next;
        Ok(())
    }

    fn disk(&self, id: &str) -> Result<Arc<Disk>, ControlError> {
        self.shared
            .disks
            .get(id)
            .ok_or_else(|| ControlError::UnknownDisk(id.to_string()))
    }

    /// Serves disk `id` of `size` bytes to the agent holding `key`. A disk already served keeps
    /// its volume and state and takes the new key (so re-assigning is how a key is rotated, and
    /// how a revoked disk resumes); its size must not change.
    pub async fn assign_disk(&self, id: &str, size: u64, key: DiskKey) -> Result<(), ControlError> {
        if !crate::protocol::valid_disk_id(id) || size == 0 {
            return Err(ControlError::Invalid(format!(
                "cannot assign disk {id:?} of {size} bytes: bad id or size"
            )));
        }
        let _serial = self.assign_lock.lock().await;
        let record = Assignment {
            size_bytes: size,
            agent_key: Some(key.to_hex()),
            phase: DiskPhase::Replicating,
        };
        if let Some(disk) = self.shared.disks.get(id) {
            if disk.size != size {
                return Err(ControlError::Invalid(format!(
                    "disk {id} is {} bytes; it cannot be re-assigned as {size}",
                    disk.size
                )));
            }
            if disk.phase() == DiskPhase::CutOver {
                return Err(ControlError::Invalid(format!(
                    "disk {id} is cut over; finalize it before assigning it again"
                )));
            }
            self.save_assignment(id, record)?;
            disk.set_key(key);
            disk.set_phase(DiskPhase::Replicating);
            info!(disk = %id, "disk re-assigned: new agent key");
        } else {
            let was_finalized = self
                .assignments()
                .get(id)
                .is_some_and(|a| a.phase == DiskPhase::Finalized);
            if was_finalized {
                // A new disk under an old id starts from nothing.
                self.release(id).await?;
            }
            let disk = open_disk(&self.shared.backend, &self.state_dir, id, size, key).await?;
            self.save_assignment(id, record)?;
            self.shared.disks.insert(disk);
            info!(disk = %id, size, "disk assigned");
        }
        self.shared.policy.changed.notify_one();
        Ok(())
    }

    fn save_assignment(&self, id: &str, record: Assignment) -> Result<(), ControlError> {
        let mut all = self.assignments.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = all.clone();
        next.insert(id.to_string(), record);
        self.persist(&next)?;
        *all = next;
        Ok(())
    }

    /// Revokes the agent key of disk `id`: its open session ends with `revoked` and the key no
    /// longer authenticates. Returns false for an unknown disk.
    pub fn revoke(&self, id: &str) -> bool {
        match self.shared.disks.get(id) {
            Some(disk) => {
                if let Err(e) = self.update(&disk, |a| {
                    a.agent_key = None;
                    if a.phase == DiskPhase::Replicating {
                        a.phase = DiskPhase::Revoked;
                    }
                }) {
                    // The key stops working now either way; a restart would re-enable it, so
                    // say so loudly.
                    warn!(disk = %id, error = %e, "revocation not persisted");
                }
                disk.revoke();
                if disk.phase() == DiskPhase::Replicating {
                    disk.set_phase(DiskPhase::Revoked);
                }
                info!(disk = %id, "agent key revoked");
                self.shared.policy.changed.notify_one();
                true
            }
            None => false,
        }
    }

    /// Applies and persists a policy change.
    pub fn set_policy(&self, p: &Policy) -> Result<Policy, ControlError> {
        if let Some(r) = &p.retention {
            r.validate()
                .map_err(|e| ControlError::Invalid(e.to_string()))?;
        }
        if let Some(bw) = p.bandwidth_limit_bytes_per_sec {
            if bw != 0 && bw < MIN_BANDWIDTH {
                return Err(ControlError::Invalid(format!(
                    "bandwidth limit {bw} B/s is below the minimum {MIN_BANDWIDTH} B/s (0: no limit)"
                )));
            }
        }
        self.shared
            .policy
            .apply(p)
            .map_err(|source| ControlError::Persist {
                what: "policy",
                source,
            })?;
        let now = self.shared.policy.snapshot();
        info!(retention = ?now.retention, bandwidth_limit = ?now.bandwidth_limit_bytes_per_sec,
            "policy changed");
        if let Some(policy) = now.retention.clone() {
            for disk in self.shared.disks.all() {
                super::spawn_prune(
                    &tokio::runtime::Handle::current(),
                    self.shared.backend.clone(),
                    disk.id.clone(),
                    policy.clone(),
                    disk.protected_snapshots(),
                );
            }
        }
        self.shared.policy.changed.notify_one();
        Ok(now)
    }

    /// Takes a snapshot of disk `id` as it is now: every acked write is in it. While an agent
    /// streams, the snapshot is taken by its session's writer between two writes; otherwise
    /// directly, holding the disk so no session starts meanwhile.
    pub async fn snapshot_now(&self, id: &str, label: &str) -> Result<Snapshot, ControlError> {
        let disk = self.disk(id)?;
        let fail = |message: String| ControlError::Snapshot {
            disk: id.to_string(),
            message,
        };
        for _ in 0..3 {
            if let Some(writer) = disk.writer() {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let cmd = WriterCmd::Snapshot {
                    label: label.to_string(),
                    reply,
                };
                if writer.send(cmd).await.is_ok() {
                    match answer.await {
                        Ok(r) => {
                            self.shared.policy.changed.notify_one();
                            return r.map_err(fail);
                        }
                        // The session ended before reaching it: take it directly below.
                        Err(_) => continue,
                    }
                }
            }
            let wait = Duration::from_secs(self.shared.limits.drain_timeout_secs + 5);
            let Ok(_held) = tokio::time::timeout(wait, disk.active.clone().lock_owned()).await
            else {
                return Err(fail("the disk's session did not let go of it".into()));
            };
            if disk.writer().is_some() {
                continue; // a session started between the check and the lock
            }
            return self.snapshot_held(&disk, label).await;
        }
        Err(fail("sessions kept changing; try again".into()))
    }

    /// Whether durable point `seq` of disk `id` is its last checkpoint (a snapshot taken there
    /// equals the source at that checkpoint).
    pub fn at_checkpoint(&self, id: &str, seq: u64) -> bool {
        self.shared.disks.get(id).is_some_and(|d| {
            let st = d.state();
            st.checkpoint().is_some_and(|c| c.seq == seq)
        })
    }

    /// Snapshot of a disk no session writes to (the caller holds `disk.active`).
    async fn snapshot_held(&self, disk: &Arc<Disk>, label: &str) -> Result<Snapshot, ControlError> {
        let fail = |message: String| ControlError::Snapshot {
            disk: disk.id.clone(),
            message,
        };
        let d = disk.clone();
        tokio::task::spawn_blocking(move || d.volume.sync())
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(format!("fdatasync failed: {e}")))?;
        let seq = disk.state().point().seq;
        let req = SnapshotRequest {
            disk_id: disk.id.clone(),
            label: label.to_string(),
            checkpoint_seq: seq,
        };
        let handle = self
            .shared
            .backend
            .begin_snapshot(disk.volume.clone(), req)
            .await?;
        disk.add_snapshot_in_flight(handle.clone());
        info!(disk = %disk.id, snapshot = %handle.info().id, seq, "snapshot on command initiated");
        self.shared.policy.changed.notify_one();
        Ok(handle)
    }

    /// Waits until a snapshot's content is complete.
    async fn completed(&self, snap: Snapshot) -> Result<SnapshotInfo, ControlError> {
        let disk = snap.info().disk_id.clone();
        tokio::task::spawn_blocking(move || snap.wait())
            .await
            .map_err(|e| ControlError::Snapshot {
                disk: disk.clone(),
                message: e.to_string(),
            })?
            .map_err(|message| ControlError::Snapshot { disk, message })
    }

    /// The completed snapshot `snapshot_id` of disk `id`, or the one of its latest checkpoint;
    /// waits for a pending one to complete.
    async fn launch_snapshot(
        &self,
        disk: &Disk,
        snapshot_id: Option<&str>,
    ) -> Result<SnapshotInfo, ControlError> {
        let wanted = match snapshot_id {
            Some(s) => s.to_string(),
            None => match disk.state().checkpoint() {
                Some(c) => c.snapshot.id.clone(),
                None => {
                    return Err(ControlError::Invalid(format!(
                        "disk {} has no checkpoint yet: nothing consistent to launch",
                        disk.id
                    )))
                }
            },
        };
        if let Some(s) = disk
            .snapshots_in_flight()
            .into_iter()
            .find(|s| s.info().id == wanted)
        {
            return self.completed(s).await;
        }
        let all = self.shared.backend.list_snapshots(Some(&disk.id)).await?;
        // The newest snapshot standing for the wanted one (a failed cloud snapshot retaken
        // under a new id stands for it).
        let found = all
            .iter()
            .rev()
            .find(|s| s.stands_for(&wanted) && s.state == SnapshotState::Completed)
            .or_else(|| all.iter().rev().find(|s| s.stands_for(&wanted)))
            .cloned();
        match found {
            Some(s) if s.state == SnapshotState::Completed => Ok(s),
            Some(s) => Err(ControlError::Snapshot {
                disk: disk.id.clone(),
                message: format!("snapshot {} is {}", s.id, s.state.as_str()),
            }),
            None => Err(ControlError::Snapshot {
                disk: disk.id.clone(),
                message: format!("no snapshot {wanted}"),
            }),
        }
    }

    /// Starts a test instance from a snapshot of disk `id`; replication goes on.
    pub async fn test_launch(
        &self,
        id: &str,
        snapshot_id: Option<&str>,
    ) -> Result<LaunchInfo, ControlError> {
        let disk = self.disk(id)?;
        let snap = self.launch_snapshot(&disk, snapshot_id).await?;
        let launched = self.shared.backend.launch(vec![snap.clone()], true).await?;
        info!(disk = %id, snapshot = %snap.id, instance = %launched.instance_id, "test launch");
        self.shared.policy.changed.notify_one();
        Ok(launched)
    }

    /// Cutover: replication of the disk stops first (its agent is told, and every write it
    /// sent is made durable as the session drains), then an instance is launched from a
    /// consistent point: a final snapshot when the disk is at a checkpoint, else the last
    /// checkpoint's snapshot (the result says which, and how old). Without any checkpoint
    /// there is nothing consistent to launch, and replication resumes.
    pub async fn cutover(&self, id: &str) -> Result<(LaunchInfo, String), ControlError> {
        let disk = self.disk(id)?;
        if disk.phase() == DiskPhase::CutOver {
            return Err(ControlError::Invalid(format!(
                "disk {id} is already cut over"
            )));
        }
        let (old_key, old_phase) = (disk.key(), disk.phase());
        let undo = |disk: &Disk| {
            disk.set_phase(old_phase);
            if let Some(k) = old_key.clone() {
                disk.set_key(k);
            }
        };
        disk.set_phase(DiskPhase::CutOver);
        disk.revoke();
        let wait = Duration::from_secs(self.shared.limits.drain_timeout_secs + 5);
        let Ok(held) = tokio::time::timeout(wait, disk.active.clone().lock_owned()).await else {
            undo(&disk);
            return Err(ControlError::Invalid(format!(
                "disk {id}: the agent's session did not drain; replication resumes"
            )));
        };
        let (point, ckpt) = {
            let st = disk.state();
            (st.point(), st.checkpoint().cloned())
        };
        let chosen = match &ckpt {
            None => Err(ControlError::Invalid(format!(
                "disk {id} has no checkpoint yet: nothing consistent to launch; replication resumes"
            ))),
            Some(_) if point.seq == point.checkpoint_seq => {
                match self.snapshot_held(&disk, "cutover").await {
                    Ok(s) => self.completed(s).await.map(|s| {
                        let note = format!("final snapshot {} at checkpoint {}", s.id, point.seq);
                        (s, note)
                    }),
                    Err(e) => Err(e),
                }
            }
            Some(c) => self.launch_snapshot(&disk, None).await.map(|s| {
                let age = unix_ms().saturating_sub(c.snapshot.created_unix_ms) / 1000;
                let note = format!(
                    "the last pass stopped before its checkpoint: launched from checkpoint {} \
                     (snapshot {}, {age} s old); writes after it stay on the staging volume",
                    c.seq, s.id
                );
                (s, note)
            }),
        };
        drop(held);
        let (snap, note) = match chosen {
            Ok(x) => x,
            Err(e) => {
                undo(&disk);
                return Err(e);
            }
        };
        let launched = match self.shared.backend.launch(vec![snap.clone()], false).await {
            Ok(l) => l,
            Err(e) => {
                undo(&disk);
                return Err(e.into());
            }
        };
        self.update(&disk, |a| {
            a.agent_key = None;
            a.phase = DiskPhase::CutOver;
        })?;
        info!(disk = %id, snapshot = %snap.id, instance = %launched.instance_id, %note,
            "cutover: instance launched, replication stopped");
        self.shared.policy.changed.notify_one();
        Ok((launched, note))
    }

    /// Finalize after a cutover: the staging volume and replication state are released; the
    /// snapshots stay, pruned by the retention policy.
    pub async fn finalize(&self, id: &str) -> Result<(), ControlError> {
        let finalized = self
            .assignments()
            .get(id)
            .is_some_and(|a| a.phase == DiskPhase::Finalized);
        if finalized && self.shared.disks.get(id).is_none() {
            // Done before (a repeat after a restart): make sure nothing was left behind.
            self.release(id).await?;
            return Ok(());
        }
        let disk = self.disk(id)?;
        if disk.phase() != DiskPhase::CutOver {
            return Err(ControlError::Invalid(format!(
                "disk {id} is not cut over; finalize follows a cutover"
            )));
        }
        let _serial = self.assign_lock.lock().await;
        let wait = Duration::from_secs(self.shared.limits.drain_timeout_secs + 5);
        let Ok(_held) = tokio::time::timeout(wait, disk.active.clone().lock_owned()).await else {
            return Err(ControlError::Invalid(format!(
                "disk {id}: a session still holds the disk"
            )));
        };
        // Snapshot copies read from the volume: let them finish first. (A cloud snapshot's
        // point in time is already fixed and needs the volume no more.)
        for s in disk
            .snapshots_in_flight()
            .into_iter()
            .filter(|s| s.is_local_work())
        {
            let _ = self.completed(s).await;
        }
        // Volume and state go first; only then is the disk recorded as finalized, so a failure
        // or a crash in between leaves it cut over, and finalize can simply be repeated.
        self.release(id).await?;
        self.update(&disk, |a| a.phase = DiskPhase::Finalized)?;
        self.shared.disks.remove(id);
        info!(disk = %id, "finalized: staging volume released, snapshots kept");
        self.shared.policy.changed.notify_one();
        Ok(())
    }

    /// Deletes the staging volume and the replication state of disk `id` (both idempotent).
    async fn release(&self, id: &str) -> Result<(), ControlError> {
        self.shared.backend.release_volume(id).await?;
        DiskState::remove_files(&self.state_dir, id).map_err(|source| ControlError::Persist {
            what: "replication state",
            source,
        })
    }

    /// Disks assigned by command, with their phases (finalized ones included).
    pub fn assignments(&self) -> BTreeMap<String, Assignment> {
        self.assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn parse_key(id: &str, hex_key: &str) -> Result<DiskKey, String> {
    DiskKey::from_hex(hex_key.trim())
        .ok_or_else(|| format!("disk {id}: the agent key must be 64 hex digits"))
}

/// Parses a 64-hex-digit agent key as carried by `assign_disk`.
pub fn parse_agent_key(id: &str, hex_key: &str) -> Result<DiskKey, ControlError> {
    parse_key(id, hex_key).map_err(ControlError::Invalid)
}
