//! Bad input against a live gateway: raw-socket clients built on the library's `FrameCodec` and
//! `auth` send what a broken or hostile agent would. Each case must get the right `Error` frame,
//! then the connection closes; the gateway stays up, nothing rejected reaches the volume or the
//! durable point, and a real `sync-agent` replicating the other disk at the same time is not
//! disturbed.
//!
//! One gateway (idle and handshake timeouts of 2 s) serves two disks: `disk-a` takes the abuse,
//! `disk-b` is replicated by the real agent. The cases run one after another and every result is
//! collected, so one failure does not hide the others; the test fails listing every failed case.

#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::{hello, send_auth, Client, Recv};
use common::*;
use sync_gateway::protocol::auth::{self, DiskKey, Transcript};
use sync_gateway::protocol::frame::{FLAG_LZ4, FLAG_ZERO};
use sync_gateway::protocol::{Data, ErrorCode, Frame, Welcome, PREAMBLE};

const DISK_A: &str = "disk-a";
const DISK_B: &str = "disk-b";
const SIZE_A: u64 = 4 * MIB;
const SIZE_B: u64 = 32 * MIB;
const TIMEOUT_SECS: u64 = 2;

// ---------------------------------------------------------------------------------------------
// Checks on top of the raw client (tests/common/raw.rs)

impl Client {
    /// Reads until an `Error` frame (skipping acks), checks its code, then checks that the
    /// gateway closes the connection. Returns the error message.
    fn expect_error(&mut self, want: ErrorCode, within: Duration) -> Result<String, String> {
        let end = Instant::now() + within;
        let msg = loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Recv::Frame(Frame::Error { code, message }) if code == want => break message,
                Recv::Frame(Frame::Error { code, message }) => {
                    return Err(format!(
                        "expected Error {want}, got Error {code}: {message}"
                    ))
                }
                Recv::Frame(Frame::Ack { .. }) => continue,
                Recv::Frame(f) => return Err(format!("expected Error {want}, got {f:?}")),
                other => {
                    return Err(format!(
                        "expected Error {want} within {within:?}, got {other:?}"
                    ))
                }
            }
        };
        if msg.trim().is_empty() {
            return Err(format!("Error {want} carries no message"));
        }
        match self.recv(Duration::from_secs(5)) {
            Recv::Eof | Recv::Io(_) => Ok(msg),
            other => Err(format!(
                "after Error {want} ({msg}) the gateway did not close the connection: {other:?}"
            )),
        }
    }

    /// Waits for an `Ack` covering `seq`.
    fn expect_ack(&mut self, seq: u64, within: Duration) -> Result<(), String> {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Recv::Frame(Frame::Ack { durable_seq }) if durable_seq >= seq => return Ok(()),
                Recv::Frame(Frame::Ack { .. }) => continue,
                other => return Err(format!("expected Ack >= {seq}, got {other:?}")),
            }
        }
    }
}

/// A full, authenticated session; checks the gateway's proof.
fn session(
    addr: SocketAddr,
    id: &str,
    size: u64,
    key: &DiskKey,
) -> Result<(Client, Welcome), String> {
    let (mut c, version, server_nonce, client_nonce) = send_auth(addr, id, size, key)?;
    let w = match c.recv(Duration::from_secs(30)) {
        Recv::Frame(Frame::Welcome(w)) => w,
        other => return Err(format!("expected Welcome, got {other:?}")),
    };
    let t = Transcript {
        version,
        server_nonce: &server_nonce,
        client_nonce: &client_nonce,
        disk_size: size,
        disk_id: id,
    };
    if !auth::verify_gateway(key, &t, &w.server_proof) {
        return Err("Welcome carries a wrong server proof".into());
    }
    Ok((c, w))
}

fn data(seq: u64, offset: u64, block: &[u8]) -> Data {
    Data {
        seq,
        offset,
        length: block.len() as u32,
        flags: 0,
        digest: sha256_bytes(block),
        payload: Bytes::copy_from_slice(block),
    }
}

fn random_block(seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    Rng::new(seed).fill(&mut b);
    b
}

