//! Object data on disk: bodies received sparse with their MD5, multipart parts kept as the
//! completed object's segments, ranged reads across segments.

use super::*;

/// True when the block holds only zeros (written as a hole).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Receives a body into `path` on a blocking thread: MD5 as it goes, zeros become holes.
async fn receive_body(
    st: &State,
    headers: &HeaderMap,
    mut body: Incoming,
) -> Result<(PathBuf, u64, [u8; 16]), OssFault> {
    let declared: Option<u64> = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(fault(
            StatusCode::BAD_REQUEST,
            "EntityTooLarge",
            "Your proposed upload exceeds the maximum allowed object size.",
        ));
    }
    let path = st.temp_path();
    let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let p = path.clone();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, [u8; 16])> {
        let mut file = std::fs::File::create(&p)?;
        let mut md5 = Md5::new();
        let (mut pos, mut written_to) = (0u64, 0u64);
        while let Some(chunk) = rx.blocking_recv() {
            md5.update(&chunk);
            if !is_zero(&chunk) {
                if written_to != pos {
                    file.seek(SeekFrom::Start(pos))?;
                }
                file.write_all(&chunk)?;
                written_to = pos + chunk.len() as u64;
            }
            pos += chunk.len() as u64;
        }
        file.set_len(pos)?;
        Ok((pos, md5.finalize().into()))
    });
    let mut received = 0u64;
    let mut failure = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    received += data.len() as u64;
                    if received > MAX_BODY {
                        failure = Some(fault(
                            StatusCode::BAD_REQUEST,
                            "EntityTooLarge",
                            "body above 5 GiB",
                        ));
                        break;
                    }
                    if tx.send(data).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                failure = Some(fault(
                    StatusCode::BAD_REQUEST,
                    "IncompleteBody",
                    e.to_string(),
                ));
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await;
    let result = match (failure, written) {
        (Some(f), _) => Err(f),
        (None, Ok(Ok((n, md5)))) => {
            if declared.is_some_and(|d| d != n) {
                Err(fault(
                    StatusCode::BAD_REQUEST,
                    "IncompleteBody",
                    format!("{n} bytes received, Content-Length said otherwise"),
                ))
            } else {
                Ok((path.clone(), n, md5))
            }
        }
        (None, Ok(Err(e))) => Err(fault(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            e.to_string(),
        )),
        (None, Err(e)) => Err(fault(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            e.to_string(),
        )),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    result
}

fn quoted_md5(md5: &[u8; 16]) -> String {
    format!("\"{}\"", hex::encode_upper(md5))
}

fn user_meta(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(k, v)| {
            let n = k.as_str().strip_prefix("x-oss-meta-")?;
            Some((n.to_string(), v.to_str().ok()?.to_string()))
        })
        .collect()
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string()
}

fn internal(e: impl std::fmt::Display) -> OssFault {
    fault(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        e.to_string(),
    )
}

fn with_etag(status: StatusCode, etag: &str) -> Reply {
    Response::builder()
        .status(status)
        .header("etag", etag)
        .header("content-length", 0)
        .body(OssBody::empty())
        .map_err(internal)
}

pub(super) async fn put_object(
    st: &State,
    t: &Target,
    headers: &HeaderMap,
    body: Incoming,
) -> Reply {
    let (tmp, size, md5) = receive_body(st, headers, body).await?;
    let data = st
        .cfg
        .root
        .join("objects")
        .join(st.next_id.fetch_add(1, Ordering::Relaxed).to_string());
    std::fs::rename(&tmp, &data).map_err(internal)?;
    let etag = quoted_md5(&md5);
    let old = st.index.lock().map_err(internal)?.objects.insert(
        t.key.clone(),
        Object {
            size,
            etag: etag.clone(),
            content_type: content_type(headers),
            metadata: user_meta(headers),
            last_modified: st.now(),
            segments: vec![(data, size)],
        },
    );
    remove_segments(old);
    with_etag(StatusCode::OK, &etag)
}

fn remove_segments(old: Option<Object>) {
    for (p, _) in old.map(|o| o.segments).unwrap_or_default() {
        let _ = std::fs::remove_file(p);
    }
}

pub(super) fn initiate(st: &State, t: &Target, headers: &HeaderMap) -> Reply {
    let id = format!("{:032X}", st.next_id.fetch_add(1, Ordering::Relaxed));
    std::fs::create_dir_all(st.cfg.root.join("uploads").join(&id)).map_err(internal)?;
    st.index.lock().map_err(internal)?.uploads.insert(
        id.clone(),
        Upload {
            key: t.key.clone(),
            content_type: content_type(headers),
            metadata: user_meta(headers),
            parts: BTreeMap::new(),
        },
    );
    xml_reply(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<InitiateMultipartUploadResult>\n  <Bucket>{}</Bucket>\n  <Key>{}</Key>\n  <UploadId>{id}</UploadId>\n</InitiateMultipartUploadResult>\n",
        xml::escape(&t.bucket),
        xml::escape(&t.key)
    ))
}

