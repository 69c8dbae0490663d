//! The EC2 test harness itself (moto behind tests/common/ec2_proxy.rs): the gateway's
//! end-to-end AWS test relies on its udev emulation, random faults and failed snapshots, so
//! they are checked here, through the same sync_aws client the gateway uses.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use common::moto::Moto;
use common::proxy::FaultProxy;
use common::{client, gateway_instance, tags, Scratch, REGION};
use sync_aws::{RetryStatsSnapshot, SnapshotFilter, SnapshotState, VolumeState};

const WAIT: Duration = Duration::from_secs(30);

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udev_emulation_shows_attached_volumes_by_id() {
    let moto = Moto::start();
    let scratch = Scratch::new("udev");
    let by_id = scratch.0.join("by-id");
    let proxy = FaultProxy::start(&moto.url(), vec![])
        .await
        .with_udev(by_id.clone());
    let ec2 = client(&proxy.url());
    let gw = gateway_instance(&ec2).await;
    let az = ec2
        .describe_instance(&gw)
        .await
        .unwrap()
        .availability_zone
        .unwrap();
    let vol = ec2
        .create_volume(&az, 2, "udev-1", &tags(&[]))
        .await
        .unwrap();
    ec2.wait_volume_state(&vol, VolumeState::Available, WAIT)
        .await
        .unwrap();
    let path = proxy.by_id_path(vol.as_str());
    let hex = vol.as_str().strip_prefix("vol-").unwrap();
    assert_eq!(
        path,
        by_id.join(format!("nvme-Amazon_Elastic_Block_Store_vol{hex}"))
    );
    assert!(entries(&by_id).is_empty(), "not attached yet");

    ec2.attach_to_free_device(&vol, &gw).await.unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), 2 << 30, "the volume's size");
    assert!(meta.blocks() * 512 < meta.len(), "sparse: {meta:?}");
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(b"written while attached", 1 << 20)
        .unwrap();

    ec2.detach_volume(&vol).await.unwrap();
    assert!(entries(&by_id).is_empty(), "gone on detach");
    ec2.wait_volume_state(&vol, VolumeState::Available, WAIT)
        .await
        .unwrap();

    // Like EBS, the contents survive detach and attach.
    ec2.attach_to_free_device(&vol, &gw).await.unwrap();
    let mut buf = [0u8; 22];
    fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut buf, 1 << 20)
        .unwrap();
    assert_eq!(&buf, b"written while attached");

    ec2.detach_volume(&vol).await.unwrap();
    ec2.wait_volume_state(&vol, VolumeState::Available, WAIT)
        .await
        .unwrap();
    ec2.delete_volume(&vol).await.unwrap();
    assert!(entries(&by_id).is_empty());
    assert!(
        entries(&scratch.0.join("by-id.ebs")).is_empty(),
        "contents deleted with the volume"
    );
    assert_eq!(proxy.udev_errors(), Vec::<String>::new());
}

/// A little of everything the gateway does, one call after the other.
async fn workload(endpoint: &str, name: &str) -> RetryStatsSnapshot {
    let ec2 = client(endpoint);
    let disk = tags(&[("sync-gateway:disk", name)]);
    let vol = ec2
        .create_volume(&format!("{REGION}a"), 1, name, &disk)
        .await
        .unwrap();
    ec2.wait_volume_state(&vol, VolumeState::Available, WAIT)
        .await
        .unwrap();
    for _ in 0..3 {
        ec2.describe_volume(&vol).await.unwrap();
    }
    let snap = ec2.create_snapshot(&vol, name, &disk).await.unwrap();
    let found = ec2
        .describe_snapshots(&SnapshotFilter::Tags(disk.clone()))
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].id, snap);
    ec2.delete_snapshot(&snap).await.unwrap();
    ec2.delete_volume(&vol).await.unwrap();
    ec2.retry_stats().snapshot()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_are_retried_counted_and_reproducible() {
    let moto = Moto::start();
    let first = FaultProxy::start(&moto.url(), vec![])
        .await
        .with_random_faults(0.3, 7);
    let stats = workload(&first.url(), "random-1").await;
    let injected = first.injected_count();
    assert!(injected > 0, "{:?}", first.requests());
    let requests = first.requests();
    assert!(
        injected < requests.len() as u64,
        "{injected} of {}",
        requests.len()
    );
    for (action, n) in first.injected() {
        let faulted = first
            .requests_of(&action)
            .iter()
            .filter(|r| r.faulted)
            .count();
        assert_eq!(n, faulted as u64, "{action}");
    }
    // Every injected fault is retryable. Not all are counted: a lookup after a possibly
    // created snapshot is one attempt that may fail quietly.
    assert!(
        stats.retries > 0 && stats.retries <= injected,
        "{stats:?}, {injected} injected"
    );

    // Same seed, same sequence of requests: same faults.
    let second = FaultProxy::start(&moto.url(), vec![])
        .await
        .with_random_faults(0.3, 7);
    workload(&second.url(), "random-2").await;
    let pattern = |p: &FaultProxy| -> Vec<(String, bool)> {
        p.requests()
            .into_iter()
            .map(|r| (r.action, r.faulted))
            .collect()
    };
    assert_eq!(pattern(&first), pattern(&second));

    second.set_fault_rate(0.0);
    let before = second.injected_count();
    workload(&second.url(), "random-3").await;
    assert_eq!(second.injected_count(), before, "rate 0 stops them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_snapshots_are_reported_as_error() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url(), vec![]).await;
    let ec2 = client(&proxy.url());
    let vol = ec2
        .create_volume(&format!("{REGION}a"), 1, "snap-fail", &tags(&[]))
        .await
        .unwrap();
    let disk = tags(&[("sync-gateway:disk", "d-fail")]);

    proxy.fail_next_snapshots(1);
    let bad = ec2.create_snapshot(&vol, "bad", &disk).await.unwrap();
    let good = ec2.create_snapshot(&vol, "good", &disk).await.unwrap();
    assert_eq!(proxy.failed_snapshots(), vec![bad.as_str().to_owned()]);

    let all = ec2
        .describe_snapshots(&SnapshotFilter::Tags(disk.clone()))
        .await
        .unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    for s in &all {
        if s.id == bad {
            assert_eq!(s.state, SnapshotState::Error, "{s:?}");
            assert!(
                s.state_message
                    .as_deref()
                    .is_some_and(|m| m.contains("snapshot failed")),
                "{s:?}"
            );
        } else {
            assert_eq!(s.id, good);
            assert_eq!(s.state, SnapshotState::Completed, "{s:?}");
            assert_eq!(s.state_message, None);
        }
    }

    proxy.fail_snapshot(good.as_str());
    let by_id = ec2
        .describe_snapshots(&SnapshotFilter::Ids(vec![bad.clone(), good.clone()]))
        .await
        .unwrap();
    assert_eq!(by_id.len(), 2);
    assert!(
        by_id.iter().all(|s| s.state == SnapshotState::Error),
        "{by_id:?}"
    );
}
