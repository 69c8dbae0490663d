//! Local servers for tests (feature `testing`).
//!
//! Each stream adds its own module here: `ecs_server` and `meta_server` (stream ECS),
//! `oss_server` (stream OSS).
pub mod ecs_server;
pub mod meta_server;
pub mod oss_server;
