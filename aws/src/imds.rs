//! IMDSv2 client: who and where the gateway's instance is, its signed identity document (which
//! registration with the control plane carries), and the instance profile's credentials.
//!
//! ```text
//!   PUT /latest/api/token            X-aws-ec2-metadata-token-ttl-seconds: 21600
//!     -> token (opaque text)
//!   GET /latest/meta-data/...        X-aws-ec2-metadata-token: <token>
//!     -> 200 text | 401 token missing/expired (we fetch a new token once) | 404 no such item
//! ```
//!
//! Plain HTTP to a link-local address: no TLS, no proxies. Every request has a short timeout
//! and a few retries, because IMDS answers in milliseconds or not at all (throttled, or the
//! hop limit of 1 dropped the response inside a container).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{error::CredentialsError, future, ProvideCredentials};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::primitives::{DateTime, DateTimeFormat};
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Token lifetime we ask for: 6 h, IMDS's maximum, so one token serves for hours.
const TOKEN_TTL_SECS: u64 = 21_600;
/// A token is replaced this long before it expires, so no GET races its expiry.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Per-request timeout: IMDS is on the hypervisor and answers in milliseconds; the SDK's own
/// IMDS client also uses 1 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Attempts per request: IMDS throttles bursts (HTTP 429) and a lost packet costs a timeout;
/// three attempts with the short pauses below stay under ~4 s in all.
const ATTEMPTS: u32 = 3;
/// Pause between attempts: long enough for IMDS's per-instance rate limit to recover.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Largest body we accept: identity documents and credentials are well under 4 KiB.
const MAX_BODY: usize = 64 * 1024;

/// What went wrong talking to IMDS.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS endpoint {endpoint:?} is not a usable http:// URL: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("IMDS {method} {path}: no answer within {timeout:?} ({attempts} attempts)")]
    Timeout {
        method: Method,
        path: String,
        timeout: Duration,
        attempts: u32,
    },
    #[error("IMDS {method} {path}: connection failed")]
    Transport {
        method: Method,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("IMDS {method} {path}: HTTP {status}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
    },
    #[error("IMDS {path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl ImdsError {
    fn retryable(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::BadEndpoint { .. } | Self::Invalid { .. } => false,
        }
    }
}

/// The instance identity document (`/latest/dynamic/instance-identity/document`), raw as
/// served (its signature covers these exact bytes) and the fields the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityDocument {
    /// The document exactly as IMDS served it.
    pub raw: String,
    pub account_id: String,
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    pub instance_type: Option<String>,
    pub image_id: Option<String>,
    pub architecture: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityFields {
    account_id: String,
    instance_id: String,
    region: String,
    availability_zone: String,
    instance_type: Option<String>,
    image_id: Option<String>,
    architecture: Option<String>,
}

/// The instance profile's temporary credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub role: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    pub expiration: SystemTime,
}

impl fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoleCredentials")
            .field("role", &self.role)
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsFields {
    code: Option<String>,
    access_key_id: String,
    secret_access_key: String,
    token: String,
    expiration: String,
}

/// An IMDSv2 client. Cheap to clone; clones share the session token.
#[derive(Clone)]
pub struct Imds {
    inner: Arc<Inner>,
}

struct Inner {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    token: Mutex<Option<(String, Instant)>>,
}

impl fmt::Debug for Imds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Imds")
            .field("endpoint", &self.inner.base)
            .finish_non_exhaustive()
    }
}

