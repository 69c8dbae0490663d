//! The gateway's data port: accepts agents, authenticates them, and writes their streams.
//!
//! Bounds: a connection permit is taken before `accept` (so excess agents wait in the kernel's
//! backlog, costing nothing here); each connection's undecoded-and-unwritten bytes are weighed
//! against its own budget and the gateway's; each disk has its own writer thread, so one slow
//! disk fills only its own budget and slows only its own agent.
//!
//! Shutdown: one [`CancellationToken`]. The accept loop stops, every session stops reading,
//! drains its writer (everything received becomes durable and is acked) and closes; `run`
//! waits for that up to `limits.drain_timeout_secs`. The metrics port (when configured) stops
//! on the same token.

pub mod control;
pub mod disk;
pub mod metrics;
pub mod session;
pub mod writer;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{Backend, BackendError, BufferPool};
use crate::config::{Config, ConfigError, Limits};
use crate::durable;
use crate::protocol::ErrorCode;
pub use control::{Control, LivePolicy};
use disk::{Disk, DiskRegistry, DiskState};
use metrics::GatewayStats;

/// Why a session ended badly: the code sent to the agent and a message for both sides.
#[derive(Debug, Clone)]
pub struct SessionError {
    pub code: ErrorCode,
    pub message: String,
}

impl SessionError {
    /// The peer did something wrong (or went away).
    pub fn peer(code: ErrorCode, message: impl Into<String>) -> Self {
        SessionError {
            code,
            message: message.into(),
        }
    }
    /// The disk or backend failed; the agent may retry.
    pub fn storage(message: impl Into<String>) -> Self {
        SessionError::peer(ErrorCode::Storage, message)
    }
    /// A bug or resource failure in the gateway.
    pub fn internal(message: impl Into<String>) -> Self {
        SessionError::peer(ErrorCode::Storage, message)
    }
}

/// What every session shares.
#[derive(Debug)]
pub struct Shared {
    pub disks: Arc<DiskRegistry>,
    pub backend: Arc<Backend>,
    pub limits: Limits,
    /// Gateway-wide budget of in-flight bytes.
    pub budget: Arc<Semaphore>,
    pub pool: Arc<BufferPool>,
    pub cancel: CancellationToken,
    /// Gateway-wide counters for the metrics port.
    pub stats: Arc<GatewayStats>,
    /// Retention and bandwidth, changeable at run time by the control plane.
    pub policy: Arc<LivePolicy>,
}

/// Prunes one disk's snapshots by the policy, in the background, never deleting `protected`
/// ones (the current checkpoint's); failures are logged and retried at the next prune.
pub fn spawn_prune(
    rt: &tokio::runtime::Handle,
    backend: Arc<Backend>,
    disk_id: String,
    policy: crate::retention::RetentionPolicy,
    protected: Vec<String>,
) {
    rt.spawn(async move {
        let now = disk::unix_ms();
        if let Err(e) = crate::retention::prune(&backend, &disk_id, &policy, now, &protected).await
        {
            warn!(disk = %disk_id, error = %e, "snapshot pruning failed; retrying later");
        }
    });
}

/// Why the gateway could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot prepare disk {disk}")]
    Backend {
        disk: String,
        #[source]
        source: BackendError,
    },
    #[error("cannot load replication state of disk {disk} from {dir}")]
    State {
        disk: String,
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data dir {path} is in use by another sync-gateway (lock held on {path}/gateway.lock)"
    )]
    Locked { path: String },
    #[error("cannot start the backend")]
    Setup(#[source] BackendError),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl GatewayError {
    /// Process exit code: 2 for configuration problems, 1 for the rest.
    pub fn exit_code(&self) -> i32 {
        match self {
            GatewayError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Takes an exclusive lock on the data dir for the life of the process, so a second gateway
/// started by mistake on the same volumes and state refuses to run.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, GatewayError> {
    let path = dir.join("gateway.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| GatewayError::Write {
            path: path.display().to_string(),
            source,
        })?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| GatewayError::Locked {
            path: dir.display().to_string(),
        },
    )?;
    Ok(file)
}