fn xml_reply(doc: String) -> Reply {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/xml")
        .header("content-length", doc.len())
        .body(OssBody::bytes(doc))
        .map_err(internal)
}

fn no_upload() -> OssFault {
    fault(
        StatusCode::NOT_FOUND,
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.",
    )
}

fn check_upload(st: &State, id: &str, key: &str) -> Result<(), OssFault> {
    match st.index.lock().map_err(internal)?.uploads.get(id) {
        Some(u) if u.key == key => Ok(()),
        _ => Err(no_upload()),
    }
}

pub(super) async fn upload_part(
    st: &State,
    t: &Target,
    id: &str,
    headers: &HeaderMap,
    body: Incoming,
) -> Reply {
    let number: u32 = query_value(&t.query, "partNumber")
        .and_then(|n| n.parse().ok())
        .filter(|n| (1..=MAX_PART_NUMBER).contains(n))
        .ok_or_else(|| {
            fault(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                "partNumber must be 1..10000",
            )
        })?;
    check_upload(st, id, &t.key)?;
    let (tmp, size, md5) = receive_body(st, headers, body).await?;
    let dest = st.cfg.root.join("uploads").join(id).join(format!(
        "{number:05}.{}",
        st.next_id.fetch_add(1, Ordering::Relaxed)
    ));
    let old = {
        let mut idx = st.index.lock().map_err(internal)?;
        let Some(u) = idx.uploads.get_mut(id) else {
            let _ = std::fs::remove_file(&tmp);
            return Err(no_upload());
        };
        std::fs::rename(&tmp, &dest).map_err(internal)?;
        u.parts.insert(number, (dest, size, md5))
    };
    if let Some((p, _, _)) = old {
        let _ = std::fs::remove_file(p);
    }
    with_etag(StatusCode::OK, &quoted_md5(&md5))
}

pub(super) async fn complete(st: &State, t: &Target, id: &str, body: Incoming) -> Reply {
    check_upload(st, id, &t.key)?;
    let doc = crate::oss::client::read_capped(body, MAX_XML_BODY + 1)
        .await
        .map_err(|e| fault(StatusCode::BAD_REQUEST, "IncompleteBody", e.to_string()))?;
    if doc.len() > MAX_XML_BODY {
        return Err(fault(
            StatusCode::BAD_REQUEST,
            "MalformedXML",
            "document too large",
        ));
    }
    let listed = xml::parse_complete_multipart(&String::from_utf8_lossy(&doc))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            fault(
                StatusCode::BAD_REQUEST,
                "MalformedXML",
                "The XML you provided was not well-formed.",
            )
        })?;
    let mut idx = st.index.lock().map_err(internal)?;
    let upload = idx.uploads.get(id).ok_or_else(no_upload)?;
    let mut segments = Vec::new();
    let mut md5s = Vec::new();
    let mut prev = 0;
    for (i, (n, etag)) in listed.iter().enumerate() {
        if *n <= prev {
            return Err(fault(
                StatusCode::BAD_REQUEST,
                "InvalidPartOrder",
                "The list of parts was not in ascending order.",
            ));
        }
        prev = *n;
        let Some((path, size, md5)) = upload.parts.get(n) else {
            return Err(fault(
                StatusCode::BAD_REQUEST,
                "InvalidPart",
                format!("part {n} was not uploaded"),
            ));
        };
        if !etag
            .trim_matches('"')
            .eq_ignore_ascii_case(&hex::encode_upper(md5))
        {
            return Err(fault(
                StatusCode::BAD_REQUEST,
                "InvalidPart",
                format!("part {n}: ETag does not match"),
            ));
        }
        if i + 1 < listed.len() && *size < MIN_PART {
            return Err(fault(
                StatusCode::BAD_REQUEST,
                "EntityTooSmall",
                "Your proposed upload is smaller than the minimum allowed object size.",
            ));
        }
        segments.push((path.clone(), *size));
        md5s.push(*md5);
    }
    let Some(upload) = idx.uploads.remove(id) else {
        return Err(no_upload());
    };
    let etag = format!("\"{}\"", crate::oss::multipart::multipart_etag(&md5s));
    let size = segments.iter().map(|(_, s)| s).sum();
    for (n, (p, _, _)) in &upload.parts {
        if !listed.iter().any(|(m, _)| m == n) {
            let _ = std::fs::remove_file(p);
        }
    }
    let old = idx.objects.insert(
        t.key.clone(),
        Object {
            size,
            etag: etag.clone(),
            content_type: upload.content_type,
            metadata: upload.metadata,
            last_modified: st.now(),
            segments,
        },
    );
    drop(idx);
    remove_segments(old);
    let doc = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CompleteMultipartUploadResult>\n  <Location>/{}/{}</Location>\n  <Bucket>{}</Bucket>\n  <Key>{}</Key>\n  <ETag>{}</ETag>\n</CompleteMultipartUploadResult>\n",
        xml::escape(&t.bucket),
        xml::escape(&t.key),
        xml::escape(&t.bucket),
        xml::escape(&t.key),
        xml::escape(&etag)
    );
    let mut r = xml_reply(doc)?;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&etag) {
        r.headers_mut().insert("etag", v);
    }
    Ok(r)
}

