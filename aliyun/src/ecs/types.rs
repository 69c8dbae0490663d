//! Plain types of the typed ECS calls: what the gateway's backend passes and gets back.

/// A resource tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

impl Tag {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// `CreateDisk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateDisk {
    pub zone_id: String,
    pub size_gib: u64,
    /// `cloud_essd` by default.
    pub category: String,
    /// `PL0`…`PL3` for ESSD; `None` leaves the cloud's default (PL1).
    pub performance_level: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Create from a snapshot.
    pub snapshot_id: Option<String>,
    pub tags: Vec<Tag>,
    /// Idempotency key; the client makes one when `None`, the same for all retries.
    pub client_token: Option<String>,
}

impl CreateDisk {
    pub fn new(zone_id: impl Into<String>, size_gib: u64) -> Self {
        Self {
            zone_id: zone_id.into(),
            size_gib,
            category: "cloud_essd".into(),
            performance_level: None,
            name: None,
            description: None,
            snapshot_id: None,
            tags: Vec::new(),
            client_token: None,
        }
    }
}

/// A cloud disk as `DescribeDisks` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub disk_id: String,
    /// `Creating`, `Available`, `Attaching`, `In_use`, `Detaching`, …
    pub status: String,
    pub category: String,
    pub performance_level: Option<String>,
    pub size_gib: u64,
    pub zone_id: String,
    pub instance_id: Option<String>,
    /// The device name ECS reports (e.g. `/dev/xvdb`); the guest may name it otherwise.
    pub device: Option<String>,
    /// The virtio serial the guest sees: the disk id without `d-`.
    pub serial_number: Option<String>,
    pub name: Option<String>,
    pub tags: Vec<Tag>,
    pub creation_time: Option<String>,
}

/// Which resources a Describe call returns: by ids, or else by tags (all must match), or
/// every resource of the region when both are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub ids: Vec<String>,
    pub tags: Vec<Tag>,
}

impl Filter {
    pub fn ids(ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            ids: ids.into_iter().map(Into::into).collect(),
            tags: Vec::new(),
        }
    }

    pub fn tags(tags: Vec<Tag>) -> Self {
        Self {
            ids: Vec::new(),
            tags,
        }
    }
}

/// `CreateSnapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSnapshot {
    pub disk_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<Tag>,
    pub client_token: Option<String>,
}

impl CreateSnapshot {
    pub fn new(disk_id: impl Into<String>) -> Self {
        Self {
            disk_id: disk_id.into(),
            name: None,
            description: None,
            tags: Vec::new(),
            client_token: None,
        }
    }
}

/// A snapshot's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotStatus {
    Progressing,
    Accomplished,
    Failed,
    Other(String),
}

impl SnapshotStatus {
    pub fn parse(s: &str) -> Self {
        match s {
            "progressing" => Self::Progressing,
            "accomplished" => Self::Accomplished,
            "failed" => Self::Failed,
            other => Self::Other(other.to_string()),
        }
    }

    /// The value of `DescribeSnapshots`' `Status` filter.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Progressing => "progressing",
            Self::Accomplished => "accomplished",
            Self::Failed => "failed",
            Self::Other(s) => s,
        }
    }
}

/// A snapshot as `DescribeSnapshots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub snapshot_id: String,
    pub status: SnapshotStatus,
    /// 0–100.
    pub progress: u8,
    pub source_disk_id: Option<String>,
    pub source_disk_size_gib: Option<u64>,
    pub name: Option<String>,
    pub tags: Vec<Tag>,
    pub creation_time: Option<String>,
}

/// One disk of an image built from snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDeviceMapping {
    pub snapshot_id: String,
    /// `/dev/xvda` for the system disk, `/dev/xvdb`… for data disks.
    pub device: String,
    /// `system` or `data`; `None` keeps the type of the snapshot's source disk (a staging
    /// disk's snapshot is a data disk's, so a launch's boot disk must say `system`).
    pub disk_type: Option<String>,
}

/// `CreateImage` from snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateImage {
    pub name: String,
    pub mappings: Vec<DiskDeviceMapping>,
    /// `BIOS` or `UEFI`.
    pub boot_mode: Option<String>,
    /// `x86_64` or `arm64`.
    pub architecture: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<Tag>,
    pub client_token: Option<String>,
}

/// `ImportImage` of a disk image stored in OSS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportImage {
    pub name: String,
    pub oss_bucket: String,
    pub oss_object: String,
    /// `RAW`, `QCOW2`, `VHD`; `None` lets ECS detect it.
    pub format: Option<String>,
    /// `UEFI` by default (the appliance image is UEFI-only).
    pub boot_mode: String,
    /// `x86_64` by default.
    pub architecture: String,
    /// `linux` by default.
    pub os_type: String,
    /// e.g. `Debian`.
    pub platform: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<Tag>,
    pub client_token: Option<String>,
}

impl ImportImage {
    pub fn new(
        name: impl Into<String>,
        oss_bucket: impl Into<String>,
        oss_object: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            oss_bucket: oss_bucket.into(),
            oss_object: oss_object.into(),
            format: None,
            boot_mode: "UEFI".into(),
            architecture: "x86_64".into(),
            os_type: "linux".into(),
            platform: None,
            description: None,
            tags: Vec::new(),
            client_token: None,
        }
    }
}

/// An image as `DescribeImages` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub image_id: String,
    /// `Creating`, `Waiting`, `Available`, `CreateFailed`, …
    pub status: String,
    pub progress: u8,
    pub name: Option<String>,
    pub boot_mode: Option<String>,
    pub mappings: Vec<DiskDeviceMapping>,
    pub tags: Vec<Tag>,
    pub creation_time: Option<String>,
}

/// `RunInstances` (one instance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInstances {
    pub image_id: String,
    pub instance_type: String,
    pub vswitch_id: String,
    pub security_group_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    /// System disk category (`cloud_essd` when `None`, the cloud's default for new types).
    pub system_disk_category: Option<String>,
    pub tags: Vec<Tag>,
    pub client_token: Option<String>,
}

/// An instance as `DescribeInstances` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    /// `Pending`, `Starting`, `Running`, `Stopping`, `Stopped`.
    pub status: String,
    pub instance_type: Option<String>,
    pub image_id: Option<String>,
    pub zone_id: Option<String>,
    pub vswitch_id: Option<String>,
    pub private_ips: Vec<String>,
    pub name: Option<String>,
    pub tags: Vec<Tag>,
}
