//! The fleet's shared tier (`[cache.shared]`): a [`TokenSource`] that wraps the token endpoint
//! with a Redis that the fleet's sidecars share, so that the fleet behaves like one sidecar.
//!
//! For a token the local cache does not hold (or holds due for refresh), in order:
//! 1. a fresh token another sidecar stored (decrypted; see [`sealed`]) is used as it is;
//! 2. while the fleet backs off a failing credential, that back-off is the answer;
//! 3. otherwise one sidecar takes the credential's lock (`SET NX PX`, a random holder value,
//!    released by compare-and-delete) and asks the endpoint, storing the token (Redis TTL = its
//!    remaining life) or the fleet's back-off; the others poll for its outcome within the lock's
//!    TTL, and fetch themselves if the holder vanished.
//!
//! Keys are `key_prefix` + a hash of what the credential's token depends on apart from its
//! secrets (endpoint, client id or organisation, scopes): never a secret, never a token. Any
//! Redis failure makes the sidecar ask the endpoint itself ([`link`]): no request fails because
//! Redis did.

pub mod link;
pub mod sealed;
pub mod settings;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::broadcast;

use super::dialect::{IssuedToken, Secrets};
use super::error::FetchError;
use super::lifetime::Freshness;
use super::source::{FetchContext, RefusedToken, SourceFuture, TokenSource};
use crate::clock::{from_unix_millis, unix_millis, SharedClock};
use crate::metrics::Metrics;
use crate::secret::AccessToken;
use crate::token::spec::{CacheSettings, CredentialSpec};
use link::Link;
use sealed::{Sealer, SharedToken};
use settings::SharedCacheSettings;

/// How often a sidecar waiting for another's fetch looks for its outcome.
const POLL: Duration = Duration::from_millis(50);

/// Releases a lock only if this sidecar still holds it.
const RELEASE: &str =
    r#"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"#;

/// Deletes the stored token only if it is the one named by one of the tags.
const PURGE: &str = r#"local v = redis.call('GET', KEYS[1])
if not v then return 0 end
for i = 1, #ARGV do
  if string.sub(v, 1, string.len(ARGV[i])) == ARGV[i] then return redis.call('DEL', KEYS[1]) end
end
return 0"#;

/// The fleet's shared tier in front of `inner` (the token endpoint).
pub struct SharedTier {
    inner: Arc<dyn TokenSource>,
    /// Refusals announced by the fleet (received on the `{prefix}refused` channel).
    refused: broadcast::Sender<RefusedToken>,
    link: Arc<Link>,
    sealer: Arc<Sealer>,
    prefix: String,
    lock_ttl: Duration,
    cache: CacheSettings,
    clock: SharedClock,
    metrics: Metrics,
}

/// A failure the fleet backs off from, as stored in Redis: the failure's text (a status, a
/// standard code; safe by construction, the same that `/tokens` shows) and, for rejected
/// credentials, the status and code themselves.
#[derive(Debug, Serialize, Deserialize)]
struct SharedFailure {
    message: String,
    rejected: Option<(u16, Option<String>)>,
}

impl SharedTier {
    pub fn new(
        settings: &SharedCacheSettings,
        cache: CacheSettings,
        inner: Arc<dyn TokenSource>,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(settings.redis_url.expose())?;
        let (refused, _) = broadcast::channel(64);
        tokio::spawn(listen_for_refusals(
            client.clone(),
            format!("{}refused", settings.key_prefix),
            refused.clone(),
        ));
        Ok(Self {
            inner,
            refused,
            link: Arc::new(Link::new(client, settings.timeout, metrics.clone())),
            sealer: Arc::new(Sealer::new(settings.encryption_keys.clone())),
            prefix: settings.key_prefix.clone(),
            lock_ttl: settings.lock_ttl,
            cache,
            clock,
            metrics,
        })
    }

    /// The same tier (connection, keys) in front of another endpoint client (after a reload).
    pub fn with_inner(&self, inner: Arc<dyn TokenSource>, cache: CacheSettings) -> Self {
        Self {
            inner,
            refused: self.refused.clone(),
            link: self.link.clone(),
            sealer: self.sealer.clone(),
            prefix: self.prefix.clone(),
            lock_ttl: self.lock_ttl,
            cache,
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
        }
    }

    async fn fetch_shared(
        &self,
        credential: &CredentialSpec,
        context: FetchContext,
    ) -> Result<IssuedToken, FetchError> {
        let Some(mut connection) = self.link.connection().await else {
            self.metrics.shared_cache("fallback");
            return self.inner.fetch(credential, context).await;
        };
        match self.through_redis(&mut connection, credential, context).await {
            Ok(outcome) => {
                self.link.succeeded();
                outcome
            }
            Err(err) => {
                self.link.failed(&err);
                self.metrics.shared_cache("fallback");
                self.inner.fetch(credential, context).await
            }
        }
    }

