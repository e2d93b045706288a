//! The fleet's shared tier (`[cache.shared]`): a [`TokenSource`] that wraps the token endpoint
//! with a Redis that the fleet's sidecars share, so that the fleet behaves like one sidecar.
//!
//! For a token the local cache does not hold (or holds due for refresh), in order:
//! 1. a fresh token another sidecar stored is used as it is;
//! 2. while the fleet backs off a failing credential, that back-off is the answer (a request
//!    with no token may probe after `max_probe_interval`, a forced refresh ignores it);
//! 3. otherwise one sidecar takes the credential's lock (`SET NX PX`, a holder value only a
//!    fleet member can make, released by compare-and-delete) and asks the endpoint, storing the
//!    token (Redis TTL = its remaining life) or the fleet's back-off; the others poll for its
//!    outcome within the lock's TTL, and take the lock themselves if the holder vanished.
//!
//! Nothing read back is trusted as it is: every value is sealed ([`sealed`]) and bound to its
//! key, a lock that is not a fleet member's or has no TTL is taken over, a back-off is never
//! honoured past the bound sealed inside it, no text from Redis reaches an answer, and a key of
//! the wrong type is that credential's miss ([`link::Failure`]), not Redis being down.
//!
//! Keys are `key_prefix` + `{fleet identity}` + a suffix: the identity is an HMAC under the
//! fleet's key of everything the token depends on, secrets included (a rotated or wrong secret
//! is another credential), and the braces are a hash tag, so that a credential's keys share
//! one Redis Cluster slot. A token that asks to be revoked is revoked only by the last sidecar
//! holding it: each sidecar registers as a holder (and keeps renewing) while it uses one.
//! Any Redis failure makes the sidecar ask the endpoint itself ([`link`]): no request fails
//! because Redis did.

pub mod link;
pub mod sealed;
pub mod settings;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use redis::AsyncCommands;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::Instrument;

use super::budget::{self, Share};
use super::cache::{backoff, Backoff};
use super::dialect::IssuedToken;
use super::error::{is_safe_reason, FetchError, FleetFailure};
use super::lifetime::Freshness;
use super::source::{FetchContext, RefusedToken, Revocation, SourceFuture, TokenSource};
use super::spec::{CacheSettings, CredentialSpec};
use crate::clock::{from_unix_millis, unix_millis, SharedClock};
use crate::metrics::Metrics;
use crate::secret::AccessToken;
use crate::sync::lock;
use crate::telemetry;
use link::{Connection, Failure, Link};
use sealed::{Sealer, SharedToken};
use settings::SharedCacheSettings;

/// How often a sidecar waiting for another's fetch looks for its outcome.
const POLL: Duration = Duration::from_millis(50);
/// A holder of a token that asks to be revoked renews itself this often…
const HOLDER_RENEWAL: Duration = Duration::from_secs(10);
/// …and counts as gone this long after its last renewal (it crashed, or lost Redis).
const HOLDER_TTL: Duration = Duration::from_secs(30);

/// Releases a lock only if this sidecar still holds it.
const RELEASE: &str =
    r#"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"#;

/// Takes over a lock that is no fleet member's (ARGV[1] is the value seen, "" for a key of
/// another type): only if it still holds what was seen.
const TAKE_OVER: &str = r#"local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' or (t ~= 'string' and ARGV[1] == '') or (t == 'string' and redis.call('GET', KEYS[1]) == ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0"#;

/// Deletes the stored token only if it is the one named by one of the tags.
const PURGE: &str = r#"local v = redis.call('GET', KEYS[1])
if not v then return 0 end
for i = 1, #ARGV do
  if string.sub(v, 1, string.len(ARGV[i])) == ARGV[i] then return redis.call('DEL', KEYS[1]) end
end
return 0"#;

/// This sidecar lets go of a token (KEYS[1] its holders, KEYS[2] the token): 1 when no other
/// live holder is left (the token is then deleted, and this sidecar revokes it), else 0.
const LAST_HOLDER: &str = r#"redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0"#;

