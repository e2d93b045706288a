//! A sidecar that cannot be turned against its owner: the shared-secret header, limits on bad
//! input, and no contact with anything but configured upstreams.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{echo_ok, Harness, ANY_PORT};

fn with_server_keys(keys: &'static str) -> impl FnOnce(&token_sidecar::dev::StandIns) -> String {
    move |s| {
        s.config_toml(ANY_PORT.parse().unwrap(), ANY_PORT.parse().unwrap())
            .replacen("[server]\n", &format!("[server]\n{keys}\n"), 1)
    }
}

#[tokio::test]
async fn require_header_gates_every_request_and_is_stripped() {
    let h = Harness::with_config(with_server_keys(
        r#"require_header = { name = "X-Sidecar-Key", value = "s3cret-gate-value" }"#,
    ))
    .await;
    for key in [
        None,
        Some("wrong"),
        Some("s3cret-gate-valuE"),
        Some("s3cret-gate-value-and-more"),
    ] {
        let mut request = h.client.get(h.url("/acme/payu/x"));
        if let Some(key) = key {
            request = request.header("X-Sidecar-Key", key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 403, "{key:?}");
        assert_eq!(response.headers()["x-token-sidecar-error"], "forbidden");
        let body = response.text().await.unwrap();
        assert!(!body.contains("s3cret-gate-value"), "{body}");
    }
    assert!(
        h.stand_ins.providers.seen().is_empty(),
        "refused requests fetch no token"
    );

    let response = h
        .client
        .get(h.url("/acme/payu/x"))
        .header("X-Sidecar-Key", "s3cret-gate-value")
        .send()
        .await
        .unwrap();
    let echo = echo_ok(response).await;
    assert!(
        echo["headers"].get("x-sidecar-key").is_none(),
        "gate header stripped: {echo}"
    );
}

#[tokio::test]
async fn oversized_headers_get_431_and_the_sidecar_keeps_serving() {
    let h = Harness::start().await;
    let response = h
        .client
        .get(h.url("/acme/payu/x"))
        .header("x-big", "a".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    assert_eq!(response.headers()["x-token-sidecar-error"], "request_too_large");
    assert_eq!(h.get_json("/acme/payu/x").await.0, 200);
}

#[tokio::test]
async fn bodies_over_max_request_body_get_413() {
    let h = Harness::with_config(with_server_keys("max_request_body = 1000")).await;
    let declared = h
        .client
        .post(h.url("/acme/payu/x"))
        .body(vec![b'a'; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 413);
    assert_eq!(declared.headers()["x-token-sidecar-error"], "request_too_large");

    let chunks = futures_util::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 600])));
    let streamed = h
        .client
        .post(h.url("/acme/payu/x"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let status = streamed.status();
    assert_eq!(
        status,
        413,
        "a chunked body is cut off at the limit too: {}",
        streamed.text().await.unwrap()
    );

    let within = h
        .client
        .post(h.url("/acme/payu/x"))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(within.status(), 200);
}

#[tokio::test]
async fn slow_clients_are_disconnected() {
    let h = Harness::with_config(with_server_keys("header_read_timeout = \"300ms\"")).await;
    let mut stream = tokio::net::TcpStream::connect(h.sidecar.proxy_addr)
        .await
        .unwrap();
    stream
        .write_all(b"GET /acme/payu/x HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buffer)).await;
    assert!(
        read.is_ok(),
        "the sidecar closed the connection of a client that never finished its headers"
    );
    assert_eq!(h.get_json("/acme/payu/x").await.0, 200);
}

#[tokio::test]
async fn unknown_hosts_open_no_connection_and_fetch_no_token() {
    let h = Harness::start().await;
    let via_proxy = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(h.url("")).unwrap())
        .build()
        .unwrap();
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://internal.example/admin",
    ] {
        let response = via_proxy.get(url).send().await.unwrap();
        assert_eq!(response.status(), 404, "{url}");
    }
    assert_eq!(h.stand_ins.upstream.accepted(), 0);
    assert!(
        h.stand_ins.upstream.refusals().is_empty(),
        "the upstream saw nothing"
    );
    assert!(h.stand_ins.providers.seen().is_empty());
}

#[tokio::test]
async fn a_huge_token_answer_is_an_error_not_a_crash() {
    let h = Harness::start().await;
    let huge = format!(
        r#"{{"access_token":"{}","expires_in":60}}"#,
        "a".repeat(1024 * 1024)
    );
    h.stand_ins.providers.set_malformed(Some(huge));
    let response = h.get("/acme/payu/x").await;
    assert_eq!(response.status(), 503);
    let state = h.token_state("acme-payu").await;
    assert!(
        state["last_error"]
            .as_str()
            .unwrap()
            .contains("larger than 256 KiB"),
        "{state}"
    );
    h.stand_ins.providers.set_malformed(Some("[".repeat(100_000)));
    h.advance(Duration::from_secs(120));
    assert_eq!(h.get("/acme/payu/x").await.status(), 503);
    let last_error = h.token_state("acme-payu").await["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        last_error.starts_with("127.0.0.1:")
            && last_error.ends_with("token endpoint answer unusable: answer is not JSON"),
        "the endpoint's host, then the reason: {last_error}"
    );
    assert_eq!(
        h.client
            .get(h.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_their_turn() {
    let h = Harness::with_config(with_server_keys("max_connections = 1")).await;
    let idle = tokio::net::TcpStream::connect(h.sidecar.proxy_addr)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = tokio::time::timeout(
        Duration::from_millis(500),
        h.client.get(h.url("/acme/payu/x")).send(),
    )
    .await;
    assert!(
        waiting.is_err(),
        "a second connection is not served while the first holds the only slot"
    );
    drop(idle);
    let served =
        tokio::time::timeout(Duration::from_secs(5), h.client.get(h.url("/acme/payu/x")).send()).await;
    assert_eq!(
        served.expect("served once the slot is free").unwrap().status(),
        200
    );
}
