//! The token cache: one entry per credential on moka, with at most one fetch in flight.
//!
//! - A request with a fresh token uses it and does not wait.
//! - A request whose token is due for refresh uses it and starts one background refresh.
//! - A request with no usable token waits on the credential's one fetch: fetches run inside
//!   moka's per-key `and_try_compute_with`, so concurrent waiters are serialised and each later
//!   one finds the token the first one fetched.
//! - After a failed fetch the credential backs off (exponentially, or as `Retry-After` says);
//!   requests arriving meanwhile get [`TokenError::Unavailable`] at once instead of hammering
//!   the endpoint, and an expired token is never handed out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use rand::Rng;
use serde::Serialize;

use super::error::FetchError;
use super::fetch::TokenFetcher;
use super::lifetime::{Freshness, Schedule};
use crate::clock::SharedClock;
use crate::config::{CacheSettings, CredentialSpec};
use crate::metrics::Metrics;
use crate::secret::AccessToken;

/// A token in the cache, with its refresh schedule.
#[derive(Debug, Clone)]
pub struct CachedToken {
    pub token: AccessToken,
    pub schedule: Schedule,
    /// The provider's id for the token, where it gives one (Nuapay), for revocation.
    pub token_id: Option<String>,
}

/// Why the request path got no token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("no usable token for credential `{credential}`: {cause}")]
    Unavailable {
        credential: Arc<str>,
        cause: FetchError,
        /// When a new attempt will be made.
        retry_after: Duration,
    },
    #[error("credential `{0}` is not configured")]
    UnknownCredential(String),
}

/// What a caller needs from the cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Any token that may still be sent.
    Usable,
    /// A token not yet due for refresh (background refresh).
    Fresh,
    /// A new token whatever is cached (admin refresh).
    New,
}

struct CredentialState {
    spec: Arc<CredentialSpec>,
    refreshing: AtomicBool,
    status: Mutex<FetchStatus>,
}

#[derive(Default)]
struct FetchStatus {
    fetches: u64,
    consecutive_failures: u32,
    retry_not_before: Option<SystemTime>,
    last_error: Option<FetchError>,
}

/// What `/tokens` shows for one credential: never the token, only its fingerprint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenSnapshot {
    pub credential: String,
    pub provider: String,
    pub state: &'static str,
    pub expires_in_ms: Option<i64>,
    pub fingerprint: Option<String>,
    pub fetches: u64,
    pub last_error: Option<String>,
}

pub struct TokenCache {
    store: Cache<Arc<str>, Arc<CachedToken>>,
    credentials: HashMap<Arc<str>, Arc<CredentialState>>,
    fetcher: TokenFetcher,
    settings: CacheSettings,
    clock: SharedClock,
    metrics: Metrics,
}

