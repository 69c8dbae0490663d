//! Multipart upload: how objects above the threshold (and above OSS's 5 GiB PutObject cap)
//! travel.
//!
//! ```text
//! POST /k?uploads                        → <UploadId>
//! PUT  /k?partNumber=N&uploadId=U  × N   → ETag "MD5-HEX" (checked against what was sent)
//! POST /k?uploadId=U  <CompleteMultipartUpload> part numbers + ETags
//!                                        → ETag "HEX-N" where HEX = MD5(MD5(part1)‖…‖MD5(partN))
//! DELETE /k?uploadId=U                   on any failure, so no orphan parts are billed
//! ```
//!
//! Parts go one after the other, each streamed from the file and retried on its own; the
//! file is never held in memory.

use std::path::Path;

use bytes::Bytes;
use hyper::Method;

use super::body::{self, OssBody, Progress};
use super::client::{
    check_md5, etag_of, read_capped, transport, Call, OssClient, PutOptions, MAX_PARTS,
};
use super::error::OssError;
use super::objects::{put_call, PartResult, PutResult};
use super::xml;

/// Completion answers are small XML documents.
const RESULT_BODY_CAP: usize = 64 << 10;

/// The part size to use for `size` bytes: the configured one, raised so that no more than
/// 10 000 parts are needed.
pub fn part_size_for(configured: u64, size: u64) -> u64 {
    configured.max(size.div_ceil(MAX_PARTS))
}

/// The ETag OSS gives a completed multipart object, from the parts' MD5s.
pub fn multipart_etag(part_md5s: &[[u8; 16]]) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    for m in part_md5s {
        h.update(m);
    }
    format!("{}-{}", hex::encode_upper(h.finalize()), part_md5s.len())
}

impl OssClient {
    /// InitiateMultipartUpload; returns the upload id.
    pub async fn initiate_multipart_upload(
        &self,
        key: &str,
        opts: &PutOptions,
    ) -> Result<String, OssError> {
        let op = "InitiateMultipartUpload";
        let call = put_call(op, key, opts, vec![("uploads".into(), String::new())]);
        let (resp, _) = self
            .execute(&call, || Some((OssBody::empty(), None)))
            .await?;
        let body = read_capped(resp.into_body(), RESULT_BODY_CAP)
            .await
            .map_err(|e| transport(op, key, e))?;
        xml::element(&String::from_utf8_lossy(&body), "UploadId")
            .filter(|id| !id.is_empty())
            .ok_or_else(|| OssError::Protocol {
                op,
                key: key.to_string(),
                reason: "no UploadId in the answer".into(),
            })
    }

    /// UploadPart `number` (1-based) from bytes `range` of `path`, retried on its
    /// own; the returned ETag has been checked against the MD5 of the bytes sent.
    pub(crate) async fn upload_part_from_file(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        path: &Path,
        range: std::ops::Range<u64>,
        progress: &Progress,
    ) -> Result<PartResult, OssError> {
        let op = "UploadPart";
        let (offset, len) = (range.start, range.end - range.start);
        let call = Call {
            op,
            method: Method::PUT,
            key,
            query: vec![
                ("partNumber".into(), number.to_string()),
                ("uploadId".into(), upload_id.to_string()),
            ],
            headers: Vec::new(),
        };
        let base = progress.sent();
        let (resp, produced) = self
            .execute(&call, || {
                progress.reset_to(base);
                let (b, rx) = body::file_range(path, offset, len, Some(progress.clone()));
                Some((b, Some(rx)))
            })
            .await?;
        let etag = etag_of(&resp);
        let md5 = match &produced {
            Some(Ok(m)) => *m,
            _ => {
                return Err(OssError::Protocol {
                    op,
                    key: key.to_string(),
                    reason: format!("part {number}: the reader did not report its digest"),
                })
            }
        };
        if etag.is_empty() {
            return Err(OssError::Protocol {
                op,
                key: key.to_string(),
                reason: format!("part {number}: no ETag"),
            });
        }
        check_md5(op, key, &etag, produced)?;
        Ok(PartResult {
            number,
            size: len,
            etag,
            md5,
        })
    }

