//! Shared helpers of the integration tests: a temp-dir layout, keys and configs, a gateway
//! process that is killed on drop (its log is printed when the test fails), agent runs with a
//! deadline, deterministic test images, and file comparisons.
//!
//! Everything here talks to 127.0.0.1 only.

#![allow(dead_code)] // each test binary uses a different subset

pub mod raw;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the heavier tests of one test binary one at a time (2-core machine).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_sync-gateway");
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_sync-agent");

pub const MIB: u64 = 1 << 20;
pub const BLOCK: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Temp dir

/// A test's private directory. Removed when the test passes, kept (and its path printed) when
/// it fails, so the logs and images can be inspected.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    pub root: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("sgw-{name}-"))
            .tempdir()
            .expect("create temp dir");
        let root = dir.path().to_path_buf();
        for sub in ["keys", "src", "agent-state", "data"] {
            std::fs::create_dir_all(root.join(sub)).expect("create test subdir");
        }
        TestDir {
            dir: Some(dir),
            root,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn key_path(&self, name: &str) -> PathBuf {
        self.root.join("keys").join(format!("{name}.key"))
    }

    pub fn source_path(&self, name: &str) -> PathBuf {
        self.root.join("src").join(format!("{name}.img"))
    }

    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.root.join("agent-state").join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                let p = d.keep();
                // Logs, configs and state are small; the images are not. Keep those only on
                // request, so that repeated failing runs do not fill /tmp.
                let keep_images = std::env::var_os("SGW_TEST_KEEP_IMAGES").is_some();
                if !keep_images {
                    remove_images(&p);
                }
                eprintln!(
                    "test failed: logs and state kept in {}{}",
                    p.display(),
                    if keep_images {
                        ""
                    } else {
                        " (images removed; set SGW_TEST_KEEP_IMAGES=1 to keep them)"
                    }
                );
            }
        }
    }
}

/// Deletes every `*.img` below `dir`.
fn remove_images(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => remove_images(&p),
            Ok(_) if p.extension().is_some_and(|x| x == "img") => {
                let _ = std::fs::remove_file(&p);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and configs

/// Writes a key file of 64 hex characters derived from `seed` and returns the key.
pub fn write_key(path: &Path, seed: u64) -> sync_gateway::protocol::auth::DiskKey {
    let mut rng = Rng::new(seed ^ 0x6b65_795f_7365_6564);
    let mut b = [0u8; 32];
    rng.fill(&mut b);
    let key = sync_gateway::protocol::auth::DiskKey::from_bytes(b);
    std::fs::write(path, format!("{}\n", key.to_hex())).expect("write key file");
    key
}

/// `sync-gateway keygen --out PATH`, then loads the key it wrote.
pub fn keygen(path: &Path) -> sync_gateway::protocol::auth::DiskKey {
    let out = Command::new(GATEWAY_BIN)
        .args(["keygen", "--out"])
        .arg(path)
        .output()
        .expect("run sync-gateway keygen");
    assert!(
        out.status.success(),
        "keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sync_gateway::protocol::auth::DiskKey::load(path).expect("keygen wrote a loadable key")
}

/// One `[[disks]]` entry.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub id: String,
    pub size: u64,
    pub key_file: PathBuf,
}

/// A gateway config file.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    /// `(key, raw TOML value)` lines of `[limits]`.
    pub limits: Vec<(String, String)>,
    /// `[backend] kind`: `local` unless set.
    pub backend_kind: String,
    /// `(key, raw TOML value)` lines of `[backend]` after `kind`.
    pub backend: Vec<(String, String)>,
    pub disks: Vec<DiskSpec>,
    /// Raw TOML appended at the end (further tables).
    pub extra: String,
}

impl GatewayConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        GatewayConfig {
            listen: "127.0.0.1:0".into(),
            data_dir,
            limits: Vec::new(),
            backend_kind: "local".into(),
            backend: Vec::new(),
            disks: Vec::new(),
            extra: String::new(),
        }
    }

    /// Appends raw TOML (whole tables) to the end of the file.
    pub fn extra_toml(mut self, text: &str) -> Self {
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }

    /// Sets `[backend] kind`.
    pub fn backend_kind(mut self, kind: &str) -> Self {
        self.backend_kind = kind.into();
        self
    }

    /// Adds `key = value` to the `[backend]` table.
    pub fn backend_option(mut self, key: &str, value: impl ToString) -> Self {
        self.backend.push((key.into(), value.to_string()));
        self
    }

    pub fn limit(mut self, key: &str, value: impl ToString) -> Self {
        self.limits.push((key.into(), value.to_string()));
        self
    }

    pub fn disk(mut self, id: &str, size: u64, key_file: &Path) -> Self {
        self.disks.push(DiskSpec {
            id: id.into(),
            size,
            key_file: key_file.to_path_buf(),
        });
        self
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let q = |p: &Path| toml_str(&p.display().to_string());
        let _ = writeln!(s, "listen = {}", toml_str(&self.listen));
        let _ = writeln!(s, "data_dir = {}", q(&self.data_dir));
        let _ = writeln!(s, "[backend]\nkind = {}", toml_str(&self.backend_kind));
        for (k, v) in &self.backend {
            let _ = writeln!(s, "{k} = {v}");
        }
        if !self.limits.is_empty() {
            s.push_str("[limits]\n");
            for (k, v) in &self.limits {
                let _ = writeln!(s, "{k} = {v}");
            }
        }
        for d in &self.disks {
            let _ = writeln!(
                s,
                "[[disks]]\nid = {}\nsize_bytes = {}\nkey_file = {}",
                toml_str(&d.id),
                d.size,
                q(&d.key_file)
            );
        }
        s.push_str(&self.extra);
        s
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_toml()).expect("write gateway config");
    }
}

