//! The agent against the in-memory gateway: passes, resends, restarts, refusals.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::fake_gateway::FakeGateway;
use super::state::StateDir;
use super::*;
use crate::protocol::auth::DiskKey;

const BLOCK: usize = 4096;

struct Setup {
    _tmp: tempfile::TempDir,
    image: PathBuf,
    key: DiskKey,
    opts: ReplicateOptions,
}

/// 40 blocks of text, zeros and noise plus an unaligned 1000-byte tail.
fn image_bytes() -> Vec<u8> {
    let mut v = Vec::new();
    let mut x = 0x1234_5678_9abc_def1u64;
    for i in 0..40 {
        match i % 4 {
            0 => v.extend(std::iter::repeat_n(0u8, BLOCK)),
            1 => v.extend(b"some text ".iter().cycle().take(BLOCK)),
            _ => v.extend((0..BLOCK).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })),
        }
    }
    v.extend(std::iter::repeat_n(7u8, 1000));
    v
}

fn setup(addr: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    std::fs::write(&image, image_bytes()).unwrap();
    let key_file = tmp.path().join("key");
    keygen(&key_file).unwrap();
    let key = DiskKey::load(&key_file).unwrap();
    let opts = ReplicateOptions {
        gateway: addr.to_string(),
        disk_id: "disk-1".into(),
        key_file,
        state_dir: tmp.path().join("state"),
        source: image.clone(),
        verify: true,
        bandwidth_limit: None,
        full: false,
        rescan: false,
        retry_timeout: Duration::from_secs(5),
        block_size: 16 * BLOCK as u64,
        delta_block_size: delta::DEFAULT_BLOCK_SIZE,
        progress: false,
    };
    Setup {
        _tmp: tmp,
        image,
        key,
        opts,
    }
}

async fn gateway_for(s: &mut Setup, window: u64) -> FakeGateway {
    let size = std::fs::metadata(&s.image).unwrap().len() as usize;
    let gw = FakeGateway::start(s.key.clone(), size, window).await;
    s.opts.gateway = gw.addr.to_string();
    gw
}

fn assert_replica(gw: &FakeGateway, image: &Path) {
    let d = gw.disk.lock().unwrap();
    assert!(d.data == std::fs::read(image).unwrap());
    assert!(d.out_of_order.is_empty(), "{:?}", d.out_of_order);
}

