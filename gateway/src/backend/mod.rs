//! Volumes and snapshots behind one interface. Each backend kind is a variant of [`Backend`];
//! the replication path only sees [`Volume`] and [`SnapshotInfo`].

pub mod bootmode;
pub mod cow;
pub mod device;
pub mod local;
pub mod volume;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use local::LocalBackend;
pub use volume::{AlignedBuf, BufferPool, Volume};

use crate::config::{BackendConfig, Config};

/// A point-in-time copy of a disk, taken at a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot id (unique per disk).
    pub id: String,
    /// Disk the snapshot was taken of.
    pub disk_id: String,
    /// The checkpoint label the agent gave.
    pub label: String,
    /// Sequence number of the checkpoint.
    pub checkpoint_seq: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Size of the disk in bytes.
    pub size_bytes: u64,
    /// How the copy was made: `reflink` or `sparse-copy`.
    pub method: String,
    /// Where the snapshot's content lives (local backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `pending` from initiation until the content is complete, then `completed` (or `failed`).
    #[serde(default)]
    pub state: SnapshotState,
}

/// Life of a snapshot: point-in-time at initiation, usable once completed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Pending,
    #[default]
    Completed,
    Failed,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Pending => "pending",
            SnapshotState::Completed => "completed",
            SnapshotState::Failed => "failed",
        }
    }
}

/// An instance started from snapshots (a test launch or a cutover).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchInfo {
    /// Instance id (`i-` and 16 hex digits on the local backend).
    pub instance_id: String,
    /// A test launch leaves replication running; a cutover is the real thing.
    pub test: bool,
    /// `running` once its disks exist.
    pub state: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The snapshot each disk was made from, and where the disk is.
    pub disks: Vec<LaunchDisk>,
}

/// One disk of a launched instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchDisk {
    pub disk_id: String,
    pub snapshot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// What [`Backend::recover`] found after a stop.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Copies resumed in the background; writes must preserve through them.
    pub resumed: Vec<Snapshot>,
    /// Snapshots that could not be completed (never acknowledged).
    pub failed: Vec<SnapshotInfo>,
}

/// An initiated snapshot: its point in time is fixed; its content may still be on the way.
#[derive(Debug, Clone)]
pub enum Snapshot {
    /// Complete at initiation (reflink).
    Ready(SnapshotInfo),
    /// Being copied; later writes to the volume must call [`Snapshot::preserve`] first.
    Copying(Arc<cow::SnapshotCopy>),
}

impl Snapshot {
    /// Metadata as of initiation.
    pub fn info(&self) -> &SnapshotInfo {
        match self {
            Snapshot::Ready(i) => i,
            Snapshot::Copying(c) => c.info(),
        }
    }

    /// Saves the snapshot's view of `[offset, offset + len)` before the volume changes there.
    pub fn preserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match self {
            Snapshot::Ready(_) => Ok(()),
            Snapshot::Copying(c) => c.preserve(offset, len),
        }
    }

    /// Whether the content is complete (or failed) so writes need no more preserving.
    pub fn is_done(&self) -> bool {
        match self {
            Snapshot::Ready(_) => true,
            Snapshot::Copying(c) => c.is_done(),
        }
    }

    /// Blocks until the content is complete.
    pub fn wait(&self) -> Result<SnapshotInfo, String> {
        match self {
            Snapshot::Ready(i) => Ok(i.clone()),
            Snapshot::Copying(c) => c.wait(),
        }
    }
}

/// What a checkpoint asks the backend to capture.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub disk_id: String,
    pub label: String,
    pub checkpoint_seq: u64,
}

/// Errors from a backend, with the disk or snapshot they concern.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("disk {disk}: cannot {action} {path}")]
    Io {
        disk: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {disk}: snapshot {snapshot} not found")]
    SnapshotNotFound { disk: String, snapshot: String },
    #[error("disk {disk}: existing volume {path} is {found} bytes, expected {expected}")]
    SizeMismatch {
        disk: String,
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("bad snapshot metadata {path}: {message}")]
    Metadata { path: PathBuf, message: String },
    /// Deleting a snapshot whose content is still being copied would break its checkpoint.
    #[error("disk {disk}: snapshot {snapshot} is still pending; refusing to delete it")]
    SnapshotPending { disk: String, snapshot: String },
    /// A disk or snapshot id that is not a single plain path component.
    #[error("disk {disk}: snapshot id {snapshot:?} is not a valid name")]
    InvalidSnapshotId { disk: String, snapshot: String },
}

