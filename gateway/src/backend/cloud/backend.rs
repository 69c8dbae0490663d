//! [`CloudBackend`]: volumes, snapshots and launches on any [`CloudApi`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{info, warn};

use super::super::bootmode::{self, BootMode};
use super::super::{
    device, BackendError, LaunchDisk, LaunchInfo, Recovered, Snapshot, SnapshotInfo,
    SnapshotRequest, SnapshotState, Volume,
};
use super::*;
use crate::durable;

mod follow;
mod launch;

const GIB: u64 = 1 << 30;
/// A new volume is ready within seconds; 5 minutes only fails a stuck one.
const VOLUME_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Attachments complete within seconds and udev names the device right after.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(300);
const DEVICE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a snapshot listing is reused: status reports list every few seconds, and a
/// describe call per report would eat the account's API budget for nothing.
const LISTING_TTL: Duration = Duration::from_secs(15);
/// How long a launch's instance state is reused before it is described again.
const LAUNCH_STATE_TTL: Duration = Duration::from_secs(30);
/// Times a failed snapshot is taken again before it is reported failed for good.
const SNAPSHOT_RETRIES: u32 = 3;
/// Progress checks in a row that may fail (each after its own retries) before a followed
/// snapshot is reported failed: about half an hour of cloud trouble.
const FOLLOW_FAILED_CHECKS: u32 = 20;

/// A cloud backend. Cheap to clone.
#[derive(Debug)]
pub struct CloudBackend<A: CloudApi> {
    inner: Arc<Inner<A>>,
}

impl<A: CloudApi> Clone for CloudBackend<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<A> {
    api: A,
    /// `DATA_DIR/PROVIDER`.
    dir: PathBuf,
    volumes: Mutex<BTreeMap<String, VolumeRecord>>,
    /// Snapshots this process follows to completion, by their first id.
    tracked: Mutex<HashMap<String, Tracked>>,
    listing: Mutex<Option<(Instant, Vec<SnapshotInfo>)>>,
    /// Bumped by every invalidation: a listing fetched across one is not cached.
    listing_epoch: AtomicU64,
    /// Retaken snapshots checked to hold their checkpoint's content (`retakes.json`). A
    /// snapshot tagged `replaces` that is not in here (the gateway stopped between taking and
    /// checking it, or it held later data) never stands for a checkpoint.
    confirmed: Mutex<BTreeSet<String>>,
    launch_states: Mutex<HashMap<String, (Instant, String)>>,
    /// Snapshot id → the volume it was taken of and the volume's write generation then: while
    /// that is unchanged, the volume holds the snapshot's content (see `snapshot_digest`).
    sources: Mutex<HashMap<String, (Weak<Volume>, u64)>>,
    snapshots_retried: AtomicU64,
}

#[derive(Debug, Clone)]
struct Tracked {
    handle: Arc<CloudSnapshot>,
    /// The volume and its write generation at initiation: while it is unchanged the volume
    /// still holds the snapshot's content.
    volume: Weak<Volume>,
    generation: u64,
}

/// What `volumes.json` records per disk. The record is written before the create call, with
/// the client token only, so that a crash in between finds the volume again by its token;
/// finalize removes it, so that assigning the disk again makes a new volume under a new token
/// (the cloud would answer a reused token with the deleted volume).
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

