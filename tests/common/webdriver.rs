//! A small W3C WebDriver client for the browser tests: it starts Debian's `chromedriver` on a
//! free loopback port, opens one headless Chromium session, and speaks the WebDriver JSON
//! protocol over plain HTTP/1.1 (`std::net`, one connection per command).
//!
//! Only what the console tests use is here: navigate, find, text, click, type, accept a
//! `window.confirm`, poll for a text, run a script, take a screenshot. Every error carries the
//! command and the WebDriver error code and message.
//!
//! Chromium runs with the background-networking features off: the test machines have no route
//! out, and Chromium otherwise keeps trying to reach Google's update and sync services.
//!
//! `scripts/test` installs `chromium` and `chromium-driver`; when either is missing the session
//! fails with an error that says so rather than skipping the test.

#![allow(dead_code)] // each test binary uses a different subset

use std::fmt;
use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "webdriver_http.rs"]
mod http;

pub const CHROMIUM_BIN: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER_BIN: &str = "/usr/bin/chromedriver";

/// The key under which W3C WebDriver returns an element reference (frozen by the spec).
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium's command line. The `--disable-*` networking flags keep it from calling home
/// (update checks, sync, field trials), which a closed network answers with errors and delays.
fn chromium_args(user_data_dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", user_data_dir.display()));
    args
}

/// How long an ordinary command may take. Generous: the test machines have two cores and run
/// tests in parallel, and a navigation waits for the page to load.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Starting Chromium is the slowest step on a loaded machine.
const NEW_SESSION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long chromedriver may take to answer `/status` after it was started.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong with one WebDriver command.
pub struct WdError {
    /// `POST /session/…/element` and the like.
    pub command: String,
    /// The WebDriver error code (`no such element`, `stale element reference`, …), or
    /// `transport` / `protocol` for failures below WebDriver.
    pub code: String,
    pub message: String,
}

impl WdError {
    fn transport(command: &str, message: String) -> Self {
        WdError {
            command: command.to_string(),
            code: "transport".into(),
            message,
        }
    }

    fn protocol(command: &str, message: String) -> Self {
        WdError {
            command: command.to_string(),
            code: "protocol".into(),
            message,
        }
    }

    /// Errors a poll retries: the element is not (or no longer) there yet.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code.as_str(),
            "no such element" | "stale element reference" | "element not interactable"
        )
    }
}

impl fmt::Display for WdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // chromedriver appends a long native stack trace to some messages; the first lines say
        // what happened
        let msg: Vec<&str> = self.message.lines().take(4).collect();
        write!(
            f,
            "WebDriver {}: {}: {}",
            self.command,
            self.code,
            msg.join(" | ")
        )
    }
}

impl fmt::Debug for WdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for WdError {}

pub type WdResult<T> = Result<T, WdError>;

/// A WebDriver element reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(pub String);

/// A running `chromedriver` with one Chromium session. On drop the session is deleted (which
/// closes Chromium), then chromedriver and anything it left running are killed.
pub struct Browser {
    driver: Option<Child>,
    addr: SocketAddr,
    session: Option<String>,
    pub driver_log: PathBuf,
    user_data_dir: Option<tempfile::TempDir>,
    /// Where to write a screenshot and the page source if the test panics while this is alive.
    failure_screenshot: Option<PathBuf>,
}

impl fmt::Debug for Browser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Browser")
            .field("driver", &self.driver.as_ref().map(|c| c.id()))
            .field("addr", &self.addr)
            .field("session", &self.session)
            .field("driver_log", &self.driver_log)
            .finish()
    }
}

/// Asks the kernel for a free loopback port. chromedriver cannot report the port it bound, so
/// the port is released and handed over; [`Browser::start`] retries if someone took it meanwhile.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Fails with a message naming the installer when Chromium or chromedriver is missing.
pub fn require_browser() {
    let missing: Vec<&str> = [CHROMIUM_BIN, CHROMEDRIVER_BIN]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "{} missing: the browser tests need Debian's chromium and chromium-driver packages; \
         scripts/test installs them (or: apt-get install chromium chromium-driver)",
        missing.join(" and ")
    );
}

