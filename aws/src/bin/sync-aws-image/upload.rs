//! The block upload: the file's data blocks, read off the async threads, through a bounded
//! channel to at most `concurrency` PutSnapshotBlock calls at once.
//!
//! ```text
//! reader (blocking thread)          dispatcher (async)            PutSnapshotBlock tasks
//!  pread block i, zero-pad,  ──[ channel: concurrency ]──▶ spawn while fewer than ──▶ ≤ concurrency
//!  SHA-256                       blocks                     concurrency in flight      at once
//!                                                           digests by index ◀── each success
//!                                                           ──▶ LINEAR checksum for CompleteSnapshot
//! ```
//!
//! Memory is bounded: at most `2 × concurrency` blocks of 512 KiB exist at once (16 MiB at the
//! default 16). The first block that fails for good (after the client's retries) stops the
//! upload: the calls in flight are dropped and the reader stops at its next send.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sync_aws::ebs::{self, BlockDigest, BLOCK_SIZE};
use sync_aws::{Ebs, SnapshotId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{note, PublishError, MIB};

/// Pause between progress lines on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// One block ready to send.
#[derive(Debug)]
struct Block {
    index: u32,
    data: bytes::Bytes,
    digest: BlockDigest,
}

/// What the upload did.
#[derive(Debug)]
pub(crate) struct Uploaded {
    /// Blocks sent (CompleteSnapshot's `ChangedBlocksCount`).
    pub(crate) sent: u32,
    /// Their `LINEAR` checksum.
    pub(crate) checksum: String,
    pub(crate) elapsed: Duration,
}

/// Whether a block is all zeros (EBS reads unwritten blocks as zeros: it need not be sent).
pub(crate) fn is_zero(block: &[u8]) -> bool {
    // 16 bytes at a time: every block of the image is tested once, while it is hashed.
    let mut words = block.chunks_exact(16);
    words
        .by_ref()
        .all(|w| <[u8; 16]>::try_from(w).is_ok_and(|a| u128::from_ne_bytes(a) == 0))
        && words.remainder().iter().all(|&b| b == 0)
}

/// Sends blocks `indices` of `file` (`size` bytes) to `snapshot`, `concurrency` at once.
pub(crate) async fn upload(
    ebs: &Ebs,
    snapshot: &SnapshotId,
    file: &Path,
    size: u64,
    indices: Vec<u32>,
    concurrency: usize,
) -> Result<Uploaded, PublishError> {
    let started = Instant::now();
    let total = indices.len();
    let (tx, mut rx) = mpsc::channel::<Block>(concurrency);
    let path = file.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || read_blocks(&path, size, &indices, &tx));

    let mut progress = Progress::new(total, started);
    let mut in_flight = JoinSet::new();
    let mut digests: BTreeMap<u32, BlockDigest> = BTreeMap::new();
    let mut finish = |joined, digests: &mut BTreeMap<u32, BlockDigest>| match joined {
        Ok(Ok((index, digest))) => {
            digests.insert(index, digest);
            progress.block_sent(digests.len());
            Ok(())
        }
        Ok(Err((index, e))) => Err(PublishError::aws(format!(
            "uploading block {index} (bytes {}..) to {snapshot}",
            u64::from(index) * BLOCK_SIZE as u64
        ))(e)),
        Err(e) => Err(PublishError::Failed(format!("an upload task failed: {e}"))),
    };
    loop {
        while in_flight.len() >= concurrency {
            if let Some(joined) = in_flight.join_next().await {
                finish(joined, &mut digests)?;
            }
        }
        let Some(block) = rx.recv().await else { break };
        let (ebs, snapshot) = (ebs.clone(), snapshot.clone());
        in_flight.spawn(async move {
            match ebs
                .put_block(&snapshot, block.index, block.data, &block.digest)
                .await
            {
                Ok(()) => Ok((block.index, block.digest)),
                Err(e) => Err((block.index, e)),
            }
        });
    }
    while let Some(joined) = in_flight.join_next().await {
        finish(joined, &mut digests)?;
    }
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => {
            return Err(PublishError::Failed(format!(
                "the block reader failed: {e}"
            )))
        }
    }
    if digests.len() != total {
        return Err(PublishError::Failed(format!(
            "{} of {total} blocks were sent",
            digests.len()
        )));
    }
    Ok(Uploaded {
        sent: u32::try_from(total).map_err(|_| PublishError::Failed("too many blocks".into()))?,
        checksum: ebs::linear_checksum(digests.values()),
        elapsed: started.elapsed(),
    })
}

/// Reads each block of `indices`, zero-pads the last one of the file, hashes it and hands it
/// to the dispatcher; stops when the dispatcher is gone (it failed).
fn read_blocks(
    path: &Path,
    size: u64,
    indices: &[u32],
    tx: &mpsc::Sender<Block>,
) -> Result<(), PublishError> {
    let io = |e| PublishError::Io {
        context: format!("reading {}", path.display()),
        source: e,
    };
    let file = File::open(path).map_err(io)?;
    for &index in indices {
        let offset = u64::from(index) * BLOCK_SIZE as u64;
        let len = usize::try_from(size.saturating_sub(offset).min(BLOCK_SIZE as u64))
            .unwrap_or(BLOCK_SIZE);
        let mut data = BytesMut::zeroed(BLOCK_SIZE);
        file.read_exact_at(&mut data[..len], offset).map_err(io)?;
        // It held data when hashed; zeros now mean the file was rewritten under us.
        if len == 0 || is_zero(&data) {
            return Err(PublishError::Failed(format!(
                "{} changed while being published (block {index} is now zeros): rebuild or \
                 copy the image, then run again",
                path.display()
            )));
        }
        let digest = ebs::block_digest(&data);
        let block = Block {
            index,
            data: data.freeze(),
            digest,
        };
        if tx.blocking_send(block).is_err() {
            break;
        }
    }
    Ok(())
}

/// Progress lines on stderr: blocks and MiB sent, rate.
struct Progress {
    total: usize,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn new(total: usize, started: Instant) -> Self {
        Self {
            total,
            started,
            last: None,
        }
    }

    fn block_sent(&mut self, sent: usize) {
        let now = Instant::now();
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= PROGRESS_EVERY);
        if !(due || sent == self.total) {
            return;
        }
        self.last = Some(now);
        let mib = (sent * BLOCK_SIZE) as f64 / MIB as f64;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        note(&format!(
            "uploaded {sent} of {} blocks ({mib:.1} MiB, {}%), {:.1} MiB/s",
            self.total,
            (sent * 100).checked_div(self.total).unwrap_or(100),
            mib / secs
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_recognized_to_the_last_byte() {
        let mut b = vec![0u8; BLOCK_SIZE];
        assert!(is_zero(&b));
        b[BLOCK_SIZE - 1] = 1;
        assert!(!is_zero(&b));
        b[BLOCK_SIZE - 1] = 0;
        b[3] = 0x80;
        assert!(!is_zero(&b));
        // A short last block of a file, not a multiple of 8.
        assert!(is_zero(&[0u8; 13]));
        let mut short = [0u8; 13];
        short[12] = 2;
        assert!(!is_zero(&short));
        assert!(is_zero(&[]));
    }
}
