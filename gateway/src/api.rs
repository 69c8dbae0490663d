//! The upward channel's contract, version 1: JSON bodies exchanged between `sync-gateway` and a
//! control plane (the reference one is `sync-control`). Both sides use these types, so this file
//! and the OpenAPI document that `sync-control` serves at `/v1/openapi.json` describe one API.
//!
//! The gateway only ever opens connections: it registers, long-polls for commands, posts
//! command results and posts status reports. Nothing connects to it.
//!
//! ```text
//!  gateway                                           control plane
//!  POST /v1/register {bootstrap_token, identity} ──▶ one-time token → gateway id + credential
//!  GET  /v1/gateways/{id}/commands?wait=25 ────────▶ held until a command is queued or 25 s pass
//!  POST /v1/gateways/{id}/commands/{cid}/result ───▶ the command's outcome (idempotent by id)
//!  POST /v1/gateways/{id}/status ──────────────────▶ every few seconds and after each change
//! ```
//!
//! Gateway requests carry `Authorization: Bearer CREDENTIAL`; operator requests carry the
//! operator token. Errors are `{"error": {"code": "...", "message": "..."}}` with a 4xx/5xx status.
//!
//! Compatibility rule: within `/v1` fields are only added, never removed or retyped; readers
//! ignore fields they do not know (no `deny_unknown_fields` here) and a command kind a gateway
//! does not know is answered with a `failed` result naming it, never dropped silently.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::LaunchInfo;
use crate::retention::RetentionPolicy;

/// Path prefix of this API version.
pub const PREFIX: &str = "/v1";

/// Longest long-poll a gateway asks for, seconds. Control planes clamp `wait` to this.
pub const MAX_POLL_WAIT_SECS: u64 = 60;

/// The one error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A machine-readable code (`bootstrap_token_invalid`, `unauthorized`, `not_found`, …) and a
/// sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Error codes with a meaning a client acts on.
pub mod codes {
    /// The bootstrap token is unknown or expired.
    pub const BOOTSTRAP_TOKEN_INVALID: &str = "bootstrap_token_invalid";
    /// The bootstrap token was already used by another registration.
    pub const BOOTSTRAP_TOKEN_USED: &str = "bootstrap_token_used";
    /// Missing or wrong credential / operator token.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// No such gateway, disk or command.
    pub const NOT_FOUND: &str = "not_found";
    /// The body does not parse or a field is out of range.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The request conflicts with the current state (disk already assigned elsewhere, …).
    pub const CONFLICT: &str = "conflict";
}

// ---------------------------------------------------------------------------------------------
// Secrets stay out of `Debug` (and so out of any log line that formats these types).

const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("bootstrap_token", &REDACTED)
            .field("hostname", &self.hostname)
            .field("version", &self.version)
            .field("backend", &self.backend)
            .field("data_port", &self.data_port)
            .field("identity", &self.identity)
            .finish()
    }
}

impl std::fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("gateway_id", &self.gateway_id)
            .field("credential", &REDACTED)
            .field("report_interval_secs", &self.report_interval_secs)
            .field("poll_wait_secs", &self.poll_wait_secs)
            .finish()
    }
}

impl std::fmt::Debug for AssignDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssignDisk")
            .field("disk_id", &self.disk_id)
            .field("size_bytes", &self.size_bytes)
            .field("agent_key", &REDACTED)
            .finish()
    }
}

impl std::fmt::Debug for AssignResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssignResponse")
            .field("gateway_id", &self.gateway_id)
            .field("disk_id", &self.disk_id)
            .field("size_bytes", &self.size_bytes)
            .field("agent_key", &REDACTED)
            .field("command_id", &self.command_id)
            .finish()
    }
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapToken")
            .field("token", &REDACTED)
            .field("expires_unix_ms", &self.expires_unix_ms)
            .finish()
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `assign_disk` carries an agent key in its args, `collect_diagnostics` may carry a
        // presigned URL (a signature and an STS token in its query).
        let redacted_args;
        let args: &dyn std::fmt::Debug = match self.kind.as_str() {
            kinds::ASSIGN_DISK => &REDACTED,
            kinds::COLLECT_DIAGNOSTICS => {
                redacted_args = redact_command_args(&self.args);
                &redacted_args
            }
            _ => &self.args,
        };
        f.debug_struct("Command")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("args", args)
            .field("issued_unix_ms", &self.issued_unix_ms)
            .finish()
    }
}

