//! One fetch in flight per identity: callers queue on moka's per-key lock and each re-checks
//! the entry and the back-off first; the retry burst; the "may it be sent now?" check on
//! arrival; success and failure bookkeeping.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moka::ops::compute::{CompResult, Op};
use rand::Rng;

use super::backoff::{backoff, retry_gap, MAX_ATTEMPTS};
use super::registry::CredentialState;
use super::{lock, satisfies, CachedToken, TokenCache, TokenError, Want};
use crate::token::dialect::IssuedToken;
use crate::token::error::FetchError;
use crate::token::lifetime::Freshness;

impl TokenCache {
    /// Runs at most one fetch per credential at a time: callers queue on moka's per-key lock,
    /// and each re-checks the entry (and the back-off) before fetching.
    pub(super) async fn fetch_exclusive(
        &self,
        state: &Arc<CredentialState>,
        want: Want,
        respect_backoff: bool,
    ) -> Result<Arc<CachedToken>, TokenError> {
        let outcome = self
            .store
            .entry(state.spec.identity)
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
                let error = FetchError::clone(error);
                drop(status);
                Err(self.unavailable(state, error, wait))
            }
            _ => Ok(()),
        }
    }

    /// Fetches, retrying retryable failures with growing gaps while `retry_budget` allows. Once
    /// a credential is failing, each later fetch is a single probe: a failing endpoint sees one
    /// request per back-off period, not a new burst each time.
    pub(super) async fn fetch_with_retries(
        &self,
        state: &CredentialState,
    ) -> Result<Arc<CachedToken>, TokenError> {
        let deadline = tokio::time::Instant::now() + self.settings.load().retry_budget;
        let credential = &state.spec.name;
        let failing = lock(&state.fetch.status).consecutive_failures > 0;
        let max_attempts = if failing { 1 } else { MAX_ATTEMPTS };
        let mut attempt = 1;
        loop {
            let result = {
                let _permit = self.fetch_permits.acquire().await;
                lock(&state.fetch.status).attempts += 1;
                let source = self.registry.load().source.clone();
                source.fetch(&state.spec).await
            };
            let error = match result.and_then(|issued| self.usable_on_arrival(issued)) {
                Ok(token) => return Ok(self.record_success(state, token)),
                Err(error) => error,
            };
            self.metrics.token_fetch(credential, error.outcome());
            lock(&state.fetch.status).last_error = Some(Box::new(error.clone()));
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
    fn usable_on_arrival(&self, issued: IssuedToken) -> Result<CachedToken, FetchError> {
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
            obtained_at_ms: crate::clock::unix_millis(obtained_at),
            token_id: issued.token_id.map(String::into_boxed_str),
            dpop: issued.dpop,
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
        self.look_again(state, Some(token.schedule.refresh_at));
        let lifetime = token.lifetime();
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
        status.last_error = Some(Box::new(error.clone()));
        self.look_again(state, Some(now + wait));
        wait
    }

    pub(super) fn unavailable(
        &self,
        state: &CredentialState,
        cause: FetchError,
        retry_after: Duration,
    ) -> TokenError {
        TokenError::Unavailable {
            credential: state.spec.name.clone(),
            endpoint: state.endpoint().into(),
            cause,
            retry_after,
        }
    }
}
