//! Client of the ECS instance metadata service in security hardening mode: who and where the
//! gateway's instance is, its identity document and PKCS#7 signature (which registration with
//! the control plane carries), and the STS credentials of the RAM role attached to it.
//!
//! ```text
//!   PUT /latest/api/token     X-aliyun-ecs-metadata-token-ttl-seconds: 1..=21600
//!     -> 200 token (opaque text)
//!      | 400 TTL header missing or out of range
//!      | 403 X-Forwarded-For present (the service refuses proxied requests)
//!   GET /latest/<item>        X-aliyun-ecs-metadata-token: <token>
//!     -> 200 text or JSON
//!      | 401 token invalid or expired        (we take a fresh token once and retry)
//!      | 403 no token, instance in hardened-only mode
//!      | 404 no such item                    (e.g. no RAM role attached)
//! ```
//!
//! | item under `/latest/` | answer |
//! |---|---|
//! | `meta-data/instance-id` | `i-bp1…` |
//! | `meta-data/region-id` | `cn-hangzhou` |
//! | `meta-data/zone-id` | `cn-hangzhou-i` |
//! | `dynamic/instance-identity/document` | JSON: `instance-id`, `region-id`, `zone-id`, `owner-account-id`, … |
//! | `dynamic/instance-identity/pkcs7[?audience=…]` | PKCS#7 signature over the document (and the audience) |
//! | `meta-data/ram/security-credentials/` | the attached RAM role's name; 404 when none |
//! | `meta-data/ram/security-credentials/<role>` | JSON: `AccessKeyId`, `AccessKeySecret`, `SecurityToken`, `Expiration` (UTC, ISO 8601), `LastUpdated`, `Code` = `Success` |
//!
//! Plain HTTP to the link-local `100.100.100.200`: no TLS and no proxy. Every request has a
//! short timeout and a few retries, because the service answers in milliseconds or not at all
//! (throttled, or not on ECS). The endpoint is configurable; tests use the fake in
//! `testing::meta_server` and never the real address.
//!
//! [`RamRoleCredentialsProvider`] (in `role_provider.rs`) turns the role's credentials into the
//! crate's [`crate::credentials::CredentialsProvider`]: cached, refreshed 15 minutes before
//! `Expiration`, and kept in service through a failed refresh while they last.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::Credentials;

mod role_provider;

pub use role_provider::{RamRoleCredentialsProvider, RefreshPolicy};

/// The metadata service as seen from inside an ECS instance.
pub const DEFAULT_ENDPOINT: &str = "http://100.100.100.200";
/// Request header of `PUT /latest/api/token`: the token's lifetime in seconds.
pub const TOKEN_TTL_HEADER: &str = "x-aliyun-ecs-metadata-token-ttl-seconds";
/// Request header of every GET: the session token.
pub const TOKEN_HEADER: &str = "x-aliyun-ecs-metadata-token";
/// Longest token lifetime the service grants (6 h); it answers 400 above it.
pub const MAX_TOKEN_TTL_SECS: u32 = 21_600;

/// A token is replaced this long before it ends (or at 3/4 of a shorter TTL), so no GET races
/// its expiry.
const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(300);
/// The service is on the hypervisor: a connection either opens at once or never; Alibaba's own
/// credentials SDKs also use 1 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Whole exchange, connect included: answers take milliseconds; 2 s tolerates a busy host.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per request: the service throttles bursts and a lost packet costs a timeout;
/// three attempts keep the worst case (three timeouts) near 6 s.
const ATTEMPTS: u32 = 3;
/// Pause between attempts: long enough for the per-instance rate limit to recover.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Largest body accepted: documents and credentials are well under 4 KiB.
const MAX_BODY: usize = 64 * 1024;
/// How much of an error answer goes into the error message.
const MAX_ERROR_SNIPPET: usize = 200;

const TOKEN_PATH: &str = "/latest/api/token";
const ROLE_LISTING: &str = "meta-data/ram/security-credentials/";

