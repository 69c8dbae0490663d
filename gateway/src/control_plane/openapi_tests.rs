#![allow(clippy::unwrap_used)]

use super::*;
use crate::api::*;
use crate::backend::{LaunchDisk, LaunchInfo};
use crate::retention::RetentionPolicy;

/// Checks `value` against `schema`: every object key is declared, every required key is
/// present, enums hold, types match. Answers the first mismatch.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: dangling $ref {r}"));
        }
        return check(doc, target, value, at);
    }
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        // Merge the parts' properties (what `#[serde(flatten)]` produces).
        let mut merged = json!({ "type": "object", "required": [], "properties": {} });
        for p in parts {
            let p = match p.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    &doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")]
                }
                None => p,
            };
            for (k, v) in p["properties"].as_object().unwrap() {
                merged["properties"][k] = v.clone();
            }
            for r in p["required"].as_array().unwrap() {
                merged["required"].as_array_mut().unwrap().push(r.clone());
            }
        }
        return check(doc, &merged, value, at);
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let obj = value
                .as_object()
                .ok_or(format!("{at}: not an object: {value}"))?;
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    return Err(format!("{at}: required {r} missing in {value}"));
                }
            }
            for (k, v) in obj {
                let sub = match (
                    schema["properties"].get(k),
                    schema.get("additionalProperties"),
                ) {
                    (Some(s), _) => s,
                    (None, Some(s)) => s,
                    (None, None) => return Err(format!("{at}: undeclared property {k}")),
                };
                check(doc, sub, v, &format!("{at}.{k}"))?;
            }
        }
        Some("array") => {
            for (i, v) in value
                .as_array()
                .ok_or(format!("{at}: not an array"))?
                .iter()
                .enumerate()
            {
                check(doc, &schema["items"], v, &format!("{at}[{i}]"))?;
            }
        }
        Some("string") if !value.is_string() => return Err(format!("{at}: not a string")),
        Some("integer") if !value.is_u64() => return Err(format!("{at}: not an integer")),
        Some("number") if !value.is_number() => return Err(format!("{at}: not a number")),
        Some("boolean") if !value.is_boolean() => return Err(format!("{at}: not a boolean")),
        _ => {}
    }
    Ok(())
}

fn check_named(doc: &Value, name: &str, value: impl serde::Serialize) {
    let v = serde_json::to_value(value).unwrap();
    if let Err(e) = check(doc, &schema_ref(name), &v, name) {
        panic!("{e}");
    }
}

fn full_disk_status() -> DiskStatus {
    let snap = SnapshotSummary {
        id: "snap-1".into(),
        label: "cp-1".into(),
        state: "completed".into(),
        created_unix_ms: 1,
        checkpoint_seq: 3,
    };
    DiskStatus {
        disk_id: "d1".into(),
        state: DiskState::CreatingSnapshot,
        phase: DiskPhase::CutOver,
        connected: true,
        bytes_total: 10,
        bytes_replicated: 5,
        bytes_backlogged: 5,
        bytes_received: 7,
        throughput_bytes_per_sec: 1,
        eta_secs: Some(5),
        lag_secs: Some(2),
        durable_seq: 3,
        last_checkpoint: Some(CheckpointSummary {
            seq: 3,
            label: "cp-1".into(),
            snapshot_id: "snap-1".into(),
            created_unix_ms: 1,
        }),
        last_snapshot: Some(snap.clone()),
        snapshots: vec![snap],
        last_error: Some("oops".into()),
        errors: [("bad_frame".to_string(), 2)].into_iter().collect(),
        volume_id: Some("vol-0123456789abcdef0".into()),
    }
}

fn full_gateway_status() -> GatewayStatus {
    GatewayStatus {
        gateway_id: "gw-1".into(),
        version: "0.1.0".into(),
        hostname: "h".into(),
        backend: "local".into(),
        data_port: 7400,
        reported_unix_ms: 1,
        started_unix_ms: 1,
        uptime_secs: 1,
        cpu_percent: 1.5,
        memory_rss_bytes: 1,
        memory_total_bytes: 1,
        memory_available_bytes: 1,
        data_free_bytes: 1,
        data_total_bytes: 1,
        open_sessions: 1,
        policy: Policy {
            retention: Some(RetentionPolicy::default()),
            bandwidth_limit_bytes_per_sec: Some(5),
        },
        reports_dropped: 0,
        cloud: Some(crate::api::CloudStatus {
            provider: "aws".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            instance_id: "i-0123456789abcdef0".into(),
            api_retries: 3,
            api_throttled: 2,
            api_last_error: Some("ec2:CreateVolume failed: RequestLimitExceeded".into()),
            snapshots_retried: 1,
        }),
    }
}

fn launch() -> LaunchInfo {
    LaunchInfo {
        instance_id: "i-0123456789abcdef".into(),
        test: true,
        state: "running".into(),
        created_unix_ms: 1,
        disks: vec![LaunchDisk {
            disk_id: "d1".into(),
            snapshot_id: "snap-1".into(),
            path: Some("/x".into()),
        }],
        image_id: Some("ami-0123456789abcdef0".into()),
    }
}

