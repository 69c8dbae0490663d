//! An Alibaba Cloud AccessKey pair and, for RAM-role (STS) credentials, the security token;
//! and [`CredentialsProvider`], where clients get them for each request (static keys, or a RAM
//! role's credentials from the metadata service, refreshed before they expire).

use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// Credentials for signing: long-lived keys (tests) or a RAM role's STS triple (production,
/// from the metadata service, refreshed before they expire).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub access_key_secret: String,
    /// STS security token; sent as `x-acs-security-token` (ECS) or `x-oss-security-token`
    /// (OSS) and covered by the signature.
    pub security_token: Option<String>,
}

impl Credentials {
    pub fn new(id: impl Into<String>, secret: impl Into<String>, token: Option<String>) -> Self {
        Self {
            access_key_id: id.into(),
            access_key_secret: secret.into(),
            security_token: token,
        }
    }
}

/// The secret and the token are never printed.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("access_key_secret", &"<redacted>")
            .field(
                "security_token",
                &self.security_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why credentials could not be had (e.g. the metadata service did not answer).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CredentialsError {
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl CredentialsError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

/// What [`CredentialsProvider::credentials`] returns: a boxed future, so that providers can
/// be used as `Arc<dyn CredentialsProvider>` (an `async fn` in a trait is not object-safe).
pub type CredentialsFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Credentials, CredentialsError>> + Send + 'a>>;

/// A source of credentials, asked before every signed request. Implementations cache and
/// refresh on their own (the metadata provider refreshes before the STS `Expiration`).
///
/// ```
/// use sync_aliyun::credentials::{Credentials, CredentialsFuture, CredentialsProvider};
///
/// #[derive(Debug)]
/// struct Fixed(Credentials);
///
/// impl CredentialsProvider for Fixed {
///     fn credentials(&self) -> CredentialsFuture<'_> {
///         let c = self.0.clone();
///         Box::pin(async move { Ok(c) })
///     }
/// }
/// ```
pub trait CredentialsProvider: Send + Sync + fmt::Debug {
    fn credentials(&self) -> CredentialsFuture<'_>;
}

/// Static credentials are their own provider.
impl CredentialsProvider for Credentials {
    fn credentials(&self) -> CredentialsFuture<'_> {
        let c = self.clone();
        Box::pin(async move { Ok(c) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let c = Credentials::new("LTAIid", "very-secret", Some("sts-token".into()));
        let d = format!("{c:?}");
        assert!(d.contains("LTAIid") && !d.contains("very-secret") && !d.contains("sts-token"));
    }
}
