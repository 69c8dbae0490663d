//! AWS building blocks for the sync gateway's `aws` backend.
//!
//! Everything that names an aws-sdk-ec2 or aws-sdk-ebs type lives in this crate, behind small async methods
//! with plain types in and out, so that the gateway crate never instantiates SDK generics and
//! editing the gateway never recompiles the SDK (a clean SDK build takes minutes).
//!
//! | module | what |
//! |---|---|
//! | [`config`] | [`AwsSettings`], the `[backend] kind = "aws"` table |
//! | [`imds`] | IMDSv2 client: identity, region, zone, signed identity document, role credentials |
//! | [`ec2`] | [`Ec2`]: volumes, snapshots, images, instances |
//! | [`ebs`] | [`Ebs`]: EBS direct API writes (StartSnapshot, PutSnapshotBlock, CompleteSnapshot), for `sync-aws-image` |
//! | `sdk` | the HTTP client, timeouts and [`StaticCredentials`] both SDK clients are built with |
//! | [`retry`] | our retry loop (the SDK's is off) with a shared, reportable counter |
//! | [`error`] | [`AwsError`]: op, AWS error code, request id, retry class |
//! | `testing` | (feature `testing`) a fake IMDSv2 server for tests |
//!
//! Nothing here reaches the network on construction: the SDK client and the IMDS client only
//! connect when a method is called, to the endpoints the settings name.

pub mod config;
pub mod ebs;
pub mod ec2;
pub mod error;
pub mod imds;
pub mod retry;
mod sdk;
#[cfg(feature = "testing")]
pub mod testing;
mod types;

pub use config::{AwsSettings, BootModeSetting};
pub use ebs::Ebs;
pub use ec2::Ec2;
pub use ec2::{CLIENT_TOKEN_TAG_KEY, MANAGED_TAG_KEY, MANAGED_TAG_VALUE, REQUEST_TAG_KEY};
pub use error::{AwsError, ConnectError, ErrorKind};
pub use imds::{IdentityDocument, Imds, ImdsError, RoleCredentials};
pub use retry::{RetryPolicy, RetryStats, RetryStatsSnapshot};
pub use sdk::StaticCredentials;
pub use types::*;