fn toml_str(s: &str) -> String {
    // Basic TOML string: escape backslash and quote (paths in tests contain neither, but be safe).
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

// ---------------------------------------------------------------------------------------------
// Gateway process

/// A running `sync-gateway run`. Killed on drop; when the test is failing its log is printed.
#[derive(Debug)]
pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
}

/// Removes `SYNC_GATEWAY_*` variables so the caller's environment cannot change a test config.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("SYNC_GATEWAY_") || k.starts_with("SYNC_AGENT_") {
            cmd.env_remove(k);
        }
    }
}

impl Gateway {
    /// Writes `config` to `config_path`, starts the gateway with stderr in `log_path` and waits
    /// until `DATA_DIR/listen.addr` names the bound address.
    pub fn start(config: &GatewayConfig, config_path: &Path, log_path: &Path) -> Gateway {
        config.write(config_path);
        std::fs::create_dir_all(&config.data_dir).expect("create data dir");
        let addr_file = config.data_dir.join("listen.addr");
        match std::fs::remove_file(&addr_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot remove stale {}: {e}", addr_file.display()),
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .expect("open gateway log");
        let mut cmd = Command::new(GATEWAY_BIN);
        cmd.args(["run", "--config"])
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        clean_env(&mut cmd);
        let child = cmd.spawn().expect("spawn sync-gateway");
        let mut gw = Gateway {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            config_path: config_path.to_path_buf(),
            data_dir: config.data_dir.clone(),
            log_path: log_path.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Some(line) = text.strip_suffix('\n') {
                    gw.addr = line
                        .trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("listen.addr holds {text:?}: {e}"));
                    assert!(gw.addr.ip().is_loopback(), "gateway bound {}", gw.addr);
                    return gw;
                }
            }
            if let Some(status) = gw.try_status() {
                panic!(
                    "sync-gateway exited with {status} before listening\n{}",
                    gw.log_tail(60)
                );
            }
            assert!(
                Instant::now() < deadline,
                "sync-gateway wrote no listen.addr within 30 s\n{}",
                gw.log_tail(60)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait on gateway"),
            None => None,
        }
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `within` for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("gateway is running");
        terminate_child(&mut c, within).unwrap_or_else(|| {
            panic!(
                "gateway did not exit within {within:?} of SIGTERM\n{}",
                self.log_tail(60)
            )
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- gateway log {} (last {} lines) ---\n{}\n--- end of gateway log ---",
            self.log_path.display(),
            all.len() - from,
            all[from..].join("\n")
        )
    }

    pub fn volume(&self, disk: &str) -> PathBuf {
        volume_path(&self.data_dir, disk)
    }

    pub fn durable_seq(&self, disk: &str) -> u64 {
        durable_seq(&self.data_dir, disk)
    }

    pub fn snapshots(&self, disk: Option<&str>) -> Vec<Snapshot> {
        list_snapshots(&self.config_path, disk)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(150));
        }
    }
}

