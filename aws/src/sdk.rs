//! What every SDK client of this crate is built with, so that EC2 and EBS share one HTTP/TLS
//! stack (hyper 1 + rustls with ring), one timeout policy and one way to take credentials.

use std::time::Duration;

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
// The smithy types both SDKs re-export (one definition, from the shared runtime crates).
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::SharedHttpClient;

/// TCP connect timeout to an AWS endpoint: the regional endpoints answer a SYN in
/// milliseconds; 5 s only fails a path that is really broken (and the call is retried).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-attempt timeout: EC2 calls answer in well under a second; a DescribeSnapshots page of
/// 1000 snapshots takes a few seconds, a 512 KiB PutSnapshotBlock a fraction of one on any
/// link worth publishing from. 60 s bounds a hung connection, then we retry.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The one HTTP client of the SDKs: hyper 1 over rustls(ring); plain `http://` endpoints
/// (moto on loopback) work too.
pub(crate) fn http_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// Connect and per-attempt timeouts (the SDK's retries are off: ours count and log them).
pub(crate) fn timeouts() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .build()
}

/// Fixed credentials (an operator's keys from the environment, or moto's in tests) as the
/// SDKs take them.
pub(crate) fn static_provider(credentials: &StaticCredentials) -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new(
        &credentials.access_key_id,
        &credentials.secret_access_key,
        credentials.session_token.clone(),
        None,
        "sync-aws-static",
    ))
}

/// An access key, its secret and an optional session token, given rather than looked up
/// (no metadata service, no profile files). Debug redacts the secret and the token.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_secret_and_the_token() {
        let c = StaticCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("tok-secret".into()),
        };
        let d = format!("{c:?}");
        assert!(d.contains("AKIDEXAMPLE"), "{d}");
        assert!(
            !d.contains("very-secret") && !d.contains("tok-secret"),
            "{d}"
        );
    }
}