// ---------------------------------------------------------------------------------------------
// The test context

struct Ctx {
    addr: SocketAddr,
    key: DiskKey,
    wrong_key: DiskKey,
    volume: PathBuf,
    data_dir: PathBuf,
}

impl Ctx {
    fn session(&self) -> Result<(Client, Welcome), String> {
        session(self.addr, DISK_A, SIZE_A, &self.key)
    }

    /// The gateway's view of disk-a once every earlier session has drained: a fresh session's
    /// Welcome waits for that. Returns the durable seq the Welcome names.
    fn settled_durable_seq(&self) -> Result<u64, String> {
        let (c, w) = self
            .session()
            .map_err(|e| format!("settling session: {e}"))?;
        drop(c);
        let persisted = durable_seq(&self.data_dir, DISK_A);
        if persisted != w.durable_seq {
            return Err(format!(
                "Welcome names durable seq {} but the state file holds {persisted}",
                w.durable_seq
            ));
        }
        Ok(w.durable_seq)
    }

    fn volume_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.volume).unwrap()
    }
}

/// What a case expects to have changed on disk-a.
struct Outcome {
    /// Writes that must now be on the volume (offset, bytes).
    written: Vec<(u64, Vec<u8>)>,
    /// Durable seq expected afterwards; `None` = unchanged.
    durable: Option<u64>,
}

impl Outcome {
    fn nothing() -> Self {
        Outcome {
            written: Vec::new(),
            durable: None,
        }
    }
}

type Case = fn(&Ctx, u64) -> Result<Outcome, String>;

const W: Duration = Duration::from_secs(10);

fn case_bad_preamble(ctx: &Ctx, _d: u64) -> Result<Outcome, String> {
    let mut c = Client::connect(ctx.addr);
    c.raw(b"GET / HTTP/1.1\r\n")?;
    c.expect_error(ErrorCode::BadPreamble, W)?;
    Ok(Outcome::nothing())
}

fn case_unsupported_version(ctx: &Ctx, _d: u64) -> Result<Outcome, String> {
    let mut c = Client::connect(ctx.addr);
    c.raw(&PREAMBLE)?;
    c.send(&hello(DISK_A, SIZE_A, 99, 99))?;
    let m = c.expect_error(ErrorCode::UnsupportedVersion, W)?;
    if !m.contains("99") {
        return Err(format!(
            "UnsupportedVersion message does not name the offer: {m}"
        ));
    }
    Ok(Outcome::nothing())
}

fn case_unknown_disk(ctx: &Ctx, _d: u64) -> Result<Outcome, String> {
    let mut c = Client::connect(ctx.addr);
    c.raw(&PREAMBLE)?;
    c.send(&hello("no-such-disk", SIZE_A, 1, 1))?;
    c.expect_error(ErrorCode::UnknownDisk, W)?;
    Ok(Outcome::nothing())
}

fn case_disk_size_mismatch(ctx: &Ctx, _d: u64) -> Result<Outcome, String> {
    let mut c = Client::connect(ctx.addr);
    c.raw(&PREAMBLE)?;
    c.send(&hello(DISK_A, SIZE_A + BLOCK, 1, 1))?;
    c.expect_error(ErrorCode::DiskSizeMismatch, W)?;
    Ok(Outcome::nothing())
}

fn case_wrong_key(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    let (mut c, ..) = send_auth(ctx.addr, DISK_A, SIZE_A, &ctx.wrong_key)?;
    // a hostile agent streams right behind its Auth: none of it may land
    let block = random_block(d + 1000);
    let _ = c.send(&Frame::Data(data(d + 1, 0, &block)));
    c.expect_error(ErrorCode::AuthFailed, W)?;
    Ok(Outcome::nothing())
}

