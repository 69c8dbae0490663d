//! The V4 signer against the official SDK: oss2 (`ProviderAuthV4`, region cn-hangzhou) sends
//! a table of requests to the local OSS server (which records them and checks them too), and
//! every captured `Authorization` header and presigned URL is recomputed here with
//! `sync_aliyun::oss::sign` from the SDK's own `x-oss-date`, and must be byte-identical.

use std::path::PathBuf;
use std::process::Command;

use sync_aliyun::oss::sign::{self, RequestToSign};
use sync_aliyun::oss::{Addressing, OssClient, OssConfig};
use sync_aliyun::testing::oss_server::{OssServer, OssServerConfig};
use sync_aliyun::Credentials;

const REGION: &str = "cn-hangzhou";
const BUCKET: &str = "sync-diagnostics";

fn static_creds() -> Credentials {
    Credentials::new(
        "LTAI5tOssStaticKey",
        "oss-static-secret/with+odd=chars",
        None,
    )
}

fn sts_creds() -> Credentials {
    Credentials::new(
        "STS.NUOssRoleKey",
        "oss-sts-secret",
        Some("CAIS+oss/token=with==padding".into()),
    )
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SYNC_PYTHON") {
        return p.into();
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python"))
}

fn decode(s: &str, plus: bool) -> String {
    let s = if plus {
        s.replace('+', " ")
    } else {
        s.to_string()
    };
    percent_encoding::percent_decode_str(&s)
        .decode_utf8()
        .expect("utf-8")
        .into_owned()
}

/// Splits a path-style request target into (bucket, key, query), as OSS would read it.
fn parse_target(target: &str) -> (String, String, Vec<(String, String)>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (bucket, key) = path[1..].split_once('/').expect("path style");
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k, true), decode(v, true))
        })
        .collect();
    (decode(bucket, false), decode(key, false), query)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oss2_v4_headers_and_presigned_urls_are_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = OssServer::start(OssServerConfig {
        region: REGION.into(),
        bucket: BUCKET.into(),
        keys: vec![static_creds(), sts_creds()],
        root: dir.path().to_path_buf(),
    })
    .await
    .expect("server");
    let endpoint = server.endpoint();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/aliyun_oss_sdk.py");
    let py = python();
    assert!(
        py.exists(),
        "{} is missing: create the venv with tests/requirements.txt (oss2 >= 2.18.4)",
        py.display()
    );
    let ep = endpoint.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script)
            .arg(&ep)
            .arg(BUCKET)
            .output()
            .expect("run the oss2 script")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "oss2 script failed:\n{stdout}\n{}\nserver saw: {:#?}",
        String::from_utf8_lossy(&out.stderr),
        server.requests().last()
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let version = lines[0]["version"].as_str().expect("version");
    let parsed: Vec<u32> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    assert!(
        parsed >= vec![2, 18, 4],
        "oss2 {version} is older than 2.18.4"
    );
    let cases = &lines[1..];
    let recorded = server.requests();
    assert_eq!(recorded.len(), cases.len(), "one request per case");

    // Our client's URL form for the same endpoint, to compare whole presigned URLs.
    let ours = OssClient::new(
        OssConfig {
            endpoint: Some(endpoint.clone()),
            ..OssConfig::new(REGION, BUCKET)
        },
        static_creds(),
    )
    .expect("client");
    assert_eq!(
        ours.addressing(),
        Addressing::Path,
        "oss2 uses path style for an IP endpoint"
    );

    let (mut headers_checked, mut urls_checked, mut with_token) = (0, 0, 0);
    for (case, rec) in cases.iter().zip(&recorded) {
        let name = case["case"].as_str().expect("case");
        assert!(
            (200..300).contains(&rec.status),
            "{name}: the server refused the SDK's request: {} {:?}",
            rec.status,
            rec.error_code
        );
        let sts = case["sts"].as_bool().expect("sts");
        let creds = if sts { sts_creds() } else { static_creds() };
        let key = case["key"].as_str().expect("key");
        let method = case["method"].as_str().expect("method");
        assert_eq!(rec.method, method, "{name}");
        let (bucket, got_key, query) = parse_target(&rec.target);
        assert_eq!(
            (bucket.as_str(), got_key.as_str()),
            (BUCKET, key),
            "{name}: target {}",
            rec.target
        );
        let additional: Vec<String> = case["additional"]
            .as_array()
            .expect("additional")
            .iter()
            .map(|v| v.as_str().expect("name").to_string())
            .collect();
        match case["kind"].as_str() {
            Some("request") => {
                let sent = rec.header("authorization").expect("Authorization sent");
                let date = rec.header("x-oss-date").expect("x-oss-date sent");
                let mut req = RequestToSign {
                    method: method.into(),
                    bucket: Some(BUCKET.into()),
                    key: key.into(),
                    query,
                    headers: rec.headers.clone(),
                    additional_headers: additional,
                };
                let now = sign::parse_datetime(date).expect("x-oss-date form");
                let mine = sign::sign_request(&mut req, &creds, REGION, now);
                assert_eq!(
                    mine,
                    sent,
                    "{name}: Authorization differs\ncanonical request:\n{}",
                    req.canonical_request()
                );
                assert_eq!(
                    rec.header("x-oss-security-token"),
                    creds.security_token.as_deref(),
                    "{name}"
                );
                assert_eq!(rec.header("x-oss-content-sha256"), Some("UNSIGNED-PAYLOAD"));
                headers_checked += 1;
            }
            Some("presign") => {
                let url = case["url"].as_str().expect("url");
                let date = query
                    .iter()
                    .find(|(k, _)| k == "x-oss-date")
                    .map(|(_, v)| v.clone())
                    .expect("x-oss-date in URL");
                let mut req = RequestToSign::new(method, BUCKET, key);
                for (k, v) in case["headers"].as_object().expect("headers") {
                    req.headers
                        .push((k.clone(), v.as_str().expect("value").into()));
                }
                req.additional_headers = additional;
                let now = sign::parse_datetime(&date).expect("date form");
                let q = sign::presign_query(&req, &creds, REGION, now, 600);
                let mine = ours.object_url(key, &q);
                assert_eq!(mine, url, "{name}: presigned URL differs");
                assert_eq!(
                    format!("{endpoint}{}", rec.target),
                    url,
                    "{name}: fetched as signed"
                );
                if sts {
                    assert!(url.contains("x-oss-security-token="), "{name}");
                }
                urls_checked += 1;
            }
            other => panic!("{name}: unknown kind {other:?}"),
        }
        if sts {
            with_token += 1;
        }
    }
    assert!(headers_checked >= 40, "only {headers_checked} header cases");
    assert!(urls_checked >= 10, "only {urls_checked} presigned cases");
    assert!(
        with_token * 2 == cases.len(),
        "half the table runs with an STS token"
    );
    assert_eq!(server.open_uploads(), 0);
    assert!(server
        .object_keys()
        .iter()
        .all(|k| k.ends_with(".multipart")));
}