    async fn through_redis(
        &self,
        redis: &mut ConnectionManager,
        credential: &CredentialSpec,
        context: FetchContext,
    ) -> Result<Result<IssuedToken, FetchError>, redis::RedisError> {
        let keys = Keys::new(&self.prefix, credential);
        if let Some(token) = self.fresh_token(redis, &keys).await? {
            self.metrics.shared_cache("hit");
            return Ok(Ok(token));
        }
        self.metrics.shared_cache("miss");
        if let Some(failure) = self.fleet_backoff(redis, &keys).await? {
            return Ok(Err(failure));
        }
        let holder = hex::encode(rand::thread_rng().gen::<[u8; 16]>());
        let locked: Option<String> = redis::cmd("SET")
            .arg(&keys.lock)
            .arg(&holder)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.lock_ttl))
            .query_async(redis)
            .await?;
        if locked.is_some() {
            // Checked again under the lock: the previous holder may have stored its token
            // between our first look and our taking the lock.
            let stored = match self.fresh_token(redis, &keys).await {
                Ok(stored) => stored,
                Err(err) => {
                    self.release(redis, &keys, &holder).await;
                    return Err(err);
                }
            };
            if let Some(token) = stored {
                self.release(redis, &keys, &holder).await;
                self.metrics.shared_cache("hit");
                return Ok(Ok(token));
            }
            let outcome = self.inner.fetch(credential, context).await;
            // Storing and releasing are best effort: if Redis fails now, the fleet misses this
            // outcome (and the lock expires), but the token in hand is not fetched again.
            if let Err(err) = self.record(redis, &keys, &outcome).await {
                self.link.failed(&err);
            }
            self.release(redis, &keys, &holder).await;
            return Ok(outcome);
        }
        self.metrics.shared_cache("lock_wait");
        self.wait_for_holder(redis, &keys, credential, context).await
    }

    /// Lets go of the credential's lock if this sidecar still holds it (best effort: else it
    /// expires).
    async fn release(&self, redis: &mut ConnectionManager, keys: &Keys, holder: &str) {
        let released = redis::Script::new(RELEASE)
            .key(&keys.lock)
            .arg(holder)
            .invoke_async::<i64>(redis)
            .await;
        if let Err(err) = released {
            self.link.failed(&err);
        }
    }

    /// Another sidecar holds the lock: its token, its failure, or — when it vanished or the
    /// lock's TTL ran out — a fetch of our own.
    async fn wait_for_holder(
        &self,
        redis: &mut ConnectionManager,
        keys: &Keys,
        credential: &CredentialSpec,
        context: FetchContext,
    ) -> Result<Result<IssuedToken, FetchError>, redis::RedisError> {
        let deadline = tokio::time::Instant::now() + self.lock_ttl;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            let held: bool = redis.exists(&keys.lock).await?;
            // Look after the lock: a holder stores its outcome before it lets go.
            if let Some(token) = self.fresh_token(redis, keys).await? {
                self.metrics.shared_cache("hit");
                return Ok(Ok(token));
            }
            if let Some(failure) = self.fleet_backoff(redis, keys).await? {
                return Ok(Err(failure));
            }
            if !held {
                break;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            self.metrics.shared_cache("lock_timeout");
        }
        Ok(self.inner.fetch(credential, context).await)
    }

    /// The stored token, if it opens and is still fresh by the refresh policy (one due for
    /// refresh is about to be replaced: fetching it would only move the refresh here).
    async fn fresh_token(
        &self,
        redis: &mut ConnectionManager,
        keys: &Keys,
    ) -> Result<Option<IssuedToken>, redis::RedisError> {
        let Some(value) = redis.get::<_, Option<String>>(&keys.token).await? else {
            return Ok(None);
        };
        let stored = match self.sealer.open(&keys.token, &value) {
            Ok(stored) => stored,
            Err(err) => {
                tracing::debug!(error = %err, "a stored token could not be opened; ignoring it");
                return Ok(None);
            }
        };
        let (obtained, expires) = (
            from_unix_millis(stored.obtained_at_ms),
            from_unix_millis(stored.expires_at_ms),
        );
        let schedule = self.cache.refresh.schedule(obtained, expires, 0.0);
        if schedule.freshness(self.clock.now()) != Freshness::Fresh {
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

    /// The fleet's back-off for the credential, if one is running: its failure, with the time
    /// left as `Retry-After`.
    async fn fleet_backoff(
        &self,
        redis: &mut ConnectionManager,
        keys: &Keys,
    ) -> Result<Option<FetchError>, redis::RedisError> {
        let Some(value) = redis.get::<_, Option<String>>(&keys.backoff).await? else {
            return Ok(None);
        };
        let left: i64 = redis.pttl(&keys.backoff).await?;
        let Ok(failure) = serde_json::from_str::<SharedFailure>(&value) else {
            return Ok(None);
        };
        let retry_after = Some(Duration::from_millis(left.max(0) as u64));
        Ok(Some(match failure.rejected {
            Some((status, reason)) => FetchError::Rejected { status, reason },
            None => FetchError::FleetBackoff {
                message: failure.message,
                retry_after,
            },
        }))
    }

    /// Stores the holder's outcome for the fleet: the token, or the back-off.
    async fn record(
        &self,
        redis: &mut ConnectionManager,
        keys: &Keys,
        outcome: &Result<IssuedToken, FetchError>,
    ) -> Result<(), redis::RedisError> {
        match outcome {
            Ok(issued) => {
                let left = issued
                    .expires_at
                    .duration_since(self.clock.now())
                    .unwrap_or_default();
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
                let value = self.sealer.seal(&keys.token, &shared);
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
            Err(error) => {
                let failures: u32 = redis.incr(&keys.failures, 1).await?;
                let wait = super::cache::backoff(&self.cache, failures, error).wait;
                let failure = SharedFailure {
                    message: error.to_string(),
                    rejected: match error {
                        FetchError::Rejected { status, reason } => Some((*status, reason.clone())),
                        _ => None,
                    },
                };
                redis::pipe()
                    .pexpire(&keys.failures, millis(self.cache.max_failure_backoff * 4) as i64)
                    .ignore()
                    .cmd("SET")
                    .arg(&keys.backoff)
                    .arg(serde_json::to_string(&failure).unwrap_or_default())
                    .arg("PX")
                    .arg(millis(wait).max(1))
                    .ignore()
                    .query_async::<()>(redis)
                    .await
            }
        }
    }

    async fn purge_shared(&self, credential: &CredentialSpec, token: &AccessToken) {
        let Some(mut redis) = self.link.connection().await else {
            return;
        };
        let keys = Keys::new(&self.prefix, credential);
        let script = redis::Script::new(PURGE);
        let mut purge = script.prepare_invoke();
        purge.key(&keys.token);
        for tag in self.sealer.tags(token) {
            purge.arg(tag);
        }
        let fleet_identity = fleet_identity(credential);
        let announce = format!("{fleet_identity} {}", self.sealer.tag(token));
        let purged = async {
            purge.invoke_async::<i64>(&mut redis).await?;
            redis
                .publish::<_, _, i64>(format!("{}refused", self.prefix), announce)
                .await
        };
        match purged.await {
            Ok(_) => self.link.succeeded(),
            Err(err) => self.link.failed(&err),
        }
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

    fn revoke<'a>(&'a self, credential: &'a CredentialSpec, token_id: &'a str) -> SourceFuture<'a, ()> {
        self.inner.revoke(credential, token_id)
    }

    fn purge<'a>(&'a self, credential: &'a CredentialSpec, token: &'a AccessToken) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            self.purge_shared(credential, token).await;
            Ok(())
        })
    }

    fn refused_elsewhere(&self) -> Option<broadcast::Receiver<RefusedToken>> {
        Some(self.refused.subscribe())
    }

    fn names(&self, refused: &RefusedToken, credential: &CredentialSpec, token: &AccessToken) -> bool {
        refused.fleet_identity == fleet_identity(credential)
            && self
                .sealer
                .tags(token)
                .iter()
                .any(|tag| tag.trim_end_matches('|') == refused.tag)
    }
}

