//! DPoP (RFC 9449) end to end: a token endpoint and an upstream that verify every proof
//! (signature by its own `jwk`, `typ`, `htm`, `htu`, `iat`, unique `jti`, `ath`, the key the
//! token is bound to) and each insist on a nonce of their own; and the keys `check` refuses.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use token_sidecar::body::{full_body, ProxyBody};
use token_sidecar::dev::certs::TestPki;
use token_sidecar::server::Handler;

use crate::support::{check_in, custom_config, spawn_tls_server, Harness};

const TOKEN_NONCE: &str = "as-nonce-1";
const UPSTREAM_NONCE: &str = "rs-nonce-1";

/// What the verifying servers saw.
#[derive(Default)]
struct Seen {
    /// Token URL and upstream base the proofs must name.
    token_url: String,
    upstream: String,
    jtis: HashSet<String>,
    /// Each issued token and the thumbprint of the key it is bound to.
    bound: HashMap<String, String>,
    issued: usize,
    /// Why requests were refused; `"nonce"` for a nonce round.
    token_refusals: Vec<String>,
    upstream_refusals: Vec<String>,
    upstream_accepted: Vec<(String, String)>,
}

type Shared = Arc<Mutex<Seen>>;

/// RFC 7638 thumbprint of an EC P-256 JWK.
fn thumbprint(jwk: &Jwk) -> String {
    let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm else {
        return "not an EC key".into();
    };
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#, ec.x, ec.y);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical))
}

/// Verifies the `DPoP` header of a request: its claims, and that it is new. Gives the proof's
/// key thumbprint and nonce.
fn verify_proof(
    headers: &HeaderMap,
    method: &str,
    htu: &str,
    seen: &mut Seen,
) -> Result<(String, Option<String>, serde_json::Value), String> {
    let proof = headers
        .get("dpop")
        .ok_or("no DPoP header")?
        .to_str()
        .map_err(|_| "DPoP header not text")?;
    let header = jsonwebtoken::decode_header(proof).map_err(|err| format!("bad proof header: {err}"))?;
    if header.typ.as_deref() != Some("dpop+jwt") || header.alg != Algorithm::ES256 {
        return Err(format!("wrong typ/alg: {:?} {:?}", header.typ, header.alg));
    }
    let jwk = header.jwk.ok_or("no jwk")?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|err| format!("bad jwk: {err}"))?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(proof, &key, &validation)
        .map_err(|err| format!("proof does not verify: {err}"))?
        .claims;
    if claims["htm"] != method || claims["htu"] != htu {
        return Err(format!(
            "htm/htu {} {} (wanted {method} {htu})",
            claims["htm"], claims["htu"]
        ));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let iat = claims["iat"].as_u64().unwrap_or(0);
    if iat.abs_diff(now) > 60 {
        return Err("iat is not now".into());
    }
    let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
    if jti.len() < 16 || !seen.jtis.insert(jti) {
        return Err("replayed or short jti".into());
    }
    let nonce = claims["nonce"].as_str().map(str::to_owned);
    Ok((thumbprint(&jwk), nonce, claims))
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(body.to_string()));
    *response.status_mut() = status;
    response
}

/// A token endpoint that issues DPoP-bound tokens only to valid proofs carrying its nonce.
fn dpop_token_endpoint(seen: Shared) -> Handler {
    Arc::new(move |request: Request<ProxyBody>| {
        let seen = seen.clone();
        Box::pin(async move {
            let mut seen = seen.lock().unwrap();
            let url = seen.token_url.clone();
            let verdict = verify_proof(request.headers(), "POST", &url, &mut seen);
            match verdict {
                Ok((_, nonce, _)) if nonce.as_deref() != Some(TOKEN_NONCE) => {
                    seen.token_refusals.push("nonce".into());
                    let mut response = json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "use_dpop_nonce"}),
                    );
                    response
                        .headers_mut()
                        .insert("dpop-nonce", TOKEN_NONCE.parse().unwrap());
                    response
                }
                Ok((_, _, claims)) if claims.get("ath").is_some() => {
                    seen.token_refusals.push("ath on a token request".into());
                    json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "invalid_dpop_proof"}),
                    )
                }
                Ok((jkt, _, _)) => {
                    seen.issued += 1;
                    let token = format!("dpop-token-{}", seen.issued);
                    seen.bound.insert(token.clone(), jkt);
                    json(
                        StatusCode::OK,
                        serde_json::json!({"access_token": token, "token_type": "DPoP", "expires_in": 3600}),
                    )
                }
                Err(why) => {
                    seen.token_refusals.push(why);
                    json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "invalid_dpop_proof"}),
                    )
                }
            }
        })
    })
}

