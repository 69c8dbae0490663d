//! The OpenAPI 3.0 document served at `GET /v1/openapi.json`, written by hand next to
//! [`crate::api`]. Tests keep it honest: `tests/control_plane.rs` compares its operations with
//! [`super::ROUTES`] and calls each one; the unit test below checks real serialized values of the
//! API types against the schemas.

use serde_json::{json, Map, Value};

use crate::api;

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn json_body(name: &str) -> Value {
    json!({ "content": { "application/json": { "schema": schema_ref(name) } } })
}

fn error_response(description: &str) -> Value {
    let mut v = json_body("ErrorBody");
    v["description"] = json!(description);
    v
}

fn ok_response(description: &str, schema: Option<&str>) -> Value {
    let mut v = match schema {
        Some(name) => json_body(name),
        None => json!({}),
    };
    v["description"] = json!(description);
    v
}

fn path_param(name: &str, description: &str) -> Value {
    json!({
        "name": name, "in": "path", "required": true,
        "description": description, "schema": { "type": "string" }
    })
}

#[derive(Clone, Copy)]
enum Security {
    None,
    Gateway,
    Operator,
}

/// One operation: security, parameters, optional request body, success status and schema.
#[allow(clippy::too_many_arguments)]
fn operation(
    id: &str,
    summary: &str,
    tag: &str,
    security: Security,
    params: Vec<Value>,
    body: Option<(&str, bool)>,
    ok: (&str, &str, Option<&str>),
    errors: &[(&str, &str)],
) -> Value {
    let mut responses = Map::new();
    responses.insert(ok.0.into(), ok_response(ok.1, ok.2));
    for (status, why) in errors {
        responses.insert((*status).into(), error_response(why));
    }
    let mut op = json!({
        "operationId": id,
        "summary": summary,
        "tags": [tag],
        "responses": responses,
    });
    op["security"] = match security {
        Security::None => json!([]),
        Security::Gateway => json!([{ "gatewayCredential": [] }]),
        Security::Operator => json!([{ "operatorToken": [] }]),
    };
    if !params.is_empty() {
        op["parameters"] = Value::Array(params);
    }
    if let Some((schema, required)) = body {
        let mut b = json_body(schema);
        b["required"] = json!(required);
        op["requestBody"] = b;
    }
    op
}

const UNAUTH: (&str, &str) = ("401", "Missing or wrong bearer token (`unauthorized`).");
const BAD: (&str, &str) = ("400", "The body or a parameter is invalid (`bad_request`).");
const TOO_LARGE: (&str, &str) = ("413", "The body is larger than 1 MiB.");

fn disk_command(id: &str, summary: &str, body: Option<(&str, bool)>) -> Value {
    operation(
        id,
        summary,
        "operator",
        Security::Operator,
        vec![path_param("disk_id", "An assigned disk.")],
        body,
        (
            "202",
            "The command is queued for the disk's gateway.",
            Some("CommandRef"),
        ),
        &[
            UNAUTH,
            BAD,
            ("404", "No such disk (`not_found`)."),
            TOO_LARGE,
        ],
    )
}

/// `GET /`: the only answer that is not JSON.
fn html_console() -> Value {
    let mut op = operation(
        "console",
        "The operator console.",
        "meta",
        Security::None,
        vec![],
        None,
        ("200", "The console page.", None),
        &[],
    );
    op["responses"]["200"]["content"] = json!({ "text/html": { "schema": { "type": "string" } } });
    op
}

