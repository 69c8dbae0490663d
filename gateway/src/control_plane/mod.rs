//! `sync-control`, the reference control plane: the other end of the gateway's upward channel
//! (see [`crate::api`]) plus the operator API and a browser console.
//!
//! One process, one state dir:
//!
//! ```text
//!  STATE_DIR/state.json       tokens (hashed), gateways, disks + agent keys, commands, reports  0600
//!  STATE_DIR/operator.token   the operator's bearer token, created on first start           0600
//!  STATE_DIR/listen.addr      the bound address (for --listen 127.0.0.1:0), removed at stop
//!  STATE_DIR/listen.url       http(s)://ADDR, what the CLI connects to by default
//! ```
//!
//! Every route is a row of [`ROUTES`]; the router, the OpenAPI document's test and the console
//! all go by that table.

mod http;
pub mod openapi;
mod routes;
pub mod state;
pub mod store;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::durable::{atomic_write, create_dir_all_durable};
pub use routes::{App, Settings};
use store::{Store, StoreError};

/// Operator token file in the state dir.
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";
/// Bound address file in the state dir.
pub const LISTEN_ADDR_FILE: &str = "listen.addr";
/// Base URL file in the state dir.
pub const LISTEN_URL_FILE: &str = "listen.url";

/// Connections served at once; each gateway holds one (its long poll), the console one or two.
const MAX_CONNECTIONS: usize = 512;
/// A client that has not sent its request head by then is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// A TLS handshake that takes longer is a stuck or hostile client.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, requests in flight get this long to finish (long polls end at once).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anyone (the console page, the OpenAPI document, registration with its bootstrap token).
    Public,
    /// The gateway named by the path's `{gateway_id}`, with its credential.
    Gateway,
    /// The operator token.
    Operator,
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Console,
    Health,
    OpenApi,
    Register,
    PollCommands,
    PostResult,
    PostStatus,
    CreateBootstrapToken,
    AssignDisk,
    RevokeAgent,
    SnapshotNow,
    TestLaunch,
    Cutover,
    Finalize,
    SetPolicy,
    CollectDiagnostics,
    GetCommand,
    Status,
}

/// One row of the route table. `{name}` in `path` matches one non-empty path segment.
#[derive(Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub auth: Auth,
    pub endpoint: Endpoint,
    /// The OpenAPI `operationId`.
    pub operation_id: &'static str,
}

const fn route(
    method: &'static str,
    path: &'static str,
    auth: Auth,
    endpoint: Endpoint,
    operation_id: &'static str,
) -> Route {
    Route {
        method,
        path,
        auth,
        endpoint,
        operation_id,
    }
}

