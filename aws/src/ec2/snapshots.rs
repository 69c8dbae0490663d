//! EBS snapshots: create (tagged), describe by ids or tags, delete.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use aws_sdk_ec2::types::{Filter, ResourceType, Snapshot};
use rand::Rng;

use super::{tags_to_map, to_system_time, Ec2};
use crate::error::{AwsError, ErrorKind};
use crate::types::{SnapshotFilter, SnapshotId, SnapshotInfo, SnapshotState, VolumeId};

/// Tag carrying a random token per `create_snapshot` call: CreateSnapshot has no ClientToken,
/// so after a failure that may have created the snapshot anyway (5xx, timeout) the retry first
/// looks for a snapshot with this token.
pub const REQUEST_TAG_KEY: &str = "sync-gateway:request";

/// Page size of DescribeSnapshots by tag: the API's maximum, fewest calls.
const PAGE_SIZE: i32 = 1000;

impl Ec2 {
    /// Starts a snapshot of `volume` (point in time: now), tagged at creation with the
    /// settings' tags, `tags` (disk id, gateway id, checkpoint label, time) and a request
    /// token. Completion is tracked with [`Ec2::describe_snapshots`].
    pub async fn create_snapshot(
        &self,
        volume: &VolumeId,
        description: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<SnapshotId, AwsError> {
        const OP: &str = "ec2:CreateSnapshot";
        let token = format!("{:032x}", rand::thread_rng().gen::<u128>());
        let mut tags = tags.clone();
        tags.insert(REQUEST_TAG_KEY.to_owned(), token.clone());
        let spec = self.tag_spec(ResourceType::Snapshot, &tags);
        let maybe_created = AtomicBool::new(false);
        let id = self
            .retrier
            .run(OP, self.not_found_until(volume.as_str()), || async {
                if maybe_created.load(Ordering::Relaxed) {
                    if let Some(id) = self.snapshot_by_request(volume, &token).await {
                        return Ok(Some(id));
                    }
                }
                let out = self
                    .client
                    .create_snapshot()
                    .volume_id(volume.as_str())
                    .description(description)
                    .tag_specifications(spec.clone())
                    .send()
                    .await;
                if let Err(e) = &out {
                    maybe_created.store(
                        AwsError::from_sdk(OP, e).kind == ErrorKind::Transient,
                        Ordering::Relaxed,
                    );
                }
                out.map(|o| o.snapshot_id().map(str::to_owned))
            })
            .await?
            .ok_or_else(|| AwsError::missing(OP, "SnapshotId"))?;
        self.created(&id);
        Ok(SnapshotId(id))
    }

    /// One attempt to find the snapshot a lost CreateSnapshot response made; errors mean
    /// "not found" (the caller then creates, at worst a duplicate that pruning removes).
    async fn snapshot_by_request(&self, volume: &VolumeId, token: &str) -> Option<String> {
        let out = self
            .client
            .describe_snapshots()
            .owner_ids("self")
            .filters(
                Filter::builder()
                    .name("volume-id")
                    .values(volume.as_str())
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name(format!("tag:{REQUEST_TAG_KEY}"))
                    .values(token)
                    .build(),
            )
            .send()
            .await
            .ok()?;
        out.snapshots()
            .first()
            .and_then(|s| s.snapshot_id())
            .map(str::to_owned)
    }

    /// Own snapshots by ids or by tags (every tag must match), all pages.
    pub async fn describe_snapshots(
        &self,
        filter: &SnapshotFilter,
    ) -> Result<Vec<SnapshotInfo>, AwsError> {
        const OP: &str = "ec2:DescribeSnapshots";
        let mut found = Vec::new();
        match filter {
            SnapshotFilter::Ids(ids) => {
                if ids.is_empty() {
                    return Ok(found);
                }
                let nf = ids
                    .iter()
                    .filter_map(|id| self.not_found_until(id.as_str()))
                    .max();
                let out = self
                    .retrier
                    .run(OP, nf, || {
                        self.client
                            .describe_snapshots()
                            .set_snapshot_ids(Some(ids.iter().map(|i| i.0.clone()).collect()))
                            .send()
                    })
                    .await?;
                found.extend(out.snapshots().iter().map(snapshot_info));
            }
            SnapshotFilter::Tags(tags) => {
                let filters: Vec<Filter> = tags
                    .iter()
                    .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
                    .collect();
                let mut next: Option<String> = None;
                loop {
                    let out = self
                        .retrier
                        .run(OP, None, || {
                            self.client
                                .describe_snapshots()
                                .owner_ids("self")
                                .set_filters(Some(filters.clone()))
                                .max_results(PAGE_SIZE)
                                .set_next_token(next.clone())
                                .send()
                        })
                        .await?;
                    found.extend(out.snapshots().iter().map(snapshot_info));
                    match out.next_token().filter(|t| !t.is_empty()) {
                        Some(t) => next = Some(t.to_owned()),
                        None => break,
                    }
                }
            }
        }
        Ok(found)
    }

    /// Deletes a snapshot. Already gone counts as success; a snapshot that backs an AMI is
    /// refused by EC2 (`InvalidSnapshot.InUse`, kind Invalid).
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), AwsError> {
        const OP: &str = "ec2:DeleteSnapshot";
        self.forget(id.as_str());
        match self
            .retrier
            .run(OP, None, || {
                self.client
                    .delete_snapshot()
                    .snapshot_id(id.as_str())
                    .send()
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn snapshot_info(s: &Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: SnapshotId(s.snapshot_id().unwrap_or_default().to_owned()),
        volume_id: s.volume_id().map(VolumeId::from),
        state: SnapshotState::parse(s.state().map(|st| st.as_str()).unwrap_or_default()),
        progress: s.progress().map(str::to_owned),
        start_time: to_system_time(s.start_time()),
        state_message: s.state_message().map(str::to_owned),
        volume_size_gib: s.volume_size().and_then(|v| u64::try_from(v).ok()),
        tags: tags_to_map(s.tags()),
    }
}
