//! A `sync-control serve` process for tests: started on 127.0.0.1:0 in a state dir, killed on
//! drop (its log is printed when the test fails), with a blocking HTTP client and a runner for
//! the `sync-control` command line. Self-contained (std, tempfile, serde_json), so any test can
//! include it with `#[path = "common/control.rs"] mod control;`.
//!
//! ```ignore
//! let cp = ControlPlane::start();
//! let token = cp.cli_ok(&["gateway", "bootstrap-token"]);
//! let (gw, credential) = cp.register_gateway("host-1");
//! let r = cp.operator("GET", "/v1/status", None);
//! assert_eq!(r.status, 200);
//! ```

#![allow(dead_code)] // each test binary uses a different subset

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const CONTROL_BIN: &str = env!("CARGO_BIN_EXE_sync-control");

/// A running `sync-control serve`.
#[derive(Debug)]
pub struct ControlPlane {
    child: Option<Child>,
    /// Kept alive for the state dir's life when the helper made it.
    dir: Option<tempfile::TempDir>,
    pub state_dir: PathBuf,
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The operator token (STATE_DIR/operator.token).
    pub token: String,
    pub log_path: PathBuf,
    args: Vec<String>,
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): HTTP {} {}", self.status, self.body))
    }

    /// The `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code: HTTP {} {}", self.status, self.body))
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a CLI run gave.
#[derive(Debug)]
pub struct CliRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    pub fn describe(&self) -> String {
        format!(
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

impl ControlPlane {
    /// Starts in a new temp state dir with default settings.
    pub fn start() -> ControlPlane {
        Self::start_with(&[])
    }

    /// Starts in a new temp state dir; `args` are extra `serve` options
    /// (e.g. `["--redeliver-after-secs", "2"]`).
    pub fn start_with(args: &[&str]) -> ControlPlane {
        let dir = tempfile::Builder::new()
            .prefix("sync-control-")
            .tempdir()
            .expect("create state dir");
        let state_dir = dir.path().join("state");
        let mut cp = Self::start_in(&state_dir, args);
        cp.dir = Some(dir);
        cp
    }

    /// Starts with `state_dir` (created when missing); the log goes next to it.
    pub fn start_in(state_dir: &Path, args: &[&str]) -> ControlPlane {
        let log_path = state_dir.with_extension("log");
        let mut cp = ControlPlane {
            child: None,
            dir: None,
            state_dir: state_dir.to_path_buf(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            url: String::new(),
            token: String::new(),
            log_path,
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        cp.spawn();
        cp
    }

    fn spawn(&mut self) {
        let addr_file = self.state_dir.join("listen.addr");
        match std::fs::remove_file(&addr_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot remove stale {}: {e}", addr_file.display()),
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open sync-control log");
        let mut cmd = Command::new(CONTROL_BIN);
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        clean_env(&mut cmd);
        cmd.env("SYNC_CONTROL_LOG", "debug");
        self.child = Some(cmd.spawn().expect("spawn sync-control"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Some(line) = text.strip_suffix('\n') {
                    self.addr = line
                        .trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("listen.addr holds {text:?}: {e}"));
                    break;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "sync-control exited with {status} before listening\n{}",
                    self.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "sync-control wrote no listen.addr within 30 s\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.url = format!("http://{}", self.addr);
        self.token = std::fs::read_to_string(self.state_dir.join("operator.token"))
            .expect("read operator.token")
            .trim()
            .to_string();
    }

    /// SIGTERM and wait for the exit (at most 15 s).
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("sync-control is running");
        crate::common::terminate_child(&mut c, Duration::from_secs(15)).unwrap_or_else(|| {
            panic!(
                "sync-control ignored SIGTERM for 15 s\n{}",
                self.log_tail(40)
            )
        })
    }

    /// Stops (SIGTERM) and starts again on the same state dir (on a new port).
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "sync-control exited with {status}\n{}",
            self.log_tail(40)
        );
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- sync-control log {} ---\n{}\n--- end ---",
            self.log_path.display(),
            all[from..].join("\n")
        )
    }

    /// One request on a fresh connection.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&str>,
    ) -> HttpAnswer {
        http(
            self.addr,
            method,
            path,
            bearer,
            body,
            Duration::from_secs(90),
        )
    }

    /// A request with the operator token.
    pub fn operator(&self, method: &str, path: &str, body: Option<&str>) -> HttpAnswer {
        self.request(method, path, Some(&self.token), body)
    }

    /// A new bootstrap token through the API.
    pub fn bootstrap_token(&self) -> String {
        let r = self.operator("POST", "/v1/bootstrap-tokens", None);
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["token"].as_str().expect("token").to_string()
    }

    /// `POST /v1/register` with `token`.
    pub fn register(&self, token: &str, hostname: &str) -> HttpAnswer {
        let body = serde_json::json!({
            "bootstrap_token": token, "hostname": hostname, "version": "0.0.0-test",
            "backend": "local", "data_port": 7400,
        });
        self.request("POST", "/v1/register", None, Some(&body.to_string()))
    }

    /// Registers a new gateway; answers its id and credential.
    pub fn register_gateway(&self, hostname: &str) -> (String, String) {
        let r = self.register(&self.bootstrap_token(), hostname);
        assert_eq!(r.status, 201, "{}", r.body);
        let j = r.json();
        (
            j["gateway_id"].as_str().expect("gateway_id").to_string(),
            j["credential"].as_str().expect("credential").to_string(),
        )
    }

    /// Runs the CLI against this control plane (`--state-dir` set; the URL and token are
    /// found through it), with a 60 s deadline.
    pub fn cli(&self, args: &[&str]) -> CliRun {
        let mut cmd = Command::new(CONTROL_BIN);
        cmd.arg("--state-dir").arg(&self.state_dir).args(args);
        run_cli(cmd)
    }

    /// [`ControlPlane::cli_ok`], parsed as JSON.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.cli_ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> sync_gateway::api::ControlStatus {
        serde_json::from_value(self.cli_json(&["status", "--json"]))
            .expect("status --json parses as ControlStatus")
    }

    /// The latest reported status of one disk.
    pub fn disk(&self, id: &str) -> Option<sync_gateway::api::DiskStatus> {
        self.status()
            .disks
            .into_iter()
            .find(|d| d.disk_id == id)
            .and_then(|d| d.status)
    }

    /// The id of the first gateway reported online, once there is one (panics after `within`).
    pub fn online_gateway(&self, within: Duration) -> String {
        poll(within, "a gateway to register", || {
            self.status()
                .gateways
                .into_iter()
                .find(|g| g.online)
                .map(|g| g.gateway_id)
        })
    }

    /// `disk assign` through the CLI; writes the agent key file; returns the command id.
    pub fn assign(&self, gw: &str, disk: &str, size: u64, key_file: &Path) -> String {
        let v = self.cli_json(&[
            "disk",
            "assign",
            "--gateway",
            gw,
            "--disk-id",
            disk,
            "--size",
            &size.to_string(),
        ]);
        let key = v["agent_key"].as_str().unwrap().to_string();
        assert_eq!(key.len(), 64, "agent_key: {v}");
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{v}");
        std::fs::write(key_file, format!("{key}\n")).unwrap();
        v["command_id"].as_str().unwrap().to_string()
    }

    /// Waits until command `id` has succeeded or failed (panics after `within`).
    pub fn wait_command(&self, id: &str, within: Duration) -> sync_gateway::api::CommandView {
        poll(within, &format!("command {id} to finish"), || {
            let v = self.cli_json(&["command", "show", id]);
            let view: sync_gateway::api::CommandView = serde_json::from_value(v).unwrap();
            matches!(
                view.state,
                sync_gateway::api::CommandState::Succeeded
                    | sync_gateway::api::CommandState::Failed
            )
            .then_some(view)
        })
    }

    /// Gateway `id` as the control plane shows it (panics if unknown).
    pub fn gateway(&self, id: &str) -> sync_gateway::api::GatewayView {
        self.status()
            .gateways
            .into_iter()
            .find(|g| g.gateway_id == id)
            .unwrap_or_else(|| panic!("gateway {id} in the control plane's status"))
    }

    /// The `cloud` block of the first gateway that reported one.
    pub fn cloud_status(&self) -> Option<sync_gateway::api::CloudStatus> {
        self.status()
            .gateways
            .into_iter()
            .find_map(|g| g.status.and_then(|s| s.cloud))
    }

    /// A CLI command that waits for its command, which must have succeeded; its JSON view.
    pub fn command_ok(&self, args: &[&str]) -> serde_json::Value {
        let v = self.cli_json(args);
        assert_eq!(v["state"], "succeeded", "{args:?}: {v}");
        v
    }

    /// Disk `disk`'s status once `ok` holds for it (panics after two minutes).
    pub fn wait_disk(
        &self,
        disk: &str,
        what: &str,
        ok: impl Fn(&sync_gateway::api::DiskStatus) -> bool,
    ) -> sync_gateway::api::DiskStatus {
        poll(Duration::from_secs(120), what, || {
            self.disk(disk).filter(|d| ok(d))
        })
    }

    /// SIGKILL (a crash); [`ControlPlane::start_again`] brings it back on the same state dir.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again after [`ControlPlane::stop`] or [`ControlPlane::kill`] (on a new port).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "sync-control is still running");
        self.spawn();
    }

