//! [`AwsError`]: one error type for every EC2 and EBS direct call, carrying what an operator needs (the
//! operation, AWS's error code and message, the request id for AWS support) and what the
//! retry loop needs (the [`ErrorKind`]).
//!
//! EC2 models no error shapes, so classification branches on the `code()` string from
//! `ProvideErrorMetadata` (EBS's modeled errors have codes too: `RequestThrottledException`,
//! `ResourceNotFoundException`, …, classified the same way). Plain `Display` of an SDK error says only "service error", so the
//! non-service cases (timeouts, dispatch failures) keep `DisplayErrorContext`'s full chain.

use std::error::Error as StdError;
use std::fmt;

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;

/// How an error should be handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// `RequestLimitExceeded` and friends: retry with backoff.
    Throttled,
    /// 5xx, timeouts, connection failures: retry with backoff (the call may have happened).
    Transient,
    /// The resource does not exist (`InvalidVolume.NotFound`, …). Right after a create this is
    /// eventual consistency and retried for a short window.
    NotFound,
    /// The credentials (the gateway's instance role, an operator's user) may not do `action`
    /// (e.g. `ec2:CreateVolume`): fix the IAM policy.
    AccessDenied { action: String },
    /// The request is wrong for the resource's state or parameters; retrying will not help.
    Invalid,
    /// A wait ran out of time (the resource never reached the wanted state).
    TimedOut,
    /// Anything else; not retried.
    Other,
}

impl ErrorKind {
    /// Whether the retry loop tries again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled | Self::Transient)
    }
}

/// An EC2 call that failed (after retries, when it was retryable).
#[derive(Debug, Clone, thiserror::Error)]
pub struct AwsError {
    /// The IAM action of the call, e.g. `ec2:CreateVolume`.
    pub op: &'static str,
    /// AWS's error code, e.g. `InvalidVolume.NotFound`; `None` when no response came back.
    pub code: Option<String>,
    /// AWS's message, or the full error chain when there was no service response.
    pub message: String,
    /// The request id AWS support asks for; `None` when no response came back.
    pub request_id: Option<String>,
    /// HTTP status of the response, when there was one.
    pub http_status: Option<u16>,
    pub kind: ErrorKind,
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::AccessDenied { action } => write!(
                f,
                "{}: access denied: the IAM policy of these credentials lacks {action}",
                self.op
            )?,
            _ => write!(f, "{} failed", self.op)?,
        }
        if let Some(code) = &self.code {
            write!(f, ": {code}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " (request id {id})")?;
        }
        Ok(())
    }
}

impl AwsError {
    /// An error made by this crate rather than by AWS (a wait that ran out, a response
    /// missing a field).
    pub fn local(op: &'static str, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            op,
            code: None,
            message: message.into(),
            request_id: None,
            http_status: None,
            kind,
        }
    }

    /// A response that lacked a field the call needs (AWS always sends it; an emulator may not).
    pub(crate) fn missing(op: &'static str, what: &str) -> Self {
        Self::local(op, ErrorKind::Other, format!("response has no {what}"))
    }

    /// Classifies an SDK error of operation `op`.
    pub(crate) fn from_sdk<E>(op: &'static str, err: &SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        match err {
            SdkError::ServiceError(service) => {
                let raw = service.raw();
                let status = raw.status().as_u16();
                let meta = service.err();
                let code = meta.code().map(str::to_owned);
                let request_id = err
                    .request_id()
                    .map(str::to_owned)
                    .or_else(|| raw.body().bytes().and_then(request_id_from_body));
                let message = match meta.message() {
                    Some(m) => m.to_owned(),
                    // no parsable EC2 error body (an HTML 5xx page): keep the whole chain
                    None => DisplayErrorContext(err).to_string(),
                };
                let kind = classify(op, code.as_deref(), Some(status));
                Self {
                    op,
                    code,
                    message,
                    request_id,
                    http_status: Some(status),
                    kind,
                }
            }
            SdkError::ResponseError(resp) => {
                // A response that did not parse: an HTML 5xx page from a load balancer, a
                // truncated body. Transient when the status says so.
                let status = resp.raw().status().as_u16();
                Self {
                    op,
                    code: None,
                    message: DisplayErrorContext(err).to_string(),
                    request_id: err.request_id().map(str::to_owned),
                    http_status: Some(status),
                    kind: classify(op, None, Some(status)),
                }
            }
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => Self {
                op,
                code: None,
                message: DisplayErrorContext(err).to_string(),
                request_id: None,
                http_status: None,
                kind: ErrorKind::Transient,
            },
            // ConstructionFailure (a bad request built by us or credentials missing) and
            // future variants: not retryable.
            _ => Self {
                op,
                code: None,
                message: DisplayErrorContext(err).to_string(),
                request_id: None,
                http_status: None,
                kind: ErrorKind::Other,
            },
        }
    }
}

/// EC2 error codes that mean "slow down". `RequestLimitExceeded` is EC2's; the others are
/// the spellings other AWS query services and proxies use.
const THROTTLE_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "EC2ThrottledException",
    "BandwidthLimitExceeded",
    // EBS direct: too many StartSnapshot calls in flight for the account.
    "ConcurrentLimitExceededException",
];

/// Server-side codes worth retrying: the request was not executed, or can be repeated.
const TRANSIENT_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "InternalServerException",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
];

/// Codes that mean "the role's policy does not allow this".
const DENIED_CODES: &[&str] = &[
    "UnauthorizedOperation",
    "AccessDenied",
    "AccessDeniedException",
];

