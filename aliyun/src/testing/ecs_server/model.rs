//! The resources of the local ECS server and its actions.
//!
//! ```text
//! disk      Creating ──▶ Available ──AttachDisk──▶ Attaching ──▶ In_use
//!                         ▲                                        │
//!                         └──────────── Detaching ◀──DetachDisk────┘
//! snapshot  progressing (Progress 0→100 %) ──▶ accomplished   (or failed, on demand)
//! image     Creating ──▶ Available              (CreateImage)
//!           Waiting ──▶ Creating ──▶ Available  (ImportImage; or CreateFailed, on demand)
//! instance  Pending  ──▶ Running                (RunInstances)
//! ```
//!
//! Each arrow without an action is taken `transition` after the call that started it.
//!
//! With a device directory set, the server also plays udev in the gateway's guest: a disk
//! that reaches `In_use` appears as `DIR/virtio-SERIAL` (a symlink to a sparse file of the
//! disk's size under `DIR/.disks`, so data survives detach and attach), the link goes at
//! detach and the file at DeleteDisk.
//! Creates honour `ClientToken`: the same token for the same action answers the first
//! answer again and creates nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::RecordedRequest;

/// An injected error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// An answer: status and JSON body.
#[derive(Debug)]
pub(super) struct Reply {
    pub status: u16,
    pub code: Option<String>,
    pub body: Value,
}

impl Reply {
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        Self {
            status,
            code: Some(code.to_string()),
            body: json!({
                "RequestId": request_id(),
                "HostId": "ecs.local",
                "Code": code,
                "Message": message,
                "Recommend": "",
            }),
        }
    }

    fn ok(mut body: Value) -> Self {
        body["RequestId"] = json!(request_id());
        Self {
            status: 200,
            code: None,
            body,
        }
    }
}

fn request_id() -> String {
    let h = hex::encode_upper(rand::random::<[u8; 16]>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 10]>()))
}

/// How many resources exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub disks: usize,
    pub snapshots: usize,
    pub images: usize,
    pub instances: usize,
}

#[derive(Debug)]
struct Pending {
    target: &'static str,
    at: Instant,
}

#[derive(Debug)]
struct Disk {
    id: String,
    zone: String,
    size: u64,
    category: String,
    pl: Option<String>,
    name: String,
    status: &'static str,
    pending: Option<Pending>,
    instance: Option<String>,
    device: Option<String>,
    tags: Vec<(String, String)>,
    created: String,
}

#[derive(Debug)]
struct Snapshot {
    id: String,
    disk_id: String,
    disk_size: u64,
    name: String,
    started: Instant,
    tags: Vec<(String, String)>,
    created: String,
    /// Ends `failed` instead of `accomplished` (injected).
    failed: bool,
}

#[derive(Debug)]
struct Image {
    id: String,
    name: String,
    status: &'static str,
    pending: Option<Pending>,
    boot_mode: String,
    mappings: Vec<(String, String)>,
    tags: Vec<(String, String)>,
    created: String,
    /// ImportImage's source (`Format`, `ImportOSSBucket`, `ImportOSSObject`), as
    /// DescribeImages shows it in the system disk's mapping.
    import: Option<Value>,
}

#[derive(Debug)]
struct Instance {
    id: String,
    zone: String,
    itype: String,
    image: String,
    vswitch: String,
    name: String,
    status: &'static str,
    pending: Option<Pending>,
    tags: Vec<(String, String)>,
}

/// Everything the server keeps.
#[derive(Debug)]
pub(super) struct State {
    region: String,
    transition: Duration,
    disks: BTreeMap<String, Disk>,
    snapshots: BTreeMap<String, Snapshot>,
    images: BTreeMap<String, Image>,
    instances: BTreeMap<String, Instance>,
    client_tokens: HashMap<(String, String), Value>,
    pub faults: HashMap<String, (Fault, u32)>,
    pub nonces: HashMap<String, time::OffsetDateTime>,
    pub clock_offset: time::Duration,
    pub requests: Vec<RecordedRequest>,
    /// Where attached disks appear as `virtio-SERIAL` (udev's `/dev/disk/by-id`).
    pub device_dir: Option<PathBuf>,
    /// The next this many snapshots fail.
    pub fail_snapshots: u32,
    /// The next this many imports end `CreateFailed`.
    pub fail_imports: u32,
    /// The next this many CreateImage images end `CreateFailed`.
    pub fail_images: u32,
}

