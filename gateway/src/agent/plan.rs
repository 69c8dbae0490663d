//! What this run does, decided from the saved state and the gateway's first `Welcome`.
//!
//! ```text
//! --rescan ─▶ Fresh delta (verify and repair: compare every block with the gateway's)
//! pass in progress?
//!   ├─ yes, Welcome names its label as the last checkpoint ─▶ Landed  (rebuild map, send nothing)
//!   ├─ yes, a delta pass (not --full) ─▶ Fresh delta: start it over (only differing blocks travel)
//!   ├─ yes, Welcome: same last checkpoint, writes of this pass durable, resume_offset sane
//!   │        (and for an incremental pass the baseline still usable) ─▶ Resume from resume_offset
//!   └─ otherwise ─▶ Fresh
//! Fresh: full with --full; incremental if the baseline is usable; else delta when the gateway
//! already holds data for the disk (a checkpoint or durable writes), else full.
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
    /// A new pass from offset 0; `warning` says why it is not incremental when the agent has
    /// run before (or why it is delta).
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

/// What the operator asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Force {
    /// Decide from the state and the gateway.
    #[default]
    Auto,
    /// `--full`: send every block (an interrupted pass still resumes).
    Full,
    /// `--rescan`: a fresh delta pass whatever the state (verify and repair).
    Rescan,
}

/// Whether the gateway already holds data for the disk, so that a delta pass beats a full one.
fn gateway_has_data(welcome: &Welcome) -> bool {
    welcome.checkpoint_seq > 0 || welcome.durable_seq > 0
}

