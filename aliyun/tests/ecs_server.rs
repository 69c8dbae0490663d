//! The ECS client against the local ECS server: resource lifecycles with asynchronous
//! transitions, refusals with Alibaba's codes, throttling retried and counted.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sync_aliyun::acs3;
use sync_aliyun::ecs::{
    CreateDisk, CreateImage, CreateSnapshot, DiskDeviceMapping, EcsClient, EcsConfig, ErrorKind,
    Filter, ImportImage, RetryPolicy, RunInstances, SnapshotStatus, Tag,
};
use sync_aliyun::testing::ecs_server::{EcsServer, EcsServerConfig, Fault};
use sync_aliyun::Credentials;

const ZONE: &str = "cn-hangzhou-i";
const GATEWAY: &str = "i-gateway";

fn long_term() -> Credentials {
    Credentials::new("LTAI-test", "test-secret", None)
}

fn sts() -> Credentials {
    Credentials::new("STS.role", "sts-secret", Some("sts-token".into()))
}

async fn server() -> EcsServer {
    let config = EcsServerConfig::new("cn-hangzhou", vec![long_term(), sts()]);
    let s = EcsServer::start(config).await.unwrap();
    s.add_instance(GATEWAY, ZONE);
    s
}

/// Quick retries, so tests of retrying take milliseconds.
fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        base: Duration::from_millis(2),
        cap: Duration::from_millis(10),
    }
}

fn client_with(server: &EcsServer, creds: Credentials) -> EcsClient {
    client_with_policy(server, creds, fast_retry())
}

fn client_with_policy(server: &EcsServer, creds: Credentials, retry: RetryPolicy) -> EcsClient {
    let config = EcsConfig::new("cn-hangzhou")
        .with_endpoint(server.endpoint())
        .with_retry(retry);
    EcsClient::new(config, Arc::new(creds)).unwrap()
}

/// Polls `f` until it returns `Some`, for at most 5 s.
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn disk_status(ecs: &EcsClient, id: &str) -> String {
    let disks = ecs.describe_disks(&Filter::ids([id])).await.unwrap();
    disks.first().map(|d| d.status.clone()).unwrap_or_default()
}

