//! The `aliyun` backend: the gateway is an ECS instance; each replicated disk is an ECS cloud
//! disk it creates and attaches to itself, each checkpoint an ECS snapshot, each launch a
//! custom image made from snapshots and an instance started from it. The logic is
//! [`CloudBackend`]'s; this is how ECS answers its calls:
//!
//! | call | ECS |
//! |---|---|
//! | create volume | CreateDisk (`cloud_essd` by default, PL, zone, tags incl. the client token, ClientToken), DescribeDisks until `Available` |
//! | attach | AttachDisk to the gateway's own instance, DescribeDisks until `In_use`; the device is `virtio-` + the disk id without `d-` under `device_dir` |
//! | snapshot | CreateSnapshot (tagged), DescribeSnapshots until `accomplished` |
//! | delete snapshot | DeleteSnapshot; `SnapshotCreatedImage` when an image holds it |
//! | launch | CreateImage (DiskDeviceMapping: `/dev/xvda` = boot disk's snapshot, `/dev/xvdb`… the others; BootMode), DescribeImages until `Available`, RunInstances (VSwitchId, SecurityGroupId, InstanceType) |
//! | release | DetachDisk, DescribeDisks until `Available`, DeleteDisk |
//!
//! Identity and credentials come from the metadata service in hardened mode: the instance
//! id, region and zone, the signed identity document for registration, and the RAM role's
//! STS credentials, refreshed before they expire. No key is ever configured.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sync_aliyun::credentials::CredentialsProvider;
use sync_aliyun::ecs::{
    CreateDisk, CreateImage, CreateSnapshot, DiskDeviceMapping, EcsClient, EcsConfig, EcsError,
    ErrorKind, Filter, RunInstances, SnapshotStatus, Tag,
};
use sync_aliyun::meta::{InstanceMetadata, MetaError, RamRoleCredentialsProvider, RefreshPolicy};
use sync_aliyun::settings::AliyunSettings;
use tokio::time::Instant;
use tracing::{info, warn};

use super::bootmode::BootMode;
use super::cloud::{
    CloudApi, CloudBackend, CloudError, CloudErrorKind, CloudSnapshotState, CloudSnapshotView,
    CloudVolume, LaunchRequest, Launched, Location, NewSnapshot, NewVolume, SnapshotQuery,
    TAG_LAUNCH,
};
use super::device::{self, DeviceError};
use super::{AliyunAccess, BackendError};

/// The `aliyun` backend.
pub type AliyunBackend = CloudBackend<AliyunApi>;

/// Smallest ESSD (PL1) and the size the gateway never goes below: the disk is at least the
/// source's size, rounded up to GiB.
const MIN_DISK_GIB: u64 = 20;
/// ECS allows 20 tags per resource; the gateway puts up to 8 of its own on a snapshot.
const MAX_CONFIGURED_TAGS: usize = 12;
/// Custom images from snapshots take minutes per disk; an hour only fails a stuck one.
const IMAGE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a resource just created may take to be listed.
const LISTING_LAG: Duration = Duration::from_secs(60);
/// How long start-up waits for the metadata service (on first boot it may come up after us).
const META_TIMEOUT: Duration = Duration::from_secs(60);

/// ECS as the [`CloudBackend`] calls it.
#[derive(Debug)]
pub struct AliyunApi {
    ecs: EcsClient,
    settings: AliyunSettings,
    location: Location,
    credentials: Arc<RamRoleCredentialsProvider>,
    /// The gateway's own vSwitch, the default for launches.
    own_vswitch: Option<String>,
}

