//! The `aws` backend's settings: the `[backend] kind = "aws"` table of the gateway config.
//!
//! ```toml
//! [backend]
//! kind = "aws"
//! region = "us-east-1"                      # default: from instance metadata
//! endpoint_url = "http://127.0.0.1:5000"    # tests only; real AWS by default
//! imds_endpoint = "http://127.0.0.1:5001"   # tests only; 169.254.169.254 by default
//! device_dir = "/dev/disk/by-id"
//! tags = { team = "migration" }
//! ```
//!
//! Credentials come from the instance profile through IMDSv2. The `access_key_id` /
//! `secret_access_key` / `session_token` keys exist for tests against moto only.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use sync_common::boot::BootModeSetting;

/// The `aws` backend's settings. Every field has a default, so an empty table is valid on EC2.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsSettings {
    /// AWS region, e.g. `us-east-1`. Default: the instance's region from IMDS.
    pub region: Option<String>,
    /// EC2 endpoint override (tests: a moto server on loopback). Default: the regional
    /// public endpoint.
    pub endpoint_url: Option<String>,
    /// Instance metadata service base URL. Default `http://169.254.169.254`; tests point it at
    /// a fake IMDS on loopback.
    pub imds_endpoint: String,
    /// EBS volume type of staging volumes. Default `gp3` (baseline 3000 IOPS / 125 MiB/s at any
    /// size, cheaper than gp2).
    pub volume_type: String,
    /// Provisioned IOPS (gp3, io1, io2). Default: the type's baseline.
    pub iops: Option<i32>,
    /// Provisioned throughput in MiB/s (gp3 only). Default: the type's baseline.
    pub throughput: Option<i32>,
    /// Encrypt staging volumes (and so their snapshots). Default true.
    pub encrypted: bool,
    /// KMS key (id, alias or ARN) for encryption. Default: the account's EBS default key.
    pub kms_key_id: Option<String>,
    /// Tags added to everything the gateway creates (volumes, snapshots, images, instances).
    /// Per-call tags win over these on a key clash.
    pub tags: BTreeMap<String, String>,
    /// Subnet for launched instances. Default: the launch template's, else the default VPC's.
    pub subnet_id: Option<String>,
    /// Security groups for launched instances. Default: the launch template's, else the
    /// subnet VPC's default group.
    pub security_group_ids: Vec<String>,
    /// Instance type for launches. Default: the launch template's, else `t3.medium`.
    pub instance_type: Option<String>,
    /// EC2 key pair for launched instances. Default: none.
    pub key_name: Option<String>,
    /// Launch template for launches (explicit settings above override its values).
    pub launch_template_id: Option<String>,
    /// Version of `launch_template_id`. Default: the template's default version.
    pub launch_template_version: Option<String>,
    /// Boot mode of launched images: `uefi`, `legacy-bios` or `detect` (default).
    pub boot_mode: BootModeSetting,
    /// Where udev names block devices by serial; the staging volume is found there as
    /// `nvme-Amazon_Elastic_Block_Store_vol…`. Default `/dev/disk/by-id`.
    pub device_dir: PathBuf,
    /// Tests only (moto): a static access key. Never set in production, where the instance
    /// profile's rotating credentials are read from IMDS.
    pub access_key_id: Option<String>,
    /// Tests only: the static secret key paired with `access_key_id`.
    pub secret_access_key: Option<String>,
    /// Tests only: a static session token.
    pub session_token: Option<String>,
}

/// Instance type used for launches when neither the settings nor a launch template give one:
/// a general-purpose size that boots any migrated x86_64 server with ENA and NVMe.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.medium";

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            imds_endpoint: "http://169.254.169.254".into(),
            volume_type: "gp3".into(),
            iops: None,
            throughput: None,
            encrypted: true,
            kms_key_id: None,
            tags: BTreeMap::new(),
            subnet_id: None,
            security_group_ids: Vec::new(),
            instance_type: None,
            key_name: None,
            launch_template_id: None,
            launch_template_version: None,
            boot_mode: BootModeSetting::Detect,
            device_dir: PathBuf::from("/dev/disk/by-id"),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
        }
    }
}

impl AwsSettings {
    /// Static credentials when both halves are configured (tests), else `None` (IMDS).
    pub(crate) fn static_credentials(&self) -> Option<(&str, &str, Option<&str>)> {
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(ak), Some(sk)) => Some((ak, sk, self.session_token.as_deref())),
            _ => None,
        }
    }
}

/// Secrets are redacted: settings are logged at startup.
impl fmt::Debug for AwsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("AwsSettings")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("imds_endpoint", &self.imds_endpoint)
            .field("volume_type", &self.volume_type)
            .field("iops", &self.iops)
            .field("throughput", &self.throughput)
            .field("encrypted", &self.encrypted)
            .field("kms_key_id", &self.kms_key_id)
            .field("tags", &self.tags)
            .field("subnet_id", &self.subnet_id)
            .field("security_group_ids", &self.security_group_ids)
            .field("instance_type", &self.instance_type)
            .field("key_name", &self.key_name)
            .field("launch_template_id", &self.launch_template_id)
            .field("launch_template_version", &self.launch_template_version)
            .field("boot_mode", &self.boot_mode)
            .field("device_dir", &self.device_dir)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_gives_defaults() {
        let s: AwsSettings = toml::from_str("").unwrap();
        assert_eq!(s, AwsSettings::default());
        assert_eq!(s.imds_endpoint, "http://169.254.169.254");
        assert_eq!(s.volume_type, "gp3");
        assert!(s.encrypted);
        assert_eq!(s.boot_mode, BootModeSetting::Detect);
        assert_eq!(s.device_dir, PathBuf::from("/dev/disk/by-id"));
    }

    #[test]
    fn issue_example_parses_and_unknown_keys_are_refused() {
        let s: AwsSettings = toml::from_str(
            r#"
            region = "us-east-1"
            endpoint_url = "http://127.0.0.1:5000"
            imds_endpoint = "http://127.0.0.1:5001"
            device_dir = "/tmp/by-id"
            boot_mode = "legacy-bios"
            tags = { team = "dr" }
            "#,
        )
        .unwrap();
        assert_eq!(s.region.as_deref(), Some("us-east-1"));
        assert_eq!(s.boot_mode, BootModeSetting::LegacyBios);
        assert_eq!(s.tags.get("team").map(String::as_str), Some("dr"));
        let err = toml::from_str::<AwsSettings>("regoin = \"x\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let s = AwsSettings {
            access_key_id: Some("AKIDTEST".into()),
            secret_access_key: Some("very-secret".into()),
            session_token: Some("tok-secret".into()),
            ..AwsSettings::default()
        };
        let d = format!("{s:?}");
        assert!(
            !d.contains("very-secret") && !d.contains("tok-secret"),
            "{d}"
        );
    }
}
