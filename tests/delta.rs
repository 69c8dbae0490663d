//! Delta resync against the real binaries: a lost agent state costs hashes, not a full resend,
//! and `--rescan` repairs a gateway copy damaged behind the agent's back.
//!
//! Self-contained on purpose (small helpers below): a gateway process killed on drop, agent runs
//! with a deadline, deterministic images. Everything talks to 127.0.0.1 only.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_sync-gateway");
const AGENT_BIN: &str = env!("CARGO_BIN_EXE_sync-agent");
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const DISK: &str = "disk-1";
const AGENT_DEADLINE: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Helpers

/// A test's directory, kept (path printed) when the test fails.
struct Dir {
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
}

impl Dir {
    fn new(name: &str) -> Dir {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("sgw-delta-{name}-"))
            .tempdir()
            .expect("temp dir");
        let root = tmp.path().to_path_buf();
        Dir {
            tmp: Some(tmp),
            root,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(t) = self.tmp.take() {
                eprintln!("test failed: files kept in {}", t.keep().display());
            }
        }
    }
}

/// Child processes get a clean environment for our variables.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("SYNC_GATEWAY_") || k.starts_with("SYNC_AGENT_") {
            cmd.env_remove(k);
        }
    }
}

/// A running `sync-gateway run`, killed on drop (its log tail printed when a test fails).
struct Gateway {
    child: Option<Child>,
    addr: String,
    log: PathBuf,
}

