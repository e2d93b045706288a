//! The request path, top to bottom: target checks → route → credential → token → forward, and
//! the one replay after an upstream 401. Every error becomes the contract's JSON answer here,
//! at the edge.

pub mod access_log;
pub mod client_body;

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::Either;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Body;
use subtle::ConstantTimeEq;
use tower::Service;
use tracing::Instrument;

use crate::body::{full_body, BoxError, ProxyBody};
use crate::config::{CredentialChoice, CredentialSpec, HeaderChoice, RouteSpec, ServerSettings};
use crate::error::{BodyFault, InternalError, ProxyError, ERROR_HEADER};
use crate::failure::{Chain, Transport};
use crate::forward::{
    clean_request_headers, inject_dpop_token, inject_token, remove_hop_by_hop, upstream_uri, UpstreamService,
    Upstreams,
};
use crate::metrics::Metrics;
use crate::route::{check_path, request_host, Router};
use crate::secret::Secret;
use crate::telemetry;
use crate::token::cache::{CachedToken, Credentials, TokenCache};
use crate::token::dpop::{self, Nonces};
use access_log::Exchange;
use client_body::{BodyLimits, BodyRecord, ClientBody};

#[cfg(test)]
mod tests;

/// Checks every request meets before it is routed: size of its head, the shared-secret header,
/// the declared body size; and the limits its body is read under.
#[derive(Debug, Clone)]
pub struct RequestGuards {
    pub require_header: Option<(HeaderName, Secret)>,
    pub max_header_bytes: usize,
    pub body: BodyLimits,
}

impl RequestGuards {
    pub fn from_settings(settings: &ServerSettings) -> Self {
        Self {
            require_header: settings.require_header.clone(),
            max_header_bytes: settings.max_header_bytes,
            body: BodyLimits {
                max_bytes: settings.max_request_body,
                idle_timeout: settings.body_read_timeout,
                total_timeout: settings.request_body_timeout,
            },
        }
    }

    fn check<B>(&self, request: &Request<B>) -> Result<(), ProxyError> {
        let uri = request.uri();
        let head_bytes = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len())
            + request
                .headers()
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum::<usize>();
        if head_bytes > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                limit: self.max_header_bytes,
            });
        }
        if let Some((name, expected)) = &self.require_header {
            let presented = request
                .headers()
                .get(name)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !bool::from(presented.ct_eq(expected.expose().as_bytes())) {
                return Err(ProxyError::Forbidden(name.clone()));
            }
        }
        if let (Some(limit), Some(declared)) = (self.body.max_bytes, declared_length(request.headers())) {
            if declared > limit {
                return Err(BodyFault::TooLarge { limit }.into());
            }
        }
        Ok(())
    }
}

/// The configuration a request is served with, read once per request and replaced whole by a
/// reload: a request in flight finishes on the snapshot it started with — its routes, its
/// credentials (and their fetches in flight), its upstream clients.
#[derive(Clone)]
pub struct Snapshot {
    pub guards: RequestGuards,
    pub router: Router,
    /// The credentials the routes name, as the token cache knows them.
    pub credentials: Credentials,
    /// The upstream clients (rebuilt by a reload only where their settings changed, so pooled
    /// connections survive reloads).
    pub upstreams: Upstreams,
    /// One `token_sidecar::access` event per request.
    pub access_log: bool,
}

pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    tokens: Arc<TokenCache>,
    metrics: Metrics,
    /// The latest DPoP nonce each upstream handed out.
    dpop_nonces: Nonces,
}

