//! What reaches the upstream and what comes back: client credentials replaced, hop-by-hop
//! headers dropped, bodies streamed both ways, redirects passed back, failures as JSON.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use token_sidecar::body::{full_body, BoxError};
use token_sidecar::dev::certs::TestPki;
use token_sidecar::dev::upstream::pattern;
use token_sidecar::server::Handler;
use tokio::sync::{mpsc, oneshot};

use crate::support::{echo_ok, single_route_config, spawn_tls_server, Harness};

#[tokio::test]
async fn client_authorization_and_hop_by_hop_headers_never_reach_the_upstream() {
    let h = Harness::start().await;
    let response = h
        .client
        .get(h.url("/acme/payu/links"))
        .header("authorization", "Bearer the-clients-own-token")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "1")
        .header("x-request-id", "r-1")
        .send()
        .await
        .unwrap();
    let echo = echo_ok(response).await;
    assert_eq!(
        echo["merchant"], "acme-payu-client",
        "the sidecar's token replaced the client's"
    );
    let headers = echo["headers"].as_object().unwrap();
    for dropped in ["proxy-authorization", "x-hop-secret", "connection"] {
        assert!(!headers.contains_key(dropped), "{dropped} forwarded: {echo}");
    }
    assert_eq!(headers["x-request-id"], "r-1", "end-to-end headers pass");
    assert_eq!(
        echo["version"], "HTTP/2.0",
        "HTTP/2 to the upstream, negotiated by ALPN"
    );
}

#[tokio::test]
async fn redirects_are_passed_back_not_followed() {
    let h = Harness::start().await;
    let response = h.get("/acme/payu/checkout/redirect").await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.headers()["location"], "https://elsewhere.test/landing");
    assert_eq!(
        h.stand_ins.upstream.accepted(),
        1,
        "one upstream request, none to the Location"
    );
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let h = Harness::start().await;
    const SIZE: usize = 24 * 1024 * 1024;
    let chunks = (0..SIZE / (64 * 1024))
        .map(|i| Ok::<_, std::io::Error>(Bytes::from(pattern((i * 64 * 1024) as u64, 64 * 1024))));
    let expected = Sha256::digest(pattern(0, SIZE));
    let response = h
        .client
        .post(h.url("/acme/payu/uploads"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let echo = echo_ok(response).await;
    assert_eq!(echo["body_bytes"], SIZE as u64);
    assert_eq!(echo["body_sha256"], hex::encode(expected));

    let response = h.get(&format!("/acme/payu/bytes/{SIZE}")).await;
    assert_eq!(response.status(), 200);
    let mut received = 0usize;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.as_ref(), pattern(received as u64, chunk.len()).as_slice());
        received += chunk.len();
    }
    assert_eq!(received, SIZE);
}

/// An upstream that sends the first part of its answer, then waits for the test's go-ahead:
/// the client can only see the first part if the sidecar streams the response.
#[tokio::test]
async fn response_bodies_are_streamed_not_buffered() {
    let pki = TestPki::new().unwrap();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release = Arc::new(Mutex::new(Some(release_rx)));
    let handler: Handler = Arc::new(move |_request| {
        let release = release.lock().unwrap().take();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first part;")))).await;
                if let Some(release) = release {
                    let _ = release.await;
                }
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"rest")))).await;
            });
            let body = StreamBody::new(tokio_stream(rx)).boxed_unsync();
            Response::new(body)
        })
    });
    let upstream = spawn_tls_server(&pki, handler).await;
    let h = Harness::with_config_trusting(
        |s| single_route_config(s, &format!("https://{upstream}"), ""),
        &pki,
    )
    .await;
    let response = h.get("/api/stream").await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first part arrives before the upstream finishes")
        .unwrap()
        .unwrap();
    assert_eq!(first.as_ref(), b"first part;");
    release_tx.send(()).unwrap();
    let rest = stream.next().await.unwrap().unwrap();
    assert_eq!(rest.as_ref(), b"rest");
}

