//! Keeping tokens warm: a task that refreshes, when they come due, the tokens of recently used
//! credentials and of `prefetch` ones always, and the one background refresh a request starts.
//! Background fetches queue for a few workers, so that thousands of tokens coming due together
//! wait as pointers in a queue, not as thousands of parked fetches.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::registry::CredentialState;
use super::{lock, TokenCache, Want};
use crate::clock::unix_millis;
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
                _ = tick.tick() => {
                    self.refresh_due().await;
                    self.sweep_retired().await;
                }
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
                self.look_again(state, Some(self.clock.now()));
            }
        }
    }

    /// Refreshes what comes due: recently used credentials, and `prefetch` credentials
    /// always — also when they hold no token yet (a failed start-up fetch is retried on the
    /// back-off schedule). Tokens not yet due are skipped without a lookup.
    pub(super) async fn refresh_due(self: &Arc<Self>) {
        let now = self.clock.now();
        let now_ms = unix_millis(now);
        if self.earliest_look_ms.load(Ordering::Acquire) > now_ms {
            return; // nothing is due
        }
        // Each identity skipped below, and each look set meanwhile, lowers it again.
        self.earliest_look_ms.store(u64::MAX, Ordering::Release);
        let registry = self.registry.load_full();
        for state in registry.by_identity.values() {
            let next = state.fetch.next_look_ms.load(Ordering::Relaxed);
            if next > now_ms || state.fetch.refreshing.load(Ordering::Acquire) {
                // Not yet due, or a refresh is queued and its outcome sets the next look.
                self.earliest_look_ms.fetch_min(next, Ordering::AcqRel);
                continue;
            }
            let Some(cached) = self.store.get(&state.spec.identity).await else {
                if state.spec.prefetch {
                    self.refresh_or_look_later(state);
                } else {
                    self.look_again(state, None); // the request path fetches it when asked
                }
                continue;
            };
            let lifetime = cached.lifetime();
            let keep_warm = state.spec.prefetch || state.fetch.recently_used(now, lifetime);
            if cached.schedule.freshness(now) == Freshness::Fresh {
                self.look_again(state, Some(cached.schedule.refresh_at));
            } else if keep_warm {
                self.refresh_or_look_later(state);
            } else {
                self.look_again(state, None);
            }
        }
    }

    /// Starts a background refresh of `state`; if it is backing off instead, the refresher
    /// looks again when the back-off ends (its last failure set that look). A queued refresh's
    /// outcome sets the next look; until then each tick passes over it.
    fn refresh_or_look_later(self: &Arc<Self>, state: &Arc<CredentialState>) {
        self.refresh_in_background(state);
        let next = state.fetch.next_look_ms.load(Ordering::Relaxed);
        self.earliest_look_ms.fetch_min(next, Ordering::AcqRel);
    }

    /// Records when the refresher is to look at `state` again (`None`: once a new token is
    /// stored).
    pub(super) fn look_again(&self, state: &CredentialState, at: Option<SystemTime>) {
        let millis = state.fetch.look_again(at);
        self.earliest_look_ms.fetch_min(millis, Ordering::AcqRel);
    }

    /// Fetches the token of every `prefetch` credential that has none, in the background.
    pub fn prefetch(self: &Arc<Self>) {
        let registry = self.registry.load_full();
        for state in registry.by_name.values().filter(|state| state.spec.prefetch) {
            self.refresh_in_background(state);
        }
    }

    /// Queues one background fetch of `state`'s token, unless one is queued or running or the
    /// credential is backing off.
    pub(super) fn refresh_in_background(self: &Arc<Self>, state: &Arc<CredentialState>) {
        let backing_off = lock(&state.fetch.status)
            .retry_not_before
            .is_some_and(|until| until > self.clock.now());
        if backing_off || state.fetch.refreshing.swap(true, Ordering::AcqRel) {
            return; // one refresh at a time, none while backing off
        }
        let workers = background_workers(self.settings.load().max_concurrent_fetches);
        if self.background.push(state.clone(), workers) {
            let cache = self.clone();
            tokio::spawn(cache.work_through_background_queue());
        }
    }

    /// One background worker: fetches queued credentials' tokens until the queue is empty.
    /// After a burst (a prefetch, many tokens come due at once), gives the memory the fetches
    /// freed back to the OS: the sidecar is likely idle next.
    async fn work_through_background_queue(self: Arc<Self>) {
        let mut fetched = 0;
        while let Some(state) = self.background.next() {
            if let Err(err) = self.fetch_exclusive(&state, Want::Fresh, true).await {
                tracing::warn!(credential = %state.spec.name, error = %err, "background token fetch failed; a cached token, if any, is still used");
            }
            state.fetch.refreshing.store(false, Ordering::Release);
            fetched += 1;
        }
        if fetched >= BURST {
            crate::allocator::give_back_freed_memory();
        }
    }
}

/// Fetches by one background worker that make a burst, after which freed memory is given back
/// (a trickle of refreshes leaves little, and mimalloc purges it as it allocates).
const BURST: usize = 100;

/// Half the fetch permits (at least one) go to background fetches: a request that needs a
/// token finds a permit however many tokens come due at once.
fn background_workers(max_concurrent_fetches: usize) -> usize {
    max_concurrent_fetches.div_ceil(2).max(1)
}

/// The credentials waiting for a background fetch, and how many workers run.
#[derive(Default)]
pub(super) struct BackgroundQueue {
    inner: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    states: VecDeque<Arc<CredentialState>>,
    workers: usize,
}

impl BackgroundQueue {
    /// Queues `state`; true when the caller is to start a worker (fewer than `max_workers` run).
    fn push(&self, state: Arc<CredentialState>, max_workers: usize) -> bool {
        let mut waiting = lock(&self.inner);
        waiting.states.push_back(state);
        let start = waiting.workers < max_workers;
        if start {
            waiting.workers += 1;
        }
        start
    }

    /// The next credential for a worker; `None` retires the worker (under the same lock as a
    /// push, so that no queued credential is left without one).
    fn next(&self) -> Option<Arc<CredentialState>> {
        let mut waiting = lock(&self.inner);
        let next = waiting.states.pop_front();
        if next.is_none() {
            waiting.workers -= 1;
            // Ten thousand tokens came due at once: give the queue's room back.
            waiting.states.shrink_to(16);
        }
        next
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
