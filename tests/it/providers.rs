//! Each provider shape end to end: the token request as the provider documents it, the token
//! read from its answer, injected, and accepted by the upstream.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use token_sidecar::dev::providers::Shape;

use crate::support::{echo_ok, Harness};

#[tokio::test]
async fn nuapay_org_token_with_api_key_as_basic_user() {
    let h = Harness::start().await;
    let (status, echo) = h.get_json("/acme/nuapay/payments?limit=1").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["merchant"], "ybo8zd8j2q");
    assert_eq!(echo["auth"], "bearer");
    assert_eq!(echo["path"], "/nuapay/payments");
    assert_eq!(echo["query"], "limit=1");

    let seen = h.stand_ins.providers.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].shape, Shape::Nuapay);
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    let expected_auth = format!("Basic {}", STANDARD.encode("dev-nuapay-api-key:"));
    assert_eq!(seen[0].authorization.as_deref(), Some(expected_auth.as_str()));
    assert_eq!(seen[0].body, r#"{"scopes":["openbanking_pisp"]}"#);

    let state = h.token_state("acme-nuapay").await;
    let expires_in_ms = state["expires_in_ms"].as_i64().unwrap();
    assert!((9_000..=10_000).contains(&expires_in_ms), "10 s token: {state}");
}

#[tokio::test]
async fn nuapay_expires_in_is_requested_when_configured() {
    let h = Harness::with_config(|s| {
        s.config_toml(any(), any()).replace(
            "api_key = \"dev-nuapay-api-key\"",
            "api_key = \"dev-nuapay-api-key\"\nexpires_in = \"6m\"",
        )
    })
    .await;
    let (status, _) = h.get_json("/acme/nuapay/x").await;
    assert_eq!(status, 200);
    assert_eq!(
        h.stand_ins.providers.seen()[0].body,
        r#"{"scopes":["openbanking_pisp"],"expiresIn":360}"#
    );
    let expires_in_ms = h.token_state("acme-nuapay").await["expires_in_ms"]
        .as_i64()
        .unwrap();
    assert!((359_000..=360_000).contains(&expires_in_ms));
}

#[tokio::test]
async fn nuapay_token_as_basic_username_for_refunds() {
    let h = Harness::start().await;
    let response = h
        .client
        .post(h.url("/globex/nuapay/refunds"))
        .send()
        .await
        .unwrap();
    let echo = echo_ok(response).await;
    assert_eq!(echo["merchant"], "k3v9x2mq7p");
    assert_eq!(echo["auth"], "basic-username");
}

#[tokio::test]
async fn setu_form_request_and_lifetime_from_the_jwt() {
    let h = Harness::start().await;
    let (status, echo) = h.get_json("/acme/setu/bills").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["merchant"], "acme-setu-client");

    let seen = &h.stand_ins.providers.seen()[0];
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        seen.body,
        "grant_type=client_credentials&client_id=acme-setu-client&client_secret=dev-setu-secret"
    );
    // No expiry field: the JWT's exp - iat (300 s) wins over default_ttl (15 min).
    let expires_in_ms = h.token_state("acme-setu").await["expires_in_ms"]
        .as_i64()
        .unwrap();
    assert!((299_000..=300_000).contains(&expires_in_ms), "{expires_in_ms}");
}

#[tokio::test]
async fn booking_json_request_with_token_in_a_custom_header() {
    let h = Harness::start().await;
    let response = h
        .client
        .post(h.url("/acme/booking/bookings"))
        .header("content-type", "application/json")
        .body(r#"{"guests":2}"#)
        .send()
        .await
        .unwrap();
    let echo = echo_ok(response).await;
    assert_eq!(echo["merchant"], "acme-booking-client");
    assert_eq!(echo["auth"], "header");
    assert_eq!(echo["body_bytes"], 12);

    let seen = &h.stand_ins.providers.seen()[0];
    assert_eq!(seen.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        seen.body,
        r#"{"grant_type":"client_credentials","client_id":"acme-booking-client","client_secret":"dev-booking-secret"}"#
    );
    let expires_in_ms = h.token_state("acme-booking").await["expires_in_ms"]
        .as_i64()
        .unwrap();
    assert!((3_599_000..=3_600_000).contains(&expires_in_ms));
}

#[tokio::test]
async fn payu_form_request_with_space_separated_scopes() {
    let h = Harness::start().await;
    let (status, echo) = h.get_json("/acme/payu/payment-links").await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["merchant"], "acme-payu-client");
    assert_eq!(
        echo["headers"]["x-partner-id"], "acme",
        "static route header added"
    );

    let seen = &h.stand_ins.providers.seen()[0];
    assert_eq!(seen.shape, Shape::PayU);
    assert!(
        seen.body
            .ends_with("&scope=create_payment_links+read_payment_links"),
        "{}",
        seen.body
    );
    let expires_in_ms = h.token_state("acme-payu").await["expires_in_ms"]
        .as_i64()
        .unwrap();
    assert!((7_199_000..=7_200_000).contains(&expires_in_ms));
}

#[tokio::test]
async fn oauth2_client_credentials_as_http_basic() {
    let h = Harness::with_config(|s| {
        let payu_url = format!("token_url = \"https://{}/oauth/token\"", s.token_addr);
        s.config_toml(any(), any())
            .replace(&payu_url, &format!("{payu_url}\nclient_auth = \"basic\""))
    })
    .await;
    let (status, echo) = h.get_json("/acme/payu/x").await;
    assert_eq!(status, 200, "{echo}");
    let seen = &h.stand_ins.providers.seen()[0];
    let expected = format!("Basic {}", STANDARD.encode("acme-payu-client:dev-payu-secret"));
    assert_eq!(seen.authorization.as_deref(), Some(expected.as_str()));
    assert!(!seen.body.contains("client_secret"), "{}", seen.body);
}

#[tokio::test]
async fn each_credential_gets_its_own_token() {
    let h = Harness::start().await;
    let (_, acme) = h.get_json("/nuapay/p").await; // no header: refused, see routing tests
    assert_eq!(acme["error"]["code"], "unknown_credential");
    for (merchant, org) in [("acme-nuapay", "ybo8zd8j2q"), ("globex-nuapay", "k3v9x2mq7p")] {
        let echo: serde_json::Value = h
            .client
            .get(h.url("/nuapay/payments"))
            .header("X-Merchant", merchant)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(echo["merchant"], org);
    }
    assert_eq!(h.stand_ins.providers.token_requests(Shape::Nuapay), 2);
}

fn any() -> std::net::SocketAddr {
    crate::support::ANY_PORT.parse().unwrap()
}