type P = BTreeMap<String, String>;

fn now_text() -> String {
    crate::acs3::format_date(time::OffsetDateTime::now_utc())
}

fn tags_of(p: &P) -> Vec<(String, String)> {
    (1..=20)
        .map_while(|n| {
            let k = p.get(&format!("Tag.{n}.Key"))?;
            Some((
                k.clone(),
                p.get(&format!("Tag.{n}.Value"))
                    .cloned()
                    .unwrap_or_default(),
            ))
        })
        .collect()
}

fn tags_json(tags: &[(String, String)]) -> Value {
    json!({ "Tag": tags.iter().map(|(k, v)| json!({"TagKey": k, "TagValue": v})).collect::<Vec<_>>() })
}

fn matches_tags(have: &[(String, String)], want: &[(String, String)]) -> bool {
    want.iter().all(|w| have.contains(w))
}

fn missing(name: &str) -> Reply {
    Reply::error(
        400,
        &format!("Missing{name}"),
        &format!("The input parameter \"{name}\" that is mandatory for processing this request is not supplied."),
    )
}

fn need<'a>(p: &'a P, name: &str) -> Result<&'a str, Reply> {
    p.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| missing(name))
}

/// A JSON array of ids (`DiskIds=["d-1"]`), empty when absent.
fn id_list(p: &P, name: &str) -> Result<Vec<String>, Reply> {
    match p.get(name) {
        None => Ok(Vec::new()),
        Some(s) => serde_json::from_str(s).map_err(|_| {
            Reply::error(
                400,
                &format!("Invalid{name}.Malformed"),
                &format!("The specified parameter \"{name}\" is not valid."),
            )
        }),
    }
}

/// `PageNumber`/`PageSize` applied to `items`, with the paging fields of the answer.
fn page(p: &P, items: Vec<Value>, outer: &str, inner: &str) -> Result<Reply, Reply> {
    let number: usize = p
        .get("PageNumber")
        .map_or(Ok(1), |s| s.parse())
        .map_err(|_| Reply::error(400, "InvalidParameter", "PageNumber is not a number"))?;
    let size: usize = p
        .get("PageSize")
        .map_or(Ok(10), |s| s.parse())
        .map_err(|_| Reply::error(400, "InvalidParameter", "PageSize is not a number"))?;
    if number == 0 || size == 0 || size > 100 {
        return Err(Reply::error(
            400,
            "InvalidParameter",
            "PageNumber >= 1, PageSize 1..=100",
        ));
    }
    let total = items.len();
    let slice: Vec<Value> = items
        .into_iter()
        .skip((number - 1) * size)
        .take(size)
        .collect();
    Ok(Reply::ok(json!({
        "TotalCount": total, "PageNumber": number, "PageSize": size,
        outer: { inner: slice },
    })))
}

impl State {
    pub fn new(region: String, transition: Duration) -> Self {
        Self {
            region,
            transition,
            disks: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            images: BTreeMap::new(),
            instances: BTreeMap::new(),
            client_tokens: HashMap::new(),
            faults: HashMap::new(),
            nonces: HashMap::new(),
            clock_offset: time::Duration::ZERO,
            requests: Vec::new(),
            device_dir: None,
            fail_snapshots: 0,
            fail_imports: 0,
            fail_images: 0,
        }
    }

    fn later(&self, target: &'static str) -> Option<Pending> {
        Some(Pending {
            target,
            at: Instant::now() + self.transition,
        })
    }

