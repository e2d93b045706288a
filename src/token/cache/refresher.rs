//! Keeping tokens warm: a task that refreshes, when they come due, the tokens of recently used
//! credentials and of `prefetch` ones always, and the one background refresh a request starts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::registry::CredentialState;
use super::{lock, TokenCache, Want};
use crate::token::lifetime::Freshness;

/// How often the refresher looks for tokens coming due (real time).
const REFRESHER_TICK: Duration = Duration::from_millis(200);

impl TokenCache {
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

    pub(super) fn refresh_in_background(self: &Arc<Self>, state: &Arc<CredentialState>) {
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
}
