//! Traces: what the sidecar exports over OTLP for a request through a cold credential, that
//! nothing secret is in it, and that a dead or hanging collector holds no request up.

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use token_sidecar::clock::ManualClock;
use token_sidecar::dev::{dev_accounts, StandIns};

use crate::support::binary::{eventually, BinarySidecar};
use crate::support::otlp::{attribute, Collector, GrpcCollector};
use crate::support::redis::RedisServer;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const EXPORT_KEY: &str = "otlp-export-key-d41d8cd9";

fn config(s: &StandIns) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
watch_config = false

[tls]
ca_file = "ca.pem"

[providers.payu]
token_url = "https://{token}/oauth/token"

[credentials.acme-payu]
provider = "payu"
client_id = "acme-payu-client"
client_secret = {{ file = "secrets/payu" }}
scopes = ["create_payment_links"]

[[routes]]
path_prefix = "/api"
upstream = "https://{upstream}/payu"
credential = "acme-payu"
"#,
        token = s.token_addr,
        upstream = s.upstream_addr,
    )
}

async fn traced_sidecar(s: &StandIns, collector: &str) -> BinarySidecar {
    let headers = format!("x-otlp-key={EXPORT_KEY}");
    BinarySidecar::start_with_env(
        s,
        &config(s),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector),
            ("OTEL_EXPORTER_OTLP_HEADERS", &headers),
            ("OTEL_SERVICE_NAME", "checkout-sidecar"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
        ],
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|span| span.name == name).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_through_a_cold_credential_is_traced_from_the_client_to_the_provider() {
    let s = StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap();
    let collector = Collector::start().await;
    let sidecar = traced_sidecar(&s, &collector.endpoint()).await;

    let answer = sidecar
        .client
        .get(format!(
            "http://{}/api/payments?card=4111111111111111",
            sidecar.proxy
        ))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("tracestate", "vendor=opaque")
        .header("baggage", "tenant=acme")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let echoed: serde_json::Value = answer.json().await.unwrap();
    let upstream_headers = &echoed["headers"];
    let merchant = echoed["merchant"].as_str().unwrap();
    let token = s
        .issued
        .tokens_of(merchant)
        .pop()
        .expect("the token the upstream accepted");
    let sent_on = upstream_headers["traceparent"]
        .as_str()
        .expect("the upstream gets a traceparent");
    let parts: Vec<&str> = sent_on.split('-').collect();
    assert_eq!(
        parts[1], CLIENT_TRACE,
        "the upstream request is in the client's trace"
    );
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "it names the sidecar's span, not the client's"
    );
    assert_eq!(upstream_headers["tracestate"], "vendor=opaque");
    assert_eq!(upstream_headers["baggage"], "tenant=acme");

    eventually("the request's spans and its fetch's arrive", async || {
        let spans = collector.spans();
        ["GET /api", "GET", "token fetch", "POST"]
            .iter()
            .all(|name| !named(&spans, name).is_empty())
    })
    .await;
    let spans = collector.spans();

    let server = named(&spans, "GET /api")[0];
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(hex(&server.trace_id), CLIENT_TRACE);
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(attribute(server, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attribute(server, "url.path").as_deref(), Some("/api/payments"));
    assert_eq!(attribute(server, "http.route").as_deref(), Some("/api"));
    assert_eq!(
        attribute(server, "http.response.status_code").as_deref(),
        Some("200")
    );

    let upstream = spans
        .iter()
        .find(|span| span.kind == SpanKind::Client as i32 && hex(&span.span_id) == parts[2])
        .expect("the upstream's traceparent names an exported client span");
    assert!(
        server.end_time_unix_nano >= upstream.end_time_unix_nano,
        "the request's span lasts until its response has been sent"
    );
    assert_eq!(hex(&upstream.trace_id), CLIENT_TRACE);
    assert_eq!(upstream.parent_span_id, server.span_id);
    assert_eq!(
        attribute(upstream, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(attribute(upstream, "url.path").as_deref(), Some("/payu/payments"));
    assert_eq!(
        attribute(upstream, "http.response.status_code").as_deref(),
        Some("200")
    );

    let fetch = named(&spans, "token fetch")[0];
    assert!(
        server
            .links
            .iter()
            .any(|link| link.span_id == fetch.span_id && link.trace_id == fetch.trace_id),
        "the request links the fetch it waited for"
    );
    for (key, value) in [
        ("token_sidecar.provider", "payu"),
        ("token_sidecar.credential", "acme-payu"),
        ("token_sidecar.dialect", "oauth2"),
        ("token_sidecar.attempts", "1"),
        ("token_sidecar.outcome", "ok"),
        ("http.response.status_code", "200"),
        ("server.address", &s.token_addr.to_string()),
    ] {
        assert_eq!(attribute(fetch, key).as_deref(), Some(value), "{key}");
    }
    let endpoint = named(&spans, "POST")[0];
    assert_eq!(
        endpoint.parent_span_id, fetch.span_id,
        "the endpoint request is the fetch's child"
    );
    assert_eq!(attribute(endpoint, "url.path").as_deref(), Some("/oauth/token"));

    let received = collector.received.lock().unwrap();
    assert!(received
        .resource
        .contains(&("service.name".into(), "checkout-sidecar".into())));
    assert!(received
        .resource
        .contains(&("deployment.environment".into(), "test".into())));
    assert!(
        received
            .headers
            .iter()
            .any(|h| h == &format!("x-otlp-key: {EXPORT_KEY}")),
        "OTEL_EXPORTER_OTLP_HEADERS goes with the export"
    );
    for secret in [
        token.as_str(),
        "dev-payu-secret",
        "4111111111111111",
        "card=",
        EXPORT_KEY,
    ] {
        assert!(
            !received.raw.iter().any(|raw| contains(raw, secret.as_bytes())),
            "`{secret}` is in the exported trace"
        );
    }
    let logs = sidecar.logs.lock().unwrap().join("\n");
    assert!(
        !logs.contains(EXPORT_KEY),
        "the export's headers are never logged"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// `count` GETs, 50 at a time: the slowest answer, and whether every one was 200.
async fn load(sidecar: &BinarySidecar, count: usize) -> (Duration, bool) {
    let mut slowest = Duration::ZERO;
    let mut all_ok = true;
    for _ in 0..count / 50 {
        let batch = (0..50).map(|_| async {
            let started = Instant::now();
            let status = sidecar.get("/api/pay").await.status();
            (started.elapsed(), status == 200)
        });
        for (took, ok) in futures_util::future::join_all(batch).await {
            slowest = slowest.max(took);
            all_ok &= ok;
        }
    }
    (slowest, all_ok)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_or_hanging_collector_holds_no_request_up_and_its_spans_are_counted_as_dropped() {
    let s = StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap();
    // Down: nothing listens on the port (bound, then let go).
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let hanging = Collector::answering_after(Duration::from_secs(120)).await;
    for collector in [format!("http://{dead}"), hanging.endpoint()] {
        let sidecar = traced_sidecar(&s, &collector).await;
        let (slowest, all_ok) = load(&sidecar, 3000).await;
        assert!(
            all_ok,
            "every request answered 200 with the collector at {collector}"
        );
        // An export waits up to 10 s; a request that waited on one would take that long (the
        // bound leaves room for a loaded CI machine).
        assert!(
            slowest < Duration::from_secs(5),
            "slowest request {slowest:?} with the collector at {collector}"
        );
        eventually("dropped spans are counted", async || {
            let metrics = sidecar.metrics().await;
            metrics
                .lines()
                .find_map(|line| line.strip_prefix("token_sidecar_trace_spans_dropped_total "))
                .and_then(|n| n.trim().parse::<f64>().ok())
                .is_some_and(|n| n > 0.0)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_go_over_grpc_when_the_protocol_says_so() {
    let s = StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap();
    let collector = GrpcCollector::start().await;
    let sidecar = BinarySidecar::start_with_env(
        &s,
        &config(&s),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_HEADERS", &format!("x-otlp-key={EXPORT_KEY}")),
        ],
    );
    assert_eq!(sidecar.get("/api/payments").await.status(), 200);
    eventually("the spans arrive over gRPC", async || {
        let spans = collector.spans();
        !named(&spans, "GET /api").is_empty() && !named(&spans, "token fetch").is_empty()
    })
    .await;
    let received = collector.received.lock().unwrap();
    assert!(received
        .resource
        .contains(&("service.name".into(), "token-sidecar".into())));
    assert!(
        received
            .headers
            .iter()
            .any(|h| h == &format!("x-otlp-key: {EXPORT_KEY}")),
        "the headers go as gRPC metadata: {:?}",
        received.headers
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_its_client_did_not_sample_makes_no_span_and_keeps_the_clients_traceparent() {
    let s = StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap();
    let collector = Collector::start().await;
    let sidecar = traced_sidecar(&s, &collector.endpoint()).await;
    let unsampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    let answer = sidecar
        .client
        .get(format!("http://{}/api/payments", sidecar.proxy))
        .header("traceparent", &unsampled)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let echoed: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        echoed["headers"]["traceparent"],
        unsampled.as_str(),
        "passed on untouched"
    );
    // The token fetch is a trace of its own, sampled as a root: it arrives, the request's spans
    // do not.
    eventually("the fetch's span arrives", async || {
        !named(&collector.spans(), "token fetch").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans = collector.spans();
    assert!(
        spans.iter().all(|span| hex(&span.trace_id) != CLIENT_TRACE),
        "no span in the client's unsampled trace: {:?}",
        spans.iter().map(|span| &span.name).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleets_redis_round_trips_are_spans_of_the_fetch_they_serve() {
    let Some(redis) = RedisServer::start("the_fleets_redis_round_trips_are_spans_of_the_fetch_they_serve")
    else {
        return;
    };
    let s = StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap();
    let collector = Collector::start().await;
    let shared = format!(
        "[cache.shared]\nredis_url = \"{}\"\nencryption_key = \"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\"\n",
        redis.url()
    );
    let config = config(&s).replace("[providers.payu]", &format!("{shared}\n[providers.payu]"));
    let sidecar = BinarySidecar::start_with_env(
        &s,
        &config,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint())],
    );
    assert_eq!(sidecar.get("/api/payments").await.status(), 200);
    eventually("the fetch's spans arrive", async || {
        let spans = collector.spans();
        ["token fetch", "read token", "take lock", "store outcome"]
            .iter()
            .all(|name| !named(&spans, name).is_empty())
    })
    .await;
    let spans = collector.spans();
    let fetch = named(&spans, "token fetch")[0];
    for name in ["read token", "take lock", "store outcome"] {
        let span = named(&spans, name)[0];
        assert_eq!(span.parent_span_id, fetch.span_id, "{name} is the fetch's child");
        assert_eq!(attribute(span, "db.system.name").as_deref(), Some("redis"));
    }
    let endpoint = named(&spans, "POST")[0];
    assert_eq!(endpoint.parent_span_id, fetch.span_id, "the endpoint request too");
    let raw = collector.received.lock().unwrap().raw.concat();
    assert!(!contains(&raw, b"BwcHBwcH"), "no encryption key in the export");
}
