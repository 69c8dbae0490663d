//! The `aws` backend: the gateway is an EC2 instance; each replicated disk is an EBS volume it
//! creates and attaches to itself, each checkpoint an EBS snapshot, each launch an AMI made
//! from snapshots and an instance started from it. The logic is [`CloudBackend`]'s; this is
//! how EC2 answers its calls:
//!
//! | call | EC2 |
//! |---|---|
//! | create volume | CreateVolume (ClientToken, tagged), DescribeVolumes until `available` |
//! | attach | AttachVolume at a free `/dev/sd[f-p]`, DescribeVolumes until `attached`; the device is `nvme-Amazon_Elastic_Block_Store_vol…` under `device_dir` |
//! | snapshot | CreateSnapshot (tagged), DescribeSnapshots until `completed` |
//! | delete snapshot | DeleteSnapshot; `InvalidSnapshot.InUse` when an AMI holds it |
//! | launch | RegisterImage (root `/dev/xvda` = boot disk's snapshot, further disks `/dev/sdb…`, ENA, boot mode; unique name per snapshot and kind), RunInstances |
//! | release | DetachVolume, DescribeVolumes until `available`, DeleteVolume |

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sync_aws::{
    AwsError, AwsSettings, Ec2, ErrorKind, ImageSpec, Imds, InstanceId, LaunchSpec, SnapshotFilter,
    SnapshotId, VolumeId, VolumeState,
};
use tracing::{info, warn};

use super::bootmode::BootMode;
use super::cloud::{
    CloudApi, CloudBackend, CloudError, CloudErrorKind, CloudSnapshotState, CloudSnapshotView,
    CloudVolume, LaunchRequest, Launched, Location, NewSnapshot, NewVolume, SnapshotQuery,
};
use super::device::{self, DeviceError};
use super::BackendError;

/// The `aws` backend.
pub type AwsBackend = CloudBackend<AwsApi>;

/// Root device name of launched images: the conventional HVM root (`/dev/xvda`); Nitro
/// instances see it as nvme0n1 whatever it is called.
const ROOT_DEVICE: &str = "/dev/xvda";

/// EC2 as the [`CloudBackend`] calls it.
#[derive(Debug)]
pub struct AwsApi {
    ec2: Ec2,
    settings: AwsSettings,
    location: Location,
}

impl AwsBackend {
    /// Learns the instance's identity, region and zone from IMDSv2 and builds the EC2 client.
    pub async fn open(settings: AwsSettings, data_dir: &Path) -> Result<Self, BackendError> {
        let setup = |what: &str, e: &dyn std::fmt::Display| {
            BackendError::Setup(format!(
                "aws backend: cannot {what} from the instance metadata service at {}: {e}",
                settings.imds_endpoint
            ))
        };
        let imds = Imds::new(&settings.imds_endpoint)
            .map_err(|e| setup("use the endpoint", &e as &dyn std::fmt::Display))?;
        let doc = imds.identity_document().await.map_err(|e| {
            setup(
                "read the instance identity document",
                &crate::cli::error_chain(&e),
            )
        })?;
        let signature = imds
            .identity_signature()
            .await
            .map_err(|e| setup("read the identity signature", &crate::cli::error_chain(&e)))?;
        let region = settings
            .region
            .clone()
            .unwrap_or_else(|| doc.region.clone());
        let ec2 = Ec2::with_region(&settings, region.clone(), &imds)
            .map_err(|e| BackendError::Setup(format!("aws backend: {e}")))?;
        info!(instance = %doc.instance_id, region = %region, zone = %doc.availability_zone,
            account = %doc.account_id, endpoint = settings.endpoint_url.as_deref().unwrap_or("(AWS)"),
            "aws backend ready");
        let location = Location {
            region,
            zone: doc.availability_zone.clone(),
            instance: doc.instance_id.clone(),
            identity: Some(crate::api::IdentityDocument {
                provider: "aws".into(),
                document: doc.raw,
                signature,
            }),
        };
        CloudBackend::new(
            AwsApi {
                ec2,
                settings,
                location,
            },
            data_dir,
        )
    }
}

impl From<AwsError> for CloudError {
    fn from(e: AwsError) -> Self {
        let kind = match e.kind {
            ErrorKind::NotFound => CloudErrorKind::NotFound,
            _ if e.code.as_deref() == Some("InvalidSnapshot.InUse") => CloudErrorKind::InUse,
            _ if e.kind.is_retryable() => CloudErrorKind::Transient,
            _ => CloudErrorKind::Permanent,
        };
        CloudError {
            kind,
            code: e.code.clone(),
            error: Box::new(e),
        }
    }
}

