//! A fleet: three sidecar processes sharing one real `redis-server` (`[cache.shared]`).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use token_sidecar::clock::{ManualClock, SharedClock, SystemClock};
use token_sidecar::dev::providers::{Failure, Shape};
use token_sidecar::dev::{dev_accounts, StandIns};

use crate::support::binary::{eventually, BinarySidecar};
use crate::support::redis::RedisServer;

const KEY_PREFIX: &str = "fleet-test:";

fn encryption_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([7u8; 32])
}

/// PayU and Nuapay credentials behind `/acme/payu` and `/acme/nuapay`; with `redis`, shared.
fn fleet_config(s: &StandIns, redis: Option<&RedisServer>) -> String {
    let shared = redis
        .map(|redis| {
            format!(
                // A tolerant timeout: three sidecars and the tests share two loaded cores.
                "[cache.shared]\nredis_url = \"{}\"\nencryption_key = \"{}\"\nkey_prefix = \"{KEY_PREFIX}\"\ntimeout = \"2s\"\nlock_ttl = \"15s\"\n",
                redis.url(),
                encryption_key()
            )
        })
        .unwrap_or_default();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
watch_config = false

[tls]
ca_file = "ca.pem"

{shared}
[providers.payu]
token_url = "https://{token}/oauth/token"

[providers.nuapay]
kind = "nuapay"
base_url = "https://{token}"
api_key = "dev-nuapay-api-key"

[credentials.acme-payu]
provider = "payu"
client_id = "acme-payu-client"
client_secret = {{ file = "secrets/payu" }}
scopes = ["create_payment_links"]

[credentials.acme-nuapay]
provider = "nuapay"
organisation = "ybo8zd8j2q"
scopes = ["openbanking_pisp"]

[[routes]]
path_prefix = "/acme/payu"
upstream = "https://{upstream}/payu"
credential = "acme-payu"

[[routes]]
path_prefix = "/acme/nuapay"
upstream = "https://{upstream}/nuapay"
credential = "acme-nuapay"
"#,
        token = s.token_addr,
        upstream = s.upstream_addr,
    )
}

async fn fleet(
    clock: SharedClock,
    redis: Option<&RedisServer>,
    size: usize,
) -> (StandIns, Vec<Arc<BinarySidecar>>) {
    let s = StandIns::start(clock, dev_accounts()).await.unwrap();
    let config = fleet_config(&s, redis);
    let sidecars = (0..size)
        .map(|_| Arc::new(BinarySidecar::start(&s, &config)))
        .collect();
    (s, sidecars)
}

