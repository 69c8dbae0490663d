//! A fake ECS instance metadata service in hardened-only mode, on loopback (feature `testing`).
//!
//! It behaves like the real one where a client depends on it (see `crate::meta` for the
//! exchange): `PUT /latest/api/token` needs `X-aliyun-ecs-metadata-token-ttl-seconds` in
//! 1..=21600 (400 otherwise) and issues a token that lives that long; a GET without a token is
//! refused with 403 (hardened-only mode), with an unknown or expired token with 401; a request
//! carrying `X-Forwarded-For` gets 403. Tests set what it serves, including the credentials'
//! `Expiration` (to make them expire soon), count what it did, and can make the next N
//! requests fail with 500.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use rand::Rng;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::meta::{MAX_TOKEN_TTL_SECS, TOKEN_HEADER, TOKEN_TTL_HEADER};

const ROLE_LISTING: &str = "/latest/meta-data/ram/security-credentials/";
const PKCS7: &str = "/latest/dynamic/instance-identity/pkcs7";

/// What the fake metadata service serves. Values are shaped like the real ones.
#[derive(Debug, Clone)]
pub struct FakeMetaConfig {
    pub instance_id: String,
    pub region_id: String,
    pub zone_id: String,
    pub owner_account_id: String,
    pub instance_type: String,
    pub image_id: String,
    pub serial_number: String,
    pub mac: String,
    pub private_ipv4: String,
    pub vswitch_id: String,
    /// What `instance-identity/pkcs7` returns (tests compare it verbatim).
    pub pkcs7: String,
    /// The attached RAM role; `None`: no role (the listing answers 404).
    pub role: Option<String>,
    pub access_key_id: String,
    pub access_key_secret: String,
    pub security_token: String,
    /// Served as `Expiration`, RFC 3339 in UTC; whole seconds print as the real service does,
    /// a fraction is kept (so a test can expire credentials in milliseconds).
    pub expiration: OffsetDateTime,
}

impl Default for FakeMetaConfig {
    fn default() -> Self {
        Self {
            instance_id: "i-bp13znx0m0me8cquu0fake".into(),
            region_id: "cn-hangzhou".into(),
            zone_id: "cn-hangzhou-i".into(),
            owner_account_id: "1609000000000000".into(),
            instance_type: "ecs.g7.large".into(),
            image_id: "aliyun_3_x64_20G_alibase_20250629.vhd".into(),
            serial_number: "4acd2b47-b328-4762-852f-998000000000".into(),
            mac: "00:16:3e:0f:00:01".into(),
            private_ipv4: "192.168.0.10".into(),
            vswitch_id: "vsw-bp1fakegatewayvswitch0".into(),
            pkcs7: "MIIDJwYJKoZIhvcNAQcCoIIDGDCCAxQCAQExCzAJBgUrDgMCGgUAMFakepkcs7".into(),
            role: Some("sync-gateway-role".into()),
            access_key_id: "STS.NUfakeMetaAccessKeyId".into(),
            access_key_secret: "fake-meta-access-key-secret".into(),
            security_token: "CAIS-fake-meta-security-token".into(),
            expiration: in_whole_seconds(Duration::from_secs(6 * 3600)),
        }
    }
}

/// Now plus `d`, in UTC, truncated to whole seconds like the real service's timestamps.
pub fn in_whole_seconds(d: Duration) -> OffsetDateTime {
    let t = OffsetDateTime::now_utc() + d;
    t.replace_nanosecond(0).unwrap_or(t)
}

/// What the fake did, for assertions.
#[derive(Debug, Default)]
pub struct FakeMetaStats {
    tokens_issued: AtomicU64,
    gets_served: AtomicU64,
    credential_fetches: AtomicU64,
    unauthorized: AtomicU64,
    forbidden: AtomicU64,
    injected_failures: AtomicU64,
}

