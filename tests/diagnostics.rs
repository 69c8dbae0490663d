//! `collect diagnostics` end to end: the real `sync-control` and `sync-gateway` (local backend),
//! a local OSS on loopback that checks every signature, a presigned PUT URL made with STS
//! credentials. The bundle is fetched back, unpacked and searched for every secret the setup
//! holds: none may be in it.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;
#[path = "common/control.rs"]
mod control;

use std::time::Duration;

use common::*;
use control::{control_plane_toml, ControlPlane};
use sha2::{Digest, Sha256};
use sync_aliyun::oss::{OssClient, OssConfig};
use sync_aliyun::testing::oss_server::{OssServer, OssServerConfig};
use sync_aliyun::Credentials;
use sync_gateway::api::{CommandState, DiagnosticsBundle, StatusReport};

const REGION: &str = "cn-hangzhou";
const BUCKET: &str = "gw-diag";
const STS_ID: &str = "STS.DiagE2E";
const STS_SECRET: &str = "sts-secret-9c1f4e7a2b";
/// With `+`, `/` and `=`, so it travels URL-encoded.
const STS_TOKEN: &str = "CAIS+sts/Token==diag-0123456789abcdef";
const OBJECT: &str = "support/case-17/bundle.tar.gz";

fn sts() -> Credentials {
    Credentials::new(STS_ID, STS_SECRET, Some(STS_TOKEN.into()))
}

