//! End-to-end replication: real `sync-gateway` and `sync-agent` processes on loopback, real
//! files, real sockets. Every test checks the bytes of the target (and snapshots) against the
//! source, so a broken feature fails here whatever the programs report about themselves.
//!
//! The tests share a 2-core machine and some of them depend on a sync being *in progress* when
//! something is killed, so they take a lock and run one at a time.

#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use sync_gateway::protocol::{Frame, FrameCodec, PREAMBLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

const AGENT_DEADLINE: Duration = Duration::from_secs(180);

/// A one-disk setup: keys, config, source image, gateway.
struct OneDisk {
    t: TestDir,
    gw: Gateway,
    cfg: GatewayConfig,
    src: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl OneDisk {
    fn new(name: &str, size: u64, seed: u64, limits: &[(&str, u64)]) -> Self {
        let t = TestDir::new(name);
        let key = t.key_path("disk-1");
        write_key(&key, seed);
        let mut cfg = GatewayConfig::new(t.data_dir());
        for (k, v) in limits {
            cfg = cfg.limit(k, v);
        }
        let cfg = cfg.disk("disk-1", size, &key);
        let gw = Gateway::start(&cfg, &t.path("gateway.toml"), &t.path("gateway.log"));
        let src = t.source_path("disk-1");
        make_image(&src, size, seed);
        OneDisk {
            t,
            gw,
            cfg,
            src,
            key,
        }
    }

    fn agent(&self, gateway: impl ToString) -> AgentCmd {
        AgentCmd::new(
            gateway,
            "disk-1",
            &self.key,
            &self.t.state_dir("disk-1"),
            &self.src,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Full sync, then incremental, with --verify, snapshots, listing

#[test]
fn full_then_incremental_sync_with_verify_and_snapshots() {
    let _s = serial();
    let t = TestDir::new("full-incr");
    let size = 64 * MIB;
    // The config shape, key from `sync-gateway keygen`.
    let key = t.key_path("disk-1");
    keygen(&key);
    let cfg = GatewayConfig::new(t.data_dir()).disk("disk-1", size, &key);
    let mut gw = Gateway::start(&cfg, &t.path("gateway.toml"), &t.path("gateway.log"));
    let src = t.source_path("disk-1");
    let old_hash = make_image(&src, size, 1);
    let agent =
        AgentCmd::new(gw.addr, "disk-1", &key, &t.state_dir("disk-1"), &src).retry_timeout(20);

    // --- full pass
    let run1 = agent.run(AGENT_DEADLINE);
    run1.note("full pass");
    let j1 = run1.expect_verified().clone();
    let d1 = run1.describe();
    assert_eq!(j1["mode"], "full", "{d1}");
    assert_eq!(j1["disk_id"], "disk-1", "{d1}");
    assert_eq!(run1.u64("bytes_total"), size, "{d1}");
    assert_eq!(
        j1["digest"],
        old_hash.as_str(),
        "agent digest is not the source SHA-256\n{d1}"
    );
    assert!(j1["resumed_from_seq"].is_null(), "{d1}");
    assert_same_file(&gw.volume("disk-1"), &src, "volume after the full pass");
    let snap1 = run1.str("snapshot_id");
    let label1 = run1.str("checkpoint_label");
    assert!(!snap1.is_empty() && !label1.is_empty(), "{d1}");
    let snap1_img = snapshot_image(&t.data_dir(), "disk-1", &snap1);
    assert_same_file(&snap1_img, &src, "snapshot of the full pass");

    let list = gw.snapshots(None);
    assert_eq!(list.len(), 1, "one snapshot after one pass: {list:?}");
    let s = &list[0];
    assert_eq!(s.id, snap1, "{list:?}");
    assert_eq!(s.disk_id, "disk-1");
    assert_eq!(
        s.label, label1,
        "snapshot listing names the checkpoint label"
    );
    assert_eq!(s.checkpoint_seq, run1.u64("checkpoint_seq"));
    assert_eq!(s.size_bytes, size);
    if let Some(p) = &s.path {
        assert_same_file(p, &src, "snapshot at the listed path");
    }

    // --- 1 % scattered 4 KiB changes, incremental pass
    let changed = apply_scattered_changes(&src, 1, 99);
    let new_hash = sha256_file(&src);
    assert_ne!(new_hash, old_hash);
    let run2 = agent.run(AGENT_DEADLINE);
    run2.note("incremental pass");
    let j2 = run2.expect_verified().clone();
    let d2 = run2.describe();
    assert_eq!(j2["mode"], "incremental", "{d2}");
    assert_eq!(j2["digest"], new_hash.as_str(), "{d2}");
    let changed_bytes = changed.len() as u64 * BLOCK;
    let wire = run2.u64("bytes_sent_wire");
    assert!(
        wire as f64 <= 1.2 * changed_bytes as f64,
        "incremental pass sent {wire} bytes for {} changed blocks ({changed_bytes} bytes): more than 1.2x\n{d2}",
        changed.len()
    );
    assert_eq!(
        run2.u64("blocks_sent"),
        changed.len() as u64,
        "incremental pass must send exactly the changed blocks\n{d2}"
    );
    assert_same_file(
        &gw.volume("disk-1"),
        &src,
        "volume after the incremental pass",
    );
    let snap2 = run2.str("snapshot_id");
    assert_ne!(
        snap2, snap1,
        "the incremental pass made a new snapshot\n{d2}"
    );
    assert!(
        run2.u64("checkpoint_seq") > run1.u64("checkpoint_seq"),
        "{d2}"
    );
    assert_same_file(
        &snapshot_image(&t.data_dir(), "disk-1", &snap2),
        &src,
        "snapshot of the incremental pass",
    );
    assert_eq!(
        sha256_file(&snap1_img),
        old_hash,
        "the first snapshot changed after the incremental pass"
    );
    let list = gw.snapshots(Some("disk-1"));
    let ids: Vec<&str> = list.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [snap1.as_str(), snap2.as_str()],
        "listing, oldest first"
    );
    assert_eq!(list[1].label, run2.str("checkpoint_label"));

    // SIGTERM: graceful exit 0
    let status = gw.terminate(Duration::from_secs(60));
    assert!(status.success(), "gateway exit after SIGTERM: {status}");
}

// ---------------------------------------------------------------------------------------------
// 2. Wrong key

#[test]
fn wrong_key_is_refused_and_writes_nothing() {
    let _s = serial();
    let size = 16 * MIB;
    let d = OneDisk::new("wrong-key", size, 2, &[]);
    // a good pass first, so the target holds data worth protecting
    d.agent(d.gw.addr)
        .retry_timeout(20)
        .run(AGENT_DEADLINE)
        .expect_verified();
    assert_same_file(&d.gw.volume("disk-1"), &d.src, "volume after the good pass");
    let before = sha256_file(&d.gw.volume("disk-1"));
    let snaps_before = d.gw.snapshots(None).len();
    let seq_before = d.gw.durable_seq("disk-1");

    apply_scattered_changes(&d.src, 5, 7);
    let wrong = d.t.key_path("wrong");
    write_key(&wrong, 12345);
    let mut cmd = d.agent(d.gw.addr);
    cmd.key_file = wrong;
    // auth failure is final: the agent must not retry it (a 60 s deadline, default retry 300 s)
    let run = cmd.run(Duration::from_secs(60));
    run.note("wrong key");
    let desc = run.describe();
    assert!(
        !run.status.success(),
        "agent with a wrong key succeeded\n{desc}"
    );
    assert!(
        run.stderr.contains("auth_failed"),
        "stderr does not name auth_failed\n{desc}"
    );
    let last = run.stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("sync-agent: error: "),
        "last stderr line is not `sync-agent: error: …`\n{desc}"
    );
    assert_eq!(
        sha256_file(&d.gw.volume("disk-1")),
        before,
        "the target changed"
    );
    assert_eq!(
        d.gw.snapshots(None).len(),
        snaps_before,
        "a snapshot appeared"
    );
    assert_eq!(
        d.gw.durable_seq("disk-1"),
        seq_before,
        "the durable point moved"
    );
    assert!(
        d.gw.log_text().contains("auth_failed"),
        "gateway log does not name auth_failed"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Connection cut mid-stream: resume without resending acknowledged frames

#[derive(Debug, Default)]
struct ProxyLog {
    /// Per connection: the durable seq its Welcome named, and the Data seqs the agent sent.
    welcome: Vec<Option<u64>>,
    data_seqs: Vec<Vec<u64>>,
    /// Per connection: (seq, offset, end) of every Data frame.
    data_ranges: Vec<Vec<(u64, u64, u64)>>,
    highest_acked: u64,
    bytes_to_gateway: u64,
    /// (connection index, highest acked seq) when the cut was made.
    cut: Option<(usize, u64)>,
    cut_detail: String,
    problems: Vec<String>,
}

type Log = Arc<Mutex<ProxyLog>>;

fn lock(log: &Log) -> MutexGuard<'_, ProxyLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Forwards agent → gateway, parsing frames after the preamble; makes the one cut.
async fn pump_to_gateway(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    idx: usize,
    log: Log,
    cut_after: u64,
    stop: CancellationToken,
) {
    let mut codec = FrameCodec::default();
    let mut parse = BytesMut::new();
    let mut preamble_seen = false;
    let mut max_seq = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => break,
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        parse.extend_from_slice(&buf[..n]);
        let mut l = lock(&log);
        l.bytes_to_gateway += n as u64;
        if !preamble_seen && parse.len() >= 4 {
            if parse[..4] != PREAMBLE {
                l.problems.push(format!("connection {idx}: bad preamble"));
            }
            let _ = parse.split_to(4);
            preamble_seen = true;
        }
        if preamble_seen {
            loop {
                match codec.decode(&mut parse) {
                    Ok(Some(Frame::Data(d))) => {
                        max_seq = max_seq.max(d.seq);
                        l.data_seqs[idx].push(d.seq);
                        l.data_ranges[idx].push((d.seq, d.offset, d.end()));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        l.problems
                            .push(format!("connection {idx}: agent sent bad frames: {e}"));
                        stop.cancel();
                        return;
                    }
                }
            }
        }
        // Cut once enough has passed, something was acked, and something is not yet acked
        // (a frame passed after the last ack, or one is half through): the agent must resend
        // exactly the unacknowledged part.
        let unacked = max_seq > l.highest_acked || !parse.is_empty();
        if l.cut.is_none() && l.bytes_to_gateway >= cut_after && l.highest_acked > 0 && unacked {
            l.cut = Some((idx, l.highest_acked));
            l.cut_detail = format!(
                "highest data seq through {max_seq}, highest ack {}, {} bytes of a frame half through",
                l.highest_acked,
                parse.len()
            );
            drop(l);
            // an abrupt cut: RST both ways, like a dropped network path
            let _ = from.as_ref().set_zero_linger();
            let _ = to.as_ref().set_zero_linger();
            stop.cancel();
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Forwards gateway → agent, recording Welcome and Ack.
async fn pump_to_agent(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    idx: usize,
    log: Log,
    stop: CancellationToken,
) {
    let mut codec = FrameCodec::default();
    let mut parse = BytesMut::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
        };
        parse.extend_from_slice(&buf[..n]);
        // record before forwarding: what the agent can see is recorded first
        {
            let mut l = lock(&log);
            loop {
                match codec.decode(&mut parse) {
                    Ok(Some(Frame::Welcome(w))) => l.welcome[idx] = Some(w.durable_seq),
                    Ok(Some(Frame::Ack { durable_seq })) => {
                        l.highest_acked = l.highest_acked.max(durable_seq)
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        l.problems
                            .push(format!("connection {idx}: gateway sent bad frames: {e}"));
                        break;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn proxy(listener: TcpListener, upstream: SocketAddr, log: Log, cut_after: u64) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            return;
        };
        let Ok(out) = TcpStream::connect(upstream).await else {
            lock(&log)
                .problems
                .push("proxy cannot reach the gateway".into());
            continue;
        };
        let _ = inbound.set_nodelay(true);
        let _ = out.set_nodelay(true);
        let idx = {
            let mut l = lock(&log);
            l.welcome.push(None);
            l.data_seqs.push(Vec::new());
            l.data_ranges.push(Vec::new());
            l.welcome.len() - 1
        };
        let (ir, iw) = inbound.into_split();
        let (or, ow) = out.into_split();
        let stop = CancellationToken::new();
        tokio::spawn(pump_to_gateway(
            ir,
            ow,
            idx,
            log.clone(),
            cut_after,
            stop.clone(),
        ));
        tokio::spawn(pump_to_agent(or, iw, idx, log.clone(), stop));
    }
}

#[test]
fn cut_connection_resumes_without_resending_acked_frames() {
    let _s = serial();
    let size = 64 * MIB;
    // smaller sync batches: acks arrive often, so the cut lands between acked and unacked data
    let d = OneDisk::new("cut", size, 3, &[("sync_bytes", 4 * MIB)]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let log: Log = Arc::default();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    rt.spawn(proxy(listener, d.gw.addr, log.clone(), 8 * MIB));

    let run = d
        .agent(proxy_addr)
        .bandwidth("16M")
        .retry_timeout(30)
        .run(AGENT_DEADLINE);
    run.note("through the cutting proxy");
    let l = lock(&log);
    eprintln!(
        "proxy: {} connection(s), cut {:?} (connection, highest ack): {}; welcome seqs {:?}, data frames per connection (count, first, last) {:?}",
        l.welcome.len(),
        l.cut,
        l.cut_detail,
        l.welcome,
        l.data_seqs.iter().map(|v| (v.len(), v.first().copied(), v.last().copied())).collect::<Vec<_>>()
    );
    let desc = format!("{}\nproxy: {l:?}", run.describe())
        .chars()
        .take(20_000)
        .collect::<String>();
    assert!(l.problems.is_empty(), "{desc}");
    let (cut_conn, acked_at_cut) = l
        .cut
        .unwrap_or_else(|| panic!("the proxy never cut\n{desc}"));
    let j = run.expect_verified();
    assert!(
        j["reconnects"].as_u64().unwrap_or(0) >= 1,
        "reconnects < 1\n{desc}"
    );
    assert!(acked_at_cut > 0);
    let later: Vec<(usize, u64)> = (cut_conn + 1..l.data_seqs.len())
        .flat_map(|i| l.data_seqs[i].iter().map(move |s| (i, *s)))
        .collect();
    assert!(
        !later.is_empty(),
        "no data frames after the cut: the cut was not mid-stream\n{desc}"
    );
    let resent: Vec<_> = later.iter().filter(|(_, s)| *s <= acked_at_cut).collect();
    assert!(
        resent.is_empty(),
        "after the cut (highest ack {acked_at_cut}) the agent resent acknowledged frames {resent:?}\n{desc}"
    );
    for i in cut_conn + 1..l.data_seqs.len() {
        let w = l.welcome[i].unwrap_or_else(|| panic!("connection {i} had no Welcome\n{desc}"));
        assert!(
            w >= acked_at_cut,
            "Welcome {w} below the acked {acked_at_cut}: ack lost\n{desc}"
        );
        if let Some(min) = l.data_seqs[i].iter().min() {
            assert!(
                *min > w,
                "connection {i} resent seq {min} <= its Welcome durable seq {w}\n{desc}"
            );
        }
    }
    // Seq numbers aside, no acknowledged *data* travels again: a frame after the cut must not
    // cover bytes that an acknowledged frame before the cut already delivered (a rescan from
    // offset 0 with fresh seqs would).
    let acked_ranges: Vec<(u64, u64)> = l.data_ranges[..=cut_conn]
        .iter()
        .flatten()
        .filter(|(seq, ..)| *seq <= acked_at_cut)
        .map(|(_, a, b)| (*a, *b))
        .collect();
    let resent_ranges: Vec<_> = l.data_ranges[cut_conn + 1..]
        .iter()
        .flatten()
        .filter(|(_, a, b)| acked_ranges.iter().any(|(x, y)| a < y && x < b))
        .take(10)
        .collect();
    assert!(
        resent_ranges.is_empty(),
        "after the cut the agent sent again data already acknowledged: (seq, offset, end) {resent_ranges:?}\n{desc}"
    );
    drop(l);
    assert_same_file(
        &d.gw.volume("disk-1"),
        &d.src,
        "volume after the cut and resume",
    );
    rt.shutdown_background();
}

// ---------------------------------------------------------------------------------------------
// 4. kill -9 of the gateway mid-sync, restart on the same port (and the same with SIGTERM)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill9,
    Sigterm,
}

/// Stops the gateway while a throttled full pass streams, checks that what it declared durable
/// is on the volume, restarts it on the same address and lets the agent finish by itself.
fn interrupt_gateway_mid_sync(name: &str, seed: u64, stop: Stop) {
    let size = 64 * MIB;
    let mut d = OneDisk::new(name, size, seed, &[]);
    let addr = d.gw.addr;
    let mut agent = d.agent(addr).bandwidth("16M").retry_timeout(60).spawn();
    let data_dir = d.t.data_dir();
    wait_for(
        Duration::from_secs(30),
        "durable progress on disk-1",
        || (durable_seq(&data_dir, "disk-1") > 0).then_some(()),
    );
    assert!(
        agent.is_running(),
        "the agent finished before the gateway could be stopped"
    );
    match stop {
        Stop::Kill9 => d.gw.kill9(),
        Stop::Sigterm => {
            let status = d.gw.terminate(Duration::from_secs(60));
            assert!(
                status.success(),
                "gateway exit after SIGTERM mid-sync: {status}"
            );
        }
    }
    let point = durable_point(&data_dir, "disk-1");
    eprintln!("gateway stopped ({stop:?}) at durable point {point:?}");
    assert!(point.seq > 0);
    // A full pass writes in ascending offsets: everything below the durable resume offset was
    // acknowledged as durable and must be on the volume, whatever happened to the process.
    if let Some(diff) =
        first_difference_in_prefix(&d.gw.volume("disk-1"), &d.src, point.resume_offset)
    {
        panic!(
            "after {stop:?}, data below the durable resume offset {} is not on the volume: {diff}",
            point.resume_offset
        );
    }

    // restart on the very address the agent keeps dialing
    let cfg = GatewayConfig {
        listen: addr.to_string(),
        ..d.cfg.clone()
    };
    let gw2 = Gateway::start(&cfg, &d.t.path("gateway.toml"), &d.t.path("gateway-2.log"));
    assert_eq!(gw2.addr, addr);
    let run = agent.wait(AGENT_DEADLINE);
    run.note(&format!("across the gateway restart after {stop:?}"));
    let j = run.expect_verified();
    assert!(
        j["reconnects"].as_u64().unwrap_or(0) >= 1,
        "reconnects < 1\n{}",
        run.describe()
    );
    assert!(
        gw2.durable_seq("disk-1") >= point.seq,
        "durable point went backwards"
    );
    assert_same_file(
        &gw2.volume("disk-1"),
        &d.src,
        "volume after the gateway restart",
    );
    assert_same_file(
        &snapshot_image(&data_dir, "disk-1", &run.str("snapshot_id")),
        &d.src,
        "snapshot after the gateway restart",
    );
}

#[test]
fn gateway_kill9_mid_sync_then_restart_agent_finishes() {
    let _s = serial();
    interrupt_gateway_mid_sync("gw-kill", 4, Stop::Kill9);
}

#[test]
fn gateway_sigterm_mid_sync_drains_exits_0_then_agent_finishes() {
    let _s = serial();
    interrupt_gateway_mid_sync("gw-term", 7, Stop::Sigterm);
}

// ---------------------------------------------------------------------------------------------
// 5. kill -9 of the agent mid-sync, rerun

#[test]
fn agent_kill9_mid_sync_then_rerun_resumes() {
    let _s = serial();
    let size = 64 * MIB;
    let d = OneDisk::new("agent-kill", size, 5, &[]);
    let cmd = d.agent(d.gw.addr).bandwidth("16M").retry_timeout(30);
    let mut first = cmd.spawn();
    let data_dir = d.t.data_dir();
    wait_for(
        Duration::from_secs(30),
        "durable progress on disk-1",
        || (durable_seq(&data_dir, "disk-1") > 0).then_some(()),
    );
    assert!(
        first.is_running(),
        "the agent finished before it could be killed"
    );
    let killed = first.kill9();
    let point = durable_point(&data_dir, "disk-1");
    let seq_seen = point.seq;
    if let Some(diff) =
        first_difference_in_prefix(&d.gw.volume("disk-1"), &d.src, point.resume_offset)
    {
        panic!(
            "data below the durable resume offset {} is not on the volume: {diff}",
            point.resume_offset
        );
    }
    assert!(
        d.gw.snapshots(None).is_empty(),
        "a snapshot exists before the pass ended"
    );

    eprintln!("agent killed with durable seq {seq_seen}");
    let run = cmd.run(AGENT_DEADLINE);
    run.note("rerun after kill -9");
    let j = run.expect_verified();
    let desc = format!("{}\nkilled run: {}", run.describe(), killed.describe());
    let resumed = j["resumed_from_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("resumed_from_seq is not a number\n{desc}"));
    assert!(
        resumed >= seq_seen,
        "resumed from {resumed}, below the durable {seq_seen}\n{desc}"
    );
    assert_eq!(j["mode"], "full", "{desc}");
    assert!(
        run.u64("bytes_changed") < size,
        "the resumed pass sent the whole disk again\n{desc}"
    );
    assert_same_file(&d.gw.volume("disk-1"), &d.src, "volume after the rerun");
}

// ---------------------------------------------------------------------------------------------
// 6. 16 disks at once

#[test]
fn sixteen_disks_replicate_concurrently() {
    let _s = serial();
    let t = TestDir::new("sixteen");
    let size = 8 * MIB;
    let ids: Vec<String> = (1..=16).map(|i| format!("disk-{i:02}")).collect();
    let mut cfg = GatewayConfig::new(t.data_dir());
    for (i, id) in ids.iter().enumerate() {
        write_key(&t.key_path(id), 100 + i as u64);
        cfg = cfg.disk(id, size, &t.key_path(id));
    }
    let gw = Gateway::start(&cfg, &t.path("gateway.toml"), &t.path("gateway.log"));
    let mut hashes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        hashes.push(make_image(&t.source_path(id), size, 1000 + i as u64));
    }
    let unique: std::collections::HashSet<_> = hashes.iter().collect();
    assert_eq!(unique.len(), ids.len(), "test images must differ");
    let agents: Vec<_> = ids
        .iter()
        .map(|id| {
            AgentCmd::new(
                gw.addr,
                id,
                &t.key_path(id),
                &t.state_dir(id),
                &t.source_path(id),
            )
            .retry_timeout(20)
            .spawn()
        })
        .collect();
    // 16 x 8 MiB takes seconds; the deadline only bounds a hang
    let runs: Vec<AgentRun> = agents
        .into_iter()
        .map(|a| a.wait(Duration::from_secs(120)))
        .collect();
    let mut failures = Vec::new();
    for (id, run) in ids.iter().zip(&runs) {
        let ok = run.status.success()
            && run.json.as_ref().is_some_and(|j| {
                j["verified"] == serde_json::Value::Bool(true) && j["disk_id"] == id.as_str()
            });
        if !ok {
            failures.push(run.describe());
        } else if let Some(diff) = first_difference(&gw.volume(id), &t.source_path(id)) {
            failures.push(format!("{id}: {diff}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 16 disks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(gw.snapshots(None).len(), 16, "one snapshot per disk");
}

// ---------------------------------------------------------------------------------------------
// 8. The checkpoint survives a gateway restart: the next pass is still incremental

#[test]
fn incremental_pass_after_gateway_restart() {
    let _s = serial();
    let size = 16 * MIB;
    let mut d = OneDisk::new("restart-incr", size, 8, &[]);
    let full = d.agent(d.gw.addr).retry_timeout(20).run(AGENT_DEADLINE);
    full.note("full pass");
    full.expect_verified();
    let status = d.gw.terminate(Duration::from_secs(60));
    assert!(status.success(), "gateway exit after SIGTERM: {status}");
    d.gw = Gateway::start(
        &d.cfg,
        &d.t.path("gateway.toml"),
        &d.t.path("gateway-2.log"),
    );

    let changed = apply_scattered_changes(&d.src, 1, 8);
    let run = d.agent(d.gw.addr).retry_timeout(20).run(AGENT_DEADLINE);
    run.note("incremental pass after the restart");
    let j = run.expect_verified();
    assert_eq!(j["mode"], "incremental", "{}", run.describe());
    assert_eq!(
        run.u64("blocks_sent"),
        changed.len() as u64,
        "{}",
        run.describe()
    );
    assert!(run.u64("checkpoint_seq") > full.u64("checkpoint_seq"));
    assert_same_file(
        &d.gw.volume("disk-1"),
        &d.src,
        "volume after the incremental pass",
    );
    assert_eq!(d.gw.snapshots(None).len(), 2, "two snapshots");
}

// ---------------------------------------------------------------------------------------------
// 9. kill -9 of the agent during an incremental pass: the rerun resumes that pass

#[test]
fn agent_kill9_during_incremental_pass_resumes_it() {
    let _s = serial();
    let size = 16 * MIB;
    let d = OneDisk::new("incr-kill", size, 9, &[]);
    let full = d.agent(d.gw.addr).retry_timeout(20).run(AGENT_DEADLINE);
    full.note("full pass");
    full.expect_verified();
    let full_ckpt = full.u64("checkpoint_seq");

    // 25 % of the blocks change: about 4 MiB of random data, ~4 s at 1 MiB/s
    let changed = apply_scattered_changes(&d.src, 25, 9);
    let cmd = d.agent(d.gw.addr).bandwidth("1M").retry_timeout(30);
    let mut first = cmd.spawn();
    let data_dir = d.t.data_dir();
    wait_for(
        Duration::from_secs(30),
        "durable progress of the incremental pass",
        || (durable_seq(&data_dir, "disk-1") > full_ckpt).then_some(()),
    );
    assert!(
        first.is_running(),
        "the agent finished before it could be killed"
    );
    let killed = first.kill9();
    let seen = durable_seq(&data_dir, "disk-1");
    eprintln!("agent killed during the incremental pass at durable seq {seen}");

    let run = cmd.run(AGENT_DEADLINE);
    run.note("rerun of the incremental pass");
    let desc = format!("{}\nkilled run: {}", run.describe(), killed.describe());
    let j = run.expect_verified();
    let resumed = j["resumed_from_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("resumed_from_seq is not a number\n{desc}"));
    assert!(resumed >= seen, "{desc}");
    assert_eq!(j["mode"], "incremental", "{desc}");
    assert!(
        run.u64("blocks_sent") < changed.len() as u64,
        "the rerun sent all {} changed blocks again\n{desc}",
        changed.len()
    );
    assert_same_file(
        &d.gw.volume("disk-1"),
        &d.src,
        "volume after the resumed pass",
    );
    assert_same_file(
        &snapshot_image(&data_dir, "disk-1", &run.str("snapshot_id")),
        &d.src,
        "snapshot of the resumed pass",
    );
}

/// A snapshot initiated at a checkpoint keeps the checkpoint's content even while the next
/// pass overwrites the disk before the snapshot's background copy has finished (no --verify,
/// so nothing waits for the copy).
#[test]
fn snapshot_copy_is_point_in_time_while_the_next_pass_writes() {
    let _s = serial();
    let t = TestDir::new("cow");
    let size = 128 * MIB;
    let key = t.key_path("disk-1");
    write_key(&key, 7);
    // A capped background copy (about 3 s for this image) makes sure pass 2 overwrites
    // regions the copy has not reached yet, so they must be preserved first.
    let cfg = GatewayConfig::new(t.data_dir())
        .backend_option("snapshot_copy_bytes_per_sec", 24 * MIB)
        .disk("disk-1", size, &key);
    let mut gw = Gateway::start(&cfg, &t.path("gateway.toml"), &t.path("gateway.log"));
    let src = t.source_path("disk-1");
    make_image(&src, size, 11);
    let v1 = t.path("v1.img");
    std::fs::copy(&src, &v1).unwrap();
    let mut agent =
        AgentCmd::new(gw.addr, "disk-1", &key, &t.state_dir("disk-1"), &src).retry_timeout(20);
    agent.verify = false;
    let run1 = agent.run(AGENT_DEADLINE);
    run1.note("full pass");
    run1.expect_ok();
    // Straight away: 25 % of the blocks change and travel while snapshot 1 is still copying.
    apply_scattered_changes(&src, 25, 5);
    let run2 = agent.run(AGENT_DEADLINE);
    run2.note("incremental pass");
    run2.expect_ok();
    let (snap1, snap2) = (run1.str("snapshot_id"), run2.str("snapshot_id"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = gw.snapshots(Some("disk-1"));
        if list.len() == 2 && list.iter().all(|s| s.state == "completed") {
            assert!(
                list.iter()
                    .all(|s| s.method == "copy-before-write" || s.method == "reflink"),
                "{list:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "snapshots did not complete: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_same_file(
        &snapshot_image(&t.data_dir(), "disk-1", &snap1),
        &v1,
        "snapshot 1 after pass 2 overwrote the disk",
    );
    assert_same_file(
        &snapshot_image(&t.data_dir(), "disk-1", &snap2),
        &src,
        "snapshot 2",
    );
    assert_same_file(&gw.volume("disk-1"), &src, "volume");
    gw.terminate(Duration::from_secs(30));
}

/// A gateway that accepts every session and then fails it (here: the snapshot directory cannot
/// be created) is not retried forever: the agent's retry timeout counts from the first failure
/// and only real progress resets it.
#[test]
fn agent_gives_up_on_a_gateway_that_keeps_failing_after_auth() {
    let _s = serial();
    let t = TestDir::new("keeps-failing");
    let size = 4 * MIB;
    let key = t.key_path("disk-1");
    write_key(&key, 3);
    let cfg = GatewayConfig::new(t.data_dir()).disk("disk-1", size, &key);
    let mut gw = Gateway::start(&cfg, &t.path("gateway.toml"), &t.path("gateway.log"));
    // A file where the disk's snapshot directory must go: every checkpoint fails.
    std::fs::create_dir_all(t.data_dir().join("snapshots")).unwrap();
    std::fs::write(t.data_dir().join("snapshots/disk-1"), b"in the way").unwrap();
    let src = t.source_path("disk-1");
    make_image(&src, size, 4);
    // An agent that restarts its retry budget on every accepted session never exits: the
    // 60 s deadline (20× the retry timeout) kills it and fails the test.
    let run = AgentCmd::new(gw.addr, "disk-1", &key, &t.state_dir("disk-1"), &src)
        .retry_timeout(3)
        .run(Duration::from_secs(60));
    let d = run.describe();
    assert!(!run.status.success(), "{d}");
    assert!(run.stderr.contains("storage_error"), "{d}");
    assert!(gw.is_alive(), "gateway survived the failing checkpoints");
    gw.terminate(Duration::from_secs(30));
}