impl Imds {
    /// A client for the IMDS at `endpoint` (`http://169.254.169.254` on EC2). Nothing is
    /// contacted until a method is called.
    pub fn new(endpoint: &str) -> Result<Self, ImdsError> {
        let bad = |reason: &str| ImdsError::BadEndpoint {
            endpoint: endpoint.into(),
            reason: reason.into(),
        };
        let uri: Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(bad("IMDS speaks plain http: expected http://HOST[:PORT]"));
        }
        let base = endpoint.trim_end_matches('/').to_owned();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            inner: Arc::new(Inner {
                base,
                client,
                token: Mutex::new(None),
            }),
        })
    }

    /// The base URL this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.inner.base
    }

    /// `GET /latest/<path>` with the session token; `path` starts after `/latest/`, e.g.
    /// `meta-data/instance-id`.
    pub async fn get(&self, path: &str) -> Result<String, ImdsError> {
        let full = format!("/latest/{path}");
        let token = self.token(false).await?;
        match self.request(Method::GET, &full, Some(&token)).await {
            // The token expired or IMDS restarted: one fresh token, one more try.
            Err(ImdsError::Status {
                status: StatusCode::UNAUTHORIZED,
                ..
            }) => {
                let token = self.token(true).await?;
                self.request(Method::GET, &full, Some(&token)).await
            }
            other => other,
        }
    }

    /// The instance id, `i-…`.
    pub async fn instance_id(&self) -> Result<String, ImdsError> {
        self.get("meta-data/instance-id")
            .await
            .map(|s| s.trim().to_owned())
    }

    /// The region, e.g. `us-east-1`.
    pub async fn region(&self) -> Result<String, ImdsError> {
        self.get("meta-data/placement/region")
            .await
            .map(|s| s.trim().to_owned())
    }

    /// The availability zone, e.g. `us-east-1a`.
    pub async fn availability_zone(&self) -> Result<String, ImdsError> {
        self.get("meta-data/placement/availability-zone")
            .await
            .map(|s| s.trim().to_owned())
    }

    /// The instance identity document.
    pub async fn identity_document(&self) -> Result<IdentityDocument, ImdsError> {
        let path = "dynamic/instance-identity/document";
        let raw = self.get(path).await?;
        let f: IdentityFields = serde_json::from_str(&raw).map_err(|e| ImdsError::Invalid {
            path: path.into(),
            reason: format!("not an identity document: {e}"),
        })?;
        Ok(IdentityDocument {
            raw,
            account_id: f.account_id,
            instance_id: f.instance_id,
            region: f.region,
            availability_zone: f.availability_zone,
            instance_type: f.instance_type,
            image_id: f.image_id,
            architecture: f.architecture,
        })
    }

    /// The identity document's signature (base64 RSA-SHA256 over the raw document), which
    /// the control plane verifies with AWS's public certificate for the region.
    pub async fn identity_signature(&self) -> Result<String, ImdsError> {
        self.get("dynamic/instance-identity/signature")
            .await
            .map(|s| s.trim().to_owned())
    }

    /// The instance profile's role name (the first line of the listing).
    pub async fn role_name(&self) -> Result<String, ImdsError> {
        let path = "meta-data/iam/security-credentials/";
        let listing = self.get(path).await?;
        listing
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ImdsError::Invalid {
                path: path.into(),
                reason: "no instance profile role attached".into(),
            })
    }

    /// The role's current temporary credentials.
    pub async fn role_credentials(&self) -> Result<RoleCredentials, ImdsError> {
        let role = self.role_name().await?;
        let path = format!("meta-data/iam/security-credentials/{role}");
        let body = self.get(&path).await?;
        let invalid = |reason: String| ImdsError::Invalid {
            path: path.clone(),
            reason,
        };
        let f: CredentialsFields = serde_json::from_str(&body)
            .map_err(|e| invalid(format!("not a credentials document: {e}")))?;
        if let Some(code) = f.code.as_deref().filter(|c| *c != "Success") {
            return Err(invalid(format!("IMDS reports credentials code {code}")));
        }
        let expiration = DateTime::from_str(&f.expiration, DateTimeFormat::DateTime)
            .ok()
            .and_then(|d| SystemTime::try_from(d).ok())
            .ok_or_else(|| invalid(format!("bad Expiration {:?}", f.expiration)))?;
        Ok(RoleCredentials {
            role,
            access_key_id: f.access_key_id,
            secret_access_key: f.secret_access_key,
            token: f.token,
            expiration,
        })
    }

    /// A credentials provider for the SDK backed by [`Imds::role_credentials`]. The SDK's
    /// identity cache calls it again shortly before the credentials expire.
    pub fn credentials_provider(&self) -> ImdsCredentialsProvider {
        ImdsCredentialsProvider { imds: self.clone() }
    }

    async fn token(&self, force_new: bool) -> Result<String, ImdsError> {
        let mut slot = self.inner.token.lock().await;
        if let Some((token, valid_until)) = slot.as_ref() {
            if !force_new && Instant::now() < *valid_until {
                return Ok(token.clone());
            }
        }
        let token = self.request(Method::PUT, "/latest/api/token", None).await?;
        let token = token.trim().to_owned();
        if token.is_empty() {
            return Err(ImdsError::Invalid {
                path: "/latest/api/token".into(),
                reason: "empty token".into(),
            });
        }
        let valid_until =
            Instant::now() + Duration::from_secs(TOKEN_TTL_SECS) - TOKEN_REFRESH_MARGIN;
        *slot = Some((token.clone(), valid_until));
        Ok(token)
    }

    /// One request with timeout and retries. `token`: the session token for GETs.
    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<String, ImdsError> {
        let mut attempt = 1;
        loop {
            match self.request_once(&method, path, token).await {
                Err(e) if e.retryable() && attempt < ATTEMPTS => {
                    tracing::debug!(%method, path, attempt, "IMDS request failed, retrying: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    attempt += 1;
                }
                Err(ImdsError::Timeout {
                    method,
                    path,
                    timeout,
                    ..
                }) => {
                    return Err(ImdsError::Timeout {
                        method,
                        path,
                        timeout,
                        attempts: attempt,
                    })
                }
                other => return other,
            }
        }
    }

    async fn request_once(
        &self,
        method: &Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<String, ImdsError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.inner.base));
        req = match token {
            Some(t) => req.header("x-aws-ec2-metadata-token", t),
            None => req.header(
                "x-aws-ec2-metadata-token-ttl-seconds",
                TOKEN_TTL_SECS.to_string(),
            ),
        };
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| ImdsError::Invalid {
                path: path.into(),
                reason: format!("cannot build request: {e}"),
            })?;
        let exchange = async {
            let resp = self
                .inner
                .client
                .request(req)
                .await
                .map_err(|e| ImdsError::Transport {
                    method: method.clone(),
                    path: path.into(),
                    source: Box::new(e),
                })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ImdsError::Invalid {
                    path: path.into(),
                    reason: format!("reading body: {e}"),
                })?;
            if !status.is_success() {
                return Err(ImdsError::Status {
                    method: method.clone(),
                    path: path.into(),
                    status,
                });
            }
            String::from_utf8(body.to_bytes().to_vec()).map_err(|_| ImdsError::Invalid {
                path: path.into(),
                reason: "body is not UTF-8".into(),
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(ImdsError::Timeout {
                    method: method.clone(),
                    path: path.into(),
                    timeout: REQUEST_TIMEOUT,
                    attempts: 1,
                })
            })
    }
}

/// The SDK credentials provider over IMDS (the instance profile).
#[derive(Debug, Clone)]
pub struct ImdsCredentialsProvider {
    imds: Imds,
}

impl ProvideCredentials for ImdsCredentialsProvider {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            let c = self.imds.role_credentials().await.map_err(|e| match e {
                ImdsError::Timeout { .. } | ImdsError::Transport { .. } => {
                    CredentialsError::provider_error(e)
                }
                _ => CredentialsError::not_loaded(e),
            })?;
            Ok(Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                Some(c.token),
                Some(c.expiration),
                "sync-aws-imds",
            ))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_must_be_plain_http() {
        assert!(Imds::new("http://169.254.169.254").is_ok());
        assert!(Imds::new("http://127.0.0.1:5001/").is_ok());
        assert!(matches!(
            Imds::new("https://169.254.169.254"),
            Err(ImdsError::BadEndpoint { .. })
        ));
        assert!(matches!(
            Imds::new("169.254.169.254"),
            Err(ImdsError::BadEndpoint { .. })
        ));
    }
}
