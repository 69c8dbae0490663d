//! What the cloud backends (`aws`, `aliyun`) share. Both do the same thing with different
//! APIs: one cloud disk per replicated disk, created and attached to the gateway's own
//! instance and found by its serial; a cloud snapshot per checkpoint, followed to completion
//! and taken again when the cloud fails it while the disk is unchanged; an image and an
//! instance per launch. [`CloudBackend`] holds that logic once; a [`CloudApi`] is the few
//! calls a cloud must answer.
//!
//! | step | calls | safe to repeat because |
//! |---|---|---|
//! | assign (`open_volume`) | create volume, attach, wait for the device by serial | the volume carries a client token made per assignment and recorded before the call; an attachment to us is reused |
//! | checkpoint (`begin_snapshot`) | create snapshot, then describe in the background until complete | the point in time is fixed when the create returns; no write needs preserving |
//! | snapshot failed | create snapshot again, if the volume has not been written since | the content is then the same as the failed snapshot's |
//! | retention | delete snapshot | gone is success; one an image holds is kept |
//! | launch | image from the snapshots (boot disk first), run instance | image per snapshot and kind; client tokens |
//! | finalize (`release_volume`) | detach, delete | gone is success; launched instances and images are never touched |
//!
//! What the gateway learns from the cloud lives in the cloud (tags) where it can: snapshots
//! are listed by their tags, so a restarted gateway sees the same snapshots. Small records
//! live under `DATA_DIR/PROVIDER/`: the disk → volume map (with the client token, written
//! before the create), the launches, and retaken snapshots rejected for holding later data.

mod backend;
mod handle;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::Path;

pub use backend::CloudBackend;
pub use handle::CloudSnapshot;

use super::bootmode::BootMode;
use super::device::DeviceError;

/// Tag keys the gateway puts on what it creates; snapshots are listed by them.
pub const TAG_MANAGED: &str = "sync-gateway:managed";
pub const TAG_MANAGED_VALUE: &str = "true";
pub const TAG_DISK: &str = "sync-gateway:disk";
pub const TAG_GATEWAY: &str = "sync-gateway:gateway";
pub const TAG_LABEL: &str = "sync-gateway:checkpoint";
pub const TAG_SEQ: &str = "sync-gateway:checkpoint-seq";
pub const TAG_CREATED_MS: &str = "sync-gateway:created-ms";
pub const TAG_SIZE: &str = "sync-gateway:size-bytes";
pub const TAG_REPLACES: &str = "sync-gateway:replaces";
pub const TAG_LAUNCH: &str = "sync-gateway:launch";
pub const TAG_SNAPSHOT: &str = "sync-gateway:snapshot";
/// What an image is made of (a digest of its snapshots and boot mode): launches with the same
/// key reuse the image.
pub const TAG_IMAGE_KEY: &str = "sync-gateway:image-key";
/// A staging volume's client token, so a volume created before a crash is found again.
pub const TAG_CLIENT_TOKEN: &str = "sync-gateway:client-token";

/// A failed cloud call (after the client's own retries), sorted the way the backend acts on
/// it. Its text is the client error's: action, cloud error code and request id.
#[derive(Debug)]
pub struct CloudError {
    pub kind: CloudErrorKind,
    /// The cloud's error code, when it answered.
    pub code: Option<String>,
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

/// What the backend does differently per failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudErrorKind {
    /// The resource does not exist.
    NotFound,
    /// A snapshot an image is made of: the cloud keeps it while the image exists.
    InUse,
    /// Throttling, 5xx, timeouts that outlasted the client's retries: may pass later.
    Transient,
    /// Anything else (permissions, bad requests): will not pass by itself.
    Permanent,
}

impl fmt::Display for CloudError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for CloudError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl CloudError {
    /// An error the backend itself finds in an answer (e.g. a volume attached elsewhere).
    pub fn permanent(message: String) -> Self {
        Self {
            kind: CloudErrorKind::Permanent,
            code: None,
            error: message.into(),
        }
    }
}

/// A cloud volume as the backend needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudVolume {
    pub size_gib: u64,
    /// Still being created (not yet attachable).
    pub creating: bool,
    /// Instances it is attached (or attaching) to, with the device name the cloud gives.
    pub attachments: Vec<(String, String)>,
}