/// The fleet's fetch budget for one endpoint: a GCRA on Redis' clock (KEYS[1] holds the
/// theoretical arrival time of the next fetch, in ms). ARGV: interval, tolerance, longest wait
/// (ms). Reserves and returns the wait for the slot, or returns -(wait + 1) and reserves
/// nothing when it is further away than the longest wait. A stored time beyond anything a
/// reservation can make is no member's: it is taken as now.
const BUDGET: &str = r#"local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local longest = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now or tat > now + longest + tolerance + interval then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if wait > longest then return -(wait + 1) end
redis.call('SET', KEYS[1], tat + interval, 'PX', tat + interval - now + tolerance + 1000)
return wait"#;

/// Lengthens a lock this sidecar holds (while it waits for its fetch's slot).
const EXTEND: &str = r#"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"#;

/// The fleet's shared tier in front of `inner` (the token endpoint).
pub struct SharedTier {
    inner: Arc<dyn TokenSource>,
    fleet: Arc<Fleet>,
    cache: CacheSettings,
}

/// What a tier shares with the tiers a reload puts in front of new endpoint clients.
struct Fleet {
    /// Refusals announced by the fleet (received on the `{prefix}refused` channel).
    refused: broadcast::Sender<RefusedToken>,
    link: Link,
    sealer: Sealer,
    prefix: String,
    lock_ttl: Duration,
    /// This sidecar, as a holder of tokens that ask to be revoked.
    instance: String,
    /// The fleet identities of the tokens this sidecar holds that ask to be revoked.
    holding: Mutex<BTreeSet<String>>,
    /// How many sidecars the fleet has, as last seen (each renews its membership): while
    /// Redis is away, each keeps this share of a provider's fetch budget. Until it is first
    /// seen, `replicas_hint`.
    members: AtomicU32,
    clock: SharedClock,
    metrics: Metrics,
}

