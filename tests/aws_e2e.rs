//! The `aws` backend end to end through the real binaries: `sync-control`, `sync-gateway`
//! with `[backend] kind = "aws"` and `sync-agent`, against a moto server (EC2) behind a fault
//! proxy that injects throttling and server errors, records every request (moto drops parts of
//! RegisterImage, so the test asserts on what was sent) and plays udev (an attached volume
//! appears under the test's by-id directory as a file of the volume's size). The gateway's
//! instance metadata service is a fake on loopback. An independent client, boto3
//! (tests/aws_view.py), checks the result in moto.
//!
//! `MOTO_URL=http://127.0.0.1:PORT` uses a running moto instead of starting one (what
//! `scripts/e2e-aws` does when it is set); either way what the run created is left in moto.
//! Every endpoint is on 127.0.0.1.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;
#[path = "common/control.rs"]
mod control;
#[path = "common/ec2_proxy.rs"]
mod ec2_proxy;
#[path = "common/moto.rs"]
mod moto;
#[path = "common/proc_net.rs"]
mod proc_net;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use control::{control_plane_toml, ControlPlane};
use ec2_proxy::{Fault, FaultProxy};
use proc_net::connected_peers;
use sync_aws::testing::{FakeImds, FakeImdsConfig};
use sync_aws::{AwsSettings, Ec2, Imds, InstanceId, LaunchSpec};
use sync_gateway::api::{CommandState, DiskPhase, DiskState};

const MIB: u64 = 1 << 20;
const REGION: &str = "us-east-1";
/// The share of EC2 calls the proxy answers with throttling or a 5xx (the figure).
const FAULT_RATE: f64 = 0.3;

/// moto, the proxy, the fake IMDS and the gateway's own instance in moto.
struct Cloud {
    _moto: Option<moto::Moto>,
    moto_url: String,
    proxy: FaultProxy,
    imds: FakeImds,
    instance: InstanceId,
    by_id: PathBuf,
    /// Serves the proxy and the fake IMDS while the (blocking) test drives the processes.
    rt: tokio::runtime::Runtime,
}

impl Cloud {
    fn start(t: &TestDir, fault_rate: f64, faults: Vec<Fault>) -> Cloud {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (moto, moto_url) = match std::env::var("MOTO_URL") {
            Ok(url) => {
                assert!(
                    url.starts_with("http://127.") || url.starts_with("http://localhost"),
                    "MOTO_URL must be on loopback: {url}"
                );
                (None, url)
            }
            Err(_) => {
                let m = moto::Moto::start();
                let url = m.url();
                (Some(m), url)
            }
        };
        let by_id = t.path("dev-disk-by-id");
        std::fs::create_dir_all(&by_id).unwrap();
        let (proxy, imds, instance) = rt.block_on(async {
            // The gateway VM itself: an instance in moto, from one of moto's built-in AMIs.
            let ec2 = direct_client(&moto_url);
            let image = ec2.describe_images(None, None).await.unwrap()[0].id.clone();
            let instance = ec2
                .run_instances(&LaunchSpec {
                    image,
                    client_token: format!("gateway-{:x}", rand_u64()),
                    tags: BTreeMap::from([("Name".into(), "gateway VM (test harness)".into())]),
                })
                .await
                .unwrap();
            let zone = ec2
                .describe_instance(&instance)
                .await
                .unwrap()
                .availability_zone
                .unwrap();
            let imds = FakeImds::start(FakeImdsConfig {
                instance_id: instance.to_string(),
                region: REGION.into(),
                availability_zone: zone,
                ..FakeImdsConfig::default()
            })
            .await
            .unwrap();
            let proxy = FaultProxy::start(&moto_url, faults)
                .await
                .with_udev(by_id.clone())
                .with_random_faults(fault_rate, 20261126);
            (proxy, imds, instance)
        });
        Cloud {
            _moto: moto,
            moto_url,
            proxy,
            imds,
            instance,
            by_id,
            rt,
        }
    }

