//! The connection to the fleet's Redis, which the sidecar never depends on: commands have a
//! short timeout, and after a failure the connection is dropped and Redis left alone for
//! [`RETRY`] — at most one connection attempt a second, however many requests come — during
//! which every sidecar goes on with its own cache. The next attempt after that reconnects, so
//! sharing resumes within about a second of Redis answering again. The degradation is logged
//! once, and so is the recovery; `token_sidecar_shared_cache_up` says which it is now.
//!
//! A failure is the link's only when it is the connection's (I/O, timeouts, refusals, a
//! server that refuses our user): a key holding the wrong type is that credential's problem,
//! and [`Failure::of`] keeps it from pausing the link for every credential.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use crate::failure::Chain;
use crate::metrics::Metrics;
use crate::sync::lock;

/// After a failure, how long before the next connection attempt.
pub const RETRY: Duration = Duration::from_secs(1);

/// What a failed Redis command says about the link.
#[derive(Debug)]
pub enum Failure {
    /// The connection failed: go on without Redis for a while.
    Link(redis::RedisError),
    /// A key of one credential could not be used (the wrong type): that credential goes to its
    /// endpoint this time; nothing else changes.
    Key(redis::RedisError),
}

impl Failure {
    pub fn of(err: redis::RedisError) -> Self {
        let wrong_type =
            err.code() == Some("WRONGTYPE") || err.kind() == redis::ErrorKind::UnexpectedReturnType;
        if wrong_type {
            Self::Key(err)
        } else {
            Self::Link(err)
        }
    }
}

impl From<redis::RedisError> for Failure {
    fn from(err: redis::RedisError) -> Self {
        Self::of(err)
    }
}

pub struct Link {
    client: redis::Client,
    timeout: Duration,
    manager: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// No connection attempt before this.
    next_attempt: Mutex<Option<Instant>>,
    degraded: AtomicBool,
    metrics: Metrics,
}

impl Link {
    pub fn new(client: redis::Client, timeout: Duration, metrics: Metrics) -> Self {
        metrics.shared_cache_up(true);
        Self {
            client,
            timeout,
            manager: tokio::sync::Mutex::new(None),
            next_attempt: Mutex::new(None),
            degraded: AtomicBool::new(false),
            metrics,
        }
    }

    /// A connection, unless Redis failed less than [`RETRY`] ago or cannot be reached now.
    pub async fn connection(&self) -> Option<ConnectionManager> {
        let resting = lock(&self.next_attempt).is_some_and(|at| at > Instant::now());
        if resting {
            return None;
        }
        let mut manager = self.manager.lock().await;
        if let Some(manager) = manager.as_ref() {
            return Some(manager.clone());
        }
        // Checked again under the lock: another caller may have just failed to connect.
        if lock(&self.next_attempt).is_some_and(|at| at > Instant::now()) {
            return None;
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(0);
        let connecting = self.client.get_connection_manager_with_config(config);
        match tokio::time::timeout(self.timeout * 4, connecting).await {
            Ok(Ok(connected)) => {
                *manager = Some(connected.clone());
                Some(connected)
            }
            Ok(Err(err)) => {
                self.rest(&mut manager, &Chain(&err));
                None
            }
            Err(_) => {
                self.rest(&mut manager, &"connecting timed out");
                None
            }
        }
    }

    /// A command failed on the connection: drop it, and leave Redis alone for [`RETRY`].
    pub async fn failed(&self, error: &redis::RedisError) {
        let mut manager = self.manager.lock().await;
        self.rest(&mut manager, &Chain(error));
    }

    fn rest(&self, manager: &mut Option<ConnectionManager>, error: &dyn std::fmt::Display) {
        *manager = None;
        self.metrics.shared_cache("redis_error");
        *lock(&self.next_attempt) = Some(Instant::now() + RETRY);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.metrics.shared_cache_up(false);
            tracing::warn!(error = %error, retry_in_ms = RETRY.as_millis() as u64, "the fleet's Redis is unavailable; this sidecar goes on with its own cache");
        }
    }

    /// A command succeeded: Redis is back if it was away.
    pub fn succeeded(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            self.metrics.shared_cache_up(true);
            tracing::info!("the fleet's Redis is back; sharing tokens again");
        }
    }
}