/// Classifies an error code (and HTTP status) of operation `op`.
pub fn classify(op: &str, code: Option<&str>, status: Option<u16>) -> ErrorKind {
    if let Some(code) = code {
        if THROTTLE_CODES.contains(&code) {
            return ErrorKind::Throttled;
        }
        if TRANSIENT_CODES.contains(&code) {
            return ErrorKind::Transient;
        }
        if DENIED_CODES.contains(&code) {
            return ErrorKind::AccessDenied {
                action: op.to_owned(),
            };
        }
        // InvalidVolume.NotFound, InvalidSnapshot.NotFound, InvalidInstanceID.NotFound,
        // InvalidAMIID.NotFound, InvalidLaunchTemplateId.NotFound, … and EBS's
        // ResourceNotFoundException.
        if code.ends_with("NotFound") || code.ends_with("NotFoundException") {
            return ErrorKind::NotFound;
        }
        if code.starts_with("Invalid")
            || code.starts_with("Missing")
            || code.starts_with("Unknown")
            || matches!(
                code,
                "IncorrectState"
                    | "IncorrectInstanceState"
                    | "VolumeInUse"
                    | "IdempotentParameterMismatch"
                    | "ValidationError"
                    | "ValidationException"
                    | "ConflictException"
                    | "UnsupportedOperation"
                    | "OptInRequired"
            )
        {
            return ErrorKind::Invalid;
        }
    }
    match status {
        Some(500..=599) => ErrorKind::Transient,
        Some(429) => ErrorKind::Throttled,
        Some(401 | 403) => ErrorKind::AccessDenied {
            action: op.to_owned(),
        },
        _ => ErrorKind::Other,
    }
}

/// EC2 puts the request id in the XML body (`<RequestID>` in errors, `<requestId>` in
/// results); the SDK reads only the `x-amzn-requestid` header, which not every server sends.
fn request_id_from_body(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    for tag in ["RequestID", "RequestId", "requestId"] {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        if let Some(start) = text.find(&open) {
            let rest = &text[start + open.len()..];
            if let Some(end) = rest.find(&close) {
                let id = rest[..end].trim();
                if !id.is_empty() {
                    return Some(id.to_owned());
                }
            }
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(
            classify("ec2:CreateVolume", Some("RequestLimitExceeded"), Some(503)),
            ErrorKind::Throttled
        );
        assert_eq!(
            classify(
                "ec2:DescribeVolumes",
                Some("InvalidVolume.NotFound"),
                Some(400)
            ),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify("ec2:CreateVolume", Some("UnauthorizedOperation"), Some(403)),
            ErrorKind::AccessDenied {
                action: "ec2:CreateVolume".into()
            }
        );
        assert_eq!(
            classify("ec2:AttachVolume", Some("InvalidParameterValue"), Some(400)),
            ErrorKind::Invalid
        );
        assert_eq!(
            classify("ec2:AttachVolume", Some("InternalError"), Some(500)),
            ErrorKind::Transient
        );
        assert_eq!(
            classify("ec2:AttachVolume", None, Some(502)),
            ErrorKind::Transient
        );
        assert_eq!(
            classify("ec2:AttachVolume", Some("Weird"), Some(400)),
            ErrorKind::Other
        );
    }

    #[test]
    fn ebs_direct_codes_are_classified() {
        let put = "ebs:PutSnapshotBlock";
        assert_eq!(
            classify(put, Some("RequestThrottledException"), Some(400)),
            ErrorKind::Throttled
        );
        assert_eq!(
            classify(
                "ebs:StartSnapshot",
                Some("ConcurrentLimitExceededException"),
                Some(400)
            ),
            ErrorKind::Throttled
        );
        assert_eq!(
            classify(put, Some("InternalServerException"), Some(500)),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(put, Some("ResourceNotFoundException"), Some(404)),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify(put, Some("ValidationException"), Some(400)),
            ErrorKind::Invalid
        );
        assert_eq!(
            classify("ebs:StartSnapshot", Some("ConflictException"), Some(409)),
            ErrorKind::Invalid
        );
        assert_eq!(
            classify(put, Some("AccessDeniedException"), Some(403)),
            ErrorKind::AccessDenied { action: put.into() }
        );
    }

    #[test]
    fn request_id_is_read_from_an_ec2_error_body() {
        let body = b"<Response><Errors><Error><Code>X</Code></Error></Errors><RequestID>abc-1</RequestID></Response>";
        assert_eq!(request_id_from_body(body).as_deref(), Some("abc-1"));
        assert_eq!(request_id_from_body(b"<Response/>"), None);
    }

    #[test]
    fn access_denied_names_the_action() {
        let e = AwsError {
            op: "ec2:CreateSnapshot",
            code: Some("UnauthorizedOperation".into()),
            message: "You are not authorized to perform this operation.".into(),
            request_id: Some("r-1".into()),
            http_status: Some(403),
            kind: classify(
                "ec2:CreateSnapshot",
                Some("UnauthorizedOperation"),
                Some(403),
            ),
        };
        let s = e.to_string();
        assert!(
            s.contains("lacks ec2:CreateSnapshot") && s.contains("request id r-1"),
            "{s}"
        );
    }
}

/// Building an [`crate::Ec2`] client failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no region configured and IMDS did not give one")]
    Region(#[source] crate::imds::ImdsError),
    #[error("access_key_id and secret_access_key must be set together (tests only; production uses the instance profile)")]
    HalfCredentials,
}
