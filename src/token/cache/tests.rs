//! The cache against a stand-in [`TokenSource`]: no sockets, no endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::token::dialect::IssuedToken;
use crate::token::source::{FetchContext, Revocation, SourceFuture};

/// Counts its calls; each answers after `delay` (tokio time) with a token of `lifetime`, issued
/// when it was asked for (as lifetimes count from the request).
struct CountingSource {
    calls: AtomicUsize,
    /// Fetches running now, and the most that ever ran at once.
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    delay: Duration,
    lifetime: Duration,
    clock: Arc<ManualClock>,
}

impl TokenSource for CountingSource {
    fn fetch<'a>(&'a self, _: &'a CredentialSpec, _: FetchContext) -> SourceFuture<'a, IssuedToken> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let issued_at = self.clock.now();
            let running = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak_in_flight.fetch_max(running, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(IssuedToken {
                token: AccessToken::new(format!("token-{n}")),
                expires_at: issued_at + self.lifetime,
                lifetime: self.lifetime,
                token_id: None,
                dpop: false,
            })
        })
    }

    fn revoke<'a>(&'a self, _: &'a CredentialSpec, _: &'a str) -> SourceFuture<'a, Revocation> {
        Box::pin(async { Ok(Revocation::Revoked) })
    }
}

fn source(clock: &Arc<ManualClock>) -> Arc<CountingSource> {
    Arc::new(CountingSource {
        calls: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        peak_in_flight: AtomicUsize::new(0),
        delay: Duration::from_millis(50),
        lifetime: Duration::from_secs(3600),
        clock: clock.clone(),
    })
}

fn credential(name: &str, identity: &str) -> Arc<CredentialSpec> {
    CredentialSpec::for_test(name, identity)
}

/// A request's token, with the cache's current credentials.
async fn token(cache: &Arc<TokenCache>, spec: &Arc<CredentialSpec>) -> Result<Arc<CachedToken>, TokenError> {
    cache
        .token(&cache.credentials(), spec, Duration::from_secs(30))
        .await
}

fn cache(
    credentials: &[Arc<CredentialSpec>],
    source: Arc<CountingSource>,
    clock: Arc<ManualClock>,
) -> Arc<TokenCache> {
    TokenCache::new(
        credentials,
        source,
        CacheSettings::default(),
        clock,
        Metrics::new(),
    )
}

#[tokio::test]
async fn concurrent_cold_requests_share_one_fetch() {
    let clock = ManualClock::new();
    let source = source(&clock);
    let spec = credential("acme", "identity-a");
    let cache = cache(std::slice::from_ref(&spec), source.clone(), clock);
    let waiters = (0..100).map(|_| {
        let (cache, spec) = (cache.clone(), spec.clone());
        tokio::spawn(async move { token(&cache, &spec).await.map(|t| t.token.clone()) })
    });
    let tokens = futures_util::future::join_all(waiters).await;
    assert_eq!(
        source.calls.load(Ordering::SeqCst),
        1,
        "one fetch in flight for 100 waiters"
    );
    for token in tokens {
        assert_eq!(token.unwrap().unwrap().expose(), "token-1");
    }
}