#[test]
fn the_api_types_match_their_schemas() {
    let doc = document();
    let identity = IdentityDocument {
        provider: "aws".into(),
        document: "{}".into(),
        signature: "s".into(),
    };
    check_named(
        &doc,
        "RegisterRequest",
        RegisterRequest {
            bootstrap_token: "t".into(),
            hostname: "h".into(),
            version: "v".into(),
            backend: "local".into(),
            data_port: 1,
            identity: Some(identity.clone()),
        },
    );
    check_named(
        &doc,
        "RegisterResponse",
        RegisterResponse {
            gateway_id: "g".into(),
            credential: "c".into(),
            report_interval_secs: 5,
            poll_wait_secs: 25,
        },
    );
    let cmd = Action::TestLaunch(TestLaunch {
        disk_id: "d1".into(),
        snapshot_id: Some("s".into()),
    })
    .to_command("cmd-1".into(), 1);
    check_named(
        &doc,
        "CommandBatch",
        CommandBatch {
            commands: vec![cmd.clone()],
        },
    );
    let result = CommandResult {
        command_id: "cmd-1".into(),
        outcome: CommandOutcome::Failed,
        message: "m".into(),
        output: json!({"launch": launch()}),
        finished_unix_ms: 2,
    };
    check_named(&doc, "CommandResult", &result);
    check_named(
        &doc,
        "StatusReport",
        StatusReport {
            gateway: full_gateway_status(),
            disks: vec![full_disk_status()],
            launches: vec![launch()],
        },
    );
    check_named(&doc, "Policy", Policy::default());
    check_named(&doc, "CollectDiagnostics", CollectDiagnostics::default());
    check_named(
        &doc,
        "CollectDiagnostics",
        CollectDiagnostics {
            upload_url: None,
            key_prefix: Some("case-1/".into()),
        },
    );
    check_named(
        &doc,
        "DiagnosticsBundle",
        DiagnosticsBundle {
            object_key: "sync-gateway/diagnostics/diagnostics-gw-1-20250101T000000Z.tar.gz".into(),
            bucket: Some("b".into()),
            url: "https://b.oss-cn-hangzhou.aliyuncs.com/k".into(),
            file_name: "diagnostics-gw-1-20250101T000000Z.tar.gz".into(),
            size_bytes: 10,
            sha256: "ab".repeat(32),
        },
    );
    let diag = Action::CollectDiagnostics(CollectDiagnostics {
        upload_url: Some("http://127.0.0.1:9/b/k?x-oss-signature=s".into()),
        key_prefix: None,
    })
    .to_command("cmd-2".into(), 1);
    assert!(
        doc["components"]["schemas"]["Command"]["properties"]["kind"]["description"]
            .as_str()
            .unwrap()
            .contains(kinds::COLLECT_DIAGNOSTICS)
    );
    check_named(&doc, "Command", &diag);
    check_named(
        &doc,
        "BootstrapToken",
        BootstrapToken {
            token: "t".into(),
            expires_unix_ms: 1,
        },
    );
    check_named(
        &doc,
        "AssignRequest",
        AssignRequest {
            gateway_id: "g".into(),
            disk_id: "d".into(),
            size_bytes: 1,
        },
    );
    check_named(
        &doc,
        "AssignResponse",
        AssignResponse {
            gateway_id: "g".into(),
            disk_id: "d".into(),
            size_bytes: 1,
            agent_key: "ab".repeat(32),
            command_id: "c".into(),
        },
    );
    check_named(
        &doc,
        "LaunchRequest",
        LaunchRequest {
            snapshot_id: Some("s".into()),
        },
    );
    check_named(
        &doc,
        "CommandRef",
        CommandRef {
            command_id: "c".into(),
            gateway_id: "g".into(),
            kind: "cutover".into(),
        },
    );
    check_named(
        &doc,
        "ControlStatus",
        ControlStatus {
            gateways: vec![GatewayView {
                gateway_id: "g".into(),
                hostname: "h".into(),
                registered_unix_ms: 1,
                last_seen_unix_ms: 1,
                online: true,
                identity: Some(identity),
                status: Some(full_gateway_status()),
            }],
            disks: vec![DiskView {
                disk_id: "d1".into(),
                gateway_id: "g".into(),
                size_bytes: 10,
                assigned_unix_ms: 1,
                status: Some(full_disk_status()),
            }],
            launches: vec![LaunchView {
                gateway_id: "g".into(),
                launch: launch(),
            }],
            commands: vec![CommandView {
                command_id: "cmd-1".into(),
                gateway_id: "g".into(),
                kind: cmd.kind,
                args: cmd.args,
                state: CommandState::Failed,
                issued_unix_ms: 1,
                deliveries: 1,
                result: Some(result),
            }],
        },
    );
    check_named(
        &doc,
        "ErrorBody",
        ErrorBody {
            error: ErrorDetail {
                code: codes::NOT_FOUND.into(),
                message: "m".into(),
            },
        },
    );
    // And the checker does catch a stray field.
    let v = json!({"token": "t", "expires_unix_ms": 1, "extra": 1});
    assert!(check(&doc, &schema_ref("BootstrapToken"), &v, "x").is_err());
}

#[test]
fn every_ref_resolves() {
    fn walk(doc: &Value, v: &Value) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    let name = r.trim_start_matches("#/components/schemas/");
                    assert!(
                        !doc["components"]["schemas"][name].is_null(),
                        "dangling {r}"
                    );
                }
                m.values().for_each(|x| walk(doc, x));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(doc, x)),
            _ => {}
        }
    }
    let doc = document();
    walk(&doc, &doc);
}