/// The client sends the rest of its body only after the upstream saw the first chunk: that
/// can only happen if the sidecar streams the request.
#[tokio::test]
async fn request_bodies_are_streamed_not_buffered() {
    let pki = TestPki::new().unwrap();
    let (seen_tx, seen_rx) = oneshot::channel::<()>();
    let seen_tx = Arc::new(Mutex::new(Some(seen_tx)));
    let handler: Handler = Arc::new(move |request| {
        let seen_tx = seen_tx.lock().unwrap().take();
        Box::pin(async move {
            let mut body = request.into_body();
            let mut total = 0;
            let mut seen_tx = seen_tx;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    total += data.len();
                    if let Some(tx) = seen_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
            Response::new(full_body(total.to_string()))
        })
    });
    let upstream = spawn_tls_server(&pki, handler).await;
    let h = Harness::with_config_trusting(
        |s| single_route_config(s, &format!("https://{upstream}"), ""),
        &pki,
    )
    .await;
    let body =
        futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"chunk-one;")) })
            .chain(futures_util::stream::once(async move {
                tokio::time::timeout(Duration::from_secs(10), seen_rx)
                    .await
                    .map_err(|_| std::io::Error::other("upstream never saw the first chunk"))?
                    .map_err(std::io::Error::other)?;
                Ok(Bytes::from_static(b"chunk-two"))
            }));
    let response = h
        .client
        .post(h.url("/api/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "19");
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_json_error() {
    let h = Harness::with_config(|s| single_route_config(s, "https://127.0.0.1:1", "")).await;
    let response = h.get("/api/x").await;
    assert_eq!(response.status(), 502);
    assert_eq!(
        response.headers()["x-token-sidecar-error"],
        "upstream_unreachable"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn upstream_with_an_untrusted_certificate_is_a_502() {
    let other_ca = TestPki::new().unwrap();
    let handler: Handler =
        Arc::new(|_| Box::pin(async { Response::new(full_body("should not be reached")) }));
    let upstream = spawn_tls_server(&other_ca, handler).await;
    let h = Harness::with_config(|s| single_route_config(s, &format!("https://{upstream}"), "")).await;
    let response = h.get("/api/x").await;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
}

#[tokio::test]
async fn slow_upstream_is_a_504() {
    let pki = TestPki::new().unwrap();
    let handler: Handler = Arc::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(full_body("late"))
        })
    });
    let upstream = spawn_tls_server(&pki, handler).await;
    let route_extra = "timeout = \"200ms\"";
    let h = Harness::with_config_trusting(
        |s| single_route_config(s, &format!("https://{upstream}"), route_extra),
        &pki,
    )
    .await;
    let response = h.get("/api/x").await;
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["x-token-sidecar-error"], "upstream_timeout");
}

fn tokio_stream<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn client_authorization_is_dropped_also_when_the_token_goes_in_another_header() {
    let h = Harness::start().await;
    let response = h
        .client
        .post(h.url("/acme/booking/bookings"))
        .header("authorization", "Bearer the-clients-own-token")
        .send()
        .await
        .unwrap();
    let echo = crate::support::echo_ok(response).await;
    assert_eq!(
        echo["auth"], "header",
        "only the injected X-Auth-Token reached the upstream"
    );
}

/// A plain HTTP/1 upstream that counts the connections it accepted and has open. A request
/// whose path ends in `/close` is answered with `Connection: close`, and the upstream closes
/// that connection.
struct CountingUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

async fn counting_upstream() -> CountingUpstream {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted, still_open) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            still_open.fetch_add(1, Ordering::SeqCst);
            let still_open = still_open.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                        let mut response =
                            Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")));
                        if request.uri().path().ends_with("/close") {
                            response
                                .headers_mut()
                                .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
                still_open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    CountingUpstream { addr, accepted, open }
}

impl CountingUpstream {
    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn harness(&self) -> Harness {
        let upstream = format!("http://{}", self.addr);
        Harness::with_config(|s| single_route_config(s, &upstream, "allow_plaintext = true")).await
    }
}

/// A client that keeps one connection (`keep_alive`), or opens one per request.
fn http1_client(keep_alive: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(usize::from(keep_alive))
        .build()
        .unwrap()
}

async fn get_ok(client: &reqwest::Client, h: &Harness, path: &str) {
    let response = client.get(h.url(path)).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"ok");
}

#[tokio::test]
async fn upstream_connections_are_reused_by_keep_alive_clients_and_by_a_connection_per_request() {
    let upstream = counting_upstream().await;
    let h = upstream.harness().await;
    let one_connection = http1_client(true);
    for _ in 0..20 {
        get_ok(&one_connection, &h, "/api/payments").await;
    }
    assert_eq!(upstream.accepted(), 1);
    let connection_per_request = http1_client(false);
    for _ in 0..20 {
        get_ok(&connection_per_request, &h, "/api/payments").await;
    }
    assert_eq!(
        upstream.accepted(),
        1,
        "new client connections reuse the pooled upstream one"
    );
    get_ok(&connection_per_request, &h, "/api/close").await;
    crate::support::binary::eventually("the upstream closes the connection", async || {
        upstream.open() == 0
    })
    .await;
    get_ok(&connection_per_request, &h, "/api/payments").await;
    assert_eq!(
        upstream.accepted(),
        2,
        "a connection the upstream closed is replaced"
    );
}
