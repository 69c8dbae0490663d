//! The retry policy of ECS calls and the counters the gateway shows in its status.
//!
//! Backoff is exponential with *full jitter* (sleep a uniform random time in
//! `[0, min(cap, base·2^n)]`): it spreads synchronized clients best, and many disks on one
//! gateway share the same per-account ECS API quota (Alibaba throttles per account, per API,
//! per second: `Throttling.User`).

pub use sync_common::retry::{RetryPolicy, RetryStats, RetryStatsSnapshot};
