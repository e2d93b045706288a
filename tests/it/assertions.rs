//! Client assertions (RFC 7523): `private_key_jwt` (RS256, PS256, ES256) and
//! `client_secret_jwt` (HS256), end to end against a token endpoint that verifies them; and the
//! keys `check` refuses.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use http::{Response, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use token_sidecar::body::full_body;
use token_sidecar::dev::certs::TestPki;
use token_sidecar::server::Handler;

use crate::support::{check_in, custom_config, repo_root, spawn_tls_server, Harness};

const CLIENT_ID: &str = "custom-client";
const CLIENT_SECRET: &str = "custom-client-secret-value";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("tests/fixtures/keys").join(name)).unwrap()
}

/// What the verifying endpoint saw: accepted assertions and refusals (with why).
#[derive(Default)]
struct Seen {
    accepted: usize,
    refused: Vec<String>,
    jtis: HashSet<String>,
}

/// A token endpoint that accepts only a valid assertion signed by `key` with `algorithm`, for
/// `CLIENT_ID`, addressed to `audience`, never seen before, with no client secret beside it.
fn verifying_endpoint(
    key: DecodingKey,
    algorithm: Algorithm,
    audience: Arc<Mutex<String>>,
    seen: Arc<Mutex<Seen>>,
) -> Handler {
    let key = Arc::new(key);
    Arc::new(move |request| {
        let (key, audience, seen) = (key.clone(), audience.clone(), seen.clone());
        Box::pin(async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
            let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            let verdict = (|| {
                if field("client_secret").is_some() {
                    return Err("a client secret was sent".to_owned());
                }
                if field("client_assertion_type").as_deref()
                    != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                {
                    return Err("wrong client_assertion_type".to_owned());
                }
                let jwt = field("client_assertion").ok_or("no client_assertion")?;
                let mut validation = Validation::new(algorithm);
                validation.set_audience(&[audience.lock().unwrap().as_str()]);
                validation.set_issuer(&[CLIENT_ID]);
                validation.sub = Some(CLIENT_ID.to_owned());
                validation.set_required_spec_claims(&["exp", "iat", "aud", "iss", "sub", "jti"]);
                let claims = jsonwebtoken::decode::<serde_json::Value>(&jwt, &key, &validation)
                    .map_err(|err| format!("invalid assertion: {err}"))?
                    .claims;
                let (iat, exp) = (
                    claims["iat"].as_u64().unwrap_or(0),
                    claims["exp"].as_u64().unwrap_or(0),
                );
                if exp <= iat || exp - iat > 300 {
                    return Err("exp is not within 5 minutes of iat".to_owned());
                }
                let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
                if !seen.lock().unwrap().jtis.insert(jti) {
                    return Err("replayed jti".to_owned());
                }
                Ok(())
            })();
            let mut seen = seen.lock().unwrap();
            let (status, answer) = match verdict {
                Ok(()) => {
                    seen.accepted += 1;
                    let token = format!("asserted-token-{}", seen.accepted);
                    (
                        StatusCode::OK,
                        serde_json::json!({"access_token": token, "expires_in": 3600}),
                    )
                }
                Err(why) => {
                    seen.refused.push(why);
                    (
                        StatusCode::UNAUTHORIZED,
                        serde_json::json!({"error": "invalid_client"}),
                    )
                }
            };
            let mut response = Response::new(full_body(answer.to_string()));
            *response.status_mut() = status;
            response
        })
    })
}

/// An upstream that accepts any token and echoes the Authorization header.
fn echo_upstream() -> Handler {
    Arc::new(|request| {
        Box::pin(async move {
            let auth = request
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned());
            Response::new(full_body(auth.unwrap_or_default()))
        })
    })
}

