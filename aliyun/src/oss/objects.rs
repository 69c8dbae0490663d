//! Object operations on [`OssClient`]: put (streamed from a file, a reader or memory), head,
//! get (streamed, whole or ranged), delete, presigned URLs, and a PUT to a presigned URL.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::body::{self, OssBody, Progress, ProgressFn, SourceError};
use super::client::{
    backoff, check_md5, etag_of, header_error, http_client, md5_of, read_capped, transport, Call,
    OssClient, OssConfig, PutOptions, ERROR_BODY_CAP, MAX_SINGLE_PUT,
};
use super::error::OssError;
use super::sign::{self, RequestToSign};

/// What OSS says about a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Size of the object (or of the range, for a ranged GET).
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
    pub content_type: Option<String>,
    pub last_modified: Option<String>,
    /// `x-oss-meta-*` headers, prefix removed.
    pub metadata: Vec<(String, String)>,
}

/// One uploaded part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartResult {
    pub number: u32,
    pub size: u64,
    /// ETag as OSS returned it, without quotes (upper-case MD5 hex).
    pub etag: String,
    /// MD5 of the bytes sent, computed while sending.
    pub md5: [u8; 16],
}

/// A finished upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutResult {
    pub size: u64,
    /// ETag without quotes; `<hex>-<parts>` for multipart.
    pub etag: String,
    /// Empty for a single PutObject.
    pub parts: Vec<PartResult>,
}

/// A GET in progress: metadata now, bytes as they arrive.
#[derive(Debug)]
pub struct ObjectBody {
    pub meta: ObjectMeta,
    body: Incoming,
    op: &'static str,
    key: String,
}

impl ObjectBody {
    /// The next chunk, `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, OssError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(transport(self.op, &self.key, e)),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// Copies the rest into `out`; returns the byte count and checks it against the size.
    pub async fn write_to<W: tokio::io::AsyncWrite + Unpin>(
        mut self,
        out: &mut W,
        out_name: &Path,
    ) -> Result<u64, OssError> {
        let mut n = 0u64;
        while let Some(c) = self.chunk().await? {
            out.write_all(&c).await.map_err(|e| OssError::Io {
                path: out_name.to_path_buf(),
                source: e,
            })?;
            n += c.len() as u64;
        }
        if n != self.meta.size {
            return Err(OssError::ShortSource {
                op: self.op,
                key: self.key,
                got: n,
                want: self.meta.size,
            });
        }
        Ok(n)
    }

    /// Reads everything (callers bound the size by asking for a range).
    pub async fn bytes(mut self) -> Result<Vec<u8>, OssError> {
        let mut v = Vec::with_capacity(self.meta.size.min(64 << 20) as usize);
        while let Some(c) = self.chunk().await? {
            v.extend_from_slice(&c);
        }
        Ok(v)
    }
}

