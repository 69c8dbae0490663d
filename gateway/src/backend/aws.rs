//! The `aws` backend: the gateway is an EC2 instance; each replicated disk is an EBS volume it
//! creates and attaches to itself, each checkpoint an EBS snapshot, each launch an AMI made
//! from snapshots and an instance started from it.
//!
//! | step | calls | safe to repeat because |
//! |---|---|---|
//! | assign (`open_volume`) | CreateVolume, AttachVolume, wait for `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…` | the volume carries a client token derived from (gateway instance, disk id); an attachment to us is reused |
//! | checkpoint (`begin_snapshot`) | CreateSnapshot, then DescribeSnapshots in the background until `completed` | the point in time is fixed when CreateSnapshot returns; no write needs preserving |
//! | snapshot failed | CreateSnapshot again, if the volume has not been written since | the content is then the same as the failed snapshot's |
//! | retention | DeleteSnapshot | NotFound is success |
//! | launch | RegisterImage (root = boot disk's snapshot, ENA, boot mode), RunInstances | AMI name per snapshot; ClientToken |
//! | finalize (`release_volume`) | DetachVolume, DeleteVolume | gone is success; launched instances and AMIs are never touched |
//!
//! What the gateway learns from EC2 lives in EC2 (tags) where it can: snapshots are listed by
//! their tags, so a restarted gateway sees the same snapshots. Two small records live under
//! `DATA_DIR/aws/`: the disk → volume map (a cache: the client-token tag finds a volume again)
//! and the launches (EC2 has no "launched by" query worth a call per status report).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sync_aws::{
    AwsSettings, BootModeSetting, Ec2, ErrorKind, ImageSpec, Imds, InstanceId, LaunchSpec,
    SnapshotFilter, SnapshotId, VolumeId, VolumeState, MANAGED_TAG_KEY, MANAGED_TAG_VALUE,
};
use tokio::time::Instant;
use tracing::{info, warn};

use super::bootmode::{self, BootMode};
use super::cloud::CloudSnapshot;
use super::device;
use super::{
    BackendError, LaunchDisk, LaunchInfo, Recovered, Snapshot, SnapshotInfo, SnapshotRequest,
    SnapshotState, Volume,
};
use crate::durable;

/// Tag keys the gateway puts on its snapshots (and volumes); snapshots are listed by them.
pub const TAG_DISK: &str = "sync-gateway:disk";
pub const TAG_GATEWAY: &str = "sync-gateway:gateway";
pub const TAG_LABEL: &str = "sync-gateway:checkpoint";
pub const TAG_SEQ: &str = "sync-gateway:checkpoint-seq";
pub const TAG_CREATED_MS: &str = "sync-gateway:created-ms";
pub const TAG_SIZE: &str = "sync-gateway:size-bytes";
pub const TAG_REPLACES: &str = "sync-gateway:replaces";
pub const TAG_LAUNCH: &str = "sync-gateway:launch";

const GIB: u64 = 1 << 30;
/// A new volume is `available` within seconds; 5 minutes only fails a stuck one.
const VOLUME_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Attachments complete within seconds and udev names the device right after.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(300);
const DEVICE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a snapshot listing is reused: status reports list every few seconds, and a
/// DescribeSnapshots per report would eat the account's API budget for nothing.
const LISTING_TTL: Duration = Duration::from_secs(15);
/// How long a launch's instance state is reused before DescribeInstances again.
const LAUNCH_STATE_TTL: Duration = Duration::from_secs(30);
/// Times a failed snapshot is taken again before it is reported failed for good.
const SNAPSHOT_RETRIES: u32 = 3;
/// Progress checks in a row that may fail (each after its own retries, ~75 s at most) before a
/// followed snapshot is reported failed: about half an hour of EC2 trouble.
const FOLLOW_FAILED_CHECKS: u32 = 20;
/// Root device name of launched images: the conventional HVM root (`/dev/xvda`); Nitro
/// instances see it as nvme0n1 whatever it is called.
const ROOT_DEVICE: &str = "/dev/xvda";

/// The `aws` backend. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AwsBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ec2: Ec2,
    settings: AwsSettings,
    instance: InstanceId,
    availability_zone: String,
    identity: Option<crate::api::IdentityDocument>,
    /// `DATA_DIR/aws`.
    dir: PathBuf,
    volumes: Mutex<BTreeMap<String, VolumeRecord>>,
    /// Snapshots this process follows to completion, by their first id.
    tracked: Mutex<HashMap<String, Tracked>>,
    listing: Mutex<Option<(Instant, Vec<SnapshotInfo>)>>,
    /// Bumped by every invalidation: a listing fetched across one is not cached.
    listing_epoch: std::sync::atomic::AtomicU64,
    /// Retaken snapshots that turned out to hold later data and could not be deleted: they
    /// never stand for the checkpoint they were taken for (`DATA_DIR/aws/rejected.json`).
    rejected: Mutex<std::collections::BTreeSet<String>>,
    launch_states: Mutex<HashMap<String, (Instant, String)>>,
    /// Snapshot id → the volume it was taken of and the volume's write generation then: while
    /// that is unchanged, the volume holds the snapshot's content (see `snapshot_digest`).
    sources: Mutex<HashMap<String, (Weak<Volume>, u64)>>,
    snapshots_retried: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone)]
