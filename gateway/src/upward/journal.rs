//! The command journal, `DATA_DIR/state/commands.json`: every command id the gateway has seen,
//! whether it is running or done, its result, and whether the control plane has the result.
//!
//! A command is recorded as `running` (durably) before it is carried out and as `done` with its
//! result before the result is posted. So a command delivered again — because the result post
//! was lost, or across a restart — is never carried out twice: a `done` one has its stored
//! result posted again; one found `running` after a restart was cut short, and is either safely
//! repeated (kinds that converge on the same state) or reported failed, never guessed.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::{Command, CommandResult};
use crate::durable;

/// Finished and acknowledged entries kept for de-duplication; unfinished or unposted entries
/// are never dropped. A control plane re-delivers only commands it has no result for, so a
/// window this long is far beyond any re-delivery.
const KEEP_FINISHED: usize = 1000;

/// Where a command is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EntryState {
    /// Being carried out (or cut short by a stop, when found at start).
    Running,
    /// Finished with this result.
    Done {
        result: CommandResult,
        /// Whether the control plane accepted the result.
        posted: bool,
    },
}

/// One command in the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub kind: String,
    #[serde(flatten)]
    pub state: EntryState,
}

/// What to do with a delivered command.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// New: recorded as running; carry it out.
    Run,
    /// Already running in this process: ignore the duplicate.
    InProgress,
    /// Already done: post this stored result again (the control plane has not seen it).
    Repost(CommandResult),
    /// Found running from before a restart.
    Interrupted,
}

/// The journal and its file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: VecDeque<Entry>,
    /// Ids started by this process (a `Running` entry not in here was cut short by a stop).
    started_here: std::collections::HashSet<String>,
}

