//! The upward channel: the gateway's only control connections, all opened by the gateway.
//!
//! ```text
//!  register (once) ─▶ credential in DATA_DIR/state/control-plane.json (0600)
//!  poller:   GET commands (long poll) ─▶ journal.admit ─▶ per-disk worker ─▶ execute
//!  results:  journal.unposted ─▶ POST result ─▶ journal.posted
//!  reporter: every report_interval_secs, and at once after a change ─▶ bounded queue ─▶ POST
//! ```
//!
//! Replication never waits on any of this: the loops only read the gateway's state and call
//! [`Control`]. While the control plane is unreachable every loop retries with exponential
//! backoff and full jitter (so a fleet of gateways does not return in lockstep), reports queue
//! up to `report_queue` (oldest dropped and counted), and results wait in the journal on disk.
//! Commands for one disk run in the order delivered; different disks' commands run side by side.

pub mod exec;
pub mod journal;
pub mod status;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify, RwLock};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, Command, CommandBatch, RegisterRequest, RegisterResponse};
use crate::config::{Config, ControlPlaneConfig};
use crate::diagnostics::Collector;
use crate::durable;
use crate::http_client::{HttpError, JsonClient};
use crate::server::disk::unix_ms;
use crate::server::Control;
use journal::{Admission, Journal};
pub use status::StatusSource;

/// The gateway's identity at its control plane, as persisted.
#[derive(Clone, Serialize, Deserialize)]
pub struct Registration {
    pub gateway_id: String,
    pub credential: String,
    pub url: String,
    pub registered_unix_ms: u64,
    pub report_interval_secs: u64,
    pub poll_wait_secs: u64,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.debug_struct("Registration")
            .field("gateway_id", &self.gateway_id)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Where the registration is kept, under the data dir.
pub const REGISTRATION_FILE: &str = "state/control-plane.json";

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cur: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        // 500 ms: long enough not to hammer a control plane that is restarting, short enough
        // that a brief blip costs a report, not a minute.
        let base = Duration::from_millis(500).min(max);
        Backoff {
            base,
            cur: base,
            max,
        }
    }

    /// The next pause: uniform in [0, current], the current bound doubling up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let bound = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        bound
            .mul_f64(rand::random::<f64>())
            .max(Duration::from_millis(50))
    }

    pub fn reset(&mut self) {
        self.cur = self.base;
    }
}

/// Sleeps unless cancelled first; false when cancelled.
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

struct Upward {
    client: JsonClient,
    cp: ControlPlaneConfig,
    data_dir: PathBuf,
    control: Control,
    status: Arc<StatusSource>,
    diagnostics: Collector,
    reg: RwLock<Registration>,
    journal: Mutex<Journal>,
    results_ready: Notify,
    cancel: CancellationToken,
}

/// Runs the upward channel until `cancel` fires. Failures are logged and retried; nothing here
/// stops replication. `config` is the gateway's effective config (for diagnostics bundles).
pub async fn run(
    cp: ControlPlaneConfig,
    config: Arc<Config>,
    control: Control,
    status: Arc<StatusSource>,
    cancel: CancellationToken,
) {
    let data_dir = config.data_dir.clone();
    let client = match JsonClient::new(&cp.url, cp.ca_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "control plane client cannot start; the gateway runs without it");
            return;
        }
    };
    let journal = match Journal::open(&data_dir.join("state")) {
        Ok(j) => j,
        Err(e) => {
            error!(error = %e, "command journal unreadable; not taking commands (move the file \
                aside to start a new journal)");
            return;
        }
    };
    let Some(reg) = registration(&client, &cp, &data_dir, &status, &cancel).await else {
        return;
    };
    info!(gateway_id = %reg.gateway_id, url = %cp.url, "control plane: registered");
    let diagnostics = Collector::new(config, control.clone(), status.clone());
    let up = Arc::new(Upward {
        client,
        cp,
        data_dir,
        control,
        status,
        diagnostics,
        reg: RwLock::new(reg),
        journal: Mutex::new(journal),
        results_ready: Notify::new(),
        cancel,
    });
    let poller = tokio::spawn(poll_commands(up.clone()));
    let results = tokio::spawn(post_results(up.clone()));
    report_status(up.clone()).await;
    let _ = poller.await;
    let _ = results.await;
}

