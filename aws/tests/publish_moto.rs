//! `sync-aws-image publish`, the real binary, and `scripts/publish-aws` around it, against moto
//! on 127.0.0.1: only the non-zero 512 KiB blocks of a sparse GPT image are uploaded, with the
//! right content and checksums; the snapshot becomes a UEFI/ENA AMI; reruns upload nothing;
//! a rebuilt file under a taken name is refused; throttling and lost answers are retried; a
//! run that failed after the upload reuses its snapshot; usage errors exit 2, missing
//! credentials 1.
//!
//! moto quirks worked around here (the tool itself has none of this):
//! - its RegisterImage keeps only the name: the EC2 fault proxy applies the image tags with
//!   CreateTags (`with_image_tags`), and boot mode, ENA and the block device mapping are
//!   asserted on the recorded request;
//! - it ignores StartSnapshot's ClientToken and CompleteSnapshot's count and checksum, and
//!   announces a block size of 512: the EBS proxy records the headers and they are asserted
//!   there;
//! - its EC2 view of an EBS direct snapshot is `completed` from StartSnapshot on.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::ebs_proxy::{EbsFault, EbsProxy};
use common::moto::Moto;
use common::proxy::{Fault, FaultProxy};
use common::{client, Scratch, REGION};
use sha2::{Digest, Sha256};
use sync_aws::{Ec2, ImageId, SnapshotFilter, SnapshotId, MANAGED_TAG_KEY};

const BIN: &str = env!("CARGO_BIN_EXE_sync-aws-image");
const BLOCK: usize = 512 << 10;
const DIGEST_TAG: &str = "sync-gateway:image-sha256";

/// moto with the two proxies the tool talks to.
struct Aws {
    moto: Moto,
    ec2: FaultProxy,
    ebs: EbsProxy,
    dir: Scratch,
}

async fn aws(name: &str) -> Aws {
    let moto = Moto::start();
    let ec2 = FaultProxy::start(&moto.url(), vec![])
        .await
        .with_image_tags();
    let ebs = EbsProxy::start(&moto.url()).await;
    Aws {
        moto,
        ec2,
        ebs,
        dir: Scratch::new(name),
    }
}

impl Aws {
    fn args(&self, file: &Path, name: &str) -> Vec<String> {
        [
            "publish",
            "--file",
            &file.display().to_string(),
            "--name",
            name,
            "--region",
            REGION,
            "--ec2-endpoint",
            &self.ec2.url(),
            "--ebs-endpoint",
            &self.ebs.url(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// An EC2 client straight to moto, to see what the tool made.
    fn ec2_client(&self) -> Ec2 {
        client(&self.moto.url())
    }

    /// An EBS client straight to moto, to read the snapshot's blocks back.
    fn ebs_client(&self) -> aws_sdk_ebs::Client {
        use aws_sdk_ebs::config::{BehaviorVersion, Credentials, Region};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_ebs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .endpoint_url(self.moto.url())
            .http_client(http)
            .build();
        aws_sdk_ebs::Client::from_conf(config)
    }

    /// ListSnapshotBlocks straight from moto, read leniently: moto writes `BlockIndex` as a
    /// JSON string, which the SDK's strict parser refuses ("expected integer"). moto routes a
    /// request to EBS by its SigV4 credential scope and checks no signature.
    async fn moto_snapshot_blocks(&self, snapshot: &str) -> Vec<(i32, String)> {
        use http_body_util::BodyExt;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let req = http::Request::get(format!("{}/snapshots/{snapshot}/blocks", self.moto.url()))
            .header(
                "authorization",
                format!(
                    "AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/ebs/aws4_request, \
                     SignedHeaders=host, Signature=0"
                ),
            )
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert!(
            resp.status().is_success(),
            "ListSnapshotBlocks: {}",
            resp.status()
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        json["Blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let index = match &b["BlockIndex"] {
                    serde_json::Value::String(s) => s.parse().unwrap(),
                    v => i32::try_from(v.as_i64().unwrap()).unwrap(),
                };
                (index, b["BlockToken"].as_str().unwrap().to_string())
            })
            .collect()
    }

    async fn snapshot_count(&self) -> usize {
        self.ec2_client()
            .describe_snapshots(&SnapshotFilter::Tags(BTreeMap::new()))
            .await
            .unwrap()
            .len()
    }
}

/// The environment of every run: moto's static credentials or none, nothing inherited that
/// could point the tool elsewhere, and the metadata service off for any SDK that looks.
fn command(program: &str, creds: bool) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_EC2",
        "AWS_ENDPOINT_URL_EBS",
        "SYNC_AWS_IMAGE",
        "SYNC_AWS_IMAGE_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    if creds {
        cmd.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing");
    }
    cmd
}

