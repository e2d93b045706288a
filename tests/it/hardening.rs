//! What an adversarial review of the release binary broke, each driven over real sockets:
//! connections that do nothing, tokens that arrive unusable, encoded traversal, echoed
//! secrets, forced refreshes, browsers, broken bodies, hyper's own errors, spoofed errors, lax
//! Host handling, unsolicited 101s, and the small decisions of finding 12.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use token_sidecar::body::full_body;
use token_sidecar::clock::ManualClock;
use token_sidecar::dev::certs::TestPki;
use token_sidecar::dev::providers::{Failure, Shape};
use token_sidecar::server::Handler;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    assert_json_error, custom_config, raw_exchange, spawn_tls_server, spawn_token_endpoint, Harness,
    TokenAnswers, ANY_PORT,
};

fn with_server_keys(keys: &'static str) -> impl FnOnce(&token_sidecar::dev::StandIns) -> String {
    move |s| {
        s.config_toml(ANY_PORT.parse().unwrap(), ANY_PORT.parse().unwrap())
            .replacen("[server]\n", &format!("[server]\n{keys}\n"), 1)
    }
}

/// Reads until the peer closes the connection; how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

// Finding 1: every connection must make progress.

#[tokio::test]
async fn silent_connections_and_bare_http2_prefaces_are_closed_after_the_header_read_timeout() {
    let h = Harness::with_config(with_server_keys("header_read_timeout = \"300ms\"")).await;
    for opening in [
        &b""[..],
        b"PRI * HTTP/2.0",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /acme/payu/x HTTP/1.1\r\nHost: loc",
    ] {
        for addr in [h.sidecar.proxy_addr, h.sidecar.admin_addr.unwrap()] {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(opening).await.unwrap();
            let took = closed_within(&mut stream, Duration::from_secs(5)).await;
            assert!(
                took < Duration::from_secs(3),
                "{:?} held {addr} for {took:?}",
                String::from_utf8_lossy(opening)
            );
        }
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let h = Harness::with_config(with_server_keys("idle_timeout = \"500ms\"")).await;
    let mut stream = TcpStream::connect(h.sidecar.proxy_addr).await.unwrap();
    stream
        .write_all(b"GET /acme/payu/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let took = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(3), "idle for {took:?}");
}

#[tokio::test]
async fn connections_that_do_nothing_cannot_hold_the_connection_cap() {
    let h = Harness::with_config(with_server_keys(
        "max_connections = 4\nheader_read_timeout = \"60s\"",
    ))
    .await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(h.sidecar.proxy_addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        silent.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), h.get("/acme/payu/x"))
        .await
        .expect("served although the cap was full of idle connections");
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_request_body_that_stalls_gets_408() {
    let h = Harness::with_config(with_server_keys("body_read_timeout = \"300ms\"")).await;
    // Small enough to be kept for a replay, and streamed straight through.
    for declared in [100, 4 * 1024 * 1024] {
        let mut stream = TcpStream::connect(h.sidecar.proxy_addr).await.unwrap();
        let head = format!(
            "POST /acme/payu/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: {declared}\r\n\r\n0123456789"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
            .await
            .expect("an answer, not a held slot")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
        assert_json_error(&answer, 408, "request_timeout");
    }
}

// Finding 2: a token that cannot be used on arrival is a failed fetch.

/// The sidecar behind a token endpoint of this test's own that moves the sidecar's clock by
/// `latency` per request (a slow endpoint) and answers `body`.
async fn behind_a_slow_endpoint(
    latency: Duration,
    body: &'static str,
) -> (Harness, Arc<std::sync::atomic::AtomicUsize>) {
    let pki = TestPki::new().unwrap();
    let clock: Arc<OnceLock<Arc<ManualClock>>> = Arc::default();
    let moved = clock.clone();
    let answers: TokenAnswers = Arc::new(move |_| (200, body.to_owned()));
    let (token, count) = spawn_token_endpoint(
        &pki,
        answers,
        Arc::new(move || {
            if let Some(clock) = moved.get() {
                clock.advance(latency);
            }
        }),
    )
    .await;
    let h = Harness::with_config_trusting(
        |s| {
            custom_config(
                &format!("https://{token}/token"),
                &format!("https://{}/payu", s.upstream_addr),
                "",
                "",
            )
        },
        &pki,
    )
    .await;
    clock.set(h.clock.clone()).unwrap();
    (h, count)
}

#[tokio::test]
async fn a_token_that_arrives_expired_or_in_its_last_moments_is_a_failed_fetch() {
    for (latency, body) in [
        (
            Duration::from_secs(3),
            r#"{"access_token":"late-token","expires_in":2}"#,
        ),
        // A 10 s token may not be sent in its last second.
        (
            Duration::from_millis(9500),
            r#"{"access_token":"late-token","expires_in":10}"#,
        ),
    ] {
        let (h, fetches) = behind_a_slow_endpoint(latency, body).await;
        let (status, json) = h.get_json("/api/x").await;
        assert_eq!(status, 503, "{json}");
        assert_eq!(json["error"]["code"], "token_unavailable");
        assert_eq!(
            h.stand_ins.upstream.accepted() + h.stand_ins.upstream.refusals().len(),
            0
        );
        let state = h.token_state("c").await;
        assert!(
            state["last_error"]
                .as_str()
                .unwrap()
                .contains("too close to its expiry"),
            "{state}"
        );
        // Backed off like any failure: the refresher does not keep fetching.
        let after_first = fetches.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            after_first,
            "no fetches during the back-off"
        );
        assert!(after_first <= 4, "one retry burst at most: {after_first}");
    }
}

#[tokio::test]
async fn a_token_that_lives_less_than_a_second_is_a_failed_fetch() {
    let (h, _) =
        behind_a_slow_endpoint(Duration::ZERO, r#"{"access_token":"blink","expires_in":1e-9}"#).await;
    let (status, json) = h.get_json("/api/x").await;
    assert_eq!(status, 503, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("less than a second"),
        "{json}"
    );
}

// Finding 3: encoded traversal.

#[tokio::test]
async fn encoded_traversal_is_refused_before_routing() {
    let h = Harness::start().await;
    for path in [
        "/acme/payu/normal/%2e%2e%2fadmin",
        "/acme/payu/..%2fadmin",
        "/acme/payu/..%5cadmin",
        "/acme/payu/..\\admin",
        "/acme/payu/..;/admin",
        "/acme/payu/.;/admin",
        "/acme/payu/%252e%252e/admin",
        "/acme/payu/%c0%ae%c0%ae/admin",
        "/acme/payu/a%2Fb",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let answer = raw_exchange(h.sidecar.proxy_addr, request.as_bytes()).await;
        assert_json_error(&answer, 400, "bad_request");
    }
    assert!(h.stand_ins.providers.seen().is_empty(), "no token was fetched");
    assert_eq!(h.stand_ins.upstream.accepted(), 0, "nothing reached the upstream");
}

// Finding 4: an echoed secret.

#[tokio::test]
async fn a_secret_echoed_by_the_token_endpoint_never_leaves_the_sidecar() {
    let h = Harness::start().await;
    h.stand_ins.providers.set_failing(Some(Failure {
        status: 401,
        retry_after: None,
        body: r#"{"error":"dev-payu-secret"}"#.into(),
    }));
    let response = h.get("/acme/payu/x").await;
    assert_eq!(response.status(), 503);
    let body = response.text().await.unwrap();
    assert!(!body.contains("dev-payu-secret"), "{body}");
    let tokens = h.tokens().await.to_string();
    assert!(!tokens.contains("dev-payu-secret"), "{tokens}");
    assert!(tokens.contains("rejected the credentials (401)"), "{tokens}");
}

// Finding 5: admin refresh.

#[tokio::test]
async fn admin_refresh_respects_back_off_and_joins_a_fetch_in_flight() {
    let h = Harness::start().await;
    let refresh = |force: bool| {
        let url = h.admin_url(if force {
            "/tokens/acme-payu/refresh?force=true"
        } else {
            "/tokens/acme-payu/refresh"
        });
        h.client.post(url).send()
    };
    h.stand_ins.providers.set_failing(Some(Failure::status(401)));
    for n in 0..10 {
        let response = refresh(false).await.unwrap();
        assert_eq!(response.status(), 503, "refresh {n}");
        assert!(response.headers().contains_key("retry-after"));
    }
    assert_eq!(
        h.stand_ins.providers.token_requests(Shape::PayU),
        1,
        "a rejected credential backs off"
    );
    assert_eq!(refresh(true).await.unwrap().status(), 503);
    assert_eq!(
        h.stand_ins.providers.token_requests(Shape::PayU),
        2,
        "force overrides the back-off"
    );

    h.stand_ins.providers.set_failing(None);
    h.stand_ins.providers.set_latency(Duration::from_millis(300));
    let before = h.stand_ins.providers.token_requests(Shape::PayU);
    let concurrent = futures_util::future::join_all((0..5).map(|_| refresh(true))).await;
    for response in concurrent {
        assert_eq!(response.unwrap().status(), 200);
    }
    assert_eq!(
        h.stand_ins.providers.token_requests(Shape::PayU) - before,
        1,
        "concurrent refreshes join one fetch"
    );
}

// Finding 6: browsers.

#[tokio::test]
async fn path_routes_serve_loopback_and_allowed_hosts_only() {
    let h = Harness::with_config(with_server_keys("allowed_hosts = [\"token-sidecar\"]")).await;
    for (host, status) in [
        ("attacker.example", 404),
        ("attacker.example:8080", 404),
        ("192.168.1.5", 404),
        ("localhost:8080", 200),
        ("127.0.0.1", 200),
        ("[::1]:8080", 200),
        ("token-sidecar", 200),
    ] {
        let request = format!(
            "POST /acme/payu/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
        let answer = raw_exchange(h.sidecar.proxy_addr, request.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{host}: {answer}"
        );
        if status == 404 {
            assert_json_error(&answer, 404, "no_route");
        }
    }
}

#[tokio::test]
async fn admin_posts_from_a_web_page_are_refused() {
    let h = Harness::start().await;
    let response = h
        .client
        .post(h.admin_url("/tokens/acme-payu/refresh"))
        .header("Origin", "https://attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-token-sidecar-error"], "forbidden");
    assert!(h.stand_ins.providers.seen().is_empty());
}

// Finding 7: a broken request body is the client's error.

#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_without_library_text() {
    let h = Harness::start().await;
    let request = b"POST /acme/payu/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
    let answer = raw_exchange(h.sidecar.proxy_addr, request).await;
    assert_json_error(&answer, 400, "bad_request");
    let lower = answer.to_ascii_lowercase();
    for library_words in ["hyper", "invalid chunk", "error reading", "user body"] {
        assert!(!lower.contains(library_words), "{answer}");
    }
}

// Finding 8: errors hyper raises itself are the contract's JSON too.

#[tokio::test]
async fn errors_raised_by_the_http_parser_are_the_contract_json() {
    let h = Harness::start().await;
    let many_headers: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases = [
        (
            format!("GET /acme/payu/x HTTP/1.1\r\nHost: localhost\r\n{many_headers}\r\n"),
            431,
            "request_too_large",
        ),
        (
            format!(
                "GET /acme/payu/{} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                "a".repeat(64 * 1024)
            ),
            414,
            "request_too_large",
        ),
        ("GARBAGE\r\n\r\n".to_owned(), 400, "bad_request"),
        (
            "GET /acme/payu/x HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n\r\n".to_owned(),
            400,
            "bad_request",
        ),
    ];
    for (request, status, code) in cases {
        let answer = raw_exchange(h.sidecar.proxy_addr, request.as_bytes()).await;
        assert_json_error(&answer, status, code);
    }
    // A keep-alive connection: a good request, then one hyper cannot parse.
    let pair = "GET /acme/payu/x HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut stream = TcpStream::connect(h.sidecar.proxy_addr).await.unwrap();
    stream.write_all(pair.as_bytes()).await.unwrap();
    let mut first = vec![0u8; 8192];
    let n = stream.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    stream.write_all(b"NOT HTTP\r\n\r\n").await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_json_error(&rest, 400, "bad_request");
}

/// The sidecar with one route `/api` to a TLS upstream of this test's own, answering with
/// `handler`.
async fn behind_an_upstream_of_our_own(handler: Handler) -> Harness {
    let pki = TestPki::new().unwrap();
    let upstream = spawn_tls_server(&pki, handler).await;
    Harness::with_config_trusting(
        |s| crate::support::single_route_config(s, &format!("https://{upstream}"), ""),
        &pki,
    )
    .await
}

// Finding 9: the upstream cannot speak for the sidecar.

#[tokio::test]
async fn an_upstream_cannot_spoof_the_sidecar_error_header() {
    let handler: Handler = Arc::new(|_| {
        Box::pin(async {
            let mut response = http::Response::new(full_body("upstream body"));
            response.headers_mut().insert(
                "x-token-sidecar-error",
                http::HeaderValue::from_static("forbidden"),
            );
            response
        })
    });
    let h = behind_an_upstream_of_our_own(handler).await;
    let response = h.get("/api/x").await;
    assert_eq!(response.status(), 200);
    assert!(!response.headers().contains_key("x-token-sidecar-error"));
}

// Finding 10: Host.

#[tokio::test]
async fn duplicate_missing_or_malformed_host_is_a_400() {
    let h = Harness::start().await;
    for request in [
        "GET /acme/payu/x HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n",
        "GET /acme/payu/x HTTP/1.1\r\n\r\n",
        "GET /acme/payu/x HTTP/1.1\r\nHost: localhost..\r\n\r\n",
        "GET /acme/payu/x HTTP/1.1\r\nHost: local..host\r\n\r\n",
    ] {
        let answer = raw_exchange(h.sidecar.proxy_addr, request.as_bytes()).await;
        assert_json_error(&answer, 400, "bad_request");
    }
    let one_dot = "GET /acme/payu/x HTTP/1.1\r\nHost: localhost.\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(h.sidecar.proxy_addr, one_dot.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

// Finding 11: an unsolicited 101.

#[tokio::test]
async fn an_unsolicited_101_from_the_upstream_is_a_502_and_the_connection_goes_on() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: evil\r\n\r\n",
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    let h = Harness::with_config(|s| {
        crate::support::single_route_config(s, &format!("http://{upstream}"), "allow_plaintext = true")
    })
    .await;
    let mut stream = TcpStream::connect(h.sidecar.proxy_addr).await.unwrap();
    let request = "GET /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n";
    for round in 0..2 {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
        assert_json_error(&answer, 502, "upstream_unreachable");
        assert!(
            !answer.to_ascii_lowercase().contains("upgrade: evil"),
            "round {round}: {answer}"
        );
    }
}

// Finding 12.

#[tokio::test]
async fn a_token_outside_token68_is_a_failed_fetch() {
    let (h, _) = behind_a_slow_endpoint(
        Duration::ZERO,
        r#"{"access_token":"t\u00f6ken\r\nX-Injected: 1","expires_in":60}"#,
    )
    .await;
    let (status, json) = h.get_json("/api/x").await;
    assert_eq!(status, 503, "{json}");
    assert!(
        json["error"]["message"].as_str().unwrap().contains("token_chars"),
        "{json}"
    );
}

#[tokio::test]
async fn a_503_with_retry_after_from_the_token_endpoint_is_honoured() {
    let h = Harness::start().await;
    h.stand_ins.providers.fail_next(
        1,
        Failure {
            status: 503,
            retry_after: Some(120),
            body: "{}".into(),
        },
    );
    let response = h.get("/acme/payu/x").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "120");
    assert_eq!(h.get("/acme/payu/x").await.status(), 503);
    assert_eq!(
        h.stand_ins.providers.token_requests(Shape::PayU),
        1,
        "nothing sent before then"
    );
}

#[tokio::test]
async fn trace_is_refused() {
    let h = Harness::start().await;
    let answer = raw_exchange(
        h.sidecar.proxy_addr,
        b"TRACE /acme/payu/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_json_error(&answer, 405, "method_not_allowed");
    assert!(h.stand_ins.providers.seen().is_empty());
}

#[tokio::test]
async fn an_upstream_that_refuses_every_token_does_not_cause_a_fetch_per_request() {
    let handler: Handler = Arc::new(|_| {
        Box::pin(async {
            let mut response = http::Response::new(full_body("no"));
            *response.status_mut() = http::StatusCode::UNAUTHORIZED;
            response
        })
    });
    let h = behind_an_upstream_of_our_own(handler).await;
    for _ in 0..30 {
        assert_eq!(h.get("/api/x").await.status(), 401);
    }
    let fetches = h.stand_ins.providers.token_requests(Shape::PayU);
    assert!(fetches <= 3, "30 refused requests made {fetches} token fetches");
}

// Round two, finding 3: a body trickled a byte at a time.

/// Opens a POST that declares `declared` bytes and sends one byte every `every`, until the
/// connection closes; the answer it got, if any.
fn trickle(addr: std::net::SocketAddr, declared: usize, every: Duration) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head =
            format!("POST /acme/payu/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: {declared}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        for _ in 0..declared {
            let mut buf = [0u8; 1024];
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => { answer.extend_from_slice(&buf[..n]); break }
                },
                _ = tokio::time::sleep(every) => {
                    if stream.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
}

#[tokio::test]
async fn connections_trickling_a_body_cannot_hold_the_connection_cap() {
    let h = Harness::with_config(with_server_keys(
        "max_connections = 4\nbody_read_timeout = \"3s\"",
    ))
    .await;
    let trickles: Vec<_> = (0..4)
        .map(|_| trickle(h.sidecar.proxy_addr, 10_000, Duration::from_millis(500)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(20), h.get("/acme/payu/x"))
        .await
        .expect("served although the cap was full of trickling bodies");
    let waited = started.elapsed();
    eprintln!("4 connections trickling a byte every 0.5 s at max_connections = 4: a GET waited {waited:?}");
    assert_eq!(response.status(), 200);
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    for trickle in trickles {
        trickle.abort();
    }
}

#[tokio::test]
async fn a_body_that_trickles_past_the_request_body_timeout_gets_408() {
    let h = Harness::with_config(with_server_keys(
        "body_read_timeout = \"3s\"\nrequest_body_timeout = \"2s\"",
    ))
    .await;
    let started = Instant::now();
    let answer = trickle(h.sidecar.proxy_addr, 100, Duration::from_millis(200))
        .await
        .unwrap();
    assert_json_error(&answer, 408, "request_timeout");
    assert!(
        answer.contains("did not finish sending the request body within 2s"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

// Round two, "also fix": the admin listener and a page that rebinds its own name.

#[tokio::test]
async fn the_admin_listener_serves_loopback_addresses_and_allowed_hosts_only() {
    let h = Harness::with_config(with_server_keys("allowed_hosts = [\"token-sidecar\"]")).await;
    let admin = h.sidecar.admin_addr.unwrap();
    for (host, served) in [
        ("localhost:9901", true),
        ("127.0.0.1", true),
        ("10.1.2.3:9901", true),
        ("[::1]:9901", true),
        ("token-sidecar:9901", true),
        ("rebound.attacker.example", false),
    ] {
        let request = format!("GET /tokens HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(admin, request.as_bytes()).await;
        if served {
            assert!(answer.starts_with("HTTP/1.1 200 "), "{host}: {answer}");
        } else {
            assert_json_error(&answer, 404, "no_route");
            assert!(!answer.contains("acme"), "nothing of the tokens: {answer}");
        }
    }
}