/// A failure the fleet backs off from, as stored (sealed) in Redis: its kind, never its text,
/// and the bounds it holds within, whatever the key's TTL says.
#[derive(Debug, Serialize, Deserialize)]
struct SharedBackoff {
    failure: SharedFailure,
    /// Until when (Unix ms) the fleet leaves the endpoint alone,
    until_ms: u64,
    /// and from when a request with no token may probe it.
    probe_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum SharedFailure {
    Rejected { status: u16, reason: Option<String> },
    Failed(FleetFailure),
}

impl SharedTier {
    /// The tier on the Redis `settings` name, its TLS trusting `extra_roots` besides the
    /// system's. Nothing is connected yet: the first fetch connects.
    pub fn new(
        settings: &SharedCacheSettings,
        extra_roots: &[CertificateDer<'static>],
        cache: CacheSettings,
        inner: Arc<dyn TokenSource>,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Self {
        let (refused, _) = broadcast::channel(64);
        let fleet = Arc::new(Fleet {
            refused,
            link: Link::new(
                settings.redis.clone(),
                extra_roots,
                settings.timeout,
                metrics.clone(),
            ),
            sealer: Sealer::new(settings.encryption_keys.clone()),
            prefix: settings.key_prefix.clone(),
            lock_ttl: settings.lock_ttl,
            instance: hex::encode(rand::random::<[u8; 12]>()),
            holding: Mutex::default(),
            members: AtomicU32::new(settings.replicas_hint.max(1)),
            clock,
            metrics,
        });
        tokio::spawn(renew_holdings(Arc::downgrade(&fleet)));
        tokio::spawn(listen_for_refusals(Arc::downgrade(&fleet)));
        tokio::spawn(watch_link(Arc::downgrade(&fleet)));
        Self { inner, fleet, cache }
    }

    /// The same tier (connection, keys) in front of another endpoint client (after a reload).
    pub fn with_inner(&self, inner: Arc<dyn TokenSource>, cache: CacheSettings) -> Self {
        Self {
            inner,
            fleet: self.fleet.clone(),
            cache,
        }
    }

    async fn fetch_shared(
        &self,
        credential: &CredentialSpec,
        context: FetchContext,
    ) -> Result<IssuedToken, FetchError> {
        let fleet = &self.fleet;
        let alone = FetchContext {
            share: Share::OneOf(fleet.members.load(Ordering::Relaxed)),
            ..context
        };
        let Some(mut connection) = fleet.link.connection().await else {
            fleet.metrics.shared_cache("fallback");
            return self.inner.fetch(credential, alone).await;
        };
        let ask = Ask {
            keys: fleet.keys(credential),
            credential,
            context,
        };
        let keys = &ask.keys;
        match self.through_redis(&mut connection, &ask).await {
            Ok(outcome) => {
                fleet.link.succeeded();
                if outcome.is_ok() && credential.revoke_on_shutdown {
                    fleet.hold(&mut connection, keys).await;
                }
                outcome
            }
            Err(Failure::Link(err)) => {
                fleet.link.failed(&err).await;
                fleet.metrics.shared_cache("fallback");
                self.inner.fetch(credential, alone).await
            }
            Err(Failure::Key(err)) => {
                tracing::debug!(credential = %credential.name, error = %err, "a shared-cache key of this credential is unusable; fetching without the fleet");
                fleet.metrics.shared_cache("bad_key");
                let outcome = self.inner.fetch(credential, alone).await;
                // Storing the outcome overwrites the bad key: sharing repairs itself.
                if let Err(err) = self.record(&mut connection, keys, &outcome).await {
                    tracing::debug!(error = %err, "the shared-cache key could not be repaired");
                }
                outcome
            }
        }
    }

    async fn through_redis(
        &self,
        redis: &mut Connection,
        ask: &Ask<'_>,
    ) -> Result<Result<IssuedToken, FetchError>, Failure> {
        let (fleet, keys, context) = (&self.fleet, &ask.keys, ask.context);
        if let Some(token) = self
            .fresh_token(redis, ask)
            .instrument(telemetry::shared_span("read token"))
            .await?
        {
            fleet.metrics.shared_cache("hit");
            return Ok(Ok(token));
        }
        fleet.metrics.shared_cache("miss");
        if !context.forced {
            if let Some(failure) = self
                .fleet_backoff(redis, keys, context.waiting)
                .instrument(telemetry::shared_span("read back-off"))
                .await?
            {
                return Ok(Err(failure));
            }
        }
        let holder = fleet.sealer.holder(&keys.lock);
        if fleet
            .take_lock(redis, keys, &holder)
            .instrument(telemetry::shared_span("take lock"))
            .await?
        {
            return self.fetch_holding(redis, ask, &holder).await;
        }
        fleet.metrics.shared_cache("lock_wait");
        self.wait_for_holder(redis, ask, &holder).await
    }

    /// This sidecar holds the lock: a token stored meanwhile, else the endpoint's answer,
    /// stored for the fleet.
    async fn fetch_holding(
        &self,
        redis: &mut Connection,
        ask: &Ask<'_>,
        holder: &str,
    ) -> Result<Result<IssuedToken, FetchError>, Failure> {
        let (fleet, keys) = (&self.fleet, &ask.keys);
        // Checked again under the lock: the previous holder may have stored its token between
        // our first look and our taking the lock.
        match self
            .fresh_token(redis, ask)
            .instrument(telemetry::shared_span("read token"))
            .await
        {
            Ok(None) => {}
            stored => {
                fleet.release(redis, keys, holder).await;
                if let Some(token) = stored? {
                    fleet.metrics.shared_cache("hit");
                    return Ok(Ok(token));
                }
            }
        }
        let outcome = match self
            .fleet_slot(redis, ask, holder)
            .instrument(telemetry::shared_span("fleet budget"))
            .await
        {
            Ok(share) => {
                let context = FetchContext { share, ..ask.context };
                self.inner.fetch(ask.credential, context).await
            }
            Err(throttled) => Err(throttled),
        };
        // Storing and releasing are best effort: if Redis fails now, the fleet misses this
        // outcome (and the lock expires), but the token in hand is not fetched again.
        if let Err(err) = self
            .record(redis, keys, &outcome)
            .instrument(telemetry::shared_span("store outcome"))
            .await
        {
            if let Failure::Link(err) = Failure::of(err) {
                fleet.link.failed(&err).await;
            }
        }
        fleet.release(redis, keys, holder).await;
        Ok(outcome)
    }

    /// Another sidecar holds the lock: its token, its failure, or — when it vanished or its
    /// lock turned out to be no fleet member's — the lock and a fetch of our own.
    async fn wait_for_holder(
        &self,
        redis: &mut Connection,
        ask: &Ask<'_>,
        holder: &str,
    ) -> Result<Result<IssuedToken, FetchError>, Failure> {
        let (fleet, keys) = (&self.fleet, &ask.keys);
        let deadline = tokio::time::Instant::now() + fleet.longest_lock(ask.credential);
        let waiting = telemetry::shared_span("lock wait");
        while tokio::time::Instant::now() < deadline {
            let polled = async {
                tokio::time::sleep(POLL).await;
                fleet.lock_state(redis, keys).await
            };
            // Look after the lock: a holder stores its outcome before it lets go.
            let lock = polled.instrument(waiting.clone()).await?;
            if let Some(token) = self
                .fresh_token(redis, ask)
                .instrument(telemetry::shared_span("read token"))
                .await?
            {
                fleet.metrics.shared_cache("hit");
                return Ok(Ok(token));
            }
            if let Some(failure) = self
                .fleet_backoff(redis, keys, ask.context.waiting)
                .instrument(telemetry::shared_span("read back-off"))
                .await?
            {
                return Ok(Err(failure));
            }
            if lock != LockState::Held
                && fleet
                    .take_lock(redis, keys, holder)
                    .instrument(telemetry::shared_span("take lock"))
                    .await?
            {
                drop(waiting);
                return self.fetch_holding(redis, ask, holder).await;
            }
        }
        drop(waiting);
        fleet.metrics.shared_cache("lock_timeout");
        let alone = FetchContext {
            share: Share::OneOf(fleet.members.load(Ordering::Relaxed)),
            ..ask.context
        };
        Ok(self.inner.fetch(ask.credential, alone).await)
    }

    /// The slot of this fetch in the fleet's budget for the credential's endpoint, waited for
    /// (the lock held longer meanwhile): `Granted`, or this sidecar's share when Redis cannot
    /// be asked; `Err` when the fleet has no slot soon enough.
    async fn fleet_slot(
        &self,
        redis: &mut Connection,
        ask: &Ask<'_>,
        holder: &str,
    ) -> Result<Share, FetchError> {
        let fleet = &self.fleet;
        let Some(rate) = ask.credential.provider.budget else {
            return Ok(Share::Granted);
        };
        let key = fleet.budget_key(ask.credential);
        let reserved = redis::Script::new(BUDGET)
            .key(&key)
            .arg(millis(rate.interval).max(1))
            .arg(millis(rate.tolerance()))
            .arg(millis(budget::MAX_WAIT))
            .invoke_async::<i64>(redis)
            .await;
        let wait = match reserved {
            Ok(wait) if wait >= 0 => Duration::from_millis(wait as u64),
            Ok(refused) => {
                fleet.metrics.fetch_throttled(&ask.credential.provider.name);
                let retry_after = Duration::from_millis(refused.unsigned_abs().saturating_sub(1));
                return Err(FetchError::Throttled { retry_after });
            }
            Err(err) => {
                tracing::debug!(error = %err, "the fleet's fetch budget could not be asked; keeping this sidecar's share");
                return Ok(Share::OneOf(fleet.members.load(Ordering::Relaxed)));
            }
        };
        if !wait.is_zero() {
            fleet.metrics.fetch_throttled(&ask.credential.provider.name);
            let _ = redis::Script::new(EXTEND)
                .key(&ask.keys.lock)
                .arg(holder)
                .arg(millis(wait + fleet.lock_ttl))
                .invoke_async::<i64>(redis)
                .await;
            tokio::time::sleep(wait).await;
        }
        Ok(Share::Granted)
    }

    /// The stored token, if it opens, is still fresh by the refresh policy (one due for
    /// refresh is about to be replaced: fetching it would only move the refresh here), and was
    /// issued no earlier than the ask allows (a replay after a refusal).
    async fn fresh_token(
        &self,
        redis: &mut Connection,
        ask: &Ask<'_>,
    ) -> Result<Option<IssuedToken>, Failure> {
        let token_key = &ask.keys.token;
        let Some(value) = get_string(redis, token_key).await? else {
            return Ok(None);
        };
        let stored = match self.fleet.sealer.open(token_key, &value) {
            Ok(stored) => stored,
            Err(err) => {
                self.fleet.metrics.shared_cache("forged");
                tracing::debug!(error = %err, "a stored token could not be opened; ignoring it");
                return Ok(None);
            }
        };
        let (obtained, expires) = (
            from_unix_millis(stored.obtained_at_ms),
            from_unix_millis(stored.expires_at_ms),
        );
        let schedule = self.cache.refresh.schedule(obtained, expires, 0.0);
        if schedule.freshness(self.fleet.clock.now()) != Freshness::Fresh {
            return Ok(None);
        }
        if ask.context.issued_since.is_some_and(|since| obtained < since) {
            self.fleet.metrics.shared_cache("issued_before_refusal");
            return Ok(None);
        }
        Ok(Some(IssuedToken {
            token: stored.token,
            expires_at: expires,
            lifetime: expires.duration_since(obtained).unwrap_or_default(),
            token_id: stored.token_id,
            dpop: stored.dpop,
        }))
    }

    /// The fleet's back-off for the credential, if one holds `now`: its failure, with the time
    /// left as `Retry-After`. A back-off that does not open is no back-off; one that opens holds
    /// no longer than the bounds sealed inside it; for a `waiting` request, only until its
    /// probe time.
    async fn fleet_backoff(
        &self,
        redis: &mut Connection,
        keys: &Keys,
        waiting: bool,
    ) -> Result<Option<FetchError>, Failure> {
        let Some(value) = get_string(redis, &keys.backoff).await? else {
            return Ok(None);
        };
        let backoff: SharedBackoff = match self.fleet.sealer.open_value(&keys.backoff, &value) {
            Ok(backoff) => backoff,
            Err(err) => {
                self.fleet.metrics.shared_cache("forged");
                tracing::debug!(error = %err, "the fleet's back-off could not be opened; ignoring it");
                return Ok(None);
            }
        };
        let until = from_unix_millis(if waiting {
            backoff.probe_ms
        } else {
            backoff.until_ms
        });
        let Ok(left) = until.duration_since(self.fleet.clock.now()) else {
            return Ok(None);
        };
        if left.is_zero() {
            return Ok(None);
        }
        Ok(Some(match backoff.failure {
            SharedFailure::Rejected { status, reason } => FetchError::Rejected {
                status,
                reason: reason.filter(|reason| is_safe_reason(reason)),
            },
            SharedFailure::Failed(failure) => FetchError::FleetBackoff {
                failure,
                retry_after: Some(left),
            },
        }))
    }

    /// Stores the holder's outcome for the fleet: the token, or the back-off.
    async fn record(
        &self,
        redis: &mut Connection,
        keys: &Keys,
        outcome: &Result<IssuedToken, FetchError>,
    ) -> Result<(), redis::RedisError> {
        match outcome {
            Ok(issued) => self.record_token(redis, keys, issued).await,
            Err(error) => self.record_failure(redis, keys, error).await,
        }
    }

    async fn record_token(
        &self,
        redis: &mut Connection,
        keys: &Keys,
        issued: &IssuedToken,
    ) -> Result<(), redis::RedisError> {
        let now = self.fleet.clock.now();
        let left = issued.expires_at.duration_since(now).unwrap_or_default();
        if left.is_zero() {
            return Ok(());
        }
        let obtained = issued
            .expires_at
            .checked_sub(issued.lifetime)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let shared = SharedToken {
            token: issued.token.clone(),
            expires_at_ms: unix_millis(issued.expires_at),
            obtained_at_ms: unix_millis(obtained),
            token_id: issued.token_id.clone(),
            dpop: issued.dpop,
        };
        let value = self.fleet.sealer.seal(&keys.token, &shared);
        redis::pipe()
            .cmd("SET")
            .arg(&keys.token)
            .arg(value)
            .arg("PX")
            .arg(millis(left))
            .ignore()
            .del(&keys.backoff)
            .ignore()
            .del(&keys.failures)
            .ignore()
            .query_async::<()>(redis)
            .await
    }

    async fn record_failure(
        &self,
        redis: &mut Connection,
        keys: &Keys,
        error: &FetchError,
    ) -> Result<(), redis::RedisError> {
        let fleet = &self.fleet;
        let earlier: u32 = match get_string(redis, &keys.failures).await {
            Ok(Some(value)) => fleet.sealer.open_value(&keys.failures, &value).unwrap_or(0),
            Ok(None) | Err(Failure::Key(_)) => 0,
            Err(Failure::Link(err)) => return Err(err),
        };
        let failures = earlier.saturating_add(1);
        let Backoff { wait, probe } = backoff(&self.cache, failures, error);
        let now = fleet.clock.now();
        let failure = match error {
            FetchError::Rejected { status, reason } => SharedFailure::Rejected {
                status: *status,
                reason: reason.clone(),
            },
            other => SharedFailure::Failed(FleetFailure::of(other)),
        };
        let backoff = SharedBackoff {
            failure,
            until_ms: unix_millis(now + wait),
            probe_ms: unix_millis(now + probe),
        };
        redis::pipe()
            .cmd("SET")
            .arg(&keys.failures)
            .arg(fleet.sealer.seal_value(&keys.failures, &failures))
            .arg("PX")
            .arg(millis(self.cache.max_failure_backoff * 4))
            .ignore()
            .cmd("SET")
            .arg(&keys.backoff)
            .arg(fleet.sealer.seal_value(&keys.backoff, &backoff))
            .arg("PX")
            .arg(millis(wait).max(1))
            .ignore()
            .query_async::<()>(redis)
            .await
    }

    async fn purge_shared(&self, credential: &CredentialSpec, token: &AccessToken) {
        let fleet = &self.fleet;
        let Some(mut redis) = fleet.link.connection().await else {
            return;
        };
        let keys = fleet.keys(credential);
        let script = redis::Script::new(PURGE);
        let mut purge = script.prepare_invoke();
        purge.key(&keys.token);
        for tag in fleet.sealer.tags(token) {
            purge.arg(tag);
        }
        let announce = format!("{} {}", keys.id, fleet.sealer.tag(token));
        let purged = async {
            purge.invoke_async::<i64>(&mut redis).await?;
            redis
                .publish::<_, _, i64>(format!("{}refused", fleet.prefix), announce)
                .await
        };
        match purged.await {
            Ok(_) => fleet.link.succeeded(),
            Err(err) => {
                if let Failure::Link(err) = Failure::of(err) {
                    fleet.link.failed(&err).await;
                }
            }
        }
    }

    /// Whether this sidecar is the last of the fleet to hold `credential`'s token (it then
    /// revokes it). Without Redis the fleet cannot be asked, and the token is left to it.
    async fn last_holder(&self, credential: &CredentialSpec) -> bool {
        let fleet = &self.fleet;
        let keys = fleet.keys(credential);
        lock(&fleet.holding).remove(&keys.id);
        let Some(mut redis) = fleet.link.connection().await else {
            return false;
        };
        let now = unix_millis(fleet.clock.now());
        let last = redis::Script::new(LAST_HOLDER)
            .key(&keys.holders)
            .key(&keys.token)
            .arg(&fleet.instance)
            .arg(now)
            .invoke_async::<i64>(&mut redis)
            .await;
        match last {
            Ok(last) => last == 1,
            Err(err) => {
                tracing::warn!(credential = %credential.name, error = %err, "could not ask the fleet who else holds the token; not revoking it");
                false
            }
        }
    }
}

impl Fleet {
    /// How long a lock may be held: `lock_ttl`, and the longest wait for a fetch's slot when
    /// the credential's provider has a budget.
    fn longest_lock(&self, credential: &CredentialSpec) -> Duration {
        match credential.provider.budget {
            Some(_) => self.lock_ttl + budget::MAX_WAIT,
            None => self.lock_ttl,
        }
    }

    /// The key of the fleet's budget for `credential`'s endpoint (all its credentials share it).
    fn budget_key(&self, credential: &CredentialSpec) -> String {
        let endpoint = credential.request.url.origin().ascii_serialization();
        format!("{}{{{}}}:budget", self.prefix, self.sealer.name_of(&endpoint))
    }

    /// Renews this sidecar's membership of the fleet and reads how many members it has.
    async fn count_members(&self, redis: &mut Connection) -> Result<(), redis::RedisError> {
        let members = format!("{}{{members}}", self.prefix);
        let now = unix_millis(self.clock.now());
        let (_, _, count): ((), (), u32) = redis::pipe()
            .zadd(&members, &self.instance, now + millis(HOLDER_TTL))
            .zrembyscore(&members, "-inf", now)
            .zcard(&members)
            .query_async(redis)
            .await?;
        self.members.store(count.max(1), Ordering::Relaxed);
        Ok(())
    }

    fn keys(&self, credential: &CredentialSpec) -> Keys {
        Keys::new(&self.prefix, self.sealer.fleet_identity(credential.identity))
    }

    /// Takes the credential's lock: free, or held by something that is no fleet member's lock
    /// (a value we cannot have made, no TTL, a TTL longer than any member sets, a key of
    /// another type) — which is taken over.
    async fn take_lock(&self, redis: &mut Connection, keys: &Keys, holder: &str) -> Result<bool, Failure> {
        let locked: Option<String> = redis::cmd("SET")
            .arg(&keys.lock)
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.lock_ttl))
            .query_async(redis)
            .await?;
        if locked.is_some() {
            return Ok(true);
        }
        let LockState::Forged(seen) = self.lock_state(redis, keys).await? else {
            return Ok(false);
        };
        self.metrics.shared_cache("forged");
        let taken: i64 = redis::Script::new(TAKE_OVER)
            .key(&keys.lock)
            .arg(seen)
            .arg(holder)
            .arg(millis(self.lock_ttl))
            .invoke_async(redis)
            .await?;
        Ok(taken == 1)
    }

