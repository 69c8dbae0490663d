//! A local OSS for tests: checks every request's V4 signature (header or presigned URL) the
//! way OSS does and answers with OSS's error codes and `<Error>` documents; keeps objects on
//! disk (sparse: runs of zeros become holes), so a multi-GB upload costs no memory and
//! little disk.
//!
//! | check | OSS code (HTTP) |
//! |---|---|
//! | no Authorization and no presigned query | `AccessDenied` (403) |
//! | Authorization unreadable | `InvalidArgument` (400) |
//! | `x-oss-date` more than 15 min from the server clock | `RequestTimeTooSkewed` (403) |
//! | presigned URL past `x-oss-date + x-oss-expires` | `AccessDenied` "Request has expired." (403) |
//! | unknown AccessKey id, STS key without its token, plain key with a token | `InvalidAccessKeyId` (403) |
//! | STS key with another token | `InvalidSecurityToken` (403) |
//! | signature differs | `SignatureDoesNotMatch` (403, with the canonical request and string to sign) |
//! | object / upload / bucket missing | `NoSuchKey` / `NoSuchUpload` / `NoSuchBucket` (404) |
//!
//! As OSS does, the error document is also sent base64-encoded in `x-oss-err`, which is all
//! a HEAD answer carries.
//!
//! Addressing: `Host: bucket.anything` is virtual-hosted, anything else is path style
//! (`/bucket/key`), so both the SDK's and our client's forms are served.
//!
//! Storage under `root`: `tmp/` for bodies being received, `objects/<n>` and
//! `uploads/<id>/<part>` for data; the index (names, sizes, ETags, metadata) is in memory. A
//! completed multipart object keeps its part files as segments instead of copying them.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::credentials::Credentials;
use crate::oss::body::OssBody;
use crate::oss::sign::{self, Authorization, RequestToSign};
use crate::oss::xml;

mod auth;
mod store;

use auth::authenticate;
use store::{abort, complete, get_object, initiate, put_object, upload_part};

/// OSS's allowed clock difference.
const MAX_SKEW_SECS: i64 = 15 * 60;
/// OSS's caps on one PutObject / UploadPart body and on part numbers.
const MAX_BODY: u64 = 5 << 30;
const MAX_PART_NUMBER: u32 = 10_000;
const MIN_PART: u64 = 100 << 10;
/// Connections served at once; more wait before `accept`.
const MAX_CONNECTIONS: usize = 64;
/// Request bodies that are XML documents (CompleteMultipartUpload) are small.
const MAX_XML_BODY: usize = 1 << 20;
/// Chunks queued between the socket and the disk writer.
const WRITE_QUEUE: usize = 8;

/// Server configuration.
#[derive(Debug, Clone)]
pub struct OssServerConfig {
    pub region: String,
    pub bucket: String,
    /// Accepted keys; one with a `security_token` is an STS key that needs that token.
    pub keys: Vec<Credentials>,
    /// Directory for object data (the test's temp dir).
    pub root: PathBuf,
}

/// One request as received, and how it was answered.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query exactly as on the request line.
    pub target: String,
    /// Headers in arrival order, names lower-case.
    pub headers: Vec<(String, String)>,
    pub status: u16,
    /// OSS error code of the answer, if it was an error.
    pub error_code: Option<String>,
}