    /// The `[backend]` table of a gateway in this cloud.
    fn gateway_config(&self, t: &TestDir, cp: &ControlPlane) -> GatewayConfig {
        let token_file = t.path("bootstrap.token");
        std::fs::write(&token_file, format!("{}\n", cp.bootstrap_token())).unwrap();
        let q = |s: &str| format!("\"{s}\"");
        GatewayConfig::new(t.data_dir())
            .backend_kind("aws")
            .backend_option("region", q(REGION))
            .backend_option("endpoint_url", q(&self.proxy.url()))
            .backend_option("imds_endpoint", q(&self.imds.url()))
            .backend_option("device_dir", q(&self.by_id.display().to_string()))
            // moto only: static credentials instead of the instance profile's.
            .backend_option("access_key_id", q("testing"))
            .backend_option("secret_access_key", q("testing"))
            .backend_option("tags", "{ team = \"dr-test\" }")
            .extra_toml(&control_plane_toml(&cp.url, &token_file))
    }

    /// What boto3 sees in moto.
    fn boto3_view(&self) -> serde_json::Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/aws_view.py");
        let out = Command::new(venv_python())
            .arg(&script)
            .arg(&self.moto_url)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "aws_view.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// An EC2 client straight to moto (not through the proxy), for the harness's own set-up.
fn direct_client(moto_url: &str) -> Ec2 {
    let settings = AwsSettings {
        region: Some(REGION.into()),
        endpoint_url: Some(moto_url.into()),
        imds_endpoint: "http://127.0.0.1:9".into(),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        ..AwsSettings::default()
    };
    let imds = Imds::new(&settings.imds_endpoint).unwrap();
    Ec2::with_region(&settings, REGION.into(), &imds).unwrap()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

fn by_disk<'a>(items: &'a serde_json::Value, disk: &str) -> Vec<&'a serde_json::Value> {
    items
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| tag(v, "sync-gateway:disk") == Some(disk))
        .collect()
}

