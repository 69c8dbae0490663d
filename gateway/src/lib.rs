//! Cloud-side sync gateway: the replication data plane shared by `sync-gateway` and
//! `sync-agent`.
//!
//! - [`protocol`]: the wire contract (frames, codec, authentication), shared by both programs.
//! - [`durable`]: crash-safe persistence helpers used wherever state is saved.
//! - [`agent`]: the reference agent that scans a source and streams its changes.

pub mod agent;
pub mod durable;
pub mod protocol;