fn paths() -> Value {
    let gw = || path_param("gateway_id", "The gateway's id, as registration gave it.");
    let gw_errors: &[(&str, &str)] = &[
        UNAUTH,
        (
            "403",
            "The credential belongs to another gateway (`unauthorized`).",
        ),
        BAD,
        TOO_LARGE,
    ];
    json!({
        "/": { "get": html_console() },
        "/healthz": { "get": operation("health", "Liveness.", "meta", Security::None, vec![],
            None, ("200", "Serving.", Some("Health")), &[]) },
        "/v1/openapi.json": { "get": operation("openapi", "This document.", "meta",
            Security::None, vec![], None, ("200", "OpenAPI 3.0 document.", Some("OpenApiDocument")), &[]) },
        "/v1/register": { "post": operation("register",
            "Register a gateway with a one-time bootstrap token.", "gateway", Security::None,
            vec![], Some(("RegisterRequest", true)),
            ("201", "The gateway's id and credential (shown once).", Some("RegisterResponse")),
            &[("401", "`bootstrap_token_invalid` (unknown or expired) or `bootstrap_token_used`."),
              BAD, TOO_LARGE]) },
        "/v1/gateways/{gateway_id}/commands": { "get": operation("pollCommands",
            "Long-poll for commands: answered at once when one is deliverable, else held up to `wait` seconds.",
            "gateway", Security::Gateway,
            vec![gw(), json!({
                "name": "wait", "in": "query", "required": false,
                "description": format!("Seconds to hold the request (clamped to {}; default 0).", api::MAX_POLL_WAIT_SECS),
                "schema": { "type": "integer", "minimum": 0 }
            })],
            None, ("200", "Commands without a result, oldest first (may be empty).", Some("CommandBatch")),
            gw_errors) },
        "/v1/gateways/{gateway_id}/commands/{command_id}/result": { "post": operation(
            "postCommandResult", "Post a command's outcome (idempotent: the first result stays).",
            "gateway", Security::Gateway,
            vec![gw(), path_param("command_id", "The command.")],
            Some(("CommandResult", true)), ("204", "Recorded (or already recorded).", None),
            &[gw_errors, &[("404", "No such command of this gateway (`not_found`).")]].concat()) },
        "/v1/gateways/{gateway_id}/status": { "post": operation("postStatus",
            "Report the gateway's status.", "gateway", Security::Gateway, vec![gw()],
            Some(("StatusReport", true)), ("204", "Recorded.", None), gw_errors) },
        "/v1/bootstrap-tokens": { "post": operation("createBootstrapToken",
            "Issue a one-time bootstrap token (default life 24 h).", "operator",
            Security::Operator, vec![], Some(("BootstrapTokenRequest", false)),
            ("201", "The token (shown once).", Some("BootstrapToken")), &[UNAUTH, BAD, TOO_LARGE]) },
        "/v1/disks": { "post": operation("assignDisk",
            "Assign a disk to a gateway with a new agent key (again on the same gateway: key rotation).",
            "operator", Security::Operator, vec![], Some(("AssignRequest", true)),
            ("201", "The agent key (shown once) and the queued command.", Some("AssignResponse")),
            &[UNAUTH, BAD, ("404", "No such gateway (`not_found`)."),
              ("409", "The disk is assigned to another gateway or has another size (`conflict`)."),
              TOO_LARGE]) },
        "/v1/disks/{disk_id}/revoke": { "post": disk_command("revokeAgent",
            "Revoke the disk's agent key.", None) },
        "/v1/disks/{disk_id}/snapshot": { "post": disk_command("snapshotNow",
            "Take a snapshot now.", None) },
        "/v1/disks/{disk_id}/test-launch": { "post": disk_command("testLaunch",
            "Launch a test instance from a snapshot; replication goes on.",
            Some(("LaunchRequest", false))) },
        "/v1/disks/{disk_id}/cutover": { "post": disk_command("cutover",
            "Stop replication and launch the instance from the latest checkpoint.", None) },
        "/v1/disks/{disk_id}/finalize": { "post": disk_command("finalize",
            "Release the disk's volume after a cutover.", None) },
        "/v1/gateways/{gateway_id}/policy": { "put": operation("setPolicy",
            "Set the gateway's retention and bandwidth policy (absent fields unchanged).",
            "operator", Security::Operator, vec![gw()], Some(("Policy", true)),
            ("202", "The command is queued.", Some("CommandRef")),
            &[UNAUTH, BAD, ("404", "No such gateway (`not_found`)."), TOO_LARGE]) },
        "/v1/gateways/{gateway_id}/diagnostics": { "post": operation("collectDiagnostics",
            "Have the gateway bundle its recent log, redacted config and state, versions and status into a .tar.gz and upload it to a presigned PUT URL or to its [diagnostics] OSS bucket; the result's output.diagnostics names the object.",
            "operator", Security::Operator, vec![gw()], Some(("CollectDiagnostics", false)),
            ("202", "The command is queued.", Some("CommandRef")),
            &[UNAUTH, BAD, ("404", "No such gateway (`not_found`)."), TOO_LARGE]) },
        "/v1/commands/{command_id}": { "get": operation("getCommand",
            "A command and its result.", "operator", Security::Operator,
            vec![path_param("command_id", "The command.")], None,
            ("200", "The command.", Some("CommandView")),
            &[UNAUTH, ("404", "No such command (`not_found`).")]) },
        "/v1/status": { "get": operation("status",
            "Gateways, disks, launches and the 50 newest commands.", "operator",
            Security::Operator, vec![], None, ("200", "Everything.", Some("ControlStatus")),
            &[UNAUTH]) },
    })
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "required": required, "properties": properties })
}

