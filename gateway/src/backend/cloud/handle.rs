//! A snapshot taken by a cloud (an EBS snapshot, an ECS snapshot): its point in time is fixed
//! when the API call returns, so later writes to the volume need no preserving, but its content
//! is copied by the cloud for minutes and may fail. A background task of the backend follows it
//! and settles the handle; whoever needs the content (a launch) waits on it.

use std::sync::{Condvar, Mutex, PoisonError};

use super::super::{SnapshotInfo, SnapshotState};

/// A cloud snapshot being completed by the cloud.
#[derive(Debug)]
pub struct CloudSnapshot {
    /// As at initiation (`pending`).
    initial: SnapshotInfo,
    state: Mutex<Progress>,
    settled: Condvar,
}

#[derive(Debug)]
struct Progress {
    /// Latest known metadata: the state, and the id of a replacement after a retry.
    info: SnapshotInfo,
    /// Why it failed for good.
    error: Option<String>,
}

impl CloudSnapshot {
    /// A handle for a snapshot the cloud has just accepted.
    pub fn new(info: SnapshotInfo) -> Self {
        Self {
            initial: info.clone(),
            state: Mutex::new(Progress { info, error: None }),
            settled: Condvar::new(),
        }
    }

    /// Metadata as of initiation.
    pub fn info(&self) -> &SnapshotInfo {
        &self.initial
    }

    /// Metadata now: `pending`, `completed` or `failed`, possibly under a replacement's id.
    pub fn current(&self) -> SnapshotInfo {
        self.lock().info.clone()
    }

    /// Whether the cloud has finished it, either way.
    pub fn is_done(&self) -> bool {
        self.lock().info.state != SnapshotState::Pending
    }

    /// Blocks until the cloud has finished it; the completed snapshot's metadata, or why it
    /// failed.
    pub fn wait(&self) -> Result<SnapshotInfo, String> {
        let mut g = self.lock();
        while g.info.state == SnapshotState::Pending {
            g = self.settled.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        match &g.error {
            Some(e) => Err(e.clone()),
            None => Ok(g.info.clone()),
        }
    }

    /// The snapshot was retried: from now on it is `replacement` (still pending).
    pub fn replaced(&self, replacement: SnapshotInfo) {
        self.lock().info = replacement;
    }

    /// The cloud completed it.
    pub fn complete(&self) {
        let mut g = self.lock();
        g.info.state = SnapshotState::Completed;
        self.settled.notify_all();
    }

    /// It failed for good.
    pub fn fail(&self, why: String) {
        let mut g = self.lock();
        g.info.state = SnapshotState::Failed;
        g.error = Some(why);
        self.settled.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn info(id: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            disk_id: "d".into(),
            label: "l".into(),
            checkpoint_seq: 1,
            created_unix_ms: 1,
            created: String::new(),
            size_bytes: 4096,
            method: "ebs".into(),
            path: None,
            state: SnapshotState::Pending,
            replaces: None,
        }
    }

    #[test]
    fn wait_returns_the_replacement_once_completed() {
        let s = Arc::new(CloudSnapshot::new(info("snap-a")));
        assert!(!s.is_done());
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait())
        };
        std::thread::sleep(Duration::from_millis(50));
        let mut b = info("snap-b");
        b.replaces = Some("snap-a".into());
        s.replaced(b);
        assert!(!s.is_done(), "a replacement is still pending");
        s.complete();
        let done = waiter.join().unwrap().unwrap();
        assert_eq!(done.id, "snap-b");
        assert_eq!(done.state, SnapshotState::Completed);
        assert_eq!(s.info().id, "snap-a", "info() stays as initiated");
    }

    #[test]
    fn a_failure_reaches_the_waiter() {
        let s = CloudSnapshot::new(info("snap-a"));
        s.fail("error: internal".into());
        assert!(s.is_done());
        assert_eq!(s.wait().unwrap_err(), "error: internal");
        assert_eq!(s.current().state, SnapshotState::Failed);
    }
}
