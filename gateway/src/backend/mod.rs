//! Volumes and snapshots behind one interface. Each backend kind is a variant of [`Backend`];
//! the replication path only sees [`Volume`] and [`SnapshotInfo`].

pub mod aliyun;
pub mod aws;
pub mod bootmode;
pub mod cloud;
pub mod cow;
pub mod device;
pub mod local;
pub mod volume;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use aliyun::AliyunBackend;
pub use aws::AwsBackend;
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
    /// How the copy was made: `reflink` or `copy-before-write` (local), `ebs` (aws).
    pub method: String,
    /// Where the snapshot's content lives (local backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `pending` from initiation until the content is complete, then `completed` (or `failed`).
    #[serde(default)]
    pub state: SnapshotState,
    /// A cloud snapshot that failed and was taken again with the same content is replaced by
    /// a new one under a new id; this names the one it replaces (so the checkpoint that
    /// recorded the old id still finds its content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

impl SnapshotInfo {
    /// Whether this is snapshot `id`, or the replacement of a failed snapshot `id`.
    pub fn stands_for(&self, id: &str) -> bool {
        self.id == id || self.replaces.as_deref() == Some(id)
    }
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
    /// The image registered for the launch (cloud backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
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
    /// Taken by the cloud, which completes it in its own time; writes need no preserving.
    Cloud(Arc<cloud::CloudSnapshot>),
}

impl Snapshot {
    /// Metadata as of initiation.
    pub fn info(&self) -> &SnapshotInfo {
        match self {
            Snapshot::Ready(i) => i,
            Snapshot::Copying(c) => c.info(),
            Snapshot::Cloud(c) => c.info(),
        }
    }

