//! Carries out one command from the control plane and says how it went.

use crate::api::{Action, Command, CommandOutcome, CommandResult, SnapshotSummary};
use crate::diagnostics::Collector;
use crate::server::control::parse_agent_key;
use crate::server::disk::unix_ms;
use crate::server::Control;

/// What commands act on.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub control: &'a Control,
    /// Builds and uploads `collect_diagnostics` bundles.
    pub diagnostics: &'a Collector,
    /// The gateway's id at its control plane (names diagnostics bundles).
    pub gateway_id: &'a str,
}

/// Whether carrying out `kind` again after a stop that cut it short ends in the same state
/// as once. Those are repeated; the others (a launch or snapshot would be made twice) are
/// reported failed so the operator decides. A diagnostics bundle cut short is simply made
/// again (a new one, under a new name).
pub fn safe_to_repeat(kind: &str) -> bool {
    use crate::api::kinds::*;
    matches!(
        kind,
        ASSIGN_DISK | REVOKE_AGENT | SET_POLICY | FINALIZE | COLLECT_DIAGNOSTICS
    )
}

/// Carries out `cmd`. Never panics on bad args; the result says what went wrong.
pub async fn execute(ctx: &Context<'_>, cmd: &Command) -> CommandResult {
    let outcome = match Action::parse(cmd) {
        Ok(Action::CollectDiagnostics(args)) => ctx
            .diagnostics
            .collect(ctx.gateway_id, &cmd.id, &args)
            .await
            .map(|b| {
                let place = match &b.bucket {
                    Some(bucket) => format!("oss://{bucket}/{}", b.object_key),
                    None => b.url.clone(),
                };
                (
                    format!(
                        "diagnostics bundle {} uploaded to {place} ({} bytes, sha256 {})",
                        b.file_name, b.size_bytes, b.sha256
                    ),
                    serde_json::json!({ "diagnostics": b }),
                )
            })
            .map_err(|e| crate::cli::error_chain(&e)),
        Ok(action) => run(ctx.control, &cmd.id, action).await,
        Err(e) => Err(e),
    };
    let (outcome, message, output) = match outcome {
        Ok((message, output)) => (CommandOutcome::Succeeded, message, output),
        Err(message) => (CommandOutcome::Failed, message, serde_json::json!({})),
    };
    match outcome {
        CommandOutcome::Succeeded => {
            tracing::info!(command = %cmd.id, kind = %cmd.kind, %message, "command done")
        }
        CommandOutcome::Failed => {
            tracing::warn!(command = %cmd.id, kind = %cmd.kind, %message, "command failed")
        }
    }
    CommandResult {
        command_id: cmd.id.clone(),
        outcome,
        message,
        output,
        finished_unix_ms: unix_ms(),
    }
}

/// A result for a command a stop cut short and that is not safe to repeat.
pub fn interrupted(cmd: &Command) -> CommandResult {
    CommandResult {
        command_id: cmd.id.clone(),
        outcome: CommandOutcome::Failed,
        message: format!(
            "{} was interrupted by a gateway restart and is not repeated automatically \
             (it may have partly happened); check the status, then issue it again if needed",
            cmd.kind
        ),
        output: serde_json::json!({}),
        finished_unix_ms: unix_ms(),
    }
}

async fn run(
    control: &Control,
    id: &str,
    action: Action,
) -> Result<(String, serde_json::Value), String> {
    let e = |e: crate::server::control::ControlError| crate::cli::error_chain(&e);
    match action {
        Action::AssignDisk(a) => {
            let key = parse_agent_key(&a.disk_id, &a.agent_key).map_err(e)?;
            control
                .assign_disk(&a.disk_id, a.size_bytes, key)
                .await
                .map_err(e)?;
            Ok((
                format!("disk {} assigned ({} bytes)", a.disk_id, a.size_bytes),
                serde_json::json!({}),
            ))
        }
        Action::RevokeAgent(d) => {
            if !control.revoke(&d.disk_id) {
                return Err(format!("disk {} is not on this gateway", d.disk_id));
            }
            Ok((
                format!("agent key of disk {} revoked", d.disk_id),
                serde_json::json!({}),
            ))
        }
        Action::SnapshotNow(d) => {
            let label = format!("manual-{id}");
            let snap = control.snapshot_now(&d.disk_id, &label).await.map_err(e)?;
            let info = snap.info().clone();
            // Equal to a checkpoint only when nothing was written since it; mid-pass the
            // volume mixes old and new blocks (crash-consistent at best).
            let consistent = control.at_checkpoint(&d.disk_id, info.checkpoint_seq);
            let what = if consistent {
                "at the last checkpoint (consistent)"
            } else {
                "mid-pass: NOT a consistent point (an agent pass had not reached its checkpoint)"
            };
            Ok((
                format!(
                    "snapshot {} of disk {} initiated, {what}",
                    info.id, d.disk_id
                ),
                serde_json::json!({
                    "snapshot": SnapshotSummary::from(&info),
                    "consistent": consistent,
                }),
            ))
        }
        Action::SetPolicy(p) => {
            let now = control.set_policy(&p).map_err(e)?;
            Ok((
                "policy applied".into(),
                serde_json::json!({ "policy": now }),
            ))
        }
        Action::TestLaunch(t) => {
            let launched = control
                .test_launch(&t.disk_id, t.snapshot_id.as_deref())
                .await
                .map_err(e)?;
            Ok((
                format!("test instance {} launched", launched.instance_id),
                serde_json::json!({ "launch": launched }),
            ))
        }
        Action::Cutover(d) => {
            let (launched, note) = control.cutover(&d.disk_id).await.map_err(e)?;
            Ok((
                format!(
                    "instance {} launched from {note}; replication of {} stopped",
                    launched.instance_id, d.disk_id
                ),
                serde_json::json!({ "launch": launched }),
            ))
        }
        Action::Finalize(d) => {
            control.finalize(&d.disk_id).await.map_err(e)?;
            Ok((
                format!("disk {} finalized: staging volume released", d.disk_id),
                serde_json::json!({}),
            ))
        }
        Action::CollectDiagnostics(_) => {
            Err("collect_diagnostics is carried out by execute".into())
        }
    }
}
