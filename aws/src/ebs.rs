//! [`Ebs`]: the EBS direct API calls that write a snapshot from bytes held outside AWS, one
//! small method each. `sync-aws-image` drives them; all of aws-sdk-ebs stays in this file.
//!
//! ```text
//! StartSnapshot(VolumeSize GiB, ClientToken, Tags, Timeout) ─▶ snap-… "pending"
//!   PutSnapshotBlock(index, 512 KiB, base64 SHA-256)   every block that is not all zeros,
//!                                                      in any order, several at once
//! CompleteSnapshot(ChangedBlocksCount, LINEAR checksum) ─▶ EC2 DescribeSnapshots shows the
//!                                                      snapshot "pending", then "completed"
//! ```
//!
//! The block layout is frozen by the API (not announced per snapshot, whatever
//! StartSnapshot's `BlockSize` says):
//!
//! | what | rule |
//! |---|---|
//! | block `i` | bytes `[i·524288, (i+1)·524288)` of the volume |
//! | a block never written | reads as zeros: holes are simply not sent |
//! | the last block of a file not a multiple of 512 KiB | sent zero-padded to 512 KiB |
//! | per-block checksum | base64 of the SHA-256 of the 512 KiB sent (`ChecksumAlgorithm` SHA256) |
//! | snapshot checksum (`LINEAR`) | base64 of the SHA-256 of the blocks' raw 32-byte digests concatenated in ascending block index |
//!
//! EBS recomputes both checksums and fails the call on a mismatch, so a block damaged on the
//! way never makes it into the snapshot, and CompleteSnapshot fails if a block is missing.
//!
//! Idempotency: StartSnapshot takes a `ClientToken` (up to 64 ASCII characters); the same
//! token with the same parameters answers the first call's snapshot (and a token reused with
//! other parameters is refused, `ConflictException`). A failed PutSnapshotBlock is sent again
//! with the same index and data while the snapshot is pending, as awslabs/coldsnap does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_ebs::config::retry::RetryConfig;
use aws_sdk_ebs::config::{BehaviorVersion, Region};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::error::{AwsError, ErrorKind};
use crate::retry::{Retrier, RetryPolicy, RetryStats};
use crate::sdk::{self, StaticCredentials};
use crate::types::SnapshotId;

/// Bytes per EBS block: the API's block index is `offset / 524288` (frozen by the API).
pub const BLOCK_SIZE: usize = 512 * 1024;

/// Longest `ClientToken` StartSnapshot accepts.
pub const MAX_CLIENT_TOKEN_LEN: usize = 64;

/// The SHA-256 of one 512 KiB block as sent.
pub type BlockDigest = [u8; 32];

/// SHA-256 of a block, raw.
pub fn block_digest(block: &[u8]) -> BlockDigest {
    Sha256::digest(block).into()
}

/// The `LINEAR` snapshot checksum: SHA-256 over the raw digests of the written blocks in
/// ascending block index, base64. `digests` must come in that order (a `BTreeMap`'s values).
pub fn linear_checksum<'a>(digests: impl IntoIterator<Item = &'a BlockDigest>) -> String {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d);
    }
    BASE64.encode(h.finalize())
}

/// A snapshot to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    /// Size of the volume the snapshot stands for, in GiB (EBS volumes are whole GiB).
    pub volume_size_gib: u64,
    pub description: Option<String>,
    /// Tags set at creation (IAM: `ec2:CreateTags` with `ec2:CreateAction` = StartSnapshot).
    pub tags: BTreeMap<String, String>,
    /// Idempotency token, at most [`MAX_CLIENT_TOKEN_LEN`] ASCII characters.
    pub client_token: String,
    /// Minutes without a PutSnapshotBlock, or between the last block and CompleteSnapshot,
    /// after which EBS cancels the snapshot (10–4320; EBS's default is 60).
    pub timeout_minutes: Option<i32>,
}

/// What StartSnapshot answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedSnapshot {
    pub id: SnapshotId,
    /// `pending` for a new snapshot; a reused token may answer `completed` or `error`.
    pub status: String,
    /// The block size EBS announced (524288 on AWS).
    pub block_size: Option<i32>,
}

/// EBS direct API client for writing snapshots.
#[derive(Debug, Clone)]
pub struct Ebs {
    client: aws_sdk_ebs::Client,
    retrier: Arc<Retrier>,
    /// Snapshots this client started, with when: a ResourceNotFound for them inside the
    /// policy's window is eventual consistency, not absence.
    fresh: Arc<Mutex<HashMap<String, Instant>>>,
}

/// The retry policy of EBS direct calls: the shared one, with more attempts and a longer
/// not-found window. A snapshot just started can answer PutSnapshotBlock with "does not exist"
/// for a couple of minutes (awslabs/coldsnap retries over ~130 s for that reason): 15 attempts
/// with full jitter wait ~80 s on average and at most ~165 s, and the window covers 180 s.
pub fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 15,
        not_found_window: Duration::from_secs(180),
        ..RetryPolicy::default()
    }
}

impl Ebs {
    /// A client for `region`, at `endpoint` (default: the regional endpoint), with fixed
    /// credentials. Touches no network.
    pub fn new(region: &str, endpoint: Option<&str>, credentials: &StaticCredentials) -> Self {
        let mut config = aws_sdk_ebs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .credentials_provider(sdk::static_provider(credentials))
            .http_client(sdk::http_client())
            .retry_config(RetryConfig::disabled())
            .timeout_config(sdk::timeouts());
        if let Some(url) = endpoint {
            config = config.endpoint_url(url);
        }
        Self {
            client: aws_sdk_ebs::Client::from_conf(config.build()),
            retrier: Arc::new(Retrier {
                policy: default_retry_policy(),
                stats: Arc::new(RetryStats::default()),
            }),
            fresh: Arc::default(),
        }
    }

