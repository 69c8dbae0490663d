//! What a run did: the `--json` object and the human summary.

use serde::Serialize;

/// Outcome of one `replicate` run. Field names are the `--json` contract.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub disk_id: String,
    /// `"full"`, `"incremental"` (the baseline block map was used) or `"delta"` (blocks were
    /// compared with the gateway's copy by hash; no baseline needed).
    pub mode: String,
    /// Size of the source.
    pub bytes_total: u64,
    /// Bytes read from the source by this run.
    pub bytes_scanned: u64,
    /// Uncompressed bytes of data blocks plus zero-run bytes sent by this run (first sends).
    pub bytes_changed: u64,
    /// Every byte written to the socket, preambles, handshakes and resends included.
    pub bytes_sent_wire: u64,
    /// 4 KiB blocks sent as data (the last block of an unaligned source counts as one).
    pub blocks_sent: u64,
    /// 4 KiB blocks sent as zero runs.
    pub blocks_zero: u64,
    /// 4 KiB blocks not sent because the gateway already held them (delta pass; 0 otherwise).
    pub blocks_matched: u64,
    /// `Data` and `Checkpoint` frames of this run (first sends).
    pub frames_sent: u64,
    /// Durable seq of the first `Welcome`, when this run resumed an interrupted pass.
    pub resumed_from_seq: Option<u64>,
    pub reconnects: u64,
    pub checkpoint_seq: u64,
    pub checkpoint_label: String,
    pub snapshot_id: String,
    /// Hex SHA-256 of the whole source, with `--verify`.
    pub digest: Option<String>,
    /// Whether the gateway's snapshot digest matched, with `--verify`.
    pub verified: Option<bool>,
    pub duration_secs: f64,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// A few lines for a person at a terminal.
    pub fn human(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let rate = if self.duration_secs > 0.0 {
            mib(self.bytes_scanned) / self.duration_secs
        } else {
            0.0
        };
        let mut s = format!(
            "{} pass of {}: {:.1} MiB scanned, {:.1} MiB changed ({} data blocks, {} zero blocks), \
             {:.1} MiB on the wire, {:.2} s ({:.0} MiB/s)\n",
            self.mode,
            self.disk_id,
            mib(self.bytes_scanned),
            mib(self.bytes_changed),
            self.blocks_sent,
            self.blocks_zero,
            mib(self.bytes_sent_wire),
            self.duration_secs,
            rate,
        );
        s.push_str(&format!(
            "checkpoint {} (seq {}) -> snapshot {}\n",
            self.checkpoint_label, self.checkpoint_seq, self.snapshot_id
        ));
        if self.mode == "delta" {
            s.push_str(&format!(
                "{} blocks already on the gateway (compared by SHA-256, not sent)\n",
                self.blocks_matched
            ));
        }
        if let Some(seq) = self.resumed_from_seq {
            s.push_str(&format!("resumed an interrupted pass after seq {seq}\n"));
        }
        if self.reconnects > 0 {
            s.push_str(&format!("reconnected {} time(s)\n", self.reconnects));
        }
        match (self.verified, &self.digest) {
            (Some(true), Some(d)) => s.push_str(&format!("verified: sha256 {d}\n")),
            (Some(false), Some(d)) => {
                s.push_str(&format!("VERIFY FAILED: source sha256 {d}\n"));
            }
            (None, Some(d)) => s.push_str(&format!("not verified; source sha256 {d}\n")),
            _ => {}
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_field() {
        let r = Report {
            disk_id: "d".into(),
            mode: "full".into(),
            ..Report::default()
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        for k in [
            "disk_id",
            "mode",
            "bytes_total",
            "bytes_scanned",
            "bytes_changed",
            "bytes_sent_wire",
            "blocks_sent",
            "blocks_zero",
            "blocks_matched",
            "frames_sent",
            "resumed_from_seq",
            "reconnects",
            "checkpoint_seq",
            "checkpoint_label",
            "snapshot_id",
            "digest",
            "verified",
            "duration_secs",
        ] {
            assert!(keys.contains(&k), "missing {k}");
        }
        assert!(v["verified"].is_null() && v["resumed_from_seq"].is_null());
        assert!(r.human().contains("full pass of d"));
    }
}
