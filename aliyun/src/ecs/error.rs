//! What an ECS call can fail with, and how each failure is handled.
//!
//! Alibaba answers errors with an HTTP status and a JSON body
//! `{"Code": "...", "Message": "...", "RequestId": "...", "Recommend": "..."}`. The code
//! decides the [`ErrorKind`]; the status only breaks ties (any 5xx is transient).

use crate::credentials::CredentialsError;

/// How an error should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `Throttling`, `Throttling.User`, `Throttling.Api`, …: retry with backoff.
    Throttled,
    /// 5xx, `ServiceUnavailable`, `InternalError`, transport failures, timeouts, and states
    /// that pass on their own (`IncorrectDiskStatus` while a disk is still attaching,
    /// `LastTokenProcessing` while the same ClientToken is in flight): retry with backoff.
    Transient,
    /// The resource does not exist (`InvalidDiskId.NotFound`, …).
    NotFound,
    /// The RAM policy does not allow the call (`Forbidden.RAM`, `NoPermission`, …).
    Forbidden,
    /// The credentials or the signature were refused (`SignatureDoesNotMatch`,
    /// `InvalidAccessKeyId.NotFound`, `InvalidTimeStamp.Expired` — a clock off by more than
    /// 15 minutes —, `MissingSecurityToken`, …): fix the credentials or the clock.
    Unauthenticated,
    /// The request is wrong; retrying will not help.
    Invalid,
}

impl ErrorKind {
    /// Whether the retry loop tries again.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Throttled | Self::Transient)
    }

    /// The kind of an error answer.
    pub fn classify(status: u16, code: &str) -> Self {
        const TRANSIENT: &[&str] = &[
            "ServiceUnavailable",
            "InternalError",
            "UnknownError",
            "OperationConflict",
            "LastTokenProcessing",
            "IncorrectDiskStatus",
            "IncorrectInstanceStatus",
            // An STS token that expired between fetch and use: the next attempt asks the
            // provider again, which refreshes.
            "InvalidSecurityToken.Expired",
        ];
        const UNAUTHENTICATED: &[&str] = &[
            "SignatureDoesNotMatch",
            "IncompleteSignature",
            "InvalidTimeStamp.Expired",
            "InvalidTimeStamp.Format",
            "SignatureNonceUsed",
            "MissingSecurityToken",
        ];
        let starts = |p: &str| code == p || code.starts_with(&format!("{p}."));
        if starts("Throttling") {
            Self::Throttled
        } else if TRANSIENT.iter().any(|c| starts(c)) || status >= 500 {
            Self::Transient
        } else if UNAUTHENTICATED.contains(&code)
            || starts("InvalidAccessKeyId")
            || starts("InvalidSecurityToken")
        {
            Self::Unauthenticated
        } else if starts("Forbidden") || code == "NoPermission" || code.starts_with("NoPermission.")
        {
            Self::Forbidden
        } else if code.ends_with(".NotFound") || code.ends_with("NotFound") {
            Self::NotFound
        } else {
            Self::Invalid
        }
    }
}

/// An ECS call that failed (after retries, when it was retryable). Every variant names the
/// action; answers from the cloud also carry code, message and request id, which is what
/// Alibaba support asks for.
#[derive(Debug, thiserror::Error)]
pub enum EcsError {
    #[error("ECS {action}: {code}: {message} (HTTP {status}, RequestId {request_id})")]
    Api {
        action: String,
        status: u16,
        code: String,
        message: String,
        request_id: String,
        kind: ErrorKind,
    },
    #[error("ECS {action}: no answer: {detail}")]
    Transport {
        action: String,
        detail: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("ECS {action}: no answer within {timeout:?}")]
    Timeout {
        action: String,
        timeout: std::time::Duration,
    },
    #[error(
        "ECS {action}: answer not understood (HTTP {status}, RequestId {request_id}): {detail}"
    )]
    Decode {
        action: String,
        status: u16,
        request_id: String,
        detail: String,
    },
    #[error("ECS {action}: no credentials: {source}")]
    Credentials {
        action: String,
        #[source]
        source: CredentialsError,
    },
    #[error("ECS client configuration: {0}")]
    Config(String),
    #[error("ECS {action}: gave up waiting: {detail}")]
    WaitTimedOut { action: String, detail: String },
}

impl EcsError {
    /// How to handle it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EcsError::Api { kind, .. } => *kind,
            EcsError::Transport { .. } | EcsError::Timeout { .. } => ErrorKind::Transient,
            // A provider failure (metadata service restarting) passes.
            EcsError::Credentials { .. } => ErrorKind::Transient,
            EcsError::Decode { status, .. } if *status >= 500 => ErrorKind::Transient,
            EcsError::Decode { .. } | EcsError::Config(_) | EcsError::WaitTimedOut { .. } => {
                ErrorKind::Invalid
            }
        }
    }

    /// The Alibaba error code of an error answer.
    pub fn code(&self) -> Option<&str> {
        match self {
            EcsError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The request id of the answer, when there was one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            EcsError::Api { request_id, .. } | EcsError::Decode { request_id, .. } => {
                Some(request_id)
            }
            _ => None,
        }
    }

    /// The HTTP status of the answer, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            EcsError::Api { status, .. } | EcsError::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        use ErrorKind::*;
        for (status, code, kind) in [
            (400, "Throttling.User", Throttled),
            (503, "Throttling", Throttled),
            (400, "Throttling.Api", Throttled),
            (503, "ServiceUnavailable", Transient),
            (500, "InternalError", Transient),
            (502, "SomethingNew", Transient),
            (403, "IncorrectDiskStatus", Transient),
            (403, "IncorrectDiskStatus.Initializing", Transient),
            (403, "IncorrectInstanceStatus", Transient),
            (404, "InvalidDiskId.NotFound", NotFound),
            (404, "InvalidSnapshotId.NotFound", NotFound),
            (403, "Forbidden.RAM", Forbidden),
            (403, "Forbidden", Forbidden),
            (403, "NoPermission", Forbidden),
            (400, "SignatureDoesNotMatch", Unauthenticated),
            (404, "InvalidAccessKeyId.NotFound", Unauthenticated),
            (400, "InvalidTimeStamp.Expired", Unauthenticated),
            (400, "MissingSecurityToken", Unauthenticated),
            (
                400,
                "InvalidSecurityToken.MismatchWithAccessKey",
                Unauthenticated,
            ),
            (400, "InvalidSecurityToken.Expired", Transient),
            (400, "InvalidParameter", Invalid),
            (400, "InvalidThrottlingSetting", Invalid),
        ] {
            assert_eq!(ErrorKind::classify(status, code), kind, "{code}");
        }
    }

    #[test]
    fn display_names_action_code_message_and_request_id() {
        let e = EcsError::Api {
            action: "CreateDisk".into(),
            status: 400,
            code: "InvalidParameter".into(),
            message: "Size is wrong".into(),
            request_id: "R-1".into(),
            kind: ErrorKind::Invalid,
        };
        let s = e.to_string();
        for part in [
            "CreateDisk",
            "InvalidParameter",
            "Size is wrong",
            "R-1",
            "400",
        ] {
            assert!(s.contains(part), "{s}");
        }
    }
}
