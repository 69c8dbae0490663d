//! The `aliyun` backend's settings: the `[backend] kind = "aliyun"` table of the gateway config.
//!
//! ```toml
//! [backend]
//! kind = "aliyun"
//! region = "cn-hangzhou"                      # default: from instance metadata
//! ecs_endpoint = "http://127.0.0.1:8100"      # tests only; ecs.REGION.aliyuncs.com by default
//! meta_endpoint = "http://127.0.0.1:8101"     # tests only; the link-local service by default
//! device_dir = "/dev/disk/by-id"
//! vswitch_id = "vsw-bp1…"                     # launches; default: the gateway's own
//! security_group_id = "sg-bp1…"               # launches
//! tags = { team = "migration" }
//! ```
//!
//! Credentials are always the instance's RAM role's STS credentials, read from the metadata
//! service in hardened mode and refreshed before they expire; no key is ever configured.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The metadata service every ECS instance reaches (link-local).
pub const DEFAULT_META_ENDPOINT: &str = "http://100.100.100.200";

/// Instance type of launches when none is configured: general purpose, 2 vCPU / 8 GiB, UEFI
/// capable.
pub const DEFAULT_INSTANCE_TYPE: &str = "ecs.g7.large";

pub use sync_common::boot::BootModeSetting;

/// The `aliyun` backend's settings. Every field has a default, so an empty table is valid on
/// an ECS instance with a RAM role; launches also need `security_group_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AliyunSettings {
    /// Region id, e.g. `cn-hangzhou`. Default: the instance's, from metadata.
    pub region: Option<String>,
    /// ECS OpenAPI endpoint. Default `https://ecs.REGION.aliyuncs.com`; tests use a local one.
    pub ecs_endpoint: Option<String>,
    /// Instance metadata service. Default `http://100.100.100.200`; tests use a local one.
    pub meta_endpoint: String,
    /// RAM role whose credentials sign the calls. Default: the role attached to the instance.
    pub ram_role: Option<String>,
    /// Category of staging disks. Default `cloud_essd`.
    pub disk_category: String,
    /// ESSD performance level (`PL0`…`PL3`). Default: the cloud's (PL1).
    pub performance_level: Option<String>,
    /// Tags added to everything the gateway creates. Per-resource tags win on a key clash;
    /// ECS allows 20 tags per resource, the gateway uses up to 9.
    pub tags: BTreeMap<String, String>,
    /// Where udev names block devices by serial; a staging disk appears as `virtio-` and its
    /// id without `d-`. Default `/dev/disk/by-id`.
    pub device_dir: PathBuf,
    /// vSwitch of launched instances. Default: the gateway's own (from metadata).
    pub vswitch_id: Option<String>,
    /// Security group of launched instances. Required for launches.
    pub security_group_id: Option<String>,
    /// Instance type of launched instances. Default `ecs.g7.large`.
    pub instance_type: String,
    /// System disk category of launched instances. Default `cloud_essd`.
    pub system_disk_category: String,
    /// Boot mode of launched images: `uefi`, `legacy-bios` or `detect` (default).
    pub boot_mode: BootModeSetting,
}

impl Default for AliyunSettings {
    fn default() -> Self {
        Self {
            region: None,
            ecs_endpoint: None,
            meta_endpoint: DEFAULT_META_ENDPOINT.into(),
            ram_role: None,
            disk_category: "cloud_essd".into(),
            performance_level: None,
            tags: BTreeMap::new(),
            device_dir: PathBuf::from("/dev/disk/by-id"),
            vswitch_id: None,
            security_group_id: None,
            instance_type: DEFAULT_INSTANCE_TYPE.into(),
            system_disk_category: "cloud_essd".into(),
            boot_mode: BootModeSetting::Detect,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_gives_defaults_and_typos_are_refused() {
        let s: AliyunSettings = toml::from_str("").unwrap();
        assert_eq!(s, AliyunSettings::default());
        assert_eq!(s.disk_category, "cloud_essd");
        assert_eq!(s.boot_mode, BootModeSetting::Detect);
        let s: AliyunSettings = toml::from_str(
            r#"
            region = "cn-hangzhou"
            ecs_endpoint = "http://127.0.0.1:8100"
            meta_endpoint = "http://127.0.0.1:8101"
            performance_level = "PL0"
            security_group_id = "sg-1"
            boot_mode = "uefi"
            tags = { team = "dr" }
            "#,
        )
        .unwrap();
        assert_eq!(s.region.as_deref(), Some("cn-hangzhou"));
        assert_eq!(s.boot_mode, BootModeSetting::Uefi);
        assert_eq!(s.tags.get("team").map(String::as_str), Some("dr"));
        let err = toml::from_str::<AliyunSettings>("regoin = \"x\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