impl OssClient {
    /// Uploads `len` bytes of an async reader in one PutObject (one pass, so no retries;
    /// at most 5 GiB).
    pub async fn put_object_from_reader<R>(
        &self,
        key: &str,
        reader: R,
        len: u64,
        opts: &PutOptions,
    ) -> Result<PutResult, OssError>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        if len > MAX_SINGLE_PUT {
            return Err(OssError::Invalid(format!(
                "{key}: {len} bytes from a reader exceed the 5 GiB PutObject cap; upload a file"
            )));
        }
        let progress = Progress::new(opts.progress.clone(), len);
        let mut once = Some(body::reader(reader, len, Some(progress.clone())));
        let call = put_call("PutObject", key, opts, Vec::new());
        let (resp, produced) = self
            .execute(&call, || once.take().map(|(b, rx)| (b, Some(rx))))
            .await?;
        let etag = etag_of(&resp);
        check_md5("PutObject", key, &etag, produced)?;
        Ok(PutResult {
            size: len,
            etag,
            parts: Vec::new(),
        })
    }

    /// Uploads a file: one streamed PutObject up to the multipart threshold, multipart above
    /// it (aborted if it fails).
    pub async fn put_object_from_file(
        &self,
        key: &str,
        path: &Path,
        opts: &PutOptions,
    ) -> Result<PutResult, OssError> {
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| OssError::Io {
                path: path.to_path_buf(),
                source: e,
            })?
            .len();
        if size > self.cfg.multipart_threshold {
            return self.multipart_upload_file(key, path, size, opts).await;
        }
        let progress = Progress::new(opts.progress.clone(), size);
        let call = put_call("PutObject", key, opts, Vec::new());
        let p = progress.clone();
        let (resp, produced) = self
            .execute(&call, || {
                p.reset_to(0);
                let (b, rx) = body::file_range(path, 0, size, Some(p.clone()));
                Some((b, Some(rx)))
            })
            .await?;
        let etag = etag_of(&resp);
        check_md5("PutObject", key, &etag, produced)?;
        Ok(PutResult {
            size,
            etag,
            parts: Vec::new(),
        })
    }

    /// Uploads a small in-memory object.
    pub async fn put_object_bytes(
        &self,
        key: &str,
        data: Bytes,
        opts: &PutOptions,
    ) -> Result<PutResult, OssError> {
        let call = put_call("PutObject", key, opts, Vec::new());
        let size = data.len() as u64;
        let (resp, _) = self
            .execute(&call, || Some((OssBody::bytes(data.clone()), None)))
            .await?;
        let etag = etag_of(&resp);
        check_md5("PutObject", key, &etag, Some(Ok(md5_of(&data))))?;
        Ok(PutResult {
            size,
            etag,
            parts: Vec::new(),
        })
    }

    /// HeadObject.
    pub async fn head_object(&self, key: &str) -> Result<ObjectMeta, OssError> {
        let call = simple_call("HeadObject", Method::HEAD, key);
        let (resp, _) = self
            .execute(&call, || Some((OssBody::empty(), None)))
            .await?;
        Ok(meta_of(&resp))
    }

    /// GetObject, whole or `range` (`start..end`, end exclusive), streamed.
    pub async fn get_object(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<ObjectBody, OssError> {
        let mut call = simple_call("GetObject", Method::GET, key);
        if let Some(r) = &range {
            if r.end <= r.start {
                return Err(OssError::Invalid(format!("{key}: empty range {r:?}")));
            }
            call.headers
                .push(("Range".into(), format!("bytes={}-{}", r.start, r.end - 1)));
        }
        let (resp, _) = self
            .execute(&call, || Some((OssBody::empty(), None)))
            .await?;
        let meta = meta_of(&resp);
        Ok(ObjectBody {
            meta,
            body: resp.into_body(),
            op: "GetObject",
            key: key.to_string(),
        })
    }

    /// Downloads an object into `path` (created or truncated, then fsynced).
    pub async fn get_object_to_file(&self, key: &str, path: &Path) -> Result<ObjectMeta, OssError> {
        let body = self.get_object(key, None).await?;
        let meta = body.meta.clone();
        let io = |e| OssError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        body.write_to(&mut file, path).await?;
        file.sync_all().await.map_err(io)?;
        Ok(meta)
    }

    /// DeleteObject (OSS answers 204 whether or not the object existed).
    pub async fn delete_object(&self, key: &str) -> Result<(), OssError> {
        let call = simple_call("DeleteObject", Method::DELETE, key);
        self.execute(&call, || Some((OssBody::empty(), None)))
            .await?;
        Ok(())
    }

    /// A V4 presigned GET URL valid for `expires` (1 s ..= 7 days).
    pub async fn presign_get(&self, key: &str, expires: Duration) -> Result<String, OssError> {
        self.presign("GET", key, expires, Vec::new()).await
    }

    /// A V4 presigned PUT URL; the uploader must send the same `Content-Type`, if one is given.
    pub async fn presign_put(
        &self,
        key: &str,
        expires: Duration,
        content_type: Option<&str>,
    ) -> Result<String, OssError> {
        let headers = content_type
            .map(|c| vec![("Content-Type".to_string(), c.to_string())])
            .unwrap_or_default();
        self.presign("PUT", key, expires, headers).await
    }

    async fn presign(
        &self,
        method: &str,
        key: &str,
        expires: Duration,
        headers: Vec<(String, String)>,
    ) -> Result<String, OssError> {
        let secs = expires.as_secs();
        if secs == 0 || secs > sign::MAX_PRESIGN_EXPIRES {
            return Err(OssError::Invalid(format!(
                "presign expiry {secs} s outside 1..={}",
                sign::MAX_PRESIGN_EXPIRES
            )));
        }
        let mut req = RequestToSign::new(method, &self.cfg.bucket, key);
        req.headers = headers;
        let query = sign::presign_query(
            &req,
            &self.credentials().await?,
            &self.cfg.region,
            OffsetDateTime::now_utc(),
            secs,
        );
        Ok(self.object_url(key, &query))
    }
}

