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
//! - A request with no usable token waits on the credential's one fetch, a *flight*: it runs on
//!   a task of its own, so it finishes (and its token is cached) whoever stops waiting for it;
//!   every waiter still there gets its outcome, and later ones find its token.
//! - A fetch retries retryable failures (5xx, 429, timeouts, connection errors, malformed
//!   answers) with growing, jittered gaps within `retry_budget`; rejected credentials are not
//!   retried. Then the credential backs off (exponentially, or as `Retry-After` says): requests
//!   arriving meanwhile get [`TokenError::Unavailable`] at once instead of hammering the
//!   endpoint, and an expired token is never handed out.
//! - A refresher task refreshes the tokens of recently used credentials when they come due, so
//!   steady traffic never meets an empty cache; at most `max_concurrent_fetches` fetches run at
//!   once across all credentials, background ones (prefetch, refresh-ahead) at most half of them.
//! - A reload swaps the credentials in one step for requests: each request reads the
//!   [`Credentials`] of its snapshot, so one that started before a reload still shares its
//!   credential's flight; the tokens of removed identities are dropped (and revoked where asked)
//!   after the swap, and whatever a request on an old snapshot fetched later is swept once no
//!   snapshot holds those credentials.

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
use super::source::{Revocation, TokenSource};
use crate::clock::{from_unix_millis, unix_millis, SharedClock};
use crate::metrics::Metrics;
use crate::secret::AccessToken;
use crate::token::spec::{CacheSettings, CredentialSpec};
use registry::{CredentialState, Registry, Retired};

use crate::sync::lock;
use backoff::doubling;
pub use backoff::{backoff, retry_gap, Backoff};
pub use registry::{Applied, Credentials, Replaced};
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
        let obtained_at = from_unix_millis(self.obtained_at_ms);
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

/// The `Retry-After` of a request that waited its whole timeout for a fetch still running.
const WAITED_OUT_RETRY: Duration = Duration::from_secs(1);

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
    /// A usable token asked for at or after this instant (Unix ms): the replay after an
    /// upstream refusal first seen then. A revocation refuses every token issued before it, so
    /// an older one (the fleet's, or one a refresh was bringing in) would be refused too.
    IssuedSince(u64),
}

impl Want {
    /// The instant before which a token will not do, for a source that holds tokens too.
    fn issued_since(self) -> Option<SystemTime> {
        match self {
            Self::IssuedSince(ms) => Some(from_unix_millis(ms)),
            Self::Usable | Self::Fresh | Self::NewerThan(_) => None,
        }
    }
}

