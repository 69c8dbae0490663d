//! The IMDSv2 client against the fake IMDS (which refuses GETs without a token, like EC2).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use sync_aws::testing::{FakeImds, FakeImdsConfig};
use sync_aws::{Imds, ImdsError};

#[tokio::test]
async fn identity_and_credentials_with_one_token() {
    let fake = FakeImds::start(FakeImdsConfig::default()).await.unwrap();
    let imds = Imds::new(&fake.url()).unwrap();
    assert_eq!(imds.instance_id().await.unwrap(), "i-0123456789abcdef0");
    assert_eq!(imds.region().await.unwrap(), "us-east-1");
    assert_eq!(imds.availability_zone().await.unwrap(), "us-east-1a");

    let doc = imds.identity_document().await.unwrap();
    assert_eq!(doc.instance_id, "i-0123456789abcdef0");
    assert_eq!(doc.account_id, "123456789012");
    assert_eq!(doc.region, "us-east-1");
    assert!(
        doc.raw.starts_with('{') && doc.raw.contains("\"instanceId\""),
        "raw kept: {}",
        doc.raw
    );
    assert_eq!(
        imds.identity_signature().await.unwrap(),
        "ZmFrZS1zaWduYXR1cmU="
    );

    let creds = imds.role_credentials().await.unwrap();
    assert_eq!(creds.role, "sync-gateway-role");
    assert_eq!(creds.access_key_id, "ASIAFAKEIMDSKEY");
    assert_eq!(creds.token, "fake-imds-session-token");
    assert!(creds.expiration > SystemTime::now());
    assert!(
        !format!("{creds:?}").contains("fake-imds-secret"),
        "Debug redacts the secret"
    );

    assert_eq!(
        fake.stats().tokens_issued.load(Ordering::Relaxed),
        1,
        "the token is reused"
    );
    assert_eq!(fake.stats().unauthorized.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn fake_imds_refuses_a_get_without_token() {
    let fake = FakeImds::start(FakeImdsConfig::default()).await.unwrap();
    let addr = fake.url().trim_start_matches("http://").to_owned();
    let status = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines().next().unwrap_or_default().to_owned()
    })
    .await
    .unwrap();
    assert!(status.contains("401"), "{status}");
    assert_eq!(fake.stats().unauthorized.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn no_role_is_a_clear_error() {
    let fake = FakeImds::start(FakeImdsConfig {
        role: None,
        ..FakeImdsConfig::default()
    })
    .await
    .unwrap();
    let imds = Imds::new(&fake.url()).unwrap();
    let err = imds.role_credentials().await.unwrap_err();
    assert!(
        matches!(err, ImdsError::Status { status, .. } if status == 404),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_imds_fails_fast() {
    // A loopback port nobody listens on: connection refused, retried, then an error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let imds = Imds::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let t0 = std::time::Instant::now();
    let err = imds.instance_id().await.unwrap_err();
    assert!(matches!(err, ImdsError::Transport { .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
