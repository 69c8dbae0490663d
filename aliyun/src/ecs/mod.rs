//! The RPC-style ECS client (API version 2014-05-26) over hyper, signed with
//! [`crate::acs3`].
//!
//! Every call is `POST https://ecs.{region}.aliyuncs.com/?Name=Value&…` with an empty body,
//! the action and version in `x-acs-action` / `x-acs-version`, and a JSON answer. Errors are
//! `{"Code","Message","RequestId"}` with an HTTP status, mapped to [`EcsError`] and
//! [`ErrorKind`]; throttling and transient states are retried with full-jitter backoff
//! ([`RetryPolicy`]), counted in [`RetryStats`]. Credentials are asked from a
//! [`CredentialsProvider`] before every attempt, so refreshed STS credentials are picked up.
//!
//! | module | what |
//! |---|---|
//! | [`params`] | flat RPC parameters, `Tag.N.Key` lists |
//! | [`types`] | plain request/resource types |
//! | `api` | the typed calls (`create_disk`, `describe_snapshots`, …) |
//! | [`error`], [`retry`] | typed errors, retry policy and counters |

mod api;
pub mod error;
pub mod params;
pub mod retry;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request};

use crate::acs3;
use crate::credentials::CredentialsProvider;

pub use error::{EcsError, ErrorKind};
pub use params::Params;
pub use retry::{RetryPolicy, RetryStats, RetryStatsSnapshot};
pub use types::*;

/// The ECS OpenAPI version this client speaks.
pub const API_VERSION: &str = "2014-05-26";

/// Largest answer read: Describe pages of 100 resources are tens of KiB; this bounds memory
/// against a confused or hostile endpoint.
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// The public endpoint of a region: `https://ecs.{region}.aliyuncs.com`.
pub fn default_endpoint(region: &str) -> String {
    format!("https://ecs.{region}.aliyuncs.com")
}

/// Where and how to call ECS.
#[derive(Debug, Clone)]
pub struct EcsConfig {
    /// Region id, e.g. `cn-hangzhou`; sent as `RegionId` by the typed calls.
    pub region: String,
    /// `http(s)://host[:port]`; `None` for [`default_endpoint`] (tests set a loopback one).
    pub endpoint: Option<String>,
    /// Deadline of one attempt.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl EcsConfig {
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            endpoint: None,
            // 30 s: ECS answers in well under a second; a slow Describe of many resources
            // still fits, a hung connection does not hold a disk's worker for long.
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }

    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

/// An ECS client; cheap to clone (clones share connections and [`RetryStats`]).
#[derive(Clone)]
pub struct EcsClient {
    inner: Arc<Inner>,
}

struct Inner {
    region: String,
    /// `scheme://authority`, without trailing slash.
    base: String,
    /// The `Host` header, exactly as signed: port included unless the scheme's default.
    host: String,
    timeout: Duration,
    policy: RetryPolicy,
    stats: Arc<RetryStats>,
    credentials: Arc<dyn CredentialsProvider>,
    http: sync_common::https::HttpsClient<Full<Bytes>>,
}

impl std::fmt::Debug for EcsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcsClient")
            .field("region", &self.inner.region)
            .field("endpoint", &self.inner.base)
            .field("credentials", &self.inner.credentials)
            .finish()
    }
}

