#![allow(clippy::unwrap_used)]

use super::*;
use crate::api::{
    Action, AssignRequest, CommandOutcome, CommandResult, CommandState, DiskRef, IdentityDocument,
    RegisterRequest,
};
use crate::control_plane::state::*;

const T0: u64 = 1_700_000_000_000;
const LEASE: u64 = 30_000;

fn register_req(token: &str) -> RegisterRequest {
    RegisterRequest {
        bootstrap_token: token.into(),
        hostname: "gw-host".into(),
        version: "0.1.0".into(),
        backend: "local".into(),
        data_port: 7400,
        identity: Some(IdentityDocument {
            provider: "aws".into(),
            document: "{}".into(),
            signature: "sig".into(),
        }),
    }
}

fn with_gateway() -> (State, String, String) {
    let mut s = State::default();
    let t = s.issue_bootstrap_token(60, T0);
    let (gw, cred) = s.register(&register_req(&t.token), T0).unwrap();
    (s, gw, cred)
}

fn result(id: &str, outcome: CommandOutcome, msg: &str) -> CommandResult {
    CommandResult {
        command_id: id.into(),
        outcome,
        message: msg.into(),
        output: serde_json::json!({}),
        finished_unix_ms: T0,
    }
}

fn snapshot_now(disk: &str) -> Action {
    Action::SnapshotNow(DiskRef {
        disk_id: disk.into(),
    })
}

#[test]
fn a_bootstrap_token_is_one_time_and_expires() {
    let mut s = State::default();
    let t = s.issue_bootstrap_token(60, T0);
    assert_eq!(t.expires_unix_ms, T0 + 60_000);
    assert_eq!(t.token.len(), 64);
    // Only the hash is kept.
    assert!(!serde_json::to_string(&s).unwrap().contains(&t.token));
    assert!(s.bootstrap_tokens.contains_key(&hash_secret(&t.token)));

    assert!(matches!(
        s.register(&register_req("nope"), T0),
        Err(StoreError::TokenInvalid)
    ));
    let (gw, cred) = s.register(&register_req(&t.token), T0 + 1).unwrap();
    assert!(matches!(
        s.register(&register_req(&t.token), T0 + 2),
        Err(StoreError::TokenUsed)
    ));
    assert_eq!(s.gateway_of_credential(&cred), Some(gw.as_str()));
    assert_eq!(s.gateway_of_credential("wrong"), None);
    let json = serde_json::to_string(&s).unwrap();
    assert!(!json.contains(&cred), "the credential is stored hashed");
    assert!(
        json.contains("\"signature\""),
        "the identity document is kept"
    );

    let late = s.issue_bootstrap_token(60, T0);
    assert!(matches!(
        s.register(&register_req(&late.token), T0 + 60_000),
        Err(StoreError::TokenInvalid)
    ));
    // Issuing forgets expired tokens.
    s.issue_bootstrap_token(1, T0 + 120_000);
    assert_eq!(s.bootstrap_tokens.len(), 1);
}

#[test]
fn commands_are_redelivered_after_the_lease_and_not_before() {
    let (mut s, gw, _) = with_gateway();
    let a = s.queue(&gw, &snapshot_now("d1"), T0).unwrap();
    let b = s.queue(&gw, &snapshot_now("d2"), T0 + 1).unwrap();

    let d = s.poll(&gw, T0 + 10, LEASE).unwrap();
    let ids: Vec<_> = d.commands.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        [a.command_id.as_str(), b.command_id.as_str()],
        "oldest first"
    );
    assert_eq!(d.next_due_unix_ms, Some(T0 + 10 + LEASE));

    let d = s.poll(&gw, T0 + 10 + LEASE - 1, LEASE).unwrap();
    assert!(d.commands.is_empty(), "still leased");
    assert_eq!(d.next_due_unix_ms, Some(T0 + 10 + LEASE));

    s.record_result(
        &gw,
        &b.command_id,
        result(&b.command_id, CommandOutcome::Succeeded, ""),
        T0,
    )
    .unwrap();
    let d = s.poll(&gw, T0 + 10 + LEASE, LEASE).unwrap();
    assert_eq!(d.commands.len(), 1, "only the unanswered one comes back");
    assert_eq!(d.commands[0].id, a.command_id);
    let v = s.command(&a.command_id).unwrap();
    assert_eq!((v.state, v.deliveries), (CommandState::Delivered, 2));
}

#[test]
fn the_first_result_wins() {
    let (mut s, gw, _) = with_gateway();
    let c = s.queue(&gw, &snapshot_now("d1"), T0).unwrap();
    let id = c.command_id.as_str();
    assert!(matches!(
        s.record_result(
            &gw,
            "cmd-x",
            result("cmd-x", CommandOutcome::Failed, ""),
            T0
        ),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.record_result(&gw, id, result("cmd-other", CommandOutcome::Failed, ""), T0),
        Err(StoreError::BadRequest(_))
    ));
    assert!(s
        .record_result(&gw, id, result(id, CommandOutcome::Failed, "first"), T0)
        .unwrap());
    assert!(!s
        .record_result(&gw, id, result(id, CommandOutcome::Succeeded, "second"), T0)
        .unwrap());
    let v = s.command(id).unwrap();
    assert_eq!(v.state, CommandState::Failed);
    assert_eq!(v.result.unwrap().message, "first");
    assert!(s
        .poll(&gw, T0 + 10 * LEASE, LEASE)
        .unwrap()
        .commands
        .is_empty());
}

