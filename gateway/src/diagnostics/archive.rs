//! The bundle's file: a gzip-compressed tar whose members all sit in one top directory named
//! like the file, with a `README.txt` that lists them first.

use std::io::{self, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// One member of the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Path inside the top directory, `/`-separated (`logs/gateway.log`).
    pub name: String,
    pub data: Vec<u8>,
    /// What it is, for the README.
    pub about: String,
}

impl Member {
    pub fn new(
        name: impl Into<String>,
        data: impl Into<Vec<u8>>,
        about: impl Into<String>,
    ) -> Self {
        Member {
            name: name.into(),
            data: data.into(),
            about: about.into(),
        }
    }
}

/// The written archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// How secrets were kept out, as the README says it.
const REDACTION_NOTE: &[&str] = &[
    "Secrets are removed twice. By field name: in config.toml and state/*.json every value",
    "of a field named like a secret (*_key, *secret*, *token*, *password*, *credential*,",
    "*signature*, ...) reads <redacted>, and URLs lose their query and user info. By value:",
    "every secret the gateway knows (the bootstrap token, its control-plane credential,",
    "each disk's replication key, cloud credentials and STS tokens, the presigned upload",
    "URL's signature and token) is replaced by <redacted> wherever it appears, in any case",
    "and URL-encoded, in every file here, the log included; URLs in the log lose their",
    "query. Paths of key and token files are kept; their contents are never included.",
];

/// The README: what the bundle is, every member with its size and meaning, and `notes`
/// (what was left out, and why).
pub fn readme(top: &str, header: &[String], members: &[Member], notes: &[String]) -> Member {
    let mut t = String::new();
    t.push_str(&format!("{top}\n{}\n\n", "=".repeat(top.len())));
    for line in header {
        t.push_str(line);
        t.push('\n');
    }
    t.push_str("\nContents\n--------\n");
    let width = members.iter().map(|m| m.name.len()).max().unwrap_or(0);
    for m in members {
        t.push_str(&format!(
            "{:<width$}  {:>9} bytes  {}\n",
            m.name,
            m.data.len(),
            m.about
        ));
    }
    t.push_str("\nRedaction\n---------\n");
    for line in REDACTION_NOTE {
        t.push_str(line);
        t.push('\n');
    }
    if !notes.is_empty() {
        t.push_str("\nLeft out\n--------\n");
        for n in notes {
            t.push_str(&format!("- {n}\n"));
        }
    }
    Member::new("README.txt", t, "this file")
}

/// Writes `members` under `top/` into a new `.tar.gz` at `path`; answers its size and digest.
pub fn write(path: &Path, top: &str, members: &[Member], mtime_unix: u64) -> io::Result<Written> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let hashing = HashingWriter {
        inner: io::BufWriter::new(file),
        hasher: Sha256::new(),
        written: 0,
    };
    let gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(mtime_unix);
    tar.append_data(&mut dir, format!("{top}/"), io::empty())?;
    for m in members {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(m.data.len() as u64);
        h.set_mtime(mtime_unix);
        tar.append_data(&mut h, format!("{top}/{}", m.name), m.data.as_slice())?;
    }
    let gz = tar.into_inner()?;
    let mut hashing = gz.finish()?;
    hashing.flush()?;
    let HashingWriter {
        inner,
        hasher,
        written,
    } = hashing;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(Written {
        size: written,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Counts and hashes what passes through to the file.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Unpacks a `.tar.gz` into (path, content) pairs.
    pub(crate) fn unpack(path: &Path) -> Vec<(String, Vec<u8>)> {
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap());
        let mut ar = tar::Archive::new(gz);
        let mut out = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((name, data));
        }
        out
    }

    #[test]
    fn members_land_under_the_top_directory_with_a_readme_listing_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.tar.gz");
        let mut members = vec![
            Member::new("versions.json", "{}", "versions"),
            Member::new("logs/gateway.log", "line 1\nline 2\n", "recent log"),
        ];
        let readme = readme(
            "diagnostics-gw-1-20250101T000000Z",
            &["Gateway gw-1".into()],
            &members,
            &["state/x.seq: not JSON".into()],
        );
        members.insert(0, readme);
        let w = write(&path, "diagnostics-gw-1-20250101T000000Z", &members, 1).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(w.size, bytes.len() as u64);
        assert_eq!(w.sha256, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic");
        let got = unpack(&path);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "diagnostics-gw-1-20250101T000000Z/",
                "diagnostics-gw-1-20250101T000000Z/README.txt",
                "diagnostics-gw-1-20250101T000000Z/versions.json",
                "diagnostics-gw-1-20250101T000000Z/logs/gateway.log",
            ]
        );
        let text = String::from_utf8(got[1].1.clone()).unwrap();
        assert!(
            text.contains("logs/gateway.log") && text.contains("recent log"),
            "{text}"
        );
        assert!(text.contains("14 bytes"), "{text}");
        assert!(text.contains("state/x.seq: not JSON"), "{text}");
        assert_eq!(got[3].1, b"line 1\nline 2\n");
        // Never over an existing file.
        assert!(write(&path, "x", &members, 1).is_err());
    }
}
