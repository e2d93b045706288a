//! The admin listener: health, readiness, `/tokens` (fingerprints, never tokens), refresh and
//! metrics.

use sha2::{Digest, Sha256};

use token_sidecar::dev::providers::Failure;

use crate::support::Harness;

#[tokio::test]
async fn health_and_readiness() {
    let h = Harness::start().await;
    for path in ["/healthz", "/readyz"] {
        let response = h.client.get(h.admin_url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn readiness_waits_for_prefetched_credentials() {
    let h = Harness::with_config(|s| {
        s.config_toml(any(), any()).replace(
            "[credentials.acme-payu]\n",
            "[credentials.acme-payu]\nprefetch = true\n",
        )
    })
    .await;
    let mut ready = false;
    for _ in 0..100 {
        if h.client
            .get(h.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready, "ready once the prefetched token arrived");
    assert_eq!(
        h.token_state("acme-payu").await["state"],
        "fresh",
        "fetched before any request"
    );
}

#[tokio::test]
async fn tokens_lists_every_credential_with_a_fingerprint_never_the_token() {
    let h = Harness::start().await;
    let before = h.token_state("acme-payu").await;
    assert_eq!(before["state"], "empty");
    assert_eq!(before["fetches"], 0);
    assert!(before["fingerprint"].is_null());

    h.get_json("/acme/payu/x").await;
    let tokens = h.tokens().await;
    assert_eq!(tokens.as_array().unwrap().len(), 5, "one entry per credential");
    let after = h.token_state("acme-payu").await;
    assert_eq!(after["state"], "fresh");
    assert_eq!(after["provider"], "payu");
    assert_eq!(after["fetches"], 1);
    assert!(after["last_error"].is_null());

    let fingerprint = after["fingerprint"].as_str().unwrap();
    assert_eq!(fingerprint.len(), 12);
    // The fingerprint is the token's SHA-256 prefix; the token itself appears nowhere.
    let text = tokens.to_string();
    let issued = h.stand_ins.issued.tokens_of("acme-payu-client");
    assert_eq!(issued.len(), 1);
    let token = &issued[0];
    assert_eq!(fingerprint, &hex::encode(Sha256::digest(token.as_bytes()))[..12]);
    assert!(!text.contains(token.as_str()));
}

#[tokio::test]
async fn refresh_fetches_a_new_token_now() {
    let h = Harness::start().await;
    h.get_json("/acme/payu/x").await;
    let before = h.token_state("acme-payu").await;
    let response = h
        .client
        .post(h.admin_url("/tokens/acme-payu/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let after: serde_json::Value = response.json().await.unwrap();
    assert_eq!(after["credential"], "acme-payu");
    assert_eq!(after["fetches"], 2);
    assert_ne!(after["fingerprint"], before["fingerprint"]);

    let response = h
        .client
        .post(h.admin_url("/tokens/nobody/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn metrics_cover_requests_fetches_and_cache() {
    let h = Harness::start().await;
    h.get_json("/acme/payu/x").await;
    h.get_json("/acme/payu/x").await;
    h.get("/nowhere").await;
    let metrics = h.metrics_text().await;
    for expected in [
        "token_sidecar_requests_total{route=\"/acme/payu\",status=\"200\"} 2",
        "token_sidecar_requests_total{route=\"none\",status=\"404\"} 1",
        "token_sidecar_request_duration_seconds_count{route=\"/acme/payu\"} 2",
        "token_sidecar_token_fetches_total{credential=\"acme-payu\",outcome=\"ok\"} 1",
        "token_sidecar_token_cache_hits_total{credential=\"acme-payu\"} 1",
        "token_sidecar_token_cache_misses_total{credential=\"acme-payu\"} 1",
    ] {
        assert!(metrics.contains(expected), "missing {expected} in\n{metrics}");
    }
}

#[tokio::test]
async fn metrics_show_each_credentials_state_its_tokens_life_left_and_the_sidecars_own_errors() {
    let h = Harness::start().await;
    h.get_json("/acme/payu/x").await;
    h.stand_ins.providers.set_failing(Some(Failure::status(503)));
    let refused = h.get("/acme/setu/x").await;
    assert_eq!(refused.status(), 503);
    let metrics = h.metrics_text().await;
    for expected in [
        "token_sidecar_credential_state{credential=\"acme-payu\",state=\"fresh\"} 1",
        "token_sidecar_credential_state{credential=\"acme-setu\",state=\"failing\"} 1",
        "token_sidecar_credential_state{credential=\"acme-booking\",state=\"empty\"} 1",
        "token_sidecar_errors_total{route=\"/acme/setu\",code=\"token_unavailable\"} 1",
        "token_sidecar_start_time_seconds ",
    ] {
        assert!(metrics.contains(expected), "missing {expected} in\n{metrics}");
    }
    let left = h
        .metric("token_sidecar_token_expires_in_seconds{credential=\"acme-payu\"}")
        .await;
    assert!(left > 60.0, "the PayU token has most of its life left: {left}");
    assert!(!metrics.contains("token_sidecar_token_expires_in_seconds{credential=\"acme-setu\"}"));

    h.stand_ins.providers.set_failing(None);
    h.advance(std::time::Duration::from_secs(7200));
    let metrics = h.metrics_text().await;
    assert!(
        metrics.contains("token_sidecar_credential_state{credential=\"acme-payu\",state=\"expired\"} 1"),
        "a scrape shows the state now, not the one before:\n{metrics}"
    );
    assert!(!metrics.contains("token_sidecar_credential_state{credential=\"acme-payu\",state=\"fresh\"}"));
}

#[tokio::test]
async fn the_metrics_listener_serves_metrics_and_health_to_any_host_and_nothing_else() {
    let h = Harness::with_config(|s| {
        s.config_toml(any(), any())
            .replacen("[server]\n", "[server]\nmetrics_listen = \"0.0.0.0:0\"\n", 1)
    })
    .await;
    let port = h.sidecar.metrics_addr.expect("a metrics listener").port();
    h.get_json("/acme/payu/x").await;
    let get = |path: &'static str| {
        h.client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .header("host", "sidecar.payments.svc:9090")
            .send()
    };
    let scraped = get("/metrics").await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped
        .text()
        .await
        .unwrap()
        .contains("token_sidecar_requests_total"));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    for path in ["/tokens", "/readyz", "/config/reload"] {
        assert_eq!(get(path).await.unwrap().status(), 404, "{path}");
    }
    let refresh = h
        .client
        .post(format!("http://127.0.0.1:{port}/tokens/acme-payu/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(refresh.status(), 404);
}

fn any() -> std::net::SocketAddr {
    crate::support::ANY_PORT.parse().unwrap()
}

#[tokio::test]
async fn an_unused_token_past_its_life_shows_as_expired() {
    let h = Harness::start().await;
    h.get_json("/acme/payu/x").await;
    h.advance(std::time::Duration::from_secs(7200));
    let state = h.token_state("acme-payu").await;
    assert_eq!(state["state"], "expired");
    assert!(state["expires_in_ms"].as_i64().unwrap() <= 0);
}

fn prefetching(credential: &'static str) -> impl FnOnce(&token_sidecar::dev::StandIns) -> String {
    move |s| {
        let table = format!("[credentials.{credential}]\n");
        s.config_toml(any(), any())
            .replace(&table, &format!("{table}prefetch = true\n"))
    }
}

async fn readyz(h: &Harness) -> (u16, serde_json::Value) {
    let response = h.client.get(h.admin_url("/readyz")).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Polls `/readyz` (real time, up to 3 s) until it answers `status`.
async fn wait_for_readyz(h: &Harness, status: u16) -> serde_json::Value {
    for _ in 0..150 {
        let (now, body) = readyz(h).await;
        if now == status {
            return body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("/readyz never answered {status}: {:?}", readyz(h).await);
}

#[tokio::test]
async fn prefetched_credentials_stay_warm_without_traffic() {
    let h = Harness::with_config(prefetching("acme-nuapay")).await;
    wait_for_readyz(&h, 200).await;
    // Six 10 s lifetimes with no request at all.
    for _ in 0..30 {
        h.advance(std::time::Duration::from_secs(2));
        tokio::time::sleep(std::time::Duration::from_millis(220)).await;
        h.settle().await;
    }
    let state = h.token_state("acme-nuapay").await;
    assert_eq!(state["state"], "fresh", "{state}");
    assert!(state["fetches"].as_u64().unwrap() >= 5, "{state}");
    assert_eq!(readyz(&h).await.0, 200);
}

#[tokio::test]
async fn a_failed_start_up_fetch_is_retried_until_ready() {
    let h = Harness::with_config(|s| {
        s.providers.fail_next(8, Failure::status(503));
        prefetching("acme-payu")(s)
    })
    .await;
    let waiting = wait_for_readyz(&h, 503).await;
    assert_eq!(waiting["pending"], serde_json::json!(["acme-payu"]));
    // The back-off runs on the sidecar's clock: move it on until the endpoint answers again.
    for _ in 0..20 {
        if readyz(&h).await.0 == 200 {
            break;
        }
        h.advance(std::time::Duration::from_secs(5));
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    assert_eq!(readyz(&h).await.0, 200, "{}", h.token_state("acme-payu").await);
}

#[tokio::test]
async fn readiness_survives_a_provider_outage_and_names_the_degraded_credential() {
    let h = Harness::with_config(prefetching("acme-payu")).await;
    wait_for_readyz(&h, 200).await;
    h.stand_ins.providers.set_failing(Some(Failure::status(503)));
    h.advance(std::time::Duration::from_secs(7200));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, body) = readyz(&h).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["degraded"], serde_json::json!(["acme-payu"]));
}

#[tokio::test]
async fn last_error_names_the_endpoint_from_the_first_failed_attempt() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_failing(Some(Failure::status(503)));
    let request = tokio::spawn({
        let url = h.url("/acme/payu/x");
        let client = h.client.clone();
        async move { client.get(url).send().await.unwrap().status() }
    });
    let mut seen = None;
    for _ in 0..100 {
        let state = h.token_state("acme-payu").await;
        // The second attempt has started: the first one has failed.
        if state["attempts"].as_u64().unwrap() >= 2 && !request.is_finished() {
            seen = Some(state);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let state = seen.expect("an attempt while the request was still retrying");
    let last_error = state["last_error"].as_str().expect("set during the retries");
    assert!(
        last_error.starts_with(&h.stand_ins.token_addr.to_string()),
        "{last_error}"
    );
    assert!(
        last_error.ends_with("token endpoint answered 503"),
        "{last_error}"
    );
    assert_eq!(
        state["fetches"], 0,
        "attempts and successful fetches are counted apart"
    );
    assert_eq!(request.await.unwrap(), 503);
}

#[tokio::test]
async fn admin_json_answers_end_with_a_newline() {
    let h = Harness::start().await;
    for path in ["/healthz", "/readyz", "/tokens", "/nowhere"] {
        let body = h
            .client
            .get(h.admin_url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.ends_with("}\n") || body.ends_with("]\n"), "{path}: {body:?}");
    }
}

#[tokio::test]
async fn probe_exits_zero_when_ready_and_one_otherwise() {
    let h = Harness::start().await;
    let admin = h.sidecar.admin_addr.unwrap().to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::support::run_binary(&args, &[])
        })
    };
    let (code, stdout, _) = run(vec!["probe".into(), "--admin".into(), admin.clone()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("/readyz: 200"), "{stdout}");
    let (code, _, _) = run(vec!["probe".into(), "--live".into(), "--admin".into(), admin])
        .await
        .unwrap();
    assert_eq!(code, 0);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, stdout, _) = run(vec!["probe".into(), "--admin".into(), closed.to_string()])
        .await
        .unwrap();
    assert_eq!(code, 1, "{stdout}");
}
