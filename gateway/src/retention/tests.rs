//! Retention plans pinned with injected time (no sleeps).

use super::*;

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;
/// A day boundary (2024-10-04T00:00:00Z), so every tier's buckets align with `NOW`.
const NOW: u64 = 20_000 * DAY;

fn snap(id: &str, created_unix_ms: u64, state: SnapshotState) -> SnapshotInfo {
    SnapshotInfo {
        id: id.into(),
        disk_id: "d".into(),
        label: "l".into(),
        checkpoint_seq: 0,
        created_unix_ms,
        created: String::new(),
        size_bytes: 0,
        method: "reflink".into(),
        path: None,
        state,
        replaces: None,
    }
}

fn done(id: &str, t: u64) -> SnapshotInfo {
    snap(id, t, SnapshotState::Completed)
}

/// Snapshot `k` taken `k * 5` minutes before `NOW`, for `k` in `0..=count` (shuffled order
/// in, to show the plan does not rely on the input order).
fn every_five_minutes(count: u64) -> Vec<SnapshotInfo> {
    let mut v: Vec<SnapshotInfo> = (0..=count)
        .map(|k| done(&format!("k{k}"), NOW - k * 5 * MIN))
        .collect();
    v.reverse();
    let third = v.len() / 3;
    v.rotate_left(third);
    v
}

fn ks(plan: &RetentionPlan) -> Vec<u64> {
    let mut v: Vec<u64> = plan
        .keep
        .iter()
        .map(|id| id[1..].parse().unwrap())
        .collect();
    v.sort_unstable();
    v
}

fn tier(every_secs: u64, keep_secs: u64) -> RetentionPolicy {
    RetentionPolicy {
        tiers: vec![Tier {
            every_secs,
            keep_secs,
        }],
    }
}

// With NOW bucket-aligned and a snapshot every 5 minutes: k=0 (taken at NOW) opens a bucket
// of its own; each older bucket's newest member is the one just before the boundary, k=1,
// then every bucket width further back. A snapshot exactly `keep` old is outside.

#[test]
fn ten_minute_tier_keeps_newest_of_each_bucket_in_the_last_hour() {
    let p = plan(&tier(600, 3600), &every_five_minutes(8 * 288), NOW);
    // k=12 (exactly 1 h old) is outside; its bucket keeps k=11. Oldest-per-bucket would be
    // 2, 4, ..., 10, 11.
    assert_eq!(ks(&p), vec![0, 1, 3, 5, 7, 9, 11]);
}

#[test]
fn hourly_tier_keeps_24_buckets_plus_the_current_one() {
    let p = plan(&tier(3600, 24 * 3600), &every_five_minutes(8 * 288), NOW);
    let expected: Vec<u64> = std::iter::once(0)
        .chain((0..24).map(|m| 12 * m + 1))
        .collect();
    assert_eq!(ks(&p), expected);
}

#[test]
fn daily_tier_keeps_7_buckets_plus_the_current_one() {
    let p = plan(&tier(86_400, 7 * 86_400), &every_five_minutes(8 * 288), NOW);
    let expected: Vec<u64> = std::iter::once(0)
        .chain((0..7).map(|m| 288 * m + 1))
        .collect();
    assert_eq!(ks(&p), expected);
}

#[test]
fn a_simulated_week_under_the_default_policy() {
    let all = every_five_minutes(8 * 288);
    let p = plan(&RetentionPolicy::default(), &all, NOW);
    let mut expected: Vec<u64> = vec![0, 1, 3, 5, 7, 9, 11]; // 10-minute tier
    expected.extend((1..24).map(|m| 12 * m + 1)); // hourly: 13, 25, ..., 277
    expected.extend((1..7).map(|m| 288 * m + 1)); // daily: 289, 577, ..., 1729
    expected.sort_unstable();
    assert_eq!(expected.len(), 36);
    assert_eq!(ks(&p), expected);
    assert_eq!(p.keep.len() + p.delete.len(), all.len());
    // Output is oldest first.
    assert_eq!(p.keep.first().unwrap(), "k1729");
    assert_eq!(p.keep.last().unwrap(), "k0");
    assert_eq!(p.delete.first().unwrap().0, "k2304");
    assert_eq!(p.delete.last().unwrap().0, "k2");
    // Reasons: k2016 is exactly 7 days old (outside every window); k2015 is inside the
    // daily window, superseded by k1729 in its bucket.
    let reason = |id: &str| p.delete.iter().find(|(d, _)| d == id).unwrap().1;
    assert_eq!(reason("k2016"), REASON_EXPIRED);
    assert_eq!(reason("k2304"), REASON_EXPIRED);
    assert_eq!(reason("k2015"), REASON_SUPERSEDED);
    assert_eq!(reason("k2"), REASON_SUPERSEDED);
    // Same input, same plan, whatever the input order.
    let mut again = all.clone();
    again.reverse();
    assert_eq!(plan(&RetentionPolicy::default(), &again, NOW), p);
}

