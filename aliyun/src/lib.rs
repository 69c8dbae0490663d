//! Alibaba Cloud building blocks for the sync gateway's `[backend] kind = "aliyun"`.
//!
//! There is no Rust SDK for ECS, and the OSS crate the team first looked at signs only V1
//! (closed to new accounts and buckets in 2025), so this crate speaks both APIs itself over
//! hyper, with the signatures the clouds document:
//!
//! | module | what |
//! |---|---|
//! | [`credentials`] | access key, secret and STS token; never printed |
//! | [`acs3`] | ECS OpenAPI signature V3 (`ACS3-HMAC-SHA256`) |
//! | [`ecs`] | the RPC-style ECS client: disks, snapshots, images, instances |
//! | [`meta`] | the instance metadata service in hardened mode: identity, RAM role credentials |
//! | [`oss`] | OSS with signature V4 (`OSS4-HMAC-SHA256`): put, multipart, get, head, delete, presign |
//! | [`settings`] | the `[backend] kind = "aliyun"` table of the gateway config |
//! | `testing` | (feature `testing`) local ECS, OSS and metadata servers that check signatures |

pub mod acs3;
pub mod credentials;
pub mod ecs;
pub mod meta;
pub mod oss;
pub mod settings;
#[cfg(feature = "testing")]
pub mod testing;

pub use credentials::Credentials;