/// The sidecar with `provider_extra` on its provider, behind a verifying endpoint; a request
/// through it, twice with a forced refresh between (two assertions, two `jti`s).
async fn end_to_end(provider_extra: &str, key: DecodingKey, algorithm: Algorithm) {
    let pki = TestPki::new().unwrap();
    let audience = Arc::new(Mutex::new(String::new()));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let token = spawn_tls_server(
        &pki,
        verifying_endpoint(key, algorithm, audience.clone(), seen.clone()),
    )
    .await;
    let upstream = spawn_tls_server(&pki, echo_upstream()).await;
    let token_url = format!("https://{token}/as/token");
    *audience.lock().unwrap() = token_url.clone();
    let h = Harness::with_config_trusting(
        |_| custom_config(&token_url, &format!("https://{upstream}"), "", provider_extra),
        &pki,
    )
    .await;
    let response = h.get("/api/payments").await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(
        status,
        200,
        "{body}; endpoint refusals: {:?}",
        seen.lock().unwrap().refused
    );
    assert_eq!(body, "Bearer asserted-token-1");
    assert_eq!(
        h.force_refresh("c").await.status(),
        200,
        "a second assertion, with a new jti, is accepted too"
    );
    let seen = seen.lock().unwrap();
    assert_eq!((seen.accepted, seen.refused.len()), (2, 0), "{:?}", seen.refused);
}

fn key_file(pem: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), pem).unwrap();
    file
}

#[tokio::test]
async fn private_key_jwt_with_an_ec_key_signs_es256() {
    let pair = rcgen::KeyPair::generate().unwrap();
    let file = key_file(&pair.serialize_pem());
    let extra = format!(
        "client_auth = \"private_key_jwt\"\nsigning_key = {{ file = \"{}\" }}\nsigning_kid = \"k-2026\"",
        file.path().display()
    );
    let public = DecodingKey::from_ec_pem(pair.public_key_pem().as_bytes()).unwrap();
    end_to_end(&extra, public, Algorithm::ES256).await;
}

#[tokio::test]
async fn private_key_jwt_with_an_rsa_key_signs_rs256_and_ps256() {
    let file = key_file(&fixture("rsa-2048.pem"));
    for (alg, algorithm) in [("RS256", Algorithm::RS256), ("PS256", Algorithm::PS256)] {
        let extra = format!(
            "client_auth = \"private_key_jwt\"\nsigning_key = {{ file = \"{}\" }}\nsigning_alg = \"{alg}\"",
            file.path().display()
        );
        let public = DecodingKey::from_rsa_pem(fixture("rsa-2048.pub.pem").as_bytes()).unwrap();
        end_to_end(&extra, public, algorithm).await;
    }
}

#[tokio::test]
async fn client_secret_jwt_signs_hs256_with_the_secret_and_never_sends_it() {
    let secret = DecodingKey::from_secret(CLIENT_SECRET.as_bytes());
    end_to_end("client_auth = \"client_secret_jwt\"", secret, Algorithm::HS256).await;
}

/// `check` on a `private_key_jwt` provider whose key is `pem`.
fn check_key(pem: &str, alg: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.pem"), pem).unwrap();
    let text = format!(
        r#"[providers.bank]
token_url = "https://auth.bank.example/as/token"
client_auth = "private_key_jwt"
signing_key = {{ file = "key.pem" }}
{alg}

[credentials.acme-bank]
provider = "bank"
client_id = "acme"

[[routes]]
path_prefix = "/bank"
upstream = "https://api.bank.example"
credential = "acme-bank"
"#
    );
    check_in(dir.path(), &text)
}

#[test]
fn check_refuses_keys_that_cannot_sign() {
    let cases = [
        (
            fixture("rsa-2048.pem"),
            "signing_alg = \"ES256\"",
            "ES256 needs an EC key, but this is an RSA key",
        ),
        (
            fixture("rsa-1024.pem"),
            "",
            "cannot sign RS256 (RSA keys must have at least 2048 bits)",
        ),
        (fixture("rsa-2048-encrypted.pem"), "", "is an encrypted PEM"),
        (
            "not a key".to_owned(),
            "",
            "is not a PKCS#8 PEM RSA or EC P-256 private key",
        ),
    ];
    for (pem, alg, expected) in cases {
        let (code, stderr) = check_key(&pem, alg);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains("FILE:4: providers.bank.signing_key: "),
            "{stderr}"
        );
        assert!(stderr.contains(expected), "expected `{expected}` in {stderr}");
    }
    let (code, stderr) = check_key("", "");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("FILE:4: providers.bank.signing_key: the secret is empty"),
        "{stderr}"
    );
    let (code, _) = check_key(&fixture("rsa-2048.pem"), "signing_alg = \"PS256\"");
    assert_eq!(code, 0, "a good key passes");
}
