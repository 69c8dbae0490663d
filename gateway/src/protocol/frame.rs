//! Frame types and the length-capped codec. Layout: see the table in [`super`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{MAX_BLOCK_LEN, MAX_NAME_LEN};

/// `Data` flag: payload is an LZ4 block.
pub const FLAG_LZ4: u8 = 0x01;
/// `Data` flag: the block is all zeros and carries no payload.
pub const FLAG_ZERO: u8 = 0x02;
/// `Checkpoint` flag: answer with the snapshot's SHA-256.
pub const CHECKPOINT_VERIFY: u8 = 0x01;

/// Fixed part of a `Data` body: seq, offset, length, flags, digest.
pub const DATA_HEADER_LEN: usize = 8 + 8 + 4 + 1 + 32;

const KIND_HELLO: u8 = 0x01;
const KIND_CHALLENGE: u8 = 0x02;
const KIND_AUTH: u8 = 0x03;
const KIND_WELCOME: u8 = 0x04;
const KIND_DATA: u8 = 0x10;
const KIND_CHECKPOINT: u8 = 0x11;
const KIND_HASH_QUERY: u8 = 0x12;
const KIND_ACK: u8 = 0x20;
const KIND_CHECKPOINT_ACK: u8 = 0x21;
const KIND_HASH_REPLY: u8 = 0x22;

/// Most block hashes in one `HashQuery`.
pub const MAX_HASHES: usize = 4096;
/// Most bytes one `HashQuery` may cover (the gateway reads and hashes them).
pub const MAX_HASH_SPAN: u64 = 256 << 20;
const KIND_ERROR: u8 = 0x7f;

/// Stable error codes carried by `Error` frames. Numbers are frozen once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The connection did not start with the preamble.
    BadPreamble,
    /// No common protocol version.
    UnsupportedVersion,
    /// The gateway serves no disk with this id.
    UnknownDisk,
    /// The agent's disk size differs from the gateway's volume.
    DiskSizeMismatch,
    /// HMAC challenge-response failed.
    AuthFailed,
    /// A frame's length exceeds the cap.
    FrameTooLarge,
    /// The stream ended inside a frame.
    TruncatedFrame,
    /// A frame's body does not parse, or a frame arrived out of turn.
    Malformed,
    /// Recomputed SHA-256 differs from the frame's digest.
    ChecksumMismatch,
    /// A write reaches past the end of the disk.
    OutOfRange,
    /// A sequence number did not increase.
    SequenceRegression,
    /// The peer went silent for longer than the idle timeout.
    Timeout,
    /// Another session for the same disk took over.
    Superseded,
    /// The gateway is shutting down; reconnect later.
    ShuttingDown,
    /// The gateway has too many connections; reconnect later.
    Busy,
    /// The gateway could not write, sync or snapshot the disk.
    Storage,
    /// The agent's key was revoked.
    Revoked,
    /// A code this build does not know (from a newer peer).
    Other(u16),
}

impl ErrorCode {
    /// Wire number of the code.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::BadPreamble => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::UnknownDisk => 3,
            ErrorCode::DiskSizeMismatch => 4,
            ErrorCode::AuthFailed => 5,
            ErrorCode::FrameTooLarge => 6,
            ErrorCode::TruncatedFrame => 7,
            ErrorCode::Malformed => 8,
            ErrorCode::ChecksumMismatch => 9,
            ErrorCode::OutOfRange => 10,
            ErrorCode::SequenceRegression => 11,
            ErrorCode::Timeout => 12,
            ErrorCode::Superseded => 13,
            ErrorCode::ShuttingDown => 14,
            ErrorCode::Busy => 15,
            ErrorCode::Storage => 16,
            ErrorCode::Revoked => 17,
            ErrorCode::Other(n) => n,
        }
    }

    /// Code from its wire number.
    pub fn from_u16(n: u16) -> Self {
        const ALL: [ErrorCode; 17] = [
            ErrorCode::BadPreamble,
            ErrorCode::UnsupportedVersion,
            ErrorCode::UnknownDisk,
            ErrorCode::DiskSizeMismatch,
            ErrorCode::AuthFailed,
            ErrorCode::FrameTooLarge,
            ErrorCode::TruncatedFrame,
            ErrorCode::Malformed,
            ErrorCode::ChecksumMismatch,
            ErrorCode::OutOfRange,
            ErrorCode::SequenceRegression,
            ErrorCode::Timeout,
            ErrorCode::Superseded,
            ErrorCode::ShuttingDown,
            ErrorCode::Busy,
            ErrorCode::Storage,
            ErrorCode::Revoked,
        ];
        ALL.into_iter()
            .find(|c| c.as_u16() == n)
            .unwrap_or(ErrorCode::Other(n))
    }

    /// Stable snake-case name used in logs and agent output.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadPreamble => "bad_preamble",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownDisk => "unknown_disk",
            ErrorCode::DiskSizeMismatch => "disk_size_mismatch",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::TruncatedFrame => "truncated_frame",
            ErrorCode::Malformed => "malformed_frame",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::SequenceRegression => "sequence_regression",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Superseded => "superseded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Busy => "busy",
            ErrorCode::Storage => "storage_error",
            ErrorCode::Revoked => "revoked",
            ErrorCode::Other(_) => "unknown_error",
        }
    }

    /// Whether an agent should reconnect after this error (the fault is not in its input).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Timeout
                | ErrorCode::Superseded
                | ErrorCode::ShuttingDown
                | ErrorCode::Busy
                | ErrorCode::Storage
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

