//! The upward channel end to end: the real `sync-gateway` registered with the real
//! `sync-control`, the real `sync-agent` replicating, commands through the control plane's
//! command line, faults injected by a proxy in between.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;
#[path = "common/control.rs"]
mod control;
#[path = "common/fault_proxy.rs"]
mod fault_proxy;
#[path = "common/proc_net.rs"]
mod proc_net;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use control::{control_plane_toml, ControlPlane};
use fault_proxy::FaultProxy;
use proc_net::listening_sockets;
use sync_gateway::api::{CommandState, DiskState};

const MIB: u64 = 1 << 20;

/// A gateway with a `[control_plane]` section and no disks, registered with `url`.
fn start_gateway(t: &TestDir, url: &str, token: &str, metrics: bool) -> Gateway {
    let token_file = t.path("bootstrap.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut config =
        GatewayConfig::new(t.data_dir()).extra_toml(&control_plane_toml(url, &token_file));
    if metrics {
        config = config.extra_toml("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    }
    Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway.log"))
}

fn wait_disk_state(
    cp: &ControlPlane,
    disk: &str,
    state: DiskState,
) -> sync_gateway::api::DiskStatus {
    wait_for(
        Duration::from_secs(60),
        &format!("disk {disk} to be reported {}", state.as_str()),
        || cp.disk(disk).filter(|d| d.state == state),
    )
}

/// The "must show": register, assign, replicate 64 MiB, `continuous` with its snapshot,
/// cutover to a launch equal to the source, and nothing listening but the data and metrics ports.
#[test]
fn register_assign_replicate_cutover_through_the_control_plane() {
    let _serial = serial();
    let t = TestDir::new("upward-must-show");
    let cp = ControlPlane::start_in(&t.path("control"), &[]);
    let mut gw = start_gateway(&t, &cp.url, &cp.bootstrap_token(), true);
    let gw_id = cp.online_gateway(Duration::from_secs(30));
    assert!(
        !gw.log_text().contains(&cp.bootstrap_token()[..8]),
        "tokens must not be logged"
    );
    let reg_file = t.data_dir().join("state/control-plane.json");
    let reg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&reg_file).unwrap()).unwrap();
    let credential = reg["credential"].as_str().unwrap();
    assert!(credential.len() >= 32, "{reg}");
    assert!(
        !gw.log_text().contains(credential) && !cp.log_text().contains(credential),
        "the credential must not be logged"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&reg_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "credential file mode");

    // Nothing listens but the data port and the loopback metrics port.
    let metrics: SocketAddr = std::fs::read_to_string(t.data_dir().join("metrics.addr"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let listening = listening_sockets(gw.pid());
    assert_eq!(
        listening,
        BTreeSet::from([gw.addr, metrics]),
        "the gateway's listening sockets"
    );
    assert!(metrics.ip().is_loopback());

    let size = 64 * MIB;
    let src = t.source_path("disk-1");
    make_image(&src, size, 81);
    let key = t.key_path("disk-1");
    let cmd = cp.assign(&gw_id, "disk-1", size, &key);
    assert_eq!(
        cp.wait_command(&cmd, Duration::from_secs(60)).state,
        CommandState::Succeeded
    );
    let agent = AgentCmd::new(gw.addr, "disk-1", &key, &t.state_dir("disk-1"), &src);
    let run = agent.run(Duration::from_secs(300));
    run.expect_verified();
    let snap = run.str("snapshot_id");

    let disk = wait_disk_state(&cp, "disk-1", DiskState::Continuous);
    assert_eq!(disk.bytes_total, size);
    assert_eq!(disk.bytes_replicated, size);
    assert_eq!(disk.bytes_backlogged, 0);
    assert_eq!(disk.last_checkpoint.as_ref().unwrap().snapshot_id, snap);
    assert!(disk.snapshots.iter().any(|s| s.id == snap), "{disk:?}");

    // Cutover: a final snapshot, an instance whose disk equals the source, replication stopped.
    let view = cp.cli_json(&["cutover", "--disk-id", "disk-1"]);
    assert_eq!(view["state"], "succeeded", "{view}");
    let launch = &view["result"]["output"]["launch"];
    assert_eq!(launch["test"], false);
    let instance = launch["instance_id"].as_str().unwrap();
    let launched = t
        .data_dir()
        .join(format!("instances/{instance}/disk-1.img"));
    assert_same_file(&launched, &src, "cutover instance disk");
    wait_for(Duration::from_secs(30), "the launch in the status", || {
        cp.status()
            .launches
            .into_iter()
            .find(|l| l.launch.instance_id == instance && l.launch.state == "running")
    });
    let disk = wait_disk_state(&cp, "disk-1", DiskState::Paused);
    assert_eq!(disk.phase, sync_gateway::api::DiskPhase::CutOver);
    // The agent's key no longer works.
    let refused = agent.clone().retry_timeout(5).run(Duration::from_secs(60));
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(
        refused.stderr.contains("cut over"),
        "{}",
        refused.describe()
    );

    // Finalize releases the staging volume and keeps the snapshots.
    let view = cp.cli_json(&["finalize", "--disk-id", "disk-1"]);
    assert_eq!(view["state"], "succeeded", "{view}");
    assert!(!gw.volume("disk-1").exists(), "staging volume released");
    assert!(snapshot_image(&t.data_dir(), "disk-1", &snap).exists());
    assert_eq!(gw.terminate(Duration::from_secs(30)).code(), Some(0));
}

/// A test launch leaves replication running; revoke stops the key at once; set policy and
/// snapshot now arrive as commands.
#[test]
fn test_launch_snapshot_now_policy_and_revoke() {
    let _serial = serial();
    let t = TestDir::new("upward-commands");
    let cp = ControlPlane::start_in(&t.path("control"), &[]);
    let gw = start_gateway(&t, &cp.url, &cp.bootstrap_token(), false);
    let gw_id = cp.online_gateway(Duration::from_secs(30));
    let size = 16 * MIB;
    let src = t.source_path("d2");
    make_image(&src, size, 82);
    let key = t.key_path("d2");
    let cmd = cp.assign(&gw_id, "d2", size, &key);
    cp.wait_command(&cmd, Duration::from_secs(60));
    let agent = AgentCmd::new(gw.addr, "d2", &key, &t.state_dir("d2"), &src);
    agent.run(Duration::from_secs(120)).expect_verified();

    let view = cp.cli_json(&["cutover", "--disk-id", "d2", "--test"]);
    assert_eq!(view["state"], "succeeded", "{view}");
    let instance = view["result"]["output"]["launch"]["instance_id"]
        .as_str()
        .unwrap();
    assert_same_file(
        &t.data_dir().join(format!("instances/{instance}/d2.img")),
        &src,
        "test instance disk",
    );
    // Replication goes on after a test launch.
    apply_scattered_changes(&src, 5, 3);
    let run = agent.run(Duration::from_secs(120));
    run.expect_verified();
    assert_eq!(run.str("mode"), "incremental");

    let view = cp.cli_json(&["disk", "snapshot", "--disk-id", "d2"]);
    assert_eq!(view["state"], "succeeded", "{view}");
    let manual = view["result"]["output"]["snapshot"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(
        Duration::from_secs(60),
        "the manual snapshot to be reported",
        || {
            cp.disk("d2").filter(|d| {
                d.snapshots
                    .iter()
                    .any(|s| s.id == manual && s.state == "completed")
            })
        },
    );
    assert_same_file(
        &snapshot_image(&t.data_dir(), "d2", &manual),
        &src,
        "manual snapshot",
    );

    // Policy: retention tiers and a 1 MiB/s cap per disk, applied by the gateway's reader.
    let view = cp.cli_json(&[
        "policy",
        "set",
        "--gateway",
        &gw_id,
        "--retention",
        "600:3600,86400:604800",
        "--bandwidth-limit",
        "1M",
    ]);
    assert_eq!(view["state"], "succeeded", "{view}");
    let saved = std::fs::read_to_string(t.data_dir().join("state/policy.json")).unwrap();
    assert!(
        saved.contains("604800") && saved.contains(&MIB.to_string()),
        "{saved}"
    );
    wait_for(Duration::from_secs(30), "the policy in the status", || {
        cp.status().gateways.into_iter().find(|g| {
            g.status
                .as_ref()
                .is_some_and(|s| s.policy.bandwidth_limit_bytes_per_sec == Some(MIB))
        })
    });
    // About 4 MiB of incompressible changes take at least ~4 s at 1 MiB/s (the agent's own
    // window does not help: acks come at the paced rate).
    apply_scattered_changes(&src, 25, 5);
    let run = agent.run(Duration::from_secs(120));
    run.expect_verified();
    let wire = run.u64("bytes_sent_wire");
    assert!(wire > 3 * MIB, "{}", run.describe());
    let secs: f64 = run.expect_ok()["duration_secs"].as_f64().unwrap();
    assert!(
        secs >= (wire as f64 / MIB as f64) * 0.6,
        "{wire} bytes in {secs} s under a 1 MiB/s cap"
    );

    let view = cp.cli_json(&["disk", "revoke", "--disk-id", "d2"]);
    assert_eq!(view["state"], "succeeded", "{view}");
    apply_scattered_changes(&src, 1, 4);
    let refused = agent.clone().retry_timeout(5).run(Duration::from_secs(60));
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(refused.stderr.contains("revoked"), "{}", refused.describe());
    let d = wait_disk_state(&cp, "d2", DiskState::Paused);
    assert_eq!(d.phase, sync_gateway::api::DiskPhase::Revoked);
}

/// Registration with a bad token is refused (and retried: fixing the token file is enough);
/// a token already used by another gateway is refused too.
#[test]
fn bad_and_reused_bootstrap_tokens_are_refused() {
    let _serial = serial();
    let t = TestDir::new("upward-tokens");
    let cp = ControlPlane::start_in(&t.path("control"), &[]);
    let mut gw = start_gateway(&t, &cp.url, &"0".repeat(64), false);
    wait_for(
        Duration::from_secs(30),
        "the refusal in the gateway log",
        || {
            gw.log_text()
                .contains("bootstrap_token_invalid")
                .then_some(())
        },
    );
    assert!(cp.status().gateways.is_empty(), "nobody registered");

    // A token used by a first gateway…
    let token = cp.bootstrap_token();
    std::fs::write(t.path("bootstrap.token"), &token).unwrap();
    let first = cp.online_gateway(Duration::from_secs(30));
    gw.terminate(Duration::from_secs(30));
    // …is refused to a second one.
    let t2 = TestDir::new("upward-tokens-2");
    let mut gw2 = start_gateway(&t2, &cp.url, &token, false);
    wait_for(Duration::from_secs(30), "the reuse refusal", || {
        gw2.log_text()
            .contains("bootstrap_token_used")
            .then_some(())
    });
    let ids: Vec<String> = cp
        .status()
        .gateways
        .into_iter()
        .map(|g| g.gateway_id)
        .collect();
    assert_eq!(ids, vec![first], "only the first gateway is registered");
    gw2.terminate(Duration::from_secs(30));
}

/// A command whose result does not reach the control plane is delivered again — while the
/// gateway runs and after it restarts — and carried out once.
#[test]
fn a_command_delivered_again_runs_once_even_across_a_restart() {
    let _serial = serial();
    let t = TestDir::new("upward-once");
    let cp = ControlPlane::start_in(&t.path("control"), &["--redeliver-after-secs", "1"]);
    let proxy = FaultProxy::start(cp.addr);
    let mut gw = start_gateway(&t, &proxy.url(), &cp.bootstrap_token(), false);
    let gw_id = cp.online_gateway(Duration::from_secs(30));
    let size = 8 * MIB;
    let src = t.source_path("d3");
    make_image(&src, size, 83);
    let key = t.key_path("d3");
    let cmd = cp.assign(&gw_id, "d3", size, &key);
    cp.wait_command(&cmd, Duration::from_secs(60));
    AgentCmd::new(gw.addr, "d3", &key, &t.state_dir("d3"), &src)
        .run(Duration::from_secs(120))
        .expect_verified();

    // Results are lost from now on.
    proxy.fail_path("/result");
    let v = cp.cli_json(&["cutover", "--disk-id", "d3", "--test", "--no-wait"]);
    let id = v["command_id"].as_str().unwrap().to_string();
    let instances = || {
        std::fs::read_dir(t.data_dir().join("instances"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    wait_for(Duration::from_secs(60), "the test launch", || {
        (instances() == 1).then_some(())
    });
    let deliveries = |cp: &ControlPlane| {
        let v = cp.cli_json(&["command", "show", &id]);
        v["deliveries"].as_u64().unwrap()
    };
    wait_for(Duration::from_secs(60), "a second delivery", || {
        (deliveries(&cp) >= 2).then_some(())
    });
    // Killed hard, restarted: delivered a third time.
    gw.kill9();
    let before = deliveries(&cp);
    let gw = Gateway::start(
        &GatewayConfig::new(t.data_dir()).extra_toml(&control_plane_toml(
            &proxy.url(),
            &t.path("bootstrap.token"),
        )),
        &t.path("gateway.toml"),
        &t.path("gateway.log"),
    );
    wait_for(
        Duration::from_secs(60),
        "a delivery after the restart",
        || (deliveries(&cp) > before).then_some(()),
    );
    proxy.heal();
    let view = cp.wait_command(&id, Duration::from_secs(60));
    assert_eq!(view.state, CommandState::Succeeded, "{view:?}");
    assert!(view.deliveries >= 3, "{view:?}");
    assert_eq!(instances(), 1, "the launch ran once");
    assert!(proxy.injected.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(
        gw.log_text().contains("already done"),
        "{}",
        gw.log_tail(40)
    );
}

/// The control plane goes away for a while: replication goes on; when it is back (restarted
/// from its state dir) the status resumes and commands flow again.
#[test]
fn replication_goes_on_while_the_control_plane_is_down() {
    let _serial = serial();
    let t = TestDir::new("upward-down");
    let mut cp = ControlPlane::start_in(&t.path("control"), &[]);
    let proxy = FaultProxy::start(cp.addr);
    let gw = start_gateway(&t, &proxy.url(), &cp.bootstrap_token(), false);
    let gw_id = cp.online_gateway(Duration::from_secs(30));
    let size = 16 * MIB;
    let src = t.source_path("d4");
    make_image(&src, size, 84);
    let key = t.key_path("d4");
    let cmd = cp.assign(&gw_id, "d4", size, &key);
    cp.wait_command(&cmd, Duration::from_secs(60));
    wait_disk_state(&cp, "d4", DiskState::Initiating);

    // Down: the control plane is killed and the network refuses.
    cp.kill();
    proxy.go_down();
    let agent = AgentCmd::new(gw.addr, "d4", &key, &t.state_dir("d4"), &src);
    let run = agent.run(Duration::from_secs(120));
    run.expect_verified();
    let snap = run.str("snapshot_id");
    std::thread::sleep(Duration::from_secs(3)); // several report intervals queue up

    // Back, restarted from its state: the status resumes with what happened meanwhile.
    cp.start_again();
    proxy.set_upstream(cp.addr);
    proxy.heal();
    let disk = wait_disk_state(&cp, "d4", DiskState::Continuous);
    assert_eq!(disk.last_checkpoint.unwrap().snapshot_id, snap);
    let view = cp.cli_json(&["disk", "snapshot", "--disk-id", "d4"]);
    assert_eq!(view["state"], "succeeded", "{view}");
    assert!(
        gw.log_text().contains("control plane reachable again"),
        "{}",
        gw.log_tail(30)
    );
}

/// https to a control plane whose certificate comes from a private CA named by `ca_file`; the
/// same gateway without the CA refuses the connection.
#[test]
fn the_gateway_registers_over_https_with_a_private_ca() {
    let _serial = serial();
    let t = TestDir::new("upward-tls");
    let certs = control::make_test_certs(&t.path(""));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cp = ControlPlane::start_in(
        &t.path("control"),
        &["--tls-cert", &s(&certs.cert), "--tls-key", &s(&certs.key)],
    );
    let url = std::fs::read_to_string(cp.state_dir.join("listen.url")).unwrap();
    let url = url.trim();
    assert!(url.starts_with("https://"), "{url}");
    let token_file = t.path("bootstrap.token");
    let token = cp.cli_ok(&["--ca-file", &s(&certs.ca), "gateway", "bootstrap-token"]);
    std::fs::write(&token_file, token.trim()).unwrap();
    // Without the CA: the certificate is refused, nothing registers.
    let config = GatewayConfig::new(t.data_dir()).extra_toml(&control_plane_toml(url, &token_file));
    let mut gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway.log"));
    wait_for(
        Duration::from_secs(30),
        "a certificate error in the log",
        || gw.log_text().contains("certificate").then_some(()),
    );
    gw.terminate(Duration::from_secs(30));
    // With it: registered and reporting.
    let config = config.extra_toml(&format!("ca_file = \"{}\"", certs.ca.display()));
    let _gw = Gateway::start(&config, &t.path("gateway.toml"), &t.path("gateway.log"));
    wait_for(
        Duration::from_secs(30),
        "the gateway online over https",
        || {
            let out = cp.cli_ok(&["--ca-file", &s(&certs.ca), "gateway", "list", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .any(|g| g["online"] == true && g["status"]["data_port"].as_u64().is_some())
                .then_some(())
        },
    );
}

/// Cutover stops replication before it picks the point to launch: mid-pass it launches from the
/// last checkpoint (never from a torn volume) and says so; without any checkpoint it refuses and
/// replication resumes.
#[test]
fn cutover_mid_pass_launches_the_last_checkpoint_and_refuses_without_one() {
    let _serial = serial();
    let t = TestDir::new("upward-cutover-mid-pass");
    let cp = ControlPlane::start_in(&t.path("control"), &[]);
    let gw = start_gateway(&t, &cp.url, &cp.bootstrap_token(), false);
    let gw_id = cp.online_gateway(Duration::from_secs(30));

    // No checkpoint yet: refused, and the disk still replicates afterwards.
    let size = 16 * MIB;
    let src = t.source_path("d6");
    make_image(&src, size, 86);
    let key = t.key_path("d6");
    let cmd = cp.assign(&gw_id, "d6", size, &key);
    cp.wait_command(&cmd, Duration::from_secs(60));
    let out = cp.cli(&["cutover", "--disk-id", "d6"]);
    assert!(!out.status.success(), "{}", out.describe());
    assert!(out.stdout.contains("no checkpoint"), "{}", out.describe());
    let agent = AgentCmd::new(gw.addr, "d6", &key, &t.state_dir("d6"), &src);
    agent.run(Duration::from_secs(120)).expect_verified();

    // Mid-pass: the checkpoint's content is launched, not the half-written volume.
    let at_checkpoint = t.path("d6-at-checkpoint.img");
    std::fs::copy(&src, &at_checkpoint).unwrap();
    apply_scattered_changes(&src, 50, 9);
    let running = agent.clone().bandwidth("1M").retry_timeout(30).spawn();
    wait_disk_state(&cp, "d6", DiskState::Backlog);
    let view = cp.cli_json(&["cutover", "--disk-id", "d6"]);
    assert_eq!(view["state"], "succeeded", "{view}");
    let message = view["result"]["message"].as_str().unwrap();
    assert!(
        message.contains("stopped before its checkpoint"),
        "{message}"
    );
    let instance = view["result"]["output"]["launch"]["instance_id"]
        .as_str()
        .unwrap();
    assert_same_file(
        &t.data_dir().join(format!("instances/{instance}/d6.img")),
        &at_checkpoint,
        "instance launched mid-pass",
    );
    let ended = running.wait(Duration::from_secs(60));
    assert!(!ended.status.success(), "{}", ended.describe());
    assert!(ended.stderr.contains("cut over"), "{}", ended.describe());
}