impl Proxy {
    pub fn new(snapshot: Snapshot, tokens: Arc<TokenCache>, metrics: Metrics) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            tokens,
            metrics,
            dpop_nonces: Nonces::default(),
        }
    }

    /// Serves new requests with `snapshot`; requests in flight keep theirs.
    pub fn swap(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        self.snapshot.swap(Arc::new(snapshot))
    }

    /// The snapshot new requests are served with.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Handles one request from the application; never fails, errors are JSON answers.
    pub fn handle(
        self: Arc<Self>,
        request: Request<ProxyBody>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        // Not an `async fn`, and the traced future boxed: with traces off, the request's
        // future is `serve`'s own, not one the size of `serve` and a span.
        if !telemetry::on() {
            return Either::Left(self.serve(request));
        }
        let span = telemetry::server_span(request.method(), request.uri().path(), request.headers());
        if span.is_none() {
            // Not sampled: no span, and nothing else to do.
            return Either::Left(self.serve(request));
        }
        Either::Right(Box::pin(async move {
            let response = self.serve(request).instrument(span.clone()).await;
            telemetry::until_sent(span, response)
        }))
    }

    async fn serve(self: Arc<Self>, request: Request<ProxyBody>) -> Response<ProxyBody> {
        let snapshot = self.snapshot.load_full();
        let mut exchange = Exchange::new(&request);
        let result = self.route_and_forward(&snapshot, request, &mut exchange).await;
        let response = result.unwrap_or_else(|err| {
            let route = &**exchange.route_label();
            let class = err.class();
            if class.status.is_server_error() {
                tracing::warn!(route, method = %exchange.method, code = class.code, error = %Chain(&err), "request failed");
            } else {
                tracing::info!(route, method = %exchange.method, code = class.code, error = %Chain(&err), "request refused");
            }
            exchange.error = Some(class.code);
            self.metrics.error(exchange.route_label(), class.code);
            err.into_response()
        });
        let status = response.status().as_u16();
        self.metrics
            .request(exchange.route_label(), status, exchange.started.elapsed());
        if telemetry::traced() {
            record_in_trace(&tracing::Span::current(), &exchange, status);
        }
        if !snapshot.access_log || !access_log::enabled() {
            return response;
        }
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, access_log::logged(body, exchange, status))
    }

    async fn route_and_forward(
        &self,
        snapshot: &Snapshot,
        request: Request<ProxyBody>,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let host = check(&snapshot.guards, &request)?;
        let Some(matched) = snapshot.router.find(host.as_deref(), request.uri().path()) else {
            return Err(ProxyError::NoRoute);
        };
        let route = matched.route.clone();
        exchange.route = Some(route.clone());
        let uri = upstream_uri(&route.upstream, matched.rest, request.uri().query())
            .map_err(InternalError::UpstreamUri)?;
        self.forward(snapshot, &route, uri, request, exchange).await
    }

    async fn forward(
        &self,
        snapshot: &Snapshot,
        route: &RouteSpec,
        uri: Uri,
        request: Request<ProxyBody>,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let credential = select_credential(route, request.headers())?.clone();
        exchange.credential = Some(credential.name.clone());
        let (parts, body) = request.into_parts();
        let outgoing = outgoing(&snapshot.guards, route, parts, uri);
        let limits = snapshot.guards.body;
        let body_record = exchange.body.clone();
        let kept = keep_for_replay(
            &outgoing.headers,
            body,
            route.options.replay_body_limit,
            limits,
            &body_record,
        )
        .await?;
        let (first_body, replay_body) = match kept {
            KeptBody::Kept(bytes) => (full_body(bytes.clone()), Some(bytes)),
            KeptBody::Streaming(body) => (body, None),
        };
        let wait = route.options.timeout;
        let token = self
            .tokens
            .token(&snapshot.credentials, &credential, wait)
            .await?;
        exchange.token = Some(token.token.clone());
        let attempt = Attempt {
            upstream: snapshot.upstreams.for_route(route),
            route,
            outgoing: &outgoing,
            credential: &credential,
            dpop_nonces: &self.dpop_nonces,
        };
        let mut response = match attempt.send(first_body, &token).await {
            Ok(response) => response,
            // A client body that failed mid-stream is the client's error, whatever the
            // upstream connection made of it.
            Err(err) => return Err(body_record.fault(&limits).map_or(err, ProxyError::Body)),
        };
        if attempt.asks_for_a_dpop_nonce(&response, &token) {
            // Not a refusal of the token: the nonce is remembered, so a resend (ours, or the
            // client's when the body was streamed) carries it.
            let Some(bytes) = &replay_body else {
                exchange.upstream_status = Some(response.status().as_u16());
                return Ok(response);
            };
            tracing::debug!(route = %route.name, "upstream asked for a DPoP nonce; resending once with it");
            response = attempt.send(full_body(bytes.clone()), &token).await?;
        }
        exchange.upstream_status = Some(response.status().as_u16());
        if !route.options.purge_on_status.contains(response.status()) {
            self.tokens.upstream_accepted(&snapshot.credentials, &credential);
            return Ok(response);
        }

        // Boxed: rare, and its future (a purge, a fetch, a second send) is large.
        let refused = Refused {
            credentials: &snapshot.credentials,
            token: &token,
            response,
            replay_body,
        };
        Box::pin(self.replay_refused(&attempt, refused, exchange)).await
    }

    /// The upstream refused the token: drop it (unless already replaced) and resend once with
    /// a fresh one, when the body was kept.
    async fn replay_refused(
        &self,
        attempt: &Attempt<'_>,
        refused: Refused<'_>,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (route, credential, credentials) = (attempt.route, attempt.credential, refused.credentials);
        let since = self
            .tokens
            .purge_refused(credentials, credential, refused.token)
            .await;
        let (Some(since), Some(bytes)) = (since, refused.replay_body) else {
            return Ok(refused.response);
        };
        self.metrics.upstream_401_retry(&route.name);
        let fresh = self
            .tokens
            .replacement(credentials, credential, since, route.options.timeout)
            .await?;
        let status = refused.response.status().as_u16();
        tracing::info!(route = %route.name, credential = %credential.name, status, "upstream refused the token; resending once with a fresh one");
        exchange.replayed = true;
        exchange.token = Some(fresh.token.clone());
        let replayed = attempt.send(full_body(bytes), &fresh).await?;
        exchange.upstream_status = Some(replayed.status().as_u16());
        if route.options.purge_on_status.contains(replayed.status()) {
            self.tokens.purge_refused(credentials, credential, &fresh).await;
        } else {
            self.tokens.upstream_accepted(credentials, credential);
        }
        Ok(replayed)
    }
}