/// Subscribes to the fleet's refusals and passes them on, reconnecting (1 s doubling to 30 s)
/// whenever Redis goes away.
async fn listen_for_refusals(
    client: redis::Client,
    channel: String,
    refused: broadcast::Sender<RefusedToken>,
) {
    use futures_util::StreamExt;
    let mut pause = Duration::from_secs(1);
    loop {
        if let Ok(mut pubsub) = client.get_async_pubsub().await {
            if pubsub.subscribe(&channel).await.is_ok() {
                pause = Duration::from_secs(1);
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    if let Some((fleet_identity, tag)) = payload.split_once(' ') {
                        let announced = RefusedToken {
                            fleet_identity: fleet_identity.to_owned(),
                            tag: tag.to_owned(),
                        };
                        let _ = refused.send(announced); // no cache listening yet: nothing to drop
                    }
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// The Redis keys of one credential.
struct Keys {
    token: String,
    lock: String,
    backoff: String,
    failures: String,
}

impl Keys {
    fn new(prefix: &str, credential: &CredentialSpec) -> Self {
        let id = fleet_identity(credential);
        Self {
            token: format!("{prefix}token:{id}"),
            lock: format!("{prefix}lock:{id}"),
            backoff: format!("{prefix}backoff:{id}"),
            failures: format!("{prefix}failures:{id}"),
        }
    }
}

/// What a credential's token depends on apart from its secrets — the endpoint, the encoding,
/// the body fields that are not secret (client id, organisation, scopes) — hashed: the same for
/// every sidecar of the fleet, and never a secret.
pub fn fleet_identity(credential: &CredentialSpec) -> String {
    let digest = credential.request.digest(Secrets::Left).finalize();
    hex::encode(&digest[..16])
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u64::MAX as u128) as u64
}