impl std::fmt::Debug for CollectDiagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectDiagnostics")
            .field("upload_url", &self.upload_url.as_deref().map(redact_url))
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// `url` without what grants access: the query (a presigned URL's signature, credential and
/// STS token) and any `user:password@`. What is left names the object, for people.
pub fn redact_url(url: &str) -> String {
    let (base, had_query) = match url.split_once(['?', '#']) {
        Some((b, _)) => (b, true),
        None => (url, false),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://{REDACTED}@{host}{path}"),
                None => base.to_string(),
            }
        }
        None => base.to_string(),
    };
    if had_query {
        format!("{base}?{REDACTED}")
    } else {
        base
    }
}

/// A command's args as they may be shown: agent keys redacted, URLs without their query.
pub fn redact_command_args(args: &serde_json::Value) -> serde_json::Value {
    let mut args = args.clone();
    if let Some(obj) = args.as_object_mut() {
        if let Some(key) = obj.get_mut("agent_key") {
            *key = serde_json::Value::String(REDACTED.into());
        }
        if let Some(serde_json::Value::String(url)) = obj.get_mut("upload_url") {
            *url = redact_url(url);
        }
    }
    args
}

// ---------------------------------------------------------------------------------------------
// Registration

/// `POST /v1/register`: the gateway's first call, with the one-time bootstrap token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub bootstrap_token: String,
    /// Host name of the gateway VM (for people).
    pub hostname: String,
    /// `sync-gateway` version.
    pub version: String,
    /// Backend kind: `local`, `aws`, `aliyun`.
    pub backend: String,
    /// The data port agents connect to.
    pub data_port: u16,
    /// The cloud's signed instance identity document, when the backend provides one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityDocument>,
}

/// A cloud instance identity document and its signature, passed through as the cloud gave them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityDocument {
    /// `aws` or `aliyun`.
    pub provider: String,
    pub document: String,
    pub signature: String,
}

/// Answer to a registration: who the gateway is from now on.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub gateway_id: String,
    /// The gateway's own bearer credential. Shown once; the control plane keeps only a hash.
    pub credential: String,
    /// How often the gateway should report when nothing changes.
    pub report_interval_secs: u64,
    /// How long a command poll may be held open.
    pub poll_wait_secs: u64,
}

// ---------------------------------------------------------------------------------------------
// Commands

/// `GET /v1/gateways/{id}/commands?wait=SECS`: the commands the gateway has not yet answered,
/// oldest first. A command stays in this list (and may be delivered again) until its result
/// is posted, so the gateway must execute each id at most once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandBatch {
    pub commands: Vec<Command>,
}

/// One command. `args` is interpreted by `kind` (see [`Action::parse`]); keeping it raw on the
/// wire lets a gateway answer a kind it does not know instead of failing the whole batch.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub args: serde_json::Value,
    /// When the operator issued it, milliseconds since the Unix epoch.
    #[serde(default)]
    pub issued_unix_ms: u64,
}

/// Command kinds, as they appear in [`Command::kind`].
pub mod kinds {
    pub const ASSIGN_DISK: &str = "assign_disk";
    pub const REVOKE_AGENT: &str = "revoke_agent";
    pub const SNAPSHOT_NOW: &str = "snapshot_now";
    pub const SET_POLICY: &str = "set_policy";
    pub const TEST_LAUNCH: &str = "test_launch";
    pub const CUTOVER: &str = "cutover";
    pub const FINALIZE: &str = "finalize";
    pub const COLLECT_DIAGNOSTICS: &str = "collect_diagnostics";
    /// Every kind this version defines.
    pub const ALL: &[&str] = &[
        ASSIGN_DISK,
        REVOKE_AGENT,
        SNAPSHOT_NOW,
        SET_POLICY,
        TEST_LAUNCH,
        CUTOVER,
        FINALIZE,
        COLLECT_DIAGNOSTICS,
    ];
}

