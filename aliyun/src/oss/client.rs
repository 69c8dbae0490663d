//! The OSS client: configuration, addressing, signing, and the retry loop every call goes
//! through. Object operations are in [`super::objects`], multipart in [`super::multipart`].

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::body::{OssBody, Produced, ProgressFn, SourceError};
use super::error::OssError;
use super::sign::{self, RequestToSign};
use crate::credentials::{Credentials, CredentialsProvider};

/// OSS's limit for one PutObject (5 GiB); larger objects must go by multipart.
pub const MAX_SINGLE_PUT: u64 = 5 << 30;
/// OSS's smallest part but the last (100 KiB).
pub const MIN_PART_SIZE: u64 = 100 << 10;
/// OSS's largest part (5 GiB).
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// OSS's most parts per upload.
pub const MAX_PARTS: u64 = 10_000;
/// Error bodies are a few hundred bytes; more is not an OSS error document.
pub(crate) const ERROR_BODY_CAP: usize = 64 << 10;

/// How the bucket is named in the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// `https://bucket.oss-region.aliyuncs.com/key` — what OSS requires for real buckets.
    VirtualHosted,
    /// `http://127.0.0.1:port/bucket/key` — what oss2 uses for an IP or `localhost` endpoint.
    Path,
}

/// Everything an [`OssClient`] needs besides credentials.
#[derive(Debug, Clone)]
pub struct OssConfig {
    /// Region id, part of every signature scope (e.g. `cn-hangzhou`).
    pub region: String,
    /// Bucket name.
    pub bucket: String,
    /// `scheme://host[:port]`; default `https://oss-{region}.aliyuncs.com`.
    pub endpoint: Option<String>,
    /// Default: path style for an IP or `localhost` endpoint, virtual-hosted otherwise
    /// (oss2's rule).
    pub addressing: Option<Addressing>,
    /// Files larger than this go by multipart (default and most: 5 GiB, OSS's PutObject cap).
    pub multipart_threshold: u64,
    /// Multipart part size, at least 100 KiB (default 64 MiB); raised when a file would need
    /// more than 10 000 parts.
    pub part_size: u64,
    /// Attempts per request, first included (default 5).
    pub max_attempts: u32,
    /// First backoff ceiling; doubles per attempt (default 200 ms: OSS throttling clears in
    /// well under a second for a single client).
    pub retry_base: Duration,
    /// Backoff ceiling (default 20 s: long enough to ride out a regional blip, short enough
    /// that a diagnostics upload still answers its command in minutes).
    pub retry_cap: Duration,
}

impl OssConfig {
    /// Defaults for `bucket` in `region`.
    pub fn new(region: &str, bucket: &str) -> Self {
        Self {
            region: region.to_string(),
            bucket: bucket.to_string(),
            endpoint: None,
            addressing: None,
            multipart_threshold: MAX_SINGLE_PUT,
            part_size: 64 << 20,
            max_attempts: 5,
            retry_base: Duration::from_millis(200),
            retry_cap: Duration::from_secs(20),
        }
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("https://oss-{}.aliyuncs.com", self.region))
    }
}

/// Per-object upload options.
#[derive(Clone, Default)]
pub struct PutOptions {
    /// `Content-Type` (default `application/octet-stream`).
    pub content_type: Option<String>,
    /// User metadata, sent as `x-oss-meta-<name>` (names lower-cased).
    pub metadata: Vec<(String, String)>,
    /// Called as bytes are handed to the socket.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for PutOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutOptions")
            .field("content_type", &self.content_type)
            .field("metadata", &self.metadata)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

pub(crate) type HttpClient = sync_common::https::HttpsClient<OssBody>;

/// Builds the hyper client: rustls (ring, webpki roots) for https, plain http for tests.
pub(crate) fn http_client() -> Result<HttpClient, OssError> {
    sync_common::https::client(sync_common::https::web_roots())
        .map_err(|e| OssError::Invalid(format!("TLS setup: {e}")))
}

pub(crate) fn transport(
    op: &'static str,
    key: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> OssError {
    OssError::Transport {
        op,
        key: key.to_string(),
        source: Box::new(e),
    }
}

/// True for `127.0.0.1`, `[::1]`, `localhost` and the like (with or without port).
fn is_ip_or_localhost(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.parse::<std::net::IpAddr>().is_ok()
}

/// One request as the retry loop sees it.
pub(crate) struct Call<'a> {
    pub op: &'static str,
    pub method: Method,
    pub key: &'a str,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
}

/// A body for one attempt, with the producer's report; `None` when the source cannot be
/// read again.
pub(crate) type BodyAttempt = Option<(OssBody, Option<oneshot::Receiver<Produced>>)>;

/// An OSS bucket client.
pub struct OssClient {
    pub(crate) cfg: OssConfig,
    creds: Arc<dyn CredentialsProvider>,
    pub(crate) http: HttpClient,
    scheme: String,
    authority: String,
    addressing: Addressing,
}

impl std::fmt::Debug for OssClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OssClient")
            .field("cfg", &self.cfg)
            .field("addressing", &self.addressing)
            .finish()
    }
}