impl EcsClient {
    /// A client for `config`, signing with what `credentials` gives.
    pub fn new(
        config: EcsConfig,
        credentials: Arc<dyn CredentialsProvider>,
    ) -> Result<Self, EcsError> {
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| default_endpoint(&config.region));
        let (base, host) = parse_endpoint(&endpoint)?;
        let http = sync_common::https::client(sync_common::https::web_roots())
            .map_err(|e| EcsError::Config(format!("TLS setup: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                region: config.region,
                base,
                host,
                timeout: config.timeout,
                policy: config.retry,
                stats: Arc::new(RetryStats::default()),
                credentials,
                http,
            }),
        })
    }

    /// The region the typed calls address.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// `scheme://host[:port]` called.
    pub fn endpoint(&self) -> &str {
        &self.inner.base
    }

    /// The retry counters shared by this client's calls.
    pub fn retry_stats(&self) -> Arc<RetryStats> {
        self.inner.stats.clone()
    }

    /// Calls `action` with `params` (retrying as the policy says) and returns the JSON
    /// answer. The typed methods use this; it is public for calls they do not cover.
    pub async fn call(&self, action: &str, params: &Params) -> Result<serde_json::Value, EcsError> {
        let mut retry = 0u32;
        loop {
            let err = match self.call_once(action, params).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !err.kind().is_retryable() || retry + 1 >= self.inner.policy.max_attempts {
                return Err(err);
            }
            let delay = self.inner.policy.backoff(retry, &mut rand::thread_rng());
            tracing::warn!(action, code = ?err.code(), request_id = ?err.request_id(),
                retry = retry + 1, delay_ms = delay.as_millis() as u64,
                "ECS call failed, retrying: {err}");
            self.inner
                .stats
                .record(err.kind() == ErrorKind::Throttled, &err);
            tokio::time::sleep(delay).await;
            retry += 1;
        }
    }

    /// One signed attempt.
    async fn call_once(
        &self,
        action: &str,
        params: &Params,
    ) -> Result<serde_json::Value, EcsError> {
        let inner = &self.inner;
        let credentials =
            inner
                .credentials
                .credentials()
                .await
                .map_err(|source| EcsError::Credentials {
                    action: action.to_string(),
                    source,
                })?;
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), inner.host.clone()),
            (acs3::header::ACTION.into(), action.to_string()),
            (acs3::header::VERSION.into(), API_VERSION.into()),
            (
                acs3::header::DATE.into(),
                acs3::format_date(time::OffsetDateTime::now_utc()),
            ),
            (acs3::header::NONCE.into(), acs3::new_nonce()),
            (
                acs3::header::CONTENT_SHA256.into(),
                acs3::EMPTY_PAYLOAD_SHA256.into(),
            ),
        ];
        if let Some(token) = credentials
            .security_token
            .as_ref()
            .filter(|t| !t.is_empty())
        {
            headers.push((acs3::header::SECURITY_TOKEN.into(), token.clone()));
        }
        let signature = acs3::sign_with(
            &acs3::SigningInput {
                method: "POST",
                canonical_uri: "/",
                query: params.pairs(),
                headers: &headers,
                payload_sha256: acs3::EMPTY_PAYLOAD_SHA256,
            },
            &credentials,
        );
        let query = acs3::wire_query(params.pairs());
        let uri = if query.is_empty() {
            format!("{}/", inner.base)
        } else {
            format!("{}/?{query}", inner.base)
        };
        let mut builder = Request::builder().method(Method::POST).uri(&uri);
        for (name, value) in &headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder
            .header("authorization", signature.authorization)
            .header("accept", "application/json")
            .header(
                "user-agent",
                concat!("sync-aliyun/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| EcsError::Config(format!("request for {action}: {e}")))?;

        let transport =
            |detail: String, source: Option<Box<dyn std::error::Error + Send + Sync>>| {
                EcsError::Transport {
                    action: action.to_string(),
                    detail,
                    source,
                }
            };
        let exchange = async {
            let response = inner
                .http
                .request(request)
                .await
                .map_err(|e| transport(error_chain(&e), Some(Box::new(e))))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| transport(format!("reading the answer: {e}"), None))?
                .to_bytes();
            Ok::<_, EcsError>((status, body))
        };
        let (status, body) = tokio::time::timeout(inner.timeout, exchange)
            .await
            .map_err(|_| EcsError::Timeout {
                action: action.to_string(),
                timeout: inner.timeout,
            })??;
        decode_answer(action, status, &body)
    }
}

/// The JSON of a 2xx answer, or the typed error of any other.
fn decode_answer(action: &str, status: u16, body: &[u8]) -> Result<serde_json::Value, EcsError> {
    let json: Result<serde_json::Value, _> = serde_json::from_slice(body);
    let field = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    match json {
        Ok(v) if (200..300).contains(&status) => Ok(v),
        Ok(v) if v.get("Code").is_some() => {
            let code = field(&v, "Code");
            Err(EcsError::Api {
                action: action.to_string(),
                status,
                kind: ErrorKind::classify(status, &code),
                message: field(&v, "Message"),
                request_id: field(&v, "RequestId"),
                code,
            })
        }
        Ok(v) => Err(EcsError::Decode {
            action: action.to_string(),
            status,
            request_id: field(&v, "RequestId"),
            detail: "an error answer without Code".into(),
        }),
        Err(e) => Err(EcsError::Decode {
            action: action.to_string(),
            status,
            request_id: String::new(),
            detail: format!(
                "not JSON ({e}): {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        }),
    }
}

/// `scheme://authority` and the `Host` header of an endpoint URL.
fn parse_endpoint(endpoint: &str) -> Result<(String, String), EcsError> {
    let bad = |why: &str| EcsError::Config(format!("endpoint {endpoint:?}: {why}"));
    let uri: hyper::Uri = endpoint.parse().map_err(|e| bad(&format!("{e}")))?;
    let scheme = uri.scheme_str().ok_or_else(|| bad("no scheme"))?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return Err(bad("the scheme must be http or https")),
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("an endpoint has no path or query"));
    }
    let host_header = match uri.port_u16() {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host.to_string(),
    };
    Ok((format!("{scheme}://{host_header}"), host_header))
}

/// An error and its sources on one line (hyper's own message says only "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_sign_the_port_only_when_not_default() {
        assert_eq!(
            parse_endpoint("https://ecs.cn-hangzhou.aliyuncs.com").unwrap(),
            (
                "https://ecs.cn-hangzhou.aliyuncs.com".into(),
                "ecs.cn-hangzhou.aliyuncs.com".into()
            )
        );
        assert_eq!(
            parse_endpoint("https://ecs.cn-hangzhou.aliyuncs.com:443/")
                .unwrap()
                .1,
            "ecs.cn-hangzhou.aliyuncs.com"
        );
        assert_eq!(
            parse_endpoint("http://127.0.0.1:8080").unwrap(),
            ("http://127.0.0.1:8080".into(), "127.0.0.1:8080".into())
        );
        assert!(parse_endpoint("ftp://x").is_err());
        assert!(parse_endpoint("http://x/path").is_err());
    }

    #[test]
    fn error_answers_become_typed_errors() {
        let e = decode_answer(
            "DeleteDisk",
            404,
            br#"{"Code":"InvalidDiskId.NotFound","Message":"The specified disk does not exist.","RequestId":"R-9"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.request_id(), Some("R-9"));
        let e = decode_answer("DeleteDisk", 502, b"<html>bad gateway</html>").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert!(e.to_string().contains("DeleteDisk"));
        assert!(decode_answer("X", 200, br#"{"RequestId":"R"}"#).is_ok());
    }
}
