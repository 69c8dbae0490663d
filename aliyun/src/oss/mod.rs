//! Alibaba Cloud OSS with signature V4 (`OSS4-HMAC-SHA256`).
//!
//! | module | what |
//! |---|---|
//! | [`sign`] | the V4 signer and presigner, pure functions shared with the test server |
//! | [`client`] | [`OssClient`]: configuration, addressing, signing, retries |
//! | [`objects`] | put (streamed), head, get, delete, presigned URLs, PUT to a presigned URL |
//! | [`multipart`] | initiate / upload part / complete / abort, used above the threshold |
//! | [`error`] | [`OssError`], read from OSS's `<Error>` documents |
//! | [`xml`] | the handful of XML documents OSS exchanges |
//!
//! Why our own signer rather than aliyun-oss-rust-sdk: its 0.2 line signs V1 only (closed to
//! new accounts since 2025-03-01 and to new buckets since 2025-09-01), sends no STS token and
//! has no multipart. The signer here is checked byte for byte against oss2's `ProviderAuthV4`
//! (tests/oss_sdk_crosscheck.rs).
//!
//! Addressing follows oss2: an IP or `localhost` endpoint gets path-style URLs
//! (`http://127.0.0.1:9000/bucket/key`), anything else virtual-hosted
//! (`https://bucket.oss-cn-hangzhou.aliyuncs.com/key`). Either way the signed resource is
//! `/bucket/key`, and the key travels with every reserved byte percent-encoded, `/` too.

pub(crate) mod body;
pub mod client;
pub mod error;
pub mod multipart;
pub mod objects;
pub mod sign;
pub mod xml;

pub use body::ProgressFn;
pub use client::{Addressing, OssClient, OssConfig, PutOptions};
pub use error::{OssError, ServiceError};
pub use multipart::multipart_etag;
pub use objects::{put_file_to_presigned_url, ObjectBody, ObjectMeta, PartResult, PutResult};