const INT: fn() -> Value = || json!({ "type": "integer", "format": "int64", "minimum": 0 });
const STR: fn() -> Value = || json!({ "type": "string" });
const BOOL: fn() -> Value = || json!({ "type": "boolean" });
const ANY: fn() -> Value = || json!({ "description": "Kind-specific JSON." });

fn array_of(name: &str) -> Value {
    json!({ "type": "array", "items": schema_ref(name) })
}

fn schemas() -> Value {
    let disk_states = [
        "initiating",
        "initial-sync",
        "continuous",
        "backlog",
        "creating-snapshot",
        "rescan",
        "stalled",
        "disconnected",
        "paused",
    ];
    json!({
        "ErrorBody": object(&["error"], json!({ "error": object(&["code", "message"],
            json!({ "code": STR(), "message": STR() })) })),
        "Health": object(&["ok"], json!({ "ok": BOOL() })),
        "OpenApiDocument": { "type": "object", "additionalProperties": true,
            "description": "An OpenAPI 3.0 document (this one)." },
        "IdentityDocument": object(&["provider", "document", "signature"], json!({
            "provider": { "type": "string", "enum": ["aws", "aliyun"] },
            "document": STR(), "signature": STR() })),
        "RegisterRequest": object(&["bootstrap_token", "hostname", "version", "backend", "data_port"], json!({
            "bootstrap_token": STR(), "hostname": STR(), "version": STR(),
            "backend": { "type": "string", "description": "`local`, `aws` or `aliyun`." },
            "data_port": { "type": "integer", "minimum": 0, "maximum": 65535 },
            "identity": schema_ref("IdentityDocument") })),
        "RegisterResponse": object(&["gateway_id", "credential", "report_interval_secs", "poll_wait_secs"], json!({
            "gateway_id": STR(), "credential": STR(),
            "report_interval_secs": INT(), "poll_wait_secs": INT() })),
        "CommandBatch": object(&["commands"], json!({ "commands": array_of("Command") })),
        "Command": object(&["id", "kind"], json!({
            "id": STR(),
            "kind": { "type": "string", "description": format!("One of {:?}; a gateway answers an unknown kind with a failed result.", api::kinds::ALL) },
            "args": ANY(), "issued_unix_ms": INT() })),
        "CommandResult": object(&["command_id", "outcome", "finished_unix_ms"], json!({
            "command_id": STR(),
            "outcome": { "type": "string", "enum": ["succeeded", "failed"] },
            "message": STR(),
            "output": { "description": "Kind-specific JSON: `{\"snapshot\": SnapshotSummary}` for snapshot_now, `{\"launch\": LaunchInfo}` for launches, `{\"diagnostics\": DiagnosticsBundle}` for collect_diagnostics, `{}` otherwise." },
            "finished_unix_ms": INT() })),
        "StatusReport": object(&["gateway", "disks"], json!({
            "gateway": schema_ref("GatewayStatus"), "disks": array_of("DiskStatus"),
            "launches": array_of("LaunchInfo") })),
        "GatewayStatus": object(&["gateway_id", "version", "hostname", "backend", "data_port",
            "reported_unix_ms", "started_unix_ms", "uptime_secs", "cpu_percent", "memory_rss_bytes",
            "memory_total_bytes", "memory_available_bytes", "data_free_bytes", "data_total_bytes",
            "open_sessions", "policy"], json!({
            "gateway_id": STR(), "version": STR(), "hostname": STR(), "backend": STR(),
            "data_port": { "type": "integer", "minimum": 0, "maximum": 65535 },
            "reported_unix_ms": INT(), "started_unix_ms": INT(), "uptime_secs": INT(),
            "cpu_percent": { "type": "number" }, "memory_rss_bytes": INT(),
            "memory_total_bytes": INT(), "memory_available_bytes": INT(),
            "data_free_bytes": INT(), "data_total_bytes": INT(), "open_sessions": INT(),
            "policy": schema_ref("Policy"), "reports_dropped": INT(),
            "cloud": schema_ref("CloudStatus") })),
        "CloudStatus": object(&["provider", "region", "availability_zone", "instance_id",
            "api_retries", "api_throttled"], json!({
            "provider": STR(), "region": STR(), "availability_zone": STR(), "instance_id": STR(),
            "api_retries": INT(), "api_throttled": INT(), "api_last_error": STR(),
            "snapshots_retried": INT() })),
        "DiskState": { "type": "string", "enum": disk_states },
        "DiskPhase": { "type": "string", "enum": ["replicating", "revoked", "cut-over", "finalized"] },
        "DiskStatus": object(&["disk_id", "state", "phase", "connected", "bytes_total",
            "bytes_replicated", "bytes_backlogged", "bytes_received", "throughput_bytes_per_sec",
            "durable_seq"], json!({
            "disk_id": STR(), "state": schema_ref("DiskState"), "phase": schema_ref("DiskPhase"),
            "connected": BOOL(), "bytes_total": INT(), "bytes_replicated": INT(),
            "bytes_backlogged": INT(), "bytes_received": INT(), "throughput_bytes_per_sec": INT(),
            "eta_secs": INT(), "lag_secs": INT(), "durable_seq": INT(),
            "last_checkpoint": schema_ref("CheckpointSummary"),
            "last_snapshot": schema_ref("SnapshotSummary"),
            "snapshots": array_of("SnapshotSummary"), "last_error": STR(),
            "errors": { "type": "object", "additionalProperties": INT() },
            "volume_id": STR() })),
        "CheckpointSummary": object(&["seq", "label", "snapshot_id", "created_unix_ms"], json!({
            "seq": INT(), "label": STR(), "snapshot_id": STR(), "created_unix_ms": INT() })),
        "SnapshotSummary": object(&["id", "label", "state", "created_unix_ms", "checkpoint_seq"], json!({
            "id": STR(), "label": STR(),
            "state": { "type": "string", "enum": ["pending", "completed", "failed"] },
            "created_unix_ms": INT(), "checkpoint_seq": INT() })),
        "LaunchInfo": object(&["instance_id", "test", "state", "created_unix_ms", "disks"], json!({
            "instance_id": STR(), "test": BOOL(), "state": STR(), "created_unix_ms": INT(),
            "disks": array_of("LaunchDisk"), "image_id": STR() })),
        "LaunchDisk": object(&["disk_id", "snapshot_id"], json!({
            "disk_id": STR(), "snapshot_id": STR(), "path": STR() })),
        "Policy": object(&[], json!({
            "retention": schema_ref("RetentionPolicy"),
            "bandwidth_limit_bytes_per_sec": INT() })),
        "RetentionPolicy": object(&["tiers"], json!({ "tiers": array_of("Tier") })),
        "Tier": object(&["every_secs", "keep_secs"], json!({ "every_secs": INT(), "keep_secs": INT() })),
        "BootstrapTokenRequest": object(&[], json!({ "ttl_secs": INT() })),
        "BootstrapToken": object(&["token", "expires_unix_ms"], json!({
            "token": STR(), "expires_unix_ms": INT() })),
        "AssignRequest": object(&["gateway_id", "disk_id", "size_bytes"], json!({
            "gateway_id": STR(), "disk_id": { "type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$" },
            "size_bytes": { "type": "integer", "format": "int64", "minimum": 1 } })),
        "AssignResponse": object(&["gateway_id", "disk_id", "size_bytes", "agent_key", "command_id"], json!({
            "gateway_id": STR(), "disk_id": STR(), "size_bytes": INT(),
            "agent_key": { "type": "string", "pattern": "^[0-9a-f]{64}$" }, "command_id": STR() })),
        "LaunchRequest": object(&[], json!({ "snapshot_id": STR() })),
        "CollectDiagnostics": object(&[], json!({
            "upload_url": { "type": "string", "maxLength": api::MAX_UPLOAD_URL_LEN,
                "description": "A presigned PUT URL (made without a Content-Type) the bundle is uploaded to; it names the object. Absent: the gateway's [diagnostics] oss_bucket and oss_prefix. Shown without its query." },
            "key_prefix": { "type": "string", "maxLength": api::MAX_KEY_PREFIX_LEN,
                "description": "Key prefix in the configured bucket instead of [diagnostics] oss_prefix; not with upload_url." } })),
        "DiagnosticsBundle": object(&["object_key", "url", "file_name", "size_bytes", "sha256"], json!({
            "object_key": STR(), "bucket": STR(), "url": STR(), "file_name": STR(),
            "size_bytes": INT(), "sha256": { "type": "string", "pattern": "^[0-9a-f]{64}$" } })),
        "CommandRef": object(&["command_id", "gateway_id", "kind"], json!({
            "command_id": STR(), "gateway_id": STR(), "kind": STR() })),
        "CommandState": { "type": "string", "enum": ["queued", "delivered", "succeeded", "failed"] },
        "CommandView": object(&["command_id", "gateway_id", "kind", "args", "state", "issued_unix_ms", "deliveries"], json!({
            "command_id": STR(), "gateway_id": STR(), "kind": STR(),
            "args": { "description": "Kind-specific JSON; agent keys are redacted, upload URLs shown without their query." },
            "state": schema_ref("CommandState"), "issued_unix_ms": INT(), "deliveries": INT(),
            "result": schema_ref("CommandResult") })),
        "GatewayView": object(&["gateway_id", "hostname", "registered_unix_ms", "last_seen_unix_ms", "online"], json!({
            "gateway_id": STR(), "hostname": STR(), "registered_unix_ms": INT(),
            "last_seen_unix_ms": INT(), "online": BOOL(),
            "identity": schema_ref("IdentityDocument"), "status": schema_ref("GatewayStatus") })),
        "DiskView": object(&["disk_id", "gateway_id", "size_bytes", "assigned_unix_ms"], json!({
            "disk_id": STR(), "gateway_id": STR(), "size_bytes": INT(), "assigned_unix_ms": INT(),
            "status": schema_ref("DiskStatus") })),
        "LaunchView": { "allOf": [
            object(&["gateway_id"], json!({ "gateway_id": STR() })),
            schema_ref("LaunchInfo") ] },
        "ControlStatus": object(&["gateways", "disks", "launches", "commands"], json!({
            "gateways": array_of("GatewayView"), "disks": array_of("DiskView"),
            "launches": array_of("LaunchView"), "commands": array_of("CommandView") })),
    })
}

/// The whole document.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "sync-control API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The upward channel of sync-gateway (registration, command long-poll, \
                results, status reports) and the operator API of the sync-control reference \
                control plane. Errors are `ErrorBody` with a 4xx/5xx status. Within /v1 fields \
                are only added; readers ignore fields they do not know."
        },
        "servers": [{ "url": "/" }],
        "tags": [
            { "name": "gateway", "description": "Called by sync-gateway." },
            { "name": "operator", "description": "Called by people and the sync-control CLI." },
            { "name": "meta", "description": "No authentication." }
        ],
        "paths": paths(),
        "components": {
            "securitySchemes": {
                "gatewayCredential": { "type": "http", "scheme": "bearer",
                    "description": "The credential a gateway got from POST /v1/register." },
                "operatorToken": { "type": "http", "scheme": "bearer",
                    "description": "The contents of STATE_DIR/operator.token." }
            },
            "schemas": schemas(),
        }
    })
}

#[cfg(test)]
#[path = "openapi_tests.rs"]
mod tests;