#[test]
fn window_is_open_at_its_old_end() {
    let policy = tier(600, 3600);
    let newest = done("newest", NOW - 20 * MIN);
    let p = plan(&policy, &[done("at-edge", NOW - HOUR), newest.clone()], NOW);
    assert_eq!(p.keep, vec!["newest"]);
    assert_eq!(p.delete, vec![("at-edge".to_string(), REASON_EXPIRED)]);
    let p = plan(&policy, &[done("inside", NOW - HOUR + 1), newest], NOW);
    assert_eq!(p.keep, vec!["inside", "newest"]);
    assert!(p.delete.is_empty());
}

#[test]
fn buckets_are_aligned_to_the_epoch_not_to_now() {
    // now is 7 minutes past a 10-minute boundary: 1m and 6m ago share the bucket
    // [NOW, NOW+10m); 8m and 9m ago share the previous one.
    let now = NOW + 7 * MIN;
    let snaps = [
        done("9m", now - 9 * MIN),
        done("8m", now - 8 * MIN),
        done("6m", now - 6 * MIN),
        done("1m", now - MIN),
    ];
    let p = plan(&tier(600, 3600), &snaps, now);
    assert_eq!(p.keep, vec!["8m", "1m"]);
    assert_eq!(
        p.delete,
        vec![
            ("9m".to_string(), REASON_SUPERSEDED),
            ("6m".to_string(), REASON_SUPERSEDED)
        ]
    );
}

#[test]
fn newest_completed_is_kept_even_older_than_every_window() {
    let snaps = [
        done("a", NOW - 40 * DAY),
        done("b", NOW - 30 * DAY),
        snap("c-failed", NOW - 20 * DAY, SnapshotState::Failed),
    ];
    let p = plan(&RetentionPolicy::default(), &snaps, NOW);
    // c-failed is newer than the newest completed snapshot, so it stays for diagnosis.
    assert_eq!(p.keep, vec!["b", "c-failed"]);
    assert_eq!(p.delete, vec![("a".to_string(), REASON_EXPIRED)]);
}

#[test]
fn pending_is_never_deleted_and_holds_no_bucket() {
    let snaps = [
        snap("ancient-pending", NOW - 90 * DAY, SnapshotState::Pending),
        done("older", NOW - 3 * MIN),
        // Newest in the bucket, but pending: "older" must still hold the bucket, and it
        // is also the newest completed.
        snap("pending", NOW - MIN, SnapshotState::Pending),
    ];
    let p = plan(&tier(600, 3600), &snaps, NOW - 1);
    assert_eq!(p.keep, vec!["ancient-pending", "older", "pending"]);
    assert!(p.delete.is_empty());
    // Under a policy where the pending one would win the bucket were it counted.
    let snaps = [
        done("x", NOW - 30 * MIN - 2 * MIN),
        done("y", NOW - 30 * MIN - MIN),
        snap("p", NOW - 30 * MIN, SnapshotState::Pending),
        done("z", NOW),
    ];
    let p = plan(&tier(3600, 3600), &snaps, NOW);
    // x, y, p share bucket [NOW-1h, NOW); y is its newest completed one. z opens the next.
    assert_eq!(p.keep, vec!["y", "p", "z"]);
    assert_eq!(p.delete, vec![("x".to_string(), REASON_SUPERSEDED)]);
}

#[test]
fn failed_older_than_newest_completed_is_deleted() {
    let snaps = [
        snap("f-old", NOW - 2 * DAY, SnapshotState::Failed),
        snap("f-recent", NOW - 2 * MIN, SnapshotState::Failed),
        done("ok", NOW - MIN),
        snap("f-newest", NOW - 30_000, SnapshotState::Failed),
    ];
    let p = plan(&RetentionPolicy::default(), &snaps, NOW);
    assert_eq!(p.keep, vec!["ok", "f-newest"]);
    assert_eq!(
        p.delete,
        vec![
            ("f-old".to_string(), REASON_FAILED),
            ("f-recent".to_string(), REASON_FAILED)
        ]
    );
    // Nothing completed yet: failed ones stay.
    let p = plan(&RetentionPolicy::default(), &snaps[..2], NOW);
    assert_eq!(p.keep, vec!["f-old", "f-recent"]);
    assert!(p.delete.is_empty());
}

