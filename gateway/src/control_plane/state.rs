//! The control plane's state and the rules that change it.
//!
//! Secrets the control plane only has to recognise (bootstrap tokens, gateway credentials) are
//! stored as SHA-256 hex digests; agent keys are stored in clear because the operator may
//! assign them again. Every method takes the time as an argument, so tests drive the
//! redelivery lease and token expiry without sleeping.
//!
//! Command life (at-least-once: the gateway dedupes by id):
//!
//! ```text
//!  queued ──poll──▶ delivered ──result──▶ succeeded | failed   (first result wins)
//!                    │    ▲
//!                    └────┘ poll after the redelivery lease, no result yet
//! ```
//!
//! History is bounded: the newest [`MAX_FINISHED_COMMANDS`] finished commands are kept; an
//! unfinished command is never dropped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store::StoreError;
use crate::api::{
    self, Action, AssignRequest, AssignResponse, BootstrapToken, Command, CommandRef,
    CommandResult, CommandState, CommandView, ControlStatus, DiskView, GatewayView,
    IdentityDocument, LaunchView, RegisterRequest, StatusReport,
};

/// Finished commands kept for `GET /v1/commands/{id}` and the console.
pub const MAX_FINISHED_COMMANDS: usize = 1000;
/// Commands listed by `GET /v1/status`.
pub const STATUS_COMMANDS: usize = 50;
/// Format version of `state.json`. Frozen: bump only with a migration.
pub const STATE_VERSION: u32 = 1;
/// Shown instead of an agent key in views (the key is shown once, in the assign answer).
pub const REDACTED: &str = "<redacted>";

/// SHA-256 of a secret, hex: what the state keeps of tokens and credentials.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes, hex: tokens, credentials and agent keys.
pub fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 8]>()))
}

fn not_found(what: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        what,
        id: id.to_string(),
    }
}

/// A bootstrap token, by the hash of its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub created_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// The gateway that registered with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
}

/// A registered gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayRecord {
    pub gateway_id: String,
    pub hostname: String,
    pub version: String,
    pub backend: String,
    pub data_port: u16,
    pub credential_sha256: String,
    pub registered_unix_ms: u64,
    /// Last poll or report.
    pub last_seen_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityDocument>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_report: Option<StatusReport>,
}

/// A disk assigned through the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub disk_id: String,
    pub gateway_id: String,
    pub size_bytes: u64,
    pub assigned_unix_ms: u64,
    /// The current agent key, 64 hex digits.
    pub agent_key: String,
}

/// A command and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub gateway_id: String,
    pub command: Command,
    pub state: CommandState,
    pub deliveries: u64,
    pub last_delivery_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CommandResult>,
}

impl CommandRecord {
    fn finished(&self) -> bool {
        matches!(self.state, CommandState::Succeeded | CommandState::Failed)
    }

    /// When the command may be handed out (again): now when queued, at the end of the lease
    /// when delivered, never when finished.
    fn due_unix_ms(&self, lease_ms: u64) -> Option<u64> {
        match self.state {
            CommandState::Queued => Some(0),
            CommandState::Delivered => Some(self.last_delivery_unix_ms.saturating_add(lease_ms)),
            CommandState::Succeeded | CommandState::Failed => None,
        }
    }

    /// The operator's view; agent keys are redacted, URLs shown without their query (a
    /// presigned URL's signature and STS token).
    pub fn view(&self) -> CommandView {
        let args = api::redact_command_args(&self.command.args);
        CommandView {
            command_id: self.command.id.clone(),
            gateway_id: self.gateway_id.clone(),
            kind: self.command.kind.clone(),
            args,
            state: self.state,
            issued_unix_ms: self.command.issued_unix_ms,
            deliveries: self.deliveries,
            result: self.result.clone(),
        }
    }
}

/// What a poll hands out.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Deliverable commands, oldest first (now marked delivered).
    pub commands: Vec<Command>,
    /// When the next delivered-but-unanswered command becomes deliverable again.
    pub next_due_unix_ms: Option<u64>,
}