impl RecordedRequest {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
struct Object {
    size: u64,
    etag: String,
    content_type: String,
    metadata: Vec<(String, String)>,
    last_modified: OffsetDateTime,
    /// Files whose concatenation is the content.
    segments: Vec<(PathBuf, u64)>,
}

#[derive(Debug)]
struct Upload {
    key: String,
    content_type: String,
    metadata: Vec<(String, String)>,
    /// part number → (file, size, MD5)
    parts: BTreeMap<u32, (PathBuf, u64, [u8; 16])>,
}

#[derive(Debug, Default)]
struct Index {
    objects: HashMap<String, Object>,
    uploads: HashMap<String, Upload>,
}

struct State {
    cfg: OssServerConfig,
    index: Mutex<Index>,
    log: Mutex<Vec<RecordedRequest>>,
    next_id: AtomicU64,
    clock_offset: AtomicI64,
    /// Injected failures: (requests to let through first, requests to fail, status, code).
    faults: Mutex<(u32, u32, u16, String)>,
}

/// A running server; stops when dropped.
pub struct OssServer {
    addr: SocketAddr,
    state: Arc<State>,
    _stop: watch::Sender<bool>,
}

impl std::fmt::Debug for OssServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OssServer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// An answer that is an OSS error.
#[derive(Debug)]
struct OssFault {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Vec<(&'static str, String)>,
}

fn fault(status: StatusCode, code: &'static str, message: impl Into<String>) -> OssFault {
    OssFault {
        status,
        code,
        message: message.into(),
        extra: Vec::new(),
    }
}

type Reply = Result<Response<OssBody>, OssFault>;

impl OssServer {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub async fn start(cfg: OssServerConfig) -> std::io::Result<Self> {
        for d in ["tmp", "objects", "uploads"] {
            std::fs::create_dir_all(cfg.root.join(d))?;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            cfg,
            index: Mutex::new(Index::default()),
            log: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            clock_offset: AtomicI64::new(0),
            faults: Mutex::new((0, 0, 0, String::new())),
        });
        let (stop, mut stopped) = watch::channel(false);
        let st = state.clone();
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped.changed() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let st = st.clone();
                let mut stop_conn = stopped.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop_conn.changed() => {}
                    }
                    drop(permit);
                });
            }
        });
        Ok(Self {
            addr,
            state,
            _stop: stop,
        })
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Moves the server's clock by `secs` (to test skew and expiry without waiting).
    pub fn set_clock_offset(&self, secs: i64) {
        self.state.clock_offset.store(secs, Ordering::Relaxed);
    }

    /// Answers the next `n` requests with `status` and OSS code `code` (before any other
    /// check), to exercise retries.
    pub fn fail_next(&self, n: u32, status: u16, code: &str) {
        self.fail_after(0, n, status, code);
    }

    /// Lets `skip` requests through, then fails `n` as [`OssServer::fail_next`] does.
    pub fn fail_after(&self, skip: u32, n: u32, status: u16, code: &str) {
        if let Ok(mut f) = self.state.faults.lock() {
            *f = (skip, n, status, code.to_string());
        }
    }

    /// Names of stored objects.
    pub fn object_keys(&self) -> Vec<String> {
        self.state
            .index
            .lock()
            .map(|i| i.objects.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Multipart uploads neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.state
            .index
            .lock()
            .map(|i| i.uploads.len())
            .unwrap_or(0)
    }

    /// Bytes the stored data files occupy on disk (holes excluded), for sparse checks.
    pub fn disk_usage(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => {
                        use std::os::unix::fs::MetadataExt;
                        m.blocks() * 512
                    }
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.state.cfg.root)
    }
}

impl State {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
            + time::Duration::seconds(self.clock_offset.load(Ordering::Relaxed))
    }

    fn request_id(&self) -> String {
        format!("{:024X}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn temp_path(&self) -> PathBuf {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.cfg.root.join("tmp").join(n.to_string())
    }
}

/// A parsed request line: which object, which query.
struct Target {
    bucket: String,
    key: String,
    query: Vec<(String, String)>,
}

/// Percent-decodes; `plus_is_space` for query strings (requests sends spaces as `+`).
fn decode(s: &str, plus_is_space: bool) -> Result<String, OssFault> {
    let s = if plus_is_space {
        s.replace('+', " ")
    } else {
        s.to_string()
    };
    percent_encoding::percent_decode_str(&s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| {
            fault(
                StatusCode::BAD_REQUEST,
                "InvalidURI",
                "not UTF-8 after decoding",
            )
        })
}

fn parse_target(bucket: &str, uri: &hyper::Uri, headers: &HeaderMap) -> Result<Target, OssFault> {
    let host = headers
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let host_name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let path = uri.path();
    let (b, raw_key) = if host_name
        .strip_prefix(bucket)
        .is_some_and(|rest| rest.starts_with('.'))
    {
        (bucket.to_string(), path.strip_prefix('/').unwrap_or(path))
    } else {
        let p = path.strip_prefix('/').unwrap_or(path);
        let (b, k) = p.split_once('/').unwrap_or((p, ""));
        (decode(b, false)?, k)
    };
    let mut query = Vec::new();
    for pair in uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        query.push((decode(k, true)?, decode(v, true)?));
    }
    Ok(Target {
        bucket: b,
        key: decode(raw_key, false)?,
        query,
    })
}

