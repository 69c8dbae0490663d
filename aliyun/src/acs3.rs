//! Alibaba Cloud OpenAPI signature V3 (`ACS3-HMAC-SHA256`), for ECS and every other
//! "OpenAPI portal" product. Pure functions: the client signs with them and the local test
//! server (`testing::ecs_server`) verifies with them, so both sides share one definition.
//!
//! ```text
//! CanonicalRequest =
//!     METHOD                      "POST"
//!     '\n' CanonicalURI           "/" for RPC-style APIs; RFC 3986 path otherwise
//!     '\n' CanonicalQueryString   k=v pairs, RFC 3986-encoded, sorted by key, joined by '&'
//!     '\n' CanonicalHeaders       "name:trimmed value\n" per header, lowercased, sorted
//!     '\n' SignedHeaders          "host;x-acs-action;…" (the same names, ';'-joined)
//!     '\n' HashedRequestPayload   hex(sha256(body)), also sent as x-acs-content-sha256
//!
//! StringToSign  = "ACS3-HMAC-SHA256" '\n' hex(sha256(CanonicalRequest))
//! Signature     = hex(hmac_sha256(AccessKeySecret, StringToSign))
//! Authorization: ACS3-HMAC-SHA256 Credential=<AccessKeyId>,SignedHeaders=<…>,Signature=<…>
//! ```
//!
//! RFC 3986 encoding leaves only `A-Z a-z 0-9 - _ . ~` as they are: a space is `%20` (never
//! `+`), `*` is `%2A`, `~` stays `~`. The query string *on the wire* may differ: the official
//! Python SDK sends spaces as `+` (form encoding), and the server decodes before it
//! canonicalizes, so a verifier must canonicalize the decoded pairs, never the raw string.
//!
//! Which headers are signed is the signer's choice, listed in `SignedHeaders`; Alibaba's rule
//! is that `host`, every `x-acs-*` header and `content-type` must be among them. The official
//! SDK signs every header it sends (`accept` and `user-agent` too). The signed `host` is the
//! `Host` header exactly, port included when it is not the scheme's default.
//!
//! Frozen values: the algorithm name and the SHA-256 of the empty body
//! ([`EMPTY_PAYLOAD_SHA256`]), which every RPC request (parameters in the query) carries.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

use crate::credentials::Credentials;

/// The signature algorithm, as it appears in `Authorization` and the string to sign.
pub const ALGORITHM: &str = "ACS3-HMAC-SHA256";

/// `hex(sha256(""))`: the payload hash of a request without body.
pub const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Header names of the V3 protocol.
pub mod header {
    pub const ACTION: &str = "x-acs-action";
    pub const VERSION: &str = "x-acs-version";
    pub const DATE: &str = "x-acs-date";
    pub const NONCE: &str = "x-acs-signature-nonce";
    pub const CONTENT_SHA256: &str = "x-acs-content-sha256";
    pub const SECURITY_TOKEN: &str = "x-acs-security-token";
}

/// RFC 3986 unreserved characters stay; everything else is percent-encoded (UTF-8, uppercase
/// hex).
const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Like [`RFC3986`] but keeping `/`, for the canonical URI of ROA paths.
const RFC3986_PATH: &AsciiSet = &RFC3986.remove(b'/');

/// Percent-encodes `s` as the signature requires (space `%20`, `*` `%2A`, `~` kept).
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, RFC3986).to_string()
}

/// Encodes a resource path (keeps `/`) for the canonical URI; `""` becomes `/`.
pub fn encode_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_string();
    }
    utf8_percent_encode(path, RFC3986_PATH).to_string()
}

/// The canonical query string of *decoded* parameters: each name and value encoded, sorted
/// by name (then value, for repeated names), joined by `&`. An empty list gives `""`.
pub fn canonical_query(params: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (percent_encode(k), percent_encode(v)))
        .collect();
    pairs.sort();
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The query string the client puts on the wire: the canonical one (already sorted and
/// encoded, so what is sent is exactly what is signed).
pub fn wire_query(params: &[(String, String)]) -> String {
    canonical_query(params)
}

/// Canonical headers and the signed-header list for `headers` (names in any case; values
/// trimmed; repeated names joined with `,` in sorted order, as the SDK does).
pub fn canonical_headers(headers: &[(String, String)]) -> (String, String) {
    let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        grouped
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(value.trim().to_string());
    }
    let mut canonical = String::new();
    for (name, values) in &mut grouped {
        values.sort();
        canonical.push_str(name);
        canonical.push(':');
        canonical.push_str(&values.join(","));
        canonical.push('\n');
    }
    let signed = grouped.keys().cloned().collect::<Vec<_>>().join(";");
    (canonical, signed)
}

/// Everything that is signed. `headers` are the headers to sign, `host` among them.
#[derive(Debug, Clone, Copy)]
pub struct SigningInput<'a> {
    /// HTTP method, uppercase.
    pub method: &'a str,
    /// The canonical URI: `/` for RPC; see [`encode_path`].
    pub canonical_uri: &'a str,
    /// Decoded query parameters.
    pub query: &'a [(String, String)],
    /// Headers to sign (name, value); must include `host` and every `x-acs-*` sent.
    pub headers: &'a [(String, String)],
    /// `hex(sha256(body))`; [`EMPTY_PAYLOAD_SHA256`] without body.
    pub payload_sha256: &'a str,
}