/// Provisions (or reopens) a disk's volume, loads its replication state and resumes any
/// snapshot copy a stop interrupted.
async fn open_disk(
    backend: &Backend,
    state_dir: &std::path::Path,
    id: &str,
    size: u64,
    key: crate::protocol::auth::DiskKey,
) -> Result<Disk, GatewayError> {
    let volume = backend
        .open_volume(id, size)
        .await
        .map_err(|source| GatewayError::Backend {
            disk: id.to_string(),
            source,
        })?;
    let state = DiskState::load(state_dir, id).map_err(|source| GatewayError::State {
        disk: id.to_string(),
        dir: state_dir.display().to_string(),
        source,
    })?;
    let recovered = backend
        .recover(id)
        .await
        .map_err(|source| GatewayError::Backend {
            disk: id.to_string(),
            source,
        })?;
    if !recovered.failed.is_empty() {
        warn!(disk = %id, count = recovered.failed.len(),
            "unacknowledged snapshots interrupted by the last stop were marked failed");
    }
    let p = state.point();
    info!(disk = %id, size, volume = %volume.path().display(),
        durable_seq = p.seq, checkpoint_seq = p.checkpoint_seq, "disk ready");
    let disk = Disk::new(id.to_string(), size, key, volume, state);
    for s in recovered.resumed {
        disk.add_snapshot_in_flight(s);
    }
    Ok(disk)
}

/// Opens every configured disk, then serves agents until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), GatewayError> {
    run_with_control(config, cancel, None).await
}

