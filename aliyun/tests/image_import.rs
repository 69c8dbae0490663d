//! `sync-aliyun-image import`, the real binary, against the local OSS and ECS servers on
//! 127.0.0.1 with STS credentials: upload (one PUT and multipart), HEAD check, ImportImage
//! with UEFI, waiting through `Waiting`/`Creating` to `Available`, the object kept or deleted,
//! reruns, refused credentials, failed and slow imports, and usage errors.

#![allow(clippy::unwrap_used)]

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use sync_aliyun::ecs::{EcsClient, EcsConfig, Params};
use sync_aliyun::oss::{OssClient, OssConfig};
use sync_aliyun::testing::ecs_server::{EcsServer, EcsServerConfig};
use sync_aliyun::testing::oss_server::{OssServer, OssServerConfig};
use sync_aliyun::Credentials;

const BIN: &str = env!("CARGO_BIN_EXE_sync-aliyun-image");
const REGION: &str = "cn-hangzhou";
const BUCKET: &str = "images";

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

async fn clouds_with(transition: Duration) -> Clouds {
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
    config.transition = transition;
    let ecs = EcsServer::start(config).await.unwrap();
    Clouds { dir, oss, ecs }
}

async fn clouds() -> Clouds {
    clouds_with(Duration::from_millis(200)).await
}

impl Clouds {
    fn oss_client(&self) -> OssClient {
        let cfg = OssConfig {
            endpoint: Some(self.oss.endpoint()),
            ..OssConfig::new(REGION, BUCKET)
        };
        OssClient::new(cfg, sts()).unwrap()
    }

    fn ecs_client(&self) -> EcsClient {
        let cfg = EcsConfig::new(REGION).with_endpoint(self.ecs.endpoint());
        EcsClient::new(cfg, Arc::new(sts())).unwrap()
    }