/// RFC 3986 unreserved characters stay as they are in the `audience` query value; everything
/// else, space included, is percent-encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What went wrong talking to the metadata service. Each variant names the HTTP method and the
/// path; [`MetaError::is_retryable`] tells passing trouble from a permanent answer.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata endpoint {endpoint:?} is not usable: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("metadata option {option}: {reason}")]
    BadOption {
        option: &'static str,
        reason: String,
    },
    #[error("metadata {method} {path}: no answer within {timeout:?} ({attempts} attempts)")]
    Timeout {
        method: Method,
        path: String,
        timeout: Duration,
        attempts: u32,
    },
    #[error("metadata {method} {path}: connection failed ({attempts} attempts)")]
    Transport {
        method: Method,
        path: String,
        attempts: u32,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("metadata {method} {path}: HTTP {status} ({attempts} attempts){}", snippet_suffix(.body))]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        attempts: u32,
        /// The start of the answer's body, for the operator.
        body: String,
    },
    #[error("metadata GET {path}: no RAM role is attached to this instance")]
    NoRole { path: String },
    #[error("metadata {method} {path}: {reason}")]
    Invalid {
        method: Method,
        path: String,
        reason: String,
    },
}

fn snippet_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl MetaError {
    /// Whether trying again later may succeed: timeouts, failed connections, throttling and
    /// server errors. A 4xx answer, a missing role or a malformed document will not change.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::BadEndpoint { .. }
            | Self::BadOption { .. }
            | Self::NoRole { .. }
            | Self::Invalid { .. } => false,
        }
    }

    /// The HTTP status the service answered, if it answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn after_attempts(mut self, n: u32) -> Self {
        match &mut self {
            Self::Timeout { attempts, .. }
            | Self::Transport { attempts, .. }
            | Self::Status { attempts, .. } => *attempts = n,
            _ => {}
        }
        self
    }
}

/// How to reach the metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaOptions {
    /// Base URL, `http://HOST[:PORT]`. Default [`DEFAULT_ENDPOINT`].
    pub endpoint: String,
    /// Lifetime asked for each session token, 1..=21600 s. Default 21600: one token serves
    /// for hours, so the PUT is rare.
    pub token_ttl_secs: u32,
}

impl Default for MetaOptions {
    fn default() -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.into(),
            token_ttl_secs: MAX_TOKEN_TTL_SECS,
        }
    }
}

/// The instance identity document, raw as served (its PKCS#7 signature covers these exact
/// bytes) and the fields the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityDocument {
    /// The document exactly as the service served it.
    pub raw: String,
    pub instance_id: String,
    pub region_id: String,
    pub zone_id: String,
    /// `owner-account-id` (older documents: `account-id`).
    pub owner_account_id: Option<String>,
    pub instance_type: Option<String>,
    pub image_id: Option<String>,
    pub serial_number: Option<String>,
    pub mac: Option<String>,
    /// `private-ipv4` (older documents: `private-ip`).
    pub private_ipv4: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct IdentityFields {
    instance_id: String,
    region_id: String,
    zone_id: String,
    owner_account_id: Option<String>,
    account_id: Option<String>,
    instance_type: Option<String>,
    image_id: Option<String>,
    serial_number: Option<String>,
    mac: Option<String>,
    private_ipv4: Option<String>,
    private_ip: Option<String>,
}

/// A RAM role's STS credentials as the metadata service hands them out. `Debug` shows the role,
/// the key id and the expiry, never the secret or the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub role: String,
    pub credentials: Credentials,
    /// When the service stops honouring them (`Expiration`).
    pub expiration: SystemTime,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsFields {
    code: Option<String>,
    access_key_id: Option<String>,
    access_key_secret: Option<String>,
    security_token: Option<String>,
    expiration: Option<String>,
}

/// A client of the metadata service in hardened mode. Cheap to clone; clones share the session
/// token.
#[derive(Clone)]
pub struct InstanceMetadata {
    inner: Arc<Inner>,
}

struct Inner {
    base: String,
    token_ttl_secs: u32,
    client: Client<HttpConnector, Full<Bytes>>,
    token: Mutex<Option<SessionToken>>,
}

struct SessionToken {
    value: String,
    renew_at: Instant,
}

/// The session token is never printed.
impl fmt::Debug for InstanceMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceMetadata")
            .field("endpoint", &self.inner.base)
            .field("token_ttl_secs", &self.inner.token_ttl_secs)
            .finish_non_exhaustive()
    }
}

