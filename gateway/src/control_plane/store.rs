//! Persistence of the control plane's [`State`]: one `STATE_DIR/state.json` (mode 0600: it
//! holds agent keys), written with [`atomic_write`] after every change and before the change is
//! acknowledged. [`Store`] holds the state behind one mutex, orders the writes (an older
//! snapshot never overwrites a newer one), and keeps a [`Notify`] per gateway that wakes its
//! long poll.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::state::{State, STATE_VERSION};
use crate::durable::atomic_write;

/// File name of the state in the state dir.
pub const STATE_FILE: &str = "state.json";

/// What can go wrong with a state change or with the state file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the bootstrap token is unknown or expired")]
    TokenInvalid,
    #[error("the bootstrap token was already used")]
    TokenUsed,
    #[error("no {what} {id:?}")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid state file")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format version {found}; this sync-control reads version {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot encode the state")]
    Encode(#[source] serde_json::Error),
    #[error("cannot save the state to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The state behind a mutex, saved after each change, with a wake-up per gateway.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// The state and its generation (bumped by every change).
    state: Mutex<(State, u64)>,
    /// Generation on disk. Writers serialize here; an older snapshot never overwrites a newer.
    written: Mutex<u64>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves a consistent value: every change is applied by
    // code that validates first and mutates last.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Loads `DIR/state.json`, or starts empty when there is none.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                if state.version != STATE_VERSION {
                    return Err(StoreError::Version {
                        path,
                        found: state.version,
                    });
                }
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                state: Mutex::new((state, 0)),
                written: Mutex::new(0),
                wakers: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Reads the state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&lock(&self.inner.state).0)
    }

    /// Applies a change; when `f` answers `dirty`, saves the state before returning. `f` must
    /// validate before it mutates, so that an error leaves the state as it was.
    pub async fn update<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let (value, snapshot) = {
            let mut guard = lock(&self.inner.state);
            let (state, generation) = &mut *guard;
            let (value, dirty) = f(state)?;
            if !dirty {
                return Ok(value);
            }
            *generation += 1;
            let bytes = serde_json::to_vec_pretty(state).map_err(StoreError::Encode)?;
            (value, (bytes, *generation))
        };
        let inner = self.inner.clone();
        let (bytes, generation) = snapshot;
        let saved = tokio::task::spawn_blocking(move || {
            let mut written = lock(&inner.written);
            if *written >= generation {
                return Ok(()); // a newer state, which includes this change, is on disk
            }
            atomic_write(&inner.path, &bytes, 0o600).map_err(|source| StoreError::Write {
                path: inner.path.clone(),
                source,
            })?;
            *written = generation;
            Ok(())
        })
        .await;
        match saved {
            Ok(r) => r.map(|()| value),
            Err(e) => Err(StoreError::Write {
                path: self.inner.path.clone(),
                source: io::Error::other(e.to_string()),
            }),
        }
    }

    /// The wake-up of a gateway's long poll.
    pub fn waker(&self, gateway_id: &str) -> Arc<Notify> {
        lock(&self.inner.wakers)
            .entry(gateway_id.to_string())
            .or_default()
            .clone()
    }

    /// Wakes a gateway's long poll (a command was queued for it).
    pub fn wake(&self, gateway_id: &str) {
        self.waker(gateway_id).notify_waiters();
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
