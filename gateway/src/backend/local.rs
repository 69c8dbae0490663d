//! The embedded default backend: sparse files in the data directory.
//!
//! ```text
//! DATA_DIR/disks/ID.img                 the volume of disk ID (sparse)
//! DATA_DIR/snapshots/ID/S.img           snapshot S of disk ID (reflink, else copy-before-write)
//! DATA_DIR/snapshots/ID/S.json          its metadata (SnapshotInfo)
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::cow::SnapshotCopy;
use super::{
    BackendError, LaunchDisk, LaunchInfo, Recovered, Snapshot, SnapshotInfo, SnapshotRequest,
    SnapshotState, Volume,
};
use crate::durable;

/// Sparse files under a data directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    data_dir: PathBuf,
    direct_io: bool,
    copy_rate: u64,
}

impl LocalBackend {
    pub fn new(data_dir: PathBuf, direct_io: bool) -> Self {
        LocalBackend {
            data_dir,
            direct_io,
            copy_rate: 0,
        }
    }

    /// Caps the background copy of snapshots at `bytes_per_sec` (0: no cap).
    pub fn with_copy_rate(mut self, bytes_per_sec: u64) -> Self {
        self.copy_rate = bytes_per_sec;
        self
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

    /// Initiates a snapshot of the (durable) volume: a reflink when the filesystem has one
    /// (complete at once), else a copy-before-write snapshot filled in the background.
    pub fn begin_snapshot(
        &self,
        volume: &Volume,
        req: &SnapshotRequest,
    ) -> Result<Snapshot, BackendError> {
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
        let meta = dir.join(format!("{id}.json"));
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
        let mut info = SnapshotInfo {
            id: id.clone(),
            disk_id: req.disk_id.clone(),
            label: req.label.clone(),
            checkpoint_seq: req.checkpoint_seq,
            created_unix_ms,
            created: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            size_bytes: volume.size(),
            method: "reflink".into(),
            path: Some(img.clone()),
            state: SnapshotState::Completed,
            replaces: None,
        };
        if rustix::fs::ioctl_ficlone(&out, volume.file()).is_ok() {
            out.sync_all().map_err(io("sync", &img))?;
            let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
            durable::atomic_write(&meta, &json, 0o600).map_err(io("write", &meta))?;
            return Ok(Snapshot::Ready(info));
        }
        drop(out);
        info.method = "copy-before-write".into();
        info.state = SnapshotState::Pending;
        // The part list becomes durable first, then the `pending` metadata that makes a restart
        // resume the copy; only then is the checkpoint acknowledged.
        let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
        let copy = SnapshotCopy::begin(info, meta.clone(), volume.path(), &img, volume.size())
            .map(|c| c.with_rate(self.copy_rate))
            .map_err(io("start copy to", &img))?;
        durable::atomic_write(&meta, &json, 0o600).map_err(io("write", &meta))?;
        self.start_copy(copy, &req.disk_id)
    }

    /// Picks up snapshots of `disk_id` whose copy a stop interrupted: each resumes from its
    /// journal in the background (returned, so that writes preserve through it), or, when its
    /// part list never became durable (the checkpoint was not acknowledged), is marked failed.
    pub fn recover(&self, disk_id: &str) -> Result<Recovered, BackendError> {
        let mut out = Recovered::default();
        for mut info in self.list_snapshots(Some(disk_id))? {
            if info.state != SnapshotState::Pending {
                continue;
            }
            let dir = self.snapshot_dir(disk_id);
            let meta = dir.join(format!("{}.json", info.id));
            let img = info
                .path
                .clone()
                .unwrap_or_else(|| dir.join(format!("{}.img", info.id)));
            let (parts, journal) = super::cow::side_files(&img);
            if parts.exists() {
                match SnapshotCopy::resume(
                    info.clone(),
                    meta.clone(),
                    &self.volume_path(disk_id),
                    &img,
                ) {
                    Ok(copy) => {
                        tracing::warn!(disk = disk_id, snapshot = %info.id,
                            "snapshot copy was interrupted by a stop: resuming it");
                        out.resumed
                            .push(self.start_copy(copy.with_rate(self.copy_rate), disk_id)?);
                        continue;
                    }
                    Err(e) => tracing::error!(disk = disk_id, snapshot = %info.id, error = %e,
                        "cannot resume the snapshot copy"),
                }
            }
            let _ = std::fs::remove_file(&img);
            let _ = std::fs::remove_file(&parts);
            let _ = std::fs::remove_file(&journal);
            info.state = SnapshotState::Failed;
            let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
            durable::atomic_write(&meta, &json, 0o600).map_err(|source| BackendError::Io {
                disk: disk_id.into(),
                action: "write",
                path: meta.clone(),
                source,
            })?;
            tracing::warn!(disk = disk_id, snapshot = %info.id,
                "snapshot was interrupted before it was acknowledged: marked failed");
            out.failed.push(info);
        }
        Ok(out)
    }

    fn start_copy(&self, copy: SnapshotCopy, disk_id: &str) -> Result<Snapshot, BackendError> {
        let copy = Arc::new(copy);
        let bg = copy.clone();
        std::thread::Builder::new()
            .name(format!("snap-{disk_id}"))
            .spawn(move || {
                let _ = bg.run();
            })
            .map_err(|source| BackendError::Io {
                disk: disk_id.into(),
                action: "start copy thread for",
                path: copy.info().path.clone().unwrap_or_default(),
                source,
            })?;
        Ok(Snapshot::Copying(copy))
    }

    /// Materializes an instance's disks from completed snapshots: each becomes
    /// `DATA_DIR/instances/INSTANCE_ID/DISK_ID.img` (reflink, else a sparse copy), and the
    /// instance's metadata `instance.json` is written last.
    pub fn launch(
        &self,
        snapshots: &[SnapshotInfo],
        test: bool,
    ) -> Result<LaunchInfo, BackendError> {
        let instance_id = format!("i-{:016x}", rand::random::<u64>());
        let dir = self.data_dir.join("instances").join(&instance_id);
        let io = |disk: &str, action: &'static str, path: &Path| {
            let (disk, path) = (disk.to_string(), path.to_path_buf());
            move |source| BackendError::Io {
                disk,
                action,
                path,
                source,
            }
        };
        durable::create_dir_all_durable(&dir).map_err(io("*", "create", &dir))?;
        let mut disks = Vec::new();
        for snap in snapshots {
            if snap.state != SnapshotState::Completed {
                return Err(BackendError::SnapshotPending {
                    disk: snap.disk_id.clone(),
                    snapshot: snap.id.clone(),
                });
            }
            let src_path = snap.path.clone().unwrap_or_else(|| {
                self.snapshot_dir(&snap.disk_id)
                    .join(format!("{}.img", snap.id))
            });
            let dst_path = dir.join(format!("{}.img", snap.disk_id));
            let src = File::open(&src_path).map_err(io(&snap.disk_id, "open", &src_path))?;
            let dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dst_path)
                .map_err(io(&snap.disk_id, "create", &dst_path))?;
            if rustix::fs::ioctl_ficlone(&dst, &src).is_err() {
                copy_sparse(&src, &dst, snap.size_bytes).map_err(io(
                    &snap.disk_id,
                    "copy to",
                    &dst_path,
                ))?;
            }
            dst.sync_all()
                .map_err(io(&snap.disk_id, "sync", &dst_path))?;
            disks.push(LaunchDisk {
                disk_id: snap.disk_id.clone(),
                snapshot_id: snap.id.clone(),
                path: Some(dst_path),
            });
        }
        let info = LaunchInfo {
            instance_id,
            test,
            state: "running".into(),
            created_unix_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
                as u64,
            disks,
            image_id: None,
        };
        let meta = dir.join("instance.json");
        let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
        durable::atomic_write(&meta, &json, 0o600).map_err(io("*", "write", &meta))?;
        tracing::info!(instance = %info.instance_id, test, disks = info.disks.len(), "instance launched");
        Ok(info)
    }

    /// Reads every snapshot's metadata, oldest first.
    /// Instances launched from this data dir (those whose `instance.json` exists), oldest
    /// first. An unreadable metadata file is skipped with a warning.
    pub fn list_launches(&self) -> Result<Vec<LaunchInfo>, BackendError> {
        let dir = self.data_dir.join("instances");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(BackendError::Io {
                    disk: "*".into(),
                    action: "list",
                    path: dir,
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let meta = entry.path().join("instance.json");
            match std::fs::read(&meta) {
                Ok(b) => match serde_json::from_slice::<LaunchInfo>(&b) {
                    Ok(info) => out.push(info),
                    Err(e) => tracing::warn!(path = %meta.display(), error = %e,
                        "unreadable instance metadata skipped"),
                },
                // Not written yet (launch in progress) or not an instance.
                Err(_) => continue,
            }
        }
        out.sort_by(|a, b| {
            (a.created_unix_ms, &a.instance_id).cmp(&(b.created_unix_ms, &b.instance_id))
        });
        Ok(out)
    }

    /// Deletes the staging volume of `disk_id` (finalize). Snapshots are separate files and
    /// stay. A volume already gone is not an error.
    pub fn release_volume(&self, disk_id: &str) -> Result<(), BackendError> {
        let path = self.volume_path(disk_id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(BackendError::Io {
                    disk: disk_id.to_string(),
                    action: "delete",
                    path,
                    source,
                })
            }
        }
        if let Some(parent) = path.parent() {
            durable::sync_dir(parent).map_err(|source| BackendError::Io {
                disk: disk_id.to_string(),
                action: "sync directory of",
                path: path.clone(),
                source,
            })?;
        }
        tracing::info!(disk = %disk_id, path = %path.display(), "staging volume released");
        Ok(())
    }

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
                let text = match std::fs::read(&p) {
                    Ok(t) => t,
                    // Deleted (by retention, or another process) since the directory was
                    // read: it is no longer a snapshot to list.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(BackendError::Io {
                            disk: disk_id.unwrap_or("*").into(),
                            action: "read",
                            path: p.clone(),
                            source,
                        })
                    }
                };
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

    /// Deletes snapshot `info.id` of `info.disk_id`: the image and the copy's side files first,
    /// the metadata last (so a crash in between leaves a listed snapshot to delete again, never
    /// an unlisted image), then makes the removals durable. Paths are derived from the ids, not
    /// from `info.path`, so corrupt metadata cannot point the deletion elsewhere. Refuses a
    /// snapshot that is `pending` either in `info` or on disk; one already gone is `Ok`.
    pub fn delete_snapshot(&self, info: &SnapshotInfo) -> Result<(), BackendError> {
        let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\0']);
        if !plain(&info.disk_id) || !plain(&info.id) {
            return Err(BackendError::InvalidSnapshotId {
                disk: info.disk_id.clone(),
                snapshot: info.id.clone(),
            });
        }
        let pending = || BackendError::SnapshotPending {
            disk: info.disk_id.clone(),
            snapshot: info.id.clone(),
        };
        if info.state == SnapshotState::Pending {
            return Err(pending());
        }
        let io = |action: &'static str, path: &Path| {
            let (disk, path) = (info.disk_id.clone(), path.to_path_buf());
            move |source| BackendError::Io {
                disk,
                action,
                path,
                source,
            }
        };
        let dir = self.snapshot_dir(&info.disk_id);
        let meta = dir.join(format!("{}.json", info.id));
        // The caller's copy may be stale: a copy may have (re)started since it was listed.
        match std::fs::read(&meta) {
            Ok(text) => {
                let on_disk: SnapshotInfo =
                    serde_json::from_slice(&text).map_err(|e| BackendError::Metadata {
                        path: meta.clone(),
                        message: e.to_string(),
                    })?;
                if on_disk.state == SnapshotState::Pending {
                    return Err(pending());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("read", &meta)(e)),
        }
        let img = dir.join(format!("{}.img", info.id));
        let (parts, copied) = super::cow::side_files(&img);
        for path in [&img, &parts, &copied, &meta] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", path)(e)),
            }
        }
        match durable::sync_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("sync", &dir)(e)),
        }
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