#[test]
fn a_bundle_reaches_oss_by_presigned_url_and_holds_no_secret() {
    let _serial = serial();
    let t = TestDir::new("diagnostics");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let oss = rt
        .block_on(OssServer::start(OssServerConfig {
            region: REGION.into(),
            bucket: BUCKET.into(),
            keys: vec![sts()],
            root: t.path("oss"),
        }))
        .unwrap();
    let client = OssClient::new(
        OssConfig {
            endpoint: Some(oss.endpoint()),
            ..OssConfig::new(REGION, BUCKET)
        },
        sts(),
    )
    .unwrap();
    let url = rt
        .block_on(client.presign_put(OBJECT, Duration::from_secs(900), None))
        .unwrap();
    let encoded_token = url
        .split("x-oss-security-token=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_string();
    assert_ne!(encoded_token, STS_TOKEN, "the token travels encoded: {url}");
    let signature = url
        .split("x-oss-signature=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_string();

    // A gateway with a control plane, a disk of its own ([[disks]]) and one assigned later;
    // a [diagnostics] bucket it cannot use (the local backend has no Alibaba credentials).
    let cp = ControlPlane::start_in(&t.path("control"), &[]);
    let bootstrap = cp.bootstrap_token();
    let token_file = t.path("bootstrap.token");
    std::fs::write(&token_file, format!("{bootstrap}\n")).unwrap();
    let own_key_file = t.key_path("disk-own");
    let own_key = write_key(&own_key_file, 17).to_hex();
    let config = GatewayConfig::new(t.data_dir())
        .disk("disk-own", 4 * MIB, &own_key_file)
        .extra_toml(&control_plane_toml(&cp.url, &token_file))
        .extra_toml("[log]\nlevel = \"debug\"\n")
        .extra_toml(&format!(
            "[diagnostics]\noss_bucket = \"{BUCKET}\"\noss_endpoint = \"{}\"\n",
            oss.endpoint()
        ));
    let gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway.log"));
    let gw_id = cp.online_gateway(Duration::from_secs(30));
    let assigned_key_file = t.key_path("disk-2");
    let cmd = cp.assign(&gw_id, "disk-2", 8 * MIB, &assigned_key_file);
    assert_eq!(
        cp.wait_command(&cmd, Duration::from_secs(60)).state,
        CommandState::Succeeded
    );
    let assigned_key = std::fs::read_to_string(&assigned_key_file)
        .unwrap()
        .trim()
        .to_string();
    let reg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.data_dir().join("state/control-plane.json")).unwrap(),
    )
    .unwrap();
    let credential = reg["credential"].as_str().unwrap().to_string();
    // A state file holding secrets under names that do not say so: only the value net
    // (every secret the gateway knows, in any case and encoding) keeps them out.
    let note = serde_json::json!({
        "note": format!(
            "token {bootstrap} keys {} {assigned_key} cred {credential} url-token {encoded_token}",
            own_key.to_uppercase()
        ),
        "disk": "disk-2",
    });
    std::fs::write(
        t.data_dir().join("state/support-note.json"),
        note.to_string(),
    )
    .unwrap();

    // Issued through the command line, which waits for the result.
    let run = cp.cli(&[
        "collect-diagnostics",
        "--gateway",
        &gw_id,
        "--upload-url",
        &url,
    ]);
    assert!(
        run.status.success(),
        "{}\n{}",
        run.describe(),
        gw.log_tail(40)
    );
    let view: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["kind"], "collect_diagnostics");
    // The control plane never shows the URL's query.
    let shown_url = view["args"]["upload_url"].as_str().unwrap();
    assert!(shown_url.ends_with("?<redacted>"), "{shown_url}");
    let bundle: DiagnosticsBundle =
        serde_json::from_value(view["result"]["output"]["diagnostics"].clone()).unwrap();
    assert_eq!(bundle.object_key, format!("{BUCKET}/{OBJECT}"));
    assert!(
        bundle.bucket.is_none() && !bundle.url.contains('?'),
        "{bundle:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("diagnostics bundle: {BUCKET}/{OBJECT}")),
        "{}",
        run.describe()
    );
    let top = bundle
        .file_name
        .strip_suffix(".tar.gz")
        .unwrap()
        .to_string();
    assert!(
        top.starts_with(&format!("diagnostics-{gw_id}-")) && top.ends_with('Z'),
        "{top}"
    );

    // The object is what the result says.
    let bytes = rt
        .block_on(async { client.get_object(OBJECT, None).await?.bytes().await })
        .unwrap();
    assert_eq!(bytes.len() as u64, bundle.size_bytes);
    assert_eq!(hex::encode(Sha256::digest(&bytes)), bundle.sha256);
    assert!(
        !t.data_dir().join("diagnostics.tmp").exists(),
        "the work dir is removed after the upload"
    );

    let members = unpack_tar_gz(&bytes);
    let get = |name: &str| -> String {
        let full = format!("{top}/{name}");
        let (_, data) = members.iter().find(|(n, _)| *n == full).unwrap_or_else(|| {
            panic!(
                "{full} missing; have {:?}",
                members.iter().map(|m| &m.0).collect::<Vec<_>>()
            )
        });
        String::from_utf8(data.clone()).unwrap()
    };
    for (name, _) in &members {
        assert!(name.starts_with(&format!("{top}/")), "{name}");
    }

    let readme = get("README.txt");
    assert_eq!(readme.lines().next(), Some(top.as_str()), "{readme}");
    for listed in [
        "versions.json",
        "status.json",
        "config.toml",
        "logs/gateway.log",
        "state/control-plane.json",
        "state/assignments.json",
        "Redaction",
        "not a JSON state file",
    ] {
        assert!(readme.contains(listed), "{listed} not in README:\n{readme}");
    }

    let versions: serde_json::Value = serde_json::from_str(&get("versions.json")).unwrap();
    assert_eq!(
        versions["sync_gateway"]["version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(versions["sync_gateway"]["git_commit"].is_string());
    assert!(!versions["kernel"]["release"].as_str().unwrap().is_empty());
    assert_eq!(versions["gateway_id"], gw_id.as_str());
    assert_eq!(versions["backend"], "local");

    let status: StatusReport = serde_json::from_str(&get("status.json")).unwrap();
    assert_eq!(status.gateway.gateway_id, gw_id);
    let disks: Vec<&str> = status.disks.iter().map(|d| d.disk_id.as_str()).collect();
    assert_eq!(disks, ["disk-2", "disk-own"]);

    let config_toml = get("config.toml");
    for kept in [
        "[control_plane]",
        &format!("bootstrap_token_file = \"{}\"", token_file.display()),
        &format!("key_file = \"{}\"", own_key_file.display()),
        &format!("oss_bucket = \"{BUCKET}\""),
    ] {
        assert!(config_toml.contains(kept), "{kept} not in\n{config_toml}");
    }

    let log = get("logs/gateway.log");
    for line in [
        "sync-gateway listening",
        "control plane: registered",
        "disk assigned",
    ] {
        assert!(
            log.contains(line),
            "{line:?} not in the bundled log:\n{log}"
        );
    }
    assert!(
        log.contains("DEBUG"),
        "the configured level (debug) is captured"
    );

    let reg_state: serde_json::Value =
        serde_json::from_str(&get("state/control-plane.json")).unwrap();
    assert_eq!(reg_state["credential"], "<redacted>");
    assert_eq!(reg_state["gateway_id"], gw_id.as_str());
    let assignments: serde_json::Value =
        serde_json::from_str(&get("state/assignments.json")).unwrap();
    assert_eq!(assignments["disk-2"]["agent_key"], "<redacted>");
    let note: serde_json::Value = serde_json::from_str(&get("state/support-note.json")).unwrap();
    assert_eq!(
        note["note"],
        "token <redacted> keys <redacted> <redacted> cred <redacted> url-token <redacted>"
    );

    // No secret anywhere, in any case: the whole archive, member by member.
    let secrets = [
        ("bootstrap token", bootstrap.as_str()),
        ("config disk key", own_key.as_str()),
        ("assigned disk key", assigned_key.as_str()),
        ("control-plane credential", credential.as_str()),
        ("STS secret", STS_SECRET),
        ("STS token", STS_TOKEN),
        ("STS token, URL-encoded", encoded_token.as_str()),
        ("URL signature", signature.as_str()),
    ];
    for (name, data) in &members {
        for (what, secret) in &secrets {
            assert!(!contains_ci(data, secret), "{what} found in {name}");
        }
    }
    // Nor in the gateway's own log, nor in the result the control plane keeps.
    for (what, secret) in &secrets {
        assert!(
            !contains_ci(gw.log_text().as_bytes(), secret),
            "{what} in the gateway log"
        );
        assert!(
            !contains_ci(view.to_string().as_bytes(), secret),
            "{what} in the view"
        );
    }

    // No upload target: a clear failure naming both ways to get one.
    let run = cp.cli(&["collect-diagnostics", "--gateway", &gw_id]);
    assert_eq!(run.status.code(), Some(3), "{}", run.describe());
    for part in [
        "nowhere to upload the diagnostics bundle",
        "local backend has no Alibaba Cloud credentials",
        "upload_url",
    ] {
        assert!(run.stderr.contains(part), "{part}: {}", run.describe());
    }
    assert!(
        !t.data_dir().join("diagnostics.tmp").exists(),
        "nothing left behind by a failure"
    );

    // Bad args are refused by the control plane before they reach the gateway.
    let r = cp.operator(
        "POST",
        &format!("/v1/gateways/{gw_id}/diagnostics"),
        Some(r#"{"upload_url": "ftp://127.0.0.1/x"}"#),
    );
    assert_eq!(
        (r.status, r.code()),
        (400, "bad_request".to_string()),
        "{}",
        r.body
    );
    let r = cp.operator("POST", "/v1/gateways/gw-nope/diagnostics", None);
    assert_eq!(r.status, 404, "{}", r.body);
    drop(gw);
}