fn case_handshake_stall(ctx: &Ctx, _d: u64) -> Result<Outcome, String> {
    let mut c = Client::connect(ctx.addr);
    c.raw(&PREAMBLE)?;
    // half a Hello, then silence
    let h = Client::encode(&hello(DISK_A, SIZE_A, 1, 1));
    c.raw(&h[..h.len() / 2])?;
    let t = Instant::now();
    c.expect_error(ErrorCode::Timeout, Duration::from_secs(TIMEOUT_SECS + 8))?;
    let took = t.elapsed();
    if took > Duration::from_secs(TIMEOUT_SECS + 5) {
        return Err(format!(
            "handshake timeout of {TIMEOUT_SECS} s took {took:?}"
        ));
    }
    Ok(Outcome::nothing())
}

fn case_oversize_frame(ctx: &Ctx, _d: u64) -> Result<Outcome, String> {
    let (mut c, _) = ctx.session()?;
    c.raw(&[0x7f, 0xff, 0xff, 0xff, 0x10])?;
    c.expect_error(ErrorCode::FrameTooLarge, W)?;
    Ok(Outcome::nothing())
}

fn case_oversize_block(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    // a small frame announcing a zero block bigger than max_block_bytes (1 MiB)
    let (mut c, _) = ctx.session()?;
    let z = Data {
        seq: d + 1,
        offset: 0,
        length: 2 << 20,
        flags: FLAG_ZERO,
        digest: [0; 32],
        payload: Bytes::new(),
    };
    c.send(&Frame::Data(z))?;
    c.expect_error(ErrorCode::FrameTooLarge, W)?;
    Ok(Outcome::nothing())
}

fn case_truncated_frame(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    let (mut c, _) = ctx.session()?;
    let block = random_block(d + 2000);
    let f = Client::encode(&Frame::Data(data(d + 1, 8 * BLOCK, &block)));
    c.raw(&f[..f.len() / 2])?;
    c.shutdown_write().map_err(|e| e.to_string())?;
    c.expect_error(ErrorCode::TruncatedFrame, W)?;
    Ok(Outcome::nothing())
}

fn case_checksum_mismatch(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    let (mut c, _) = ctx.session()?;
    let block = random_block(d + 3000);
    let other = random_block(d + 3001);
    let mut f = data(d + 1, 16 * BLOCK, &block);
    f.digest = sha256_bytes(&other);
    c.send(&Frame::Data(f))?;
    c.expect_error(ErrorCode::ChecksumMismatch, W)?;
    Ok(Outcome::nothing())
}

fn case_checksum_mismatch_lz4(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    // compressed payload whose decompressed bytes do not match the digest
    let (mut c, _) = ctx.session()?;
    let block = vec![b'x'; BLOCK as usize];
    let mut f = data(d + 1, 20 * BLOCK, &block);
    f.flags = FLAG_LZ4;
    f.payload = Bytes::from(lz4_flex::block::compress(&block));
    f.digest = sha256_bytes(&vec![b'y'; BLOCK as usize]);
    c.send(&Frame::Data(f))?;
    c.expect_error(ErrorCode::ChecksumMismatch, W)?;
    Ok(Outcome::nothing())
}

fn case_out_of_range(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    // straddles the end of the disk
    let (mut c, _) = ctx.session()?;
    let block = random_block(d + 4000);
    c.send(&Frame::Data(data(d + 1, SIZE_A - BLOCK / 2, &block)))?;
    c.expect_error(ErrorCode::OutOfRange, W)?;
    // entirely past the end
    let (mut c, _) = ctx.session()?;
    c.send(&Frame::Data(data(d + 1, SIZE_A, &block)))?;
    c.expect_error(ErrorCode::OutOfRange, W)?;
    Ok(Outcome::nothing())
}

fn case_sequence_not_increasing(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    // the durable seq itself is not above the durable seq
    let (mut c, w) = ctx.session()?;
    if w.durable_seq != d {
        return Err(format!("Welcome durable seq {} != {d}", w.durable_seq));
    }
    let block = random_block(d + 5000);
    c.send(&Frame::Data(data(d, 24 * BLOCK, &block)))?;
    c.expect_error(ErrorCode::SequenceRegression, W)?;
    Ok(Outcome::nothing())
}

