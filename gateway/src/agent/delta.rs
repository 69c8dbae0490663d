//! Delta resync: a pass without a baseline that sends only the blocks the gateway lacks.
//!
//! Used when the agent has no usable block map but the gateway already holds the disk (state
//! lost, gateway restored, foreign writes), and for `--rescan` (verify and repair).
//!
//! ```text
//!  scan thread ──read one 16 MiB group──▶ xxh3 per 4 KiB (the new map)
//!       │                                 SHA-256 per delta block (64 KiB) ──▶ group (bounded)
//!       └──group bytes──▶ digest thread (--verify)                               │
//!  driver ◀──────────────────────────────────────────────────────────────────────┘
//!    HashQuery(group, delta blocks)  ── up to MAX_GROUPS groups in flight ──▶ gateway
//!    HashReply (in order) ─▶ runs of differing delta blocks ─▶ HashQuery(run, 4 KiB blocks)
//!    HashReply ─▶ differing 4 KiB blocks ─▶ zero runs / SHA-256 + LZ4 data frames (off the
//!    runtime) ─▶ Link::send, in ascending offset and seq order
//! ```
//!
//! Two levels keep both costs small: the coarse queries cost 32 bytes per 64 KiB of disk (0.05 %),
//! and a change costs one 4 KiB refinement query (~0.5 KiB) instead of a 64 KiB block. With a
//! 4 KiB delta block there is no refinement.
//!
//! Order: a group's data frames are sent once all of its replies are in, and groups complete in
//! order (their refinement queries go out in order, and replies come back in order), so data
//! frames ascend in offset like in the other passes. No data frame of a region is sent before the
//! last query about that region is answered, so a resent query (after a reconnect) never
//! observes this pass's own writes.
//!
//! Memory: at most `MAX_GROUPS` groups (16 MiB of source bytes each) wait for answers or
//! encoding, plus one in the channel and one being read.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::error::AgentError;
use super::link::Link;
use super::report::Report;
use super::scan::{data_frame, read_chunk, zero_frame, Outgoing, ScanResult};
use super::state::BlockMap;
use crate::protocol::frame::MAX_HASHES;
use crate::protocol::{HashQuery, HashReply, BLOCK_SIZE, MAX_BLOCK_LEN};

const BLOCK: usize = BLOCK_SIZE as usize;
static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// Default delta block: one SHA-256 (32 bytes on the wire) per 64 KiB in the coarse queries.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 << 10;
/// Source bytes per group: one coarse query, and room for every 4 KiB block of the group in
/// refinement queries.
pub const GROUP_BYTES: usize = 16 << 20;
const _: () = assert!(GROUP_BYTES / BLOCK <= MAX_HASHES);
/// Groups whose answers or encoding are outstanding, at most: both sides hash while the network
/// carries the rest, and memory stays bounded.
pub const MAX_GROUPS: usize = 4;
/// Below this many bytes, encoding one group's frames is not worth extra threads.
const PARALLEL_MIN: usize = 1 << 20;

/// Checks a `--delta-block-size`: a multiple of 4 KiB, at most 8 MiB.
pub fn check_block_size(size: u64) -> Result<usize, AgentError> {
    if size == 0 || size % BLOCK_SIZE != 0 || size > u64::from(MAX_BLOCK_LEN) {
        return Err(AgentError::DeltaBlockSize(size));
    }
    Ok(size as usize)
}

/// What to compare and how.
#[derive(Debug)]
pub struct DeltaConfig {
    pub source: Arc<File>,
    pub path: PathBuf,
    pub size: u64,
    /// Delta block (coarse query granularity), a multiple of 4 KiB up to 8 MiB.
    pub block_size: usize,
    /// Largest data frame block, a multiple of 4 KiB.
    pub chunk: usize,
    pub first_seq: u64,
    pub verify: bool,
    pub workers: usize,
    pub progress: Option<ProgressBar>,
}

/// One group of the source as read, with the SHA-256 of each delta block.
#[derive(Debug)]
struct Group {
    offset: u64,
    data: Bytes,
    hashes: Vec<[u8; 32]>,
}

