//! Per-disk agent state in `STATE_DIR/<disk-id>/`.
//!
//! ```text
//! state.json    last completed checkpoint, pass in progress          (durable::atomic_write)
//! blockmap.bin  xxh3-128 of every 4 KiB block at that checkpoint      (durable::atomic_write)
//! lock          flock held for the whole run: one agent per disk
//! ```
//!
//! Order of writes: `pass` is persisted before the first frame of a pass; after the checkpoint
//! ack, `blockmap.bin` first, then `state.json` without the pass. A crash between the two leaves
//! a pass "in progress" whose checkpoint the gateway reports as landed, which the agent handles.
//!
//! `blockmap.bin` layout (little-endian, frozen as version 1):
//!
//! ```text
//! magic "SGWBMAP1" | block_size:u32 | reserved:u32 | source_size:u64 | checkpoint_seq:u64
//! | count:u64 | xxh3_64(body):u64 | body: count × u128
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::AgentError;
use crate::durable;
use crate::protocol::BLOCK_SIZE;

const STATE_FILE: &str = "state.json";
const BLOCKMAP_FILE: &str = "blockmap.bin";
const LOCK_FILE: &str = "lock";
const MAP_MAGIC: &[u8; 8] = b"SGWBMAP1";
const MAP_HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 8 + 8;

/// Whether a pass sends every block, only those changed since the baseline, or only those
/// whose content differs from the gateway's (delta resync: hash queries, no baseline needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PassKind {
    Full,
    Incremental,
    Delta,
}

impl PassKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PassKind::Full => "full",
            PassKind::Incremental => "incremental",
            PassKind::Delta => "delta",
        }
    }

    /// Label prefix of checkpoints taken by this kind of pass.
    pub fn label_prefix(self) -> &'static str {
        match self {
            PassKind::Full => "full",
            PassKind::Incremental => "incr",
            PassKind::Delta => "delta",
        }
    }
}

/// The last checkpoint the gateway acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRecord {
    pub seq: u64,
    pub label: String,
    pub snapshot_id: String,
    /// RFC 3339, when the agent recorded it.
    pub time: String,
    pub source_size: u64,
}

/// A pass that was started and has not reached its checkpoint ack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassRecord {
    pub label: String,
    pub kind: PassKind,
    /// RFC 3339.
    pub started_at: String,
}

/// Contents of `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    pub checkpoint: Option<CheckpointRecord>,
    pub pass: Option<PassRecord>,
}

impl AgentState {
    /// Sequence number of the last completed checkpoint, 0 when there is none.
    pub fn checkpoint_seq(&self) -> u64 {
        self.checkpoint.as_ref().map_or(0, |c| c.seq)
    }
}

/// Content hashes of every 4 KiB block of the source at one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    pub source_size: u64,
    pub checkpoint_seq: u64,
    pub hashes: Vec<u128>,
}

impl BlockMap {
    /// Number of 4 KiB blocks (the last one possibly partial) in a source of `size` bytes.
    pub fn blocks_for(size: u64) -> usize {
        size.div_ceil(BLOCK_SIZE) as usize
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.hashes.len() * 16);
        for h in &self.hashes {
            body.extend_from_slice(&h.to_le_bytes());
        }
        let mut out = Vec::with_capacity(MAP_HEADER_LEN + body.len());
        out.extend_from_slice(MAP_MAGIC);
        out.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.source_size.to_le_bytes());
        out.extend_from_slice(&self.checkpoint_seq.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < MAP_HEADER_LEN || &b[..8] != MAP_MAGIC {
            return Err("not a block map".into());
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let block = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if u64::from(block) != BLOCK_SIZE {
            return Err(format!("block size {block}, expected {BLOCK_SIZE}"));
        }
        let (source_size, checkpoint_seq, count, sum) = (word(16), word(24), word(32), word(40));
        let body = &b[MAP_HEADER_LEN..];
        if count != Self::blocks_for(source_size) as u64 || body.len() as u64 != count * 16 {
            return Err("block count does not match the source size".into());
        }
        if xxhash_rust::xxh3::xxh3_64(body) != sum {
            return Err("checksum mismatch".into());
        }
        let hashes = body
            .chunks_exact(16)
            .map(|c| {
                let mut w = [0u8; 16];
                w.copy_from_slice(c);
                u128::from_le_bytes(w)
            })
            .collect();
        Ok(BlockMap {
            source_size,
            checkpoint_seq,
            hashes,
        })
    }
}