/// `assign_disk`: provision a volume for the disk and accept the agent holding `agent_key`.
/// Assigning a disk the gateway already has rotates its key (the size must not change).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignDisk {
    pub disk_id: String,
    pub size_bytes: u64,
    /// 32-byte replication key, 64 hex digits.
    pub agent_key: String,
}

/// `revoke_agent`, `snapshot_now`, `cutover`, `finalize`: one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRef {
    pub disk_id: String,
}

/// `test_launch`: start an instance from a snapshot while replication goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestLaunch {
    pub disk_id: String,
    /// Which snapshot; absent: the one of the latest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
}

/// `set_policy`: gateway-wide settings. An absent field leaves that setting unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Policy {
    /// Snapshot retention tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionPolicy>,
    /// Cap on the replication bandwidth of each disk, bytes per second (0: no cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit_bytes_per_sec: Option<u64>,
}

/// `collect_diagnostics`: bundle the gateway's recent logs, redacted config, state, versions
/// and status into a `.tar.gz` and upload it; the result names the object (see
/// [`crate::diagnostics`]).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CollectDiagnostics {
    /// A presigned PUT URL (e.g. an OSS presigned URL, made without a `Content-Type`) that the
    /// bundle is uploaded to; it names the object. Absent: the bucket and prefix of the
    /// gateway's `[diagnostics]` config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_url: Option<String>,
    /// Key prefix in the configured bucket (default: `[diagnostics] oss_prefix`); a `/` is
    /// added when it does not end with one. Not with `upload_url`, which names its own object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
}

/// Longest accepted `upload_url` (a presigned URL with an STS token is about 2 KB).
pub const MAX_UPLOAD_URL_LEN: usize = 8192;
/// Longest accepted `key_prefix` (OSS keys are at most 1023 bytes; the file name needs ~80).
pub const MAX_KEY_PREFIX_LEN: usize = 512;

impl CollectDiagnostics {
    /// Checks the args the way both ends need them: an absolute http(s) URL with a host, a
    /// prefix that makes a plain relative key, not both.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.upload_url {
            if self.key_prefix.is_some() {
                return Err(
                    "give upload_url or key_prefix, not both: a presigned URL names \
                    its object itself"
                        .into(),
                );
            }
            if url.len() > MAX_UPLOAD_URL_LEN {
                return Err(format!(
                    "upload_url is longer than {MAX_UPLOAD_URL_LEN} bytes"
                ));
            }
            let uri: hyper::Uri = url
                .parse()
                .map_err(|e| format!("upload_url {}: {e}", redact_url(url)))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!(
                    "upload_url {}: expected an absolute http(s) URL (a presigned PUT URL)",
                    redact_url(url)
                ));
            }
            if matches!(uri.path(), "" | "/") {
                return Err(format!(
                    "upload_url {}: names no object (the path is empty)",
                    redact_url(url)
                ));
            }
        }
        if let Some(p) = &self.key_prefix {
            if p.len() > MAX_KEY_PREFIX_LEN {
                return Err(format!(
                    "key_prefix is longer than {MAX_KEY_PREFIX_LEN} bytes"
                ));
            }
            if p.starts_with('/')
                || p.chars().any(|c| c.is_control() || c == '\\')
                || p.split('/').any(|seg| seg == "." || seg == "..")
            {
                return Err(format!(
                    "key_prefix {p:?}: expected a relative key prefix like \
                     \"sync-gateway/diagnostics/\" (no leading '/', no '.' or '..' segments, \
                     no control characters or '\\')"
                ));
            }
        }
        Ok(())
    }
}