impl<A: CloudApi> CloudBackend<A> {
    /// A backend on `api`, with its records under `DATA_DIR/PROVIDER`.
    pub fn new(api: A, data_dir: &Path) -> Result<Self, BackendError> {
        let dir = data_dir.join(A::PROVIDER);
        durable::create_dir_all_durable(&dir).map_err(|source| BackendError::Io {
            disk: "*".into(),
            action: "create",
            path: dir.clone(),
            source,
        })?;
        // An unreadable record stops the start: going on without it could put an empty
        // volume under a disk's replicated state.
        let volumes = load_record(&dir.join("volumes.json"))?;
        let confirmed = load_record(&dir.join("retakes.json"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                api,
                dir,
                volumes: Mutex::new(volumes),
                tracked: Mutex::default(),
                listing: Mutex::default(),
                listing_epoch: AtomicU64::new(0),
                confirmed: Mutex::new(confirmed),
                launch_states: Mutex::default(),
                sources: Mutex::default(),
                snapshots_retried: AtomicU64::new(0),
            }),
        })
    }

    /// The cloud client.
    pub fn api(&self) -> &A {
        &self.inner.api
    }

    pub fn identity(&self) -> Option<crate::api::IdentityDocument> {
        self.inner.api.location().identity.clone()
    }

    pub fn cloud_status(&self) -> crate::api::CloudStatus {
        let stats = self.inner.api.retry_stats();
        let loc = self.inner.api.location();
        crate::api::CloudStatus {
            provider: A::PROVIDER.into(),
            region: loc.region.clone(),
            availability_zone: loc.zone.clone(),
            instance_id: loc.instance.clone(),
            api_retries: stats.retries,
            api_throttled: stats.throttled,
            api_last_error: stats.last_error,
            snapshots_retried: self.inner.snapshots_retried.load(Ordering::Relaxed),
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
        let api = &inner.api;
        let cloud = |e| BackendError::cloud(disk_id, e);
        let size_gib = size.div_ceil(GIB).max(1);
        let recorded = inner.volumes().get(disk_id).cloned();
        let (token, known) = match recorded {
            Some(r) => (r.client_token, r.volume_id),
            None => {
                // Not recorded, yet the cloud may hold this disk's volume: the record was lost
                // (restored data directory, hand edit). Its data belongs to the disk; a second
                // empty volume would silently replace it.
                let found = api
                    .find_volumes(&inner.base_tags(disk_id))
                    .await
                    .map_err(cloud)?;
                if found.len() > 1 {
                    return Err(BackendError::Unsupported {
                        disk: disk_id.into(),
                        message: format!(
                            "several volumes of this disk exist but none is recorded: {}; \
                             delete the stale ones, or record the right one in {}",
                            found.join(", "),
                            inner.dir.join("volumes.json").display()
                        ),
                    });
                }
                let token = client_token(&api.location().instance, disk_id, rand::random());
                if let Some(v) = found.first() {
                    warn!(disk = disk_id, volume = %v, "adopting this disk's unrecorded staging volume");
                }
                inner.set_volume(
                    disk_id,
                    Some(VolumeRecord {
                        client_token: token.clone(),
                        volume_id: found.first().cloned(),
                        device: PathBuf::new(),
                        size_bytes: size,
                    }),
                )?;
                (token, found.into_iter().next())
            }
        };
        let id = match known {
            // A volume that held this disk's replicated data: never silently replace it with
            // an empty one under the disk's durable state.
            Some(v) => v,
            None => api
                .create_volume(&NewVolume {
                    disk_id: disk_id.into(),
                    size_gib,
                    client_token: token.clone(),
                    tags: {
                        let mut t = inner.base_tags(disk_id);
                        t.insert(TAG_CLIENT_TOKEN.into(), token.clone());
                        t
                    },
                })
                .await
                .map_err(cloud)?,
        };
        let vol = match api.describe_volume(&id).await {
            Ok(v) => v,
            Err(e) if e.kind == CloudErrorKind::NotFound => {
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
                path: PathBuf::from(&id),
                found: vol.size_gib * GIB,
                expected: size,
            });
        }
        let me = &api.location().instance;
        if let Some((other, dev)) = vol.attachments.iter().find(|(i, _)| i != me) {
            return Err(BackendError::Unsupported {
                disk: disk_id.into(),
                message: format!(
                    "staging volume {id} is attached to {other} ({dev}), not to this gateway {me}"
                ),
            });
        }
        if vol.creating {
            api.wait_created(&id, VOLUME_READY_TIMEOUT)
                .await
                .map_err(cloud)?;
        }
        if vol.attachments.is_empty() {
            let dev = api.attach_volume(&id).await.map_err(cloud)?;
            info!(disk = disk_id, volume = %id, device = %dev, "staging volume attaching");
        }
        api.wait_attached(&id, ATTACH_TIMEOUT)
            .await
            .map_err(cloud)?;
        let device_error = |error| BackendError::Device {
            disk: disk_id.into(),
            error,
        };
        let name = api.device_name(&id).map_err(device_error)?;
        let nvme = api.nvme_suffix(&id);
        let path =
            device::wait_for_device(api.device_dir(), &name, nvme.as_deref(), DEVICE_TIMEOUT)
                .await
                .map_err(device_error)?;
        let (p, disk) = (path.clone(), disk_id.to_string());
        let volume = super::super::blocking(move || {
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
                volume_id: Some(id.clone()),
                device: path.clone(),
                size_bytes: size,
            }),
        )?;
        info!(disk = disk_id, volume = %id, device = %path.display(), size_gib, "staging volume ready");
        Ok(volume)
    }

    /// Creates a snapshot of the (durable) volume; completion is followed in the background.
    pub async fn begin_snapshot(
        &self,
        volume: Arc<Volume>,
        req: SnapshotRequest,
    ) -> Result<Snapshot, BackendError> {
        let inner = &self.inner;
        let vol_id = inner.volume_of(&req.disk_id)?;
        let generation = volume.generation();
        let created_unix_ms = crate::server::disk::unix_ms();
        let id = inner
            .create_snapshot(&vol_id, &req, created_unix_ms, volume.size(), None)
            .await
            .map_err(|e| BackendError::cloud(&req.disk_id, e))?;
        let info = SnapshotInfo {
            id: id.clone(),
            disk_id: req.disk_id.clone(),
            label: req.label.clone(),
            checkpoint_seq: req.checkpoint_seq,
            created_unix_ms,
            created: rfc3339(created_unix_ms),
            size_bytes: volume.size(),
            method: A::METHOD.into(),
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
            "{} initiated", A::SNAPSHOT);
        Ok(Snapshot::Cloud(handle))
    }

    /// Follows `t` until the cloud completes it, retrying a failed one while the volume still
    /// holds its content.
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
        let cached = lock(&inner.listing)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < LISTING_TTL)
            .map(|(_, v)| v.clone());
        let all = match cached {
            Some(v) => v,
            None => {
                let epoch = inner.listing_epoch.load(Ordering::SeqCst);
                let found = inner
                    .api
                    .describe_snapshots(&SnapshotQuery::Tags(inner.base_tags_gateway()))
                    .await
                    .map_err(|e| BackendError::cloud(disk_id.unwrap_or("*"), e))?;
                let confirmed = lock(&inner.confirmed).clone();
                let mut v: Vec<SnapshotInfo> = found
                    .iter()
                    .filter_map(|s| from_cloud(s, A::METHOD))
                    .map(|mut s| {
                        if s.replaces.is_some() && !confirmed.contains(&s.id) {
                            s.replaces = None;
                            s.state = SnapshotState::Failed;
                        }
                        s
                    })
                    .collect();
                v.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
                let mut cache = lock(&inner.listing);
                if inner.listing_epoch.load(Ordering::SeqCst) == epoch {
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

    /// Deletes a snapshot; a pending one is refused (its checkpoint may still need it).
    pub async fn delete_snapshot(&self, info: &SnapshotInfo) -> Result<(), BackendError> {
        if info.state == SnapshotState::Pending {
            return Err(BackendError::SnapshotPending {
                disk: info.disk_id.clone(),
                snapshot: info.id.clone(),
            });
        }
        match self.inner.api.delete_snapshot(&info.id).await {
            Ok(()) => {}
            // An image (a launch) is made of it: the cloud keeps it while the image exists.
            Err(e) if e.kind == CloudErrorKind::InUse => {
                return Err(BackendError::SnapshotInUse {
                    disk: info.disk_id.clone(),
                    snapshot: info.id.clone(),
                    by: e.to_string(),
                })
            }
            Err(e) => return Err(BackendError::cloud(&info.disk_id, e)),
        }
        self.inner.invalidate_listing();
        lock(&self.inner.sources).remove(&info.id);
        Ok(())
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
            }) => Some(v),
            // Recorded before the create answered: the token finds what it made.
            Some(r) => inner
                .api
                .find_volumes(&BTreeMap::from([(
                    TAG_CLIENT_TOKEN.to_string(),
                    r.client_token.clone(),
                )]))
                .await
                .map_err(cloud)?
                .into_iter()
                .next(),
            None => None,
        };
        if let Some(id) = id {
            // Never detach (and delete) a volume some other instance holds.
            let me = &inner.api.location().instance;
            match inner.api.describe_volume(&id).await {
                Ok(v) => {
                    if let Some((other, dev)) = v.attachments.iter().find(|(i, _)| i != me) {
                        return Err(BackendError::Unsupported {
                            disk: disk_id.into(),
                            message: format!(
                                "staging volume {id} is attached to {other} ({dev}), not to \
                                 this gateway {me}; it is left alone"
                            ),
                        });
                    }
                }
                Err(e) if e.kind == CloudErrorKind::NotFound => {}
                Err(e) => return Err(cloud(e)),
            }
            inner
                .api
                .detach_volume(&id, VOLUME_READY_TIMEOUT)
                .await
                .map_err(cloud)?;
            inner.api.delete_volume(&id).await.map_err(cloud)?;
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
                t.handle.fail(format!(
                    "the gateway stopped before the cloud completed the {}",
                    A::SNAPSHOT
                ));
            }
        }
    }

    /// SHA-256 of a snapshot's content. Cloud snapshot content is not readable here, but
    /// while the volume has not been written since the snapshot was taken it holds that
    /// content, which is the case for a checkpoint being acknowledged.
    pub async fn snapshot_digest(&self, snap: &SnapshotInfo) -> Result<[u8; 32], BackendError> {
        let Some(volume) = self.inner.readable_source(&snap.id) else {
            return Err(BackendError::Unsupported {
                disk: snap.disk_id.clone(),
                message: format!(
                    "the content of {} {} cannot be read back here once the volume has changed",
                    A::SNAPSHOT,
                    snap.id
                ),
            });
        };
        let disk = snap.disk_id.clone();
        super::super::blocking(move || {
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

impl<A: CloudApi> Inner<A> {
    fn volumes(&self) -> MutexGuard<'_, BTreeMap<String, VolumeRecord>> {
        lock(&self.volumes)
    }

    fn tracked(&self) -> MutexGuard<'_, HashMap<String, Tracked>> {
        lock(&self.tracked)
    }

    /// Records durably that retaken snapshot `id` holds its checkpoint's content.
    fn confirm(&self, id: &str) -> std::io::Result<()> {
        let mut g = lock(&self.confirmed);
        g.insert(id.to_string());
        let json = serde_json::to_vec_pretty(&*g).unwrap_or_default();
        let written = durable::atomic_write(&self.dir.join("retakes.json"), &json, 0o600);
        if written.is_err() {
            g.remove(id);
        }
        written
    }

    /// The volume snapshot `id` was taken of, while it still holds the snapshot's content.
    fn readable_source(&self, id: &str) -> Option<Arc<Volume>> {
        let source = lock(&self.sources).get(id).cloned();
        source.and_then(|(volume, generation)| {
            volume.upgrade().filter(|v| v.generation() == generation)
        })
    }

    fn remember_source(&self, snapshot: String, volume: &Arc<Volume>, generation: u64) {
        let mut g = lock(&self.sources);
        // Entries of volumes that are gone or written since can never serve a digest again.
        g.retain(|_, (v, gen)| v.upgrade().is_some_and(|v| v.generation() == *gen));
        g.insert(snapshot, (Arc::downgrade(volume), generation));
    }

    fn invalidate_listing(&self) {
        let mut cache = lock(&self.listing);
        self.listing_epoch.fetch_add(1, Ordering::SeqCst);
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
    fn volume_of(&self, disk_id: &str) -> Result<String, BackendError> {
        self.volumes()
            .get(disk_id)
            .and_then(|r| r.volume_id.clone())
            .ok_or_else(|| BackendError::Unsupported {
                disk: disk_id.into(),
                message: "no staging volume".into(),
            })
    }

    /// Tags that scope everything to this gateway.
    fn base_tags_gateway(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (TAG_MANAGED.to_string(), TAG_MANAGED_VALUE.to_string()),
            (
                TAG_GATEWAY.to_string(),
                self.api.location().instance.clone(),
            ),
        ])
    }

    fn base_tags(&self, disk_id: &str) -> BTreeMap<String, String> {
        let mut t = self.base_tags_gateway();
        t.insert(TAG_DISK.into(), disk_id.into());
        t
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A snapshot of ours, from its tags; `None` for one without them.
fn from_cloud(s: &CloudSnapshotView, method: &str) -> Option<SnapshotInfo> {
    let disk_id = s.tags.get(TAG_DISK)?.clone();
    let num = |k: &str| s.tags.get(k).and_then(|v| v.parse::<u64>().ok());
    let created_unix_ms = num(TAG_CREATED_MS).or(s.started_unix_ms).unwrap_or(0);
    Some(SnapshotInfo {
        id: s.id.clone(),
        disk_id,
        label: s.tags.get(TAG_LABEL).cloned().unwrap_or_default(),
        checkpoint_seq: num(TAG_SEQ).unwrap_or(0),
        created_unix_ms,
        created: rfc3339(created_unix_ms),
        size_bytes: num(TAG_SIZE).or(s.size_gib.map(|g| g * GIB)).unwrap_or(0),
        method: method.into(),
        path: None,
        state: match s.state {
            CloudSnapshotState::Completed => SnapshotState::Completed,
            CloudSnapshotState::Failed(_) => SnapshotState::Failed,
            CloudSnapshotState::Pending => SnapshotState::Pending,
        },
        replaces: s.tags.get(TAG_REPLACES).cloned(),
    })
}

/// Client token of one assignment's staging volume (≤ 64 ASCII characters, as both clouds
/// require).
fn client_token(instance: &str, disk_id: &str, nonce: u64) -> String {
    let h = Sha256::digest(format!("{instance}\n{disk_id}\n{nonce:016x}").as_bytes());
    format!("sgw-vol-{}", &hex::encode(h)[..40])
}

/// A file name for an id the cloud gave (never a path).
fn safe_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn rfc3339(unix_ms: u64) -> String {
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

/// A record that must be readable: absent is empty, unreadable stops the backend.
fn load_record<T: Default + for<'de> Deserialize<'de>>(path: &Path) -> Result<T, BackendError> {
    let bad = |message: String| BackendError::Metadata {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            bad(format!(
                "{e}; the gateway does not start without it (it maps disks to their cloud \
                 volumes); restore it or fix it by hand"
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(bad(e.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_per_assignment_and_short() {
        let t = client_token("i-0123456789abcdef0", "web-01", 7);
        assert!(t.len() <= 64 && t.is_ascii(), "{t}");
        assert_eq!(t, client_token("i-0123456789abcdef0", "web-01", 7));
        assert_ne!(t, client_token("i-0123456789abcdef0", "web-02", 7));
        assert_ne!(t, client_token("i-0123456789abcdef0", "web-01", 8));
        assert_eq!(safe_name("i-abc/../x"), "i-abc____x");
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
        let s = CloudSnapshotView {
            id: "snap-0new".into(),
            state: CloudSnapshotState::Failed(Some("internal".into())),
            tags,
            started_unix_ms: None,
            size_gib: Some(1),
        };
        let info = from_cloud(&s, "ebs").unwrap();
        assert_eq!(info.disk_id, "web-01");
        assert_eq!(info.checkpoint_seq, 42);
        assert_eq!(info.size_bytes, 1_048_576);
        assert_eq!(info.state, SnapshotState::Failed);
        assert_eq!(info.method, "ebs");
        assert!(info.stands_for("snap-0old") && info.stands_for("snap-0new"));
        assert_eq!(info.created, "2023-11-14T22:13:20Z");
        let untagged = CloudSnapshotView {
            tags: BTreeMap::new(),
            ..s
        };
        assert!(from_cloud(&untagged, "ebs").is_none());
    }
}
