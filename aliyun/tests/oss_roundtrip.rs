//! The OSS client against the local OSS server: round trips, presigned URLs, multipart,
//! retries, and the refusals OSS gives (bad signature, stale date, STS token problems).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sync_aliyun::credentials::{CredentialsFuture, CredentialsProvider};
use sync_aliyun::oss::{
    multipart_etag, put_file_to_presigned_url, OssClient, OssConfig, OssError, PutOptions,
};
use sync_aliyun::testing::oss_server::{OssServer, OssServerConfig};
use sync_aliyun::Credentials;

const REGION: &str = "cn-shanghai";
const BUCKET: &str = "gw-bucket";

fn static_creds() -> Credentials {
    Credentials::new("LTAI5tRoundTrip", "round-trip-secret", None)
}

fn sts_creds() -> Credentials {
    Credentials::new("STS.RoundTrip", "sts-secret", Some("sts/token+1==".into()))
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: OssServer,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = OssServer::start(OssServerConfig {
        region: REGION.into(),
        bucket: BUCKET.into(),
        keys: vec![static_creds(), sts_creds()],
        root: dir.path().join("oss"),
    })
    .await
    .expect("server");
    Fixture { _dir: dir, server }
}

fn client(server: &OssServer, creds: Credentials) -> OssClient {
    let cfg = OssConfig {
        endpoint: Some(server.endpoint()),
        retry_base: Duration::from_millis(5),
        retry_cap: Duration::from_millis(50),
        ..OssConfig::new(REGION, BUCKET)
    };
    OssClient::new(cfg, creds).expect("client")
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

async fn raw_get(url: &str) -> (u16, Vec<u8>) {
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = http.get(url.parse().expect("url")).await.expect("GET");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body.to_vec())
}

