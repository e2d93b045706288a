//! The request path, top to bottom: route → credential → token → forward, and the one replay
//! after an upstream 401. Every error becomes the contract's JSON answer here, at the edge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::HeaderName;
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use subtle::ConstantTimeEq;

use crate::config::{CredentialChoice, CredentialSpec, RouteSpec, ServerSettings};
use crate::error::{full_body, ProxyBody, ProxyError};
use crate::forward::{clean_request_headers, inject_token, remove_hop_by_hop, upstream_uri, UpstreamClient};
use crate::metrics::Metrics;
use crate::route::{request_host, Router};
use crate::secret::Secret;
use crate::token::cache::{CachedToken, TokenCache};

/// The metrics label for requests that matched no route.
const NO_ROUTE: &str = "none";

/// Checks every request meets before it is routed: size of its head, the shared-secret header,
/// the declared body size.
#[derive(Debug, Clone, Default)]
pub struct RequestGuards {
    pub require_header: Option<(HeaderName, Secret)>,
    pub max_request_body: Option<u64>,
    pub max_header_bytes: usize,
}

impl RequestGuards {
    pub fn from_settings(settings: &ServerSettings) -> Self {
        Self {
            require_header: settings.require_header.clone(),
            max_request_body: settings.max_request_body,
            max_header_bytes: settings.max_header_bytes,
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
                return Err(ProxyError::Forbidden(name.to_string()));
            }
        }
        if let (Some(limit), Some(declared)) = (self.max_request_body, declared_length(request.headers())) {
            if declared > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
        }
        Ok(())
    }
}

pub struct Proxy {
    guards: RequestGuards,
    router: Router,
    tokens: Arc<TokenCache>,
    client: UpstreamClient,
    metrics: Metrics,
}

impl Proxy {
    pub fn new(
        guards: RequestGuards,
        router: Router,
        tokens: Arc<TokenCache>,
        client: UpstreamClient,
        metrics: Metrics,
    ) -> Self {
        Self {
            guards,
            router,
            tokens,
            client,
            metrics,
        }
    }

    /// Handles one request from the application; never fails, errors are JSON answers.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = request.method().clone();
        let (route_name, result) = self.route_and_forward(request).await;
        let response = result.unwrap_or_else(|err| {
            if err.status().is_server_error() {
                tracing::warn!(route = %route_name, %method, code = err.code(), error = %err, "request failed");
            } else {
                tracing::info!(route = %route_name, %method, code = err.code(), error = %err, "request refused");
            }
            err.into_response()
        });
        tracing::debug!(route = %route_name, %method, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
        self.metrics
            .request(&route_name, response.status().as_u16(), started.elapsed());
        response
    }

    async fn route_and_forward(
        &self,
        request: Request<Incoming>,
    ) -> (String, Result<Response<ProxyBody>, ProxyError>) {
        if request.method() == Method::CONNECT {
            return (NO_ROUTE.into(), Err(ProxyError::ConnectNotSupported));
        }
        if let Err(err) = self.guards.check(&request) {
            return (NO_ROUTE.into(), Err(err));
        }
        let host = request_host(&request);
        let Some(matched) = self.router.find(host.as_deref(), request.uri().path()) else {
            return (NO_ROUTE.into(), Err(ProxyError::NoRoute));
        };
        let route = matched.route.clone();
        let uri = upstream_uri(&route.upstream, matched.rest, request.uri().query());
        let result = match uri {
            Ok(uri) => self.forward(&route, uri, request).await,
            Err(err) => Err(ProxyError::Internal(format!("cannot build upstream URI: {err}"))),
        };
        (route.name.clone(), result)
    }

    async fn forward(
        &self,
        route: &RouteSpec,
        uri: Uri,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let credential = select_credential(route, request.headers())?.clone();
        let (parts, body) = request.into_parts();
        let outgoing = self.outgoing(route, parts, uri);
        let body_limit = self.guards.max_request_body;
        let over_limit = Arc::new(AtomicBool::new(false));
        let kept = keep_for_replay(
            &outgoing.headers,
            body,
            route.replay_body_limit,
            body_limit,
            &over_limit,
        )
        .await?;
        let (first_body, replay_body) = match kept {
            KeptBody::Kept(bytes) => (full_body(bytes.clone()), Some(bytes)),
            KeptBody::Streaming(body) => (body, None),
        };
        let token = self.tokens.token(&credential.name).await?;
        let sent = self.send(route, &outgoing, first_body, &token).await;
        let response = match (sent, body_limit) {
            // The body ran over the limit mid-stream; how the upstream connection failed is moot.
            (Err(_), Some(limit)) if over_limit.load(Ordering::Acquire) => {
                return Err(ProxyError::BodyTooLarge { limit })
            }
            (sent, _) => sent?,
        };
        if !route.purge_on_status.contains(&response.status()) {
            return Ok(response);
        }

        // The upstream refused the token: drop it (unless already replaced) and resend once.
        self.tokens.purge(&credential.name, &token.token).await;
        let Some(bytes) = replay_body else {
            return Ok(response);
        };
        self.metrics.upstream_401_retry(&route.name);
        let fresh = self.tokens.token(&credential.name).await?;
        tracing::info!(route = %route.name, credential = %credential.name, status = response.status().as_u16(), "upstream refused the token; resending once with a fresh one");
        self.send(route, &outgoing, full_body(bytes), &fresh).await
    }