#[test]
fn future_snapshots_are_kept() {
    let snaps = [
        done("old", NOW - 10 * DAY),
        done("now", NOW),
        done("skewed", NOW + HOUR),
        done("skewed-more", NOW + 2 * HOUR),
    ];
    let p = plan(&RetentionPolicy::default(), &snaps, NOW);
    assert_eq!(p.keep, vec!["now", "skewed", "skewed-more"]);
    assert_eq!(p.delete, vec![("old".to_string(), REASON_EXPIRED)]);
}

#[test]
fn ties_break_by_checkpoint_then_id() {
    let mut a = done("a", NOW - MIN);
    let mut b = done("b", NOW - MIN);
    a.checkpoint_seq = 2;
    b.checkpoint_seq = 1;
    let p = plan(&tier(600, 3600), &[a.clone(), b.clone()], NOW);
    assert_eq!(p.keep, vec!["a"]);
    assert_eq!(p.delete, vec![("b".to_string(), REASON_SUPERSEDED)]);
    b.checkpoint_seq = 2;
    let p = plan(&tier(600, 3600), &[b, a], NOW);
    assert_eq!(p.keep, vec!["b"]);
}

#[test]
fn empty_and_single() {
    assert_eq!(
        plan(&RetentionPolicy::default(), &[], NOW),
        RetentionPlan::default()
    );
    for t in [NOW - 365 * DAY, NOW - MIN, NOW, NOW + DAY] {
        let p = plan(&RetentionPolicy::default(), &[done("only", t)], NOW);
        assert_eq!(p.keep, vec!["only"]);
        assert!(p.delete.is_empty());
    }
    // A time before the epoch-side of the window (now < keep) does not underflow.
    let p = plan(
        &RetentionPolicy::default(),
        &[done("x", 5), done("y", 9)],
        10,
    );
    assert_eq!(p.keep, vec!["y"]);
    assert_eq!(p.delete, vec![("x".to_string(), REASON_SUPERSEDED)]);
}

#[test]
fn validation() {
    assert_eq!(RetentionPolicy::default().validate(), Ok(()));
    // No tiers: valid, and nothing is pruned (not even old or failed snapshots).
    let off = RetentionPolicy { tiers: vec![] };
    assert_eq!(off.validate(), Ok(()));
    let p = plan(&off, &[done("x", 5), done("y", 9)], 10_000_000);
    assert_eq!(p.keep, vec!["x", "y"]);
    assert!(p.delete.is_empty());
    assert_eq!(
        tier(0, 60).validate(),
        Err(PolicyError::ZeroInterval { index: 0 })
    );
    let mut p = RetentionPolicy::default();
    p.tiers[1].keep_secs = 60;
    let e = p.validate().unwrap_err();
    assert_eq!(
        e,
        PolicyError::KeepShorterThanInterval {
            index: 1,
            every_secs: 3600,
            keep_secs: 60
        }
    );
    assert_eq!(
        e.to_string(),
        "retention tier 1: keep_secs (60) must be at least every_secs (3600)"
    );
    assert_eq!(tier(60, 60).validate(), Ok(()));
    assert!(matches!(
        tier(60, u64::MAX).validate(),
        Err(PolicyError::TooLarge { .. })
    ));
}