pub fn volume_path(data_dir: &Path, disk: &str) -> PathBuf {
    data_dir.join("disks").join(format!("{disk}.img"))
}

pub fn snapshot_image(data_dir: &Path, disk: &str, snapshot_id: &str) -> PathBuf {
    data_dir
        .join("snapshots")
        .join(disk)
        .join(format!("{snapshot_id}.img"))
}

/// The durable point the gateway persisted for `disk` (all zero before the first sync).
pub fn durable_point(data_dir: &Path, disk: &str) -> sync_gateway::durable::DurablePoint {
    let p = data_dir.join("state").join(format!("{disk}.seq"));
    if !p.exists() {
        return Default::default();
    }
    sync_gateway::durable::SeqRecord::open(&p)
        .map(|r| r.get())
        .unwrap_or_default()
}

/// The durable seq the gateway persisted for `disk` (0 before the first sync).
pub fn durable_seq(data_dir: &Path, disk: &str) -> u64 {
    durable_point(data_dir, disk).seq
}

/// One entry of `sync-gateway snapshots --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub disk_id: String,
    pub label: String,
    pub checkpoint_seq: u64,
    pub created_unix_ms: u64,
    pub created: String,
    pub size_bytes: u64,
    pub method: String,
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `pending` while a copy-before-write snapshot is still being filled.
    #[serde(default)]
    pub state: String,
}