impl Gateway {
    /// Writes the config (listen on a free port, local backend, one disk) and starts the gateway.
    fn start(dir: &Dir, size: u64) -> Gateway {
        let data = dir.path("data");
        let config = dir.path("gateway.toml");
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[backend]\nkind = \"local\"\n\
                 [[disks]]\nid = \"{DISK}\"\nsize_bytes = {size}\nkey_file = \"{}\"\n",
                data.display(),
                dir.path("disk.key").display()
            ),
        )
        .expect("write config");
        let addr_file = data.join("listen.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log_path = dir.path("gateway.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("gateway log");
        let mut cmd = Command::new(GATEWAY_BIN);
        cmd.args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        clean_env(&mut cmd);
        let mut gw = Gateway {
            child: Some(cmd.spawn().expect("spawn sync-gateway")),
            addr: String::new(),
            log: log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = std::fs::read_to_string(&addr_file)
                .ok()
                .and_then(|t| t.strip_suffix('\n').map(|l| l.trim().to_string()))
            {
                gw.addr = line;
                return gw;
            }
            if let Some(c) = gw.child.as_mut() {
                if let Some(status) = c.try_wait().expect("try_wait") {
                    panic!("gateway exited with {status}\n{}", gw.log_tail());
                }
            }
            assert!(
                Instant::now() < deadline,
                "no listen.addr within 30 s\n{}",
                gw.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (the gateway drains and exits), SIGKILL after 30 s.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.try_wait().expect("try_wait").is_none() {
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("gateway ignored SIGTERM\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- gateway log ---\n{}\n--- end ---",
            lines[lines.len().saturating_sub(60)..].join("\n")
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// One finished agent run.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    json: serde_json::Value,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit {}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }

    /// Exit 0 and `verified == true`.
    fn expect_verified(&self) -> &Self {
        assert!(self.status.success(), "agent failed\n{}", self.describe());
        assert_eq!(
            self.json["verified"],
            serde_json::Value::Bool(true),
            "{}",
            self.describe()
        );
        self
    }

    fn u64(&self, key: &str) -> u64 {
        self.json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} is not a number\n{}", self.describe()))
    }

    fn mode(&self) -> &str {
        self.json["mode"].as_str().unwrap_or("?")
    }
}

/// `sync-agent replicate --json --verify [extra] SOURCE`.
fn agent_cmd(dir: &Dir, gw: &Gateway, extra: &[&str]) -> Command {
    let mut cmd = Command::new(AGENT_BIN);
    cmd.arg("replicate")
        .args(["--gateway", &gw.addr, "--disk-id", DISK])
        .arg("--key-file")
        .arg(dir.path("disk.key"))
        .arg("--state-dir")
        .arg(dir.path("agent-state"))
        .args(["--json", "--verify", "--retry-timeout", "30"])
        .args(extra)
        .arg(dir.path("source.img"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    clean_env(&mut cmd);
    cmd
}

/// Runs the agent to its end; kills it and fails after the deadline.
fn agent(dir: &Dir, gw: &Gateway, extra: &[&str]) -> Run {
    let mut child = agent_cmd(dir, gw, extra).spawn().expect("spawn sync-agent");
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let out = std::thread::spawn(move || std::io::read_to_string(&mut out).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(&mut err).unwrap_or_default());
    let deadline = Instant::now() + AGENT_DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait on agent") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agent ran longer than {AGENT_DEADLINE:?}; killed\n{}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    let run = Run {
        status,
        stdout,
        stderr,
        json,
    };
    eprintln!("[agent {extra:?}] {}", run.stdout.trim());
    run
}

fn keygen(path: &Path) {
    let out = Command::new(GATEWAY_BIN)
        .args(["keygen", "--out"])
        .arg(path)
        .output()
        .expect("run keygen");
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// xorshift64*, seeded.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A mixed image: 256 KiB regions of text-like data, zeros and random bytes.
fn make_image(path: &Path, size: u64, seed: u64) {
    const WORDS: &[&[u8]] = &[
        b"gateway ",
        b"block ",
        b"durable ",
        b"snapshot ",
        b"delta ",
        b"hash ",
        b"0;\n",
        b"INFO ",
        b"/var/lib ",
        b"checkpoint ",
    ];
    let mut rng = Rng::new(seed);
    let mut f = File::create(path).expect("create image");
    let mut buf = vec![0u8; 256 << 10];
    for _ in 0..size / buf.len() as u64 {
        match rng.below(10) {
            0..=3 => {
                let mut i = 0;
                while i < buf.len() {
                    let w = WORDS[rng.below(WORDS.len() as u64) as usize];
                    let n = w.len().min(buf.len() - i);
                    buf[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            4..=5 => buf.fill(0),
            _ => rng.fill(&mut buf),
        }
        f.write_all(&buf).expect("write image");
    }
    f.sync_all().expect("sync image");
}

/// Overwrites `n` distinct random 4 KiB blocks of `path` with random bytes, among the blocks
/// that `eligible` accepts (given their current content). Returns their indexes.
fn scribble(path: &Path, n: usize, seed: u64, eligible: impl Fn(&[u8]) -> bool) -> Vec<u64> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for changes");
    let blocks = f.metadata().expect("stat").len() / BLOCK;
    let mut rng = Rng::new(seed);
    let mut chosen = std::collections::BTreeSet::new();
    let mut buf = vec![0u8; BLOCK as usize];
    while chosen.len() < n {
        let b = rng.below(blocks);
        f.read_exact_at(&mut buf, b * BLOCK).expect("read block");
        if chosen.contains(&b) || !eligible(&buf) {
            continue;
        }
        rng.fill(&mut buf);
        f.write_all_at(&buf, b * BLOCK).expect("write block");
        chosen.insert(b);
    }
    f.sync_all().expect("sync");
    chosen.into_iter().collect()
}

/// 4 KiB blocks that differ between two files of the same size.
fn differing_blocks(a: &Path, b: &Path) -> Vec<u64> {
    let (x, y) = (
        std::fs::read(a).expect("read a"),
        std::fs::read(b).expect("read b"),
    );
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} sizes",
        a.display(),
        b.display()
    );
    x.chunks(BLOCK as usize)
        .zip(y.chunks(BLOCK as usize))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .map(|(i, _)| i as u64)
        .collect()
}

fn volume(dir: &Dir) -> PathBuf {
    dir.path("data").join("disks").join(format!("{DISK}.img"))
}

/// The gateway's persisted durable point of the disk (zero before its first write).
fn durable_point(dir: &Dir) -> sync_gateway::durable::DurablePoint {
    let p = dir.path("data").join("state").join(format!("{DISK}.seq"));
    if !p.exists() {
        return Default::default();
    }
    sync_gateway::durable::SeqRecord::open(&p)
        .map(|r| r.get())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// 1. Lost agent state: a delta pass sends only what differs

#[test]
fn lost_state_costs_hashes_not_a_full_resend() {
    let dir = Dir::new("lost-state");
    let size = 32 * MIB;
    let blocks = size / BLOCK;
    make_image(&dir.path("source.img"), size, 7);
    keygen(&dir.path("disk.key"));
    let gw = Gateway::start(&dir, size);

    let full = agent(&dir, &gw, &[]);
    full.expect_verified();
    assert_eq!(full.mode(), "full", "{}", full.describe());
    assert_eq!(full.u64("blocks_matched"), 0);
    let full_wire = full.u64("bytes_sent_wire");

    std::fs::remove_dir_all(dir.path("agent-state")).expect("delete agent state");
    let changed = scribble(&dir.path("source.img"), (blocks / 100) as usize, 11, |_| {
        true
    });
    let n = changed.len() as u64;
    let changed_bytes = n * BLOCK;

    let delta = agent(&dir, &gw, &[]);
    delta.expect_verified();
    let d = delta.describe();
    assert_eq!(delta.mode(), "delta", "{d}");
    assert_eq!(
        differing_blocks(&volume(&dir), &dir.path("source.img")),
        Vec::<u64>::new(),
        "volume differs from the source after the delta pass"
    );
    // random bytes over random blocks: every changed block is data, nothing else travels
    assert_eq!(delta.u64("blocks_sent"), n, "{d}");
    assert_eq!(delta.u64("blocks_zero"), 0, "{d}");
    assert_eq!(delta.u64("blocks_matched"), blocks - n, "{d}");
    assert_eq!(delta.u64("bytes_changed"), changed_bytes, "{d}");
    assert_eq!(delta.u64("bytes_scanned"), size, "{d}");
    // Wire: the changed blocks (incompressible) with their frame headers, plus the queries: one
    // SHA-256 per 64 KiB of disk, and at most one 4 KiB refinement query (16 hashes) per
    // changed block, plus handshake and checkpoint.
    let wire = delta.u64("bytes_sent_wire");
    let coarse = size / (64 << 10) * 32 + 2 * 21;
    let refine = n * (21 + 16 * 32);
    let bound = changed_bytes * 12 / 10 + coarse + refine + 4096;
    eprintln!(
        "full pass {full_wire} wire bytes; delta pass {wire} wire bytes for {n} changed blocks \
         ({changed_bytes} bytes); bound {bound}"
    );
    assert!(wire <= bound, "delta wire {wire} > bound {bound}\n{d}");
    assert!(
        wire <= size / 20,
        "delta wire {wire} above 5% of the disk\n{d}"
    );
    assert!(
        wire * 10 < full_wire,
        "delta wire {wire} not far below the full pass's {full_wire}\n{d}"
    );

    // the state is back: an ordinary incremental run with nothing to send
    let again = agent(&dir, &gw, &[]);
    again.expect_verified();
    let d = again.describe();
    assert_eq!(again.mode(), "incremental", "{d}");
    assert_eq!(again.u64("bytes_changed"), 0, "{d}");
    assert_eq!(again.u64("frames_sent"), 1, "{d}");
    assert!(again.u64("bytes_sent_wire") < 1024, "{d}");
}

// ---------------------------------------------------------------------------------------------
// 2. --rescan repairs damage an incremental pass cannot see

#[test]
fn rescan_repairs_a_volume_damaged_behind_the_agents_back() {
    let dir = Dir::new("rescan");
    let size = 16 * MIB;
    let blocks = size / BLOCK;
    make_image(&dir.path("source.img"), size, 21);
    keygen(&dir.path("disk.key"));
    let mut gw = Gateway::start(&dir, size);
    let full = agent(&dir, &gw, &[]);
    full.expect_verified();
    assert_eq!(full.mode(), "full", "{}", full.describe());

    // damage data blocks of the volume while the gateway is down
    gw.stop();
    let src = std::fs::read(dir.path("source.img")).expect("read source");
    let damaged = scribble(&volume(&dir), 5, 33, |b| b.iter().any(|&x| x != 0));
    assert!(
        damaged
            .iter()
            .all(|&b| src[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]
                .iter()
                .any(|&x| x != 0)),
        "damaged blocks are data in the source"
    );
    let gw = Gateway::start(&dir, size);

    // an incremental pass trusts its block map: nothing to send, and the check fails
    let incr = agent(&dir, &gw, &[]);
    let d = incr.describe();
    assert!(!incr.status.success(), "verify should fail\n{d}");
    assert_eq!(incr.mode(), "incremental", "{d}");
    assert_eq!(incr.json["verified"], serde_json::Value::Bool(false), "{d}");
    assert_eq!(incr.u64("bytes_changed"), 0, "{d}");
    assert_eq!(
        differing_blocks(&volume(&dir), &dir.path("source.img")),
        damaged
    );

    // --rescan compares every block with the gateway's and repairs exactly the damage
    let rescan = agent(&dir, &gw, &["--rescan"]);
    rescan.expect_verified();
    let d = rescan.describe();
    assert_eq!(rescan.mode(), "delta", "{d}");
    assert_eq!(rescan.u64("blocks_sent"), damaged.len() as u64, "{d}");
    assert_eq!(rescan.u64("blocks_zero"), 0, "{d}");
    assert_eq!(
        rescan.u64("blocks_matched"),
        blocks - damaged.len() as u64,
        "{d}"
    );
    assert_eq!(
        differing_blocks(&volume(&dir), &dir.path("source.img")),
        Vec::<u64>::new(),
        "volume differs from the source after --rescan"
    );

    // and the next ordinary run is incremental again, with nothing to send
    let after = agent(&dir, &gw, &[]);
    after.expect_verified();
    assert_eq!(after.mode(), "incremental", "{}", after.describe());
    assert_eq!(after.u64("bytes_changed"), 0, "{}", after.describe());

    // --full and --rescan exclude each other (a usage error, nothing sent)
    let both = agent(&dir, &gw, &["--full", "--rescan"]);
    assert_eq!(both.status.code(), Some(2), "{}", both.describe());
}

// ---------------------------------------------------------------------------------------------
// 3. kill -9 of the agent mid-delta-pass: the rerun starts the delta pass over, cheaply

#[test]
fn agent_killed_mid_delta_pass_starts_it_over() {
    let dir = Dir::new("delta-kill");
    let size = 16 * MIB;
    let blocks = size / BLOCK;
    make_image(&dir.path("source.img"), size, 41);
    keygen(&dir.path("disk.key"));
    let gw = Gateway::start(&dir, size);
    let full = agent(&dir, &gw, &[]);
    full.expect_verified();
    let full_ckpt = full.u64("checkpoint_seq");

    // lose the state, change a quarter of the blocks (4 MiB), replicate at 1 MiB/s
    std::fs::remove_dir_all(dir.path("agent-state")).expect("delete agent state");
    let changed = scribble(&dir.path("source.img"), (blocks / 4) as usize, 43, |_| true);
    let mut slow = agent_cmd(&dir, &gw, &["--bandwidth-limit", "1M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sync-agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    while durable_point(&dir).seq <= full_ckpt {
        assert!(
            slow.try_wait().expect("try_wait").is_none(),
            "the delta pass ended before it could be killed"
        );
        assert!(
            Instant::now() < deadline,
            "no durable write of the delta pass within 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    slow.kill().expect("kill -9 the agent");
    slow.wait().expect("reap the agent");
    let landed = durable_point(&dir);
    let state = std::fs::read_to_string(dir.path("agent-state").join(DISK).join("state.json"))
        .expect("agent state");
    assert!(state.contains("\"kind\": \"delta\""), "{state}");
    eprintln!(
        "agent killed at durable seq {} (resume offset {})",
        landed.seq, landed.resume_offset
    );

    let rerun = agent(&dir, &gw, &[]);
    rerun.expect_verified();
    let d = rerun.describe();
    assert_eq!(rerun.mode(), "delta", "{d}");
    assert!(rerun.json["resumed_from_seq"].is_null(), "{d}");
    assert_eq!(
        differing_blocks(&volume(&dir), &dir.path("source.img")),
        Vec::<u64>::new(),
        "volume differs from the source after the rerun"
    );
    // what landed before the kill is not sent again
    let sent = rerun.u64("blocks_sent");
    assert!(
        sent < changed.len() as u64,
        "the rerun sent all {} changed blocks again\n{d}",
        changed.len()
    );
    assert_eq!(sent + rerun.u64("blocks_matched"), blocks, "{d}");

    let after = agent(&dir, &gw, &[]);
    after.expect_verified();
    assert_eq!(after.mode(), "incremental", "{}", after.describe());
    assert_eq!(after.u64("bytes_changed"), 0, "{}", after.describe());
}