/// Every route of the control plane.
pub const ROUTES: &[Route] = &[
    route("GET", "/", Auth::Public, Endpoint::Console, "console"),
    route("GET", "/healthz", Auth::Public, Endpoint::Health, "health"),
    route(
        "GET",
        "/v1/openapi.json",
        Auth::Public,
        Endpoint::OpenApi,
        "openapi",
    ),
    // Gateway-facing.
    route(
        "POST",
        "/v1/register",
        Auth::Public,
        Endpoint::Register,
        "register",
    ),
    route(
        "GET",
        "/v1/gateways/{gateway_id}/commands",
        Auth::Gateway,
        Endpoint::PollCommands,
        "pollCommands",
    ),
    route(
        "POST",
        "/v1/gateways/{gateway_id}/commands/{command_id}/result",
        Auth::Gateway,
        Endpoint::PostResult,
        "postCommandResult",
    ),
    route(
        "POST",
        "/v1/gateways/{gateway_id}/status",
        Auth::Gateway,
        Endpoint::PostStatus,
        "postStatus",
    ),
    // Operator-facing.
    route(
        "POST",
        "/v1/bootstrap-tokens",
        Auth::Operator,
        Endpoint::CreateBootstrapToken,
        "createBootstrapToken",
    ),
    route(
        "POST",
        "/v1/disks",
        Auth::Operator,
        Endpoint::AssignDisk,
        "assignDisk",
    ),
    route(
        "POST",
        "/v1/disks/{disk_id}/revoke",
        Auth::Operator,
        Endpoint::RevokeAgent,
        "revokeAgent",
    ),
    route(
        "POST",
        "/v1/disks/{disk_id}/snapshot",
        Auth::Operator,
        Endpoint::SnapshotNow,
        "snapshotNow",
    ),
    route(
        "POST",
        "/v1/disks/{disk_id}/test-launch",
        Auth::Operator,
        Endpoint::TestLaunch,
        "testLaunch",
    ),
    route(
        "POST",
        "/v1/disks/{disk_id}/cutover",
        Auth::Operator,
        Endpoint::Cutover,
        "cutover",
    ),
    route(
        "POST",
        "/v1/disks/{disk_id}/finalize",
        Auth::Operator,
        Endpoint::Finalize,
        "finalize",
    ),
    route(
        "PUT",
        "/v1/gateways/{gateway_id}/policy",
        Auth::Operator,
        Endpoint::SetPolicy,
        "setPolicy",
    ),
    route(
        "POST",
        "/v1/gateways/{gateway_id}/diagnostics",
        Auth::Operator,
        Endpoint::CollectDiagnostics,
        "collectDiagnostics",
    ),
    route(
        "GET",
        "/v1/commands/{command_id}",
        Auth::Operator,
        Endpoint::GetCommand,
        "getCommand",
    ),
    route(
        "GET",
        "/v1/status",
        Auth::Operator,
        Endpoint::Status,
        "status",
    ),
];

/// Why a request matched no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMiss {
    NotFound,
    /// The path exists with these methods.
    MethodNotAllowed(Vec<&'static str>),
}

/// The route of a request and its path parameters, in order.
pub fn match_route(method: &str, path: &str) -> Result<(&'static Route, Vec<String>), RouteMiss> {
    let mut allowed = Vec::new();
    for r in ROUTES {
        let Some(params) = match_path(r.path, path) else {
            continue;
        };
        if r.method == method {
            return Ok((r, params));
        }
        allowed.push(r.method);
    }
    if allowed.is_empty() {
        Err(RouteMiss::NotFound)
    } else {
        Err(RouteMiss::MethodNotAllowed(allowed))
    }
}