impl AliyunBackend {
    /// Learns the instance's identity, region and zone from the metadata service, checks that
    /// its RAM role gives credentials, and builds the ECS client.
    pub async fn open(settings: AliyunSettings, data_dir: &Path) -> Result<Self, BackendError> {
        check_tags(&settings.tags)?;
        let setup = |what: &str, e: &(dyn std::error::Error + 'static)| {
            BackendError::Setup(format!(
                "aliyun backend: cannot {what} from the instance metadata service at {}: {}",
                settings.meta_endpoint,
                crate::cli::error_chain(e)
            ))
        };
        let meta = InstanceMetadata::new(&settings.meta_endpoint)
            .map_err(|e| setup("use the endpoint", &e))?;
        let doc = with_patience(|| meta.identity_document())
            .await
            .map_err(|e| setup("read the instance identity document", &e))?;
        let signature = with_patience(|| meta.identity_signature(None))
            .await
            .map_err(|e| setup("read the identity signature", &e))?;
        let credentials = Arc::new(RamRoleCredentialsProvider::new(
            meta.clone(),
            settings.ram_role.clone(),
            RefreshPolicy::default(),
        ));
        with_patience(|| credentials.credentials())
            .await
            .map_err(|e| setup("read the RAM role's credentials (is a role attached?)", &e))?;
        let own_vswitch = match &settings.vswitch_id {
            Some(v) => Some(v.clone()),
            None => match meta.vswitch_id().await {
                Ok(v) => Some(v),
                Err(e) => {
                    warn!(error = %e, "cannot read the gateway's vSwitch; launches need vswitch_id set");
                    None
                }
            },
        };
        let region = settings
            .region
            .clone()
            .unwrap_or_else(|| doc.region_id.clone());
        let mut config = EcsConfig::new(region.clone());
        if let Some(e) = &settings.ecs_endpoint {
            config = config.with_endpoint(e.clone());
        }
        let provider: Arc<dyn CredentialsProvider> = credentials.clone();
        let ecs = EcsClient::new(config, provider)
            .map_err(|e| BackendError::Setup(format!("aliyun backend: {e}")))?;
        info!(instance = %doc.instance_id, region = %region, zone = %doc.zone_id,
            account = doc.owner_account_id.as_deref().unwrap_or("?"), endpoint = ecs.endpoint(),
            "aliyun backend ready");
        let location = Location {
            region,
            zone: doc.zone_id.clone(),
            instance: doc.instance_id.clone(),
            identity: Some(crate::api::IdentityDocument {
                provider: "aliyun".into(),
                document: doc.raw,
                signature,
            }),
        };
        CloudBackend::new(
            AliyunApi {
                ecs,
                settings,
                location,
                credentials,
                own_vswitch,
            },
            data_dir,
        )
    }
}

/// Configured tags ECS would refuse are refused at start, not at the first snapshot.
fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), BackendError> {
    let bad = |why: String| Err(BackendError::Setup(format!("aliyun backend: tags: {why}")));
    if tags.len() > MAX_CONFIGURED_TAGS {
        return bad(format!(
            "{} configured, at most {MAX_CONFIGURED_TAGS} (ECS allows 20 per resource and the \
             gateway adds up to 8)",
            tags.len()
        ));
    }
    for key in tags.keys() {
        if key.is_empty()
            || key.chars().count() > 128
            || key.starts_with("aliyun")
            || key.starts_with("acs:")
            || key.contains("http://")
            || key.contains("https://")
        {
            return bad(format!(
                "key {key:?} is not one ECS accepts (1-128 characters, not starting with \
                 `aliyun` or `acs:`, no URL)"
            ));
        }
    }
    Ok(())
}

