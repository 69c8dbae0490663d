//! One agent connection: handshake, then the streaming loop that feeds the writer.
//!
//! Nothing the peer sends is trusted: the frame length is capped before buffering, every
//! header is range-checked against the disk before any buffer is allocated for it, the digest
//! is recomputed, and sequence numbers must increase. Any violation ends this session with an
//! `Error` frame naming it; other sessions are untouched.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::disk::{Disk, DiskStats};
use super::writer::{verify, Writer, WriterCmd};
use super::{SessionError, Shared};
use crate::agent::throttle::Throttle;
use crate::protocol::auth::{self, Transcript};
use crate::protocol::{self, ErrorCode, Frame, FrameCodec, Welcome, PREAMBLE};

type Conn = Framed<TcpStream, FrameCodec>;

/// Serves one connection to its end. Never panics on peer input; logs how it ended.
pub async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let started = Instant::now();
    let mut conn = Framed::new(stream, FrameCodec::handshake());
    let (disk, outcome) = match handshake(&mut conn, &shared).await {
        Ok((disk, version, proof)) => (
            disk.clone(),
            stream_disk(conn, disk, version, proof, peer, &shared, started).await,
        ),
        Err(e) => {
            warn!(%peer, code = %e.code, error = %e.message, "handshake refused");
            shared.stats.handshakes_refused.record(e.code);
            send_error(&mut conn, &e).await;
            return;
        }
    };
    if let Err(e) = outcome {
        warn!(%peer, code = %e.code, error = %e.message, "session failed");
        disk.stats.errors.record(e.code);
        disk.set_last_error(e.code, &e.message);
    }
    disk.stats.rescanning.store(false, Ordering::Relaxed);
    shared.policy.changed.notify_one();
}

/// Why a disk's key no longer works, for the agent.
fn revoked_message(disk: &Disk) -> String {
    match disk.phase() {
        crate::api::DiskPhase::CutOver => format!(
            "disk {}: cut over to a cloud instance; replication of this disk has stopped",
            disk.id
        ),
        _ => format!("disk {}: the agent key was revoked", disk.id),
    }
}

/// How long a refused peer gets to read its `Error` frame before the socket closes.
const LINGER_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Sends the error, half-closes, and discards what the peer still sends for a moment: closing
/// with unread data would make the kernel send a reset that can destroy the error frame before
/// the agent reads it.
async fn send_error(conn: &mut Conn, e: &SessionError) {
    let frame = Frame::error(e.code, e.message.clone());
    if tokio::time::timeout(Duration::from_secs(2), conn.send(frame))
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(conn.get_mut()).await;
    drain_input(conn.get_mut()).await;
}