#[test]
fn assignment_rules_and_key_redaction() {
    let (mut s, gw, _) = with_gateway();
    let req = |gw: &str, disk: &str, size: u64| AssignRequest {
        gateway_id: gw.into(),
        disk_id: disk.into(),
        size_bytes: size,
    };
    assert!(matches!(
        s.assign(&req(&gw, "../x", 4096), T0),
        Err(StoreError::BadRequest(_))
    ));
    assert!(matches!(
        s.assign(&req(&gw, "d1", 0), T0),
        Err(StoreError::BadRequest(_))
    ));
    assert!(matches!(
        s.assign(&req("gw-none", "d1", 4096), T0),
        Err(StoreError::NotFound { .. })
    ));
    let first = s.assign(&req(&gw, "d1", 4096), T0).unwrap();
    assert_eq!(first.agent_key.len(), 64);
    let rotated = s.assign(&req(&gw, "d1", 4096), T0 + 5).unwrap();
    assert_ne!(first.agent_key, rotated.agent_key);
    assert_eq!(s.disks["d1"].agent_key, rotated.agent_key);
    assert_eq!(s.disks["d1"].assigned_unix_ms, T0);
    assert!(matches!(
        s.assign(&req(&gw, "d1", 8192), T0),
        Err(StoreError::Conflict(_))
    ));

    let t = s.issue_bootstrap_token(60, T0);
    let (other, _) = s.register(&register_req(&t.token), T0).unwrap();
    assert!(matches!(
        s.assign(&req(&other, "d1", 4096), T0),
        Err(StoreError::Conflict(_))
    ));

    // The gateway gets the key; views do not show it.
    let delivered = s.poll(&gw, T0, LEASE).unwrap();
    assert_eq!(
        delivered.commands[1].args["agent_key"],
        rotated.agent_key.as_str()
    );
    let view = s.command(&rotated.command_id).unwrap();
    assert_eq!(view.args["agent_key"], REDACTED);
    let status = serde_json::to_string(&s.status(T0, 15_000)).unwrap();
    assert!(!status.contains(&rotated.agent_key));

    // A presigned upload URL reaches the gateway whole; views show it without its query.
    let url = "http://127.0.0.1:9/b/k.tar.gz?x-oss-security-token=STS-TOKEN-1&x-oss-signature=S1";
    let diag = Action::CollectDiagnostics(crate::api::CollectDiagnostics {
        upload_url: Some(url.into()),
        key_prefix: None,
    });
    let r = s.queue(&gw, &diag, T0).unwrap();
    let delivered = s.poll(&gw, T0, LEASE).unwrap();
    let cmd = delivered
        .commands
        .iter()
        .find(|c| c.id == r.command_id)
        .unwrap();
    assert_eq!(cmd.args["upload_url"], url);
    let view = s.command(&r.command_id).unwrap();
    assert_eq!(
        view.args["upload_url"],
        "http://127.0.0.1:9/b/k.tar.gz?<redacted>"
    );
    let status = serde_json::to_string(&s.status(T0, 15_000)).unwrap();
    assert!(
        !status.contains("STS-TOKEN-1") && !status.contains("S1\""),
        "{status}"
    );

    assert!(matches!(
        s.queue_for_disk("nope", &snapshot_now("nope"), T0),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        s.queue_for_disk("d1", &snapshot_now("d1"), T0)
            .unwrap()
            .gateway_id,
        gw
    );
}

#[test]
fn finished_history_is_bounded_and_unfinished_commands_stay() {
    let (mut s, gw, _) = with_gateway();
    let pending = s.queue(&gw, &snapshot_now("keep"), T0).unwrap();
    for i in 0..MAX_FINISHED_COMMANDS + 20 {
        let c = s.queue(&gw, &snapshot_now("d"), T0 + i as u64).unwrap();
        let id = c.command_id;
        s.record_result(&gw, &id, result(&id, CommandOutcome::Succeeded, ""), T0)
            .unwrap();
    }
    assert_eq!(s.commands.len(), MAX_FINISHED_COMMANDS + 1);
    assert!(s.command(&pending.command_id).is_ok());
    let st = s.status(T0, 15_000);
    assert_eq!(st.commands.len(), STATUS_COMMANDS);
    assert!(
        st.commands[0].issued_unix_ms > st.commands[1].issued_unix_ms,
        "newest first"
    );
}

#[test]
fn online_follows_last_seen() {
    let (mut s, gw, _) = with_gateway();
    assert!(s.status(T0 + 15_000, 15_000).gateways[0].online);
    assert!(!s.status(T0 + 15_001, 15_000).gateways[0].online);
    s.poll(&gw, T0 + 20_000, LEASE).unwrap();
    assert!(s.status(T0 + 21_000, 15_000).gateways[0].online);
}

#[tokio::test]
async fn the_state_survives_a_reopen_and_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (token, gw) = store
        .update(|s| {
            let t = s.issue_bootstrap_token(60, T0);
            let (gw, _) = s.register(&register_req(&t.token), T0)?;
            s.assign(
                &AssignRequest {
                    gateway_id: gw.clone(),
                    disk_id: "d1".into(),
                    size_bytes: 4096,
                },
                T0,
            )?;
            Ok(((t.token, gw), true))
        })
        .await
        .unwrap();
    let before = store.read(|s| s.clone());
    drop(store);

    let path = dir.path().join(STATE_FILE);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let again = Store::open(dir.path()).unwrap();
    assert_eq!(again.read(|s| s.clone()), before);
    let used = again.update(|s| s.register(&register_req(&token), T0).map(|r| (r, true)));
    assert!(matches!(used.await, Err(StoreError::TokenUsed)));
    assert!(again.read(|s| s.disks["d1"].gateway_id == gw));

    std::fs::write(&path, b"{not json").unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Corrupt { .. })
    ));
    std::fs::write(&path, br#"{"version": 99}"#).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Version { found: 99, .. })
    ));
}