/// A command, parsed by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    AssignDisk(AssignDisk),
    RevokeAgent(DiskRef),
    SnapshotNow(DiskRef),
    SetPolicy(Policy),
    TestLaunch(TestLaunch),
    Cutover(DiskRef),
    Finalize(DiskRef),
    CollectDiagnostics(CollectDiagnostics),
}

impl Action {
    /// Parses a command's `args` by its `kind`.
    pub fn parse(cmd: &Command) -> Result<Action, String> {
        fn args<T: serde::de::DeserializeOwned>(cmd: &Command) -> Result<T, String> {
            serde_json::from_value(cmd.args.clone())
                .map_err(|e| format!("command {} ({}): bad args: {e}", cmd.id, cmd.kind))
        }
        Ok(match cmd.kind.as_str() {
            kinds::ASSIGN_DISK => Action::AssignDisk(args(cmd)?),
            kinds::REVOKE_AGENT => Action::RevokeAgent(args(cmd)?),
            kinds::SNAPSHOT_NOW => Action::SnapshotNow(args(cmd)?),
            kinds::SET_POLICY => Action::SetPolicy(args(cmd)?),
            kinds::TEST_LAUNCH => Action::TestLaunch(args(cmd)?),
            kinds::CUTOVER => Action::Cutover(args(cmd)?),
            kinds::FINALIZE => Action::Finalize(args(cmd)?),
            kinds::COLLECT_DIAGNOSTICS => {
                // Absent or null args: no URL, no prefix.
                let a: CollectDiagnostics = if cmd.args.is_null() {
                    CollectDiagnostics::default()
                } else {
                    args(cmd)?
                };
                a.validate()
                    .map_err(|e| format!("command {} ({}): bad args: {e}", cmd.id, cmd.kind))?;
                Action::CollectDiagnostics(a)
            }
            other => {
                return Err(format!(
                    "command {}: kind {other:?} is not supported by sync-gateway {}",
                    cmd.id,
                    env!("CARGO_PKG_VERSION")
                ))
            }
        })
    }

    /// The wire kind and args of this action.
    pub fn to_command(&self, id: String, issued_unix_ms: u64) -> Command {
        let (kind, args) = match self {
            Action::AssignDisk(a) => (kinds::ASSIGN_DISK, serde_json::to_value(a)),
            Action::RevokeAgent(a) => (kinds::REVOKE_AGENT, serde_json::to_value(a)),
            Action::SnapshotNow(a) => (kinds::SNAPSHOT_NOW, serde_json::to_value(a)),
            Action::SetPolicy(a) => (kinds::SET_POLICY, serde_json::to_value(a)),
            Action::TestLaunch(a) => (kinds::TEST_LAUNCH, serde_json::to_value(a)),
            Action::Cutover(a) => (kinds::CUTOVER, serde_json::to_value(a)),
            Action::Finalize(a) => (kinds::FINALIZE, serde_json::to_value(a)),
            Action::CollectDiagnostics(a) => (kinds::COLLECT_DIAGNOSTICS, serde_json::to_value(a)),
        };
        Command {
            id,
            kind: kind.to_string(),
            args: args.unwrap_or(serde_json::Value::Null),
            issued_unix_ms,
        }
    }

    /// The disk the action concerns, if one.
    pub fn disk_id(&self) -> Option<&str> {
        match self {
            Action::AssignDisk(a) => Some(&a.disk_id),
            Action::RevokeAgent(d)
            | Action::SnapshotNow(d)
            | Action::Cutover(d)
            | Action::Finalize(d) => Some(&d.disk_id),
            Action::TestLaunch(t) => Some(&t.disk_id),
            Action::SetPolicy(_) | Action::CollectDiagnostics(_) => None,
        }
    }
}

/// Outcome of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    Succeeded,
    Failed,
}