/// What the request's trace span says of how it went: its route and credential (names, never
/// a token), its status and the sidecar's error code.
fn record_in_trace(span: &tracing::Span, exchange: &Exchange, status: u16) {
    if let Some(route) = &exchange.route {
        telemetry::record_route(span, &exchange.method, &route.name);
    }
    if let Some(credential) = &exchange.credential {
        span.record("token_sidecar.credential", &**credential);
    }
    telemetry::record_outcome(span, status, exchange.error);
}

/// What an upstream request's span says of how it ended: the status, and the sidecar's error
/// code when there was no answer to pass on.
fn record_sent(span: &tracing::Span, sent: &Result<Response<ProxyBody>, ProxyError>) {
    match sent {
        Ok(response) => telemetry::record_outcome(span, response.status().as_u16(), None),
        Err(err) => {
            let class = err.class();
            telemetry::record_outcome(span, class.status.as_u16(), Some(class.code));
        }
    }
}

/// An upstream's refusal of a token, and what a replay needs.
struct Refused<'a> {
    credentials: &'a Credentials,
    token: &'a CachedToken,
    response: Response<ProxyBody>,
    replay_body: Option<Bytes>,
}

/// What every request must pass before routing; gives the host it is for.
fn check(guards: &RequestGuards, request: &Request<ProxyBody>) -> Result<Option<String>, ProxyError> {
    match *request.method() {
        Method::CONNECT => return Err(ProxyError::ConnectNotSupported),
        Method::TRACE => return Err(ProxyError::TraceNotAllowed),
        _ => {}
    }
    guards.check(request)?;
    let host = request_host(request)?;
    check_path(request.uri().path())?;
    Ok(host)
}

