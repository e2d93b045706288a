//! The token cache: one entry per credential on moka, with at most one fetch in flight.
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
//!   once across all credentials.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use rand::Rng;
use serde::Serialize;

use super::error::FetchError;
use super::fetch::TokenFetcher;
use super::lifetime::{Freshness, Schedule};
use crate::clock::{from_unix_millis, unix_millis, SharedClock};
use crate::config::{CacheSettings, CredentialSpec};
use crate::metrics::Metrics;
use crate::secret::AccessToken;

/// A token in the cache, with its refresh schedule.
#[derive(Debug, Clone)]
pub struct CachedToken {
    pub token: AccessToken,
    pub schedule: Schedule,
    /// When the provider issued it, on our clock (when we asked for it).
    pub obtained_at: SystemTime,
    /// The provider's id for the token, where it gives one (Nuapay), for revocation.
    pub token_id: Option<String>,
    /// This credential's successful fetches when it was stored: a later token has a higher one.
    pub generation: u64,
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
enum Want {
    /// Any token that may still be sent.
    Usable,
    /// A token not yet due for refresh (background refresh).
    Fresh,
    /// A token newer than the generation cached when asked (admin refresh): a fetch that
    /// finished meanwhile satisfies it.
    NewerThan(u64),
}

/// One configured credential, as the current configuration defines it.
struct CredentialState {
    spec: Arc<CredentialSpec>,
    /// The token endpoint's `host[:port]`, for errors.
    endpoint: Arc<str>,
    /// Shared by every credential with the same identity, and kept across reloads while the
    /// identity stays.
    fetch: Arc<FetchState>,
}

impl CredentialState {
    fn new(spec: Arc<CredentialSpec>, fetch: Arc<FetchState>) -> Self {
        let endpoint = spec.request.url[url::Position::BeforeHost..url::Position::AfterPort].into();
        Self {
            spec,
            endpoint,
            fetch,
        }
    }
}

/// What the cache knows of fetching one identity's tokens.
#[derive(Default)]
struct FetchState {
    refreshing: AtomicBool,
    /// When a request last asked for this credential's token (Unix ms on our clock; 0 = never).
    last_used_ms: AtomicU64,
    status: Mutex<FetchStatus>,
    /// Consecutive upstream refusals of freshly fetched tokens (0 in the normal case, so the
    /// request path checks it without a lock).
    refused_streak: std::sync::atomic::AtomicU32,
    refusals: Mutex<RefusalState>,
}

/// Upstream refusals (401s) of this credential's tokens, so that an upstream that refuses
/// every token does not turn every request into a token fetch.
#[derive(Default)]
struct RefusalState {
    /// The newest token generation purged after a refusal.
    purged_generation: u64,
    /// While set and in the future, refusals are passed back without purging.
    suppressed_until: Option<SystemTime>,
}

impl FetchState {
    /// Used within the last quarter of its token's lifetime (at least the last minute): in
    /// steady use, and worth keeping warm.
    fn recently_used(&self, now: SystemTime, lifetime: Duration) -> bool {
        let last = self.last_used_ms.load(Ordering::Relaxed);
        last != 0 && from_unix_millis(last) + (lifetime / 4).max(RECENT_USE_MIN) >= now
    }
}

/// The refresher keeps a credential warm if it was used within this long at least.
const RECENT_USE_MIN: Duration = Duration::from_secs(60);
/// How often the refresher looks for tokens coming due (real time).
const REFRESHER_TICK: Duration = Duration::from_millis(200);
/// First gap between retries of one fetch; doubles per retry.
const FIRST_RETRY_GAP: Duration = Duration::from_millis(100);
const MAX_ATTEMPTS: u32 = 4;

#[derive(Default)]
struct FetchStatus {
    /// Requests sent to the token endpoint.
    attempts: u64,
    /// Attempts that gave a usable token.
    successes: u64,
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
    /// Successful fetches.
    pub fetches: u64,
    /// Requests sent to the token endpoint, successful or not.
    pub attempts: u64,
    pub last_error: Option<String>,
}

pub struct TokenCache {
    /// Tokens by credential identity.
    store: Cache<Arc<str>, Arc<CachedToken>>,
    registry: ArcSwap<Registry>,
    fetch_permits: tokio::sync::Semaphore,
    settings: ArcSwap<CacheSettings>,
    clock: SharedClock,
    metrics: Metrics,
}

/// The configured credentials and the client that fetches their tokens; replaced whole by a
/// reload.
struct Registry {
    by_name: BTreeMap<Arc<str>, Arc<CredentialState>>,
    by_identity: HashMap<Arc<str>, Arc<CredentialState>>,
    fetcher: Arc<TokenFetcher>,
}

impl Registry {
    /// The registry for `credentials`, keeping the fetch state of every identity that `old`
    /// knew.
    fn new(credentials: &[Arc<CredentialSpec>], fetcher: Arc<TokenFetcher>, old: Option<&Registry>) -> Self {
        let mut by_name = BTreeMap::new();
        let mut by_identity: HashMap<Arc<str>, Arc<CredentialState>> = HashMap::new();
        for spec in credentials {
            let fetch = by_identity
                .get(&spec.identity)
                .or_else(|| old.and_then(|old| old.by_identity.get(&spec.identity)))
                .map(|state| state.fetch.clone())
                .unwrap_or_default();
            let state = Arc::new(CredentialState::new(spec.clone(), fetch));
            by_identity.insert(spec.identity.clone(), state.clone());
            by_name.insert(spec.name.clone(), state);
        }
        Self {
            by_name,
            by_identity,
            fetcher,
        }
    }
}

/// What a reload changed in the cache.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Credentials whose cached token carries over.
    pub kept: Vec<Arc<str>>,
    /// Credentials that are new or whose identity changed: a new token on next use.
    pub changed: Vec<Arc<str>>,
    /// Credentials no longer configured.
    pub removed: Vec<Arc<str>>,
}