/// Retries a metadata call that fails transiently for up to [`META_TIMEOUT`].
async fn with_patience<T, F, Fut>(mut call: F) -> Result<T, MetaError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MetaError>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(250);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && started.elapsed() + pause < META_TIMEOUT => {
                warn!(error = %e, "instance metadata not available yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

impl From<EcsError> for CloudError {
    fn from(e: EcsError) -> Self {
        let kind = match e.kind() {
            ErrorKind::NotFound => CloudErrorKind::NotFound,
            // An image, or a disk created from the image (an instance's), holds it.
            _ if matches!(
                e.code(),
                Some("SnapshotCreatedImage" | "SnapshotCreatedDisk")
            ) =>
            {
                CloudErrorKind::InUse
            }
            k if k.is_retryable() => CloudErrorKind::Transient,
            _ => CloudErrorKind::Permanent,
        };
        CloudError {
            kind,
            code: e.code().map(str::to_string),
            error: Box::new(e),
        }
    }
}

fn not_found(what: &str, id: &str) -> CloudError {
    CloudError {
        kind: CloudErrorKind::NotFound,
        code: None,
        error: format!("{what} {id} does not exist").into(),
    }
}

impl AliyunApi {
    /// What OSS uploads (diagnostics) sign with.
    pub fn access(&self) -> AliyunAccess {
        AliyunAccess {
            region: self.location.region.clone(),
            credentials: self.credentials.clone(),
        }
    }

    /// The configured tags under the gateway's (which win), as ECS accepts them.
    fn tags(&self, own: &BTreeMap<String, String>) -> Vec<Tag> {
        let mut all = self.settings.tags.clone();
        all.extend(own.clone());
        all.into_iter()
            .map(|(k, v)| Tag::new(k, tag_value(&v)))
            .collect()
    }

    async fn disk(&self, id: &str) -> Result<sync_aliyun::ecs::Disk, CloudError> {
        self.ecs
            .describe_disks(&Filter::ids([id]))
            .await?
            .into_iter()
            .find(|d| d.disk_id == id)
            .ok_or_else(|| not_found("disk", id))
    }

    /// Polls the disk until `done` says so (`Ok(true)`), fails, or `timeout` passes.
    async fn wait_disk(
        &self,
        id: &str,
        want: &str,
        timeout: Duration,
        done: impl Fn(&sync_aliyun::ecs::Disk) -> Result<bool, String>,
    ) -> Result<(), CloudError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            let d = self.disk(id).await?;
            match done(&d) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(why) => return Err(CloudError::permanent(format!("disk {id}: {why}"))),
            }
            if started.elapsed() >= timeout {
                return Err(CloudError {
                    kind: CloudErrorKind::Transient,
                    code: None,
                    error: format!(
                        "disk {id} is still {} after {timeout:?}, waiting for {want}",
                        d.status
                    )
                    .into(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// An image of ours for these snapshots and this kind of launch that is not failed, if
    /// any, and how many failed (a new attempt needs a new name: names are unique).
    async fn existing_image(
        &self,
        req: &LaunchRequest,
    ) -> Result<(Option<String>, usize), CloudError> {
        let images = self
            .ecs
            .describe_images(&Filter::tags(self.tags(&req.tags)))
            .await?;
        let failed = |s: &str| s == "CreateFailed" || s == "UnAvailable";
        let failures = images.iter().filter(|i| failed(&i.status)).count();
        let usable = images
            .into_iter()
            .find(|i| !failed(&i.status))
            .map(|i| i.image_id);
        Ok((usable, failures))
    }

    async fn wait_image(&self, id: &str) -> Result<(), CloudError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            let image = self
                .ecs
                .describe_images(&Filter::ids([id]))
                .await?
                .into_iter()
                .find(|i| i.image_id == id);
            match image.as_ref().map(|i| i.status.as_str()) {
                Some("Available") => return Ok(()),
                Some("CreateFailed") | Some("UnAvailable") => {
                    return Err(CloudError::permanent(format!(
                        "image {id} could not be created ({})",
                        image.map(|i| i.status).unwrap_or_default()
                    )))
                }
                _ => {}
            }
            if started.elapsed() >= IMAGE_TIMEOUT {
                return Err(CloudError::permanent(format!(
                    "image {id} is not available after {IMAGE_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(15));
        }
    }
}

impl CloudApi for AliyunApi {
    const PROVIDER: &'static str = "aliyun";
    const METHOD: &'static str = "ecs";
    const SNAPSHOT: &'static str = "ECS snapshot";
    /// A system disk and 16 data disks.
    const MAX_LAUNCH_DISKS: usize = 17;

    fn location(&self) -> &Location {
        &self.location
    }

    fn retry_stats(&self) -> sync_common::retry::RetryStatsSnapshot {
        self.ecs.retry_stats().snapshot()
    }

    fn device_dir(&self) -> &Path {
        &self.settings.device_dir
    }

    fn device_name(&self, volume: &str) -> Result<String, DeviceError> {
        device::aliyun_by_id_name(volume)
    }

    fn nvme_suffix(&self, volume: &str) -> Option<String> {
        device::aliyun_nvme_suffix(volume).ok()
    }

    fn boot_mode(&self) -> Option<BootMode> {
        BootMode::configured(self.settings.boot_mode)
    }

    fn tag_value(&self, value: &str) -> String {
        tag_value(value)
    }

    async fn create_volume(&self, req: &NewVolume) -> Result<String, CloudError> {
        let mut create = CreateDisk::new(&self.location.zone, req.size_gib.max(MIN_DISK_GIB));
        create.category = self.settings.disk_category.clone();
        create.performance_level = self.settings.performance_level.clone();
        create.name = Some(resource_name(&format!("sync-gateway-{}", req.disk_id)));
        create.description = Some(description(&format!(
            "sync-gateway staging disk of {}",
            req.disk_id
        )));
        create.tags = self.tags(&req.tags);
        create.client_token = Some(req.client_token.clone());
        let id = self.ecs.create_disk(&create).await?;
        // A disk just created may not be listed yet; the caller's next look must find it.
        let started = Instant::now();
        loop {
            match self.disk(&id).await {
                Err(e) if e.kind == CloudErrorKind::NotFound && started.elapsed() < LISTING_LAG => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) if e.kind == CloudErrorKind::NotFound => return Err(e),
                _ => return Ok(id),
            }
        }
    }

    async fn describe_volume(&self, id: &str) -> Result<CloudVolume, CloudError> {
        let d = self.disk(id).await?;
        let attached = matches!(d.status.as_str(), "Attaching" | "In_use" | "Detaching");
        Ok(CloudVolume {
            size_gib: d.size_gib,
            creating: d.status == "Creating",
            attachments: match (&d.instance_id, attached) {
                (Some(i), true) if !i.is_empty() => {
                    vec![(i.clone(), d.device.clone().unwrap_or_default())]
                }
                _ => Vec::new(),
            },
        })
    }

    async fn find_volumes(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<String>, CloudError> {
        let tags = tags
            .iter()
            .map(|(k, v)| Tag::new(k.clone(), tag_value(v)))
            .collect();
        let found = self.ecs.describe_disks(&Filter::tags(tags)).await?;
        Ok(found
            .into_iter()
            .filter(|d| d.status != "Deleting" && d.status != "Deleted")
            .map(|d| d.disk_id)
            .collect())
    }

    async fn wait_created(&self, id: &str, timeout: Duration) -> Result<(), CloudError> {
        self.wait_disk(id, "Available", timeout, |d| {
            Ok(d.status != "Creating" && d.status != "Pending")
        })
        .await
    }

    async fn attach_volume(&self, id: &str) -> Result<String, CloudError> {
        self.ecs.attach_disk(&self.location.instance, id).await?;
        Ok("(assigned by ECS)".into())
    }

    async fn wait_attached(&self, id: &str, timeout: Duration) -> Result<(), CloudError> {
        let me = self.location.instance.as_str();
        self.wait_disk(id, "In_use", timeout, |d| {
            let mine = d.instance_id.as_deref() == Some(me);
            match d.status.as_str() {
                "In_use" if mine => Ok(true),
                "Attaching" if mine => Ok(false),
                // AttachDisk accepted, not yet shown: the wait's timeout bounds it.
                "Available" => Ok(false),
                other => Err(format!(
                    "is {other} (instance {}) while attaching to {me}",
                    d.instance_id.as_deref().unwrap_or("none")
                )),
            }
        })
        .await
    }

    async fn detach_volume(&self, id: &str, timeout: Duration) -> Result<(), CloudError> {
        let d = match self.disk(id).await {
            Ok(d) => d,
            Err(e) if e.kind == CloudErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if d.status == "In_use" || d.status == "Attaching" {
            let instance = d.instance_id.clone().unwrap_or_default();
            match self.ecs.detach_disk(&instance, id).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        match self
            .wait_disk(id, "Available", timeout, |d| Ok(d.status == "Available"))
            .await
        {
            Err(e) if e.kind == CloudErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    async fn delete_volume(&self, id: &str) -> Result<(), CloudError> {
        match self.ecs.delete_disk(id).await {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => Ok(other?),
        }
    }

    async fn create_snapshot(&self, req: &NewSnapshot) -> Result<String, CloudError> {
        let mut create = CreateSnapshot::new(&req.volume);
        create.name = Some(resource_name(&format!("sync-gateway-{}", req.name)));
        create.description = Some(description(&req.description));
        create.tags = self.tags(&req.tags);
        Ok(self.ecs.create_snapshot(&create).await?)
    }

    async fn describe_snapshots(
        &self,
        query: &SnapshotQuery,
    ) -> Result<Vec<CloudSnapshotView>, CloudError> {
        let filter = match query {
            SnapshotQuery::Ids(ids) => Filter::ids(ids.iter().cloned()),
            SnapshotQuery::Tags(t) => Filter::tags(
                t.iter()
                    .map(|(k, v)| Tag::new(k.clone(), tag_value(v)))
                    .collect(),
            ),
        };
        let found = self.ecs.describe_snapshots(&filter, None).await?;
        Ok(found
            .into_iter()
            .map(|s| CloudSnapshotView {
                state: match s.status {
                    SnapshotStatus::Accomplished => CloudSnapshotState::Completed,
                    SnapshotStatus::Failed => CloudSnapshotState::Failed(None),
                    _ => CloudSnapshotState::Pending,
                },
                started_unix_ms: s.creation_time.as_deref().and_then(parse_time),
                size_gib: s.source_disk_size_gib,
                tags: s.tags.into_iter().map(|t| (t.key, t.value)).collect(),
                id: s.snapshot_id,
            })
            .collect())
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        match self.ecs.delete_snapshot(id).await {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => Ok(other?),
        }
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<Launched, CloudError> {
        let disk = req.disk_id.as_str();
        let security_group = self.settings.security_group_id.clone().ok_or_else(|| {
            CloudError::permanent(
                "launches need a security group: set security_group_id in [backend]".into(),
            )
        })?;
        let vswitch = self.own_vswitch.clone().ok_or_else(|| {
            CloudError::permanent(
                "launches need a vSwitch: set vswitch_id in [backend] (the gateway's own could \
                 not be read from metadata)"
                    .into(),
            )
        })?;
        let image = match self.existing_image(req).await? {
            (Some(id), _) => {
                info!(disk, image = %id, "reusing the image made for these snapshots");
                id
            }
            (None, failures) => {
                let name = match failures {
                    0 => req.image_name.clone(),
                    n => format!("{} retry {n}", req.image_name),
                };
                let mappings = req
                    .snapshots
                    .iter()
                    .zip('a'..='z')
                    .map(|(s, c)| DiskDeviceMapping {
                        snapshot_id: s.clone(),
                        device: format!("/dev/xvd{c}"),
                        disk_type: Some(if c == 'a' { "system" } else { "data" }.into()),
                    })
                    .collect();
                let id = self
                    .ecs
                    .create_image(&CreateImage {
                        name: resource_name(&name),
                        mappings,
                        boot_mode: Some(
                            match req.boot_mode {
                                BootMode::Uefi => "UEFI",
                                BootMode::LegacyBios => "BIOS",
                            }
                            .into(),
                        ),
                        architecture: Some("x86_64".into()),
                        description: Some(description(&req.description)),
                        tags: self.tags(&req.tags),
                        client_token: Some(token_of(&name)),
                    })
                    .await?;
                info!(disk, image = %id, snapshot = %req.snapshots[0],
                    boot_mode = req.boot_mode.as_str(), "custom image creating");
                id
            }
        };
        self.wait_image(&image).await?;
        let kind = req.tags.get(TAG_LAUNCH).cloned().unwrap_or_default();
        let instance = self
            .ecs
            .run_instances(&RunInstances {
                image_id: image.clone(),
                instance_type: self.settings.instance_type.clone(),
                vswitch_id: vswitch,
                security_group_id: security_group,
                name: Some(resource_name(&format!("{disk}-{kind}"))),
                description: Some(description(&req.description)),
                system_disk_category: Some(self.settings.system_disk_category.clone()),
                tags: self.tags(&req.tags),
                client_token: Some(req.client_token.clone()),
            })
            .await?;
        let state = match self.instance_state(&instance).await {
            Ok(s) => s,
            Err(e) => {
                warn!(instance = %instance, error = %e, "cannot read the new instance's state");
                "pending".into()
            }
        };
        Ok(Launched {
            image_id: image,
            instance_id: instance,
            state,
        })
    }

    async fn instance_state(&self, id: &str) -> Result<String, CloudError> {
        self.ecs
            .describe_instances(&Filter::ids([id]))
            .await?
            .into_iter()
            .find(|i| i.instance_id == id)
            .map(|i| i.status.to_ascii_lowercase())
            .ok_or_else(|| not_found("instance", id))
    }
}

/// ECS tag values: up to 128 characters, not starting with `aliyun` or `acs:`, without
/// `http://` or `https://`.
fn tag_value(s: &str) -> String {
    let mut v = s
        .replace("http://", "http_//")
        .replace("https://", "https_//");
    if v.starts_with("aliyun") || v.starts_with("acs:") {
        v.insert(0, '_');
    }
    v.chars().take(128).collect()
}

/// ECS names (disks, snapshots, images, instances): 2–128 characters, starting with a letter,
/// of letters, digits and `.:_-`; snapshot names may not start with `auto`.
fn resource_name(s: &str) -> String {
    let mut n: String = s
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || ".:_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !n.starts_with(|c: char| c.is_ascii_alphabetic()) || n.starts_with("auto") {
        n.insert_str(0, "sgw-");
    }
    while n.chars().count() < 2 {
        n.push('_');
    }
    n.chars().take(128).collect()
}

/// ECS descriptions: 2–256 characters, not starting with `http://` or `https://`.
fn description(s: &str) -> String {
    let mut d: String = s.chars().take(256).collect();
    if d.starts_with("http") {
        d.insert(0, '_');
        d = d.chars().take(256).collect();
    }
    while d.chars().count() < 2 {
        d.push('_');
    }
    d
}

/// A ClientToken (≤ 64 ASCII) from a name: the same launch retried makes one image.
fn token_of(name: &str) -> String {
    format!(
        "sgw-img-{}",
        &hex::encode(Sha256::digest(name.as_bytes()))[..40]
    )
}

/// ECS times (`2024-05-01T08:00:00Z`, sometimes without seconds) in ms since the epoch.
fn parse_time(s: &str) -> Option<u64> {
    use time::format_description::well_known::Rfc3339;
    let parse = |t: &str| time::OffsetDateTime::parse(t, &Rfc3339).ok();
    let t = parse(s).or_else(|| parse(&format!("{}:00Z", s.strip_suffix('Z')?)))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tags_are_what_ecs_accepts() {
        assert_eq!(tag_value("aliyun-x"), "_aliyun-x");
        assert_eq!(tag_value("see https://x"), "see https_//x");
        assert_eq!(tag_value(&"é".repeat(300)).chars().count(), 128);
        assert_eq!(
            resource_name("sync-gateway web#1 s-abc test"),
            "sync-gateway-web-1-s-abc-test"
        );
        assert_eq!(resource_name("1st"), "sgw-1st");
        assert_eq!(resource_name("automatic"), "sgw-automatic");
        assert_eq!(resource_name(&"x".repeat(300)).len(), 128);
        assert_eq!(description("h"), "h_");
        assert_eq!(description("https://x"), "_https://x");
        let t = token_of("sync-gateway d s-1 test");
        assert!(t.len() <= 64 && t.is_ascii());
        assert_eq!(t, token_of("sync-gateway d s-1 test"));
    }

    #[test]
    fn ecs_times_parse() {
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13Z"), Some(1_699_999_980_000));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn snapshot_in_use_is_told_apart() {
        let e = EcsError::Api {
            action: "DeleteSnapshot".into(),
            status: 403,
            code: "SnapshotCreatedImage".into(),
            message: "used".into(),
            request_id: "r".into(),
            kind: ErrorKind::classify(403, "SnapshotCreatedImage"),
        };
        assert_eq!(CloudError::from(e).kind, CloudErrorKind::InUse);
        let e = EcsError::Api {
            action: "DeleteSnapshot".into(),
            status: 403,
            code: "SnapshotCreatedDisk".into(),
            message: "a disk was created from it".into(),
            request_id: "r".into(),
            kind: ErrorKind::classify(403, "SnapshotCreatedDisk"),
        };
        assert_eq!(CloudError::from(e).kind, CloudErrorKind::InUse);
        let e = EcsError::Api {
            action: "DescribeDisks".into(),
            status: 404,
            code: "InvalidDiskId.NotFound".into(),
            message: "gone".into(),
            request_id: "r".into(),
            kind: ErrorKind::classify(404, "InvalidDiskId.NotFound"),
        };
        assert_eq!(CloudError::from(e).kind, CloudErrorKind::NotFound);
    }
}
