//! The accept loop every listening port of ours shares (data port, metrics port,
//! `sync-control`): a connection permit is taken *before* `accept`, so connections beyond the
//! limit wait in the kernel's backlog and cost nothing here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// A listener with a bound on open connections.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    /// Names the port in logs.
    what: &'static str,
}

impl Acceptor {
    pub fn new(listener: TcpListener, max_connections: usize, what: &'static str) -> Self {
        Acceptor {
            listener,
            permits: Arc::new(Semaphore::new(max_connections)),
            what,
        }
    }

    /// The next connection (`TCP_NODELAY` set) and its permit, which the caller holds for the
    /// connection's life; `None` once `cancel` fires. Accept errors (EMFILE and friends) are
    /// logged and retried after 100 ms instead of spinning.
    pub async fn next(
        &self,
        cancel: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return None,
                p = self.permits.clone().acquire_owned() => p.ok()?,
            };
            tokio::select! {
                _ = cancel.cancelled() => return None,
                r = self.listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        return Some((stream, peer, permit));
                    }
                    Err(e) => {
                        tracing::warn!(port = self.what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }
}
