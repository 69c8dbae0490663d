//! A local ECS endpoint (feature `testing`): it checks every request's signature V3 as the
//! cloud does and keeps disks, snapshots, images and instances with asynchronous state
//! transitions, so the client and the gateway's `aliyun` backend are tested without Alibaba.
//!
//! Authentication, in the cloud's order, each refusal with Alibaba's code:
//!
//! | check | refusal |
//! |---|---|
//! | `Authorization` parses, signs host, `x-acs-*` (all sent), content-type | 400 `IncompleteSignature` |
//! | the AccessKey id is known | 404 `InvalidAccessKeyId.NotFound` |
//! | STS key: `x-acs-security-token` present / equal | 400 `MissingSecurityToken` / `InvalidSecurityToken.MismatchWithAccessKey` |
//! | `x-acs-date` parses / within 15 min of now | 400 `InvalidTimeStamp.Format` / `InvalidTimeStamp.Expired` |
//! | `x-acs-content-sha256` is the body's SHA-256 | 400 `SignatureDoesNotMatch` |
//! | the recomputed signature is equal | 400 `SignatureDoesNotMatch` (message: the server's string to sign) |
//! | the nonce was not seen before | 400 `SignatureNonceUsed` |
//!
//! Then fault injection (`throttle`, `inject_fault`), then the action ([`model`]).
//!
//! Time runs for real: a resource reaches its next state `transition` after the call that
//! started it (default 200 ms), so clients must poll as they would in the cloud.

mod model;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::acs3;
use crate::credentials::Credentials;

pub use model::Fault;

/// The version the server speaks.
const VERSION: &str = "2014-05-26";

/// Largest request body accepted (RPC requests have none).
const MAX_BODY: usize = 1 << 20;

/// Nonces remembered; beyond this the oldest half is dropped (they are older than the date
/// window by then in any test).
const MAX_NONCES: usize = 100_000;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct EcsServerConfig {
    /// The region it serves (`RegionId` must match where given).
    pub region: String,
    /// Keys it accepts; those with a token are STS keys and require it.
    pub credentials: Vec<Credentials>,
    /// Time from `Creating`/`Attaching`/`progressing`/`Pending` to the next state.
    pub transition: Duration,
    /// Accepted distance of `x-acs-date` from the server's clock (the cloud's: 15 min).
    pub max_clock_skew: Duration,
}

