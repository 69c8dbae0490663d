//! Replication protocol, version 1: the wire contract between `sync-agent` and `sync-gateway`.
//!
//! One TCP connection carries one source disk. Both programs use this module, so the layout below
//! is the single source of truth; [`frame`] implements it and its tests pin it.
//!
//! # Connection layout
//!
//! The agent opens with a 4-byte preamble, then both sides exchange length-prefixed frames.
//! All integers are big-endian.
//!
//! ```text
//! preamble (agent -> gateway, once)   "SGWP"                      (frozen: never changes)
//!
//! frame   +----------------+---------+---------------------------+
//!         | length: u32    | kind:u8 | body: length-1 bytes      |
//!         +----------------+---------+---------------------------+
//!           length counts kind + body; a receiver rejects length 0 or
//!           length > 1 + DATA_HEADER_LEN + its payload cap before buffering
//!           (the gateway allows at most 1 KiB per frame until the agent has authenticated).
//! ```
//!
//! | kind | frame | direction | body |
//! |------|-------|-----------|------|
//! | 0x01 | `Hello` | agent → gw | `min_version:u16 max_version:u16 disk_size:u64 id_len:u8 disk_id agent_len:u8 agent` |
//! | 0x02 | `Challenge` | gw → agent | `version:u16 server_nonce:[32]` |
//! | 0x03 | `Auth` | agent → gw | `client_nonce:[32] mac:[32]` |
//! | 0x04 | `Welcome` | gw → agent | `server_proof:[32] durable_seq:u64 resume_offset:u64 checkpoint_seq:u64 max_payload:u32 window:u64 label_len:u8 label snap_len:u8 snapshot_id` |
//! | 0x10 | `Data` | agent → gw | `seq:u64 offset:u64 length:u32 flags:u8 sha256:[32] payload` |
//! | 0x11 | `Checkpoint` | agent → gw | `seq:u64 flags:u8 label_len:u8 label` |
//! | 0x12 | `HashQuery` | agent → gw | `offset:u64 block_size:u32 count:u32 sha256:[32]×count` |
//! | 0x22 | `HashReply` | gw → agent | `offset:u64 block_size:u32 count:u32 bitmap:[(count+7)/8]` (MSB first, 1 = differs) |
//! | 0x20 | `Ack` | gw → agent | `durable_seq:u64` |
//! | 0x21 | `CheckpointAck` | gw → agent | `seq:u64 created_unix_ms:u64 has_digest:u8 digest:[32] snap_len:u8 snapshot_id` |
//! | 0x7f | `Error` | either | `code:u16 msg_len:u16 message` (UTF-8) |
//!
//! `Data` flags: `0x01` LZ4 block-compressed payload, `0x02` all-zero block (empty payload, the
//! digest field is all zero and the gateway writes zeros). Other bits are rejected.
//! The digest is always SHA-256 of the *uncompressed* block; the gateway recomputes it.
//! `Checkpoint` flags: `0x01` verify (the gateway answers with the SHA-256 of the snapshot content).
//!
//! # Session state machine
//!
//! ```text
//!  agent                         gateway
//!  ─────                         ───────
//!  preamble, Hello ───────────▶  [AwaitHello] unknown disk / version / size → Error, close
//!               ◀──────────────  Challenge(version, server_nonce)
//!  Auth(client_nonce, mac) ───▶  [AwaitAuth]  bad mac → Error(AuthFailed), close; nothing written
//!               ◀──────────────  Welcome(proof, durable_seq, resume_offset, last checkpoint)
//!                                [Streaming]
//!  Data(seq, …) ──────────────▶  verify digest, write, fdatasync in batches
//!               ◀──────────────  Ack(durable_seq)          every write ≤ durable_seq is durable
//!  HashQuery(offset, hashes) ─▶  apply earlier writes, hash the same blocks
//!               ◀──────────────  HashReply(bitmap of differing blocks)
//!  Checkpoint(seq, label) ────▶  sync, snapshot (later writes wait until it is initiated)
//!               ◀──────────────  CheckpointAck(seq, snapshot_id, digest?)
//!  close                         drain: make received writes durable, persist, close
//! ```
//!
//! Delta resync: an agent that lost its change tracking (but whose disk the gateway already
//! holds) sends `HashQuery` frames with the SHA-256 of consecutive blocks of its source; the
//! gateway applies every earlier write, hashes the same range of its volume and answers with a
//! `HashReply` bitmap, in order. The agent then sends only the differing blocks as `Data`.
//! Block size is a multiple of 4 KiB; one query covers at most 4096 blocks and 256 MiB.
//!
//! Sequence numbers are per disk, strictly increasing across connections, shared by `Data` and
//! `Checkpoint`. `durable_seq` in `Welcome` is the resume point: the agent resends only what it
//! holds above it. `resume_offset` is the end offset (`offset + length`) of the highest durable
//! `Data` frame since the last checkpoint (0 right after one); an agent that restarted mid-pass
//! and scans in ascending offsets resumes its scan there. `checkpoint_seq`, label and snapshot id
//! name the last completed checkpoint, so an agent whose checkpoint ack was lost learns it landed.
//!
//! # Authentication
//!
//! HMAC-SHA256 with the 32-byte per-disk key over a transcript that binds the chosen version,
//! both nonces, the disk id and its size (see [`auth`]). The gateway proves the key back in
//! `Welcome`, so an agent never streams to an impostor. The key itself never crosses the wire.
//!
//! # Version rule
//!
//! The agent offers `[min_version, max_version]`; the gateway picks the highest version it also
//! speaks, or answers `Error(UnsupportedVersion)` naming its own range. Within a version, frame
//! layouts are frozen; a new field or frame kind means a new version. The preamble, the frame
//! header and the `Error` frame are frozen across all versions so that any peer can always tell
//! the other why it is refused.

pub mod auth;
pub mod frame;

pub use frame::{
    Checkpoint, CheckpointAck, Data, ErrorCode, Frame, FrameCodec, FrameError, HashQuery,
    HashReply, Hello, Welcome,
};

/// Connection preamble sent by the agent before the first frame. Frozen.
pub const PREAMBLE: [u8; 4] = *b"SGWP";

/// Lowest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// Highest protocol version this build speaks.
pub const MAX_VERSION: u16 = 1;

/// Hard cap on the uncompressed length of one `Data` block, whatever a config says (8 MiB).
pub const MAX_BLOCK_LEN: u32 = 8 << 20;

/// Granularity that both sides use for change detection and O_DIRECT alignment.
pub const BLOCK_SIZE: u64 = 4096;

/// Length cap for the longest label or id string in a frame.
pub const MAX_NAME_LEN: usize = 255;

/// Picks the version for a session, or `None` when the ranges do not overlap.
pub fn negotiate(agent_min: u16, agent_max: u16) -> Option<u16> {
    let high = agent_max.min(MAX_VERSION);
    (agent_min <= agent_max && high >= agent_min.max(MIN_VERSION)).then_some(high)
}

/// Checks that a disk id is safe as a file name and as a cloud tag value.
pub fn valid_disk_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_highest_common() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(1));
        assert_eq!(negotiate(2, 9), None);
        assert_eq!(negotiate(0, 0), None);
        assert_eq!(negotiate(3, 1), None);
    }

    #[test]
    fn disk_ids() {
        assert!(valid_disk_id("disk-1"));
        assert!(valid_disk_id("vol_0a.b"));
        assert!(!valid_disk_id(""));
        assert!(!valid_disk_id(".."));
        assert!(!valid_disk_id("a/b"));
        assert!(!valid_disk_id(&"x".repeat(65)));
    }
}
