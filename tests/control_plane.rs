//! `sync-control` end to end: the real binary on 127.0.0.1:0, spoken to over real sockets as a
//! gateway (register, long-poll, results, reports), as an operator (HTTP and the CLI), and
//! checked against its own OpenAPI document.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;
#[path = "common/control.rs"]
mod control;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use control::{run_cli, ControlPlane, CONTROL_BIN};
use serde_json::{json, Value};
use sync_gateway::api::{self, codes, CommandState, CommandView, ControlStatus};
use sync_gateway::control_plane::{Auth, ROUTES};

fn poll(cp: &ControlPlane, gw: &str, cred: &str, wait: u64) -> Vec<Value> {
    let r = cp.request(
        "GET",
        &format!("/v1/gateways/{gw}/commands?wait={wait}"),
        Some(cred),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["commands"].as_array().unwrap().clone()
}

fn post_result(cp: &ControlPlane, gw: &str, cred: &str, id: &str, ok: bool, msg: &str) -> u16 {
    let body = json!({
        "command_id": id, "outcome": if ok { "succeeded" } else { "failed" },
        "message": msg, "output": {}, "finished_unix_ms": 1,
    });
    let path = format!("/v1/gateways/{gw}/commands/{id}/result");
    cp.request("POST", &path, Some(cred), Some(&body.to_string()))
        .status
}

fn assign(cp: &ControlPlane, gw: &str, disk: &str) -> Value {
    let body = json!({"gateway_id": gw, "disk_id": disk, "size_bytes": 1 << 20});
    let r = cp.operator("POST", "/v1/disks", Some(&body.to_string()));
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

fn report(gw: &str, disk: &str, state: &str) -> String {
    json!({
        "gateway": {
            "gateway_id": gw, "version": "0.0.0-test", "hostname": "h", "backend": "local",
            "data_port": 7400, "reported_unix_ms": 1, "started_unix_ms": 1, "uptime_secs": 9,
            "cpu_percent": 1.0, "memory_rss_bytes": 1, "memory_total_bytes": 2,
            "memory_available_bytes": 1, "data_free_bytes": 1, "data_total_bytes": 2,
            "open_sessions": 0, "policy": {}
        },
        "disks": [{
            "disk_id": disk, "state": state, "phase": "replicating", "connected": true,
            "bytes_total": 1 << 20, "bytes_replicated": 1 << 19, "bytes_backlogged": 0,
            "bytes_received": 1 << 19, "throughput_bytes_per_sec": 0, "durable_seq": 1
        }],
        "launches": [{
            "instance_id": "i-00000000000000aa", "test": true, "state": "running",
            "created_unix_ms": 1, "disks": [{"disk_id": disk, "snapshot_id": "snap-1"}]
        }]
    })
    .to_string()
}

#[test]
fn registration_tokens_are_one_time_and_credentials_are_per_gateway() {
    let cp = ControlPlane::start();
    let r = cp.register("not-a-token", "h");
    assert_eq!(
        (r.status, r.code()),
        (401, codes::BOOTSTRAP_TOKEN_INVALID.into())
    );

    let token = cp.bootstrap_token();
    let r = cp.register(&token, "h1");
    assert_eq!(r.status, 201, "{}", r.body);
    let j = r.json();
    let (gw, cred) = (
        j["gateway_id"].as_str().unwrap(),
        j["credential"].as_str().unwrap(),
    );
    assert_eq!(j["report_interval_secs"], 5);
    assert_eq!(j["poll_wait_secs"], 25);

    let r = cp.register(&token, "h1-again");
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), codes::BOOTSTRAP_TOKEN_USED);

    assert!(poll(&cp, gw, cred, 0).is_empty());
    let path = format!("/v1/gateways/{gw}/commands");
    let r = cp.request("GET", &path, Some("wrong-credential"), None);
    assert_eq!((r.status, r.code()), (401, codes::UNAUTHORIZED.into()));
    let r = cp.request("GET", &path, None, None);
    assert_eq!(r.status, 401);

    // Another gateway's credential does not work for this one.
    let (_, other_cred) = cp.register_gateway("h2");
    let r = cp.request("GET", &path, Some(&other_cred), None);
    assert_eq!(r.status, 403, "{}", r.body);

    // An expired token is invalid.
    let r = cp.operator("POST", "/v1/bootstrap-tokens", Some(r#"{"ttl_secs":1}"#));
    let short = r.json()["token"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        cp.register(&short, "late").code(),
        codes::BOOTSTRAP_TOKEN_INVALID
    );

    // The state file keeps hashes only, and is private.
    let state = std::fs::read_to_string(cp.state_dir.join("state.json")).unwrap();
    assert!(!state.contains(&token) && !state.contains(cred));
    use std::os::unix::fs::PermissionsExt;
    let mode = |f: &str| {
        std::fs::metadata(cp.state_dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!((mode("state.json"), mode("operator.token")), (0o600, 0o600));
    assert!(
        !cp.log_text().contains(&cp.token),
        "the operator token is never logged"
    );
}

#[test]
fn operator_routes_need_the_operator_token() {
    let cp = ControlPlane::start();
    let (gw, cred) = cp.register_gateway("h");
    for r in ROUTES.iter().filter(|r| r.auth == Auth::Operator) {
        let path = r
            .path
            .replace("{gateway_id}", &gw)
            .replace("{disk_id}", "d")
            .replace("{command_id}", "c");
        for bearer in [None, Some("wrong"), Some(cred.as_str())] {
            let a = cp.request(r.method, &path, bearer, Some("{}"));
            assert_eq!(
                a.status, 401,
                "{} {path} with {bearer:?}: {}",
                r.method, a.body
            );
            assert_eq!(a.code(), codes::UNAUTHORIZED);
        }
    }
    assert_eq!(cp.operator("GET", "/v1/status", None).status, 200);
}

#[test]
fn state_survives_a_restart() {
    let mut cp = ControlPlane::start();
    let (gw, cred) = cp.register_gateway("h");
    let used = cp.bootstrap_token();
    assert_eq!(cp.register(&used, "x").status, 201);
    let a = assign(&cp, &gw, "disk-1");
    let cmd = a["command_id"].as_str().unwrap().to_string();
    assert_eq!(poll(&cp, &gw, &cred, 0).len(), 1);
    assert_eq!(post_result(&cp, &gw, &cred, &cmd, true, "assigned"), 204);
    let r = cp.request(
        "POST",
        &format!("/v1/gateways/{gw}/status"),
        Some(&cred),
        Some(&report(&gw, "disk-1", "continuous")),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let pending = cp
        .operator("POST", "/v1/disks/disk-1/snapshot", None)
        .json();

    cp.restart();

    assert_eq!(cp.register(&used, "y").code(), codes::BOOTSTRAP_TOKEN_USED);
    let again = poll(&cp, &gw, &cred, 0);
    assert_eq!(again.len(), 1, "the unanswered command is still queued");
    assert_eq!(again[0]["id"], pending["command_id"]);
    let view: CommandView = serde_json::from_str(
        &cp.operator("GET", &format!("/v1/commands/{cmd}"), None)
            .body,
    )
    .unwrap();
    assert_eq!(view.state, CommandState::Succeeded);
    assert_eq!(view.result.unwrap().message, "assigned");
    let st: ControlStatus =
        serde_json::from_str(&cp.operator("GET", "/v1/status", None).body).unwrap();
    assert_eq!(st.disks.len(), 1);
    assert_eq!(st.disks[0].gateway_id, gw);
    assert_eq!(
        st.disks[0].status.as_ref().unwrap().state,
        api::DiskState::Continuous
    );
    assert_eq!(st.launches[0].launch.instance_id, "i-00000000000000aa");
    let g = st.gateways.iter().find(|g| g.gateway_id == gw).unwrap();
    assert_eq!(g.status.as_ref().unwrap().uptime_secs, 9);
    // Re-assigning to the same gateway rotates the key; another gateway may not take it.
    let rotated = assign(&cp, &gw, "disk-1");
    assert_ne!(rotated["agent_key"], a["agent_key"]);
    let (gw2, _) = cp.register_gateway("h2");
    let body = json!({"gateway_id": gw2, "disk_id": "disk-1", "size_bytes": 1 << 20}).to_string();
    let r = cp.operator("POST", "/v1/disks", Some(&body));
    assert_eq!((r.status, r.code()), (409, codes::CONFLICT.into()));
}

#[test]
fn a_long_poll_returns_as_soon_as_a_command_is_queued() {
    let cp = ControlPlane::start();
    let (gw, cred) = cp.register_gateway("h");
    // Nothing queued: held for `wait`, then empty.
    let t = Instant::now();
    assert!(poll(&cp, &gw, &cred, 1).is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );

    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = Instant::now();
            (poll(&cp, &gw, &cred, 30), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(500));
        let a = assign(&cp, &gw, "disk-1");
        let (cmds, took) = waiter.join().unwrap();
        assert_eq!(cmds.len(), 1);
        assert_eq!(cmds[0]["id"], a["command_id"]);
        assert_eq!(cmds[0]["kind"], api::kinds::ASSIGN_DISK);
        assert_eq!(cmds[0]["args"]["agent_key"], a["agent_key"]);
        assert!(took < Duration::from_secs(5), "held {took:?}");
    });
}

#[test]
fn an_unanswered_command_is_redelivered_after_the_lease_and_the_first_result_stays() {
    let cp = ControlPlane::start_with(&["--redeliver-after-secs", "2"]);
    let (gw, cred) = cp.register_gateway("h");
    let a = assign(&cp, &gw, "disk-1");
    let id = a["command_id"].as_str().unwrap();
    let t = Instant::now();
    assert_eq!(poll(&cp, &gw, &cred, 0).len(), 1);
    assert!(
        poll(&cp, &gw, &cred, 0).is_empty(),
        "leased: not delivered again at once"
    );
    // A held poll wakes when the lease runs out.
    let again = poll(&cp, &gw, &cred, 10);
    let took = t.elapsed();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["id"], id);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let view = cp
        .operator("GET", &format!("/v1/commands/{id}"), None)
        .json();
    assert_eq!(
        (view["state"].as_str(), view["deliveries"].as_u64()),
        (Some("delivered"), Some(2))
    );
    assert_eq!(view["args"]["agent_key"], "<redacted>");

    assert_eq!(post_result(&cp, &gw, &cred, id, false, "first"), 204);
    assert_eq!(post_result(&cp, &gw, &cred, id, true, "second"), 204);
    let view = cp
        .operator("GET", &format!("/v1/commands/{id}"), None)
        .json();
    assert_eq!(view["state"], "failed");
    assert_eq!(view["result"]["message"], "first");
    std::thread::sleep(Duration::from_millis(2100));
    assert!(
        poll(&cp, &gw, &cred, 0).is_empty(),
        "answered: never delivered again"
    );

    assert_eq!(post_result(&cp, &gw, &cred, "cmd-nope", true, ""), 404);
    let body = json!({"command_id": "other", "outcome": "succeeded", "finished_unix_ms": 1});
    let r = cp.request(
        "POST",
        &format!("/v1/gateways/{gw}/commands/{id}/result"),
        Some(&cred),
        Some(&body.to_string()),
    );
    assert_eq!((r.status, r.code()), (400, codes::BAD_REQUEST.into()));
}

/// A body that a route accepts, by operation id.
fn sample_body(op: &str, cp: &ControlPlane, gw: &str) -> Option<String> {
    Some(match op {
        "register" => json!({
            "bootstrap_token": cp.bootstrap_token(), "hostname": "h", "version": "v",
            "backend": "local", "data_port": 1
        })
        .to_string(),
        "postCommandResult" => {
            json!({"command_id": "no-such-command", "outcome": "succeeded", "finished_unix_ms": 1})
                .to_string()
        }
        "postStatus" => report(gw, "disk-x", "backlog"),
        "createBootstrapToken" => json!({"ttl_secs": 60}).to_string(),
        "assignDisk" => {
            json!({"gateway_id": gw, "disk_id": "disk-live", "size_bytes": 4096}).to_string()
        }
        "testLaunch" => json!({"snapshot_id": "snap-1"}).to_string(),
        "setPolicy" => json!({"bandwidth_limit_bytes_per_sec": 0}).to_string(),
        _ => return None,
    })
}

#[test]
fn the_openapi_document_matches_the_router() {
    let cp = ControlPlane::start();
    let (gw, cred) = cp.register_gateway("h");
    let r = cp.request("GET", "/v1/openapi.json", None, None);
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            let route = ROUTES
                .iter()
                .find(|r| r.method == method && r.path == path)
                .unwrap_or_else(|| panic!("{method} {path} is documented but not routed"));
            assert_eq!(op["operationId"], route.operation_id, "{method} {path}");
            let security = match route.auth {
                Auth::Public => json!([]),
                Auth::Gateway => json!([{"gatewayCredential": []}]),
                Auth::Operator => json!([{"operatorToken": []}]),
            };
            assert_eq!(op["security"], security, "{method} {path}");
            for p in path.split('/').filter(|s| s.starts_with('{')) {
                let name = p.trim_matches(|c| c == '{' || c == '}');
                let declared = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x["name"] == name && x["in"] == "path");
                assert!(
                    declared,
                    "{method} {path}: path parameter {name} not declared"
                );
            }
            documented.insert((method, path.clone()));
        }
    }
    let routed: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, routed);

    // Every documented operation answers (with valid auth) without 404-for-route or 405.
    for route in ROUTES {
        let path = route
            .path
            .replace("{gateway_id}", &gw)
            .replace("{disk_id}", "no-such-disk")
            .replace("{command_id}", "no-such-command");
        let bearer = match route.auth {
            Auth::Public => None,
            Auth::Gateway => Some(cred.as_str()),
            Auth::Operator => Some(cp.token.as_str()),
        };
        let body = sample_body(route.operation_id, &cp, &gw);
        let a = cp.request(route.method, &path, bearer, body.as_deref());
        let what = format!("{} {path}: HTTP {} {}", route.method, a.status, a.body);
        assert_ne!(a.status, 405, "{what}");
        assert!(a.status < 500, "{what}");
        if a.status == 404 {
            assert_eq!(a.code(), codes::NOT_FOUND, "{what}");
            let msg = a.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(!msg.starts_with("no route"), "{what}");
            assert!(
                path.contains("no-such-"),
                "only unknown resources are 404: {what}"
            );
        } else {
            assert!((200..300).contains(&a.status), "{what}");
            let documented =
                &doc["paths"][route.path][route.method.to_ascii_lowercase()]["responses"];
            assert!(
                documented.get(a.status.to_string()).is_some(),
                "{what}: status not documented"
            );
        }
    }
    // And the router refuses what is not in the table.
    let r = cp.operator("GET", "/v1/nothing", None);
    assert_eq!((r.status, r.code()), (404, codes::NOT_FOUND.into()));
    let r = cp.operator("DELETE", "/v1/status", None);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
}