impl AwsApi {
    fn instance(&self) -> InstanceId {
        InstanceId(self.location.instance.clone())
    }
}

impl CloudApi for AwsApi {
    const PROVIDER: &'static str = "aws";
    const METHOD: &'static str = "ebs";
    const SNAPSHOT: &'static str = "EBS snapshot";
    /// `/dev/xvda` and `/dev/sdb`…`/dev/sdz`.
    const MAX_LAUNCH_DISKS: usize = 26;

    fn location(&self) -> &Location {
        &self.location
    }

    fn retry_stats(&self) -> sync_common::retry::RetryStatsSnapshot {
        self.ec2.retry_stats().snapshot()
    }

    fn device_dir(&self) -> &Path {
        &self.settings.device_dir
    }

    fn device_name(&self, volume: &str) -> Result<String, DeviceError> {
        device::ebs_by_id_name(volume)
    }

    fn boot_mode(&self) -> Option<BootMode> {
        BootMode::configured(self.settings.boot_mode)
    }

    fn tag_value(&self, value: &str) -> String {
        tag_value(value)
    }

    async fn create_volume(&self, req: &NewVolume) -> Result<String, CloudError> {
        let mut tags = req.tags.clone();
        tags.insert("Name".into(), format!("sync-gateway {}", req.disk_id));
        let id = self
            .ec2
            .create_volume(&self.location.zone, req.size_gib, &req.client_token, &tags)
            .await?;
        Ok(id.to_string())
    }

    async fn describe_volume(&self, id: &str) -> Result<CloudVolume, CloudError> {
        let v = self.ec2.describe_volume(&VolumeId(id.into())).await?;
        Ok(CloudVolume {
            size_gib: v.size_gib,
            creating: v.state == VolumeState::Creating,
            attachments: v
                .attachments
                .iter()
                .map(|a| (a.instance_id.to_string(), a.device.clone()))
                .collect(),
        })
    }

