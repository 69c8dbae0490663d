//! What the appliance image publishers share (`sync-aws-image` in sync-aws,
//! `sync-aliyun-image` in sync-aliyun): how they parse their command line and map errors to
//! exit status, read and hash the image file, name the tag that records which file an image
//! came from, derive idempotency tokens, and pace their polls.
//!
//! Exit status, the same for both: 0 done (or found done), 1 failed, 2 usage error.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Tag on a published image (and on the AWS snapshot under it): the SHA-256 of the file it was
/// made from, in hex. A rerun under the same name with a rebuilt file is refused rather than
/// answered with the old image. Frozen: published images carry it.
pub const DIGEST_TAG: &str = "sync-gateway:image-sha256";

/// Exit status of a usage error (bad arguments or a file that cannot be published).
pub const USAGE_EXIT: u8 = 2;

/// Parses the command line: `--help` and `--version` print to stdout and exit 0, every other
/// clap error prints to stderr and exits [`USAGE_EXIT`].
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(USAGE_EXIT)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Logs (the clients' retry warnings) to stderr, filtered by the environment variable `var`
/// (default `warn`).
pub fn init_logging(var: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(var)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// An error and its causes, each once (a cause whose text its parent already shows is
/// skipped), for the one `error:` line a publisher prints.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

/// `KEY=VALUE` with a non-empty key (the value may be empty or hold `=`).
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE with a non-empty KEY")),
    }
}

/// An idempotency token for a cloud create call: the same `parts` give the same token, so a
/// retried or rerun call answers the first one's resource. `sync-image-` and 40 hex
/// characters (51 in all: inside ECS's and EBS's 64-character limits).
pub fn client_token(parts: &[&str]) -> String {
    // NUL separates: arguments cannot contain it, so different parts never join alike.
    let digest = Sha256::digest(parts.join("\0"));
    format!("sync-image-{}", &hex::encode(digest)[..40])
}

/// What a disk image file's bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vhd,
}

/// Sniffs `file` of `size` bytes: a qcow2 header starts with `QFI\xfb`; a VHD ends with a
/// 512-byte footer starting `conectix`; anything else is taken as raw.
pub fn sniff_format(file: &mut File, size: u64) -> io::Result<ImageFormat> {
    let mut head = [0u8; 4];
    if size >= 4 {
        file.seek(SeekFrom::Start(0))?;
        file.read_exact(&mut head)?;
        if &head == b"QFI\xfb" {
            return Ok(ImageFormat::Qcow2);
        }
    }
    if size >= 512 {
        let mut cookie = [0u8; 8];
        file.seek(SeekFrom::Start(size - 512))?;
        file.read_exact(&mut cookie)?;
        if &cookie == b"conectix" {
            return Ok(ImageFormat::Vhd);
        }
    }
    Ok(ImageFormat::Raw)
}

/// Reads `path` once, in blocks of `block_size` bytes (the last one may be shorter), hands
/// each block to `each` with its index, and returns the file's SHA-256 in hex. Blocking: run
/// it off the async threads.
pub fn hash_file(
    path: &Path,
    block_size: usize,
    mut each: impl FnMut(u64, &[u8]),
) -> io::Result<String> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; block_size];
    let mut offset = 0u64;
    let mut index = 0u64;
    while offset < size {
        let n = usize::try_from((size - offset).min(block_size as u64)).unwrap_or(block_size);
        file.read_exact_at(&mut buf[..n], offset)?;
        h.update(&buf[..n]);
        each(index, &buf[..n]);
        offset += n as u64;
        index += 1;
    }
    // A file that grew while read: its digest would name bytes never published.
    if file.metadata()?.len() != size {
        return Err(io::Error::other(format!(
            "{} changed size while being read",
            path.display()
        )));
    }
    Ok(hex::encode(h.finalize()))
}

/// The pauses between polls of a long cloud operation (a snapshot sealing, an image import):
/// 250 ms first (emulators and small images finish in well under a second), then 1.5 times
/// longer each time up to 10 s (real ones take minutes; 10 s keeps a wait to a few hundred
/// Describe calls, far inside either cloud's API quota, and notices the end promptly).
#[derive(Debug, Clone)]
pub struct PollPause {
    next: Duration,
}

