//! Token lifecycle under controlled time: steady traffic over several lifetimes of each
//! lifetime class, proactive refresh, retries with growing gaps, Retry-After, concurrent 401s,
//! and revocation at shutdown.

use std::time::Duration;

use token_sidecar::dev::providers::{Failure, Shape};

use crate::support::{secs, Harness, ANY_PORT};

/// Requests every `lifetime / 20` for three lifetimes, and, like any traffic of more than one
/// request a minute, one in the last minute of each token; returns the token fetches made.
async fn steady_traffic(
    h: &Harness,
    path: &str,
    credential: &str,
    shape: Shape,
    lifetime: Duration,
) -> usize {
    let step = lifetime / 20;
    let last_minute = Duration::from_secs(60);
    for _ in 0..60 {
        let (status, echo) = h.get_json(path).await;
        assert_eq!(status, 200, "{echo}");
        h.settle().await;
        let expires_in =
            Duration::from_millis(h.token_state(credential).await["expires_in_ms"].as_u64().unwrap());
        if lifetime > last_minute * 4 && expires_in > last_minute && expires_in - last_minute < step {
            let to_last_minute = expires_in - last_minute;
            h.advance(to_last_minute);
            assert_eq!(h.get_json(path).await.0, 200);
            h.settle().await;
            h.advance(step - to_last_minute);
        } else {
            h.advance(step);
        }
    }
    assert!(
        h.stand_ins.upstream.refusals().is_empty(),
        "no expired token was ever sent"
    );
    let misses = h
        .metric(&format!(
            "token_sidecar_token_cache_misses_total{{credential=\"{credential}\"}}"
        ))
        .await;
    assert_eq!(misses, 1.0, "only the first request waited for a token");
    let fetches = h.stand_ins.providers.token_requests(shape);
    eprintln!("lifetime {lifetime:?}: {fetches} token fetches over 3 lifetimes of steady traffic");
    fetches
}

#[tokio::test]
async fn ten_second_tokens_over_three_lifetimes() {
    let h = Harness::start().await;
    let fetches = steady_traffic(&h, "/acme/nuapay/p", "acme-nuapay", Shape::Nuapay, secs(10)).await;
    assert!((2..=4).contains(&fetches), "3 lifetimes ±1, got {fetches}");
}

#[tokio::test]
async fn fifteen_minute_tokens_over_three_lifetimes() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_lifetime(Shape::Setu, secs(900));
    let fetches = steady_traffic(&h, "/acme/setu/p", "acme-setu", Shape::Setu, secs(900)).await;
    assert!((2..=4).contains(&fetches), "3 lifetimes ±1, got {fetches}");
}

#[tokio::test]
async fn one_hour_tokens_over_three_lifetimes() {
    let h = Harness::start().await;
    let fetches = steady_traffic(&h, "/acme/booking/p", "acme-booking", Shape::Booking, secs(3600)).await;
    assert!((2..=4).contains(&fetches), "3 lifetimes ±1, got {fetches}");
}

#[tokio::test]
async fn two_hour_tokens_over_three_lifetimes() {
    let h = Harness::start().await;
    let fetches = steady_traffic(&h, "/acme/payu/p", "acme-payu", Shape::PayU, secs(7200)).await;
    assert!((2..=4).contains(&fetches), "3 lifetimes ±1, got {fetches}");
}

#[tokio::test]
async fn one_year_tokens_over_three_lifetimes() {
    let year = secs(31_556_926);
    let h = Harness::with_config(|s| {
        s.config_toml(any(), any()).replace(
            "api_key = \"dev-nuapay-api-key\"",
            "api_key = \"dev-nuapay-api-key\"\nexpires_in = \"31556926s\"",
        )
    })
    .await;
    let fetches = steady_traffic(&h, "/acme/nuapay/p", "acme-nuapay", Shape::Nuapay, year).await;
    assert!((2..=4).contains(&fetches), "3 lifetimes ±1, got {fetches}");
    assert!(h.stand_ins.providers.seen()[0]
        .body
        .contains("\"expiresIn\":31556926"));
}

#[tokio::test]
async fn recently_used_credentials_are_refreshed_before_the_next_request() {
    let h = Harness::start().await;
    assert_eq!(h.get_json("/acme/nuapay/p").await.0, 200);
    h.advance(Duration::from_millis(8_000)); // into the refresh window, no request
    let mut refreshed = false;
    for _ in 0..100 {
        if h.stand_ins.providers.token_requests(Shape::Nuapay) == 2 {
            refreshed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refreshed, "the refresher fetched ahead of expiry");
    h.settle().await;
    h.advance(secs(3)); // the old token's end
    assert_eq!(h.get_json("/acme/nuapay/p").await.0, 200);
    let misses = h
        .metric("token_sidecar_token_cache_misses_total{credential=\"acme-nuapay\"}")
        .await;
    assert_eq!(misses, 1.0, "the request after expiry found a fresh token");
    assert!(h.stand_ins.upstream.refusals().is_empty());
}

#[tokio::test]
async fn idle_credentials_are_not_refreshed() {
    let h = Harness::start().await;
    assert_eq!(h.get_json("/acme/payu/p").await.0, 200);
    h.advance(secs(7200 - 100)); // refresh due, but last used long ago
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(h.stand_ins.providers.token_requests(Shape::PayU), 1);
}

#[tokio::test]
async fn server_errors_are_retried_with_growing_gaps_then_backed_off() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_failing(Some(Failure::status(503)));
    let response = h.get("/acme/payu/p").await;
    assert_eq!(response.status(), 503);
    let seen = h.stand_ins.providers.seen();
    assert!(
        seen.len() >= 3,
        "retried within the budget: {} attempts",
        seen.len()
    );
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "gaps grow: {gaps:?}");

    // Back-off: more requests do not reach the endpoint until it passes.
    let attempts = seen.len();
    for _ in 0..10 {
        assert_eq!(h.get("/acme/payu/p").await.status(), 503);
    }
    assert_eq!(h.stand_ins.providers.token_requests(Shape::PayU), attempts);
}