impl TokenCache {
    pub fn new(
        credentials: &[Arc<CredentialSpec>],
        fetcher: TokenFetcher,
        settings: CacheSettings,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: Cache::builder().build(),
            registry: ArcSwap::from_pointee(Registry::new(credentials, Arc::new(fetcher), None)),
            fetch_permits: tokio::sync::Semaphore::new(settings.max_concurrent_fetches.max(1)),
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
        fetcher: TokenFetcher,
        settings: CacheSettings,
    ) -> Applied {
        let new = Registry::new(credentials, Arc::new(fetcher), Some(&self.registry.load()));
        let old = self.registry.swap(Arc::new(new));
        self.settings.store(Arc::new(settings));
        let new = self.registry.load();
        let mut applied = Applied::default();
        for (name, state) in &new.by_name {
            match old.by_name.get(name) {
                Some(before) if before.spec.identity == state.spec.identity => {
                    applied.kept.push(name.clone())
                }
                _ => applied.changed.push(name.clone()),
            }
        }
        for (name, state) in &old.by_name {
            if !new.by_name.contains_key(name) {
                applied.removed.push(name.clone());
            }
            if !new.by_identity.contains_key(&state.spec.identity) {
                self.drop_token(state, &old.fetcher).await;
            }
        }
        applied
    }

    /// The client that fetches tokens now (a reload keeps its unchanged provider clients).
    pub fn fetcher(&self) -> Arc<TokenFetcher> {
        self.registry.load().fetcher.clone()
    }

