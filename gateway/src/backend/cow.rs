//! Copy-before-write snapshots for filesystems without reflinks.
//!
//! A cloud snapshot is point-in-time at creation and completes in the background; this gives
//! the local backend the same shape, so a checkpoint holds the disk's writes only for as long
//! as it takes to *initiate* the snapshot (milliseconds), not to copy it (0.5–1.3 s for
//! 384 MiB of data here).
//!
//! At initiation the volume's data extents (SEEK_DATA/SEEK_HOLE) are split into 1 MiB parts,
//! each `Pending`. A background thread copies parts in order. Before the writer changes a
//! range of the volume it calls [`SnapshotCopy::preserve`], which copies every overlapping part
//! that is still `Pending` first (or waits for the background thread to finish one it is
//! copying). Holes at initiation are already holes in the snapshot file, so writes there need
//! nothing. When every part is copied the snapshot file is fsynced and its metadata rewritten
//! with state `completed`.
//!
//! Crash safety: the part list is persisted (`S.parts`) before the snapshot is acknowledged,
//! and a part counts as copied only once its copy is `fdatasync`ed and its index appended to a
//! journal (`S.copied`) that is `fdatasync`ed too. The writer changes a part of the volume only
//! after that, so after a crash every part missing from the journal still holds the
//! checkpoint's content on the volume: [`SnapshotCopy::resume`] copies just those, and the
//! snapshot completes as if nothing had happened.

use std::fs::{File, OpenOptions};
use std::io;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::{BufferPool, SnapshotInfo, SnapshotState};
use crate::durable;

/// Size of one copy unit: small enough that a write waiting on it stalls briefly.
const PART: u64 = 1 << 20;

/// Parts copied per `fdatasync` pair in the background copy (8 MiB).
const BATCH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Pending,
    Copying,
    Copied,
}

#[derive(Debug)]
struct Progress {
    parts: Vec<Part>,
    /// Set once the file is synced and the metadata says `completed` (or the copy failed).
    outcome: Option<Result<SnapshotInfo, String>>,
}

/// A snapshot being filled in the background.
#[derive(Debug)]
pub struct SnapshotCopy {
    info: SnapshotInfo,
    meta_path: PathBuf,
    /// Start offset of each part; each part ends at the next 1 MiB boundary or extent end.
    starts: Vec<(u64, usize)>,
    src: File,
    src_direct: Option<File>,
    dst: File,
    dst_direct: Option<File>,
    parts_path: PathBuf,
    journal_path: PathBuf,
    /// Append-only list of copied part indices (u32 LE), synced before a part counts as copied.
    journal: Mutex<File>,
    pool: BufferPool,
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Background copy cap in bytes/s (0: none).
    rate: u64,
}

pub(crate) fn open_direct(p: &Path, write: bool) -> Option<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(p)
        .ok()
}

/// `S.parts` and `S.copied` beside snapshot image `S.img`.
pub fn side_files(img: &Path) -> (PathBuf, PathBuf) {
    (img.with_extension("parts"), img.with_extension("copied"))
}

/// Data extents of `f` below `size`, as 1 MiB-bounded parts.
pub(crate) fn data_parts(f: &File, size: u64) -> io::Result<Vec<(u64, usize)>> {
    use rustix::fs::SeekFrom as Whence;
    let mut parts = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(f, Whence::Data(pos as _)) {
            Ok(d) => d,
            // ENXIO: no data after pos
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(f, Whence::Hole(data as _))?.min(size);
        let mut off = data;
        while off < hole {
            let end = ((off / PART + 1) * PART).min(hole);
            parts.push((off, (end - off) as usize));
            off = end;
        }
        pos = hole;
    }
    Ok(parts)
}