impl EcsServerConfig {
    pub fn new(region: impl Into<String>, credentials: Vec<Credentials>) -> Self {
        Self {
            region: region.into(),
            credentials,
            transition: Duration::from_millis(200),
            max_clock_skew: Duration::from_secs(15 * 60),
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `x-acs-action` (empty when missing).
    pub action: String,
    /// Decoded query parameters.
    pub params: BTreeMap<String, String>,
    pub access_key_id: Option<String>,
    /// HTTP status answered.
    pub status: u16,
    /// Error code answered, `None` on success.
    pub error_code: Option<String>,
}

/// A running server; stops when dropped.
#[derive(Debug)]
pub struct EcsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    config: EcsServerConfig,
    state: Mutex<model::State>,
}

impl Drop for EcsServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl EcsServer {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(config: EcsServerConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(model::State::new(config.region.clone(), config.transition)),
            config,
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, std::convert::Infallible>(s.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn state(&self) -> std::sync::MutexGuard<'_, model::State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a `Running` instance (the gateway's own) that disks can be attached to.
    pub fn add_instance(&self, instance_id: &str, zone_id: &str) {
        self.state().add_running_instance(instance_id, zone_id);
    }

    /// Plays udev: disks attached from now on appear under `dir` as `virtio-SERIAL`.
    pub fn set_device_dir(&self, dir: &std::path::Path) {
        self.state().device_dir = Some(dir.to_path_buf());
    }

    /// The next `n` images made by CreateImage end `CreateFailed` instead of `Available`.
    pub fn fail_next_images(&self, n: u32) {
        self.state().fail_images = n;
    }

    /// The next `n` imports (ImportImage) end `CreateFailed` instead of `Available`.
    pub fn fail_next_imports(&self, n: u32) {
        self.state().fail_imports = n;
    }

    /// The next `n` snapshots end `failed` instead of `accomplished`.
    pub fn fail_next_snapshots(&self, n: u32) {
        self.state().fail_snapshots = n;
    }

    /// Answers the next `n` calls of `action` with 400 `Throttling.User`.
    pub fn throttle(&self, action: &str, n: u32) {
        self.inject_fault(
            action,
            Fault {
                status: 400,
                code: "Throttling.User".into(),
                message: "Request was denied due to user flow control.".into(),
            },
            n,
        );
    }

    /// Answers the next `n` calls of `action` with `fault` (after authentication).
    pub fn inject_fault(&self, action: &str, fault: Fault, n: u32) {
        self.state().faults.insert(action.to_string(), (fault, n));
    }

    /// Moves the server's clock (to test `InvalidTimeStamp.Expired`).
    pub fn set_clock_offset(&self, offset: time::Duration) {
        self.state().clock_offset = offset;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// The requests of one action.
    pub fn requests_of(&self, action: &str) -> Vec<RecordedRequest> {
        self.state()
            .requests
            .iter()
            .filter(|r| r.action == action)
            .cloned()
            .collect()
    }

    /// The status of a disk, snapshot, image or instance by id, as Describe would show it now.
    pub fn status_of(&self, id: &str) -> Option<String> {
        self.state().status_of(id)
    }

    /// How many disks, snapshots, images and instances exist.
    pub fn counts(&self) -> model::Counts {
        self.state().counts()
    }
}

impl Shared {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return reply(model::Reply::error(
                    413,
                    "RequestTooLarge",
                    "body too large",
                ));
            }
        };
        let params = decode_query(parts.uri.query().unwrap_or(""));
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        for (name, value) in &parts.headers {
            headers
                .entry(name.as_str().to_ascii_lowercase())
                .or_default()
                .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
        let action = first(&headers, acs3::header::ACTION).unwrap_or_default();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (access_key_id, answer) =
            match self.authenticate(&mut state, parts.method.as_str(), &params, &headers, &body) {
                Err((ak, e)) => (ak, e),
                Ok(ak) => (Some(ak), self.dispatch(&mut state, &action, &params)),
            };
        state.requests.push(RecordedRequest {
            action,
            params: params.iter().cloned().collect(),
            access_key_id,
            status: answer.status,
            error_code: answer.code.clone(),
        });
        drop(state);
        reply(answer)
    }

    fn dispatch(
        &self,
        state: &mut model::State,
        action: &str,
        params: &[(String, String)],
    ) -> model::Reply {
        if let Some((fault, left)) = state.faults.get_mut(action) {
            if *left > 0 {
                *left -= 1;
                return model::Reply::error(fault.status, &fault.code, &fault.message);
            }
        }
        let params: BTreeMap<String, String> = params.iter().cloned().collect();
        state.handle(action, &params)
    }