/// The configured backend.
#[derive(Debug)]
pub enum Backend {
    Local(LocalBackend),
}

impl Backend {
    /// Builds the backend named in the config.
    pub fn from_config(config: &Config) -> Self {
        match &config.backend {
            BackendConfig::Local {
                direct_io,
                snapshot_copy_bytes_per_sec,
            } => Backend::Local(
                LocalBackend::new(config.data_dir.clone(), *direct_io)
                    .with_copy_rate(*snapshot_copy_bytes_per_sec),
            ),
        }
    }

    /// Provisions (or reopens) the volume of `disk_id`, `size` bytes.
    pub async fn open_volume(&self, disk_id: &str, size: u64) -> Result<Volume, BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, id) = (b.clone(), disk_id.to_string());
                blocking(move || b.open_volume(&id, size)).await
            }
        }
    }

    /// Initiates a snapshot of a volume whose writes are already durable. Returns once the
    /// point in time is fixed; the content may complete later.
    pub async fn begin_snapshot(
        &self,
        volume: Arc<Volume>,
        req: SnapshotRequest,
    ) -> Result<Snapshot, BackendError> {
        match self {
            Backend::Local(b) => {
                let b = b.clone();
                blocking(move || b.begin_snapshot(&volume, &req)).await
            }
        }
    }

    /// Resumes (or fails) snapshots a stop interrupted. Call before serving the disk.
    pub async fn recover(&self, disk_id: &str) -> Result<Recovered, BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, id) = (b.clone(), disk_id.to_string());
                blocking(move || b.recover(&id)).await
            }
        }
    }

    /// Snapshots of one disk, or of all disks, oldest first.
    pub async fn list_snapshots(
        &self,
        disk_id: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, id) = (b.clone(), disk_id.map(str::to_string));
                blocking(move || b.list_snapshots(id.as_deref())).await
            }
        }
    }

    /// Deletes a completed or failed snapshot (content first, metadata last). A snapshot that
    /// is already gone is not an error; a `pending` one is refused.
    pub async fn delete_snapshot(&self, info: &SnapshotInfo) -> Result<(), BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, s) = (b.clone(), info.clone());
                blocking(move || b.delete_snapshot(&s)).await
            }
        }
    }

    /// Launches an instance from completed snapshots (one per disk): on the local backend the
    /// instance's disks are materialized as `DATA_DIR/instances/INSTANCE_ID/DISK_ID.img`.
    pub async fn launch(
        &self,
        snapshots: Vec<SnapshotInfo>,
        test: bool,
    ) -> Result<LaunchInfo, BackendError> {
        match self {
            Backend::Local(b) => {
                let b = b.clone();
                blocking(move || b.launch(&snapshots, test)).await
            }
        }
    }

    /// Instances launched by this gateway, oldest first.
    pub async fn list_launches(&self) -> Result<Vec<LaunchInfo>, BackendError> {
        match self {
            Backend::Local(b) => {
                let b = b.clone();
                blocking(move || b.list_launches()).await
            }
        }
    }

    /// Releases the staging volume of a finalized disk; its snapshots stay.
    pub async fn release_volume(&self, disk_id: &str) -> Result<(), BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, id) = (b.clone(), disk_id.to_string());
                blocking(move || b.release_volume(&id)).await
            }
        }
    }

    /// The backend's kind, as reported upward.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
        }
    }

    /// SHA-256 of a snapshot's content.
    pub async fn snapshot_digest(&self, snap: &SnapshotInfo) -> Result<[u8; 32], BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, s) = (b.clone(), snap.clone());
                blocking(move || b.snapshot_digest(&s)).await
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
