//! [`Ec2`]: the EC2 calls the gateway's `aws` backend makes, one small method each, with plain
//! types in and out. All of aws-sdk-ec2 stays inside this module tree.
//!
//! Every call goes through [`crate::retry`] (the SDK's own retry is off); every created
//! resource carries the settings' tags, the per-call tags and [`MANAGED_TAG_KEY`]` = true`,
//! which the IAM policy (`aws/iam-policy.json`) requires on create and checks before any
//! modify or delete.
//!
//! | method | EC2 action | idempotency |
//! |---|---|---|
//! | `create_volume` | CreateVolume | ClientToken |
//! | `attach_volume` | AttachVolume | "already attached there" is success |
//! | `detach_volume` | DetachVolume | "already available" is success |
//! | `delete_volume` / `delete_snapshot` | Delete* | NotFound is success |
//! | `create_snapshot` | CreateSnapshot | after a transient error, a tagged snapshot of the volume is looked up before retrying |
//! | `register_image` | RegisterImage | the AMI name: a duplicate returns the existing image |
//! | `run_instances` | RunInstances | ClientToken |

mod launch;
mod snapshots;
mod volumes;

pub use snapshots::REQUEST_TAG_KEY;
pub use volumes::CLIENT_TOKEN_TAG_KEY;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Region, SharedCredentialsProvider};
use aws_sdk_ec2::primitives::DateTime;
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use tokio::time::Instant;

use crate::config::AwsSettings;
use crate::error::ConnectError;
use crate::imds::Imds;
use crate::retry::{Retrier, RetryPolicy, RetryStats};
use crate::sdk::{self, StaticCredentials};

/// Tag put on everything this crate creates; the IAM policy keys its conditions on it.
pub const MANAGED_TAG_KEY: &str = "sync-gateway:managed";
/// Value of [`MANAGED_TAG_KEY`].
pub const MANAGED_TAG_VALUE: &str = "true";

/// EC2 client of the gateway's `aws` backend.
#[derive(Debug, Clone)]
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
    settings: Arc<AwsSettings>,
    region: String,
    retrier: Arc<Retrier>,
    /// Resources this client created, with when: a NotFound for them inside the policy's
    /// window is eventual consistency, not absence.
    fresh: Arc<Mutex<HashMap<String, Instant>>>,
    /// Serializes "choose a free device name, attach" so two disks never pick the same one.
    attach_lock: Arc<tokio::sync::Mutex<()>>,
    /// Whether what this client creates carries [`MANAGED_TAG_KEY`] (see [`Ec2::unmarked`]).
    marked: bool,
}

impl Ec2 {
    /// A client for `settings`: region from the settings or else IMDS; credentials static
    /// when the settings carry them (tests), else the instance profile through `imds`.
    /// Only the region lookup (when needed) touches the network here.
    pub async fn connect(settings: &AwsSettings, imds: &Imds) -> Result<Self, ConnectError> {
        let region = match &settings.region {
            Some(r) => r.clone(),
            None => imds.region().await.map_err(ConnectError::Region)?,
        };
        Self::with_region(settings, region, imds)
    }

    /// Like [`Ec2::connect`] with the region given; touches no network.
    pub fn with_region(
        settings: &AwsSettings,
        region: String,
        imds: &Imds,
    ) -> Result<Self, ConnectError> {
        if settings.access_key_id.is_some() != settings.secret_access_key.is_some() {
            return Err(ConnectError::HalfCredentials);
        }
        let credentials = match settings.static_credentials() {
            Some((ak, sk, token)) => sdk::static_provider(&StaticCredentials {
                access_key_id: ak.to_owned(),
                secret_access_key: sk.to_owned(),
                session_token: token.map(str::to_owned),
            }),
            None => SharedCredentialsProvider::new(imds.credentials_provider()),
        };
        Ok(Self::build(settings, region, credentials))
    }

    /// A client with `credentials` rather than the settings' or the instance profile's: for
    /// tools run by an operator (`sync-aws-image`), which never ask a metadata service.
    /// Touches no network.
    pub fn with_credentials(
        settings: &AwsSettings,
        region: String,
        credentials: &StaticCredentials,
    ) -> Self {
        Self::build(settings, region, sdk::static_provider(credentials))
    }