/// A create-volume request.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub disk_id: String,
    pub size_gib: u64,
    pub client_token: String,
    /// The gateway's tags, [`TAG_CLIENT_TOKEN`] included (the adapter adds the configured
    /// ones).
    pub tags: BTreeMap<String, String>,
}

/// A create-snapshot request.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub volume: String,
    /// A readable name (the adapter makes it what the cloud accepts).
    pub name: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
}

/// A snapshot as the cloud describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSnapshotView {
    pub id: String,
    pub state: CloudSnapshotState,
    pub tags: BTreeMap<String, String>,
    /// When the cloud started it, if it says.
    pub started_unix_ms: Option<u64>,
    pub size_gib: Option<u64>,
}

/// Where a cloud snapshot is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudSnapshotState {
    Pending,
    Completed,
    /// With the cloud's reason, when it gives one.
    Failed(Option<String>),
}

/// Which snapshots to describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotQuery {
    Ids(Vec<String>),
    /// Every tag must match.
    Tags(BTreeMap<String, String>),
}

/// An image from snapshots and an instance of it.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub disk_id: String,
    /// Unique per boot snapshot and kind, so a retried launch finds the image the first
    /// attempt made.
    pub image_name: String,
    pub description: String,
    /// Boot disk first.
    pub snapshots: Vec<String>,
    pub boot_mode: BootMode,
    pub tags: BTreeMap<String, String>,
    pub client_token: String,
}

/// What a launch made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    pub image_id: String,
    pub instance_id: String,
    pub state: String,
}

/// Who and where the gateway is, from the instance metadata service.
#[derive(Debug, Clone)]
pub struct Location {
    pub region: String,
    pub zone: String,
    pub instance: String,
    /// The signed identity document, for registration.
    pub identity: Option<crate::api::IdentityDocument>,
}

/// The calls a cloud answers for [`CloudBackend`]. Each is idempotent where the table in the
/// module doc says so; clients retry throttling and transient failures themselves.
pub trait CloudApi: fmt::Debug + Send + Sync + 'static {
    /// `aws`, `aliyun`: reported upward, and the records' directory under `DATA_DIR`.
    const PROVIDER: &'static str;
    /// `ebs`, `ecs`: [`super::SnapshotInfo::method`].
    const METHOD: &'static str;
    /// What the cloud calls its snapshots, for messages (`EBS snapshot`).
    const SNAPSHOT: &'static str;
    /// Most disks one launch maps.
    const MAX_LAUNCH_DISKS: usize;

    fn location(&self) -> &Location;
    fn retry_stats(&self) -> sync_common::retry::RetryStatsSnapshot;
    /// Where udev names block devices by serial.
    fn device_dir(&self) -> &Path;
    /// The by-id name of a volume's device.
    fn device_name(&self, volume: &str) -> Result<String, DeviceError>;
    /// The end of its `nvme-…` by-id name, on a cloud whose NVMe names are not fixed.
    fn nvme_suffix(&self, _volume: &str) -> Option<String> {
        None
    }
    /// The configured boot mode of launches; `None`: detect from the boot disk.
    fn boot_mode(&self) -> Option<BootMode>;
    /// A tag value as the cloud accepts it.
    fn tag_value(&self, value: &str) -> String;

    fn create_volume(
        &self,
        req: &NewVolume,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    /// NotFound when the volume is gone.
    fn describe_volume(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<CloudVolume, CloudError>> + Send;
    /// Volumes (not deleted) that carry every one of `tags`.
    fn find_volumes(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send;
    fn wait_created(
        &self,
        id: &str,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Attaches to this instance; returns the cloud's device name (for logs).
    fn attach_volume(&self, id: &str) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn wait_attached(
        &self,
        id: &str,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Detaches, and waits until detached; already detached or gone is success.
    fn detach_volume(
        &self,
        id: &str,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Gone is success.
    fn delete_volume(&self, id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;

    fn create_snapshot(
        &self,
        req: &NewSnapshot,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn describe_snapshots(
        &self,
        query: &SnapshotQuery,
    ) -> impl Future<Output = Result<Vec<CloudSnapshotView>, CloudError>> + Send;
    /// Gone is success; kind InUse when an image holds it.
    fn delete_snapshot(&self, id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;

    fn launch(
        &self,
        req: &LaunchRequest,
    ) -> impl Future<Output = Result<Launched, CloudError>> + Send;
    /// NotFound when the instance is gone.
    fn instance_state(&self, id: &str) -> impl Future<Output = Result<String, CloudError>> + Send;
}