/// Why a byte stream could not be turned into frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the cap of {cap}")]
    TooLarge { len: usize, cap: usize },
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("connection closed inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The code to send to the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Malformed { .. } | FrameError::UnknownKind(_) => ErrorCode::Malformed,
            FrameError::Truncated { .. } => ErrorCode::TruncatedFrame,
            FrameError::Io(_) => ErrorCode::TruncatedFrame,
        }
    }
}

/// First frame of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub disk_size: u64,
    pub disk_id: String,
    pub agent: String,
}

/// The gateway's acceptance of an authenticated session, with the resume point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub server_proof: [u8; 32],
    pub durable_seq: u64,
    pub resume_offset: u64,
    pub checkpoint_seq: u64,
    pub max_payload: u32,
    pub window: u64,
    pub checkpoint_label: String,
    pub snapshot_id: String,
}

/// One block write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    pub seq: u64,
    pub offset: u64,
    /// Uncompressed length.
    pub length: u32,
    pub flags: u8,
    /// SHA-256 of the uncompressed block (all zero for zero blocks).
    pub digest: [u8; 32],
    pub payload: Bytes,
}

impl Data {
    pub fn is_zero(&self) -> bool {
        self.flags & FLAG_ZERO != 0
    }
    pub fn is_lz4(&self) -> bool {
        self.flags & FLAG_LZ4 != 0
    }
    /// End offset of the write.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.length))
    }
}

/// A consistent point in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub flags: u8,
    pub label: String,
}

/// The gateway's answer to a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointAck {
    pub seq: u64,
    pub created_unix_ms: u64,
    pub digest: Option<[u8; 32]>,
    pub snapshot_id: String,
}

/// Delta resync: the agent's SHA-256 of consecutive blocks starting at `offset`. The last
/// block may be short where it meets the end of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashQuery {
    pub offset: u64,
    pub block_size: u32,
    pub hashes: Vec<[u8; 32]>,
}

impl HashQuery {
    /// Bytes covered.
    pub fn span(&self) -> u64 {
        u64::from(self.block_size) * self.hashes.len() as u64
    }
}

/// Delta resync: which blocks of a `HashQuery` differ on the gateway (bit set = differs, so
/// the agent sends that block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashReply {
    pub offset: u64,
    pub block_size: u32,
    pub differs: Vec<bool>,
}