/// Runs the delta pass over `link`: returns what the scan learned, with the seq after the last
/// data frame. Adds frames, blocks and bytes to `report`.
pub async fn run(
    link: &mut Link,
    cfg: DeltaConfig,
    report: &mut Report,
) -> Result<ScanResult, AgentError> {
    if cfg.block_size == 0 || cfg.block_size % BLOCK != 0 || cfg.block_size > GROUP_BYTES {
        return Err(AgentError::DeltaBlockSize(cfg.block_size as u64));
    }
    let (tx, mut groups) = mpsc::channel(1);
    let (done_tx, done) = oneshot::channel();
    let side = ScanSide {
        source: cfg.source,
        path: cfg.path,
        size: cfg.size,
        block_size: cfg.block_size,
        verify: cfg.verify,
        workers: cfg.workers,
        progress: cfg.progress,
    };
    std::thread::Builder::new()
        .name("delta-scan".into())
        .spawn(move || {
            let _ = done_tx.send(scan(&side, &tx));
        })
        .map_err(|e| AgentError::Internal(format!("cannot start the delta scan thread: {e}")))?;
    let mut driver = Driver {
        block_size: cfg.block_size,
        chunk: cfg.chunk,
        workers: cfg.workers,
        next_seq: cfg.first_seq,
        next_id: 0,
        groups: VecDeque::new(),
        expected: VecDeque::new(),
        encoding: VecDeque::new(),
        coarse_queries: 0,
        fine_queries: 0,
    };
    let next_seq = driver.run(link, &mut groups, report).await?;
    drop(groups);
    let scanned = done
        .await
        .map_err(|_| AgentError::Internal("delta scan thread stopped".into()))??;
    tracing::info!(
        coarse_queries = driver.coarse_queries,
        refinement_queries = driver.fine_queries,
        blocks_matched = report.blocks_matched,
        blocks_sent = report.blocks_sent,
        blocks_zero = report.blocks_zero,
        "delta pass compared"
    );
    Ok(ScanResult {
        map: scanned.map,
        digest: scanned.digest,
        bytes_scanned: scanned.bytes_scanned,
        next_seq,
    })
}

// ---------------------------------------------------------------------------------------------
// Scan side: a plain thread that reads and hashes.

struct ScanSide {
    source: Arc<File>,
    path: PathBuf,
    size: u64,
    block_size: usize,
    verify: bool,
    workers: usize,
    progress: Option<ProgressBar>,
}

struct Scanned {
    map: Vec<u128>,
    digest: Option<[u8; 32]>,
    bytes_scanned: u64,
}

fn scan(cfg: &ScanSide, out: &mpsc::Sender<Group>) -> Result<Scanned, AgentError> {
    let whole = super::scan::SourceDigest::start(cfg.verify, 2)?;
    let result = scan_loop(cfg, out, whole.sender());
    let digest = whole.finish()?;
    let (map, bytes_scanned) = result?;
    Ok(Scanned {
        map,
        digest,
        bytes_scanned,
    })
}

fn scan_loop(
    cfg: &ScanSide,
    out: &mpsc::Sender<Group>,
    digest: Option<&std::sync::mpsc::SyncSender<Bytes>>,
) -> Result<(Vec<u128>, u64), AgentError> {
    let cancelled = || AgentError::Internal("delta scan cancelled".into());
    let group = (GROUP_BYTES / cfg.block_size * cfg.block_size) as u64;
    let mut map = Vec::with_capacity(BlockMap::blocks_for(cfg.size));
    let mut off = 0u64;
    while off < cfg.size {
        let len = (cfg.size - off).min(group) as usize;
        let data = read_chunk(&cfg.source, &cfg.path, cfg.size, off, len)?;
        if let Some(d) = digest {
            d.send(data.clone()).map_err(|_| cancelled())?;
        }
        map.extend(data.chunks(BLOCK).map(xxhash_rust::xxh3::xxh3_128));
        let hashes = sha256_blocks(&data, cfg.block_size, cfg.workers)?;
        out.blocking_send(Group {
            offset: off,
            data,
            hashes,
        })
        .map_err(|_| cancelled())?;
        off += len as u64;
        if let Some(pb) = &cfg.progress {
            pb.set_position(off);
        }
    }
    Ok((map, off))
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// SHA-256 of each `block`-sized piece of `data` (the last one may be short), on up to
/// `workers` threads.
fn sha256_blocks(data: &[u8], block: usize, workers: usize) -> Result<Vec<[u8; 32]>, AgentError> {
    let blocks: Vec<&[u8]> = data.chunks(block).collect();
    if workers <= 1 || data.len() < PARALLEL_MIN || blocks.len() < 2 {
        return Ok(blocks.into_iter().map(sha256).collect());
    }
    let per = blocks.len().div_ceil(workers);
    std::thread::scope(|s| {
        let parts: Vec<_> = blocks
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(|b| sha256(b)).collect::<Vec<_>>()))
            .collect();
        let mut out = Vec::with_capacity(blocks.len());
        for p in parts {
            out.extend(
                p.join()
                    .map_err(|_| AgentError::Internal("hash thread panicked".into()))?,
            );
        }
        Ok(out)
    })
}