/// An upstream that accepts a DPoP-bound token only with a proof by the key it is bound to,
/// for this very request, hashing this token, carrying its nonce.
fn dpop_upstream(seen: Shared) -> Handler {
    Arc::new(move |request: Request<ProxyBody>| {
        let seen = seen.clone();
        Box::pin(async move {
            let method = request.method().to_string();
            let path = request.uri().path().to_owned();
            let headers = request.headers().clone();
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let mut seen = seen.lock().unwrap();
            let htu = format!("{}{path}", seen.upstream);
            let verdict = (|| {
                let authorization = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let token = authorization
                    .strip_prefix("DPoP ")
                    .ok_or_else(|| format!("not a DPoP authorization: {authorization}"))?
                    .to_owned();
                let (jkt, nonce, claims) = verify_proof(&headers, &method, &htu, &mut seen)?;
                if seen.bound.get(&token) != Some(&jkt) {
                    return Err("the proof's key is not the one the token is bound to".to_owned());
                }
                let ath = URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()));
                if claims["ath"] != ath.as_str() {
                    return Err("ath is not the token's hash".into());
                }
                if nonce.as_deref() != Some(UPSTREAM_NONCE) {
                    return Err("nonce".into());
                }
                Ok(token)
            })();
            match verdict {
                Ok(token) => {
                    seen.upstream_accepted.push((method, token));
                    Response::new(full_body(body))
                }
                Err(why) => {
                    let nonce_round = why == "nonce";
                    seen.upstream_refusals.push(why);
                    let mut response = json(StatusCode::UNAUTHORIZED, serde_json::json!({}));
                    if nonce_round {
                        let headers = response.headers_mut();
                        headers.insert("dpop-nonce", UPSTREAM_NONCE.parse().unwrap());
                        headers.insert(
                            "www-authenticate",
                            "DPoP error=\"use_dpop_nonce\"".parse().unwrap(),
                        );
                    }
                    response
                }
            }
        })
    })
}

/// The sidecar (with `provider_extra`) between a verifying token endpoint and upstream.
async fn dpop_sidecar(provider_extra: &str) -> (Harness, Shared) {
    let pki = TestPki::new().unwrap();
    let seen = Shared::default();
    let token = spawn_tls_server(&pki, dpop_token_endpoint(seen.clone())).await;
    let upstream = spawn_tls_server(&pki, dpop_upstream(seen.clone())).await;
    let token_url = format!("https://{token}/as/token");
    {
        let mut seen = seen.lock().unwrap();
        seen.token_url = token_url.clone();
        seen.upstream = format!("https://{upstream}");
    }
    let h = Harness::with_config_trusting(
        |_| custom_config(&token_url, &format!("https://{upstream}/v1"), "", provider_extra),
        &pki,
    )
    .await;
    (h, seen)
}

#[tokio::test]
async fn dpop_binds_the_token_to_a_key_and_proves_possession_on_every_request() {
    let (h, seen) = dpop_sidecar("dpop = true").await;
    let first = h.get("/api/payments?page=2").await;
    assert_eq!(
        first.status(),
        200,
        "{:?}",
        seen.lock().unwrap().upstream_refusals
    );
    let posted = h
        .client
        .post(h.url("/api/payments"))
        .body("{\"amount\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    assert_eq!(
        posted.text().await.unwrap(),
        "{\"amount\":1}",
        "the body went through"
    );
    for _ in 0..3 {
        assert_eq!(h.get("/api/payments").await.status(), 200);
    }
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.token_refusals,
        ["nonce"],
        "one nonce round at the token endpoint, then a valid proof"
    );
    assert_eq!(seen.issued, 1);
    assert_eq!(
        seen.upstream_refusals,
        ["nonce"],
        "one nonce round at the upstream; its nonce is then sent up front"
    );
    let methods: Vec<&str> = seen.upstream_accepted.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(methods, ["GET", "POST", "GET", "GET", "GET"]);
    assert!(seen
        .upstream_accepted
        .iter()
        .all(|(_, token)| token == "dpop-token-1"));
}

#[tokio::test]
async fn a_dpop_key_file_is_the_key_tokens_are_bound_to() {
    let pair = rcgen::KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dpop.pem");
    std::fs::write(&file, pair.serialize_pem()).unwrap();
    let (h, seen) = dpop_sidecar(&format!(
        "dpop = true\ndpop_key = {{ file = \"{}\" }}",
        file.display()
    ))
    .await;
    assert_eq!(h.get("/api/payments").await.status(), 200);
    let point = pair.public_key_raw();
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(&point[1..33]),
        URL_SAFE_NO_PAD.encode(&point[33..65])
    );
    let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical));
    assert_eq!(seen.lock().unwrap().bound["dpop-token-1"], expected);
}

