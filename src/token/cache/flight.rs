//! One fetch in flight per identity, on a task of its own: callers join the identity's
//! *flight* (or start one, after re-checking the cache and the back-off), and the flight
//! finishes, storing its token, whoever stops waiting for it. Also the retry burst, the "may it
//! be sent now?" check on arrival, and success and failure bookkeeping.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use foldhash::HashMap;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use opentelemetry::trace::SpanContext;
use rand::Rng;
use tracing::Instrument;

use super::backoff::{backoff, retry_gap, Backoff, MAX_ATTEMPTS};
use super::registry::{CredentialState, FetchStatus};
use super::{lock, satisfies, CachedToken, TokenCache, TokenError, Want};
use crate::telemetry;
use crate::token::budget::{self, Share};
use crate::token::dialect::{Identity, IssuedToken};
use crate::token::error::FetchError;
use crate::token::lifetime::Freshness;
use crate::token::source::FetchContext;
use crate::token::spec::{CacheSettings, CredentialSpec};

/// A fetch in flight, as its waiters hold it: each awaits a clone, and the fetch runs on its
/// own task whether or not anyone still does.
pub(super) type Flight = Shared<BoxFuture<'static, Result<Arc<CachedToken>, TokenError>>>;

/// A flight and its trace span's context (while telemetry is on), for waiters to link to.
#[derive(Clone)]
pub(super) struct InFlight {
    flight: Flight,
    span: Option<SpanContext>,
}

/// A caller's place on a flight: one already in the air, or one it started.
enum Boarded {
    Joined(InFlight),
    Started(InFlight),
}

/// The flights in the air, by identity.
#[derive(Default)]
pub(super) struct Flights(Mutex<HashMap<Identity, InFlight>>);

impl TokenCache {
    /// A token that satisfies `want`: the cached one, else the outcome of the credential's
    /// flight, joined or started (after the back-off is checked, unless `!respect_backoff`).
    pub(super) async fn fetch_exclusive(
        self: &Arc<Self>,
        state: &Arc<CredentialState>,
        want: Want,
        respect_backoff: bool,
    ) -> Result<Arc<CachedToken>, TokenError> {
        loop {
            let seen = lock(&state.fetch.status).successes;
            let cached = self.store.get(&state.spec.identity).await;
            let now = self.clock.now();
            if let Some(cached) = &cached {
                if satisfies(cached, want, now) {
                    return Ok(cached.clone());
                }
            }
            // Requests wait on this flight, whoever starts it, when there is no token to send.
            let waited_for = matches!(want, Want::Usable | Want::IssuedSince(_))
                || !cached.is_some_and(|c| satisfies(&c, Want::Usable, now));
            let context = FetchContext {
                forced: !respect_backoff,
                waiting: waited_for,
                share: Share::Whole,
                issued_since: want.issued_since(),
            };
            // `None`: a fetch finished since we looked, and its token may be what we need.
            let Some(boarded) = self.join_or_start(state, seen, want, context)? else {
                continue;
            };
            if let Some(outcome) = self.ride(boarded, want).await {
                return outcome;
            }
        }
    }

    /// The outcome of the flight boarded — or `None` when it was one already in the air and
    /// brought a token issued before the refusal a replay answers (it was asked for less): the
    /// replay then takes a flight of its own. One it started itself is taken as it lands,
    /// however the provider dates its token.
    async fn ride(&self, boarded: Boarded, want: Want) -> Option<Result<Arc<CachedToken>, TokenError>> {
        let (in_flight, joined) = match boarded {
            Boarded::Joined(in_flight) => (in_flight, true),
            Boarded::Started(in_flight) => (in_flight, false),
        };
        if let Some(span) = &in_flight.span {
            telemetry::link_current(span);
        }
        let outcome = in_flight.flight.await;
        let too_old = |token: &Arc<CachedToken>| !satisfies(token, want, self.clock.now());
        if joined && matches!(want, Want::IssuedSince(_)) && outcome.as_ref().is_ok_and(too_old) {
            return None;
        }
        Some(outcome)
    }

    /// The credential's flight: the one in the air, or a new one — unless a fetch succeeded
    /// since `seen` successes (`None`), or the credential backs off.
    fn join_or_start(
        self: &Arc<Self>,
        state: &Arc<CredentialState>,
        seen: u64,
        want: Want,
        context: FetchContext,
    ) -> Result<Option<Boarded>, TokenError> {
        let status = lock(&state.fetch.status);
        let mut flights = lock(&self.flights.0);
        if let Some(joined) = flights.get(&state.spec.identity) {
            return Ok(Some(Boarded::Joined(joined.clone())));
        }
        if status.successes != seen {
            return Ok(None);
        }
        if !context.forced {
            self.check_backoff(state, &status, want, self.clock.now())?;
        }
        let flight = self.start_flight(state, context);
        flights.insert(state.spec.identity, flight.clone());
        Ok(Some(Boarded::Started(flight)))
    }