struct Tracked {
    handle: Arc<CloudSnapshot>,
    /// The volume and its write generation at initiation: while it is unchanged the volume
    /// still holds the snapshot's content.
    volume: Weak<Volume>,
    generation: u64,
}

/// What `DATA_DIR/aws/volumes.json` records per disk. The record is written before
/// CreateVolume, with the client token only, so that a crash in between finds the volume again
/// by its token tag; finalize removes it, so that assigning the disk again makes a new volume
/// under a new token (EC2 would answer a reused token with the deleted volume).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct VolumeRecord {
    client_token: String,
    #[serde(default)]
    volume_id: Option<String>,
    /// The device the block device was found at (`/dev/nvme1n1`, or a file in tests).
    #[serde(default)]
    device: PathBuf,
    size_bytes: u64,
}

impl AwsBackend {
    /// Learns the instance's identity, region and zone from IMDSv2 and builds the EC2 client.
    pub async fn open(settings: AwsSettings, data_dir: PathBuf) -> Result<Self, BackendError> {
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
        let dir = data_dir.join("aws");
        durable::create_dir_all_durable(&dir).map_err(|source| BackendError::Io {
            disk: "*".into(),
            action: "create",
            path: dir.clone(),
            source,
        })?;
        let volumes = load_json(&dir.join("volumes.json")).unwrap_or_default();
        let rejected = load_json(&dir.join("rejected.json")).unwrap_or_default();
        info!(instance = %doc.instance_id, region = %region, zone = %doc.availability_zone,
            account = %doc.account_id, endpoint = settings.endpoint_url.as_deref().unwrap_or("(AWS)"),
            "aws backend ready");
        Ok(Self {
            inner: Arc::new(Inner {
                ec2,
                instance: InstanceId(doc.instance_id.clone()),
                availability_zone: doc.availability_zone.clone(),
                identity: Some(crate::api::IdentityDocument {
                    provider: "aws".into(),
                    document: doc.raw,
                    signature,
                }),
                settings,
                dir,
                volumes: Mutex::new(volumes),
                tracked: Mutex::default(),
                listing: Mutex::default(),
                listing_epoch: Default::default(),
                rejected: Mutex::new(rejected),
                launch_states: Mutex::default(),
                sources: Mutex::default(),
                snapshots_retried: Default::default(),
            }),
        })
    }

    pub fn identity(&self) -> Option<crate::api::IdentityDocument> {
        self.inner.identity.clone()
    }

    pub fn cloud_status(&self) -> crate::api::CloudStatus {
        let stats = self.inner.ec2.retry_stats().snapshot();
        crate::api::CloudStatus {
            provider: "aws".into(),
            region: self.inner.ec2.region().to_string(),
            availability_zone: self.inner.availability_zone.clone(),
            instance_id: self.inner.instance.to_string(),
            api_retries: stats.retries,
            api_throttled: stats.throttled,
            api_last_error: stats.last_error,
            snapshots_retried: self
                .inner
                .snapshots_retried
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn volume_id(&self, disk_id: &str) -> Option<String> {
        self.inner
            .volumes()
            .get(disk_id)
            .and_then(|r| r.volume_id.clone())
    }

    /// Creates (or finds again) the staging volume of `disk_id`, attaches it here, and opens
    /// its block device, found by the volume's serial.
    pub async fn open_volume(&self, disk_id: &str, size: u64) -> Result<Volume, BackendError> {
        let inner = &self.inner;
        let cloud = |e| BackendError::cloud(disk_id, e);
        let size_gib = size.div_ceil(GIB).max(1);
        let recorded = inner.volumes().get(disk_id).cloned();
        let (token, known) = match recorded {
            Some(r) => (r.client_token, r.volume_id),
            None => {
                let token = client_token(inner.instance.as_str(), disk_id, rand::random());
                inner.set_volume(
                    disk_id,
                    Some(VolumeRecord {
                        client_token: token.clone(),
                        volume_id: None,
                        device: PathBuf::new(),
                        size_bytes: size,
                    }),
                )?;
                (token, None)
            }
        };
        let id = match known {
            // A volume that held this disk's replicated data: never silently replace it with
            // an empty one under the disk's durable state.
            Some(v) => VolumeId(v),
            None => {
                let mut tags = inner.base_tags(disk_id);
                tags.insert("Name".into(), format!("sync-gateway {disk_id}"));
                inner
                    .ec2
                    .create_volume(&inner.availability_zone, size_gib, &token, &tags)
                    .await
                    .map_err(cloud)?
            }
        };
        let mut vol = match inner.ec2.describe_volume(&id).await {
            Ok(v) => v,
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(BackendError::Unsupported {
                    disk: disk_id.into(),
                    message: format!(
                        "staging volume {id}, which holds this disk's replicated data, no longer \
                         exists ({e}); finalize the disk and assign it again to start over"
                    ),
                })
            }
            Err(e) => return Err(cloud(e)),
        };
        if vol.size_gib < size_gib {
            return Err(BackendError::SizeMismatch {
                disk: disk_id.into(),
                path: PathBuf::from(id.as_str()),
                found: vol.size_gib * GIB,
                expected: size,
            });
        }
        if let Some(a) = vol
            .attachments
            .iter()
            .find(|a| a.instance_id != inner.instance)
        {
            return Err(BackendError::Unsupported {
                disk: disk_id.into(),
                message: format!(
                    "staging volume {id} is attached to {} ({}), not to this gateway {}",
                    a.instance_id, a.device, inner.instance
                ),
            });
        }
        if vol.state == VolumeState::Creating {
            vol = inner
                .ec2
                .wait_volume_state(&id, VolumeState::Available, VOLUME_READY_TIMEOUT)
                .await
                .map_err(cloud)?;
        }
        let attached_here = vol
            .attachments
            .iter()
            .any(|a| a.instance_id == inner.instance);
        if !attached_here {
            let dev = inner
                .ec2
                .attach_to_free_device(&id, &inner.instance)
                .await
                .map_err(cloud)?;
            info!(disk = disk_id, volume = %id, device = %dev, "staging volume attaching");
        }
        inner
            .ec2
            .wait_attached(&id, &inner.instance, ATTACH_TIMEOUT)
            .await
            .map_err(cloud)?;
        let name = device::ebs_by_id_name(id.as_str()).map_err(|error| BackendError::Device {
            disk: disk_id.into(),
            error,
        })?;
        let path = device::wait_for_device(&inner.settings.device_dir, &name, DEVICE_TIMEOUT)
            .await
            .map_err(|error| BackendError::Device {
                disk: disk_id.into(),
                error,
            })?;
        let (p, disk) = (path.clone(), disk_id.to_string());
        let volume = super::blocking(move || {
            let io = |action: &'static str| {
                let (disk, path) = (disk.clone(), p.clone());
                move |source| BackendError::Io {
                    disk,
                    action,
                    path,
                    source,
                }
            };
            let mut f = std::fs::File::open(&p).map_err(io("open"))?;
            let found = f.seek(SeekFrom::End(0)).map_err(io("measure"))?;
            if found < size {
                return Err(BackendError::SizeMismatch {
                    disk,
                    path: p,
                    found,
                    expected: size,
                });
            }
            Volume::open(&p, size, true).map_err(io("open"))
        })
        .await?;
        inner.set_volume(
            disk_id,
            Some(VolumeRecord {
                client_token: token,
                volume_id: Some(id.to_string()),
                device: path.clone(),
                size_bytes: size,
            }),
        )?;
        info!(disk = disk_id, volume = %id, device = %path.display(), size_gib, "staging volume ready");
        Ok(volume)
    }