impl Browser {
    /// Starts chromedriver (log in `log_dir/chromedriver.log`) and opens a headless Chromium
    /// session with a fresh profile.
    pub fn start(log_dir: &Path) -> Browser {
        require_browser();
        let driver_log = log_dir.join("chromedriver.log");
        let mut last_failure = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&driver_log)
                .expect("open chromedriver log");
            let child = Command::new(CHROMEDRIVER_BIN)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER_BIN}: {e}"));
            let mut b = Browser {
                driver: Some(child),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                session: None,
                driver_log: driver_log.clone(),
                user_data_dir: None,
                failure_screenshot: None,
            };
            match b.wait_ready() {
                Ok(()) => {
                    b.new_session();
                    b.set_window_size(1280, 900)
                        .unwrap_or_else(|e| panic!("cannot size the window: {e}"));
                    return b;
                }
                // `b` is dropped here: chromedriver is killed, the next port is tried
                Err(e) => last_failure = e,
            }
        }
        panic!(
            "chromedriver did not start: {last_failure}\n{}",
            log_tail(&driver_log, 30)
        );
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let end = Instant::now() + DRIVER_READY_TIMEOUT;
        loop {
            if let Some(c) = self.driver.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("chromedriver exited with {status}"));
                }
            }
            if let Ok(v) = self.request("GET", "/status", None, Duration::from_secs(5)) {
                if v["ready"].as_bool() == Some(true) {
                    return Ok(());
                }
            }
            if Instant::now() >= end {
                return Err(format!(
                    "no ready /status on {} within {DRIVER_READY_TIMEOUT:?}",
                    self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn new_session(&mut self) {
        let profile = tempfile::Builder::new()
            .prefix("sgw-chromium-")
            .tempdir()
            .expect("create chromium profile dir");
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    // a confirm() stays open until the test accepts it; a command sent while
                    // one is open fails instead of silently dismissing it
                    "unhandledPromptBehavior": "ignore",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM_BIN,
                        "args": chromium_args(profile.path()),
                    }
                }
            }
        });
        self.user_data_dir = Some(profile);
        let v = self
            .request("POST", "/session", Some(&caps), NEW_SESSION_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot open a Chromium session: {e}\n{}",
                    log_tail(&self.driver_log, 30)
                )
            });
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("new session answer has no sessionId: {v}"));
        self.session = Some(id.to_string());
    }

    /// When the test panics while the browser is alive, a screenshot goes to `path` and the
    /// page's HTML next to it (`path` with extension `.html`).
    pub fn screenshot_on_failure(&mut self, path: &Path) {
        self.failure_screenshot = Some(path.to_path_buf());
    }

    fn session_path(&self, rest: &str) -> String {
        let id = self.session.as_deref().expect("a session is open");
        format!("/session/{id}{rest}")
    }

    /// One command on the session: `POST`/`GET`/`DELETE /session/ID{rest}`.
    pub fn command(&self, method: &str, rest: &str, body: Option<&Value>) -> WdResult<Value> {
        self.request(method, &self.session_path(rest), body, COMMAND_TIMEOUT)
    }

    // -----------------------------------------------------------------------------------------
    // Commands

    pub fn navigate(&self, url: &str) -> WdResult<()> {
        self.command("POST", "/url", Some(&json!({ "url": url })))
            .map(drop)
    }

    /// Resizes the browser window (headless Chromium starts at 800x600).
    pub fn set_window_size(&self, width: u32, height: u32) -> WdResult<()> {
        self.command(
            "POST",
            "/window/rect",
            Some(&json!({ "width": width, "height": height })),
        )
        .map(drop)
    }

    /// Writes a PNG of the whole page to `path`: the window is made as tall as the page first
    /// (WebDriver screenshots show the viewport only).
    pub fn save_full_page_screenshot(&self, path: &Path) -> WdResult<()> {
        let size = self.execute(
            "window.scrollTo(0, 0); \
             return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];",
            &[],
        )?;
        let dim = |i: usize| size[i].as_u64().unwrap_or(0).clamp(600, 8000) as u32;
        self.set_window_size(dim(0).max(1280), dim(1) + 160)?;
        self.save_screenshot(path)
    }

    pub fn current_url(&self) -> WdResult<String> {
        let v = self.command("GET", "/url", None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The first element matching `css`.
    pub fn find(&self, css: &str) -> WdResult<Element> {
        let v = self.command(
            "POST",
            "/element",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        element_of(&v).ok_or_else(|| {
            WdError::protocol(&format!("find {css:?}"), format!("no element in {v}"))
        })
    }

    /// Every element matching `css` (possibly none).
    pub fn find_all(&self, css: &str) -> WdResult<Vec<Element>> {
        let v = self.command(
            "POST",
            "/elements",
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        Ok(v.as_array()
            .map(|a| a.iter().filter_map(element_of).collect())
            .unwrap_or_default())
    }

    /// The first element matching `css` inside `parent`.
    pub fn find_in(&self, parent: &Element, css: &str) -> WdResult<Element> {
        let v = self.command(
            "POST",
            &format!("/element/{}/element", parent.0),
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        element_of(&v).ok_or_else(|| {
            WdError::protocol(
                &format!("find {css:?} in element"),
                format!("no element in {v}"),
            )
        })
    }

    /// The rendered text of an element (what a user sees, whitespace collapsed).
    pub fn text(&self, e: &Element) -> WdResult<String> {
        let v = self.command("GET", &format!("/element/{}/text", e.0), None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// A DOM property (`value`, `checked`, …) as JSON.
    pub fn property(&self, e: &Element, name: &str) -> WdResult<Value> {
        self.command("GET", &format!("/element/{}/property/{name}", e.0), None)
    }

    /// An attribute, `None` when absent.
    pub fn attribute(&self, e: &Element, name: &str) -> WdResult<Option<String>> {
        let v = self.command("GET", &format!("/element/{}/attribute/{name}", e.0), None)?;
        Ok(v.as_str().map(str::to_string))
    }

    pub fn click(&self, e: &Element) -> WdResult<()> {
        self.command("POST", &format!("/element/{}/click", e.0), Some(&json!({})))
            .map(drop)
    }

    /// Empties an input.
    pub fn clear(&self, e: &Element) -> WdResult<()> {
        self.command("POST", &format!("/element/{}/clear", e.0), Some(&json!({})))
            .map(drop)
    }

    /// Types `text` into an element (appends to what is there; [`Browser::clear`] first).
    pub fn send_keys(&self, e: &Element, text: &str) -> WdResult<()> {
        self.command(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(&json!({ "text": text })),
        )
        .map(drop)
    }

    /// Text of the open `alert`/`confirm`/`prompt`.
    pub fn alert_text(&self) -> WdResult<String> {
        let v = self.command("GET", "/alert/text", None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Accepts the `window.confirm` (or alert) that is open or opens within 10 s, and returns
    /// its text.
    pub fn accept_alert(&self) -> WdResult<String> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match self.alert_text() {
                Ok(text) => {
                    self.command("POST", "/alert/accept", Some(&json!({})))?;
                    return Ok(text);
                }
                Err(e) if e.code == "no such alert" && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Dismisses the open dialog (the "Cancel" of a confirm).
    pub fn dismiss_alert(&self) -> WdResult<()> {
        self.command("POST", "/alert/dismiss", Some(&json!({})))
            .map(drop)
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) and returns its result.
    pub fn execute(&self, script: &str, args: &[Value]) -> WdResult<Value> {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The page's current HTML.
    pub fn page_source(&self) -> WdResult<String> {
        let v = self.command("GET", "/source", None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// A PNG of the viewport.
    pub fn screenshot_png(&self) -> WdResult<Vec<u8>> {
        let v = self.command("GET", "/screenshot", None)?;
        let b64 = v
            .as_str()
            .ok_or_else(|| WdError::protocol("GET screenshot", "answer is not a string".into()))?;
        http::base64_decode(b64)
            .ok_or_else(|| WdError::protocol("GET screenshot", "answer is not base64".into()))
    }

    /// Writes a PNG of the viewport to `path`.
    pub fn save_screenshot(&self, path: &Path) -> WdResult<()> {
        let png = self.screenshot_png()?;
        std::fs::write(path, png).map_err(|e| {
            WdError::transport("save screenshot", format!("write {}: {e}", path.display()))
        })
    }

    /// Polls the text of the first element matching `css` until `pred` accepts it, and returns
    /// that text. Missing and replaced elements are retried (the page re-renders as it polls
    /// its server); any other WebDriver error ends the wait. On timeout the error names the
    /// last text seen.
    pub fn wait_for_text(
        &self,
        css: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> WdResult<String> {
        let end = Instant::now() + timeout;
        let mut last: String;
        loop {
            match self.find(css).and_then(|e| self.text(&e)) {
                Ok(t) if pred(&t) => return Ok(t),
                Ok(t) => last = format!("text {t:?}"),
                Err(e) if e.is_transient() => last = format!("{}: {}", e.code, e.message),
                Err(e) => return Err(e),
            }
            if Instant::now() >= end {
                return Err(WdError {
                    command: format!("wait for text of {css:?}"),
                    code: "timeout".into(),
                    message: format!("not as expected after {timeout:?}; last: {last}"),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls until an element matches `css`, and returns it.
    pub fn wait_for_element(&self, css: &str, timeout: Duration) -> WdResult<Element> {
        let end = Instant::now() + timeout;
        loop {
            match self.find(css) {
                Ok(e) => return Ok(e),
                Err(e) if e.is_transient() && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // HTTP

    /// One HTTP/1.1 request with a JSON body; returns the answer's `value`, or the WebDriver
    /// error it carries.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> WdResult<Value> {
        let what = format!("{method} {path}");
        let payload = body.map(|b| b.to_string());
        let (status, raw) = http::exchange(self.addr, method, path, payload.as_deref(), timeout)
            .map_err(|e| match e {
                http::Error::Io(e) => WdError::transport(&what, e.to_string()),
                http::Error::Malformed(m) => WdError::protocol(&what, m),
            })?;
        let v: Value = serde_json::from_slice(&raw).map_err(|e| {
            WdError::protocol(
                &what,
                format!(
                    "HTTP {status}, body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&raw[..raw.len().min(300)])
                ),
            )
        })?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if let Some(code) = value.get("error").and_then(Value::as_str) {
            return Err(WdError {
                command: what,
                code: code.to_string(),
                message: value["message"].as_str().unwrap_or_default().to_string(),
            });
        }
        if !(200..300).contains(&status) {
            return Err(WdError::protocol(&what, format!("HTTP {status}: {v}")));
        }
        // a new session answers {"value": {"sessionId": …, "capabilities": …}}
        Ok(value)
    }
}

fn element_of(v: &Value) -> Option<Element> {
    v.get(ELEMENT_KEY)
        .and_then(Value::as_str)
        .map(|s| Element(s.to_string()))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    format!(
        "--- {} (last lines) ---\n{}\n--- end ---",
        path.display(),
        all[all.len().saturating_sub(lines)..].join("\n")
    )
}

/// Every process below `root` (children, grandchildren, …), from `/proc`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "PID (COMM) STATE PPID …": COMM may hold spaces and parentheses
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() && self.session.is_some() {
            if let Some(path) = self.failure_screenshot.take() {
                match self.save_full_page_screenshot(&path) {
                    Ok(()) => eprintln!("browser screenshot at failure: {}", path.display()),
                    Err(e) => eprintln!("no screenshot at failure: {e}"),
                }
                if let Ok(html) = self.page_source() {
                    let p = path.with_extension("html");
                    if std::fs::write(&p, html).is_ok() {
                        eprintln!("page source at failure: {}", p.display());
                    }
                }
            }
        }
        if self.session.is_some() {
            // closes Chromium cleanly; short deadline, the kill below is the backstop
            let path = self.session_path("");
            let _ = self.request("DELETE", &path, None, Duration::from_secs(15));
            self.session = None;
        }
        if let Some(mut c) = self.driver.take() {
            // Chromium's processes that outlived the session (a hung browser), then the driver
            let left = descendants(c.id());
            if !left.is_empty() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .args(left.iter().map(u32::to_string))
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", log_tail(&self.driver_log, 40));
        }
    }
}
