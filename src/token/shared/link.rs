//! The connection to the fleet's Redis, which the sidecar never depends on: commands have a
//! short timeout, and after a failure Redis is left alone for a back-off (doubling from 1 s to
//! 30 s) during which every sidecar goes on with its own cache. The degradation is logged once,
//! and so is the recovery; sharing resumes without a restart.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::sync::lock;

const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);

pub struct Link {
    client: redis::Client,
    timeout: Duration,
    manager: tokio::sync::Mutex<Option<ConnectionManager>>,
    paused_until: Mutex<Option<Instant>>,
    failures: AtomicU32,
    degraded: AtomicBool,
    metrics: Metrics,
}

impl Link {
    pub fn new(client: redis::Client, timeout: Duration, metrics: Metrics) -> Self {
        Self {
            client,
            timeout,
            manager: tokio::sync::Mutex::new(None),
            paused_until: Mutex::new(None),
            failures: AtomicU32::new(0),
            degraded: AtomicBool::new(false),
            metrics,
        }
    }

    /// A connection, unless Redis is paused after a failure or cannot be reached now.
    pub async fn connection(&self) -> Option<ConnectionManager> {
        let paused = lock(&self.paused_until).is_some_and(|until| until > Instant::now());
        if paused {
            return None;
        }
        let mut manager = self.manager.lock().await;
        if let Some(manager) = manager.as_ref() {
            return Some(manager.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let connecting = self.client.get_connection_manager_with_config(config);
        match tokio::time::timeout(self.timeout * 4, connecting).await {
            Ok(Ok(connected)) => {
                *manager = Some(connected.clone());
                Some(connected)
            }
            Ok(Err(err)) => {
                self.failed(&err);
                None
            }
            Err(_) => {
                self.failed(&"connecting timed out");
                None
            }
        }
    }

    /// A command failed: pause Redis for a while; say so once.
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        self.metrics.shared_cache("redis_error");
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let pause = FIRST_PAUSE
            .saturating_mul(1 << failures.saturating_sub(1).min(5))
            .min(MAX_PAUSE);
        *lock(&self.paused_until) = Some(Instant::now() + pause);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %error, retry_in_ms = pause.as_millis() as u64, "the fleet's Redis is unavailable; this sidecar goes on with its own cache");
        }
    }

    /// A command succeeded: Redis is back if it was away.
    pub fn succeeded(&self) {
        if self.failures.swap(0, Ordering::AcqRel) != 0 {
            *lock(&self.paused_until) = None;
        }
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!("the fleet's Redis is back; sharing tokens again");
        }
    }
}
