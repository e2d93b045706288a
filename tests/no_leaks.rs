//! The whole integration scenario at `trace` level, with traces exported to a collector: no
//! secret and no token may appear in any log line (ours or our dependencies'), error body,
//! `/tokens`, `/metrics` or exported span.
//!
//! A test binary of its own, so that its global log capture sees only this scenario.

#[path = "it/support/mod.rs"]
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use token_sidecar::dev::providers::Failure;
use token_sidecar::metrics::Metrics;
use token_sidecar::secret::Secret;
use token_sidecar::telemetry::TelemetrySettings;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use support::Harness;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_secret_or_token_appears_anywhere_at_trace_level() {
    let capture = Capture::default();
    let writer = capture.clone();
    let collector = support::otlp::Collector::start().await;
    let export_key = "otlp-export-key-never-logged-9c2f";
    let telemetry = TelemetrySettings {
        endpoint: Some(collector.endpoint()),
        headers: vec![("x-otlp-key".into(), Secret::new(export_key.to_owned()))],
        ..TelemetrySettings::default()
    };
    let traces = token_sidecar::telemetry::start(&telemetry, &[], Metrics::new())
        .unwrap()
        .expect("traces are on");
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .with_filter(EnvFilter::new("trace"));
    tracing_subscriber::registry()
        .with(log)
        .with(traces.layer())
        .init();

    let h = Harness::start().await;
    let mut seen = String::new();
    let paths = [
        "/acme/nuapay/p",
        "/acme/setu/p",
        "/acme/booking/p",
        "/acme/payu/p",
        "/globex/nuapay/refunds/1",
        "/nowhere",
    ];
    for path in paths {
        seen.push_str(&h.get(path).await.text().await.unwrap());
    }
    // A 401 replay, a failing endpoint whose error body echoes a secret, an admin refresh.
    h.stand_ins.issued.revoke_subject("acme-payu-client");
    seen.push_str(&h.get("/acme/payu/p").await.text().await.unwrap());
    h.stand_ins.providers.set_failing(Some(Failure {
        status: 401,
        retry_after: None,
        body: r#"{"error":"dev-setu-secret","error_description":"bad secret dev-setu-secret"}"#.into(),
    }));
    let refresh = h
        .client
        .post(h.admin_url("/tokens/acme-setu/refresh"))
        .send()
        .await
        .unwrap();
    seen.push_str(&refresh.text().await.unwrap());
    h.advance(std::time::Duration::from_secs(3600));
    seen.push_str(&h.get("/acme/setu/p").await.text().await.unwrap());
    seen.push_str(&h.tokens().await.to_string());
    seen.push_str(&h.metrics_text().await);
    // Regulated-provider keys: a signing key (private_key_jwt), a client identity (mTLS) and a
    // DPoP key, through a request and the Debug print of the whole configuration.
    let keys = tempfile::tempdir().unwrap();
    let signing_pem =
        std::fs::read_to_string(support::repo_root().join("tests/fixtures/keys/rsa-2048.pem")).unwrap();
    let (identity_cert, identity_key) = h.stand_ins.pki.client_certificate("acme").unwrap();
    std::fs::write(keys.path().join("signing.pem"), &signing_pem).unwrap();
    std::fs::write(keys.path().join("id.crt"), &identity_cert).unwrap();
    std::fs::write(keys.path().join("id.key"), &identity_key).unwrap();
    let dpop_pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
    std::fs::write(keys.path().join("dpop.pem"), &dpop_pem).unwrap();
    let regulated = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[identities.acme-qwac]
cert = {{ file = "{dir}/id.crt" }}
key = {{ file = "{dir}/id.key" }}

[providers.bank]
token_url = "https://{token}/oauth/token"
client_auth = "private_key_jwt"
signing_key = {{ file = "{dir}/signing.pem" }}
client_identity = "acme-qwac"
dpop = true
dpop_key = {{ file = "{dir}/dpop.pem" }}

[credentials.acme-bank]
provider = "bank"
client_id = "acme-payu-client"
scopes = ["create_payment_links"]

[[routes]]
path_prefix = "/bank"
upstream = "https://{upstream}/payu"
credential = "acme-bank"
client_identity = "acme-qwac"
"#,
        dir = keys.path().display(),
        token = h.stand_ins.token_addr,
        upstream = h.stand_ins.upstream_addr,
    );
    let parsed =
        token_sidecar::config::Config::from_toml(&regulated, std::path::Path::new("regulated.toml")).unwrap();
    seen.push_str(&format!("{parsed:?}"));
    let bank = Harness::with_config(|_| regulated.clone()).await;
    seen.push_str(&bank.get("/bank/x").await.text().await.unwrap());
    seen.push_str(&bank.tokens().await.to_string());

    // The fleet's Redis over TLS with an ACL user: its password in a file, in the URL, and a
    // wrong one (every connection then fails, and is logged).
    let redis_password = "redis-password-never-logged-5b1e";
    let wrong_password = "wrong-redis-password-never-logged";
    let redis = support::redis::RedisServer::start_tls(
        "no_leaks (fleet part)",
        &h.stand_ins.pki,
        "sidecar",
        redis_password,
    );
    if let Some(redis) = &redis {
        let file = support::redis::write_file(keys.path(), "redis-password", redis_password);
        let key = STANDARD.encode([3u8; 32]);
        for shared in [
            format!("redis_url = \"rediss://127.0.0.1:{}\"\nusername = \"sidecar\"\npassword = {{ file = \"{}\" }}", redis.addr.port(), file.display()),
            format!("redis_url = \"rediss://sidecar:{redis_password}@127.0.0.1:{}\"", redis.addr.port()),
            format!("redis_url = \"rediss://sidecar:{wrong_password}@127.0.0.1:{}\"", redis.addr.port()),
        ] {
            let fleet = Harness::with_config(|s| {
                support::single_route_config(s, &format!("https://{}/payu", s.upstream_addr), "")
                    + &format!("\n[cache.shared]\n{shared}\nencryption_key = \"{key}\"\n")
            })
            .await;
            seen.push_str(&fleet.get("/api/x").await.text().await.unwrap());
            seen.push_str(&fleet.metrics_text().await);
            seen.push_str(&format!("{:?}", fleet.sidecar.tokens.snapshots().await));
            fleet.sidecar.shutdown().await;
        }
        let parsed = token_sidecar::config::Config::from_toml(
            &format!(
                "[cache.shared]\nredis_url = \"rediss://sidecar:{redis_password}@127.0.0.1:1\"\nencryption_key = \"{key}\"\n"
            ),
            std::path::Path::new("fleet.toml"),
        )
        .unwrap();
        seen.push_str(&format!("{parsed:?}"));
        for key in redis.keys() {
            seen.push_str(&key);
        }
    }

    let Harness {
        sidecar, stand_ins, ..
    } = h;
    sidecar.shutdown().await;
    bank.sidecar.shutdown().await;
    traces.shutdown(std::time::Duration::from_secs(5)).await;
    let received = collector.received.lock().unwrap();
    assert!(
        received.spans.len() > 20,
        "spans were exported: {}",
        received.spans.len()
    );
    for export in &received.raw {
        seen.push_str(&String::from_utf8_lossy(export));
    }
    for span in &received.spans {
        seen.push_str(&format!("{span:?}"));
    }
    drop(received);

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(logs.contains("fetched token"), "the capture works");
    assert!(
        logs.lines().count() > 100,
        "trace level was on: {} lines",
        logs.lines().count()
    );

    let mut forbidden: Vec<String> = [
        "dev-nuapay-api-key",
        "dev-setu-secret",
        "dev-booking-secret",
        "dev-payu-secret",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    forbidden.push(STANDARD.encode("dev-nuapay-api-key:"));
    forbidden.push(export_key.to_owned());
    if redis.is_some() {
        forbidden.push(redis_password.to_owned());
        forbidden.push(wrong_password.to_owned());
    }
    // A line from inside each private key.
    for pem in [&signing_pem, &identity_key, &dpop_pem] {
        forbidden.push(pem.lines().nth(2).unwrap().to_owned());
    }
    for subject in [
        "ybo8zd8j2q",
        "k3v9x2mq7p",
        "acme-setu-client",
        "acme-booking-client",
        "acme-payu-client",
    ] {
        for token in stand_ins.issued.tokens_of(subject) {
            forbidden.push(STANDARD.encode(format!("{token}:")));
            forbidden.push(token);
        }
    }
    assert!(forbidden.len() > 10);
    for secret in &forbidden {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret or token is in the logs: {}…",
            &secret[..8]
        );
        assert!(
            !seen.contains(secret.as_str()),
            "a secret or token is in a response: {}…",
            &secret[..8]
        );
    }
}
