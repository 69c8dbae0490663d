//! Disks that arrive and leave while the gateway runs: `assign` provisions a disk and accepts
//! its agent, `revoke` ends the agent's session and stops its key from working, re-assigning
//! with a new key resumes replication where it stopped. Driven through the library's `Control`
//! handle (what the control plane's commands call) against the real `sync-agent` binary.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use sync_gateway::config::Config;
use sync_gateway::server::{run_with_control, Control};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

#[test]
fn assign_revoke_and_reassign_a_disk_at_run_time() {
    let t = TestDir::new("control");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[backend]\nkind = \"local\"\n",
        t.data_dir().display()
    );
    let config = Config::from_toml(&toml, "test", Vec::new()).unwrap();
    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<Control>();
    let server = rt.spawn(run_with_control(config, cancel.clone(), Some(tx)));
    let control = rt.block_on(rx).expect("gateway started");
    let addr = std::fs::read_to_string(t.data_dir().join("listen.addr")).unwrap();
    let addr = addr.trim().to_string();

    let size = 16 * MIB;
    let src = t.source_path("disk-1");
    make_image(&src, size, 51);
    let key = t.key_path("disk-1");
    let k1 = write_key(&key, 1);
    let agent = AgentCmd::new(&addr, "disk-1", &key, &t.state_dir("disk-1"), &src);

    // Unknown until assigned.
    let run = agent.run(Duration::from_secs(60));
    assert!(!run.status.success());
    assert!(run.stderr.contains("unknown_disk"), "{}", run.describe());

    rt.block_on(control.assign_disk("disk-1", size, k1))
        .unwrap();
    let first = agent.run(Duration::from_secs(120));
    first.expect_verified();
    assert_same_file(&t.data_dir().join("disks/disk-1.img"), &src, "volume");

    // Revoke while a (slow) pass streams: the session ends with `revoked`, the agent fails.
    apply_scattered_changes(&src, 30, 7);
    let running = agent.clone().bandwidth("1M").retry_timeout(30).spawn();
    wait_for(
        Duration::from_secs(30),
        "the slow pass to be acknowledged",
        || (durable_seq(&t.data_dir(), "disk-1") > first.u64("checkpoint_seq")).then_some(()),
    );
    assert!(control.revoke("disk-1"));
    let cut = running.wait(Duration::from_secs(60));
    assert!(!cut.status.success(), "{}", cut.describe());
    assert!(cut.stderr.contains("revoked"), "{}", cut.describe());

    // The old key no longer works.
    let again = agent.run(Duration::from_secs(60));
    assert!(!again.status.success());
    assert!(again.stderr.contains("revoked"), "{}", again.describe());
    assert!(!control.revoke("no-such-disk"));

    // Re-assigning with a new key resumes the interrupted pass.
    let k2 = write_key(&key, 2);
    rt.block_on(control.assign_disk("disk-1", size, k2))
        .unwrap();
    let resumed = agent.run(Duration::from_secs(120));
    let j = resumed.expect_verified();
    assert!(!j["resumed_from_seq"].is_null(), "{}", resumed.describe());
    assert_same_file(
        &t.data_dir().join("disks/disk-1.img"),
        &src,
        "volume after resume",
    );
    // The size of a served disk cannot change.
    assert!(rt
        .block_on(control.assign_disk("disk-1", size * 2, write_key(&key, 3)))
        .is_err());

    cancel.cancel();
    rt.block_on(server).unwrap().unwrap();
}

/// What a command does to a `[[disks]]` disk outlives a restart: a revoked config key stays
/// revoked (the config still names it), and a rotated key stays rotated.
#[test]
fn revoke_and_rotation_of_a_config_disk_survive_a_restart() {
    let t = TestDir::new("control-config-disk");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let size = 4 * MIB;
    let src = t.source_path("cfg-1");
    make_image(&src, size, 52);
    let key = t.key_path("cfg-1");
    let k1 = write_key(&key, 11);
    let toml = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[backend]\nkind = \"local\"\n\
         [[disks]]\nid = \"cfg-1\"\nsize_bytes = {size}\nkey_file = \"{}\"\n",
        t.data_dir().display(),
        key.display()
    );
    let start = || {
        let config = Config::from_toml(&toml, "test", Vec::new()).unwrap();
        let cancel = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<Control>();
        let server = rt.spawn(run_with_control(config, cancel.clone(), Some(tx)));
        let control = rt.block_on(rx).expect("gateway started");
        let addr = std::fs::read_to_string(t.data_dir().join("listen.addr")).unwrap();
        (control, cancel, server, addr.trim().to_string())
    };
    let stop = |cancel: CancellationToken, server: tokio::task::JoinHandle<_>| {
        cancel.cancel();
        let r: Result<(), sync_gateway::server::GatewayError> = rt.block_on(server).unwrap();
        r.unwrap();
    };

    let (control, cancel, server, addr) = start();
    let agent = |addr: &str| AgentCmd::new(addr, "cfg-1", &key, &t.state_dir("cfg-1"), &src);
    agent(&addr).run(Duration::from_secs(60)).expect_verified();
    assert!(control.revoke("cfg-1"));
    stop(cancel, server);

    // Restarted with the same config (and key file): still revoked.
    let (control, cancel, server, addr) = start();
    let refused = agent(&addr).retry_timeout(5).run(Duration::from_secs(60));
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(refused.stderr.contains("revoked"), "{}", refused.describe());

    // Rotated by command: the new key works, and still does after a restart; the config's
    // key file (k1) does not.
    let k2 = sync_gateway::protocol::auth::DiskKey::generate();
    rt.block_on(control.assign_disk("cfg-1", size, k2.clone()))
        .unwrap();
    stop(cancel, server);
    let (_control, cancel, server, addr) = start();
    let old = agent(&addr).retry_timeout(5).run(Duration::from_secs(60));
    assert!(!old.status.success(), "{}", old.describe());
    std::fs::write(&key, format!("{}\n", k2.to_hex())).unwrap();
    apply_scattered_changes(&src, 5, 12);
    agent(&addr).run(Duration::from_secs(60)).expect_verified();
    let _ = k1;
    stop(cancel, server);
}
