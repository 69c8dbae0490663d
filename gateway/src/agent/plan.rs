//! What this run does, decided from the saved state and the gateway's first `Welcome`.
//!
//! ```text
//! pass in progress?
//!   ├─ yes, Welcome names its label as the last checkpoint ─▶ Landed  (rebuild map, send nothing)
//!   ├─ yes, Welcome: same last checkpoint, writes of this pass durable, resume_offset sane
//!   │        (and for an incremental pass the baseline still usable) ─▶ Resume from resume_offset
//!   └─ otherwise ─▶ Fresh
//! Fresh: incremental iff not --full and the baseline is usable, else full.
//! ```

use super::state::{AgentState, BlockMap, PassKind, PassRecord};
use crate::protocol::{Welcome, BLOCK_SIZE};

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The interrupted pass reached its checkpoint before the restart.
    Landed(PassRecord),
    /// Continue the interrupted pass: its writes below `from` are durable.
    Resume { pass: PassRecord, from: u64 },
    /// A new pass from offset 0; `warning` says why it is full when incremental was possible.
    Fresh {
        kind: PassKind,
        warning: Option<String>,
    },
}

/// Why the saved block map cannot serve as the baseline; `None` inside means "first run", which
/// needs no warning.
fn baseline_problem(
    state: &AgentState,
    map: Option<&BlockMap>,
    size: u64,
    welcome: &Welcome,
    resuming: bool,
) -> Option<Option<String>> {
    let Some(cp) = &state.checkpoint else {
        return Some(None);
    };
    let why = if cp.source_size != size {
        format!(
            "source size changed from {} to {size} bytes since checkpoint {}",
            cp.source_size, cp.seq
        )
    } else if welcome.checkpoint_seq < cp.seq {
        format!("gateway has no record of checkpoint {}", cp.seq)
    } else if map.is_none_or(|m| m.checkpoint_seq != cp.seq || m.source_size != size) {
        format!("no usable block map for checkpoint {}", cp.seq)
    } else if !resuming && welcome.durable_seq > welcome.checkpoint_seq.max(cp.seq) {
        format!(
            "gateway holds writes up to seq {} after checkpoint {}",
            welcome.durable_seq, welcome.checkpoint_seq
        )
    } else {
        return None;
    };
    Some(Some(why))
}

