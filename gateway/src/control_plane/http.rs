//! Request and response plumbing of the control plane: the API error, capped body reading,
//! bearer tokens, JSON answers.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::store::StoreError;
use crate::api::{codes, ErrorBody, ErrorDetail};

/// Largest request body accepted. The largest legitimate one is a status report listing every
/// snapshot of every disk, well below this.
pub const MAX_BODY_BYTES: usize = 1 << 20;

pub type Resp = Response<Full<Bytes>>;

/// An error answer: status, machine-readable code, sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn into_response(self) -> Resp {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        json(self.status, &body)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::TokenInvalid => Self::new(
                StatusCode::UNAUTHORIZED,
                codes::BOOTSTRAP_TOKEN_INVALID,
                e.to_string(),
            ),
            StoreError::TokenUsed => Self::new(
                StatusCode::UNAUTHORIZED,
                codes::BOOTSTRAP_TOKEN_USED,
                e.to_string(),
            ),
            StoreError::NotFound { .. } => Self::not_found(e.to_string()),
            StoreError::Conflict(_) => {
                Self::new(StatusCode::CONFLICT, codes::CONFLICT, e.to_string())
            }
            StoreError::BadRequest(_) => Self::bad_request(e.to_string()),
            StoreError::Read { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Version { .. }
            | StoreError::Encode(_)
            | StoreError::Write { .. } => {
                tracing::error!(error = %error_chain(&e), "state change not saved");
                Self::internal("the control plane could not save its state; see its log")
            }
        }
    }
}

/// `e` and its sources, joined by `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

fn with_body(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A JSON answer.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(v) => with_body(status, "application/json", Bytes::from(v)),
        Err(e) => with_body(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            Bytes::from(format!("cannot encode the answer: {e}\n")),
        ),
    }
}

pub fn html(page: &'static str) -> Resp {
    with_body(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(page.as_bytes()),
    )
}

pub fn no_content() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The bearer token of a request.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Reads the whole body, at most [`MAX_BODY_BYTES`].
pub async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::BAD_REQUEST,
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let announced = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::bad_request(format!(
            "the request body did not arrive within {} s",
            BODY_READ_TIMEOUT.as_secs()
        ))
    })?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the body failed: {e}"
        ))),
    }
}

/// Longest a client may take to send a body (at most 1 MiB): a slow sender must not hold a
/// connection slot for ever, `/v1/register` being open to anyone who can reach the port.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Decodes a JSON body.
pub fn parse<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}

/// Decodes an optional JSON body: empty means the default.
pub fn parse_optional<T: DeserializeOwned + Default>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(body, what)
}

/// The value of `name` in a query string (no percent-decoding: the values are numbers).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_query_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);

        assert_eq!(query_param(Some("wait=5"), "wait"), Some("5"));
        assert_eq!(query_param(Some("a=1&wait=25"), "wait"), Some("25"));
        assert_eq!(query_param(Some("wait"), "wait"), Some(""));
        assert_eq!(query_param(Some("waiting=1"), "wait"), None);
        assert_eq!(query_param(None, "wait"), None);
    }

    #[test]
    fn store_errors_map_to_api_codes() {
        let e: ApiError = StoreError::TokenUsed.into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNAUTHORIZED, codes::BOOTSTRAP_TOKEN_USED)
        );
        let e: ApiError = StoreError::Conflict("x".into()).into();
        assert_eq!((e.status, e.code), (StatusCode::CONFLICT, codes::CONFLICT));
        let e: ApiError = StoreError::NotFound {
            what: "disk",
            id: "d".into(),
        }
        .into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, codes::NOT_FOUND)
        );
    }
}