// ---------------------------------------------------------------------------------------------
// Driver: queries, answers and data frames, on the runtime.

/// A group whose answers are not all in, or that waits behind an older one.
struct InFlight {
    id: u64,
    offset: u64,
    data: Bytes,
    /// Per 4 KiB block of `data`: the gateway's copy differs, so it is sent.
    send: Vec<bool>,
    /// Replies still expected for this group.
    awaiting: usize,
}

/// What an outstanding query asked.
#[derive(Debug, Clone, Copy)]
enum Asked {
    /// The group's delta blocks.
    Coarse,
    /// 4 KiB blocks of the group from this index on.
    Fine { first: usize },
}

struct Expected {
    id: u64,
    asked: Asked,
}

/// A frame to produce: ready already (zero run) or to encode.
enum Item {
    Ready(Outgoing),
    Encode {
        seq: u64,
        offset: u64,
        data: Bytes,
        blocks: u64,
    },
}

type Encoding = JoinHandle<Result<Vec<Outgoing>, AgentError>>;

struct Driver {
    block_size: usize,
    chunk: usize,
    workers: usize,
    next_seq: u64,
    next_id: u64,
    groups: VecDeque<InFlight>,
    /// One entry per query sent and not yet answered, in order.
    expected: VecDeque<Expected>,
    /// Frames of completed groups being encoded, in order.
    encoding: VecDeque<Encoding>,
    coarse_queries: u64,
    fine_queries: u64,
}

impl Driver {
    async fn run(
        &mut self,
        link: &mut Link,
        groups: &mut mpsc::Receiver<Group>,
        report: &mut Report,
    ) -> Result<u64, AgentError> {
        let mut scan_done = false;
        loop {
            while let Some(r) = link.try_reply().await? {
                self.on_reply(link, r).await?;
            }
            self.start_ready(report);
            while self.encoding.front().is_some_and(|h| h.is_finished()) {
                if let Some(h) = self.encoding.pop_front() {
                    send_frames(link, finish(h).await?, report).await?;
                }
            }
            if !scan_done && self.groups.len() + self.encoding.len() < MAX_GROUPS {
                match groups.recv().await {
                    Some(g) => self.ask(link, g).await?,
                    None => scan_done = true,
                }
            } else if !self.expected.is_empty() {
                let r = link.reply().await?;
                self.on_reply(link, r).await?;
            } else if let Some(h) = self.encoding.pop_front() {
                send_frames(link, finish(h).await?, report).await?;
            } else {
                // Nothing is asked or encoding, so every group completed (start_ready took
                // them) and the scan has ended.
                return Ok(self.next_seq);
            }
        }
    }

