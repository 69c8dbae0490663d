//! Cloud-side sync gateway: the replication data plane shared by `sync-gateway` and
//! `sync-agent`.
//!
//! - [`protocol`]: the wire contract (frames, codec, authentication), shared by both programs.
//! - [`server`]: the gateway's data port, sessions and disk writers.
//! - [`backend`]: volumes and snapshots (`local` today; cloud backends implement the same).
//! - [`cli`]: what the programs share at their edges (logging, signals, error chains).
//! - [`config`]: the one config struct.
//! - [`http_client`]: JSON over HTTP(S) for the upward channel and the `sync-control` CLI.
//! - [`net`]: the bounded accept loop every listening port uses.
//! - [`durable`]: crash-safe persistence helpers used wherever state is saved.
//! - [`retention`]: which snapshots a tiered retention policy keeps.
//! - [`api`]: the upward channel's JSON contract (gateway ↔ control plane).
//! - [`upward`]: the gateway's connections to its control plane (register, poll, report).
//! - [`agent`]: the reference agent that scans a source and streams its changes.
//! - [`control_plane`]: `sync-control`, the reference control plane (API, state, console).
//! - [`diagnostics`]: the `collect_diagnostics` bundle: recent log, redacted config and state,
//!   versions, status; built as `.tar.gz` and uploaded to OSS or a presigned URL.

pub mod agent;
pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod control_plane;
pub mod diagnostics;
pub mod durable;
pub mod http_client;
pub mod net;
pub mod protocol;
pub mod retention;
pub mod server;
pub mod upward;
