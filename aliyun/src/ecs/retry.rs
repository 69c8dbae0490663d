//! The retry policy of ECS calls and the counters the gateway shows in its status.
//!
//! Backoff is exponential with *full jitter* (sleep a uniform random time in
//! `[0, min(cap, base·2^n)]`): it spreads synchronized clients best, and many disks on one
//! gateway share the same per-account ECS API quota (Alibaba throttles per account, per API,
//! per second: `Throttling.User`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;

use super::error::{EcsError, ErrorKind};

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
    /// Backoff ceiling before retry number `retry` (0 = first retry): `min(cap, base·2^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        // 2^20 · base is beyond any sane cap; the clamp keeps the shift in range.
        let factor = 1u32 << retry.min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A full-jitter backoff: uniform in `[0, ceiling(retry)]`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let nanos = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=nanos))
    }
}

/// Retries made so far, shared by every call of one client (and its clones).
#[derive(Debug, Default)]
pub struct RetryStats {
    retries: AtomicU64,
    throttled: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of [`RetryStats`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct RetryStatsSnapshot {
    /// Every retry, of any cause.
    pub retries: u64,
    /// The retries caused by throttling.
    pub throttled: u64,
    /// The error that caused the latest retry.
    pub last_error: Option<String>,
}

impl RetryStats {
    /// The counters now.
    pub fn snapshot(&self) -> RetryStatsSnapshot {
        RetryStatsSnapshot {
            retries: self.retries.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    pub(crate) fn record(&self, err: &EcsError) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if err.kind() == ErrorKind::Throttled {
            self.throttled.fetch_add(1, Ordering::Relaxed);
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(err.to_string());
    }
}

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