impl Journal {
    /// Loads `DIR/commands.json` (an absent file is an empty journal).
    pub fn open(state_dir: &Path) -> Result<Self, String> {
        let path = state_dir.join("commands.json");
        let entries = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Journal {
            path,
            entries,
            started_here: Default::default(),
        })
    }

    fn save(&self) -> std::io::Result<()> {
        let json = serde_json::to_vec(&self.entries).map_err(std::io::Error::other)?;
        durable::atomic_write(&self.path, &json, 0o600)
    }

    fn find(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Whether a command id can be used as a path segment of the result URL (and stored): the
    /// ids control planes generate are like `cmd-0123abcd`.
    pub fn valid_id(id: &str) -> bool {
        (1..=128).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !id.starts_with('.')
    }

    /// Decides what to do with a delivered command, recording a new one as running (durably,
    /// before it is carried out).
    pub fn admit(&mut self, cmd: &Command) -> std::io::Result<Admission> {
        match self.find(&cmd.id).map(|e| e.state.clone()) {
            Some(EntryState::Done { result, posted }) => {
                // Delivered again although posted: the control plane lost the result (it
                // answered before it had saved it). Post it again.
                if posted {
                    if let Some(e) = self.entries.iter_mut().find(|e| e.id == cmd.id) {
                        e.state = EntryState::Done {
                            result: result.clone(),
                            posted: false,
                        };
                    }
                    self.save()?;
                }
                return Ok(Admission::Repost(result));
            }
            Some(EntryState::Running) if self.started_here.contains(&cmd.id) => {
                return Ok(Admission::InProgress)
            }
            Some(EntryState::Running) => {
                self.started_here.insert(cmd.id.clone());
                return Ok(Admission::Interrupted);
            }
            None => {}
        }
        self.entries.push_back(Entry {
            id: cmd.id.clone(),
            kind: cmd.kind.clone(),
            state: EntryState::Running,
        });
        if let Err(e) = self.save() {
            self.entries.pop_back();
            return Err(e);
        }
        self.started_here.insert(cmd.id.clone());
        Ok(Admission::Run)
    }

    /// Records a command's result (durably, before it is posted).
    pub fn finish(&mut self, result: CommandResult) -> std::io::Result<()> {
        let id = result.command_id.clone();
        let state = EntryState::Done {
            result,
            posted: false,
        };
        match self.entries.iter_mut().find(|e| e.id == id) {
            Some(e) => e.state = state,
            None => self.entries.push_back(Entry {
                id: id.clone(),
                kind: String::new(),
                state,
            }),
        }
        self.started_here.remove(&id);
        self.trim();
        self.save()
    }

    /// Marks a result as accepted by the control plane.
    pub fn posted(&mut self, id: &str) -> std::io::Result<()> {
        let mut changed = false;
        if let Some(Entry {
            state: EntryState::Done { posted, .. },
            ..
        }) = self.entries.iter_mut().find(|e| e.id == id)
        {
            changed = !*posted;
            *posted = true;
        }
        if changed {
            self.trim();
            self.save()?;
        }
        Ok(())
    }

    /// Results the control plane does not have yet, oldest first.
    pub fn unposted(&self) -> Vec<CommandResult> {
        self.entries
            .iter()
            .filter_map(|e| match &e.state {
                EntryState::Done {
                    result,
                    posted: false,
                } => Some(result.clone()),
                _ => None,
            })
            .collect()
    }

    /// Entries, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    fn trim(&mut self) {
        let finished = |e: &Entry| matches!(e.state, EntryState::Done { posted: true, .. });
        let mut excess = self
            .entries
            .iter()
            .filter(|e| finished(e))
            .count()
            .saturating_sub(KEEP_FINISHED);
        self.entries.retain(|e| {
            if excess > 0 && finished(e) {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::CommandOutcome;

    fn cmd(id: &str) -> Command {
        Command {
            id: id.into(),
            kind: "snapshot_now".into(),
            args: serde_json::json!({"disk_id": "d"}),
            issued_unix_ms: 1,
        }
    }

    fn result(id: &str) -> CommandResult {
        CommandResult {
            command_id: id.into(),
            outcome: CommandOutcome::Succeeded,
            message: "ok".into(),
            output: serde_json::json!({}),
            finished_unix_ms: 2,
        }
    }

    #[test]
    fn a_command_is_admitted_once_then_its_result_is_reposted() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.admit(&cmd("c1")).unwrap(), Admission::Run);
        assert_eq!(j.admit(&cmd("c1")).unwrap(), Admission::InProgress);
        j.finish(result("c1")).unwrap();
        assert_eq!(j.unposted(), vec![result("c1")]);
        assert_eq!(
            j.admit(&cmd("c1")).unwrap(),
            Admission::Repost(result("c1"))
        );
        j.posted("c1").unwrap();
        assert!(j.unposted().is_empty());
        // Still known after posting: a late re-delivery is not run again.
        assert_eq!(
            j.admit(&cmd("c1")).unwrap(),
            Admission::Repost(result("c1"))
        );
    }

    #[test]
    fn command_ids_must_be_plain_path_segments() {
        for ok in ["cmd-0123abcd", "a", "A.b_c-9"] {
            assert!(Journal::valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "a?b", "é", &"x".repeat(129)] {
            assert!(!Journal::valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_journal_survives_a_restart_and_knows_what_was_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path()).unwrap();
            assert_eq!(j.admit(&cmd("done")).unwrap(), Admission::Run);
            j.finish(result("done")).unwrap();
            assert_eq!(j.admit(&cmd("cut")).unwrap(), Admission::Run);
            // The process stops here, "cut" still running.
        }
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.unposted(), vec![result("done")]);
        assert_eq!(
            j.admit(&cmd("done")).unwrap(),
            Admission::Repost(result("done"))
        );
        assert_eq!(j.admit(&cmd("cut")).unwrap(), Admission::Interrupted);
        // Being handled now: a further copy is a duplicate.
        assert_eq!(j.admit(&cmd("cut")).unwrap(), Admission::InProgress);
        assert_eq!(j.admit(&cmd("new")).unwrap(), Admission::Run);
    }

    #[test]
    fn only_posted_results_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        for i in 0..KEEP_FINISHED + 10 {
            let id = format!("c{i}");
            j.admit(&cmd(&id)).unwrap();
            j.finish(result(&id)).unwrap();
            if i >= 5 {
                j.posted(&id).unwrap();
            }
        }
        // c0..c4 unposted: kept whatever their age.
        assert_eq!(j.unposted().len(), 5);
        assert!(j.entries().count() <= KEEP_FINISHED + 5);
        assert!(j.find("c0").is_some());
    }
}
