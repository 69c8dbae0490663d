//! Signature checks, header form and presigned form, with OSS's refusal codes.

use super::*;

pub(super) fn authenticate(
    st: &State,
    method: &Method,
    headers: &HeaderMap,
    t: &Target,
) -> Result<(), OssFault> {
    let presigned = query_value(&t.query, "x-oss-signature").is_some();
    let auth = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let mut req = RequestToSign {
        method: method.to_string(),
        bucket: Some(t.bucket.clone()),
        key: t.key.clone(),
        query: t.query.clone(),
        headers: header_list(headers),
        additional_headers: Vec::new(),
    };
    let now = st.now();
    let (ak, datetime, region, signature, token) = if let Some(auth) = auth {
        let a = Authorization::parse(auth).map_err(|e| {
            fault(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                format!("Authorization: {e}"),
            )
        })?;
        let datetime = headers
            .get("x-oss-date")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                fault(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    "x-oss-date is missing",
                )
            })?
            .to_string();
        let t0 = sign::parse_datetime(&datetime).ok_or_else(|| {
            fault(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                "x-oss-date is not YYYYMMDDTHHMMSSZ",
            )
        })?;
        if (now - t0).whole_seconds().abs() > MAX_SKEW_SECS {
            let mut f = fault(
                StatusCode::FORBIDDEN,
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            );
            f.extra.push(("RequestTime", datetime.clone()));
            f.extra.push(("ServerTime", sign::format_datetime(now)));
            return Err(f);
        }
        if headers.get("x-oss-content-sha256").is_none() {
            return Err(fault(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "x-oss-content-sha256 is missing",
            ));
        }
        check_scope(st, &a.date, &a.region, &a.product, &datetime)?;
        req.additional_headers = a.additional_headers.clone();
        let token = headers
            .get("x-oss-security-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (a.access_key_id, datetime, a.region, a.signature, token)
    } else if presigned {
        let q = &t.query;
        let need = |n: &str| {
            query_value(q, n).map(str::to_string).ok_or_else(|| {
                fault(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    format!("{n} is missing"),
                )
            })
        };
        if need("x-oss-signature-version")? != sign::ALGORITHM {
            return Err(fault(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                "unsupported x-oss-signature-version",
            ));
        }
        let (ak, date, region, product) = sign::parse_credential(&need("x-oss-credential")?)
            .map_err(|e| {
                fault(
                    StatusCode::BAD_REQUEST,
                    "InvalidArgument",
                    format!("x-oss-credential: {e}"),
                )
            })?;
        let datetime = need("x-oss-date")?;
        let t0 = sign::parse_datetime(&datetime).ok_or_else(|| {
            fault(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                "x-oss-date is not YYYYMMDDTHHMMSSZ",
            )
        })?;
        let expires: i64 = need("x-oss-expires")?
            .parse()
            .ok()
            .filter(|e| (1..=sign::MAX_PRESIGN_EXPIRES as i64).contains(e))
            .ok_or_else(|| {
                fault(
                    StatusCode::BAD_REQUEST,
                    "InvalidArgument",
                    "x-oss-expires must be 1..604800",
                )
            })?;
        if (now - t0).whole_seconds() > expires {
            return Err(fault(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "Request has expired.",
            ));
        }
        if (t0 - now).whole_seconds() > MAX_SKEW_SECS {
            return Err(fault(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "Request is not valid yet.",
            ));
        }
        check_scope(st, &date, &region, &product, &datetime)?;
        let signature = need("x-oss-signature")?;
        req.query.retain(|(k, _)| k != "x-oss-signature");
        if let Some(a) = query_value(q, "x-oss-additional-headers") {
            req.additional_headers = a.split(';').map(str::to_string).collect();
        }
        let token = query_value(q, "x-oss-security-token").map(str::to_string);
        (ak, datetime, region, signature, token)
    } else {
        return Err(fault(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "You have no right to access this object because of bucket acl.",
        ));
    };
    let key = st
        .cfg
        .keys
        .iter()
        .find(|k| k.access_key_id == ak)
        .ok_or_else(invalid_key)?;
    match (&key.security_token, &token) {
        (None, None) => {}
        (Some(want), Some(got)) if want == got => {}
        (Some(_), Some(_)) => {
            return Err(fault(
                StatusCode::FORBIDDEN,
                "InvalidSecurityToken",
                "The security token you provided is invalid.",
            ))
        }
        // An STS key without its token, or a long-term key with one, is unknown to OSS.
        _ => return Err(invalid_key()),
    }
    let want = sign::signature(&req, &key.access_key_secret, &region, &datetime);
    if !constant_time_eq(want.as_bytes(), signature.as_bytes()) {
        let canonical = req.canonical_request();
        let mut f = fault(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your key and signing method.",
        );
        f.extra.push(("OSSAccessKeyId", ak));
        f.extra.push((
            "StringToSign",
            sign::string_to_sign(&datetime, &region, &canonical),
        ));
        f.extra.push(("CanonicalRequest", canonical));
        return Err(f);
    }
    Ok(())
}

fn invalid_key() -> OssFault {
    fault(
        StatusCode::FORBIDDEN,
        "InvalidAccessKeyId",
        "The OSS Access Key Id you provided does not exist in our records.",
    )
}

fn check_scope(
    st: &State,
    date: &str,
    region: &str,
    product: &str,
    datetime: &str,
) -> Result<(), OssFault> {
    if !datetime.starts_with(date) {
        return Err(fault(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "the credential date is not the date of x-oss-date",
        ));
    }
    if region != st.cfg.region || product != sign::PRODUCT {
        return Err(fault(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            format!(
                "the signing region must be {} and the product oss",
                st.cfg.region
            ),
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
