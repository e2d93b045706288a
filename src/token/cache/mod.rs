//! The token cache: one entry per credential identity on moka, with at most one fetch in flight.
//!
//! Where a token comes from, in order: this local store, then the [`TokenSource`] (the token
//! endpoint; a shared tier can wrap it). The parts, one file each: the configured credentials and
//! their fetch state (`registry.rs`), one fetch in flight with its retries and bookkeeping
//! (`flight.rs`), back-off and retry gaps (`backoff.rs`), keeping tokens warm (`refresher.rs`),
//! what the admin listener sees (`report.rs`).
//!
//! - A request with a fresh token uses it and does not wait.
//! - A request whose token is due for refresh uses it and starts one background refresh.
//! - A request with no usable token waits on the credential's one fetch: fetches run inside
//!   moka's per-key `and_try_compute_with`, so concurrent waiters are serialised and each later
//!   one finds the token the first one fetched.
//! - A fetch retries retryable failures (5xx, 429, timeouts, connection errors, malformed
//!   answers) with growing, jittered gaps within `retry_budget`; rejected credentials are not
//!   retried. Then the credential backs off (exponentially, or as `Retry-After` says): requests
//!   arriving meanwhile get [`TokenError::Unavailable`] at once instead of hammering the
//!   endpoint, and an expired token is never handed out.
//! - A refresher task refreshes the tokens of recently used credentials when they come due, so
//!   steady traffic never meets an empty cache; at most `max_concurrent_fetches` fetches run at
//!   once across all credentials, background ones (prefetch, refresh-ahead) at most half of them.

mod backoff;
mod flight;
mod refresher;
mod registry;
mod report;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use moka::future::Cache;
use moka::ops::compute::Op;

use super::dialect::Identity;
use super::error::FetchError;
use super::lifetime::{Freshness, Schedule};
use super::source::TokenSource;
use crate::clock::{unix_millis, SharedClock};
use crate::metrics::Metrics;
use crate::secret::AccessToken;
use crate::token::spec::{CacheSettings, CredentialSpec};
use registry::{CredentialState, Registry};

use crate::sync::lock;
use backoff::doubling;
pub use backoff::{backoff, retry_gap};
pub use registry::Applied;
pub use report::TokenSnapshot;

/// A token in the cache, with its refresh schedule.
#[derive(Debug, Clone)]
pub struct CachedToken {
    pub token: AccessToken,
    pub schedule: Schedule,
    /// When the provider issued it, on our clock (when we asked for it), in Unix ms: see
    /// [`CachedToken::lifetime`].
    pub obtained_at_ms: u64,
    /// The provider's id for the token, where it gives one (Nuapay), for revocation.
    pub token_id: Option<Box<str>>,
    /// Bound to the credential's DPoP key: sent as `Authorization: DPoP` with a proof.
    pub dpop: bool,
    /// This credential's successful fetches when it was stored: a later token has a higher one.
    pub generation: u64,
}

impl CachedToken {
    /// From when it was issued until it expires.
    pub fn lifetime(&self) -> Duration {
        let obtained_at = crate::clock::from_unix_millis(self.obtained_at_ms);
        self.schedule
            .expires_at
            .duration_since(obtained_at)
            .unwrap_or_default()
    }
}

/// Why the request path got no token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("no usable token for credential `{credential}` from {endpoint}: {cause}")]
    Unavailable {
        credential: Arc<str>,
        /// The token endpoint's host (and port), never its path or query.
        endpoint: Arc<str>,
        cause: FetchError,
        /// When a new attempt will be made.
        retry_after: Duration,
    },
    #[error("credential `{0}` is not configured")]
    UnknownCredential(String),
}

/// What a caller needs from the cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    /// Any token that may still be sent.
    Usable,
    /// A token not yet due for refresh (background refresh).
    Fresh,
    /// A token newer than the generation cached when asked (admin refresh): a fetch that
    /// finished meanwhile satisfies it.
    NewerThan(u64),
}

pub struct TokenCache {
    /// Tokens by credential identity.
    store: Cache<Identity, Arc<CachedToken>, foldhash::fast::RandomState>,
    registry: ArcSwap<Registry>,
    fetch_permits: tokio::sync::Semaphore,
    background: refresher::BackgroundQueue,
    /// The earliest of the identities' next looks (Unix ms): a refresher tick before it has
    /// nothing to do, however many credentials there are.
    earliest_look_ms: std::sync::atomic::AtomicU64,
    settings: ArcSwap<CacheSettings>,
    clock: SharedClock,
    metrics: Metrics,
}