#[tokio::test]
async fn disk_snapshot_image_instance_lifecycle() {
    let server = server().await;
    // Patient enough to outlast a 200 ms transition (expected ~0.9 s of backoff in all).
    let patient = RetryPolicy {
        max_attempts: 20,
        base: Duration::from_millis(20),
        cap: Duration::from_millis(100),
    };
    let ecs = client_with_policy(&server, sts(), patient);
    let tags = vec![
        Tag::new("sync:disk", "disk-01"),
        Tag::new("sync:gateway", "gw 1"),
    ];

    // Disk: Creating -> Available -> (attach) In_use.
    let mut req = CreateDisk::new(ZONE, 40);
    req.performance_level = Some("PL1".into());
    req.tags = tags.clone();
    req.client_token = Some("disk-01-create".into());
    let disk_id = ecs.create_disk(&req).await.unwrap();
    assert!(disk_id.starts_with("d-"));
    // The same ClientToken makes nothing new.
    assert_eq!(ecs.create_disk(&req).await.unwrap(), disk_id);
    assert_eq!(server.counts().disks, 1);
    assert_eq!(disk_status(&ecs, &disk_id).await, "Creating");
    // Attaching while Creating is a transient state: the client retries until Available.
    ecs.attach_disk(GATEWAY, &disk_id).await.unwrap();
    assert!(server
        .requests_of("AttachDisk")
        .iter()
        .any(|r| r.error_code.as_deref() == Some("IncorrectDiskStatus")));
    until("In_use", || async {
        (disk_status(&ecs, &disk_id).await == "In_use").then_some(())
    })
    .await;
    let disk = ecs
        .describe_disks(&Filter::tags(tags.clone()))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(disk.instance_id.as_deref(), Some(GATEWAY));
    assert_eq!(disk.category, "cloud_essd");
    assert_eq!(disk.performance_level.as_deref(), Some("PL1"));
    assert_eq!(disk.size_gib, 40);
    assert_eq!(disk.serial_number.as_deref(), disk_id.strip_prefix("d-"));
    assert_eq!(disk.tags, tags);
    assert!(disk.device.is_some());

    // Snapshot: progressing -> accomplished, tagged.
    let mut snap = CreateSnapshot::new(&disk_id);
    snap.tags = vec![Tag::new("sync:checkpoint", "7")];
    let snap_id = ecs.create_snapshot(&snap).await.unwrap();
    let s = ecs
        .describe_snapshots(&Filter::ids([snap_id.clone()]), None)
        .await
        .unwrap();
    assert_eq!(s[0].status, SnapshotStatus::Progressing);
    assert!(s[0].progress < 100);
    let done = until("accomplished", || async {
        let s = ecs
            .describe_snapshots(
                &Filter::tags(snap.tags.clone()),
                Some(&SnapshotStatus::Accomplished),
            )
            .await
            .unwrap();
        s.into_iter().next()
    })
    .await;
    assert_eq!(done.snapshot_id, snap_id);
    assert_eq!(done.progress, 100);
    assert_eq!(done.source_disk_id.as_deref(), Some(disk_id.as_str()));

    // Image from the snapshot: Creating -> Available; then an instance: Pending -> Running.
    let image_id = ecs
        .create_image(&CreateImage {
            name: "cutover-1".into(),
            mappings: vec![DiskDeviceMapping {
                snapshot_id: snap_id.clone(),
                device: "/dev/xvda".into(),
                disk_type: Some("system".into()),
            }],
            boot_mode: Some("UEFI".into()),
            architecture: Some("x86_64".into()),
            description: None,
            tags: vec![Tag::new("sync:launch", "cutover")],
            client_token: None,
        })
        .await
        .unwrap();
    let image = until("image Available", || async {
        let i = ecs
            .describe_images(&Filter::ids([image_id.clone()]))
            .await
            .unwrap();
        i.into_iter().find(|i| i.status == "Available")
    })
    .await;
    assert_eq!(image.boot_mode.as_deref(), Some("UEFI"));
    assert_eq!(image.mappings[0].snapshot_id, snap_id);
    let launch = RunInstances {
        image_id: image_id.clone(),
        instance_type: "ecs.g7.large".into(),
        vswitch_id: "vsw-1".into(),
        security_group_id: "sg-1".into(),
        name: Some("migrated web 1".into()),
        description: None,
        system_disk_category: None,
        tags: vec![Tag::new("sync:launch", "cutover")],
        client_token: Some("launch-1".into()),
    };
    let instance_id = ecs.run_instances(&launch).await.unwrap();
    assert_eq!(
        ecs.run_instances(&launch).await.unwrap(),
        instance_id,
        "ClientToken"
    );
    let inst = until("Running", || async {
        let i = ecs
            .describe_instances(&Filter::ids([instance_id.clone()]))
            .await
            .unwrap();
        i.into_iter().find(|i| i.status == "Running")
    })
    .await;
    assert_eq!(inst.vswitch_id.as_deref(), Some("vsw-1"));
    assert_eq!(inst.image_id.as_deref(), Some(image_id.as_str()));

    // A snapshot in use by an image cannot go; the disk cannot go while attached.
    let e = ecs.delete_snapshot(&snap_id).await.unwrap_err();
    assert_eq!(e.code(), Some("SnapshotCreatedImage"));
    let e = ecs.delete_disk("d-doesnotexist").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(
        e.to_string().contains("DeleteDisk") && e.to_string().contains("InvalidDiskId.NotFound")
    );

    // Detach -> Available -> delete.
    ecs.detach_disk(GATEWAY, &disk_id).await.unwrap();
    until("Available", || async {
        (disk_status(&ecs, &disk_id).await == "Available").then_some(())
    })
    .await;
    ecs.delete_disk(&disk_id).await.unwrap();
    assert!(ecs
        .describe_disks(&Filter::ids([disk_id.clone()]))
        .await
        .unwrap()
        .is_empty());

    // A second snapshot, not used by any image, can be deleted.
    let other = ecs.create_disk(&CreateDisk::new(ZONE, 20)).await.unwrap();
    until("Available", || async {
        (disk_status(&ecs, &other).await == "Available").then_some(())
    })
    .await;
    let s2 = ecs
        .create_snapshot(&CreateSnapshot::new(&other))
        .await
        .unwrap();
    ecs.delete_snapshot(&s2).await.unwrap();
    let e = ecs.delete_snapshot(&s2).await.unwrap_err();
    assert_eq!(e.code(), Some("InvalidSnapshotId.NotFound"));

    // Every request carried the STS token and was recorded with its parameters.
    let creates = server.requests_of("CreateDisk");
    assert_eq!(creates[0].params["ZoneId"], ZONE);
    assert_eq!(creates[0].params["DiskCategory"], "cloud_essd");
    assert_eq!(creates[0].params["Tag.2.Value"], "gw 1");
    assert!(server
        .requests()
        .iter()
        .all(|r| r.access_key_id.as_deref() == Some("STS.role")));
}