#[tokio::test]
async fn a_bearer_answer_to_a_dpop_request_is_sent_as_bearer() {
    // RFC 9449 §5: a server without DPoP ignores the proof and issues a Bearer token.
    let pki = TestPki::new().unwrap();
    let token: Handler = Arc::new(|request: Request<ProxyBody>| {
        let proved = request.headers().contains_key("dpop");
        Box::pin(async move {
            assert!(proved, "the token request carried a proof");
            json(
                StatusCode::OK,
                serde_json::json!({"access_token": "plain-bearer", "token_type": "Bearer", "expires_in": 600}),
            )
        })
    });
    let upstream: Handler = Arc::new(|request: Request<ProxyBody>| {
        let authorization = format!(
            "{:?} {}",
            request.headers().get("authorization"),
            request.headers().contains_key("dpop")
        );
        Box::pin(async move { Response::new(full_body(authorization)) })
    });
    let (token, upstream) = (
        spawn_tls_server(&pki, token).await,
        spawn_tls_server(&pki, upstream).await,
    );
    let h = Harness::with_config_trusting(
        |_| {
            custom_config(
                &format!("https://{token}/t"),
                &format!("https://{upstream}"),
                "",
                "dpop = true",
            )
        },
        &pki,
    )
    .await;
    let response = h.get("/api/x").await;
    assert_eq!(
        response.text().await.unwrap(),
        "Some(\"Bearer plain-bearer\") false"
    );
}

/// `check` on a DPoP provider with `extra` keys (and `key.pem` holding `pem`).
fn check_dpop(pem: &str, extra: &str, route_extra: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.pem"), pem).unwrap();
    let text = format!(
        r#"[providers.bank]
token_url = "https://auth.bank.example/as/token"
client_id = "acme"
client_secret = "s"
{extra}

[credentials.acme-bank]
provider = "bank"

[[routes]]
path_prefix = "/bank"
upstream = "https://api.bank.example"
credential = "acme-bank"
{route_extra}
"#
    );
    check_in(dir.path(), &text)
}

#[test]
fn check_refuses_dpop_keys_that_cannot_prove() {
    let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let rsa = std::fs::read_to_string(crate::support::repo_root().join("tests/fixtures/keys/rsa-2048.pem"))
        .unwrap();
    let shared = "\n[cache.shared]\nredis_url = \"redis://127.0.0.1:6379\"\nencryption_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"";
    let cases = [
        (
            rsa.as_str(),
            "dpop = true\ndpop_key = { file = \"key.pem\" }",
            "",
            "FILE:6: providers.bank.dpop_key: the key is not a PKCS#8 PEM EC P-256 private key",
        ),
        (
            ec.as_str(),
            "dpop_key = { file = \"key.pem\" }",
            "",
            "FILE:5: providers.bank.dpop_key: is used only with dpop = true",
        ),
        (
            ec.as_str(),
            &format!("dpop = true{shared}"),
            "",
            "providers.bank.dpop_key: missing: with [cache.shared], dpop_key must be a file",
        ),
        (
            ec.as_str(),
            "dpop = true",
            "inject = { header = \"X-Token\" }",
            "FILE:14: routes[0].inject: credential `acme-bank` uses DPoP, whose tokens go in Authorization: DPoP",
        ),
    ];
    for (pem, extra, route_extra, expected) in cases {
        let (code, stderr) = check_dpop(pem, extra, route_extra);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(expected), "expected `{expected}` in {stderr}");
    }
    let (code, stderr) = check_dpop(
        &ec,
        &format!("dpop = true\ndpop_key = {{ file = \"key.pem\" }}{shared}"),
        "",
    );
    assert_eq!(code, 0, "a fleet with its key in a file passes: {stderr}");
}

#[tokio::test]
async fn a_nonce_round_on_a_streamed_body_is_passed_back_and_keeps_the_token() {
    let (h, seen) = dpop_sidecar("dpop = true").await;
    // A chunked body of unknown length cannot be kept for a resend.
    let chunks: Vec<Result<&'static str, std::io::Error>> = vec![Ok("{\"amount\":"), Ok("2}")];
    let streamed = h
        .client
        .post(h.url("/api/payments"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        streamed.status(),
        401,
        "the upstream's nonce round goes back to the client"
    );
    assert!(streamed.headers().contains_key("dpop-nonce"));
    let retried = h
        .client
        .post(h.url("/api/payments"))
        .body("{\"amount\":2}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        retried.status(),
        200,
        "the client's retry carries the remembered nonce"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.issued, 1,
        "a nonce round is not a refused token: nothing was purged or refetched"
    );
    assert_eq!(seen.upstream_refusals, ["nonce"]);
}