/// The state directory of one disk, locked for the lifetime of this value.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates `root/<disk_id>` if needed and takes the per-disk lock.
    pub fn open(root: &Path, disk_id: &str) -> Result<Self, AgentError> {
        let dir = root.join(disk_id);
        durable::create_dir_all_durable(&dir).map_err(|e| AgentError::state(&dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| AgentError::state(&lock_path, e))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(AgentError::Locked { path: lock_path });
            }
            Err(e) => return Err(AgentError::state(&lock_path, e.into())),
        }
        Ok(StateDir { dir, _lock: lock })
    }

    /// The saved state, or the empty state on a first run.
    pub fn load(&self) -> Result<AgentState, AgentError> {
        let path = self.dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AgentError::StateCorrupt {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(e) => Err(AgentError::state(path, e)),
        }
    }

    pub fn save(&self, state: &AgentState) -> Result<(), AgentError> {
        let path = self.dir.join(STATE_FILE);
        let mut text = serde_json::to_vec_pretty(state)
            .map_err(|e| AgentError::Internal(format!("cannot encode state: {e}")))?;
        text.push(b'\n');
        durable::atomic_write(&path, &text, 0o600).map_err(|e| AgentError::state(path, e))
    }

    /// The saved block map; `Ok(None)` when it is missing or unusable (the caller falls back to
    /// a full pass, so a damaged map costs bandwidth, never correctness).
    pub fn load_map(&self) -> Result<Option<BlockMap>, AgentError> {
        let path = self.dir.join(BLOCKMAP_FILE);
        match std::fs::read(&path) {
            Ok(b) => match BlockMap::decode(&b) {
                Ok(m) => Ok(Some(m)),
                Err(reason) => {
                    tracing::warn!("ignoring block map {}: {reason}", path.display());
                    Ok(None)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::state(path, e)),
        }
    }

    pub fn save_map(&self, map: &BlockMap) -> Result<(), AgentError> {
        let path = self.dir.join(BLOCKMAP_FILE);
        durable::atomic_write(&path, &map.encode(), 0o600).map_err(|e| AgentError::state(path, e))
    }
}

/// Current time as RFC 3339.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn block_map_roundtrip_and_damage() {
        let map = BlockMap {
            source_size: 3 * 4096 + 100,
            checkpoint_seq: 42,
            hashes: vec![1, u128::MAX, 0, 7 << 100],
        };
        let enc = map.encode();
        assert_eq!(BlockMap::decode(&enc).unwrap(), map);
        let mut bad = enc.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(BlockMap::decode(&bad).is_err());
        assert!(BlockMap::decode(&enc[..enc.len() - 16]).is_err());
        assert!(BlockMap::decode(b"nope").is_err());
        assert_eq!(BlockMap::blocks_for(0), 0);
        assert_eq!(BlockMap::blocks_for(4096), 1);
        assert_eq!(BlockMap::blocks_for(4097), 2);
    }

    #[test]
    fn state_roundtrip_and_lock() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::open(root.path(), "disk-1").unwrap();
        assert_eq!(dir.load().unwrap(), AgentState::default());
        assert!(dir.load_map().unwrap().is_none());
        let st = AgentState {
            checkpoint: Some(CheckpointRecord {
                seq: 9,
                label: "full-1".into(),
                snapshot_id: "snap-1".into(),
                time: now_rfc3339(),
                source_size: 4096,
            }),
            pass: Some(PassRecord {
                label: "incr-2".into(),
                kind: PassKind::Incremental,
                started_at: now_rfc3339(),
            }),
        };
        dir.save(&st).unwrap();
        assert_eq!(dir.load().unwrap(), st);
        assert_eq!(dir.load().unwrap().checkpoint_seq(), 9);
        let text = std::fs::read_to_string(root.path().join("disk-1/state.json")).unwrap();
        assert!(text.contains("\"kind\": \"incremental\""), "{text}");
        let map = BlockMap {
            source_size: 4096,
            checkpoint_seq: 9,
            hashes: vec![5],
        };
        dir.save_map(&map).unwrap();
        assert_eq!(dir.load_map().unwrap(), Some(map));
        assert!(matches!(
            StateDir::open(root.path(), "disk-1"),
            Err(AgentError::Locked { .. })
        ));
        drop(dir);
        assert!(StateDir::open(root.path(), "disk-1").is_ok());
    }
}