impl OssClient {
    /// A client for `cfg.bucket` with fixed credentials.
    pub fn new(cfg: OssConfig, creds: Credentials) -> Result<Self, OssError> {
        Self::with_provider(cfg, Arc::new(creds))
    }

    /// A client for `cfg.bucket` that asks `creds` before every request (e.g. RAM-role STS
    /// credentials from the metadata service, refreshed by the provider).
    pub fn with_provider(
        cfg: OssConfig,
        creds: Arc<dyn CredentialsProvider>,
    ) -> Result<Self, OssError> {
        let endpoint = cfg.endpoint();
        let uri: hyper::Uri = endpoint
            .parse()
            .map_err(|e| OssError::Invalid(format!("endpoint {endpoint}: {e}")))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s.to_string(),
            _ => {
                return Err(OssError::Invalid(format!(
                    "endpoint {endpoint}: not http(s)"
                )))
            }
        };
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| OssError::Invalid(format!("endpoint {endpoint}: no host")))?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(OssError::Invalid(format!(
                "endpoint {endpoint}: must be scheme://host[:port]"
            )));
        }
        if cfg.bucket.is_empty() || cfg.bucket.contains(['/', '.']) {
            return Err(OssError::Invalid(format!("bucket name {:?}", cfg.bucket)));
        }
        if cfg.part_size < MIN_PART_SIZE || cfg.part_size > MAX_PART_SIZE {
            return Err(OssError::Invalid(format!(
                "part size {} outside {MIN_PART_SIZE}..={MAX_PART_SIZE}",
                cfg.part_size
            )));
        }
        if cfg.multipart_threshold > MAX_SINGLE_PUT {
            return Err(OssError::Invalid(format!(
                "multipart threshold {} above OSS's single-PUT cap {MAX_SINGLE_PUT}",
                cfg.multipart_threshold
            )));
        }
        let host = uri.host().unwrap_or_default();
        let addressing = cfg.addressing.unwrap_or(if is_ip_or_localhost(host) {
            Addressing::Path
        } else {
            Addressing::VirtualHosted
        });
        Ok(Self {
            cfg,
            creds,
            http: http_client()?,
            scheme,
            authority,
            addressing,
        })
    }

    pub(crate) async fn credentials(&self) -> Result<Credentials, OssError> {
        self.creds
            .credentials()
            .await
            .map_err(OssError::Credentials)
    }

    /// The configuration.
    pub fn config(&self) -> &OssConfig {
        &self.cfg
    }

    /// The addressing style in use.
    pub fn addressing(&self) -> Addressing {
        self.addressing
    }

    /// The object's URL with `query` (already in wire order).
    pub fn object_url(&self, key: &str, query: &[(String, String)]) -> String {
        let path = sign::uri_encode(key, false);
        let mut url = match self.addressing {
            Addressing::Path => format!(
                "{}://{}/{}/{path}",
                self.scheme, self.authority, self.cfg.bucket
            ),
            Addressing::VirtualHosted => format!(
                "{}://{}.{}/{path}",
                self.scheme, self.cfg.bucket, self.authority
            ),
        };
        if !query.is_empty() {
            url.push('?');
            url.push_str(&sign::encode_query(query));
        }
        url
    }

    /// Sends `call`, retrying with full-jitter backoff while the error is retryable and
    /// `body` can produce the body again.
    pub(crate) async fn execute(
        &self,
        call: &Call<'_>,
        mut body: impl FnMut() -> BodyAttempt,
    ) -> Result<(Response<Incoming>, Option<Produced>), OssError> {
        if call.key.is_empty() {
            return Err(OssError::Invalid(format!("{}: empty object key", call.op)));
        }
        let mut attempt = 0u32;
        let mut last_error = None;
        loop {
            attempt += 1;
            let Some((b, produced)) = body() else {
                // A one-pass source (a reader) cannot be sent again: the failure stands.
                return Err(last_error.unwrap_or_else(|| {
                    OssError::Invalid(format!("{} {}: no body to send", call.op, call.key))
                }));
            };
            let result = self.send_once(call, b, produced).await;
            match result {
                Err(e) if e.is_retryable() && attempt < self.cfg.max_attempts => {
                    let wait = backoff(&self.cfg, attempt);
                    tracing::warn!(op = call.op, key = call.key, attempt, ?wait, error = %e, "OSS request failed; retrying");
                    tokio::time::sleep(wait).await;
                    last_error = Some(e);
                }
                other => return other,
            }
        }
    }

    async fn send_once(
        &self,
        call: &Call<'_>,
        body: OssBody,
        produced: Option<oneshot::Receiver<Produced>>,
    ) -> Result<(Response<Incoming>, Option<Produced>), OssError> {
        let creds = self.credentials().await?;
        let mut req = RequestToSign::new(call.method.as_str(), &self.cfg.bucket, call.key);
        req.query = call.query.clone();
        req.headers = call.headers.clone();
        let auth = sign::sign_request(
            &mut req,
            &creds,
            &self.cfg.region,
            OffsetDateTime::now_utc(),
        );
        let url = self.object_url(call.key, &call.query);
        let mut builder = Request::builder().method(call.method.clone()).uri(&url);
        for (k, v) in &req.headers {
            builder = builder.header(k.as_str(), v.trim());
        }
        let len = hyper::body::Body::size_hint(&body).exact().unwrap_or(0);
        if len > 0 || matches!(call.method, Method::PUT | Method::POST) {
            builder = builder.header(hyper::header::CONTENT_LENGTH, len);
        }
        let request = builder
            .header(hyper::header::AUTHORIZATION, auth)
            .body(body)
            .map_err(|e| OssError::Invalid(format!("{} {}: {e}", call.op, call.key)))?;
        let response = self.http.request(request).await;
        let produced = match produced {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        if let Some(Err(SourceError::Io(path, e))) = produced {
            return Err(OssError::Io { path, source: e });
        }
        if let Some(Err(SourceError::Short { got, want })) = produced {
            return Err(OssError::ShortSource {
                op: call.op,
                key: call.key.to_string(),
                got,
                want,
            });
        }
        let response = response.map_err(|e| transport(call.op, call.key, e))?;
        let status = response.status();
        if status.is_success() {
            return Ok((response, produced));
        }
        let request_id = response
            .headers()
            .get("x-oss-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let header_error = header_error(&response);
        let mut body = read_capped(response.into_body(), ERROR_BODY_CAP)
            .await
            .unwrap_or_default();
        if body.is_empty() {
            body = header_error;
        }
        Err(OssError::from_response(
            call.op,
            call.key,
            status.as_u16(),
            request_id.as_deref(),
            &body,
        ))
    }
}

/// Full jitter: uniform in `0..=min(cap, base × 2^(attempt-1))`, so that many clients hit
/// by the same throttling do not come back in lockstep.
pub(crate) fn backoff(cfg: &OssConfig, attempt: u32) -> Duration {
    let ceiling = cfg
        .retry_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(cfg.retry_cap);
    rand::thread_rng().gen_range(Duration::ZERO..=ceiling)
}

/// OSS repeats the error document, base64-encoded, in `x-oss-err` (HEAD answers have no
/// body to carry it).
pub(crate) fn header_error(resp: &Response<Incoming>) -> Vec<u8> {
    use base64::Engine;
    resp.headers()
        .get("x-oss-err")
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .ok()
        })
        .unwrap_or_default()
}

pub(crate) fn etag_of(resp: &Response<Incoming>) -> String {
    resp.headers()
        .get(hyper::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

pub(crate) fn md5_of(data: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    Md5::digest(data).into()
}

/// A plain ETag (32 hex digits) must equal the MD5 of what was sent; others (multipart,
/// encrypted) say nothing checkable.
pub(crate) fn check_md5(
    op: &'static str,
    key: &str,
    etag: &str,
    produced: Option<Produced>,
) -> Result<(), OssError> {
    let Some(Ok(md5)) = produced else {
        return Ok(());
    };
    let md5 = hex::encode_upper(md5);
    if etag.len() == 32
        && etag.bytes().all(|b| b.is_ascii_hexdigit())
        && !etag.eq_ignore_ascii_case(&md5)
    {
        return Err(OssError::Digest {
            op,
            key: key.to_string(),
            etag: etag.to_string(),
            md5,
        });
    }
    Ok(())
}

/// Reads at most `cap` bytes of a body (error documents; the rest is dropped).
pub(crate) async fn read_capped(mut body: Incoming, cap: usize) -> Result<Vec<u8>, hyper::Error> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = cap.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() >= cap {
                break;
            }
        }
    }
    Ok(out)
}
