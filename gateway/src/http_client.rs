//! A small JSON-over-HTTP(S) client on hyper: what the gateway's upward channel and the
//! `sync-control` command line use to talk to a control plane.
//!
//! `https://` URLs use rustls (ring) with the Mozilla roots from `webpki-roots`, plus any CA
//! certificates in a PEM file (a private control plane's CA). Every request has a deadline.
//! Non-2xx answers are decoded as the API's error body, so callers see the control plane's code
//! and message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use serde::{de::DeserializeOwned, Serialize};

use crate::api::ErrorBody;

/// Largest response body read, so a confused or hostile server cannot exhaust memory.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// What can go wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    /// The source chain is in the message: hyper's own error says only "client error
    /// (Connect)"; the reason (refused, certificate unknown, …) is in its sources.
    #[error("{method} {url}: {}", crate::cli::error_chain(source))]
    Transport {
        method: Method,
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{method} {url}: no answer within {timeout:?}")]
    Timeout {
        method: Method,
        url: String,
        timeout: Duration,
    },
    #[error("{method} {url}: reading the answer failed: {reason}")]
    Body {
        method: Method,
        url: String,
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{method} {url}: HTTP {status}: {code}: {message}")]
    Status {
        method: Method,
        url: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{method} {url}: unexpected answer: {reason}")]
    Decode {
        method: Method,
        url: String,
        reason: String,
    },
}

impl HttpError {
    /// Whether trying again later may succeed: transport failures, timeouts, 5xx and 429.
    /// A 4xx other than 429 means the request itself is wrong (or the credential is).
    pub fn is_retryable(&self) -> bool {
        match self {
            HttpError::Transport { .. } | HttpError::Timeout { .. } | HttpError::Body { .. } => {
                true
            }
            HttpError::Status { status, .. } => *status >= 500 || *status == 429,
            HttpError::InvalidUrl { .. } | HttpError::CaFile { .. } | HttpError::Decode { .. } => {
                false
            }
        }
    }

    /// The API error code of an error answer.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            HttpError::Status { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client bound to one base URL (`http://host:port` or `https://…`, optionally with a path
/// prefix).
#[derive(Clone)]
pub struct JsonClient {
    base: String,
    client: sync_common::https::HttpsClient<Full<Bytes>>,
}

impl std::fmt::Debug for JsonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonClient")
            .field("base", &self.base)
            .finish()
    }
}

impl JsonClient {
    /// A client for `base_url`; `ca_file` adds trusted CA certificates (PEM) for https.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> Result<Self, HttpError> {
        let invalid = |reason: &str| HttpError::InvalidUrl {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let uri: hyper::Uri = base_url.parse().map_err(|e| invalid(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(invalid("the scheme must be http or https")),
        }
        if uri.host().is_none() {
            return Err(invalid("no host"));
        }
        if uri.query().is_some() {
            return Err(invalid("a base URL cannot have a query"));
        }
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = ca_file {
            let ca_err = |reason: String| HttpError::CaFile {
                path: path.to_path_buf(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| ca_err(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
                n += 1;
            }
            if n == 0 {
                return Err(ca_err("no PEM certificate in it".into()));
            }
        }
        let client =
            sync_common::https::client(roots).map_err(|e| invalid(&format!("TLS setup: {e}")))?;
        Ok(JsonClient {
            base: base_url.trim_end_matches('/').to_string(),
            client,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `body` (as JSON, if any) and decodes a JSON answer. A 204 or empty body decodes
    /// as JSON `null` (use `()` or `Option<T>` for those).
    pub async fn call<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<R, HttpError> {
        let url = format!("{}{path}", self.base);
        let fail_decode = |reason: String| HttpError::Decode {
            method: method.clone(),
            url: url.clone(),
            reason,
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("sync-gateway/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b).map_err(|e| fail_decode(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| HttpError::InvalidUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|source| HttpError::Transport {
                    method: method.clone(),
                    url: url.clone(),
                    source,
                })?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| HttpError::Body {
                    method: method.clone(),
                    url: url.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, HttpError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                method: method.clone(),
                url: url.clone(),
                timeout,
            })??;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => (e.error.code, e.error.message),
                Err(_) => (
                    status_code_name(status),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned(),
                ),
            };
            return Err(HttpError::Status {
                method,
                url,
                status: status.as_u16(),
                code,
                message,
            });
        }
        let json: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(json).map_err(|e| fail_decode(e.to_string()))
    }
}

fn status_code_name(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "_")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_checked() {
        assert!(JsonClient::new("http://127.0.0.1:1", None).is_ok());
        assert!(JsonClient::new("https://cp.example/api/", None).is_ok());
        for bad in [
            "ftp://x",
            "127.0.0.1:80",
            "http://",
            "http://h/?q=1",
            "not a url",
        ] {
            let e = JsonClient::new(bad, None).unwrap_err();
            assert!(matches!(e, HttpError::InvalidUrl { .. }), "{bad}: {e}");
        }
        let e = JsonClient::new("https://h", Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(matches!(e, HttpError::CaFile { .. }), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_retryable_transport_error() {
        // Bind and drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = JsonClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let e = c
            .call::<(), serde_json::Value>(Method::GET, "/v1/x", None, None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("refused"), "the cause is named: {e}");
    }
}
