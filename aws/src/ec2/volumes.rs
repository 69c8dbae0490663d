//! EBS staging volumes: create, describe, wait, attach, detach, delete.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, ResourceType, VolumeType};
use tokio::time::Instant;

use super::{poll_interval, tags_to_map, Ec2};
use crate::error::{AwsError, ErrorKind};
use crate::types::{Attachment, InstanceId, VolumeId, VolumeInfo, VolumeState};

/// Tag carrying the ClientToken of `create_volume`. EC2 remembers a ClientToken only for a
/// while (and moto not at all); the tag makes "create the staging volume of disk X" idempotent
/// for as long as the volume exists, e.g. across a gateway crash between create and record.
pub const CLIENT_TOKEN_TAG_KEY: &str = "sync-gateway:client-token";

/// EBS's largest volume (gp3, io2): 64 TiB.
const MAX_VOLUME_GIB: u64 = 65_536;

/// Device names AWS recommends for attached EBS data volumes on HVM instances
/// (`/dev/sd[f-p]`); sda–sde are left to root and instance-store conventions.
const DEVICE_LETTERS: std::ops::RangeInclusive<char> = 'f'..='p';

impl Ec2 {
    /// Creates a staging volume of `size_gib` in `az` with the configured type, performance
    /// and encryption. `client_token` (≤ 64 ASCII chars, e.g. derived from the disk id) makes
    /// a repeated call return the same volume instead of a second one: a live volume tagged
    /// with the token is returned as is, and CreateVolume carries it as ClientToken.
    pub async fn create_volume(
        &self,
        az: &str,
        size_gib: u64,
        client_token: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<VolumeId, AwsError> {
        const OP: &str = "ec2:CreateVolume";
        if size_gib == 0 || size_gib > MAX_VOLUME_GIB {
            return Err(AwsError::local(
                OP,
                ErrorKind::Invalid,
                format!("volume size {size_gib} GiB is outside 1..={MAX_VOLUME_GIB}"),
            ));
        }
        let size =
            i32::try_from(size_gib).map_err(|_| AwsError::local(OP, ErrorKind::Invalid, "size"))?;
        if let Some(existing) = self.volume_by_client_token(client_token).await? {
            return Ok(existing);
        }
        let s = &self.settings;
        let mut tags = tags.clone();
        tags.insert(CLIENT_TOKEN_TAG_KEY.to_owned(), client_token.to_owned());
        let spec = self.tag_spec(ResourceType::Volume, &tags);
        let out = self
            .retrier
            .run(OP, None, || {
                self.client
                    .create_volume()
                    .availability_zone(az)
                    .size(size)
                    .volume_type(VolumeType::from(s.volume_type.as_str()))
                    .set_iops(s.iops)
                    .set_throughput(s.throughput)
                    .encrypted(s.encrypted)
                    .set_kms_key_id(s.kms_key_id.clone())
                    .client_token(client_token)
                    .tag_specifications(spec.clone())
                    .send()
            })
            .await?;
        let id = out
            .volume_id()
            .ok_or_else(|| AwsError::missing(OP, "VolumeId"))?;
        self.created(id);
        Ok(VolumeId(id.to_owned()))
    }

    /// A volume made by an earlier `create_volume` with this token, unless deleted (how the
    /// gateway finds a disk's staging volume again when its own record is gone).
    pub async fn volume_by_client_token(
        &self,
        client_token: &str,
    ) -> Result<Option<VolumeId>, AwsError> {
        let tags = BTreeMap::from([(CLIENT_TOKEN_TAG_KEY.to_owned(), client_token.to_owned())]);
        Ok(self.volumes_by_tags(&tags).await?.into_iter().next())
    }

    /// Volumes (creating, available or in use) that carry every one of `tags`.
    pub async fn volumes_by_tags(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<VolumeId>, AwsError> {
        const OP: &str = "ec2:DescribeVolumes";
        let mut filters: Vec<Filter> = tags
            .iter()
            .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
            .collect();
        filters.push(
            Filter::builder()
                .name("status")
                .values("creating")
                .values("available")
                .values("in-use")
                .build(),
        );
        let out = self
            .retrier
            .run(OP, None, || {
                self.client
                    .describe_volumes()
                    .set_filters(Some(filters.clone()))
                    .send()
            })
            .await?;
        Ok(out
            .volumes()
            .iter()
            .filter_map(|v| v.volume_id())
            .map(VolumeId::from)
            .collect())
    }

    /// The volume's state, size, attachments and tags.
    pub async fn describe_volume(&self, id: &VolumeId) -> Result<VolumeInfo, AwsError> {
        const OP: &str = "ec2:DescribeVolumes";
        let out = self
            .retrier
            .run(OP, self.not_found_until(id.as_str()), || {
                self.client
                    .describe_volumes()
                    .volume_ids(id.as_str())
                    .send()
            })
            .await?;
        let v = out
            .volumes()
            .iter()
            .find(|v| v.volume_id() == Some(id.as_str()))
            .ok_or_else(|| {
                AwsError::local(OP, ErrorKind::NotFound, format!("{id} not in the response"))
            })?;
        Ok(VolumeInfo {
            id: id.clone(),
            state: VolumeState::parse(v.state().map(|s| s.as_str()).unwrap_or_default()),
            size_gib: v
                .size()
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or_default(),
            availability_zone: v.availability_zone().unwrap_or_default().to_owned(),
            attachments: v
                .attachments()
                .iter()
                .map(|a| Attachment {
                    instance_id: InstanceId(a.instance_id().unwrap_or_default().to_owned()),
                    device: a.device().unwrap_or_default().to_owned(),
                    state: a.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
                })
                .collect(),
            tags: tags_to_map(v.tags()),
        })
    }

    /// Polls until the volume is in `want`; fails at once if it goes to `error`, and with
    /// [`ErrorKind::TimedOut`] after `timeout`.
    pub async fn wait_volume_state(
        &self,
        id: &VolumeId,
        want: VolumeState,
        timeout: Duration,
    ) -> Result<VolumeInfo, AwsError> {
        self.wait_volume(id, timeout, &format!("state {want}"), |v| {
            if v.state == VolumeState::Error {
                return Err(AwsError::local(
                    "ec2:DescribeVolumes",
                    ErrorKind::Other,
                    format!("volume {id} went to state error"),
                ));
            }
            Ok(v.state == want)
        })
        .await
    }

    /// Polls until the volume's attachment to `instance` is `attached`.
    pub async fn wait_attached(
        &self,
        id: &VolumeId,
        instance: &InstanceId,
        timeout: Duration,
    ) -> Result<VolumeInfo, AwsError> {
        self.wait_volume(id, timeout, &format!("attached to {instance}"), |v| {
            Ok(v.attachments
                .iter()
                .any(|a| &a.instance_id == instance && a.state == "attached"))
        })
        .await
    }

    async fn wait_volume(
        &self,
        id: &VolumeId,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&VolumeInfo) -> Result<bool, AwsError>,
    ) -> Result<VolumeInfo, AwsError> {
        let deadline = Instant::now() + timeout;
        let mut round = 0;
        loop {
            let info = self.describe_volume(id).await?;
            if done(&info)? {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                return Err(AwsError::local(
                    "ec2:DescribeVolumes",
                    ErrorKind::TimedOut,
                    format!(
                        "volume {id} not {what} after {timeout:?} (state {}, attachments {:?})",
                        info.state, info.attachments
                    ),
                ));
            }
            tokio::time::sleep(
                poll_interval(round).min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
            round += 1;
        }
    }

    /// Attaches the volume to `instance` at `device` (e.g. `/dev/sdf`). Already attached
    /// there (a retry after a lost response) counts as success.
    pub async fn attach_volume(
        &self,
        id: &VolumeId,
        instance: &InstanceId,
        device: &str,
    ) -> Result<(), AwsError> {
        const OP: &str = "ec2:AttachVolume";
        let result = self
            .retrier
            .run(OP, self.not_found_until(id.as_str()), || {
                self.client
                    .attach_volume()
                    .volume_id(id.as_str())
                    .instance_id(instance.as_str())
                    .device(device)
                    .send()
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code.as_deref(), Some("VolumeInUse" | "IncorrectState")) => {
                let info = self.describe_volume(id).await?;
                let here = info.attachments.iter().any(|a| {
                    &a.instance_id == instance
                        && a.device == device
                        && matches!(a.state.as_str(), "attaching" | "attached")
                });
                if here {
                    Ok(())
                } else {
                    Err(e)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Detaches the volume from the instance it is attached to. Already detached (or gone)
    /// counts as success. The instance and device are passed explicitly (looked up first):
    /// EC2 makes them optional, moto fails without them.
    pub async fn detach_volume(&self, id: &VolumeId) -> Result<(), AwsError> {
        const OP: &str = "ec2:DetachVolume";
        let info = match self.describe_volume(id).await {
            Ok(info) => info,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(att) = info
            .attachments
            .iter()
            .find(|a| matches!(a.state.as_str(), "attaching" | "attached" | "busy"))
        else {
            return Ok(());
        };
        let result = self
            .retrier
            .run(OP, None, || {
                self.client
                    .detach_volume()
                    .volume_id(id.as_str())
                    .instance_id(att.instance_id.as_str())
                    .device(&att.device)
                    .send()
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            // a retry after a lost response: already detaching or detached
            Err(e) if e.code.as_deref() == Some("IncorrectState") => {
                let info = self.describe_volume(id).await?;
                if info
                    .attachments
                    .iter()
                    .all(|a| matches!(a.state.as_str(), "detaching" | "detached"))
                {
                    Ok(())
                } else {
                    Err(e)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the volume (it must be detached). Already gone counts as success.
    pub async fn delete_volume(&self, id: &VolumeId) -> Result<(), AwsError> {
        const OP: &str = "ec2:DeleteVolume";
        self.forget(id.as_str());
        match self
            .retrier
            .run(OP, None, || {
                self.client.delete_volume().volume_id(id.as_str()).send()
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The first of `/dev/sdf`..`/dev/sdp` that `instance` does not use (attaching volumes
    /// included; `/dev/xvdX` counts as `/dev/sdX`).
    pub async fn free_device_name(&self, instance: &InstanceId) -> Result<String, AwsError> {
        let info = self.describe_instance(instance).await?;
        let used: Vec<char> = info
            .block_devices
            .iter()
            .filter_map(|(dev, _)| device_letter(dev))
            .collect();
        DEVICE_LETTERS
            .into_iter()
            .find(|c| !used.contains(c))
            .map(|c| format!("/dev/sd{c}"))
            .ok_or_else(|| {
                AwsError::local(
                    "ec2:DescribeInstances",
                    ErrorKind::Invalid,
                    format!("{instance} has no free device name in /dev/sd[f-p]"),
                )
            })
    }

    /// Chooses a free device name and attaches there, one attach at a time per client so two
    /// disks never pick the same name. Returns the device name.
    pub async fn attach_to_free_device(
        &self,
        id: &VolumeId,
        instance: &InstanceId,
    ) -> Result<String, AwsError> {
        let _one_at_a_time = self.attach_lock.lock().await;
        let device = self.free_device_name(instance).await?;
        self.attach_volume(id, instance, &device).await?;
        Ok(device)
    }
}

/// `/dev/sdf`, `/dev/xvdf`, `sdf` → `f`; root-style names (`/dev/xvda`, `/dev/sda1`) → their
/// letter too, which is outside f–p and so never collides.
fn device_letter(device: &str) -> Option<char> {
    let name = device.strip_prefix("/dev/").unwrap_or(device);
    let rest = name
        .strip_prefix("xvd")
        .or_else(|| name.strip_prefix("sd"))?;
    rest.chars().next().filter(char::is_ascii_lowercase)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::device_letter;

    #[test]
    fn device_letters() {
        assert_eq!(device_letter("/dev/sdf"), Some('f'));
        assert_eq!(device_letter("/dev/xvdg"), Some('g'));
        assert_eq!(device_letter("/dev/sda1"), Some('a'));
        assert_eq!(device_letter("/dev/nvme1n1"), None);
    }
}