    /// CreateSnapshot of the (durable) volume; completion is followed in the background.
    pub async fn begin_snapshot(
        &self,
        volume: Arc<Volume>,
        req: SnapshotRequest,
    ) -> Result<Snapshot, BackendError> {
        let inner = &self.inner;
        let vol_id = inner.volume_of(&req.disk_id).await?;
        let generation = volume.generation();
        let created_unix_ms = crate::server::disk::unix_ms();
        let id = inner
            .create_snapshot(&vol_id, &req, created_unix_ms, volume.size(), None)
            .await
            .map_err(|e| BackendError::cloud(&req.disk_id, e))?;
        let info = SnapshotInfo {
            id: id.to_string(),
            disk_id: req.disk_id.clone(),
            label: req.label.clone(),
            checkpoint_seq: req.checkpoint_seq,
            created_unix_ms,
            created: rfc3339(created_unix_ms),
            size_bytes: volume.size(),
            method: "ebs".into(),
            path: None,
            state: SnapshotState::Pending,
            replaces: None,
        };
        inner.invalidate_listing();
        inner.remember_source(info.id.clone(), &volume, generation);
        let handle = Arc::new(CloudSnapshot::new(info));
        self.follow(Tracked {
            handle: handle.clone(),
            volume: Arc::downgrade(&volume),
            generation,
        });
        info!(disk = %req.disk_id, snapshot = %id, volume = %vol_id, seq = req.checkpoint_seq,
            "EBS snapshot initiated");
        Ok(Snapshot::Cloud(handle))
    }

    /// Follows `t` until EC2 completes it, retrying a failed one while the volume still holds
    /// its content.
    fn follow(&self, t: Tracked) {
        let first = t.handle.info().id.clone();
        self.inner.tracked().insert(first.clone(), t.clone());
        let inner = self.inner.clone();
        tokio::spawn(async move {
            inner.follow(&t).await;
            inner.tracked().remove(&first);
            inner.invalidate_listing();
        });
    }

    /// Snapshots of `disk_id` still pending after a restart are followed again.
    pub async fn recover(&self, disk_id: &str) -> Result<Recovered, BackendError> {
        let mut out = Recovered::default();
        for s in self.list_snapshots(Some(disk_id)).await? {
            let followed = self
                .inner
                .tracked()
                .values()
                .any(|t| t.handle.info().id == s.id || t.handle.current().id == s.id);
            if s.state != SnapshotState::Pending || followed {
                continue;
            }
            let handle = Arc::new(CloudSnapshot::new(s));
            self.follow(Tracked {
                handle: handle.clone(),
                // The volume's history before this start is unknown: no retry with "same
                // content" is possible.
                volume: Weak::new(),
                generation: 0,
            });
            out.resumed.push(Snapshot::Cloud(handle));
        }
        Ok(out)
    }

