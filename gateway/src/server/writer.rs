//! The write side of a session: verification on the blocking pool, then one writer thread per
//! session that applies blocks in sequence order, batches `fdatasync`s, persists the durable
//! point and sends acks.
//!
//! ```text
//! reader task ──Data──▶ spawn_blocking(verify: LZ4 → aligned buffer, SHA-256)   (parallel)
//!      │                         │ JoinHandle, in sequence order
//!      └──────── WriterCmd ──────▶ writer thread: write / punch hole ─▶ fdatasync every
//!                                  sync_bytes or after sync_linger idle ─▶ persist point ─▶ Ack
//! ```
//!
//! An ack therefore never runs ahead of `fdatasync` of the data and of the durable point.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::disk::{CheckpointRecord, Disk, DiskStats};
use super::SessionError;
use crate::backend::{AlignedBuf, Backend, BufferPool, SnapshotRequest, SnapshotState};
use crate::durable::DurablePoint;
use crate::protocol::frame::CHECKPOINT_VERIFY;
use crate::protocol::{Checkpoint, CheckpointAck, Data, ErrorCode, Frame, HashQuery, HashReply};

/// A block whose digest has been checked.
#[derive(Debug)]
pub enum Verified {
    Bytes {
        seq: u64,
        offset: u64,
        buf: AlignedBuf,
    },
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
    },
}

/// Decompresses into an aligned buffer and recomputes the SHA-256. CPU-bound: run it on the
/// blocking pool.
pub fn verify(d: Data, pool: &BufferPool) -> Result<Verified, SessionError> {
    if d.is_zero() {
        return Ok(Verified::Zero {
            seq: d.seq,
            offset: d.offset,
            len: u64::from(d.length),
        });
    }
    let len = d.length as usize;
    let mut buf = pool.get(len);
    let out = buf.prepare(len);
    if d.is_lz4() {
        match lz4_flex::block::decompress_into(&d.payload, out) {
            Ok(n) if n == len => {}
            Ok(n) => {
                pool.put(buf);
                return Err(SessionError::peer(
                    ErrorCode::Malformed,
                    format!(
                        "seq {}: LZ4 payload decompressed to {n} bytes, frame says {len}",
                        d.seq
                    ),
                ));
            }
            Err(e) => {
                pool.put(buf);
                return Err(SessionError::peer(
                    ErrorCode::Malformed,
                    format!("seq {}: LZ4 payload does not decompress: {e}", d.seq),
                ));
            }
        }
    } else {
        out.copy_from_slice(&d.payload);
    }
    let got: [u8; 32] = Sha256::digest(buf.as_slice()).into();
    if got != d.digest {
        pool.put(buf);
        return Err(SessionError::peer(
            ErrorCode::ChecksumMismatch,
            format!(
                "seq {} at offset {}: SHA-256 {} differs from frame digest {}",
                d.seq,
                d.offset,
                hex::encode(got),
                hex::encode(d.digest)
            ),
        ));
    }
    Ok(Verified::Bytes {
        seq: d.seq,
        offset: d.offset,
        buf,
    })
}

/// Work for the writer thread, in sequence order.
#[derive(Debug)]
pub enum WriterCmd {
    Write {
        block: JoinHandle<Result<Verified, SessionError>>,
        /// Released once the block is on the disk.
        permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    },
    Checkpoint(Checkpoint),
    /// Delta resync: hash blocks of the volume (after every earlier write) and answer.
    HashQuery(HashQuery),
    /// A snapshot on command (not at an agent checkpoint): every earlier write is made durable
    /// first, later ones wait until it is initiated.
    Snapshot {
        label: String,
        reply: tokio::sync::oneshot::Sender<Result<crate::backend::Snapshot, String>>,
    },
}

/// Counters reported when the session ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub syncs: u64,
    pub checkpoints: u64,
    pub hash_queries: u64,
}