fn match_path(template: &str, path: &str) -> Option<Vec<String>> {
    let mut t = template.split('/');
    let mut p = path.split('/');
    let mut params = Vec::new();
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(params),
            (Some(ts), Some(ps)) if ts.starts_with('{') && ts.ends_with('}') => {
                if ps.is_empty() {
                    return None;
                }
                params.push(ps.to_string());
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// TLS certificate chain and key, PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub tls: Option<TlsFiles>,
    pub settings: Settings,
}

/// Why the control plane cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("state dir {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the state")]
    Store(#[from] StoreError),
    #[error("operator token {path}")]
    OperatorToken {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TLS: {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Serves until `cancel` fires, then lets requests in flight finish (up to a deadline).
pub async fn serve(config: ServeConfig, cancel: CancellationToken) -> Result<(), ServeError> {
    let dir = &config.state_dir;
    let dir_err = |source| ServeError::StateDir {
        path: dir.clone(),
        source,
    };
    create_dir_all_durable(dir).map_err(dir_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
    let store = Store::open(dir)?;
    let operator_token = operator_token(dir)?;
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    let mut reach = addr;
    if reach.ip().is_unspecified() {
        reach.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("{}://{reach}", if tls.is_some() { "https" } else { "http" });
    atomic_write(
        &dir.join(LISTEN_URL_FILE),
        format!("{url}\n").as_bytes(),
        0o644,
    )
    .map_err(dir_err)?;
    // listen.addr last: it is the signal that the server is up.
    atomic_write(
        &dir.join(LISTEN_ADDR_FILE),
        format!("{addr}\n").as_bytes(),
        0o644,
    )
    .map_err(dir_err)?;
    info!(%addr, %url, state_dir = %dir.display(), "sync-control listening");

    let app = Arc::new(App {
        store,
        operator_token_sha256: state::hash_secret(&operator_token),
        settings: config.settings.clone(),
        cancel: cancel.clone(),
    });
    accept_loop(listener, tls, app, cancel).await;
    for f in [LISTEN_ADDR_FILE, LISTEN_URL_FILE] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    info!("sync-control stopped");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Arc<App>,
    cancel: CancellationToken,
) {
    let acceptor = crate::net::Acceptor::new(listener, MAX_CONNECTIONS, "sync-control");
    let tracker = TaskTracker::new();
    while let Some((stream, peer, permit)) = acceptor.next(&cancel).await {
        let (app, cancel, tls) = (app.clone(), cancel.clone(), tls.clone());
        tracker.spawn(async move {
            match tls {
                None => serve_connection(stream, app, cancel).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => serve_connection(s, app, cancel).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(acceptor);
    tracker.close();
    tracker.wait().await;
}

async fn serve_connection<IO>(io: IO, app: Arc<App>, cancel: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(routes::handle(&app, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "connection ended");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}

/// Reads `operator.token`, creating it (random, 0600) on first start. The token is never logged.
fn operator_token(dir: &Path) -> Result<String, ServeError> {
    let path = dir.join(OPERATOR_TOKEN_FILE);
    let err = |source| ServeError::OperatorToken {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty; delete it to create a new token",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let token = state::random_secret();
            atomic_write(&path, format!("{token}\n").as_bytes(), 0o600).map_err(err)?;
            info!(path = %path.display(), "created the operator token");
            Ok(token)
        }
        Err(e) => Err(err(e)),
    }
}

fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    let fail = |path: &Path, reason: String| ServeError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let cert_pem = std::fs::read(&files.cert).map_err(|e| fail(&files.cert, e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&files.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(fail(&files.cert, "no PEM certificate in it".into()));
    }
    let key_pem = std::fs::read(&files.key).map_err(|e| fail(&files.key, e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| fail(&files.key, e.to_string()))?
        .ok_or_else(|| fail(&files.key, "no PEM private key in it".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(&files.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| fail(&files.key, e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_by_segments() {
        let (r, p) = match_route("GET", "/v1/gateways/gw-1/commands").unwrap();
        assert_eq!(
            (r.endpoint, p),
            (Endpoint::PollCommands, vec!["gw-1".to_string()])
        );
        let (r, p) = match_route("POST", "/v1/gateways/g/commands/c/result").unwrap();
        assert_eq!((r.endpoint, p.len()), (Endpoint::PostResult, 2));
        assert_eq!(
            match_route("GET", "/").unwrap().0.endpoint,
            Endpoint::Console
        );
        assert_eq!(
            match_route("GET", "/v1/disks").err(),
            Some(RouteMiss::MethodNotAllowed(vec!["POST"]))
        );
        for miss in [
            "",
            "/v1",
            "/v1/gateways//commands",
            "/v1/status/",
            "//",
            "/v1/disks/d/x",
        ] {
            assert_eq!(
                match_route("GET", miss).err(),
                Some(RouteMiss::NotFound),
                "{miss}"
            );
        }
    }

    #[test]
    fn every_route_is_unique_and_gateway_routes_start_with_the_gateway() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    (a.method, a.path) != (b.method, b.path),
                    "{} {}",
                    a.method,
                    a.path
                );
                assert_ne!(a.operation_id, b.operation_id);
            }
            if a.auth == Auth::Gateway {
                assert!(
                    a.path.starts_with("/v1/gateways/{gateway_id}/"),
                    "{}",
                    a.path
                );
            }
        }
    }
}
