//! The token cache under load, time and faults: one fetch for many waiters, a 10 s token
//! reused for most of its life and never sent expired, 401 → purge and replay, and a failing
//! endpoint answered with 503 without being hammered. Time is the harness's manual clock.

use std::time::Duration;

use token_sidecar::dev::issued::Refusal;
use token_sidecar::dev::providers::{Failure, Shape};

use crate::support::{secs, Harness};

#[tokio::test]
async fn concurrent_cold_requests_share_one_fetch() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_latency(Duration::from_millis(300));
    let requests = (0..200).map(|i| {
        let request = h.client.get(h.url(&format!("/acme/payu/links/{i}"))).send();
        async move { request.await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| matches!(s, Ok(200))), "{statuses:?}");
    assert_eq!(h.stand_ins.providers.token_requests(Shape::PayU), 1);
    assert_eq!(h.stand_ins.upstream.accepted(), 200);
}

#[tokio::test]
async fn a_ten_second_token_is_reused_and_never_sent_expired() {
    let h = Harness::start().await;
    let mut fetches_after = Vec::new();
    for _second in 0..60 {
        let (status, echo) = h.get_json("/acme/nuapay/payments").await;
        assert_eq!(status, 200, "{echo}");
        fetches_after.push(h.stand_ins.providers.token_requests(Shape::Nuapay));
        h.advance(secs(1));
    }
    assert_eq!(
        fetches_after[6], 1,
        "one token serves the first 7 s: {fetches_after:?}"
    );
    let total = *fetches_after.last().unwrap();
    assert!(
        (6..=9).contains(&total),
        "about one fetch per 7.5-10 s over 60 s, got {total}"
    );
    assert!(
        h.stand_ins.upstream.refusals().is_empty(),
        "no expired token was ever sent"
    );
}

#[tokio::test]
async fn a_token_is_not_sent_in_its_last_second() {
    let h = Harness::start().await;
    assert_eq!(h.get_json("/acme/nuapay/x").await.0, 200);
    // 9.2 s into a 10 s token: inside the expiry margin, so a new one is fetched first.
    h.advance(Duration::from_millis(9_200));
    assert_eq!(h.get_json("/acme/nuapay/x").await.0, 200);
    assert_eq!(h.stand_ins.providers.token_requests(Shape::Nuapay), 2);
    assert!(h.stand_ins.upstream.refusals().is_empty());
}

