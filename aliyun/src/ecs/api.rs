//! The typed calls. Each is one ECS action; parameters and answers as in the ECS API
//! reference (2014-05-26). Creates always carry a `ClientToken` (the caller's, or one made
//! here once per call), so a retry after a lost answer never makes a second resource.

use serde_json::Value;

use super::params::Params;
use super::types::*;
use super::{EcsClient, EcsError};

/// Largest `PageSize` of the Describe calls.
const PAGE_SIZE: u32 = 100;

/// Every image state, so `DescribeImages` also shows images still being built (by default
/// it shows only `Available` ones).
const ALL_IMAGE_STATES: &str = "Creating,Waiting,Available,UnAvailable,CreateFailed,Deprecated";

impl EcsClient {
    fn region_params(&self) -> Params {
        let mut p = Params::new();
        p.set("RegionId", self.region());
        p
    }

    /// `CreateDisk`: a pay-as-you-go data disk; returns its id (`d-…`).
    pub async fn create_disk(&self, req: &CreateDisk) -> Result<String, EcsError> {
        let mut p = self.region_params();
        p.set("ZoneId", &req.zone_id)
            .set("Size", req.size_gib)
            .set("DiskCategory", &req.category)
            .opt("PerformanceLevel", req.performance_level.as_ref())
            .opt("DiskName", req.name.as_ref())
            .opt("Description", req.description.as_ref())
            .opt("SnapshotId", req.snapshot_id.as_ref())
            .set("ClientToken", token(&req.client_token))
            .tags(&req.tags);
        let v = self.call("CreateDisk", &p).await?;
        required(&v, "CreateDisk", "DiskId")
    }

    /// `DescribeDisks`, all pages.
    pub async fn describe_disks(&self, filter: &Filter) -> Result<Vec<Disk>, EcsError> {
        let mut p = self.region_params();
        p.json_list("DiskIds", &filter.ids).tags(&filter.tags);
        let items = self.paged("DescribeDisks", p, "Disks", "Disk").await?;
        Ok(items.iter().map(disk_from).collect())
    }

    /// `AttachDisk` to an instance (kept when the instance is released).
    pub async fn attach_disk(&self, instance_id: &str, disk_id: &str) -> Result<(), EcsError> {
        let mut p = Params::new();
        p.set("InstanceId", instance_id)
            .set("DiskId", disk_id)
            .set("DeleteWithInstance", false);
        self.call("AttachDisk", &p).await.map(drop)
    }

    /// `DetachDisk`.
    pub async fn detach_disk(&self, instance_id: &str, disk_id: &str) -> Result<(), EcsError> {
        let mut p = Params::new();
        p.set("InstanceId", instance_id).set("DiskId", disk_id);
        self.call("DetachDisk", &p).await.map(drop)
    }

    /// `DeleteDisk` (it must be `Available`, i.e. detached).
    pub async fn delete_disk(&self, disk_id: &str) -> Result<(), EcsError> {
        let mut p = Params::new();
        p.set("DiskId", disk_id);
        self.call("DeleteDisk", &p).await.map(drop)
    }

    /// `CreateSnapshot` of a disk; returns its id (`s-…`). The snapshot is point-in-time at
    /// this call; it becomes usable when `accomplished`.
    pub async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<String, EcsError> {
        let mut p = Params::new();
        p.set("DiskId", &req.disk_id)
            .opt("SnapshotName", req.name.as_ref())
            .opt("Description", req.description.as_ref())
            .set("ClientToken", token(&req.client_token))
            .tags(&req.tags);
        let v = self.call("CreateSnapshot", &p).await?;
        required(&v, "CreateSnapshot", "SnapshotId")
    }

    /// `DescribeSnapshots`, all pages, optionally only those in `status`.
    pub async fn describe_snapshots(
        &self,
        filter: &Filter,
        status: Option<&SnapshotStatus>,
    ) -> Result<Vec<Snapshot>, EcsError> {
        let mut p = self.region_params();
        p.json_list("SnapshotIds", &filter.ids)
            .tags(&filter.tags)
            .opt("Status", status.map(SnapshotStatus::as_str));
        let items = self
            .paged("DescribeSnapshots", p, "Snapshots", "Snapshot")
            .await?;
        Ok(items.iter().map(snapshot_from).collect())
    }