#[tokio::test]
async fn a_reload_keeps_the_token_of_an_unchanged_identity_only() {
    let clock = ManualClock::new();
    let source = source(&clock);
    let (kept, changed) = (
        credential("kept", "identity-k"),
        credential("changed", "identity-c1"),
    );
    let cache = cache(&[kept.clone(), changed.clone()], source.clone(), clock);
    token(&cache, &kept).await.unwrap();
    token(&cache, &changed).await.unwrap();
    assert_eq!(source.calls.load(Ordering::SeqCst), 2);

    let before = cache.credentials();
    let renamed_secret = credential("changed", "identity-c2");
    let reloaded = cache.prepare(&[kept.clone(), renamed_secret.clone()], source.clone());
    let replaced = cache.install(&reloaded, CacheSettings::default());
    let applied = replaced.applied();
    cache.retire(replaced).await;
    assert_eq!(applied.kept, vec![Arc::<str>::from("kept")]);
    assert_eq!(applied.changed, vec![Arc::<str>::from("changed")]);
    token(&cache, &kept).await.unwrap();
    assert_eq!(
        source.calls.load(Ordering::SeqCst),
        2,
        "the unchanged identity kept its token"
    );
    token(&cache, &renamed_secret).await.unwrap();
    assert_eq!(
        source.calls.load(Ordering::SeqCst),
        3,
        "the changed one fetched anew"
    );
    // Requests that started before the reload, with the old definition, are not served the
    // old token (it was dropped), and share one fetch of their own (not one each) ...
    let old_waiters = (0..20).map(|_| {
        let (cache, before, changed) = (cache.clone(), before.clone(), changed.clone());
        tokio::spawn(async move { cache.token(&before, &changed, Duration::from_secs(30)).await })
    });
    for waiter in futures_util::future::join_all(old_waiters).await {
        assert_eq!(waiter.unwrap().unwrap().token.expose(), "token-4");
    }
    assert_eq!(
        source.calls.load(Ordering::SeqCst),
        4,
        "one fetch for the old definition"
    );
    // ... whose token is swept once no snapshot holds the old credentials.
    cache.sweep_retired().await;
    assert!(cache.store.get(&changed.identity).await.is_some(), "still held");
    drop(before);
    cache.sweep_retired().await;
    assert!(cache.store.get(&changed.identity).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_fetch_outlives_the_requests_that_gave_up_on_it_and_its_token_is_cached() {
    let clock = ManualClock::new();
    let source = Arc::new(CountingSource {
        delay: Duration::from_secs(3),
        ..Arc::into_inner(source(&clock)).unwrap()
    });
    let spec = credential("slow", "identity-slow");
    let cache = cache(std::slice::from_ref(&spec), source.clone(), clock);
    // Twelve impatient clients, one after another, each giving up after a second: the first
    // two give up on the 3 s fetch, and the rest are served the token it cached.
    let mut outcomes = Vec::new();
    for _ in 0..12 {
        let impatient = cache
            .token(&cache.credentials(), &spec, Duration::from_millis(999))
            .await;
        outcomes.push(impatient.map(|token| token.token.expose().to_owned()).ok());
    }
    assert_eq!(
        source.calls.load(Ordering::SeqCst),
        1,
        "the first fetch was not cancelled"
    );
    assert_eq!(outcomes[..3], [None, None, None]);
    assert!(
        outcomes[4..]
            .iter()
            .all(|token| token.as_deref() == Some("token-1")),
        "{outcomes:?}"
    );
}

/// The replay after a refusal takes neither the refused token's cached peers nor the token of
/// a flight that was asked for before the revocation's first refusal was seen: a revocation
/// refuses those too. It takes a flight of its own; the revocation's later refusals share it.
#[tokio::test(start_paused = true)]
async fn a_replay_takes_no_token_asked_for_before_the_revocation_was_first_seen() {
    let clock = ManualClock::new();
    let source = source(&clock);
    let spec = credential("acme", "identity-a");
    let cache = cache(std::slice::from_ref(&spec), source.clone(), clock.clone());
    let first = token(&cache, &spec).await.unwrap();
    assert_eq!(first.token.expose(), "token-1");
    // A refresh is in the air, asked for now…
    let refreshing = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.refresh_now("acme", true).await })
    };
    tokio::task::yield_now().await;
    // …when the upstream refuses token-1: a revocation at the provider.
    clock.advance(Duration::from_secs(1));
    let credentials = cache.credentials();
    let refused_at = clock.now();
    let since = cache.purge_refused(&credentials, &spec, &first).await;
    let since = since.expect("purged, to be replayed");
    assert_eq!(unix_millis(since), unix_millis(refused_at), "since the refusal");
    let replacement = cache
        .replacement(&credentials, &spec, since, Duration::from_secs(30))
        .await
        .unwrap();
    let refreshed = refreshing.await.unwrap().unwrap();
    assert_eq!(refreshed.token.expose(), "token-2", "the refresh landed");
    assert_eq!(
        replacement.token.expose(),
        "token-3",
        "the replay took a flight of its own"
    );
    assert_eq!(source.calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        token(&cache, &spec).await.unwrap().token.expose(),
        "token-3",
        "and its token is the one cached"
    );
    // A request sent with token-1 before the purge is refused later: the same revocation, so
    // its replay takes token-3 (every request in flight does not fetch one of its own).
    clock.advance(Duration::from_millis(500));
    let late = cache.purge_refused(&credentials, &spec, &first).await;
    assert_eq!(late, Some(since), "the revocation's refusals start at its first");
    let replayed = cache
        .replacement(&credentials, &spec, since, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(replayed.token.expose(), "token-3");
    assert_eq!(source.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn prefetch_runs_a_few_fetches_at_a_time_and_leaves_permits_for_requests() {
    let clock = ManualClock::new();
    let source = source(&clock);
    let prefetched: Vec<_> = (0..100)
        .map(|i| {
            let mut spec = (*credential(&format!("m{i}"), &format!("identity-{i}"))).clone();
            spec.prefetch = true;
            Arc::new(spec)
        })
        .collect();
    let requested = credential("requested", "identity-r");
    let mut all = prefetched.clone();
    all.push(requested.clone());
    let cache = cache(&all, source.clone(), clock);

    cache.prefetch();
    let asked = tokio::time::Instant::now();
    token(&cache, &requested).await.unwrap();
    let waited = asked.elapsed();
    tokio::time::sleep(Duration::from_secs(60)).await;

    assert!(
        waited < Duration::from_millis(200),
        "a request's fetch did not queue behind the prefetch (waited {waited:?})"
    );
    let workers = CacheSettings::default().max_concurrent_fetches.div_ceil(2);
    assert_eq!(source.peak_in_flight.load(Ordering::SeqCst), workers + 1);
    assert_eq!(source.calls.load(Ordering::SeqCst), 101);
    for spec in &prefetched {
        assert!(cache.has_usable(&spec.name).await, "{} was prefetched", spec.name);
    }
}

#[tokio::test(start_paused = true)]
async fn the_refresher_looks_only_at_tokens_come_due_and_lets_idle_ones_lapse() {
    let clock = ManualClock::new();
    let source = source(&clock);
    let mut warm = (*credential("warm", "identity-w")).clone();
    warm.prefetch = true;
    let (warm, idle) = (Arc::new(warm), credential("idle", "identity-i"));
    let cache = cache(&[warm.clone(), idle.clone()], source.clone(), clock.clone());
    cache.prefetch();
    token(&cache, &idle).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    let state = |spec: &CredentialSpec| cache.registry.load().by_identity[&spec.identity].clone();
    let refresh_at = cache.store.get(&warm.identity).await.unwrap().schedule.refresh_at;
    assert!(
        state(&warm).fetch.not_due(clock.now()),
        "a fresh token is not looked at"
    );
    cache.refresh_due().await;
    let idle_refresh_at = cache.store.get(&idle.identity).await.unwrap().schedule.refresh_at;
    assert_eq!(
        cache.earliest_look_ms.load(Ordering::Relaxed),
        crate::clock::unix_millis(refresh_at.min(idle_refresh_at)),
        "until the first token comes due, a tick has nothing to look at"
    );

    // Past both refresh times (jittered), and the idle credential's last use by far more than
    // a quarter of the lifetime.
    let both_due = refresh_at.max(idle_refresh_at);
    clock.advance(both_due.duration_since(clock.now()).unwrap() + Duration::from_secs(1));
    cache.refresh_due().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        source.calls.load(Ordering::SeqCst),
        3,
        "the prefetched credential was refreshed, the idle one was not"
    );
    assert!(
        state(&warm).fetch.not_due(clock.now()),
        "the new token is not due"
    );
    assert_eq!(
        state(&idle).fetch.next_look_ms.load(Ordering::Relaxed),
        u64::MAX,
        "an idle credential's due token is not looked at again"
    );
    cache.refresh_due().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(source.calls.load(Ordering::SeqCst), 3);

    // Used again, its token is refreshed by the request path, and looked at when due.
    token(&cache, &idle).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(source.calls.load(Ordering::SeqCst), 4);
    assert!(state(&idle).fetch.not_due(clock.now()));
}

#[test]
fn credentials_are_found_by_name_and_listed_in_name_order() {
    let states = ["merchant-b", "merchant-c", "merchant-a"]
        .map(|name| Arc::new(CredentialState::new(credential(name, name), Arc::default())));
    let by_name = registry::ByName::new(states.to_vec());
    assert_eq!(by_name.len(), 3);
    let listed: Vec<&str> = by_name.values().map(|state| &*state.spec.name).collect();
    assert_eq!(listed, ["merchant-a", "merchant-b", "merchant-c"]);
    for name in listed {
        assert_eq!(&*by_name.get(name).unwrap().spec.name, name);
    }
    assert!(by_name.get("merchant").is_none());
    assert!(!by_name.contains_key("merchant-d"));
}

#[tokio::test(start_paused = true)]
async fn a_fresh_token_refused_once_is_purged_and_refetched_but_twice_running_passes_401s_back() {
    let clock = ManualClock::new();
    let source = source(&clock);
    let spec = credential("acme", "acme-identity");
    let cache = cache(std::slice::from_ref(&spec), source.clone(), clock.clone());
    let credentials = cache.credentials();
    let first = token(&cache, &spec).await.unwrap();
    assert!(
        cache.purge_refused(&credentials, &spec, &first).await.is_some(),
        "a refused token is purged"
    );
    // Fetched just before a revocation, say: refused as well, and still purged once more.
    let raced = token(&cache, &spec).await.unwrap();
    assert_ne!(raced.token, first.token);
    assert!(
        cache.purge_refused(&credentials, &spec, &raced).await.is_some(),
        "one fresh refusal is a race"
    );
    let third = token(&cache, &spec).await.unwrap();
    assert_ne!(third.token, raced.token);
    assert!(
        cache.purge_refused(&credentials, &spec, &third).await.is_none(),
        "two fresh refusals running: the upstream refuses everything; its 401s go back"
    );
    assert_eq!(source.calls.load(Ordering::SeqCst), 3);
    // An accepted token starts the count afresh.
    cache.upstream_accepted(&credentials, &spec);
}
