//! Why a replication run failed, and whether reconnecting could help.

use std::io;
use std::path::PathBuf;

use crate::protocol::auth::KeyError;
use crate::protocol::{ErrorCode, FrameError};

/// Every way a run of the agent can fail. `main` prints the `source()` chain on one line.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid disk id {0:?} (1-64 characters of A-Z a-z 0-9 - _ ., not starting with '.')")]
    InvalidDiskId(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot write key file {path}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read source {path}")]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("source {path} ended at {at} bytes during the scan, expected {expected}")]
    SourceShrank {
        path: PathBuf,
        at: u64,
        expected: u64,
    },
    #[error("cannot use state directory {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path} is unreadable: {reason}")]
    StateCorrupt { path: PathBuf, reason: String },
    #[error("another sync-agent is running for this disk (lock held on {path})")]
    Locked { path: PathBuf },
    #[error("invalid block size {0}: must be at least 4096")]
    BlockSize(u64),
    #[error("invalid delta block size {0}: must be a multiple of 4096, at most 8388608")]
    DeltaBlockSize(u64),
    #[error("--full and --rescan exclude each other")]
    FullAndRescan,
    #[error("cannot connect to gateway {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connection to the gateway failed")]
    Connection(#[source] io::Error),
    #[error("gateway closed the connection")]
    Closed,
    #[error("gateway sent nothing for {0} s")]
    Silent(u64),
    #[error("gateway sent an unreadable frame")]
    BadFrame(#[source] FrameError),
    #[error("gateway refused: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("gateway failed to prove the key")]
    ProofMismatch,
    #[error("protocol violation by the gateway: {0}")]
    Protocol(String),
    #[error("gateway durable point went backwards: {now} after {acked} was acknowledged")]
    DurableWentBackwards { now: u64, acked: u64 },
    #[error("gave up reconnecting after {secs} s")]
    GaveUp {
        secs: u64,
        #[source]
        last: Box<AgentError>,
    },
    #[error("internal failure: {0}")]
    Internal(String),
}

impl AgentError {
    /// Whether a new connection could get past this error (the fault is not in our input).
    pub fn is_transient(&self) -> bool {
        match self {
            AgentError::Connect { .. }
            | AgentError::Connection(_)
            | AgentError::Closed
            | AgentError::Silent(_) => true,
            AgentError::BadFrame(e) => {
                matches!(e, FrameError::Io(_) | FrameError::Truncated { .. })
            }
            AgentError::Refused { code, .. } => code.is_retryable(),
            _ => false,
        }
    }

    pub(crate) fn state(path: impl Into<PathBuf>, source: io::Error) -> Self {
        AgentError::State {
            path: path.into(),
            source,
        }
    }
}

/// The error and its causes on one line, `a: b: c`.
pub use crate::cli::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_classification_and_chain() {
        let refused = AgentError::Refused {
            code: ErrorCode::AuthFailed,
            message: "bad mac".into(),
        };
        assert!(!refused.is_transient());
        assert_eq!(chain(&refused), "gateway refused: auth_failed (5): bad mac");
        assert!(AgentError::Refused {
            code: ErrorCode::Busy,
            message: String::new()
        }
        .is_transient());
        let gave_up = AgentError::GaveUp {
            secs: 3,
            last: Box::new(AgentError::Connect {
                addr: "h:1".into(),
                source: io::Error::new(io::ErrorKind::ConnectionRefused, "refused"),
            }),
        };
        assert_eq!(
            chain(&gave_up),
            "gave up reconnecting after 3 s: cannot connect to gateway h:1: refused"
        );
        assert!(!gave_up.is_transient());
    }
}
