//! The retry policy of ECS calls and the counters the gateway shows in its status.
//!
//! Backoff is exponential with *full jitter* (sleep a uniform random time in
//! `[0, min(cap, base·2^n)]`): it spreads synchronized clients best, and many disks on one
//! gateway share the same per-account ECS API quota (Alibaba throttles per account, per API,
//! per second: `Throttling.User`).

use std::time::Duration;

use rand::Rng;

/// How hard to retry one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Ceiling of the first backoff; doubles per retry.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            // 10 attempts wait ~35 s on average and ~75 s at most in all: enough to ride out
            // a throttling burst (ECS quotas refill per second) or a disk finishing its
            // attach, short enough that a real outage shows in the next status reports.
            max_attempts: 10,
            // 200 ms: ECS answers in tens of ms and a refilled quota has room again within a
            // second, so the first retries should be quick.
            base: Duration::from_millis(200),
            // 20 s: beyond it a throttled client gains nothing but latency.
            cap: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// Backoff ceiling before retry number `retry` (0 = the first retry):
    /// `min(cap, base·2^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        sync_common::retry::ceiling(self.base, self.cap, retry)
    }

    /// A full-jitter backoff: uniform in `[0, ceiling(retry)]`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        sync_common::retry::full_jitter(self.base, self.cap, retry, rng)
    }
}

/// Retries made so far, shared by every call of one client (and its clones); the gateway shows
/// them in status.
pub use sync_common::retry::{RetryStats, RetryStatsSnapshot};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(0), Duration::from_millis(200));
        assert_eq!(p.ceiling(1), Duration::from_millis(400));
        assert_eq!(p.ceiling(6), Duration::from_millis(12_800));
        assert_eq!(p.ceiling(7), Duration::from_secs(20));
        assert_eq!(p.ceiling(400), Duration::from_secs(20));
    }

    #[test]
    fn backoff_is_full_jitter_within_the_ceiling() {
        let p = RetryPolicy::default();
        let mut rng = rand::thread_rng();
        let mut below_half = false;
        for _ in 0..200 {
            let d = p.backoff(3, &mut rng);
            assert!(d <= p.ceiling(3));
            below_half |= d < p.ceiling(3) / 2;
        }
        assert!(below_half, "full jitter reaches the lower half");
    }
}
