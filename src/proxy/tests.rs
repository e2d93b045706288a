//! The request path driven in-process: a config parsed from TOML, a stand-in token source
//! and a `service_fn` upstream, no sockets — route selection, header hygiene, injection, the
//! 401 purge and replay, and the error mapping.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::header::{AUTHORIZATION, HOST, RETRY_AFTER};
use tower::util::BoxCloneSyncService;

use super::*;
use crate::body::BoxError;
use crate::clock::{Clock, ManualClock};
use crate::config::Config;
use crate::token::dialect::IssuedToken;
use crate::token::error::FetchError;
use crate::token::source::{FetchContext, Revocation, SourceFuture, TokenSource};

const CONFIG: &str = r#"
[providers.p]
token_url = "https://auth.test/token"
client_id = "client"
client_secret = "client-secret"

[credentials.acme]
provider = "p"

[credentials.globex]
provider = "p"
client_id = "globex-client"

[[routes]]
path_prefix = "/acme"
upstream = "https://upstream.test/api"
credential = "acme"
headers = { "x-product" = "payments" }

[[routes]]
path_prefix = "/acme/refunds"
upstream = "https://refunds.test/v2"
credential = "acme"
inject = { header = "X-Auth-Token", format = "Token {token}" }

[[routes]]
path_prefix = "/pick"
upstream = "https://upstream.test"
credential_header = "X-Merchant"
credentials = ["acme", "globex"]

[[routes]]
path_prefix = "/small"
upstream = "https://upstream.test"
credential = "globex"
replay_body_limit = 4
timeout = "1s"
"#;

/// Issues `token-N` for the Nth fetch, or fails as told.
#[derive(Default)]
struct StandInSource {
    fetches: AtomicUsize,
    failure: Mutex<Option<FetchError>>,
    clock: Option<Arc<ManualClock>>,
}

impl TokenSource for StandInSource {
    fn fetch<'a>(&'a self, _: &'a CredentialSpec, _: FetchContext) -> SourceFuture<'a, IssuedToken> {
        Box::pin(async move {
            if let Some(failure) = crate::sync::lock(&self.failure).clone() {
                return Err(failure);
            }
            let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            let now = self
                .clock
                .as_ref()
                .map_or_else(SystemTime::now, |clock| clock.now());
            Ok(IssuedToken {
                token: crate::secret::AccessToken::new(format!("token-{n}")),
                expires_at: now + Duration::from_secs(3600),
                lifetime: Duration::from_secs(3600),
                token_id: None,
                dpop: false,
            })
        })
    }

    fn revoke<'a>(&'a self, _: &'a CredentialSpec, _: &'a str) -> SourceFuture<'a, Revocation> {
        Box::pin(async { Ok(Revocation::Revoked) })
    }
}

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

type Answer = Arc<dyn Fn(usize, &Seen) -> Result<Response<ProxyBody>, BoxError> + Send + Sync>;

/// The proxy on [`CONFIG`], its token source, and what its upstream saw.
struct Fixture {
    proxy: Arc<Proxy>,
    source: Arc<StandInSource>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fixture {
    fn new(answer: Answer) -> Self {
        let clock = ManualClock::new();
        let source = Arc::new(StandInSource {
            clock: Some(clock.clone()),
            ..StandInSource::default()
        });
        let config =
            Config::from_toml(CONFIG, Path::new("proxy-test.toml")).expect("the test config is valid");
        let metrics = Metrics::new();
        let tokens = TokenCache::new(
            &config.credentials,
            source.clone(),
            config.cache,
            clock,
            metrics.clone(),
        );
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let recorded = seen.clone();
        let upstream = tower::service_fn(move |request: Request<ProxyBody>| {
            let (recorded, answer) = (recorded.clone(), answer.clone());
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await?.to_bytes();
                let seen = Seen {
                    uri: parts.uri.to_string(),
                    headers: parts.headers,
                    body,
                };
                let n = {
                    let mut all = crate::sync::lock(&recorded);
                    all.push(seen.clone());
                    all.len()
                };
                answer(n, &seen)
            }
        });
        let snapshot = Snapshot {
            guards: RequestGuards::from_settings(&config.server),
            router: Router::new(&config.routes, &config.server.allowed_hosts),
            credentials: tokens.credentials(),
            upstreams: Upstreams::single(BoxCloneSyncService::new(upstream)),
            access_log: false,
        };
        Self {
            proxy: Arc::new(Proxy::new(snapshot, tokens, metrics)),
            source,
            seen,
        }
    }

