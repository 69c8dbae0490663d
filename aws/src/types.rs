//! Plain data types the gateway sees: ids, states and descriptions, free of SDK types.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

macro_rules! resource_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The id as AWS spells it.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

resource_id!(
    /// An EBS volume id, `vol-…`.
    VolumeId
);
resource_id!(
    /// An EBS snapshot id, `snap-…`.
    SnapshotId
);
resource_id!(
    /// An AMI id, `ami-…`.
    ImageId
);
resource_id!(
    /// An EC2 instance id, `i-…`.
    InstanceId
);

/// Lifecycle state of an EBS volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    Creating,
    Available,
    InUse,
    Deleting,
    Deleted,
    Error,
    /// A state this crate does not know (AWS added one).
    Other(String),
}

impl VolumeState {
    /// Parses the API's spelling (`in-use`, …).
    pub fn parse(s: &str) -> Self {
        match s {
            "creating" => Self::Creating,
            "available" => Self::Available,
            "in-use" => Self::InUse,
            "deleting" => Self::Deleting,
            "deleted" => Self::Deleted,
            "error" => Self::Error,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Creating => "creating",
            Self::Available => "available",
            Self::InUse => "in-use",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Error => "error",
            Self::Other(s) => s,
        })
    }
}

/// One attachment of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub instance_id: InstanceId,
    /// Device name given at attach time (`/dev/sdf`); on Nitro the kernel names it nvmeN.
    pub device: String,
    /// `attaching`, `attached`, `detaching`, `detached`, `busy`.
    pub state: String,
}

/// What DescribeVolumes says about one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub state: VolumeState,
    pub size_gib: u64,
    pub availability_zone: String,
    pub attachments: Vec<Attachment>,
    pub tags: BTreeMap<String, String>,
}

/// Lifecycle state of an EBS snapshot. Real snapshots stay `pending` for minutes and can end
/// in `error`; moto creates them `completed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
    Recoverable,
    Recovering,
    Other(String),
}

impl SnapshotState {
    /// Parses the API's spelling.
    pub fn parse(s: &str) -> Self {
        match s {
            "pending" => Self::Pending,
            "completed" => Self::Completed,
            "error" => Self::Error,
            "recoverable" => Self::Recoverable,
            "recovering" => Self::Recovering,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Error => "error",
            Self::Recoverable => "recoverable",
            Self::Recovering => "recovering",
            Self::Other(s) => s,
        })
    }
}

/// What DescribeSnapshots says about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub volume_id: Option<VolumeId>,
    pub state: SnapshotState,
    /// `"100%"` when done; AWS gives a percentage string.
    pub progress: Option<String>,
    pub start_time: Option<SystemTime>,
    /// AWS's reason when `state` is `error`.
    pub state_message: Option<String>,
    pub volume_size_gib: Option<u64>,
    pub tags: BTreeMap<String, String>,
}

/// Which snapshots to describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotFilter {
    /// These snapshots (NotFound if one is missing).
    Ids(Vec<SnapshotId>),
    /// Own snapshots carrying every one of these tags (key = value).
    Tags(BTreeMap<String, String>),
}

/// Boot mode of an image: what [`crate::BootModeSetting::Detect`] resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    Uefi,
    LegacyBios,
}

/// An AMI to register from snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// AMI names are unique per account and region; a retried call with the same name
    /// returns the image the first call made.
    pub name: String,
    pub description: Option<String>,
    /// Snapshot of the boot disk, mapped at `root_device`.
    pub root_snapshot: SnapshotId,
    /// Root device name, e.g. `/dev/xvda` (the conventional HVM root name).
    pub root_device: String,
    /// Further disks: (device name, snapshot).
    pub extra_snapshots: Vec<(String, SnapshotId)>,
    pub boot_mode: BootMode,
    /// ENA networking (all current instance types need it).
    pub ena: bool,
    /// Tags for the image and its snapshots, merged over the settings' tags.
    pub tags: BTreeMap<String, String>,
}

/// An instance to launch from an image with the settings' network and launch template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub image: ImageId,
    /// Idempotency token: a retried launch with the same token starts one instance.
    pub client_token: String,
    /// Tags for the instance and its volumes, merged over the settings' tags.
    pub tags: BTreeMap<String, String>,
}

/// What DescribeInstances says about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: InstanceId,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down`, `terminated`.
    pub state: String,
    pub image_id: Option<ImageId>,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    pub private_ip: Option<String>,
    /// (device name, volume id) for every EBS mapping, attaching ones included.
    pub block_devices: Vec<(String, Option<VolumeId>)>,
    pub tags: BTreeMap<String, String>,
}

/// What DescribeImages says about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub id: ImageId,
    pub name: Option<String>,
    /// `pending`, `available`, `failed`, …
    pub state: String,
    pub root_device: Option<String>,
    /// (device name, snapshot id) for every EBS mapping.
    pub block_devices: Vec<(String, Option<SnapshotId>)>,
    pub tags: BTreeMap<String, String>,
}