/// Everything the control plane knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// By SHA-256 hex of the token.
    #[serde(default)]
    pub bootstrap_tokens: BTreeMap<String, TokenRecord>,
    #[serde(default)]
    pub gateways: BTreeMap<String, GatewayRecord>,
    #[serde(default)]
    pub disks: BTreeMap<String, DiskRecord>,
    /// Oldest first.
    #[serde(default)]
    pub commands: Vec<CommandRecord>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            bootstrap_tokens: BTreeMap::new(),
            gateways: BTreeMap::new(),
            disks: BTreeMap::new(),
            commands: Vec::new(),
        }
    }
}

impl State {
    /// A new one-time bootstrap token valid for `ttl_secs`. Expired tokens are forgotten here.
    pub fn issue_bootstrap_token(&mut self, ttl_secs: u64, now: u64) -> BootstrapToken {
        self.bootstrap_tokens.retain(|_, t| t.expires_unix_ms > now);
        let token = random_secret();
        let expires_unix_ms = now.saturating_add(ttl_secs.saturating_mul(1000));
        self.bootstrap_tokens.insert(
            hash_secret(&token),
            TokenRecord {
                created_unix_ms: now,
                expires_unix_ms,
                used_by: None,
            },
        );
        BootstrapToken {
            token,
            expires_unix_ms,
        }
    }

    /// Spends a bootstrap token on a new gateway; answers its id and credential.
    pub fn register(
        &mut self,
        req: &RegisterRequest,
        now: u64,
    ) -> Result<(String, String), StoreError> {
        let record = self
            .bootstrap_tokens
            .get_mut(&hash_secret(&req.bootstrap_token))
            .filter(|t| t.expires_unix_ms > now)
            .ok_or(StoreError::TokenInvalid)?;
        if record.used_by.is_some() {
            return Err(StoreError::TokenUsed);
        }
        let mut gateway_id = random_id("gw-");
        while self.gateways.contains_key(&gateway_id) {
            gateway_id = random_id("gw-");
        }
        record.used_by = Some(gateway_id.clone());
        let credential = random_secret();
        self.gateways.insert(
            gateway_id.clone(),
            GatewayRecord {
                gateway_id: gateway_id.clone(),
                hostname: req.hostname.clone(),
                version: req.version.clone(),
                backend: req.backend.clone(),
                data_port: req.data_port,
                credential_sha256: hash_secret(&credential),
                registered_unix_ms: now,
                last_seen_unix_ms: now,
                identity: req.identity.clone(),
                latest_report: None,
            },
        );
        Ok((gateway_id, credential))
    }

    /// The gateway a credential belongs to.
    pub fn gateway_of_credential(&self, credential: &str) -> Option<&str> {
        let hash = hash_secret(credential);
        self.gateways
            .values()
            .find(|g| constant_time_eq(g.credential_sha256.as_bytes(), hash.as_bytes()))
            .map(|g| g.gateway_id.as_str())
    }

    fn gateway_mut(&mut self, gateway_id: &str) -> Result<&mut GatewayRecord, StoreError> {
        self.gateways
            .get_mut(gateway_id)
            .ok_or_else(|| not_found("gateway", gateway_id))
    }

    /// Hands out the gateway's deliverable commands, oldest first, and marks them delivered.
    pub fn poll(
        &mut self,
        gateway_id: &str,
        now: u64,
        lease_ms: u64,
    ) -> Result<Delivery, StoreError> {
        self.gateway_mut(gateway_id)?.last_seen_unix_ms = now;
        let mut commands = Vec::new();
        let mut next_due_unix_ms: Option<u64> = None;
        for c in self
            .commands
            .iter_mut()
            .filter(|c| c.gateway_id == gateway_id)
        {
            let Some(due) = c.due_unix_ms(lease_ms) else {
                continue;
            };
            if due <= now {
                c.state = CommandState::Delivered;
                c.deliveries += 1;
                c.last_delivery_unix_ms = now;
                commands.push(c.command.clone());
                let again = now.saturating_add(lease_ms);
                next_due_unix_ms = Some(next_due_unix_ms.map_or(again, |n| n.min(again)));
            } else {
                next_due_unix_ms = Some(next_due_unix_ms.map_or(due, |n| n.min(due)));
            }
        }
        Ok(Delivery {
            commands,
            next_due_unix_ms,
        })
    }