/// `POST /v1/gateways/{id}/commands/{command_id}/result`. Posting the same result again is
/// harmless (the gateway re-posts after a restart until one is accepted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command_id: String,
    pub outcome: CommandOutcome,
    /// What went wrong, or a short summary.
    #[serde(default)]
    pub message: String,
    /// Kind-specific output: `{"snapshot": SnapshotSummary}` for `snapshot_now`,
    /// `{"launch": LaunchInfo}` for launches, `{"diagnostics": DiagnosticsBundle}` for
    /// `collect_diagnostics`, `{}` otherwise.
    #[serde(default)]
    pub output: serde_json::Value,
    pub finished_unix_ms: u64,
}

/// Where a `collect_diagnostics` bundle went: `CommandResult.output.diagnostics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagnosticsBundle {
    /// The object key: in the configured bucket, or the presigned URL's path (percent-decoded,
    /// without the leading `/`; with path-style URLs it starts with the bucket).
    pub object_key: String,
    /// The bucket, when the gateway uploaded to its configured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// The object's URL without any query (nothing in it grants access).
    pub url: String,
    /// `diagnostics-<gateway>-<UTC time>.tar.gz`; its top directory has the same name.
    pub file_name: String,
    pub size_bytes: u64,
    /// SHA-256 of the archive, hex.
    pub sha256: String,
}

// ---------------------------------------------------------------------------------------------
// Status

/// `POST /v1/gateways/{id}/status`: the gateway's whole state at `reported_unix_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub gateway: GatewayStatus,
    pub disks: Vec<DiskStatus>,
    /// Instances launched by this gateway (test launches and cutovers), oldest first.
    #[serde(default)]
    pub launches: Vec<LaunchInfo>,
}

/// Per-gateway figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub gateway_id: String,
    pub version: String,
    pub hostname: String,
    pub backend: String,
    pub data_port: u16,
    pub reported_unix_ms: u64,
    pub started_unix_ms: u64,
    pub uptime_secs: u64,
    /// Process CPU use over the last report interval, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory of the gateway process.
    pub memory_rss_bytes: u64,
    /// Memory of the machine: total and available.
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// Space of the filesystem holding the data dir.
    pub data_free_bytes: u64,
    pub data_total_bytes: u64,
    /// Agents connected now.
    pub open_sessions: u64,
    /// Effective policy.
    pub policy: Policy,
    /// Reports dropped because the queue was full while the control plane was unreachable.
    #[serde(default)]
    pub reports_dropped: u64,
    /// Where the gateway runs in its cloud and how its cloud API calls go (cloud backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<CloudStatus>,
}

/// The gateway's place in its cloud, and the health of its calls to the cloud's API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CloudStatus {
    /// `aws` or `aliyun`.
    pub provider: String,
    pub region: String,
    pub availability_zone: String,
    /// The gateway VM's own instance id.
    pub instance_id: String,
    /// API calls retried so far (throttling, 5xx, timeouts, eventual consistency).
    pub api_retries: u64,
    /// Of those, the ones the cloud throttled.
    pub api_throttled: u64,
    /// The error behind the latest retry or failed call, with the cloud's code and request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_last_error: Option<String>,
    /// Cloud snapshots that failed and were taken again.
    #[serde(default)]
    pub snapshots_retried: u64,
}

/// Replication state of a disk, as the console shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// Assigned; no agent has sent anything yet.
    Initiating,
    /// An agent is connected and the first checkpoint has not been reached.
    InitialSync,
    /// At a checkpoint: everything the agent sent is in a snapshot.
    Continuous,
    /// An agent is streaming changes made since the last checkpoint.
    Backlog,
    /// A snapshot's content is still being captured.
    CreatingSnapshot,
    /// An agent is comparing block hashes with the volume (delta resync).
    Rescan,
    /// Writes are failing on the volume, or received data is not being made durable.
    Stalled,
    /// No agent is connected and the last pass did not reach a checkpoint.
    Disconnected,
    /// Replication is stopped: the key was revoked, or the disk was cut over or finalized.
    Paused,
}