#[tokio::test]
async fn rate_limiting_retry_after_is_honoured() {
    let h = Harness::start().await;
    // A short Retry-After fits in the waiting request's budget: it waits, then succeeds.
    h.stand_ins.providers.fail_next(
        1,
        Failure {
            status: 429,
            retry_after: Some(1),
            body: "{}".into(),
        },
    );
    assert_eq!(h.get_json("/acme/payu/p").await.0, 200);
    let seen = h.stand_ins.providers.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].at - seen[0].at >= Duration::from_millis(950),
        "waited as asked"
    );

    // A long one does not: 503 at once, carrying it, and nothing is sent before it passes.
    let h = Harness::start().await;
    h.stand_ins.providers.set_failing(Some(Failure {
        status: 429,
        retry_after: Some(120),
        body: "{}".into(),
    }));
    let response = h.get("/acme/payu/p").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "120");
    h.advance(secs(100));
    assert_eq!(h.get("/acme/payu/p").await.status(), 503);
    assert_eq!(h.stand_ins.providers.token_requests(Shape::PayU), 1);
    h.stand_ins.providers.set_failing(None);
    h.advance(secs(21));
    assert_eq!(h.get_json("/acme/payu/p").await.0, 200);
}

#[tokio::test]
async fn rejected_credentials_are_not_retried_or_hammered() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_failing(Some(Failure {
        status: 401,
        retry_after: None,
        body: r#"{"error":"invalid_client"}"#.into(),
    }));
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(h.get("/acme/payu/p").await.status(), 503);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "answered quickly");
    assert_eq!(h.stand_ins.providers.token_requests(Shape::PayU), 1);
}

#[tokio::test]
async fn concurrent_401s_cause_one_new_fetch() {
    let h = Harness::start().await;
    assert_eq!(h.get_json("/acme/payu/p").await.0, 200);
    h.stand_ins.issued.revoke_subject("acme-payu-client");
    let requests = (0..20).map(|_| h.client.get(h.url("/acme/payu/p")).send());
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    assert_eq!(
        h.stand_ins.providers.token_requests(Shape::PayU),
        2,
        "one fetch replaced the revoked token"
    );
}

#[tokio::test]
async fn nuapay_tokens_are_revoked_at_shutdown_when_asked() {
    let h = Harness::with_config(|s| {
        s.config_toml(any(), any()).replace(
            "api_key = \"dev-nuapay-api-key\"",
            "api_key = \"dev-nuapay-api-key\"\nrevoke_on_shutdown = true",
        )
    })
    .await;
    assert_eq!(h.get_json("/acme/nuapay/p").await.0, 200);
    let token = h.stand_ins.issued.tokens_of("ybo8zd8j2q").pop().unwrap();
    let Harness {
        sidecar, stand_ins, ..
    } = h;
    sidecar.shutdown().await;
    assert_eq!(stand_ins.providers.revocations().len(), 1);
    assert!(
        stand_ins.issued.check(&token).is_err(),
        "the token no longer works"
    );
}

fn any() -> std::net::SocketAddr {
    ANY_PORT.parse().unwrap()
}

#[tokio::test]
async fn a_slow_token_endpoint_times_out_per_provider_settings() {
    let h = Harness::with_config(|s| {
        let payu_url = format!("token_url = \"https://{}/oauth/token\"", s.token_addr);
        s.config_toml(any(), any())
            .replace(&payu_url, &format!("{payu_url}\ntimeout = \"200ms\""))
    })
    .await;
    h.stand_ins.providers.set_latency(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let response = h.get("/acme/payu/p").await;
    assert_eq!(response.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "gave up within the retry budget"
    );
    let last_error = h.token_state("acme-payu").await["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        last_error.starts_with("127.0.0.1:") && last_error.ends_with("token endpoint timed out"),
        "the endpoint's host, then the reason: {last_error}"
    );
}

/// After the first failed retry burst, a credential in back-off makes one probe per back-off
/// period (the period doubling), not a new burst each time.
#[tokio::test]
async fn a_cold_failing_endpoint_gets_one_probe_per_back_off_period() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_failing(Some(Failure::status(503)));
    let mut refused = 0;
    for _ in 0..100 {
        if h.get("/acme/payu/x").await.status() == 503 {
            refused += 1;
        }
        h.advance(Duration::from_millis(50));
    }
    let fetches = h.stand_ins.providers.token_requests(Shape::PayU);
    eprintln!("cold endpoint answering 503: 100 requests over 5 s made {fetches} token requests");
    assert_eq!(refused, 100);
    assert!(
        fetches <= 6,
        "100 requests over 5 s made {fetches} token requests"
    );
}