/// The per-session writer.
#[derive(Debug)]
pub struct Writer {
    pub disk: Arc<Disk>,
    pub backend: Arc<Backend>,
    pub pool: Arc<BufferPool>,
    pub rt: Handle,
    pub out: mpsc::Sender<Frame>,
    pub sync_bytes: u64,
    pub linger: Duration,
    /// Cancelled when the writer fails, so the reader stops waiting on the socket.
    pub failed: CancellationToken,
    /// Set while a command is being carried out, so a slow disk or a long snapshot does not
    /// count as the agent being idle.
    pub busy: Arc<AtomicBool>,
    /// Set when the reader has stopped: writes still queued are applied (they were received),
    /// hash queries are skipped (nobody is left to read the answer).
    pub draining: Arc<AtomicBool>,
    pub point: DurablePoint,
    pub stats: WriterStats,
    unsynced: u64,
    pending: Option<(u64, u64)>, // (seq, end) of the newest unsynced write
    /// Set when an `fdatasync` or the durable point's write failed. Linux reports a writeback
    /// error once and may drop the dirty pages, so a later sync that succeeds proves nothing:
    /// nothing pending in this writer is ever acked after that.
    sync_failed: bool,
    /// The gateway's live policy: snapshot retention is applied after each checkpoint.
    pub policy: Option<Arc<super::LivePolicy>>,
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        disk: Arc<Disk>,
        backend: Arc<Backend>,
        pool: Arc<BufferPool>,
        rt: Handle,
        out: mpsc::Sender<Frame>,
        sync_bytes: u64,
        linger: Duration,
        failed: CancellationToken,
    ) -> Self {
        let point = disk.state().point();
        Writer {
            disk,
            backend,
            pool,
            rt,
            out,
            sync_bytes,
            linger,
            failed,
            busy: Arc::new(AtomicBool::new(false)),
            draining: Arc::new(AtomicBool::new(false)),
            point,
            stats: WriterStats::default(),
            unsynced: 0,
            pending: None,
            sync_failed: false,
            policy: None,
        }
    }

    /// Runs until the command channel closes, then makes everything received durable.
    pub fn run(
        mut self,
        mut rx: mpsc::Receiver<WriterCmd>,
    ) -> (WriterStats, Result<(), SessionError>) {
        // Timers and spawned tasks need the runtime's context on this plain thread.
        let rt = self.rt.clone();
        let _context = rt.enter();
        let result = self.run_inner(&mut rx);
        let result = match result {
            Ok(()) => self.sync_and_ack(),
            Err(e) => {
                // Earlier writes are good: make them durable and ack them before failing
                // (unless syncing is what failed).
                if !self.sync_failed {
                    let _ = self.sync_and_ack();
                }
                self.failed.cancel();
                // Release what is still queued (permits, buffers) without writing it.
                rx.close();
                while let Ok(cmd) = rx.try_recv() {
                    if let WriterCmd::Write { block, .. } = cmd {
                        block.abort();
                    }
                }
                Err(e)
            }
        };
        (self.stats, result)
    }

    fn run_inner(&mut self, rx: &mut mpsc::Receiver<WriterCmd>) -> Result<(), SessionError> {
        loop {
            let cmd = if self.pending.is_some() {
                match self
                    .rt
                    .block_on(tokio::time::timeout(self.linger, rx.recv()))
                {
                    Ok(cmd) => cmd,
                    Err(_) => {
                        self.sync_and_ack()?;
                        continue;
                    }
                }
            } else {
                self.rt.block_on(rx.recv())
            };
            self.busy.store(true, Ordering::Relaxed);
            let r = self.carry_out(cmd);
            self.busy.store(false, Ordering::Relaxed);
            if !r? {
                return Ok(());
            }
        }
    }

    /// Carries out one command; `false` when the channel has closed.
    fn carry_out(&mut self, cmd: Option<WriterCmd>) -> Result<bool, SessionError> {
        {
            match cmd {
                None => return Ok(false),
                Some(WriterCmd::Write { block, permits }) => {
                    let verified = match self.rt.block_on(block) {
                        Ok(v) => v?,
                        Err(e) => {
                            return Err(SessionError::internal(format!("verify task failed: {e}")))
                        }
                    };
                    self.apply(verified)?;
                    drop(permits);
                    if self.unsynced >= self.sync_bytes {
                        self.sync_and_ack()?;
                    }
                }
                Some(WriterCmd::Checkpoint(c)) => self.checkpoint(c)?,
                Some(WriterCmd::HashQuery(q)) => self.hash_query(q)?,
                Some(WriterCmd::Snapshot { label, reply }) => {
                    let r = self.snapshot_on_command(label);
                    let answer = match &r {
                        Ok(s) => Ok(s.clone()),
                        Err(e) => Err(e.message.clone()),
                    };
                    let _ = reply.send(answer);
                    r?;
                }
            }
        }
        Ok(true)
    }

    fn apply(&mut self, v: Verified) -> Result<(), SessionError> {
        for snap in self.disk.snapshots_in_flight() {
            let (offset, len) = match &v {
                Verified::Bytes { offset, buf, .. } => (*offset, buf.as_slice().len() as u64),
                Verified::Zero { offset, len, .. } => (*offset, *len),
            };
            snap.preserve(offset, len).map_err(|e| {
                self.storage(
                    &format!("preserve snapshot {} before write", snap.info().id),
                    offset,
                    e,
                )
            })?;
        }
        let volume = &self.disk.volume;
        match v {
            Verified::Bytes { seq, offset, buf } => {
                let len = buf.as_slice().len() as u64;
                let r = volume.write_at(buf.as_slice(), offset);
                self.pool.put(buf);
                r.map_err(|e| self.storage("write", offset, e))?;
                self.unsynced += len;
                self.stats.bytes_written += len;
                DiskStats::add(&self.disk.stats.bytes_written, len);
                self.pending = Some((seq, offset + len));
            }
            Verified::Zero { seq, offset, len } => {
                volume
                    .zero_range(offset, len)
                    .map_err(|e| self.storage("zero", offset, e))?;
                // Hole punching is metadata: count it lightly towards the sync batch.
                self.unsynced += 4096;
                self.stats.bytes_zeroed += len;
                DiskStats::add(&self.disk.stats.bytes_zeroed, len);
                self.pending = Some((seq, offset + len));
            }
        }
        Ok(())
    }

    fn storage(&self, what: &str, offset: u64, e: std::io::Error) -> SessionError {
        SessionError::storage(format!(
            "disk {}: {what} at offset {offset} failed: {e}",
            self.disk.id
        ))
    }

    /// `fdatasync`, persist the durable point, ack. No-op when nothing is pending.
    fn sync_and_ack(&mut self) -> Result<(), SessionError> {
        let Some((seq, end)) = self.pending else {
            return Ok(());
        };
        if self.sync_failed {
            return Err(SessionError::storage(format!(
                "disk {}: an earlier fdatasync failed; nothing more is acked",
                self.disk.id
            )));
        }
        let t0 = Instant::now();
        if let Err(e) = self.disk.volume.sync() {
            self.sync_failed = true;
            return Err(self.storage("fdatasync", 0, e));
        }
        let t1 = Instant::now();
        let point = DurablePoint {
            seq,
            resume_offset: end,
            checkpoint_seq: self.point.checkpoint_seq,
        };
        if let Err(e) = self.disk.state().store_point(point) {
            self.sync_failed = true;
            return Err(self.storage("persist durable point", 0, e));
        }
        tracing::debug!(disk = %self.disk.id, seq, bytes = self.unsynced,
            fdatasync_us = (t1 - t0).as_micros() as u64,
            persist_us = t1.elapsed().as_micros() as u64, "durable");
        self.point = point;
        self.pending = None;
        self.unsynced = 0;
        self.stats.syncs += 1;
        DiskStats::add(&self.disk.stats.syncs, 1);
        self.disk.stats.acked(seq);
        // The socket may be gone; the point is durable either way and will be in the next
        // Welcome.
        let _ = self
            .rt
            .block_on(self.out.send(Frame::Ack { durable_seq: seq }));
        Ok(())
    }

    fn hash_query(&mut self, q: HashQuery) -> Result<(), SessionError> {
        if self.draining.load(Ordering::Relaxed) {
            // The agent is gone; it asks again after reconnecting.
            return Ok(());
        }
        let size = self.disk.volume.size();
        let mut buf = vec![0u8; q.block_size as usize];
        let mut differs = Vec::with_capacity(q.hashes.len());
        for (i, want) in q.hashes.iter().enumerate() {
            let start = q.offset + i as u64 * u64::from(q.block_size);
            let len = (size.saturating_sub(start)).min(u64::from(q.block_size)) as usize;
            let block = &mut buf[..len];
            self.disk
                .volume
                .read_at(block, start)
                .map_err(|e| self.storage("read for hash query", start, e))?;
            let got: [u8; 32] = Sha256::digest(&*block).into();
            differs.push(got != *want);
        }
        self.stats.hash_queries += 1;
        DiskStats::add(&self.disk.stats.hash_queries, 1);
        self.disk.stats.rescanning.store(true, Ordering::Relaxed);
        let _ = self.rt.block_on(self.out.send(Frame::HashReply(HashReply {
            offset: q.offset,
            block_size: q.block_size,
            differs,
        })));
        Ok(())
    }

    fn checkpoint(&mut self, c: Checkpoint) -> Result<(), SessionError> {
        let started = Instant::now();
        self.sync_and_ack()?;
        // A checkpoint resent after a crash between snapshot and durable point reuses the
        // snapshot already taken for it.
        let existing = self
            .disk
            .state()
            .checkpoint()
            .filter(|r| r.seq == c.seq)
            .cloned();
        // ...unless nothing usable stands for it any more (its copy was cut short by that
        // crash, or the cloud failed it): then the volume still holds the checkpoint's content
        // (nothing after it is durable) and a new snapshot is taken. Likewise when the agent
        // asks for a digest that the old snapshot's content can no longer give here.
        let existing = match existing {
            Some(r) => {
                // When the listing itself fails, take a new snapshot rather than trust one
                // whose state is unknown.
                let usable = match self
                    .rt
                    .block_on(self.backend.list_snapshots(Some(&self.disk.id)))
                {
                    Ok(listed) => listed
                        .iter()
                        .any(|s| s.stands_for(&r.snapshot.id) && s.state != SnapshotState::Failed),
                    Err(_) => false,
                };
                let digestible =
                    c.flags & CHECKPOINT_VERIFY == 0 || self.backend.digest_available(&r.snapshot);
                (usable && digestible).then_some(r)
            }
            None => None,
        };
        let record = match existing {
            Some(r) => r,
            None => {
                let req = SnapshotRequest {
                    disk_id: self.disk.id.clone(),
                    label: c.label.clone(),
                    checkpoint_seq: c.seq,
                };
                let handle = self
                    .rt
                    .block_on(self.backend.begin_snapshot(self.disk.volume.clone(), req))
                    .map_err(|e| SessionError::storage(format!("snapshot failed: {e}")))?;
                let snapshot = handle.info().clone();
                self.disk.add_snapshot_in_flight(handle);
                let record = CheckpointRecord {
                    seq: c.seq,
                    label: c.label.clone(),
                    snapshot,
                };
                self.disk
                    .state()
                    .store_checkpoint(record.clone())
                    .map_err(|e| self.storage("persist checkpoint", 0, e))?;
                record
            }
        };
        let point = DurablePoint {
            seq: c.seq,
            resume_offset: 0,
            checkpoint_seq: c.seq,
        };
        self.disk
            .state()
            .store_point(point)
            .map_err(|e| self.storage("persist durable point", 0, e))?;
        self.point = point;
        self.stats.checkpoints += 1;
        DiskStats::add(&self.disk.stats.checkpoints, 1);
        self.disk
            .stats
            .checkpoint_seq
            .store(c.seq, std::sync::atomic::Ordering::Relaxed);
        self.disk.stats.acked(c.seq);
        self.disk.stats.rescanning.store(false, Ordering::Relaxed);
        tracing::info!(disk = %self.disk.id, seq = c.seq, label = %c.label,
            snapshot = %record.snapshot.id, method = %record.snapshot.method,
            ms = started.elapsed().as_millis() as u64, "checkpoint: snapshot initiated");
        let digest = if c.flags & CHECKPOINT_VERIFY != 0 {
            // The digest is of the content, so it waits for the copy to complete.
            let in_flight = self.disk.snapshots_in_flight();
            let done = match in_flight.iter().find(|s| s.info().id == record.snapshot.id) {
                Some(s) => s
                    .wait()
                    .map_err(|e| SessionError::storage(format!("snapshot failed: {e}")))?,
                _ => record.snapshot.clone(),
            };
            let d = self
                .rt
                .block_on(self.backend.snapshot_digest(&done))
                .map_err(|e| SessionError::storage(format!("snapshot digest failed: {e}")))?;
            tracing::info!(disk = %self.disk.id, snapshot = %record.snapshot.id,
                digest = %hex::encode(d), "snapshot digest computed");
            Some(d)
        } else {
            None
        };
        let _ = self
            .rt
            .block_on(self.out.send(Frame::CheckpointAck(CheckpointAck {
                seq: c.seq,
                created_unix_ms: record.snapshot.created_unix_ms,
                digest,
                snapshot_id: record.snapshot.id.clone(),
            })));
        if let Some(policy) = self.policy.as_ref().and_then(|p| p.retention()) {
            super::spawn_prune(
                &self.rt,
                self.backend.clone(),
                self.disk.id.clone(),
                policy,
                vec![record.snapshot.id.clone()],
            );
        }
        if let Some(p) = &self.policy {
            p.changed.notify_one();
        }
        Ok(())
    }

    /// Makes every earlier write durable and initiates a snapshot of the volume as it is now.
    /// Not a checkpoint: the agent's resume point and checkpoint are unchanged.
    fn snapshot_on_command(
        &mut self,
        label: String,
    ) -> Result<crate::backend::Snapshot, SessionError> {
        self.sync_and_ack()?;
        let req = SnapshotRequest {
            disk_id: self.disk.id.clone(),
            label,
            checkpoint_seq: self.point.seq,
        };
        let handle = self
            .rt
            .block_on(self.backend.begin_snapshot(self.disk.volume.clone(), req))
            .map_err(|e| SessionError::storage(format!("snapshot failed: {e}")))?;
        self.disk.add_snapshot_in_flight(handle.clone());
        tracing::info!(disk = %self.disk.id, snapshot = %handle.info().id,
            seq = self.point.seq, "snapshot on command initiated");
        Ok(handle)
    }
}
