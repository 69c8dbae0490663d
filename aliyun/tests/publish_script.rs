//! `scripts/publish-aliyun` end to end, around the real `sync-aliyun-image`, against the local
//! OSS and ECS servers on 127.0.0.1 with STS credentials: an image-build output directory is
//! checked against its SHA256SUMS, its qcow2 uploaded under a name from manifest.json and
//! imported as a UEFI image; a rerun uploads nothing; without a qcow2 the raw image goes; a
//! rebuilt file under a taken name, a damaged image and missing arguments are refused.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sync_aliyun::ecs::{EcsClient, EcsConfig, Params};
use sync_aliyun::oss::{OssClient, OssConfig};
use sync_aliyun::testing::ecs_server::{EcsServer, EcsServerConfig};
use sync_aliyun::testing::oss_server::{OssServer, OssServerConfig};
use sync_aliyun::Credentials;

const BIN: &str = env!("CARGO_BIN_EXE_sync-aliyun-image");
const REGION: &str = "cn-hangzhou";
const BUCKET: &str = "images";
/// The name scripts/publish-aliyun takes from the manifest written by `image_dir`.
const MANIFEST_NAME: &str = "sync-gateway-0.1.0-0123456789ab";

fn sts() -> Credentials {
    Credentials::new(
        "STS.publisher",
        "publisher-secret",
        Some("publisher-token".into()),
    )
}

struct Clouds {
    dir: tempfile::TempDir,
    oss: OssServer,
    ecs: EcsServer,
}

async fn clouds() -> Clouds {
    let dir = tempfile::tempdir().unwrap();
    let oss = OssServer::start(OssServerConfig {
        region: REGION.into(),
        bucket: BUCKET.into(),
        keys: vec![sts()],
        root: dir.path().join("oss"),
    })
    .await
    .unwrap();
    let mut config = EcsServerConfig::new(REGION, vec![sts()]);
    config.transition = Duration::from_millis(200);
    let ecs = EcsServer::start(config).await.unwrap();
    Clouds { dir, oss, ecs }
}

impl Clouds {
    /// The image as the ECS server's DescribeImages shows it (raw JSON).
    async fn image_json(&self, id: &str) -> serde_json::Value {
        let cfg = EcsConfig::new(REGION).with_endpoint(self.ecs.endpoint());
        let ecs = EcsClient::new(cfg, Arc::new(sts())).unwrap();
        let mut p = Params::new();
        p.set("RegionId", REGION)
            .set("ImageId", id)
            .set("Status", "Waiting,Creating,Available,CreateFailed");
        let v = ecs.call("DescribeImages", &p).await.unwrap();
        v.pointer("/Images/Image/0").cloned().unwrap()
    }

    async fn object(&self, key: &str) -> Vec<u8> {
        let cfg = OssConfig {
            endpoint: Some(self.oss.endpoint()),
            ..OssConfig::new(REGION, BUCKET)
        };
        let oss = OssClient::new(cfg, sts()).unwrap();
        oss.get_object(key, None)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    }

    fn sent(&self) -> usize {
        self.oss.requests().len() + self.ecs.requests().len()
    }