    async fn lock_state(&self, redis: &mut Connection, keys: &Keys) -> Result<LockState, Failure> {
        let value = match get_string(redis, &keys.lock).await {
            Ok(Some(value)) => value,
            Ok(None) => {
                // Absent, or of another type (which TAKE_OVER tells apart).
                let kind: String = redis::cmd("TYPE").arg(&keys.lock).query_async(redis).await?;
                return Ok(if kind == "none" {
                    LockState::Free
                } else {
                    LockState::Forged(String::new())
                });
            }
            Err(err) => return Err(err),
        };
        let ttl: i64 = redis.pttl(&keys.lock).await?;
        let bounded = ttl > 0 && ttl as u64 <= millis(self.lock_ttl + budget::MAX_WAIT);
        Ok(if bounded && self.sealer.is_holder(&keys.lock, &value) {
            LockState::Held
        } else {
            LockState::Forged(value)
        })
    }

    /// Lets go of a credential's lock if this sidecar still holds it (best effort: else it
    /// expires).
    async fn release(&self, redis: &mut Connection, keys: &Keys, holder: &str) {
        let released = redis::Script::new(RELEASE)
            .key(&keys.lock)
            .arg(holder)
            .invoke_async::<i64>(redis)
            .await;
        if let Err(Failure::Link(err)) = released.map_err(Failure::of) {
            self.link.failed(&err).await;
        }
    }

