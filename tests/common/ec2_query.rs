//! The wire format of EC2's query API, as much as the fault proxy (ec2_proxy.rs) needs:
//! form-encoded requests, XML error bodies, and elements of moto's XML responses.

use std::collections::HashMap;
use std::ops::Range;

/// An error body in EC2's shape (not the `ErrorResponse` of other query services), so the SDK
/// reads code, message and request id as it does from real EC2.
pub fn error_xml(code: &str, message: &str, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
    )
}

// Just enough XML for moto's responses: elements by nesting, no entities, comments or CDATA
// (moto writes none). Positions are byte ranges into the whole response.

/// One element: `outer` from `<` to the end of its closing tag, `inner` its content.
#[derive(Debug, Clone)]
pub struct Element<'a> {
    pub name: &'a str,
    pub outer: Range<usize>,
    pub inner: Range<usize>,
}

/// The top-level elements within `xml[within]`.
pub fn elements(xml: &str, within: Range<usize>) -> Vec<Element<'_>> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut open: Option<(&str, usize, usize)> = None;
    let mut i = within.start;
    while let Some(lt) = xml[i..within.end].find('<') {
        let start = i + lt;
        let Some(gt) = xml[start..within.end].find('>') else {
            break;
        };
        let end = start + gt + 1;
        let tag = &xml[start + 1..end - 1];
        i = end;
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if tag.starts_with('/') {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                if let Some((name, outer_start, inner_start)) = open.take() {
                    out.push(Element {
                        name,
                        outer: outer_start..end,
                        inner: inner_start..start,
                    });
                }
            }
        } else if let Some(t) = tag.strip_suffix('/') {
            if depth == 0 {
                out.push(Element {
                    name: tag_name(t),
                    outer: start..end,
                    inner: end..end,
                });
            }
        } else {
            if depth == 0 {
                open = Some((tag_name(tag), start, end));
            }
            depth += 1;
        }
    }
    out
}

/// `DescribeSnapshotsResponse xmlns="…"` → `DescribeSnapshotsResponse`.
fn tag_name(tag: &str) -> &str {
    tag.split_whitespace().next().unwrap_or("")
}

pub fn child<'a>(xml: &'a str, within: Range<usize>, name: &str) -> Option<Element<'a>> {
    elements(xml, within).into_iter().find(|e| e.name == name)
}

pub fn child_text<'a>(xml: &'a str, within: Range<usize>, name: &str) -> Option<&'a str> {
    child(xml, within, name).map(|e| &xml[e.inner])
}

/// The `<item>`s of the list `set` (e.g. `volumeSet`) directly under the response's root.
pub fn set_items<'a>(xml: &'a str, set: &str) -> Vec<Element<'a>> {
    let Some(root) = elements(xml, 0..xml.len()).into_iter().next() else {
        return Vec::new();
    };
    let Some(list) = child(xml, root.inner, set) else {
        return Vec::new();
    };
    elements(xml, list.inner)
        .into_iter()
        .filter(|e| e.name == "item")
        .collect()
}

/// `application/x-www-form-urlencoded` → map (EC2 query protocol bodies).
pub fn url_decode_form(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
