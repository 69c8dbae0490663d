//! The metadata client against the fake hardened-mode metadata service on loopback.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_aliyun::credentials::CredentialsProvider;
use sync_aliyun::meta::{
    InstanceMetadata, MetaError, MetaOptions, RamRoleCredentialsProvider, RefreshPolicy,
};
use sync_aliyun::testing::meta_server::{in_whole_seconds, FakeMetaConfig, FakeMetaServer};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn fake() -> FakeMetaServer {
    FakeMetaServer::start(FakeMetaConfig::default())
        .await
        .unwrap()
}

fn provider(server: &FakeMetaServer, policy: RefreshPolicy) -> RamRoleCredentialsProvider {
    RamRoleCredentialsProvider::new(InstanceMetadata::new(&server.url()).unwrap(), None, policy)
}

fn soon(ms: u64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + Duration::from_millis(ms)
}

/// The error and its sources, as an operator would read them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut s = e.source();
    while let Some(x) = s {
        out += &format!(": {x}");
        s = x.source();
    }
    out
}

/// One raw HTTP/1.1 exchange; returns the status code and the body.
async fn raw(server: &FakeMetaServer, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(server.addr()).await.unwrap();
    let host = server.addr();
    let req = format!("{head}\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test]
async fn identity_and_credentials_through_one_token() {
    let server = fake().await;
    let want = FakeMetaConfig::default();
    let meta = InstanceMetadata::new(&server.url()).unwrap();

    assert_eq!(meta.instance_id().await.unwrap(), want.instance_id);
    assert_eq!(meta.region_id().await.unwrap(), want.region_id);
    assert_eq!(meta.zone_id().await.unwrap(), want.zone_id);

    let doc = meta.identity_document().await.unwrap();
    assert_eq!(doc.instance_id, want.instance_id);
    assert_eq!(doc.region_id, want.region_id);
    assert_eq!(doc.zone_id, want.zone_id);
    assert_eq!(
        doc.owner_account_id.as_deref(),
        Some(&*want.owner_account_id)
    );
    assert_eq!(doc.instance_type.as_deref(), Some(&*want.instance_type));
    assert_eq!(doc.private_ipv4.as_deref(), Some(&*want.private_ipv4));
    assert!(doc.raw.starts_with('{') && doc.raw.contains("\"owner-account-id\""));

    assert_eq!(meta.identity_signature(None).await.unwrap(), want.pkcs7);
    assert_eq!(server.last_audience(), None);
    // The audience travels percent-encoded and arrives intact.
    let audience = "gw register 2026-01/ü&x=y+z";
    meta.identity_signature(Some(audience)).await.unwrap();
    assert_eq!(server.last_audience().as_deref(), Some(audience));

    assert_eq!(meta.role_name().await.unwrap(), "sync-gateway-role");
    let rc = meta.role_credentials().await.unwrap();
    assert_eq!(rc.role, "sync-gateway-role");
    assert_eq!(rc.credentials.access_key_id, want.access_key_id);
    assert_eq!(rc.credentials.access_key_secret, want.access_key_secret);
    assert_eq!(
        rc.credentials.security_token.as_deref(),
        Some(&*want.security_token)
    );
    assert_eq!(rc.expiration, std::time::SystemTime::from(want.expiration));

    let creds = meta.credentials_provider().credentials().await.unwrap();
    assert_eq!(creds, rc.credentials);
    // As the ECS and OSS clients see it.
    let shared: Arc<dyn CredentialsProvider> = Arc::new(meta.credentials_provider());
    assert_eq!(shared.credentials().await.unwrap(), rc.credentials);

    let stats = server.stats();
    assert_eq!(stats.tokens_issued(), 1, "one token serves every GET");
    // 3 items, document, 2 signatures, listing, then listing + credentials three times.
    assert_eq!(stats.gets_served(), 13);
    assert_eq!(stats.credential_fetches(), 3);
    assert_eq!(stats.unauthorized() + stats.forbidden(), 0);
    // Nothing secret in the clients' Debug.
    let shown = format!("{meta:?} {:?} {rc:?}", meta.credentials_provider());
    assert!(!shown.contains(&want.access_key_secret) && !shown.contains(&want.security_token));
}

#[tokio::test]
async fn fake_refuses_what_hardened_mode_refuses() {
    let server = fake().await;
    let id = "GET /latest/meta-data/instance-id HTTP/1.1";
    // No token: normal-mode access on a hardened-only instance.
    assert_eq!(raw(&server, id).await.0, 403);
    assert_eq!(
        raw(
            &server,
            &format!("{id}\r\nX-aliyun-ecs-metadata-token: forged")
        )
        .await
        .0,
        401
    );

    let put = "PUT /latest/api/token HTTP/1.1\r\nContent-Length: 0";
    assert_eq!(raw(&server, put).await.0, 400, "TTL header is required");
    for ttl in ["0", "21601", "six hours"] {
        let with_ttl = format!("{put}\r\nX-aliyun-ecs-metadata-token-ttl-seconds: {ttl}");
        assert_eq!(raw(&server, &with_ttl).await.0, 400, "TTL {ttl}");
    }
    let good_put = format!("{put}\r\nX-aliyun-ecs-metadata-token-ttl-seconds: 21600");
    let proxied = format!("{good_put}\r\nX-Forwarded-For: 203.0.113.9");
    assert_eq!(raw(&server, &proxied).await.0, 403);
    assert_eq!(raw(&server, "GET /latest/api/token HTTP/1.1").await.0, 405);

    let (status, token) = raw(&server, &good_put).await;
    assert_eq!(status, 200);
    let with_token = format!("{id}\r\nX-aliyun-ecs-metadata-token: {token}");
    let (status, body) = raw(&server, &with_token).await;
    assert_eq!((status, body.as_str()), (200, "i-bp13znx0m0me8cquu0fake"));
    let missing =
        format!("GET /latest/meta-data/nothing HTTP/1.1\r\nX-aliyun-ecs-metadata-token: {token}");
    assert_eq!(raw(&server, &missing).await.0, 404);

    // A token lives as long as asked.
    let short = format!("{put}\r\nX-aliyun-ecs-metadata-token-ttl-seconds: 1");
    let (_, token) = raw(&server, &short).await;
    let with_short = format!("{id}\r\nX-aliyun-ecs-metadata-token: {token}");
    assert_eq!(raw(&server, &with_short).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(raw(&server, &with_short).await.0, 401);

    let s = server.stats();
    assert_eq!(
        (s.tokens_issued(), s.forbidden(), s.unauthorized()),
        (2, 2, 2)
    );
}

#[tokio::test]
async fn token_renewed_before_its_ttl_ends() {
    let server = fake().await;
    let meta = InstanceMetadata::with_options(MetaOptions {
        endpoint: server.url(),
        token_ttl_secs: 1,
    })
    .unwrap();
    meta.instance_id().await.unwrap();
    meta.region_id().await.unwrap();
    assert_eq!(server.stats().tokens_issued(), 1);
    // A 1 s token is renewed after 3/4 of it, before the service would refuse it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    meta.zone_id().await.unwrap();
    assert_eq!(server.stats().tokens_issued(), 2);
    assert_eq!(
        server.stats().unauthorized(),
        0,
        "renewed before expiry, not after a 401"
    );
}

#[tokio::test]
async fn token_renewed_after_401() {
    let server = fake().await;
    let meta = InstanceMetadata::new(&server.url()).unwrap();
    meta.instance_id().await.unwrap();
    server.revoke_tokens(); // the service restarted
    assert_eq!(meta.region_id().await.unwrap(), "cn-hangzhou");
    assert_eq!(server.stats().unauthorized(), 1);
    assert_eq!(server.stats().tokens_issued(), 2);
    meta.zone_id().await.unwrap();
    assert_eq!(server.stats().tokens_issued(), 2, "the new token is cached");
}

#[tokio::test]
async fn server_errors_are_retried_then_reported_with_the_path() {
    let server = fake().await;
    let meta = InstanceMetadata::new(&server.url()).unwrap();
    meta.instance_id().await.unwrap();

    server.fail_next(2);
    assert_eq!(meta.region_id().await.unwrap(), "cn-hangzhou");
    assert_eq!(server.stats().injected_failures(), 2);

    server.fail_next(3);
    let e = meta.zone_id().await.unwrap_err();
    assert!(matches!(e, MetaError::Status { attempts: 3, .. }), "{e:?}");
    assert!(e.is_retryable());
    assert_eq!(
        e.to_string(),
        "metadata GET /latest/meta-data/zone-id: HTTP 500 Internal Server Error (3 attempts): \
         injected failure"
    );
    assert_eq!(meta.zone_id().await.unwrap(), "cn-hangzhou-i");
}

#[tokio::test]
async fn credentials_refreshed_before_expiration() {
    let server = fake().await;
    // Credentials valid 3 s, refreshed in their last 2 s: the refresh window opens after 1 s.
    server.set_expiration(soon(3000));
    let p = provider(
        &server,
        RefreshPolicy {
            margin: Duration::from_secs(2),
            retry_pause: Duration::ZERO,
        },
    );
    let first = p.credentials().await.unwrap();
    assert_eq!(p.credentials().await.unwrap(), first, "cached");
    assert_eq!(server.stats().credential_fetches(), 1);

    server.set_credentials(
        "STS.rotated",
        "rotated-secret",
        "rotated-token",
        in_whole_seconds(Duration::from_secs(6 * 3600)),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Still valid for ~2 s, but inside the margin: fetched again.
    let second = p.credentials().await.unwrap();
    assert_eq!(second.access_key_id, "STS.rotated");
    assert_eq!(second.security_token.as_deref(), Some("rotated-token"));
    assert_eq!(server.stats().credential_fetches(), 2);
    p.credentials().await.unwrap();
    assert_eq!(
        server.stats().credential_fetches(),
        2,
        "six hours left: cached"
    );
}

#[tokio::test]
async fn default_margin_is_fifteen_minutes() {
    let server = fake().await;
    server.set_expiration(in_whole_seconds(Duration::from_secs(14 * 60)));
    let p = provider(
        &server,
        RefreshPolicy {
            retry_pause: Duration::ZERO,
            ..RefreshPolicy::default()
        },
    );
    p.credentials().await.unwrap();
    p.credentials().await.unwrap();
    assert_eq!(
        server.stats().credential_fetches(),
        2,
        "14 min left: refetched"
    );
    server.set_expiration(in_whole_seconds(Duration::from_secs(16 * 60)));
    p.credentials().await.unwrap();
    p.credentials().await.unwrap();
    assert_eq!(
        server.stats().credential_fetches(),
        3,
        "16 min left: cached"
    );
}

#[tokio::test]
async fn failed_refresh_serves_unexpired_credentials_then_retries_after_a_pause() {
    let server = fake().await;
    server.set_expiration(in_whole_seconds(Duration::from_secs(10 * 60)));
    let p = provider(
        &server,
        RefreshPolicy {
            margin: Duration::from_secs(15 * 60),
            retry_pause: Duration::from_millis(300),
        },
    );
    let old = p.credentials().await.unwrap();
    assert_eq!(server.stats().credential_fetches(), 1);

    server.fail_next(1000);
    tokio::time::sleep(Duration::from_millis(350)).await;
    // The refresh fails (3 attempts at the role listing); the cached credentials still work.
    assert_eq!(p.credentials().await.unwrap(), old);
    assert_eq!(server.stats().injected_failures(), 3);
    // Within the pause: no new attempt.
    assert_eq!(p.credentials().await.unwrap(), old);
    assert_eq!(server.stats().injected_failures(), 3);

    server.fail_next(0);
    server.set_credentials(
        "STS.new",
        "new-secret",
        "new-token",
        in_whole_seconds(Duration::from_secs(3600)),
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(p.credentials().await.unwrap().access_key_id, "STS.new");
    assert_eq!(server.stats().credential_fetches(), 2);
}

#[tokio::test]
async fn failed_refresh_after_expiry_is_an_error() {
    let server = fake().await;
    server.set_expiration(soon(400));
    let p = provider(&server, RefreshPolicy::default());
    p.credentials().await.unwrap();
    server.fail_next(1000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e = p.credentials().await.unwrap_err();
    assert!(e.is_retryable());
    assert!(
        e.to_string()
            .starts_with("metadata GET /latest/meta-data/ram/security-credentials/: HTTP 500"),
        "{e}"
    );
}

#[tokio::test]
async fn expired_credentials_from_the_service_are_refused() {
    let server = fake().await;
    server.set_expiration(in_whole_seconds(Duration::ZERO) - Duration::from_secs(60));
    let e = InstanceMetadata::new(&server.url())
        .unwrap()
        .role_credentials()
        .await
        .unwrap_err();
    assert!(matches!(e, MetaError::Invalid { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.starts_with(
            "metadata GET /latest/meta-data/ram/security-credentials/sync-gateway-role:"
        ) && text.contains("expired"),
        "{text}"
    );
}

#[tokio::test]
async fn concurrent_callers_share_one_refresh() {
    let server = fake().await;
    let p = provider(&server, RefreshPolicy::default());
    let calls: Vec<_> = (0..32)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.credentials().await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(server.stats().credential_fetches(), 1);
    assert_eq!(server.stats().tokens_issued(), 1);
}

#[tokio::test]
async fn callers_during_a_slow_refresh_get_the_still_valid_credentials() {
    let server = fake().await;
    // 10 min left: inside the 15 min margin, so every call wants a refresh.
    server.set_expiration(in_whole_seconds(Duration::from_secs(10 * 60)));
    let p = provider(
        &server,
        RefreshPolicy {
            retry_pause: Duration::ZERO,
            ..RefreshPolicy::default()
        },
    );
    let old = p.credentials().await.unwrap();
    server.set_credentials_delay(Duration::from_millis(600));
    server.set_credentials(
        "STS.next",
        "next-secret",
        "next-token",
        in_whole_seconds(Duration::from_secs(3600)),
    );
    let refresher = {
        let p = p.clone();
        tokio::spawn(async move { p.credentials().await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.credentials().await })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap(), old);
    }
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(refresher.await.unwrap().unwrap().access_key_id, "STS.next");
    assert_eq!(
        server.stats().credential_fetches(),
        2,
        "one refresh for 17 callers"
    );
}

#[tokio::test]
async fn no_role_is_a_clear_error() {
    let server = fake().await;
    server.set_role(None);
    let meta = InstanceMetadata::new(&server.url()).unwrap();
    let e = meta.role_name().await.unwrap_err();
    assert!(matches!(e, MetaError::NoRole { .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert_eq!(
        e.to_string(),
        "metadata GET /latest/meta-data/ram/security-credentials/: no RAM role is attached to this instance"
    );
    let e = meta.credentials_provider().credentials().await.unwrap_err();
    assert!(matches!(e, MetaError::NoRole { .. }), "{e:?}");
    let shared: Arc<dyn CredentialsProvider> = Arc::new(meta.credentials_provider());
    let e = shared.credentials().await.unwrap_err();
    assert_eq!(
        chain(&e),
        "no RAM role credentials from the instance metadata service: metadata GET \
         /latest/meta-data/ram/security-credentials/: no RAM role is attached to this instance"
    );
    // A named role that is not the attached one.
    server.set_role(Some("other-role"));
    let p = RamRoleCredentialsProvider::new(
        meta,
        Some("sync-gateway-role".into()),
        RefreshPolicy::default(),
    );
    let e = p.credentials().await.unwrap_err();
    assert!(
        e.to_string()
            .contains("security-credentials/sync-gateway-role"),
        "{e}"
    );
}

#[tokio::test]
async fn unreachable_endpoint_fails_fast_and_says_where() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let meta = InstanceMetadata::new(&url).unwrap();
    let started = Instant::now();
    let e = meta.instance_id().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(e, MetaError::Transport { attempts: 3, .. }),
        "{e:?}"
    );
    let text = chain(&e);
    assert!(
        text.starts_with("metadata PUT /latest/api/token: connection failed (3 attempts)"),
        "{text}"
    );
    assert!(text.to_lowercase().contains("refused"), "{text}");
}