    /// CompleteMultipartUpload with the parts' numbers and ETags; returns the object's ETag.
    pub async fn complete_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartResult],
    ) -> Result<String, OssError> {
        let op = "CompleteMultipartUpload";
        let body = Bytes::from(xml::complete_multipart_body(
            &parts
                .iter()
                .map(|p| (p.number, format!("\"{}\"", p.etag)))
                .collect::<Vec<_>>(),
        ));
        let call = Call {
            op,
            method: Method::POST,
            key,
            query: vec![("uploadId".into(), upload_id.to_string())],
            headers: vec![("Content-Type".into(), "application/xml".into())],
        };
        let (resp, _) = self
            .execute(&call, || Some((OssBody::bytes(body.clone()), None)))
            .await?;
        let header_etag = etag_of(&resp);
        let doc = read_capped(resp.into_body(), RESULT_BODY_CAP)
            .await
            .map_err(|e| transport(op, key, e))?;
        let etag = xml::element(&String::from_utf8_lossy(&doc), "ETag")
            .map(|e| e.trim_matches('"').to_string())
            .unwrap_or(header_etag);
        Ok(etag)
    }

    /// AbortMultipartUpload.
    pub async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> Result<(), OssError> {
        let call = Call {
            op: "AbortMultipartUpload",
            method: Method::DELETE,
            key,
            query: vec![("uploadId".into(), upload_id.to_string())],
            headers: Vec::new(),
        };
        self.execute(&call, || Some((OssBody::empty(), None)))
            .await?;
        Ok(())
    }

    /// Uploads `size` bytes of `path` by multipart; aborts the upload if any step fails.
    pub(crate) async fn multipart_upload_file(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        opts: &PutOptions,
    ) -> Result<PutResult, OssError> {
        let upload_id = self.initiate_multipart_upload(key, opts).await?;
        match self.upload_parts(key, &upload_id, path, size, opts).await {
            Ok(r) => Ok(r),
            Err(e) => {
                if let Err(abort) = self.abort_multipart_upload(key, &upload_id).await {
                    tracing::warn!(key, upload_id, error = %abort, "aborting a failed multipart upload failed too");
                }
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        path: &Path,
        size: u64,
        opts: &PutOptions,
    ) -> Result<PutResult, OssError> {
        let part_size = part_size_for(self.cfg.part_size, size);
        let progress = Progress::new(opts.progress.clone(), size);
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1u32;
        while offset < size {
            let len = part_size.min(size - offset);
            let part = self
                .upload_part_from_file(
                    key,
                    upload_id,
                    number,
                    path,
                    offset..offset + len,
                    &progress,
                )
                .await?;
            parts.push(part);
            offset += len;
            number += 1;
        }
        let etag = self
            .complete_multipart_upload(key, upload_id, &parts)
            .await?;
        let expected = multipart_etag(&parts.iter().map(|p| p.md5).collect::<Vec<_>>());
        if !etag.eq_ignore_ascii_case(&expected) {
            return Err(OssError::Digest {
                op: "CompleteMultipartUpload",
                key: key.to_string(),
                etag,
                md5: expected,
            });
        }
        Ok(PutResult { size, etag, parts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_grows_past_ten_thousand_parts() {
        assert_eq!(part_size_for(64 << 20, 6 << 30), 64 << 20);
        let huge = 10_000 * (64u64 << 20) + 1;
        assert!(huge.div_ceil(part_size_for(64 << 20, huge)) <= MAX_PARTS);
    }

    #[test]
    fn multipart_etag_is_md5_of_md5s() {
        // Two parts "a" and "b": MD5(MD5("a") ‖ MD5("b")).
        let a = crate::oss::client::md5_of(b"a");
        let b = crate::oss::client::md5_of(b"b");
        let mut cat = a.to_vec();
        cat.extend_from_slice(&b);
        let want = format!("{}-2", hex::encode_upper(crate::oss::client::md5_of(&cat)));
        assert_eq!(multipart_etag(&[a, b]), want);
    }
}
