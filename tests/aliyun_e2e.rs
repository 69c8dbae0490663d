//! The `aliyun` backend end to end through the real binaries: `sync-control`, `sync-gateway`
//! with `[backend] kind = "aliyun"` and `sync-agent`, against the project's local ECS server
//! (signature V3 checked on every request, disks/snapshots/images/instances with asynchronous
//! state changes, udev played under the test's by-id directory) and a local metadata service
//! in hardened mode that hands out the RAM role's STS credentials. No emulator of Alibaba
//! Cloud exists; the servers are `sync_aliyun::testing`. An independent client, Alibaba's own
//! Python SDK (tests/aliyun_view.py), reads the result from the local ECS server.
//!
//! Every endpoint is on 127.0.0.1.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;
#[path = "common/control.rs"]
mod control;
#[path = "common/proc_net.rs"]
mod proc_net;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use control::{control_plane_toml, ControlPlane};
use proc_net::connected_peers;
use sync_aliyun::oss::{OssClient, OssConfig};
use sync_aliyun::testing::ecs_server::{EcsServer, EcsServerConfig, Fault};
use sync_aliyun::testing::meta_server::{FakeMetaConfig, FakeMetaServer};
use sync_aliyun::testing::oss_server::{OssServer, OssServerConfig};
use sync_aliyun::Credentials;
use sync_gateway::api::{CommandState, DiagnosticsBundle, DiskPhase, DiskState};

const MIB: u64 = 1 << 20;
const SECURITY_GROUP: &str = "sg-bp1e2etestgroup000";
const DIAG_BUCKET: &str = "gateway-diagnostics";

/// The local ECS and OSS servers, the metadata service, and the by-id directory the ECS
/// server plays udev in.
struct Cloud {
    ecs: EcsServer,
    oss: OssServer,
    meta: FakeMetaServer,
    meta_config: FakeMetaConfig,
    by_id: PathBuf,
    /// Serves both while the (blocking) test drives the processes.
    rt: tokio::runtime::Runtime,
}

impl Cloud {
    fn start(t: &TestDir) -> Cloud {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let by_id = t.path("dev-disk-by-id");
        std::fs::create_dir_all(&by_id).unwrap();
        let meta_config = FakeMetaConfig::default();
        let oss_root = t.path("oss");
        let (ecs, oss, meta) = rt.block_on(async {
            let meta = FakeMetaServer::start(meta_config.clone()).await.unwrap();
            // The servers know the role's STS key only: every call must carry the token.
            let sts = role_credentials(&meta_config);
            let ecs = EcsServer::start(EcsServerConfig::new(
                meta_config.region_id.clone(),
                vec![sts.clone()],
            ))
            .await
            .unwrap();
            ecs.add_instance(&meta_config.instance_id, &meta_config.zone_id);
            ecs.set_device_dir(&by_id);
            let oss = OssServer::start(OssServerConfig {
                region: meta_config.region_id.clone(),
                bucket: DIAG_BUCKET.into(),
                keys: vec![sts],
                root: oss_root,
            })
            .await
            .unwrap();
            (ecs, oss, meta)
        });
        Cloud {
            ecs,
            oss,
            meta,
            meta_config,
            by_id,
            rt,
        }
    }

    fn gateway_config(&self, t: &TestDir, cp: &ControlPlane) -> GatewayConfig {
        let token_file = t.path("bootstrap.token");
        std::fs::write(&token_file, format!("{}\n", cp.bootstrap_token())).unwrap();
        let q = |s: &str| format!("\"{s}\"");
        GatewayConfig::new(t.data_dir())
            .backend_kind("aliyun")
            .backend_option("ecs_endpoint", q(&self.ecs.endpoint()))
            .backend_option("meta_endpoint", q(&self.meta.url()))
            .backend_option("device_dir", q(&self.by_id.display().to_string()))
            .backend_option("security_group_id", q(SECURITY_GROUP))
            .backend_option("performance_level", q("PL0"))
            .backend_option("tags", "{ team = \"dr-test\" }")
            .extra_toml(&control_plane_toml(&cp.url, &token_file))
            .extra_toml(&format!(
                "[diagnostics]\noss_bucket = \"{DIAG_BUCKET}\"\noss_endpoint = \"{}\"\n",
                self.oss.endpoint()
            ))
    }