    fn build(
        settings: &AwsSettings,
        region: String,
        credentials: SharedCredentialsProvider,
    ) -> Self {
        let mut config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.clone()))
            .credentials_provider(credentials)
            .http_client(sdk::http_client())
            // Our own loop retries (counted, visible, consistency-aware): the SDK makes one
            // attempt per call.
            .retry_config(RetryConfig::disabled())
            .timeout_config(sdk::timeouts());
        if let Some(url) = &settings.endpoint_url {
            config = config.endpoint_url(url.clone());
        }
        Self {
            client: aws_sdk_ec2::Client::from_conf(config.build()),
            settings: Arc::new(settings.clone()),
            region,
            retrier: Arc::new(Retrier {
                policy: RetryPolicy::default(),
                stats: Arc::new(RetryStats::default()),
            }),
            fresh: Arc::default(),
            attach_lock: Arc::default(),
            marked: true,
        }
    }

    /// What this client creates no longer carries [`MANAGED_TAG_KEY`]: for the appliance
    /// publisher, whose AMI and snapshot are not the gateway's. The gateway's IAM policy lets
    /// it delete and launch from what carries the tag; its own appliance image must not.
    pub fn unmarked(mut self) -> Self {
        self.marked = false;
        self
    }

    /// Replaces the retry policy (tests use short backoffs).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retrier = Arc::new(Retrier {
            policy,
            stats: self.retrier.stats.clone(),
        });
        self
    }

    /// Shares `stats` (e.g. one counter for all of a gateway's clients).
    pub fn with_retry_stats(mut self, stats: Arc<RetryStats>) -> Self {
        self.retrier = Arc::new(Retrier {
            policy: self.retrier.policy.clone(),
            stats,
        });
        self
    }

    /// The retry counter and last error, for status reports.
    pub fn retry_stats(&self) -> Arc<RetryStats> {
        self.retrier.stats.clone()
    }

    /// The region calls go to.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The settings this client was made from.
    pub fn settings(&self) -> &AwsSettings {
        &self.settings
    }

    /// Notes that `id` was just created.
    fn created(&self, id: &str) {
        let mut fresh = self.fresh.lock().unwrap_or_else(PoisonError::into_inner);
        let window = self.retrier.policy.not_found_window;
        fresh.retain(|_, at| at.elapsed() < window);
        fresh.insert(id.to_owned(), Instant::now());
    }

    /// Notes that `id` was deleted: a NotFound for it is now the truth.
    fn forget(&self, id: &str) {
        self.fresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Until when a NotFound for `id` is tolerated (it was created within the window).
    fn not_found_until(&self, id: &str) -> Option<Instant> {
        let fresh = self.fresh.lock().unwrap_or_else(PoisonError::into_inner);
        fresh
            .get(id)
            .map(|at| *at + self.retrier.policy.not_found_window)
    }

    /// Settings tags, then `extra` (wins on a clash), then the managed marker (unless
    /// [`Ec2::unmarked`]).
    fn merged_tags(&self, extra: &BTreeMap<String, String>) -> Vec<Tag> {
        let mut all = self.settings.tags.clone();
        all.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        if self.marked {
            all.insert(MANAGED_TAG_KEY.to_owned(), MANAGED_TAG_VALUE.to_owned());
        }
        all.into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect()
    }

    fn tag_spec(
        &self,
        resource: ResourceType,
        extra: &BTreeMap<String, String>,
    ) -> TagSpecification {
        TagSpecification::builder()
            .resource_type(resource)
            .set_tags(Some(self.merged_tags(extra)))
            .build()
    }
}

fn tags_to_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

fn to_system_time(t: Option<&DateTime>) -> Option<SystemTime> {
    t.and_then(|d| SystemTime::try_from(*d).ok())
}

/// Polling interval of waits: starts short (moto and fast EBS operations finish in well under
/// a second) and grows to 5 s (real attaches and creates take seconds to a minute; Describe*
/// calls have generous rate limits but a gateway with many disks should not spin).
fn poll_interval(round: u32) -> Duration {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(5);
    FIRST.saturating_mul(1 << round.min(5)).min(MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ImageSpec, InstanceId, LaunchSpec, SnapshotFilter, SnapshotId, VolumeId};
    use crate::VolumeState;

    fn assert_send<T: Send>(_: T) {}

    /// The gateway spawns these futures on tokio's multi-thread runtime: they must be Send.
    /// Type-checked, never run.
    #[allow(dead_code)]
    fn futures_are_send(
        ec2: &Ec2,
        imds: &Imds,
        s: &AwsSettings,
        image: &ImageSpec,
        launch: &LaunchSpec,
    ) {
        let (v, i, sn) = (
            VolumeId::from("v"),
            InstanceId::from("i"),
            SnapshotId::from("s"),
        );
        let t = BTreeMap::new();
        let d = Duration::ZERO;
        assert_send(Ec2::connect(s, imds));
        assert_send(ec2.create_volume("az", 1, "t", &t));
        assert_send(ec2.describe_volume(&v));
        assert_send(ec2.wait_volume_state(&v, VolumeState::Available, d));
        assert_send(ec2.wait_attached(&v, &i, d));
        assert_send(ec2.attach_volume(&v, &i, "/dev/sdf"));
        assert_send(ec2.attach_to_free_device(&v, &i));
        assert_send(ec2.detach_volume(&v));
        assert_send(ec2.delete_volume(&v));
        assert_send(ec2.create_snapshot(&v, "d", &t));
        assert_send(ec2.describe_snapshots(&SnapshotFilter::Ids(vec![])));
        assert_send(ec2.delete_snapshot(&sn));
        assert_send(ec2.register_image(image));
        assert_send(ec2.run_instances(launch));
        assert_send(ec2.describe_instance(&i));
        assert_send(imds.identity_document());
        assert_send(imds.role_credentials());
    }
}