    fn answering(status: u16) -> Self {
        Self::new(Arc::new(move |_, _| Ok(respond(status, ""))))
    }

    async fn send(&self, request: http::request::Builder, body: &'static str) -> Response<ProxyBody> {
        let request = request.body(full_body(body)).expect("a request");
        self.proxy.clone().handle(request).await
    }

    fn seen(&self) -> Vec<Seen> {
        crate::sync::lock(&self.seen).clone()
    }
}

fn respond(status: u16, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = StatusCode::from_u16(status).expect("a status");
    response
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path).header(HOST, "localhost:8080")
}

async fn json_error(response: Response<ProxyBody>) -> (u16, String, String) {
    let status = response.status().as_u16();
    let header = response.headers()[ERROR_HEADER].to_str().unwrap().to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], header.as_str());
    (
        status,
        header,
        json["error"]["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn the_longest_prefix_wins_and_the_rest_of_the_path_and_query_join_the_upstream() {
    let f = Fixture::answering(200);
    assert_eq!(f.send(get("/acme/payments?limit=1"), "").await.status(), 200);
    assert_eq!(f.send(get("/acme/refunds/r1"), "").await.status(), 200);
    let uris: Vec<String> = f.seen().into_iter().map(|seen| seen.uri).collect();
    assert_eq!(
        uris,
        [
            "https://upstream.test/api/payments?limit=1",
            "https://refunds.test/v2/r1"
        ]
    );
}

#[tokio::test]
async fn client_credentials_hop_by_hop_headers_and_the_selector_never_reach_the_upstream() {
    let f = Fixture::answering(200);
    let request = get("/pick/x")
        .header(AUTHORIZATION, "Bearer the-clients-own")
        .header("proxy-authorization", "Basic eA==")
        .header("connection", "close, x-hop")
        .header("x-hop", "1")
        .header("x-merchant", "globex")
        .header("x-keep", "yes");
    assert_eq!(f.send(request, "").await.status(), 200);
    let headers = &f.seen()[0].headers;
    assert_eq!(headers[HOST], "upstream.test");
    assert_eq!(headers[AUTHORIZATION], "Bearer token-1");
    assert_eq!(headers["x-keep"], "yes");
    for gone in ["proxy-authorization", "connection", "x-hop", "x-merchant"] {
        assert!(!headers.contains_key(gone), "{gone} was forwarded");
    }
}

#[tokio::test]
async fn the_token_goes_where_the_route_says_with_its_static_headers_and_marked_sensitive() {
    let f = Fixture::answering(200);
    f.send(get("/acme/x"), "").await;
    f.send(get("/acme/refunds/x"), "").await;
    let seen = f.seen();
    assert_eq!(seen[0].headers[AUTHORIZATION], "Bearer token-1");
    assert!(seen[0].headers[AUTHORIZATION].is_sensitive());
    assert_eq!(seen[0].headers["x-product"], "payments");
    assert_eq!(seen[1].headers["x-auth-token"], "Token token-1");
    assert!(!seen[1].headers.contains_key(AUTHORIZATION));
    assert_eq!(
        f.source.fetches.load(Ordering::SeqCst),
        1,
        "one cached token for both"
    );
}

#[tokio::test]
async fn a_refused_token_is_purged_and_the_request_resent_once_with_a_fresh_one() {
    let f = Fixture::new(Arc::new(|n, _| Ok(respond(if n == 1 { 401 } else { 200 }, "ok"))));
    let request = Request::post("/small/pay")
        .header(HOST, "localhost")
        .header(CONTENT_LENGTH, "3");
    let response = f.send(request, "abc").await;
    assert_eq!(response.status(), 200);
    let seen = f.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].headers[AUTHORIZATION], "Bearer token-1");
    assert_eq!(seen[1].headers[AUTHORIZATION], "Bearer token-2");
    assert_eq!(seen[1].body, "abc", "the kept body is resent");
}

