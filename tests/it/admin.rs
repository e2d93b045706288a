//! The admin listener: health, readiness, `/tokens` (fingerprints, never tokens), refresh and
//! metrics.

use sha2::{Digest, Sha256};

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