#[test]
fn serde_round_trip_and_unknown_keys() {
    let p = RetentionPolicy::default();
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<RetentionPolicy>(&json).unwrap(), p);
    let toml_text = toml::to_string(&p).unwrap();
    assert_eq!(toml::from_str::<RetentionPolicy>(&toml_text).unwrap(), p);
    let parsed: RetentionPolicy =
        serde_json::from_str(r#"{"tiers":[{"every_secs":600,"keep_secs":3600}]}"#).unwrap();
    assert_eq!(parsed, tier(600, 3600));
    for bad in [
        r#"{"tiers":[],"extra":1}"#,
        r#"{"tiers":[{"every_secs":600,"keep_secs":3600,"keep_count":3}]}"#,
        r#"{"tiers":[{"every_secs":600}]}"#,
    ] {
        assert!(
            serde_json::from_str::<RetentionPolicy>(bad).is_err(),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn prune_deletes_files_on_the_local_backend() {
    use crate::backend::{LocalBackend, SnapshotRequest};
    let dir = tempfile::tempdir().unwrap();
    let local = LocalBackend::new(dir.path().to_path_buf(), true);
    let v = local.open_volume("d", 1 << 20).unwrap();
    v.write_at(&vec![3u8; 4096], 0).unwrap();
    v.sync().unwrap();
    // Ages: 20 d (expired), 3 d + 2 h and 3 d + 1 h (same daily bucket: superseded / kept),
    // 5 min (newest, kept), and one that failed 10 d ago.
    let ages = [
        20 * DAY,
        3 * DAY + 2 * HOUR,
        3 * DAY + HOUR,
        5 * MIN,
        10 * DAY,
    ];
    let snap_dir = dir.path().join("snapshots/d");
    let mut ids = Vec::new();
    for (seq, age) in ages.iter().enumerate() {
        let req = SnapshotRequest {
            disk_id: "d".into(),
            label: format!("c{seq}"),
            checkpoint_seq: seq as u64,
        };
        let mut info = local.begin_snapshot(&v, &req).unwrap().wait().unwrap();
        info.created_unix_ms = NOW + 30 * MIN - age;
        if seq == 4 {
            info.state = SnapshotState::Failed;
        }
        let meta = snap_dir.join(format!("{}.json", info.id));
        std::fs::write(&meta, serde_json::to_vec(&info).unwrap()).unwrap();
        ids.push(info.id);
    }
    // Leftover side files of an earlier interrupted copy go with their snapshot.
    std::fs::write(snap_dir.join(format!("{}.parts", ids[0])), b"x").unwrap();
    std::fs::write(snap_dir.join(format!("{}.copied", ids[0])), b"x").unwrap();

    let backend = Backend::Local(local);
    let now = NOW + 30 * MIN;
    // ids[1] is superseded in its bucket, but protected (the disk's current checkpoint).
    let p = prune(
        &backend,
        "d",
        &RetentionPolicy::default(),
        now,
        std::slice::from_ref(&ids[1]),
    )
    .await
    .unwrap();
    assert_eq!(p.keep, vec![ids[2].clone(), ids[3].clone(), ids[1].clone()]);
    assert_eq!(
        p.delete,
        vec![
            (ids[0].clone(), REASON_EXPIRED),
            (ids[4].clone(), REASON_FAILED)
        ]
    );
    let exists = |id: &str, ext: &str| snap_dir.join(format!("{id}.{ext}")).exists();
    for id in [&ids[0], &ids[4]] {
        for ext in ["img", "json", "parts", "copied"] {
            assert!(!exists(id, ext), "{id}.{ext} should be gone");
        }
    }
    for id in [&ids[1], &ids[2], &ids[3]] {
        assert!(
            exists(id, "img") && exists(id, "json"),
            "{id} should remain"
        );
    }
    let listed = || async {
        backend
            .list_snapshots(Some("d"))
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<String>>()
    };
    assert_eq!(
        listed().await,
        vec![ids[1].clone(), ids[2].clone(), ids[3].clone()]
    );
    // No longer protected: it goes as superseded.
    let p = prune(&backend, "d", &RetentionPolicy::default(), now, &[])
        .await
        .unwrap();
    assert_eq!(p.delete, vec![(ids[1].clone(), REASON_SUPERSEDED)]);
    assert_eq!(listed().await, p.keep);
    // Pruning again is a no-op.
    let again = prune(&backend, "d", &RetentionPolicy::default(), now, &[])
        .await
        .unwrap();
    assert_eq!(again.keep, p.keep);
    assert!(again.delete.is_empty());
}

#[tokio::test]
async fn delete_refuses_pending_and_odd_ids() {
    use crate::backend::LocalBackend;
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Local(LocalBackend::new(dir.path().to_path_buf(), true));
    let snap_dir = dir.path().join("snapshots/d");
    std::fs::create_dir_all(&snap_dir).unwrap();
    // Listed as completed, but pending on disk (a copy restarted since): refused.
    let listed = done("s1", NOW);
    let mut on_disk = listed.clone();
    on_disk.state = SnapshotState::Pending;
    std::fs::write(
        snap_dir.join("s1.json"),
        serde_json::to_vec(&on_disk).unwrap(),
    )
    .unwrap();
    std::fs::write(snap_dir.join("s1.img"), b"x").unwrap();
    for info in [&listed, &on_disk] {
        let e = backend.delete_snapshot(info).await.unwrap_err();
        assert!(matches!(e, BackendError::SnapshotPending { .. }), "{e}");
    }
    assert!(snap_dir.join("s1.img").exists() && snap_dir.join("s1.json").exists());
    for id in ["", ".", "..", "../d/s1", "a/b"] {
        let e = backend.delete_snapshot(&done(id, NOW)).await.unwrap_err();
        assert!(matches!(e, BackendError::InvalidSnapshotId { .. }), "{e}");
    }
    // Already gone: fine.
    backend.delete_snapshot(&done("gone", NOW)).await.unwrap();
}