    /// Registers this sidecar as a holder of the credential's token (renewed until it lets go).
    async fn hold(&self, redis: &mut Connection, keys: &Keys) {
        lock(&self.holding).insert(keys.id.clone());
        if let Err(err) = self.renew(redis, &keys.id).await {
            tracing::debug!(error = %err, "could not register as a holder of a shared token");
        }
    }

    async fn renew(&self, redis: &mut Connection, id: &str) -> Result<(), redis::RedisError> {
        let holders = Keys::new(&self.prefix, id.to_owned()).holders;
        let until = unix_millis(self.clock.now() + HOLDER_TTL);
        redis::pipe()
            .zadd(&holders, &self.instance, until)
            .ignore()
            .pexpire(&holders, millis(HOLDER_TTL * 2) as i64)
            .ignore()
            .query_async::<()>(redis)
            .await
    }
}

/// Renews this sidecar's membership of the fleet and its holdings until the tier is gone.
async fn renew_holdings(fleet: std::sync::Weak<Fleet>) {
    let mut tick = tokio::time::interval(HOLDER_RENEWAL);
    loop {
        tick.tick().await;
        let Some(fleet) = fleet.upgrade() else {
            return;
        };
        let Some(mut redis) = fleet.link.connection().await else {
            continue;
        };
        if let Err(err) = fleet.count_members(&mut redis).await {
            tracing::debug!(error = %err, "could not renew this sidecar's membership of the fleet");
        }
        let held: Vec<String> = lock(&fleet.holding).iter().cloned().collect();
        for id in held {
            if let Err(err) = fleet.renew(&mut redis, &id).await {
                tracing::debug!(error = %err, "could not renew a holding of a shared token");
                break;
            }
        }
    }
}

/// One credential's token, asked of the fleet.
struct Ask<'a> {
    keys: Keys,
    credential: &'a CredentialSpec,
    context: FetchContext,
}

