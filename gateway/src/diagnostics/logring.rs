//! The gateway's recent log lines, kept in memory for diagnostics bundles.
//!
//! A second `fmt` layer formats every event that passes the log filter (same format as stderr,
//! never coloured) into a [`LogRing`]: the newest events up to [`MAX_LOG_BYTES`] and
//! [`MAX_LOG_LINES`], older ones dropped and counted. The gateway's log usually goes to the
//! journal, which a bundle cannot assume it may read; this copy is what the process itself
//! said since it started, bounded whatever it logs.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes of formatted log kept (4 MiB: hours of a busy gateway at `info`).
pub const MAX_LOG_BYTES: usize = 4 << 20;
/// Events kept, whatever their size.
pub const MAX_LOG_LINES: usize = 20_000;

/// A bounded buffer of the most recent formatted log events.
#[derive(Debug)]
pub struct LogRing {
    max_bytes: usize,
    max_lines: usize,
    inner: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Box<[u8]>>,
    bytes: usize,
    dropped: u64,
}

/// What [`LogRing::snapshot`] gives: the kept text, oldest first, and how many older events
/// were dropped to stay within the bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSnapshot {
    pub text: String,
    pub lines: usize,
    pub dropped: u64,
}

impl LogRing {
    pub fn new(max_bytes: usize, max_lines: usize) -> Self {
        LogRing {
            max_bytes: max_bytes.max(1),
            max_lines: max_lines.max(1),
            inner: Mutex::new(Ring::default()),
        }
    }

    /// Adds one formatted event; an event larger than the whole buffer keeps its start.
    pub fn push(&self, event: &[u8]) {
        if event.is_empty() {
            return;
        }
        let mut kept = &event[..event.len().min(self.max_bytes)];
        if kept.len() < event.len() {
            // Cut at a line's end when there is one, so the kept part reads whole.
            if let Some(nl) = kept.iter().rposition(|&b| b == b'\n') {
                kept = &kept[..=nl];
            }
        }
        let mut ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while !ring.events.is_empty()
            && (ring.bytes + kept.len() > self.max_bytes || ring.events.len() >= self.max_lines)
        {
            if let Some(old) = ring.events.pop_front() {
                ring.bytes -= old.len();
                ring.dropped += 1;
            }
        }
        ring.bytes += kept.len();
        ring.events.push_back(kept.into());
    }

    /// The kept events, oldest first (invalid UTF-8, e.g. from a cut event, is replaced).
    pub fn snapshot(&self) -> LogSnapshot {
        let ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = Vec::with_capacity(ring.bytes);
        for e in &ring.events {
            bytes.extend_from_slice(e);
        }
        LogSnapshot {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            lines: ring.events.len(),
            dropped: ring.dropped,
        }
    }
}

/// The ring the process logs into, once [`install`] ran (the `sync-gateway run` log setup).
static INSTALLED: OnceLock<Arc<LogRing>> = OnceLock::new();

/// Makes `ring` the process's log capture; the first call wins.
pub fn install(ring: Arc<LogRing>) -> Arc<LogRing> {
    INSTALLED.get_or_init(|| ring).clone()
}

/// The process's log capture, if logging was set up with one.
pub fn installed() -> Option<Arc<LogRing>> {
    INSTALLED.get().cloned()
}

/// The `fmt` layer's writer: one per event, handed to the ring when the event is written.
#[derive(Debug)]
pub struct EventWriter {
    ring: Arc<LogRing>,
    buf: Vec<u8>,
}

impl io::Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        self.ring.push(&self.buf);
    }
}

/// [`MakeWriter`] over a shared ring, for `tracing_subscriber::fmt::layer().with_writer`.
#[derive(Debug, Clone)]
pub struct RingWriter(pub Arc<LogRing>);

impl<'a> MakeWriter<'a> for RingWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter {
            ring: self.0.clone(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_events_are_kept_within_both_bounds() {
        let ring = LogRing::new(100, 3);
        for i in 0..5 {
            ring.push(format!("line {i}\n").as_bytes());
        }
        let s = ring.snapshot();
        assert_eq!(s.text, "line 2\nline 3\nline 4\n");
        assert_eq!((s.lines, s.dropped), (3, 2));

        let ring = LogRing::new(20, 100);
        for i in 0..5 {
            ring.push(format!("event {i}\n").as_bytes()); // 8 bytes each
        }
        let s = ring.snapshot();
        assert_eq!(s.text, "event 3\nevent 4\n");
        assert_eq!(s.dropped, 3);
        // One event bigger than everything: its first whole lines are kept, alone.
        ring.push(b"aaaaaaaaa\nbbbbbbbbb\ncccccccccc\n");
        let s = ring.snapshot();
        assert_eq!(s.text, "aaaaaaaaa\nbbbbbbbbb\n");
        assert_eq!(s.dropped, 5);
    }

    #[test]
    fn a_fmt_layer_writes_whole_events_into_the_ring() {
        use tracing_subscriber::prelude::*;
        let ring = Arc::new(LogRing::new(1 << 20, 1000));
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(RingWriter(ring.clone())),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(disk = "disk-1", "first event");
            tracing::warn!("second event");
        });
        let s = ring.snapshot();
        assert_eq!(s.lines, 2, "{}", s.text);
        let lines: Vec<&str> = s.text.lines().collect();
        assert!(
            lines[0].contains("INFO") && lines[0].contains("first event"),
            "{}",
            s.text
        );
        assert!(lines[0].contains("disk=\"disk-1\""), "{}", s.text);
        assert!(lines[1].contains("WARN") && lines[1].contains("second event"));
        assert!(!s.text.contains('\u{1b}'), "no colour codes: {:?}", s.text);
    }
}