    /// Sends the coarse query of a new group.
    async fn ask(&mut self, link: &mut Link, g: Group) -> Result<(), AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        let blocks = g.data.len().div_ceil(BLOCK);
        self.groups.push_back(InFlight {
            id,
            offset: g.offset,
            data: g.data,
            send: vec![false; blocks],
            awaiting: 1,
        });
        self.expected.push_back(Expected {
            id,
            asked: Asked::Coarse,
        });
        self.coarse_queries += 1;
        link.query(HashQuery {
            offset: g.offset,
            block_size: self.block_size as u32,
            hashes: g.hashes,
        })
        .await
    }

    async fn on_reply(&mut self, link: &mut Link, r: HashReply) -> Result<(), AgentError> {
        let Some(e) = self.expected.pop_front() else {
            return Err(AgentError::Internal("hash reply without a query".into()));
        };
        let front = self.groups.front().map_or(0, |g| g.id);
        let Some(g) =
            e.id.checked_sub(front)
                .and_then(|i| self.groups.get_mut(i as usize))
        else {
            return Err(AgentError::Internal(format!(
                "hash reply for group {} that is not in flight",
                e.id
            )));
        };
        g.awaiting = g.awaiting.checked_sub(1).ok_or_else(|| {
            AgentError::Internal(format!("unexpected hash reply for group {}", e.id))
        })?;
        let per = self.block_size / BLOCK;
        let first = match e.asked {
            Asked::Fine { first } => first,
            Asked::Coarse if per == 1 => 0,
            Asked::Coarse => {
                let runs = differing_runs(&r.differs, per, g.send.len());
                if runs.is_empty() {
                    return Ok(());
                }
                g.awaiting += runs.len();
                let (id, offset, data) = (g.id, g.offset, g.data.clone());
                return self.refine(link, id, offset, data, runs).await;
            }
        };
        for (i, d) in r.differs.iter().enumerate() {
            if *d {
                if let Some(s) = g.send.get_mut(first + i) {
                    *s = true;
                }
            }
        }
        Ok(())
    }

    /// Asks for the 4 KiB blocks of each run of differing delta blocks.
    async fn refine(
        &mut self,
        link: &mut Link,
        id: u64,
        offset: u64,
        data: Bytes,
        runs: Vec<(usize, usize)>,
    ) -> Result<(), AgentError> {
        let spans = runs.clone();
        let hashes = tokio::task::spawn_blocking(move || {
            spans
                .iter()
                .map(|&(a, n)| {
                    let end = ((a + n) * BLOCK).min(data.len());
                    data[a * BLOCK..end].chunks(BLOCK).map(sha256).collect()
                })
                .collect::<Vec<Vec<[u8; 32]>>>()
        })
        .await
        .map_err(|e| AgentError::Internal(format!("hash task failed: {e}")))?;
        for ((first, _), hashes) in runs.into_iter().zip(hashes) {
            self.expected.push_back(Expected {
                id,
                asked: Asked::Fine { first },
            });
            self.fine_queries += 1;
            link.query(HashQuery {
                offset: offset + (first * BLOCK) as u64,
                block_size: BLOCK as u32,
                hashes,
            })
            .await?;
        }
        Ok(())
    }

    /// Completed groups at the front: count them and start encoding what they send.
    fn start_ready(&mut self, report: &mut Report) {
        while self.groups.front().is_some_and(|g| g.awaiting == 0) {
            let Some(g) = self.groups.pop_front() else {
                break;
            };
            let sent = g.send.iter().filter(|s| **s).count();
            report.blocks_matched += (g.send.len() - sent) as u64;
            if sent == 0 {
                continue;
            }
            let mut items = Vec::new();
            for p in pieces(&g.data, &g.send, g.offset, self.chunk) {
                let seq = self.next_seq;
                self.next_seq += 1;
                let offset = g.offset + p.start as u64;
                items.push(if p.zero {
                    Item::Ready(zero_frame(seq, offset, p.len, p.blocks))
                } else {
                    Item::Encode {
                        seq,
                        offset,
                        data: g.data.slice(p.start..p.start + p.len),
                        blocks: p.blocks,
                    }
                });
            }
            let workers = self.workers;
            self.encoding
                .push_back(tokio::task::spawn_blocking(move || encode(items, workers)));
        }
    }
}

/// Runs of differing delta blocks as (first 4 KiB block, count of 4 KiB blocks), adjacent
/// blocks merged; `blocks` is the number of 4 KiB blocks in the group.
fn differing_runs(differs: &[bool], per: usize, blocks: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, d) in differs.iter().enumerate() {
        let (a, b) = ((i * per).min(blocks), ((i + 1) * per).min(blocks));
        if !*d || a == b {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == a => last.1 += b - a,
            _ => runs.push((a, b - a)),
        }
    }
    runs
}

/// One frame's worth of blocks to send, relative to the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    zero: bool,
    start: usize,
    len: usize,
    blocks: u64,
}

/// Runs of same-kind (zero or data) blocks marked in `send`, each at most `chunk` bytes and
/// within one `chunk`-aligned span of the disk (`base` is the group's offset), so that frames
/// are cut where a full pass cuts them (LZ4 decides per frame).
fn pieces(data: &[u8], send: &[bool], base: u64, chunk: usize) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    let mut prev_sent = false;
    for (i, (block, s)) in data.chunks(BLOCK).zip(send).enumerate() {
        if !*s {
            prev_sent = false;
            continue;
        }
        let zero = block == &ZEROS[..block.len()];
        match out.last_mut() {
            Some(p)
                if prev_sent
                    && p.zero == zero
                    && (base + (i * BLOCK) as u64) % chunk as u64 != 0
                    && p.len + block.len() <= chunk =>
            {
                p.len += block.len();
                p.blocks += 1;
            }
            _ => out.push(Piece {
                zero,
                start: i * BLOCK,
                len: block.len(),
                blocks: 1,
            }),
        }
        prev_sent = true;
    }
    out
}

