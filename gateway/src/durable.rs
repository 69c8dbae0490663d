//! Crash-safe persistence, written once and used everywhere state is saved.
//!
//! - [`atomic_write`]: write temp, `fsync`, rename over the target, `fsync` the directory. After
//!   it returns, a crash leaves either the old or the new content, never a mix.
//! - [`SeqRecord`]: a two-slot record for the per-disk durable point that is rewritten after every
//!   sync batch. Slots alternate, each carries a generation and a checksum, so a torn write of one
//!   slot leaves the other intact; one `fdatasync` per update instead of the three a rename costs.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Replaces `path` with `data` atomically and durably.
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The directory holding `path`; `.` for a bare file name (whose `parent()` is empty).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `fsync`s a directory so that entries created or renamed in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its parents, then makes the new entries durable.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    sync_dir(dir)?;
    if let Some(parent) = dir.parent() {
        if parent.as_os_str().is_empty() {
            return Ok(());
        }
        sync_dir(parent)?;
    }
    Ok(())
}

/// The durable point of one disk, as persisted by the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurablePoint {
    /// Every write with a sequence number up to this one is on the disk.
    pub seq: u64,
    /// End offset of the highest durable write since the last checkpoint (0 right after one).
    pub resume_offset: u64,
    /// Sequence number of the last completed checkpoint.
    pub checkpoint_seq: u64,
}

const SLOT: u64 = 4096;
const MAGIC: &[u8; 8] = b"SGWSEQ01";
const REC_LEN: usize = 8 + 8 + 8 + 8 + 8 + 8; // magic gen seq resume ckpt checksum

/// Two-slot, checksummed, `fdatasync`ed record of a [`DurablePoint`].
#[derive(Debug)]
pub struct SeqRecord {
    file: File,
    generation: u64,
    current: DurablePoint,
}

impl SeqRecord {
    /// Opens (creating if missing) the record at `path` and loads the newest valid slot.
    pub fn open(path: &Path) -> io::Result<Self> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        if !existed {
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                sync_dir(dir)?;
            }
        }
        let mut best: Option<(u64, DurablePoint)> = None;
        for slot in 0..2 {
            let mut buf = [0u8; REC_LEN];
            match file.read_exact_at(&mut buf, slot * SLOT) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => continue,
                Err(e) => return Err(e),
            }
            if let Some((gen, point)) = parse_slot(&buf) {
                if best.is_none_or(|(g, _)| gen > g) {
                    best = Some((gen, point));
                }
            }
        }
        let (generation, current) = best.unwrap_or_default();
        Ok(SeqRecord {
            file,
            generation,
            current,
        })
    }

    /// The last point stored.
    pub fn get(&self) -> DurablePoint {
        self.current
    }

    /// Stores `point` durably (one write, one `fdatasync`).
    pub fn store(&mut self, point: DurablePoint) -> io::Result<()> {
        let gen = self.generation + 1;
        let mut buf = [0u8; REC_LEN];
        buf[..8].copy_from_slice(MAGIC);
        buf[8..16].copy_from_slice(&gen.to_be_bytes());
        buf[16..24].copy_from_slice(&point.seq.to_be_bytes());
        buf[24..32].copy_from_slice(&point.resume_offset.to_be_bytes());
        buf[32..40].copy_from_slice(&point.checkpoint_seq.to_be_bytes());
        let sum = checksum(&buf[..40]);
        buf[40..48].copy_from_slice(&sum.to_be_bytes());
        self.file.write_all_at(&buf, (gen % 2) * SLOT)?;
        self.file.sync_data()?;
        self.generation = gen;
        self.current = point;
        Ok(())
    }
}

fn checksum(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(b, 0x5347_5753_4551)
}

fn parse_slot(buf: &[u8; REC_LEN]) -> Option<(u64, DurablePoint)> {
    if &buf[..8] != MAGIC {
        return None;
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[i..i + 8]);
        u64::from_be_bytes(w)
    };
    if checksum(&buf[..40]) != word(40) {
        return None;
    }
    Some((
        word(8),
        DurablePoint {
            seq: word(16),
            resume_offset: word(24),
            checkpoint_seq: word(32),
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        // (changing the process's directory would race other tests, so test the mapping)
        assert_eq!(parent_dir(Path::new("bare.key")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/b.key")), Path::new("/a"));
        assert_eq!(parent_dir(Path::new("a/b.key")), Path::new("a"));
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one", 0o600).unwrap();
        atomic_write(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left behind");
    }

    #[test]
    fn seq_record_survives_reopen_and_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.seq");
        let mut r = SeqRecord::open(&p).unwrap();
        assert_eq!(r.get(), DurablePoint::default());
        for seq in 1..=5 {
            r.store(DurablePoint {
                seq,
                resume_offset: seq * 4096,
                checkpoint_seq: 0,
            })
            .unwrap();
        }
        drop(r);
        assert_eq!(SeqRecord::open(&p).unwrap().get().seq, 5);
        // tear the newest slot (generation 5 lives in slot 1): the older one must win
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xee; 16], SLOT + 16).unwrap();
        drop(f);
        let r = SeqRecord::open(&p).unwrap();
        assert_eq!(r.get().seq, 4);
        assert_eq!(r.get().resume_offset, 4 * 4096);
    }
}