    /// Saves the snapshot's view of `[offset, offset + len)` before the volume changes there.
    pub fn preserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match self {
            Snapshot::Ready(_) | Snapshot::Cloud(_) => Ok(()),
            Snapshot::Copying(c) => c.preserve(offset, len),
        }
    }

    /// Whether the content is complete (or failed) so writes need no more preserving.
    pub fn is_done(&self) -> bool {
        match self {
            Snapshot::Ready(_) => true,
            Snapshot::Copying(c) => c.is_done(),
            Snapshot::Cloud(c) => c.is_done(),
        }
    }

    /// Whether completing it is this process's work (a local copy a shutdown should let
    /// finish), rather than the cloud's.
    pub fn is_local_work(&self) -> bool {
        matches!(self, Snapshot::Copying(_))
    }

    /// Blocks until the content is complete.
    pub fn wait(&self) -> Result<SnapshotInfo, String> {
        match self {
            Snapshot::Ready(i) => Ok(i.clone()),
            Snapshot::Copying(c) => c.wait(),
            Snapshot::Cloud(c) => c.wait(),
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
    /// A cloud API call failed (after its retries); carries the cloud's error code and request
    /// id in its text.
    #[error("disk {disk}: {error}")]
    Cloud {
        disk: String,
        error: Box<cloud::CloudError>,
    },
    /// The attached cloud disk's block device did not show up.
    #[error("disk {disk}: {error}")]
    Device {
        disk: String,
        error: device::DeviceError,
    },
    /// The cloud keeps the snapshot because something is made of it (an image of a launch).
    #[error("disk {disk}: snapshot {snapshot} is in use ({by}); it stays while that exists")]
    SnapshotInUse {
        disk: String,
        snapshot: String,
        by: String,
    },
    /// The backend cannot do this (e.g. read a cloud snapshot's content).
    #[error("disk {disk}: {message}")]
    Unsupported { disk: String, message: String },
    /// The backend could not start (identity or endpoint unavailable).
    #[error("{0}")]
    Setup(String),
}

impl BackendError {
    /// A failed cloud call concerning `disk` (`*` for none in particular).
    pub fn cloud(disk: &str, error: impl Into<cloud::CloudError>) -> Self {
        BackendError::Cloud {
            disk: disk.to_string(),
            error: Box::new(error.into()),
        }
    }
}

/// What an Alibaba Cloud gateway signs OSS requests with.
#[derive(Debug, Clone)]
pub struct AliyunAccess {
    pub region: String,
    pub credentials: Arc<dyn sync_aliyun::credentials::CredentialsProvider>,
}

/// The configured backend.
#[derive(Debug)]
pub enum Backend {
    Local(LocalBackend),
    Aws(AwsBackend),
    Aliyun(AliyunBackend),
}

impl Backend {
    /// Builds the backend named in the config. A cloud backend first learns who it is from
    /// the instance metadata service (retried for a while: on first boot the network may come
    /// up after the gateway).
    pub async fn open(config: &Config) -> Result<Self, BackendError> {
        match &config.backend {
            BackendConfig::Local {
                direct_io,
                snapshot_copy_bytes_per_sec,
            } => Ok(Backend::Local(
                LocalBackend::new(config.data_dir.clone(), *direct_io)
                    .with_copy_rate(*snapshot_copy_bytes_per_sec),
            )),
            BackendConfig::Aws(settings) => Ok(Backend::Aws(
                AwsBackend::open((**settings).clone(), &config.data_dir).await?,
            )),
            BackendConfig::Aliyun(settings) => Ok(Backend::Aliyun(
                AliyunBackend::open((**settings).clone(), &config.data_dir).await?,
            )),
        }
    }

    /// The cloud's signed identity document of this gateway VM, for registration.
    pub fn identity(&self) -> Option<crate::api::IdentityDocument> {
        match self {
            Backend::Local(_) => None,
            Backend::Aws(b) => b.identity(),
            Backend::Aliyun(b) => b.identity(),
        }
    }

    /// The region and RAM role credentials of an Alibaba Cloud gateway, for OSS uploads
    /// (diagnostics bundles). `None` on other backends.
    pub fn aliyun_access(&self) -> Option<AliyunAccess> {
        match self {
            Backend::Aliyun(b) => Some(b.api().access()),
            _ => None,
        }
    }

    /// Where the gateway runs in its cloud, and how its API calls are going.
    pub fn cloud_status(&self) -> Option<crate::api::CloudStatus> {
        match self {
            Backend::Local(_) => None,
            Backend::Aws(b) => Some(b.cloud_status()),
            Backend::Aliyun(b) => Some(b.cloud_status()),
        }
    }

    /// The cloud volume holding `disk_id` (cloud backends).
    pub fn volume_id(&self, disk_id: &str) -> Option<String> {
        match self {
            Backend::Local(_) => None,
            Backend::Aws(b) => b.volume_id(disk_id),
            Backend::Aliyun(b) => b.volume_id(disk_id),
        }
    }

    /// Provisions (or reopens) the volume of `disk_id`, `size` bytes.
    pub async fn open_volume(&self, disk_id: &str, size: u64) -> Result<Volume, BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, id) = (b.clone(), disk_id.to_string());
                blocking(move || b.open_volume(&id, size)).await
            }
            Backend::Aws(b) => b.open_volume(disk_id, size).await,
            Backend::Aliyun(b) => b.open_volume(disk_id, size).await,
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
            Backend::Aws(b) => b.begin_snapshot(volume, req).await,
            Backend::Aliyun(b) => b.begin_snapshot(volume, req).await,
        }
    }

    /// Resumes (or fails) snapshots a stop interrupted. Call before serving the disk.
    pub async fn recover(&self, disk_id: &str) -> Result<Recovered, BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, id) = (b.clone(), disk_id.to_string());
                blocking(move || b.recover(&id)).await
            }
            Backend::Aws(b) => b.recover(disk_id).await,
            Backend::Aliyun(b) => b.recover(disk_id).await,
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
            Backend::Aws(b) => b.list_snapshots(disk_id).await,
            Backend::Aliyun(b) => b.list_snapshots(disk_id).await,
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
            Backend::Aws(b) => b.delete_snapshot(info).await,
            Backend::Aliyun(b) => b.delete_snapshot(info).await,
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
            Backend::Aws(b) => b.launch(snapshots, test).await,
            Backend::Aliyun(b) => b.launch(snapshots, test).await,
        }
    }

    /// Instances launched by this gateway, oldest first.
    pub async fn list_launches(&self) -> Result<Vec<LaunchInfo>, BackendError> {
        match self {
            Backend::Local(b) => {
                let b = b.clone();
                blocking(move || b.list_launches()).await
            }
            Backend::Aws(b) => b.list_launches().await,
            Backend::Aliyun(b) => b.list_launches().await,
        }
    }

    /// Releases the staging volume of a finalized disk; its snapshots stay.
    pub async fn release_volume(&self, disk_id: &str) -> Result<(), BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, id) = (b.clone(), disk_id.to_string());
                blocking(move || b.release_volume(&id)).await
            }
            Backend::Aws(b) => b.release_volume(disk_id).await,
            Backend::Aliyun(b) => b.release_volume(disk_id).await,
        }
    }

    /// Whether [`Backend::snapshot_digest`] can read `snap`'s content now (a cloud snapshot's
    /// content is only readable from its volume while that is unchanged).
    pub fn digest_available(&self, snap: &SnapshotInfo) -> bool {
        match self {
            Backend::Local(_) => true,
            Backend::Aws(b) => b.digest_available(snap),
            Backend::Aliyun(b) => b.digest_available(snap),
        }
    }

    /// Settles what still waits on the cloud (snapshots being followed) as failed, so that no
    /// waiter outlives the process's runtime. Called once at shutdown.
    pub fn shutdown(&self) {
        match self {
            Backend::Local(_) => {}
            Backend::Aws(b) => b.shutdown(),
            Backend::Aliyun(b) => b.shutdown(),
        }
    }

    /// The backend's kind, as reported upward.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
            Backend::Aws(_) => "aws",
            Backend::Aliyun(_) => "aliyun",
        }
    }

    /// SHA-256 of a snapshot's content.
    pub async fn snapshot_digest(&self, snap: &SnapshotInfo) -> Result<[u8; 32], BackendError> {
        match self {
            Backend::Local(b) => {
                let (b, s) = (b.clone(), snap.clone());
                blocking(move || b.snapshot_digest(&s)).await
            }
            Backend::Aws(b) => b.snapshot_digest(snap).await,
            Backend::Aliyun(b) => b.snapshot_digest(snap).await,
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
