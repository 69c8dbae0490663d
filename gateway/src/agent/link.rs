//! The connection to the gateway: handshake, send window, acks, reconnect and resend.
//!
//! ```text
//!          connect ──▶ handshake ──▶ Streaming ◀──────────────┐
//!             ▲                        │ io error, EOF,       │ resend retained
//!             │ backoff 100 ms..5 s    │ retryable Error,     │ frames > durable_seq
//!             └──────── Lost ◀─────────┘ silence              │
//!                         └── new Welcome ────────────────────┘
//! ```
//!
//! Every frame sent and not yet covered by an `Ack` stays in `retained` (encoded once, shared
//! `Bytes`), weighed in wire bytes against the gateway's window. A reader task drains the socket
//! while the writer blocks, so acks are never stuck behind a full send buffer.
//!
//! Delta resync: `HashQuery` frames carry no seq and are not weighed against the window (the
//! caller bounds how many are outstanding; the gateway answers them without holding buffers).
//! Each stays in `queries` until its `HashReply` arrives; replies come in query order, between
//! acks, and wait in `replies` for [`Link::reply`]. After a reconnect the unanswered queries are
//! resent after the retained data frames: a query's blocks never overlap a data frame sent
//! before its answer, so the order between the two does not matter.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use super::error::{chain, AgentError};
use super::handshake::{self, frame_error, write_frame, Conn};
use super::throttle::Throttle;
use crate::protocol::auth::DiskKey;
use crate::protocol::frame::{encode, CHECKPOINT_VERIFY};
use crate::protocol::{
    Checkpoint, CheckpointAck, Frame, FrameError, HashQuery, HashReply, Welcome,
};

/// First reconnect delay; doubles per failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay: a restarted gateway is found within seconds.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Connect plus handshake; a healthy gateway answers in milliseconds.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while we wait for an ack, or a write that makes no progress. The gateway acks
/// every few ms of idle and every ~16 MiB, so a minute without one means the link is dead.
pub(super) const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Where and who to connect as.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub addr: String,
    pub disk_id: String,
    pub disk_size: u64,
    pub key: DiskKey,
    pub retry_timeout: Duration,
    pub bandwidth_limit: Option<u64>,
}

/// Counters for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkStats {
    pub bytes_sent_wire: u64,
    pub reconnects: u64,
}

/// How a checkpoint ended.
#[derive(Debug)]
pub enum CheckpointOutcome {
    Acked(CheckpointAck),
    /// The connection dropped before the ack; the next `Welcome` names the checkpoint as landed.
    Landed(Welcome),
}

struct Retained {
    seq: u64,
    bytes: Bytes,
}

/// A hash query sent and not yet answered.
struct SentQuery {
    offset: u64,
    block_size: u32,
    count: usize,
    bytes: Bytes,
}