    /// Records a command's result. Answers whether anything changed: a repeated result of a
    /// finished command is accepted and ignored (the first one stays).
    pub fn record_result(
        &mut self,
        gateway_id: &str,
        command_id: &str,
        result: CommandResult,
        now: u64,
    ) -> Result<bool, StoreError> {
        if result.command_id != command_id {
            return Err(StoreError::BadRequest(format!(
                "the body names command {:?}, the path {command_id:?}",
                result.command_id
            )));
        }
        self.gateway_mut(gateway_id)?.last_seen_unix_ms = now;
        let c = self
            .commands
            .iter_mut()
            .find(|c| c.command.id == command_id && c.gateway_id == gateway_id)
            .ok_or_else(|| not_found("command", command_id))?;
        if c.finished() {
            return Ok(false);
        }
        c.state = match result.outcome {
            api::CommandOutcome::Succeeded => CommandState::Succeeded,
            api::CommandOutcome::Failed => CommandState::Failed,
        };
        c.result = Some(result);
        self.prune_commands();
        Ok(true)
    }

    /// Keeps the gateway's latest report.
    pub fn record_report(
        &mut self,
        gateway_id: &str,
        report: StatusReport,
        now: u64,
    ) -> Result<(), StoreError> {
        if report.gateway.gateway_id != gateway_id {
            return Err(StoreError::BadRequest(format!(
                "the report is of gateway {:?}, the path names {gateway_id:?}",
                report.gateway.gateway_id
            )));
        }
        let g = self.gateway_mut(gateway_id)?;
        g.last_seen_unix_ms = now;
        g.hostname.clone_from(&report.gateway.hostname);
        g.version.clone_from(&report.gateway.version);
        g.backend.clone_from(&report.gateway.backend);
        g.data_port = report.gateway.data_port;
        g.latest_report = Some(report);
        Ok(())
    }

    /// Queues a command for a gateway.
    pub fn queue(
        &mut self,
        gateway_id: &str,
        action: &Action,
        now: u64,
    ) -> Result<CommandRef, StoreError> {
        if !self.gateways.contains_key(gateway_id) {
            return Err(not_found("gateway", gateway_id));
        }
        let mut id = random_id("cmd-");
        while self.commands.iter().any(|c| c.command.id == id) {
            id = random_id("cmd-");
        }
        let command = action.to_command(id, now);
        let reference = CommandRef {
            command_id: command.id.clone(),
            gateway_id: gateway_id.to_string(),
            kind: command.kind.clone(),
        };
        self.commands.push(CommandRecord {
            gateway_id: gateway_id.to_string(),
            command,
            state: CommandState::Queued,
            deliveries: 0,
            last_delivery_unix_ms: 0,
            result: None,
        });
        self.prune_commands();
        Ok(reference)
    }

    /// Queues a command about an assigned disk, for the disk's gateway.
    pub fn queue_for_disk(
        &mut self,
        disk_id: &str,
        action: &Action,
        now: u64,
    ) -> Result<CommandRef, StoreError> {
        let gateway_id = self
            .disks
            .get(disk_id)
            .map(|d| d.gateway_id.clone())
            .ok_or_else(|| not_found("disk", disk_id))?;
        self.queue(&gateway_id, action, now)
    }