impl DiskState {
    /// Every state, in the order of the table in [`crate::server::disk::Disk::progress`].
    pub const ALL: &'static [DiskState] = &[
        DiskState::Paused,
        DiskState::Stalled,
        DiskState::Rescan,
        DiskState::CreatingSnapshot,
        DiskState::InitialSync,
        DiskState::Backlog,
        DiskState::Disconnected,
        DiskState::Initiating,
        DiskState::Continuous,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::Initiating => "initiating",
            DiskState::InitialSync => "initial-sync",
            DiskState::Continuous => "continuous",
            DiskState::Backlog => "backlog",
            DiskState::CreatingSnapshot => "creating-snapshot",
            DiskState::Rescan => "rescan",
            DiskState::Stalled => "stalled",
            DiskState::Disconnected => "disconnected",
            DiskState::Paused => "paused",
        }
    }
}

/// Where a disk is in its life on this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DiskPhase {
    /// Replicating (or waiting for its agent).
    #[default]
    Replicating,
    /// The agent key was revoked; a new assignment resumes.
    Revoked,
    /// Cut over: replication stopped, the volume is kept until finalize.
    CutOver,
    /// Finalized: the volume is released; snapshots are kept by the retention policy.
    Finalized,
}

/// Per-disk figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub disk_id: String,
    pub state: DiskState,
    pub phase: DiskPhase,
    pub connected: bool,
    /// Size of the source disk.
    pub bytes_total: u64,
    /// Bytes of the disk that are replicated as of the current pass (all of it at a checkpoint).
    pub bytes_replicated: u64,
    /// Bytes of the disk the current pass has still to cover (0 at a checkpoint).
    pub bytes_backlogged: u64,
    /// Payload bytes received from agents since the gateway started (as sent: compressed).
    pub bytes_received: u64,
    /// Disk bytes written or zeroed per second over the last report interval.
    pub throughput_bytes_per_sec: u64,
    /// Time to cover the backlog at the current throughput; absent when idle or unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
    /// Age of the newest consistent point (the recovery point a launch would use); absent before
    /// the first checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_secs: Option<u64>,
    /// Highest sequence number made durable.
    pub durable_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointSummary>,
    /// The newest snapshot of the disk, whatever its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot: Option<SnapshotSummary>,
    /// Every snapshot of the disk, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Protocol errors by code since the gateway started.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// The cloud volume the disk is replicated into (`vol-…`), on cloud backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
}

/// The newest checkpoint of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSummary {
    pub seq: u64,
    pub label: String,
    pub snapshot_id: String,
    pub created_unix_ms: u64,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub id: String,
    pub label: String,
    /// `pending`, `completed` or `failed`.
    pub state: String,
    pub created_unix_ms: u64,
    pub checkpoint_seq: u64,
}

impl From<&crate::backend::SnapshotInfo> for SnapshotSummary {
    fn from(s: &crate::backend::SnapshotInfo) -> Self {
        SnapshotSummary {
            id: s.id.clone(),
            label: s.label.clone(),
            state: s.state.as_str().to_string(),
            created_unix_ms: s.created_unix_ms,
            checkpoint_seq: s.checkpoint_seq,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operator API (sync-control)

/// `POST /v1/bootstrap-tokens` answer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapToken {
    pub token: String,
    pub expires_unix_ms: u64,
}

/// `POST /v1/disks`: assign a disk to a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignRequest {
    pub gateway_id: String,
    pub disk_id: String,
    pub size_bytes: u64,
}

/// Answer to an assignment: the key to give the agent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignResponse {
    pub gateway_id: String,
    pub disk_id: String,
    pub size_bytes: u64,
    /// 64 hex digits: write it to the agent's `--key-file`.
    pub agent_key: String,
    pub command_id: String,
}

/// `POST /v1/disks/{disk_id}/test-launch` body (optional).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LaunchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
}

/// A queued command, as the operator API answers when it creates one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRef {
    pub command_id: String,
    pub gateway_id: String,
    pub kind: String,
}

/// Where a command is, as `GET /v1/commands/{command_id}` and the status show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Waiting for the gateway's next poll.
    Queued,
    /// Handed to the gateway; no result yet.
    Delivered,
    Succeeded,
    Failed,
}

