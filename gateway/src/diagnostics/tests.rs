#![allow(clippy::unwrap_used)]

use std::io::Read;

use sync_aliyun::testing::oss_server::{OssServer, OssServerConfig};
use sync_aliyun::Credentials;

use super::*;

const REGION: &str = "cn-hangzhou";
const BUCKET: &str = "gw-diagnostics";
const STS_SECRET: &str = "sts-secret-a8f3b2c1";
const STS_TOKEN: &str = "CAIS/sts+token==0123456789";

fn sts() -> Credentials {
    Credentials::new("STS.DiagTest", STS_SECRET, Some(STS_TOKEN.into()))
}

fn access() -> AliyunAccess {
    AliyunAccess {
        region: REGION.into(),
        credentials: Arc::new(sts()),
    }
}

async fn oss(dir: &Path) -> OssServer {
    OssServer::start(OssServerConfig {
        region: REGION.into(),
        bucket: BUCKET.into(),
        keys: vec![sts()],
        root: dir.join("oss"),
    })
    .await
    .unwrap()
}

fn unpack(bytes: &[u8]) -> Vec<(String, String)> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut text = String::new();
            e.read_to_string(&mut text).unwrap();
            (name, text)
        })
        .collect()
}

#[test]
fn the_redacted_config_keeps_settings_and_loses_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("disk-1.key");
    let key = "0f".repeat(32);
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let text = format!(
        r#"
data_dir = "/var/lib/sync-gateway"
[backend]
kind = "aws"
region = "us-east-1"
endpoint_url = "http://127.0.0.1:5000/?X-Amz-Signature=presigned-signature-1"
access_key_id = "AKIDTESTKEY123"
secret_access_key = "aws-secret-key-value"
session_token = "aws-session-token-value"
[control_plane]
url = "http://127.0.0.1:8443"
bootstrap_token_file = "/etc/sync-gateway/bootstrap.token"
[diagnostics]
oss_bucket = "acme-support"
[[disks]]
id = "disk-1"
size_bytes = 4096
key_file = "{}"
"#,
        key_file.display()
    );
    let config = Config::from_toml(&text, "t", Vec::new()).unwrap();
    let mut found = Scrubber::default();
    let rendered = redacted_config(&config, &mut found);
    for secret in [
        "AKIDTESTKEY123",
        "aws-secret-key-value",
        "aws-session-token-value",
        "presigned-signature-1",
        &key,
    ] {
        assert!(!rendered.contains(secret), "{secret} in\n{rendered}");
    }
    for kept in [
        "region = \"us-east-1\"",
        "bootstrap_token_file = \"/etc/sync-gateway/bootstrap.token\"",
        &format!("key_file = \"{}\"", key_file.display()),
        "oss_bucket = \"acme-support\"",
        "oss_prefix = \"sync-gateway/diagnostics/\"",
        "secret_access_key = \"<redacted>\"",
        "endpoint_url = \"http://127.0.0.1:5000/?<redacted>\"",
    ] {
        assert!(rendered.contains(kept), "{kept} not in\n{rendered}");
    }
    // Still a config (for support to reproduce a setup), and what was removed is known.
    let body: String = rendered
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    Config::from_toml(&body, "redacted", Vec::new()).unwrap();
    let log = "sts aws-session-token-value and AWS-SECRET-KEY-VALUE";
    assert_eq!(found.scrub(log), "sts <redacted> and <redacted>");
}

#[test]
fn state_files_are_redacted_other_files_listed_and_links_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("sub")).unwrap();
    let credential = "gw-credential-5d41402abc4b2a76";
    let agent_key = "a1".repeat(32);
    std::fs::write(
        state.join("control-plane.json"),
        json!({"gateway_id": "gw-1", "credential": credential, "url": "http://127.0.0.1:1"})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        state.join("assignments.json"),
        json!({"disk-1": {"size_bytes": 4096, "agent_key": agent_key, "phase": "replicating"}})
            .to_string(),
    )
    .unwrap();
    std::fs::write(state.join("disk-1.seq"), [0u8, 1, 2, 3]).unwrap();
    std::fs::write(state.join("sub/policy.json"), "{\"bandwidth\": 5}").unwrap();
    std::fs::write(state.join("broken.json"), "{not json").unwrap();
    let outside = dir.path().join("outside-secret.json");
    std::fs::write(&outside, "{\"x\": \"outside-secret-value\"}").unwrap();
    std::os::unix::fs::symlink(&outside, state.join("link.json")).unwrap();

    let (mut members, mut notes, mut found, mut count) =
        (Vec::new(), Vec::new(), Scrubber::default(), 0);
    state_members(
        &state,
        "state",
        0,
        &mut count,
        &mut members,
        &mut notes,
        &mut found,
    );
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "state/assignments.json",
            "state/control-plane.json",
            "state/sub/policy.json"
        ]
    );
    let all: String = members
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect();
    assert!(
        !all.contains(credential) && !all.contains(&agent_key),
        "{all}"
    );
    assert!(all.contains("\"gateway_id\": \"gw-1\"") && all.contains("<redacted>"));
    assert!(!all.contains("outside-secret-value"));
    let notes = notes.join("\n");
    for n in [
        "state/disk-1.seq (4 bytes): not a JSON state file",
        "state/link.json: a symlink, not followed",
        "state/broken.json: unreadable",
    ] {
        assert!(notes.contains(n), "{n} not in\n{notes}");
    }
    // The values removed by name are scrubbed anywhere else, e.g. a log line.
    let line = format!(
        "assigned with key {} cred {credential}",
        agent_key.to_uppercase()
    );
    assert_eq!(
        found.scrub(&line),
        "assigned with key <redacted> cred <redacted>"
    );
}

