//! Taking a checkpoint's snapshot and following it until the cloud completes it: a snapshot
//! the cloud fails is taken again while the volume still holds the same content, and the
//! retake stands for its checkpoint only once recorded as checked.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::*;

impl<A: CloudApi> Inner<A> {
    /// Creates a snapshot of `volume` for checkpoint `req`, tagged so that [`from_cloud`]
    /// reads it back; `replaces`: the failed snapshot this one takes again.
    pub(super) async fn create_snapshot(
        &self,
        volume: &str,
        req: &SnapshotRequest,
        created_unix_ms: u64,
        size: u64,
        replaces: Option<&str>,
    ) -> Result<String, CloudError> {
        let mut tags = self.base_tags(&req.disk_id);
        tags.insert(TAG_LABEL.into(), self.api.tag_value(&req.label));
        tags.insert(TAG_SEQ.into(), req.checkpoint_seq.to_string());
        tags.insert(TAG_CREATED_MS.into(), created_unix_ms.to_string());
        tags.insert(TAG_SIZE.into(), size.to_string());
        if let Some(r) = replaces {
            tags.insert(TAG_REPLACES.into(), r.into());
        }
        let retaken = if replaces.is_some() { ", retaken" } else { "" };
        self.api
            .create_snapshot(&NewSnapshot {
                volume: volume.into(),
                name: format!("{} {}", req.disk_id, req.label),
                description: format!(
                    "sync-gateway {} checkpoint {} (seq {}){retaken}",
                    req.disk_id, req.label, req.checkpoint_seq
                ),
                tags,
            })
            .await
    }

    /// Polls until the snapshot settles: 1 s, then doubling to 30 s (real cloud snapshots
    /// take minutes).
    pub(super) async fn follow(&self, t: &Tracked) {
        let first = t.handle.info().clone();
        let what = A::SNAPSHOT;
        let mut retries = 0;
        let mut round = 0u32;
        let mut failed_checks = 0u32;
        loop {
            let current = t.handle.current();
            let delay = Duration::from_secs(1 << round.min(5)).min(Duration::from_secs(30));
            tokio::time::sleep(delay).await;
            round += 1;
            let id = current.id.clone();
            let found = match self
                .api
                .describe_snapshots(&SnapshotQuery::Ids(vec![id.clone()]))
                .await
            {
                Ok(v) => v,
                Err(e) if e.kind == CloudErrorKind::NotFound => {
                    t.handle.fail(format!("{what} {id} disappeared: {e}"));
                    return;
                }
                // Each check already retried the transient errors; a permission or request
                // error will not heal by itself, and a long outage must surface too. The
                // snapshot may still complete in the cloud: it is then listed as completed.
                Err(e)
                    if e.kind != CloudErrorKind::Transient
                        || failed_checks >= FOLLOW_FAILED_CHECKS =>
                {
                    t.handle
                        .fail(format!("cannot follow {what} {id} to completion: {e}"));
                    return;
                }
                Err(e) => {
                    failed_checks += 1;
                    warn!(snapshot = %id, error = %e, "cannot check snapshot progress; will retry");
                    continue;
                }
            };
            failed_checks = 0;
            let Some(s) = found.into_iter().find(|s| s.id == id) else {
                // Described by id and absent: some clouds list a deleted snapshot as nothing
                // rather than NotFound. A just-created one may lag; give it a few rounds.
                if round > 5 {
                    t.handle.fail(format!("{what} {id} disappeared"));
                    return;
                }
                continue;
            };
            match s.state {
                CloudSnapshotState::Completed => {
                    info!(disk = %first.disk_id, snapshot = %id, "{what} completed");
                    t.handle.complete();
                    return;
                }
                CloudSnapshotState::Failed(reason) => {
                    let why = reason.unwrap_or_else(|| "failed".into());
                    let same_content = t
                        .volume
                        .upgrade()
                        .filter(|v| v.generation() == t.generation);
                    match same_content {
                        Some(volume) if retries < SNAPSHOT_RETRIES => {
                            retries += 1;
                            round = 0;
                            warn!(disk = %first.disk_id, snapshot = %id, reason = %why, attempt = retries,
                                "{what} failed; taking it again (the volume is unchanged)");
                            match self.retake(&first, &volume, t.generation).await {
                                Ok(next) => {
                                    self.remember_source(next.id.clone(), &volume, t.generation);
                                    self.snapshots_retried.fetch_add(1, Ordering::Relaxed);
                                    t.handle.replaced(next);
                                    if let Err(e) = self.api.delete_snapshot(&id).await {
                                        warn!(snapshot = %id, error = %e, "cannot delete the failed snapshot");
                                    }
                                    self.invalidate_listing();
                                }
                                Err(e) => {
                                    t.handle.fail(format!(
                                        "{what} {id} failed ({why}) and could not be taken again: {e}"
                                    ));
                                    return;
                                }
                            }
                        }
                        _ => {
                            warn!(disk = %first.disk_id, snapshot = %id, reason = %why,
                                "{what} failed; the volume has changed since, so the next checkpoint's snapshot replaces it");
                            t.handle.fail(format!("{what} {id} failed: {why}"));
                            return;
                        }
                    }
                }
                CloudSnapshotState::Pending => {}
            }
        }
    }

    /// Takes a failed snapshot again from a volume that has not been written since.
    async fn retake(
        &self,
        first: &SnapshotInfo,
        volume: &Arc<Volume>,
        generation: u64,
    ) -> Result<SnapshotInfo, String> {
        let vol_id = self.volume_of(&first.disk_id).map_err(|e| e.to_string())?;
        let req = SnapshotRequest {
            disk_id: first.disk_id.clone(),
            label: first.label.clone(),
            checkpoint_seq: first.checkpoint_seq,
        };
        let id = self
            .create_snapshot(
                &vol_id,
                &req,
                first.created_unix_ms,
                first.size_bytes,
                Some(&first.id),
            )
            .await
            .map_err(|e| e.to_string())?;
        // It stands for the checkpoint only once recorded as checked: a write that raced the
        // call may have put later data in it, and a stop before this point leaves it
        // unconfirmed, so it never stands for anything.
        let unusable = if volume.generation() != generation {
            Some("the volume was written while the snapshot was retaken".to_string())
        } else {
            self.confirm(&id)
                .err()
                .map(|e| format!("cannot record the retaken snapshot as checked: {e}"))
        };
        if let Some(why) = unusable {
            if let Err(e) = self.api.delete_snapshot(&id).await {
                warn!(snapshot = %id, error = %e, "cannot delete an unusable retaken snapshot; unconfirmed, it never stands for its checkpoint");
            }
            self.invalidate_listing();
            return Err(why);
        }
        Ok(SnapshotInfo {
            id,
            state: SnapshotState::Pending,
            replaces: Some(first.id.clone()),
            ..first.clone()
        })
    }
}