/// Decides the run.
pub fn decide(
    state: &AgentState,
    map: Option<&BlockMap>,
    size: u64,
    welcome: &Welcome,
    force: Force,
) -> Plan {
    if force == Force::Rescan {
        return Plan::Fresh {
            kind: PassKind::Delta,
            warning: None,
        };
    }
    if let Some(pass) = &state.pass {
        if !welcome.checkpoint_label.is_empty() && welcome.checkpoint_label == pass.label {
            return Plan::Landed(pass.clone());
        }
        if pass.kind == PassKind::Delta {
            // A delta pass is never resumed: starting it over costs hashes, not data.
            if force != Force::Full {
                return Plan::Fresh {
                    kind: PassKind::Delta,
                    warning: None,
                };
            }
        } else {
            let ck = state.checkpoint_seq();
            let from = welcome.resume_offset;
            let sane_offset = from > 0 && from <= size && (from % BLOCK_SIZE == 0 || from == size);
            let baseline_ok = pass.kind == PassKind::Full
                || baseline_problem(state, map, size, welcome, true).is_none();
            if welcome.checkpoint_seq == ck
                && welcome.durable_seq > ck
                && sane_offset
                && baseline_ok
            {
                return Plan::Resume {
                    pass: pass.clone(),
                    from,
                };
            }
        }
    }
    if force == Force::Full {
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
        Some(why) if gateway_has_data(welcome) => {
            let why = why.unwrap_or_else(|| {
                format!(
                    "no saved state for this disk, but the gateway holds its data (checkpoint {}, \
                     durable seq {})",
                    welcome.checkpoint_seq, welcome.durable_seq
                )
            });
            Plan::Fresh {
                kind: PassKind::Delta,
                warning: Some(format!(
                    "{why}; running a delta pass (only blocks that differ on the gateway travel)"
                )),
            }
        }
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
        let p = decide(
            &state(None, None),
            None,
            SIZE,
            &welcome(0, 0, 0, ""),
            Force::Auto,
        );
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
            kind(&decide(&st, Some(&m), SIZE, &w, Force::Auto)),
            Some(PassKind::Incremental)
        );
        assert_eq!(
            kind(&decide(&st, Some(&m), SIZE, &w, Force::Full)),
            Some(PassKind::Full)
        );
        // the gateway lost the checkpoint but holds older data: delta
        let p = decide(&st, Some(&m), SIZE, &welcome(3, 0, 3, "x"), Force::Auto);
        let Plan::Fresh { kind, warning } = p else {
            panic!("{p:?}")
        };
        assert_eq!(kind, PassKind::Delta);
        assert!(warning
            .unwrap_or_default()
            .contains("gateway has no record of checkpoint 10"));
        // ... and nothing at all: full
        assert_eq!(
            kind_of(&st, Some(&m), SIZE, &welcome(0, 0, 0, "")),
            PassKind::Full
        );
        // no map, other size, stale map, foreign writes after the checkpoint: the gateway
        // holds data, so only differing blocks travel
        assert_eq!(kind_of(&st, None, SIZE, &w), PassKind::Delta);
        assert_eq!(kind_of(&st, Some(&m), SIZE * 2, &w), PassKind::Delta);
        assert_eq!(kind_of(&st, Some(&map(9)), SIZE, &w), PassKind::Delta);
        assert_eq!(
            kind_of(&st, Some(&m), SIZE, &welcome(12, 8192, 10, "full-10")),
            PassKind::Delta
        );
        // a newer checkpoint on the gateway is accepted
        assert_eq!(
            kind_of(&st, Some(&m), SIZE, &welcome(11, 0, 11, "other")),
            PassKind::Incremental
        );
    }

    #[test]
    fn lost_state_with_data_on_the_gateway_is_delta() {
        let empty = state(None, None);
        for w in [welcome(10, 0, 10, "full-10"), welcome(7, 8192, 0, "")] {
            let p = decide(&empty, None, SIZE, &w, Force::Auto);
            let Plan::Fresh { kind, warning } = p else {
                panic!("{p:?}")
            };
            assert_eq!(kind, PassKind::Delta);
            assert!(warning.unwrap_or_default().contains("no saved state"));
        }
        // --full still means full
        let w = welcome(10, 0, 10, "full-10");
        assert_eq!(
            kind(&decide(&empty, None, SIZE, &w, Force::Full)),
            Some(PassKind::Full)
        );
    }

    #[test]
    fn rescan_is_always_a_fresh_delta_pass() {
        let m = map(10);
        let w = welcome(10, 0, 10, "full-10");
        for st in [
            state(Some(10), None),
            state(None, None),
            state(Some(10), Some(PassKind::Incremental)),
        ] {
            assert_eq!(
                decide(&st, Some(&m), SIZE, &w, Force::Rescan),
                Plan::Fresh {
                    kind: PassKind::Delta,
                    warning: None
                }
            );
        }
        // even when an interrupted pass could resume or has landed
        let st = state(Some(10), Some(PassKind::Incremental));
        let p = decide(
            &st,
            Some(&m),
            SIZE,
            &welcome(15, 65536, 10, "full-10"),
            Force::Rescan,
        );
        assert_eq!(kind(&p), Some(PassKind::Delta));
        let p = decide(
            &st,
            Some(&m),
            SIZE,
            &welcome(20, 0, 20, "incr-77"),
            Force::Rescan,
        );
        assert_eq!(kind(&p), Some(PassKind::Delta));
    }

    fn kind_of(st: &AgentState, m: Option<&BlockMap>, size: u64, w: &Welcome) -> PassKind {
        kind(&decide(st, m, size, w, Force::Auto)).unwrap_or(PassKind::Incremental)
    }

    #[test]
    fn interrupted_passes() {
        let m = map(10);
        let st = state(Some(10), Some(PassKind::Incremental));
        // checkpoint landed before the restart
        let p = decide(
            &st,
            Some(&m),
            SIZE,
            &welcome(20, 0, 20, "incr-77"),
            Force::Auto,
        );
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
            Force::Full,
        );
        assert!(matches!(p, Plan::Resume { from: 65536, .. }), "{p:?}");
        // nothing durable: start over
        let p = decide(
            &st,
            Some(&m),
            SIZE,
            &welcome(10, 0, 10, "full-10"),
            Force::Auto,
        );
        assert_eq!(kind(&p), Some(PassKind::Incremental));
        // incremental pass without its baseline cannot resume; the gateway holds data: delta
        let p = decide(
            &st,
            None,
            SIZE,
            &welcome(15, 65536, 10, "full-10"),
            Force::Auto,
        );
        assert_eq!(kind(&p), Some(PassKind::Delta));
        // a full pass resumes without a baseline; odd offsets are refused (and what the
        // gateway already holds is then compared, not resent)
        let st = state(None, Some(PassKind::Full));
        let p = decide(&st, None, SIZE, &welcome(5, 4096, 0, ""), Force::Auto);
        assert!(matches!(p, Plan::Resume { from: 4096, .. }), "{p:?}");
        let p = decide(&st, None, SIZE, &welcome(5, 100, 0, ""), Force::Auto);
        assert_eq!(kind(&p), Some(PassKind::Delta));
        let p = decide(
            &st,
            None,
            SIZE,
            &welcome(5, SIZE + 4096, 0, ""),
            Force::Auto,
        );
        assert_eq!(kind(&p), Some(PassKind::Delta));
        // nothing durable at all: the full pass starts over
        let p = decide(&st, None, SIZE, &welcome(0, 0, 0, ""), Force::Auto);
        assert_eq!(kind(&p), Some(PassKind::Full));
    }

    #[test]
    fn interrupted_delta_pass_starts_over() {
        let m = map(10);
        let mut st = state(None, Some(PassKind::Delta));
        // writes of the delta pass are durable: still no resume, a fresh delta pass
        let p = decide(
            &st,
            None,
            SIZE,
            &welcome(15, 65536, 10, "full-10"),
            Force::Auto,
        );
        assert_eq!(
            p,
            Plan::Fresh {
                kind: PassKind::Delta,
                warning: None
            }
        );
        // also with a usable baseline (an interrupted --rescan) and nothing durable
        st.checkpoint = state(Some(10), None).checkpoint;
        let p = decide(
            &st,
            Some(&m),
            SIZE,
            &welcome(10, 0, 10, "full-10"),
            Force::Auto,
        );
        assert_eq!(kind(&p), Some(PassKind::Delta));
        // its checkpoint landed
        let p = decide(
            &st,
            Some(&m),
            SIZE,
            &welcome(20, 0, 20, "incr-77"),
            Force::Auto,
        );
        assert!(matches!(p, Plan::Landed(_)), "{p:?}");
        // --full wins over restarting it
        let p = decide(
            &st,
            Some(&m),
            SIZE,
            &welcome(15, 65536, 10, "full-10"),
            Force::Full,
        );
        assert_eq!(kind(&p), Some(PassKind::Full));
    }
}
