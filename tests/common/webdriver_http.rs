//! The WebDriver client's transport: one HTTP/1.1 request per connection (`Connection: close`)
//! to chromedriver on loopback, the answer read by `Content-Length`, chunked, or up to EOF and
//! capped in size; and the base64 decoder for screenshots.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest answer read (a screenshot is a few hundred KiB of base64).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Sends `method path` with an optional JSON body, returns the status and the body.
pub fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), Error> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // chromedriver checks Host against DNS rebinding: an IP literal passes
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if json_body.is_some() {
        req.push_str("Content-Type: application/json; charset=utf-8\r\n");
    }
    let payload = json_body.unwrap_or_default();
    req.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    s.write_all(req.as_bytes())?;
    s.write_all(payload.as_bytes())?;
    s.flush()?;
    read_response(s)
}

/// A transport failure, or an answer that is not HTTP/1.1.
#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    Malformed(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// Reads status line, headers and body (`Content-Length`, chunked, or up to EOF).
fn read_response(s: TcpStream) -> Result<(u16, Vec<u8>), Error> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Malformed(format!("bad status line {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(Error::Malformed("connection closed in headers".into()));
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                length = value.parse().ok();
            } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let too_big =
        |n: usize| Error::Malformed(format!("answer of {n} bytes exceeds {MAX_RESPONSE_BYTES}"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| Error::Malformed(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            if body.len() + size > MAX_RESPONSE_BYTES {
                return Err(too_big(body.len() + size));
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..])?;
            line.clear();
            r.read_line(&mut line)?; // CRLF after the chunk
        }
    } else if let Some(n) = length {
        if n > MAX_RESPONSE_BYTES {
            return Err(too_big(n));
        }
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut body)?;
        if body.len() > MAX_RESPONSE_BYTES {
            return Err(too_big(body.len()));
        }
    }
    Ok((status, body))
}

/// Standard base64 (RFC 4648, with padding; whitespace ignored). Small enough not to be worth a
/// dependency for one screenshot.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if clean.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for quad in clean.chunks(4) {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | sextet(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes_padded_and_unpadded_quads() {
        assert_eq!(super::base64_decode("").unwrap(), b"");
        assert_eq!(super::base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(super::base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(super::base64_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(super::base64_decode("Zm9vYmFy\n").unwrap(), b"foobar");
        assert!(super::base64_decode("Zm9").is_none());
        assert!(super::base64_decode("Zm9*").is_none());
    }
}