impl InstanceMetadata {
    /// A client for the service at `endpoint` (`http://100.100.100.200` on ECS) with 6-hour
    /// tokens. Nothing is contacted until a method is called.
    pub fn new(endpoint: &str) -> Result<Self, MetaError> {
        Self::with_options(MetaOptions {
            endpoint: endpoint.into(),
            ..MetaOptions::default()
        })
    }

    /// A client with explicit options; checks them, contacts nothing.
    pub fn with_options(options: MetaOptions) -> Result<Self, MetaError> {
        let endpoint = options.endpoint.as_str();
        let bad = |reason: &str| MetaError::BadEndpoint {
            endpoint: endpoint.into(),
            reason: reason.into(),
        };
        let uri: Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(bad(
                "the metadata service speaks plain http: expected http://HOST[:PORT]",
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("expected http://HOST[:PORT] without a path"));
        }
        if !(1..=MAX_TOKEN_TTL_SECS).contains(&options.token_ttl_secs) {
            return Err(MetaError::BadOption {
                option: "token_ttl_secs",
                reason: format!(
                    "{} is outside 1..={MAX_TOKEN_TTL_SECS}",
                    options.token_ttl_secs
                ),
            });
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            inner: Arc::new(Inner {
                base: endpoint.trim_end_matches('/').to_owned(),
                token_ttl_secs: options.token_ttl_secs,
                client,
                token: Mutex::new(None),
            }),
        })
    }

    /// The base URL this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.inner.base
    }

    /// `GET /latest/<item>` with the session token, e.g. `item` = `meta-data/hostname`. A 401
    /// (token expired, or the service restarted) costs one fresh token and one more try.
    pub async fn get(&self, item: &str) -> Result<String, MetaError> {
        let path = format!("/latest/{}", item.trim_start_matches('/'));
        let token = self.token(false).await?;
        match self.request(&Method::GET, &path, Some(&token)).await {
            Err(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => {
                tracing::debug!(path, "metadata token refused, taking a new one");
                let token = self.token(true).await?;
                self.request(&Method::GET, &path, Some(&token)).await
            }
            other => other,
        }
    }

    /// The instance id, `i-…`.
    pub async fn instance_id(&self) -> Result<String, MetaError> {
        self.get_line("meta-data/instance-id").await
    }

    /// The region, e.g. `cn-hangzhou`.
    pub async fn region_id(&self) -> Result<String, MetaError> {
        self.get_line("meta-data/region-id").await
    }

    /// The zone, e.g. `cn-hangzhou-i`.
    pub async fn zone_id(&self) -> Result<String, MetaError> {
        self.get_line("meta-data/zone-id").await
    }

    /// The vSwitch of the instance's primary network interface, `vsw-…`.
    pub async fn vswitch_id(&self) -> Result<String, MetaError> {
        self.get_line("meta-data/vswitch-id").await
    }

    /// The instance identity document.
    pub async fn identity_document(&self) -> Result<IdentityDocument, MetaError> {
        let item = "dynamic/instance-identity/document";
        let raw = self.get(item).await?;
        parse_identity_document(raw).map_err(|reason| MetaError::Invalid {
            method: Method::GET,
            path: format!("/latest/{item}"),
            reason,
        })
    }

    /// The PKCS#7 signature over the identity document, which the control plane verifies with
    /// Alibaba's public certificate. `audience` (a nonce or challenge from the verifier) is
    /// signed along with the document so a captured signature cannot be replayed elsewhere.
    pub async fn identity_signature(&self, audience: Option<&str>) -> Result<String, MetaError> {
        let item = match audience.filter(|a| !a.is_empty()) {
            None => "dynamic/instance-identity/pkcs7".to_owned(),
            Some(a) => format!(
                "dynamic/instance-identity/pkcs7?audience={}",
                utf8_percent_encode(a, QUERY_VALUE)
            ),
        };
        self.get_line(&item).await
    }

    /// The name of the RAM role attached to the instance; [`MetaError::NoRole`] when none is.
    pub async fn role_name(&self) -> Result<String, MetaError> {
        let path = format!("/latest/{ROLE_LISTING}");
        let listing = match self.get(ROLE_LISTING).await {
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                return Err(MetaError::NoRole { path })
            }
            other => other?,
        };
        listing
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
            .ok_or(MetaError::NoRole { path })
    }

    /// The attached role's current STS credentials (the role found by [`Self::role_name`]).
    pub async fn role_credentials(&self) -> Result<RoleCredentials, MetaError> {
        let role = self.role_name().await?;
        self.role_credentials_for(&role).await
    }

    /// The STS credentials of the named role.
    pub async fn role_credentials_for(&self, role: &str) -> Result<RoleCredentials, MetaError> {
        let invalid = |path: String, reason: String| MetaError::Invalid {
            method: Method::GET,
            path,
            reason,
        };
        if role.is_empty()
            || role.contains(['/', '?', '#', '%'])
            || role.contains(char::is_whitespace)
        {
            return Err(invalid(
                format!("/latest/{ROLE_LISTING}"),
                format!("{role:?} is not a RAM role name"),
            ));
        }
        let item = format!("{ROLE_LISTING}{role}");
        let body = match self.get(&item).await {
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                return Err(MetaError::NoRole {
                    path: format!("/latest/{item}"),
                })
            }
            other => other?,
        };
        parse_role_credentials(role, &body, SystemTime::now())
            .map_err(|reason| invalid(format!("/latest/{item}"), reason))
    }

    /// A provider of the attached role's credentials, cached and refreshed before they expire,
    /// with the default [`RefreshPolicy`].
    pub fn credentials_provider(&self) -> RamRoleCredentialsProvider {
        RamRoleCredentialsProvider::new(self.clone(), None, RefreshPolicy::default())
    }

    async fn get_line(&self, item: &str) -> Result<String, MetaError> {
        let value = self.get(item).await?;
        let value = value.trim();
        if value.is_empty() {
            return Err(MetaError::Invalid {
                method: Method::GET,
                path: format!("/latest/{item}"),
                reason: "empty answer".into(),
            });
        }
        Ok(value.to_owned())
    }

    async fn token(&self, force_new: bool) -> Result<String, MetaError> {
        let mut slot = self.inner.token.lock().await;
        if let Some(t) = slot.as_ref() {
            if !force_new && Instant::now() < t.renew_at {
                return Ok(t.value.clone());
            }
        }
        // Taken before the PUT: the service's TTL clock starts later than ours.
        let issued = Instant::now();
        let value = self.request(&Method::PUT, TOKEN_PATH, None).await?;
        let value = value.trim().to_owned();
        if value.is_empty() || value.contains(|c: char| c.is_control()) {
            return Err(MetaError::Invalid {
                method: Method::PUT,
                path: TOKEN_PATH.into(),
                reason: "empty or malformed token".into(),
            });
        }
        let ttl = Duration::from_secs(self.inner.token_ttl_secs.into());
        let renew_at = issued + ttl - TOKEN_RENEW_MARGIN.min(ttl / 4);
        *slot = Some(SessionToken {
            value: value.clone(),
            renew_at,
        });
        Ok(value)
    }

    /// One request with timeout and retries. `token`: the session token for GETs; `None`
    /// sends the token PUT's TTL header instead.
    async fn request(
        &self,
        method: &Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<String, MetaError> {
        let mut attempt = 1;
        loop {
            match self.request_once(method, path, token).await {
                Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                    tracing::debug!(%method, path, attempt, "metadata request failed, retrying: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.after_attempts(attempt)),
                Ok(body) => return Ok(body),
            }
        }
    }

    async fn request_once(
        &self,
        method: &Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<String, MetaError> {
        let invalid = |reason: String| MetaError::Invalid {
            method: method.clone(),
            path: path.into(),
            reason,
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.inner.base));
        req = match token {
            Some(t) => req.header(TOKEN_HEADER, t),
            None => req.header(TOKEN_TTL_HEADER, self.inner.token_ttl_secs.to_string()),
        };
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| invalid(format!("cannot build request: {e}")))?;
        let exchange = async {
            let resp = self
                .inner
                .client
                .request(req)
                .await
                .map_err(|e| MetaError::Transport {
                    method: method.clone(),
                    path: path.into(),
                    attempts: 1,
                    source: Box::new(e),
                })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| invalid(format!("reading the answer: {e}")))?
                .to_bytes();
            if !status.is_success() {
                return Err(MetaError::Status {
                    method: method.clone(),
                    path: path.into(),
                    status,
                    attempts: 1,
                    body: error_snippet(&body),
                });
            }
            String::from_utf8(body.to_vec()).map_err(|_| invalid("answer is not UTF-8".into()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(MetaError::Timeout {
                    method: method.clone(),
                    path: path.into(),
                    timeout: REQUEST_TIMEOUT,
                    attempts: 1,
                })
            })
    }
}