fn code(e: &OssError) -> &str {
    e.code().unwrap_or("<not a service error>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_head_get_delete_round_trip() {
    let f = fixture().await;
    for creds in [static_creds(), sts_creds()] {
        let c = client(&f.server, creds.clone());
        let key = "diagnostics/2025 bundle ü*~+.tar.gz";
        let data = pseudo_random(300_000, 7);
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::write(&src, &data).expect("write");
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        let opts = PutOptions {
            content_type: Some("application/gzip".into()),
            metadata: vec![("Gateway-Id".into(), "gw 1".into())],
            progress: Some(Arc::new(move |sent, total| {
                assert_eq!(total, 300_000);
                s.store(sent, Ordering::Relaxed);
            })),
        };
        let put = c.put_object_from_file(key, &src, &opts).await.expect("put");
        assert_eq!(put.size, data.len() as u64);
        assert!(put.parts.is_empty(), "small files go in one PutObject");
        assert_eq!(
            seen.load(Ordering::Relaxed),
            300_000,
            "progress reached the end"
        );

        let head = c.head_object(key).await.expect("head");
        assert_eq!(head.size, 300_000);
        assert_eq!(head.etag, put.etag);
        assert_eq!(head.content_type.as_deref(), Some("application/gzip"));
        assert_eq!(
            head.metadata,
            vec![("gateway-id".to_string(), "gw 1".to_string())]
        );

        let got = c
            .get_object(key, None)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body");
        assert!(got == data, "GET returns what was put");
        let part = c
            .get_object(key, Some(1000..1010))
            .await
            .expect("range")
            .bytes()
            .await
            .expect("body");
        assert_eq!(part, data[1000..1010]);
        let dst = dir.path().join("dst");
        let meta = c.get_object_to_file(key, &dst).await.expect("to file");
        assert_eq!(meta.size, 300_000);
        assert!(std::fs::read(&dst).expect("read") == data);

        // A reader source, streamed with a known length.
        let reader = std::io::Cursor::new(b"from a reader".to_vec());
        c.put_object_from_reader("reader.txt", reader, 13, &PutOptions::default())
            .await
            .expect("put reader");
        let short = std::io::Cursor::new(b"short".to_vec());
        let e = c
            .put_object_from_reader("short.txt", short, 10, &PutOptions::default())
            .await
            .expect_err("a reader shorter than announced fails");
        assert!(
            matches!(
                e,
                OssError::ShortSource {
                    got: 5,
                    want: 10,
                    ..
                }
            ),
            "{e}"
        );
        assert!(c
            .head_object("short.txt")
            .await
            .expect_err("nothing stored")
            .is_not_found());

        c.delete_object(key).await.expect("delete");
        let e = c.head_object(key).await.expect_err("gone");
        assert!(e.is_not_found() && code(&e) == "NoSuchKey", "{e}");
        let e = c.get_object(key, None).await.expect_err("gone");
        assert_eq!(code(&e), "NoSuchKey");
        c.delete_object(key).await.expect("deleting twice is fine");
    }
    // STS requests carried the token and were signed over it.
    let reqs = f.server.requests();
    assert!(reqs
        .iter()
        .any(|r| r.header("x-oss-security-token") == Some("sts/token+1==")));
    assert!(reqs
        .iter()
        .all(|r| r.error_code.is_none() || r.status == 404 || r.status == 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_get_and_put() {
    let f = fixture().await;
    for creds in [static_creds(), sts_creds()] {
        let c = client(&f.server, creds);
        let key = "shared/报告 1+1.txt";
        c.put_object_bytes(
            key,
            Bytes::from_static(b"hello presigned"),
            &PutOptions::default(),
        )
        .await
        .expect("put");
        let url = c
            .presign_get(key, Duration::from_secs(600))
            .await
            .expect("presign");
        assert!(url.contains("x-oss-signature-version=OSS4-HMAC-SHA256"));
        let (status, body) = raw_get(&url).await;
        assert_eq!(
            (status, body.as_slice()),
            (200, b"hello presigned".as_slice())
        );

        // Tampering with the URL breaks the signature.
        let (status, body) = raw_get(&url.replace("%E6%8A%A5", "%E6%8A%A6")).await;
        assert_eq!(status, 403);
        assert!(String::from_utf8_lossy(&body).contains("<Code>SignatureDoesNotMatch</Code>"));

        // Expired: the server's clock moves past x-oss-date + x-oss-expires.
        f.server.set_clock_offset(601);
        let (status, body) = raw_get(&url).await;
        f.server.set_clock_offset(0);
        assert_eq!(status, 403);
        let body = String::from_utf8_lossy(&body).to_string();
        assert!(
            body.contains("<Code>AccessDenied</Code>") && body.contains("expired"),
            "{body}"
        );

        // Presigned PUT, e.g. from a diagnostics command: no credentials on the uploader.
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("bundle");
        let data = pseudo_random(250_000, 3);
        std::fs::write(&src, &data).expect("write");
        let put_url = c
            .presign_put(
                "uploads/bundle.tar.zst",
                Duration::from_secs(300),
                Some("application/zstd"),
            )
            .await
            .expect("presign put");
        let r = put_file_to_presigned_url(&put_url, &src, Some("application/zstd"), None)
            .await
            .expect("presigned put");
        assert_eq!(r.size, 250_000);
        let head = c.head_object("uploads/bundle.tar.zst").await.expect("head");
        assert_eq!((head.size, head.etag), (250_000, r.etag));
        // The content type is signed: another one is refused.
        let e = put_file_to_presigned_url(&put_url, &src, Some("text/plain"), None)
            .await
            .expect_err("content type is part of the signature");
        assert_eq!(code(&e), "SignatureDoesNotMatch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_above_the_threshold() {
    let f = fixture().await;
    let mut c_cfg = OssConfig {
        endpoint: Some(f.server.endpoint()),
        multipart_threshold: 1 << 20,
        part_size: 300 << 10,
        ..OssConfig::new(REGION, BUCKET)
    };
    c_cfg.retry_base = Duration::from_millis(5);
    let c = OssClient::new(c_cfg, sts_creds()).expect("client");
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("image.qcow2");
    let data = pseudo_random((1 << 20) + 12_345, 11);
    std::fs::write(&src, &data).expect("write");
    let opts = PutOptions {
        metadata: vec![("kind".into(), "appliance image".into())],
        ..PutOptions::default()
    };
    let put = c
        .put_object_from_file("images/gw.qcow2", &src, &opts)
        .await
        .expect("multipart");
    assert_eq!(put.parts.len(), 4, "1 MiB + 12 KiB in 300 KiB parts");
    assert_eq!(
        put.etag,
        multipart_etag(&put.parts.iter().map(|p| p.md5).collect::<Vec<_>>())
    );
    assert!(put.etag.ends_with("-4"));
    let head = c.head_object("images/gw.qcow2").await.expect("head");
    assert_eq!(head.size, data.len() as u64);
    assert_eq!(
        head.metadata,
        vec![("kind".to_string(), "appliance image".to_string())]
    );
    let got = c
        .get_object("images/gw.qcow2", None)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert!(got == data);
    // A range across the first part boundary.
    let r = c
        .get_object("images/gw.qcow2", Some((300 << 10) - 5..(300 << 10) + 5))
        .await
        .expect("range")
        .bytes()
        .await
        .expect("body");
    assert_eq!(r, data[(300 << 10) - 5..(300 << 10) + 5]);
    assert_eq!(f.server.open_uploads(), 0);

    // Explicit abort, and abort of an unknown upload.
    let id = c
        .initiate_multipart_upload("x", &PutOptions::default())
        .await
        .expect("init");
    assert_eq!(f.server.open_uploads(), 1);
    c.abort_multipart_upload("x", &id).await.expect("abort");
    assert_eq!(f.server.open_uploads(), 0);
    let e = c
        .abort_multipart_upload("x", &id)
        .await
        .expect_err("already gone");
    assert_eq!(code(&e), "NoSuchUpload");

    // A failing multipart upload is aborted, not left behind.
    let bad = OssClient::new(
        OssConfig {
            endpoint: Some(f.server.endpoint()),
            multipart_threshold: 1 << 20,
            part_size: 300 << 10,
            max_attempts: 2,
            retry_base: Duration::from_millis(1),
            ..OssConfig::new(REGION, BUCKET)
        },
        sts_creds(),
    )
    .expect("client");
    // Initiate succeeds; the first part fails twice (503), exhausting its attempts.
    let before = f.server.requests().len();
    f.server.fail_after(1, 2, 503, "ServiceUnavailable");
    let e = bad
        .put_object_from_file("images/failed.qcow2", &src, &PutOptions::default())
        .await
        .expect_err("part 1 fails on every attempt");
    assert_eq!(code(&e), "ServiceUnavailable");
    let tail: Vec<(String, u16)> = f.server.requests()[before..]
        .iter()
        .map(|r| (r.method.clone(), r.status))
        .collect();
    assert_eq!(
        tail,
        vec![
            ("POST".to_string(), 200),
            ("PUT".to_string(), 503),
            ("PUT".to_string(), 503),
            ("DELETE".to_string(), 204)
        ],
        "initiate, two failed attempts, abort"
    );
    assert_eq!(f.server.open_uploads(), 0, "no upload left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_5xx_with_backoff_then_succeeds() {
    let f = fixture().await;
    let c = client(&f.server, static_creds());
    f.server.fail_next(2, 503, "ServiceUnavailable");
    c.put_object_bytes(
        "retry.txt",
        Bytes::from_static(b"abc"),
        &PutOptions::default(),
    )
    .await
    .expect("third attempt succeeds");
    let codes: Vec<Option<String>> = f
        .server
        .requests()
        .iter()
        .map(|r| r.error_code.clone())
        .collect();
    assert_eq!(
        codes,
        vec![
            Some("ServiceUnavailable".into()),
            Some("ServiceUnavailable".into()),
            None
        ]
    );
    f.server.fail_next(10, 500, "InternalError");
    let e = c
        .head_object("retry.txt")
        .await
        .expect_err("5 attempts, all failing");
    assert!(e.is_retryable() && code(&e) == "InternalError", "{e}");
    assert_eq!(f.server.requests().len(), 3 + 5, "max_attempts = 5");
    // A reader is one pass: its failure is reported, not retried.
    f.server.fail_next(1, 503, "ServiceUnavailable");
    let before = f.server.requests().len();
    let e = c
        .put_object_from_reader(
            "reader.txt",
            std::io::Cursor::new(vec![7u8; 1000]),
            1000,
            &PutOptions::default(),
        )
        .await
        .expect_err("no second pass over a reader");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(f.server.requests().len(), before + 1, "sent once");
    f.server.fail_next(0, 503, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_oss_codes() {
    let f = fixture().await;
    let good = client(&f.server, static_creds());
    good.put_object_bytes("k", Bytes::from_static(b"v"), &PutOptions::default())
        .await
        .expect("put");

    let wrong_secret = client(&f.server, Credentials::new("LTAI5tRoundTrip", "nope", None));
    let e = wrong_secret
        .head_object("k")
        .await
        .expect_err("bad signature");
    assert_eq!(code(&e), "SignatureDoesNotMatch");
    assert!(!e.is_retryable());
    let e = wrong_secret
        .get_object("k", None)
        .await
        .expect_err("bad signature");
    let OssError::Service(se) = &e else {
        panic!("{e}")
    };
    assert_eq!(se.status, 403);
    assert!(
        !se.request_id.is_empty() && se.message.contains("signature"),
        "{e}"
    );

    let unknown = client(&f.server, Credentials::new("LTAIunknown", "x", None));
    assert_eq!(
        code(&unknown.head_object("k").await.expect_err("unknown")),
        "InvalidAccessKeyId"
    );

    let no_token = client(
        &f.server,
        Credentials::new("STS.RoundTrip", "sts-secret", None),
    );
    assert_eq!(
        code(
            &no_token
                .head_object("k")
                .await
                .expect_err("STS key without token")
        ),
        "InvalidAccessKeyId"
    );
    let bad_token = client(
        &f.server,
        Credentials::new("STS.RoundTrip", "sts-secret", Some("other".into())),
    );
    assert_eq!(
        code(&bad_token.head_object("k").await.expect_err("wrong token")),
        "InvalidSecurityToken"
    );
    let stray_token = client(
        &f.server,
        Credentials::new("LTAI5tRoundTrip", "round-trip-secret", Some("t".into())),
    );
    assert_eq!(
        code(
            &stray_token
                .head_object("k")
                .await
                .expect_err("token on a long-term key")
        ),
        "InvalidAccessKeyId"
    );

    // Stale: the server's clock is 16 minutes ahead of the client's x-oss-date.
    f.server.set_clock_offset(16 * 60);
    let e = good.get_object("k", None).await.expect_err("stale");
    assert_eq!(code(&e), "RequestTimeTooSkewed");
    f.server.set_clock_offset(-16 * 60);
    assert_eq!(
        code(&good.head_object("k").await.expect_err("future")),
        "RequestTimeTooSkewed"
    );
    f.server.set_clock_offset(14 * 60);
    good.head_object("k")
        .await
        .expect("14 minutes is within OSS's window");
    f.server.set_clock_offset(0);

    // A credentials provider is asked before each request (RAM-role STS in production).
    let provided = OssClient::with_provider(
        OssConfig {
            endpoint: Some(f.server.endpoint()),
            ..OssConfig::new(REGION, BUCKET)
        },
        Arc::new(Rotating::default()),
    )
    .expect("client");
    provided.head_object("k").await.expect("first credentials");
    provided.head_object("k").await.expect("second credentials");
    let tokens: Vec<Option<String>> = f.server.requests()[f.server.requests().len() - 2..]
        .iter()
        .map(|r| r.header("x-oss-security-token").map(str::to_string))
        .collect();
    assert_eq!(tokens, vec![None, Some("sts/token+1==".to_string())]);

    // Unsigned.
    let (status, body) = raw_get(&format!("{}/{BUCKET}/k", f.server.endpoint())).await;
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("<Code>AccessDenied</Code>"));
    // Another bucket.
    let other = OssClient::new(
        OssConfig {
            endpoint: Some(f.server.endpoint()),
            ..OssConfig::new(REGION, "other-bucket")
        },
        static_creds(),
    )
    .expect("client");
    assert_eq!(
        code(&other.head_object("k").await.expect_err("no bucket")),
        "NoSuchBucket"
    );
    // Another region in the scope.
    let elsewhere = OssClient::new(
        OssConfig {
            endpoint: Some(f.server.endpoint()),
            ..OssConfig::new("cn-beijing", BUCKET)
        },
        static_creds(),
    )
    .expect("client");
    assert!(elsewhere.head_object("k").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_accepts_virtual_hosted_requests() {
    let f = fixture().await;
    let c = client(&f.server, static_creds());
    c.put_object_bytes(
        "dir/v h.txt",
        Bytes::from_static(b"vhost"),
        &PutOptions::default(),
    )
    .await
    .expect("put");
    // What a client of real OSS sends: the bucket in Host, the key alone in the path; the
    // signed resource is still /bucket/key.
    let mut req = sync_aliyun::oss::sign::RequestToSign::new("GET", BUCKET, "dir/v h.txt");
    let auth = sync_aliyun::oss::sign::sign_request(
        &mut req,
        &static_creds(),
        REGION,
        time::OffsetDateTime::now_utc(),
    );
    let mut b = hyper::Request::builder()
        .uri(format!("{}/dir/v%20h.txt", f.server.endpoint()))
        // Virtual-hosted: the bucket is the first label of the host (a loopback name here).
        .header("host", format!("{BUCKET}.localhost"))
        .header("authorization", auth);
    for (k, v) in &req.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = http
        .request(b.body(Empty::new()).expect("request"))
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"vhost");
}

/// Hands out the long-term key first, then the STS one.
#[derive(Debug, Default)]
struct Rotating(AtomicU64);

impl CredentialsProvider for Rotating {
    fn credentials(&self) -> CredentialsFuture<'_> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move { Ok(if n == 0 { static_creds() } else { sts_creds() }) })
    }
}

#[test]
fn addressing_follows_the_endpoint() {
    let creds = static_creds();
    let real = OssClient::new(OssConfig::new("cn-hangzhou", "b1"), creds.clone()).expect("client");
    assert_eq!(
        real.object_url("a b/c+d", &[]),
        "https://b1.oss-cn-hangzhou.aliyuncs.com/a%20b%2Fc%2Bd"
    );
    let local = OssClient::new(
        OssConfig {
            endpoint: Some("http://localhost:9000".into()),
            ..OssConfig::new("cn-hangzhou", "b1")
        },
        creds.clone(),
    )
    .expect("client");
    assert_eq!(local.object_url("k", &[]), "http://localhost:9000/b1/k");
    let bad = OssClient::new(
        OssConfig {
            part_size: 1000,
            ..OssConfig::new("cn-hangzhou", "b1")
        },
        creds,
    );
    assert!(matches!(bad, Err(OssError::Invalid(_))));
}