async fn drain_input(r: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let mut sink = [0u8; 16 * 1024];
    let _ = tokio::time::timeout(LINGER_AFTER_ERROR, async {
        while let Ok(n) = r.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Preamble, hello, challenge, auth. Returns the authenticated disk, the version and the
/// gateway's proof of the key for the Welcome.
async fn handshake(
    conn: &mut Conn,
    shared: &Shared,
) -> Result<(Arc<Disk>, u16, [u8; 32]), SessionError> {
    let deadline = Duration::from_secs(shared.limits.handshake_timeout_secs);
    let timed_out = || SessionError::peer(ErrorCode::Timeout, "handshake timed out");
    let mut pre = [0u8; 4];
    tokio::time::timeout(deadline, conn.get_mut().read_exact(&mut pre))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| SessionError::peer(ErrorCode::BadPreamble, format!("no preamble: {e}")))?;
    if pre != PREAMBLE {
        return Err(SessionError::peer(
            ErrorCode::BadPreamble,
            format!(
                "expected preamble {:?}, got {:02x?}: not a sync-agent",
                String::from_utf8_lossy(&PREAMBLE),
                pre
            ),
        ));
    }
    let hello = match next_frame(conn, deadline).await? {
        Frame::Hello(h) => h,
        other => return Err(unexpected(&other, "hello")),
    };
    let Some(version) = protocol::negotiate(hello.min_version, hello.max_version) else {
        return Err(SessionError::peer(
            ErrorCode::UnsupportedVersion,
            format!(
                "agent offers versions {}..={}, gateway speaks {}..={}",
                hello.min_version,
                hello.max_version,
                protocol::MIN_VERSION,
                protocol::MAX_VERSION
            ),
        ));
    };
    let Some(disk) = shared.disks.get(&hello.disk_id) else {
        return Err(SessionError::peer(
            ErrorCode::UnknownDisk,
            format!("no disk {:?} on this gateway", hello.disk_id),
        ));
    };
    if hello.disk_size != disk.size {
        return Err(SessionError::peer(
            ErrorCode::DiskSizeMismatch,
            format!(
                "disk {}: agent announces {} bytes, gateway volume is {} bytes",
                disk.id, hello.disk_size, disk.size
            ),
        ));
    }
    let server_nonce: [u8; 32] = rand::random();
    conn.send(Frame::Challenge {
        version,
        server_nonce,
    })
    .await
    .map_err(|e| SessionError::peer(ErrorCode::TruncatedFrame, e.to_string()))?;
    let (client_nonce, mac) = match next_frame(conn, deadline).await? {
        Frame::Auth { client_nonce, mac } => (client_nonce, mac),
        other => return Err(unexpected(&other, "auth")),
    };
    let transcript = Transcript {
        version,
        server_nonce: &server_nonce,
        client_nonce: &client_nonce,
        disk_size: disk.size,
        disk_id: &disk.id,
    };
    let Some(key) = disk.key() else {
        return Err(SessionError::peer(
            ErrorCode::Revoked,
            revoked_message(&disk),
        ));
    };
    if !auth::verify_agent(&key, &transcript, &mac) {
        return Err(SessionError::peer(
            ErrorCode::AuthFailed,
            format!("disk {}: agent key does not match", disk.id),
        ));
    }
    let proof = auth::gateway_proof(&key, &transcript);
    Ok((disk, version, proof))
}

async fn next_frame(conn: &mut Conn, deadline: Duration) -> Result<Frame, SessionError> {
    match tokio::time::timeout(deadline, conn.next()).await {
        Err(_) => Err(SessionError::peer(ErrorCode::Timeout, "peer went silent")),
        Ok(None) => Err(SessionError::peer(
            ErrorCode::TruncatedFrame,
            "connection closed by peer",
        )),
        Ok(Some(Err(e))) => Err(SessionError::peer(e.code(), e.to_string())),
        Ok(Some(Ok(Frame::Error { code, message }))) => Err(SessionError::peer(
            code,
            format!("agent reported: {message}"),
        )),
        Ok(Some(Ok(f))) => Ok(f),
    }
}

fn unexpected(f: &Frame, wanted: &str) -> SessionError {
    SessionError::peer(
        ErrorCode::Malformed,
        format!("expected a {wanted} frame, got {}", f.name()),
    )
}

async fn stream_disk(
    mut conn: Conn,
    disk: Arc<Disk>,
    version: u16,
    proof: [u8; 32],
    peer: SocketAddr,
    shared: &Arc<Shared>,
    started: Instant,
) -> Result<(), SessionError> {
    let claim = disk.claim(&shared.cancel);
    // Wait for a superseded session of this disk to drain its writes.
    let wait = Duration::from_secs(shared.limits.drain_timeout_secs + 5);
    // The guard moves into the writer thread below: the disk is released only when the writer
    // has really stopped, even if this session gives up waiting for it.
    let active = match tokio::time::timeout(wait, disk.active.clone().lock_owned()).await {
        Ok(g) => g,
        Err(_) => {
            let e = SessionError::peer(
                ErrorCode::Busy,
                format!("disk {}: previous session still draining", disk.id),
            );
            send_error(&mut conn, &e).await;
            return Err(e);
        }
    };
    if !disk.is_latest(&claim) {
        let e = SessionError::peer(ErrorCode::Superseded, "a newer session took over");
        send_error(&mut conn, &e).await;
        return Err(e);
    }
    // Revoked (or cut over) between the key check of the handshake and now.
    if disk.is_revoked() {
        let e = SessionError::peer(ErrorCode::Revoked, revoked_message(&disk));
        send_error(&mut conn, &e).await;
        return Err(e);
    }
    let (point, ckpt) = {
        let st = disk.state();
        (st.point(), st.checkpoint().cloned())
    };
    let welcome = Welcome {
        server_proof: proof,
        durable_seq: point.seq,
        resume_offset: point.resume_offset,
        checkpoint_seq: point.checkpoint_seq,
        max_payload: shared.limits.max_block_bytes,
        window: shared.limits.connection_inflight_bytes,
        checkpoint_label: ckpt.as_ref().map(|c| c.label.clone()).unwrap_or_default(),
        snapshot_id: ckpt.map(|c| c.snapshot.id).unwrap_or_default(),
    };
    conn.send(Frame::Welcome(welcome))
        .await
        .map_err(|e| SessionError::peer(ErrorCode::TruncatedFrame, e.to_string()))?;
    // Authenticated: from here on, frames up to a full data block.
    *conn.codec_mut() = FrameCodec::new(shared.limits.max_block_bytes);
    let _open = disk.stats.session_opened();
    info!(disk = %disk.id, %peer, version, durable_seq = point.seq, "agent authenticated");

    let (mut sink, mut source) = conn.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(256);
    let sender = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if sink.send(f).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let failed = CancellationToken::new();
    let (cmd_tx, cmd_rx) = mpsc::channel::<WriterCmd>(64);
    let mut writer = Writer::new(
        disk.clone(),
        shared.backend.clone(),
        shared.pool.clone(),
        tokio::runtime::Handle::current(),
        out_tx.clone(),
        shared.limits.sync_bytes,
        Duration::from_millis(shared.limits.sync_linger_ms),
        failed.clone(),
    );
    writer.policy = Some(shared.policy.clone());
    // Snapshots on command go through this writer while the session lasts.
    disk.set_writer(claim.id, cmd_tx.downgrade());
    shared.policy.changed.notify_one();
    let writer_busy = writer.busy.clone();
    let draining = writer.draining.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(format!("write-{}", disk.id))
        .spawn(move || {
            let _disk_released_on_exit = active;
            // Cancels `failed` however the writer ends, a panic included, so the reader never
            // waits on a writer that is gone.
            let _stop_reader = writer.failed.clone().drop_guard();
            let _ = done_tx.send(writer.run(cmd_rx));
        })
        .map_err(|e| SessionError::internal(format!("cannot start writer thread: {e}")))?;

    let idle = Duration::from_secs(shared.limits.idle_timeout_secs);
    let mut last_seq = point.seq;
    let mut frames = 0u64;
    let mut bytes_in = 0u64;
    let conn_budget = Arc::new(tokio::sync::Semaphore::new(
        shared.limits.connection_inflight_bytes as usize,
    ));
    // The policy's bandwidth cap, applied to what this session reads: a paused reader fills
    // the agent's window, which slows the agent.
    let mut pacer: Option<(u64, Throttle)> = None;
    let read_result: Result<(), SessionError> = loop {
        let frame = tokio::select! {
            _ = claim.token.cancelled() => break Err(if disk.is_revoked() {
                SessionError::peer(ErrorCode::Revoked, revoked_message(&disk))
            } else if shared.cancel.is_cancelled() {
                SessionError::peer(ErrorCode::ShuttingDown, "gateway is shutting down")
            } else {
                SessionError::peer(ErrorCode::Superseded, "a newer session for this disk took over")
            }),
            _ = failed.cancelled() => break Ok(()),
            r = tokio::time::timeout(idle, source.next()) => match r {
                // The agent waits on us while the writer works (window full, snapshot).
                Err(_) if writer_busy.load(Ordering::Relaxed) || cmd_tx.capacity() < cmd_tx.max_capacity() => continue,
                Err(_) => break Err(SessionError::peer(ErrorCode::Timeout,
                    format!("no complete frame for {}s", idle.as_secs()))),
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => break Err(SessionError::peer(e.code(), e.to_string())),
                Ok(Some(Ok(f))) => f,
            },
        };
        frames += 1;
        DiskStats::add(&disk.stats.frames, 1);
        match frame {
            Frame::Data(d) => {
                if d.seq <= last_seq {
                    break Err(SessionError::peer(
                        ErrorCode::SequenceRegression,
                        format!("seq {} after {last_seq}", d.seq),
                    ));
                }
                if d.end() > disk.size {
                    break Err(SessionError::peer(
                        ErrorCode::OutOfRange,
                        format!(
                            "seq {}: write of {} bytes at offset {} ends past the disk end {}",
                            d.seq, d.length, d.offset, disk.size
                        ),
                    ));
                }
                if d.length > shared.limits.max_block_bytes {
                    break Err(SessionError::peer(
                        ErrorCode::FrameTooLarge,
                        format!(
                            "block of {} bytes over the limit {}",
                            d.length, shared.limits.max_block_bytes
                        ),
                    ));
                }
                last_seq = d.seq;
                match shared.policy.bandwidth() {
                    0 => pacer = None,
                    rate => {
                        if pacer.as_ref().map(|p| p.0) != Some(rate) {
                            pacer = Some((rate, Throttle::new(rate)));
                        }
                        if let Some((_, t)) = pacer.as_mut() {
                            tokio::select! {
                                _ = claim.token.cancelled() => continue,
                                _ = t.consume(d.payload.len() + protocol::frame::DATA_HEADER_LEN) => {}
                            }
                        }
                    }
                }
                disk.stats.received_seq.fetch_max(d.seq, Ordering::Relaxed);
                bytes_in += d.payload.len() as u64;
                DiskStats::add(&disk.stats.bytes_received, d.payload.len() as u64);
                // Weigh the block by what it will occupy once decompressed.
                let weight = if d.is_zero() { 1 } else { d.length.max(1) };
                let permits = tokio::select! {
                    _ = claim.token.cancelled() => break Err(SessionError::peer(
                        ErrorCode::ShuttingDown, "session cancelled")),
                    p = async {
                        let c = conn_budget.clone().acquire_many_owned(weight).await;
                        let g = shared.budget.clone().acquire_many_owned(weight).await;
                        (c, g)
                    } => match p {
                        (Ok(c), Ok(g)) => (c, g),
                        _ => break Err(SessionError::internal("budget closed")),
                    },
                };
                let pool = shared.pool.clone();
                let block = tokio::task::spawn_blocking(move || verify(d, &pool));
                if cmd_tx
                    .send(WriterCmd::Write { block, permits })
                    .await
                    .is_err()
                {
                    break Ok(()); // writer failed; its error is reported below
                }
            }
            Frame::Checkpoint(c) => {
                if c.seq <= last_seq {
                    break Err(SessionError::peer(
                        ErrorCode::SequenceRegression,
                        format!("checkpoint seq {} after {last_seq}", c.seq),
                    ));
                }
                last_seq = c.seq;
                if cmd_tx.send(WriterCmd::Checkpoint(c)).await.is_err() {
                    break Ok(());
                }
            }
            Frame::HashQuery(q) => {
                let last_start = q.offset + q.span() - u64::from(q.block_size);
                if last_start >= disk.size {
                    break Err(SessionError::peer(
                        ErrorCode::OutOfRange,
                        format!(
                            "hash query of {} blocks of {} at offset {} reaches past the disk end {}",
                            q.hashes.len(), q.block_size, q.offset, disk.size
                        ),
                    ));
                }
                if cmd_tx.send(WriterCmd::HashQuery(q)).await.is_err() {
                    break Ok(());
                }
            }
            Frame::Error { code, message } => {
                info!(disk = %disk.id, %code, %message, "agent reported an error");
                break Ok(());
            }
            other => break Err(unexpected(&other, "data or checkpoint")),
        }
    };

    // Drain: the writer makes everything received durable and acks it, then stops.
    draining.store(true, Ordering::Relaxed);
    disk.clear_writer(claim.id);
    drop(cmd_tx);
    let drain = Duration::from_secs(shared.limits.drain_timeout_secs);
    let (stats, write_result) = match tokio::time::timeout(drain, done_rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => (
            Default::default(),
            Err(SessionError::internal("writer thread died")),
        ),
        Err(_) => {
            warn!(disk = %disk.id, "writer did not drain within {}s", drain.as_secs());
            (
                Default::default(),
                Err(SessionError::storage("drain deadline passed")),
            )
        }
    };
    // A writer that missed the deadline runs on detached and still holds the disk, so no new
    // session can start on it until it has finished.
    let _ = thread;
    let result = read_result.and(write_result);
    if let Err(e) = &result {
        let _ = out_tx.send(Frame::error(e.code, e.message.clone())).await;
    }
    drop(out_tx);
    let sender_abort = sender.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), sender)
        .await
        .is_err()
    {
        // A peer that stops reading must not keep a writer blocked on its ack channel.
        sender_abort.abort();
    }
    if result.is_err() {
        // The sender half-closed after the error frame; let the agent read it.
        let _ = tokio::time::timeout(LINGER_AFTER_ERROR, async {
            while source.next().await.is_some() {}
        })
        .await;
    }
    let secs = started.elapsed().as_secs_f64();
    info!(
        disk = %disk.id, %peer, frames, bytes_in,
        bytes_written = stats.bytes_written, bytes_zeroed = stats.bytes_zeroed,
        syncs = stats.syncs, checkpoints = stats.checkpoints,
        durable_seq = disk.state().point().seq,
        secs = format!("{secs:.3}"),
        mb_per_s = format!("{:.1}", (stats.bytes_written + stats.bytes_zeroed) as f64 / secs.max(1e-9) / 1e6),
        "session closed"
    );
    result
}
