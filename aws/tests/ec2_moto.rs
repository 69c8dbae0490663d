//! sync-aws against a real moto server: volumes, snapshots, images, instances, errors and
#![allow(clippy::unwrap_used)]
//! retries. moto answers at once and never fails on its own; the fault proxy supplies the
//! throttling, lost responses and access denials that real EC2 produces.

mod common;

use std::time::Duration;

use common::moto::Moto;
use common::proxy::{Fault, FaultProxy};
use common::{client, gateway_instance, settings, tags, REGION};
use sync_aws::testing::{FakeImds, FakeImdsConfig};
use sync_aws::{
    AwsSettings, BootMode, Ec2, ErrorKind, ImageSpec, Imds, LaunchSpec, SnapshotFilter,
    SnapshotState, VolumeId, VolumeState, MANAGED_TAG_KEY,
};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_create_attach_detach_delete() {
    let moto = Moto::start();
    let ec2 = client(&moto.url());
    let gw = gateway_instance(&ec2).await;
    let az = ec2
        .describe_instance(&gw)
        .await
        .unwrap()
        .availability_zone
        .unwrap();

    let call_tags = tags(&[("sync-gateway:disk", "disk-1")]);
    let vol = ec2
        .create_volume(&az, 3, "disk-1-staging", &call_tags)
        .await
        .unwrap();
    let again = ec2
        .create_volume(&az, 3, "disk-1-staging", &call_tags)
        .await
        .unwrap();
    assert_eq!(vol, again, "same client token, same volume");
    let other = ec2
        .create_volume(&az, 3, "disk-2-staging", &call_tags)
        .await
        .unwrap();
    assert_ne!(vol, other, "another token, another volume");
    ec2.delete_volume(&other).await.unwrap();

    let info = ec2
        .wait_volume_state(&vol, VolumeState::Available, WAIT)
        .await
        .unwrap();
    assert_eq!(info.size_gib, 3);
    assert_eq!(info.availability_zone, az);
    assert_eq!(
        info.tags.get("team").map(String::as_str),
        Some("migration"),
        "settings tag"
    );
    assert_eq!(
        info.tags.get("sync-gateway:disk").map(String::as_str),
        Some("disk-1"),
        "call tag"
    );
    assert_eq!(
        info.tags.get(MANAGED_TAG_KEY).map(String::as_str),
        Some("true")
    );

    assert_eq!(ec2.free_device_name(&gw).await.unwrap(), "/dev/sdf");
    let device = ec2.attach_to_free_device(&vol, &gw).await.unwrap();
    assert_eq!(device, "/dev/sdf");
    let info = ec2.wait_attached(&vol, &gw, WAIT).await.unwrap();
    assert_eq!(info.state, VolumeState::InUse);
    assert_eq!(info.attachments[0].device, "/dev/sdf");
    // a retried attach (first response lost) is not an error
    ec2.attach_volume(&vol, &gw, "/dev/sdf").await.unwrap();
    let inst = ec2.describe_instance(&gw).await.unwrap();
    assert!(
        inst.block_devices
            .iter()
            .any(|(d, v)| d == "/dev/sdf" && v.as_ref() == Some(&vol)),
        "{inst:?}"
    );
    assert_eq!(
        ec2.free_device_name(&gw).await.unwrap(),
        "/dev/sdg",
        "sdf is taken now"
    );

    ec2.detach_volume(&vol).await.unwrap();
    ec2.wait_volume_state(&vol, VolumeState::Available, WAIT)
        .await
        .unwrap();
    ec2.detach_volume(&vol).await.unwrap(); // already detached: fine
    ec2.delete_volume(&vol).await.unwrap();
    ec2.delete_volume(&vol).await.unwrap(); // already gone: fine
    let err = ec2.describe_volume(&vol).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert_eq!(ec2.retry_stats().snapshot().retries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_tagged_found_by_tag_and_deleted() {
    let moto = Moto::start();
    let ec2 = client(&moto.url());
    let vol = ec2
        .create_volume(&format!("{REGION}a"), 1, "snap-test", &tags(&[]))
        .await
        .unwrap();
    ec2.wait_volume_state(&vol, VolumeState::Available, WAIT)
        .await
        .unwrap();

    let t = tags(&[
        ("sync-gateway:disk", "disk-7"),
        ("sync-gateway:gateway", "gw-1"),
        ("sync-gateway:label", "checkpoint-42"),
        ("sync-gateway:time", "2026-11-26T12:00:00Z"),
    ]);
    let snap = ec2
        .create_snapshot(&vol, "disk-7 checkpoint-42", &t)
        .await
        .unwrap();
    let other = ec2
        .create_snapshot(
            &vol,
            "another disk",
            &tags(&[("sync-gateway:disk", "disk-8")]),
        )
        .await
        .unwrap();

    let found = ec2
        .describe_snapshots(&SnapshotFilter::Tags(tags(&[(
            "sync-gateway:disk",
            "disk-7",
        )])))
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let s = &found[0];
    assert_eq!(s.id, snap);
    assert_eq!(s.volume_id.as_ref(), Some(&vol));
    // moto: born completed. Real EBS: pending for minutes, sometimes error.
    assert_eq!(s.state, SnapshotState::Completed);
    assert!(s.start_time.is_some());
    for (k, v) in &t {
        assert_eq!(s.tags.get(k), Some(v), "tag {k}");
    }
    assert_eq!(s.tags.get("team").map(String::as_str), Some("migration"));

    let by_id = ec2
        .describe_snapshots(&SnapshotFilter::Ids(vec![snap.clone(), other.clone()]))
        .await
        .unwrap();
    assert_eq!(by_id.len(), 2);

    ec2.delete_snapshot(&snap).await.unwrap();
    ec2.delete_snapshot(&snap).await.unwrap(); // already gone: fine
    let found = ec2
        .describe_snapshots(&SnapshotFilter::Tags(tags(&[(
            "sync-gateway:disk",
            "disk-7",
        )])))
        .await
        .unwrap();
    assert!(found.is_empty(), "{found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_image_from_snapshots_and_launch() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url(), vec![]).await;
    let mut s = settings(&proxy.url());
    s.instance_type = Some("m5.large".into());
    let imds = Imds::new(&s.imds_endpoint).unwrap();
    let ec2 = Ec2::with_region(&s, REGION.into(), &imds)
        .unwrap()
        .with_retry_policy(common::quick_retries());

    let az = format!("{REGION}a");
    let boot = ec2.create_volume(&az, 8, "boot", &tags(&[])).await.unwrap();
    let data = ec2.create_volume(&az, 4, "data", &tags(&[])).await.unwrap();
    let boot_snap = ec2
        .create_snapshot(&boot, "boot", &tags(&[]))
        .await
        .unwrap();
    let data_snap = ec2
        .create_snapshot(&data, "data", &tags(&[]))
        .await
        .unwrap();

    let spec = ImageSpec {
        name: "sync-cutover-disk-1-20261126".into(),
        description: Some("cutover of disk-1".into()),
        root_snapshot: boot_snap.clone(),
        root_device: "/dev/xvda".into(),
        extra_snapshots: vec![("/dev/sdb".into(), data_snap.clone())],
        boot_mode: BootMode::Uefi,
        ena: true,
        tags: tags(&[("sync-gateway:launch", "cutover")]),
    };
    let image = ec2.register_image(&spec).await.unwrap();
    let info = ec2.describe_image(&image).await.unwrap();
    assert_eq!(info.name.as_deref(), Some(spec.name.as_str()));

    // moto keeps only name and description of RegisterImage, so check what was sent.
    let reg = proxy.requests_of("RegisterImage");
    assert_eq!(reg.len(), 1);
    let p = &reg[0].params;
    assert_eq!(
        p.get("RootDeviceName").map(String::as_str),
        Some("/dev/xvda")
    );
    assert_eq!(
        p.get("BlockDeviceMapping.1.DeviceName").map(String::as_str),
        Some("/dev/xvda")
    );
    assert_eq!(
        p.get("BlockDeviceMapping.1.Ebs.SnapshotId"),
        Some(&boot_snap.0)
    );
    assert_eq!(
        p.get("BlockDeviceMapping.2.DeviceName").map(String::as_str),
        Some("/dev/sdb")
    );
    assert_eq!(
        p.get("BlockDeviceMapping.2.Ebs.SnapshotId"),
        Some(&data_snap.0)
    );
    assert_eq!(p.get("BootMode").map(String::as_str), Some("uefi"));
    assert_eq!(p.get("EnaSupport").map(String::as_str), Some("true"));
    assert_eq!(p.get("VirtualizationType").map(String::as_str), Some("hvm"));
    assert_eq!(p.get("Architecture").map(String::as_str), Some("x86_64"));

    let launch = LaunchSpec {
        image: image.clone(),
        client_token: "cutover-disk-1".into(),
        tags: tags(&[("Name", "disk-1")]),
    };
    let instance = ec2.run_instances(&launch).await.unwrap();
    let inst = ec2.describe_instance(&instance).await.unwrap();
    assert_eq!(inst.image_id.as_ref(), Some(&image));
    assert_eq!(inst.instance_type.as_deref(), Some("m5.large"));
    assert!(
        matches!(inst.state.as_str(), "pending" | "running"),
        "{}",
        inst.state
    );
    assert_eq!(inst.tags.get("Name").map(String::as_str), Some("disk-1"));
    let run = proxy.requests_of("RunInstances");
    assert_eq!(
        run[0].params.get("ClientToken").map(String::as_str),
        Some("cutover-disk-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_volume_is_not_found_with_code_and_request_id() {
    let moto = Moto::start();
    let ec2 = client(&moto.url());
    let err = ec2
        .describe_volume(&VolumeId::from("vol-0123456789abcdef0"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert_eq!(err.op, "ec2:DescribeVolumes");
    assert_eq!(err.code.as_deref(), Some("InvalidVolume.NotFound"));
    assert!(
        err.request_id.as_deref().is_some_and(|id| !id.is_empty()),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("InvalidVolume.NotFound") && text.contains("request id"),
        "{text}"
    );
    assert_eq!(
        ec2.retry_stats().snapshot().retries,
        0,
        "NotFound of an unknown id is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_and_counted() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url(), vec![Fault::throttle("CreateVolume", 3)]).await;
    let ec2 = client(&proxy.url());
    let vol = ec2
        .create_volume(&format!("{REGION}a"), 1, "throttled", &tags(&[]))
        .await
        .unwrap();
    let stats = ec2.retry_stats().snapshot();
    assert_eq!(stats.retries, 3, "{stats:?}");
    assert_eq!(stats.throttled, 3);
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("RequestLimitExceeded")),
        "{stats:?}"
    );
    let sent = proxy.requests_of("CreateVolume");
    assert_eq!(sent.len(), 4);
    assert!(sent
        .iter()
        .all(|r| r.params.get("ClientToken").map(String::as_str) == Some("throttled")));
    assert_eq!(
        proxy.requests_of("DescribeVolumes").len(),
        1,
        "one look-up of the token tag first"
    );
    ec2.describe_volume(&vol).await.unwrap();
}

/// EC2 is eventually consistent: right after CreateVolume, DescribeVolumes may answer
/// `InvalidVolume.NotFound` for the new id. That is retried for a fresh resource only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_volume_not_yet_visible_is_waited_for() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url(), Vec::new()).await;
    let ec2 = client(&proxy.url());
    let vol = ec2
        .create_volume(&format!("{REGION}a"), 1, "fresh", &tags(&[]))
        .await
        .unwrap();
    let before = ec2.retry_stats().snapshot().retries;
    proxy.add_fault(Fault::error(
        "DescribeVolumes",
        2,
        400,
        "InvalidVolume.NotFound",
    ));
    let info = ec2.describe_volume(&vol).await.unwrap();
    assert_eq!(info.id, vol);
    assert_eq!(ec2.retry_stats().snapshot().retries - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_give_up_after_the_policy_and_keep_the_error() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.url(), vec![Fault::throttle("DescribeVolumes", 100)]).await;
    let ec2 = client(&proxy.url());
    let err = ec2
        .describe_volume(&VolumeId::from("vol-0123456789abcdef0"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Throttled);
    assert_eq!(err.code.as_deref(), Some("RequestLimitExceeded"));
    assert!(
        err.request_id
            .as_deref()
            .is_some_and(|id| id.starts_with("fault-proxy-")),
        "{err:?}"
    );
    assert_eq!(
        proxy.requests_of("DescribeVolumes").len(),
        6,
        "max_attempts of quick_retries"
    );
    assert_eq!(ec2.retry_stats().snapshot().retries, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_create_snapshot_response_does_not_make_a_second_snapshot() {
    let moto = Moto::start();
    let lost = Fault {
        action: Some("CreateSnapshot".into()),
        times: 1,
        status: 500,
        code: "InternalError".into(),
        forward_first: true,
    };
    let proxy = FaultProxy::start(&moto.url(), vec![lost]).await;
    let ec2 = client(&proxy.url());
    let vol = ec2
        .create_volume(&format!("{REGION}a"), 1, "lost", &tags(&[]))
        .await
        .unwrap();
    let snap = ec2
        .create_snapshot(&vol, "once", &tags(&[("sync-gateway:disk", "d-lost")]))
        .await
        .unwrap();
    let all = ec2
        .describe_snapshots(&SnapshotFilter::Tags(tags(&[(
            "sync-gateway:disk",
            "d-lost",
        )])))
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].id, snap);
    assert_eq!(
        proxy.requests_of("CreateSnapshot").len(),
        1,
        "found by its request tag, not created again"
    );
    assert_eq!(ec2.retry_stats().snapshot().retries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_names_the_missing_action() {
    let moto = Moto::start();
    let denied = Fault::error("CreateSnapshot", 1, 403, "UnauthorizedOperation");
    let proxy = FaultProxy::start(&moto.url(), vec![denied]).await;
    let ec2 = client(&proxy.url());
    let vol = ec2
        .create_volume(&format!("{REGION}a"), 1, "denied", &tags(&[]))
        .await
        .unwrap();
    let err = ec2
        .create_snapshot(&vol, "x", &tags(&[]))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind,
        ErrorKind::AccessDenied {
            action: "ec2:CreateSnapshot".into()
        }
    );
    assert!(
        err.to_string().contains("lacks ec2:CreateSnapshot"),
        "{err}"
    );
    assert!(err.request_id.is_some());
    assert_eq!(
        ec2.retry_stats().snapshot().retries,
        0,
        "a denial is not retried"
    );
}

/// The production path, on loopback: region and credentials both from (fake) IMDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_and_credentials_from_imds() {
    let moto = Moto::start();
    let fake = FakeImds::start(FakeImdsConfig::default()).await.unwrap();
    let s = AwsSettings {
        endpoint_url: Some(moto.url()),
        imds_endpoint: fake.url(),
        ..AwsSettings::default()
    };
    let imds = Imds::new(&s.imds_endpoint).unwrap();
    let ec2 = Ec2::connect(&s, &imds).await.unwrap();
    assert_eq!(ec2.region(), "us-east-1");
    assert!(!ec2.describe_images(None, None).await.unwrap().is_empty());
    let served = fake
        .stats()
        .gets_served
        .load(std::sync::atomic::Ordering::Relaxed);
    // region, role listing, role credentials
    assert!(served >= 3, "{served}");
    assert_eq!(
        fake.stats()
            .unauthorized
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