    /// Replaces the retry policy (tests use short backoffs).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retrier = Arc::new(Retrier {
            policy,
            stats: self.retrier.stats.clone(),
        });
        self
    }

    /// Retries made so far and the last error.
    pub fn retry_stats(&self) -> Arc<RetryStats> {
        self.retrier.stats.clone()
    }

    fn not_found_until(&self, id: &str) -> Option<Instant> {
        let fresh = self.fresh.lock().unwrap_or_else(PoisonError::into_inner);
        fresh
            .get(id)
            .map(|at| *at + self.retrier.policy.not_found_window)
    }

    /// StartSnapshot. Retried on throttling and server errors: the client token makes a
    /// retry answer the snapshot a lost response had started.
    pub async fn start_snapshot(&self, spec: &NewSnapshot) -> Result<StartedSnapshot, AwsError> {
        const OP: &str = "ebs:StartSnapshot";
        if spec.client_token.len() > MAX_CLIENT_TOKEN_LEN || !spec.client_token.is_ascii() {
            return Err(AwsError::local(
                OP,
                ErrorKind::Invalid,
                format!(
                    "client token {:?} is not 1-64 ASCII characters",
                    spec.client_token
                ),
            ));
        }
        let size = i64::try_from(spec.volume_size_gib)
            .map_err(|_| AwsError::local(OP, ErrorKind::Invalid, "volume size out of range"))?;
        let tags: Vec<Tag> = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let out = self
            .retrier
            .run(OP, None, || {
                self.client
                    .start_snapshot()
                    .volume_size(size)
                    .client_token(&spec.client_token)
                    .set_description(spec.description.clone())
                    .set_tags(Some(tags.clone()))
                    .set_timeout(spec.timeout_minutes)
                    .send()
            })
            .await?;
        let id = out
            .snapshot_id()
            .ok_or_else(|| AwsError::missing(OP, "SnapshotId"))?
            .to_owned();
        self.fresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), Instant::now());
        Ok(StartedSnapshot {
            id: SnapshotId(id),
            status: out
                .status()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            block_size: out.block_size(),
        })
    }

    /// PutSnapshotBlock of one full block (exactly [`BLOCK_SIZE`] bytes, the last one of a
    /// file zero-padded) whose SHA-256 is `digest`. Retried on throttling and server errors,
    /// and on "not found" while the snapshot is fresh.
    pub async fn put_block(
        &self,
        snapshot: &SnapshotId,
        index: u32,
        data: Bytes,
        digest: &BlockDigest,
    ) -> Result<(), AwsError> {
        const OP: &str = "ebs:PutSnapshotBlock";
        if data.len() != BLOCK_SIZE {
            return Err(AwsError::local(
                OP,
                ErrorKind::Invalid,
                format!("block {index} has {} bytes, not {BLOCK_SIZE}", data.len()),
            ));
        }
        let index = i32::try_from(index).map_err(|_| {
            AwsError::local(
                OP,
                ErrorKind::Invalid,
                format!("block index {index} out of range"),
            )
        })?;
        let checksum = BASE64.encode(digest);
        let out = self
            .retrier
            .run(OP, self.not_found_until(snapshot.as_str()), || {
                self.client
                    .put_snapshot_block()
                    .snapshot_id(snapshot.as_str())
                    .block_index(index)
                    .block_data(ByteStream::from(data.clone()))
                    .data_length(BLOCK_SIZE as i32)
                    .checksum(&checksum)
                    .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                    .send()
            })
            .await?;
        // EBS echoes the checksum it verified; another one means it stored something else.
        match out.checksum() {
            Some(echoed) if echoed != checksum => Err(AwsError::local(
                OP,
                ErrorKind::Other,
                format!(
                    "block {index} of {snapshot}: EBS answered checksum {echoed}, not the {checksum} sent"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// CompleteSnapshot with the number of blocks written and their `LINEAR` checksum; answers
    /// the status (`pending` while EBS seals it, `completed`, or `error`).
    pub async fn complete_snapshot(
        &self,
        snapshot: &SnapshotId,
        changed_blocks: u32,
        checksum: &str,
    ) -> Result<String, AwsError> {
        const OP: &str = "ebs:CompleteSnapshot";
        let count = i32::try_from(changed_blocks).map_err(|_| {
            AwsError::local(OP, ErrorKind::Invalid, "changed block count out of range")
        })?;
        let out = self
            .retrier
            .run(OP, self.not_found_until(snapshot.as_str()), || {
                self.client
                    .complete_snapshot()
                    .snapshot_id(snapshot.as_str())
                    .changed_blocks_count(count)
                    .checksum(checksum)
                    .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                    .checksum_aggregation_method(
                        ChecksumAggregationMethod::ChecksumAggregationLinear,
                    )
                    .send()
            })
            .await?;
        Ok(out
            .status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn linear_checksum_hashes_raw_digests_in_order() {
        let a = block_digest(&[1u8; BLOCK_SIZE]);
        let b = block_digest(&[2u8; BLOCK_SIZE]);
        let mut joined = Vec::new();
        joined.extend_from_slice(&a);
        joined.extend_from_slice(&b);
        let expected = BASE64.encode(Sha256::digest(&joined));
        assert_eq!(linear_checksum([&a, &b]), expected);
        assert_ne!(linear_checksum([&b, &a]), expected, "order matters");
    }

    #[test]
    fn block_digest_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            block_digest(b"abc")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // No block written: the checksum of nothing.
        assert_eq!(
            linear_checksum([]),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }
}