impl TokenCache {
    pub fn new(
        credentials: &[Arc<CredentialSpec>],
        fetcher: TokenFetcher,
        settings: CacheSettings,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Arc<Self> {
        let credentials = credentials
            .iter()
            .map(|spec| {
                let state = CredentialState {
                    spec: spec.clone(),
                    refreshing: AtomicBool::new(false),
                    status: Mutex::new(FetchStatus::default()),
                };
                (spec.name.clone(), Arc::new(state))
            })
            .collect::<HashMap<_, _>>();
        Arc::new(Self {
            store: Cache::builder()
                .max_capacity(credentials.len() as u64 + 1)
                .build(),
            credentials,
            fetcher,
            settings,
            clock,
            metrics,
        })
    }

    /// A token that may be sent now for `credential`.
    pub async fn token(self: &Arc<Self>, credential: &str) -> Result<Arc<CachedToken>, TokenError> {
        let state = self.state(credential)?;
        if let Some(cached) = self.store.get(credential).await {
            match cached.schedule.freshness(self.clock.now()) {
                Freshness::Fresh => {
                    self.metrics.cache_lookup(credential, true);
                    return Ok(cached);
                }
                Freshness::RefreshDue => {
                    self.metrics.cache_lookup(credential, true);
                    self.refresh_in_background(&state);
                    return Ok(cached);
                }
                Freshness::Unusable => {}
            }
        }
        self.metrics.cache_lookup(credential, false);
        self.fetch_exclusive(&state, Want::Usable).await
    }

    /// Fetches a new token now, whatever is cached (the admin refresh).
    pub async fn refresh_now(self: &Arc<Self>, credential: &str) -> Result<Arc<CachedToken>, TokenError> {
        let state = self.state(credential)?;
        self.fetch_exclusive(&state, Want::New).await
    }

    /// Drops `used` from the cache if it is still the cached token for `credential` (a
    /// concurrent request may already have replaced it).
    pub async fn purge(&self, credential: &str, used: &AccessToken) {
        let key: Arc<str> = credential.into();
        self.store
            .entry(key)
            .and_compute_with(|current| async move {
                match current {
                    Some(entry) if entry.value().token == *used => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// Whether `credential` holds a token that may be sent now.
    pub async fn has_usable(&self, credential: &str) -> bool {
        match self.store.get(credential).await {
            Some(cached) => cached.schedule.freshness(self.clock.now()) != Freshness::Unusable,
            None => false,
        }
    }

    /// Names of the credentials to fetch at start-up.
    pub fn prefetch_credentials(&self) -> Vec<Arc<str>> {
        let mut names: Vec<_> = self
            .credentials
            .values()
            .filter(|state| state.spec.prefetch)
            .map(|state| state.spec.name.clone())
            .collect();
        names.sort();
        names
    }

    /// `/tokens`: one snapshot per credential, sorted by name.
    pub async fn snapshots(&self) -> Vec<TokenSnapshot> {
        let mut names: Vec<_> = self.credentials.keys().cloned().collect();
        names.sort();
        let mut snapshots = Vec::with_capacity(names.len());
        for name in names {
            if let Some(snapshot) = self.snapshot(&name).await {
                snapshots.push(snapshot);
            }
        }
        snapshots
    }

    pub async fn snapshot(&self, credential: &str) -> Option<TokenSnapshot> {
        let state = self.credentials.get(credential)?;
        let cached = self.store.get(credential).await;
        let now = self.clock.now();
        let status = lock(&state.status);
        let failing = status.consecutive_failures > 0;
        let freshness = cached.as_ref().map(|c| c.schedule.freshness(now));
        let label = match freshness {
            None if failing => "failing",
            None => "empty",
            Some(Freshness::Unusable) if failing => "failing",
            Some(Freshness::Unusable) => "expired",
            Some(_) if state.refreshing.load(Ordering::Relaxed) => "refreshing",
            Some(_) if failing => "failing",
            Some(_) => "fresh",
        };
        Some(TokenSnapshot {
            credential: state.spec.name.to_string(),
            provider: state.spec.provider.name.to_string(),
            state: label,
            expires_in_ms: cached
                .as_ref()
                .map(|c| signed_millis_until(c.schedule.expires_at, now)),
            fingerprint: cached.as_ref().map(|c| c.token.fingerprint().to_owned()),
            fetches: status.fetches,
            last_error: status.last_error.as_ref().map(ToString::to_string),
        })
    }

    fn state(&self, credential: &str) -> Result<Arc<CredentialState>, TokenError> {
        self.credentials
            .get(credential)
            .cloned()
            .ok_or_else(|| TokenError::UnknownCredential(credential.to_owned()))
    }

    fn refresh_in_background(self: &Arc<Self>, state: &Arc<CredentialState>) {
        if state.refreshing.swap(true, Ordering::AcqRel) {
            return; // one refresh at a time
        }
        let cache = self.clone();
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(err) = cache.fetch_exclusive(&state, Want::Fresh).await {
                tracing::warn!(credential = %state.spec.name, error = %err, "background token refresh failed; still using the cached token");
            }
            state.refreshing.store(false, Ordering::Release);
        });
    }

    /// Runs at most one fetch per credential at a time: callers queue on moka's per-key lock,
    /// and each re-checks the entry (and the back-off) before fetching.
    async fn fetch_exclusive(
        &self,
        state: &Arc<CredentialState>,
        want: Want,
    ) -> Result<Arc<CachedToken>, TokenError> {
        let key = state.spec.name.clone();
        let outcome = self
            .store
            .entry(key)
            .and_try_compute_with(|current| async move {
                let now = self.clock.now();
                if let Some(entry) = &current {
                    if satisfies(entry.value(), want, now) {
                        return Ok(Op::Nop);
                    }
                }
                if want != Want::New {
                    self.check_backoff(state, now)?;
                }
                self.fetch_and_record(state).await.map(Op::Put)
            })
            .await?;
        match outcome {
            CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) | CompResult::Unchanged(entry) => {
                Ok(entry.into_value())
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => Err(self.unavailable(
                state,
                FetchError::malformed("no token after fetch"),
                self.settings.failure_backoff,
            )),
        }
    }

    fn check_backoff(&self, state: &CredentialState, now: SystemTime) -> Result<(), TokenError> {
        let status = lock(&state.status);
        match (status.retry_not_before, &status.last_error) {
            (Some(until), Some(error)) if until > now => {
                let wait = until.duration_since(now).unwrap_or_default();
                let error = error.clone();
                drop(status);
                Err(self.unavailable(state, error, wait))
            }
            _ => Ok(()),
        }
    }

    async fn fetch_and_record(&self, state: &CredentialState) -> Result<Arc<CachedToken>, TokenError> {
        let result = self.fetcher.fetch(&state.spec).await;
        let now = self.clock.now();
        let credential = &state.spec.name;
        match result {
            Ok(issued) => {
                self.metrics.token_fetch(credential, "ok");
                let mut status = lock(&state.status);
                status.fetches += 1;
                status.consecutive_failures = 0;
                status.retry_not_before = None;
                status.last_error = None;
                drop(status);
                let obtained_at = issued.expires_at.checked_sub(issued.lifetime).unwrap_or(now);
                let jitter = rand::thread_rng().gen::<f64>();
                let schedule = self
                    .settings
                    .refresh
                    .schedule(obtained_at, issued.expires_at, jitter);
                tracing::info!(
                    credential = %credential,
                    token = %issued.token,
                    lifetime_s = issued.lifetime.as_secs_f64(),
                    "fetched token"
                );
                Ok(Arc::new(CachedToken {
                    token: issued.token,
                    schedule,
                    token_id: issued.token_id,
                }))
            }
            Err(error) => {
                self.metrics.token_fetch(credential, error.outcome());
                let wait = self.record_failure(state, &error, now);
                tracing::warn!(credential = %credential, error = %error, retry_in_ms = wait.as_millis() as u64, "token fetch failed");
                Err(self.unavailable(state, error, wait))
            }
        }
    }

    /// Records a failure and returns how long the credential now backs off.
    fn record_failure(&self, state: &CredentialState, error: &FetchError, now: SystemTime) -> Duration {
        let mut status = lock(&state.status);
        status.fetches += 1;
        status.consecutive_failures = status.consecutive_failures.saturating_add(1);
        let wait = backoff(&self.settings, status.consecutive_failures, error);
        status.retry_not_before = Some(now + wait);
        status.last_error = Some(error.clone());
        wait
    }

    fn unavailable(&self, state: &CredentialState, cause: FetchError, retry_after: Duration) -> TokenError {
        TokenError::Unavailable {
            credential: state.spec.name.clone(),
            cause,
            retry_after,
        }
    }
}

/// Back-off after `failures` consecutive failures: doubling from `failure_backoff` up to
/// `max_failure_backoff`; rejected credentials wait the maximum (retrying soon cannot help);
/// a `Retry-After` longer than that is honoured.
pub fn backoff(settings: &CacheSettings, failures: u32, error: &FetchError) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let doubling = settings
        .failure_backoff
        .saturating_mul(1u32 << exponent)
        .min(settings.max_failure_backoff);
    let base = match error {
        FetchError::Rejected { .. } => settings.max_failure_backoff,
        _ => doubling,
    };
    base.max(error.retry_after().unwrap_or_default())
}

fn satisfies(cached: &CachedToken, want: Want, now: SystemTime) -> bool {
    match want {
        Want::Usable => cached.schedule.freshness(now) != Freshness::Unusable,
        Want::Fresh => cached.schedule.freshness(now) == Freshness::Fresh,
        Want::New => false,
    }
}

fn signed_millis_until(at: SystemTime, now: SystemTime) -> i64 {
    match at.duration_since(now) {
        Ok(ahead) => ahead.as_millis() as i64,
        Err(behind) => -(behind.duration().as_millis() as i64),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CacheSettings {
        CacheSettings::default()
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let err = FetchError::Status { status: 503 };
        let waits: Vec<u64> = (1..=8).map(|n| backoff(&settings(), n, &err).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn rejected_credentials_wait_the_maximum() {
        let err = FetchError::Rejected {
            status: 401,
            reason: None,
        };
        assert_eq!(backoff(&settings(), 1, &err), Duration::from_secs(60));
    }

    #[test]
    fn retry_after_is_honoured_when_longer() {
        let err = FetchError::RateLimited {
            retry_after: Some(Duration::from_secs(120)),
        };
        assert_eq!(backoff(&settings(), 1, &err), Duration::from_secs(120));
        let err = FetchError::RateLimited {
            retry_after: Some(Duration::from_secs(0)),
        };
        assert_eq!(backoff(&settings(), 3, &err), Duration::from_secs(4));
    }
}