#[tokio::test]
async fn import_image_is_uefi_from_oss() {
    let server = server().await;
    let ecs = client_with(&server, long_term());
    let mut req = ImportImage::new("sync-gateway-0.1.0", "images", "gateway/0.1.0.raw");
    req.format = Some("RAW".into());
    let id = ecs.import_image(&req).await.unwrap();
    let p = &server.requests_of("ImportImage")[0].params;
    assert_eq!(p["BootMode"], "UEFI");
    assert_eq!(p["DiskDeviceMapping.1.OSSBucket"], "images");
    assert_eq!(p["DiskDeviceMapping.1.OSSObject"], "gateway/0.1.0.raw");
    let img = until("Available", || async {
        ecs.describe_images(&Filter::ids([id.clone()]))
            .await
            .unwrap()
            .into_iter()
            .find(|i| i.status == "Available")
    })
    .await;
    assert_eq!(img.name.as_deref(), Some("sync-gateway-0.1.0"));
}

#[tokio::test]
async fn describe_pages_through_more_than_100() {
    let server = server().await;
    let ecs = client_with(&server, long_term());
    for i in 0..105 {
        let mut req = CreateDisk::new(ZONE, 20);
        req.tags = vec![Tag::new("batch", "b")];
        req.client_token = Some(format!("batch-{i}"));
        ecs.create_disk(&req).await.unwrap();
    }
    let all = ecs
        .describe_disks(&Filter::tags(vec![Tag::new("batch", "b")]))
        .await
        .unwrap();
    assert_eq!(all.len(), 105);
    let pages: Vec<_> = server
        .requests_of("DescribeDisks")
        .iter()
        .map(|r| r.params["PageNumber"].clone())
        .collect();
    assert_eq!(pages, ["1", "2"]);
}

#[tokio::test]
async fn refusals_carry_alibaba_codes() {
    let server = server().await;
    let probe = Filter::default();

    // Wrong secret.
    let bad = client_with(&server, Credentials::new("LTAI-test", "wrong", None));
    let e = bad.describe_disks(&probe).await.unwrap_err();
    assert_eq!(e.code(), Some("SignatureDoesNotMatch"));
    assert_eq!(e.status(), Some(400));
    assert_eq!(e.kind(), ErrorKind::Unauthenticated);
    assert!(e.request_id().is_some_and(|r| !r.is_empty()));

    // Unknown key.
    let e = client_with(&server, Credentials::new("LTAI-nobody", "x", None))
        .describe_disks(&probe)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("InvalidAccessKeyId.NotFound"));
    assert_eq!(e.status(), Some(404));

    // STS key without / with a wrong token.
    let e = client_with(&server, Credentials::new("STS.role", "sts-secret", None))
        .describe_disks(&probe)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("MissingSecurityToken"));
    let e = client_with(
        &server,
        Credentials::new("STS.role", "sts-secret", Some("other".into())),
    )
    .describe_disks(&probe)
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some("InvalidSecurityToken.MismatchWithAccessKey"));

    // A clock 16 minutes off either way.
    let ecs = client_with(&server, long_term());
    for minutes in [16, -16] {
        server.set_clock_offset(time::Duration::minutes(minutes));
        let e = ecs.describe_disks(&probe).await.unwrap_err();
        assert_eq!(e.code(), Some("InvalidTimeStamp.Expired"), "{minutes}");
    }
    server.set_clock_offset(time::Duration::minutes(14));
    ecs.describe_disks(&probe).await.unwrap();
    server.set_clock_offset(time::Duration::ZERO);

    // None of these were retried: refusals are permanent.
    assert_eq!(bad.retry_stats().snapshot().retries, 0);
    assert_eq!(ecs.retry_stats().snapshot().retries, 0);
    // And nothing was done.
    assert_eq!(server.counts().disks, 0);
}