/// The pieces of one signature, kept for diagnostics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub canonical_request: String,
    pub string_to_sign: String,
    pub signed_headers: String,
    /// Lowercase hex HMAC-SHA256.
    pub signature: String,
    /// The complete `Authorization` header value.
    pub authorization: String,
}

/// The canonical request and the signed-header list of `input`.
pub fn canonical_request(input: &SigningInput<'_>) -> (String, String) {
    let (headers, signed) = canonical_headers(input.headers);
    let request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        input.method,
        input.canonical_uri,
        canonical_query(input.query),
        headers,
        signed,
        input.payload_sha256
    );
    (request, signed)
}

/// `"ACS3-HMAC-SHA256\n" + hex(sha256(canonical_request))`.
pub fn string_to_sign(canonical_request: &str) -> String {
    format!("{ALGORITHM}\n{}", sha256_hex(canonical_request.as_bytes()))
}

/// Signs `input` with `access_key_id` / `secret`.
pub fn sign(input: &SigningInput<'_>, access_key_id: &str, secret: &str) -> Signature {
    let (canonical_request, signed_headers) = canonical_request(input);
    let string_to_sign = string_to_sign(&canonical_request);
    let signature = hmac_sha256_hex(secret.as_bytes(), string_to_sign.as_bytes());
    let authorization = format!(
        "{ALGORITHM} Credential={access_key_id},SignedHeaders={signed_headers},Signature={signature}"
    );
    Signature {
        canonical_request,
        string_to_sign,
        signed_headers,
        signature,
        authorization,
    }
}

/// Signs with [`Credentials`] (the token, if any, must already be among `input.headers`).
pub fn sign_with(input: &SigningInput<'_>, credentials: &Credentials) -> Signature {
    sign(
        input,
        &credentials.access_key_id,
        &credentials.access_key_secret,
    )
}

/// `hex(sha256(data))`, lowercase.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// A parsed `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// Lowercase header names, in the order given.
    pub signed_headers: Vec<String>,
    pub signature: String,
}

/// Why an `Authorization` header could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed ACS3 Authorization header: {0}")]
pub struct MalformedAuthorization(pub &'static str);

/// Parses `ACS3-HMAC-SHA256 Credential=…,SignedHeaders=…,Signature=…` (the parts in any
/// order, as the cloud accepts).
pub fn parse_authorization(value: &str) -> Result<Authorization, MalformedAuthorization> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(MalformedAuthorization("not ACS3-HMAC-SHA256"))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(MalformedAuthorization("a part without '='"))?;
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(MalformedAuthorization("unknown part")),
        };
        if slot.replace(v.to_string()).is_some() {
            return Err(MalformedAuthorization("a part given twice"));
        }
    }
    let access_key_id = credential.ok_or(MalformedAuthorization("no Credential"))?;
    let signed = signed.ok_or(MalformedAuthorization("no SignedHeaders"))?;
    let signature = signature.ok_or(MalformedAuthorization("no Signature"))?;
    if access_key_id.is_empty() || signed.is_empty() || signature.is_empty() {
        return Err(MalformedAuthorization("an empty part"));
    }
    Ok(Authorization {
        access_key_id,
        signed_headers: signed.split(';').map(str::to_ascii_lowercase).collect(),
        signature,
    })
}

/// Constant-time comparison of two signatures (hex strings), so a verifier leaks nothing
/// about how much of a forged signature was right.
pub fn signatures_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `x-acs-date` format: ISO 8601 UTC to the second, e.g. `2023-10-26T10:22:32Z`.
pub const DATE_FORMAT: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

/// Formats a time as an `x-acs-date` value.
pub fn format_date(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    // The format has only numeric components of a valid date: it cannot fail.
    t.format(DATE_FORMAT).unwrap_or_default()
}

/// Parses an `x-acs-date` value.
pub fn parse_date(s: &str) -> Option<time::OffsetDateTime> {
    time::PrimitiveDateTime::parse(s, DATE_FORMAT)
        .ok()
        .map(|t| t.assume_utc())
}