/// Decides the run. `force_full` is `--full`.
pub fn decide(
    state: &AgentState,
    map: Option<&BlockMap>,
    size: u64,
    welcome: &Welcome,
    force_full: bool,
) -> Plan {
    if let Some(pass) = &state.pass {
        if !welcome.checkpoint_label.is_empty() && welcome.checkpoint_label == pass.label {
            return Plan::Landed(pass.clone());
        }
        let ck = state.checkpoint_seq();
        let from = welcome.resume_offset;
        let sane_offset = from > 0 && from <= size && (from % BLOCK_SIZE == 0 || from == size);
        let baseline_ok = pass.kind == PassKind::Full
            || baseline_problem(state, map, size, welcome, true).is_none();
        if welcome.checkpoint_seq == ck && welcome.durable_seq > ck && sane_offset && baseline_ok {
            return Plan::Resume {
                pass: pass.clone(),
                from,
            };
        }
    }
    if force_full {
        return Plan::Fresh {
            kind: PassKind::Full,
            warning: None,
        };
    }
    match baseline_problem(state, map, size, welcome, false) {
        None => Plan::Fresh {
            kind: PassKind::Incremental,
            warning: None,
        },
        Some(why) => Plan::Fresh {
            kind: PassKind::Full,
            warning: why.map(|w| format!("{w}; running a full pass")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::CheckpointRecord;
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn welcome(durable: u64, resume: u64, ck: u64, label: &str) -> Welcome {
        Welcome {
            server_proof: [0; 32],
            durable_seq: durable,
            resume_offset: resume,
            checkpoint_seq: ck,
            max_payload: 1 << 20,
            window: 64 << 20,
            checkpoint_label: label.into(),
            snapshot_id: "snap".into(),
        }
    }

    fn state(ck: Option<u64>, pass: Option<PassKind>) -> AgentState {
        AgentState {
            checkpoint: ck.map(|seq| CheckpointRecord {
                seq,
                label: format!("full-{seq}"),
                snapshot_id: "s".into(),
                time: String::new(),
                source_size: SIZE,
            }),
            pass: pass.map(|kind| PassRecord {
                label: "incr-77".into(),
                kind,
                started_at: String::new(),
            }),
        }
    }

    fn map(ck: u64) -> BlockMap {
        BlockMap {
            source_size: SIZE,
            checkpoint_seq: ck,
            hashes: vec![0; BlockMap::blocks_for(SIZE)],
        }
    }

    fn kind(p: &Plan) -> Option<PassKind> {
        match p {
            Plan::Fresh { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    #[test]
    fn first_run_is_full_without_warning() {
        let p = decide(&state(None, None), None, SIZE, &welcome(0, 0, 0, ""), false);
        assert_eq!(
            p,
            Plan::Fresh {
                kind: PassKind::Full,
                warning: None
            }
        );
    }

    #[test]
    fn baseline_rules() {
        let m = map(10);
        let st = state(Some(10), None);
        let w = welcome(10, 0, 10, "full-10");
        assert_eq!(
            kind(&decide(&st, Some(&m), SIZE, &w, false)),
            Some(PassKind::Incremental)
        );
        assert_eq!(
            kind(&decide(&st, Some(&m), SIZE, &w, true)),
            Some(PassKind::Full)
        );
        // the gateway lost the checkpoint
        let p = decide(&st, Some(&m), SIZE, &welcome(3, 0, 3, "x"), false);
        let Plan::Fresh { kind, warning } = p else {
            panic!("{p:?}")
        };
        assert_eq!(kind, PassKind::Full);
        assert!(warning
            .unwrap_or_default()
            .contains("gateway has no record of checkpoint 10"));
        // no map, other size, stale map, foreign writes after the checkpoint
        assert_eq!(kind_of(&st, None, SIZE, &w), PassKind::Full);
        assert_eq!(kind_of(&st, Some(&m), SIZE * 2, &w), PassKind::Full);
        assert_eq!(kind_of(&st, Some(&map(9)), SIZE, &w), PassKind::Full);
        assert_eq!(
            kind_of(&st, Some(&m), SIZE, &welcome(12, 8192, 10, "full-10")),
            PassKind::Full
        );
        // a newer checkpoint on the gateway is accepted
        assert_eq!(
            kind_of(&st, Some(&m), SIZE, &welcome(11, 0, 11, "other")),
            PassKind::Incremental
        );
    }

    fn kind_of(st: &AgentState, m: Option<&BlockMap>, size: u64, w: &Welcome) -> PassKind {
        kind(&decide(st, m, size, w, false)).unwrap_or(PassKind::Incremental)
    }

    #[test]
    fn interrupted_passes() {
        let m = map(10);
        let st = state(Some(10), Some(PassKind::Incremental));
        // checkpoint landed before the restart
        let p = decide(&st, Some(&m), SIZE, &welcome(20, 0, 20, "incr-77"), false);
        assert!(
            matches!(p, Plan::Landed(ref r) if r.label == "incr-77"),
            "{p:?}"
        );
        // some writes durable: resume, even with --full
        let p = decide(
            &st,
            Some(&m),
            SIZE,
            &welcome(15, 65536, 10, "full-10"),
            true,
        );
        assert!(matches!(p, Plan::Resume { from: 65536, .. }), "{p:?}");
        // nothing durable: start over
        let p = decide(&st, Some(&m), SIZE, &welcome(10, 0, 10, "full-10"), false);
        assert_eq!(kind(&p), Some(PassKind::Incremental));
        // incremental pass without its baseline cannot resume
        let p = decide(&st, None, SIZE, &welcome(15, 65536, 10, "full-10"), false);
        assert_eq!(kind(&p), Some(PassKind::Full));
        // a full pass resumes without a baseline; odd offsets are refused
        let st = state(None, Some(PassKind::Full));
        let p = decide(&st, None, SIZE, &welcome(5, 4096, 0, ""), false);
        assert!(matches!(p, Plan::Resume { from: 4096, .. }), "{p:?}");
        let p = decide(&st, None, SIZE, &welcome(5, 100, 0, ""), false);
        assert_eq!(kind(&p), Some(PassKind::Full));
        let p = decide(&st, None, SIZE, &welcome(5, SIZE + 4096, 0, ""), false);
        assert_eq!(kind(&p), Some(PassKind::Full));
    }
}
