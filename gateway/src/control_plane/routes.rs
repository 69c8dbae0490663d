//! The handlers of [`super::ROUTES`]: authentication, then one function per endpoint.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::http::{self, ApiError, Resp};
use super::state;
use super::store::Store;
use super::{match_route, openapi, Auth, Endpoint, RouteMiss};
use crate::api::{
    self, Action, AssignRequest, CollectDiagnostics, CommandBatch, CommandResult, DiskRef,
    LaunchRequest, Policy, RegisterRequest, RegisterResponse, StatusReport,
};

/// The console page.
const CONSOLE: &str = include_str!("console.html");
/// Default life of a bootstrap token.
pub const DEFAULT_BOOTSTRAP_TTL_SECS: u64 = 24 * 3600;
/// Longest life of a bootstrap token: a token is a secret on its way to one machine.
const MAX_BOOTSTRAP_TTL_SECS: u64 = 30 * 24 * 3600;
/// Longest accepted text fields of a registration (host names are at most 253 bytes).
const MAX_NAME_LEN: usize = 255;

/// Timing settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A delivered command without a result is delivered again after this.
    pub redeliver_after: Duration,
    /// Told to gateways; a gateway silent for 3 intervals is shown offline.
    pub report_interval_secs: u64,
    /// Told to gateways: how long to hold a command poll.
    pub poll_wait_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            redeliver_after: Duration::from_secs(30),
            report_interval_secs: 5,
            poll_wait_secs: 25,
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct App {
    pub store: Store,
    pub operator_token_sha256: String,
    pub settings: Settings,
    /// Fired at shutdown: long polls answer at once.
    pub cancel: CancellationToken,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Answers one request; never fails, never panics on input.
pub async fn handle(app: &App, req: Request<Incoming>) -> Resp {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match dispatch(app, req).await {
        Ok(r) => {
            debug!(%method, %path, status = r.status().as_u16(), "request");
            r
        }
        Err(e) => {
            debug!(%method, %path, status = e.status.as_u16(), code = e.code, "request refused");
            e.into_response()
        }
    }
}

async fn dispatch(app: &App, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let (route, params) = match match_route(req.method().as_str(), req.uri().path()) {
        Ok(m) => m,
        Err(RouteMiss::NotFound) => {
            return Err(ApiError::not_found(format!(
                "no route {}; the API is described at /v1/openapi.json",
                req.uri().path()
            )))
        }
        Err(RouteMiss::MethodNotAllowed(allowed)) => {
            let allowed = allowed.join(", ");
            let mut r = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} takes {allowed}", req.uri().path()),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&allowed) {
                r.headers_mut().insert(ALLOW, v);
            }
            return Ok(r);
        }
    };
    let param = |i: usize| params.get(i).map_or("", String::as_str);
    match route.auth {
        Auth::Public => {}
        Auth::Operator => check_operator(app, req.headers())?,
        Auth::Gateway => check_gateway(app, req.headers(), param(0))?,
    }
    let query = req.uri().query().map(str::to_string);
    let body = if matches!(*req.method(), Method::POST | Method::PUT) {
        http::read_body(req).await?
    } else {
        Bytes::new()
    };
    let disk_command = |make: fn(String) -> Action| make(param(0).to_string());
    match route.endpoint {
        Endpoint::Console => Ok(http::html(CONSOLE)),
        Endpoint::Health => Ok(http::json(StatusCode::OK, &serde_json::json!({"ok": true}))),
        Endpoint::OpenApi => Ok(http::json(StatusCode::OK, &openapi::document())),
        Endpoint::Register => register(app, &body).await,
        Endpoint::PollCommands => poll_commands(app, param(0), query.as_deref()).await,
        Endpoint::PostResult => post_result(app, param(0), param(1), &body).await,
        Endpoint::PostStatus => post_status(app, param(0), &body).await,
        Endpoint::CreateBootstrapToken => create_bootstrap_token(app, &body).await,
        Endpoint::AssignDisk => assign(app, &body).await,
        Endpoint::RevokeAgent => {
            let action = disk_command(|disk_id| Action::RevokeAgent(DiskRef { disk_id }));
            queue_for_disk(app, param(0), action).await
        }
        Endpoint::SnapshotNow => {
            let action = disk_command(|disk_id| Action::SnapshotNow(DiskRef { disk_id }));
            queue_for_disk(app, param(0), action).await
        }
        Endpoint::Cutover => {
            let action = disk_command(|disk_id| Action::Cutover(DiskRef { disk_id }));
            queue_for_disk(app, param(0), action).await
        }
        Endpoint::Finalize => {
            let action = disk_command(|disk_id| Action::Finalize(DiskRef { disk_id }));
            queue_for_disk(app, param(0), action).await
        }
        Endpoint::TestLaunch => {
            let req: LaunchRequest = http::parse_optional(&body, "launch request")?;
            let action = Action::TestLaunch(api::TestLaunch {
                disk_id: param(0).to_string(),
                snapshot_id: req.snapshot_id,
            });
            queue_for_disk(app, param(0), action).await
        }
        Endpoint::SetPolicy => set_policy(app, param(0), &body).await,
        Endpoint::CollectDiagnostics => collect_diagnostics(app, param(0), &body).await,
        Endpoint::GetCommand => {
            let view = app.store.read(|s| s.command(param(0)))?;
            Ok(http::json(StatusCode::OK, &view))
        }
        Endpoint::Status => {
            let window_ms = app.settings.report_interval_secs.saturating_mul(3000);
            let status = app.store.read(|s| s.status(now_ms(), window_ms));
            Ok(http::json(StatusCode::OK, &status))
        }
    }
}