/// Every frame of protocol v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Challenge {
        version: u16,
        server_nonce: [u8; 32],
    },
    Auth {
        client_nonce: [u8; 32],
        mac: [u8; 32],
    },
    Welcome(Welcome),
    Data(Data),
    Checkpoint(Checkpoint),
    HashQuery(HashQuery),
    HashReply(HashReply),
    Ack {
        durable_seq: u64,
    },
    CheckpointAck(CheckpointAck),
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Frame {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Challenge { .. } => "challenge",
            Frame::Auth { .. } => "auth",
            Frame::Welcome(_) => "welcome",
            Frame::Data(_) => "data",
            Frame::Checkpoint(_) => "checkpoint",
            Frame::HashQuery(_) => "hash_query",
            Frame::HashReply(_) => "hash_reply",
            Frame::Ack { .. } => "ack",
            Frame::CheckpointAck(_) => "checkpoint_ack",
            Frame::Error { .. } => "error",
        }
    }

    /// An error frame.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        let mut message = message.into();
        truncate_utf8(&mut message, 1024);
        Frame::Error { code, message }
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Appends the wire form of `frame` to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_u32(0); // patched below
    match frame {
        Frame::Hello(h) => {
            dst.put_u8(KIND_HELLO);
            dst.put_u16(h.min_version);
            dst.put_u16(h.max_version);
            dst.put_u64(h.disk_size);
            put_name(dst, &h.disk_id);
            put_name(dst, &h.agent);
        }
        Frame::Challenge {
            version,
            server_nonce,
        } => {
            dst.put_u8(KIND_CHALLENGE);
            dst.put_u16(*version);
            dst.put_slice(server_nonce);
        }
        Frame::Auth { client_nonce, mac } => {
            dst.put_u8(KIND_AUTH);
            dst.put_slice(client_nonce);
            dst.put_slice(mac);
        }
        Frame::Welcome(w) => {
            dst.put_u8(KIND_WELCOME);
            dst.put_slice(&w.server_proof);
            dst.put_u64(w.durable_seq);
            dst.put_u64(w.resume_offset);
            dst.put_u64(w.checkpoint_seq);
            dst.put_u32(w.max_payload);
            dst.put_u64(w.window);
            put_name(dst, &w.checkpoint_label);
            put_name(dst, &w.snapshot_id);
        }
        Frame::Data(d) => {
            dst.reserve(DATA_HEADER_LEN + d.payload.len() + 1);
            dst.put_u8(KIND_DATA);
            dst.put_u64(d.seq);
            dst.put_u64(d.offset);
            dst.put_u32(d.length);
            dst.put_u8(d.flags);
            dst.put_slice(&d.digest);
            dst.put_slice(&d.payload);
        }
        Frame::Checkpoint(c) => {
            dst.put_u8(KIND_CHECKPOINT);
            dst.put_u64(c.seq);
            dst.put_u8(c.flags);
            put_name(dst, &c.label);
        }
        Frame::HashQuery(q) => {
            dst.put_u8(KIND_HASH_QUERY);
            dst.put_u64(q.offset);
            dst.put_u32(q.block_size);
            dst.put_u32(q.hashes.len() as u32);
            for h in &q.hashes {
                dst.put_slice(h);
            }
        }
        Frame::HashReply(r) => {
            dst.put_u8(KIND_HASH_REPLY);
            dst.put_u64(r.offset);
            dst.put_u32(r.block_size);
            dst.put_u32(r.differs.len() as u32);
            let mut bits = vec![0u8; r.differs.len().div_ceil(8)];
            for (i, d) in r.differs.iter().enumerate() {
                if *d {
                    bits[i / 8] |= 0x80 >> (i % 8);
                }
            }
            dst.put_slice(&bits);
        }
        Frame::Ack { durable_seq } => {
            dst.put_u8(KIND_ACK);
            dst.put_u64(*durable_seq);
        }
        Frame::CheckpointAck(a) => {
            dst.put_u8(KIND_CHECKPOINT_ACK);
            dst.put_u64(a.seq);
            dst.put_u64(a.created_unix_ms);
            dst.put_u8(u8::from(a.digest.is_some()));
            dst.put_slice(&a.digest.unwrap_or([0; 32]));
            put_name(dst, &a.snapshot_id);
        }
        Frame::Error { code, message } => {
            dst.put_u8(KIND_ERROR);
            dst.put_u16(code.as_u16());
            let msg = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
            dst.put_u16(msg.len() as u16);
            dst.put_slice(msg);
        }
    }
    let len = (dst.len() - start - 4) as u32;
    dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_name(dst: &mut BytesMut, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_NAME_LEN)];
    dst.put_u8(b.len() as u8);
    dst.put_slice(b);
}

/// Cursor over one frame body that turns short reads into `Malformed`.
struct Body {
    kind: &'static str,
    buf: Bytes,
}