#[test]
fn bad_input_gets_clear_errors_and_never_hurts_the_server() {
    let cp = ControlPlane::start();
    let (gw, cred) = cp.register_gateway("h");
    let cases: Vec<(&str, String, Option<String>, u16)> = vec![
        ("POST", "/v1/disks".into(), Some("{not json".into()), 400),
        (
            "POST",
            "/v1/disks".into(),
            Some(r#"{"gateway_id":"x"}"#.into()),
            400,
        ),
        (
            "POST",
            "/v1/disks".into(),
            Some(json!({"gateway_id": gw, "disk_id": "../etc", "size_bytes": 1}).to_string()),
            400,
        ),
        (
            "POST",
            "/v1/disks".into(),
            Some(json!({"gateway_id": gw, "disk_id": "d", "size_bytes": 0}).to_string()),
            400,
        ),
        (
            "POST",
            "/v1/disks".into(),
            Some(json!({"gateway_id": "gw-none", "disk_id": "d", "size_bytes": 1}).to_string()),
            404,
        ),
        ("POST", "/v1/disks".into(), Some("x".repeat(2 << 20)), 413),
        (
            "POST",
            "/v1/bootstrap-tokens".into(),
            Some(r#"{"ttl_secs":0}"#.into()),
            400,
        ),
        (
            "PUT",
            format!("/v1/gateways/{gw}/policy"),
            Some(r#"{"retention":{"tiers":[{"every_secs":0,"keep_secs":60}]}}"#.into()),
            400,
        ),
        (
            "PUT",
            "/v1/gateways/gw-none/policy".into(),
            Some("{}".into()),
            404,
        ),
        ("GET", "/v1/commands/%00%ff".into(), None, 404),
    ];
    for (method, path, body, want) in cases {
        let r = cp.operator(method, &path, body.as_deref());
        assert_eq!(r.status, want, "{method} {path}: {}", r.body);
        let code = r.code();
        assert!(!code.is_empty());
    }
    let r = cp.request(
        "GET",
        &format!("/v1/gateways/{gw}/commands?wait=soon"),
        Some(&cred),
        None,
    );
    assert_eq!((r.status, r.code()), (400, codes::BAD_REQUEST.into()));
    let r = cp.request(
        "POST",
        &format!("/v1/gateways/{gw}/status"),
        Some(&cred),
        Some(&report("gw-other", "d", "continuous")),
    );
    assert_eq!(
        r.status, 400,
        "a report must be of the gateway it is posted as"
    );
    let r = cp.request("POST", "/v1/register", None, Some("[]"));
    assert_eq!((r.status, r.code()), (400, codes::BAD_REQUEST.into()));
    assert_eq!(
        cp.request("GET", "/healthz", None, None).json(),
        json!({"ok": true})
    );
    let page = cp.request("GET", "/", None, None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"assign-gateway\"") && !page.body.contains("https://"));
}

#[test]
fn the_command_line_drives_the_control_plane() {
    let cp = ControlPlane::start();
    let token = cp.cli_ok(&["gateway", "bootstrap-token", "--ttl-secs", "600"]);
    let token = token.trim();
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token:?}"
    );
    let r = cp.register(token, "cli-host");
    assert_eq!(r.status, 201);
    let gw = r.json()["gateway_id"].as_str().unwrap().to_string();
    let cred = r.json()["credential"].as_str().unwrap().to_string();

    let list = cp.cli_ok(&["gateway", "list"]);
    assert!(list.contains(&gw) && list.contains("cli-host"), "{list}");

    let key_file = cp.state_dir.with_extension("key");
    let out = cp.cli_ok(&[
        "disk",
        "assign",
        "--gateway",
        &gw,
        "--disk-id",
        "disk-1",
        "--size",
        "1M",
        "--key-out",
        key_file.to_str().unwrap(),
    ]);
    let answer: api::AssignResponse = serde_json::from_str(&out).unwrap();
    assert_eq!(answer.agent_key.len(), 64);
    assert!(answer.agent_key.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(answer.size_bytes, 1 << 20);
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().trim(),
        answer.agent_key
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let st: ControlStatus = serde_json::from_str(&cp.cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(st.gateways[0].gateway_id, gw);
    assert_eq!(st.disks[0].disk_id, "disk-1");
    let table = cp.cli_ok(&["status"]);
    assert!(
        table.contains("disk-1") && table.contains("assign_disk"),
        "{table}"
    );

    let queued = cp.cli_ok(&["disk", "snapshot", "--disk-id", "disk-1", "--no-wait"]);
    let queued: api::CommandRef = serde_json::from_str(&queued).unwrap();
    assert_eq!(queued.kind, api::kinds::SNAPSHOT_NOW);
    let shown: CommandView =
        serde_json::from_str(&cp.cli_ok(&["command", "show", &queued.command_id])).unwrap();
    assert_eq!(shown.state, CommandState::Queued);

    // Waiting commands end with the gateway's result: success exits 0, failure non-zero.
    for (args, ok) in [
        (
            vec!["finalize", "--disk-id", "disk-1", "--timeout", "30"],
            true,
        ),
        (
            vec![
                "cutover",
                "--disk-id",
                "disk-1",
                "--test",
                "--timeout",
                "30",
            ],
            false,
        ),
    ] {
        std::thread::scope(|s| {
            let run = s.spawn(|| cp.cli(&args));
            let deadline = Instant::now() + Duration::from_secs(20);
            let cmd = loop {
                let cmds = poll(&cp, &gw, &cred, 2);
                if let Some(c) = cmds.iter().find(|c| {
                    c["kind"] != api::kinds::ASSIGN_DISK && c["kind"] != api::kinds::SNAPSHOT_NOW
                }) {
                    break c.clone();
                }
                assert!(Instant::now() < deadline, "the CLI queued nothing");
            };
            let id = cmd["id"].as_str().unwrap();
            assert_eq!(post_result(&cp, &gw, &cred, id, ok, "done by test"), 204);
            let run = run.join().unwrap();
            assert_eq!(run.status.success(), ok, "{args:?}: {}", run.describe());
            let view: CommandView = serde_json::from_str(&run.stdout).unwrap();
            assert_eq!(view.command_id, id);
            if !ok {
                assert!(
                    run.stderr.contains("failed: done by test"),
                    "{}",
                    run.describe()
                );
                assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.describe());
            }
        });
    }

    let policy = cp.cli_ok(&[
        "policy",
        "set",
        "--gateway",
        &gw,
        "--retention",
        "600:3600,3600:86400",
        "--bandwidth-limit",
        "10M",
        "--no-wait",
    ]);
    let policy: api::CommandRef = serde_json::from_str(&policy).unwrap();
    let view = cp
        .operator("GET", &format!("/v1/commands/{}", policy.command_id), None)
        .json();
    assert_eq!(view["args"]["bandwidth_limit_bytes_per_sec"], 10 << 20);
    assert_eq!(view["args"]["retention"]["tiers"][1]["keep_secs"], 86400);

    // Errors: one clear line, non-zero exit, no panic.
    let timeout = cp.cli(&["disk", "revoke", "--disk-id", "disk-1", "--timeout", "1"]);
    assert_eq!(timeout.status.code(), Some(4), "{}", timeout.describe());
    for (args, needle, one_line) in [
        (vec!["--token", "wrong", "status"], "unauthorized", true),
        (
            vec!["disk", "snapshot", "--disk-id", "nope"],
            "not_found",
            true,
        ),
        // Usage errors are clap's (with a hint line).
        (
            vec!["policy", "set", "--gateway", "gw-x", "--retention", "0:1"],
            "every_secs",
            false,
        ),
    ] {
        let run = cp.cli(&args);
        assert!(!run.status.success(), "{args:?}: {}", run.describe());
        assert!(run.stderr.contains(needle), "{args:?}: {}", run.describe());
        assert!(!run.stderr.contains("panicked"), "{}", run.describe());
        if one_line {
            assert_eq!(
                run.stderr.trim().lines().count(),
                1,
                "{args:?}: {}",
                run.describe()
            );
        }
    }
    // No control plane at all.
    let mut cmd = std::process::Command::new(CONTROL_BIN);
    cmd.args(["--state-dir", "/nonexistent/sync-control", "status"]);
    let run = run_cli(cmd);
    assert_eq!(run.status.code(), Some(1), "{}", run.describe());
    assert!(run.stderr.contains("listen.addr"), "{}", run.describe());
}

#[test]
fn https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = control::make_test_certs(dir.path());
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let cp =
        ControlPlane::start_with(&["--tls-cert", &s(&certs.cert), "--tls-key", &s(&certs.key)]);
    let url = std::fs::read_to_string(cp.state_dir.join("listen.url")).unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let token = cp.cli_ok(&["--ca-file", &s(&certs.ca), "gateway", "bootstrap-token"]);
    assert_eq!(token.trim().len(), 64);
    let untrusted = cp.cli(&["status"]);
    assert_eq!(untrusted.status.code(), Some(1), "{}", untrusted.describe());
    assert!(
        untrusted.stderr.contains("certificate"),
        "{}",
        untrusted.describe()
    );
}
