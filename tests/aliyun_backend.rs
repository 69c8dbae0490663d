//! The `aliyun` backend's edge cases, in process, against the local ECS server and metadata
//! service (the whole lifecycle through the binaries is tests/aliyun_e2e.rs): snapshots that
//! ECS fails, a staging disk that vanished or is held by another instance, a crash between
//! recording a disk and learning its id, and a launch without the settings it needs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use sync_aliyun::ecs::{CreateDisk, EcsClient, EcsConfig, Tag};
use sync_aliyun::settings::AliyunSettings;
use sync_aliyun::testing::ecs_server::{EcsServer, EcsServerConfig};
use sync_aliyun::testing::meta_server::{FakeMetaConfig, FakeMetaServer};
use sync_aliyun::Credentials;
use sync_gateway::backend::{AliyunBackend, SnapshotRequest, SnapshotState, Volume};

const MIB: u64 = 1 << 20;

struct Cloud {
    ecs: EcsServer,
    meta: FakeMetaServer,
    config: FakeMetaConfig,
    dir: tempfile::TempDir,
}

impl Cloud {
    async fn start() -> Cloud {
        let config = FakeMetaConfig::default();
        let meta = FakeMetaServer::start(config.clone()).await.unwrap();
        let ecs = EcsServer::start(EcsServerConfig::new(
            config.region_id.clone(),
            vec![Self::sts(&config)],
        ))
        .await
        .unwrap();
        ecs.add_instance(&config.instance_id, &config.zone_id);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("by-id")).unwrap();
        ecs.set_device_dir(&dir.path().join("by-id"));
        Cloud {
            ecs,
            meta,
            config,
            dir,
        }
    }

    fn sts(c: &FakeMetaConfig) -> Credentials {
        Credentials::new(
            c.access_key_id.clone(),
            c.access_key_secret.clone(),
            Some(c.security_token.clone()),
        )
    }

    fn settings(&self) -> AliyunSettings {
        AliyunSettings {
            ecs_endpoint: Some(self.ecs.endpoint()),
            meta_endpoint: self.meta.url(),
            device_dir: self.dir.path().join("by-id"),
            ..AliyunSettings::default()
        }
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    async fn backend(&self, settings: AliyunSettings) -> AliyunBackend {
        AliyunBackend::open(settings, &self.data_dir())
            .await
            .unwrap()
    }

    /// A client of the same account, for what happens behind the gateway's back.
    fn operator(&self) -> EcsClient {
        EcsClient::new(
            EcsConfig::new(self.config.region_id.clone()).with_endpoint(self.ecs.endpoint()),
            Arc::new(Self::sts(&self.config)),
        )
        .unwrap()
    }

    /// Writes the backend's disk record as a crash would have left it.
    fn record(&self, disk: &str, token: &str, volume_id: Option<&str>) {
        let dir = self.data_dir().join("aliyun");
        std::fs::create_dir_all(&dir).unwrap();
        let record = serde_json::json!({ disk: {
            "client_token": token, "volume_id": volume_id, "size_bytes": 8 * MIB,
        }});
        std::fs::write(dir.join("volumes.json"), record.to_string()).unwrap();
    }

    async fn wait_status(&self, id: &str, want: &str) {
        for _ in 0..100 {
            if self.ecs.status_of(id).as_deref() == Some(want) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("{id} never became {want}: {:?}", self.ecs.status_of(id));
    }
}

fn request(disk: &str, seq: u64) -> SnapshotRequest {
    SnapshotRequest {
        disk_id: disk.into(),
        label: format!("pass {seq}"),
        checkpoint_seq: seq,
    }
}

async fn wait(
    s: &sync_gateway::backend::Snapshot,
) -> Result<sync_gateway::backend::SnapshotInfo, String> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || s.wait()).await.unwrap()
}