/// `count` concurrent GETs of `path`, spread over the sidecars; their statuses.
async fn burst(sidecars: &[Arc<BinarySidecar>], path: &'static str, count: usize) -> Vec<u16> {
    let requests = (0..count).map(|i| {
        let sidecar = sidecars[i % sidecars.len()].clone();
        tokio::spawn(async move { sidecar.get(path).await.status().as_u16() })
    });
    futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn three_sidecars_sharing_redis_make_one_fetch_for_300_cold_requests() {
    let Some(redis) = RedisServer::start("three_sidecars_sharing_redis_make_one_fetch_for_300_cold_requests")
    else {
        return;
    };
    let (s, sidecars) = fleet(ManualClock::new(), Some(&redis), 3).await;
    let statuses = burst(&sidecars, "/acme/payu/x", 300).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let fetches = s.providers.token_requests(Shape::PayU);
    eprintln!("cold burst, 3 sidecars with Redis: 300 requests, {fetches} token fetch(es)");
    assert_eq!(fetches, 1);
}

#[tokio::test]
async fn a_refused_token_is_purged_for_the_whole_fleet() {
    let Some(redis) = RedisServer::start("a_refused_token_is_purged_for_the_whole_fleet") else {
        return;
    };
    let (s, sidecars) = fleet(ManualClock::new(), Some(&redis), 3).await;
    assert!(burst(&sidecars, "/acme/payu/x", 3)
        .await
        .iter()
        .all(|s| *s == 200));
    assert_eq!(s.providers.token_requests(Shape::PayU), 1);
    // The provider revokes the token; one sidecar meets the 401, purges and replays.
    s.issued.revoke_subject("acme-payu-client");
    assert_eq!(sidecars[0].get("/acme/payu/x").await.status(), 200);
    assert_eq!(s.providers.token_requests(Shape::PayU), 2);
    assert_eq!(
        s.upstream.refusals().len(),
        1,
        "the upstream refused the token once"
    );
    // The others hear of it and drop the token before sending it again.
    eventually("the others dropped the refused token", async || {
        let mut dropped = true;
        for sidecar in &sidecars[1..] {
            dropped &= sidecar.fingerprint("acme-payu").await.is_none();
        }
        dropped
    })
    .await;
    for sidecar in &sidecars[1..] {
        assert_eq!(sidecar.get("/acme/payu/x").await.status(), 200);
    }
    assert_eq!(
        s.upstream.refusals().len(),
        1,
        "no other sidecar sent the refused token"
    );
    assert_eq!(
        s.providers.token_requests(Shape::PayU),
        2,
        "the fleet shares the new token"
    );
    let fingerprints: Vec<_> =
        futures_util::future::join_all(sidecars.iter().map(|s| s.fingerprint("acme-payu"))).await;
    assert!(fingerprints.windows(2).all(|w| w[0] == w[1]), "{fingerprints:?}");
}

/// A revocation refuses every token the provider had issued, the fleet's newer one as well as
/// the one this sidecar sent: the replay after the 401 does not take the fleet's token issued
/// before the refused request was sent (it would be refused too, and the client would get the
/// 401), but fetches one issued after it.
#[tokio::test]
async fn a_replay_after_a_revocation_takes_no_token_issued_before_the_refused_request() {
    let Some(redis) =
        RedisServer::start("a_replay_after_a_revocation_takes_no_token_issued_before_the_refused_request")
    else {
        return;
    };
    let (s, sidecars) = fleet(ManualClock::new(), Some(&redis), 2).await;
    assert_eq!(sidecars[0].get("/acme/payu/x").await.status(), 200);
    // The fleet's copy goes (as when it expires in Redis first): the second sidecar fetches a
    // newer token and stores it, while the first still holds its own.
    let ids = fleet_ids(&redis);
    assert_eq!(ids.len(), 1, "{:?}", redis.keys());
    redis.command(&["DEL", &format!("{KEY_PREFIX}{{{}}}:token", ids[0])]);
    assert_eq!(sidecars[1].get("/acme/payu/x").await.status(), 200);
    assert_eq!(s.providers.token_requests(Shape::PayU), 2);
    let (first, second) = (
        sidecars[0].fingerprint("acme-payu").await,
        sidecars[1].fingerprint("acme-payu").await,
    );
    assert!(first.is_some() && first != second, "{first:?} {second:?}");

    s.issued.revoke_subject("acme-payu-client");
    let status = sidecars[0].get("/acme/payu/x").await.status();
    let refusals = s.upstream.refusals().len();
    assert_eq!(
        status, 200,
        "the replay was sent with a token issued after the revocation ({refusals} refusals)"
    );
    assert_eq!(refusals, 1, "only the token first sent was refused");
    assert_eq!(s.providers.token_requests(Shape::PayU), 3);
}

#[tokio::test]
async fn redis_down_changes_nothing_for_requests_and_sharing_resumes_when_it_is_back() {
    let Some(mut redis) = RedisServer::start("redis_down_changes_nothing_for_requests") else {
        return;
    };
    let (s, sidecars) = fleet(ManualClock::new(), Some(&redis), 3).await;
    assert!(burst(&sidecars, "/acme/payu/x", 3)
        .await
        .iter()
        .all(|s| *s == 200));
    redis.kill();

    // Cached tokens, a cold credential and a forced refresh all work without Redis.
    assert!(burst(&sidecars, "/acme/payu/x", 6)
        .await
        .iter()
        .all(|s| *s == 200));
    assert!(burst(&sidecars, "/acme/nuapay/x", 3)
        .await
        .iter()
        .all(|s| *s == 200));
    let forced = sidecars[0]
        .client
        .post(format!(
            "http://{}/tokens/acme-payu/refresh?force=true",
            sidecars[0].admin
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(forced.status(), 200);
    assert!(sidecars[0].event("fallback").await >= 1.0);
    assert!(sidecars[0].event("redis_error").await >= 1.0);

    redis.restart().unwrap();
    let refresh = |i: usize| {
        let sidecar = sidecars[i].clone();
        async move {
            let url = format!("http://{}/tokens/acme-payu/refresh?force=true", sidecar.admin);
            sidecar.client.post(url).send().await.unwrap().status()
        }
    };
    // Once its pause after the failures is over, a sidecar stores its fetch in Redis again…
    let misses = sidecars[0].event("miss").await;
    eventually("sidecar 0 uses Redis again", async || {
        assert_eq!(refresh(0).await, 200);
        sidecars[0].event("miss").await > misses
    })
    .await;
    // …and another takes it from there instead of fetching.
    let fetches = s.providers.token_requests(Shape::PayU);
    let hits = sidecars[1].event("hit").await;
    eventually("sidecar 1 takes the shared token", async || {
        assert_eq!(refresh(1).await, 200);
        sidecars[1].event("hit").await > hits
    })
    .await;
    assert!(
        s.providers.token_requests(Shape::PayU) <= fetches + 1,
        "sharing resumed: at most one fetch while sidecar 1's own pause ran out"
    );
}

#[tokio::test]
async fn no_token_and_no_secret_is_readable_in_redis() {
    let Some(redis) = RedisServer::start("no_token_and_no_secret_is_readable_in_redis") else {
        return;
    };
    let (s, sidecars) = fleet(ManualClock::new(), Some(&redis), 3).await;
    for path in ["/acme/payu/x", "/acme/nuapay/x"] {
        assert!(burst(&sidecars, path, 6).await.iter().all(|s| *s == 200));
    }
    s.providers.set_failing(Some(Failure {
        status: 401,
        retry_after: None,
        body: r#"{"error":"invalid_client"}"#.into(),
    }));
    let url = format!("http://{}/tokens/acme-payu/refresh?force=true", sidecars[0].admin);
    sidecars[0].client.post(url).send().await.unwrap();

    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let mut forbidden = vec![
        "dev-payu-secret".to_owned(),
        "dev-nuapay-api-key".to_owned(),
        encryption_key(),
        hex::encode([7u8; 32]),
    ];
    for subject in ["acme-payu-client", "ybo8zd8j2q"] {
        for token in s.issued.tokens_of(subject) {
            forbidden.push(b64(&token));
            forbidden.push(hex::encode(&token));
            forbidden.push(token);
        }
    }
    assert!(forbidden.len() > 6, "tokens were issued");
    let keys = redis.keys();
    assert!(keys.len() >= 2, "{keys:?}");
    for key in &keys {
        assert!(key.starts_with(KEY_PREFIX), "nothing outside key_prefix: {key}");
        for answer in [redis.command(&["GET", key]), redis.command(&["DUMP", key])]
            .into_iter()
            .flatten()
        {
            for secret in &forbidden {
                assert!(!answer.contains(secret.as_str()), "{key} holds a token or secret");
                assert!(!key.contains(secret.as_str()));
            }
        }
    }
}

#[tokio::test]
async fn a_cold_failing_endpoint_is_probed_as_one_by_the_fleet() {
    let Some(redis) = RedisServer::start("a_cold_failing_endpoint_is_probed_as_one_by_the_fleet") else {
        return;
    };
    let (s, sidecars) = fleet(ManualClock::new(), Some(&redis), 3).await;
    s.providers.set_failing(Some(Failure::status(503)));
    let started = std::time::Instant::now();
    for i in 0..100 {
        assert_eq!(sidecars[i % 3].get("/acme/payu/x").await.status(), 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fetches = s.providers.token_requests(Shape::PayU);
    eprintln!(
        "cold 503 endpoint, 3 sidecars sharing Redis: 100 requests over {:?}, {fetches} token requests",
        started.elapsed()
    );
    assert!(fetches <= 6, "{fetches} token requests");
}

/// Steady traffic on three sidecars over three 10 s lifetimes (real time): the fleet refreshes
/// once per lifetime, not once per sidecar.
#[tokio::test]
async fn steady_traffic_on_three_sidecars_fetches_about_once_per_lifetime() {
    let Some(redis) = RedisServer::start("steady_traffic_on_three_sidecars") else {
        return;
    };
    let fetches = steady(Some(&redis), 3, Duration::from_secs(30)).await;
    eprintln!("30 s of 10 s tokens, 3 sidecars with Redis: {fetches} token fetches");
    // One sidecar refreshes every 7.5 s (25 % ahead of expiry): 0, 7.5, 15, 22.5, 30 s — five
    // fetches. The fleet makes as many as one sidecar would, not three times as many.
    assert!((3..=6).contains(&fetches), "{fetches} fetches over 3 lifetimes");
}

/// Nuapay's 10 s tokens, each sidecar asking every 200 ms for `duration`; the fetches made.
async fn steady(redis: Option<&RedisServer>, size: usize, duration: Duration) -> usize {
    let clock: SharedClock = Arc::new(SystemClock);
    let (s, sidecars) = fleet(clock, redis, size).await;
    let deadline = std::time::Instant::now() + duration;
    let traffic = sidecars.iter().map(|sidecar| {
        let sidecar = sidecar.clone();
        tokio::spawn(async move {
            while std::time::Instant::now() < deadline {
                assert_eq!(sidecar.get("/acme/nuapay/x").await.status(), 200);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    for task in futures_util::future::join_all(traffic).await {
        task.unwrap();
    }
    s.providers.token_requests(Shape::Nuapay)
}

/// The figures for the fleet table: 1 vs 3 sidecars, without and with Redis, for a cold burst
/// and for 60 s of 10 s tokens. Slow (4 minutes): `cargo test --test it fleet_figures -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn fleet_figures() {
    let Some(redis) = RedisServer::start("fleet_figures") else {
        return;
    };
    for (size, shared) in [(1, None), (3, None), (1, Some(&redis)), (3, Some(&redis))] {
        redis.command(&["FLUSHALL"]);
        let (s, sidecars) = fleet(ManualClock::new(), shared, size).await;
        burst(&sidecars, "/acme/payu/x", 300).await;
        let cold = s.providers.token_requests(Shape::PayU);
        drop(sidecars);
        redis.command(&["FLUSHALL"]);
        let steady = steady(shared, size, Duration::from_secs(60)).await;
        let with = if shared.is_some() {
            "with Redis"
        } else {
            "without Redis"
        };
        eprintln!("| {size} sidecar(s) {with} | {cold} | {steady} |");
    }
}

/// The fleet identity of each credential, as its keys in Redis name it (after one fetch each).
fn fleet_ids(redis: &RedisServer) -> Vec<String> {
    let mut ids: Vec<String> = redis
        .keys()
        .iter()
        .filter_map(|key| {
            key.strip_prefix(&format!("{KEY_PREFIX}{{"))?
                .strip_suffix("}:token")
        })
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids
}

/// Whether `key` holds a string in `redis` (as the sidecar writes every value).
fn is_string(redis: &RedisServer, key: &str) -> bool {
    redis
        .command(&["TYPE", key])
        .is_some_and(|answer| answer.starts_with("+string"))
}

/// Control keys forged in Redis (a back-off with no TTL and a message of its own, a lock with
/// no TTL, a token key of the wrong type) change nothing for requests, and sharing repairs
/// itself.
#[tokio::test]
async fn forged_or_broken_control_keys_in_redis_change_nothing_for_requests() {
    let Some(redis) =
        RedisServer::start("forged_or_broken_control_keys_in_redis_change_nothing_for_requests")
    else {
        return;
    };
    let s = StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap();
    s.providers.set_lifetime(Shape::Nuapay, Duration::from_secs(3600));
    let config = fleet_config(&s, Some(&redis));
    {
        // One sidecar fetches both credentials, so that their keys can be found and forged.
        let first = BinarySidecar::start(&s, &config);
        assert_eq!(first.get("/acme/payu/x").await.status(), 200);
        assert_eq!(first.get("/acme/nuapay/x").await.status(), 200);
    }
    let ids = fleet_ids(&redis);
    assert_eq!(ids.len(), 2, "{:?}", redis.keys());
    for id in &ids {
        let key = |suffix: &str| format!("{KEY_PREFIX}{{{id}}}:{suffix}");
        redis.command(&["DEL", &key("token")]);
        let forged = r#"{"message":"FORGED TEXT","rejected":[401,"invalid_client"]}"#;
        redis.command(&["SET", &key("backoff"), forged]);
        redis.command(&["SET", &key("lock"), "stuck"]);
        redis.command(&["SET", &key("failures"), "999999"]);
    }
    // And the second credential's token key holds a hash.
    let wrong_type = format!("{KEY_PREFIX}{{{}}}:token", ids[1]);
    redis.command(&["HSET", &wrong_type, "field", "value"]);
    let (payu_before, nuapay_before) = (
        s.providers.token_requests(Shape::PayU),
        s.providers.token_requests(Shape::Nuapay),
    );

    let sidecars: Vec<_> = (0..3)
        .map(|_| Arc::new(BinarySidecar::start(&s, &config)))
        .collect();
    let started = std::time::Instant::now();
    for path in ["/acme/payu/x", "/acme/nuapay/x"] {
        let statuses = burst(&sidecars, path, 30).await;
        assert!(statuses.iter().all(|s| *s == 200), "{path}: {statuses:?}");
    }
    let took = started.elapsed();
    let fetches = (
        s.providers.token_requests(Shape::PayU) - payu_before,
        s.providers.token_requests(Shape::Nuapay) - nuapay_before,
    );
    eprintln!("forged back-off, TTL-less lock, bad failure count and a wrong-type token key: 60 cold requests over 3 sidecars all 200 in {took:?}, token calls (payu, nuapay) = {fetches:?}");
    assert!(
        took < Duration::from_secs(5),
        "no request waited out the forged lock: {took:?}"
    );
    assert!(fetches.0 <= 2 && fetches.1 <= 3, "{fetches:?}");
    for sidecar in &sidecars {
        assert_eq!(
            sidecar.event("redis_error").await,
            0.0,
            "a bad key is not Redis down"
        );
        let forced = sidecar
            .client
            .post(format!(
                "http://{}/tokens/acme-payu/refresh?force=true",
                sidecar.admin
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(forced.status(), 200);
        let logs = sidecar.logs.lock().unwrap().join("\n");
        assert!(
            !logs.contains("FORGED TEXT"),
            "text from Redis was never passed on"
        );
    }
    for id in &ids {
        let token = format!("{KEY_PREFIX}{{{id}}}:token");
        assert!(is_string(&redis, &token), "the token key was repaired: {token}");
        let lock_ttl = redis
            .command(&["PTTL", &format!("{KEY_PREFIX}{{{id}}}:lock")])
            .unwrap();
        assert!(
            !lock_ttl.starts_with(":-1"),
            "no TTL-less lock is left: {lock_ttl}"
        );
    }
}

/// Waits (without blocking the stand-ins, which its shutdown may call) for `sidecar` to exit;
/// whether it exited 0.
async fn stopped(sidecar: &mut BinarySidecar) -> bool {
    for _ in 0..400 {
        if let Some(status) = sidecar.child.try_wait().unwrap() {
            return status.success();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the sidecar did not stop within 20 s");
}

/// A rolling deploy: one sidecar's SIGTERM does not revoke the token the others still send;
/// the last one to stop revokes it.
#[tokio::test]
async fn only_the_last_sidecar_of_the_fleet_to_stop_revokes_a_shared_token() {
    let Some(redis) = RedisServer::start("only_the_last_sidecar_of_the_fleet_to_stop_revokes_a_shared_token")
    else {
        return;
    };
    let s = StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap();
    s.providers.set_lifetime(Shape::Nuapay, Duration::from_secs(3600));
    let config = fleet_config(&s, Some(&redis)).replace(
        "api_key = \"dev-nuapay-api-key\"",
        "api_key = \"dev-nuapay-api-key\"\nrevoke_on_shutdown = true",
    );
    let mut sidecars: Vec<_> = (0..3).map(|_| BinarySidecar::start(&s, &config)).collect();
    for sidecar in &sidecars {
        assert_eq!(sidecar.get("/acme/nuapay/x").await.status(), 200);
    }
    assert_eq!(s.providers.token_requests(Shape::Nuapay), 1);
    for stopping in 0..2 {
        let mut sidecar = sidecars.remove(0);
        sidecar.signal("-TERM");
        assert!(
            stopped(&mut sidecar).await,
            "sidecar {stopping} stopped gracefully"
        );
        assert!(
            s.providers.revocations().is_empty(),
            "sidecar {stopping}'s stop revoked nothing"
        );
        for serving in &sidecars {
            let response = serving
                .client
                .post(format!("http://{}/acme/nuapay/pay", serving.proxy))
                .body(vec![b'x'; 2 * 1024 * 1024])
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                200,
                "a body too large to replay still goes through"
            );
        }
    }
    let mut last = sidecars.remove(0);
    last.signal("-TERM");
    assert!(stopped(&mut last).await);
    let logs = last.logs.lock().unwrap().join("\n");
    assert_eq!(
        s.providers.revocations().len(),
        1,
        "the last sidecar revoked the token: {logs}"
    );
    assert_eq!(s.providers.token_requests(Shape::Nuapay), 1);
}

/// A sidecar whose secret was rotated (or is wrong) is not served the token the others
/// fetched with the old one: its credential is another one for the fleet.
#[tokio::test]
async fn a_sidecar_with_another_secret_is_not_served_the_fleets_token() {
    let Some(redis) = RedisServer::start("a_sidecar_with_another_secret_is_not_served_the_fleets_token")
    else {
        return;
    };
    let (_stand_ins, sidecars) = fleet(ManualClock::new(), Some(&redis), 2).await;
    assert_eq!(sidecars[0].get("/acme/payu/x").await.status(), 200);
    std::fs::write(sidecars[1].dir.path().join("secrets/payu"), "a-wrong-secret\n").unwrap();
    let (status, body) = sidecars[1].reload().await;
    assert_eq!(status, 200, "{body}");
    let refused = sidecars[1].get("/acme/payu/x").await;
    assert_eq!(refused.status(), 503, "the wrong secret gets no token");
    assert_eq!(refused.headers()["x-token-sidecar-error"], "token_unavailable");
    assert_eq!(
        sidecars[0].get("/acme/payu/x").await.status(),
        200,
        "the others go on"
    );
    let identities = fleet_ids(&redis).len();
    assert_eq!(identities, 1, "only the right secret's token is stored");
}
