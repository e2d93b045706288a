//! Keeping tokens warm: a task that refreshes, when they come due, the tokens of recently used
//! credentials and of `prefetch` ones always, and the one background refresh a request starts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::registry::CredentialState;
use super::{lock, TokenCache, Want};
use crate::token::lifetime::Freshness;
use crate::token::source::RefusedToken;

/// How often the refresher looks for tokens coming due (real time).
const REFRESHER_TICK: Duration = Duration::from_millis(200);

impl TokenCache {
    /// Refreshes recently used credentials whose tokens come due, until `shutdown` turns true.
    /// Also drops the tokens the fleet's other sidecars announce as refused.
    pub async fn run_refresher(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(REFRESHER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refused = self.registry.load().source.refused_elsewhere();
        loop {
            tokio::select! {
                _ = tick.tick() => self.refresh_due().await,
                announced = next_refused(&mut refused) => match announced {
                    Some(token) => self.drop_refused(&token).await,
                    None => refused = None,
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Forgets the local token `refused` names, so that it is not sent again.
    async fn drop_refused(&self, refused: &RefusedToken) {
        let registry = self.registry.load_full();
        for state in registry.by_identity.values() {
            let Some(cached) = self.store.get(&state.spec.identity).await else {
                continue;
            };
            if registry.source.names(refused, &state.spec, &cached.token) {
                tracing::info!(credential = %state.spec.name, token = %cached.token, "another sidecar saw this token refused; dropping it");
                self.store.invalidate(&state.spec.identity).await;
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

/// The next announced refusal; `None` once the announcements stop (or there are none).
async fn next_refused(
    receiver: &mut Option<tokio::sync::broadcast::Receiver<RefusedToken>>,
) -> Option<RefusedToken> {
    let Some(receiver) = receiver else {
        return std::future::pending().await;
    };
    loop {
        match receiver.recv().await {
            Ok(token) => return Some(token),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        }
    }
}