    /// `DeleteSnapshot`.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), EcsError> {
        let mut p = Params::new();
        p.set("SnapshotId", snapshot_id);
        self.call("DeleteSnapshot", &p).await.map(drop)
    }

    /// `CreateImage` from snapshots (`DiskDeviceMapping.N`); returns its id (`m-…`).
    pub async fn create_image(&self, req: &CreateImage) -> Result<String, EcsError> {
        let mut p = self.region_params();
        p.set("ImageName", &req.name)
            .opt("BootMode", req.boot_mode.as_ref())
            .opt("Architecture", req.architecture.as_ref())
            .opt("Description", req.description.as_ref())
            .set("ClientToken", token(&req.client_token))
            .tags(&req.tags);
        for (i, m) in req.mappings.iter().enumerate() {
            p.indexed("DiskDeviceMapping", i + 1, "SnapshotId", &m.snapshot_id)
                .indexed("DiskDeviceMapping", i + 1, "Device", &m.device);
            if let Some(t) = &m.disk_type {
                p.indexed("DiskDeviceMapping", i + 1, "DiskType", t);
            }
        }
        let v = self.call("CreateImage", &p).await?;
        required(&v, "CreateImage", "ImageId")
    }

    /// `DescribeImages` of this account's images, in any state, all pages.
    pub async fn describe_images(&self, filter: &Filter) -> Result<Vec<Image>, EcsError> {
        let mut p = self.region_params();
        p.set("ImageOwnerAlias", "self")
            .set("Status", ALL_IMAGE_STATES)
            .tags(&filter.tags);
        if !filter.ids.is_empty() {
            p.set("ImageId", filter.ids.join(","));
        }
        let items = self.paged("DescribeImages", p, "Images", "Image").await?;
        Ok(items.iter().map(image_from).collect())
    }

    /// `ImportImage` of a disk image in OSS (the appliance: `BootMode=UEFI`); returns the new
    /// image id.
    pub async fn import_image(&self, req: &ImportImage) -> Result<String, EcsError> {
        let mut p = self.region_params();
        p.set("ImageName", &req.name)
            .set("BootMode", &req.boot_mode)
            .set("Architecture", &req.architecture)
            .set("OSType", &req.os_type)
            .opt("Platform", req.platform.as_ref())
            .opt("Description", req.description.as_ref())
            .set("ClientToken", token(&req.client_token))
            .tags(&req.tags)
            .indexed("DiskDeviceMapping", 1, "OSSBucket", &req.oss_bucket)
            .indexed("DiskDeviceMapping", 1, "OSSObject", &req.oss_object);
        if let Some(f) = &req.format {
            p.indexed("DiskDeviceMapping", 1, "Format", f);
        }
        let v = self.call("ImportImage", &p).await?;
        required(&v, "ImportImage", "ImageId")
    }

    /// `RunInstances` of one pay-as-you-go instance; returns its id (`i-…`).
    pub async fn run_instances(&self, req: &RunInstances) -> Result<String, EcsError> {
        let mut p = self.region_params();
        p.set("ImageId", &req.image_id)
            .set("InstanceType", &req.instance_type)
            .set("VSwitchId", &req.vswitch_id)
            .set("SecurityGroupId", &req.security_group_id)
            .set("Amount", 1)
            .opt("InstanceName", req.name.as_ref())
            .opt("Description", req.description.as_ref())
            .opt("SystemDisk.Category", req.system_disk_category.as_ref())
            .set("ClientToken", token(&req.client_token))
            .tags(&req.tags);
        let v = self.call("RunInstances", &p).await?;
        v.pointer("/InstanceIdSets/InstanceIdSet/0")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| missing(&v, "RunInstances", "InstanceIdSets.InstanceIdSet"))
    }

    /// `DescribeInstances`, all pages.
    pub async fn describe_instances(&self, filter: &Filter) -> Result<Vec<Instance>, EcsError> {
        let mut p = self.region_params();
        p.json_list("InstanceIds", &filter.ids).tags(&filter.tags);
        let items = self
            .paged("DescribeInstances", p, "Instances", "Instance")
            .await?;
        Ok(items.iter().map(instance_from).collect())
    }

    /// Runs a Describe action page by page (`PageNumber` from 1, `PageSize` 100) until
    /// `TotalCount` items are in, and returns `answer[outer][inner]` of all pages.
    async fn paged(
        &self,
        action: &str,
        mut p: Params,
        outer: &str,
        inner: &str,
    ) -> Result<Vec<Value>, EcsError> {
        let mut all = Vec::new();
        // A bound on pages, so an endpoint that keeps announcing more cannot loop us forever:
        // 1000 pages of 100 is far beyond any region's quota of disks or snapshots.
        for page in 1..=1000u32 {
            p.set("PageNumber", page).set("PageSize", PAGE_SIZE);
            let v = self.call(action, &p).await?;
            let items = v
                .get(outer)
                .and_then(|o| o.get(inner))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let got = items.len();
            all.extend(items);
            let total = v.get("TotalCount").and_then(Value::as_u64).unwrap_or(0);
            if got == 0 || all.len() as u64 >= total {
                break;
            }
        }
        Ok(all)
    }
}