    /// Runs the CLI, asserts success, answers stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let run = self.cli(args);
        assert!(
            run.status.success(),
            "sync-control {args:?}: {}",
            run.describe()
        );
        run.stdout
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(80));
            if let Some(dir) = self.dir.take() {
                eprintln!("state dir kept: {}", dir.keep().display());
            }
        }
    }
}

/// Removes `SYNC_CONTROL_*` variables so the caller's environment cannot change a test.
pub fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("SYNC_CONTROL_") {
            cmd.env_remove(k);
        }
    }
}

/// Runs a prepared `sync-control` command with a 60 s deadline.
pub fn run_cli(mut cmd: Command) -> CliRun {
    clean_env(&mut cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sync-control");
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().expect("wait for killed CLI");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Output {
        status,
        stdout,
        stderr,
    } = Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    };
    CliRun {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A blocking HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> HttpAnswer {
    let mut s = TcpStream::connect(addr).expect("connect to sync-control");
    s.set_read_timeout(Some(timeout)).expect("set timeout");
    let body = body.unwrap_or("");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = bearer {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("send request head");
    // The server may answer (413) and close before reading a large body.
    let _ = s.write_all(body.as_bytes());
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The `[control_plane]` table of a gateway config, with short intervals for tests.
pub fn control_plane_toml(url: &str, token_file: &Path) -> String {
    format!(
        "[control_plane]\nurl = \"{url}\"\nbootstrap_token_file = \"{}\"\nreport_interval_secs = 1\n\
         poll_wait_secs = 5\nmax_backoff_secs = 2\n",
        token_file.display()
    )
}

/// A private CA and a server certificate for 127.0.0.1 signed by it, made with the openssl
/// command line (which `scripts/test` installs): `DIR/ca.pem`, `DIR/cert.pem`, `DIR/key.pem`.
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_test_certs(dir: &Path) -> TestCerts {
    let d = |f: &str| dir.join(f).to_str().expect("utf-8 path").to_string();
    std::fs::write(
        d("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<String>; 3] = [
        [&["req", "-x509"][..], &ec[..]]
            .concat()
            .into_iter()
            .map(String::from)
            .chain([
                "-keyout".into(),
                d("ca.key"),
                "-out".into(),
                d("ca.pem"),
                "-days".into(),
                "2".into(),
                "-subj".into(),
                "/CN=test CA".into(),
            ])
            .collect(),
        [&["req"][..], &ec[..]]
            .concat()
            .into_iter()
            .map(String::from)
            .chain([
                "-keyout".into(),
                d("key.pem"),
                "-out".into(),
                d("leaf.csr"),
                "-subj".into(),
                "/CN=127.0.0.1".into(),
            ])
            .collect(),
        [
            "x509",
            "-req",
            "-in",
            &d("leaf.csr"),
            "-CA",
            &d("ca.pem"),
            "-CAkey",
            &d("ca.key"),
            "-CAcreateserial",
            "-out",
            &d("cert.pem"),
            "-days",
            "2",
            "-extfile",
            &d("ext"),
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl ({e}): scripts/test installs it (apt package openssl)")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    TestCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    }
}

/// Polls `f` every 100 ms until it gives a value; panics naming `what` after `within`.
fn poll<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