/// What a credential's lock says.
#[derive(Debug, PartialEq, Eq)]
enum LockState {
    Free,
    /// A fleet member's, within its bound.
    Held,
    /// Anything else: the value seen ("" for a key of another type).
    Forged(String),
}

/// A string key's value; `None` when absent — and when the key holds another type, which the
/// caller then overwrites.
async fn get_string(redis: &mut Connection, key: &str) -> Result<Option<String>, Failure> {
    match redis.get::<_, Option<String>>(key).await.map_err(Failure::of) {
        Ok(value) => Ok(value),
        Err(Failure::Key(_)) => Ok(None),
        Err(link) => Err(link),
    }
}

impl TokenSource for SharedTier {
    fn fetch<'a>(
        &'a self,
        credential: &'a CredentialSpec,
        context: FetchContext,
    ) -> SourceFuture<'a, IssuedToken> {
        Box::pin(self.fetch_shared(credential, context))
    }

    fn revoke<'a>(
        &'a self,
        credential: &'a CredentialSpec,
        token_id: &'a str,
    ) -> SourceFuture<'a, Revocation> {
        Box::pin(async move {
            if !self.last_holder(credential).await {
                return Ok(Revocation::LeftToFleet);
            }
            self.inner.revoke(credential, token_id).await
        })
    }

    fn purge<'a>(&'a self, credential: &'a CredentialSpec, token: &'a AccessToken) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            self.purge_shared(credential, token).await;
            Ok(())
        })
    }

    fn refused_elsewhere(&self) -> Option<broadcast::Receiver<RefusedToken>> {
        Some(self.fleet.refused.subscribe())
    }

    fn names(&self, refused: &RefusedToken, credential: &CredentialSpec, token: &AccessToken) -> bool {
        let fleet = &self.fleet;
        refused.fleet_identity == fleet.sealer.fleet_identity(credential.identity)
            && fleet
                .sealer
                .tags(token)
                .iter()
                .any(|tag| tag.trim_end_matches('|') == refused.tag)
    }
}

