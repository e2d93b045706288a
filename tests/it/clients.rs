//! Real clients as applications use them: Python `requests` configured with `HTTP_PROXY`.

use std::process::Command;

use crate::support::{python_requests, skip, Harness};

const SCRIPT: &str = r#"
import json, sys, requests
response = requests.get("http://payu.acme.localhost/payment-links?page=2", timeout=10)
print(json.dumps({"status": response.status_code, "body": response.json()}))
"#;

#[tokio::test]
async fn python_requests_with_http_proxy_reaches_the_host_route() {
    if !tokio::task::spawn_blocking(python_requests).await.unwrap() {
        return skip(
            "python_requests_with_http_proxy_reaches_the_host_route",
            "python3 with `requests` is not installed and pip could not install it",
        );
    }
    let h = Harness::start().await;
    let proxy = h.url("");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", SCRIPT])
            .env("HTTP_PROXY", &proxy)
            .env("http_proxy", &proxy)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["status"], 200);
    assert_eq!(result["body"]["merchant"], "acme-payu-client");
    assert_eq!(result["body"]["path"], "/payu/payment-links");
    assert_eq!(result["body"]["query"], "page=2");
}