async fn finish(mut cmd: tokio::process::Command, what: &str) -> Output {
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("finishes within 120 s")
        .unwrap();
    eprintln!(
        "--- {what} → {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn run(args: &[String], creds: bool) -> Output {
    let mut cmd = command(BIN, creds);
    cmd.args(args);
    finish(cmd, args.first().map_or("", String::as_str)).await
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The printed AMI id: one line, nothing else.
fn ami_id(out: &Output) -> ImageId {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    let text = stdout(out);
    let id = text.strip_suffix('\n').unwrap_or(&text);
    assert!(
        id.starts_with("ami-") && !id.contains(char::is_whitespace),
        "stdout is the id alone: {text:?}"
    );
    ImageId::from(id)
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

/// A sparse file of `size` bytes with `writes` at their offsets.
fn sparse_file(path: &Path, size: u64, writes: &[(u64, Vec<u8>)]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (offset, bytes) in writes {
        f.write_all_at(bytes, *offset).unwrap();
    }
}

/// A GPT (an ESP of `esp_mib` and a Linux root) made by sfdisk: block 0 holds the protective
/// MBR and the primary table, the end of the disk the backup table.
fn sfdisk_gpt(path: &Path, esp_mib: u32) {
    use std::io::Write;
    let script = format!(
        "label: gpt\nsize={esp_mib}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
    );
    let status = std::process::Command::new("sfdisk")
        .arg("--quiet")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait()
        });
    match status {
        Ok(s) if s.success() => {}
        other => panic!("sfdisk is needed (scripts/test installs the fdisk package): {other:?}"),
    }
}

/// The file's blocks as EBS holds them: every non-zero 512 KiB block, the last one padded.
fn data_blocks(path: &Path) -> BTreeMap<i32, Vec<u8>> {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut blocks = BTreeMap::new();
    let mut offset = 0u64;
    while offset < size {
        let mut b = vec![0u8; BLOCK];
        let n = (size - offset).min(BLOCK as u64) as usize;
        f.read_exact_at(&mut b[..n], offset).unwrap();
        if b.iter().any(|&x| x != 0) {
            blocks.insert((offset / BLOCK as u64) as i32, b);
        }
        offset += BLOCK as u64;
    }
    blocks
}

fn sha256_hex(path: &Path) -> String {
    let bytes = fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What EBS should have been told at CompleteSnapshot: SHA-256 over the blocks' raw digests
/// in ascending index, base64 (computed here independently of the tool).
fn linear_checksum(blocks: &BTreeMap<i32, Vec<u8>>) -> String {
    let mut all = Vec::new();
    for b in blocks.values() {
        all.extend_from_slice(&Sha256::digest(b));
    }
    BASE64.encode(Sha256::digest(&all))
}

/// The snapshot the AMI was registered from, as the tool sent it to RegisterImage.
fn registered(aws: &Aws) -> std::collections::HashMap<String, String> {
    let regs = aws.ec2.requests_of("RegisterImage");
    assert_eq!(regs.len(), 1, "one RegisterImage");
    regs[0].params.clone()
}

/// Tags of a recorded request's TagSpecification of `kind` (EC2 query form).
fn spec_tags(
    params: &std::collections::HashMap<String, String>,
    kind: &str,
) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::new();
    for spec in 1..10 {
        if params
            .get(&format!("TagSpecification.{spec}.ResourceType"))
            .map(String::as_str)
            != Some(kind)
        {
            continue;
        }
        for t in 1..60 {
            let Some(k) = params.get(&format!("TagSpecification.{spec}.Tag.{t}.Key")) else {
                break;
            };
            let v = params
                .get(&format!("TagSpecification.{spec}.Tag.{t}.Value"))
                .cloned()
                .unwrap_or_default();
            tags.insert(k.clone(), v);
        }
    }
    tags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_data_blocks_are_uploaded_and_become_a_uefi_ami() {
    let aws = aws("publish").await;
    // 1 GiB + 3 KiB: 2049 blocks, the last one partial; a 2 GiB volume.
    let size: u64 = (1 << 30) + 3072;
    let file = aws.dir.0.join("sync-gateway.raw");
    sparse_file(
        &file,
        size,
        &[
            (3 << 20 | 100, pseudo_random(4096, 1)),
            // across the boundary of blocks 199 and 200
            ((100 << 20) - 2000, pseudo_random(4096, 2)),
            (700 << 20, pseudo_random(BLOCK, 3)),
            // allocated, but zeros: not sent
            (800 << 20, vec![0u8; BLOCK]),
        ],
    );
    sfdisk_gpt(&file, 100);
    let meta = fs::metadata(&file).unwrap();
    assert!(meta.blocks() * 512 < 16 << 20, "sparse: {meta:?}");
    let expected = data_blocks(&file);
    let indices: Vec<i32> = expected.keys().copied().collect();
    for want in [0, 6, 199, 200, 1400, 2048] {
        assert!(
            indices.contains(&want),
            "block {want} holds data: {indices:?}"
        );
    }
    assert!(!indices.contains(&1600), "the zero block is not data");
    let sha = sha256_hex(&file);

    let mut args = aws.args(&file, "sync-gateway-1.0.0-test");
    args.extend(["--tag", "team=release", "--concurrency", "4"].map(String::from));
    let out = run(&args, true).await;
    let ami = ami_id(&out);
    let err = stderr(&out);
    assert!(err.contains("MiB/s"), "{err}");
    assert!(
        err.contains(&format!("{} blocks uploaded", expected.len()))
            && err.contains(&format!("{} zero blocks skipped", 2049 - expected.len())),
        "{err}"
    );

    // EBS: StartSnapshot as asked (moto ignores the token: the proxy saw it).
    let starts = aws.ebs.requests_of("StartSnapshot");
    assert_eq!(starts.len(), 1);
    let start = starts[0].json.clone().unwrap();
    assert_eq!(start["VolumeSize"], 2);
    let token = start["ClientToken"].as_str().unwrap();
    assert!(
        token.starts_with("sync-image-") && token.len() <= 64,
        "{token}"
    );
    let start_tags: BTreeMap<String, String> = start["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["Key"].as_str().unwrap().into(),
                t["Value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(start_tags.get(DIGEST_TAG), Some(&sha));
    assert_eq!(start_tags.get("team").map(String::as_str), Some("release"));

    // Exactly the data blocks, each once, with its checksum.
    let puts = aws.ebs.requests_of("PutSnapshotBlock");
    assert_eq!(
        puts.len(),
        expected.len(),
        "one PutSnapshotBlock per data block"
    );
    for p in &puts {
        assert_eq!(p.headers["x-amz-checksum-algorithm"], "SHA256");
        assert_eq!(p.headers["x-amz-data-length"], BLOCK.to_string());
        assert_eq!(p.body_len, BLOCK);
    }
    let snapshot = registered(&aws)["BlockDeviceMapping.1.Ebs.SnapshotId"].clone();
    let ebs = aws.ebs_client();
    let listed = aws.moto_snapshot_blocks(&snapshot).await;
    let mut stored: Vec<i32> = listed.iter().map(|(index, _)| *index).collect();
    stored.sort();
    assert_eq!(
        stored, indices,
        "the snapshot holds exactly the data blocks"
    );
    for (index, token) in listed {
        let got = ebs
            .get_snapshot_block()
            .snapshot_id(&snapshot)
            .block_index(index)
            .block_token(token)
            .send()
            .await
            .unwrap();
        let checksum = got.checksum().unwrap().to_owned();
        let data = got.block_data.collect().await.unwrap().into_bytes();
        assert_eq!(&data[..], &expected[&index][..], "block {index}");
        assert_eq!(
            checksum,
            BASE64.encode(Sha256::digest(&data)),
            "block {index}"
        );
    }
    // CompleteSnapshot with the count and the LINEAR checksum (moto ignores both).
    let completes = aws.ebs.requests_of("CompleteSnapshot");
    assert_eq!(completes.len(), 1);
    let h = &completes[0].headers;
    assert!(completes[0].path.ends_with(&snapshot));
    assert_eq!(h["x-amz-changedblockscount"], expected.len().to_string());
    assert_eq!(h["x-amz-checksum"], linear_checksum(&expected));
    assert_eq!(h["x-amz-checksum-algorithm"], "SHA256");
    assert_eq!(h["x-amz-checksum-aggregation-method"], "LINEAR");

    // EC2: RegisterImage as sent (moto keeps only the name), then what EC2 shows.
    let reg = registered(&aws);
    for (k, v) in [
        ("Name", "sync-gateway-1.0.0-test"),
        ("Architecture", "x86_64"),
        ("BootMode", "uefi"),
        ("EnaSupport", "true"),
        ("VirtualizationType", "hvm"),
        ("RootDeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3"),
        ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
    ] {
        assert_eq!(reg.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(
        !reg.contains_key("BlockDeviceMapping.2.DeviceName"),
        "one disk"
    );
    let image_tags = spec_tags(&reg, "image");
    assert_eq!(image_tags.get(DIGEST_TAG), Some(&sha));
    assert_eq!(image_tags.get("team").map(String::as_str), Some("release"));
    assert!(
        !image_tags.contains_key(MANAGED_TAG_KEY),
        "not the gateway's: {image_tags:?}"
    );
    let ec2 = aws.ec2_client();
    let image = ec2.describe_image(&ami).await.unwrap();
    assert_eq!(image.name.as_deref(), Some("sync-gateway-1.0.0-test"));
    assert_eq!(image.state, "available");
    assert_eq!(image.tags.get(DIGEST_TAG), Some(&sha));
    let snap = ec2
        .describe_snapshots(&SnapshotFilter::Ids(vec![SnapshotId::from(
            snapshot.as_str(),
        )]))
        .await
        .unwrap();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].volume_size_gib, Some(2));
    assert_eq!(snap[0].tags.get(DIGEST_TAG), Some(&sha));
    assert!(!snap[0].tags.contains_key(MANAGED_TAG_KEY));

    // A rerun: the same id, nothing uploaded, nothing registered.
    let snapshots = aws.snapshot_count().await;
    let rerun = run(&args, true).await;
    assert_eq!(ami_id(&rerun), ami);
    assert!(
        stderr(&rerun).contains("exists already"),
        "{}",
        stderr(&rerun)
    );
    assert_eq!(aws.ebs.requests_of("StartSnapshot").len(), 1);
    assert_eq!(
        aws.ebs.requests_of("PutSnapshotBlock").len(),
        expected.len()
    );
    assert_eq!(aws.ec2.requests_of("RegisterImage").len(), 1);
    assert_eq!(aws.snapshot_count().await, snapshots, "no new snapshot");

    // The file rebuilt (one byte), the same name: refused before any upload.
    File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all_at(b"x", 500 << 20)
        .unwrap();
    let out = run(&args, true).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("not from this file") && err.contains(&sha) && err.contains("--name"),
        "{err}"
    );
    assert_eq!(aws.ebs.requests_of("StartSnapshot").len(), 1);
    assert_eq!(aws.snapshot_count().await, snapshots);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_retried_and_a_failed_registration_reuses_the_upload() {
    let aws = aws("faults").await;
    // 8 MiB + 1000 bytes: 17 blocks, 9 with data.
    let size: u64 = (8 << 20) + 1000;
    let file = aws.dir.0.join("image.raw");
    let writes: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|i| (i * (1 << 20), pseudo_random(1000, i + 10)))
        .chain([(size - 1000, pseudo_random(1000, 99))])
        .collect();
    sparse_file(&file, size, &writes);
    let expected = data_blocks(&file);
    assert_eq!(expected.len(), 9);

    aws.ebs.add_fault(EbsFault::throttle("StartSnapshot", 1));
    aws.ebs.add_fault(EbsFault::throttle("PutSnapshotBlock", 3));
    aws.ebs
        .add_fault(EbsFault::lost_response("PutSnapshotBlock", 1));
    aws.ec2.add_fault(Fault::throttle("DescribeSnapshots", 1));
    // RegisterImage refused for good: the run fails after the upload.
    aws.ec2.add_fault(Fault::error(
        "RegisterImage",
        1,
        400,
        "InvalidParameterValue",
    ));
    let args = aws.args(&file, "sync-gateway-faults");
    let out = run(&args, true).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("registering snap-") && err.contains("InvalidParameterValue"),
        "{err}"
    );
    assert_eq!(
        aws.ebs.requests_of("StartSnapshot").len(),
        2,
        "throttled, retried"
    );
    let puts = aws.ebs.requests_of("PutSnapshotBlock");
    assert_eq!(
        puts.len(),
        9 + 4,
        "3 throttled and 1 lost answer sent again"
    );
    assert_eq!(puts.iter().filter(|p| p.faulted).count(), 4);
    let completes = aws.ebs.requests_of("CompleteSnapshot");
    assert_eq!(completes[0].headers["x-amz-changedblockscount"], "9");
    assert_eq!(
        completes[0].headers["x-amz-checksum"],
        linear_checksum(&expected)
    );

    // The rerun finds the completed snapshot of this file: nothing uploaded again.
    let rerun = run(&args, true).await;
    let ami = ami_id(&rerun);
    assert!(
        stderr(&rerun).contains("completed already (an earlier run): nothing uploaded"),
        "{}",
        stderr(&rerun)
    );
    assert_eq!(aws.ebs.requests_of("StartSnapshot").len(), 2);
    assert_eq!(aws.ebs.requests_of("PutSnapshotBlock").len(), 13);
    let regs = aws.ec2.requests_of("RegisterImage");
    assert_eq!(regs.len(), 2);
    let snapshot = completes[0].path.rsplit('/').next().unwrap().to_owned();
    assert_eq!(
        regs[1].params["BlockDeviceMapping.1.Ebs.SnapshotId"],
        snapshot
    );
    let image = aws.ec2_client().describe_image(&ami).await.unwrap();
    assert_eq!(image.tags.get(DIGEST_TAG), Some(&sha256_hex(&file)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_credential_problems_exit_1() {
    let aws = aws("usage").await;
    let dir = &aws.dir.0;
    let raw = dir.join("ok.raw");
    sparse_file(&raw, 4 << 20, &[(0, pseudo_random(4096, 4))]);
    let empty = dir.join("empty.raw");
    File::create(&empty).unwrap();
    let qcow2 = dir.join("image.qcow2");
    let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
    q.extend(pseudo_random(4096, 5));
    fs::write(&qcow2, q).unwrap();
    let base = aws.args(&raw, "sync-gateway-usage");
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
    let long = "d".repeat(256);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "Usage"),
        (vec!["import".into()], "unrecognized subcommand"),
        (vec!["publish".into()], "required"),
        (with(&["--tag", "novalue"]), "KEY=VALUE"),
        (with(&["--tag", "aws:stack=x"]), "aws: prefix"),
        (
            with(&["--tag", &format!("{DIGEST_TAG}=x")]),
            "sets sync-gateway:image-sha256 itself",
        ),
        (with(&["--concurrency", "0"]), "--concurrency"),
        (with(&["--timeout-secs", "0"]), "--timeout-secs"),
        (with(&["--description", &long]), "255"),
        (replace("--name", "ab"), "--name"),
        (replace("--name", "semi;colon"), "--name"),
        (replace("--region", "US East"), "--region"),
        (
            replace("--ec2-endpoint", "ftp://127.0.0.1:1"),
            "not an http(s) URL",
        ),
        (
            replace("--ebs-endpoint", "127.0.0.1:1"),
            "not an http(s) URL",
        ),
        (replace("--file", "/nonexistent/disk.raw"), "No such file"),
        (
            replace("--file", &dir.display().to_string()),
            "not a regular file",
        ),
        (replace("--file", &empty.display().to_string()), "empty"),
        (
            replace("--file", &qcow2.display().to_string()),
            "Qcow2 image",
        ),
    ];
    for (args, says) in cases {
        let out = run(&args, true).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    // --help is not an error.
    let out = run(&["publish".into(), "--help".into()], false).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("--ebs-endpoint"));

    // Credentials missing from the environment: exit 1, saying which.
    let out = run(&base, false).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("AWS_ACCESS_KEY_ID is not set") && err.contains("metadata service"),
        "{err}"
    );
    let mut cmd = command(BIN, false);
    cmd.args(&base).env("AWS_ACCESS_KEY_ID", "testing");
    let out = finish(cmd, "no secret").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("AWS_SECRET_ACCESS_KEY is not set"));
    assert!(
        aws.ec2.requests().is_empty() && aws.ebs.requests().is_empty(),
        "nothing sent"
    );

    // Credentials AWS refuses for one call: exit 1, the action named, a hint.
    aws.ebs.add_fault(EbsFault::denied("StartSnapshot", 1));
    let out = run(&base, true).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("lacks ebs:StartSnapshot")
            && err.contains("hint:")
            && err.contains("scripts/publish-aws"),
        "{err}"
    );
    assert!(aws.ebs.requests_of("PutSnapshotBlock").is_empty());
}

