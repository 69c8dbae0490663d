//! Durability under faults: a superseded writer, a failed `fdatasync`, a crash while a
//! snapshot is still being copied. Each test failed against an earlier gateway (found in review)
//! and guards the fix.
//!
//! Every test talks to a real `sync-gateway` process on 127.0.0.1 through a raw synchronous
//! client built on the library's own codec.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::{send_auth, Client, Recv};
use common::*;
use sync_gateway::protocol::auth::DiskKey;
use sync_gateway::protocol::frame::CHECKPOINT_VERIFY;
use sync_gateway::protocol::{Checkpoint, Data, Frame, Welcome};

// ---------------------------------------------------------------------------------------------
// Checks on top of the raw client (tests/common/raw.rs)

impl Client {
    /// Waits for an `Ack` covering `seq` (skipping other acks).
    fn expect_ack(&mut self, seq: u64, within: Duration) {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Recv::Frame(Frame::Ack { durable_seq }) if durable_seq >= seq => return,
                Recv::Frame(Frame::Ack { .. }) => continue,
                other => panic!("expected Ack >= {seq}, got {other:?}"),
            }
        }
    }

    /// Waits for the `CheckpointAck` of `seq` (skipping acks); returns the snapshot id.
    fn expect_checkpoint_ack(&mut self, seq: u64, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Recv::Frame(Frame::CheckpointAck(a)) if a.seq == seq => return a.snapshot_id,
                Recv::Frame(Frame::Ack { .. }) => continue,
                other => panic!("expected CheckpointAck {seq}, got {other:?}"),
            }
        }
    }
}

/// Preamble, Hello, Challenge, Auth, Welcome.
fn session(
    addr: SocketAddr,
    id: &str,
    size: u64,
    key: &DiskKey,
    within: Duration,
) -> (Client, Welcome) {
    let (mut c, ..) = send_auth(addr, id, size, key).unwrap();
    match c.recv(within) {
        Recv::Frame(Frame::Welcome(w)) => (c, w),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// `session`, retried while the gateway answers with a retryable error (busy, superseded).
fn session_retrying(
    addr: SocketAddr,
    id: &str,
    size: u64,
    key: &DiskKey,
    within: Duration,
) -> (Client, Welcome) {
    let end = Instant::now() + within;
    loop {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            session(
                addr,
                id,
                size,
                key,
                end.saturating_duration_since(Instant::now()),
            )
        }));
        match r {
            Ok(x) => return x,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => std::panic::resume_unwind(e),
        }
    }
}

fn data(seq: u64, offset: u64, block: &[u8]) -> Frame {
    Frame::Data(Data {
        seq,
        offset,
        length: block.len() as u32,
        flags: 0,
        digest: sha256_bytes(block),
        payload: Bytes::copy_from_slice(block),
    })
}