/// [`run`], handing a [`Control`] to `ready` once the gateway listens.
pub async fn run_with_control(
    config: Config,
    cancel: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Control>>,
) -> Result<(), GatewayError> {
    durable::create_dir_all_durable(&config.data_dir).map_err(|source| GatewayError::Write {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let _lock = lock_data_dir(&config.data_dir)?;
    let backend = Arc::new(Backend::open(&config).await.map_err(GatewayError::Setup)?);
    let disks = Arc::new(DiskRegistry::default());
    let state_dir = config.data_dir.join("state");
    durable::create_dir_all_durable(&state_dir).map_err(|source| GatewayError::Write {
        path: state_dir.display().to_string(),
        source,
    })?;
    for (dc, key) in config.load_keys()? {
        disks.insert(open_disk(&backend, &state_dir, &dc.id, dc.size_bytes, key).await?);
    }
    // Standalone, retention is opt-in; under a control plane the DRS-like tiers apply unless
    // configured otherwise (snapshots would otherwise pile up unseen).
    let retention = config.retention.clone().or_else(|| {
        config
            .control_plane
            .as_ref()
            .map(|_| crate::retention::RetentionPolicy::default())
    });
    let policy = LivePolicy::load(&state_dir, retention)
        .map_err(|m| GatewayError::Config(ConfigError::Invalid(m)))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: config.listen,
        source,
    })?;
    // Bound before listen.addr is written, so that file's appearance means every port is up.
    let metrics_listener = match &config.metrics {
        Some(m) => Some(bind_metrics(m.listen, &config.data_dir).await?),
        None => {
            // A stale address from an earlier run with a metrics port would point at nothing.
            let _ = std::fs::remove_file(config.data_dir.join(METRICS_ADDR_FILE));
            None
        }
    };
    let limits = config.limits.clone();
    let block = limits.max_block_bytes as usize;
    let shared = Arc::new(Shared {
        disks,
        backend,
        budget: Arc::new(Semaphore::new(limits.gateway_inflight_bytes as usize)),
        pool: Arc::new(BufferPool::new(
            block,
            (limits.gateway_inflight_bytes as usize / block).min(64),
        )),
        limits,
        cancel: cancel.clone(),
        stats: Arc::new(GatewayStats::default()),
        policy: Arc::new(policy),
    });
    // Disks assigned by command in an earlier run come back before agents are accepted.
    let control = Control::restore(shared.clone(), state_dir.clone()).await?;
    if shared.disks.is_empty() {
        if config.control_plane.is_some() {
            info!("no disks yet: they arrive by command from the control plane");
        } else {
            warn!("no disks configured: every agent will be refused with unknown_disk");
        }
    }
    let addr_file = config.data_dir.join("listen.addr");
    durable::atomic_write(&addr_file, format!("{local}\n").as_bytes(), 0o644).map_err(
        |source| GatewayError::Write {
            path: addr_file.display().to_string(),
            source,
        },
    )?;
    {
        // Time-based expiry also happens while no checkpoint arrives, and for finalized disks
        // whose snapshots outlive them.
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(policy) = shared.policy.retention() else {
                    continue;
                };
                let mut ids: std::collections::BTreeSet<String> =
                    shared.disks.all().iter().map(|d| d.id.clone()).collect();
                if let Ok(all) = shared.backend.list_snapshots(None).await {
                    ids.extend(all.into_iter().map(|s| s.disk_id));
                }
                for id in ids {
                    let protected = shared.disks.get(&id).map(|d| d.protected_snapshots());
                    spawn_prune(
                        &tokio::runtime::Handle::current(),
                        shared.backend.clone(),
                        id,
                        policy.clone(),
                        protected.unwrap_or_default(),
                    );
                }
            }
        });
    }
    let metrics_task = metrics_listener.map(|listener| {
        let sources = metrics::Sources {
            gateway: shared.stats.clone(),
            disks: shared.disks.clone(),
        };
        tokio::spawn(metrics::serve(listener, sources, cancel.clone()))
    });
    info!(addr = %local, disks = shared.disks.len(), version = env!("CARGO_PKG_VERSION"),
        "sync-gateway listening");
    let upward_task = config.control_plane.clone().map(|cp| {
        let status = crate::upward::StatusSource::new(control.clone(), local.port());
        tokio::spawn(crate::upward::run(
            cp,
            Arc::new(config.clone()),
            control.clone(),
            status,
            cancel.clone(),
        ))
    });
    if let Some(ready) = ready {
        let _ = ready.send(control.clone());
    }

    let acceptor = crate::net::Acceptor::new(listener, shared.limits.max_connections, "data");
    let tracker = TaskTracker::new();
    while let Some((stream, peer, permit)) = acceptor.next(&cancel).await {
        shared
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tracker.spawn(async move {
            session::serve(stream, peer, shared).await;
            drop(permit);
        });
    }
    drop(acceptor);
    tracker.close();
    let drain = Duration::from_secs(shared.limits.drain_timeout_secs + 5);
    info!(sessions = tracker.len(), "shutting down: draining sessions");
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        warn!("sessions still open after the drain deadline");
    }
    // Let snapshot copies in flight finish; one cut short is marked failed on the next start.
    for disk in shared.disks.all() {
        for s in disk
            .snapshots_in_flight()
            .into_iter()
            .filter(|s| s.is_local_work())
        {
            info!(disk = %disk.id, snapshot = %s.info().id, "waiting for snapshot copy");
            let wait = tokio::task::spawn_blocking(move || s.wait());
            if tokio::time::timeout(drain, wait).await.is_err() {
                warn!(disk = %disk.id, "snapshot copy still running at exit");
            }
        }
    }
    // Cloud snapshots go on in the cloud; whoever still waits on one here is told we stop.
    shared.backend.shutdown();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    if let Some(task) = upward_task {
        // It races the same token; give it a moment to post a last report.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    info!("sync-gateway stopped");
    Ok(())
}

/// Where the bound metrics address is written, under the data dir.
pub const METRICS_ADDR_FILE: &str = "metrics.addr";

/// Binds the metrics port and writes its address to `DATA_DIR/metrics.addr`.
async fn bind_metrics(
    addr: SocketAddr,
    data_dir: &std::path::Path,
) -> Result<TcpListener, GatewayError> {
    let bind_err = |source| GatewayError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let addr_file = data_dir.join(METRICS_ADDR_FILE);
    durable::atomic_write(&addr_file, format!("{local}\n").as_bytes(), 0o644).map_err(
        |source| GatewayError::Write {
            path: addr_file.display().to_string(),
            source,
        },
    )?;
    info!(addr = %local, "metrics port listening (GET /metrics)");
    Ok(listener)
}
