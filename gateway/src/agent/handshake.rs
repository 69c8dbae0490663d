//! One connection attempt: preamble, `Hello`, `Challenge`, `Auth`, `Welcome`, then a reader task
//! that drains the socket into a channel.

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::codec::FramedRead;

use super::error::AgentError;
use super::link::{LinkConfig, LinkStats, STALL_TIMEOUT};
use super::throttle::Throttle;
use crate::protocol::auth::{agent_mac, verify_gateway, Transcript};
use crate::protocol::frame::encode;
use crate::protocol::{
    Frame, FrameCodec, FrameError, Hello, Welcome, MAX_VERSION, MIN_VERSION, PREAMBLE,
};

pub(super) struct Conn {
    pub(super) writer: OwnedWriteHalf,
    pub(super) incoming: mpsc::Receiver<Result<Frame, FrameError>>,
    pub(super) reader: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One connection attempt: preamble, Hello, Challenge, Auth, Welcome.
pub(super) async fn open(
    cfg: &LinkConfig,
    throttle: &mut Option<Throttle>,
    stats: &mut LinkStats,
) -> Result<(Conn, Welcome), AgentError> {
    let addr = cfg.addr.clone();
    let stream = TcpStream::connect(&addr)
        .await
        .map_err(|source| AgentError::Connect { addr, source })?;
    // Frames are large; acks and checkpoints are small and latency-bound.
    let _ = stream.set_nodelay(true);
    let (rd, mut writer) = stream.into_split();
    let mut frames = FramedRead::new(rd, FrameCodec::default());

    let mut buf = BytesMut::new();
    buf.extend_from_slice(&PREAMBLE);
    encode(
        &Frame::Hello(Hello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            disk_size: cfg.disk_size,
            disk_id: cfg.disk_id.clone(),
            agent: format!("sync-agent/{}", env!("CARGO_PKG_VERSION")),
        }),
        &mut buf,
    );
    write_frame(&mut writer, throttle, stats, &buf).await?;

    let (version, server_nonce) = match next_frame(&mut frames).await? {
        Frame::Challenge {
            version,
            server_nonce,
        } => (version, server_nonce),
        other => return Err(unexpected(other, "challenge")),
    };
    if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
        return Err(AgentError::Protocol(format!(
            "gateway chose version {version}, outside {MIN_VERSION}..={MAX_VERSION}"
        )));
    }
    let client_nonce: [u8; 32] = rand::random();
    let transcript = Transcript {
        version,
        server_nonce: &server_nonce,
        client_nonce: &client_nonce,
        disk_size: cfg.disk_size,
        disk_id: &cfg.disk_id,
    };
    let mac = agent_mac(&cfg.key, &transcript);
    buf.clear();
    encode(&Frame::Auth { client_nonce, mac }, &mut buf);
    write_frame(&mut writer, throttle, stats, &buf).await?;

    let welcome = match next_frame(&mut frames).await? {
        Frame::Welcome(w) => w,
        other => return Err(unexpected(other, "welcome")),
    };
    if !verify_gateway(&cfg.key, &transcript, &welcome.server_proof) {
        return Err(AgentError::ProofMismatch);
    }

    let (tx, incoming) = mpsc::channel(1024);
    let reader = tokio::spawn(async move {
        while let Some(item) = frames.next().await {
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    Ok((
        Conn {
            writer,
            incoming,
            reader,
        },
        welcome,
    ))
}

pub(super) async fn write_frame(
    writer: &mut OwnedWriteHalf,
    throttle: &mut Option<Throttle>,
    stats: &mut LinkStats,
    bytes: &[u8],
) -> Result<(), AgentError> {
    if let Some(t) = throttle {
        t.consume(bytes.len()).await;
    }
    timeout(STALL_TIMEOUT, writer.write_all(bytes))
        .await
        .map_err(|_| AgentError::Silent(STALL_TIMEOUT.as_secs()))?
        .map_err(AgentError::Connection)?;
    stats.bytes_sent_wire += bytes.len() as u64;
    Ok(())
}

async fn next_frame<R>(frames: &mut FramedRead<R, FrameCodec>) -> Result<Frame, AgentError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    match frames.next().await {
        None => Err(AgentError::Closed),
        Some(Err(e)) => Err(frame_error(e)),
        Some(Ok(f)) => Ok(f),
    }
}

pub(super) fn frame_error(e: FrameError) -> AgentError {
    match e {
        FrameError::Io(io) => AgentError::Connection(io),
        other => AgentError::BadFrame(other),
    }
}

fn unexpected(f: Frame, wanted: &str) -> AgentError {
    match f {
        Frame::Error { code, message } => AgentError::Refused { code, message },
        other => AgentError::Protocol(format!("expected {wanted}, got {}", other.name())),
    }
}
