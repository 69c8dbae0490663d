//! The embedded default backend: sparse files in the data directory.
//!
//! ```text
//! DATA_DIR/disks/ID.img                 the volume of disk ID (sparse)
//! DATA_DIR/snapshots/ID/S.img           snapshot S of disk ID (reflink, else sparse copy)
//! DATA_DIR/snapshots/ID/S.json          its metadata (SnapshotInfo)
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{BackendError, SnapshotInfo, SnapshotRequest, Volume};
use crate::durable;

/// Sparse files under a data directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    data_dir: PathBuf,
    direct_io: bool,
}

impl LocalBackend {
    pub fn new(data_dir: PathBuf, direct_io: bool) -> Self {
        LocalBackend {
            data_dir,
            direct_io,
        }
    }

    /// Path of a disk's volume.
    pub fn volume_path(&self, disk_id: &str) -> PathBuf {
        self.data_dir.join("disks").join(format!("{disk_id}.img"))
    }

    fn snapshot_dir(&self, disk_id: &str) -> PathBuf {
        self.data_dir.join("snapshots").join(disk_id)
    }

    /// Creates the sparse volume file if missing, then opens it.
    pub fn open_volume(&self, disk_id: &str, size: u64) -> Result<Volume, BackendError> {
        let path = self.volume_path(disk_id);
        let io = |action: &'static str, path: &Path| {
            let (disk, path) = (disk_id.to_string(), path.to_path_buf());
            move |source| BackendError::Io {
                disk,
                action,
                path,
                source,
            }
        };
        let dir = self.data_dir.join("disks");
        durable::create_dir_all_durable(&dir).map_err(io("create", &dir))?;
        match std::fs::metadata(&path) {
            Ok(m) if m.len() != size => {
                return Err(BackendError::SizeMismatch {
                    disk: disk_id.into(),
                    path,
                    found: m.len(),
                    expected: size,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io("create", &path))?;
                f.set_len(size).map_err(io("size", &path))?;
                f.sync_all().map_err(io("sync", &path))?;
                durable::sync_dir(&dir).map_err(io("sync", &dir))?;
            }
            Err(e) => return Err(io("inspect", &path)(e)),
        }
        Volume::open(&path, size, self.direct_io).map_err(io("open", &path))
    }

    /// Copies the (durable) volume to a new snapshot file and records its metadata.
    pub fn create_snapshot(
        &self,
        volume: &Volume,
        req: &SnapshotRequest,
    ) -> Result<SnapshotInfo, BackendError> {
        let now = time::OffsetDateTime::now_utc();
        let created_unix_ms = (now.unix_timestamp_nanos() / 1_000_000) as u64;
        let stamp = now
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .unwrap_or_default();
        let id = format!("snap-{stamp}-{}", req.checkpoint_seq);
        let dir = self.snapshot_dir(&req.disk_id);
        let img = dir.join(format!("{id}.img"));
        let io = |action: &'static str, path: &Path| {
            let (disk, path) = (req.disk_id.clone(), path.to_path_buf());
            move |source| BackendError::Io {
                disk,
                action,
                path,
                source,
            }
        };
        durable::create_dir_all_durable(&dir).map_err(io("create", &dir))?;
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&img)
            .map_err(io("create", &img))?;
        let method = match rustix::fs::ioctl_ficlone(&out, volume.file()) {
            Ok(()) => "reflink",
            Err(_) => {
                sparse_copy(volume.file(), &out, volume.size(), volume.path(), &img)
                    .map_err(io("copy to", &img))?;
                "sparse-copy"
            }
        };
        out.sync_all().map_err(io("sync", &img))?;
        let info = SnapshotInfo {
            id: id.clone(),
            disk_id: req.disk_id.clone(),
            label: req.label.clone(),
            checkpoint_seq: req.checkpoint_seq,
            created_unix_ms,
            created: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            size_bytes: volume.size(),
            method: method.into(),
            path: Some(img),
        };
        let meta = dir.join(format!("{id}.json"));
        let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
        durable::atomic_write(&meta, &json, 0o600).map_err(io("write", &meta))?;
        Ok(info)
    }

    /// Reads every snapshot's metadata, oldest first.
    pub fn list_snapshots(&self, disk_id: Option<&str>) -> Result<Vec<SnapshotInfo>, BackendError> {
        let root = self.data_dir.join("snapshots");
        let dirs: Vec<PathBuf> = match disk_id {
            Some(id) => vec![root.join(id)],
            None => match std::fs::read_dir(&root) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(source) => {
                    return Err(BackendError::Io {
                        disk: "*".into(),
                        action: "list",
                        path: root,
                        source,
                    })
                }
            },
        };
        let mut out = Vec::new();
        for dir in dirs {
            let entries = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(BackendError::Io {
                        disk: disk_id.unwrap_or("*").into(),
                        action: "list",
                        path: dir,
                        source,
                    })
                }
            };
            for e in entries.flatten() {
                let p = e.path();
                let name = e.file_name();
                let name = name.to_string_lossy();
                if !name.ends_with(".json") || name.starts_with('.') {
                    continue;
                }
                let text = std::fs::read(&p).map_err(|source| BackendError::Io {
                    disk: disk_id.unwrap_or("*").into(),
                    action: "read",
                    path: p.clone(),
                    source,
                })?;
                let info: SnapshotInfo =
                    serde_json::from_slice(&text).map_err(|e| BackendError::Metadata {
                        path: p.clone(),
                        message: e.to_string(),
                    })?;
                out.push(info);
            }
        }
        out.sort_by(|a, b| {
            (a.created_unix_ms, a.checkpoint_seq).cmp(&(b.created_unix_ms, b.checkpoint_seq))
        });
        Ok(out)
    }

    /// SHA-256 of a snapshot file's whole content.
    pub fn snapshot_digest(&self, snap: &SnapshotInfo) -> Result<[u8; 32], BackendError> {
        let path = snap.path.clone().unwrap_or_else(|| {
            self.snapshot_dir(&snap.disk_id)
                .join(format!("{}.img", snap.id))
        });
        let err = |source| BackendError::Io {
            disk: snap.disk_id.clone(),
            action: "read",
            path: path.clone(),
            source,
        };
        let mut f = File::open(&path).map_err(err)?;
        sha256_reader(&mut f).map_err(err)
    }
}