fn check_operator(app: &App, headers: &hyper::HeaderMap) -> Result<(), ApiError> {
    let token = http::bearer(headers).ok_or_else(|| {
        ApiError::unauthorized("this route needs 'Authorization: Bearer <operator token>'")
    })?;
    let hash = state::hash_secret(token);
    if state::constant_time_eq(hash.as_bytes(), app.operator_token_sha256.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("the operator token is wrong"))
    }
}

fn check_gateway(app: &App, headers: &hyper::HeaderMap, gateway_id: &str) -> Result<(), ApiError> {
    let credential = http::bearer(headers).ok_or_else(|| {
        ApiError::unauthorized("this route needs 'Authorization: Bearer <gateway credential>'")
    })?;
    let owner = app
        .store
        .read(|s| s.gateway_of_credential(credential).map(str::to_string));
    match owner {
        None => Err(ApiError::unauthorized(
            "the gateway credential is not known",
        )),
        Some(owner) if owner != gateway_id => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            api::codes::UNAUTHORIZED,
            format!("the credential is not the one of gateway {gateway_id:?}"),
        )),
        Some(_) => Ok(()),
    }
}

async fn register(app: &App, body: &[u8]) -> Result<Resp, ApiError> {
    let req: RegisterRequest = http::parse(body, "registration")?;
    for (name, value) in [
        ("hostname", &req.hostname),
        ("version", &req.version),
        ("backend", &req.backend),
    ] {
        if value.len() > MAX_NAME_LEN {
            return Err(ApiError::bad_request(format!(
                "{name} is longer than {MAX_NAME_LEN} bytes"
            )));
        }
    }
    let now = now_ms();
    let (gateway_id, credential) = app
        .store
        .update(|s| s.register(&req, now).map(|r| (r, true)))
        .await?;
    info!(%gateway_id, hostname = %req.hostname, version = %req.version, "gateway registered");
    let answer = RegisterResponse {
        gateway_id,
        credential,
        report_interval_secs: app.settings.report_interval_secs,
        poll_wait_secs: app.settings.poll_wait_secs,
    };
    Ok(http::json(StatusCode::CREATED, &answer))
}

/// Answers at once with the deliverable commands, or holds the request until one is queued, a
/// lease runs out, `wait` passes or the server stops.
async fn poll_commands(app: &App, gateway_id: &str, query: Option<&str>) -> Result<Resp, ApiError> {
    let wait = match http::query_param(query, "wait") {
        None => 0,
        Some(v) => v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("wait={v:?}: expected a number of seconds"))
        })?,
    };
    let wait = Duration::from_secs(wait.min(api::MAX_POLL_WAIT_SECS));
    let lease_ms = u64::try_from(app.settings.redeliver_after.as_millis()).unwrap_or(u64::MAX);
    let deadline = Instant::now() + wait;
    let waker = app.store.waker(gateway_id);
    loop {
        // Registered before looking, so a command queued in between still wakes us.
        let notified = waker.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = now_ms();
        let delivery = app
            .store
            .update(|s| {
                let d = s.poll(gateway_id, now, lease_ms)?;
                let dirty = !d.commands.is_empty();
                Ok((d, dirty))
            })
            .await?;
        if !delivery.commands.is_empty() || Instant::now() >= deadline {
            if !delivery.commands.is_empty() {
                debug!(%gateway_id, n = delivery.commands.len(), "commands delivered");
            }
            let batch = CommandBatch {
                commands: delivery.commands,
            };
            return Ok(http::json(StatusCode::OK, &batch));
        }
        let mut wake_at = deadline;
        if let Some(due) = delivery.next_due_unix_ms {
            // +1 ms: the lease has run out when `now - last_delivery >= lease`.
            let in_ms = due.saturating_sub(now).saturating_add(1);
            wake_at = wake_at.min(Instant::now() + Duration::from_millis(in_ms));
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(wake_at.into()) => {}
            _ = app.cancel.cancelled() => {
                return Ok(http::json(StatusCode::OK, &CommandBatch::default()));
            }
        }
    }
}