fn case_acked_then_sequence_regression(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    let (mut c, _) = ctx.session()?;
    let good = random_block(d + 6000);
    c.send(&Frame::Data(data(d + 1, 32 * BLOCK, &good)))?;
    c.expect_ack(d + 1, W)?;
    let bad = random_block(d + 6001);
    c.send(&Frame::Data(data(d + 1, 40 * BLOCK, &bad)))?;
    c.expect_error(ErrorCode::SequenceRegression, W)?;
    Ok(Outcome {
        written: vec![(32 * BLOCK, good)],
        durable: Some(d + 1),
    })
}

fn case_acked_then_checksum_mismatch(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    let (mut c, _) = ctx.session()?;
    // a good LZ4 block and a good zero block, acked, then a corrupt one
    let mut text = vec![0u8; 2 * BLOCK as usize];
    fill_text(&mut Rng::new(d + 7000), &mut text);
    let mut f = data(d + 1, 48 * BLOCK, &text);
    f.flags = FLAG_LZ4;
    f.payload = Bytes::from(lz4_flex::block::compress(&text));
    c.send(&Frame::Data(f))?;
    c.expect_ack(d + 1, W)?;
    let block = random_block(d + 7001);
    let mut bad = data(d + 2, 56 * BLOCK, &block);
    bad.payload = Bytes::from(random_block(d + 7002));
    c.send(&Frame::Data(bad))?;
    c.expect_error(ErrorCode::ChecksumMismatch, W)?;
    Ok(Outcome {
        written: vec![(48 * BLOCK, text)],
        durable: Some(d + 1),
    })
}

fn case_malformed(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    // unknown Data flag
    let (mut c, _) = ctx.session()?;
    let block = random_block(d + 8000);
    let mut f = data(d + 1, 64 * BLOCK, &block);
    f.flags = 0x80;
    c.send(&Frame::Data(f))?;
    c.expect_error(ErrorCode::Malformed, W)?;
    // a (small) Data frame where the Hello belongs
    let mut c = Client::connect(ctx.addr);
    c.raw(&PREAMBLE)?;
    c.send(&Frame::Data(data(1, 0, &block[..512])))?;
    c.expect_error(ErrorCode::Malformed, W)?;
    // before authentication no frame may be large: a full block is refused unread
    let mut c = Client::connect(ctx.addr);
    c.raw(&PREAMBLE)?;
    c.send(&Frame::Data(data(1, 0, &block)))?;
    c.expect_error(ErrorCode::FrameTooLarge, W)?;
    Ok(Outcome::nothing())
}

fn case_stall_mid_frame(ctx: &Ctx, d: u64) -> Result<Outcome, String> {
    let (mut c, _) = ctx.session()?;
    let block = random_block(d + 9000);
    let f = Client::encode(&Frame::Data(data(d + 1, 72 * BLOCK, &block)));
    c.raw(&f[..f.len() / 3])?;
    let t = Instant::now();
    c.expect_error(ErrorCode::Timeout, Duration::from_secs(TIMEOUT_SECS + 8))?;
    let took = t.elapsed();
    if took > Duration::from_secs(TIMEOUT_SECS + 5) {
        return Err(format!("idle timeout of {TIMEOUT_SECS} s took {took:?}"));
    }
    Ok(Outcome::nothing())
}