#[tokio::test]
async fn upstream_401_purges_the_token_and_replays_once() {
    let h = Harness::start().await;
    assert_eq!(h.get_json("/acme/payu/x").await.0, 200);
    h.stand_ins.issued.revoke_subject("acme-payu-client");

    let response = h
        .client
        .post(h.url("/acme/payu/orders"))
        .body(r#"{"amount":100}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "replayed with a fresh token");
    let echo: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echo["body_bytes"], 14, "the replay carried the same body");
    assert_eq!(h.stand_ins.providers.token_requests(Shape::PayU), 2);
    assert_eq!(h.stand_ins.upstream.refusals(), vec![Refusal::Revoked]);
    let metrics = h.metrics_text().await;
    assert!(
        metrics.contains("token_sidecar_upstream_401_retries_total{route=\"/acme/payu\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_body_too_large_to_keep_is_not_replayed() {
    let h = Harness::start().await;
    assert_eq!(h.get_json("/acme/payu/x").await.0, 200);
    h.stand_ins.issued.revoke_subject("acme-payu-client");
    let big = vec![b'x'; 2 * 1024 * 1024];
    let response = h
        .client
        .post(h.url("/acme/payu/uploads"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the upstream's 401 goes back");
    assert!(response.headers().get("x-token-sidecar-error").is_none());
    // The refused token was purged: the next request gets a fresh one.
    assert_eq!(h.get_json("/acme/payu/x").await.0, 200);
    assert_eq!(h.stand_ins.providers.token_requests(Shape::PayU), 2);
}

#[tokio::test]
async fn a_failing_endpoint_gets_503_with_retry_after_and_is_not_hammered() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_failing(Some(Failure::status(503)));
    let mut attempts = 0;
    for i in 0..20 {
        let response = h.get("/acme/payu/x").await;
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["x-token-sidecar-error"], "token_unavailable");
        assert!(response.headers().contains_key("retry-after"));
        if i == 0 {
            attempts = h.stand_ins.providers.token_requests(Shape::PayU);
        }
    }
    assert_eq!(
        h.stand_ins.providers.token_requests(Shape::PayU),
        attempts,
        "during the back-off no request reaches the endpoint"
    );

    h.advance(secs(1));
    assert_eq!(h.get("/acme/payu/x").await.status(), 503);
    assert!(
        h.stand_ins.providers.token_requests(Shape::PayU) > attempts,
        "tried again after the back-off"
    );

    h.stand_ins.providers.set_failing(None);
    h.advance(secs(2));
    assert_eq!(
        h.get_json("/acme/payu/x").await.0,
        200,
        "recovers once the endpoint does"
    );
    assert!(h.stand_ins.upstream.refusals().is_empty());
}

#[tokio::test]
async fn rejected_credentials_fail_fast_with_a_secret_free_reason() {
    let h = Harness::start().await;
    h.stand_ins.providers.fail_next(
        1,
        Failure {
            status: 401,
            retry_after: None,
            body: r#"{"error":"invalid_client","error_description":"secret dev-payu-secret is wrong"}"#
                .into(),
        },
    );
    let response = h.get("/acme/payu/x").await;
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry_after >= 30,
        "rejected credentials are not retried soon: {retry_after}"
    );
    let body = response.text().await.unwrap();
    assert!(body.contains("invalid_client"), "{body}");
    assert!(!body.contains("dev-payu-secret"), "{body}");

    let state = h.token_state("acme-payu").await;
    assert_eq!(state["state"], "failing");
    assert!(state["last_error"]
        .as_str()
        .unwrap()
        .contains("401: invalid_client"));
    assert!(!state.to_string().contains("dev-payu-secret"));
}

#[tokio::test]
async fn a_malformed_answer_is_an_error_not_a_token() {
    let h = Harness::start().await;
    h.stand_ins
        .providers
        .set_malformed(Some(r#"{"token":"x"}"#.into()));
    let response = h.get("/acme/payu/x").await;
    assert_eq!(response.status(), 503);
    let state = h.token_state("acme-payu").await;
    let last_error = state["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(
        last_error.starts_with("127.0.0.1:")
            && last_error.ends_with("token endpoint answer unusable: answer has no token field"),
        "the endpoint's host, then the reason: {last_error}"
    );
}

#[tokio::test]
async fn a_cached_token_outlives_an_endpoint_outage() {
    let h = Harness::start().await;
    assert_eq!(h.get_json("/acme/payu/x").await.0, 200);
    h.stand_ins.providers.set_failing(Some(Failure::status(500)));
    // Into the 2 h token's refresh window: refreshes fail, the cached token keeps working.
    h.advance(secs(7200 - 200));
    for _ in 0..5 {
        assert_eq!(h.get_json("/acme/payu/x").await.0, 200);
        h.advance(secs(10));
    }
    assert!(
        h.stand_ins.providers.token_requests(Shape::PayU) >= 2,
        "a refresh was attempted"
    );
    assert!(h.stand_ins.upstream.refusals().is_empty());
}

/// Legacy clients with short timeouts in front of a slow provider: the fetch the first one
/// started runs to its end, and its token serves everyone after.
#[tokio::test]
async fn a_fetch_outlives_the_impatient_clients_that_started_it_and_its_token_is_cached() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_latency(Duration::from_secs(3));
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    for _ in 0..2 {
        let gave_up = impatient.get(h.url("/acme/payu/x")).send().await;
        assert!(gave_up.is_err(), "a 3 s fetch cannot answer a 1 s client");
    }
    // The endpoint answers the first fetch 3 s after it was asked.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let patient = std::time::Instant::now();
    assert_eq!(h.get_json("/acme/payu/x").await.0, 200);
    let waited = patient.elapsed();
    let fetches = h.stand_ins.providers.token_requests(Shape::PayU);
    eprintln!("2 clients giving up after 1 s on a 3 s endpoint, then a patient one: {fetches} token request(s), the patient one waited {waited:?}");
    assert_eq!(fetches, 1, "the first fetch was neither cancelled nor repeated");
    assert!(
        waited < Duration::from_millis(900),
        "the token was cached: {waited:?}"
    );
}

/// The endpoint recovers; requests go on every 500 ms (of the harness's clock): how long until
/// one is served.
async fn recovery_lag(h: &Harness) -> Duration {
    h.stand_ins.providers.set_failing(None);
    let mut lag = Duration::ZERO;
    while h.get("/acme/payu/x").await.status() != 200 {
        h.advance(Duration::from_millis(500));
        lag += Duration::from_millis(500);
        assert!(lag < secs(60), "not recovered 60 s after the endpoint did");
    }
    lag
}

/// A 15 s outage of `503` + `Retry-After: 2` under steady requests: the back-off follows the
/// provider's own `Retry-After`, not a doubling past it, so recovery shows within seconds.
#[tokio::test]
async fn recovery_after_an_outage_is_seen_within_the_providers_retry_after() {
    let h = Harness::start().await;
    let outage = Failure {
        status: 503,
        retry_after: Some(2),
        body: r#"{"error":"temporarily_unavailable"}"#.into(),
    };
    h.stand_ins.providers.set_failing(Some(outage));
    for _ in 0..30 {
        assert_eq!(h.get("/acme/payu/x").await.status(), 503);
        h.advance(Duration::from_millis(500));
    }
    let during = h.stand_ins.providers.token_requests(Shape::PayU);
    let lag = recovery_lag(&h).await;
    eprintln!("15 s outage with Retry-After: 2: {during} token requests during it, recovery seen {lag:?} after the endpoint recovered");
    assert!(lag <= secs(2), "recovery lag {lag:?}");
    assert!(
        during <= 4 + 15 / 2 + 1,
        "{during} token requests: one probe per Retry-After"
    );
}

/// Without a `Retry-After`, the back-off doubles (for background refreshes), but a request
/// with no token probes at least every `max_probe_interval`.
#[tokio::test]
async fn waiting_requests_probe_a_failing_endpoint_every_few_seconds_however_long_it_failed() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_failing(Some(Failure::status(503)));
    for _ in 0..120 {
        h.get("/acme/payu/x").await;
        h.advance(Duration::from_millis(500));
    }
    let during = h.stand_ins.providers.token_requests(Shape::PayU);
    let lag = recovery_lag(&h).await;
    eprintln!(
        "60 s outage without Retry-After: {during} token requests during it, recovery seen {lag:?} after"
    );
    assert!(lag <= secs(5), "recovery lag {lag:?}");
    assert!(
        during <= 4 + 60 / 5 + 3,
        "{during} token requests in 60 s: about one probe per 5 s"
    );
}