fn sha_hex(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!(r.mode, "full");
    assert_eq!(r.verified, Some(true));
    assert_eq!(r.digest.as_deref(), Some(sha_hex(&s.image).as_str()));
    assert_eq!(r.blocks_zero, 10);
    assert_eq!(r.blocks_sent, 31);
    assert_eq!(r.bytes_changed, r.bytes_total);
    assert_eq!(r.bytes_scanned, r.bytes_total);
    assert!(r.checkpoint_label.starts_with("full-"));
    assert_eq!(r.snapshot_id, "snap-1");
    assert_eq!(r.resumed_from_seq, None);

    // change three scattered blocks (one to zeros) and the tail
    let mut img = std::fs::read(&s.image).unwrap();
    img[5 * BLOCK + 3] ^= 0xff;
    img[22 * BLOCK..23 * BLOCK].fill(0);
    img[33 * BLOCK] ^= 1;
    let n = img.len();
    img[n - 1] = 9;
    std::fs::write(&s.image, &img).unwrap();
    let r2 = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!(r2.mode, "incremental");
    assert_eq!(r2.verified, Some(true));
    assert_eq!((r2.blocks_sent, r2.blocks_zero), (3, 1));
    assert_eq!(r2.bytes_changed, 3 * BLOCK as u64 + 1000);
    assert!(r2.checkpoint_label.starts_with("incr-"));
    assert!(r2.checkpoint_seq > r.checkpoint_seq);
    // headers and handshake only on top of the changed data (all of it is incompressible here
    // or tiny)
    assert!(r2.bytes_sent_wire < r2.bytes_changed + 1000, "{r2:?}");

    // nothing changed: an empty pass still checkpoints
    let r3 = replicate(&s.opts).await.unwrap();
    assert_eq!(
        (r3.mode.as_str(), r3.bytes_changed, r3.frames_sent),
        ("incremental", 0, 1)
    );
    // --full resends everything
    s.opts.full = true;
    let r4 = replicate(&s.opts).await.unwrap();
    assert_eq!(
        (r4.mode.as_str(), r4.bytes_changed),
        ("full", r4.bytes_total)
    );
    assert_eq!(gw.disk.lock().unwrap().snapshots, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_resends_with_a_small_window() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 3 * 4096).await;
    gw.faults.lock().unwrap().drop_after_frames = Some(4);
    s.opts.block_size = BLOCK as u64;
    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!(r.reconnects, 1);
    assert_eq!(r.verified, Some(true));
    assert_eq!(gw.disk.lock().unwrap().connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_landing_during_an_outage_is_recognised() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    gw.faults.lock().unwrap().drop_before_checkpoint_ack = true;
    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!(r.reconnects, 1);
    assert_eq!(r.snapshot_id, "snap-1");
    assert_eq!(r.verified, None);
    assert_eq!(gw.disk.lock().unwrap().snapshots, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_the_interrupted_pass() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    s.opts.block_size = 2 * BLOCK as u64;
    gw.faults.lock().unwrap().fatal_after_frames = Some(6);
    let err = replicate(&s.opts).await.unwrap_err();
    assert!(error::chain(&err).contains("revoked (17)"), "{err}");
    let st = StateDir::open(&s.opts.state_dir, "disk-1")
        .unwrap()
        .load()
        .unwrap();
    let label = st.pass.unwrap().label;
    let (durable, resume) = {
        let d = gw.disk.lock().unwrap();
        (d.durable_seq, d.resume_offset)
    };
    assert!(durable > 0 && resume > 0);

    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!(r.resumed_from_seq, Some(durable));
    assert_eq!(r.checkpoint_label, label);
    assert_eq!(r.bytes_changed, r.bytes_total - resume);
    assert_eq!(r.bytes_scanned, r.bytes_total);
    assert_eq!(r.verified, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_an_unacknowledged_checkpoint_sends_nothing() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    gw.faults.lock().unwrap().fatal_instead_of_checkpoint_ack = true;
    replicate(&s.opts).await.unwrap_err();
    let frames = gw.disk.lock().unwrap().data_frames;
    let r = replicate(&s.opts).await.unwrap();
    assert_eq!(r.frames_sent, 0);
    assert_eq!(r.snapshot_id, "snap-1");
    assert_eq!(gw.disk.lock().unwrap().data_frames, frames);
    // and the rebuilt map is a good baseline
    let r2 = replicate(&s.opts).await.unwrap();
    assert_eq!((r2.mode.as_str(), r2.bytes_changed), ("incremental", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_fatal_and_clear() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    // wrong key
    let other = s.opts.key_file.with_extension("other");
    keygen(&other).unwrap();
    let mut wrong = s.opts.clone();
    wrong.key_file = other;
    let e = replicate(&wrong).await.unwrap_err();
    assert_eq!(
        error::chain(&e),
        "gateway refused: auth_failed (5): bad mac"
    );
    // impostor gateway
    gw.faults.lock().unwrap().bad_proof = true;
    let e = replicate(&s.opts).await.unwrap_err();
    assert!(matches!(e, AgentError::ProofMismatch), "{e}");
    assert_eq!(gw.disk.lock().unwrap().data_frames, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_gateway_gives_up_after_the_retry_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut s = setup(&port.to_string());
    s.opts.retry_timeout = Duration::from_secs(1);
    let t = std::time::Instant::now();
    let e = replicate(&s.opts).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4));
    let msg = error::chain(&e);
    assert!(
        msg.starts_with("gave up reconnecting after 1 s: cannot connect"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limit_slows_the_wire() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    s.opts.bandwidth_limit = Some(1 << 20);
    s.opts.verify = false;
    let t = std::time::Instant::now();
    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    // ~100 KiB on the wire minus the 64 KiB burst, at 1 MiB/s
    let expect = (r.bytes_sent_wire as f64 - 65536.0) / f64::from(1 << 20);
    let took = t.elapsed().as_secs_f64();
    assert!(took >= expect * 0.9, "took {took}, expected {expect}");
    assert_eq!(r.verified, None);
    assert_eq!(r.digest, None);
}

// ---------------------------------------------------------------------------------------------
// Delta resync

fn forget_state(s: &Setup) {
    std::fs::remove_dir_all(&s.opts.state_dir).unwrap();
}

fn saved_pass(s: &Setup) -> Option<state::PassRecord> {
    StateDir::open(&s.opts.state_dir, "disk-1")
        .unwrap()
        .load()
        .unwrap()
        .pass
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_state_runs_a_delta_pass() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    let full = replicate(&s.opts).await.unwrap();
    assert_eq!((full.mode.as_str(), full.blocks_matched), ("full", 0));

    // the same changes as in full_then_incremental, then the state is lost
    let mut img = std::fs::read(&s.image).unwrap();
    img[5 * BLOCK + 3] ^= 0xff;
    img[22 * BLOCK..23 * BLOCK].fill(0);
    img[33 * BLOCK] ^= 1;
    let n = img.len();
    img[n - 1] = 9;
    std::fs::write(&s.image, &img).unwrap();
    forget_state(&s);
    let queries = gw.disk.lock().unwrap().hash_queries;
    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!(r.mode, "delta");
    assert_eq!(r.verified, Some(true));
    assert!(r.checkpoint_label.starts_with("delta-"), "{r:?}");
    assert_eq!((r.blocks_sent, r.blocks_zero, r.blocks_matched), (3, 1, 37));
    assert_eq!(r.bytes_changed, 3 * BLOCK as u64 + 1000);
    assert_eq!(r.frames_sent, 5);
    assert_eq!(r.bytes_scanned, r.bytes_total);
    assert_eq!(r.resumed_from_seq, None);
    // one coarse query (three 64 KiB blocks, all differing) and one 4 KiB refinement
    assert_eq!(gw.disk.lock().unwrap().hash_queries - queries, 2);
    // 3 hashes + 41 hashes of queries on top of what an incremental pass sends
    assert!(
        r.bytes_sent_wire < r.bytes_changed + 1000 + 44 * 32 + 100,
        "{r:?}"
    );
    assert!(saved_pass(&s).is_none());

    // the map it built is a good baseline
    let r2 = replicate(&s.opts).await.unwrap();
    assert_eq!(
        (r2.mode.as_str(), r2.bytes_changed, r2.frames_sent),
        ("incremental", 0, 1)
    );
    assert_eq!(r2.verified, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescan_repairs_what_an_incremental_pass_cannot_see() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    replicate(&s.opts).await.unwrap();
    {
        let mut d = gw.disk.lock().unwrap();
        d.data[2 * BLOCK + 10] ^= 0x55; // random
        d.data[17 * BLOCK] ^= 1; // text
        d.data[39 * BLOCK + 4095] ^= 1; // random
        d.data[8 * BLOCK + 7] = 1; // a zero block
    }
    let r = replicate(&s.opts).await.unwrap();
    assert_eq!((r.mode.as_str(), r.bytes_changed), ("incremental", 0));
    assert_eq!(r.verified, Some(false));

    s.opts.rescan = true;
    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!(r.mode, "delta");
    assert_eq!(r.verified, Some(true));
    assert_eq!((r.blocks_sent, r.blocks_zero, r.blocks_matched), (3, 1, 37));
    // and again: nothing differs any more
    let r = replicate(&s.opts).await.unwrap();
    assert_eq!(
        (r.mode.as_str(), r.bytes_changed, r.blocks_matched),
        ("delta", 0, 41)
    );
    s.opts.rescan = false;
    let r = replicate(&s.opts).await.unwrap();
    assert_eq!((r.mode.as_str(), r.bytes_changed), ("incremental", 0));
    // --full and --rescan together are refused before anything is sent
    s.opts.rescan = true;
    s.opts.full = true;
    assert!(matches!(
        replicate(&s.opts).await,
        Err(AgentError::FullAndRescan)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_pass_survives_lost_queries_and_frames() {
    for (delta_block, drop_at_query) in [(4096u64, 1u64), (16384, 2), (65536, 1), (65536, 2)] {
        let mut s = setup("");
        let gw = gateway_for(&mut s, 3 * 4096).await;
        s.opts.block_size = BLOCK as u64;
        s.opts.delta_block_size = delta_block;
        replicate(&s.opts).await.unwrap();
        // change every third block, lose the state, and cut the connection once at a query
        // and once at a data frame of the delta pass
        let mut img = std::fs::read(&s.image).unwrap();
        for b in (1..41).step_by(3) {
            img[b * BLOCK + 1] ^= 0x80;
        }
        std::fs::write(&s.image, &img).unwrap();
        forget_state(&s);
        {
            let q = gw.disk.lock().unwrap().hash_queries;
            let f = gw.disk.lock().unwrap().data_frames;
            let mut faults = gw.faults.lock().unwrap();
            faults.drop_at_query = Some(q + drop_at_query);
            faults.drop_after_frames = Some(f + 5);
        }
        let r = replicate(&s.opts).await.unwrap();
        assert_replica(&gw, &s.image);
        assert_eq!(r.mode, "delta");
        assert_eq!(r.verified, Some(true), "delta block {delta_block}");
        assert_eq!(r.reconnects, 2, "delta block {delta_block}: {r:?}");
        assert_eq!(
            r.blocks_sent + r.blocks_zero,
            14,
            "delta block {delta_block}"
        );
        assert_eq!(r.blocks_matched, 41 - 14);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_delta_pass_starts_over() {
    let mut s = setup("");
    let gw = gateway_for(&mut s, 64 << 20).await;
    s.opts.block_size = BLOCK as u64;
    replicate(&s.opts).await.unwrap();
    let mut img = std::fs::read(&s.image).unwrap();
    for b in [3, 6, 7, 11, 30] {
        img[b * BLOCK] ^= 0x80;
    }
    std::fs::write(&s.image, &img).unwrap();
    forget_state(&s);
    let f = gw.disk.lock().unwrap().data_frames;
    gw.faults.lock().unwrap().fatal_after_frames = Some(f + 2);
    let err = replicate(&s.opts).await.unwrap_err();
    assert!(error::chain(&err).contains("revoked (17)"), "{err}");
    let pass = saved_pass(&s).unwrap();
    assert_eq!(pass.kind, state::PassKind::Delta);

    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!((r.mode.as_str(), r.resumed_from_seq), ("delta", None));
    assert_eq!(r.verified, Some(true));
    // the two blocks written before the failure now match
    assert_eq!(r.blocks_sent, 3);
    assert_eq!(r.blocks_matched, 41 - 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescan_against_a_blank_gateway_streams_several_groups() {
    // 20 MiB + 1000 bytes: two groups, the second one short and unaligned; most blocks differ
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("big.img");
    let mut v = Vec::with_capacity(20 << 20);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..(20 << 20) / BLOCK {
        match i % 5 {
            0 => v.extend(std::iter::repeat_n(0u8, BLOCK)),
            1 | 2 => v.extend(b"text block ".iter().cycle().take(BLOCK)),
            _ => v.extend((0..BLOCK).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })),
        }
    }
    v.extend(std::iter::repeat_n(3u8, 1000));
    std::fs::write(&image, &v).unwrap();
    let mut s = setup("");
    s.image = image.clone();
    s.opts.source = image;
    s.opts.rescan = true;
    let gw = gateway_for(&mut s, 64 << 20).await;
    let r = replicate(&s.opts).await.unwrap();
    assert_replica(&gw, &s.image);
    assert_eq!((r.mode.as_str(), r.verified), ("delta", Some(true)));
    let blocks = (20 << 20) / BLOCK as u64 + 1;
    // the blank volume already holds every zero block
    assert_eq!(r.blocks_matched, (20 << 20) / BLOCK as u64 / 5);
    assert_eq!(r.blocks_sent + r.blocks_matched, blocks);
    assert_eq!(r.blocks_zero, 0);
    // text compresses
    assert!(r.bytes_sent_wire < r.bytes_changed, "{r:?}");
    let r2 = replicate(&s.opts).await.unwrap();
    assert_eq!((r2.bytes_changed, r2.blocks_matched), (0, blocks));
}