/// A command and its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandView {
    pub command_id: String,
    pub gateway_id: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub state: CommandState,
    pub issued_unix_ms: u64,
    /// How many times it was handed to the gateway.
    pub deliveries: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CommandResult>,
}

/// A registered gateway, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayView {
    pub gateway_id: String,
    pub hostname: String,
    pub registered_unix_ms: u64,
    /// Last status report received, milliseconds since the Unix epoch (0: none yet).
    pub last_seen_unix_ms: u64,
    /// Whether it reported or polled recently.
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityDocument>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<GatewayStatus>,
}

/// A disk assigned through the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskView {
    pub disk_id: String,
    pub gateway_id: String,
    pub size_bytes: u64,
    pub assigned_unix_ms: u64,
    /// The gateway's latest report of the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DiskStatus>,
}

/// `GET /v1/status`: everything the console shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub gateways: Vec<GatewayView>,
    pub disks: Vec<DiskView>,
    /// Launches reported by every gateway, with the gateway that made them.
    pub launches: Vec<LaunchView>,
    /// The most recent commands, newest first.
    pub commands: Vec<CommandView>,
}

/// A launch and its gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchView {
    pub gateway_id: String,
    #[serde(flatten)]
    pub launch: LaunchInfo,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_the_wire_command() {
        let actions = [
            Action::AssignDisk(AssignDisk {
                disk_id: "d".into(),
                size_bytes: 4096,
                agent_key: "00".repeat(32),
            }),
            Action::RevokeAgent(DiskRef {
                disk_id: "d".into(),
            }),
            Action::SnapshotNow(DiskRef {
                disk_id: "d".into(),
            }),
            Action::SetPolicy(Policy {
                retention: Some(RetentionPolicy::default()),
                bandwidth_limit_bytes_per_sec: Some(1),
            }),
            Action::TestLaunch(TestLaunch {
                disk_id: "d".into(),
                snapshot_id: None,
            }),
            Action::Cutover(DiskRef {
                disk_id: "d".into(),
            }),
            Action::Finalize(DiskRef {
                disk_id: "d".into(),
            }),
            Action::CollectDiagnostics(CollectDiagnostics {
                upload_url: Some("https://b.example.com/k?x-oss-signature=s".into()),
                key_prefix: None,
            }),
        ];
        assert_eq!(actions.len(), kinds::ALL.len());
        for a in actions {
            let cmd = a.to_command("c1".into(), 7);
            assert!(kinds::ALL.contains(&cmd.kind.as_str()));
            let json = serde_json::to_string(&cmd).unwrap();
            let back: Command = serde_json::from_str(&json).unwrap();
            assert_eq!(Action::parse(&back).unwrap(), a);
        }
    }

    #[test]
    fn an_unknown_kind_or_bad_args_is_an_error_naming_the_command() {
        let cmd = Command {
            id: "c9".into(),
            kind: "reboot_gateway".into(),
            args: serde_json::json!({}),
            issued_unix_ms: 0,
        };
        let e = Action::parse(&cmd).unwrap_err();
        assert!(e.contains("c9") && e.contains("reboot_gateway"), "{e}");
        let cmd = Command {
            kind: kinds::ASSIGN_DISK.into(),
            args: serde_json::json!({"disk_id": 5}),
            ..cmd
        };
        let e = Action::parse(&cmd).unwrap_err();
        assert!(e.contains("bad args"), "{e}");
    }

    #[test]
    fn collect_diagnostics_args_are_optional_and_checked() {
        let cmd = |args: serde_json::Value| Command {
            id: "c1".into(),
            kind: kinds::COLLECT_DIAGNOSTICS.into(),
            args,
            issued_unix_ms: 0,
        };
        for empty in [serde_json::Value::Null, serde_json::json!({})] {
            assert_eq!(
                Action::parse(&cmd(empty)).unwrap(),
                Action::CollectDiagnostics(CollectDiagnostics::default())
            );
        }
        let ok = serde_json::json!({"key_prefix": "support/case-17/"});
        assert!(Action::parse(&cmd(ok)).is_ok());
        for (bad, why) in [
            (
                serde_json::json!({"upload_url": "ftp://h/k"}),
                "absolute http(s)",
            ),
            (
                serde_json::json!({"upload_url": "/just/a/path"}),
                "absolute http(s)",
            ),
            (
                serde_json::json!({"upload_url": "http://h/?x=1"}),
                "names no object",
            ),
            (
                serde_json::json!({"upload_url": "http://h/k", "key_prefix": "p/"}),
                "not both",
            ),
            (serde_json::json!({"key_prefix": "/abs/"}), "relative"),
            (serde_json::json!({"key_prefix": "a/../b/"}), "relative"),
            (serde_json::json!({"upload_url": 7}), "bad args"),
        ] {
            let e = Action::parse(&cmd(bad.clone())).unwrap_err();
            assert!(e.contains(why) && e.contains("c1"), "{bad}: {e}");
        }
        // The errors never echo a URL's query.
        let e = Action::parse(&cmd(serde_json::json!({
            "upload_url": "gopher://h/k?x-oss-security-token=TOKEN123"
        })))
        .unwrap_err();
        assert!(!e.contains("TOKEN123"), "{e}");
    }

    #[test]
    fn urls_lose_their_query_and_user_info_when_shown() {
        assert_eq!(
            redact_url("https://b.oss-cn-hangzhou.aliyuncs.com/k/x.tar.gz?x-oss-signature=abc"),
            "https://b.oss-cn-hangzhou.aliyuncs.com/k/x.tar.gz?<redacted>"
        );
        assert_eq!(
            redact_url("http://user:pw@127.0.0.1:9/b/k"),
            "http://<redacted>@127.0.0.1:9/b/k"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:9/b/k"),
            "http://127.0.0.1:9/b/k"
        );
        let args = redact_command_args(&serde_json::json!({
            "upload_url": "http://h/k?x-oss-security-token=TOKEN", "agent_key": "ab"
        }));
        assert_eq!(args["upload_url"], "http://h/k?<redacted>");
        assert_eq!(args["agent_key"], REDACTED);
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let secret = "5ec2e7".repeat(8);
        let cmd = Action::AssignDisk(AssignDisk {
            disk_id: "d".into(),
            size_bytes: 1,
            agent_key: secret.clone(),
        })
        .to_command("c".into(), 0);
        let diag = Action::CollectDiagnostics(CollectDiagnostics {
            upload_url: Some(format!(
                "http://127.0.0.1:1/b/k?x-oss-security-token={secret}"
            )),
            key_prefix: None,
        });
        let Action::CollectDiagnostics(args) = &diag else {
            unreachable!()
        };
        let shown = [
            format!("{cmd:?}"),
            format!("{:?}", diag.to_command("c".into(), 0)),
            format!("{args:?}"),
            format!(
                "{:?}",
                RegisterRequest {
                    bootstrap_token: secret.clone(),
                    hostname: "h".into(),
                    version: "v".into(),
                    backend: "local".into(),
                    data_port: 1,
                    identity: None,
                }
            ),
            format!(
                "{:?}",
                RegisterResponse {
                    gateway_id: "g".into(),
                    credential: secret.clone(),
                    report_interval_secs: 1,
                    poll_wait_secs: 1,
                }
            ),
            format!(
                "{:?}",
                AssignResponse {
                    gateway_id: "g".into(),
                    disk_id: "d".into(),
                    size_bytes: 1,
                    agent_key: secret.clone(),
                    command_id: "c".into(),
                }
            ),
            format!(
                "{:?}",
                BootstrapToken {
                    token: secret.clone(),
                    expires_unix_ms: 0,
                }
            ),
        ];
        for s in shown {
            assert!(!s.contains(&secret) && s.contains(REDACTED), "{s}");
        }
    }

    #[test]
    fn disk_states_serialize_as_the_console_names() {
        assert_eq!(DiskState::ALL.len(), 9);
        for &s in DiskState::ALL {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
    }
}