impl Default for PollPause {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(250),
        }
    }
}

impl PollPause {
    const CAP: Duration = Duration::from_secs(10);

    /// The pause to take now; the next one is longer.
    pub fn take(&mut self) -> Duration {
        let now = self.next;
        self.next = self.next.mul_f64(1.5).min(Self::CAP);
        now
    }
}

/// How a publisher ends: the image id alone on stdout and success, or the error's cause chain
/// and its hint (if any) on stderr and the error's exit status.
pub fn finish<E: std::error::Error>(
    name: &str,
    result: Result<String, E>,
    hint: impl Fn(&E) -> Option<String>,
    exit_code: impl Fn(&E) -> ExitCode,
) -> ExitCode {
    match result {
        Ok(image_id) => {
            println!("{image_id}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: error: {}", error_chain(&e));
            if let Some(hint) = hint(&e) {
                eprintln!("{name}: hint: {hint}");
            }
            exit_code(&e)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn scratch(name: &str, bytes: &[u8]) -> (std::path::PathBuf, File) {
        let p =
            std::env::temp_dir().join(format!("sync-common-publish-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        let f = File::open(&p).unwrap();
        (p, f)
    }

    #[test]
    fn tags_parse() {
        assert_eq!(parse_tag("k=v=w"), Ok(("k".into(), "v=w".into())));
        assert_eq!(parse_tag("k="), Ok(("k".into(), String::new())));
        assert!(parse_tag("=v").is_err() && parse_tag("kv").is_err());
    }

    #[test]
    fn client_tokens_are_stable_and_distinct() {
        let t = client_token(&["cn-hangzhou", "img", "b", "k"]);
        assert_eq!(t, client_token(&["cn-hangzhou", "img", "b", "k"]));
        assert_eq!(t.len(), 51);
        assert!(t.is_ascii() && t.starts_with("sync-image-"));
        assert_ne!(t, client_token(&["cn-hangzhou", "img", "b", "k2"]));
        assert_ne!(t, client_token(&["cn-hangzhou", "im", "gb", "k"]));
        // The tokens sync-aliyun-image made before this function was shared: reruns of an
        // import begun by an older binary keep their token.
        let before = Sha256::digest("cn-hangzhou\0img\0b\0k");
        assert_eq!(t, format!("sync-image-{}", &hex::encode(before)[..40]));
    }

    #[test]
    fn formats_are_sniffed() {
        let (p, mut f) = scratch("q", b"QFI\xfb\0\0\0\x03");
        assert_eq!(sniff_format(&mut f, 8).unwrap(), ImageFormat::Qcow2);
        let mut vhd = vec![0u8; 1024];
        vhd[512..520].copy_from_slice(b"conectix");
        let (p2, mut f) = scratch("v", &vhd);
        assert_eq!(sniff_format(&mut f, 1024).unwrap(), ImageFormat::Vhd);
        let (p3, mut f) = scratch("r", &[0u8; 4096]);
        assert_eq!(sniff_format(&mut f, 4096).unwrap(), ImageFormat::Raw);
        let (p4, mut f) = scratch("tiny", b"x");
        assert_eq!(sniff_format(&mut f, 1).unwrap(), ImageFormat::Raw);
        for p in [p, p2, p3, p4] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn hash_file_sees_every_block_and_the_short_last_one() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (p, _) = scratch("h", &bytes);
        let mut seen = Vec::new();
        let digest = hash_file(&p, 4096, |i, b| seen.push((i, b.to_vec()))).unwrap();
        assert_eq!(digest, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(
            seen.iter().map(|(i, b)| (*i, b.len())).collect::<Vec<_>>(),
            vec![(0, 4096), (1, 4096), (2, 1808)]
        );
        let joined: Vec<u8> = seen.into_iter().flat_map(|(_, b)| b).collect();
        assert_eq!(joined, bytes);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn polls_slow_down_to_the_cap() {
        let mut p = PollPause::default();
        assert_eq!(p.take(), Duration::from_millis(250));
        assert_eq!(p.take(), Duration::from_millis(375));
        let last = (0..20).map(|_| p.take()).last().unwrap();
        assert_eq!(last, Duration::from_secs(10));
    }
}