    /// The access key of a request whose signature is right, or the refusal.
    #[allow(clippy::result_large_err)]
    fn authenticate(
        &self,
        state: &mut model::State,
        method: &str,
        params: &[(String, String)],
        headers: &HashMap<String, Vec<String>>,
        body: &[u8],
    ) -> Result<String, (Option<String>, model::Reply)> {
        use model::Reply;
        let refuse = |status, code: &str, msg: &str| (None, Reply::error(status, code, msg));
        let auth = first(headers, "authorization")
            .ok_or_else(|| refuse(400, "IncompleteSignature", "no Authorization header"))?;
        let auth = acs3::parse_authorization(&auth)
            .map_err(|e| refuse(400, "IncompleteSignature", &e.to_string()))?;
        let ak = Some(auth.access_key_id.clone());
        let refuse = |status, code: &str, msg: &str| (ak.clone(), Reply::error(status, code, msg));

        // Every x-acs-* header sent, host and content-type must be signed.
        for name in headers.keys() {
            let must = name == "host" || name == "content-type" || name.starts_with("x-acs-");
            if must && !auth.signed_headers.iter().any(|s| s == name) {
                return Err(refuse(
                    400,
                    "IncompleteSignature",
                    &format!("header {name} is not signed"),
                ));
            }
        }
        for name in [
            "host",
            acs3::header::ACTION,
            acs3::header::VERSION,
            acs3::header::DATE,
            acs3::header::NONCE,
            acs3::header::CONTENT_SHA256,
        ] {
            if first(headers, name).is_none() {
                return Err(refuse(
                    400,
                    "IncompleteSignature",
                    &format!("header {name} is missing"),
                ));
            }
        }
        if first(headers, acs3::header::VERSION).as_deref() != Some(VERSION) {
            return Err(refuse(
                400,
                "InvalidVersion",
                "the specified version is not supported",
            ));
        }

        let known = self
            .config
            .credentials
            .iter()
            .find(|c| c.access_key_id == auth.access_key_id)
            .ok_or_else(|| {
                refuse(
                    404,
                    "InvalidAccessKeyId.NotFound",
                    "Specified access key is not found.",
                )
            })?;
        let sent_token = first(headers, acs3::header::SECURITY_TOKEN);
        match (&known.security_token, &sent_token) {
            (Some(_), None) => {
                return Err(refuse(
                    400,
                    "MissingSecurityToken",
                    "SecurityToken is mandatory for this action.",
                ))
            }
            (Some(want), Some(got)) if want != got => {
                return Err(refuse(
                    400,
                    "InvalidSecurityToken.MismatchWithAccessKey",
                    "The SecurityToken does not match the AccessKeyId.",
                ))
            }
            (None, Some(_)) => {
                return Err(refuse(
                    400,
                    "InvalidSecurityToken.Malformed",
                    "The SecurityToken is malformed.",
                ))
            }
            _ => {}
        }

        let date = first(headers, acs3::header::DATE).unwrap_or_default();
        let sent_at = acs3::parse_date(&date).ok_or_else(|| {
            refuse(
                400,
                "InvalidTimeStamp.Format",
                "The x-acs-date is not in yyyy-MM-ddTHH:mm:ssZ.",
            )
        })?;
        let now = time::OffsetDateTime::now_utc() + state.clock_offset;
        if (now - sent_at).unsigned_abs() > self.config.max_clock_skew {
            return Err(refuse(
                400,
                "InvalidTimeStamp.Expired",
                &format!(
                    "Specified time stamp or date value is expired: {date}, server time {}.",
                    acs3::format_date(now)
                ),
            ));
        }

        let payload = acs3::sha256_hex(body);
        if first(headers, acs3::header::CONTENT_SHA256).as_deref() != Some(payload.as_str()) {
            return Err(refuse(
                400,
                "SignatureDoesNotMatch",
                "x-acs-content-sha256 is not the SHA-256 of the body.",
            ));
        }
        let mut signed = Vec::new();
        for name in &auth.signed_headers {
            let values = headers.get(name).ok_or_else(|| {
                refuse(
                    400,
                    "IncompleteSignature",
                    &format!("signed header {name} is missing"),
                )
            })?;
            for v in values {
                signed.push((name.clone(), v.clone()));
            }
        }
        let expected = acs3::sign_with(
            &acs3::SigningInput {
                method,
                canonical_uri: "/",
                query: params,
                headers: &signed,
                payload_sha256: &payload,
            },
            known,
        );
        if !acs3::signatures_equal(&expected.signature, &auth.signature) {
            return Err(refuse(
                400,
                "SignatureDoesNotMatch",
                &format!(
                    "Specified signature is not matched with our calculation. server string to sign is:{}",
                    expected.string_to_sign
                ),
            ));
        }

        let nonce = first(headers, acs3::header::NONCE).unwrap_or_default();
        if state.nonces.contains_key(&nonce) {
            return Err(refuse(
                400,
                "SignatureNonceUsed",
                "Specified signature nonce was used already.",
            ));
        }
        if state.nonces.len() >= MAX_NONCES {
            let mut by_age: Vec<_> = state.nonces.iter().map(|(k, t)| (*t, k.clone())).collect();
            by_age.sort();
            for (_, k) in by_age.into_iter().take(MAX_NONCES / 2) {
                state.nonces.remove(&k);
            }
        }
        state.nonces.insert(nonce, sent_at);
        Ok(auth.access_key_id)
    }
}

fn first(headers: &HashMap<String, Vec<String>>, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.first()).cloned()
}

/// Decodes a query string as a server does: `+` is a space, then percent-decoding.
pub fn decode_query(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_encoding::percent_decode_str(&s)
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn reply(r: model::Reply) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&r.body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json;charset=utf-8"),
    );
    resp
}