fn load_registration(data_dir: &Path) -> Result<Option<Registration>, String> {
    let path = data_dir.join(REGISTRATION_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The stored registration, or a new one made with the bootstrap token (retried until it
/// works or the gateway stops).
async fn registration(
    client: &JsonClient,
    cp: &ControlPlaneConfig,
    data_dir: &Path,
    status: &StatusSource,
    cancel: &CancellationToken,
) -> Option<Registration> {
    match load_registration(data_dir) {
        Ok(Some(r)) => return Some(r),
        Ok(None) => {}
        Err(e) => {
            error!(error = %e, "stored registration unreadable; registering again");
        }
    }
    register(client, cp, data_dir, status, cancel).await
}

async fn register(
    client: &JsonClient,
    cp: &ControlPlaneConfig,
    data_dir: &Path,
    status: &StatusSource,
    cancel: &CancellationToken,
) -> Option<Registration> {
    let mut backoff = Backoff::new(Duration::from_secs(cp.max_backoff_secs));
    loop {
        match try_register(client, cp, data_dir, status).await {
            Ok(r) => return Some(r),
            Err(e) => {
                let delay = backoff.next_delay();
                error!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "control plane registration failed");
                if !pause(cancel, delay).await {
                    return None;
                }
            }
        }
    }
}

async fn try_register(
    client: &JsonClient,
    cp: &ControlPlaneConfig,
    data_dir: &Path,
    status: &StatusSource,
) -> Result<Registration, String> {
    // Read at every attempt: an operator may fix the file while the gateway waits.
    let token = std::fs::read_to_string(&cp.bootstrap_token_file)
        .map_err(|e| {
            format!(
                "cannot read bootstrap token file {}: {e}",
                cp.bootstrap_token_file.display()
            )
        })?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(format!(
            "bootstrap token file {} is empty",
            cp.bootstrap_token_file.display()
        ));
    }
    let req = RegisterRequest {
        bootstrap_token: token,
        hostname: status.hostname().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        backend: status.backend_kind().to_string(),
        data_port: status.data_port(),
        identity: status.identity(),
    };
    let resp: RegisterResponse = client
        .call(
            Method::POST,
            &format!("{}/register", api::PREFIX),
            None,
            Some(&req),
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| match e.api_code() {
            Some(api::codes::BOOTSTRAP_TOKEN_USED) => format!(
                "{e} (the token was used by another registration: put a new one from \
                 `sync-control gateway bootstrap-token` in {})",
                cp.bootstrap_token_file.display()
            ),
            _ => e.to_string(),
        })?;
    let reg = Registration {
        gateway_id: resp.gateway_id,
        credential: resp.credential,
        url: cp.url.clone(),
        registered_unix_ms: unix_ms(),
        report_interval_secs: resp.report_interval_secs,
        poll_wait_secs: resp.poll_wait_secs,
    };
    let json = serde_json::to_vec_pretty(&reg).map_err(|e| e.to_string())?;
    let path = data_dir.join(REGISTRATION_FILE);
    durable::atomic_write(&path, &json, 0o600)
        .map_err(|e| format!("cannot store the credential in {}: {e}", path.display()))?;
    Ok(reg)
}

impl Upward {
    async fn call<B: Serialize + ?Sized, R: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path_after_gateway: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<R, HttpError> {
        let (id, cred) = {
            let r = self.reg.read().await;
            (r.gateway_id.clone(), r.credential.clone())
        };
        let path = format!("{}/gateways/{id}{path_after_gateway}", api::PREFIX);
        self.client
            .call(method, &path, Some(&cred), body, timeout)
            .await
    }

    fn poll_wait(&self) -> u64 {
        self.cp.poll_wait_secs.min(api::MAX_POLL_WAIT_SECS)
    }

    fn report_interval(&self) -> Duration {
        Duration::from_secs(self.cp.report_interval_secs)
    }
}

/// Whether an error says the credential is no longer valid (the control plane forgot us).
fn credential_rejected(e: &HttpError) -> bool {
    matches!(e.status(), Some(401) | Some(403))
        || (e.status() == Some(404) && e.api_code() == Some(api::codes::NOT_FOUND))
}

async fn poll_commands(up: Arc<Upward>) {
    let mut backoff = Backoff::new(Duration::from_secs(up.cp.max_backoff_secs));
    let mut workers: HashMap<String, mpsc::UnboundedSender<Command>> = HashMap::new();
    let mut bad_ids: std::collections::HashSet<String> = Default::default();
    let mut was_down = false;
    loop {
        let wait = up.poll_wait();
        let path = format!("/commands?wait={wait}");
        let polled: Result<CommandBatch, HttpError> = tokio::select! {
            _ = up.cancel.cancelled() => return,
            r = up.call::<(), _>(Method::GET, &path, None,
                Duration::from_secs(wait + 15)) => r,
        };
        let batch = match polled {
            Ok(b) => {
                backoff.reset();
                if was_down {
                    info!("control plane reachable again");
                    was_down = false;
                }
                b
            }
            Err(e) if credential_rejected(&e) => {
                error!(error = %e, "control plane rejected the gateway's credential; \
                    registering again with the bootstrap token");
                let Some(reg) =
                    register(&up.client, &up.cp, &up.data_dir, &up.status, &up.cancel).await
                else {
                    return;
                };
                info!(gateway_id = %reg.gateway_id, "control plane: registered again");
                *up.reg.write().await = reg;
                continue;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                if !was_down {
                    warn!(error = %e, "control plane unreachable; replication goes on, \
                        retrying with backoff");
                    was_down = true;
                }
                if !pause(&up.cancel, delay).await {
                    return;
                }
                continue;
            }
        };
        for cmd in batch.commands {
            if !Journal::valid_id(&cmd.id) {
                // No result can be addressed to it; it is the control plane's bug, said once.
                if bad_ids.insert(cmd.id.clone()) && bad_ids.len() < 1000 {
                    error!(command = %cmd.id.escape_debug(), kind = %cmd.kind.escape_debug(),
                        "command id is not a plain path segment ([A-Za-z0-9._-], 1-128); ignored");
                }
                continue;
            }
            let admission = {
                let mut j = up.journal.lock().unwrap_or_else(|p| p.into_inner());
                j.admit(&cmd)
            };
            match admission {
                Ok(Admission::Run) => dispatch(&up, &mut workers, cmd),
                Ok(Admission::InProgress) => {}
                Ok(Admission::Repost(_)) => {
                    info!(command = %cmd.id, kind = %cmd.kind,
                        "command delivered again: already done, posting its result again");
                    up.results_ready.notify_one();
                }
                Ok(Admission::Interrupted) if exec::safe_to_repeat(&cmd.kind) => {
                    info!(command = %cmd.id, kind = %cmd.kind,
                        "command cut short by a restart: carrying it out again");
                    dispatch(&up, &mut workers, cmd);
                }
                Ok(Admission::Interrupted) => {
                    warn!(command = %cmd.id, kind = %cmd.kind,
                        "command cut short by a restart: reporting it failed, not repeating it");
                    finish(&up, exec::interrupted(&cmd));
                }
                Err(e) => {
                    // Without a durable record it could run twice; leave it for the next poll.
                    error!(command = %cmd.id, error = %e, "cannot record command; not running it");
                    if !pause(&up.cancel, backoff.next_delay()).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Queues a command on its disk's worker (one per disk, so a disk's commands keep their order).
fn dispatch(
    up: &Arc<Upward>,
    workers: &mut HashMap<String, mpsc::UnboundedSender<Command>>,
    cmd: Command,
) {
    // Diagnostics have their own worker: a slow upload never holds up a policy change.
    let key = match api::Action::parse(&cmd) {
        Ok(api::Action::CollectDiagnostics(_)) => "*diagnostics".to_string(),
        Ok(a) => a.disk_id().unwrap_or("*").to_string(),
        Err(_) => "*".to_string(),
    };
    let tx = workers.entry(key).or_insert_with(|| {
        let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
        let up = up.clone();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                let gateway_id = up.reg.read().await.gateway_id.clone();
                let ctx = exec::Context {
                    control: &up.control,
                    diagnostics: &up.diagnostics,
                    gateway_id: &gateway_id,
                };
                let result = exec::execute(&ctx, &cmd).await;
                finish(&up, result);
            }
        });
        tx
    });
    if let Err(mpsc::error::SendError(cmd)) = tx.send(cmd) {
        error!(command = %cmd.id, "command worker gone");
    }
}

fn finish(up: &Upward, result: api::CommandResult) {
    let id = result.command_id.clone();
    let saved = up
        .journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .finish(result);
    if let Err(e) = saved {
        error!(command = %id, error = %e, "cannot record command result");
    }
    up.results_ready.notify_one();
    up.control.shared().policy.changed.notify_one();
}

async fn post_results(up: Arc<Upward>) {
    let mut backoff = Backoff::new(Duration::from_secs(up.cp.max_backoff_secs));
    loop {
        let pending = up
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unposted();
        let mut failed = false;
        for r in pending {
            let path = format!("/commands/{}/result", r.command_id);
            match up
                .call::<_, ()>(Method::POST, &path, Some(&r), Duration::from_secs(30))
                .await
            {
                Ok(()) => {
                    let saved = up
                        .journal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .posted(&r.command_id);
                    if let Err(e) = saved {
                        warn!(command = %r.command_id, error = %e, "cannot record posted result");
                    }
                }
                Err(e) if !e.is_retryable() && !credential_rejected(&e) => {
                    // Unknown command (404), or a refusal no retry can change: nobody can use
                    // the result, and keeping it would block every later one.
                    warn!(command = %r.command_id, error = %e, "result refused by the control plane; dropped");
                    let _ = up
                        .journal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .posted(&r.command_id);
                }
                Err(e) => {
                    tracing::debug!(command = %r.command_id, error = %e, "result not posted yet");
                    failed = true;
                    break;
                }
            }
        }
        let delay = if failed {
            backoff.next_delay()
        } else {
            backoff.reset();
            Duration::from_secs(3600)
        };
        tokio::select! {
            _ = up.cancel.cancelled() => return,
            _ = up.results_ready.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn report_status(up: Arc<Upward>) {
    let mut queue: VecDeque<api::StatusReport> = VecDeque::new();
    let mut dropped = 0u64;
    let mut backoff = Backoff::new(Duration::from_secs(up.cp.max_backoff_secs));
    let mut retry_at: Option<tokio::time::Instant> = None;
    let changed = &up.control.shared().policy.changed;
    loop {
        let gateway_id = up.reg.read().await.gateway_id.clone();
        let report = up.status.report(&gateway_id, dropped).await;
        if queue.len() >= up.cp.report_queue {
            queue.pop_front();
            dropped += 1;
        }
        queue.push_back(report);
        let can_send = retry_at.is_none_or(|t| tokio::time::Instant::now() >= t);
        if can_send {
            while let Some(r) = queue.front() {
                match up
                    .call::<_, ()>(Method::POST, "/status", Some(r), Duration::from_secs(30))
                    .await
                {
                    Ok(()) => {
                        queue.pop_front();
                        backoff.reset();
                        retry_at = None;
                    }
                    Err(e) if !e.is_retryable() && !credential_rejected(&e) => {
                        // The same report would be refused again; the next one is fresh.
                        warn!(error = %e, "status report refused by the control plane; dropped");
                        queue.pop_front();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, queued = queue.len(), "status report not sent");
                        retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                        break;
                    }
                }
            }
        }
        let next = match retry_at {
            Some(t) => t.min(tokio::time::Instant::now() + up.report_interval()),
            None => tokio::time::Instant::now() + up.report_interval(),
        };
        tokio::select! {
            _ = up.cancel.cancelled() => {
                // One last report, so the console sees the gateway stop.
                if retry_at.is_none() {
                    let report = up.status.report(&gateway_id, dropped).await;
                    let _ = up.call::<_, ()>(Method::POST, "/status", Some(&report),
                        Duration::from_secs(2)).await;
                }
                return;
            }
            _ = changed.notified() => {
                // Coalesce a burst of changes into one report.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(4));
        let mut bounds = Vec::new();
        for _ in 0..8 {
            bounds.push(b.cur);
            let d = b.next_delay();
            assert!(d <= *bounds.last().unwrap() || d == Duration::from_millis(50));
        }
        assert_eq!(bounds[0], Duration::from_millis(500));
        assert_eq!(bounds[1], Duration::from_secs(1));
        assert_eq!(*bounds.last().unwrap(), Duration::from_secs(4));
        b.reset();
        assert_eq!(b.cur, Duration::from_millis(500));
    }

    #[test]
    fn the_registration_debug_output_never_shows_the_credential() {
        let r = Registration {
            gateway_id: "gw-1".into(),
            credential: "s3cr3t-credential".into(),
            url: "http://127.0.0.1:1".into(),
            registered_unix_ms: 0,
            report_interval_secs: 5,
            poll_wait_secs: 25,
        };
        let shown = format!("{r:?}");
        assert!(
            shown.contains("gw-1") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }
}