// --- scripts/publish-aws ---------------------------------------------------------------------

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/publish-aws")
}

/// An image-build output directory: the raw image, a qcow2 stand-in, SHA256SUMS, manifest.
fn image_dir(dir: &Path) -> PathBuf {
    let out = dir.join("image");
    fs::create_dir_all(&out).unwrap();
    let raw = out.join("sync-gateway.raw");
    sparse_file(
        &raw,
        64 << 20,
        &[
            (5 << 20, pseudo_random(8192, 21)),
            ((64 << 20) - 4096, pseudo_random(4096, 22)),
        ],
    );
    sfdisk_gpt(&raw, 16);
    let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
    q.extend(pseudo_random(4096, 23));
    fs::write(out.join("sync-gateway.qcow2"), q).unwrap();
    let sums = format!(
        "{}  sync-gateway.raw\n{}  sync-gateway.qcow2\n",
        sha256_hex(&raw),
        sha256_hex(&out.join("sync-gateway.qcow2"))
    );
    fs::write(out.join("SHA256SUMS"), sums).unwrap();
    fs::write(
        out.join("manifest.json"),
        r#"{"name": "sync-gateway", "boot_mode": "uefi",
            "gateway": {"version": "0.1.0", "git_commit": "0123456789abcdef0123456789abcdef01234567"}}"#,
    )
    .unwrap();
    out
}

