//! The shipped alerts and dashboard against a real Prometheus scraping a real sidecar: every
//! PromQL expression in `deploy/prometheus/alerts.yml` and `deploy/grafana/token-sidecar.json`
//! parses, and names metrics (with label matchers) the sidecar really exports: no panel shows
//! "no data" for a typo'd name.

use std::time::Duration;

use token_sidecar::clock::ManualClock;
use token_sidecar::dev::{dev_accounts, StandIns};

use crate::support::binary::{replace_file, BinarySidecar};
use crate::support::prometheus::Prometheus;
use crate::support::redis::RedisServer;
use crate::support::{repo_root, skip};

const TEST: &str = "every_alert_and_dashboard_expression_finds_series_the_sidecar_exports";

fn config(s: &StandIns, redis: &RedisServer) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
watch_config = false

[tls]
ca_file = "ca.pem"

[cache.shared]
redis_url = "{redis}"
encryption_key = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="
timeout = "1s"

[providers.payu]
token_url = "https://{token}/oauth/token"

[providers.payu-limited]
token_url = "https://{token}/oauth/token"
max_fetch_rate = "1/h"

[providers.broken]
token_url = "https://127.0.0.1:1/oauth/token"
connect_timeout = "200ms"

[credentials.acme-payu]
provider = "payu"
client_id = "acme-payu-client"
client_secret = {{ file = "secrets/payu" }}
scopes = ["create_payment_links"]

[credentials.limited-a]
provider = "payu-limited"
client_id = "acme-payu-client"
client_secret = {{ file = "secrets/payu" }}
scopes = ["create_payment_links"]

[credentials.limited-b]
provider = "payu-limited"
client_id = "acme-payu-client"
client_secret = {{ file = "secrets/payu" }}
scopes = ["read_payment_links"]

[credentials.broken]
provider = "broken"
client_id = "broken-client"
client_secret = "broken-secret"

[[routes]]
path_prefix = "/acme/payu"
upstream = "https://{upstream}/payu"
credential = "acme-payu"

[[routes]]
path_prefix = "/limited/a"
upstream = "https://{upstream}/payu"
credential = "limited-a"

[[routes]]
path_prefix = "/limited/b"
upstream = "https://{upstream}/payu"
credential = "limited-b"

[[routes]]
path_prefix = "/broken"
upstream = "https://{upstream}/payu"
credential = "broken"

[[routes]]
path_prefix = "/dead"
upstream = "https://127.0.0.1:1"
credential = "acme-payu"
"#,
        redis = redis.url(),
        token = s.token_addr,
        upstream = s.upstream_addr,
    )
}

/// Traffic that makes every series the alerts and panels read: successes, a 404, a failing
/// credential (token_unavailable), an unreachable upstream, a 401 replay, a throttled fetch, an
/// invalid and a good reload, and last the fleet's Redis going away (fallback, down).
async fn exercise(s: &StandIns, sidecar: &BinarySidecar, redis: &mut RedisServer) {
    for path in [
        "/acme/payu/p",
        "/acme/payu/p",
        "/nowhere",
        "/broken/p",
        "/dead/p",
        "/limited/a/p",
        "/limited/b/p",
    ] {
        sidecar.get(path).await;
    }
    s.issued.revoke_subject("acme-payu-client");
    sidecar.get("/acme/payu/p").await;
    let good = std::fs::read_to_string(sidecar.config_path()).unwrap();
    replace_file(&sidecar.config_path(), "[server]\nlisten = 1\n");
    assert_eq!(sidecar.reload().await.0, 422);
    replace_file(&sidecar.config_path(), &good);
    assert_eq!(sidecar.reload().await.0, 200);
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sidecar
        .client
        .post(format!(
            "http://{}/tokens/acme-payu/refresh?force=true",
            sidecar.admin
        ))
        .send()
        .await
        .unwrap();
    sidecar.get("/acme/payu/p").await;
}