#[tokio::test]
async fn a_body_over_the_replay_limit_is_streamed_once_and_its_401_goes_back() {
    let f = Fixture::answering(401);
    let request = Request::post("/small/pay")
        .header(HOST, "localhost")
        .header(CONTENT_LENGTH, "10");
    let response = f.send(request, "0123456789").await;
    assert_eq!(response.status(), 401);
    assert_eq!(f.seen().len(), 1, "not resent");
    assert_eq!(f.seen()[0].body, "0123456789");
}

#[tokio::test]
async fn the_upstreams_own_error_header_is_removed() {
    let f = Fixture::new(Arc::new(|_, _| {
        let mut response = respond(502, "upstream's own");
        response
            .headers_mut()
            .insert(ERROR_HEADER, http::HeaderValue::from_static("token_unavailable"));
        Ok(response)
    }));
    let response = f.send(get("/acme/x"), "").await;
    assert_eq!(response.status(), 502);
    assert!(!response.headers().contains_key(ERROR_HEADER));
}

#[tokio::test]
async fn requests_no_route_serves_are_404_and_unlisted_credentials_400() {
    let f = Fixture::answering(200);
    assert_eq!(
        json_error(f.send(get("/elsewhere"), "").await).await.1,
        "no_route"
    );
    let foreign = Request::get("/acme/x").header(HOST, "evil.example");
    assert_eq!(json_error(f.send(foreign, "").await).await.1, "no_route");
    let (status, code, message) = json_error(f.send(get("/pick/x"), "").await).await;
    assert_eq!((status, code.as_str()), (400, "unknown_credential"));
    assert!(message.contains("x-merchant is missing"), "{message}");
    let unlisted = get("/pick/x").header("x-merchant", "initech");
    let (_, _, message) = json_error(f.send(unlisted, "").await).await;
    assert!(
        message.contains("names none of this route's credentials"),
        "{message}"
    );
    assert!(f.seen().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_in_the_sidecars_words() {
    let f = Fixture::new(Arc::new(|_, _| {
        Err(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) as BoxError)
    }));
    let (status, code, message) = json_error(f.send(get("/acme/x"), "").await).await;
    assert_eq!((status, code.as_str()), (502, "upstream_unreachable"));
    assert_eq!(
        message,
        "upstream https://upstream.test/api unreachable: connection refused"
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_slower_than_the_route_timeout_is_a_504() {
    let f = Fixture::new(Arc::new(|_, _| Ok(respond(200, ""))));
    let slow = tower::service_fn(|_: Request<ProxyBody>| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, BoxError>(respond(200, ""))
    });
    let mut snapshot = Snapshot::clone(&f.proxy.current());
    snapshot.upstreams = Upstreams::single(BoxCloneSyncService::new(slow));
    f.proxy.swap(snapshot);
    let (status, code, _) = json_error(f.send(get("/small/x"), "").await).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
}

#[tokio::test]
async fn no_token_is_a_503_with_retry_after_and_nothing_is_forwarded() {
    let f = Fixture::answering(200);
    *crate::sync::lock(&f.source.failure) = Some(FetchError::Rejected {
        status: 401,
        reason: Some("invalid_client".into()),
    });
    let response = f.send(get("/acme/x"), "").await;
    let retry_after: u64 = response.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let (status, code, message) = json_error(response).await;
    assert_eq!((status, code.as_str()), (503, "token_unavailable"));
    assert!(
        message.contains("credential `acme`") && message.contains("invalid_client"),
        "{message}"
    );
    assert!(f.seen().is_empty());
}

#[tokio::test]
async fn connect_and_trace_are_refused_before_routing() {
    let f = Fixture::answering(200);
    let trace = Request::builder()
        .method(Method::TRACE)
        .uri("/acme/x")
        .header(HOST, "localhost");
    assert_eq!(json_error(f.send(trace, "").await).await.0, 405);
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri("upstream.test:443")
        .header(HOST, "upstream.test:443");
    assert_eq!(
        json_error(f.send(connect, "").await).await.1,
        "method_not_allowed"
    );
    assert!(f.seen().is_empty());
}