async fn run_script(aws: &Aws, args: &[&str]) -> Output {
    let mut cmd = command("bash", true);
    cmd.arg(script())
        .args(args)
        .env("SYNC_AWS_IMAGE", BIN)
        .env("AWS_REGION", REGION)
        .env("AWS_ENDPOINT_URL_EC2", aws.ec2.url())
        .env("AWS_ENDPOINT_URL_EBS", aws.ebs.url());
    finish(cmd, "scripts/publish-aws").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_aws_script_publishes_an_image_build_directory() {
    let aws = aws("script").await;
    let dir = image_dir(&aws.dir.0);
    let d = dir.display().to_string();

    let out = run_script(&aws, &[&d, "--tag", "team=release"]).await;
    let ami = ami_id(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("SYNC_AWS_IMAGE={BIN}")),
        "no build: {err}"
    );
    assert!(
        err.contains("sync-gateway.raw: OK"),
        "checksum verified: {err}"
    );
    let image = aws.ec2_client().describe_image(&ami).await.unwrap();
    assert_eq!(
        image.name.as_deref(),
        Some("sync-gateway-0.1.0-0123456789ab")
    );
    assert_eq!(
        image.tags.get(DIGEST_TAG),
        Some(&sha256_hex(&dir.join("sync-gateway.raw")))
    );
    let reg = registered(&aws);
    assert_eq!(reg["BootMode"], "uefi");
    assert_eq!(
        spec_tags(&reg, "image").get("team").map(String::as_str),
        Some("release")
    );
    assert_eq!(
        aws.ebs.requests_of("PutSnapshotBlock").len(),
        data_blocks(&dir.join("sync-gateway.raw")).len()
    );

    // Again: the same AMI, nothing uploaded.
    let puts = aws.ebs.requests_of("PutSnapshotBlock").len();
    assert_eq!(ami_id(&run_script(&aws, &[&d]).await), ami);
    assert_eq!(aws.ebs.requests_of("PutSnapshotBlock").len(), puts);

    // A raw file given directly: its name must be given too (no manifest to take it from).
    let raw = dir.join("sync-gateway.raw").display().to_string();
    let out = run_script(&aws, &[&raw]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--name"), "{}", stderr(&out));
    let out = run_script(&aws, &[&raw, "--name", "sync-gateway-explicit"]).await;
    let other = ami_id(&out);
    assert_ne!(
        other, ami,
        "a second AMI of the same file under another name"
    );

    // A corrupted image: refused before anything is sent.
    let sent = aws.ec2.requests().len() + aws.ebs.requests().len();
    File::options()
        .write(true)
        .open(dir.join("sync-gateway.raw"))
        .unwrap()
        .write_all_at(b"flipped", 9 << 20)
        .unwrap();
    let out = run_script(&aws, &[&d]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    assert!(stderr(&out).contains("SHA256SUMS"), "{}", stderr(&out));
    assert_eq!(aws.ec2.requests().len() + aws.ebs.requests().len(), sent);
    // A directory that is not image-build's output.
    let out = run_script(&aws, &[&aws.dir.0.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("sync-gateway.raw"),
        "{}",
        stderr(&out)
    );
}
