//! Exponential backoff with *full jitter*: before retry `n` (0 = the first), sleep a uniform
//! random time in `[0, min(cap, base·2^n)]`. AWS's analysis ("Exponential Backoff and Jitter",
//! AWS Architecture Blog) shows it spreads synchronized clients best, and many disks on one
//! gateway hit the same per-account API quota at once, on either cloud.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;

/// How hard to retry one cloud API call.
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
            // 10 attempts with the base and cap below wait ~35 s on average and at most ~75 s
            // in all: long enough to ride out a throttling burst of a busy account (EC2 and
            // ECS refill their API quotas every second), short enough that a real outage
            // surfaces in the gateway's status within a couple of report intervals.
            max_attempts: 10,
            // 200 ms: the APIs answer in tens of ms, and a refilled quota has room again
            // after a fraction of a second, so the first retries should be quick.
            base: Duration::from_millis(200),
            // 20 s: the AWS SDK's own standard-mode maximum backoff; beyond it a throttled
            // client gains nothing but latency.
            cap: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// Backoff ceiling before retry number `retry` (0 = the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        ceiling(self.base, self.cap, retry)
    }

    /// A full-jitter backoff: uniform in `[0, ceiling(retry)]`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        full_jitter(self.base, self.cap, retry, rng)
    }
}

/// Backoff ceiling before retry number `retry`: `min(cap, base·2^retry)`.
pub fn ceiling(base: Duration, cap: Duration, retry: u32) -> Duration {
    // 2^20 · base is beyond any sane cap already; the clamp keeps the shift in range.
    let factor = 1u32 << retry.min(20);
    base.saturating_mul(factor).min(cap)
}

/// A full-jitter backoff: uniform in `[0, ceiling(base, cap, retry)]`.
pub fn full_jitter(base: Duration, cap: Duration, retry: u32, rng: &mut impl Rng) -> Duration {
    let nanos = u64::try_from(ceiling(base, cap, retry).as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.gen_range(0..=nanos))
}

/// Retries made so far, shared by every call of one client; the gateway shows them in status.
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

    /// Counts one retry caused by `error` (`throttled`: the cloud said slow down).
    pub fn record(&self, throttled: bool, error: &dyn Display) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if throttled {
            self.throttled.fetch_add(1, Ordering::Relaxed);
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::mock::StepRng;

    const BASE: Duration = Duration::from_millis(200);
    const CAP: Duration = Duration::from_secs(20);

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        assert_eq!(ceiling(BASE, CAP, 0), Duration::from_millis(200));
        assert_eq!(ceiling(BASE, CAP, 1), Duration::from_millis(400));
        assert_eq!(ceiling(BASE, CAP, 6), Duration::from_millis(12_800));
        assert_eq!(ceiling(BASE, CAP, 7), CAP);
        assert_eq!(ceiling(BASE, CAP, 400), CAP);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let mut rng = rand::thread_rng();
        let mut below_half = false;
        for retry in 0..10 {
            for _ in 0..50 {
                let d = full_jitter(BASE, CAP, retry, &mut rng);
                assert!(d <= ceiling(BASE, CAP, retry));
                below_half |= d < ceiling(BASE, CAP, retry) / 2;
            }
        }
        assert!(below_half, "jitter reaches below half the ceiling");
        assert_eq!(
            full_jitter(BASE, CAP, 3, &mut StepRng::new(0, 0)),
            Duration::ZERO
        );
    }

    #[test]
    fn stats_count_retries_and_throttling() {
        let s = RetryStats::default();
        s.record(true, &"Throttling.User");
        s.record(false, &"InternalError");
        let snap = s.snapshot();
        assert_eq!((snap.retries, snap.throttled), (2, 1));
        assert_eq!(snap.last_error.as_deref(), Some("InternalError"));
    }
}