/// Runs one case with the before/after checks on disk-a and the gateway.
fn run_case(ctx: &Ctx, gw: &mut Gateway, case: Case) -> Result<(), String> {
    let d = ctx.settled_durable_seq()?;
    let mut expected = ctx.volume_bytes();
    let outcome = case(ctx, d)?;
    if !gw.is_alive() {
        return Err("the gateway process died".into());
    }
    let after_seq = ctx.settled_durable_seq()?;
    let want_seq = outcome.durable.unwrap_or(d);
    if after_seq != want_seq {
        return Err(format!(
            "durable seq went from {d} to {after_seq}, expected {want_seq}"
        ));
    }
    for (off, bytes) in &outcome.written {
        expected[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
    }
    let actual = ctx.volume_bytes();
    if actual != expected {
        let first = actual
            .chunks(BLOCK as usize)
            .zip(expected.chunks(BLOCK as usize))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(format!(
            "volume {} changed unexpectedly: first differing block at offset {} (sha256 now {}, expected {})",
            ctx.volume.display(),
            first as u64 * BLOCK,
            hex::encode(sha256_bytes(&actual)),
            hex::encode(sha256_bytes(&expected)),
        ));
    }
    Ok(())
}

#[test]
fn bad_input_gets_clear_errors_and_harms_nothing() {
    let t = TestDir::new("bad-input");
    let key_a = write_key(&t.key_path(DISK_A), 1);
    write_key(&t.key_path(DISK_B), 2);
    let wrong_key = write_key(&t.key_path("wrong"), 3);
    let cfg = GatewayConfig::new(t.data_dir())
        .limit("idle_timeout_secs", TIMEOUT_SECS)
        .limit("handshake_timeout_secs", TIMEOUT_SECS)
        .disk(DISK_A, SIZE_A, &t.key_path(DISK_A))
        .disk(DISK_B, SIZE_B, &t.key_path(DISK_B));
    let mut gw = Gateway::start(&cfg, &t.path("gateway.toml"), &t.path("gateway.log"));

    // the real agent on disk-b, throttled so that it runs through the cases
    let src_b = t.source_path(DISK_B);
    make_image(&src_b, SIZE_B, 0xb);
    let agent = AgentCmd::new(
        gw.addr,
        DISK_B,
        &t.key_path(DISK_B),
        &t.state_dir(DISK_B),
        &src_b,
    )
    .bandwidth("4M")
    .retry_timeout(20);
    let mut running = agent.spawn();

    let ctx = Ctx {
        addr: gw.addr,
        key: key_a,
        wrong_key,
        volume: gw.volume(DISK_A),
        data_dir: t.data_dir(),
    };
    let cases: &[(&str, Case)] = &[
        ("bad_preamble", case_bad_preamble),
        ("unsupported_version", case_unsupported_version),
        ("unknown_disk", case_unknown_disk),
        ("disk_size_mismatch", case_disk_size_mismatch),
        ("wrong_key", case_wrong_key),
        ("stall_mid_frame", case_stall_mid_frame),
        ("oversize_frame", case_oversize_frame),
        ("oversize_block", case_oversize_block),
        ("truncated_frame", case_truncated_frame),
        ("checksum_mismatch", case_checksum_mismatch),
        ("checksum_mismatch_lz4", case_checksum_mismatch_lz4),
        ("out_of_range", case_out_of_range),
        ("sequence_not_increasing", case_sequence_not_increasing),
        (
            "acked_then_sequence_regression",
            case_acked_then_sequence_regression,
        ),
        (
            "acked_then_checksum_mismatch",
            case_acked_then_checksum_mismatch,
        ),
        ("malformed", case_malformed),
        ("handshake_stall", case_handshake_stall),
    ];
    let mut failures = Vec::new();
    let mut overlapped = 0;
    for (name, case) in cases {
        let agent_running = running.is_running();
        overlapped += usize::from(agent_running);
        let started = Instant::now();
        let r = run_case(&ctx, &mut gw, *case);
        eprintln!(
            "case {name:<32} {:<4} {:>6.2} s  (agent on {DISK_B} running: {agent_running}){}",
            if r.is_ok() { "ok" } else { "FAIL" },
            started.elapsed().as_secs_f64(),
            r.as_ref()
                .err()
                .map(|e| format!("\n    {e}"))
                .unwrap_or_default()
        );
        if let Err(e) = r {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(gw.is_alive(), "the gateway died during the cases");

    let run = running.wait(Duration::from_secs(180));
    run.note("real agent on disk-b");
    let j = run.expect_verified();
    assert_eq!(j["disk_id"], DISK_B, "{}", run.describe());
    assert_same_file(&gw.volume(DISK_B), &src_b, "disk-b volume vs its source");
    assert!(
        overlapped >= 3,
        "the agent on {DISK_B} finished before the bad input ran (overlapped {overlapped} cases)"
    );

    assert!(
        failures.is_empty(),
        "{} of {} bad-input cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
    assert!(gw.is_alive(), "the gateway died");
}
