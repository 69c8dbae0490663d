//! OSS errors: the service's own (`<Error><Code>…`), transport, local files, and checks this
//! client makes on what the service answered.

use std::path::PathBuf;

use super::xml;

/// Anything an OSS call can fail with. [`OssError::is_retryable`] says which ones a retry
/// may cure.
#[derive(Debug, thiserror::Error)]
pub enum OssError {
    /// OSS answered with an error status and (usually) an `<Error>` document.
    #[error(transparent)]
    Service(Box<ServiceError>),
    /// Connecting, sending or waiting failed.
    #[error("OSS {op} {key}: {source}")]
    Transport {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The answer did not have the shape OSS documents.
    #[error("OSS {op} {key}: unexpected answer: {reason}")]
    Protocol {
        op: &'static str,
        key: String,
        reason: String,
    },
    /// OSS stored something other than what was sent.
    #[error("OSS {op} {key}: ETag {etag} is not the MD5 {md5} of the bytes sent")]
    Digest {
        op: &'static str,
        key: String,
        etag: String,
        md5: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The source yielded fewer or more bytes than announced.
    #[error("OSS {op} {key}: the source gave {got} bytes, {want} announced")]
    ShortSource {
        op: &'static str,
        key: String,
        got: u64,
        want: u64,
    },
    /// The credentials provider failed (e.g. the metadata service is unreachable).
    #[error("OSS credentials: {0}")]
    Credentials(#[source] crate::credentials::CredentialsError),
    /// Bad endpoint, key, size or URL.
    #[error("invalid OSS request: {0}")]
    Invalid(String),
}

/// An error answer from OSS: its `<Error>` document and the call it answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("OSS {op} {key}: HTTP {status} {code}: {message} (RequestId {request_id})")]
pub struct ServiceError {
    pub op: &'static str,
    pub key: String,
    pub status: u16,
    /// OSS's code, e.g. `SignatureDoesNotMatch`.
    pub code: String,
    pub message: String,
    pub request_id: String,
    pub host_id: String,
}

/// OSS codes that mean "slow down / try later" rather than "you are wrong".
const RETRYABLE_CODES: &[&str] = &[
    "RequestTimeout",
    "SlowDown",
    "ServerBusy",
    "InternalError",
    "ServiceUnavailable",
    "QpsLimitExceeded",
    "DownloadTrafficRateLimitExceeded",
];

impl OssError {
    /// True for 5xx, 429, throttling codes and transport failures.
    pub fn is_retryable(&self) -> bool {
        match self {
            OssError::Service(e) => {
                e.status >= 500
                    || e.status == 429
                    || e.code.starts_with("Throttling")
                    || RETRYABLE_CODES.contains(&e.code.as_str())
            }
            OssError::Transport { .. } | OssError::Credentials(_) => true,
            _ => false,
        }
    }

    /// OSS's error code, when OSS answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            OssError::Service(e) => Some(&e.code),
            _ => None,
        }
    }

    /// True when the object (or upload) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, OssError::Service(e) if e.status == 404)
    }

    /// Builds a service error from a status, the `x-oss-request-id` header and the body
    /// (empty for HEAD, where OSS sends no body).
    pub fn from_response(
        op: &'static str,
        key: &str,
        status: u16,
        request_id: Option<&str>,
        body: &[u8],
    ) -> Self {
        let doc = String::from_utf8_lossy(body);
        let code = xml::element(&doc, "Code").unwrap_or_else(|| match status {
            404 => "NoSuchKey".to_string(),
            403 => "AccessDenied".to_string(),
            s => format!("HTTP{s}"),
        });
        OssError::Service(Box::new(ServiceError {
            op,
            key: key.to_string(),
            status,
            code,
            message: xml::element(&doc, "Message").unwrap_or_default(),
            request_id: xml::element(&doc, "RequestId")
                .or_else(|| request_id.map(str::to_string))
                .unwrap_or_default(),
            host_id: xml::element(&doc, "HostId").unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_errors_are_read_from_the_xml_body() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>no &amp; no</Message><RequestId>R1</RequestId><HostId>h</HostId></Error>";
        let e = OssError::from_response("PutObject", "k", 403, None, body);
        assert_eq!(e.code(), Some("SignatureDoesNotMatch"));
        assert!(!e.is_retryable());
        let OssError::Service(se) = e else {
            panic!("not a service error")
        };
        assert_eq!(
            (
                se.message.as_str(),
                se.request_id.as_str(),
                se.host_id.as_str()
            ),
            ("no & no", "R1", "h")
        );
        let head = OssError::from_response("HeadObject", "k", 404, Some("R2"), b"");
        assert!(head.is_not_found() && head.code() == Some("NoSuchKey"));
        assert!(OssError::from_response("x", "k", 503, None, b"").is_retryable());
    }
}
