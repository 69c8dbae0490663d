//! Test harness of the sync-aws tests: moto, fault proxies for EC2 and EBS, client settings,
//! scratch directories.
#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used)]

// Shared with the gateway's end-to-end AWS test, which includes the same files.
pub mod ebs_proxy;
#[path = "../../../tests/common/moto.rs"]
pub mod moto;
#[path = "../../../tests/common/ec2_proxy.rs"]
pub mod proxy;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sync_aws::{AwsSettings, Ec2, Imds, InstanceId, LaunchSpec, RetryPolicy};

/// Region of every test: moto's default, with zones us-east-1a..f.
pub const REGION: &str = "us-east-1";

/// Settings for an EC2 endpoint on loopback with static test credentials. The IMDS endpoint
/// is a closed loopback port: static credentials and an explicit region mean it is never
/// used, and if it were, nothing would leave the machine.
pub fn settings(endpoint: &str) -> AwsSettings {
    AwsSettings {
        region: Some(REGION.into()),
        endpoint_url: Some(endpoint.into()),
        imds_endpoint: "http://127.0.0.1:9".into(),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        tags: BTreeMap::from([("team".into(), "migration".into())]),
        ..AwsSettings::default()
    }
}

/// Fast retries, so that retry tests take milliseconds.
pub fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 6,
        base: Duration::from_millis(5),
        cap: Duration::from_millis(50),
        not_found_window: Duration::from_secs(5),
    }
}

pub fn client(endpoint: &str) -> Ec2 {
    let s = settings(endpoint);
    let imds = Imds::new(&s.imds_endpoint).unwrap();
    Ec2::with_region(&s, REGION.into(), &imds)
        .unwrap()
        .with_retry_policy(quick_retries())
}

/// An instance to play the gateway, launched from one of moto's built-in AMIs.
pub async fn gateway_instance(ec2: &Ec2) -> InstanceId {
    let images = ec2.describe_images(None, None).await.unwrap();
    let image = images.first().expect("moto lists built-in AMIs").id.clone();
    ec2.run_instances(&LaunchSpec {
        image,
        client_token: "gateway-instance".into(),
        tags: BTreeMap::new(),
    })
    .await
    .unwrap()
}

pub fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A private directory, removed on drop (no tempfile crate here: a new dev-dependency could
/// change shared dependencies' features and recompile aws-sdk-ec2).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("sync-aws-{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
