//! Snapshot retention in a running gateway: configured tiers prune old snapshots after each
//! checkpoint, always keeping the newest completed one; without `[retention]` nothing is pruned.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// Runs `passes` verified passes (changing the source between them) and returns the snapshot
/// ids the agent reported, oldest first.
fn passes(t: &TestDir, gw: &Gateway, key: &std::path::Path, passes: usize) -> Vec<String> {
    let src = t.source_path("disk-1");
    make_image(&src, 8 * MIB, 21);
    let agent = AgentCmd::new(gw.addr, "disk-1", key, &t.state_dir("disk-1"), &src);
    let mut ids = Vec::new();
    for i in 0..passes {
        if i > 0 {
            apply_scattered_changes(&src, 2, 30 + i as u64);
        }
        let run = agent.run(Duration::from_secs(120));
        run.expect_verified();
        ids.push(run.str("snapshot_id"));
    }
    ids
}

fn snapshot_ids(gw: &Gateway) -> Vec<String> {
    gw.snapshots(Some("disk-1"))
        .into_iter()
        .map(|s| s.id)
        .collect()
}

#[test]
fn configured_tiers_prune_all_but_the_newest_in_a_bucket() {
    let t = TestDir::new("retention-prune");
    let key = t.key_path("disk-1");
    write_key(&key, 41);
    // One bucket of 10^9 s (the next boundary is in 2033): every pass lands in the same bucket,
    // so the tier keeps only the newest snapshot.
    let cfg = GatewayConfig::new(t.data_dir())
        .disk("disk-1", 8 * MIB, &key)
        .extra_toml("[[retention.tiers]]\nevery_secs = 1000000000\nkeep_secs = 1000000000\n");
    let gw = Gateway::start(&cfg, &t.path("gw.toml"), &t.path("gw.log"));
    let ids = passes(&t, &gw, &key, 3);
    let newest = ids.last().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = snapshot_ids(&gw);
        if left == vec![newest.clone()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected only {newest} left, have {left:?} (all: {ids:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for old in &ids[..2] {
        assert!(
            !snapshot_image(&t.data_dir(), "disk-1", old).exists(),
            "{old} image still on disk"
        );
    }
    assert_same_file(
        &snapshot_image(&t.data_dir(), "disk-1", &newest),
        &t.source_path("disk-1"),
        "the kept snapshot",
    );
}

#[test]
fn without_retention_every_snapshot_is_kept() {
    let t = TestDir::new("retention-none");
    let key = t.key_path("disk-1");
    write_key(&key, 42);
    let cfg = GatewayConfig::new(t.data_dir()).disk("disk-1", 8 * MIB, &key);
    let gw = Gateway::start(&cfg, &t.path("gw.toml"), &t.path("gw.log"));
    let ids = passes(&t, &gw, &key, 3);
    assert_eq!(snapshot_ids(&gw), ids);
}