    /// An object in the local OSS bucket.
    fn oss_object(&self, key: &str) -> Vec<u8> {
        let client = OssClient::new(
            OssConfig {
                endpoint: Some(self.oss.endpoint()),
                ..OssConfig::new(&self.meta_config.region_id, DIAG_BUCKET)
            },
            role_credentials(&self.meta_config),
        )
        .unwrap();
        self.rt
            .block_on(async { client.get_object(key, None).await?.bytes().await })
            .unwrap()
    }

    fn device(&self, disk_id: &str) -> PathBuf {
        self.by_id
            .join(format!("virtio-{}", disk_id.trim_start_matches("d-")))
    }

    /// Successful requests of `action`.
    fn calls(&self, action: &str) -> Vec<sync_aliyun::testing::ecs_server::RecordedRequest> {
        self.ecs
            .requests_of(action)
            .into_iter()
            .filter(|r| r.status == 200)
            .collect()
    }

    /// What Alibaba's Python SDK sees in the local ECS server: JSON, or with `summary` a
    /// table (scripts/e2e-aliyun prints it).
    fn sdk_view(&self, summary: bool) -> Vec<u8> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/aliyun_view.py");
        let c = &self.meta_config;
        let mut cmd = Command::new(venv_python());
        cmd.arg(&script);
        if summary {
            cmd.arg("--summary");
        }
        let out = cmd
            .arg(self.ecs.endpoint())
            .arg(&c.region_id)
            .env("ALIBABA_CLOUD_ACCESS_KEY_ID", &c.access_key_id)
            .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", &c.access_key_secret)
            .env("ALIBABA_CLOUD_SECURITY_TOKEN", &c.security_token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "aliyun_view.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

/// The RAM role's STS credentials the metadata service hands out.
fn role_credentials(c: &FakeMetaConfig) -> Credentials {
    Credentials::new(
        c.access_key_id.clone(),
        c.access_key_secret.clone(),
        Some(c.security_token.clone()),
    )
}

/// The lifecycle against the local ECS server, with throttling and a server error on
/// the way and the first snapshot failing: register with the identity document → assign
/// (disk created, attached, found by serial) → replicate with verification → checkpoint
/// snapshot (failed, retaken, `accomplished`, tagged) → pruning (an image's snapshot kept) →
/// test launch and cutover (image + instance) → finalize (disk detached and deleted).
#[test]
fn aliyun_lifecycle_through_the_real_binaries() {
    let _serial = serial();
    let t = TestDir::new("aliyun-e2e");
    let cloud = Cloud::start(&t);
    // Faults the cloud really answers with, each retried by the client.
    cloud.ecs.throttle("CreateDisk", 2);
    cloud.ecs.throttle("DescribeSnapshots", 2);
    cloud.ecs.inject_fault(
        "AttachDisk",
        Fault {
            status: 503,
            code: "ServiceUnavailable".into(),
            message: "The request has failed due to a temporary failure of the server.".into(),
        },
        1,
    );
    let cp = ControlPlane::start_in(&t.path("control"), &[]);
    let config = cloud.gateway_config(&t, &cp);
    let mut gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway.log"));
    let gw_id = cp.online_gateway(Duration::from_secs(60));
    let instance = cloud.meta_config.instance_id.clone();
    step(&format!(
        "gateway {gw_id} (instance {instance}) registered; ECS at {}",
        cloud.ecs.endpoint()
    ));

    // Registration carries the identity document and its PKCS#7 signature from metadata.
    let view = cp.gateway(&gw_id);
    let identity = view
        .identity
        .expect("identity document in the registration");
    assert_eq!(identity.provider, "aliyun");
    assert!(
        identity.document.contains(&instance),
        "{}",
        identity.document
    );
    assert_eq!(identity.signature, cloud.meta_config.pkcs7);
    assert!(
        cloud.meta.stats().tokens_issued() >= 1,
        "hardened mode token"
    );
    assert!(
        cloud.meta.stats().credential_fetches() >= 1,
        "RAM role credentials"
    );

    // Assign: an ESSD of at least 20 GiB in the gateway's zone, attached to the gateway and
    // found as virtio-SERIAL.
    let size = 48 * MIB;
    let src = t.source_path("web-01");
    make_uefi_image(&src, size, 501);
    let key = t.key_path("web-01");
    let cmd = cp.assign(&gw_id, "web-01", size, &key);
    let done = cp.wait_command(&cmd, Duration::from_secs(180));
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");
    let disk = cp.wait_disk("web-01", "the disk id in the status", |d| {
        d.volume_id.is_some()
    });
    let disk_id = disk.volume_id.unwrap();
    assert!(disk_id.starts_with("d-"), "{disk_id}");
    let creates = cloud.calls("CreateDisk");
    assert_eq!(
        creates.len(),
        1,
        "one disk despite the throttling: {creates:?}"
    );
    let p = |k: &str| creates[0].params.get(k).cloned();
    assert_eq!(p("DiskCategory").as_deref(), Some("cloud_essd"));
    assert_eq!(p("PerformanceLevel").as_deref(), Some("PL0"));
    assert_eq!(p("Size").as_deref(), Some("20"));
    assert_eq!(p("ZoneId"), Some(cloud.meta_config.zone_id.clone()));
    let token = p("ClientToken").unwrap();
    let tag_values: Vec<(String, String)> = (1..=20)
        .map_while(|n| {
            Some((
                p(&format!("Tag.{n}.Key"))?,
                p(&format!("Tag.{n}.Value")).unwrap_or_default(),
            ))
        })
        .collect();
    assert!(
        tag_values.contains(&("sync-gateway:client-token".into(), token.clone())),
        "{tag_values:?}"
    );
    assert!(tag_values.contains(&("team".into(), "dr-test".into())));
    let attach = cloud.calls("AttachDisk");
    assert_eq!(attach[0].params.get("InstanceId"), Some(&instance));
    assert_eq!(attach[0].params.get("DiskId"), Some(&disk_id));
    let device = cloud.device(&disk_id);
    assert!(device.exists(), "udev emulation made {}", device.display());
    step(&format!(
        "disk web-01 assigned: {disk_id} (cloud_essd PL0, 20 GiB) attached, device {}",
        device.display()
    ));

    // The first snapshot fails in ECS; the disk is unchanged since the checkpoint, so the
    // gateway takes it again and the checkpoint stands on the retaken one.
    cloud.ecs.fail_next_snapshots(1);
    let agent = AgentCmd::new(gw.addr, "web-01", &key, &t.state_dir("web-01"), &src);
    let run = agent.run(Duration::from_secs(300));
    run.expect_verified();
    let first_snap = run.str("snapshot_id");
    assert!(first_snap.starts_with("s-"), "{first_snap}");
    assert_device_holds(&device, &src, "the staging disk after the first pass");
    let disk = cp.wait_disk("web-01", "the retaken snapshot to complete", |d| {
        d.state == DiskState::Continuous
            && d.snapshots
                .iter()
                .any(|s| s.id != first_snap && s.state == "completed")
    });
    let retaken = disk
        .snapshots
        .iter()
        .find(|s| s.id != first_snap && s.state == "completed")
        .unwrap()
        .id
        .clone();
    assert_eq!(
        cloud.ecs.status_of(&retaken).as_deref(),
        Some("accomplished")
    );
    assert_eq!(
        cloud.ecs.status_of(&first_snap),
        None,
        "the failed one is deleted"
    );
    let snap_req = cloud
        .calls("CreateSnapshot")
        .into_iter()
        .find(|r| r.params.values().any(|v| v == &first_snap))
        .unwrap();
    assert_eq!(snap_req.params.get("DiskId"), Some(&disk_id));
    let cloud_status = wait_for(Duration::from_secs(30), "cloud status", || {
        cp.cloud_status()
            .filter(|c| c.snapshots_retried >= 1 && c.api_retries >= 3 && c.api_throttled >= 2)
    });
    assert_eq!(cloud_status.provider, "aliyun");
    assert_eq!(cloud_status.instance_id, instance);
    assert_eq!(cloud_status.region, cloud.meta_config.region_id);
    step(&format!(
        "first pass replicated and verified; snapshot {first_snap} failed in ECS, retaken as \
         {retaken} (accomplished)"
    ));

    // Retention of one bucket: each checkpoint prunes the one before. A restart first: the
    // same disk is found again and the next pass is incremental.
    cp.command_ok(&[
        "policy",
        "set",
        "--gateway",
        &gw_id,
        "--retention",
        "1000000000:1000000000",
    ]);
    assert_eq!(gw.terminate(Duration::from_secs(30)).code(), Some(0));
    let mut gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway-2.log"));
    let disk = cp.wait_disk("web-01", "the disk back after the restart", |d| {
        d.state == DiskState::Continuous && d.volume_id.as_deref() == Some(disk_id.as_str())
    });
    assert_eq!(disk.durable_seq, run.u64("checkpoint_seq"), "{disk:?}");
    assert_eq!(
        cloud.calls("CreateDisk").len(),
        1,
        "no second disk after the restart"
    );
    let agent = AgentCmd::new(gw.addr, "web-01", &key, &t.state_dir("web-01"), &src);
    change_uefi_image(&src, 10, 502);
    let run = agent.run(Duration::from_secs(300));
    assert!(
        run.u64("bytes_sent_wire") < size / 2,
        "the pass after the restart is incremental: {}",
        run.describe()
    );
    run.expect_verified();
    let second_snap = run.str("snapshot_id");
    assert_device_holds(&device, &src, "the staging disk after the second pass");
    cp.wait_disk("web-01", "pruning of the first checkpoint", |d| {
        d.state == DiskState::Continuous
            && !d.snapshots.is_empty()
            && d.snapshots.iter().all(|s| s.id == second_snap)
    });
    assert!(
        cloud
            .calls("DeleteSnapshot")
            .iter()
            .any(|r| r.params.get("SnapshotId") == Some(&retaken)),
        "the retaken first snapshot was pruned with DeleteSnapshot"
    );
    step(&format!(
        "restart: same disk; second pass: snapshot {second_snap}; {retaken} pruned"
    ));

    // More faults for the restarted gateway (its counters start again at zero).
    cloud.ecs.throttle("CreateImage", 1);
    cloud.ecs.throttle("RunInstances", 1);
    cloud.ecs.inject_fault(
        "DescribeImages",
        Fault {
            status: 500,
            code: "InternalError".into(),
            message: "The request processing has failed due to some unknown error.".into(),
        },
        1,
    );
    // Test launch from the latest checkpoint: a custom image whose system disk is that
    // snapshot (UEFI, from the source's partition table), an instance in the gateway's vSwitch.
    let v = cp.command_ok(&["cutover", "--test", "--disk-id", "web-01"]);
    let test_launch = v["result"]["output"]["launch"].clone();
    let test_instance = test_launch["instance_id"].as_str().unwrap().to_string();
    let test_image = test_launch["image_id"].as_str().unwrap().to_string();
    assert_eq!(test_launch["test"], true);
    assert_eq!(test_launch["disks"][0]["snapshot_id"], second_snap.as_str());
    let create_image = cloud.calls("CreateImage");
    let ci = |k: &str| create_image[0].params.get(k).map(String::as_str);
    assert_eq!(
        ci("DiskDeviceMapping.1.SnapshotId"),
        Some(second_snap.as_str())
    );
    assert_eq!(ci("DiskDeviceMapping.1.Device"), Some("/dev/xvda"));
    assert_eq!(ci("BootMode"), Some("UEFI"));
    assert_eq!(ci("Architecture"), Some("x86_64"));
    let run_req = cloud
        .calls("RunInstances")
        .into_iter()
        .find(|r| r.params.get("ImageId") == Some(&test_image))
        .unwrap();
    let ri = |k: &str| run_req.params.get(k).map(String::as_str);
    assert_eq!(ri("VSwitchId"), Some(cloud.meta_config.vswitch_id.as_str()));
    assert_eq!(ri("SecurityGroupId"), Some(SECURITY_GROUP));
    assert_eq!(ri("InstanceType"), Some("ecs.g7.large"));
    assert!(ri("ClientToken").is_some());
    assert_eq!(cp.disk("web-01").unwrap().phase, DiskPhase::Replicating);
    step(&format!(
        "test launch: image {test_image} (system disk {second_snap}, UEFI), instance \
         {test_instance}"
    ));

    // The test image holds its snapshot: ECS refuses DeleteSnapshot with
    // SnapshotCreatedImage. Retention keeps that one and still prunes the others.
    let mut passes = Vec::new();
    for seed in [503, 504] {
        change_uefi_image(&src, 2, seed);
        let run = agent.run(Duration::from_secs(300));
        run.expect_ok();
        passes.push(run.str("snapshot_id"));
    }
    let third = passes[0].clone();
    cp.wait_disk("web-01", "pruning around the in-use snapshot", |d| {
        let ids: Vec<&str> = d.snapshots.iter().map(|s| s.id.as_str()).collect();
        d.last_checkpoint.as_ref().map(|c| c.snapshot_id.as_str()) == Some(passes[1].as_str())
            && ids.contains(&second_snap.as_str())
            && !ids.contains(&third.as_str())
    });
    assert!(
        cloud.ecs.requests_of("DeleteSnapshot").iter().any(|r| {
            r.params.get("SnapshotId") == Some(&second_snap)
                && r.error_code.as_deref() == Some("SnapshotCreatedImage")
        }),
        "ECS refused to delete the image's snapshot"
    );
    step(&format!(
        "two more passes: {second_snap} kept (the test image holds it), {third} pruned"
    ));

    // Cutover: a final snapshot, an image and an instance; replication stops.
    let v = cp.command_ok(&["cutover", "--disk-id", "web-01"]);
    let launch = v["result"]["output"]["launch"].clone();
    assert_eq!(launch["test"], false);
    let cut_instance = launch["instance_id"].as_str().unwrap().to_string();
    let cut_image = launch["image_id"].as_str().unwrap().to_string();
    let cut_snap = launch["disks"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(cut_image, test_image);
    let disk = cp.wait_disk("web-01", "the disk paused after cutover", |d| {
        d.state == DiskState::Paused
    });
    assert_eq!(disk.phase, DiskPhase::CutOver);
    for id in [&test_instance, &cut_instance] {
        wait_for(Duration::from_secs(30), "the instance running", || {
            (cloud.ecs.status_of(id).as_deref() == Some("Running")).then_some(())
        });
    }
    let table = cp.cli_ok(&["status"]);
    for want in [
        format!("aliyun {}", cloud.meta_config.region_id),
        disk_id.clone(),
        test_image.clone(),
    ] {
        assert!(table.contains(&want), "{want:?} in\n{table}");
    }
    step(&format!(
        "cutover: final snapshot {cut_snap}, image {cut_image}, instance {cut_instance}"
    ));

    // Diagnostics: the bundle goes to the configured bucket, signed with the RAM role's
    // credentials, and holds logs, the redacted config and the status, but no secret.
    // A state file holding the role's credentials under names that do not say so: only the
    // gateway's value net (every secret it knows) keeps them out.
    let c = &cloud.meta_config;
    std::fs::write(
        t.data_dir().join("state/support-note.json"),
        serde_json::json!({
            "note": format!("seen {} {}", c.access_key_secret, c.security_token),
        })
        .to_string(),
    )
    .unwrap();
    let v = cp.command_ok(&["collect-diagnostics", "--gateway", &gw_id]);
    let bundle: DiagnosticsBundle =
        serde_json::from_value(v["result"]["output"]["diagnostics"].clone()).unwrap();
    assert_eq!(bundle.bucket.as_deref(), Some(DIAG_BUCKET), "{bundle:?}");
    assert!(
        bundle.object_key.starts_with("sync-gateway/diagnostics/"),
        "{bundle:?}"
    );
    // What the gateway sent OSS (before the test reads the object back).
    let oss_by_gateway = cloud.oss.requests();
    let bytes = cloud.oss_object(&bundle.object_key);
    assert_eq!(bytes.len() as u64, bundle.size_bytes);
    let members = unpack_tar_gz(&bytes);
    let member = |suffix: &str| -> String {
        members
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
            .unwrap_or_else(|| panic!("{suffix} in the bundle"))
    };
    assert!(member("config.toml").contains("kind = \"aliyun\""));
    assert!(member("logs/gateway.log").contains("aliyun backend ready"));
    assert!(member("status.json").contains(&disk_id));
    let registration: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.data_dir().join("state/control-plane.json")).unwrap(),
    )
    .unwrap();
    let key_hex = std::fs::read_to_string(&key).unwrap().trim().to_string();
    for (what, secret) in [
        (
            "the STS secret",
            cloud.meta_config.access_key_secret.clone(),
        ),
        ("the STS token", cloud.meta_config.security_token.clone()),
        ("the bootstrap token", cp.bootstrap_token()),
        ("the replication key", key_hex),
        (
            "the control-plane credential",
            registration["credential"].as_str().unwrap().to_string(),
        ),
    ] {
        for (name, data) in &members {
            assert!(!contains_ci(data, &secret), "{what} found in {name}");
        }
    }
    step(&format!(
        "diagnostics: {} bytes in oss://{DIAG_BUCKET}/{} ({} files, no key or token)",
        bundle.size_bytes,
        bundle.object_key,
        members.len()
    ));

    // Finalize: the staging disk is detached and deleted; snapshots, images, instances stay.
    cp.command_ok(&["finalize", "--disk-id", "web-01"]);
    assert!(
        !device.exists(),
        "udev emulation removed the device on detach"
    );
    assert_eq!(cloud.ecs.status_of(&disk_id), None, "the disk is deleted");
    assert_eq!(cloud.calls("DetachDisk").len(), 1);
    step(&format!("finalized: disk {disk_id} detached and deleted"));

    // Every ECS action the gateway called (so far only it has) is allowed by the instance's
    // RAM role policy.
    let allowed = policy_actions("aliyun/ram-policy.json", "1");
    let called: std::collections::BTreeSet<String> = cloud
        .ecs
        .requests()
        .into_iter()
        .filter(|r| r.access_key_id.as_deref() == Some(cloud.meta_config.access_key_id.as_str()))
        .map(|r| format!("ecs:{}", r.action))
        .collect();
    let mut called = called;
    assert!(!oss_by_gateway.is_empty());
    for r in &oss_by_gateway {
        // PUT, and the multipart calls PutObject allows; an abort is its own action.
        called.insert(match r.method.as_str() {
            "PUT" | "POST" => "oss:PutObject".to_string(),
            "DELETE" if r.target.contains("uploadId=") => "oss:AbortMultipartUpload".to_string(),
            other => format!("oss:{other} {}", r.target),
        });
    }
    let missing: Vec<&String> = called.iter().filter(|a| !allowed.contains(*a)).collect();
    assert!(
        missing.is_empty(),
        "not in aliyun/ram-policy.json: {missing:?}"
    );

    // What Alibaba's own SDK sees.
    let seen: serde_json::Value = serde_json::from_slice(&cloud.sdk_view(false)).unwrap();
    if std::env::var_os("E2E_SHOW_VIEW").is_some() {
        step("what Alibaba's Python SDK sees in the local ECS server");
        eprint!("{}", String::from_utf8_lossy(&cloud.sdk_view(true)));
    }
    assert!(
        !seen["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == disk_id.as_str()),
        "{seen}"
    );
    let snaps: Vec<&serde_json::Value> = seen["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| tag(s, "sync-gateway:disk") == Some("web-01"))
        .collect();
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
        assert_eq!(s["status"], "accomplished", "{s}");
        assert_eq!(tag(s, "sync-gateway:gateway"), Some(instance.as_str()));
        assert_eq!(tag(s, "sync-gateway:managed"), Some("true"));
        assert_eq!(tag(s, "team"), Some("dr-test"), "configured tags: {s}");
        assert!(tag(s, "sync-gateway:checkpoint").is_some(), "{s}");
        assert!(tag(s, "sync-gateway:created-ms").is_some(), "{s}");
    }
    let images = seen["images"].as_array().unwrap();
    for id in [&test_image, &cut_image] {
        let i = images
            .iter()
            .find(|i| i["id"] == id.as_str())
            .unwrap_or_else(|| panic!("image {id} in {images:?}"));
        assert_eq!(i["status"], "Available");
        assert_eq!(i["boot_mode"], "UEFI");
    }
    let instances = seen["instances"].as_array().unwrap();
    for (id, kind) in [(&test_instance, "test"), (&cut_instance, "cutover")] {
        let i = instances
            .iter()
            .find(|i| i["id"] == id.as_str())
            .unwrap_or_else(|| panic!("instance {id} in {instances:?}"));
        assert_eq!(i["status"], "Running", "{i}");
        assert_eq!(tag(i, "sync-gateway:launch"), Some(kind));
    }

    // The faults after the restart were answered and retried; the status counted them.
    let cloud_status = wait_for(Duration::from_secs(30), "retries in the status", || {
        cp.cloud_status()
            .filter(|c| c.api_retries >= 3 && c.api_throttled >= 2)
    });
    step(&format!(
        "the gateway reports {} API retries ({} throttled); the SDK sees {} snapshots, {} \
         images, {} instances",
        cloud_status.api_retries,
        cloud_status.api_throttled,
        snaps.len(),
        images.len(),
        instances.len()
    ));
    // Every connection the gateway holds is on loopback.
    let peers = connected_peers(gw.pid());
    assert!(!peers.is_empty(), "the gateway holds pooled connections");
    assert!(
        peers.iter().all(|p| p.ip().is_loopback()),
        "non-loopback peers: {peers:?}"
    );
    assert_eq!(gw.terminate(Duration::from_secs(30)).code(), Some(0));
    drop(cloud.rt);
}

/// A gateway whose instance has no RAM role does not start half-way: it says why.
#[test]
fn no_ram_role_is_a_clear_start_up_error() {
    let _serial = serial();
    let t = TestDir::new("aliyun-no-role");
    let cloud = Cloud::start(&t);
    cloud.meta.set_role(None);
    let config = GatewayConfig::new(t.data_dir())
        .backend_kind("aliyun")
        .backend_option("ecs_endpoint", format!("\"{}\"", cloud.ecs.endpoint()))
        .backend_option("meta_endpoint", format!("\"{}\"", cloud.meta.url()))
        .backend_option("device_dir", format!("\"{}\"", cloud.by_id.display()));
    config.write(&t.path("gateway.toml"));
    let out = Command::new(env!("CARGO_BIN_EXE_sync-gateway"))
        .arg("run")
        .arg("--config")
        .arg(t.path("gateway.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RAM role"), "{err}");
    drop(cloud.rt);
}