fn query_value<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<OssBody> {
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = header_list(req.headers());
    let request_id = st.request_id();
    let reply = serve(&st, req).await;
    let (mut resp, code) = match reply {
        Ok(r) => (r, None),
        Err(f) => {
            let code = f.code;
            (
                error_response(&st, &f, &request_id, method == Method::HEAD),
                Some(code),
            )
        }
    };
    resp.headers_mut().insert(
        "x-oss-request-id",
        hyper::header::HeaderValue::from_str(&request_id)
            .unwrap_or(hyper::header::HeaderValue::from_static("0")),
    );
    resp.headers_mut().insert(
        "server",
        hyper::header::HeaderValue::from_static("AliyunOSS"),
    );
    if let Ok(mut log) = st.log.lock() {
        log.push(RecordedRequest {
            method: method.to_string(),
            target,
            headers,
            status: resp.status().as_u16(),
            error_code: code.map(str::to_string),
        });
    }
    resp
}

fn error_response(st: &State, f: &OssFault, request_id: &str, head: bool) -> Response<OssBody> {
    let mut doc = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>\n  <Code>{}</Code>\n  <Message>{}</Message>\n  <RequestId>{request_id}</RequestId>\n  <HostId>{}</HostId>\n",
        f.code,
        xml::escape(&f.message),
        xml::escape(&st.cfg.bucket),
    );
    for (k, v) in &f.extra {
        doc.push_str(&format!("  <{k}>{}</{k}>\n", xml::escape(v)));
    }
    doc.push_str("</Error>\n");
    use base64::Engine;
    let mut b = Response::builder()
        .status(f.status)
        .header("content-type", "application/xml")
        .header("x-oss-ec", "0000-00000000")
        .header(
            "x-oss-err",
            base64::engine::general_purpose::STANDARD.encode(&doc),
        );
    let body = if head {
        b = b.header("content-length", 0);
        OssBody::empty()
    } else {
        b = b.header("content-length", doc.len());
        OssBody::bytes(doc)
    };
    b.body(body)
        .unwrap_or_else(|_| Response::new(OssBody::empty()))
}

fn injected_fault(st: &State) -> Option<OssFault> {
    let mut f = st.faults.lock().ok()?;
    if f.0 > 0 {
        f.0 -= 1;
        return None;
    }
    if f.1 == 0 {
        return None;
    }
    f.1 -= 1;
    let status = StatusCode::from_u16(f.2).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let code: &'static str = match f.3.as_str() {
        "ServiceUnavailable" => "ServiceUnavailable",
        "InternalError" => "InternalError",
        "SlowDown" => "SlowDown",
        _ => "InjectedFault",
    };
    Some(fault(status, code, "injected by the test"))
}

async fn serve(st: &State, req: Request<Incoming>) -> Reply {
    if let Some(f) = injected_fault(st) {
        return Err(f);
    }
    let (parts, body) = req.into_parts();
    let target = parse_target(&st.cfg.bucket, &parts.uri, &parts.headers)?;
    authenticate(st, &parts.method, &parts.headers, &target)?;
    if target.bucket != st.cfg.bucket {
        return Err(fault(
            StatusCode::NOT_FOUND,
            "NoSuchBucket",
            "The specified bucket does not exist.",
        ));
    }
    if target.key.is_empty() {
        return Err(fault(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "bucket operations are not served here",
        ));
    }
    let q = &target.query;
    let upload_id = query_value(q, "uploadId");
    match (&parts.method, upload_id) {
        (&Method::PUT, Some(id)) => upload_part(st, &target, id, &parts.headers, body).await,
        (&Method::PUT, None) => put_object(st, &target, &parts.headers, body).await,
        (&Method::POST, None) if query_value(q, "uploads").is_some() => {
            initiate(st, &target, &parts.headers)
        }
        (&Method::POST, Some(id)) => complete(st, &target, id, body).await,
        (&Method::DELETE, Some(id)) => abort(st, id),
        (&Method::DELETE, None) => {
            let removed = st
                .index
                .lock()
                .ok()
                .and_then(|mut i| i.objects.remove(&target.key));
            if let Some(o) = removed {
                for (p, _) in o.segments {
                    let _ = std::fs::remove_file(p);
                }
            }
            ok(StatusCode::NO_CONTENT)
        }
        (&Method::GET, None) | (&Method::HEAD, None) => {
            get_object(st, &target, &parts.headers, parts.method == Method::HEAD)
        }
        _ => Err(fault(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not served here",
        )),
    }
}

fn ok(status: StatusCode) -> Reply {
    Response::builder()
        .status(status)
        .header("content-length", 0)
        .body(OssBody::empty())
        .map_err(|e| {
            fault(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
            )
        })
}