pub struct TokenCache {
    /// Tokens by credential identity.
    store: Cache<Identity, Arc<CachedToken>, foldhash::fast::RandomState>,
    /// The credentials in use: what the refresher and the admin listener see. Requests read
    /// the [`Credentials`] of their snapshot instead.
    registry: ArcSwap<Registry>,
    fetch_permits: tokio::sync::Semaphore,
    background: refresher::BackgroundQueue,
    /// The fetches in flight, one per identity at most.
    flights: flight::Flights,
    /// The earliest of the identities' next looks (Unix ms): a refresher tick before it has
    /// nothing to do, however many credentials there are.
    earliest_look_ms: std::sync::atomic::AtomicU64,
    /// Identities a reload removed, whose credentials old snapshots may still hold: swept once
    /// none does (see [`Self::sweep_retired`]).
    retired: std::sync::Mutex<Vec<Retired>>,
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
            flights: flight::Flights::default(),
            earliest_look_ms: std::sync::atomic::AtomicU64::new(0),
            retired: std::sync::Mutex::default(),
            settings: ArcSwap::from_pointee(settings),
            clock,
            metrics,
        })
    }

    /// The credentials in use, for a request snapshot.
    pub fn credentials(&self) -> Credentials {
        Credentials::new(self.registry.load_full())
    }

    /// The credentials of a reloaded configuration, fetched from `source`: every identity that
    /// did not change keeps its fetch state (and so its token). Nothing is in use yet.
    pub fn prepare(&self, credentials: &[Arc<CredentialSpec>], source: Arc<dyn TokenSource>) -> Credentials {
        let registry = Registry::new(credentials, source, Some(&self.registry.load()));
        Credentials::new(Arc::new(registry))
    }

    /// Puts `credentials` (from [`Self::prepare`]) in use for the refresher and the admin
    /// listener; the caller swaps the request snapshot holding them right after, with nothing
    /// in between. The tokens of removed identities are left for [`Self::retire`].
    pub fn install(&self, credentials: &Credentials, settings: CacheSettings) -> Replaced {
        let old = self.registry.swap(credentials.registry().clone());
        self.settings.store(Arc::new(settings));
        self.earliest_look_ms.store(0, Ordering::Release); // new identities want a look
        Replaced::new(old, credentials.registry().clone())
    }

    /// Drops the tokens of the identities `replaced` removed, revoking them first where their
    /// provider asks for that and no other sidecar still serves them; remembers them so that
    /// what a request on an old snapshot fetches later is swept too.
    pub async fn retire(&self, replaced: Replaced) {
        let (old, new) = replaced.into_parts();
        for state in old.by_identity.values() {
            if new.by_identity.contains_key(&state.spec.identity) {
                continue;
            }
            self.drop_token(&state.spec, &*old.source).await;
            lock(&self.retired).push(Retired::new(state, old.source.clone()));
        }
    }

    /// Forgets `spec`'s token, revoking it first where its provider asks for that.
    async fn drop_token(&self, spec: &CredentialSpec, source: &dyn TokenSource) {
        let identity = &spec.identity;
        if let Some(cached) = self.store.get(identity).await {
            if spec.revoke_on_shutdown {
                revoke(source, spec, &cached).await;
            }
        }
        self.store.invalidate(identity).await;
    }

    /// Drops what requests on old snapshots fetched for removed identities, once no snapshot
    /// holds them any more (and no later reload brought the identity back).
    pub(super) async fn sweep_retired(&self) {
        let gone: Vec<Retired> = {
            let mut retired = lock(&self.retired);
            if retired.is_empty() {
                return;
            }
            let (gone, held) = std::mem::take(&mut *retired)
                .into_iter()
                .partition(Retired::unheld);
            *retired = held;
            gone
        };
        let current = self.registry.load_full();
        for retired in gone {
            if !current.by_identity.contains_key(&retired.spec.identity) {
                self.drop_token(&retired.spec, &*retired.source).await;
            }
        }
    }

    /// A token that may be sent now for `spec`, as the request's `credentials` define it,
    /// waiting at most `wait` for a fetch.
    pub async fn token(
        self: &Arc<Self>,
        credentials: &Credentials,
        spec: &Arc<CredentialSpec>,
        wait: Duration,
    ) -> Result<Arc<CachedToken>, TokenError> {
        let Some(state) = credentials.state(spec) else {
            return Err(TokenError::UnknownCredential(spec.name.to_string()));
        };
        let credential = &spec.name;
        let now = self.clock.now();
        state
            .fetch
            .last_used_ms
            .store(unix_millis(now), Ordering::Relaxed);
        if let Some(cached) = self.store.get(&spec.identity).await {
            match cached.schedule.freshness(now) {
                Freshness::Fresh => {
                    self.metrics.cache_lookup(credential, true);
                    return Ok(cached);
                }
                Freshness::RefreshDue => {
                    self.metrics.cache_lookup(credential, true);
                    self.refresh_in_background(state);
                    return Ok(cached);
                }
                Freshness::Unusable => {}
            }
        }
        self.metrics.cache_lookup(credential, false);
        self.wait_for(state, Want::Usable, wait).await
    }

    /// A token for the replay of a request the upstream refused: one issued at or after
    /// `since`, as [`Self::purge_refused`] gave it (see [`Want::IssuedSince`]), waiting at most
    /// `wait` for a fetch.
    pub async fn replacement(
        self: &Arc<Self>,
        credentials: &Credentials,
        spec: &Arc<CredentialSpec>,
        since: SystemTime,
        wait: Duration,
    ) -> Result<Arc<CachedToken>, TokenError> {
        let Some(state) = credentials.state(spec) else {
            return Err(TokenError::UnknownCredential(spec.name.to_string()));
        };
        self.wait_for(state, Want::IssuedSince(unix_millis(since)), wait)
            .await
    }

    async fn wait_for(
        self: &Arc<Self>,
        state: &Arc<CredentialState>,
        want: Want,
        wait: Duration,
    ) -> Result<Arc<CachedToken>, TokenError> {
        // Boxed: waiting on a flight is rare, and a request with a cached token (the most)
        // would otherwise carry its space, and copy it about, too.
        let flight = Box::pin(self.fetch_exclusive(state, want, true));
        match tokio::time::timeout(wait, flight).await {
            Ok(outcome) => outcome,
            Err(_) => Err(self.unavailable(state, FetchError::Timeout, WAITED_OUT_RETRY)),
        }
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
    /// already replaced it, and says whether a replay may fetch a fresh one: `Some(since)`, the
    /// instant the replay's token must be issued at or after (see [`Self::replacement`]). When
    /// freshly fetched tokens are refused too — twice running: one may be a token fetched just
    /// before a revocation, or handed back by the fleet before another sidecar's purge landed —
    /// refusals are passed back for a back-off period instead (`None`: the upstream, not the
    /// token, is the problem).
    pub async fn purge_refused(
        &self,
        credentials: &Credentials,
        spec: &Arc<CredentialSpec>,
        used: &CachedToken,
    ) -> Option<SystemTime> {
        let state = credentials.state(spec)?;
        let since = self.may_purge(state, used)?;
        self.store
            .entry(spec.identity)
            .and_compute_with(|current| async move {
                match current {
                    Some(entry) if entry.value().token == used.token => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
        self.look_again(state, Some(self.clock.now()));
        // The fleet's copy too, so that the other sidecars stop sending it.
        if let Err(err) = credentials.source().purge(spec, &used.token).await {
            tracing::debug!(error = %err, "could not purge the refused token from the shared tier");
        }
        Some(since)
    }

    /// Whether a refusal of `used` purges it, and since when the replay's token must be issued:
    /// a revocation's refusals start when its first one is seen, and every later refusal of a
    /// token as old (a request sent before the purge landed) belongs to it.
    fn may_purge(&self, state: &CredentialState, used: &CachedToken) -> Option<SystemTime> {
        let now = self.clock.now();
        let mut refusals = lock(&state.fetch.status);
        if refusals.suppressed_until.is_some_and(|until| until > now) {
            return None;
        }
        if refusals.purged_generation != 0 && used.generation <= refusals.purged_generation {
            return Some(from_unix_millis(refusals.purged_at_ms));
        }
        let first = refusals.purged_generation == 0;
        refusals.purged_generation = used.generation;
        refusals.purged_at_ms = unix_millis(now);
        // At the precision it is kept in, so that every refusal of the episode agrees.
        let since = from_unix_millis(refusals.purged_at_ms);
        if first {
            return Some(since);
        }
        // A token fetched after the last purge was refused as well: once is a race with a
        // revocation (purged like any other), twice running is the upstream.
        let streak = state.fetch.refused_streak.fetch_add(1, Ordering::AcqRel) + 1;
        if streak == 1 {
            return Some(since);
        }
        let wait = doubling(&self.settings.load(), streak - 1);
        refusals.suppressed_until = Some(now + wait);
        tracing::warn!(credential = %state.spec.name, refusals = streak, pause_ms = wait.as_millis() as u64, "the upstream refused a freshly fetched token too; passing its 401s back without fetching for a while");
        None
    }

    /// The upstream accepted a token of `credential`: refusals start counting afresh.
    pub fn upstream_accepted(&self, credentials: &Credentials, spec: &CredentialSpec) {
        if let Some(state) = credentials.state(spec) {
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
                if revoke(&*registry.source, &state.spec, &cached).await {
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
}

/// Revokes a cached token (Nuapay long-lived ones, by the id the provider gave it); whether it
/// was revoked.
async fn revoke(source: &dyn TokenSource, spec: &CredentialSpec, cached: &CachedToken) -> bool {
    let Some(token_id) = &cached.token_id else {
        return false;
    };
    match source.revoke(spec, token_id).await {
        Ok(Revocation::Revoked) => {
            tracing::info!(credential = %spec.name, token = %cached.token, "revoked token");
            true
        }
        Ok(Revocation::LeftToFleet) => {
            tracing::info!(credential = %spec.name, token = %cached.token, "not revoking the token: other sidecars of the fleet still use it");
            true
        }
        Err(err) => {
            tracing::warn!(credential = %spec.name, error = %err, "could not revoke token");
            false
        }
    }
}

pub(super) fn satisfies(cached: &CachedToken, want: Want, now: SystemTime) -> bool {
    match want {
        Want::Usable => cached.schedule.freshness(now) != Freshness::Unusable,
        Want::Fresh => cached.schedule.freshness(now) == Freshness::Fresh,
        Want::NewerThan(generation) => cached.generation > generation,
        Want::IssuedSince(ms) => cached.obtained_at_ms >= ms && satisfies(cached, Want::Usable, now),
    }
}