    /// This gateway's snapshots (of one disk, or all), oldest first, from their tags.
    pub async fn list_snapshots(
        &self,
        disk_id: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, BackendError> {
        let inner = &self.inner;
        let cached = inner
            .listing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < LISTING_TTL)
            .map(|(_, v)| v.clone());
        let all = match cached {
            Some(v) => v,
            None => {
                let epoch = inner
                    .listing_epoch
                    .load(std::sync::atomic::Ordering::SeqCst);
                let filter = SnapshotFilter::Tags(inner.base_tags_gateway());
                let found = inner
                    .ec2
                    .describe_snapshots(&filter)
                    .await
                    .map_err(|e| BackendError::cloud(disk_id.unwrap_or("*"), e))?;
                let rejected = inner
                    .rejected
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                let mut v: Vec<SnapshotInfo> = found
                    .iter()
                    .filter_map(from_ec2)
                    .map(|mut s| {
                        if rejected.contains(&s.id) {
                            s.replaces = None;
                            s.state = SnapshotState::Failed;
                        }
                        s
                    })
                    .collect();
                v.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
                let mut cache = inner.listing.lock().unwrap_or_else(PoisonError::into_inner);
                if inner
                    .listing_epoch
                    .load(std::sync::atomic::Ordering::SeqCst)
                    == epoch
                {
                    *cache = Some((Instant::now(), v.clone()));
                }
                v
            }
        };
        // What this process follows is fresher than any listing.
        let live: HashMap<String, SnapshotInfo> = inner
            .tracked()
            .values()
            .map(|t| t.handle.current())
            .map(|s| (s.id.clone(), s))
            .collect();
        let mut out: Vec<SnapshotInfo> = all
            .into_iter()
            .filter(|s| disk_id.is_none_or(|d| s.disk_id == d))
            .map(|s| live.get(&s.id).cloned().unwrap_or(s))
            .collect();
        for s in live.into_values() {
            if disk_id.is_none_or(|d| s.disk_id == d) && !out.iter().any(|o| o.id == s.id) {
                out.push(s);
            }
        }
        out.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(out)
    }