/// Uploads a file to a presigned PUT URL (e.g. one carried by a diagnostics command). No
/// credentials are needed; transient failures are retried like any OSS call.
pub async fn put_file_to_presigned_url(
    url: &str,
    path: &Path,
    content_type: Option<&str>,
    progress: Option<ProgressFn>,
) -> Result<PutResult, OssError> {
    let op = "PutObject(presigned)";
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| OssError::Invalid(format!("presigned URL: {e}")))?;
    let key = uri.path().to_string();
    let http = http_client()?;
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| OssError::Io {
            path: path.to_path_buf(),
            source: e,
        })?
        .len();
    if size > MAX_SINGLE_PUT {
        return Err(OssError::Invalid(format!(
            "{}: {size} bytes exceed the 5 GiB cap of a presigned PUT",
            path.display()
        )));
    }
    let progress = Progress::new(progress, size);
    // No bucket or region here: only the retry settings of the defaults are used.
    let cfg = OssConfig::new("", "");
    let mut attempt = 0;
    loop {
        attempt += 1;
        progress.reset_to(0);
        let (body, rx) = body::file_range(path, 0, size, Some(progress.clone()));
        let mut b = Request::builder()
            .method(Method::PUT)
            .uri(uri.clone())
            .header(hyper::header::CONTENT_LENGTH, size);
        if let Some(ct) = content_type {
            b = b.header(hyper::header::CONTENT_TYPE, ct);
        }
        let request = b
            .body(body)
            .map_err(|e| OssError::Invalid(format!("presigned PUT: {e}")))?;
        let response = http.request(request).await;
        let produced = rx.await.ok();
        if let Some(Err(SourceError::Io(path, e))) = produced {
            return Err(OssError::Io { path, source: e });
        }
        let error = match response {
            Err(e) => transport(op, &key, e),
            Ok(r) if r.status().is_success() => {
                let etag = etag_of(&r);
                check_md5(op, &key, &etag, produced)?;
                return Ok(PutResult {
                    size,
                    etag,
                    parts: Vec::new(),
                });
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let header_error = header_error(&r);
                let mut body = read_capped(r.into_body(), ERROR_BODY_CAP)
                    .await
                    .unwrap_or_default();
                if body.is_empty() {
                    body = header_error;
                }
                OssError::from_response(op, &key, status, None, &body)
            }
        };
        if !error.is_retryable() || attempt >= cfg.max_attempts {
            return Err(error);
        }
        tokio::time::sleep(backoff(&cfg, attempt)).await;
    }
}

fn simple_call<'a>(op: &'static str, method: Method, key: &'a str) -> Call<'a> {
    Call {
        op,
        method,
        key,
        query: Vec::new(),
        headers: Vec::new(),
    }
}

pub(crate) fn put_call<'a>(
    op: &'static str,
    key: &'a str,
    opts: &PutOptions,
    query: Vec<(String, String)>,
) -> Call<'a> {
    let mut headers = vec![(
        "Content-Type".to_string(),
        opts.content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into()),
    )];
    for (k, v) in &opts.metadata {
        headers.push((format!("x-oss-meta-{}", k.to_ascii_lowercase()), v.clone()));
    }
    Call {
        op,
        method: if query.iter().any(|(k, _)| k == "uploads") {
            Method::POST
        } else {
            Method::PUT
        },
        key,
        query,
        headers,
    }
}

fn meta_of(resp: &Response<Incoming>) -> ObjectMeta {
    let h = resp.headers();
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let metadata = h
        .iter()
        .filter_map(|(k, v)| {
            let name = k.as_str().strip_prefix("x-oss-meta-")?;
            Some((name.to_string(), v.to_str().ok()?.to_string()))
        })
        .collect();
    ObjectMeta {
        size: get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        etag: etag_of(resp),
        content_type: get("content-type"),
        last_modified: get("last-modified"),
        metadata,
    }
}
