//! Our retry loop around EC2 and EBS direct calls. The SDK's own retries are disabled (see `ec2.rs`) so that
//! every retry is counted in [`RetryStats`], which the gateway reports in its status, and so
//! that eventual consistency after a create can be tolerated, which the SDK does not do.
//!
//! Backoff is exponential with *full jitter* (sleep a uniform random time in
//! `[0, min(cap, base·2^n)]`): AWS's own analysis ("Exponential Backoff and Jitter", AWS
//! Architecture Blog) shows it spreads synchronized clients best, and many disks on one
//! gateway hit the same per-account EC2 token bucket at once.

use std::future::Future;
use std::time::Duration;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use rand::Rng;
use tokio::time::Instant;

use crate::error::{AwsError, ErrorKind};

/// How hard to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Ceiling of the first backoff; doubles per retry.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
    /// How long after a create a `*.NotFound` for the new resource is taken as eventual
    /// consistency and retried.
    pub not_found_window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        let shared = sync_common::retry::RetryPolicy::default();
        Self {
            max_attempts: shared.max_attempts,
            base: shared.base,
            cap: shared.cap,
            // 60 s: AWS documents that a new resource may not be visible to all API calls
            // "for a short period"; in practice seconds. A minute covers that with margin
            // without hiding a genuinely wrong id for long.
            not_found_window: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Backoff ceiling before retry number `retry` (0 = first retry): `min(cap, base·2^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        sync_common::retry::ceiling(self.base, self.cap, retry)
    }

    /// A full-jitter backoff: uniform in `[0, ceiling(retry)]`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        sync_common::retry::full_jitter(self.base, self.cap, retry, rng)
    }
}

/// Retries made so far, shared by every EC2 call of one client; the gateway shows them in
/// status.
pub use sync_common::retry::{RetryStats, RetryStatsSnapshot};

/// Runs one EC2 or EBS call with retries (both SDKs share smithy's `SdkError`).
#[derive(Debug)]
pub(crate) struct Retrier {
    pub(crate) policy: RetryPolicy,
    pub(crate) stats: std::sync::Arc<RetryStats>,
}

impl Retrier {
    /// Calls `attempt` until it succeeds, fails for good, or the policy is spent.
    /// `not_found_until`: a `NotFound` before this instant is retried (the resource was
    /// just created).
    pub(crate) async fn run<T, E, F, Fut>(
        &self,
        op: &'static str,
        not_found_until: Option<Instant>,
        mut attempt: F,
    ) -> Result<T, AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut retry = 0u32;
        loop {
            let err = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => AwsError::from_sdk(op, &e),
            };
            match self.next_delay(&err, retry, not_found_until) {
                Some(delay) => {
                    tracing::warn!(op, code = ?err.code, request_id = ?err.request_id, retry = retry + 1,
                        delay_ms = delay.as_millis() as u64, "AWS call failed, retrying: {err}");
                    self.stats.record(err.kind == ErrorKind::Throttled, &err);
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                None => return Err(err),
            }
        }
    }

    /// The delay before the next attempt, or `None` to give up. Not generic, so the SDK's
    /// many error types share one copy of the decision.
    fn next_delay(
        &self,
        err: &AwsError,
        retry: u32,
        not_found_until: Option<Instant>,
    ) -> Option<Duration> {
        if retry + 1 >= self.policy.max_attempts {
            return None;
        }
        let retryable = err.kind.is_retryable()
            || (err.kind == ErrorKind::NotFound
                && not_found_until.is_some_and(|t| Instant::now() < t));
        retryable.then(|| self.policy.backoff(retry, &mut rand::thread_rng()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::mock::StepRng;

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
    fn backoff_stays_within_the_ceiling() {
        let p = RetryPolicy::default();
        let mut rng = rand::thread_rng();
        for retry in 0..12 {
            for _ in 0..100 {
                assert!(p.backoff(retry, &mut rng) <= p.ceiling(retry));
            }
        }
        // full jitter reaches down to zero
        assert_eq!(p.backoff(3, &mut StepRng::new(0, 0)), Duration::ZERO);
    }

    #[test]
    fn only_retryable_errors_are_retried_and_not_found_only_in_its_window() {
        let r = Retrier {
            policy: RetryPolicy::default(),
            stats: Default::default(),
        };
        let e = |kind| AwsError::local("ec2:X", kind, "m");
        assert!(r.next_delay(&e(ErrorKind::Throttled), 0, None).is_some());
        assert!(r.next_delay(&e(ErrorKind::Transient), 8, None).is_some());
        assert!(
            r.next_delay(&e(ErrorKind::Transient), 9, None).is_none(),
            "attempts spent"
        );
        assert!(r.next_delay(&e(ErrorKind::Invalid), 0, None).is_none());
        assert!(r.next_delay(&e(ErrorKind::NotFound), 0, None).is_none());
        let later = Instant::now() + Duration::from_secs(60);
        assert!(r
            .next_delay(&e(ErrorKind::NotFound), 0, Some(later))
            .is_some());
        assert!(r
            .next_delay(&e(ErrorKind::NotFound), 0, Some(Instant::now()))
            .is_none());
    }
}