    /// DeleteSnapshot; a pending one is refused (its checkpoint may still need it).
    pub async fn delete_snapshot(&self, info: &SnapshotInfo) -> Result<(), BackendError> {
        if info.state == SnapshotState::Pending {
            return Err(BackendError::SnapshotPending {
                disk: info.disk_id.clone(),
                snapshot: info.id.clone(),
            });
        }
        match self
            .inner
            .ec2
            .delete_snapshot(&SnapshotId(info.id.clone()))
            .await
        {
            Ok(()) => {}
            // An AMI (a launch) is made of it: EC2 keeps it while the image exists.
            Err(e) if e.code.as_deref() == Some("InvalidSnapshot.InUse") => {
                return Err(BackendError::SnapshotInUse {
                    disk: info.disk_id.clone(),
                    snapshot: info.id.clone(),
                    by: e.message,
                })
            }
            Err(e) => return Err(BackendError::cloud(&info.disk_id, e)),
        }
        self.inner.invalidate_listing();
        self.inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&info.id);
        Ok(())
    }

    /// Registers an AMI from completed snapshots (the first is the boot disk) and starts an
    /// instance of it with the configured network settings.
    pub async fn launch(
        &self,
        snapshots: Vec<SnapshotInfo>,
        test: bool,
    ) -> Result<LaunchInfo, BackendError> {
        let inner = &self.inner;
        let Some(boot) = snapshots.first() else {
            return Err(BackendError::Unsupported {
                disk: "*".into(),
                message: "a launch needs at least one snapshot".into(),
            });
        };
        if let Some(s) = snapshots
            .iter()
            .find(|s| s.state != SnapshotState::Completed)
        {
            return Err(BackendError::SnapshotPending {
                disk: s.disk_id.clone(),
                snapshot: s.id.clone(),
            });
        }
        let disk = boot.disk_id.as_str();
        let boot_mode = self.boot_mode(disk).await;
        let kind = if test { "test" } else { "cutover" };
        let mut tags = inner.base_tags(disk);
        tags.insert(TAG_LAUNCH.into(), kind.into());
        tags.insert("Name".into(), format!("{disk} ({kind} launch)"));
        if snapshots.len() > 26 {
            return Err(BackendError::Unsupported {
                disk: disk.into(),
                message: format!(
                    "a launch maps at most 26 disks (/dev/xvda, /dev/sdb../dev/sdz), not {}",
                    snapshots.len()
                ),
            });
        }
        let extra = snapshots[1..]
            .iter()
            .zip('b'..='z')
            .map(|(s, c)| (format!("/dev/sd{c}"), SnapshotId(s.id.clone())))
            .collect();
        let spec = ImageSpec {
            name: ami_name(disk, &boot.id, kind),
            description: Some(description(&format!(
                "sync-gateway: {disk} at checkpoint {} ({})",
                boot.label, boot.created
            ))),
            root_snapshot: SnapshotId(boot.id.clone()),
            root_device: ROOT_DEVICE.into(),
            extra_snapshots: extra,
            boot_mode: match boot_mode {
                BootMode::Uefi => sync_aws::BootMode::Uefi,
                BootMode::LegacyBios => sync_aws::BootMode::LegacyBios,
            },
            ena: true,
            tags: tags.clone(),
        };
        let cloud = |e| BackendError::cloud(disk, e);
        let image = inner.ec2.register_image(&spec).await.map_err(cloud)?;
        info!(disk, image = %image, snapshot = %boot.id, boot_mode = boot_mode.as_str(),
            "AMI registered");
        let instance = inner
            .ec2
            .run_instances(&LaunchSpec {
                image: image.clone(),
                client_token: format!("sgw-{:032x}", rand::random::<u128>()),
                tags,
            })
            .await
            .map_err(cloud)?;
        let state = match inner.ec2.describe_instance(&instance).await {
            Ok(i) => i.state,
            Err(e) => {
                warn!(instance = %instance, error = %e, "cannot read the new instance's state");
                "pending".into()
            }
        };
        let launch = LaunchInfo {
            instance_id: instance.to_string(),
            test,
            state,
            created_unix_ms: crate::server::disk::unix_ms(),
            disks: snapshots
                .iter()
                .map(|s| LaunchDisk {
                    disk_id: s.disk_id.clone(),
                    snapshot_id: s.id.clone(),
                    path: None,
                })
                .collect(),
            image_id: Some(image.to_string()),
        };
        let dir = inner.dir.join("launches");
        let path = dir.join(format!("{instance}.json"));
        let json = serde_json::to_vec_pretty(&launch).unwrap_or_default();
        durable::create_dir_all_durable(&dir)
            .and_then(|()| durable::atomic_write(&path, &json, 0o600))
            .map_err(|source| BackendError::Io {
                disk: disk.into(),
                action: "record launch in",
                path,
                source,
            })?;
        info!(disk, instance = %instance, image = %image, test, state = %launch.state,
            "instance launched");
        Ok(launch)
    }

    /// The boot mode of a launch of `disk`: configured, or read from the staging volume's
    /// partition table (which a checkpoint's snapshot shares unless the source repartitioned).
    async fn boot_mode(&self, disk: &str) -> BootMode {
        match self.inner.settings.boot_mode {
            BootModeSetting::Uefi => return BootMode::Uefi,
            BootModeSetting::LegacyBios => return BootMode::LegacyBios,
            BootModeSetting::Detect => {}
        }
        let record = self.inner.volumes().get(disk).cloned();
        let detected = match record {
            Some(r) => tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&r.device)?;
                bootmode::detect_from(
                    |buf, off| std::os::unix::fs::FileExt::read_exact_at(&f, buf, off),
                    r.size_bytes,
                )
            })
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten(),
            None => None,
        };
        match detected {
            Some(m) => m,
            None => {
                // EC2's own default for x86_64 images that name no boot mode.
                warn!(disk, "boot mode not detectable from the partition table; using legacy-bios (set boot_mode to override)");
                BootMode::LegacyBios
            }
        }
    }

    /// Recorded launches, oldest first, with their instance state refreshed now and then.
    pub async fn list_launches(&self) -> Result<Vec<LaunchInfo>, BackendError> {
        let dir = self.inner.dir.join("launches");
        let mut out: Vec<LaunchInfo> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| load_json(&e.path()))
                .collect(),
            Err(_) => Vec::new(),
        };
        for l in &mut out {
            let cached = self
                .inner
                .launch_states
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&l.instance_id)
                .filter(|(at, _)| at.elapsed() < LAUNCH_STATE_TTL)
                .map(|(_, s)| s.clone());
            let state = match cached {
                Some(s) => s,
                None => match self
                    .inner
                    .ec2
                    .describe_instance(&InstanceId(l.instance_id.clone()))
                    .await
                {
                    Ok(i) => i.state,
                    Err(e) if e.kind == ErrorKind::NotFound => "terminated".into(),
                    Err(_) => l.state.clone(),
                },
            };
            self.inner
                .launch_states
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(l.instance_id.clone(), (Instant::now(), state.clone()));
            l.state = state;
        }
        out.sort_by(|a, b| {
            (a.created_unix_ms, &a.instance_id).cmp(&(b.created_unix_ms, &b.instance_id))
        });
        Ok(out)
    }

    /// Detaches and deletes the staging volume of a finalized disk; snapshots, images and
    /// instances stay.
    pub async fn release_volume(&self, disk_id: &str) -> Result<(), BackendError> {
        let inner = &self.inner;
        let cloud = |e| BackendError::cloud(disk_id, e);
        let recorded = inner.volumes().get(disk_id).cloned();
        let id = match recorded {
            Some(VolumeRecord {
                volume_id: Some(v), ..
            }) => Some(VolumeId(v)),
            // Recorded before CreateVolume answered: the token tag finds what it made.
            Some(r) => inner
                .ec2
                .volume_by_client_token(&r.client_token)
                .await
                .map_err(cloud)?,
            None => None,
        };
        if let Some(id) = id {
            inner.ec2.detach_volume(&id).await.map_err(cloud)?;
            match inner
                .ec2
                .wait_volume_state(&id, VolumeState::Available, VOLUME_READY_TIMEOUT)
                .await
            {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(cloud(e)),
            }
            inner.ec2.delete_volume(&id).await.map_err(cloud)?;
            info!(disk = disk_id, volume = %id, "staging volume detached and deleted");
        }
        inner.set_volume(disk_id, None)
    }

    pub fn digest_available(&self, snap: &SnapshotInfo) -> bool {
        self.inner.readable_source(&snap.id).is_some()
    }

    pub fn shutdown(&self) {
        for t in self.inner.tracked().values() {
            if !t.handle.is_done() {
                t.handle
                    .fail("the gateway stopped before EC2 completed the snapshot".into());
            }
        }
    }

    /// SHA-256 of a snapshot's content. EBS snapshot content is not readable here, but while
    /// the volume has not been written since the snapshot was taken it holds that content,
    /// which is the case for a checkpoint being acknowledged.
    pub async fn snapshot_digest(&self, snap: &SnapshotInfo) -> Result<[u8; 32], BackendError> {
        let volume = self.inner.readable_source(&snap.id);
        let Some(volume) = volume else {
            return Err(BackendError::Unsupported {
                disk: snap.disk_id.clone(),
                message: format!(
                    "the content of EBS snapshot {} cannot be read back here once the volume \
                     has changed",
                    snap.id
                ),
            });
        };
        let disk = snap.disk_id.clone();
        super::blocking(move || {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < volume.size() {
                let n = (volume.size() - off).min(buf.len() as u64) as usize;
                volume
                    .read_at(&mut buf[..n], off)
                    .map_err(|source| BackendError::Io {
                        disk: disk.clone(),
                        action: "read",
                        path: volume.path().to_path_buf(),
                        source,
                    })?;
                h.update(&buf[..n]);
                off += n as u64;
            }
            Ok(h.finalize().into())
        })
        .await
    }
}