/// A session with the gateway that survives connection loss.
pub struct Link {
    cfg: LinkConfig,
    conn: Option<Conn>,
    throttle: Option<Throttle>,
    retained: VecDeque<Retained>,
    retained_bytes: u64,
    window: u64,
    /// Highest seq the gateway reported durable in this run.
    acked: u64,
    /// Highest seq sent in this run (the first Welcome's durable seq before any).
    last_sent: u64,
    welcomed: bool,
    pending_checkpoint: Option<u64>,
    checkpoint_ack: Option<CheckpointAck>,
    landed: Option<Welcome>,
    /// Hash queries awaiting their reply, in the order sent.
    queries: VecDeque<SentQuery>,
    /// Replies received and not yet taken by [`Link::reply`], in query order.
    replies: VecDeque<HashReply>,
    stats: LinkStats,
    /// Start of the current run of failures; cleared by progress (an ack that moves the
    /// durable point, a reply, a checkpoint ack), so a gateway that accepts sessions and then
    /// fails them all still meets the retry timeout.
    failing_since: Option<Instant>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("addr", &self.cfg.addr)
            .field("acked", &self.acked)
            .field("last_sent", &self.last_sent)
            .field("retained", &self.retained.len())
            .field("queries", &self.queries.len())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Connects (retrying transient failures up to the retry timeout) and authenticates.
    pub async fn connect(cfg: LinkConfig) -> Result<(Link, Welcome), AgentError> {
        let throttle = cfg.bandwidth_limit.map(Throttle::new);
        let mut link = Link {
            cfg,
            conn: None,
            throttle,
            retained: VecDeque::new(),
            retained_bytes: 0,
            window: u64::MAX,
            acked: 0,
            last_sent: 0,
            welcomed: false,
            pending_checkpoint: None,
            checkpoint_ack: None,
            landed: None,
            queries: VecDeque::new(),
            failing_since: None,
            replies: VecDeque::new(),
            stats: LinkStats::default(),
        };
        let welcome = link.establish(None).await?;
        Ok((link, welcome))
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Sends one encoded frame with sequence number `seq`, waiting for window room first.
    pub async fn send(&mut self, seq: u64, bytes: Bytes) -> Result<(), AgentError> {
        if seq <= self.last_sent {
            return Err(AgentError::Internal(format!(
                "seq {seq} after {} was already sent",
                self.last_sent
            )));
        }
        if let Err(e) = self.drain() {
            self.establish(Some(e)).await?;
        }
        let len = bytes.len() as u64;
        while !self.retained.is_empty() && self.retained_bytes + len > self.window {
            if let Err(e) = self.pump(STALL_TIMEOUT).await {
                self.establish(Some(e)).await?;
            }
        }
        self.retained.push_back(Retained {
            seq,
            bytes: bytes.clone(),
        });
        self.retained_bytes += len;
        self.last_sent = seq;
        if let Err(e) = self.write_current(&bytes).await {
            let e = self.gateway_reason(e).await;
            // The frame is retained, so the new connection resends it.
            self.establish(Some(e)).await?;
        }
        Ok(())
    }

    /// Sends a `HashQuery`; its answer comes from [`Link::reply`], in query order. Survives
    /// reconnects like data frames do (the query is resent until answered).
    pub async fn query(&mut self, q: HashQuery) -> Result<(), AgentError> {
        if let Err(e) = self.drain() {
            self.establish(Some(e)).await?;
        }
        let (offset, block_size, count) = (q.offset, q.block_size, q.hashes.len());
        let mut buf = BytesMut::with_capacity(21 + 32 * count);
        encode(&Frame::HashQuery(q), &mut buf);
        let bytes = buf.freeze();
        self.queries.push_back(SentQuery {
            offset,
            block_size,
            count,
            bytes: bytes.clone(),
        });
        if let Err(e) = self.write_current(&bytes).await {
            let e = self.gateway_reason(e).await;
            self.establish(Some(e)).await?;
        }
        Ok(())
    }

    /// The answer to the oldest query not yet taken, if it has arrived (no waiting).
    pub async fn try_reply(&mut self) -> Result<Option<HashReply>, AgentError> {
        if self.replies.is_empty() {
            if let Err(e) = self.drain() {
                self.establish(Some(e)).await?;
            }
        }
        Ok(self.replies.pop_front())
    }

    /// The answer to the oldest query not yet taken, waiting (and reconnecting) as needed.
    pub async fn reply(&mut self) -> Result<HashReply, AgentError> {
        loop {
            if let Some(r) = self.replies.pop_front() {
                return Ok(r);
            }
            if self.queries.is_empty() {
                return Err(AgentError::Internal(
                    "waiting for a hash reply with no query outstanding".into(),
                ));
            }
            // The gateway applies every earlier write before it hashes: the usual stall
            // limit covers that (writes do not wait for acks on its side).
            if let Err(e) = self.pump(STALL_TIMEOUT).await {
                self.establish(Some(e)).await?;
            }
        }
    }

    /// After a failed write, the gateway's `Error` frame (sent just before it closed) explains
    /// the failure better than the broken pipe; it is usually already in the socket buffer.
    async fn gateway_reason(&mut self, write_error: AgentError) -> AgentError {
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return write_error;
            };
            let item = match tokio::time::timeout_at(deadline, conn.incoming.recv()).await {
                Ok(Some(Ok(item))) => item,
                _ => return write_error,
            };
            if let Err(e) = self.on_frame(Some(Ok(item))) {
                return e;
            }
        }
    }

    /// Sends the checkpoint and waits for its ack, across reconnects.
    pub async fn checkpoint(&mut self, cp: Checkpoint) -> Result<CheckpointOutcome, AgentError> {
        let seq = cp.seq;
        // With verify the gateway hashes the whole snapshot before answering: allow for reading
        // it at 100 MiB/s on top of the usual stall limit.
        let patience = if cp.flags & CHECKPOINT_VERIFY != 0 {
            STALL_TIMEOUT + Duration::from_secs(self.cfg.disk_size / (100 << 20))
        } else {
            STALL_TIMEOUT
        };
        let mut buf = BytesMut::new();
        encode(&Frame::Checkpoint(cp), &mut buf);
        self.pending_checkpoint = Some(seq);
        self.send(seq, buf.freeze()).await?;
        loop {
            if let Some(a) = self.checkpoint_ack.take() {
                return Ok(CheckpointOutcome::Acked(a));
            }
            if let Some(w) = self.landed.take() {
                return Ok(CheckpointOutcome::Landed(w));
            }
            if let Err(e) = self.pump(patience).await {
                self.establish(Some(e)).await?;
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        if let Some(mut c) = self.conn.take() {
            let _ = timeout(Duration::from_secs(1), c.writer.shutdown()).await;
        }
    }

    /// (Re)connects until a session is up, resending retained frames on it.
    async fn establish(&mut self, cause: Option<AgentError>) -> Result<Welcome, AgentError> {
        self.conn = None;
        let reconnecting = cause.is_some();
        let since = if reconnecting {
            *self.failing_since.get_or_insert_with(Instant::now)
        } else {
            Instant::now()
        };
        let deadline = since + self.cfg.retry_timeout;
        let mut delay = BACKOFF_MIN;
        let mut last = cause;
        loop {
            if let Some(err) = last.take() {
                if !err.is_transient() {
                    return Err(err);
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(AgentError::GaveUp {
                        secs: self.cfg.retry_timeout.as_secs(),
                        last: Box::new(err),
                    });
                }
                let pause = jitter(delay).min(deadline - now);
                tracing::info!("gateway link: {}; retrying in {pause:?}", chain(&err));
                tokio::time::sleep(pause).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
            let attempt = match timeout(
                HANDSHAKE_TIMEOUT,
                handshake::open(&self.cfg, &mut self.throttle, &mut self.stats),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(AgentError::Connect {
                    addr: self.cfg.addr.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer to the handshake",
                    ),
                }),
            };
            let result = match attempt {
                Ok((conn, welcome)) => {
                    self.conn = Some(conn);
                    self.after_welcome(&welcome).await.map(|()| welcome)
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(welcome) => {
                    if reconnecting {
                        self.stats.reconnects += 1;
                        tracing::info!(
                            "reconnected; gateway durable through seq {}",
                            welcome.durable_seq
                        );
                    }
                    return Ok(welcome);
                }
                Err(e) => {
                    self.conn = None;
                    last = Some(e);
                }
            }
        }
    }

    /// Checks the resume point, drops what it covers and resends the rest.
    async fn after_welcome(&mut self, w: &Welcome) -> Result<(), AgentError> {
        if self.welcomed {
            if w.durable_seq < self.acked {
                return Err(AgentError::DurableWentBackwards {
                    now: w.durable_seq,
                    acked: self.acked,
                });
            }
            if w.durable_seq > self.last_sent {
                return Err(AgentError::Protocol(format!(
                    "gateway reports seq {} durable, but this agent sent only up to {}",
                    w.durable_seq, self.last_sent
                )));
            }
        } else {
            self.welcomed = true;
            self.last_sent = w.durable_seq.max(w.checkpoint_seq);
        }
        self.acked = w.durable_seq;
        self.window = w.window.max(1);
        let mut covered = w.durable_seq;
        if let Some(s) = self.pending_checkpoint {
            if w.checkpoint_seq >= s {
                covered = covered.max(s);
                self.landed = Some(w.clone());
            }
        }
        self.drop_through(covered);
        let Some(conn) = self.conn.as_mut() else {
            return Err(AgentError::Closed);
        };
        for r in &self.retained {
            write_frame(
                &mut conn.writer,
                &mut self.throttle,
                &mut self.stats,
                &r.bytes,
            )
            .await?;
        }
        for q in &self.queries {
            write_frame(
                &mut conn.writer,
                &mut self.throttle,
                &mut self.stats,
                &q.bytes,
            )
            .await?;
        }
        if !self.retained.is_empty() || !self.queries.is_empty() {
            tracing::info!(
                "resent {} frames and {} hash queries",
                self.retained.len(),
                self.queries.len()
            );
        }
        Ok(())
    }

    fn drop_through(&mut self, seq: u64) {
        while self.retained.front().is_some_and(|r| r.seq <= seq) {
            if let Some(r) = self.retained.pop_front() {
                self.retained_bytes -= r.bytes.len() as u64;
            }
        }
    }

    async fn write_current(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(AgentError::Closed);
        };
        write_frame(&mut conn.writer, &mut self.throttle, &mut self.stats, bytes).await
    }

    /// Handles whatever the reader task has already received, without waiting.
    fn drain(&mut self) -> Result<(), AgentError> {
        loop {
            let item = {
                let Some(conn) = self.conn.as_mut() else {
                    return Err(AgentError::Closed);
                };
                match conn.incoming.try_recv() {
                    Ok(item) => Some(item),
                    Err(mpsc::error::TryRecvError::Empty) => return Ok(()),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            self.on_frame(item)?;
        }
    }

    /// Waits for one frame from the gateway and handles it.
    async fn pump(&mut self, patience: Duration) -> Result<(), AgentError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(AgentError::Closed);
        };
        let item = timeout(patience, conn.incoming.recv())
            .await
            .map_err(|_| AgentError::Silent(patience.as_secs()))?;
        self.on_frame(item)
    }

    fn on_frame(&mut self, item: Option<Result<Frame, FrameError>>) -> Result<(), AgentError> {
        match item {
            None => Err(AgentError::Closed),
            Some(Err(e)) => Err(frame_error(e)),
            Some(Ok(Frame::Ack { durable_seq })) => {
                if durable_seq > self.last_sent {
                    return Err(AgentError::Protocol(format!(
                        "ack for seq {durable_seq}, beyond the last sent {}",
                        self.last_sent
                    )));
                }
                if durable_seq > self.acked {
                    self.failing_since = None;
                }
                self.acked = self.acked.max(durable_seq);
                self.drop_through(self.acked);
                Ok(())
            }
            Some(Ok(Frame::CheckpointAck(a))) => {
                if Some(a.seq) == self.pending_checkpoint {
                    self.failing_since = None;
                    self.drop_through(a.seq);
                    self.checkpoint_ack = Some(a);
                } else {
                    tracing::warn!("ignoring an ack for checkpoint {} never sent", a.seq);
                }
                Ok(())
            }
            Some(Ok(Frame::HashReply(r))) => {
                let Some(q) = self.queries.front() else {
                    return Err(AgentError::Protocol(format!(
                        "hash reply for offset {} without a query",
                        r.offset
                    )));
                };
                if (r.offset, r.block_size, r.differs.len()) != (q.offset, q.block_size, q.count) {
                    return Err(AgentError::Protocol(format!(
                        "hash reply for {} blocks of {} at offset {} answers a query for {} blocks \
                         of {} at offset {}",
                        r.differs.len(),
                        r.block_size,
                        r.offset,
                        q.count,
                        q.block_size,
                        q.offset
                    )));
                }
                self.queries.pop_front();
                self.failing_since = None;
                self.replies.push_back(r);
                Ok(())
            }
            Some(Ok(Frame::Error { code, message })) => Err(AgentError::Refused { code, message }),
            Some(Ok(other)) => Err(AgentError::Protocol(format!(
                "unexpected {} frame while streaming",
                other.name()
            ))),
        }
    }
}

/// 50–100 % of `d`, so agents cut off together do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random::<f64>().mul_add(0.5, 0.5))
}