impl FakeMetaStats {
    /// Tokens issued by `PUT /latest/api/token`.
    pub fn tokens_issued(&self) -> u64 {
        self.tokens_issued.load(Ordering::SeqCst)
    }
    /// GETs answered 200.
    pub fn gets_served(&self) -> u64 {
        self.gets_served.load(Ordering::SeqCst)
    }
    /// GETs of a role's credentials answered 200.
    pub fn credential_fetches(&self) -> u64 {
        self.credential_fetches.load(Ordering::SeqCst)
    }
    /// GETs refused with 401 (unknown or expired token).
    pub fn unauthorized(&self) -> u64 {
        self.unauthorized.load(Ordering::SeqCst)
    }
    /// Requests refused with 403 (no token, or `X-Forwarded-For`).
    pub fn forbidden(&self) -> u64 {
        self.forbidden.load(Ordering::SeqCst)
    }
    /// Requests failed with 500 on the test's demand.
    pub fn injected_failures(&self) -> u64 {
        self.injected_failures.load(Ordering::SeqCst)
    }
}

/// A running fake metadata service; stops when dropped.
#[derive(Debug)]
pub struct FakeMetaServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    config: Mutex<FakeMetaConfig>,
    /// Token -> when it stops being accepted.
    tokens: Mutex<HashMap<String, Instant>>,
    fail_next: AtomicU64,
    last_audience: Mutex<Option<String>>,
    /// How long a credentials GET takes to answer.
    credentials_delay: Mutex<Duration>,
    stats: FakeMetaStats,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeMetaServer {
    /// Starts serving `config` on `127.0.0.1:<free port>`.
    pub async fn start(config: FakeMetaConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config: Mutex::new(config),
            tokens: Mutex::new(HashMap::new()),
            fail_next: AtomicU64::new(0),
            last_audience: Mutex::new(None),
            credentials_delay: Mutex::new(Duration::ZERO),
            stats: FakeMetaStats::default(),
        });
        let served = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = served.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            let delay = state.delay_for(req.uri().path());
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, Infallible>(state.answer(&req))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// Base URL for `InstanceMetadata::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters.
    pub fn stats(&self) -> &FakeMetaStats {
        &self.state.stats
    }

    /// Attaches a role (`Some`) or detaches it (`None`).
    pub fn set_role(&self, role: Option<&str>) {
        locked(&self.state.config).role = role.map(str::to_owned);
    }

    /// Rotates the role's credentials, as the real service does before they expire.
    pub fn set_credentials(&self, id: &str, secret: &str, token: &str, expiration: OffsetDateTime) {
        let mut c = locked(&self.state.config);
        c.access_key_id = id.into();
        c.access_key_secret = secret.into();
        c.security_token = token.into();
        c.expiration = expiration;
    }

    /// Changes only the served `Expiration`.
    pub fn set_expiration(&self, expiration: OffsetDateTime) {
        locked(&self.state.config).expiration = expiration;
    }

    /// Makes every credentials GET take `delay` before it is answered (a slow refresh).
    pub fn set_credentials_delay(&self, delay: Duration) {
        *locked(&self.state.credentials_delay) = delay;
    }

    /// The next `n` requests, of any kind, get 500 (replaces any earlier count; 0 clears).
    pub fn fail_next(&self, n: u64) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }

    /// Forgets every issued token, as a restarted service would: the next GET gets 401.
    pub fn revoke_tokens(&self) {
        locked(&self.state.tokens).clear();
    }

    /// The `audience` of the last `instance-identity/pkcs7` request, decoded.
    pub fn last_audience(&self) -> Option<String> {
        locked(&self.state.last_audience).clone()
    }
}

impl Drop for FakeMetaServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