impl Body {
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            return Err(self.bad(format!(
                "needs {n} more bytes, has {}",
                self.buf.remaining()
            )));
        }
        Ok(())
    }
    fn bad(&self, reason: impl Into<String>) -> FrameError {
        FrameError::Malformed {
            kind: self.kind,
            reason: reason.into(),
        }
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn arr32(&mut self) -> Result<[u8; 32], FrameError> {
        self.need(32)?;
        let mut out = [0u8; 32];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, FrameError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn name(&mut self) -> Result<String, FrameError> {
        let n = usize::from(self.u8()?);
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }
    fn rest(&mut self) -> Bytes {
        let n = self.buf.remaining();
        self.buf.split_to(n)
    }
    fn finish<T>(self, v: T) -> Result<T, FrameError> {
        if self.buf.has_remaining() {
            return Err(self.bad(format!("{} trailing bytes", self.buf.remaining())));
        }
        Ok(v)
    }
}

/// Parses one frame body (kind byte first).
pub fn decode_body(mut frame: Bytes) -> Result<Frame, FrameError> {
    if frame.is_empty() {
        return Err(FrameError::Malformed {
            kind: "empty",
            reason: "zero-length frame".into(),
        });
    }
    let kind = frame.get_u8();
    let name = match kind {
        KIND_HELLO => "hello",
        KIND_CHALLENGE => "challenge",
        KIND_AUTH => "auth",
        KIND_WELCOME => "welcome",
        KIND_DATA => "data",
        KIND_CHECKPOINT => "checkpoint",
        KIND_HASH_QUERY => "hash_query",
        KIND_HASH_REPLY => "hash_reply",
        KIND_ACK => "ack",
        KIND_CHECKPOINT_ACK => "checkpoint_ack",
        KIND_ERROR => "error",
        other => return Err(FrameError::UnknownKind(other)),
    };
    let mut b = Body {
        kind: name,
        buf: frame,
    };
    let f = match kind {
        KIND_HELLO => Frame::Hello(Hello {
            min_version: b.u16()?,
            max_version: b.u16()?,
            disk_size: b.u64()?,
            disk_id: b.name()?,
            agent: b.name()?,
        }),
        KIND_CHALLENGE => Frame::Challenge {
            version: b.u16()?,
            server_nonce: b.arr32()?,
        },
        KIND_AUTH => Frame::Auth {
            client_nonce: b.arr32()?,
            mac: b.arr32()?,
        },
        KIND_WELCOME => Frame::Welcome(Welcome {
            server_proof: b.arr32()?,
            durable_seq: b.u64()?,
            resume_offset: b.u64()?,
            checkpoint_seq: b.u64()?,
            max_payload: b.u32()?,
            window: b.u64()?,
            checkpoint_label: b.name()?,
            snapshot_id: b.name()?,
        }),
        KIND_DATA => {
            let seq = b.u64()?;
            let offset = b.u64()?;
            let length = b.u32()?;
            let flags = b.u8()?;
            let digest = b.arr32()?;
            let payload = b.rest();
            let d = Data {
                seq,
                offset,
                length,
                flags,
                digest,
                payload,
            };
            check_data(&d).map_err(|r| b.bad(r))?;
            Frame::Data(d)
        }
        KIND_CHECKPOINT => Frame::Checkpoint(Checkpoint {
            seq: b.u64()?,
            flags: b.u8()?,
            label: b.name()?,
        }),
        KIND_HASH_QUERY => {
            let offset = b.u64()?;
            let block_size = b.u32()?;
            let count = b.u32()? as usize;
            if count == 0 || count > MAX_HASHES {
                return Err(b.bad(format!("{count} hashes (1..={MAX_HASHES} allowed)")));
            }
            if block_size == 0 || block_size % 4096 != 0 || block_size > MAX_BLOCK_LEN {
                return Err(b.bad(format!(
                    "block size {block_size} is not a multiple of 4096 up to {MAX_BLOCK_LEN}"
                )));
            }
            let q = HashQuery {
                offset,
                block_size,
                hashes: (0..count).map(|_| b.arr32()).collect::<Result<_, _>>()?,
            };
            if q.span() > MAX_HASH_SPAN || offset.checked_add(q.span()).is_none() {
                return Err(b.bad(format!("query spans {} bytes", q.span())));
            }
            Frame::HashQuery(q)
        }
        KIND_HASH_REPLY => {
            let offset = b.u64()?;
            let block_size = b.u32()?;
            let count = b.u32()? as usize;
            if count > MAX_HASHES {
                return Err(b.bad(format!("{count} entries")));
            }
            let bits = b.bytes(count.div_ceil(8))?;
            Frame::HashReply(HashReply {
                offset,
                block_size,
                differs: (0..count)
                    .map(|i| bits[i / 8] & (0x80 >> (i % 8)) != 0)
                    .collect(),
            })
        }
        KIND_ACK => Frame::Ack {
            durable_seq: b.u64()?,
        },
        KIND_CHECKPOINT_ACK => {
            let seq = b.u64()?;
            let created_unix_ms = b.u64()?;
            let has = b.u8()?;
            let digest = b.arr32()?;
            let snapshot_id = b.name()?;
            Frame::CheckpointAck(CheckpointAck {
                seq,
                created_unix_ms,
                digest: (has != 0).then_some(digest),
                snapshot_id,
            })
        }
        KIND_ERROR => {
            let code = ErrorCode::from_u16(b.u16()?);
            let n = usize::from(b.u16()?);
            let msg = b.bytes(n)?;
            Frame::Error {
                code,
                message: String::from_utf8_lossy(&msg).into_owned(),
            }
        }
        _ => unreachable!("kind checked above"),
    };
    b.finish(f)
}

/// Structural checks on a data frame that need no disk knowledge.
fn check_data(d: &Data) -> Result<(), String> {
    if d.flags & !(FLAG_LZ4 | FLAG_ZERO) != 0 {
        return Err(format!("unknown flags 0x{:02x}", d.flags));
    }
    if d.length == 0 {
        return Err("zero-length block".into());
    }
    if d.length > MAX_BLOCK_LEN {
        return Err(format!(
            "block of {} bytes exceeds {MAX_BLOCK_LEN}",
            d.length
        ));
    }
    if d.offset.checked_add(u64::from(d.length)).is_none() {
        return Err("offset + length overflows".into());
    }
    if d.is_zero() {
        if d.is_lz4() || !d.payload.is_empty() || d.digest != [0; 32] {
            return Err("zero block must have no payload, no LZ4 flag and a zero digest".into());
        }
    } else if d.is_lz4() {
        if d.payload.len() > lz4_bound(d.length as usize) {
            return Err("compressed payload larger than its bound".into());
        }
    } else if d.payload.len() != d.length as usize {
        return Err(format!(
            "payload of {} bytes for a block of {}",
            d.payload.len(),
            d.length
        ));
    }
    Ok(())
}

/// Worst-case LZ4 block size for `n` input bytes.
pub fn lz4_bound(n: usize) -> usize {
    n + n / 255 + 16
}

/// Length-capped codec for [`Frame`]s. `max_frame` bounds what is buffered before parsing.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec that accepts frames carrying blocks of up to `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        let payload = lz4_bound(max_payload.min(MAX_BLOCK_LEN) as usize);
        let hash_query = 1 + 16 + 32 * MAX_HASHES;
        FrameCodec {
            max_frame: (1 + DATA_HEADER_LEN + payload).max(hash_query),
        }
    }

    /// A codec for the handshake: no frame before authentication needs more than a few
    /// hundred bytes, so an unauthenticated peer cannot make the gateway buffer megabytes.
    pub fn handshake() -> Self {
        FrameCodec { max_frame: 1024 }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(MAX_BLOCK_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                cap: self.max_frame,
            });
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let body = src.split_to(len).freeze();
        decode_body(body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(f) => Ok(Some(f)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode(&item, dst);
        Ok(())
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode(item, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let mut buf = BytesMut::new();
        encode(&f, &mut buf);
        let mut codec = FrameCodec::default();
        let got = codec.decode(&mut buf).expect("decodes").expect("complete");
        assert_eq!(got, f);
        assert!(buf.is_empty());
    }

    fn data(flags: u8, payload: &[u8], length: u32) -> Data {
        Data {
            seq: 7,
            offset: 4096,
            length,
            flags,
            digest: if flags & FLAG_ZERO != 0 {
                [0; 32]
            } else {
                [9; 32]
            },
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn every_frame_roundtrips() {
        roundtrip(Frame::Hello(Hello {
            min_version: 1,
            max_version: 3,
            disk_size: 1 << 40,
            disk_id: "disk-1".into(),
            agent: "sync-agent/0.1".into(),
        }));
        roundtrip(Frame::Challenge {
            version: 1,
            server_nonce: [3; 32],
        });
        roundtrip(Frame::Auth {
            client_nonce: [1; 32],
            mac: [2; 32],
        });
        roundtrip(Frame::Welcome(Welcome {
            server_proof: [5; 32],
            durable_seq: 99,
            resume_offset: 8192,
            checkpoint_seq: 50,
            max_payload: 1 << 20,
            window: 64 << 20,
            checkpoint_label: "full".into(),
            snapshot_id: "snap-1".into(),
        }));
        roundtrip(Frame::Data(data(0, &[1, 2, 3, 4], 4)));
        roundtrip(Frame::Data(data(FLAG_ZERO, &[], 1 << 20)));
        roundtrip(Frame::Data(data(FLAG_LZ4, &[1, 2], 4096)));
        roundtrip(Frame::Checkpoint(Checkpoint {
            seq: 100,
            flags: CHECKPOINT_VERIFY,
            label: "incr-2".into(),
        }));
        roundtrip(Frame::Ack { durable_seq: 42 });
        roundtrip(Frame::HashQuery(HashQuery {
            offset: 1 << 20,
            block_size: 65536,
            hashes: vec![[1; 32], [2; 32], [3; 32]],
        }));
        roundtrip(Frame::HashReply(HashReply {
            offset: 1 << 20,
            block_size: 65536,
            differs: vec![true, false, false, true, false, false, false, false, true],
        }));
        roundtrip(Frame::CheckpointAck(CheckpointAck {
            seq: 100,
            created_unix_ms: 1_700_000_000_000,
            digest: Some([8; 32]),
            snapshot_id: "snap-2".into(),
        }));
        roundtrip(Frame::error(ErrorCode::AuthFailed, "nope"));
    }

    #[test]
    fn frozen_header_layout() {
        let mut buf = BytesMut::new();
        encode(
            &Frame::Ack {
                durable_seq: 0x0102,
            },
            &mut buf,
        );
        assert_eq!(&buf[..], &[0, 0, 0, 9, 0x20, 0, 0, 0, 0, 0, 0, 1, 2]);
        let mut buf = BytesMut::new();
        encode(&Frame::error(ErrorCode::AuthFailed, "x"), &mut buf);
        assert_eq!(&buf[..], &[0, 0, 0, 6, 0x7f, 0, 5, 0, 1, b'x']);
    }

    #[test]
    fn oversize_length_is_rejected_before_buffering() {
        let mut codec = FrameCodec::new(4096);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x10][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn partial_frames_wait_and_truncation_is_reported() {
        let mut full = BytesMut::new();
        encode(&Frame::Ack { durable_seq: 1 }, &mut full);
        let mut codec = FrameCodec::default();
        let mut part = BytesMut::from(&full[..7]);
        assert!(codec.decode(&mut part).expect("ok").is_none());
        assert!(matches!(
            codec.decode_eof(&mut part),
            Err(FrameError::Truncated { buffered: 7 })
        ));
    }

    #[test]
    fn bad_bodies_are_malformed() {
        let cases: Vec<Data> = vec![
            data(0x80, &[0; 4], 4),      // unknown flag
            data(0, &[0; 3], 4),         // short payload
            data(0, &[], 0),             // zero length
            data(FLAG_ZERO, &[1], 4096), // zero with payload
            data(FLAG_LZ4 | FLAG_ZERO, &[], 4096),
            data(0, &[0; 4], MAX_BLOCK_LEN + 1),
        ];
        for d in cases {
            let mut buf = BytesMut::new();
            encode(&Frame::Data(d.clone()), &mut buf);
            let mut codec = FrameCodec::default();
            let r = codec.decode(&mut buf);
            assert!(
                matches!(r, Err(FrameError::Malformed { .. })),
                "{d:?} gave {r:?}"
            );
        }
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0x55][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::UnknownKind(0x55))
        ));
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0x20, 1, 2][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn error_codes_are_stable() {
        for n in 1..=17u16 {
            assert_eq!(ErrorCode::from_u16(n).as_u16(), n);
            assert_ne!(ErrorCode::from_u16(n).name(), "unknown_error");
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other(999));
        assert_eq!(ErrorCode::ChecksumMismatch.as_u16(), 9);
    }
}