/// The lifecycle, with 30% of EC2 calls throttled or failed and the first EBS snapshot
/// failing: register with the identity document → assign (volume created, attached, found by
/// serial) → replicate with verification → checkpoint snapshot (failed, retaken) → pruning →
/// test launch → cutover → finalize (volume gone), checked through the control plane and
/// boto3.
#[test]
fn aws_lifecycle_through_the_real_binaries_with_throttling() {
    let _serial = serial();
    let t = TestDir::new("aws-e2e");
    let cloud = Cloud::start(&t, FAULT_RATE, Vec::new());
    let cp = ControlPlane::start_in(&t.path("control"), &[]);
    let config = cloud.gateway_config(&t, &cp);
    let mut gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway.log"));
    let gw_id = cp.online_gateway(Duration::from_secs(60));
    step(&format!(
        "gateway {gw_id} (instance {}) registered through {}",
        cloud.instance,
        cloud.proxy.url()
    ));

    // Registration carries the signed identity document from IMDS.
    let view = cp.gateway(&gw_id);
    let identity = view
        .identity
        .expect("identity document in the registration");
    assert_eq!(identity.provider, "aws");
    assert!(
        identity.document.contains(cloud.instance.as_str()),
        "{}",
        identity.document
    );
    assert_eq!(identity.signature, FakeImdsConfig::default().signature);
    assert!(
        cloud
            .imds
            .stats()
            .tokens_issued
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // Assign: an EBS volume of the disk's size rounded up to GiB, attached to the gateway,
    // found by its serial under the by-id directory.
    let size = 48 * MIB;
    let src = t.source_path("web-01");
    make_uefi_image(&src, size, 401);
    let key = t.key_path("web-01");
    let cmd = cp.assign(&gw_id, "web-01", size, &key);
    let done = cp.wait_command(&cmd, Duration::from_secs(180));
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");
    let disk = cp.wait_disk("web-01", "the volume id in the status", |d| {
        d.volume_id.is_some()
    });
    let volume = disk.volume_id.unwrap();
    let creates = cloud.proxy.requests_of("CreateVolume");
    let create = creates.iter().find(|r| !r.faulted).unwrap();
    assert_eq!(create.params.get("Size").map(String::as_str), Some("1"));
    assert_eq!(
        create.params.get("VolumeType").map(String::as_str),
        Some("gp3")
    );
    assert!(create.params.contains_key("ClientToken"), "{create:?}");
    let attach = cloud
        .proxy
        .requests_of("AttachVolume")
        .into_iter()
        .find(|r| !r.faulted)
        .unwrap();
    assert_eq!(
        attach.params.get("InstanceId").map(String::as_str),
        Some(cloud.instance.as_str())
    );
    assert_eq!(attach.params.get("VolumeId"), Some(&volume));
    let device = cloud.proxy.by_id_path(&volume);
    step(&format!(
        "disk web-01 assigned: volume {volume} attached, device {}",
        device.display()
    ));
    assert!(device.exists(), "udev emulation made {}", device.display());

    // The first EBS snapshot fails in EC2; the volume is unchanged after the checkpoint, so
    // the gateway takes it again and the checkpoint stands on the retaken one.
    cloud.proxy.fail_next_snapshots(1);
    let agent = AgentCmd::new(gw.addr, "web-01", &key, &t.state_dir("web-01"), &src);
    let run = agent.run(Duration::from_secs(300));
    run.expect_verified();
    let first_snap = run.str("snapshot_id");
    assert!(first_snap.starts_with("snap-"), "{first_snap}");
    assert_device_holds(&device, &src, "the staging volume after the first pass");
    let disk = cp.wait_disk("web-01", "the retaken snapshot to complete", |d| {
        d.state == DiskState::Continuous
            && d.snapshots
                .iter()
                .any(|s| s.id != first_snap && s.state == "completed")
    });
    assert_eq!(
        cloud.proxy.failed_snapshots(),
        vec![first_snap.clone()],
        "the proxy failed the first snapshot"
    );
    let retaken = disk
        .snapshots
        .iter()
        .find(|s| s.id != first_snap && s.state == "completed")
        .unwrap()
        .id
        .clone();
    let cloud_status = wait_for(Duration::from_secs(30), "cloud status", || {
        cp.cloud_status().filter(|c| c.snapshots_retried >= 1)
    });
    step(&format!(
        "first pass replicated and verified; snapshot {first_snap} failed in EC2, retaken as \
         {retaken}"
    ));
    assert_eq!(cloud_status.instance_id, cloud.instance.as_str());
    assert_eq!(cloud_status.region, REGION);

    // A retention policy of one bucket: each checkpoint prunes the one before.
    cp.command_ok(&[
        "policy",
        "set",
        "--gateway",
        &gw_id,
        "--retention",
        "1000000000:1000000000",
    ]);
    // A restart finds the same volume again (by its client-token tag and attachment) and the
    // next pass is incremental.
    assert_eq!(gw.terminate(Duration::from_secs(30)).code(), Some(0));
    let mut gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway-2.log"));
    let disk = cp.wait_disk("web-01", "the disk back after the restart", |d| {
        d.state == DiskState::Continuous && d.volume_id.as_deref() == Some(volume.as_str())
    });
    assert_eq!(disk.durable_seq, run.u64("checkpoint_seq"), "{disk:?}");
    let created = cloud.proxy.requests_of("CreateVolume");
    assert_eq!(
        created.iter().filter(|r| !r.faulted).count(),
        1,
        "no second volume after the restart: {created:?}"
    );
    step(&format!(
        "gateway restarted: same volume {volume}, same durable point"
    ));
    let agent = AgentCmd::new(gw.addr, "web-01", &key, &t.state_dir("web-01"), &src);
    change_uefi_image(&src, 10, 402);
    let run = agent.run(Duration::from_secs(300));
    assert!(
        run.u64("bytes_sent_wire") < size / 2,
        "the pass after the restart is incremental: {}",
        run.describe()
    );
    run.expect_verified();
    let second_snap = run.str("snapshot_id");
    assert_device_holds(&device, &src, "the staging volume after the second pass");
    let disk = cp.wait_disk("web-01", "pruning of the first checkpoint", |d| {
        d.state == DiskState::Continuous
            && d.snapshots.iter().all(|s| s.id == second_snap)
            && !d.snapshots.is_empty()
    });
    assert_eq!(
        disk.last_checkpoint.as_ref().unwrap().snapshot_id,
        second_snap
    );
    assert!(
        cloud
            .proxy
            .requests_of("DeleteSnapshot")
            .iter()
            .any(|r| !r.faulted && r.params.get("SnapshotId") == Some(&retaken)),
        "the retaken first snapshot was pruned with DeleteSnapshot"
    );

    step(&format!(
        "second pass: checkpoint snapshot {second_snap}; {retaken} pruned by retention"
    ));
    // Test launch from the latest checkpoint: an AMI whose root is that snapshot, UEFI (the
    // source's partition table), ENA; an instance from it.
    let v = cp.command_ok(&["cutover", "--test", "--disk-id", "web-01"]);
    let test_launch = v["result"]["output"]["launch"].clone();
    let test_instance = test_launch["instance_id"].as_str().unwrap().to_string();
    let test_image = test_launch["image_id"].as_str().unwrap().to_string();
    assert_eq!(test_launch["test"], true);
    assert_eq!(test_launch["disks"][0]["snapshot_id"], second_snap.as_str());
    let register = cloud
        .proxy
        .requests_of("RegisterImage")
        .into_iter()
        .find(|r| !r.faulted)
        .unwrap();
    let p = |k: &str| register.params.get(k).map(String::as_str);
    assert_eq!(p("RootDeviceName"), Some("/dev/xvda"));
    assert_eq!(p("BlockDeviceMapping.1.DeviceName"), Some("/dev/xvda"));
    assert_eq!(
        p("BlockDeviceMapping.1.Ebs.SnapshotId"),
        Some(second_snap.as_str())
    );
    assert_eq!(p("BootMode"), Some("uefi"));
    assert_eq!(p("EnaSupport"), Some("true"));
    assert_eq!(p("Architecture"), Some("x86_64"));
    let run_req = cloud
        .proxy
        .requests_of("RunInstances")
        .into_iter()
        .find(|r| !r.faulted && r.params.get("ImageId") == Some(&test_image))
        .unwrap();
    assert!(run_req.params.contains_key("ClientToken"), "{run_req:?}");
    step(&format!(
        "test launch: AMI {test_image} (root {second_snap}, uefi, ENA), instance {test_instance}"
    ));
    // Replication goes on after a test launch.
    assert_eq!(cp.disk("web-01").unwrap().phase, DiskPhase::Replicating);

    // The test launch's AMI holds its snapshot: EC2 refuses DeleteSnapshot with
    // InvalidSnapshot.InUse (moto does not link registered AMIs to snapshots, so the proxy
    // answers it). Retention keeps that one and still prunes the others.
    let mut passes = Vec::new();
    for seed in [403, 404] {
        cloud.proxy.add_fault(Fault::error(
            "DeleteSnapshot",
            1,
            400,
            "InvalidSnapshot.InUse",
        ));
        change_uefi_image(&src, 2, seed);
        let run = agent.run(Duration::from_secs(300));
        run.expect_ok();
        passes.push(run.str("snapshot_id"));
    }
    let third = passes[0].clone();
    let disk = cp.wait_disk("web-01", "pruning around the in-use snapshot", |d| {
        let ids: Vec<&str> = d.snapshots.iter().map(|s| s.id.as_str()).collect();
        d.last_checkpoint.as_ref().map(|c| c.snapshot_id.as_str()) == Some(passes[1].as_str())
            && ids.contains(&second_snap.as_str())
            && !ids.contains(&third.as_str())
    });
    assert!(
        gw.log_text()
            .contains("retention keeps a snapshot the cloud holds for an image"),
        "{disk:?}"
    );
    step(&format!(
        "two more passes: {second_snap} kept (in use by the test AMI), {third} pruned"
    ));

    // Cutover: a final snapshot at the checkpoint, an AMI and an instance, replication stopped.
    let v = cp.command_ok(&["cutover", "--disk-id", "web-01"]);
    let launch = v["result"]["output"]["launch"].clone();
    assert_eq!(launch["test"], false);
    let cut_instance = launch["instance_id"].as_str().unwrap().to_string();
    let cut_snap = launch["disks"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    let disk = cp.wait_disk("web-01", "the disk paused after cutover", |d| {
        d.state == DiskState::Paused
    });
    assert_eq!(disk.phase, DiskPhase::CutOver);
    wait_for(
        Duration::from_secs(60),
        "both launches in the status",
        || {
            let launches = cp.status().launches;
            let ids: Vec<_> = launches
                .iter()
                .map(|l| l.launch.instance_id.clone())
                .collect();
            (ids.contains(&test_instance) && ids.contains(&cut_instance)).then_some(())
        },
    );

    // The operator's table shows the cloud side: where, retries, volume, images.
    let table = cp.cli_ok(&["status"]);
    for want in [
        format!("aws {REGION}"),
        "API retries".to_string(),
        volume.clone(),
        test_image.clone(),
    ] {
        assert!(table.contains(&want), "{want:?} in\n{table}");
    }
    step(&format!(
        "cutover: final snapshot {cut_snap}, instance {cut_instance}; replication stopped"
    ));
    // Finalize: the staging volume is detached and deleted; snapshots, AMIs and instances stay.
    cp.command_ok(&["finalize", "--disk-id", "web-01"]);
    assert!(
        !device.exists(),
        "udev emulation removed the device on detach"
    );

    step(&format!("finalized: volume {volume} detached and deleted"));
    // What an independent client sees in moto.
    let seen = cloud.boto3_view();
    let volumes = seen["volumes"].as_array().unwrap();
    assert!(
        !volumes.iter().any(|v| v["id"] == volume.as_str()),
        "the staging volume {volume} is gone: {volumes:?}"
    );
    // The launched instances' root volumes are theirs, tagged as launches, and stay.
    assert_eq!(
        by_disk(&seen["volumes"], "web-01")
            .iter()
            .filter(|v| tag(v, "sync-gateway:launch").is_some())
            .count(),
        2,
        "{volumes:?}"
    );
    let snaps = by_disk(&seen["snapshots"], "web-01");
    let ids: Vec<&str> = snaps.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert!(
        ids.contains(&second_snap.as_str()) && ids.contains(&cut_snap.as_str()),
        "{ids:?}"
    );
    assert!(
        !ids.contains(&first_snap.as_str()) && !ids.contains(&retaken.as_str()),
        "failed and pruned snapshots are deleted: {ids:?}"
    );
    for s in &snaps {
        assert_eq!(
            tag(s, "sync-gateway:gateway"),
            Some(cloud.instance.as_str())
        );
        assert_eq!(tag(s, "sync-gateway:managed"), Some("true"));
        assert_eq!(tag(s, "team"), Some("dr-test"), "configured tags: {s}");
        assert!(tag(s, "sync-gateway:checkpoint").is_some(), "{s}");
        assert!(tag(s, "sync-gateway:created-ms").is_some(), "{s}");
    }
    let images: Vec<&str> = seen["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert!(images.contains(&test_image.as_str()), "{images:?}");
    let instances = by_disk(&seen["instances"], "web-01");
    for (id, kind) in [(&test_instance, "test"), (&cut_instance, "cutover")] {
        let i = instances
            .iter()
            .find(|i| i["id"] == id.as_str())
            .unwrap_or_else(|| panic!("instance {id} in {instances:?}"));
        assert_eq!(i["state"], "running", "{i}");
        assert_eq!(tag(i, "sync-gateway:launch"), Some(kind));
    }

    // The faults were real and the status counted the retries.
    assert!(
        cloud.proxy.injected_count() >= 5,
        "{:?}",
        cloud.proxy.injected()
    );
    let cloud_status = wait_for(Duration::from_secs(30), "retries in the status", || {
        cp.cloud_status()
            .filter(|c| c.api_retries >= 5 && c.api_throttled >= 1)
    });
    step(&format!(
        "faults injected {:?}; the gateway reports {} retries ({} throttled)",
        cloud.proxy.injected(),
        cloud_status.api_retries,
        cloud_status.api_throttled
    ));
    assert!(
        cloud.proxy.udev_errors().is_empty(),
        "{:?}",
        cloud.proxy.udev_errors()
    );
    // Every EC2 action the gateway called is allowed by the instance role's policy.
    let allowed = policy_actions("aws/iam-policy.json", "2012-10-17");
    let called: std::collections::BTreeSet<String> = cloud
        .proxy
        .requests()
        .into_iter()
        .map(|r| format!("ec2:{}", r.action))
        .collect();
    let missing: Vec<&String> = called.iter().filter(|a| !allowed.contains(*a)).collect();
    assert!(
        missing.is_empty(),
        "not in aws/iam-policy.json: {missing:?}"
    );
    // Every connection the gateway holds (to the EC2 proxy, the fake IMDS, the control plane,
    // agents) is on loopback; its metadata calls went to the fake.
    let peers = connected_peers(gw.pid());
    assert!(!peers.is_empty(), "the gateway holds pooled connections");
    assert!(
        peers.iter().all(|p| p.ip().is_loopback()),
        "non-loopback peers: {peers:?}"
    );
    assert!(
        cloud
            .imds
            .stats()
            .gets_served
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3,
        "identity came from the fake IMDS"
    );
    assert_eq!(gw.terminate(Duration::from_secs(30)).code(), Some(0));
    drop(cloud.rt);
}

/// A missing IAM permission fails the command with the action named and AWS's code and request
/// id, and the gateway keeps running.
#[test]
fn access_denied_names_the_missing_action() {
    let _serial = serial();
    let t = TestDir::new("aws-denied");
    let denied = Fault::error("CreateVolume", 1, 403, "UnauthorizedOperation");
    let cloud = Cloud::start(&t, 0.0, vec![denied]);
    let cp = ControlPlane::start_in(&t.path("control"), &[]);
    let config = cloud.gateway_config(&t, &cp);
    let mut gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway.log"));
    let gw_id = cp.online_gateway(Duration::from_secs(60));
    let key = t.key_path("db-01");
    let cmd = cp.assign(&gw_id, "db-01", 8 * MIB, &key);
    let done = cp.wait_command(&cmd, Duration::from_secs(180));
    assert_eq!(done.state, CommandState::Failed, "{done:?}");
    let message = done.result.map(|r| r.message).unwrap_or_default();
    assert!(
        message.contains("ec2:CreateVolume") && message.contains("UnauthorizedOperation"),
        "{message}"
    );
    assert!(message.contains("request id"), "{message}");
    assert!(gw.is_alive());
    // Once the permission is there, assigning again works.
    let cmd = cp.assign(&gw_id, "db-01", 8 * MIB, &key);
    assert_eq!(
        cp.wait_command(&cmd, Duration::from_secs(180)).state,
        CommandState::Succeeded
    );
    assert_eq!(gw.terminate(Duration::from_secs(30)).code(), Some(0));
    drop(cloud.rt);
}
