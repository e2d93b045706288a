//! Which request goes where: path prefixes on whole segments, Host and absolute-form routing,
//! the header-selected credential, and 404 for everything else.

use crate::support::{echo_ok, Harness};

#[tokio::test]
async fn prefix_is_stripped_and_joined_onto_the_upstream_base_path() {
    let h = Harness::start().await;
    let (status, echo) = h.get_json("/acme/payu/v1/links/42?expand=true&q=a%20b").await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/payu/v1/links/42");
    assert_eq!(echo["query"], "expand=true&q=a%20b");
    let (status, echo) = h.get_json("/acme/payu").await;
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/payu");
}

#[tokio::test]
async fn longest_prefix_wins_and_prefixes_match_whole_segments() {
    let h = Harness::start().await;
    // /globex/nuapay/refunds is its own route (Basic username injection).
    let echo: serde_json::Value = h
        .client
        .post(h.url("/globex/nuapay/refunds/7"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["path"], "/nuapay/refunds/7");
    assert_eq!(echo["auth"], "basic-username");
    // /acme/payuX is not under /acme/payu.
    let (status, body) = h.get_json("/acme/payuX/links").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "no_route");
}

#[tokio::test]
async fn host_header_selects_a_route() {
    let h = Harness::start().await;
    let response = h
        .client
        .get(h.url("/payment-links"))
        .header("host", "payu.acme.localhost:8080")
        .send()
        .await
        .unwrap();
    let echo = echo_ok(response).await;
    assert_eq!(echo["merchant"], "acme-payu-client");
    assert_eq!(echo["path"], "/payu/payment-links");
    let upstream_host = h.stand_ins.upstream_addr.to_string();
    // The upstream sees its own authority, never the client's Host.
    assert_eq!(echo["headers"]["host"], upstream_host.as_str(), "{echo}");
}

#[tokio::test]
async fn absolute_form_requests_from_http_proxy_clients_route_by_host() {
    let h = Harness::start().await;
    let via_proxy = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(h.url("")).unwrap())
        .build()
        .unwrap();
    let response = via_proxy
        .get("http://payu.acme.localhost/payment-links?x=1")
        .send()
        .await
        .unwrap();
    let echo = echo_ok(response).await;
    assert_eq!(echo["merchant"], "acme-payu-client");
    assert_eq!(echo["path"], "/payu/payment-links");
    assert_eq!(echo["query"], "x=1");

    let response = via_proxy
        .get("http://unknown.example/payment-links")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "unknown hosts are not proxied");
    assert_eq!(response.headers()["x-token-sidecar-error"], "no_route");
}

#[tokio::test]
async fn unmatched_requests_get_the_json_404_and_fetch_no_token() {
    let h = Harness::start().await;
    for path in ["/", "/unknown/x"] {
        let response = h.get(path).await;
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.headers()["x-token-sidecar-error"], "no_route");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "no_route");
    }
    // Dot segments could climb out of a prefix; clients like curl and reqwest normalise them
    // away, so send them raw.
    for path in ["/acme/payu/../nuapay/x", "/acme/payu/%2E%2e/x"] {
        let answer = raw_request(&h, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(
            answer.contains("x-token-sidecar-error: bad_request"),
            "{path}: {answer}"
        );
    }
    assert!(h.stand_ins.providers.seen().is_empty());
}

#[tokio::test]
async fn credential_header_picks_from_the_allow_list_and_is_stripped() {
    let h = Harness::start().await;
    let send = |merchant: Option<&'static str>| {
        let mut request = h.client.get(h.url("/nuapay/payments"));
        if let Some(merchant) = merchant {
            request = request.header("X-Merchant", merchant);
        }
        request.send()
    };
    let echo: serde_json::Value = send(Some("globex-nuapay")).await.unwrap().json().await.unwrap();
    assert_eq!(echo["merchant"], "k3v9x2mq7p");
    assert!(
        echo["headers"].get("x-merchant").is_none(),
        "selector header stripped: {echo}"
    );

    for bad in [None, Some("acme-payu"), Some("nobody")] {
        let response = send(bad).await.unwrap();
        assert_eq!(response.status(), 400, "{bad:?}");
        assert_eq!(response.headers()["x-token-sidecar-error"], "unknown_credential");
    }
    assert_eq!(
        h.stand_ins.providers.seen().len(),
        1,
        "refused requests fetch nothing"
    );
}

#[tokio::test]
async fn connect_is_refused_with_an_explanation() {
    let h = Harness::start().await;
    let answer = raw_request(
        &h,
        "CONNECT api.nuapay.com:443 HTTP/1.1\r\nHost: api.nuapay.com:443\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.contains("x-token-sidecar-error: method_not_allowed"),
        "{answer}"
    );
    assert!(
        answer.contains("http://"),
        "explains what to do instead: {answer}"
    );
}

/// Sends `request` as written and returns the start of the answer.
async fn raw_request(h: &Harness, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(h.sidecar.proxy_addr)
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer[..read]).into_owned()
}