/// What goes upstream besides the body: the client's headers cleaned (hop-by-hop, its own
/// credentials, the credential selector and the sidecar's gate header removed), the upstream's
/// `Host`, and the route's static headers. The token is added per attempt, in [`send`].
fn outgoing(guards: &RequestGuards, route: &RouteSpec, parts: http::request::Parts, uri: Uri) -> Outgoing {
    let mut headers = parts.headers;
    let mut strip: Vec<&HeaderName> = match &route.credential {
        CredentialChoice::FromHeader(choice) => vec![&choice.header],
        CredentialChoice::Fixed(_) => vec![],
    };
    if let Some((required, _)) = &guards.require_header {
        strip.push(required);
    }
    clean_request_headers(&mut headers, &strip);
    headers.insert(http::header::HOST, route.upstream.host.clone());
    for (name, value) in &route.options.headers {
        headers.insert(name.clone(), value.clone());
    }
    Outgoing {
        method: parts.method,
        uri,
        headers,
    }
}

/// One request to the upstream, as many times as it is sent.
struct Attempt<'a> {
    upstream: &'a UpstreamService,
    route: &'a RouteSpec,
    outgoing: &'a Outgoing,
    credential: &'a Arc<CredentialSpec>,
    dpop_nonces: &'a Nonces,
}

impl Attempt<'_> {
    /// One request to the upstream. Traced, it goes in a client span of its own, which it
    /// carries as its `traceparent` and which records how it ended. One `async fn` with no
    /// futures of ours inside: with traces off, the request's future stays as small as it was.
    async fn send(&self, body: ProxyBody, token: &CachedToken) -> Result<Response<ProxyBody>, ProxyError> {
        let span = telemetry::upstream_span(&self.outgoing.method, &self.outgoing.uri);
        let sent = match self.request(body, token, span.as_ref()) {
            Err(err) => Err(err),
            Ok(request) => {
                // hyper's client and the tests' `service_fn`s are always ready: no `poll_ready` wait.
                let call =
                    tokio::time::timeout(self.route.options.timeout, self.upstream.clone().call(request));
                let answer = match &span {
                    None => call.await,
                    Some(span) => call.instrument(span.clone()).await,
                };
                self.received(answer, token)
            }
        };
        if let Some(span) = &span {
            record_sent(span, &sent);
        }
        sent
    }

    /// The request for the upstream: the outgoing one with `body`, the token in, and with
    /// `span`, that span as its `traceparent`.
    fn request(
        &self,
        body: ProxyBody,
        token: &CachedToken,
        span: Option<&tracing::Span>,
    ) -> Result<Request<ProxyBody>, ProxyError> {
        let outgoing = self.outgoing;
        let mut request = Request::new(body);
        *request.method_mut() = outgoing.method.clone();
        *request.uri_mut() = outgoing.uri.clone();
        *request.headers_mut() = outgoing.headers.clone();
        if let Some(span) = span {
            telemetry::propagate(span, request.headers_mut());
        }
        self.authorize(request.headers_mut(), token)?;
        Ok(request)
    }

    /// The upstream's answer, or why there is none, as the client will see it.
    fn received(
        &self,
        answer: Result<Result<Response<ProxyBody>, BoxError>, tokio::time::error::Elapsed>,
        token: &CachedToken,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let route = self.route;
        let response = match answer {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    upstream: route.upstream.to_string(),
                    timeout: route.options.timeout,
                })
            }
            Ok(Err(err)) => {
                return Err(ProxyError::UpstreamUnreachable {
                    upstream: route.upstream.to_string(),
                    reason: Transport::of(&*err),
                    source: Some(err),
                })
            }
            Ok(Ok(response)) => response,
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Upgrade is never forwarded, so a 101 is unsolicited: the connection is unusable.
            return Err(ProxyError::UpstreamUnreachable {
                upstream: route.upstream.to_string(),
                reason: Transport::UnsolicitedUpgrade,
                source: None,
            });
        }
        let (mut parts, body) = response.into_parts();
        if token.dpop {
            if let Some(nonce) = dpop::nonce_in(&parts.headers) {
                self.dpop_nonces.remember(&self.origin(), nonce);
            }
        }
        remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(ERROR_HEADER); // only the sidecar's own errors carry it
        Ok(Response::from_parts(parts, body))
    }

    /// Puts the token in, as the route asks; a DPoP-bound one as `Authorization: DPoP` with a
    /// fresh proof for this request (and the upstream's latest nonce).
    fn authorize(&self, headers: &mut HeaderMap, token: &CachedToken) -> Result<(), ProxyError> {
        let invalid = |err| ProxyError::from(InternalError::TokenHeader(err));
        let Some(key) = self.credential.request.dpop.as_ref().filter(|_| token.dpop) else {
            return inject_token(headers, &self.route.options.inject, &token.token).map_err(invalid);
        };
        let uri = &self.outgoing.uri;
        let htu = format!("{}{}", self.origin(), uri.path());
        let nonce = self.dpop_nonces.get(&self.origin());
        let proof = key
            .proof(
                self.outgoing.method.as_str(),
                &htu,
                SystemTime::now(),
                nonce.as_deref(),
                Some(token.token.expose()),
            )
            .map_err(InternalError::DpopProof)?;
        inject_dpop_token(headers, &token.token, &proof).map_err(invalid)
    }

    /// Whether the upstream refused a DPoP-bound token only for want of its nonce (a 401 with
    /// `DPoP-Nonce`, remembered by [`Self::send`]): worth one more try with it.
    fn asks_for_a_dpop_nonce(&self, response: &Response<ProxyBody>, token: &CachedToken) -> bool {
        token.dpop
            && response.status() == StatusCode::UNAUTHORIZED
            && dpop::nonce_in(response.headers()).is_some()
    }

    /// `scheme://authority` of the upstream: where its DPoP nonces apply.
    fn origin(&self) -> String {
        let uri = &self.outgoing.uri;
        let scheme = uri.scheme_str().unwrap_or("https");
        let authority = uri.authority().map_or("", |authority| authority.as_str());
        format!("{scheme}://{authority}")
    }
}