/// Checks the link every second until the tier is gone ([`Link::check`]).
async fn watch_link(fleet: std::sync::Weak<Fleet>) {
    let mut tick = tokio::time::interval(link::RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(fleet) = fleet.upgrade() else {
            return;
        };
        fleet.link.check().await;
    }
}

/// Subscribes to the fleet's refusals and passes them on, subscribing again a second after
/// Redis went away (as the link connects again), until the tier is gone. In a Cluster, a
/// `PUBLISH` reaches every node, so one node's subscription hears the whole fleet.
async fn listen_for_refusals(fleet: std::sync::Weak<Fleet>) {
    use futures_util::StreamExt;
    loop {
        let Some(strong) = fleet.upgrade() else {
            return;
        };
        // Only while the link is up: a down Redis sees the link's one attempt a second, no more.
        if strong.link.connection().await.is_none() {
            drop(strong);
            tokio::time::sleep(link::RETRY).await;
            continue;
        }
        let channel = format!("{}refused", strong.prefix);
        let (client, refused) = (strong.link.server().await, strong.refused.clone());
        let patience = strong.link.connect_timeout();
        drop(strong); // a subscription that waits must not keep the tier alive
        if let Ok(client) = client {
            let subscribing = tokio::time::timeout(patience, client.get_async_pubsub()).await;
            if let Ok(Ok(mut pubsub)) = subscribing {
                if pubsub.subscribe(&channel).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        if let Some(announced) = refusal(&message) {
                            let _ = refused.send(announced); // no cache listening yet: nothing to drop
                        }
                    }
                }
            }
        }
        tokio::time::sleep(link::RETRY).await;
    }
}

fn refusal(message: &redis::Msg) -> Option<RefusedToken> {
    let payload = message.get_payload::<String>().ok()?;
    let (fleet_identity, tag) = payload.split_once(' ')?;
    Some(RefusedToken {
        fleet_identity: fleet_identity.to_owned(),
        tag: tag.to_owned(),
    })
}

/// The Redis keys of one credential: `{prefix}{id}:…`, one hash slot.
struct Keys {
    id: String,
    token: String,
    lock: String,
    backoff: String,
    failures: String,
    holders: String,
}

impl Keys {
    fn new(prefix: &str, id: String) -> Self {
        let key = |suffix: &str| format!("{prefix}{{{id}}}:{suffix}");
        Self {
            token: key("token"),
            lock: key("lock"),
            backoff: key("backoff"),
            failures: key("failures"),
            holders: key("holders"),
            id,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u64::MAX as u128) as u64
}
