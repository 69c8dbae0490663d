//! What keeps secrets out of a diagnostics bundle. Two independent nets:
//!
//! 1. **By field name**: in the config and in the JSON state files, the value of every field
//!    whose name says secret ([`is_secret_field`]: `*_key`, `*secret*`, `*token*`,
//!    `*password*`, `*credential*`, …) becomes `<redacted>`, and every URL loses its query and
//!    user info (a presigned URL's query is a signature, a credential and an STS token).
//! 2. **By value**: a [`Scrubber`] holds every secret the gateway knows (the bootstrap token,
//!    its control-plane credential, each disk's replication key, cloud credentials, the values
//!    of the command's own presigned URL, and whatever net 1 removed) and replaces each
//!    occurrence, in any letter case and in URL-encoded form, in every file of the bundle —
//!    the log above all, where no field names help. URLs in free text lose their query too.
//!
//! Paths of secret files (`key_file`, `bootstrap_token_file`) are kept: they help, and the
//! files' contents are never put in a bundle.

use serde_json::Value;

/// Query parameters of presigned URLs (OSS V4 and V1, S3 SigV4) whose values are public.
const PUBLIC_QUERY_PARAMS: &[&str] = &[
    "x-oss-date",
    "x-oss-expires",
    "x-oss-signature-version",
    "x-oss-additional-headers",
    "Expires",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-Algorithm",
    "X-Amz-SignedHeaders",
];

/// What replaces a secret.
pub const REDACTED: &str = "<redacted>";

/// Shorter values are not scrubbed from free text: replacing every `abc` in a log would make
/// it unreadable, and a secret that short is not a secret. Fields named secret are redacted
/// whatever their length.
pub const MIN_SCRUB_LEN: usize = 8;

/// Whether a field of this name holds a secret. Names of files, paths and directories do not
/// (their contents never enter a bundle); `*_key_id` and `key_name` name, not hold, a key.
pub fn is_secret_field(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    if n.ends_with("_file") || n.ends_with("_path") || n.ends_with("_dir") {
        return false;
    }
    const PARTS: &[&str] = &[
        "secret",
        "password",
        "passwd",
        "passphrase",
        "token",
        "credential",
        "private",
        "signature",
        "access_key",
        "api_key",
        "apikey",
        "authorization",
        "cookie",
    ];
    n == "key"
        || n.ends_with("_key")
        || n.ends_with("key_hex")
        || PARTS.iter().any(|p| n.contains(p))
}

/// Redacts `value` in place by field name (net 1); every secret value removed, and every URL
/// query value dropped, is added to `found` (for net 2). Nulls stay null ("not set").
pub fn redact_json(value: &mut Value, found: &mut Scrubber) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if is_secret_field(k) && !v.is_null() {
                    found.add_all_strings(v);
                    *v = Value::String(REDACTED.into());
                } else {
                    redact_json(v, found);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact_json(v, found)),
        Value::String(s) if looks_like_url(s) => {
            found.add_url_secrets(s);
            *s = crate::api::redact_url(s);
        }
        _ => {}
    }
}

fn looks_like_url(s: &str) -> bool {
    let l = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    l.starts_with("http://") || l.starts_with("https://")
}