    /// `import` of `file` to `key` as `name`, with the endpoints of these servers.
    fn args(&self, file: &Path, key: &str, name: &str) -> Vec<String> {
        [
            "import",
            "--file",
            &file.display().to_string(),
            "--bucket",
            BUCKET,
            "--key",
            key,
            "--image-name",
            name,
            "--region",
            REGION,
            "--ecs-endpoint",
            &self.ecs.endpoint(),
            "--oss-endpoint",
            &self.oss.endpoint(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The image as the ECS server's own DescribeImages answer shows it (raw JSON).
    async fn image_json(&self, id: &str) -> serde_json::Value {
        let mut p = Params::new();
        p.set("RegionId", REGION)
            .set("ImageId", id)
            .set("Status", "Waiting,Creating,Available,CreateFailed");
        let v = self.ecs_client().call("DescribeImages", &p).await.unwrap();
        v.pointer("/Images/Image/0").cloned().unwrap()
    }

    fn oss_puts(&self) -> usize {
        self.oss
            .requests()
            .iter()
            .filter(|r| r.method == "PUT")
            .count()
    }
}

/// Runs the binary with `creds` in the environment (none: the variables unset).
async fn run(args: &[String], creds: Option<&Credentials>) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        .env_remove("ALIBABA_CLOUD_SECURITY_TOKEN")
        .env_remove("SYNC_ALIYUN_IMAGE_LOG");
    if let Some(c) = creds {
        cmd.env("ALIBABA_CLOUD_ACCESS_KEY_ID", &c.access_key_id)
            .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", &c.access_key_secret);
        if let Some(t) = &c.security_token {
            cmd.env("ALIBABA_CLOUD_SECURITY_TOKEN", t);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the tool finishes within 60 s")
        .unwrap();
    eprintln!(
        "--- {} → {:?}\n{}",
        args.first().map_or("", String::as_str),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The printed image id: one line, nothing else.
fn image_id(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    let text = stdout(out);
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

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

async fn object_bytes(clouds: &Clouds, key: &str) -> Vec<u8> {
    clouds
        .oss_client()
        .get_object(key, None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_raw_image_imports_uefi_and_object_is_kept_or_deleted() {
    let clouds = clouds().await;
    let data = pseudo_random(300 << 10, 7);
    let file = write_file(clouds.dir.path(), "gateway.raw", &data);

    // --keep-object: the object stays, byte for byte the file.
    let mut args = clouds.args(&file, "appliance/gateway-1.raw", "sync-gateway-1");
    args.extend(["--keep-object", "--tag", "sync:version=1"].map(String::from));
    let out = run(&args, Some(&sts())).await;
    let id = image_id(&out);
    assert_eq!(clouds.ecs.status_of(&id).as_deref(), Some("Available"));
    let image = clouds.image_json(&id).await;
    assert_eq!(image["BootMode"], "UEFI");
    assert_eq!(image["ImageName"], "sync-gateway-1");
    let mapping = &image["DiskDeviceMappings"]["DiskDeviceMapping"][0];
    assert_eq!(mapping["Format"], "RAW");
    assert_eq!(mapping["ImportOSSBucket"], BUCKET);
    assert_eq!(mapping["ImportOSSObject"], "appliance/gateway-1.raw");
    let import = &clouds.ecs.requests_of("ImportImage")[0].params;
    for (k, v) in [
        ("Architecture", "x86_64"),
        ("OSType", "linux"),
        ("Platform", "Debian"),
        ("BootMode", "UEFI"),
        ("DiskDeviceMapping.1.Format", "RAW"),
        ("Tag.1.Key", "sync:version"),
        ("Tag.1.Value", "1"),
    ] {
        assert_eq!(import.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(import["ClientToken"].starts_with("sync-image-"));
    // It polled through the import's states.
    assert!(clouds.ecs.requests_of("DescribeImages").len() >= 2);
    assert_eq!(
        object_bytes(&clouds, "appliance/gateway-1.raw").await,
        data,
        "the object is the file"
    );
    let err = stderr(&out);
    assert!(err.contains("MiB/s") && err.contains("one PUT"), "{err}");
    assert!(err.contains("kept at oss://images/appliance/gateway-1.raw"));

    // A rerun finds the image: no upload, no second import, the same id.
    let puts = clouds.oss_puts();
    let rerun = run(&args, Some(&sts())).await;
    assert_eq!(image_id(&rerun), id);
    assert_eq!(clouds.oss_puts(), puts, "nothing uploaded again");
    assert_eq!(clouds.ecs.requests_of("ImportImage").len(), 1);
    assert_eq!(clouds.ecs.counts().images, 1);
    assert!(stderr(&rerun).contains("exists already"));
    assert!(clouds
        .oss
        .object_keys()
        .contains(&"appliance/gateway-1.raw".to_string()));
    // Without --keep-object a rerun removes what an earlier run left.
    let rerun = run(&args[..args.len() - 3], Some(&sts())).await;
    assert_eq!(image_id(&rerun), id);
    assert!(stderr(&rerun).contains("oss://images/appliance/gateway-1.raw deleted"));

    // Default: the object goes once the image is Available. A qcow2 by its extension.
    let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
    qcow2.extend(pseudo_random(64 << 10, 9));
    let file = write_file(clouds.dir.path(), "gateway.qcow2", &qcow2);
    let args = clouds.args(&file, "appliance/gateway-2.qcow2", "sync-gateway-2");
    let id2 = image_id(&run(&args, Some(&sts())).await);
    assert_ne!(id2, id);
    let image = clouds.image_json(&id2).await;
    assert_eq!(image["Status"], "Available");
    assert_eq!(image["BootMode"], "UEFI");
    assert_eq!(
        image["DiskDeviceMappings"]["DiskDeviceMapping"][0]["Format"],
        "QCOW2"
    );
    let keys = clouds.oss.object_keys();
    assert!(keys.is_empty(), "both objects deleted: {keys:?}");
    // A rebuilt file under a name already imported: refused, never answered with the old one.
    let mut rebuilt = qcow2.clone();
    rebuilt.extend(pseudo_random(4096, 10));
    let file = write_file(clouds.dir.path(), "gateway.qcow2", &rebuilt);
    let out = run(
        &clouds.args(&file, "appliance/gateway-2.qcow2", "sync-gateway-2"),
        Some(&sts()),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not from this file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(clouds.ecs.requests_of("ImportImage").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_image_above_the_part_size_goes_by_multipart() {
    // A 1 s import, so that the polls see it queued and then converted.
    let clouds = clouds_with(Duration::from_secs(1)).await;
    // 5 MiB + 100 KiB, mostly holes, data at the start, across a part boundary and at the end.
    let size: u64 = (5 << 20) + (100 << 10);
    let file = clouds.dir.path().join("sparse.raw");
    {
        let mut f = std::fs::File::create(&file).unwrap();
        f.set_len(size).unwrap();
        for (i, off) in [0u64, (2 << 20) - 3000, size - 4096]
            .into_iter()
            .enumerate()
        {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&pseudo_random(4096, i as u64 + 1)).unwrap();
        }
    }
    let mut args = clouds.args(&file, "appliance/sparse.raw", "sync-gateway-sparse");
    args.extend(["--part-size-mib", "1", "--keep-object"].map(String::from));
    let out = run(&args, Some(&sts())).await;
    let id = image_id(&out);
    assert_eq!(clouds.ecs.status_of(&id).as_deref(), Some("Available"));

    let parts = clouds
        .oss
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.target.contains("partNumber="))
        .count();
    assert_eq!(parts, 6, "5.1 MiB in parts of 1 MiB");
    assert_eq!(clouds.oss.open_uploads(), 0);
    assert_eq!(
        object_bytes(&clouds, "appliance/sparse.raw").await,
        std::fs::read(&file).unwrap()
    );
    let err = stderr(&out);
    assert!(
        err.contains("multipart, 6 parts") && err.contains("MiB/s"),
        "{err}"
    );
    let waiting = err.find(": Waiting 0%").expect("Waiting shown");
    let creating = err.find(": Creating ").expect("Creating shown");
    assert!(waiting < creating, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_clearly_before_any_upload() {
    let clouds = clouds().await;
    let file = write_file(clouds.dir.path(), "g.raw", &pseudo_random(4096, 3));
    let args = clouds.args(&file, "g.raw", "sync-gateway-creds");

    let wrong_secret = Credentials::new("STS.publisher", "not-the-secret", sts().security_token);
    let no_token = Credentials::new("STS.publisher", "publisher-secret", None);
    let unknown = Credentials::new("LTAI-nobody", "x", None);
    for (creds, code) in [
        (wrong_secret, "SignatureDoesNotMatch"),
        (no_token, "MissingSecurityToken"),
        (unknown, "InvalidAccessKeyId.NotFound"),
    ] {
        let out = run(&args, Some(&creds)).await;
        assert_eq!(out.status.code(), Some(1), "{code}");
        assert!(stdout(&out).is_empty());
        let err = stderr(&out);
        assert!(err.contains(code), "{err}");
        assert!(err.contains("hint:") && err.contains("ALIBABA_CLOUD_ACCESS_KEY_ID"));
        assert!(!err.contains("not-the-secret") && !err.contains("publisher-token"));
    }
    assert!(clouds.oss.requests().is_empty(), "nothing was uploaded");
    assert!(clouds.ecs.requests_of("ImportImage").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_slow_imports_exit_1() {
    // An import ECS fails: CreateFailed after Waiting.
    let clouds = clouds().await;
    let file = write_file(clouds.dir.path(), "bad.raw", &pseudo_random(4096, 5));
    clouds.ecs.fail_next_imports(1);
    let out = run(
        &clouds.args(&file, "bad.raw", "sync-gateway-bad"),
        Some(&sts()),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    assert!(stderr(&out).contains("CreateFailed"), "{}", stderr(&out));
    // The object is kept for a look at what failed.
    assert!(clouds.oss.object_keys().contains(&"bad.raw".to_string()));
    // A rerun of the same name says what to do rather than waiting on a failed image.
    let out = run(
        &clouds.args(&file, "bad.raw", "sync-gateway-bad"),
        Some(&sts()),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("choose another --image-name"));

    // An import slower than --timeout-secs.
    let slow = clouds_with(Duration::from_secs(60)).await;
    let file = write_file(slow.dir.path(), "slow.raw", &pseudo_random(4096, 6));
    let mut args = slow.args(&file, "slow.raw", "sync-gateway-slow");
    args.extend(["--timeout-secs", "1"].map(String::from));
    let started = std::time::Instant::now();
    let out = run(&args, Some(&sts())).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("timed out after 1 s") && err.contains("Waiting"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_without_calling_anything() {
    let clouds = clouds().await;
    let dir = clouds.dir.path();
    let raw = write_file(dir, "ok.raw", &pseudo_random(4096, 4));
    let odd = write_file(dir, "image.bin", &pseudo_random(4096, 4));
    let base = clouds.args(&raw, "k.raw", "sync-gateway-usage");
    let with = |extra: &[&str]| {
        let mut a = base.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let replace = |flag: &str, value: &str| {
        let mut a = base.clone();
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = value.to_string();
        a
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "Usage"),
        (vec!["export".into()], "unrecognized subcommand"),
        (vec!["import".into()], "required"),
        (with(&["--format", "vmdk"]), "invalid value"),
        (with(&["--boot-mode", "CSM"]), "invalid value"),
        (with(&["--tag", "novalue"]), "KEY=VALUE"),
        (with(&["--timeout-secs", "0"]), "--timeout-secs"),
        (with(&["--part-size-mib", "0"]), "--part-size-mib"),
        (with(&["--format", "qcow2"]), "looks like RAW"),
        (replace("--file", "/nonexistent/disk.raw"), "No such file"),
        (replace("--file", &odd.display().to_string()), "--format"),
        (
            replace("--file", &dir.display().to_string()),
            "not a regular file",
        ),
        (
            replace("--image-name", "1-starts-with-a-digit"),
            "--image-name",
        ),
        (replace("--key", "/abs"), "--key"),
        (replace("--region", "CN Hangzhou"), "--region"),
        (
            replace("--oss-endpoint", "ftp://127.0.0.1:1"),
            "not http(s)",
        ),
    ];
    for (args, says) in cases {
        let out = run(&args, Some(&sts())).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stdout(&out).is_empty(), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    // Credentials not in the environment.
    let out = run(&base, None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("ALIBABA_CLOUD_ACCESS_KEY_ID is not set"));
    let only_id = Credentials::new("STS.publisher", "", None);
    let out = run(&base, Some(&only_id)).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("ALIBABA_CLOUD_ACCESS_KEY_SECRET is not set"));
    // --help is not an error.
    let out = run(&["import".into(), "--help".into()], None).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("--keep-object"));

    assert!(clouds.oss.requests().is_empty());
    assert!(clouds.ecs.requests().is_empty());
}