    /// Takes every transition that is due.
    fn settle(&mut self) {
        let now = Instant::now();
        for d in self.disks.values_mut() {
            if let Some(p) = d.pending.take_if(|p| p.at <= now) {
                d.status = p.target;
                if p.target == "Available" {
                    d.instance = None;
                    d.device = None;
                }
                if let Some(dir) = &self.device_dir {
                    match p.target {
                        "In_use" => plug(dir, &d.id, d.size),
                        "Available" => unplug(dir, &d.id, false),
                        _ => {}
                    }
                }
            }
        }
        for i in self.images.values_mut() {
            if let Some(p) = i.pending.take_if(|p| p.at <= now) {
                i.status = p.target;
            }
        }
        for i in self.instances.values_mut() {
            if let Some(p) = i.pending.take_if(|p| p.at <= now) {
                i.status = p.target;
            }
        }
    }

    fn snapshot_status(&self, s: &Snapshot) -> &'static str {
        match (self.snapshot_progress(s) >= 100, s.failed) {
            (false, _) => "progressing",
            (true, false) => "accomplished",
            (true, true) => "failed",
        }
    }

    fn snapshot_progress(&self, s: &Snapshot) -> u64 {
        let elapsed = s.started.elapsed().as_secs_f64();
        let total = self.transition.as_secs_f64().max(1e-9);
        ((elapsed / total) * 100.0).min(100.0) as u64
    }

    pub fn add_running_instance(&mut self, id: &str, zone: &str) {
        self.instances.insert(
            id.to_string(),
            Instance {
                id: id.to_string(),
                zone: zone.to_string(),
                itype: "ecs.g7.large".into(),
                image: String::new(),
                vswitch: String::new(),
                name: id.to_string(),
                status: "Running",
                pending: None,
                tags: Vec::new(),
            },
        );
    }

    pub fn status_of(&mut self, id: &str) -> Option<String> {
        self.settle();
        if let Some(d) = self.disks.get(id) {
            return Some(d.status.to_string());
        }
        if let Some(s) = self.snapshots.get(id) {
            return Some(self.snapshot_status(s).to_string());
        }
        if let Some(i) = self.images.get(id) {
            return Some(i.status.to_string());
        }
        self.instances.get(id).map(|i| i.status.to_string())
    }

    pub fn counts(&self) -> Counts {
        Counts {
            disks: self.disks.len(),
            snapshots: self.snapshots.len(),
            images: self.images.len(),
            instances: self.instances.len(),
        }
    }

    /// Runs `action`.
    pub fn handle(&mut self, action: &str, p: &P) -> Reply {
        self.settle();
        if let Some(r) = p.get("RegionId") {
            if *r != self.region {
                return Reply::error(
                    400,
                    "InvalidRegionId.NotFound",
                    "The specified RegionId does not exist.",
                );
            }
        }
        // Creates with a ClientToken already seen answer the first answer again.
        let token_key = p
            .get("ClientToken")
            .map(|t| (action.to_string(), t.clone()));
        if let Some(first) = token_key.as_ref().and_then(|k| self.client_tokens.get(k)) {
            return Reply::ok(first.clone());
        }
        let result = match action {
            "CreateDisk" => self.create_disk(p),
            "DescribeDisks" => self.describe_disks(p),
            "AttachDisk" => self.attach_disk(p),
            "DetachDisk" => self.detach_disk(p),
            "DeleteDisk" => self.delete_disk(p),
            "CreateSnapshot" => self.create_snapshot(p),
            "DescribeSnapshots" => self.describe_snapshots(p),
            "DeleteSnapshot" => self.delete_snapshot(p),
            "CreateImage" => self.create_image(p),
            "ImportImage" => self.import_image(p),
            "DescribeImages" => self.describe_images(p),
            "RunInstances" => self.run_instances(p),
            "DescribeInstances" => self.describe_instances(p),
            _ => Err(Reply::error(
                404,
                "InvalidApi.NotFound",
                &format!("Specified api {action} is not found."),
            )),
        };
        let reply = result.unwrap_or_else(|e| e);
        if let (Some(key), None) = (token_key, &reply.code) {
            let mut first = reply.body.clone();
            if let Some(o) = first.as_object_mut() {
                o.remove("RequestId");
            }
            self.client_tokens.insert(key, first);
        }
        reply
    }

    fn disk_mut(&mut self, id: &str) -> Result<&mut Disk, Reply> {
        self.disks.get_mut(id).ok_or_else(|| {
            Reply::error(
                404,
                "InvalidDiskId.NotFound",
                "The specified disk does not exist.",
            )
        })
    }

    fn create_disk(&mut self, p: &P) -> Result<Reply, Reply> {
        need(p, "RegionId")?;
        let zone = need(p, "ZoneId")?.to_string();
        let size: u64 = need(p, "Size")?.parse().map_err(|_| {
            Reply::error(
                400,
                "InvalidSize.ValueNotSupported",
                "Size is not a number.",
            )
        })?;
        if !(20..=65536).contains(&size) {
            return Err(Reply::error(
                400,
                "InvalidSize.ValueNotSupported",
                "Size must be 20..65536 GiB for cloud_essd.",
            ));
        }
        let id = new_id("d");
        let disk = Disk {
            id: id.clone(),
            zone,
            size,
            category: p
                .get("DiskCategory")
                .cloned()
                .unwrap_or_else(|| "cloud_efficiency".into()),
            pl: p.get("PerformanceLevel").cloned(),
            name: p.get("DiskName").cloned().unwrap_or_default(),
            status: "Creating",
            pending: self.later("Available"),
            instance: None,
            device: None,
            tags: tags_of(p),
            created: now_text(),
        };
        self.disks.insert(id.clone(), disk);
        Ok(Reply::ok(json!({"DiskId": id, "OrderId": ""})))
    }

    fn describe_disks(&mut self, p: &P) -> Result<Reply, Reply> {
        let ids = id_list(p, "DiskIds")?;
        let tags = tags_of(p);
        let items = self
            .disks
            .values()
            .filter(|d| ids.is_empty() || ids.contains(&d.id))
            .filter(|d| {
                p.get("InstanceId")
                    .is_none_or(|i| d.instance.as_ref() == Some(i))
            })
            .filter(|d| matches_tags(&d.tags, &tags))
            .map(|d| {
                json!({
                    "DiskId": d.id, "Status": d.status, "Category": d.category,
                    "PerformanceLevel": d.pl.clone().unwrap_or_default(), "Size": d.size,
                    "ZoneId": d.zone, "RegionId": self.region,
                    "InstanceId": d.instance.clone().unwrap_or_default(),
                    "Device": d.device.clone().unwrap_or_default(),
                    "SerialNumber": d.id.trim_start_matches("d-"),
                    "DiskName": d.name, "Type": "data", "Tags": tags_json(&d.tags),
                    "CreationTime": d.created,
                })
            })
            .collect();
        page(p, items, "Disks", "Disk")
    }

    fn attach_disk(&mut self, p: &P) -> Result<Reply, Reply> {
        let instance_id = need(p, "InstanceId")?.to_string();
        let disk_id = need(p, "DiskId")?.to_string();
        let transition = self.later("In_use");
        let instance = self.instances.get(&instance_id).ok_or_else(|| {
            Reply::error(
                404,
                "InvalidInstanceId.NotFound",
                "The specified InstanceId does not exist.",
            )
        })?;
        if instance.status != "Running" && instance.status != "Stopped" {
            return Err(Reply::error(
                403,
                "IncorrectInstanceStatus",
                "The current status of the resource does not support this operation.",
            ));
        }
        let zone = instance.zone.clone();
        let used = self
            .disks
            .values()
            .filter(|d| d.instance.as_ref() == Some(&instance_id))
            .count();
        let disk = self.disk_mut(&disk_id)?;
        if disk.status != "Available" {
            return Err(Reply::error(
                403,
                "IncorrectDiskStatus",
                "The current disk status does not support this operation.",
            ));
        }
        if disk.zone != zone {
            return Err(Reply::error(
                403,
                "InvalidInstanceId.MismatchZone",
                "The disk and the instance are not in the same zone.",
            ));
        }
        disk.status = "Attaching";
        disk.pending = transition;
        disk.instance = Some(instance_id);
        // /dev/xvda is the system disk.
        disk.device = Some(format!("/dev/xvd{}", (b'b' + used.min(24) as u8) as char));
        Ok(Reply::ok(json!({})))
    }

    fn detach_disk(&mut self, p: &P) -> Result<Reply, Reply> {
        let instance_id = need(p, "InstanceId")?.to_string();
        let disk_id = need(p, "DiskId")?.to_string();
        let transition = self.later("Available");
        let disk = self.disk_mut(&disk_id)?;
        if disk.status != "In_use" {
            return Err(Reply::error(
                403,
                "IncorrectDiskStatus",
                "The current disk status does not support this operation.",
            ));
        }
        if disk.instance.as_ref() != Some(&instance_id) {
            return Err(Reply::error(
                403,
                "DependencyViolation",
                "The disk is not attached to the specified instance.",
            ));
        }
        disk.status = "Detaching";
        disk.pending = transition;
        Ok(Reply::ok(json!({})))
    }

    fn delete_disk(&mut self, p: &P) -> Result<Reply, Reply> {
        let disk_id = need(p, "DiskId")?.to_string();
        let disk = self.disk_mut(&disk_id)?;
        if disk.status != "Available" {
            return Err(Reply::error(
                403,
                "IncorrectDiskStatus",
                "The current disk status does not support this operation.",
            ));
        }
        self.disks.remove(&disk_id);
        if let Some(dir) = &self.device_dir {
            unplug(dir, &disk_id, true);
        }
        Ok(Reply::ok(json!({})))
    }

    fn create_snapshot(&mut self, p: &P) -> Result<Reply, Reply> {
        let disk_id = need(p, "DiskId")?.to_string();
        let disk = self.disk_mut(&disk_id)?;
        if disk.status != "In_use" && disk.status != "Available" {
            return Err(Reply::error(
                403,
                "IncorrectDiskStatus",
                "The current disk status does not support this operation.",
            ));
        }
        let size = disk.size;
        let id = new_id("s");
        let failed = self.fail_snapshots > 0;
        self.fail_snapshots = self.fail_snapshots.saturating_sub(1);
        self.snapshots.insert(
            id.clone(),
            Snapshot {
                id: id.clone(),
                disk_id,
                disk_size: size,
                name: p.get("SnapshotName").cloned().unwrap_or_default(),
                started: Instant::now(),
                tags: tags_of(p),
                created: now_text(),
                failed,
            },
        );
        Ok(Reply::ok(json!({"SnapshotId": id})))
    }

    fn describe_snapshots(&mut self, p: &P) -> Result<Reply, Reply> {
        let ids = id_list(p, "SnapshotIds")?;
        let tags = tags_of(p);
        let status = p.get("Status").map(String::as_str).filter(|s| *s != "all");
        let items = self
            .snapshots
            .values()
            .filter(|s| ids.is_empty() || ids.contains(&s.id))
            .filter(|s| p.get("DiskId").is_none_or(|d| *d == s.disk_id))
            .filter(|s| matches_tags(&s.tags, &tags))
            .filter_map(|s| {
                let progress = self.snapshot_progress(s);
                let st = self.snapshot_status(s);
                if status.is_some_and(|want| want != st) {
                    return None;
                }
                Some(json!({
                    "SnapshotId": s.id, "Status": st, "Progress": format!("{progress}%"),
                    "SourceDiskId": s.disk_id, "SourceDiskSize": s.disk_size.to_string(),
                    "SourceDiskType": "data", "SnapshotName": s.name,
                    "Tags": tags_json(&s.tags), "CreationTime": s.created,
                }))
            })
            .collect();
        page(p, items, "Snapshots", "Snapshot")
    }

    fn delete_snapshot(&mut self, p: &P) -> Result<Reply, Reply> {
        let id = need(p, "SnapshotId")?.to_string();
        if !self.snapshots.contains_key(&id) {
            return Err(Reply::error(
                404,
                "InvalidSnapshotId.NotFound",
                "The specified snapshot does not exist.",
            ));
        }
        if self
            .images
            .values()
            .any(|i| i.mappings.iter().any(|(s, _)| *s == id))
        {
            return Err(Reply::error(
                403,
                "SnapshotCreatedImage",
                "The snapshot has been used to create an image.",
            ));
        }
        self.snapshots.remove(&id);
        Ok(Reply::ok(json!({})))
    }

    fn create_image(&mut self, p: &P) -> Result<Reply, Reply> {
        need(p, "RegionId")?;
        let mut mappings = Vec::new();
        let mut systems = Vec::new();
        for n in 1..=17 {
            let Some(snap) = p.get(&format!("DiskDeviceMapping.{n}.SnapshotId")) else {
                break;
            };
            let s = self.snapshots.get(snap).ok_or_else(|| {
                Reply::error(
                    404,
                    "InvalidSnapshotId.NotFound",
                    "The specified snapshot does not exist.",
                )
            })?;
            if self.snapshot_status(s) != "accomplished" {
                return Err(Reply::error(
                    403,
                    "InvalidSnapshotId.NotReady",
                    "The specified snapshot has not completed yet.",
                ));
            }
            let device = p
                .get(&format!("DiskDeviceMapping.{n}.Device"))
                .cloned()
                .unwrap_or_default();
            // Without DiskType a mapping keeps its snapshot's disk type; every snapshot here
            // is of a data disk.
            let kind = p
                .get(&format!("DiskDeviceMapping.{n}.DiskType"))
                .map_or("data", String::as_str);
            if kind == "system" {
                systems.push(device.clone());
            }
            mappings.push((snap.clone(), device));
        }
        if mappings.is_empty() && p.get("SnapshotId").is_none() && p.get("InstanceId").is_none() {
            return Err(missing("DiskDeviceMapping"));
        }
        if !mappings.is_empty() && (systems.len() != 1 || systems[0] != "/dev/xvda") {
            return Err(Reply::error(
                400,
                "InvalidParameter",
                "DiskDeviceMapping must hold exactly one system disk (DiskType system), at \
                 /dev/xvda.",
            ));
        }
        let reply = self.new_image(p, mappings);
        if self.fail_images > 0 {
            self.fail_images -= 1;
            let failed = self.later("CreateFailed");
            if let Some(image) = reply.body["ImageId"]
                .as_str()
                .and_then(|id| self.images.get_mut(id))
            {
                image.pending = failed;
            }
        }
        Ok(reply)
    }

    /// `ImportImage`, checked as ECS checks before it queues the import task (the codes of
    /// the API reference): a name that is malformed or already used, a format other than
    /// `RAW`, `VHD`, `QCOW2`. The image then waits in `Waiting`, shows `Creating` for the
    /// second half of `transition`, and ends `Available` — or `CreateFailed`, for each
    /// failure queued with `EcsServer::fail_next_imports` (ECS tells no reason in
    /// DescribeImages either). The OSS object
    /// is not read: the server has no OSS to look in.
    fn import_image(&mut self, p: &P) -> Result<Reply, Reply> {
        need(p, "RegionId")?;
        let bucket = need(p, "DiskDeviceMapping.1.OSSBucket")?.to_string();
        let object = need(p, "DiskDeviceMapping.1.OSSObject")?.to_string();
        let format = p.get("DiskDeviceMapping.1.Format").cloned();
        if format
            .as_deref()
            .is_some_and(|f| !["RAW", "VHD", "QCOW2"].contains(&f))
        {
            return Err(Reply::error(
                400,
                "InvalidImageFormat.Malformed",
                "The specified Image Format is wrongly formed.",
            ));
        }
        if let Some(name) = p.get("ImageName") {
            let mut chars = name.chars();
            let well_formed = (2..=128).contains(&name.chars().count())
                && chars.next().is_some_and(|c| c.is_alphabetic())
                && chars.all(|c| c.is_alphanumeric() || ".:_-".contains(c))
                && !name.starts_with("http:")
                && !name.starts_with("https:");
            if !well_formed {
                return Err(Reply::error(
                    400,
                    "InvalidImageName.Malformed",
                    "The specified Image name is wrongly formed.",
                ));
            }
            if self.images.values().any(|i| i.name == *name) {
                return Err(Reply::error(
                    400,
                    "InvalidImageName.Duplicated",
                    "The specified Image name has already been used.",
                ));
            }
        }
        let fails = self.fail_imports > 0;
        self.fail_imports = self.fail_imports.saturating_sub(1);
        let reply = self.new_image(p, Vec::new());
        let id = reply.body["ImageId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let pending = self.later(if fails { "CreateFailed" } else { "Available" });
        if let Some(image) = self.images.get_mut(&id) {
            image.status = "Waiting";
            image.pending = pending;
            image.import = Some(
                json!({"Format": format, "ImportOSSBucket": bucket, "ImportOSSObject": object}),
            );
        }
        Ok(reply)
    }

    fn new_image(&mut self, p: &P, mappings: Vec<(String, String)>) -> Reply {
        let id = new_id("m");
        let image = Image {
            id: id.clone(),
            name: p.get("ImageName").cloned().unwrap_or_default(),
            status: "Creating",
            pending: self.later("Available"),
            boot_mode: p.get("BootMode").cloned().unwrap_or_else(|| "BIOS".into()),
            mappings,
            tags: tags_of(p),
            created: now_text(),
            import: None,
        };
        self.images.insert(id.clone(), image);
        Reply::ok(json!({"ImageId": id, "TaskId": new_id("t"), "RegionId": self.region}))
    }

    fn describe_images(&mut self, p: &P) -> Result<Reply, Reply> {
        let ids: Vec<&str> = p
            .get("ImageId")
            .map(|s| s.split(',').collect())
            .unwrap_or_default();
        let states: Vec<&str> = p
            .get("Status")
            .map_or(vec!["Available"], |s| s.split(',').collect());
        let tags = tags_of(p);
        let now = Instant::now();
        let transition = self.transition.as_secs_f64().max(1e-9);
        let items = self
            .images
            .values()
            .filter(|i| ids.is_empty() || ids.contains(&i.id.as_str()))
            .filter_map(|i| {
                // How far the pending transition has come, 0.0 ..= 1.0.
                let done = i.pending.as_ref().map_or(1.0, |t| {
                    1.0 - t.at.saturating_duration_since(now).as_secs_f64() / transition
                });
                // An import waits in the queue for the first half, then is converted.
                let (status, progress) = match i.status {
                    "Available" => ("Available", 100),
                    "Waiting" if done < 0.5 => ("Waiting", 0),
                    "Waiting" => ("Creating", ((done - 0.5) * 200.0).clamp(0.0, 99.0) as u32),
                    "CreateFailed" => ("CreateFailed", 0),
                    other => (other, 50),
                };
                if !states.contains(&status) || !matches_tags(&i.tags, &tags) {
                    return None;
                }
                let mappings: Vec<Value> = match &i.import {
                    // An imported image has its system disk, as ECS shows it, with the source.
                    Some(src) => {
                        let mut m = src.clone();
                        m["Device"] = json!("/dev/xvda");
                        m["SnapshotId"] = json!("");
                        m["Progress"] = json!(format!("{progress}%"));
                        vec![m]
                    }
                    None => i
                        .mappings
                        .iter()
                        .map(|(s, d)| {
                            let kind = if d == "/dev/xvda" { "system" } else { "data" };
                            json!({"SnapshotId": s, "Device": d, "Type": kind})
                        })
                        .collect(),
                };
                Some(json!({
                    "ImageId": i.id, "ImageName": i.name, "Status": status,
                    "Progress": format!("{progress}%"), "BootMode": i.boot_mode,
                    "ImageOwnerAlias": "self",
                    "DiskDeviceMappings": {"DiskDeviceMapping": mappings},
                    "Tags": tags_json(&i.tags), "CreationTime": i.created,
                }))
            })
            .collect();
        page(p, items, "Images", "Image")
    }

    fn run_instances(&mut self, p: &P) -> Result<Reply, Reply> {
        need(p, "RegionId")?;
        let image_id = need(p, "ImageId")?.to_string();
        let itype = need(p, "InstanceType")?.to_string();
        let vswitch = need(p, "VSwitchId")?.to_string();
        need(p, "SecurityGroupId")?;
        match self.images.get(&image_id) {
            None => {
                return Err(Reply::error(
                    404,
                    "InvalidImageId.NotFound",
                    "The specified ImageId does not exist.",
                ))
            }
            Some(i) if i.status != "Available" => {
                return Err(Reply::error(
                    403,
                    "InvalidImageId.NotReady",
                    "The specified image is not ready.",
                ))
            }
            Some(_) => {}
        }
        let id = new_id("i");
        let instance = Instance {
            id: id.clone(),
            zone: p.get("ZoneId").cloned().unwrap_or_default(),
            itype,
            image: image_id,
            vswitch,
            name: p.get("InstanceName").cloned().unwrap_or_default(),
            status: "Pending",
            pending: self.later("Running"),
            tags: tags_of(p),
        };
        self.instances.insert(id.clone(), instance);
        Ok(Reply::ok(
            json!({"InstanceIdSets": {"InstanceIdSet": [id]}, "OrderId": "", "TradePrice": 0}),
        ))
    }

    fn describe_instances(&mut self, p: &P) -> Result<Reply, Reply> {
        let ids = id_list(p, "InstanceIds")?;
        let tags = tags_of(p);
        let items = self
            .instances
            .values()
            .filter(|i| ids.is_empty() || ids.contains(&i.id))
            .filter(|i| matches_tags(&i.tags, &tags))
            .map(|i| {
                json!({
                    "InstanceId": i.id, "Status": i.status, "InstanceType": i.itype,
                    "ImageId": i.image, "ZoneId": i.zone, "InstanceName": i.name,
                    "RegionId": self.region,
                    "VpcAttributes": {"VSwitchId": i.vswitch,
                        "PrivateIpAddress": {"IpAddress": ["192.168.0.10"]}},
                    "Tags": tags_json(&i.tags),
                })
            })
            .collect();
        page(p, items, "Instances", "Instance")
    }
}

/// udev's part: `dir/virtio-SERIAL` → `dir/.disks/ID.img`, sparse, `size_gib` GiB.
fn plug(dir: &Path, disk_id: &str, size_gib: u64) {
    let store = dir.join(".disks");
    let file = store.join(format!("{disk_id}.img"));
    let link = dir.join(format!("virtio-{}", disk_id.trim_start_matches("d-")));
    let made = std::fs::create_dir_all(&store).and_then(|()| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&file)?;
        if f.metadata()?.len() < size_gib << 30 {
            f.set_len(size_gib << 30)?;
        }
        match std::os::unix::fs::symlink(&file, &link) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    });
    if let Err(e) = made {
        tracing::warn!(disk = disk_id, error = %e, "local ECS server: cannot plug the disk's device");
    }
}

/// Removes the by-id link of a detached disk, and its content when it is deleted.
fn unplug(dir: &Path, disk_id: &str, delete: bool) {
    let _ = std::fs::remove_file(dir.join(format!("virtio-{}", disk_id.trim_start_matches("d-"))));
    if delete {
        let _ = std::fs::remove_file(dir.join(".disks").join(format!("{disk_id}.img")));
    }
}
