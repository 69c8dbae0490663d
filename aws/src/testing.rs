//! A fake IMDSv2 server on loopback for tests (feature `testing`). It behaves like the real
//! one where our client depends on it: a PUT of `/latest/api/token` with a TTL header issues a
//! token, and every GET without a valid `X-aws-ec2-metadata-token` gets 401.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the fake IMDS serves.
#[derive(Debug, Clone)]
pub struct FakeImdsConfig {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    pub account_id: String,
    /// Role name under `iam/security-credentials/`; `None`: no instance profile.
    pub role: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// RFC 3339, e.g. `2099-01-01T00:00:00Z`.
    pub expiration: String,
    /// What `instance-identity/signature` returns (tests compare it verbatim).
    pub signature: String,
}

impl Default for FakeImdsConfig {
    fn default() -> Self {
        Self {
            instance_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            account_id: "123456789012".into(),
            role: Some("sync-gateway-role".into()),
            access_key_id: "ASIAFAKEIMDSKEY".into(),
            secret_access_key: "fake-imds-secret".into(),
            session_token: "fake-imds-session-token".into(),
            expiration: "2099-01-01T00:00:00Z".into(),
            signature: "ZmFrZS1zaWduYXR1cmU=".into(),
        }
    }
}

/// Counters a test can assert on.
#[derive(Debug, Default)]
pub struct FakeImdsStats {
    /// Tokens issued.
    pub tokens_issued: AtomicU64,
    /// GETs answered 200.
    pub gets_served: AtomicU64,
    /// Requests refused with 401 (no or unknown token).
    pub unauthorized: AtomicU64,
}

/// A running fake IMDS; stops when dropped.
#[derive(Debug)]
pub struct FakeImds {
    addr: SocketAddr,
    stats: Arc<FakeImdsStats>,
    task: JoinHandle<()>,
}

struct State {
    config: FakeImdsConfig,
    tokens: Mutex<HashSet<String>>,
    stats: Arc<FakeImdsStats>,
}

impl FakeImds {
    /// Starts serving `config` on `127.0.0.1:<free port>`.
    pub async fn start(config: FakeImdsConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(FakeImdsStats::default());
        let state = Arc::new(State {
            config,
            tokens: Mutex::new(HashSet::new()),
            stats: stats.clone(),
        });
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, stats, task })
    }

    /// Base URL for [`crate::AwsSettings::imds_endpoint`].
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request counters.
    pub fn stats(&self) -> &FakeImdsStats {
        &self.stats
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

impl State {
    fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        if req.method() == Method::PUT && path == "/latest/api/token" {
            // Real IMDS: 400 without a TTL header (1..=21600).
            let ttl_ok = req
                .headers()
                .get("x-aws-ec2-metadata-token-ttl-seconds")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|t| (1..=21_600).contains(&t));
            if !ttl_ok {
                return reply(StatusCode::BAD_REQUEST, "missing or bad TTL header");
            }
            let token: String = format!("{:032x}", rand::thread_rng().gen::<u128>());
            self.tokens
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(token.clone());
            self.stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
            return reply(StatusCode::OK, token);
        }
        if req.method() != Method::GET {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "");
        }
        let token_ok = req
            .headers()
            .get("x-aws-ec2-metadata-token")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| {
                self.tokens
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(t)
            });
        if !token_ok {
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            return reply(StatusCode::UNAUTHORIZED, "");
        }
        match self.item(&path) {
            Some(body) => {
                self.stats.gets_served.fetch_add(1, Ordering::Relaxed);
                reply(StatusCode::OK, body)
            }
            None => reply(StatusCode::NOT_FOUND, ""),
        }
    }

    fn item(&self, path: &str) -> Option<String> {
        let c = &self.config;
        let creds_prefix = "/latest/meta-data/iam/security-credentials/";
        Some(match path {
            "/latest/meta-data/instance-id" => c.instance_id.clone(),
            "/latest/meta-data/placement/region" => c.region.clone(),
            "/latest/meta-data/placement/availability-zone" => c.availability_zone.clone(),
            "/latest/dynamic/instance-identity/document" => serde_json::json!({
                "accountId": c.account_id,
                "architecture": "x86_64",
                "availabilityZone": c.availability_zone,
                "imageId": "ami-0fakeimds000000",
                "instanceId": c.instance_id,
                "instanceType": "m5.large",
                "pendingTime": "2026-01-01T00:00:00Z",
                "privateIp": "10.0.0.10",
                "region": c.region,
                "version": "2017-09-30",
            })
            .to_string(),
            "/latest/dynamic/instance-identity/signature" => c.signature.clone(),
            p if p == creds_prefix => c.role.clone()?,
            p if p.strip_prefix(creds_prefix) == c.role.as_deref() => serde_json::json!({
                "Code": "Success",
                "LastUpdated": "2026-01-01T00:00:00Z",
                "Type": "AWS-HMAC",
                "AccessKeyId": c.access_key_id,
                "SecretAccessKey": c.secret_access_key,
                "Token": c.session_token,
                "Expiration": c.expiration,
            })
            .to_string(),
            _ => return None,
        })
    }
}