/// The parts of the forwarded request that survive a replay.
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

/// A request body: kept whole when small enough to resend, else streamed once.
enum KeptBody {
    Kept(Bytes),
    Streaming(ProxyBody),
}

/// Keeps bodies that are empty or declare a length within `replay_limit`; streams the rest.
/// Either way the body is read under `limits`, and its bytes and failure recorded in `record`.
async fn keep_for_replay(
    headers: &HeaderMap,
    body: ProxyBody,
    replay_limit: u64,
    limits: BodyLimits,
    record: &Arc<BodyRecord>,
) -> Result<KeptBody, ProxyError> {
    if body.is_end_stream() {
        return Ok(KeptBody::Kept(Bytes::new()));
    }
    let small = declared_length(headers).is_some_and(|len| len <= replay_limit);
    let body = ClientBody::new(body, limits, record.clone());
    if !small {
        return Ok(KeptBody::Streaming(body.boxed_unsync()));
    }
    match body.collect().await {
        Ok(collected) => Ok(KeptBody::Kept(collected.to_bytes())),
        Err(_) => Err(ProxyError::Body(
            record.fault(&limits).unwrap_or(BodyFault::Broken),
        )),
    }
}

/// The credential a request gets: the route's own, or the one its header names from the
/// route's allow-list — never any other.
fn select_credential<'r>(
    route: &'r RouteSpec,
    headers: &HeaderMap,
) -> Result<&'r Arc<CredentialSpec>, ProxyError> {
    match &route.credential {
        CredentialChoice::Fixed(credential) => Ok(credential),
        CredentialChoice::FromHeader(choice) => {
            let HeaderChoice { header, allowed } = &**choice;
            let refused = |missing| ProxyError::UnknownCredential {
                header: header.clone(),
                missing,
            };
            let value = headers.get(header).ok_or_else(|| refused(true))?;
            let value = value.to_str().unwrap_or_default();
            allowed
                .iter()
                .find(|credential| &*credential.name == value)
                .ok_or_else(|| refused(false))
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
