//! Request bodies that stream: a byte range of a file (re-readable, so retryable) or an async
//! reader (one pass). A producer fills a bounded channel and hashes as it goes, so memory
//! stays at `CHANNEL_CHUNKS × CHUNK` whatever the object size, and the MD5 that OSS's ETag
//! must equal is known when the last byte leaves.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use md5::{Digest, Md5};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

/// Read size: large enough that per-chunk overhead vanishes next to MD5 and the socket.
const CHUNK: usize = 1 << 20;
/// Chunks buffered between the reader and the socket (bounds memory per upload to 4 MiB).
const CHANNEL_CHUNKS: usize = 4;

/// Called with (bytes of this object handed to the socket so far, object size).
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Reports progress of one object across its parts and retries.
#[derive(Clone)]
pub(crate) struct Progress {
    pub callback: Option<ProgressFn>,
    pub sent: Arc<AtomicU64>,
    pub total: u64,
}

impl Progress {
    pub fn new(callback: Option<ProgressFn>, total: u64) -> Self {
        Self {
            callback,
            sent: Arc::new(AtomicU64::new(0)),
            total,
        }
    }

    fn add(&self, n: u64) {
        let now = self.sent.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(cb) = &self.callback {
            cb(now.min(self.total), self.total);
        }
    }

    /// Sets the count back to `sent` before an attempt is retried, so bytes of the failed
    /// attempt are not counted twice.
    pub fn reset_to(&self, sent: u64) {
        self.sent.store(sent, Ordering::Relaxed);
    }

    /// Bytes counted so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// What the producer learned: the MD5 of every byte it sent, or why it stopped.
pub(crate) type Produced = Result<[u8; 16], SourceError>;

#[derive(Debug)]
pub(crate) enum SourceError {
    Io(PathBuf, std::io::Error),
    Short { got: u64, want: u64 },
}

/// The body hyper sends.
pub(crate) enum OssBody {
    Bytes(Option<Bytes>),
    Stream {
        rx: mpsc::Receiver<std::io::Result<Bytes>>,
        remaining: u64,
        progress: Option<Progress>,
    },
}

impl OssBody {
    pub fn empty() -> Self {
        OssBody::Bytes(None)
    }

    pub fn bytes(b: impl Into<Bytes>) -> Self {
        OssBody::Bytes(Some(b.into()))
    }

    /// A body of exactly `len` bytes fed through `rx` (the test server's GET answers).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub fn channel(rx: mpsc::Receiver<std::io::Result<Bytes>>, len: u64) -> Self {
        OssBody::Stream {
            rx,
            remaining: len,
            progress: None,
        }
    }
}

impl Body for OssBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            OssBody::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            OssBody::Stream {
                rx,
                remaining,
                progress,
            } => match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let n = chunk.len() as u64;
                    *remaining = remaining.saturating_sub(n);
                    if let Some(p) = progress {
                        p.add(n);
                    }
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OssBody::Bytes(b) => b.is_none(),
            OssBody::Stream { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OssBody::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            OssBody::Stream { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

/// Streams `len` bytes of `path` from `offset` on a blocking thread (file reads and MD5 are
/// CPU and disk work that must not stall the runtime).
pub(crate) fn file_range(
    path: &Path,
    offset: u64,
    len: u64,
    progress: Option<Progress>,
) -> (OssBody, oneshot::Receiver<Produced>) {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let (done_tx, done_rx) = oneshot::channel();
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let result = read_range(&path, offset, len, &tx);
        if let Err(SourceError::Io(_, e)) = &result {
            // Make hyper abort the request instead of waiting for bytes that will not come.
            let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
        }
        let _ = done_tx.send(result);
    });
    let body = OssBody::Stream {
        rx,
        remaining: len,
        progress,
    };
    (body, done_rx)
}

fn read_range(
    path: &Path,
    offset: u64,
    len: u64,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> Produced {
    let io = |e| SourceError::Io(path.to_path_buf(), e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut md5 = Md5::new();
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            let n = file.read(&mut buf[filled..]).map_err(io)?;
            if n == 0 {
                return Err(SourceError::Short {
                    got: done + filled as u64,
                    want: len,
                });
            }
            filled += n;
        }
        md5.update(&buf);
        done += want as u64;
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            // The request went away (failed or cancelled); the caller reports why.
            break;
        }
    }
    Ok(md5.finalize().into())
}

/// Streams exactly `len` bytes of `reader` (one pass: a failed request cannot be retried).
pub(crate) fn reader<R>(
    mut reader: R,
    len: u64,
    progress: Option<Progress>,
) -> (OssBody, oneshot::Receiver<Produced>)
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut md5 = Md5::new();
        let mut done = 0u64;
        let result = loop {
            if done == len {
                break Ok(md5.finalize().into());
            }
            let want = (len - done).min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; want];
            match reader.read(&mut buf).await {
                Ok(0) => {
                    let msg = format!("source ended after {done} of {len} bytes");
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            msg,
                        )))
                        .await;
                    break Err(SourceError::Short {
                        got: done,
                        want: len,
                    });
                }
                Ok(n) => {
                    buf.truncate(n);
                    md5.update(&buf);
                    done += n as u64;
                    if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                        break Ok(md5.finalize().into());
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(std::io::Error::new(e.kind(), e.to_string())))
                        .await;
                    break Err(SourceError::Io(PathBuf::from("<reader>"), e));
                }
            }
        };
        let _ = done_tx.send(result);
    });
    let body = OssBody::Stream {
        rx,
        remaining: len,
        progress,
    };
    (body, done_rx)
}
