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
//! A crash before completion leaves metadata in state `pending`; on the next start
//! [`super::LocalBackend::recover`] marks it `failed` and removes the partial file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::{BufferPool, SnapshotInfo, SnapshotState};
use crate::durable;

/// Size of one copy unit: small enough that a write waiting on it stalls briefly.
const PART: u64 = 1 << 20;

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
    pool: BufferPool,
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Background copy cap in bytes/s (0: none).
    rate: u64,
}

fn open_direct(p: &Path, write: bool) -> Option<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(p)
        .ok()
}

/// Data extents of `f` below `size`, as 1 MiB-bounded parts.
fn data_parts(f: &File, size: u64) -> io::Result<Vec<(u64, usize)>> {
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
    /// Fixes the point in time: records which parts of `src` hold data. `dst` must be an
    /// empty file; it is sized to `size` here.
    pub fn begin(
        info: SnapshotInfo,
        meta_path: PathBuf,
        src_path: &Path,
        dst_path: &Path,
        size: u64,
    ) -> io::Result<Self> {
        let src = File::open(src_path)?;
        let dst = OpenOptions::new().write(true).open(dst_path)?;
        dst.set_len(size)?;
        let starts = data_parts(&src, size)?;
        Ok(SnapshotCopy {
            info,
            meta_path,
            progress: Mutex::new(Progress {
                parts: vec![Part::Pending; starts.len()],
                outcome: None,
            }),
            starts,
            src_direct: open_direct(src_path, false),
            dst_direct: open_direct(dst_path, true),
            src,
            dst,
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

    /// Copies every not-yet-copied part overlapping `[offset, offset + len)` before the caller
    /// overwrites it.
    pub fn preserve(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len);
        // first part whose end is past `offset`
        let first = self
            .starts
            .partition_point(|&(s, n)| s + n as u64 <= offset);
        for i in first..self.starts.len() {
            if self.starts[i].0 >= end {
                break;
            }
            self.copy_part(i)?;
        }
        Ok(())
    }

    /// Copies part `i` unless done; waits if another thread is copying it.
    fn copy_part(&self, i: usize) -> io::Result<()> {
        let mut g = self.lock();
        loop {
            match g.parts[i] {
                Part::Copied => return Ok(()),
                Part::Copying => {
                    g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                Part::Pending => break,
            }
        }
        g.parts[i] = Part::Copying;
        drop(g);
        let r = self.copy_range(self.starts[i].0, self.starts[i].1);
        let mut g = self.lock();
        g.parts[i] = if r.is_ok() {
            Part::Copied
        } else {
            Part::Pending
        };
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
            for i in 0..self.starts.len() {
                self.copy_part(i)?;
                copied += self.starts[i].1 as u64;
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