    /// What goes upstream besides the body: the client's headers cleaned (hop-by-hop, its own
    /// credentials, the credential selector and the sidecar's gate header removed) plus the
    /// route's static headers. The token is added per attempt, in [`Proxy::send`].
    fn outgoing(&self, route: &RouteSpec, parts: http::request::Parts, uri: Uri) -> Outgoing {
        let mut headers = parts.headers;
        let mut strip: Vec<&HeaderName> = match &route.credential {
            CredentialChoice::FromHeader { header, .. } => vec![header],
            CredentialChoice::Fixed(_) => vec![],
        };
        if let Some((required, _)) = &self.guards.require_header {
            strip.push(required);
        }
        clean_request_headers(&mut headers, &strip);
        for (name, value) in &route.headers {
            headers.insert(name.clone(), value.clone());
        }
        Outgoing {
            method: parts.method,
            uri,
            headers,
        }
    }

    async fn send(
        &self,
        route: &RouteSpec,
        outgoing: &Outgoing,
        body: ProxyBody,
        token: &CachedToken,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut request = Request::new(body);
        *request.method_mut() = outgoing.method.clone();
        *request.uri_mut() = outgoing.uri.clone();
        *request.headers_mut() = outgoing.headers.clone();
        inject_token(request.headers_mut(), &route.inject, &token.token)
            .map_err(|_| ProxyError::Internal("token is not a valid header value".into()))?;
        let upstream = route.upstream.to_string();
        let response = match tokio::time::timeout(route.timeout, self.client.request(request)).await {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    upstream,
                    timeout: route.timeout,
                })
            }
            Ok(Err(err)) => {
                return Err(ProxyError::UpstreamUnreachable {
                    upstream,
                    cause: error_chain(&err),
                })
            }
            Ok(Ok(response)) => response,
        };
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        ))
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

/// Keeps bodies that are empty or declare a length within `replay_limit`; streams the rest,
/// cut off at `max_body` when there is one.
async fn keep_for_replay(
    headers: &HeaderMap,
    body: Incoming,
    replay_limit: u64,
    max_body: Option<u64>,
    over_limit: &Arc<AtomicBool>,
) -> Result<KeptBody, ProxyError> {
    let small = body.is_end_stream() || declared_length(headers).is_some_and(|len| len <= replay_limit);
    if !small {
        let streaming = match max_body {
            Some(limit) => {
                let over_limit = over_limit.clone();
                Limited::new(body, limit as usize)
                    .map_err(move |err| {
                        if err.is::<LengthLimitError>() {
                            over_limit.store(true, Ordering::Release);
                        }
                        err
                    })
                    .boxed_unsync()
            }
            None => body.map_err(Into::into).boxed_unsync(),
        };
        return Ok(KeptBody::Streaming(streaming));
    }
    let limit = replay_limit.min(max_body.unwrap_or(u64::MAX));
    let collected = Limited::new(body, limit as usize)
        .collect()
        .await
        .map_err(|err| match max_body {
            Some(max) if max <= replay_limit && err.is::<LengthLimitError>() => {
                ProxyError::BodyTooLarge { limit: max }
            }
            _ => ProxyError::RequestBody(err.to_string()),
        })?;
    Ok(KeptBody::Kept(collected.to_bytes()))
}

/// The credential a request gets: the route's own, or the one its header names from the
/// route's allow-list — never any other.
fn select_credential<'r>(
    route: &'r RouteSpec,
    headers: &HeaderMap,
) -> Result<&'r Arc<CredentialSpec>, ProxyError> {
    match &route.credential {
        CredentialChoice::Fixed(credential) => Ok(credential),
        CredentialChoice::FromHeader { header, allowed } => {
            let Some(value) = headers.get(header) else {
                return Err(ProxyError::UnknownCredential(format!(
                    "header {header} is missing; it must name one of this route's credentials"
                )));
            };
            let value = value.to_str().unwrap_or_default();
            allowed
                .iter()
                .find(|credential| &*credential.name == value)
                .ok_or_else(|| {
                    ProxyError::UnknownCredential(format!(
                        "header {header} names none of this route's credentials"
                    ))
                })
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