fn write(volume: &Volume, byte: u8) {
    volume.write_at(&vec![byte; 4096], 0).unwrap();
    volume.sync().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_is_retaken_only_while_the_disk_is_unchanged() {
    let cloud = Cloud::start().await;
    let b = cloud.backend(cloud.settings()).await;
    let volume = Arc::new(b.open_volume("d1", 8 * MIB).await.unwrap());
    write(&volume, 1);

    // Unchanged since: ECS fails it, the gateway takes it again under the same checkpoint.
    cloud.ecs.fail_next_snapshots(1);
    let first = b
        .begin_snapshot(volume.clone(), request("d1", 1))
        .await
        .unwrap();
    let done = wait(&first).await.unwrap();
    assert_ne!(done.id, first.info().id);
    assert!(done.stands_for(&first.info().id), "{done:?}");
    assert_eq!(done.state, SnapshotState::Completed);
    assert_eq!(
        cloud.ecs.status_of(&done.id).as_deref(),
        Some("accomplished")
    );
    assert_eq!(
        cloud.ecs.status_of(&first.info().id),
        None,
        "the failed one is deleted"
    );
    assert_eq!(b.cloud_status().snapshots_retried, 1);

    // Written since: the failed snapshot cannot be taken again with the same content.
    cloud.ecs.fail_next_snapshots(1);
    let second = b
        .begin_snapshot(volume.clone(), request("d1", 2))
        .await
        .unwrap();
    write(&volume, 2);
    let err = wait(&second).await.unwrap_err();
    assert!(err.contains("failed"), "{err}");
    let listed = b.list_snapshots(Some("d1")).await.unwrap();
    let failed = listed.iter().find(|s| s.id == second.info().id).unwrap();
    assert_eq!(failed.state, SnapshotState::Failed);
    assert_eq!(b.cloud_status().snapshots_retried, 1);
    // A failed snapshot can be pruned like any other.
    b.delete_snapshot(failed).await.unwrap();
    assert_eq!(cloud.ecs.status_of(&second.info().id), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_disk_is_an_error_not_a_new_empty_disk() {
    let cloud = Cloud::start().await;
    let b = cloud.backend(cloud.settings()).await;
    b.open_volume("d1", 8 * MIB).await.unwrap();
    let id = b.volume_id("d1").unwrap();
    drop(b);
    // Someone detaches and deletes it in the console while the gateway is down.
    let ecs = cloud.operator();
    ecs.detach_disk(&cloud.config.instance_id, &id)
        .await
        .unwrap();
    cloud.wait_status(&id, "Available").await;
    ecs.delete_disk(&id).await.unwrap();

    let b = cloud.backend(cloud.settings()).await;
    let err = b.open_volume("d1", 8 * MIB).await.unwrap_err().to_string();
    assert!(
        err.contains(&id) && err.contains("no longer exists"),
        "{err}"
    );
    assert_eq!(cloud.ecs.counts().disks, 0, "no empty disk in its place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_held_by_another_instance_is_refused() {
    let cloud = Cloud::start().await;
    cloud
        .ecs
        .add_instance("i-someoneelse000000", &cloud.config.zone_id);
    let ecs = cloud.operator();
    let mut create = CreateDisk::new(&cloud.config.zone_id, 20);
    create.tags = vec![Tag::new("sync-gateway:client-token", "tok-1")];
    let id = ecs.create_disk(&create).await.unwrap();
    cloud.wait_status(&id, "Available").await;
    ecs.attach_disk("i-someoneelse000000", &id).await.unwrap();
    cloud.wait_status(&id, "In_use").await;
    cloud.record("d1", "tok-1", Some(&id));

    let b = cloud.backend(cloud.settings()).await;
    let err = b.open_volume("d1", 8 * MIB).await.unwrap_err().to_string();
    assert!(err.contains("i-someoneelse000000"), "{err}");
    assert_eq!(
        cloud.ecs.status_of(&id).as_deref(),
        Some("In_use"),
        "left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_finds_a_disk_whose_id_was_never_recorded() {
    // A crash after CreateDisk was sent and before its answer was recorded: the record has
    // the client token only; the disk carries it as a tag.
    let cloud = Cloud::start().await;
    let ecs = cloud.operator();
    let mut create = CreateDisk::new(&cloud.config.zone_id, 20);
    create.tags = vec![Tag::new("sync-gateway:client-token", "tok-crash")];
    let id = ecs.create_disk(&create).await.unwrap();
    cloud.wait_status(&id, "Available").await;
    cloud.record("d1", "tok-crash", None);

    let b = cloud.backend(cloud.settings()).await;
    b.release_volume("d1").await.unwrap();
    assert_eq!(cloud.ecs.status_of(&id), None, "the disk is deleted");
    assert_eq!(b.volume_id("d1"), None);
    let record = std::fs::read_to_string(cloud.data_dir().join("aliyun/volumes.json")).unwrap();
    assert!(
        !record.contains("tok-crash"),
        "the record is forgotten: {record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_names_the_setting_it_lacks_and_an_image_is_made_once() {
    let cloud = Cloud::start().await;
    let b = cloud.backend(cloud.settings()).await;
    let volume = Arc::new(b.open_volume("d1", 8 * MIB).await.unwrap());
    write(&volume, 3);
    let snap = wait(&b.begin_snapshot(volume, request("d1", 1)).await.unwrap())
        .await
        .unwrap();
    let err = b
        .launch(vec![snap.clone()], true)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("security_group_id"), "{err}");
    assert_eq!(
        cloud.ecs.counts().images,
        0,
        "nothing made before the check"
    );

    let settings = AliyunSettings {
        security_group_id: Some("sg-1".into()),
        tags: BTreeMap::from([("team".into(), "dr".into())]),
        ..cloud.settings()
    };
    let b = cloud.backend(settings).await;
    let first = b.launch(vec![snap.clone()], true).await.unwrap();
    let again = b.launch(vec![snap], true).await.unwrap();
    assert_eq!(
        first.image_id, again.image_id,
        "the image of a snapshot is reused"
    );
    assert_ne!(first.instance_id, again.instance_id);
    assert_eq!(cloud.ecs.requests_of("CreateImage").len(), 1);
    assert_eq!(b.list_launches().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_configured_tags_are_refused_at_start() {
    let cloud = Cloud::start().await;
    let settings = AliyunSettings {
        tags: (0..15)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect(),
        ..cloud.settings()
    };
    let err = AliyunBackend::open(settings, Path::new(&cloud.data_dir()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("tags"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_retake_never_stands_for_its_checkpoint() {
    // A snapshot tagged as the retake of another that this gateway never recorded as checked
    // (it stopped between taking and checking it): it may hold later data.
    let cloud = Cloud::start().await;
    let b = cloud.backend(cloud.settings()).await;
    b.open_volume("d1", 8 * MIB).await.unwrap();
    let disk = b.volume_id("d1").unwrap();
    let mut create = sync_aliyun::ecs::CreateSnapshot::new(&disk);
    create.tags = [
        ("sync-gateway:managed", "true"),
        ("sync-gateway:gateway", cloud.config.instance_id.as_str()),
        ("sync-gateway:disk", "d1"),
        ("sync-gateway:checkpoint", "pass 1"),
        ("sync-gateway:checkpoint-seq", "1"),
        ("sync-gateway:replaces", "s-original"),
    ]
    .into_iter()
    .map(|(k, v)| Tag::new(k, v))
    .collect();
    let id = cloud.operator().create_snapshot(&create).await.unwrap();
    cloud.wait_status(&id, "accomplished").await;
    let listed = b.list_snapshots(Some("d1")).await.unwrap();
    let s = listed.iter().find(|s| s.id == id).unwrap();
    assert!(!s.stands_for("s-original"), "{s:?}");
    assert_eq!(
        s.state,
        SnapshotState::Failed,
        "never used, pruned like a failed one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_record_adopts_the_disk_and_a_corrupt_one_stops_the_start() {
    let cloud = Cloud::start().await;
    let b = cloud.backend(cloud.settings()).await;
    let volume = b.open_volume("d1", 8 * MIB).await.unwrap();
    write(&volume, 7);
    let id = b.volume_id("d1").unwrap();
    drop((b, volume));
    let record = cloud.data_dir().join("aliyun/volumes.json");

    // Garbage in the record: the gateway does not start rather than guess.
    std::fs::write(&record, b"{ not json").unwrap();
    let err = AliyunBackend::open(cloud.settings(), &cloud.data_dir())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("volumes.json"), "{err}");

    // No record at all: the disk's volume is found by its tags, never replaced by a new one.
    std::fs::remove_file(&record).unwrap();
    let b = cloud.backend(cloud.settings()).await;
    let volume = b.open_volume("d1", 8 * MIB).await.unwrap();
    assert_eq!(b.volume_id("d1").as_deref(), Some(id.as_str()));
    assert_eq!(cloud.ecs.requests_of("CreateDisk").len(), 1);
    let mut byte = [0u8; 1];
    volume.read_at(&mut byte, 0).unwrap();
    assert_eq!(byte[0], 7, "the data is the disk's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_leaves_a_disk_another_instance_holds() {
    let cloud = Cloud::start().await;
    cloud
        .ecs
        .add_instance("i-someoneelse000000", &cloud.config.zone_id);
    let ecs = cloud.operator();
    let id = ecs
        .create_disk(&CreateDisk::new(&cloud.config.zone_id, 20))
        .await
        .unwrap();
    cloud.wait_status(&id, "Available").await;
    ecs.attach_disk("i-someoneelse000000", &id).await.unwrap();
    cloud.wait_status(&id, "In_use").await;
    cloud.record("d1", "tok-2", Some(&id));
    let b = cloud.backend(cloud.settings()).await;
    let err = b.release_volume("d1").await.unwrap_err().to_string();
    assert!(err.contains("i-someoneelse000000"), "{err}");
    assert_eq!(cloud.ecs.status_of(&id).as_deref(), Some("In_use"));
    assert!(cloud.ecs.requests_of("DetachDisk").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_per_snapshot_set_and_a_failed_one_is_made_again() {
    let cloud = Cloud::start().await;
    let settings = AliyunSettings {
        security_group_id: Some("sg-1".into()),
        ..cloud.settings()
    };
    let b = cloud.backend(settings).await;
    let mut snaps = Vec::new();
    for disk in ["boot", "data"] {
        let volume = Arc::new(b.open_volume(disk, 8 * MIB).await.unwrap());
        write(&volume, 9);
        let s = b.begin_snapshot(volume, request(disk, 1)).await.unwrap();
        snaps.push(wait(&s).await.unwrap());
    }
    // The first image ECS fails: the launch fails and says so; the next makes a new one.
    cloud.ecs.fail_next_images(1);
    let err = b.launch(vec![snaps[0].clone()], true).await.unwrap_err();
    assert!(err.to_string().contains("could not be created"), "{err}");
    let one = b.launch(vec![snaps[0].clone()], true).await.unwrap();
    let both = b.launch(snaps.clone(), true).await.unwrap();
    assert_ne!(
        one.image_id, both.image_id,
        "another data disk, another image"
    );
    let images = cloud.ecs.requests_of("CreateImage");
    assert_eq!(images.len(), 3, "failed, single disk, two disks");
    let p = |i: usize, k: &str| images[i].params.get(k).cloned().unwrap_or_default();
    assert_ne!(
        p(0, "ImageName"),
        p(1, "ImageName"),
        "a new name after a failure"
    );
    assert_eq!(p(2, "DiskDeviceMapping.1.DiskType"), "system");
    assert_eq!(p(2, "DiskDeviceMapping.2.DiskType"), "data");
    assert_eq!(p(2, "DiskDeviceMapping.2.Device"), "/dev/xvdb");
    assert_eq!(p(2, "DiskDeviceMapping.2.SnapshotId"), snaps[1].id);
}