/// Runs `sync-gateway snapshots --config FILE [--disk ID] --json`.
pub fn list_snapshots(config: &Path, disk: Option<&str>) -> Vec<Snapshot> {
    let mut cmd = Command::new(GATEWAY_BIN);
    cmd.args(["snapshots", "--config"])
        .arg(config)
        .arg("--json");
    if let Some(d) = disk {
        cmd.args(["--disk", d]);
    }
    clean_env(&mut cmd);
    let out = cmd.output().expect("run sync-gateway snapshots");
    assert!(
        out.status.success(),
        "snapshots --json failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "snapshots --json printed no JSON array ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Agent process

/// The arguments of one `sync-agent replicate`.
#[derive(Debug, Clone)]
pub struct AgentCmd {
    pub gateway: String,
    pub disk_id: String,
    pub key_file: PathBuf,
    pub state_dir: PathBuf,
    pub source: PathBuf,
    pub verify: bool,
    pub full: bool,
    pub bandwidth_limit: Option<String>,
    pub retry_timeout: Option<u64>,
}

impl AgentCmd {
    pub fn new(
        gateway: impl ToString,
        disk_id: &str,
        key_file: &Path,
        state_dir: &Path,
        source: &Path,
    ) -> Self {
        AgentCmd {
            gateway: gateway.to_string(),
            disk_id: disk_id.into(),
            key_file: key_file.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            source: source.to_path_buf(),
            verify: true,
            full: false,
            bandwidth_limit: None,
            retry_timeout: None,
        }
    }

    pub fn bandwidth(mut self, rate: &str) -> Self {
        self.bandwidth_limit = Some(rate.into());
        self
    }

    pub fn retry_timeout(mut self, secs: u64) -> Self {
        self.retry_timeout = Some(secs);
        self
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(AGENT_BIN);
        cmd.arg("replicate")
            .args(["--gateway", &self.gateway, "--disk-id", &self.disk_id])
            .arg("--key-file")
            .arg(&self.key_file)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--json");
        if self.verify {
            cmd.arg("--verify");
        }
        if self.full {
            cmd.arg("--full");
        }
        if let Some(r) = &self.bandwidth_limit {
            cmd.args(["--bandwidth-limit", r]);
        }
        if let Some(t) = self.retry_timeout {
            cmd.args(["--retry-timeout", &t.to_string()]);
        }
        cmd.arg(&self.source);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        clean_env(&mut cmd);
        cmd
    }

    pub fn spawn(&self) -> RunningAgent {
        let child = self.command().spawn().expect("spawn sync-agent");
        RunningAgent::new(child, format!("{self:?}"))
    }

    /// Runs to completion; panics (killing the agent) when it takes longer than `deadline`.
    pub fn run(&self, deadline: Duration) -> AgentRun {
        self.spawn().wait(deadline)
    }
}

/// A spawned agent whose output is collected by reader threads (so a full pipe never blocks it).
#[derive(Debug)]
pub struct RunningAgent {
    child: Option<Child>,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
    pub what: String,
    pub started: Instant,
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> Option<std::thread::JoinHandle<String>> {
    r.map(|mut r| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    })
}

impl RunningAgent {
    fn new(mut child: Child, what: String) -> Self {
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        RunningAgent {
            child: Some(child),
            out,
            err,
            what,
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait on agent").is_none(),
            None => false,
        }
    }

    /// SIGKILL; returns what it printed so far.
    pub fn kill9(mut self) -> AgentRun {
        let mut c = self.child.take().expect("agent running");
        let _ = c.kill();
        let status = c.wait().expect("reap agent");
        self.collect(status)
    }

    fn collect(&mut self, status: ExitStatus) -> AgentRun {
        let stdout = self
            .out
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let stderr = self
            .err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let json = serde_json::from_str(stdout.trim()).ok();
        AgentRun {
            status,
            stdout,
            stderr,
            json,
            elapsed: self.started.elapsed(),
            what: self.what.clone(),
        }
    }

    /// Waits for the exit; kills it and panics with its output after `deadline`.
    pub fn wait(mut self, deadline: Duration) -> AgentRun {
        let end = self.started + deadline;
        let mut c = self.child.take().expect("agent running");
        loop {
            if let Some(status) = c.try_wait().expect("try_wait on agent") {
                return self.collect(status);
            }
            if Instant::now() >= end {
                let _ = c.kill();
                let status = c.wait().expect("reap agent");
                let run = self.collect(status);
                panic!(
                    "sync-agent did not finish within {deadline:?}; killed it\n{}",
                    run.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The outcome of one agent run.
#[derive(Debug)]
pub struct AgentRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// stdout parsed as one JSON object (with `--json`).
    pub json: Option<serde_json::Value>,
    pub elapsed: Duration,
    pub what: String,
}

impl AgentRun {
    pub fn describe(&self) -> String {
        format!(
            "agent {}\n  exit: {} after {:.2} s\n  stdout: {}\n  stderr (last 40 lines):\n{}",
            self.what,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout.trim(),
            tail(&self.stderr, 40)
        )
    }

    /// Prints a one-line summary (shown with `--nocapture` and on failure).
    pub fn note(&self, label: &str) {
        eprintln!(
            "[{label}] agent exit {} after {:.2} s: {}",
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout.trim()
        );
    }

    /// Asserts exit 0 and a JSON report; returns the report.
    pub fn expect_ok(&self) -> &serde_json::Value {
        assert!(self.status.success(), "agent failed\n{}", self.describe());
        self.json
            .as_ref()
            .unwrap_or_else(|| panic!("agent printed no JSON object\n{}", self.describe()))
    }

    /// Asserts exit 0, `verified == true`, and returns the report.
    pub fn expect_verified(&self) -> &serde_json::Value {
        let j = self.expect_ok();
        assert_eq!(
            j["verified"],
            serde_json::Value::Bool(true),
            "agent did not report verified=true\n{}",
            self.describe()
        );
        j
    }

    pub fn u64(&self, key: &str) -> u64 {
        let j = self.expect_ok();
        j[key].as_u64().unwrap_or_else(|| {
            panic!(
                "JSON field {key} is not a number: {}\n{}",
                j[key],
                self.describe()
            )
        })
    }

    pub fn str(&self, key: &str) -> String {
        let j = self.expect_ok();
        j[key]
            .as_str()
            .unwrap_or_else(|| {
                panic!(
                    "JSON field {key} is not a string: {}\n{}",
                    j[key],
                    self.describe()
                )
            })
            .to_string()
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Deterministic content

/// xorshift64*: tiny, seeded, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix the seed so that nearby seeds give unrelated streams; never zero
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "gateway",
    "writes",
    "each",
    "block",
    "to",
    "its",
    "volume",
    "and",
    "acks",
    "only",
    "what",
    "is",
    "durable",
    "snapshot",
    "checkpoint",
    "agent",
    "replicates",
    "a",
    "disk",
    "over",
    "loopback",
    "sequence",
    "number",
    "offset",
    "length",
    "digest",
    "sha256",
    "lz4",
    "compressed",
    "zero",
    "region",
    "resume",
    "after",
    "restart",
    "without",
    "rescan",
    "log:",
    "INFO",
    "WARN",
    "2024-05-01T12:00:00Z",
    "GET",
    "/var/lib/data",
    "user=admin",
    "ok",
    "200",
    "{\"id\":",
    "42,",
    "\"name\":",
    "\"srv\"}",
    "#include",
    "<stdio.h>",
    "int",
    "main(void)",
    "return",
    "0;",
    "=",
    "+",
    "if",
    "else",
    "for",
    "while",
    "\n",
    "\n\n",
];

/// Fills `buf` with text-like, well-compressible bytes.
pub fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        for &b in w.iter().chain(b" ") {
            if i == buf.len() {
                break;
            }
            buf[i] = b;
            i += 1;
        }
    }
}

/// Region granularity of test images.
pub const REGION: usize = 256 << 10;

/// Writes a deterministic test image of `size` bytes (a multiple of 4 KiB): 256 KiB regions of
/// text-like data (~35 %), zeros (~25 %) and random bytes (~40 %), the first region always
/// random and the last always text so that both ends carry data. Returns its SHA-256 (hex).
pub fn make_image(path: &Path, size: u64, seed: u64) -> String {
    assert_eq!(size % BLOCK, 0, "test images are whole blocks");
    let mut rng = Rng::new(seed);
    let mut f = File::create(path).expect("create source image");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; REGION];
    let regions = (size as usize).div_ceil(REGION);
    for r in 0..regions {
        let len = REGION.min(size as usize - r * REGION);
        let b = &mut buf[..len];
        let kind = if r == 0 {
            2
        } else if r == regions - 1 {
            0
        } else {
            match rng.below(100) {
                0..=34 => 0,
                35..=59 => 1,
                _ => 2,
            }
        };
        match kind {
            0 => fill_text(&mut rng, b),
            1 => b.fill(0),
            _ => rng.fill(b),
        }
        // a few isolated zero and text blocks inside data regions, so runs are mixed too
        if kind == 2 && len >= 16 * BLOCK as usize {
            let z = rng.below((len / BLOCK as usize) as u64) as usize * BLOCK as usize;
            b[z..z + BLOCK as usize].fill(0);
        }
        f.write_all(b).expect("write source image");
        h.update(&*b);
    }
    f.sync_all().expect("sync source image");
    hex::encode(h.finalize())
}

/// Overwrites `fraction_pct` percent of the 4 KiB blocks (at least one), chosen at random and
/// distinct, with random bytes. Returns the changed block indexes, sorted.
pub fn apply_scattered_changes(path: &Path, fraction_pct: u64, seed: u64) -> Vec<u64> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open source for changes");
    let size = f.metadata().expect("stat source").len();
    let blocks = size / BLOCK;
    let n = (blocks * fraction_pct / 100).max(1);
    let mut rng = Rng::new(seed ^ 0x0c4a_76e5);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < n {
        chosen.insert(rng.below(blocks));
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for &b in &chosen {
        rng.fill(&mut buf);
        f.write_all_at(&buf, b * BLOCK).expect("write change");
    }
    f.sync_all().expect("sync source");
    chosen.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Files

pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for sha256");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

pub fn sha256_bytes(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// `None` when the files are equal, else a description of the first difference.
pub fn first_difference(a: &Path, b: &Path) -> Option<String> {
    compare_files(a, b, None)
}

/// Like [`first_difference`], over the first `len` bytes only.
pub fn first_difference_in_prefix(a: &Path, b: &Path, len: u64) -> Option<String> {
    compare_files(a, b, Some(len))
}

fn compare_files(a: &Path, b: &Path, prefix: Option<u64>) -> Option<String> {
    let mut fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let mut fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let (la, lb) = (
        fa.metadata().expect("stat").len(),
        fb.metadata().expect("stat").len(),
    );
    if la != lb {
        return Some(format!(
            "{} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        ));
    }
    let len = prefix.map_or(la, |p| p.min(la));
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut first: Option<u64> = None;
    let mut differing_blocks = 0u64;
    while off < len {
        let n = (len - off).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n]
                .chunks(BLOCK as usize)
                .zip(bb[..n].chunks(BLOCK as usize))
                .enumerate()
            {
                if x != y {
                    differing_blocks += 1;
                    first.get_or_insert(off + i as u64 * BLOCK);
                }
            }
        }
        off += n as u64;
    }
    first.map(|f| {
        format!(
            "{} and {} differ in {differing_blocks} 4 KiB block(s) of the first {len} bytes, the first at offset {f}",
            a.display(),
            b.display()
        )
    })
}

#[track_caller]
/// SIGTERM to `child`, then its exit status within `within`; `None` (after a SIGKILL) when it
/// ignored the signal.
pub fn terminate_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill -TERM");
    assert!(ok.success(), "kill -TERM failed");
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn assert_same_file(actual: &Path, expected: &Path, what: &str) {
    if let Some(d) = first_difference(actual, expected) {
        panic!("{what}: {d}");
    }
}

/// Polls `f` every 10 ms until it returns `Some`, or panics with `what` after `within`.
#[track_caller]
pub fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The venv's Python (`scripts/test` installs moto, boto3 and the Alibaba SDKs there), else
/// python3 on PATH.
pub fn venv_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python3");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// A source image whose MBR has an EFI system partition (type 0xEF): a UEFI boot disk.
pub fn make_uefi_image(path: &Path, size: u64, seed: u64) {
    make_image(path, size, seed);
    mark_uefi(path);
}

/// [`apply_scattered_changes`] to a UEFI boot disk, whose MBR is written again after (a
/// change may hit sector 0).
pub fn change_uefi_image(path: &Path, fraction_pct: u64, seed: u64) {
    apply_scattered_changes(path, fraction_pct, seed);
    mark_uefi(path);
}

fn mark_uefi(path: &Path) {
    let mut head = vec![0u8; 512];
    head[446 + 4] = 0xef;
    head[510] = 0x55;
    head[511] = 0xaa;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.write_all_at(&head, 0).expect("write the MBR");
}

/// Every member of a `.tar.gz`: (path, bytes).
pub fn unpack_tar_gz(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    ar.entries()
        .expect("a tar.gz")
        .map(|e| {
            let mut e = e.expect("a tar member");
            let name = e
                .path()
                .expect("a member path")
                .to_string_lossy()
                .into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("a member's bytes");
            (name, data)
        })
        .collect()
}

/// Whether `hay` holds `needle`, ignoring ASCII case.
pub fn contains_ci(hay: &[u8], needle: &str) -> bool {
    let hay = String::from_utf8_lossy(hay).to_ascii_lowercase();
    hay.contains(&needle.to_ascii_lowercase())
}

/// The device (a cloud disk rounded up to GiB) starts with the source's bytes.
pub fn assert_device_holds(device: &Path, src: &Path, what: &str) {
    let want = std::fs::read(src).expect("read the source");
    let f = File::open(device).expect("open the device");
    let mut got = vec![0u8; want.len()];
    f.read_exact_at(&mut got, 0).expect("read the device");
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "{what}: {} differs from {} at byte {at}",
            device.display(),
            src.display()
        );
    }
}

/// The actions a cloud policy file of the repository allows (`aws/iam-policy.json`,
/// `aliyun/ram-policy.json`; every statement must allow), after checking that README.md shows
/// the same policy in a json block (the one whose `Version` is `version`).
pub fn policy_actions(file: &str, version: &str) -> std::collections::BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join(file)).expect("read the policy");
    let policy: serde_json::Value = serde_json::from_str(&text).expect("policy JSON");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("read README.md");
    let shown = readme
        .split("```json\n")
        .filter_map(|part| part.split("\n```").next())
        .filter_map(|block| serde_json::from_str::<serde_json::Value>(block).ok())
        .find(|v| v.get("Statement").is_some() && v["Version"] == version)
        .unwrap_or_else(|| panic!("README.md shows {file} in a json block"));
    assert_eq!(shown, policy, "README.md's copy differs from {file}");
    let mut out = std::collections::BTreeSet::new();
    for st in policy["Statement"].as_array().expect("Statement list") {
        assert_eq!(st["Effect"], "Allow", "{st}");
        match &st["Action"] {
            serde_json::Value::String(a) => {
                out.insert(a.clone());
            }
            serde_json::Value::Array(v) => {
                out.extend(v.iter().filter_map(|a| a.as_str()).map(str::to_string));
            }
            other => panic!("Action {other}"),
        }
    }
    out
}

/// One line per step of an end-to-end test (the `scripts/e2e-*` scripts show them).
pub fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Tag `key` of a resource as the cloud views (tests/*_view.py) print them.
pub fn tag<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v["tags"][key].as_str()
}