fn checkpoint(seq: u64, flags: u8, label: &str) -> Frame {
    Frame::Checkpoint(Checkpoint {
        seq,
        flags,
        label: label.into(),
    })
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    Rng::new(seed).fill(&mut b);
    b
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

/// (id, state) of every snapshot metadata file of `disk`, read directly from the data dir.
fn snapshot_states(data_dir: &Path, disk: &str) -> Vec<(String, String)> {
    let dir = data_dir.join("snapshots").join(disk);
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.starts_with('.') {
            continue;
        }
        let Ok(text) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        out.push((
            v["id"].as_str().unwrap_or_default().to_string(),
            v["state"].as_str().unwrap_or("completed").to_string(),
        ));
    }
    out
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const DISK: &str = "d1";

/// How long a step may take before the gateway counts as hung. A bound, not a speed claim: it
/// is generous because the CI machine has 2 cores and these tests run beside others.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// A writer that misses the drain deadline must still hold its disk: the next session starts
// only after it has stopped, so its queued writes never land on top of newer acked ones.

#[test]
fn a_superseded_writer_never_overwrites_newer_acked_writes() {
    let t = TestDir::new("review-stale-writer");
    let size = 32 * MIB;
    let key = write_key(&t.key_path(DISK), 11);
    let cfg = GatewayConfig::new(t.data_dir())
        // a slow background snapshot copy keeps the writer of a VERIFY checkpoint busy
        .backend_option("snapshot_copy_bytes_per_sec", MIB)
        .limit("drain_timeout_secs", 1)
        .disk(DISK, size, &t.key_path(DISK));
    let gw = Gateway::start(&cfg, &t.path("gw.toml"), &t.path("gw.log"));

    // Session A: 8 MiB of data, a VERIFY checkpoint (whose copy takes ~8 s), then one more
    // write that the writer can only apply after the copy.
    let (mut a, w) = session(gw.addr, DISK, size, &key, WAIT);
    assert_eq!(w.durable_seq, 0);
    for i in 0..8u64 {
        a.put(&data(i + 1, i * MIB, &random(MIB as usize, i)));
    }
    a.expect_ack(8, WAIT);
    a.put(&checkpoint(9, CHECKPOINT_VERIFY, "c1"));
    let target = 20 * MIB;
    a.put(&data(10, target, &[0xAA; 4096]));
    wait_until("the checkpoint's snapshot to be initiated", WAIT, || {
        !snapshot_states(&t.data_dir(), DISK).is_empty()
    });
    std::thread::sleep(Duration::from_millis(200));

    // Session B (the agent reconnecting) supersedes A; A's writer misses the 1 s drain deadline.
    // B is answered `Busy` until A's writer has finished the copy (~8 s), the digest and its
    // queued write, so B retries as the agent does. The window only bounds a hung gateway: on a
    // loaded 2-core CI machine the copy, the digest and an fdatasync took 10+ s, and a 15 s
    // window (two 6 s server-side waits) failed there once.
    let (mut b, w) = session_retrying(gw.addr, DISK, size, &key, Duration::from_secs(90));
    assert!(w.durable_seq >= 9, "B resumes after the checkpoint: {w:?}");
    let last = w.durable_seq + 2;
    b.put(&data(w.durable_seq + 1, target, &[0xBB; 4096]));
    b.put(&data(last, target, &[0xCC; 4096]));
    b.expect_ack(last, WAIT);
    assert_eq!(
        read_at(&gw.volume(DISK), target, 4096),
        vec![0xCC; 4096],
        "B's acknowledged write is on the volume"
    );
    drop(b);
    drop(a);

    // Once the copy ends, A's detached writer applies its queued seq 10.
    wait_until(
        "the snapshot copy to complete",
        Duration::from_secs(60),
        || {
            snapshot_states(&t.data_dir(), DISK)
                .iter()
                .all(|(_, s)| s != "pending")
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    let now = read_at(&gw.volume(DISK), target, 4096);
    assert!(
        now == vec![0xCC; 4096],
        "acknowledged write (seq {last}, 0xCC) was overwritten by the superseded session's \
         stale seq 10 (first byte now {:#04x}); durable point now {:?}",
        now[0],
        durable_point(&t.data_dir(), DISK)
    );
    assert!(
        durable_point(&t.data_dir(), DISK).seq >= last,
        "durable point regressed below the acknowledged seq {last}: {:?}",
        durable_point(&t.data_dir(), DISK)
    );
}

// ---------------------------------------------------------------------------------------------
// A checkpoint is acknowledged once its copy-before-write snapshot is initiated. A crash while
// the background copy runs (after later writes were acknowledged) must not lose that snapshot:
// the restarted gateway resumes the copy from its journal and the snapshot ends up equal to
// the disk at the checkpoint.

#[test]
fn an_acked_snapshot_survives_a_crash_during_its_copy() {
    let t = TestDir::new("review-lost-snapshot");
    let size = 16 * MIB;
    let key = write_key(&t.key_path(DISK), 12);
    let cfg = GatewayConfig::new(t.data_dir())
        .backend_option("snapshot_copy_bytes_per_sec", MIB)
        .disk(DISK, size, &t.key_path(DISK));
    let mut gw = Gateway::start(&cfg, &t.path("gw.toml"), &t.path("gw.log"));

    let (mut a, _) = session(gw.addr, DISK, size, &key, WAIT);
    for i in 0..4u64 {
        a.put(&data(i + 1, i * MIB, &random(MIB as usize, 100 + i)));
    }
    a.expect_ack(4, WAIT);
    a.put(&checkpoint(5, 0, "full-1"));
    let snap = a.expect_checkpoint_ack(5, WAIT);
    // continuous replication goes on after the checkpoint
    a.put(&data(6, 0, &[0x55; 4096]));
    a.expect_ack(6, WAIT);
    assert!(
        snapshot_states(&t.data_dir(), DISK)
            .iter()
            .any(|(id, s)| *id == snap && s == "pending"),
        "the copy is still running"
    );
    gw.kill9(); // power loss / OOM kill while the copy runs
    drop(a);

    let gw = Gateway::start(&cfg, &t.path("gw.toml"), &t.path("gw2.log"));
    let (_c, w) = session(gw.addr, DISK, size, &key, WAIT);
    assert_eq!(w.checkpoint_seq, 5, "{w:?}");
    assert_eq!(w.snapshot_id, snap, "{w:?}");
    wait_until("the resumed snapshot copy to complete", WAIT, || {
        snapshot_states(&t.data_dir(), DISK)
            .iter()
            .any(|(id, s)| *id == snap && s == "completed")
    });
    // The disk at checkpoint 5: four random MiB, then zeros (seq 6 came after).
    let mut expected = vec![0u8; size as usize];
    for i in 0..4u64 {
        let at = (i * MIB) as usize;
        expected[at..at + MIB as usize].copy_from_slice(&random(MIB as usize, 100 + i));
    }
    let got = std::fs::read(snapshot_image(&t.data_dir(), DISK, &snap)).unwrap();
    assert!(
        got == expected,
        "snapshot {snap} of checkpoint 5 differs from the disk at the checkpoint after the crash"
    );
    assert_eq!(read_at(&gw.volume(DISK), 0, 4096), vec![0x55; 4096]);
}

// ---------------------------------------------------------------------------------------------
// After `fdatasync` of the volume fails, nothing pending may be acked, not even after a retried
// sync that succeeds. On Linux a failed writeback is reported once per open file: the retried `fdatasync`
// returns success although the dirty pages were dropped, and the writer persists the point and
// acks data that never reached the disk ("fsyncgate"). A preloaded shim makes exactly one
// `fdatasync` of the volume report EIO, as the kernel does after a writeback error.

const FSYNC_SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int fdatasync(int fd) {
    static int (*real)(int) = 0;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    char link[64], path[4096], trig[4200];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n > 0) {
        path[n] = 0;
        char *p = strstr(path, "/disks/");
        if (p) {
            size_t base = (size_t)(p - path);
            memcpy(trig, path, base);
            strcpy(trig + base, "/FAIL_FDATASYNC");
            if (unlink(trig) == 0) { errno = EIO; return -1; }
        }
    }
    return real(fd);
}
"#;

#[test]
fn a_failed_fdatasync_is_never_acked() {
    let t = TestDir::new("review-fsyncgate");
    let shim_c = t.path("shim.c");
    let shim = t.path("shim.so");
    std::fs::write(&shim_c, FSYNC_SHIM_C).unwrap();
    let ok = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&shim_c)
        .arg("-ldl")
        .status()
        .expect("run cc");
    assert!(ok.success(), "cannot build the fdatasync shim");

    let size = 4 * MIB;
    let key = write_key(&t.key_path(DISK), 13);
    let cfg = GatewayConfig::new(t.data_dir()).disk(DISK, size, &t.key_path(DISK));
    let config_path = t.path("gw.toml");
    cfg.write(&config_path);
    let log = std::fs::File::create(t.path("gw.log")).unwrap();
    let mut child = std::process::Command::new(GATEWAY_BIN)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("LD_PRELOAD", &shim)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn gateway");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut child);
    let addr_file = t.data_dir().join("listen.addr");
    let mut addr: Option<SocketAddr> = None;
    wait_until("listen.addr", Duration::from_secs(20), || {
        addr = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|s| s.strip_suffix('\n').map(|l| l.trim().parse().unwrap()));
        addr.is_some()
    });
    let addr = addr.unwrap();

    let (mut c, _) = session(addr, DISK, size, &key, WAIT);
    c.put(&data(1, 0, &random(4096, 1)));
    c.expect_ack(1, WAIT);
    // The next fdatasync of the volume fails with EIO.
    std::fs::write(t.data_dir().join("FAIL_FDATASYNC"), b"").unwrap();
    c.put(&data(2, 4096, &random(4096, 2)));
    let got = loop {
        match c.recv(WAIT) {
            Recv::Frame(Frame::Ack { durable_seq }) if durable_seq < 2 => continue,
            other => break other,
        }
    };
    assert!(
        !t.data_dir().join("FAIL_FDATASYNC").exists(),
        "the shim did not fail any fdatasync of the volume"
    );
    let mut log = String::new();
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("the session to end", WAIT, || {
            log = std::fs::read_to_string(t.path("gw.log")).unwrap_or_default();
            log.contains("session closed")
        })
    }));
    assert!(
        !matches!(got, Recv::Frame(Frame::Ack { durable_seq }) if durable_seq >= 2),
        "fdatasync of seq 2 failed with EIO, yet the gateway acked it: {got:?}\n{log}"
    );
}
