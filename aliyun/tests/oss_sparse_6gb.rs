//! A 6 GiB sparse file (an appliance disk image is mostly holes) goes to the local OSS by
//! multipart under the default 5 GiB threshold: streamed from disk, MD5-checked per part on
//! both sides, stored sparse by the server, and read back by ranges at the written blocks.

use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sync_aliyun::oss::{multipart_etag, OssClient, OssConfig, PutOptions};
use sync_aliyun::testing::oss_server::{OssServer, OssServerConfig};
use sync_aliyun::Credentials;

const SIZE: u64 = 6 << 30;
const PART: u64 = 1 << 30;
const BLOCK: usize = 64 << 10;

/// Offsets of the non-zero blocks: start, end, part boundaries (one straddling), odd places.
fn offsets() -> Vec<u64> {
    vec![
        0,
        PART - 1000,
        3 * PART + 12_345,
        (5 << 30) + 777,
        SIZE - BLOCK as u64,
    ]
}

fn block(i: usize) -> Vec<u8> {
    (0..BLOCK).map(|j| (j * 31 + i * 7 + 1) as u8 | 1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_gib_sparse_file_uploads_by_multipart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = Credentials::new("STS.Sparse", "sparse-secret", Some("sparse-token".into()));
    let server = OssServer::start(OssServerConfig {
        region: "cn-hangzhou".into(),
        bucket: "images".into(),
        keys: vec![creds.clone()],
        root: dir.path().join("oss"),
    })
    .await
    .expect("server");

    let src = dir.path().join("disk.raw");
    {
        let mut f = std::fs::File::create(&src).expect("create");
        f.set_len(SIZE).expect("set_len");
        for (i, off) in offsets().into_iter().enumerate() {
            f.seek(SeekFrom::Start(off)).expect("seek");
            f.write_all(&block(i)).expect("write");
        }
        f.sync_all().expect("sync");
    }

    let cfg = OssConfig {
        endpoint: Some(server.endpoint()),
        part_size: PART,
        ..OssConfig::new("cn-hangzhou", "images")
    };
    assert_eq!(
        cfg.multipart_threshold,
        5 << 30,
        "the default threshold applies"
    );
    let client = OssClient::new(cfg, creds).expect("client");
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let opts = PutOptions {
        progress: Some(Arc::new(move |sent, _| {
            p.fetch_max(sent, Ordering::Relaxed);
        })),
        ..PutOptions::default()
    };
    let started = Instant::now();
    let put = client
        .put_object_from_file("appliance/disk.raw", &src, &opts)
        .await
        .expect("multipart upload");
    let upload_time = started.elapsed();
    eprintln!("6 GiB sparse multipart upload: {upload_time:?}");

    assert_eq!(put.size, SIZE);
    assert_eq!(put.parts.len(), 6, "6 GiB in 1 GiB parts");
    assert!(put.parts.iter().all(|p| p.size == PART));
    assert_eq!(progress.load(Ordering::Relaxed), SIZE);
    // The client checked every part's ETag against the MD5 it computed while sending, and
    // the final ETag against MD5(part MD5s); check the latter again from the parts.
    assert_eq!(
        put.etag,
        multipart_etag(&put.parts.iter().map(|p| p.md5).collect::<Vec<_>>())
    );
    assert_eq!(server.open_uploads(), 0);

    let head = client
        .head_object("appliance/disk.raw")
        .await
        .expect("head");
    assert_eq!((head.size, head.etag.as_str()), (SIZE, put.etag.as_str()));

    // Read back each written block with a margin of zeros on both sides where there is room.
    for (i, off) in offsets().into_iter().enumerate() {
        let start = off.saturating_sub(16);
        let end = (off + BLOCK as u64 + 16).min(SIZE);
        let got = client
            .get_object("appliance/disk.raw", Some(start..end))
            .await
            .expect("range")
            .bytes()
            .await
            .expect("body");
        let mut want = vec![0u8; (end - start) as usize];
        let at = (off - start) as usize;
        want[at..at + BLOCK].copy_from_slice(&block(i));
        assert!(got == want, "block {i} at {off} reads back");
    }
    // The server kept holes as holes.
    let used = server.disk_usage();
    assert!(
        used < 64 << 20,
        "server stored {used} bytes for 320 KiB of data"
    );
    eprintln!("total with checks: {:?}", started.elapsed());
    assert!(upload_time.as_secs() < 120, "upload took {upload_time:?}");
}