/// Replays one signed request byte for byte: the second is a reused nonce.
#[tokio::test]
async fn reused_nonce_and_tampered_query_are_refused() {
    let server = server().await;
    let host = server.addr().to_string();
    let creds = long_term();
    let sign = |query: &[(String, String)], nonce: &str| {
        let headers: Vec<(String, String)> = vec![
            ("host".into(), host.clone()),
            ("x-acs-action".into(), "DescribeDisks".into()),
            ("x-acs-version".into(), "2014-05-26".into()),
            (
                "x-acs-date".into(),
                acs3::format_date(time::OffsetDateTime::now_utc()),
            ),
            ("x-acs-signature-nonce".into(), nonce.into()),
            (
                "x-acs-content-sha256".into(),
                acs3::EMPTY_PAYLOAD_SHA256.into(),
            ),
        ];
        let s = acs3::sign_with(
            &acs3::SigningInput {
                method: "POST",
                canonical_uri: "/",
                query,
                headers: &headers,
                payload_sha256: acs3::EMPTY_PAYLOAD_SHA256,
            },
            &creds,
        );
        (headers, s.authorization)
    };
    let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = |headers: Vec<(String, String)>, auth: String, query: String| {
        let http = http.clone();
        let uri = format!("{}/?{query}", server.endpoint());
        async move {
            let mut b = hyper::Request::post(uri);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            let resp = http
                .request(
                    b.header("authorization", auth)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (status, v["Code"].as_str().unwrap_or("").to_string())
        }
    };
    let query = vec![("RegionId".to_string(), "cn-hangzhou".to_string())];
    let (headers, auth) = sign(&query, "nonce-1");
    let wire = acs3::wire_query(&query);
    assert_eq!(
        send(headers.clone(), auth.clone(), wire.clone()).await,
        (200, String::new())
    );
    assert_eq!(
        send(headers, auth, wire).await,
        (400, "SignatureNonceUsed".to_string())
    );

    // A parameter changed after signing.
    let (headers, auth) = sign(&query, "nonce-2");
    let (status, code) = send(headers, auth, "RegionId=cn-hangzhou&PageSize=5".into()).await;
    assert_eq!((status, code.as_str()), (400, "SignatureDoesNotMatch"));

    // An x-acs header sent but not signed.
    let (mut headers, auth) = sign(&query, "nonce-3");
    headers.push(("x-acs-extra".into(), "1".into()));
    let (status, code) = send(headers, auth, acs3::wire_query(&query)).await;
    assert_eq!((status, code.as_str()), (400, "IncompleteSignature"));
}

#[tokio::test]
async fn throttling_is_retried_and_counted() {
    let server = server().await;
    let ecs = client_with(&server, long_term());
    server.throttle("CreateDisk", 3);
    let id = ecs.create_disk(&CreateDisk::new(ZONE, 20)).await.unwrap();
    assert!(id.starts_with("d-"));
    let stats = ecs.retry_stats().snapshot();
    assert_eq!(stats.retries, 3);
    assert_eq!(stats.throttled, 3);
    let last = stats.last_error.unwrap();
    assert!(
        last.contains("CreateDisk") && last.contains("Throttling.User"),
        "{last}"
    );
    // One ClientToken for all four attempts, so a retry cannot make a second disk.
    let attempts = server.requests_of("CreateDisk");
    assert_eq!(attempts.len(), 4);
    assert!(attempts
        .iter()
        .all(|r| r.params["ClientToken"] == attempts[0].params["ClientToken"]));
    assert_eq!(server.counts().disks, 1);

    // A 5xx is retried too, but not counted as throttling; past max_attempts it surfaces.
    server.inject_fault(
        "DescribeDisks",
        Fault {
            status: 503,
            code: "ServiceUnavailable".into(),
            message: "busy".into(),
        },
        10,
    );
    let e = ecs.describe_disks(&Filter::default()).await.unwrap_err();
    assert_eq!(e.code(), Some("ServiceUnavailable"));
    assert_eq!(e.kind(), ErrorKind::Transient);
    let stats = ecs.retry_stats().snapshot();
    assert_eq!(stats.retries, 3 + 4, "5 attempts = 4 retries");
    assert_eq!(stats.throttled, 3);
}