/// Copies the data extents of `src` into `dst` (holes stay holes) and sizes `dst` to `size`.
fn copy_sparse(src: &File, dst: &File, size: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    dst.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    for (off, n) in super::cow::data_parts(src, size)? {
        let piece = &mut buf[..n];
        src.read_exact_at(piece, off)?;
        dst.write_all_at(piece, off)?;
    }
    Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_deleted_while_listing_is_skipped() {
        // An entry the directory listing saw and that is gone by the time it is read (here a
        // dangling link: retention deleting it at that moment looks the same).
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().to_path_buf(), true);
        let snaps = dir.path().join("snapshots").join("d1");
        std::fs::create_dir_all(&snaps).unwrap();
        std::os::unix::fs::symlink(snaps.join("gone"), snaps.join("snap-x.json")).unwrap();
        assert!(b.list_snapshots(Some("d1")).unwrap().is_empty());
        assert!(b.list_snapshots(None).unwrap().is_empty());
    }

    #[test]
    fn interrupted_copy_is_marked_failed_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().to_path_buf(), true);
        let v = b.open_volume("d2", 4 << 20).unwrap();
        v.write_at(&vec![5u8; 1 << 20], 0).unwrap();
        v.sync().unwrap();
        let req = SnapshotRequest {
            disk_id: "d2".into(),
            label: "full".into(),
            checkpoint_seq: 1,
        };
        let done = b.begin_snapshot(&v, &req).unwrap().wait().unwrap();
        // Pretend the process died before the part list was durable (so before the checkpoint
        // was acknowledged): metadata says pending, and there is no part list.
        let mut pending = done.clone();
        pending.state = SnapshotState::Pending;
        let meta = dir.path().join(format!("snapshots/d2/{}.json", done.id));
        std::fs::write(&meta, serde_json::to_vec(&pending).unwrap()).unwrap();
        let marked = b.recover("d2").unwrap();
        assert!(marked.resumed.is_empty());
        assert_eq!(marked.failed.len(), 1);
        assert_eq!(
            b.list_snapshots(Some("d2")).unwrap()[0].state,
            SnapshotState::Failed
        );
        assert!(!done.path.unwrap().exists(), "partial content removed");
    }

    /// A stop in the middle of a copy: parts the writer preserved (journaled) keep their
    /// preserved content, every other part is copied again from the volume on recovery.
    #[test]
    fn an_interrupted_copy_resumes_from_its_journal() {
        let dir = tempfile::tempdir().unwrap();
        let size = 32u64 << 20;
        // So slow that the first copier stops after its first batch of 8 parts: the "crash".
        let stalled = LocalBackend::new(dir.path().to_path_buf(), true).with_copy_rate(1);
        let v = stalled.open_volume("d3", size).unwrap();
        for i in 0..32u64 {
            v.write_at(&vec![i as u8 + 1; 1 << 20], i << 20).unwrap();
        }
        v.sync().unwrap();
        let before = std::fs::read(v.path()).unwrap();
        let req = SnapshotRequest {
            disk_id: "d3".into(),
            label: "c".into(),
            checkpoint_seq: 9,
        };
        let first = stalled.begin_snapshot(&v, &req).unwrap();
        // The writer overwrites parts 20 and 3 after preserving them.
        for part in [20u64, 3] {
            first.preserve(part << 20, 4096).unwrap();
            v.write_at(&vec![0xee; 4096], part << 20).unwrap();
        }
        v.sync().unwrap();
        // A new process recovers the pending snapshot (the stalled copier never finishes).
        let fresh = LocalBackend::new(dir.path().to_path_buf(), true);
        let r = fresh.recover("d3").unwrap();
        assert!(r.failed.is_empty());
        assert_eq!(r.resumed.len(), 1);
        let info = r.resumed[0].wait().unwrap();
        assert_eq!(info.state, SnapshotState::Completed);
        let snap = std::fs::read(info.path.as_ref().unwrap()).unwrap();
        assert!(
            snap == before,
            "snapshot differs from the checkpoint's content"
        );
        let (parts, journal) = super::super::cow::side_files(info.path.as_ref().unwrap());
        assert!(!parts.exists() && !journal.exists(), "side files removed");
    }

    #[test]
    fn launch_materializes_completed_snapshots_only() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().to_path_buf(), true);
        let v = b.open_volume("d4", 4 << 20).unwrap();
        v.write_at(&vec![3u8; 1 << 20], 1 << 20).unwrap();
        v.sync().unwrap();
        let before = std::fs::read(v.path()).unwrap();
        let req = SnapshotRequest {
            disk_id: "d4".into(),
            label: "c".into(),
            checkpoint_seq: 2,
        };
        let snap = b.begin_snapshot(&v, &req).unwrap().wait().unwrap();
        v.write_at(&vec![9u8; 4096], 0).unwrap(); // replication goes on
        let launched = b.launch(std::slice::from_ref(&snap), true).unwrap();
        assert!(launched.instance_id.starts_with("i-") && launched.test);
        let path = dir
            .path()
            .join(format!("instances/{}/d4.img", launched.instance_id));
        assert_eq!(launched.disks[0].path.as_deref(), Some(path.as_path()));
        assert!(
            std::fs::read(&path).unwrap() == before,
            "disk equals the snapshot"
        );
        let meta = dir
            .path()
            .join(format!("instances/{}/instance.json", launched.instance_id));
        let back: LaunchInfo = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
        assert_eq!(back, launched);
        let mut pending = snap.clone();
        pending.state = SnapshotState::Pending;
        assert!(matches!(
            b.launch(&[pending], false),
            Err(BackendError::SnapshotPending { .. })
        ));
    }

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
        let before = std::fs::read(v.path()).unwrap();
        let handle = b.begin_snapshot(&v, &req).unwrap();
        // Later writes, preserved first as the writer does, do not reach the snapshot, even
        // while its copy is still running.
        for off in [4096u64, 6 << 20, 0] {
            handle.preserve(off, 4096).unwrap();
            v.write_at(&vec![1u8; 4096], off).unwrap();
        }
        let s = handle.wait().unwrap();
        assert_eq!(s.state, SnapshotState::Completed);
        let snap = std::fs::read(s.path.as_ref().unwrap()).unwrap();
        assert_eq!(snap, before);
        let listed = b.list_snapshots(Some("d1")).unwrap();
        assert_eq!(listed, vec![s.clone()]);
        let r = b.recover("d1").unwrap();
        assert!(
            r.resumed.is_empty() && r.failed.is_empty(),
            "a completed snapshot stays"
        );
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
