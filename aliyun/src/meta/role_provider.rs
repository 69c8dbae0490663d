//! The RAM role's STS credentials, cached and refreshed before they expire: what the ECS and OSS
//! clients sign with on an ECS instance.
//!
//! ```text
//!   fetched         next_refresh = Expiration - margin       Expiration
//!      |────── fresh ──────────|─────── stale: refresh ──────────|── expired
//! ```
//!
//! Fresh: served from the cache. Stale: the first caller refreshes (one at a time); callers
//! meanwhile get the cached credentials. A failed refresh is logged, and the cached credentials
//! are served until they expire, with a new attempt every `retry_pause`. Expired: callers wait
//! for the refresh, and get its error if it fails.

use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;

use super::{InstanceMetadata, MetaError, RoleCredentials};
use crate::credentials::{CredentialsError, CredentialsFuture, CredentialsProvider};
use crate::Credentials;

/// When [`RamRoleCredentialsProvider`] fetches new credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Fetch new credentials this long before `Expiration`. Default 15 minutes, the window
    /// Alibaba's own credentials SDKs use (credentials-go `SessionStaleTimeSeconds`). It covers
    /// a request signed just before expiry that is still in flight or retried (a multipart
    /// upload part, a snapshot poll), some clock skew, and ~30 refresh attempts at the default
    /// `retry_pause` should the metadata service be briefly unavailable.
    pub margin: Duration,
    /// After a failed refresh, keep serving the cached (still unexpired) credentials this long
    /// before trying again, so that an outage costs one slow call per pause rather than one
    /// per signed request. Also spaces fetches when the service hands out credentials that are
    /// already inside `margin`. Default 30 s.
    pub retry_pause: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            margin: Duration::from_secs(15 * 60),
            retry_pause: Duration::from_secs(30),
        }
    }
}

/// The RAM role's STS credentials, cached and refreshed `margin` before they expire.
///
/// One refresh at a time: while it runs, other callers get the cached credentials if they are
/// still unexpired, and wait for the refresh otherwise. A failed refresh is logged and the
/// cached credentials keep being served until they expire; after that the refresh's error is
/// returned. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct RamRoleCredentialsProvider {
    inner: Arc<ProviderInner>,
}

struct ProviderInner {
    meta: InstanceMetadata,
    role: Option<String>,
    policy: RefreshPolicy,
    cached: StdMutex<Option<CachedCredentials>>,
    refresh: Mutex<()>,
}

struct CachedCredentials {
    current: RoleCredentials,
    next_refresh: SystemTime,
}

impl fmt::Debug for RamRoleCredentialsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamRoleCredentialsProvider")
            .field("meta", &self.inner.meta)
            .field("role", &self.inner.role)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl RamRoleCredentialsProvider {
    /// A provider over `meta`. `role`: the RAM role's name, or `None` to use whichever role is
    /// attached (looked up at every refresh, so a role swapped on the instance is followed).
    pub fn new(meta: InstanceMetadata, role: Option<String>, policy: RefreshPolicy) -> Self {
        Self {
            inner: Arc::new(ProviderInner {
                meta,
                role,
                policy,
                cached: StdMutex::new(None),
                refresh: Mutex::new(()),
            }),
        }
    }

    /// Credentials to sign with now.
    pub async fn credentials(&self) -> Result<Credentials, MetaError> {
        self.role_credentials().await.map(|rc| rc.credentials)
    }

    /// Credentials to sign with now, with their role and expiry.
    pub async fn role_credentials(&self) -> Result<RoleCredentials, MetaError> {
        if let Some(c) = self.cached_if(|c, now| now < c.next_refresh) {
            return Ok(c);
        }
        let _refreshing = match self.inner.refresh.try_lock() {
            Ok(guard) => guard,
            // Another caller is refreshing: the old credentials do while they last.
            Err(_) => match self.cached_if(|c, now| now < c.current.expiration) {
                Some(c) => return Ok(c),
                None => self.inner.refresh.lock().await,
            },
        };
        // The refresh we waited for may have done the work.
        if let Some(c) = self.cached_if(|c, now| now < c.next_refresh) {
            return Ok(c);
        }
        let fetched = match &self.inner.role {
            Some(role) => self.inner.meta.role_credentials_for(role).await,
            None => self.inner.meta.role_credentials().await,
        };
        let now = SystemTime::now();
        let policy = self.inner.policy;
        let mut slot = self
            .inner
            .cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match fetched {
            Ok(fresh) => {
                let refresh_at = fresh.expiration.checked_sub(policy.margin).unwrap_or(now);
                if refresh_at <= now {
                    tracing::warn!(
                        role = %fresh.role,
                        "the metadata service handed out RAM role credentials that expire within \
                         the refresh margin ({:?}); fetching again in {:?}",
                        policy.margin,
                        policy.retry_pause
                    );
                }
                let next_refresh = refresh_at
                    .max(now + policy.retry_pause)
                    .min(fresh.expiration);
                *slot = Some(CachedCredentials {
                    current: fresh.clone(),
                    next_refresh,
                });
                Ok(fresh)
            }
            Err(e) => match slot.as_mut() {
                Some(c) if now < c.current.expiration => {
                    c.next_refresh = (now + policy.retry_pause).min(c.current.expiration);
                    let left = c.current.expiration.duration_since(now).unwrap_or_default();
                    tracing::warn!(
                        role = %c.current.role,
                        "refreshing RAM role credentials failed; serving the cached ones, valid \
                         {}s more, and trying again in {:?}: {}",
                        left.as_secs(),
                        policy.retry_pause,
                        error_chain(&e)
                    );
                    Ok(c.current.clone())
                }
                _ => Err(e),
            },
        }
    }

    fn cached_if(
        &self,
        usable: impl Fn(&CachedCredentials, SystemTime) -> bool,
    ) -> Option<RoleCredentials> {
        let slot = self
            .inner
            .cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.as_ref()
            .filter(|c| usable(c, SystemTime::now()))
            .map(|c| c.current.clone())
    }
}

/// The clients (ECS, OSS) ask for credentials before every signed request through this trait.
/// A failure carries the [`MetaError`] as its source.
impl CredentialsProvider for RamRoleCredentialsProvider {
    fn credentials(&self) -> CredentialsFuture<'_> {
        Box::pin(async move {
            Self::role_credentials(self)
                .await
                .map(|rc| rc.credentials)
                .map_err(|e| {
                    CredentialsError::with_source(
                        "no RAM role credentials from the instance metadata service",
                        e,
                    )
                })
        })
    }
}

/// An error and its sources on one line, for logs.
fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
