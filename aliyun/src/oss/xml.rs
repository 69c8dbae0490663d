//! The few XML documents OSS exchanges here, written and read by hand: they are flat, and
//! pulling in an XML crate for five element names would cost more than it saves.
//!
//! ```text
//! <Error><Code/><Message/><RequestId/><HostId/>...</Error>           any failed request
//! <InitiateMultipartUploadResult><Bucket/><Key/><UploadId/></...>   POST ?uploads
//! <CompleteMultipartUpload><Part><PartNumber/><ETag/></Part>...</>   POST ?uploadId= (body)
//! <CompleteMultipartUploadResult><Location/><Bucket/><Key/><ETag/></...>
//! ```

/// Escapes text for an element body.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Undoes [`escape`] (and numeric character references).
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The unescaped text of the first `<name>…</name>` in `doc`.
pub fn element(doc: &str, name: &str) -> Option<String> {
    elements(doc, name).into_iter().next()
}

/// The unescaped texts of every `<name>…</name>` in `doc`, in order.
pub fn elements(doc: &str, name: &str) -> Vec<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(i) = rest.find(&open) {
        let body = &rest[i + open.len()..];
        let Some(j) = body.find(&close) else { break };
        out.push(unescape(body[..j].trim()));
        rest = &body[j + close.len()..];
    }
    out
}

/// Raw (still escaped) bodies of every `<name>…</name>`, for nested documents.
pub fn raw_elements<'a>(doc: &'a str, name: &str) -> Vec<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(i) = rest.find(&open) {
        let body = &rest[i + open.len()..];
        let Some(j) = body.find(&close) else { break };
        out.push(&body[..j]);
        rest = &body[j + close.len()..];
    }
    out
}

/// `<CompleteMultipartUpload>` for `(part number, ETag)` pairs.
pub fn complete_multipart_body(parts: &[(u32, String)]) -> String {
    let mut s =
        String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CompleteMultipartUpload>");
    for (n, etag) in parts {
        s.push_str(&format!(
            "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
            escape(etag)
        ));
    }
    s.push_str("</CompleteMultipartUpload>");
    s
}

/// Reads a `<CompleteMultipartUpload>` body back into `(part number, ETag)` pairs; `None`
/// when a part lacks a number or an ETag.
pub fn parse_complete_multipart(doc: &str) -> Option<Vec<(u32, String)>> {
    raw_elements(doc, "Part")
        .into_iter()
        .map(|p| {
            let n = element(p, "PartNumber")?.parse().ok()?;
            let etag = element(p, "ETag")?;
            Some((n, etag))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips() {
        let s = "a<b>&\"c' ü";
        assert_eq!(unescape(&escape(s)), s);
        assert_eq!(unescape("&#x41;&#66;&bogus;"), "AB&bogus;");
    }

    #[test]
    fn complete_body_round_trips() {
        let parts = vec![(1, "\"AB\"".to_string()), (2, "\"CD\"".to_string())];
        let body = complete_multipart_body(&parts);
        assert_eq!(parse_complete_multipart(&body), Some(parts));
        assert_eq!(
            element("<E><Code> X </Code></E>", "Code").as_deref(),
            Some("X")
        );
    }
}