async fn post_result(
    app: &App,
    gateway_id: &str,
    command_id: &str,
    body: &[u8],
) -> Result<Resp, ApiError> {
    let result: CommandResult = http::parse(body, "command result")?;
    let outcome = result.outcome;
    let now = now_ms();
    let changed = app
        .store
        .update(|s| {
            s.record_result(gateway_id, command_id, result, now)
                .map(|changed| (changed, changed))
        })
        .await?;
    if changed {
        info!(%gateway_id, %command_id, ?outcome, "command finished");
    }
    Ok(http::no_content())
}

async fn post_status(app: &App, gateway_id: &str, body: &[u8]) -> Result<Resp, ApiError> {
    let report: StatusReport = http::parse(body, "status report")?;
    let now = now_ms();
    app.store
        .update(|s| {
            s.record_report(gateway_id, report, now)
                .map(|()| ((), true))
        })
        .await?;
    Ok(http::no_content())
}

#[derive(Debug, Default, Deserialize)]
struct TokenRequest {
    #[serde(default)]
    ttl_secs: Option<u64>,
}

async fn create_bootstrap_token(app: &App, body: &[u8]) -> Result<Resp, ApiError> {
    let req: TokenRequest = http::parse_optional(body, "bootstrap token request")?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_BOOTSTRAP_TTL_SECS);
    if !(1..=MAX_BOOTSTRAP_TTL_SECS).contains(&ttl) {
        return Err(ApiError::bad_request(format!(
            "ttl_secs must be between 1 and {MAX_BOOTSTRAP_TTL_SECS}"
        )));
    }
    let now = now_ms();
    let token = app
        .store
        .update(|s| Ok((s.issue_bootstrap_token(ttl, now), true)))
        .await?;
    info!(
        expires_unix_ms = token.expires_unix_ms,
        "bootstrap token issued"
    );
    Ok(http::json(StatusCode::CREATED, &token))
}

async fn assign(app: &App, body: &[u8]) -> Result<Resp, ApiError> {
    let req: AssignRequest = http::parse(body, "assignment")?;
    let now = now_ms();
    let answer = app
        .store
        .update(|s| s.assign(&req, now).map(|a| (a, true)))
        .await?;
    app.store.wake(&answer.gateway_id);
    info!(disk_id = %answer.disk_id, gateway_id = %answer.gateway_id,
          command_id = %answer.command_id, "disk assigned");
    Ok(http::json(StatusCode::CREATED, &answer))
}

async fn queue_for_disk(app: &App, disk_id: &str, action: Action) -> Result<Resp, ApiError> {
    let now = now_ms();
    let reference = app
        .store
        .update(|s| s.queue_for_disk(disk_id, &action, now).map(|r| (r, true)))
        .await?;
    app.store.wake(&reference.gateway_id);
    info!(%disk_id, kind = %reference.kind, command_id = %reference.command_id, "command queued");
    Ok(http::json(StatusCode::ACCEPTED, &reference))
}

async fn collect_diagnostics(app: &App, gateway_id: &str, body: &[u8]) -> Result<Resp, ApiError> {
    let req: CollectDiagnostics = http::parse_optional(body, "diagnostics request")?;
    req.validate().map_err(ApiError::bad_request)?;
    let now = now_ms();
    let action = Action::CollectDiagnostics(req);
    let reference = app
        .store
        .update(|s| s.queue(gateway_id, &action, now).map(|r| (r, true)))
        .await?;
    app.store.wake(gateway_id);
    info!(%gateway_id, command_id = %reference.command_id, "diagnostics queued");
    Ok(http::json(StatusCode::ACCEPTED, &reference))
}

async fn set_policy(app: &App, gateway_id: &str, body: &[u8]) -> Result<Resp, ApiError> {
    let policy: Policy = http::parse(body, "policy")?;
    if let Some(r) = &policy.retention {
        r.validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let now = now_ms();
    let action = Action::SetPolicy(policy);
    let reference = app
        .store
        .update(|s| s.queue(gateway_id, &action, now).map(|r| (r, true)))
        .await?;
    app.store.wake(gateway_id);
    info!(%gateway_id, command_id = %reference.command_id, "policy queued");
    Ok(http::json(StatusCode::ACCEPTED, &reference))
}