    /// Runs the script with `args`, the servers' endpoints and STS credentials in the
    /// environment, and the test's own build of the tool.
    async fn publish(&self, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/publish-aliyun");
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(script).args(args).stdin(Stdio::null());
        for var in [
            "ALIBABA_CLOUD_REGION_ID",
            "ALIBABA_CLOUD_ECS_ENDPOINT",
            "ALIBABA_CLOUD_OSS_ENDPOINT",
            "SYNC_ALIYUN_IMAGE_LOG",
        ] {
            cmd.env_remove(var);
        }
        let c = sts();
        cmd.env("SYNC_ALIYUN_IMAGE", BIN)
            .env("NO_COLOR", "1")
            .env("ALIBABA_CLOUD_REGION_ID", REGION)
            .env("ALIBABA_CLOUD_ECS_ENDPOINT", self.ecs.endpoint())
            .env("ALIBABA_CLOUD_OSS_ENDPOINT", self.oss.endpoint())
            .env("ALIBABA_CLOUD_ACCESS_KEY_ID", &c.access_key_id)
            .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", &c.access_key_secret)
            .env(
                "ALIBABA_CLOUD_SECURITY_TOKEN",
                c.security_token.as_deref().unwrap(),
            );
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("the script finishes within 60 s")
            .unwrap();
        eprintln!(
            "--- publish-aliyun {args:?} → {:?}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The printed image id: one line, nothing else.
fn image_id(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = text.strip_suffix('\n').unwrap_or(&text).to_string();
    assert!(
        id.starts_with("m-") && !id.contains(char::is_whitespace),
        "stdout is the id alone: {text:?}"
    );
    id
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An image-build output directory: a sparse raw image, optionally a qcow2, SHA256SUMS for
/// them and a manifest.
fn image_dir(root: &Path, name: &str, with_qcow2: bool, seed: u64) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("sync-gateway.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&pseudo_random(4096, seed), 1 << 20).unwrap();
    let mut sums = format!(
        "{}  sync-gateway.raw\n",
        sha256_hex(&std::fs::read(&raw).unwrap())
    );
    if with_qcow2 {
        let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow2.extend(pseudo_random(64 << 10, seed + 1));
        std::fs::write(dir.join("sync-gateway.qcow2"), &qcow2).unwrap();
        sums.push_str(&format!("{}  sync-gateway.qcow2\n", sha256_hex(&qcow2)));
    }
    std::fs::write(dir.join("SHA256SUMS"), sums).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        r#"{"name": "sync-gateway", "gateway": {"version": "0.1.0",
            "git_commit": "0123456789abcdef0123456789abcdef01234567"}}"#,
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_aliyun_script_imports_an_image_build_directory() {
    let clouds = clouds().await;
    let dir = image_dir(clouds.dir.path(), "image", true, 7);
    let d = dir.display().to_string();
    let key = format!("sync-gateway/{MANIFEST_NAME}.qcow2");

    // The qcow2, checked, under the manifest's name; kept in OSS to compare.
    let out = clouds
        .publish(&[
            &d,
            "--bucket",
            BUCKET,
            "--keep-object",
            "--tag",
            "team=release",
        ])
        .await;
    let id = image_id(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("SYNC_ALIYUN_IMAGE={BIN}")),
        "no build: {err}"
    );
    assert!(
        err.contains("sync-gateway.qcow2: OK"),
        "checksum verified: {err}"
    );
    assert_eq!(clouds.ecs.status_of(&id).as_deref(), Some("Available"));
    let image = clouds.image_json(&id).await;
    assert_eq!(image["ImageName"], MANIFEST_NAME);
    assert_eq!(image["BootMode"], "UEFI");
    let mapping = &image["DiskDeviceMappings"]["DiskDeviceMapping"][0];
    assert_eq!(mapping["Format"], "QCOW2");
    assert_eq!(mapping["ImportOSSBucket"], BUCKET);
    assert_eq!(mapping["ImportOSSObject"], key.as_str());
    let import = &clouds.ecs.requests_of("ImportImage")[0].params;
    assert_eq!(import.get("Tag.1.Key").map(String::as_str), Some("team"));
    assert_eq!(
        clouds.object(&key).await,
        std::fs::read(dir.join("sync-gateway.qcow2")).unwrap(),
        "the object is the qcow2"
    );

    // Again, without --keep-object: the same image, nothing uploaded, the object removed.
    let puts = |c: &Clouds| {
        c.oss
            .requests()
            .iter()
            .filter(|r| r.method == "PUT")
            .count()
    };
    let before = puts(&clouds);
    let out = clouds.publish(&[&d, "--bucket", BUCKET]).await;
    assert_eq!(image_id(&out), id);
    assert_eq!(puts(&clouds), before, "nothing uploaded again");
    assert_eq!(clouds.ecs.requests_of("ImportImage").len(), 1);
    assert!(clouds.oss.object_keys().is_empty(), "object deleted");

    // A rebuilt image with the same manifest: its name is taken by another file.
    let rebuilt = image_dir(clouds.dir.path(), "rebuilt", false, 9);
    let r = rebuilt.display().to_string();
    let out = clouds.publish(&[&r, "--bucket", BUCKET]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not from this file"),
        "{}",
        stderr(&out)
    );
    // Under its own name; no qcow2 there, so the raw image goes, as RAW.
    let out = clouds
        .publish(&[&r, "--bucket", BUCKET, "--name", "sync-gateway-rebuilt"])
        .await;
    let raw_id = image_id(&out);
    let image = clouds.image_json(&raw_id).await;
    let mapping = &image["DiskDeviceMappings"]["DiskDeviceMapping"][0];
    assert_eq!(mapping["Format"], "RAW");
    assert_eq!(
        mapping["ImportOSSObject"],
        "sync-gateway/sync-gateway-rebuilt.raw"
    );

    // Refused before anything is sent: a damaged image, missing arguments.
    let sent = clouds.sent();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("sync-gateway.qcow2"))
        .unwrap()
        .write_all_at(b"flipped", 1000)
        .unwrap();
    let out = clouds.publish(&[&d, "--bucket", BUCKET]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("SHA256SUMS"), "{}", stderr(&out));
    let out = clouds.publish(&[&d]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--bucket"), "{}", stderr(&out));
    let raw = rebuilt.join("sync-gateway.raw").display().to_string();
    let out = clouds.publish(&[&raw, "--bucket", BUCKET]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--name"), "{}", stderr(&out));
    assert_eq!(clouds.sent(), sent, "nothing sent");
}