/// The `token_sidecar_…` selectors in `expr` (name and label matchers, without ranges).
fn selectors(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("token_sidecar_") {
        let tail = &rest[start..];
        let name_len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut selector = tail[..name_len].to_owned();
        if tail[name_len..].starts_with('{') {
            let close = tail[name_len..].find('}').expect("a closed label matcher");
            selector.push_str(&tail[name_len..=name_len + close]);
        }
        found.push(selector);
        rest = &tail[name_len..];
    }
    found
}

fn alert_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml")).unwrap();
    let rules: serde_json::Value = serde_norway::from_str(&text).unwrap();
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap().clone())
        .map(|rule| {
            (
                rule["alert"].as_str().unwrap().to_owned(),
                rule["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("deploy/grafana/token-sidecar.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |target| (title.clone(), target["expr"].as_str().unwrap().to_owned()))
        })
        .map(|(title, expr)| {
            (
                title,
                expr.replace("$instance", ".+").replace("$__rate_interval", "1m"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_alert_and_dashboard_expression_finds_series_the_sidecar_exports() {
    let Some(mut redis) = RedisServer::start(TEST) else {
        return;
    };
    let s = StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap();
    let sidecar = BinarySidecar::start(&s, &config(&s, &redis));
    let scraped = sidecar.metrics.expect("a metrics listener");
    let Some(prometheus) = Prometheus::start(TEST, &[scraped]).await else {
        skip(TEST, "no prometheus");
        return;
    };
    // Prometheus hands its first targets to the scraper a few seconds after it starts.
    let before = scrapes(&prometheus, 0, Duration::from_secs(30)).await;
    exercise(&s, &sidecar, &mut redis).await;
    // A series made last needs two scrapes for a rate.
    scrapes(&prometheus, before + 3, Duration::from_secs(30)).await;

    let mut missing = Vec::new();
    for (alert, expr) in alert_expressions() {
        prometheus
            .query(&expr)
            .await
            .unwrap_or_else(|err| panic!("{alert}: {err}\n{expr}"));
        for selector in selectors(&expr) {
            if prometheus.query(&selector).await.unwrap().is_empty() {
                missing.push(format!("alert {alert}: {selector}"));
            }
        }
    }
    for (panel, expr) in dashboard_expressions() {
        let series = prometheus
            .query(&expr)
            .await
            .unwrap_or_else(|err| panic!("panel {panel}: {err}\n{expr}"));
        if series.is_empty() {
            missing.push(format!("panel {panel}: {expr}"));
        }
        for selector in selectors(&expr) {
            let selector = selector.replace("$instance", ".+");
            if prometheus.query(&selector).await.unwrap().is_empty() {
                missing.push(format!("panel {panel}: {selector}"));
            }
        }
    }
    let exported = sidecar.metrics().await;
    assert!(
        missing.is_empty(),
        "no series for:\n{}\n\nthe sidecar exports:\n{exported}",
        missing.join("\n")
    );
}

/// Waits until Prometheus has scraped the sidecar more than `after` times; how many it has.
async fn scrapes(prometheus: &Prometheus, after: u64, within: Duration) -> u64 {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        let counted = prometheus
            .query("count_over_time(up{job=\"token-sidecar\"}[10m])")
            .await
            .unwrap()
            .first()
            .and_then(|series| series["value"][1].as_str()?.parse::<u64>().ok())
            .unwrap_or(0);
        if counted > after {
            return counted;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("Prometheus did not scrape the sidecar more than {after} times in {within:?}");
}

#[test]
fn selectors_are_read_with_their_label_matchers() {
    assert_eq!(
        selectors("sum without (x) (rate(token_sidecar_a_total{outcome!=\"ok\"}[5m])) / token_sidecar_b"),
        ["token_sidecar_a_total{outcome!=\"ok\"}", "token_sidecar_b"]
    );
}