    /// Assigns a disk (or rotates its key on the same gateway) and queues `assign_disk`.
    pub fn assign(&mut self, req: &AssignRequest, now: u64) -> Result<AssignResponse, StoreError> {
        if !crate::protocol::valid_disk_id(&req.disk_id) {
            return Err(StoreError::BadRequest(format!(
                "disk id {:?} is invalid: 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                req.disk_id
            )));
        }
        if req.size_bytes == 0 {
            return Err(StoreError::BadRequest(
                "size_bytes must be greater than 0".into(),
            ));
        }
        if !self.gateways.contains_key(&req.gateway_id) {
            return Err(not_found("gateway", &req.gateway_id));
        }
        if let Some(d) = self.disks.get(&req.disk_id) {
            if d.gateway_id != req.gateway_id {
                return Err(StoreError::Conflict(format!(
                    "disk {:?} is assigned to gateway {:?}",
                    req.disk_id, d.gateway_id
                )));
            }
            if d.size_bytes != req.size_bytes {
                return Err(StoreError::Conflict(format!(
                    "disk {:?} has size {} bytes; a re-assignment cannot change it",
                    req.disk_id, d.size_bytes
                )));
            }
        }
        let agent_key = random_secret();
        let action = Action::AssignDisk(api::AssignDisk {
            disk_id: req.disk_id.clone(),
            size_bytes: req.size_bytes,
            agent_key: agent_key.clone(),
        });
        let reference = self.queue(&req.gateway_id, &action, now)?;
        let assigned_unix_ms = self
            .disks
            .get(&req.disk_id)
            .map_or(now, |d| d.assigned_unix_ms);
        self.disks.insert(
            req.disk_id.clone(),
            DiskRecord {
                disk_id: req.disk_id.clone(),
                gateway_id: req.gateway_id.clone(),
                size_bytes: req.size_bytes,
                assigned_unix_ms,
                agent_key: agent_key.clone(),
            },
        );
        Ok(AssignResponse {
            gateway_id: req.gateway_id.clone(),
            disk_id: req.disk_id.clone(),
            size_bytes: req.size_bytes,
            agent_key,
            command_id: reference.command_id,
        })
    }

    /// Drops the oldest finished commands beyond [`MAX_FINISHED_COMMANDS`].
    fn prune_commands(&mut self) {
        let finished = self.commands.iter().filter(|c| c.finished()).count();
        let mut excess = finished.saturating_sub(MAX_FINISHED_COMMANDS);
        if excess == 0 {
            return;
        }
        self.commands.retain(|c| {
            if excess > 0 && c.finished() {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }

    pub fn command(&self, command_id: &str) -> Result<CommandView, StoreError> {
        self.commands
            .iter()
            .find(|c| c.command.id == command_id)
            .map(CommandRecord::view)
            .ok_or_else(|| not_found("command", command_id))
    }

    /// Everything the console shows. A gateway is online when it polled or reported within
    /// `online_window_ms`.
    pub fn status(&self, now: u64, online_window_ms: u64) -> ControlStatus {
        let gateways = self
            .gateways
            .values()
            .map(|g| GatewayView {
                gateway_id: g.gateway_id.clone(),
                hostname: g.hostname.clone(),
                registered_unix_ms: g.registered_unix_ms,
                last_seen_unix_ms: g.last_seen_unix_ms,
                online: now.saturating_sub(g.last_seen_unix_ms) <= online_window_ms,
                identity: g.identity.clone(),
                status: g.latest_report.as_ref().map(|r| r.gateway.clone()),
            })
            .collect();
        let reported = |gateway_id: &str, disk_id: &str| {
            self.gateways
                .get(gateway_id)
                .and_then(|g| g.latest_report.as_ref())
                .and_then(|r| r.disks.iter().find(|d| d.disk_id == disk_id))
                .cloned()
        };
        let mut disks: Vec<DiskView> = self
            .disks
            .values()
            .map(|d| DiskView {
                disk_id: d.disk_id.clone(),
                gateway_id: d.gateway_id.clone(),
                size_bytes: d.size_bytes,
                assigned_unix_ms: d.assigned_unix_ms,
                status: reported(&d.gateway_id, &d.disk_id),
            })
            .collect();
        // Disks a gateway replicates from its own config were not assigned here; show them too.
        let mut launches = Vec::new();
        for g in self.gateways.values() {
            let Some(report) = &g.latest_report else {
                continue;
            };
            for d in &report.disks {
                if !self.disks.contains_key(&d.disk_id) {
                    disks.push(DiskView {
                        disk_id: d.disk_id.clone(),
                        gateway_id: g.gateway_id.clone(),
                        size_bytes: d.bytes_total,
                        assigned_unix_ms: 0,
                        status: Some(d.clone()),
                    });
                }
            }
            launches.extend(report.launches.iter().map(|l| LaunchView {
                gateway_id: g.gateway_id.clone(),
                launch: l.clone(),
            }));
        }
        disks.sort_by(|a, b| a.disk_id.cmp(&b.disk_id));
        let commands = self
            .commands
            .iter()
            .rev()
            .take(STATUS_COMMANDS)
            .map(CommandRecord::view)
            .collect();
        ControlStatus {
            gateways,
            disks,
            launches,
            commands,
        }
    }
}