pub(super) fn abort(st: &State, id: &str) -> Reply {
    let upload = st
        .index
        .lock()
        .map_err(internal)?
        .uploads
        .remove(id)
        .ok_or_else(no_upload)?;
    drop(upload);
    let _ = std::fs::remove_dir_all(st.cfg.root.join("uploads").join(id));
    ok(StatusCode::NO_CONTENT)
}

/// `bytes=a-b` / `bytes=a-` / `bytes=-n` against `size`; `None` means "whole object"
/// (OSS ignores ranges it cannot read), `Err` means unsatisfiable.
fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, OssFault> {
    let Some(spec) = h.and_then(|h| h.strip_prefix("bytes=")) else {
        return Ok(None);
    };
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(s), Some(e)) if e >= s => (s, e.min(size.saturating_sub(1))),
        (Some(s), None) if b.is_empty() => (s, size.saturating_sub(1)),
        (None, Some(n)) if a.is_empty() && n > 0 => {
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        _ => return Ok(None),
    };
    if start >= size {
        return Err(fault(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "InvalidRange",
            "The requested range cannot be satisfied.",
        ));
    }
    Ok(Some((start, end)))
}

pub(super) fn get_object(st: &State, t: &Target, headers: &HeaderMap, head: bool) -> Reply {
    let obj = st
        .index
        .lock()
        .map_err(internal)?
        .objects
        .get(&t.key)
        .cloned()
        .ok_or_else(|| {
            fault(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            )
        })?;
    let range = if head {
        None
    } else {
        parse_range(
            headers
                .get(hyper::header::RANGE)
                .and_then(|v| v.to_str().ok()),
            obj.size,
        )?
    };
    let (start, len) = match range {
        Some((s, e)) => (s, e - s + 1),
        None => (0, obj.size),
    };
    let last_modified = obj
        .last_modified
        .format(time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        ))
        .unwrap_or_default();
    let mut b = Response::builder()
        .status(if range.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header("etag", &obj.etag)
        .header("content-type", &obj.content_type)
        .header("content-length", len)
        .header("last-modified", last_modified)
        .header("accept-ranges", "bytes");
    if range.is_some() {
        b = b.header(
            "content-range",
            format!("bytes {start}-{}/{}", start + len - 1, obj.size),
        );
    }
    for (k, v) in &obj.metadata {
        b = b.header(format!("x-oss-meta-{k}"), v);
    }
    let body = if head || len == 0 {
        OssBody::empty()
    } else {
        let (tx, rx) = mpsc::channel(4);
        let segments = obj.segments.clone();
        tokio::task::spawn_blocking(move || send_range(&segments, start, len, &tx));
        OssBody::channel(rx, len)
    };
    b.body(body).map_err(internal)
}

/// Reads `len` bytes from `start` across the segments into `tx`.
fn send_range(
    segments: &[(PathBuf, u64)],
    start: u64,
    len: u64,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut skip = start;
    let mut left = len;
    for (path, size) in segments {
        if left == 0 {
            return;
        }
        if skip >= *size {
            skip -= size;
            continue;
        }
        let mut f = match std::fs::File::open(path)
            .and_then(|mut f| f.seek(SeekFrom::Start(skip)).map(|_| f))
        {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        let mut here = (size - skip).min(left);
        skip = 0;
        while here > 0 {
            let mut buf = vec![0u8; here.min(1 << 20) as usize];
            if let Err(e) = f.read_exact(&mut buf) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
            here -= buf.len() as u64;
            left -= buf.len() as u64;
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_http_rules() {
        assert_eq!(
            parse_range(Some("bytes=0-9"), 100).ok().flatten(),
            Some((0, 9))
        );
        assert_eq!(
            parse_range(Some("bytes=90-"), 100).ok().flatten(),
            Some((90, 99))
        );
        assert_eq!(
            parse_range(Some("bytes=-10"), 100).ok().flatten(),
            Some((90, 99))
        );
        assert_eq!(
            parse_range(Some("bytes=95-200"), 100).ok().flatten(),
            Some((95, 99))
        );
        assert!(parse_range(Some("bytes=100-"), 100).is_err());
        assert_eq!(parse_range(Some("items=1-2"), 100).ok().flatten(), None);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
    }
}
