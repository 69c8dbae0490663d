//! The write target of one replicated disk: a sparse file or a block device, written with
//! O_DIRECT from aligned buffers when the kernel allows it.
//!
//! Buffered writes into new pages measured 0.37–0.40 GB/s on the reference VM against
//! 1.8–2.0 GB/s for O_DIRECT, so aligned blocks take the direct path; an unaligned tail (a disk
//! whose size is not a multiple of 4 KiB) takes the buffered one. `fdatasync` after either makes
//! both durable, and Linux keeps the page cache coherent with direct writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rustix::fs::FallocateFlags;

/// Alignment of direct I/O buffers, offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;

/// A disk being written.
#[derive(Debug)]
pub struct Volume {
    path: PathBuf,
    size: u64,
    buffered: File,
    direct: Option<File>,
    /// Writes started so far (see [`Volume::generation`]).
    writes: AtomicU64,
}

impl Volume {
    /// Opens an existing file or block device of `size` bytes for writing.
    pub fn open(path: &Path, size: u64, direct_io: bool) -> io::Result<Self> {
        let buffered = OpenOptions::new().read(true).write(true).open(path)?;
        let direct = if direct_io {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(path)
            {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e,
                        "O_DIRECT not available here; using buffered writes");
                    None
                }
            }
        } else {
            None
        };
        Ok(Volume {
            path: path.to_path_buf(),
            size,
            buffered,
            direct,
            writes: AtomicU64::new(0),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the volume lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many writes (and zeroings) have started on this handle. Counted before the write
    /// goes out, so an unchanged generation across an interval means the volume's content did
    /// not change in it: a cloud backend uses this to know whether a failed snapshot can be
    /// taken again with the same content.
    pub fn generation(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Writes `buf` at `offset`. Aligned writes from an aligned buffer bypass the page cache.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let aligned = buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
            && buf.len() % DIRECT_ALIGN == 0
            && offset % DIRECT_ALIGN as u64 == 0;
        match (&self.direct, aligned) {
            (Some(f), true) => match f.write_all_at(buf, offset) {
                // Some filesystems accept O_DIRECT at open and refuse it at write time.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    self.buffered.write_all_at(buf, offset)
                }
                r => r,
            },
            _ => self.buffered.write_all_at(buf, offset),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros, deallocating it where possible.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.buffered, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => {
                // No hole punching (some filesystems, some devices): write zeros.
                let zeros = vec![0u8; (len.min(1 << 20)) as usize];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.buffered.write_all_at(&zeros[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    /// `fdatasync`: everything written so far is durable when this returns.
    pub fn sync(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.buffered.read_exact_at(buf, offset)
    }

    /// The buffered handle, for copying and cloning.
    pub fn file(&self) -> &File {
        &self.buffered
    }
}

/// A heap buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary. Safe code only: the
/// vector is over-allocated and the slice starts at the first aligned byte.
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn with_capacity(cap: usize) -> Self {
        let raw = vec![0u8; cap + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { raw, start, len: 0 }
    }

    fn capacity(&self) -> usize {
        self.raw.len() - DIRECT_ALIGN
    }

    /// Sets the length (at most the capacity) and returns the writable slice.
    pub fn prepare(&mut self, len: usize) -> &mut [u8] {
        self.len = len.min(self.capacity());
        &mut self.raw[self.start..self.start + self.len]
    }

    /// The filled part.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// Recycles aligned buffers so that steady-state replication allocates nothing per block.
#[derive(Debug)]
pub struct BufferPool {
    block: usize,
    free: Mutex<Vec<AlignedBuf>>,
    keep: usize,
}

impl BufferPool {
    /// A pool of buffers of `block` bytes, keeping at most `keep` idle ones.
    pub fn new(block: usize, keep: usize) -> Self {
        BufferPool {
            block,
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of at least `len` bytes. Small blocks get a buffer of their own size, so the
    /// memory a connection holds stays close to the bytes its budget counts.
    pub fn get(&self, len: usize) -> AlignedBuf {
        if len < self.block / 4 {
            return AlignedBuf::with_capacity(len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN);
        }
        if len <= self.block {
            if let Some(b) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                return b;
            }
            return AlignedBuf::with_capacity(self.block);
        }
        AlignedBuf::with_capacity(len)
    }

    /// Returns a buffer for reuse.
    pub fn put(&self, buf: AlignedBuf) {
        if buf.capacity() != self.block {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_zeroes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let v = Volume::open(&p, 1 << 20, true).unwrap();
        let pool = BufferPool::new(8192, 4);
        let mut b = pool.get(8192);
        b.prepare(8192).fill(0xab);
        v.write_at(b.as_slice(), 4096).unwrap();
        v.write_at(&[1, 2, 3], 100).unwrap(); // unaligned path
        v.zero_range(8192, 4096).unwrap();
        v.sync().unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(&data[100..103], &[1, 2, 3]);
        assert!(data[4096..8192].iter().all(|&x| x == 0xab));
        assert!(data[8192..12288].iter().all(|&x| x == 0));
        assert_eq!(b.as_slice().as_ptr().align_offset(DIRECT_ALIGN), 0);
        pool.put(b);
        assert_eq!(pool.get(8192).capacity(), 8192, "recycled");
        assert_eq!(
            pool.get(100).capacity(),
            4096,
            "small blocks get a small buffer"
        );
    }
}