impl State {
    fn delay_for(&self, path: &str) -> Duration {
        match path.strip_prefix(ROLE_LISTING) {
            Some(role) if !role.is_empty() => *locked(&self.credentials_delay),
            _ => Duration::ZERO,
        }
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let took_failure = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if took_failure {
            self.stats.injected_failures.fetch_add(1, Ordering::SeqCst);
            return reply(StatusCode::INTERNAL_SERVER_ERROR, "injected failure");
        }
        if req.headers().contains_key("x-forwarded-for") {
            self.stats.forbidden.fetch_add(1, Ordering::SeqCst);
            return reply(StatusCode::FORBIDDEN, "Forbidden");
        }
        let path = req.uri().path();
        if path == "/latest/api/token" {
            return if req.method() == Method::PUT {
                self.issue_token(req)
            } else {
                reply(StatusCode::METHOD_NOT_ALLOWED, "")
            };
        }
        if req.method() != Method::GET {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "");
        }
        let Some(token) = req.headers().get(TOKEN_HEADER) else {
            // Hardened-only mode: normal-mode (token-less) access is forbidden.
            self.stats.forbidden.fetch_add(1, Ordering::SeqCst);
            return reply(StatusCode::FORBIDDEN, "Forbidden");
        };
        let valid = token.to_str().ok().is_some_and(|t| {
            locked(&self.tokens)
                .get(t)
                .is_some_and(|until| Instant::now() < *until)
        });
        if !valid {
            self.stats.unauthorized.fetch_add(1, Ordering::SeqCst);
            return reply(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        if path == PKCS7 {
            *locked(&self.last_audience) = audience(req.uri().query());
        }
        match self.item(path) {
            Some(body) => {
                self.stats.gets_served.fetch_add(1, Ordering::SeqCst);
                reply(StatusCode::OK, body)
            }
            None => reply(StatusCode::NOT_FOUND, "Not Found"),
        }
    }

    fn issue_token(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let ttl = req
            .headers()
            .get(TOKEN_TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|t| (1..=MAX_TOKEN_TTL_SECS).contains(t));
        let Some(ttl) = ttl else {
            return reply(StatusCode::BAD_REQUEST, "Missing or Invalid Parameters");
        };
        let token = format!("AQAEA{:032x}", rand::thread_rng().gen::<u128>());
        let now = Instant::now();
        let mut tokens = locked(&self.tokens);
        tokens.retain(|_, until| now < *until);
        tokens.insert(token.clone(), now + Duration::from_secs(ttl.into()));
        self.stats.tokens_issued.fetch_add(1, Ordering::SeqCst);
        reply(StatusCode::OK, token)
    }

    fn item(&self, path: &str) -> Option<String> {
        let c = locked(&self.config);
        Some(match path {
            "/latest/meta-data/instance-id" => c.instance_id.clone(),
            "/latest/meta-data/region-id" => c.region_id.clone(),
            "/latest/meta-data/zone-id" => c.zone_id.clone(),
            "/latest/meta-data/vswitch-id" => c.vswitch_id.clone(),
            "/latest/dynamic/instance-identity/document" => serde_json::json!({
                "zone-id": c.zone_id,
                "serial-number": c.serial_number,
                "instance-id": c.instance_id,
                "region-id": c.region_id,
                "private-ipv4": c.private_ipv4,
                "owner-account-id": c.owner_account_id,
                "mac": c.mac,
                "image-id": c.image_id,
                "instance-type": c.instance_type,
            })
            .to_string(),
            PKCS7 => c.pkcs7.clone(),
            ROLE_LISTING => c.role.clone()?,
            p if p.strip_prefix(ROLE_LISTING) == c.role.as_deref() => {
                self.stats.credential_fetches.fetch_add(1, Ordering::SeqCst);
                serde_json::json!({
                    "AccessKeyId": c.access_key_id,
                    "AccessKeySecret": c.access_key_secret,
                    "Expiration": rfc3339(c.expiration),
                    "SecurityToken": c.security_token,
                    "LastUpdated": rfc3339(in_whole_seconds(Duration::ZERO)),
                    "Code": "Success",
                })
                .to_string()
            }
            _ => return None,
        })
    }
}

/// The decoded `audience` parameter of a query string (form decoding: `+` is a space).
fn audience(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let value = pair.strip_prefix("audience=")?.replace('+', " ");
        Some(percent_decode_str(&value).decode_utf8_lossy().into_owned())
    })
}