    /// Forgets `state`'s token, revoking it first where its provider asks for that.
    async fn drop_token(&self, state: &CredentialState, fetcher: &TokenFetcher) {
        let identity = &state.spec.identity;
        if let Some(cached) = self.store.get(identity).await {
            if state.spec.revoke_on_shutdown {
                revoke(fetcher, state, &cached).await;
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
            return self.fetch_with_retries(&detached).await;
        };
        let credential = &*spec.name;
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
        self.fetch_exclusive(&state, Want::Usable, true).await
    }

    /// A token for the credential named `credential` in the running configuration (prefetch).
    pub async fn token_named(self: &Arc<Self>, credential: &str) -> Result<Arc<CachedToken>, TokenError> {
        let spec = self.state(credential)?.spec.clone();
        self.token(&spec).await
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
            .entry(spec.identity.clone())
            .and_compute_with(|current| async move {
                match current {
                    Some(entry) if entry.value().token == used.token => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
        true
    }

    fn may_purge(&self, state: &CredentialState, used: &CachedToken) -> bool {
        let now = self.clock.now();
        let mut refusals = lock(&state.fetch.refusals);
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

    /// Whether `credential` has had a usable token since start-up (it may be failing now).
    pub fn ever_fetched(&self, credential: &str) -> bool {
        self.registry
            .load()
            .by_name
            .get(credential)
            .is_some_and(|state| lock(&state.fetch.status).successes > 0)
    }

    /// Whether `credential` holds a token that may be sent now.
    pub async fn has_usable(&self, credential: &str) -> bool {
        let Some(state) = self.registry.load().by_name.get(credential).cloned() else {
            return false;
        };
        match self.store.get(&state.spec.identity).await {
            Some(cached) => cached.schedule.freshness(self.clock.now()) != Freshness::Unusable,
            None => false,
        }
    }

    /// Names of the credentials to fetch at start-up and keep warm, sorted.
    pub fn prefetch_credentials(&self) -> Vec<Arc<str>> {
        self.registry
            .load()
            .by_name
            .values()
            .filter(|state| state.spec.prefetch)
            .map(|state| state.spec.name.clone())
            .collect()
    }

    /// `/tokens`: one snapshot per credential, sorted by name.
    pub async fn snapshots(&self) -> Vec<TokenSnapshot> {
        let registry = self.registry.load_full();
        let mut snapshots = Vec::with_capacity(registry.by_name.len());
        for state in registry.by_name.values() {
            snapshots.push(self.snapshot_of(state).await);
        }
        snapshots
    }

    pub async fn snapshot(&self, credential: &str) -> Option<TokenSnapshot> {
        let state = self.registry.load().by_name.get(credential).cloned()?;
        Some(self.snapshot_of(&state).await)
    }

    async fn snapshot_of(&self, state: &CredentialState) -> TokenSnapshot {
        let cached = self.store.get(&state.spec.identity).await;
        let now = self.clock.now();
        let status = lock(&state.fetch.status);
        let failing = status.consecutive_failures > 0;
        let freshness = cached.as_ref().map(|c| c.schedule.freshness(now));
        let label = match freshness {
            None if failing => "failing",
            None => "empty",
            Some(Freshness::Unusable) if failing => "failing",
            Some(Freshness::Unusable) => "expired",
            Some(_) if state.fetch.refreshing.load(Ordering::Relaxed) => "refreshing",
            Some(_) if failing => "failing",
            Some(_) => "fresh",
        };
        TokenSnapshot {
            credential: state.spec.name.to_string(),
            provider: state.spec.provider.name.to_string(),
            state: label,
            expires_in_ms: cached
                .as_ref()
                .map(|c| signed_millis_until(c.schedule.expires_at, now)),
            fingerprint: cached.as_ref().map(|c| c.token.fingerprint().to_owned()),
            fetches: status.successes,
            attempts: status.attempts,
            last_error: status
                .last_error
                .as_ref()
                .map(|error| format!("{}: {error}", state.endpoint)),
        }
    }

    /// Refreshes recently used credentials whose tokens come due, until `shutdown` turns true.
    pub async fn run_refresher(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(REFRESHER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.refresh_due().await,
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Refreshes what comes due: recently used credentials, and `prefetch` credentials
    /// always — also when they hold no token yet (a failed start-up fetch is retried on the
    /// back-off schedule).
    async fn refresh_due(self: &Arc<Self>) {
        let now = self.clock.now();
        let registry = self.registry.load_full();
        for state in registry.by_identity.values() {
            let Some(cached) = self.store.get(&state.spec.identity).await else {
                if state.spec.prefetch {
                    self.refresh_in_background(state);
                }
                continue;
            };
            let lifetime = cached
                .schedule
                .expires_at
                .duration_since(cached.obtained_at)
                .unwrap_or_default();
            let keep_warm = state.spec.prefetch || state.fetch.recently_used(now, lifetime);
            if cached.schedule.freshness(now) != Freshness::Fresh && keep_warm {
                self.refresh_in_background(state);
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
                if revoke(&registry.fetcher, state, &cached).await {
                    self.store.invalidate(&state.spec.identity).await;
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

    fn refresh_in_background(self: &Arc<Self>, state: &Arc<CredentialState>) {
        let backing_off = lock(&state.fetch.status)
            .retry_not_before
            .is_some_and(|until| until > self.clock.now());
        if backing_off || state.fetch.refreshing.swap(true, Ordering::AcqRel) {
            return; // one refresh at a time, none while backing off
        }
        let cache = self.clone();
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(err) = cache.fetch_exclusive(&state, Want::Fresh, true).await {
                tracing::warn!(credential = %state.spec.name, error = %err, "background token refresh failed; still using the cached token");
            }
            state.fetch.refreshing.store(false, Ordering::Release);
        });
    }

    /// Runs at most one fetch per credential at a time: callers queue on moka's per-key lock,
    /// and each re-checks the entry (and the back-off) before fetching.
    async fn fetch_exclusive(
        &self,
        state: &Arc<CredentialState>,
        want: Want,
        respect_backoff: bool,
    ) -> Result<Arc<CachedToken>, TokenError> {
        let outcome = self
            .store
            .entry(state.spec.identity.clone())
            .and_try_compute_with(|current| async move {
                let now = self.clock.now();
                if let Some(entry) = &current {
                    if satisfies(entry.value(), want, now) {
                        return Ok(Op::Nop);
                    }
                }
                if respect_backoff {
                    self.check_backoff(state, now)?;
                }
                self.fetch_with_retries(state).await.map(Op::Put)
            })
            .await?;
        match outcome {
            CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) | CompResult::Unchanged(entry) => {
                Ok(entry.into_value())
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => Err(self.unavailable(
                state,
                FetchError::malformed("no token after fetch"),
                self.settings.load().failure_backoff,
            )),
        }
    }

    fn check_backoff(&self, state: &CredentialState, now: SystemTime) -> Result<(), TokenError> {
        let status = lock(&state.fetch.status);
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

    /// Fetches, retrying retryable failures with growing gaps while `retry_budget` allows. Once
    /// a credential is failing, each later fetch is a single probe: a failing endpoint sees one
    /// request per back-off period, not a new burst each time.
    async fn fetch_with_retries(&self, state: &CredentialState) -> Result<Arc<CachedToken>, TokenError> {
        let deadline = tokio::time::Instant::now() + self.settings.load().retry_budget;
        let credential = &state.spec.name;
        let failing = lock(&state.fetch.status).consecutive_failures > 0;
        let max_attempts = if failing { 1 } else { MAX_ATTEMPTS };
        let mut attempt = 1;
        loop {
            let result = {
                let _permit = self.fetch_permits.acquire().await;
                lock(&state.fetch.status).attempts += 1;
                let fetcher = self.registry.load().fetcher.clone();
                fetcher.fetch(&state.spec).await
            };
            let error = match result.and_then(|issued| self.usable_on_arrival(issued)) {
                Ok(token) => return Ok(self.record_success(state, token)),
                Err(error) => error,
            };
            self.metrics.token_fetch(credential, error.outcome());
            lock(&state.fetch.status).last_error = Some(error.clone());
            let gap = retry_gap(&error, attempt);
            let retry =
                gap.filter(|gap| attempt < max_attempts && tokio::time::Instant::now() + *gap < deadline);
            let Some(gap) = retry else {
                let wait = self.record_failure(state, &error, self.clock.now());
                tracing::warn!(credential = %credential, error = %error, attempts = attempt, retry_in_ms = wait.as_millis() as u64, "token fetch failed");
                return Err(self.unavailable(state, error, wait));
            };
            tracing::info!(credential = %credential, error = %error, attempt, retry_in_ms = gap.as_millis() as u64, "token fetch failed; retrying");
            tokio::time::sleep(gap).await;
            attempt += 1;
        }
    }

    /// A fetched token with its schedule, if it may still be sent now: a slow endpoint can
    /// deliver a token already in its last moments, and that is a failed fetch, not a token.
    fn usable_on_arrival(&self, issued: super::dialect::IssuedToken) -> Result<CachedToken, FetchError> {
        let obtained_at = issued
            .expires_at
            .checked_sub(issued.lifetime)
            .unwrap_or_else(|| self.clock.now());
        let jitter = rand::thread_rng().gen::<f64>();
        let schedule = self
            .settings
            .load()
            .refresh
            .schedule(obtained_at, issued.expires_at, jitter);
        if schedule.freshness(self.clock.now()) == Freshness::Unusable {
            return Err(FetchError::malformed(
                "token arrived too close to its expiry to be sent",
            ));
        }
        Ok(CachedToken {
            token: issued.token,
            schedule,
            obtained_at,
            token_id: issued.token_id,
            generation: 0,
        })
    }

    fn record_success(&self, state: &CredentialState, mut token: CachedToken) -> Arc<CachedToken> {
        let credential = &state.spec.name;
        self.metrics.token_fetch(credential, "ok");
        let mut status = lock(&state.fetch.status);
        status.successes += 1;
        status.consecutive_failures = 0;
        status.retry_not_before = None;
        status.last_error = None;
        token.generation = status.successes;
        drop(status);
        let lifetime = token
            .schedule
            .expires_at
            .duration_since(token.obtained_at)
            .unwrap_or_default();
        tracing::info!(
            credential = %credential,
            token = %token.token,
            lifetime_s = lifetime.as_secs_f64(),
            "fetched token"
        );
        Arc::new(token)
    }

    /// Records a failure and returns how long the credential now backs off.
    fn record_failure(&self, state: &CredentialState, error: &FetchError, now: SystemTime) -> Duration {
        let mut status = lock(&state.fetch.status);
        status.consecutive_failures = status.consecutive_failures.saturating_add(1);
        let wait = backoff(&self.settings.load(), status.consecutive_failures, error);
        status.retry_not_before = Some(now + wait);
        status.last_error = Some(error.clone());
        wait
    }

    fn unavailable(&self, state: &CredentialState, cause: FetchError, retry_after: Duration) -> TokenError {
        TokenError::Unavailable {
            credential: state.spec.name.clone(),
            endpoint: state.endpoint.clone(),
            cause,
            retry_after,
        }
    }
}

/// Revokes a cached token (Nuapay long-lived ones, by the id the provider gave it); whether it
/// was revoked.
async fn revoke(fetcher: &TokenFetcher, state: &CredentialState, cached: &CachedToken) -> bool {
    let Some(token_id) = &cached.token_id else {
        return false;
    };
    match fetcher.revoke(&state.spec, token_id).await {
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

/// Back-off after `failures` consecutive failures: doubling from `failure_backoff` up to
/// `max_failure_backoff`; rejected credentials wait the maximum (retrying soon cannot help);
/// a `Retry-After` longer than that is honoured.
pub fn backoff(settings: &CacheSettings, failures: u32, error: &FetchError) -> Duration {
    let base = match error {
        FetchError::Rejected { .. } => settings.max_failure_backoff,
        _ => doubling(settings, failures),
    };
    base.max(error.retry_after().unwrap_or_default())
}

/// `failure_backoff` doubled per repetition after the first, up to `max_failure_backoff`.
fn doubling(settings: &CacheSettings, repetitions: u32) -> Duration {
    let exponent = repetitions.saturating_sub(1).min(20);
    settings
        .failure_backoff
        .saturating_mul(1u32 << exponent)
        .min(settings.max_failure_backoff)
}

/// The gap before retrying a failed fetch, or `None` when retrying soon cannot help.
pub fn retry_gap(error: &FetchError, attempt: u32) -> Option<Duration> {
    let doubling = FIRST_RETRY_GAP.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let jittered = doubling.mul_f64(rand::thread_rng().gen_range(0.8..1.2));
    match error {
        FetchError::Rejected { .. } => None,
        FetchError::Status { status, .. } if *status < 500 => None,
        FetchError::RateLimited { retry_after } | FetchError::Status { retry_after, .. } => {
            Some(retry_after.unwrap_or(jittered).max(jittered))
        }
        FetchError::Malformed { .. } | FetchError::Timeout | FetchError::Unreachable { .. } => Some(jittered),
    }
}

fn satisfies(cached: &CachedToken, want: Want, now: SystemTime) -> bool {
    match want {
        Want::Usable => cached.schedule.freshness(now) != Freshness::Unusable,
        Want::Fresh => cached.schedule.freshness(now) == Freshness::Fresh,
        Want::NewerThan(generation) => cached.generation > generation,
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
        let err = FetchError::Status {
            status: 503,
            retry_after: None,
        };
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
    fn retry_gaps_grow_and_skip_hopeless_errors() {
        let err = FetchError::Status {
            status: 503,
            retry_after: None,
        };
        let gaps: Vec<Duration> = (1..=3).map(|n| retry_gap(&err, n).unwrap()).collect();
        assert!(
            gaps[0] >= Duration::from_millis(80) && gaps[0] <= Duration::from_millis(120),
            "{gaps:?}"
        );
        assert!(
            gaps[1] >= Duration::from_millis(160) && gaps[2] >= Duration::from_millis(320),
            "{gaps:?}"
        );
        assert_eq!(
            retry_gap(
                &FetchError::Rejected {
                    status: 401,
                    reason: None
                },
                1
            ),
            None
        );
        assert_eq!(
            retry_gap(
                &FetchError::Status {
                    status: 404,
                    retry_after: None
                },
                1
            ),
            None
        );
        let limited = FetchError::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(retry_gap(&limited, 1), Some(Duration::from_secs(3)));
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