/// The start of an error answer, on one line, for an error message.
fn error_snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_SNIPPET)]);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

fn parse_identity_document(raw: String) -> Result<IdentityDocument, String> {
    let f: IdentityFields =
        serde_json::from_str(&raw).map_err(|e| format!("not an identity document: {e}"))?;
    for (name, value) in [
        ("instance-id", &f.instance_id),
        ("region-id", &f.region_id),
        ("zone-id", &f.zone_id),
    ] {
        if value.trim().is_empty() {
            return Err(format!("identity document has an empty {name}"));
        }
    }
    Ok(IdentityDocument {
        instance_id: f.instance_id,
        region_id: f.region_id,
        zone_id: f.zone_id,
        owner_account_id: f.owner_account_id.or(f.account_id),
        instance_type: f.instance_type,
        image_id: f.image_id,
        serial_number: f.serial_number,
        mac: f.mac,
        private_ipv4: f.private_ipv4.or(f.private_ip),
        raw,
    })
}

/// Parses a credentials document; `now` decides whether it is already expired. Error reasons
/// never quote the document: it holds the secret.
fn parse_role_credentials(
    role: &str,
    body: &str,
    now: SystemTime,
) -> Result<RoleCredentials, String> {
    let f: CredentialsFields = serde_json::from_str(body).map_err(|e| {
        format!(
            "not a credentials document ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    if let Some(code) = f.code.as_deref().filter(|c| *c != "Success") {
        return Err(format!("the service reports Code {code:?}"));
    }
    let field = |name: &str, v: Option<String>| {
        v.filter(|s| !s.trim().is_empty())
            .ok_or_else(|| format!("credentials document lacks {name}"))
    };
    let access_key_id = field("AccessKeyId", f.access_key_id)?;
    let access_key_secret = field("AccessKeySecret", f.access_key_secret)?;
    let security_token = field("SecurityToken", f.security_token)?;
    let expiration_text = field("Expiration", f.expiration)?;
    let expiration = OffsetDateTime::parse(&expiration_text, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| format!("Expiration {expiration_text:?} is not an ISO 8601 UTC time"))?;
    if expiration <= now {
        return Err(format!(
            "the service handed out credentials that expired at {expiration_text}"
        ));
    }
    Ok(RoleCredentials {
        role: role.to_owned(),
        credentials: Credentials::new(access_key_id, access_key_secret, Some(security_token)),
        expiration,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_must_be_plain_http_without_path() {
        assert!(InstanceMetadata::new(DEFAULT_ENDPOINT).is_ok());
        assert!(InstanceMetadata::new("http://127.0.0.1:5001/").is_ok());
        for bad in [
            "https://100.100.100.200",
            "100.100.100.200",
            "http://100.100.100.200/latest",
            "not a url",
        ] {
            assert!(
                matches!(
                    InstanceMetadata::new(bad),
                    Err(MetaError::BadEndpoint { .. })
                ),
                "{bad}"
            );
        }
        for ttl in [0, MAX_TOKEN_TTL_SECS + 1] {
            let e = InstanceMetadata::with_options(MetaOptions {
                token_ttl_secs: ttl,
                ..MetaOptions::default()
            })
            .unwrap_err();
            assert!(matches!(e, MetaError::BadOption { .. }), "{e}");
        }
    }

    #[test]
    fn identity_document_old_and_new_field_names() {
        // Shape of a real document (values masked).
        let raw = r#"{"zone-id":"cn-zhangjiakou-a","serial-number":"8e794d59-a809","instance-id":"i-8vb8p62r","region-id":"cn-zhangjiakou","private-ipv4":"192.168.1.215","owner-account-id":"1335926999","mac":"00:16:3e:13:9a:81","image-id":"centos_7_8_x64_20G_alibase_20200914.vhd","instance-type":"ecs.s6-c1m1.small"}"#;
        let d = parse_identity_document(raw.into()).unwrap();
        assert_eq!(d.instance_id, "i-8vb8p62r");
        assert_eq!(d.region_id, "cn-zhangjiakou");
        assert_eq!(d.zone_id, "cn-zhangjiakou-a");
        assert_eq!(d.owner_account_id.as_deref(), Some("1335926999"));
        assert_eq!(d.private_ipv4.as_deref(), Some("192.168.1.215"));
        assert_eq!(d.raw, raw);
        let old = r#"{"account-id":"1","instance-id":"i-1","region-id":"r","zone-id":"z","private-ip":"10.0.0.1"}"#;
        let d = parse_identity_document(old.into()).unwrap();
        assert_eq!(d.owner_account_id.as_deref(), Some("1"));
        assert_eq!(d.private_ipv4.as_deref(), Some("10.0.0.1"));
        assert!(parse_identity_document(r#"{"instance-id":"i-1"}"#.into()).is_err());
        assert!(parse_identity_document(
            r#"{"instance-id":" ","region-id":"r","zone-id":"z"}"#.into()
        )
        .is_err());
    }

    fn at(text: &str) -> SystemTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap().into()
    }

    #[test]
    fn credentials_document() {
        let now = at("2024-11-08T03:44:50Z");
        let doc = |code: &str, exp: &str| {
            format!(
                r#"{{"AccessKeyId":"STS.id","AccessKeySecret":"s3cr3t","Expiration":"{exp}","SecurityToken":"tok3n","LastUpdated":"2024-11-08T03:44:50Z","Code":"{code}"}}"#
            )
        };
        let rc = parse_role_credentials("r", &doc("Success", "2024-11-08T09:44:50Z"), now).unwrap();
        assert_eq!(rc.credentials.access_key_id, "STS.id");
        assert_eq!(rc.credentials.access_key_secret, "s3cr3t");
        assert_eq!(rc.credentials.security_token.as_deref(), Some("tok3n"));
        assert_eq!(rc.expiration, at("2024-11-08T09:44:50Z"));
        let shown = format!("{rc:?}");
        assert!(shown.contains("STS.id") && !shown.contains("s3cr3t") && !shown.contains("tok3n"));

        let failed = parse_role_credentials("r", &doc("Failed", "2024-11-08T09:44:50Z"), now);
        assert!(failed.unwrap_err().contains("Failed"));
        let expired = parse_role_credentials("r", &doc("Success", "2024-11-08T03:44:49Z"), now);
        assert!(expired.unwrap_err().contains("expired"));
        let bad_time = parse_role_credentials("r", &doc("Success", "next tuesday"), now);
        assert!(bad_time.unwrap_err().contains("Expiration"));
        let missing = parse_role_credentials("r", r#"{"Code":"Success","AccessKeyId":"a"}"#, now);
        assert!(missing.unwrap_err().contains("AccessKeySecret"));
        // A malformed document is described, never quoted: it may hold the secret.
        let garbled = parse_role_credentials("r", r#"{"AccessKeySecret":"s3cr3t""#, now);
        assert!(!garbled.unwrap_err().contains("s3cr3t"));
    }

    #[test]
    fn audience_is_percent_encoded() {
        let a = utf8_percent_encode("gw 1/ü&x=y~._-", QUERY_VALUE).to_string();
        assert_eq!(a, "gw%201%2F%C3%BC%26x%3Dy~._-");
    }

    #[test]
    fn status_error_names_method_path_and_answer() {
        let e = MetaError::Status {
            method: Method::GET,
            path: "/latest/meta-data/zone-id".into(),
            status: StatusCode::INTERNAL_SERVER_ERROR,
            attempts: 3,
            body: "busy".into(),
        };
        assert_eq!(
            e.to_string(),
            "metadata GET /latest/meta-data/zone-id: HTTP 500 Internal Server Error (3 attempts): busy"
        );
        assert!(e.is_retryable());
    }
}