/// Encodes data frames (SHA-256, LZ4, wire form), on up to `workers` threads, in order.
fn encode(items: Vec<Item>, workers: usize) -> Result<Vec<Outgoing>, AgentError> {
    let one = |item: Item| match item {
        Item::Ready(o) => o,
        Item::Encode {
            seq,
            offset,
            data,
            blocks,
        } => {
            let len = data.len() as u64;
            Outgoing {
                seq,
                bytes: data_frame(seq, offset, data),
                data_blocks: blocks,
                zero_blocks: 0,
                len,
            }
        }
    };
    let bytes: usize = items
        .iter()
        .map(|i| match i {
            Item::Encode { data, .. } => data.len(),
            Item::Ready(_) => 0,
        })
        .sum();
    if workers <= 1 || bytes < PARALLEL_MIN || items.len() < 2 {
        return Ok(items.into_iter().map(one).collect());
    }
    let per = items.len().div_ceil(workers);
    let mut parts: Vec<Vec<Item>> = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        parts.push(it.by_ref().take(per).collect());
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| s.spawn(move || part.into_iter().map(one).collect::<Vec<_>>()))
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| AgentError::Internal("encode thread panicked".into()))?,
            );
        }
        Ok(out)
    })
}

async fn finish(h: Encoding) -> Result<Vec<Outgoing>, AgentError> {
    h.await
        .map_err(|e| AgentError::Internal(format!("encode task failed: {e}")))?
}

async fn send_frames(
    link: &mut Link,
    frames: Vec<Outgoing>,
    report: &mut Report,
) -> Result<(), AgentError> {
    for o in frames {
        link.send(o.seq, o.bytes).await?;
        report.frames_sent += 1;
        report.blocks_sent += o.data_blocks;
        report.blocks_zero += o.zero_blocks;
        report.bytes_changed += o.len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_adjacent_blocks_and_stop_at_the_end() {
        // 4 delta blocks of 16 × 4 KiB, the last one short (5 blocks)
        let d = [true, true, false, true];
        assert_eq!(differing_runs(&d, 16, 53), vec![(0, 32), (48, 5)]);
        assert!(differing_runs(&[false; 4], 16, 64).is_empty());
        assert_eq!(differing_runs(&[true], 1, 1), vec![(0, 1)]);
    }

    #[test]
    fn pieces_split_by_kind_gap_and_chunk() {
        // blocks: data, zero, zero, data(skip), data, data, data, short zero tail; frames of at
        // most two blocks, cut at multiples of two blocks of the disk
        let mut data = vec![0u8; 7 * BLOCK + 100];
        data[0] = 1;
        for b in 3..7 {
            data[b * BLOCK + 5] = 2;
        }
        let send = [true, true, true, false, true, true, true, true];
        let p = pieces(&data, &send, 0, 2 * BLOCK);
        let got: Vec<(bool, usize, usize, u64)> = p
            .iter()
            .map(|p| (p.zero, p.start, p.len, p.blocks))
            .collect();
        assert_eq!(
            got,
            vec![
                (false, 0, BLOCK, 1),
                (true, BLOCK, BLOCK, 1),
                (true, 2 * BLOCK, BLOCK, 1), // a chunk boundary of the disk
                (false, 4 * BLOCK, 2 * BLOCK, 2),
                (false, 6 * BLOCK, BLOCK, 1),
                (true, 7 * BLOCK, 100, 1),
            ]
        );
        assert!(pieces(&data, &[false; 8], 0, BLOCK).is_empty());
        // cut at chunk-aligned disk offsets: this group starts one block before a boundary
        let p = pieces(&data, &send, 2 * BLOCK as u64 - BLOCK as u64, 2 * BLOCK);
        let got: Vec<(bool, usize, usize)> = p.iter().map(|p| (p.zero, p.start, p.len)).collect();
        assert_eq!(
            got,
            vec![
                (false, 0, BLOCK),
                (true, BLOCK, 2 * BLOCK),
                (false, 4 * BLOCK, BLOCK),
                (false, 5 * BLOCK, 2 * BLOCK),
                (true, 7 * BLOCK, 100),
            ]
        );
    }

    #[test]
    fn parallel_hashing_and_encoding_keep_order() {
        let mut data = vec![0u8; 3 * PARALLEL_MIN + 5000];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let one = sha256_blocks(&data, 65536, 1).unwrap_or_default();
        let many = sha256_blocks(&data, 65536, 3).unwrap_or_default();
        assert_eq!(one.len(), data.len().div_ceil(65536));
        assert_eq!(one, many);
        let data = Bytes::from(data);
        let items = |n: usize| {
            (0..n)
                .map(|i| Item::Encode {
                    seq: i as u64 + 1,
                    offset: (i * 65536) as u64,
                    data: data.slice(i * 65536..(i + 1) * 65536),
                    blocks: 16,
                })
                .collect::<Vec<_>>()
        };
        let a = encode(items(40), 1).unwrap_or_default();
        let b = encode(items(40), 3).unwrap_or_default();
        assert_eq!(a.len(), 40);
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.seq == y.seq && x.bytes == y.bytes));
        assert!(b.windows(2).all(|w| w[0].seq < w[1].seq));
    }
}
