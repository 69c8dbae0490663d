//! The scan pipeline: read the source in order, find changed blocks, encode frames.
//!
//! ```text
//!  scan thread ──read_at(chunk)──▶ xxh3 per 4 KiB ─▶ new map, runs ──┬─▶ zero frame (inline)
//!       │                                                            └─▶ job ─▶ worker pool
//!       └──chunk (Bytes clone)──▶ digest thread (--verify)               sha256 + lz4 + encode
//!  ordered channel of Pending (bounded): the sender awaits each in scan order
//! ```
//!
//! Every channel is bounded, so memory stays at a few chunks whatever the source size. A chunk is
//! one `--block-size` read; a frame never spans two chunks, so frames never exceed it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::error::AgentError;
use crate::protocol::frame::{encode, DATA_HEADER_LEN, FLAG_LZ4, FLAG_ZERO};
use crate::protocol::{Data, Frame, BLOCK_SIZE};

const BLOCK: usize = BLOCK_SIZE as usize;
static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// What to scan and how.
#[derive(Debug)]
pub struct ScanConfig {
    pub source: Arc<File>,
    pub path: PathBuf,
    pub size: u64,
    /// Read size and largest frame block, a multiple of 4 KiB.
    pub chunk: usize,
    /// Blocks below this offset are read (map, digest) but not sent.
    pub send_from: u64,
    pub first_seq: u64,
    /// Previous block hashes; `None` sends every block from `send_from`.
    pub baseline: Option<Vec<u128>>,
    pub verify: bool,
    pub workers: usize,
    pub progress: Option<ProgressBar>,
}

/// One encoded frame, ready for the wire, with what it accounts for.
#[derive(Debug)]
pub struct Outgoing {
    pub seq: u64,
    pub bytes: Bytes,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    /// Uncompressed bytes covered.
    pub len: u64,
}

/// A frame in scan order: ready, or still on a worker.
#[derive(Debug)]
pub enum Pending {
    Ready(Outgoing),
    Later(oneshot::Receiver<Outgoing>),
}

/// What the scan learned.
#[derive(Debug)]
pub struct ScanResult {
    pub map: Vec<u128>,
    pub digest: Option<[u8; 32]>,
    pub bytes_scanned: u64,
    /// The seq after the last frame produced.
    pub next_seq: u64,
}

/// A running scan.
#[derive(Debug)]
pub struct Scan {
    pub frames: mpsc::Receiver<Pending>,
    pub done: oneshot::Receiver<Result<ScanResult, AgentError>>,
}

/// Frames buffered between the scan and the sender; with 1 MiB chunks about 32 MiB in flight.
const ORDERED_DEPTH: usize = 32;

/// Starts the scan threads.
pub fn start(cfg: ScanConfig) -> Scan {
    let (tx, frames) = mpsc::channel(ORDERED_DEPTH);
    let (done_tx, done) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let _ = done_tx.send(run(cfg, &tx));
        });
    // On failure `done` reports a dropped sender, which the caller turns into an error.
    if let Err(e) = spawned {
        tracing::error!("cannot start the scan thread: {e}");
    }
    Scan { frames, done }
}

/// Classification of one 4 KiB block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Skip,
    Zero,
    Data,
}

/// A run of same-class blocks inside one chunk, in bytes relative to the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub class: Class,
    pub start: usize,
    pub len: usize,
    pub blocks: u64,
}