fn token(given: &Option<String>) -> String {
    given
        .clone()
        .unwrap_or_else(|| format!("sync-{}", crate::acs3::new_nonce()))
}

fn missing(v: &Value, action: &str, field: &str) -> EcsError {
    EcsError::Decode {
        action: action.to_string(),
        status: 200,
        request_id: text(v, "RequestId").unwrap_or_default(),
        detail: format!("no {field} in the answer"),
    }
}

fn required(v: &Value, action: &str, field: &str) -> Result<String, EcsError> {
    text(v, field).ok_or_else(|| missing(v, action, field))
}

/// A string field (numbers are taken as their text), `None` when absent or empty.
fn text(v: &Value, k: &str) -> Option<String> {
    match v.get(k)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number(v: &Value, k: &str) -> Option<u64> {
    match v.get(k)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim_end_matches('%').parse().ok(),
        _ => None,
    }
}

fn tags_from(v: &Value) -> Vec<Tag> {
    v.pointer("/Tags/Tag")
        .and_then(Value::as_array)
        .map(|tags| {
            tags.iter()
                .filter_map(|t| {
                    Some(Tag::new(
                        text(t, "TagKey")?,
                        text(t, "TagValue").unwrap_or_default(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn disk_from(v: &Value) -> Disk {
    Disk {
        disk_id: text(v, "DiskId").unwrap_or_default(),
        status: text(v, "Status").unwrap_or_default(),
        category: text(v, "Category").unwrap_or_default(),
        performance_level: text(v, "PerformanceLevel"),
        size_gib: number(v, "Size").unwrap_or(0),
        zone_id: text(v, "ZoneId").unwrap_or_default(),
        instance_id: text(v, "InstanceId"),
        device: text(v, "Device"),
        serial_number: text(v, "SerialNumber"),
        name: text(v, "DiskName"),
        tags: tags_from(v),
        creation_time: text(v, "CreationTime"),
    }
}

fn snapshot_from(v: &Value) -> Snapshot {
    Snapshot {
        snapshot_id: text(v, "SnapshotId").unwrap_or_default(),
        status: SnapshotStatus::parse(&text(v, "Status").unwrap_or_default()),
        progress: number(v, "Progress").unwrap_or(0).min(100) as u8,
        source_disk_id: text(v, "SourceDiskId"),
        source_disk_size_gib: number(v, "SourceDiskSize"),
        name: text(v, "SnapshotName"),
        tags: tags_from(v),
        creation_time: text(v, "CreationTime"),
    }
}

fn image_from(v: &Value) -> Image {
    let mappings = v
        .pointer("/DiskDeviceMappings/DiskDeviceMapping")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .map(|m| DiskDeviceMapping {
                    snapshot_id: text(m, "SnapshotId").unwrap_or_default(),
                    device: text(m, "Device").unwrap_or_default(),
                    disk_type: text(m, "Type"),
                })
                .collect()
        })
        .unwrap_or_default();
    Image {
        image_id: text(v, "ImageId").unwrap_or_default(),
        status: text(v, "Status").unwrap_or_default(),
        progress: number(v, "Progress").unwrap_or(0).min(100) as u8,
        name: text(v, "ImageName"),
        boot_mode: text(v, "BootMode"),
        mappings,
        tags: tags_from(v),
        creation_time: text(v, "CreationTime"),
    }
}

fn instance_from(v: &Value) -> Instance {
    let private_ips = v
        .pointer("/VpcAttributes/PrivateIpAddress/IpAddress")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Instance {
        instance_id: text(v, "InstanceId").unwrap_or_default(),
        status: text(v, "Status").unwrap_or_default(),
        instance_type: text(v, "InstanceType"),
        image_id: text(v, "ImageId"),
        zone_id: text(v, "ZoneId"),
        vswitch_id: v.get("VpcAttributes").and_then(|a| text(a, "VSwitchId")),
        private_ips,
        name: text(v, "InstanceName"),
        tags: tags_from(v),
    }
}