impl TokenCache {
    pub fn new(
        credentials: &[Arc<CredentialSpec>],
        source: Arc<dyn TokenSource>,
        settings: CacheSettings,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: Cache::builder().build_with_hasher(foldhash::fast::RandomState::default()),
            registry: ArcSwap::from_pointee(Registry::new(credentials, source, None)),
            fetch_permits: tokio::sync::Semaphore::new(settings.max_concurrent_fetches.max(1)),
            background: refresher::BackgroundQueue::default(),
            earliest_look_ms: std::sync::atomic::AtomicU64::new(0),
            settings: ArcSwap::from_pointee(settings),
            clock,
            metrics,
        })
    }

    /// Swaps in a reloaded configuration's credentials: an unchanged identity keeps its token
    /// and fetch state, a changed or removed one loses its token (revoked first when its
    /// provider asks for that). Requests in flight finish with the credentials they started with.
    pub async fn apply(
        &self,
        credentials: &[Arc<CredentialSpec>],
        source: Arc<dyn TokenSource>,
        settings: CacheSettings,
    ) -> Applied {
        let new = Registry::new(credentials, source, Some(&self.registry.load()));
        let old = self.registry.swap(Arc::new(new));
        self.settings.store(Arc::new(settings));
        self.earliest_look_ms.store(0, Ordering::Release); // new identities want a look
        let new = self.registry.load();
        let mut applied = Applied::default();
        for state in new.by_name.values() {
            let name = &state.spec.name;
            match old.by_name.get(name) {
                Some(before) if before.spec.identity == state.spec.identity => {
                    applied.kept.push(name.clone())
                }
                _ => applied.changed.push(name.clone()),
            }
        }
        for state in old.by_name.values() {
            if !new.by_name.contains_key(&state.spec.name) {
                applied.removed.push(state.spec.name.clone());
            }
            if !new.by_identity.contains_key(&state.spec.identity) {
                self.drop_token(state, &*old.source).await;
            }
        }
        applied
    }

    /// Forgets `state`'s token, revoking it first where its provider asks for that.
    async fn drop_token(&self, state: &CredentialState, source: &dyn TokenSource) {
        let identity = &state.spec.identity;
        if let Some(cached) = self.store.get(identity).await {
            if state.spec.revoke_on_shutdown {
                revoke(source, state, &cached).await;
            }
        }
        self.store.invalidate(identity).await;
    }

    /// A token that may be sent now for `spec` (as the request's configuration defines it).
    pub async fn token(self: &Arc<Self>, spec: &Arc<CredentialSpec>) -> Result<Arc<CachedToken>, TokenError> {
        let Some(state) = self.registered(spec) else {
            // A reload removed this credential while the request was on its way: it gets a
            // token of its own, which is not cached under an identity no one configures.
            let detached = CredentialState::new(spec.clone(), Arc::default());
            return Box::pin(self.fetch_with_retries(&detached)).await;
        };
        let credential = &spec.name;
        state
            .fetch
            .last_used_ms
            .store(unix_millis(self.clock.now()), Ordering::Relaxed);
        if let Some(cached) = self.store.get(&spec.identity).await {
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
        // Boxed: a fetch's future is large, and a request with a cached token (the most) would
        // otherwise carry its space, and copy it about, too.
        Box::pin(self.fetch_exclusive(&state, Want::Usable, true)).await
    }

    /// A token newer than the one cached now (the admin refresh). It joins a fetch already in
    /// flight, and honours the credential's back-off unless `force`.
    pub async fn refresh_now(
        self: &Arc<Self>,
        credential: &str,
        force: bool,
    ) -> Result<Arc<CachedToken>, TokenError> {
        let state = self.state(credential)?;
        let current = self
            .store
            .get(&state.spec.identity)
            .await
            .map_or(0, |cached| cached.generation);
        self.fetch_exclusive(&state, Want::NewerThan(current), !force)
            .await
    }

    /// The upstream refused `used` (a 401): drops it from the cache, unless a newer token
    /// already replaced it, and says whether a replay may fetch a fresh one. When freshly
    /// fetched tokens are refused too, refusals are passed back for a back-off period instead
    /// (the upstream, not the token, is the problem).
    pub async fn purge_refused(&self, spec: &Arc<CredentialSpec>, used: &CachedToken) -> bool {
        let Some(state) = self.registered(spec) else {
            return false;
        };
        if !self.may_purge(&state, used) {
            return false;
        }
        self.store
            .entry(spec.identity)
            .and_compute_with(|current| async move {
                match current {
                    Some(entry) if entry.value().token == used.token => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
        self.look_again(&state, Some(self.clock.now()));
        // The fleet's copy too, so that the other sidecars stop sending it.
        let source = self.registry.load().source.clone();
        if let Err(err) = source.purge(spec, &used.token).await {
            tracing::debug!(error = %err, "could not purge the refused token from the shared tier");
        }
        true
    }

    fn may_purge(&self, state: &CredentialState, used: &CachedToken) -> bool {
        let now = self.clock.now();
        let mut refusals = lock(&state.fetch.status);
        if refusals.suppressed_until.is_some_and(|until| until > now) {
            return false;
        }
        if refusals.purged_generation == 0 || used.generation <= refusals.purged_generation {
            refusals.purged_generation = refusals.purged_generation.max(used.generation);
            return true;
        }
        // A token fetched after the last purge was refused as well.
        let streak = state.fetch.refused_streak.fetch_add(1, Ordering::AcqRel) + 1;
        let wait = doubling(&self.settings.load(), streak);
        refusals.purged_generation = used.generation;
        refusals.suppressed_until = Some(now + wait);
        tracing::warn!(credential = %state.spec.name, refusals = streak, pause_ms = wait.as_millis() as u64, "the upstream refused a freshly fetched token too; passing its 401s back without fetching for a while");
        false
    }

    /// The upstream accepted a token of `credential`: refusals start counting afresh.
    pub fn upstream_accepted(&self, spec: &CredentialSpec) {
        if let Some(state) = self.registry.load().by_identity.get(&spec.identity) {
            let streak = &state.fetch.refused_streak;
            if streak.load(Ordering::Relaxed) != 0 {
                streak.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Revokes the cached tokens of credentials with `revoke_on_shutdown` (Nuapay long-lived
    /// tokens), so they do not outlive the sidecar.
    pub async fn revoke_on_shutdown(&self) {
        let registry = self.registry.load_full();
        for state in registry
            .by_identity
            .values()
            .filter(|s| s.spec.revoke_on_shutdown)
        {
            if let Some(cached) = self.store.get(&state.spec.identity).await {
                if revoke(&*registry.source, state, &cached).await {
                    self.store.invalidate(&state.spec.identity).await;
                    self.look_again(state, Some(self.clock.now()));
                }
            }
        }
    }

    fn state(&self, credential: &str) -> Result<Arc<CredentialState>, TokenError> {
        self.registry
            .load()
            .by_name
            .get(credential)
            .cloned()
            .ok_or_else(|| TokenError::UnknownCredential(credential.to_owned()))
    }

    /// The state for `spec`'s identity, unless a reload has removed it while a request that
    /// started before was still on its way.
    fn registered(&self, spec: &CredentialSpec) -> Option<Arc<CredentialState>> {
        self.registry.load().by_identity.get(&spec.identity).cloned()
    }
}

/// Revokes a cached token (Nuapay long-lived ones, by the id the provider gave it); whether it
/// was revoked.
async fn revoke(source: &dyn TokenSource, state: &CredentialState, cached: &CachedToken) -> bool {
    let Some(token_id) = &cached.token_id else {
        return false;
    };
    match source.revoke(&state.spec, token_id).await {
        Ok(()) => {
            tracing::info!(credential = %state.spec.name, token = %cached.token, "revoked token");
            true
        }
        Err(err) => {
            tracing::warn!(credential = %state.spec.name, error = %err, "could not revoke token");
            false
        }
    }
}

pub(super) fn satisfies(cached: &CachedToken, want: Want, now: SystemTime) -> bool {
    match want {
        Want::Usable => cached.schedule.freshness(now) != Freshness::Unusable,
        Want::Fresh => cached.schedule.freshness(now) == Freshness::Fresh,
        Want::NewerThan(generation) => cached.generation > generation,
    }
}
