//! The operator-facing edges of `sync-gateway`: config errors, key files, the data dir lock.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn gateway(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(GATEWAY_BIN);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SYNC_GATEWAY_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().unwrap()
}

#[test]
fn keygen_refuses_to_replace_a_key_unless_forced() {
    let t = TestDir::new("cli-keygen");
    let key = t.key_path("k");
    let first = gateway(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(first.status.success(), "{first:?}");
    let old = std::fs::read_to_string(&key).unwrap();
    assert_eq!(old.trim().len(), 64);
    let again = gateway(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing"));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), old, "key untouched");
    let forced = gateway(&["keygen", "--out", key.to_str().unwrap(), "--force"]);
    assert!(forced.status.success());
    assert_ne!(std::fs::read_to_string(&key).unwrap(), old);
}

#[test]
fn config_errors_exit_2_with_one_clear_line() {
    let t = TestDir::new("cli-config");
    let bad_key = t.path("bad.key");
    std::fs::write(&bad_key, "abc\n").unwrap();
    let cfg = GatewayConfig::new(t.data_dir()).disk("d1", 1 << 20, &bad_key);
    let path = t.path("gw.toml");
    cfg.write(&path);
    let out = gateway(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("disk d1") && err.contains("64 hex"), "{err}");
    assert_eq!(
        err.matches("64 hex").count(),
        1,
        "cause printed once: {err}"
    );

    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nlisten_port = 3\n").unwrap();
    let out = gateway(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_port"));
}

#[test]
fn check_config_prints_the_effective_settings() {
    let t = TestDir::new("cli-check");
    let key = t.key_path("k");
    write_key(&key, 1);
    let cfg = GatewayConfig::new(t.data_dir()).disk("disk-1", 64 << 20, &key);
    let path = t.path("gw.toml");
    cfg.write(&path);
    let out = gateway(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for key in ["sync_bytes", "idle_timeout_secs", "direct_io", "disk-1"] {
        assert!(text.contains(key), "{key} missing from\n{text}");
    }
}

#[test]
fn a_second_gateway_on_the_same_data_dir_refuses_to_start() {
    let t = TestDir::new("cli-lock");
    let key = t.key_path("k");
    write_key(&key, 2);
    let cfg = GatewayConfig::new(t.data_dir()).disk("disk-1", 1 << 20, &key);
    let mut first = Gateway::start(&cfg, &t.path("gw.toml"), &t.path("gw.log"));
    let out = gateway(&["run", "--config", t.path("gw.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another sync-gateway"),
        "{out:?}"
    );
    assert!(first.is_alive());
    first.terminate(Duration::from_secs(30));
}
