//! Tiered snapshot retention: which snapshots of a disk a [`RetentionPolicy`] keeps, and
//! [`prune`], which deletes the rest through the [`Backend`].
//!
//! # Semantics
//!
//! A policy is a list of [`Tier`]s, each "one snapshot every `every_secs`, kept for
//! `keep_secs`". [`plan`] decides, for one disk, at an injected time `now`:
//!
//! ```text
//!   tier window      (now - keep_secs, now]          open at the old end, closed at now
//!   tier buckets     [k * every_secs, (k + 1) * every_secs)   aligned to the Unix epoch
//!
//!   ─────┬──────────┬──────────┬──────────┬─────▶ time
//!        │  bucket  │  bucket  │  bucket  │ now
//!           ◀──────────── window ───────────▶
//!           keep the NEWEST completed snapshot of each bucket, counting only snapshots
//!           inside the window (a bucket cut by the window's old end still keeps one)
//! ```
//!
//! - A `completed` snapshot is kept when at least one tier keeps it, when it is the newest
//!   completed snapshot of the disk (always, whatever its age, so a disk never loses its last
//!   restore point), or when its time is after `now` (clock skew: never judged by a clock that
//!   is behind). Otherwise it is deleted, with reason [`REASON_SUPERSEDED`] when it lies inside
//!   some tier's window (a newer snapshot holds its bucket) and [`REASON_EXPIRED`] when it is
//!   older than every window.
//! - A `pending` snapshot (copy still running) is never deleted and does not count: it holds no
//!   bucket, and it is not "the newest completed".
//! - A `failed` snapshot is deleted ([`REASON_FAILED`]) when it is older than the newest completed
//!   snapshot; a newer one (or any one while nothing has completed) is kept for diagnosis until a
//!   later snapshot completes.
//!
//! - A policy with **no tiers keeps everything**: the explicit way to turn pruning off where a
//!   default policy would apply (under a control plane).
//!
//! "Newer" orders by `(created_unix_ms, checkpoint_seq, id)`, so ties are broken the same way
//! on every run. Both lists of the [`RetentionPlan`] are in that order, and every snapshot given
//! to [`plan`] appears in exactly one of them.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, SnapshotInfo, SnapshotState};

/// Deletion reason: the snapshot failed and a newer one completed.
pub const REASON_FAILED: &str = "failed";
/// Deletion reason: inside a tier's window, but a newer snapshot holds its bucket in every tier.
pub const REASON_SUPERSEDED: &str = "superseded";
/// Deletion reason: older than every tier's window.
pub const REASON_EXPIRED: &str = "expired";

/// Tiers of snapshots to keep; see the [module docs](self) for the exact rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// The tiers; a snapshot is kept when any tier keeps it.
    pub tiers: Vec<Tier>,
}

/// One tier: the newest snapshot of every `every_secs` bucket, for the last `keep_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Bucket width in seconds (buckets are aligned to the Unix epoch).
    pub every_secs: u64,
    /// How far back the tier reaches, in seconds.
    pub keep_secs: u64,
}

impl Default for RetentionPolicy {
    /// Like AWS DRS: every 10 minutes kept 1 hour, hourly kept 24 hours, daily kept 7 days.
    fn default() -> Self {
        RetentionPolicy {
            tiers: vec![
                Tier {
                    every_secs: 10 * 60,
                    keep_secs: 3600,
                },
                Tier {
                    every_secs: 3600,
                    keep_secs: 24 * 3600,
                },
                Tier {
                    every_secs: 24 * 3600,
                    keep_secs: 7 * 24 * 3600,
                },
            ],
        }
    }
}

/// Why a [`RetentionPolicy`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("retention tier {index}: every_secs must be greater than 0")]
    ZeroInterval { index: usize },
    #[error("retention tier {index}: keep_secs ({keep_secs}) must be at least every_secs ({every_secs})")]
    KeepShorterThanInterval {
        index: usize,
        every_secs: u64,
        keep_secs: u64,
    },
    #[error("retention tier {index}: {field} ({value}) is too large")]
    TooLarge {
        index: usize,
        field: &'static str,
        value: u64,
    },
}

/// Above this, seconds to milliseconds would overflow `u64` (about 584 million years).
const MAX_SECS: u64 = u64::MAX / 1000;

impl RetentionPolicy {
    /// Checks that every tier makes sense: `every_secs > 0`, `keep_secs >= every_secs`. No
    /// tiers at all is valid: nothing is pruned.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (index, t) in self.tiers.iter().enumerate() {
            if t.every_secs == 0 {
                return Err(PolicyError::ZeroInterval { index });
            }
            if t.keep_secs < t.every_secs {
                return Err(PolicyError::KeepShorterThanInterval {
                    index,
                    every_secs: t.every_secs,
                    keep_secs: t.keep_secs,
                });
            }
            if t.keep_secs > MAX_SECS {
                return Err(PolicyError::TooLarge {
                    index,
                    field: "keep_secs",
                    value: t.keep_secs,
                });
            }
        }
        Ok(())
    }
}

/// What [`plan`] decided: ids to keep and ids to delete with the reason, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetentionPlan {
    pub keep: Vec<String>,
    pub delete: Vec<(String, &'static str)>,
}