    async fn find_volumes(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<String>, CloudError> {
        let found = self.ec2.volumes_by_tags(tags).await?;
        Ok(found.into_iter().map(|v| v.to_string()).collect())
    }

    async fn wait_created(&self, id: &str, timeout: Duration) -> Result<(), CloudError> {
        self.ec2
            .wait_volume_state(&VolumeId(id.into()), VolumeState::Available, timeout)
            .await?;
        Ok(())
    }

    async fn attach_volume(&self, id: &str) -> Result<String, CloudError> {
        Ok(self
            .ec2
            .attach_to_free_device(&VolumeId(id.into()), &self.instance())
            .await?)
    }

    async fn wait_attached(&self, id: &str, timeout: Duration) -> Result<(), CloudError> {
        self.ec2
            .wait_attached(&VolumeId(id.into()), &self.instance(), timeout)
            .await?;
        Ok(())
    }

    async fn detach_volume(&self, id: &str, timeout: Duration) -> Result<(), CloudError> {
        let id = VolumeId(id.into());
        self.ec2.detach_volume(&id).await?;
        match self
            .ec2
            .wait_volume_state(&id, VolumeState::Available, timeout)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_volume(&self, id: &str) -> Result<(), CloudError> {
        Ok(self.ec2.delete_volume(&VolumeId(id.into())).await?)
    }

    async fn create_snapshot(&self, req: &NewSnapshot) -> Result<String, CloudError> {
        let mut tags = req.tags.clone();
        tags.insert("Name".into(), tag_value(&req.name));
        let id = self
            .ec2
            .create_snapshot(
                &VolumeId(req.volume.clone()),
                &description(&req.description),
                &tags,
            )
            .await?;
        Ok(id.to_string())
    }

    async fn describe_snapshots(
        &self,
        query: &SnapshotQuery,
    ) -> Result<Vec<CloudSnapshotView>, CloudError> {
        let filter = match query {
            SnapshotQuery::Ids(ids) => {
                SnapshotFilter::Ids(ids.iter().map(|i| SnapshotId(i.clone())).collect())
            }
            SnapshotQuery::Tags(t) => SnapshotFilter::Tags(t.clone()),
        };
        let found = self.ec2.describe_snapshots(&filter).await?;
        Ok(found
            .into_iter()
            .map(|s| CloudSnapshotView {
                id: s.id.to_string(),
                state: match s.state {
                    sync_aws::SnapshotState::Completed => CloudSnapshotState::Completed,
                    sync_aws::SnapshotState::Error => CloudSnapshotState::Failed(s.state_message),
                    _ => CloudSnapshotState::Pending,
                },
                started_unix_ms: s
                    .start_time
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64),
                size_gib: s.volume_size_gib,
                tags: s.tags,
            })
            .collect())
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        Ok(self.ec2.delete_snapshot(&SnapshotId(id.into())).await?)
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<Launched, CloudError> {
        let disk = req.disk_id.as_str();
        let mut tags = req.tags.clone();
        let kind = tags
            .get(super::cloud::TAG_LAUNCH)
            .cloned()
            .unwrap_or_default();
        tags.insert("Name".into(), tag_value(&format!("{disk} ({kind} launch)")));
        let (boot, rest) = req
            .snapshots
            .split_first()
            .ok_or_else(|| CloudError::permanent("a launch needs a snapshot".into()))?;
        let spec = ImageSpec {
            name: ami_name(&req.image_name),
            description: Some(description(&req.description)),
            root_snapshot: SnapshotId(boot.clone()),
            root_device: ROOT_DEVICE.into(),
            extra_snapshots: rest
                .iter()
                .zip('b'..='z')
                .map(|(s, c)| (format!("/dev/sd{c}"), SnapshotId(s.clone())))
                .collect(),
            boot_mode: match req.boot_mode {
                BootMode::Uefi => sync_aws::BootMode::Uefi,
                BootMode::LegacyBios => sync_aws::BootMode::LegacyBios,
            },
            ena: true,
            tags: tags.clone(),
        };
        let image = self.ec2.register_image(&spec).await?;
        info!(disk, image = %image, snapshot = %boot, boot_mode = req.boot_mode.as_str(),
            "AMI registered");
        let instance = self
            .ec2
            .run_instances(&LaunchSpec {
                image: image.clone(),
                client_token: req.client_token.clone(),
                tags,
            })
            .await?;
        let state = match self.ec2.describe_instance(&instance).await {
            Ok(i) => i.state,
            Err(e) => {
                warn!(instance = %instance, error = %e, "cannot read the new instance's state");
                "pending".into()
            }
        };
        Ok(Launched {
            image_id: image.to_string(),
            instance_id: instance.to_string(),
            state,
        })
    }

    async fn instance_state(&self, id: &str) -> Result<String, CloudError> {
        Ok(self
            .ec2
            .describe_instance(&InstanceId(id.into()))
            .await?
            .state)
    }
}

/// AMI names allow letters, digits and `()[] ./-'@_`, up to 128 characters.
fn ami_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect()
}

/// EC2 descriptions (snapshots, images) hold at most 255 characters.
fn description(s: &str) -> String {
    s.chars().take(255).collect()
}

/// EC2 tag values allow letters, digits, spaces and `+-=._:/@`, up to 256 characters.
fn tag_value(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_alphanumeric() || " +-=._:/@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(256)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_what_ec2_accepts() {
        assert_eq!(
            ami_name("sync-gateway web#1 snap-0abc test"),
            "sync-gateway web_1 snap-0abc test"
        );
        assert_eq!(ami_name(&"x".repeat(300)).len(), 128);
        assert_eq!(description(&"é".repeat(300)).chars().count(), 255);
        assert_eq!(tag_value("pass 3 {final}"), "pass 3 _final_");
        assert_eq!(tag_value(&"x".repeat(300)).len(), 256);
    }

    #[test]
    fn in_use_and_not_found_are_told_apart() {
        let kind = |k: ErrorKind, code: Option<&str>| {
            let mut e = AwsError::local("ec2:DeleteSnapshot", k, "x");
            e.code = code.map(str::to_string);
            CloudError::from(e).kind
        };
        assert_eq!(
            kind(ErrorKind::Invalid, Some("InvalidSnapshot.InUse")),
            CloudErrorKind::InUse
        );
        assert_eq!(
            kind(ErrorKind::NotFound, Some("InvalidSnapshot.NotFound")),
            CloudErrorKind::NotFound
        );
        assert_eq!(kind(ErrorKind::Throttled, None), CloudErrorKind::Transient);
        assert_eq!(kind(ErrorKind::Invalid, None), CloudErrorKind::Permanent);
    }
}