/// Removes nulls from objects (TOML has none; an absent key means the same).
pub fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Every `http(s)://…?query` in free text loses its query (up to the next space or quote).
pub fn redact_urls_in_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The URL token runs to the next delimiter.
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .map_or(rest.len(), |e| i + e);
        let token = &rest[i..end];
        match token.find('?') {
            Some(q) if q + 1 < token.len() => {
                out.push_str(&rest[..i + q]);
                out.push('?');
                out.push_str(REDACTED);
            }
            _ => out.push_str(&rest[..end]),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The secrets the gateway knows, removed from any text (net 2).
#[derive(Default, Clone)]
pub struct Scrubber {
    /// Lower-cased (matching ignores ASCII case: hex keys are written either way).
    secrets: Vec<String>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Scrubber {
    /// Adds a secret, and its URL-encoded form when that differs (tokens travel in URLs).
    pub fn add(&mut self, secret: &str) {
        let s = secret.trim();
        if s.len() < MIN_SCRUB_LEN {
            return;
        }
        for form in [
            s.to_string(),
            sync_aliyun::oss::sign::uri_encode(s, false),
            percent_decode(s),
        ] {
            let lower = form.to_ascii_lowercase();
            if lower.len() >= MIN_SCRUB_LEN && !self.secrets.contains(&lower) {
                self.secrets.push(lower);
            }
        }
    }

    /// Adds every string inside `v`.
    pub fn add_all_strings(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.add(s),
            Value::Array(a) => a.iter().for_each(|x| self.add_all_strings(x)),
            Value::Object(m) => m.values().for_each(|x| self.add_all_strings(x)),
            _ => {}
        }
    }

    /// Adds the values of a URL's query and its user info (a presigned URL's signature,
    /// credential and STS token). Only the presigning parameters known to be public (date,
    /// expiry, algorithm, signed headers) are left alone: their values (a timestamp,
    /// `OSS4-HMAC-SHA256`) would otherwise be cut out of every text that happens to hold them.
    pub fn add_url_secrets(&mut self, url: &str) {
        let before_query = url.split(['?', '#']).next().unwrap_or(url);
        if let Some((_, rest)) = before_query.split_once("://") {
            let authority = rest.split('/').next().unwrap_or(rest);
            if let Some((userinfo, _)) = authority.rsplit_once('@') {
                self.add(userinfo);
                if let Some((_, password)) = userinfo.split_once(':') {
                    self.add(password);
                }
            }
        }
        if let Some((_, query)) = url.split_once('?') {
            let query = query.split('#').next().unwrap_or(query);
            for pair in query.split('&') {
                let (name, value) = pair.split_once('=').unwrap_or(("", pair));
                if PUBLIC_QUERY_PARAMS
                    .iter()
                    .any(|p| p.eq_ignore_ascii_case(&percent_decode(name)))
                {
                    continue;
                }
                // `x-oss-credential` is `AK/date/region/oss/aliyun_v4_request`: the AccessKey
                // id alone is no secret, but the whole value goes anyway.
                self.add(value);
            }
        }
    }

    /// How many secrets (and their forms) are known.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `text` with every known secret replaced by `<redacted>` and URL queries removed.
    pub fn scrub(&self, text: &str) -> String {
        let text = redact_urls_in_text(text);
        if self.secrets.is_empty() {
            return text;
        }
        // ASCII lower-casing keeps every byte offset, so matches in `lower` are ranges of
        // `text`, on char boundaries (a valid UTF-8 needle only matches whole chars).
        let lower = text.to_ascii_lowercase();
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for s in &self.secrets {
            // Step past the match's first character, not byte: a secret may start with a
            // multi-byte one, and overlapping matches must still be found.
            let step = s.chars().next().map_or(1, char::len_utf8);
            let mut from = 0;
            while let Some(i) = lower[from..].find(s.as_str()) {
                ranges.push((from + i, from + i + s.len()));
                from += i + step;
            }
        }
        if ranges.is_empty() {
            return text;
        }
        ranges.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        let mut iter = ranges.into_iter().peekable();
        while let Some((start, mut end)) = iter.next() {
            // Overlapping or touching matches become one replacement.
            while let Some(&(s2, e2)) = iter.peek() {
                if s2 > end {
                    break;
                }
                end = end.max(e2);
                iter.next();
            }
            out.push_str(&text[at..start]);
            out.push_str(REDACTED);
            at = end;
        }
        out.push_str(&text[at..]);
        out
    }
}

/// `%XX` decoded (and `+` kept); invalid escapes stay as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secret_fields_are_told_by_name() {
        for name in [
            "agent_key",
            "key",
            "secret_access_key",
            "access_key_secret",
            "access_key_id",
            "session_token",
            "security_token",
            "bootstrap_token",
            "credential",
            "password",
            "db_password",
            "private_key",
            "signature",
            "x-oss-signature",
            "replication_key_hex",
            "Authorization",
        ] {
            assert!(is_secret_field(name), "{name} should be secret");
        }
        for name in [
            "key_file",
            "bootstrap_token_file",
            "ca_file",
            "kms_key_id",
            "key_name",
            "region",
            "url",
            "gateway_id",
            "disk_id",
            "tokens_dir",
        ] {
            assert!(!is_secret_field(name), "{name} should not be secret");
        }
    }

    #[test]
    fn json_is_redacted_by_field_name_and_urls_lose_their_query() {
        let mut v = serde_json::json!({
            "gateway_id": "gw-1",
            "credential": "cred-0123456789",
            "url": "http://127.0.0.1:8443",
            "disks": {"disk-1": {"agent_key": "ab".repeat(32), "size_bytes": 4096}},
            "aws": {"secret_access_key": "wJalrXUtnFEMI", "session_token": null,
                    "access_key_id": "AKIDEXAMPLE"},
            "nested": [{"upload": "https://b.example/k?x-oss-security-token=STS-TOKEN-VALUE&x=1"}],
            "key_file": "/etc/sync-gateway/keys/disk-1.key",
        });
        let mut found = Scrubber::default();
        redact_json(&mut v, &mut found);
        assert_eq!(v["gateway_id"], "gw-1");
        assert_eq!(v["credential"], REDACTED);
        assert_eq!(v["url"], "http://127.0.0.1:8443");
        assert_eq!(v["disks"]["disk-1"]["agent_key"], REDACTED);
        assert_eq!(v["disks"]["disk-1"]["size_bytes"], 4096);
        assert_eq!(v["aws"]["secret_access_key"], REDACTED);
        assert!(v["aws"]["session_token"].is_null());
        assert_eq!(v["aws"]["access_key_id"], REDACTED);
        assert_eq!(v["nested"][0]["upload"], "https://b.example/k?<redacted>");
        assert_eq!(v["key_file"], "/etc/sync-gateway/keys/disk-1.key");
        // What was removed is now known by value.
        let log = format!(
            "assigned key {} cred cred-0123456789 token STS-TOKEN-VALUE",
            "AB".repeat(32)
        );
        let clean = found.scrub(&log);
        assert_eq!(
            clean,
            "assigned key <redacted> cred <redacted> token <redacted>"
        );
    }

    #[test]
    fn scrubbing_catches_any_case_encoded_forms_and_overlaps() {
        let mut s = Scrubber::default();
        s.add("deadbeefcafebabe");
        s.add("tok+en/with=chars");
        s.add("short"); // too short to scrub from free text
        let text = "k=DEADBEEFCAFEBABE, k2=deadbeefcafebabedeadbeefcafebabe \
                    enc=tok%2Ben%2Fwith%3Dchars raw=tok+en/with=chars short ünïcode";
        let clean = s.scrub(text);
        assert_eq!(
            clean,
            "k=<redacted>, k2=<redacted> enc=<redacted> raw=<redacted> short ünïcode"
        );
        assert!(Scrubber::default().scrub("nothing ü").ends_with('ü'));
    }

    #[test]
    fn secrets_starting_with_a_multibyte_character_are_scrubbed_without_panic() {
        let mut s = Scrubber::default();
        s.add("éé-pass-wörd-éé");
        s.add("ééé-ééé");
        let clean = s.scrub("a=éé-pass-wörd-éé b=ééé-ééé-ééé c=é");
        assert_eq!(clean, "a=<redacted> b=<redacted> c=é");
    }

    #[test]
    fn urls_in_text_lose_their_query_only() {
        let t = "PUT http://127.0.0.1:9/b/k?x-oss-signature=abc&y=2 done; \
                 see https://h/p and \"https://h/q?s=1\" ok";
        assert_eq!(
            redact_urls_in_text(t),
            "PUT http://127.0.0.1:9/b/k?<redacted> done; see https://h/p and \
             \"https://h/q?<redacted>\" ok"
        );
    }

    #[test]
    fn url_query_values_and_user_info_become_known_secrets() {
        let mut s = Scrubber::default();
        s.add_url_secrets(
            "https://user:hunter2hunter2@h/k?x-oss-credential=LTAI%2F20250101&\
             x-oss-security-token=CAIS%2Babc%2Fdef%3D&x-oss-signature=0123abcd0123abcd",
        );
        let log = "token CAIS+abc/def= sig 0123ABCD0123ABCD pw hunter2hunter2";
        assert_eq!(
            s.scrub(log),
            "token <redacted> sig <redacted> pw <redacted>"
        );
        // Public presigning parameters stay: a bundle named by the same second as the URL's
        // date keeps its name.
        let mut s = Scrubber::default();
        s.add_url_secrets(
            "http://h/b/k?x-oss-date=20250101T000000Z&x-oss-expires=900&\
             x-oss-signature-version=OSS4-HMAC-SHA256&x-oss-signature=f00dfeedf00dfeed",
        );
        assert_eq!(
            s.scrub("diagnostics-gw-20250101T000000Z OSS4-HMAC-SHA256 f00dfeedf00dfeed"),
            "diagnostics-gw-20250101T000000Z OSS4-HMAC-SHA256 <redacted>"
        );
    }
}
