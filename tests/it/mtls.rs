//! Mutual TLS from `[identities]`: to an upstream (`client_identity` on a route) and to a token
//! endpoint (`client_identity` on a provider, with `client_auth = "tls_client_auth"`), each
//! against a server that refuses connections without a certificate from its CA.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Response;
use http_body_util::BodyExt;
use token_sidecar::body::full_body;
use token_sidecar::dev::certs::TestPki;
use token_sidecar::server::Handler;

use crate::support::{check_in, spawn_mtls_server, Harness, ANY_PORT};

fn answering(body: &'static str) -> Handler {
    Arc::new(move |_| Box::pin(async move { Response::new(full_body(body)) }))
}

/// The identity's files in a directory of their own; the `[identities.acme-qwac]` table.
fn identity_table(pki: &TestPki, dir: &std::path::Path) -> String {
    let (cert, key) = pki.client_certificate("acme").unwrap();
    std::fs::write(dir.join("acme.crt"), cert).unwrap();
    std::fs::write(dir.join("acme.key"), key).unwrap();
    format!(
        "[identities.acme-qwac]\ncert = {{ file = \"{}\" }}\nkey = {{ file = \"{}\" }}\n",
        dir.join("acme.crt").display(),
        dir.join("acme.key").display()
    )
}

#[tokio::test]
async fn a_route_with_a_client_identity_reaches_an_mtls_upstream_and_one_without_gets_502() {
    let pki = TestPki::new().unwrap();
    let upstream = spawn_mtls_server(&pki, answering("mutually authenticated")).await;
    let dir = tempfile::tempdir().unwrap();
    let identities = identity_table(&pki, dir.path());
    let h = Harness::with_config_trusting(
        |s| {
            format!(
                r#"{base}
{identities}
[[routes]]
path_prefix = "/with"
upstream = "https://{upstream}"
credential = "acme-payu"
client_identity = "acme-qwac"

[[routes]]
path_prefix = "/without"
upstream = "https://{upstream}"
credential = "acme-payu"
"#,
                base = s.config_toml(ANY_PORT.parse().unwrap(), ANY_PORT.parse().unwrap()),
            )
        },
        &pki,
    )
    .await;
    let response = h.get("/with/x").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "mutually authenticated");

    let started = Instant::now();
    let (status, json) = h.get_json("/without/x").await;
    assert_eq!(status, 502, "{json}");
    assert_eq!(json["error"]["code"], "upstream_unreachable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not a hang"
    );
}

#[tokio::test]
async fn tls_client_auth_gets_tokens_over_mutual_tls_without_a_secret() {
    let pki = TestPki::new().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let endpoint: Handler = Arc::new(move |request| {
        let seen = seen.clone();
        Box::pin(async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            Response::new(full_body(
                r#"{"access_token":"cert-bound-token","expires_in":3600}"#,
            ))
        })
    });
    let token = spawn_mtls_server(&pki, endpoint).await;
    let upstream = crate::support::spawn_tls_server(
        &pki,
        Arc::new(|request| {
            Box::pin(async move {
                let auth = request.headers()["authorization"].to_str().unwrap().to_owned();
                Response::new(full_body(auth))
            })
        }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let identities = identity_table(&pki, dir.path());
    let h = Harness::with_config_trusting(
        |_| {
            format!(
                r#"
[server]
listen = "{ANY_PORT}"
admin_listen = "{ANY_PORT}"

{identities}
[providers.bank]
token_url = "https://{token}/as/token"
client_auth = "tls_client_auth"
client_identity = "acme-qwac"

[credentials.acme-bank]
provider = "bank"
client_id = "acme"

[[routes]]
path_prefix = "/bank"
upstream = "https://{upstream}"
credential = "acme-bank"
"#
            )
        },
        &pki,
    )
    .await;
    let response = h.get("/bank/accounts").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "Bearer cert-bound-token");
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].contains("client_id=acme"), "{}", bodies[0]);
    assert!(!bodies[0].contains("client_secret"), "{}", bodies[0]);
}

#[test]
fn check_names_identity_problems() {
    let pki = TestPki::new().unwrap();
    let other = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = pki.client_certificate("acme").unwrap();
    let (_, foreign_key) = other.client_certificate("someone-else").unwrap();
    std::fs::write(dir.path().join("acme.crt"), cert).unwrap();
    std::fs::write(dir.path().join("other.key"), foreign_key).unwrap();
    let text = r#"[identities.acme-qwac]
cert = { file = "acme.crt" }
key = { file = "other.key" }

[providers.bank]
token_url = "https://auth.bank.example/as/token"
client_auth = "tls_client_auth"

[credentials.acme-bank]
provider = "bank"
client_id = "acme"

[[routes]]
path_prefix = "/bank"
upstream = "https://api.bank.example"
credential = "acme-bank"
client_identity = "acme-qwak"
"#;
    let (code, stderr) = check_in(dir.path(), text);
    assert_eq!(code, 2, "{stderr}");
    for expected in [
        "FILE:1: identities.acme-qwac: key does not belong to the certificate",
        "FILE:9: credentials.acme-bank: client_auth = tls_client_auth needs client_identity on provider `bank`",
        "FILE:17: routes[0].client_identity: no identity named `acme-qwak` in [identities]; did you mean `acme-qwac`?",
    ] {
        assert!(stderr.contains(expected), "missing `{expected}` in\n{stderr}");
    }
}
