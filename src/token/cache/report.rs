//! What the admin listener sees of the cache: `/tokens` snapshots (fingerprints, never
//! tokens) and what readiness asks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use super::registry::CredentialState;
use super::{lock, TokenCache};
use crate::token::lifetime::Freshness;

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

impl TokenCache {
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
            fingerprint: cached.as_ref().map(|c| c.token.fingerprint().to_string()),
            fetches: status.successes,
            attempts: status.attempts,
            last_error: status
                .last_error
                .as_ref()
                .map(|error| format!("{}: {error}", state.endpoint())),
        }
    }
}

fn signed_millis_until(at: SystemTime, now: SystemTime) -> i64 {
    match at.duration_since(now) {
        Ok(ahead) => ahead.as_millis() as i64,
        Err(behind) => -(behind.duration().as_millis() as i64),
    }
}