/// The ordering key of "newer".
fn order_key(s: &SnapshotInfo) -> (u64, u64, &str) {
    (s.created_unix_ms, s.checkpoint_seq, s.id.as_str())
}

/// Decides which of one disk's `snapshots` to keep at `now_unix_ms`; pure. Tiers with
/// `every_secs == 0` keep nothing (call [`RetentionPolicy::validate`] first).
pub fn plan(
    policy: &RetentionPolicy,
    snapshots: &[SnapshotInfo],
    now_unix_ms: u64,
) -> RetentionPlan {
    let mut sorted: Vec<&SnapshotInfo> = snapshots.iter().collect();
    sorted.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
    if policy.tiers.is_empty() {
        return RetentionPlan {
            keep: sorted.iter().map(|s| s.id.clone()).collect(),
            delete: Vec::new(),
        };
    }
    let newest_completed = sorted
        .iter()
        .rev()
        .find(|s| s.state == SnapshotState::Completed)
        .map(|s| order_key(s));

    // Indices (into `sorted`) some tier keeps, and those inside at least one window.
    let mut kept_by_tier: HashSet<usize> = HashSet::new();
    let mut in_window: HashSet<usize> = HashSet::new();
    for tier in &policy.tiers {
        let every_ms = tier.every_secs.saturating_mul(1000);
        if every_ms == 0 {
            continue;
        }
        let oldest_excluded = now_unix_ms.saturating_sub(tier.keep_secs.saturating_mul(1000));
        // bucket -> newest index in it; `sorted` is oldest first, so the last insert wins.
        let mut newest_in_bucket: BTreeMap<u64, usize> = BTreeMap::new();
        for (i, s) in sorted.iter().enumerate() {
            let t = s.created_unix_ms;
            if s.state != SnapshotState::Completed || t <= oldest_excluded || t > now_unix_ms {
                continue;
            }
            in_window.insert(i);
            newest_in_bucket.insert(t / every_ms, i);
        }
        kept_by_tier.extend(newest_in_bucket.into_values());
    }

    let mut out = RetentionPlan::default();
    for (i, s) in sorted.iter().enumerate() {
        let verdict: Option<&'static str> = match s.state {
            SnapshotState::Pending => None,
            SnapshotState::Failed => match newest_completed {
                Some(newest) if order_key(s) < newest => Some(REASON_FAILED),
                _ => None,
            },
            SnapshotState::Completed => {
                if kept_by_tier.contains(&i)
                    || Some(order_key(s)) == newest_completed
                    || s.created_unix_ms > now_unix_ms
                {
                    None
                } else if in_window.contains(&i) {
                    Some(REASON_SUPERSEDED)
                } else {
                    Some(REASON_EXPIRED)
                }
            }
        };
        match verdict {
            None => out.keep.push(s.id.clone()),
            Some(reason) => out.delete.push((s.id.clone(), reason)),
        }
    }
    out
}

/// Applies `policy` to the snapshots of `disk_id` at `now_unix_ms`: lists them, [`plan`]s, and
/// deletes the `delete` set oldest first, logging each. Snapshots named in `protected` are
/// kept whatever the plan says: the disk's current checkpoint snapshot is the consistent point a
/// launch uses by default, and a newer snapshot taken on command in the same bucket must not
/// push it out. A snapshot the cloud refuses to delete because an image is made of it (a
/// launch) is kept and the plan goes on; any other failed deletion stops it (the next run plans
/// again from what is left). Returns the plan as carried out.
pub async fn prune(
    backend: &Backend,
    disk_id: &str,
    policy: &RetentionPolicy,
    now_unix_ms: u64,
    protected: &[String],
) -> Result<RetentionPlan, BackendError> {
    let snapshots = backend.list_snapshots(Some(disk_id)).await?;
    let mut decided = plan(policy, &snapshots, now_unix_ms);
    let (spared, delete): (Vec<_>, Vec<_>) = decided.delete.into_iter().partition(|(id, _)| {
        // A retaken cloud snapshot stands for the failed one a checkpoint recorded.
        protected.contains(id)
            || snapshots
                .iter()
                .any(|s| &s.id == id && protected.iter().any(|p| s.stands_for(p)))
    });
    decided.delete = delete;
    decided.keep.extend(spared.into_iter().map(|(id, _)| id));
    let mut in_use = Vec::new();
    for (id, reason) in &decided.delete {
        let Some(info) = snapshots.iter().find(|s| &s.id == id) else {
            continue;
        };
        match backend.delete_snapshot(info).await {
            Ok(()) => {}
            // Kept by the cloud while an image of a launch is made of it: not a failure, and
            // the rest of the plan goes on.
            Err(e @ BackendError::SnapshotInUse { .. }) => {
                tracing::info!(disk = disk_id, snapshot = %id, reason = %e,
                    "retention keeps a snapshot the cloud holds for an image");
                in_use.push(id.clone());
                continue;
            }
            Err(e) => return Err(e),
        }
        tracing::info!(disk = disk_id, snapshot = %id, reason = *reason,
            created_unix_ms = info.created_unix_ms, "retention deleted snapshot");
    }
    decided.delete.retain(|(id, _)| !in_use.contains(id));
    decided.keep.extend(in_use);
    Ok(decided)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