/// A fresh signature nonce: 128 random bits in hex.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Alibaba's published example ("Request syntax and signature method V3", steps 1–3):
    /// RunInstances on ecs.cn-shanghai, `YourAccessKeyId` / `YourAccessKeySecret`.
    #[test]
    fn published_v3_example() {
        let query = pairs(&[
            (
                "ImageId",
                "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
            ),
            ("RegionId", "cn-shanghai"),
        ]);
        let headers = pairs(&[
            ("host", "ecs.cn-shanghai.aliyuncs.com"),
            ("x-acs-action", "RunInstances"),
            ("x-acs-content-sha256", EMPTY_PAYLOAD_SHA256),
            ("x-acs-date", "2023-10-26T10:22:32Z"),
            ("x-acs-signature-nonce", "3156853299f313e23d1673dc12e1703d"),
            ("x-acs-version", "2014-05-26"),
        ]);
        let input = SigningInput {
            method: "POST",
            canonical_uri: "/",
            query: &query,
            headers: &headers,
            payload_sha256: EMPTY_PAYLOAD_SHA256,
        };
        let s = sign(&input, "YourAccessKeyId", "YourAccessKeySecret");
        assert_eq!(
            s.canonical_request,
            "POST\n/\nImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai\n\
             host:ecs.cn-shanghai.aliyuncs.com\nx-acs-action:RunInstances\n\
             x-acs-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-acs-date:2023-10-26T10:22:32Z\nx-acs-signature-nonce:3156853299f313e23d1673dc12e1703d\n\
             x-acs-version:2014-05-26\n\n\
             host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            s.string_to_sign,
            "ACS3-HMAC-SHA256\n7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
        );
        assert_eq!(
            s.signature,
            "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        );
        assert_eq!(
            s.authorization,
            "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders=host;x-acs-action;\
             x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,\
             Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        );
    }

    /// The same request with the date and nonce of the docs' header table (09:01:01Z,
    /// d410180a…), whose signature Alibaba publishes in its ROA-style signature page.
    #[test]
    fn published_header_table_example() {
        let query = pairs(&[
            ("RegionId", "cn-shanghai"),
            (
                "ImageId",
                "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
            ),
        ]);
        let headers = pairs(&[
            ("x-acs-version", "2014-05-26"),
            ("Host", "ecs.cn-shanghai.aliyuncs.com"),
            ("x-acs-action", "RunInstances"),
            ("x-acs-date", "2023-10-26T09:01:01Z"),
            ("x-acs-content-sha256", EMPTY_PAYLOAD_SHA256),
            ("x-acs-signature-nonce", "d410180a5abf7fe235dd9b74aca91fc0"),
        ]);
        let input = SigningInput {
            method: "POST",
            canonical_uri: "/",
            query: &query,
            headers: &headers,
            payload_sha256: EMPTY_PAYLOAD_SHA256,
        };
        let s = sign(&input, "YourAccessKeyId", "YourAccessKeySecret");
        assert_eq!(
            s.signature,
            "e521358f7776c97df52e6b2891a8bc73026794a071b50c3323388c4e0df64804"
        );
    }

    #[test]
    fn encoding_follows_rfc3986() {
        assert_eq!(percent_encode("a b*c~d/e+f"), "a%20b%2Ac~d%2Fe%2Bf");
        assert_eq!(percent_encode("迁"), "%E8%BF%81");
        assert_eq!(percent_encode("Tag.1.Key"), "Tag.1.Key");
        assert_eq!(encode_path("/a b/c*"), "/a%20b/c%2A");
        assert_eq!(encode_path(""), "/");
    }

    #[test]
    fn query_is_sorted_and_empty_values_kept() {
        let q = pairs(&[
            ("b", "2"),
            ("a", ""),
            ("Tag.10.Key", "x"),
            ("Tag.2.Key", "y"),
        ]);
        assert_eq!(canonical_query(&q), "Tag.10.Key=x&Tag.2.Key=y&a=&b=2");
        assert_eq!(canonical_query(&[]), "");
    }

    #[test]
    fn headers_are_lowercased_trimmed_and_joined() {
        let h = pairs(&[("X-Acs-B", " 2 "), ("host", "h:8080"), ("x-acs-b", "1")]);
        let (c, s) = canonical_headers(&h);
        assert_eq!(c, "host:h:8080\nx-acs-b:1,2\n");
        assert_eq!(s, "host;x-acs-b");
    }

    #[test]
    fn authorization_round_trips() {
        let a = parse_authorization(
            "ACS3-HMAC-SHA256 Credential=AK,SignedHeaders=host;X-Acs-Date,Signature=ab12",
        )
        .unwrap();
        assert_eq!(a.access_key_id, "AK");
        assert_eq!(a.signed_headers, vec!["host", "x-acs-date"]);
        assert_eq!(a.signature, "ab12");
        assert!(parse_authorization("ACS3-HMAC-SHA256 Credential=AK").is_err());
        assert!(
            parse_authorization("HMAC-SHA1 Credential=AK,SignedHeaders=h,Signature=s").is_err()
        );
        assert!(parse_authorization(
            "ACS3-HMAC-SHA256 Credential=AK,Credential=B,SignedHeaders=h,Signature=s"
        )
        .is_err());
    }

    #[test]
    fn dates_round_trip() {
        let t = parse_date("2023-10-26T10:22:32Z").unwrap();
        assert_eq!(format_date(t), "2023-10-26T10:22:32Z");
        assert!(parse_date("2023-10-26 10:22:32").is_none());
    }

    #[test]
    fn signature_comparison() {
        assert!(signatures_equal("abc", "abc"));
        assert!(!signatures_equal("abc", "abd"));
        assert!(!signatures_equal("abc", "ab"));
    }
}