    /// Spawns the fetch of `state`'s token: it runs to its end under its own deadline, stores
    /// the token, and then leaves the credential's flight slot free.
    fn start_flight(self: &Arc<Self>, state: &Arc<CredentialState>, context: FetchContext) -> InFlight {
        let (cache, flying) = (self.clone(), state.clone());
        let deadline = flight_deadline(&state.spec, &self.settings.load());
        let span = fetch_span(state);
        let span_context = telemetry::span_context(&span);
        let fetching = async move {
            let _landed = Landing(cache.clone(), flying.spec.identity);
            let outcome =
                match tokio::time::timeout(deadline, cache.fetch_with_retries(&flying, context)).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        telemetry::record_fetch(&tracing::Span::current(), 1, "timeout");
                        Err(cache.failed(&flying, FetchError::Timeout, 1))
                    }
                };
            if let Ok(token) = &outcome {
                cache.store.insert(flying.spec.identity, token.clone()).await;
            }
            outcome
        };
        let task = tokio::spawn(fetching.instrument(span));
        let (cache, state) = (self.clone(), state.clone());
        let flight = async move {
            match task.await {
                Ok(outcome) => outcome,
                // Only a panic ends the task early (it is never aborted).
                Err(_) => Err(cache.unavailable(&state, FetchError::Aborted, Duration::from_secs(1))),
            }
        }
        .boxed()
        .shared();
        InFlight {
            flight,
            span: span_context,
        }
    }

    /// The credential's back-off, as it applies to a caller wanting `want`: a request with no
    /// usable token may probe sooner than a background fetch (see [`super::Backoff`]).
    fn check_backoff(
        &self,
        state: &CredentialState,
        status: &FetchStatus,
        want: Want,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let until = match want {
            Want::Usable | Want::IssuedSince(_) => status.probe_not_before,
            Want::Fresh | Want::NewerThan(_) => status.retry_not_before,
        };
        match (until, &status.last_error) {
            (Some(until), Some(error)) if until > now => {
                let wait = until.duration_since(now).unwrap_or_default();
                Err(self.unavailable(state, FetchError::clone(error), wait))
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
        context: FetchContext,
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
                source.fetch(&state.spec, context).await
            };
            let error = match result.and_then(|issued| self.usable_on_arrival(issued)) {
                Ok(token) => {
                    telemetry::record_fetch(&tracing::Span::current(), attempt, "ok");
                    return Ok(self.record_success(state, token));
                }
                Err(error) => error,
            };
            self.metrics.token_fetch(credential, error.outcome());
            lock(&state.fetch.status).last_error = Some(Box::new(error.clone()));
            let gap = retry_gap(&error, attempt);
            let retry =
                gap.filter(|gap| attempt < max_attempts && tokio::time::Instant::now() + *gap < deadline);
            let Some(gap) = retry else {
                telemetry::record_fetch(&tracing::Span::current(), attempt, error.outcome());
                return Err(self.failed(state, error, attempt));
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
        status.probe_not_before = None;
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

    /// A fetch that gave up after `attempts`: recorded, logged, and the error its waiters get.
    fn failed(&self, state: &CredentialState, error: FetchError, attempts: u32) -> TokenError {
        let wait = self.record_failure(state, &error, self.clock.now());
        tracing::warn!(credential = %state.spec.name, error = %error, attempts, retry_in_ms = wait.as_millis() as u64, "token fetch failed");
        self.unavailable(state, error, wait)
    }

    /// Records a failure and returns how long the credential now backs off.
    fn record_failure(&self, state: &CredentialState, error: &FetchError, now: SystemTime) -> Duration {
        let mut status = lock(&state.fetch.status);
        status.consecutive_failures = status.consecutive_failures.saturating_add(1);
        let Backoff { wait, probe } = backoff(&self.settings.load(), status.consecutive_failures, error);
        status.retry_not_before = Some(now + wait);
        status.probe_not_before = Some(now + probe);
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

/// The trace span of a fetch of `state`'s token: none while telemetry is off.
fn fetch_span(state: &CredentialState) -> tracing::Span {
    if !telemetry::on() {
        return tracing::Span::none();
    }
    let spec = &state.spec;
    telemetry::fetch_span(
        &spec.provider.name,
        &spec.name,
        spec.provider.kind.as_str(),
        state.endpoint(),
    )
}

/// How long a flight may take in all: a safety net behind the provider's `timeout` on each
/// attempt and `retry_budget` on the retries (a fleet's lock wait comes on top of one attempt),
/// and the wait for a slot of a fetch budget.
fn flight_deadline(spec: &CredentialSpec, settings: &CacheSettings) -> Duration {
    let budget_wait = if spec.provider.budget.is_some() {
        budget::MAX_WAIT
    } else {
        Duration::ZERO
    };
    settings.retry_budget + spec.provider.timeout.saturating_mul(MAX_ATTEMPTS + 1) + budget_wait
}

/// Frees the identity's flight slot when its flight's task ends, however it ends.
struct Landing(Arc<TokenCache>, Identity);

impl Drop for Landing {
    fn drop(&mut self) {
        lock(&self.0.flights.0).remove(&self.1);
    }
}