impl Inner {
    fn volumes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VolumeRecord>> {
        self.volumes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.tracked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records durably that snapshot `id` never stands for a checkpoint.
    fn reject(&self, id: &SnapshotId) {
        let mut g = self.rejected.lock().unwrap_or_else(PoisonError::into_inner);
        g.insert(id.to_string());
        let path = self.dir.join("rejected.json");
        let json = serde_json::to_vec_pretty(&*g).unwrap_or_default();
        if let Err(e) = durable::atomic_write(&path, &json, 0o600) {
            warn!(path = %path.display(), error = %e, "cannot record a rejected snapshot");
        }
    }

    /// The volume snapshot `id` was taken of, while it still holds the snapshot's content.
    fn readable_source(&self, id: &str) -> Option<Arc<Volume>> {
        let source = self
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned();
        source.and_then(|(volume, generation)| {
            volume.upgrade().filter(|v| v.generation() == generation)
        })
    }

    fn remember_source(&self, snapshot: String, volume: &Arc<Volume>, generation: u64) {
        let mut g = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        // Entries of volumes that are gone or written since can never serve a digest again.
        g.retain(|_, (v, gen)| v.upgrade().is_some_and(|v| v.generation() == *gen));
        g.insert(snapshot, (Arc::downgrade(volume), generation));
    }

    fn invalidate_listing(&self) {
        let mut cache = self.listing.lock().unwrap_or_else(PoisonError::into_inner);
        self.listing_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *cache = None;
    }

    /// Records (or forgets) the volume of `disk_id` durably.
    fn set_volume(&self, disk_id: &str, record: Option<VolumeRecord>) -> Result<(), BackendError> {
        let mut g = self.volumes();
        match record {
            Some(r) => g.insert(disk_id.to_string(), r),
            None => g.remove(disk_id),
        };
        let path = self.dir.join("volumes.json");
        let json = serde_json::to_vec_pretty(&*g).unwrap_or_default();
        durable::atomic_write(&path, &json, 0o600).map_err(|source| BackendError::Io {
            disk: disk_id.into(),
            action: "write",
            path,
            source,
        })
    }

    /// The staging volume of `disk_id`.
    async fn volume_of(&self, disk_id: &str) -> Result<VolumeId, BackendError> {
        self.volumes()
            .get(disk_id)
            .and_then(|r| r.volume_id.clone())
            .map(VolumeId)
            .ok_or_else(|| BackendError::Unsupported {
                disk: disk_id.into(),
                message: "no staging volume".into(),
            })
    }

    /// Tags that scope everything to this gateway.
    fn base_tags_gateway(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_TAG_KEY.to_string(), MANAGED_TAG_VALUE.to_string()),
            (TAG_GATEWAY.to_string(), self.instance.to_string()),
        ])
    }

    fn base_tags(&self, disk_id: &str) -> BTreeMap<String, String> {
        let mut t = self.base_tags_gateway();
        t.insert(TAG_DISK.into(), disk_id.into());
        t
    }

    /// CreateSnapshot of `volume` for checkpoint `req`, tagged so that [`from_ec2`] reads it
    /// back; `replaces`: the failed snapshot this one takes again.
    async fn create_snapshot(
        &self,
        volume: &VolumeId,
        req: &SnapshotRequest,
        created_unix_ms: u64,
        size: u64,
        replaces: Option<&str>,
    ) -> Result<SnapshotId, sync_aws::AwsError> {
        let tags = self.snapshot_tags(req, created_unix_ms, size, replaces);
        let retaken = if replaces.is_some() { ", retaken" } else { "" };
        let description = description(&format!(
            "sync-gateway {} checkpoint {} (seq {}){retaken}",
            req.disk_id, req.label, req.checkpoint_seq
        ));
        self.ec2.create_snapshot(volume, &description, &tags).await
    }

    fn snapshot_tags(
        &self,
        req: &SnapshotRequest,
        created_unix_ms: u64,
        size: u64,
        replaces: Option<&str>,
    ) -> BTreeMap<String, String> {
        let mut t = self.base_tags(&req.disk_id);
        t.insert(TAG_LABEL.into(), tag_value(&req.label));
        t.insert(TAG_SEQ.into(), req.checkpoint_seq.to_string());
        t.insert(TAG_CREATED_MS.into(), created_unix_ms.to_string());
        t.insert(TAG_SIZE.into(), size.to_string());
        t.insert(
            "Name".into(),
            tag_value(&format!("{} {}", req.disk_id, req.label)),
        );
        if let Some(r) = replaces {
            t.insert(TAG_REPLACES.into(), r.into());
        }
        t
    }

    /// Polls until the snapshot settles: 1 s, then doubling to 30 s (real EBS snapshots take
    /// minutes; moto's are born completed).
    async fn follow(&self, t: &Tracked) {
        let first = t.handle.info().clone();
        let mut retries = 0;
        let mut round = 0u32;
        let mut failed_checks = 0u32;
        loop {
            let current = t.handle.current();
            let delay = Duration::from_secs(1 << round.min(5)).min(Duration::from_secs(30));
            tokio::time::sleep(delay).await;
            round += 1;
            let id = SnapshotId(current.id.clone());
            let found = match self
                .ec2
                .describe_snapshots(&SnapshotFilter::Ids(vec![id.clone()]))
                .await
            {
                Ok(v) => v,
                Err(e) if e.kind == ErrorKind::NotFound => {
                    t.handle.fail(format!("EBS snapshot {id} disappeared: {e}"));
                    return;
                }
                // Each check already retried the transient errors; a permission or request
                // error will not heal by itself, and a long outage must surface too. The
                // snapshot may still complete in EC2: it is then listed as completed.
                Err(e) if !e.kind.is_retryable() || failed_checks >= FOLLOW_FAILED_CHECKS => {
                    t.handle.fail(format!(
                        "cannot follow EBS snapshot {id} to completion: {e}"
                    ));
                    return;
                }
                Err(e) => {
                    failed_checks += 1;
                    warn!(snapshot = %id, error = %e, "cannot check snapshot progress; will retry");
                    continue;
                }
            };
            failed_checks = 0;
            let Some(s) = found.into_iter().next() else {
                continue;
            };
            match s.state {
                sync_aws::SnapshotState::Completed => {
                    info!(disk = %first.disk_id, snapshot = %id, "EBS snapshot completed");
                    t.handle.complete();
                    return;
                }
                sync_aws::SnapshotState::Error => {
                    let why = s.state_message.clone().unwrap_or_else(|| "error".into());
                    let same_content = t
                        .volume
                        .upgrade()
                        .filter(|v| v.generation() == t.generation);
                    match same_content {
                        Some(volume) if retries < SNAPSHOT_RETRIES => {
                            retries += 1;
                            round = 0;
                            warn!(disk = %first.disk_id, snapshot = %id, reason = %why, attempt = retries,
                                "EBS snapshot failed; taking it again (the volume is unchanged)");
                            match self.retake(&first, &volume, t.generation).await {
                                Ok(next) => {
                                    self.remember_source(next.id.clone(), &volume, t.generation);
                                    self.snapshots_retried
                                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    t.handle.replaced(next);
                                    if let Err(e) = self.ec2.delete_snapshot(&id).await {
                                        warn!(snapshot = %id, error = %e, "cannot delete the failed snapshot");
                                    }
                                    self.invalidate_listing();
                                }
                                Err(e) => {
                                    t.handle.fail(format!(
                                        "EBS snapshot {id} failed ({why}) and could not be taken again: {e}"
                                    ));
                                    return;
                                }
                            }
                        }
                        _ => {
                            warn!(disk = %first.disk_id, snapshot = %id, reason = %why,
                                "EBS snapshot failed; the volume has changed since, so the next checkpoint's snapshot replaces it");
                            t.handle.fail(format!("EBS snapshot {id} failed: {why}"));
                            return;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Takes a failed snapshot again from a volume that has not been written since.
    async fn retake(
        &self,
        first: &SnapshotInfo,
        volume: &Arc<Volume>,
        generation: u64,
    ) -> Result<SnapshotInfo, String> {
        let vol_id = self
            .volume_of(&first.disk_id)
            .await
            .map_err(|e| e.to_string())?;
        let req = SnapshotRequest {
            disk_id: first.disk_id.clone(),
            label: first.label.clone(),
            checkpoint_seq: first.checkpoint_seq,
        };
        let id = self
            .create_snapshot(
                &vol_id,
                &req,
                first.created_unix_ms,
                first.size_bytes,
                Some(&first.id),
            )
            .await
            .map_err(|e| e.to_string())?;
        if volume.generation() != generation {
            // A write raced the call: the new snapshot may hold later data. It carries the
            // `replaces` tag already, so it must go, or at least never be taken for the
            // checkpoint's content.
            self.reject(&id);
            if let Err(e) = self.ec2.delete_snapshot(&id).await {
                warn!(snapshot = %id, error = %e, "cannot delete a retaken snapshot that holds later data; it is recorded as rejected");
            }
            self.invalidate_listing();
            return Err("the volume was written while the snapshot was retaken".into());
        }
        Ok(SnapshotInfo {
            id: id.to_string(),
            state: SnapshotState::Pending,
            replaces: Some(first.id.clone()),
            ..first.clone()
        })
    }
}

/// A snapshot of ours, from its tags; `None` for one without them.
fn from_ec2(s: &sync_aws::SnapshotInfo) -> Option<SnapshotInfo> {
    let disk_id = s.tags.get(TAG_DISK)?.clone();
    let num = |k: &str| s.tags.get(k).and_then(|v| v.parse::<u64>().ok());
    let created_unix_ms = num(TAG_CREATED_MS)
        .or_else(|| {
            s.start_time
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
        })
        .unwrap_or(0);
    Some(SnapshotInfo {
        id: s.id.to_string(),
        disk_id,
        label: s.tags.get(TAG_LABEL).cloned().unwrap_or_default(),
        checkpoint_seq: num(TAG_SEQ).unwrap_or(0),
        created_unix_ms,
        created: rfc3339(created_unix_ms),
        size_bytes: num(TAG_SIZE)
            .or(s.volume_size_gib.map(|g| g * GIB))
            .unwrap_or(0),
        method: "ebs".into(),
        path: None,
        state: match s.state {
            sync_aws::SnapshotState::Completed => SnapshotState::Completed,
            sync_aws::SnapshotState::Error => SnapshotState::Failed,
            _ => SnapshotState::Pending,
        },
        replaces: s.tags.get(TAG_REPLACES).cloned(),
    })
}

/// ClientToken of one assignment's staging volume (≤ 64 ASCII characters).
fn client_token(instance: &str, disk_id: &str, nonce: u64) -> String {
    let h = Sha256::digest(format!("{instance}\n{disk_id}\n{nonce:016x}").as_bytes());
    format!("sgw-vol-{}", &hex::encode(h)[..40])
}

/// AMI name for a launch of `kind` from `snapshot`: unique per snapshot and kind, so a retried
/// RegisterImage finds the image the first attempt made. AMI names allow letters, digits and `()[] ./-'@_`.
fn ami_name(disk_id: &str, snapshot: &str, kind: &str) -> String {
    let clean: String = format!("sync-gateway {disk_id} {snapshot} {kind}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    clean.chars().take(128).collect()
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

fn rfc3339(unix_ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn load_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    match serde_json::from_str(&s) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "unreadable record skipped");
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_what_ec2_accepts() {
        let t = client_token("i-0123456789abcdef0", "web-01", 7);
        assert!(t.len() <= 64 && t.is_ascii(), "{t}");
        assert_eq!(t, client_token("i-0123456789abcdef0", "web-01", 7));
        assert_ne!(t, client_token("i-0123456789abcdef0", "web-02", 7));
        assert_ne!(t, client_token("i-0123456789abcdef0", "web-01", 8));
        assert_eq!(
            ami_name("web#1", "snap-0abc", "test"),
            "sync-gateway web_1 snap-0abc test"
        );
        assert_eq!(description(&"é".repeat(300)).chars().count(), 255);
        assert_eq!(tag_value("pass 3 {final}"), "pass 3 _final_");
        assert_eq!(tag_value(&"x".repeat(300)).len(), 256);
    }

    #[test]
    fn snapshots_are_read_back_from_their_tags() {
        let tags: BTreeMap<String, String> = [
            (TAG_DISK, "web-01"),
            (TAG_LABEL, "pass-2"),
            (TAG_SEQ, "42"),
            (TAG_CREATED_MS, "1700000000000"),
            (TAG_SIZE, "1048576"),
            (TAG_REPLACES, "snap-0old"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = sync_aws::SnapshotInfo {
            id: SnapshotId("snap-0new".into()),
            volume_id: None,
            state: sync_aws::SnapshotState::Error,
            progress: None,
            start_time: None,
            state_message: Some("internal".into()),
            volume_size_gib: Some(1),
            tags,
        };
        let info = from_ec2(&s).unwrap();
        assert_eq!(info.disk_id, "web-01");
        assert_eq!(info.checkpoint_seq, 42);
        assert_eq!(info.size_bytes, 1_048_576);
        assert_eq!(info.state, SnapshotState::Failed);
        assert!(info.stands_for("snap-0old") && info.stands_for("snap-0new"));
        assert_eq!(info.created, "2023-11-14T22:13:20Z");
        let untagged = sync_aws::SnapshotInfo {
            tags: BTreeMap::new(),
            ..s
        };
        assert!(from_ec2(&untagged).is_none());
    }
}