impl SnapshotCopy {
    /// Fixes the point in time: records which parts of `src` hold data and persists that list
    /// (`dst` + `.parts`) before returning. `dst` must be an empty file; it is sized here.
    pub fn begin(
        info: SnapshotInfo,
        meta_path: PathBuf,
        src_path: &Path,
        dst_path: &Path,
        size: u64,
    ) -> io::Result<Self> {
        let src = File::open(src_path)?;
        let starts = data_parts(&src, size)?;
        let mut list = Vec::with_capacity(starts.len() * 12);
        for (off, n) in &starts {
            list.extend_from_slice(&off.to_le_bytes());
            list.extend_from_slice(&(*n as u32).to_le_bytes());
        }
        let (parts_path, journal_path) = side_files(dst_path);
        durable::atomic_write(&parts_path, &list, 0o600)?;
        let _ = std::fs::remove_file(&journal_path);
        let dst = OpenOptions::new().write(true).open(dst_path)?;
        dst.set_len(size)?;
        dst.sync_all()?;
        Self::assemble(info, meta_path, src_path, dst_path, starts, &[])
    }

    /// Picks up a copy that a crash interrupted: parts in the journal are done, every other
    /// part is copied again from the volume (which still holds the checkpoint's content there).
    pub fn resume(
        info: SnapshotInfo,
        meta_path: PathBuf,
        src_path: &Path,
        dst_path: &Path,
    ) -> io::Result<Self> {
        let (parts_path, journal_path) = side_files(dst_path);
        let list = std::fs::read(&parts_path)?;
        if list.len() % 12 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is damaged", parts_path.display()),
            ));
        }
        let starts: Vec<(u64, usize)> = list
            .chunks_exact(12)
            .map(|c| {
                let mut o = [0u8; 8];
                o.copy_from_slice(&c[..8]);
                let mut n = [0u8; 4];
                n.copy_from_slice(&c[8..]);
                (u64::from_le_bytes(o), u32::from_le_bytes(n) as usize)
            })
            .collect();
        let journal = match std::fs::read(&journal_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        // A torn last record is ignored: its part was not yet counted as copied.
        let done: Vec<usize> = journal
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .filter(|&i| i < starts.len())
            .collect();
        Self::assemble(info, meta_path, src_path, dst_path, starts, &done)
    }

    fn assemble(
        info: SnapshotInfo,
        meta_path: PathBuf,
        src_path: &Path,
        dst_path: &Path,
        starts: Vec<(u64, usize)>,
        done: &[usize],
    ) -> io::Result<Self> {
        let (parts_path, journal_path) = side_files(dst_path);
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&journal_path)?;
        if let Some(dir) = journal_path.parent() {
            durable::sync_dir(dir)?;
        }
        let mut parts = vec![Part::Pending; starts.len()];
        for &i in done {
            parts[i] = Part::Copied;
        }
        Ok(SnapshotCopy {
            info,
            meta_path,
            progress: Mutex::new(Progress {
                parts,
                outcome: None,
            }),
            starts,
            src_direct: open_direct(src_path, false),
            dst_direct: open_direct(dst_path, true),
            src: File::open(src_path)?,
            dst: OpenOptions::new().write(true).open(dst_path)?,
            parts_path,
            journal_path,
            journal: Mutex::new(journal),
            pool: BufferPool::new(PART as usize, 4),
            changed: Condvar::new(),
            rate: 0,
        })
    }

    /// Caps the background copy at `bytes_per_sec` (0: no cap).
    pub fn with_rate(mut self, bytes_per_sec: u64) -> Self {
        self.rate = bytes_per_sec;
        self
    }

    /// The snapshot's metadata as recorded at initiation.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the copy has finished (either way).
    pub fn is_done(&self) -> bool {
        self.lock().outcome.is_some()
    }

    /// Copies every not-yet-copied part overlapping `[offset, offset + len)` durably before the
    /// caller overwrites it.
    pub fn preserve(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len);
        // first part whose end is past `offset`
        let first = self
            .starts
            .partition_point(|&(s, n)| s + n as u64 <= offset);
        let last = self.starts.partition_point(|&(s, _)| s < end);
        if first < last {
            self.copy_parts(&(first..last).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    /// Copies the given parts unless already copied, waiting for any another thread is
    /// copying; the copies and the journal are synced before the parts count as copied.
    fn copy_parts(&self, wanted: &[usize]) -> io::Result<()> {
        let mut mine = Vec::new();
        let mut g = self.lock();
        loop {
            // claim what is pending; wait while someone else holds a part we need
            for &i in wanted {
                if g.parts[i] == Part::Pending {
                    g.parts[i] = Part::Copying;
                    mine.push(i);
                }
            }
            let busy = wanted
                .iter()
                .any(|&i| g.parts[i] == Part::Copying && !mine.contains(&i));
            if !busy {
                break;
            }
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        if mine.is_empty() {
            return Ok(());
        }
        let r = (|| {
            for &i in &mine {
                self.copy_range(self.starts[i].0, self.starts[i].1)?;
            }
            self.dst.sync_data()?;
            let mut rec = Vec::with_capacity(mine.len() * 4);
            for &i in &mine {
                rec.extend_from_slice(&(i as u32).to_le_bytes());
            }
            let j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            (&*j).write_all(&rec)?;
            j.sync_data()
        })();
        let mut g = self.lock();
        for &i in &mine {
            g.parts[i] = if r.is_ok() {
                Part::Copied
            } else {
                Part::Pending
            };
        }
        drop(g);
        self.changed.notify_all();
        r
    }

    fn copy_range(&self, off: u64, n: usize) -> io::Result<()> {
        let mut buf = self.pool.get(n);
        let piece = buf.prepare(n);
        let aligned = off % 4096 == 0 && n % 4096 == 0;
        let r = (|| {
            match (&self.src_direct, aligned) {
                (Some(f), true) => f.read_exact_at(piece, off)?,
                _ => self.src.read_exact_at(piece, off)?,
            }
            match (&self.dst_direct, aligned) {
                (Some(f), true) => f.write_all_at(piece, off),
                _ => self.dst.write_all_at(piece, off),
            }
        })();
        self.pool.put(buf);
        r
    }

    /// Background body: copies all parts, syncs, records completion. Returns the outcome.
    pub fn run(&self) -> Result<SnapshotInfo, String> {
        let result = (|| -> io::Result<SnapshotInfo> {
            let started = std::time::Instant::now();
            let mut copied = 0u64;
            let all: Vec<usize> = (0..self.starts.len()).collect();
            for batch in all.chunks(BATCH) {
                self.copy_parts(batch)?;
                copied += batch.iter().map(|&i| self.starts[i].1 as u64).sum::<u64>();
                if self.rate > 0 {
                    // A plain thread: sleeping here delays only this copy.
                    let due = std::time::Duration::from_secs_f64(copied as f64 / self.rate as f64);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(ahead);
                    }
                }
            }
            self.dst.sync_all()?;
            let mut info = self.info.clone();
            info.state = SnapshotState::Completed;
            let json = serde_json::to_vec_pretty(&info).map_err(io::Error::other)?;
            durable::atomic_write(&self.meta_path, &json, 0o600)?;
            let _ = std::fs::remove_file(&self.parts_path);
            let _ = std::fs::remove_file(&self.journal_path);
            Ok(info)
        })()
        .map_err(|e| format!("snapshot {} copy failed: {e}", self.info.id));
        if let Err(msg) = &result {
            let mut info = self.info.clone();
            info.state = SnapshotState::Failed;
            if let Ok(json) = serde_json::to_vec_pretty(&info) {
                let _ = durable::atomic_write(&self.meta_path, &json, 0o600);
            }
            tracing::error!(disk = %self.info.disk_id, snapshot = %self.info.id, error = %msg,
                "snapshot failed");
        }
        self.lock().outcome = Some(result.clone());
        self.changed.notify_all();
        result
    }

    /// Blocks until the copy has finished.
    pub fn wait(&self) -> Result<SnapshotInfo, String> {
        let mut g = self.lock();
        loop {
            if let Some(r) = &g.outcome {
                return r.clone();
            }
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_extents_and_megabyte_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&vec![1u8; 3 << 20], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let parts = data_parts(&f, 8 << 20).unwrap();
        assert_eq!(
            parts,
            vec![(1 << 20, 1 << 20), (2 << 20, 1 << 20), (3 << 20, 1 << 20)]
        );
    }
}