#[test]
fn without_a_target_the_error_says_what_to_configure() {
    let mut diag = DiagnosticsConfig::default();
    let e = bucket_target(&diag, Some(access()), "aliyun", None).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("no [diagnostics] oss_bucket") && msg.contains("upload_url"),
        "{msg}"
    );
    diag.oss_bucket = Some(BUCKET.into());
    let e = bucket_target(&diag, None, "local", None).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("local backend has no Alibaba Cloud credentials")
            && msg.contains("configure [diagnostics] oss_bucket on an aliyun gateway")
            && msg.contains("upload_url"),
        "{msg}"
    );
    // The command's prefix wins and gets its '/'; the config's region is the default.
    let Target::Bucket { prefix, client, .. } =
        bucket_target(&diag, Some(access()), "aliyun", Some("case-7")).unwrap()
    else {
        panic!("not a bucket target")
    };
    assert_eq!(prefix, "case-7/");
    assert_eq!(client.config().region, REGION);
}

#[test]
fn bundle_names_are_safe_for_files_and_keys() {
    let t = OffsetDateTime::from_unix_timestamp(1_735_689_600).unwrap(); // 2025-01-01
    assert_eq!(
        bundle_name("gw-1a2b", t),
        "diagnostics-gw-1a2b-20250101T000000Z"
    );
    assert_eq!(
        bundle_name("../we ird/", t),
        "diagnostics-.._we_ird_-20250101T000000Z"
    );
}

#[test]
fn the_log_member_says_how_much_it_holds() {
    let ring = logring::LogRing::new(16, 100);
    for i in 0..4 {
        ring.push(format!("event {i}\n").as_bytes());
    }
    let m = log_member(Some(&ring));
    assert_eq!(m.name, "logs/gateway.log");
    assert_eq!(m.data, b"event 2\nevent 3\n");
    assert!(m.about.contains("2 older ones dropped"), "{}", m.about);
    assert!(log_member(None).about.contains("not captured"));
}

#[test]
fn os_release_lines_parse() {
    let m = parse_os_release("# c\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n\n");
    assert_eq!(m["PRETTY_NAME"], "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(m["ID"], "debian");
    assert_eq!(m.len(), 2);
}

/// Both upload paths against the local OSS (which checks every signature), and a refused
/// upload whose error carries no secret.
#[tokio::test]
async fn bundles_upload_to_the_bucket_and_to_a_presigned_url() {
    let dir = tempfile::tempdir().unwrap();
    let server = oss(dir.path()).await;
    let archive_path = dir.path().join("b.tar.gz");
    let members = vec![Member::new("status.json", "{}\n", "status")];
    let written = archive::write(&archive_path, "diagnostics-gw-1-x", &members, 0).unwrap();
    let local = std::fs::read(&archive_path).unwrap();
    let mut scrubber = Scrubber::default();
    scrubber.add(STS_TOKEN);
    scrubber.add(STS_SECRET);
    let fetch = OssClient::new(
        OssConfig {
            endpoint: Some(server.endpoint()),
            ..OssConfig::new(REGION, BUCKET)
        },
        sts(),
    )
    .unwrap();

    // The configured bucket, signed with the gateway's (here: static STS) credentials.
    let diag = DiagnosticsConfig {
        oss_bucket: Some(BUCKET.into()),
        oss_endpoint: Some(server.endpoint()),
        ..DiagnosticsConfig::default()
    };
    let target = bucket_target(&diag, Some(access()), "aliyun", None).unwrap();
    let b = upload(
        &target,
        &archive_path,
        "diagnostics-gw-1-x.tar.gz",
        &written,
        &scrubber,
    )
    .await
    .unwrap();
    assert_eq!(
        b.object_key,
        "sync-gateway/diagnostics/diagnostics-gw-1-x.tar.gz"
    );
    assert_eq!(b.bucket.as_deref(), Some(BUCKET));
    assert_eq!((b.size_bytes, &b.sha256), (written.size, &written.sha256));
    let body = fetch.get_object(&b.object_key, None).await.unwrap();
    assert_eq!(body.meta.content_type.as_deref(), Some("application/gzip"));
    assert_eq!(body.bytes().await.unwrap(), local);
    assert_eq!(unpack(&local)[1].0, "diagnostics-gw-1-x/status.json");

    // A presigned URL: its path names the object.
    let url = fetch
        .presign_put(
            "support/case 9/bundle.tar.gz",
            Duration::from_secs(600),
            None,
        )
        .await
        .unwrap();
    assert!(url.contains("x-oss-security-token"), "{url}");
    let b = upload(
        &Target::Presigned { url: url.clone() },
        &archive_path,
        "diagnostics-gw-1-x.tar.gz",
        &written,
        &scrubber,
    )
    .await
    .unwrap();
    assert_eq!(
        b.object_key,
        format!("{BUCKET}/support/case 9/bundle.tar.gz")
    );
    assert!(b.bucket.is_none() && !b.url.contains('?'), "{b:?}");
    let got = fetch
        .get_object("support/case 9/bundle.tar.gz", None)
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap(), local);

    // An expired URL: a clear error, without the URL's token or signature.
    server.set_clock_offset(3600);
    let mut with_url = scrubber.clone();
    with_url.add_url_secrets(&url);
    let e = upload(
        &Target::Presigned { url: url.clone() },
        &archive_path,
        "x.tar.gz",
        &written,
        &with_url,
    )
    .await
    .unwrap_err();
    let msg = crate::cli::error_chain(&e);
    assert!(msg.contains("AccessDenied"), "{msg}");
    assert!(msg.contains("bundle.tar.gz"), "{msg}");
    let signature = url.split("x-oss-signature=").nth(1).unwrap();
    assert!(
        !msg.contains(signature) && !msg.contains("security-token="),
        "{msg}"
    );
}