/// Hashes every block of `chunk` (at block index `first_block`) into `map`, and returns the runs
/// to send: blocks at or above `send_from` whose hash differs from `old` (all when `old` is None).
pub(crate) fn plan_chunk(
    chunk: &[u8],
    chunk_off: u64,
    first_block: usize,
    old: Option<&[u128]>,
    send_from: u64,
    map: &mut Vec<u128>,
) -> Vec<Piece> {
    let zero_hash = xxhash_rust::xxh3::xxh3_128(&ZEROS);
    let mut pieces: Vec<Piece> = Vec::new();
    for (i, block) in chunk.chunks(BLOCK).enumerate() {
        let h = xxhash_rust::xxh3::xxh3_128(block);
        map.push(h);
        let start = i * BLOCK;
        let class = if chunk_off + start as u64 >= send_from
            && old.is_none_or(|o| o.get(first_block + i) != Some(&h))
        {
            // A full block can only be zero if its hash is the zero hash; memcmp confirms.
            let maybe_zero = block.len() < BLOCK || h == zero_hash;
            if maybe_zero && block == &ZEROS[..block.len()] {
                Class::Zero
            } else {
                Class::Data
            }
        } else {
            Class::Skip
        };
        match pieces.last_mut() {
            Some(p) if p.class == class => {
                p.len += block.len();
                p.blocks += 1;
            }
            _ => pieces.push(Piece {
                class,
                start,
                len: block.len(),
                blocks: 1,
            }),
        }
    }
    pieces.retain(|p| p.class != Class::Skip);
    pieces
}

struct Job {
    seq: u64,
    offset: u64,
    data: Bytes,
    blocks: u64,
    reply: oneshot::Sender<Outgoing>,
}

fn run(cfg: ScanConfig, out: &mpsc::Sender<Pending>) -> Result<ScanResult, AgentError> {
    let (job_tx, job_rx) = sync_channel::<Job>(cfg.workers * 2);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let mut workers = Vec::new();
    for n in 0..cfg.workers {
        let rx = Arc::clone(&job_rx);
        let w = std::thread::Builder::new()
            .name(format!("encode-{n}"))
            .spawn(move || encode_worker(&rx))
            .map_err(|e| AgentError::Internal(format!("cannot start worker: {e}")))?;
        workers.push(w);
    }
    let whole = SourceDigest::start(cfg.verify, 8)?;
    let result = scan_loop(&cfg, out, &job_tx, whole.sender());
    drop(job_tx);
    for w in workers {
        let _ = w.join();
    }
    let digest = whole.finish()?;
    let (map, bytes_scanned, next_seq) = result?;
    Ok(ScanResult {
        map,
        digest,
        bytes_scanned,
        next_seq,
    })
}

fn scan_loop(
    cfg: &ScanConfig,
    out: &mpsc::Sender<Pending>,
    jobs: &SyncSender<Job>,
    digest: Option<&SyncSender<Bytes>>,
) -> Result<(Vec<u128>, u64, u64), AgentError> {
    let mut map = Vec::with_capacity(super::state::BlockMap::blocks_for(cfg.size));
    let mut seq = cfg.first_seq;
    let mut off = 0u64;
    let cancelled = || AgentError::Internal("scan cancelled".into());
    while off < cfg.size {
        let len = (cfg.size - off).min(cfg.chunk as u64) as usize;
        let data = read_chunk(&cfg.source, &cfg.path, cfg.size, off, len)?;
        if let Some(d) = digest {
            d.send(data.clone()).map_err(|_| cancelled())?;
        }
        let first_block = (off / BLOCK_SIZE) as usize;
        let pieces = plan_chunk(
            &data,
            off,
            first_block,
            cfg.baseline.as_deref(),
            cfg.send_from,
            &mut map,
        );
        for p in pieces {
            let offset = off + p.start as u64;
            let pending = match p.class {
                Class::Zero => Pending::Ready(zero_frame(seq, offset, p.len, p.blocks)),
                _ => {
                    let (reply, rx) = oneshot::channel();
                    let job = Job {
                        seq,
                        offset,
                        data: data.slice(p.start..p.start + p.len),
                        blocks: p.blocks,
                        reply,
                    };
                    jobs.send(job).map_err(|_| cancelled())?;
                    Pending::Later(rx)
                }
            };
            out.blocking_send(pending).map_err(|_| cancelled())?;
            seq += 1;
        }
        off += len as u64;
        if let Some(pb) = &cfg.progress {
            pb.set_position(off);
        }
    }
    Ok((map, off, seq))
}

