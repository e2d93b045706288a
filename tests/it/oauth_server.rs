//! Against a real, certified OAuth server (node `oidc-provider`, OpenID Certified, from the npm
//! registry): the sidecar authenticates with `private_key_jwt`, gets a DPoP-bound token after
//! the server's nonce round, and a resource server beside it accepts that token with the
//! sidecar's proofs.

use token_sidecar::dev::certs::TestPki;

use crate::support::oauth_server::OAuthServer;
use crate::support::{custom_config, Harness};

#[tokio::test]
async fn a_certified_oauth_server_issues_dpop_bound_tokens_to_private_key_jwt() {
    let test = "a_certified_oauth_server_issues_dpop_bound_tokens_to_private_key_jwt";
    let pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let (private, public) = (dir.path().join("client.pem"), dir.path().join("client.pub.pem"));
    std::fs::write(&private, client_key.serialize_pem()).unwrap();
    std::fs::write(&public, client_key.public_key_pem()).unwrap();
    let Some(server) = OAuthServer::start(test, &pki, &public) else {
        return;
    };
    let origin = format!("https://{}", server.addr);
    let provider = format!(
        "client_auth = \"private_key_jwt\"\nsigning_key = {{ file = \"{}\" }}\ndpop = true\nscopes = [\"payments\"]",
        private.display()
    );
    let h = Harness::with_config_trusting(
        |_| {
            custom_config(
                &format!("{origin}/token"),
                &format!("{origin}/resource"),
                "",
                &provider,
            )
        },
        &pki,
    )
    .await;

    for _ in 0..3 {
        let response = h.get("/api/payments?id=1").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "paid");
    }
    assert_eq!(
        h.force_refresh("c").await.status(),
        200,
        "a second assertion and proof are accepted too"
    );
    assert_eq!(h.get("/api/payments").await.status(), 200);

    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let seen: serde_json::Value = trusting
        .get(format!("{origin}/seen"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["issued"], 2, "{seen}");
    assert_eq!(
        seen["resource"],
        serde_json::json!(["ok", "ok", "ok", "ok"]),
        "{seen}"
    );
}