/// SHA-256 of everything `r` yields.
pub fn sha256_reader(r: &mut impl Read) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Copies only the allocated extents of `src` (found with SEEK_DATA/SEEK_HOLE) into `dst`
/// and sizes `dst` to `size`; holes stay holes.
///
/// Extents are copied in 8 MiB pieces through an aligned buffer with O_DIRECT on both sides
/// where the filesystem allows it: the volume was written with O_DIRECT, so its data is not in
/// the page cache, and buffered writes into new pages run at a fifth of direct ones here
/// (in-kernel `copy_file_range` measured 1.9 s for 384 MiB, this path about 0.5 s).
fn sparse_copy(
    src: &File,
    dst: &File,
    size: u64,
    src_path: &Path,
    dst_path: &Path,
) -> io::Result<()> {
    use rustix::fs::SeekFrom as Whence;
    const PIECE: usize = 8 << 20;
    dst.set_len(size)?;
    let direct = |p: &Path, write: bool| {
        OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(p)
            .ok()
    };
    let src_direct = direct(src_path, false);
    let dst_direct = direct(dst_path, true);
    // Extents to copy, in PIECE-sized parts.
    let mut parts = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(src, Whence::Data(pos as _)) {
            Ok(d) => d,
            // ENXIO: no data after pos
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, Whence::Hole(data as _))?.min(size);
        let mut off = data;
        while off < hole {
            let n = (hole - off).min(PIECE as u64) as usize;
            parts.push((off, n));
            off += n as u64;
        }
        pos = hole;
    }
    // Reading and writing overlap: a reader thread fills buffers, this thread writes them.
    let pool = super::BufferPool::new(PIECE, 3);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, super::AlignedBuf)>(2);
        let (pool, src_direct) = (&pool, &src_direct);
        let reader = scope.spawn(move || -> io::Result<()> {
            for (off, n) in parts {
                let mut buf = pool.get(n);
                let piece = buf.prepare(n);
                match (src_direct, off % 4096 == 0 && n % 4096 == 0) {
                    (Some(f), true) => f.read_exact_at(piece, off)?,
                    _ => src.read_exact_at(piece, off)?,
                }
                if tx.send((off, buf)).is_err() {
                    break; // the writer failed and reports why
                }
            }
            Ok(())
        });
        let mut written = Ok(());
        for (off, buf) in rx.iter() {
            let piece = buf.as_slice();
            let r = match (&dst_direct, off % 4096 == 0 && piece.len() % 4096 == 0) {
                (Some(f), true) => f.write_all_at(piece, off),
                _ => dst.write_all_at(piece, off),
            };
            pool.put(buf);
            if let Err(e) = r {
                written = Err(e);
                break;
            }
        }
        drop(rx);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("snapshot reader thread panicked")));
        written.and(read)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_equals_volume_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().to_path_buf(), true);
        let size = 8 << 20;
        let v = b.open_volume("d1", size).unwrap();
        v.write_at(&vec![7u8; 4096], 4096).unwrap();
        v.write_at(&vec![9u8; 4096], 6 << 20).unwrap();
        v.sync().unwrap();
        let req = SnapshotRequest {
            disk_id: "d1".into(),
            label: "full-1".into(),
            checkpoint_seq: 3,
        };
        let s = b.create_snapshot(&v, &req).unwrap();
        let snap = std::fs::read(s.path.as_ref().unwrap()).unwrap();
        assert_eq!(snap, std::fs::read(v.path()).unwrap());
        // later writes to the volume do not reach the snapshot
        v.write_at(&vec![1u8; 4096], 0).unwrap();
        assert_eq!(snap, std::fs::read(s.path.as_ref().unwrap()).unwrap());
        let listed = b.list_snapshots(Some("d1")).unwrap();
        assert_eq!(listed, vec![s.clone()]);
        assert_eq!(b.list_snapshots(None).unwrap().len(), 1);
        let digest = b.snapshot_digest(&s).unwrap();
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&snap)));
        // reopening with another size is refused, not silently truncated
        assert!(matches!(
            b.open_volume("d1", size * 2),
            Err(BackendError::SizeMismatch { .. })
        ));
    }
}