/// Reads `len` bytes at `off` of a source of `size` bytes.
pub(crate) fn read_chunk(
    source: &File,
    path: &Path,
    size: u64,
    off: u64,
    len: usize,
) -> Result<Bytes, AgentError> {
    let mut buf = BytesMut::zeroed(len);
    let mut done = 0;
    while done < len {
        match source.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                return Err(AgentError::SourceShrank {
                    path: path.to_path_buf(),
                    at: off + done as u64,
                    expected: size,
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(AgentError::Source {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(buf.freeze())
}

pub(crate) fn zero_frame(seq: u64, offset: u64, len: usize, blocks: u64) -> Outgoing {
    let frame = Frame::Data(Data {
        seq,
        offset,
        length: len as u32,
        flags: FLAG_ZERO,
        digest: [0; 32],
        payload: Bytes::new(),
    });
    let mut buf = BytesMut::with_capacity(5 + DATA_HEADER_LEN);
    encode(&frame, &mut buf);
    Outgoing {
        seq,
        bytes: buf.freeze(),
        data_blocks: 0,
        zero_blocks: blocks,
        len: len as u64,
    }
}

/// SHA-256, LZ4 when it saves at least 1/8, and the wire encoding, done once.
pub(crate) fn data_frame(seq: u64, offset: u64, data: Bytes) -> Bytes {
    let len = data.len();
    let digest: [u8; 32] = Sha256::digest(&data).into();
    let (flags, payload) = match worth_compressing(&data).then(|| lz4_flex::block::compress(&data))
    {
        Some(c) if c.len() <= len - len / 8 => (FLAG_LZ4, Bytes::from(c)),
        _ => (0, data),
    };
    let mut buf = BytesMut::with_capacity(5 + DATA_HEADER_LEN + payload.len());
    let frame = Frame::Data(Data {
        seq,
        offset,
        length: len as u32,
        flags,
        digest,
        payload,
    });
    encode(&frame, &mut buf);
    buf.freeze()
}

/// Large blocks are compressed only when a 64 KiB sample from their middle shrinks by a
/// quarter or more: random or already-compressed data then costs a sample, not a full pass
/// (LZ4 is most of the agent's CPU on such data).
fn worth_compressing(data: &[u8]) -> bool {
    const SAMPLE: usize = 64 * 1024;
    if data.len() < 4 * SAMPLE {
        return true;
    }
    let mid = data.len() / 2 - SAMPLE / 2;
    let sample = &data[mid..mid + SAMPLE];
    lz4_flex::block::compress(sample).len() <= SAMPLE - SAMPLE / 4
}

fn encode_worker(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let len = job.data.len() as u64;
        let bytes = data_frame(job.seq, job.offset, job.data);
        // The receiver is gone only when the run is being torn down.
        let _ = job.reply.send(Outgoing {
            seq: job.seq,
            bytes,
            data_blocks: job.blocks,
            zero_blocks: 0,
            len,
        });
    }
}

/// The SHA-256 of the whole source for `--verify`, computed on a thread of its own from the
/// chunks the scan reads, in order.
pub(crate) struct SourceDigest {
    tx: Option<SyncSender<Bytes>>,
    thread: Option<std::thread::JoinHandle<[u8; 32]>>,
}

impl SourceDigest {
    /// Starts the digest thread when `enabled`; `depth` chunks may wait for it.
    pub(crate) fn start(enabled: bool, depth: usize) -> Result<Self, AgentError> {
        if !enabled {
            return Ok(SourceDigest {
                tx: None,
                thread: None,
            });
        }
        let (tx, rx) = sync_channel::<Bytes>(depth);
        let thread = std::thread::Builder::new()
            .name("digest".into())
            .spawn(move || digest_worker(&rx))
            .map_err(|e| AgentError::Internal(format!("cannot start digest thread: {e}")))?;
        Ok(SourceDigest {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Where the scan sends each chunk, when digesting.
    pub(crate) fn sender(&self) -> Option<&SyncSender<Bytes>> {
        self.tx.as_ref()
    }

    /// Ends the input and returns the digest (`None` when not enabled).
    pub(crate) fn finish(mut self) -> Result<Option<[u8; 32]>, AgentError> {
        drop(self.tx.take());
        match self.thread.take() {
            Some(t) => t
                .join()
                .map(Some)
                .map_err(|_| AgentError::Internal("digest thread panicked".into())),
            None => Ok(None),
        }
    }
}

fn digest_worker(chunks: &Receiver<Bytes>) -> [u8; 32] {
    let mut h = Sha256::new();
    while let Ok(c) = chunks.recv() {
        h.update(&c);
    }
    h.finalize().into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::FrameCodec;
    use tokio_util::codec::Decoder;

    fn classes(p: &[Piece]) -> Vec<(Class, usize, usize)> {
        p.iter().map(|p| (p.class, p.start, p.len)).collect()
    }

    #[test]
    fn runs_split_zero_and_data() {
        // blocks: data, zero, zero, data, data, partial zero tail (100 bytes)
        let mut chunk = vec![0u8; 5 * BLOCK + 100];
        chunk[0] = 1;
        chunk[3 * BLOCK + 7] = 2;
        chunk[5 * BLOCK - 1] = 3;
        let mut map = Vec::new();
        let p = plan_chunk(&chunk, 0, 0, None, 0, &mut map);
        assert_eq!(map.len(), 6);
        assert_eq!(
            classes(&p),
            vec![
                (Class::Data, 0, BLOCK),
                (Class::Zero, BLOCK, 2 * BLOCK),
                (Class::Data, 3 * BLOCK, 2 * BLOCK),
                (Class::Zero, 5 * BLOCK, 100),
            ]
        );
        assert_eq!(p[1].blocks, 2);
        // same content against its own map: nothing to send
        let mut again = Vec::new();
        assert!(plan_chunk(&chunk, 0, 0, Some(&map), 0, &mut again).is_empty());
        assert_eq!(again, map);
        // one changed block in the middle of a later chunk
        let mut changed = chunk.clone();
        changed[2 * BLOCK + 9] = 9;
        let old: Vec<u128> = [vec![0u128; 10], map.clone()].concat();
        let mut m = Vec::new();
        let p = plan_chunk(&changed, 10 * BLOCK_SIZE, 10, Some(&old), 0, &mut m);
        assert_eq!(classes(&p), vec![(Class::Data, 2 * BLOCK, BLOCK)]);
        // send_from skips blocks below it but still maps them
        let mut m = Vec::new();
        let p = plan_chunk(&chunk, 0, 0, None, 3 * BLOCK_SIZE, &mut m);
        assert_eq!(m.len(), 6);
        assert_eq!(
            classes(&p),
            vec![
                (Class::Data, 3 * BLOCK, 2 * BLOCK),
                (Class::Zero, 5 * BLOCK, 100)
            ]
        );
    }

    #[test]
    fn data_frames_decode_and_compress_only_when_worth_it() {
        let text = Bytes::from(b"hello block ".repeat(2000)[..4 * BLOCK].to_vec());
        let mut random = vec![0u8; BLOCK];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let random = Bytes::from(random);
        for (data, lz4) in [(text, true), (random, false)] {
            let mut enc = BytesMut::from(&data_frame(5, 8192, data.clone())[..]);
            let f = FrameCodec::default().decode(&mut enc).unwrap().unwrap();
            let Frame::Data(d) = f else { panic!() };
            assert_eq!((d.seq, d.offset, d.length as usize), (5, 8192, data.len()));
            assert_eq!(d.is_lz4(), lz4);
            let plain = if lz4 {
                lz4_flex::block::decompress(&d.payload, data.len()).unwrap()
            } else {
                d.payload.to_vec()
            };
            assert_eq!(plain, data.to_vec());
            assert_eq!(d.digest, <[u8; 32]>::from(Sha256::digest(&data)));
        }
        let z = zero_frame(3, 0, 2 * BLOCK, 2);
        let mut enc = BytesMut::from(&z.bytes[..]);
        let Frame::Data(d) = FrameCodec::default().decode(&mut enc).unwrap().unwrap() else {
            panic!()
        };
        assert!(d.is_zero() && d.payload.is_empty() && d.length == 2 * BLOCK as u32);
    }
}
