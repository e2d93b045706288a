//! The spans: the request's (server, and its upstream client span, sent on as `traceparent`),
//! the token fetch's (a trace of its own, linked from its waiters) with its endpoint requests,
//! and the fleet's Redis round trips; and what is recorded on them.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::{on, samples, TARGET};
use crate::body::{boxed, BoxError, ProxyBody};

/// The span of one proxied request: a child of the client's `traceparent`, if it sent one.
pub fn server_span(method: &http::Method, path: &str, headers: &http::HeaderMap) -> tracing::Span {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let parent_span = parent.span().span_context().clone();
    let parent_span = parent_span.is_valid().then_some(parent_span);
    if !samples(parent_span.as_ref()) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = method.as_str(),
        otel.kind = "server",
        http.request.method = method.as_str(),
        url.path = path,
        http.route = tracing::field::Empty,
        token_sidecar.credential = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if parent_span.is_some() {
        let _ = span.set_parent(parent);
    }
    span
}

/// Whether this request is traced: telemetry is on and it was sampled (its span is current).
pub fn traced() -> bool {
    on() && !tracing::Span::current().is_none()
}

/// The route a request matched (the span's name becomes `METHOD route`).
pub fn record_route(span: &tracing::Span, method: &http::Method, route: &str) {
    span.record("http.route", route);
    // Renamed on the OpenTelemetry span itself: once it has started (its parent set),
    // recording `otel.name` no longer renames it.
    span.context().span().update_name(format!("{method} {route}"));
}

/// How a request or an upstream call ended: its status, and the sidecar's error code if any.
/// (As the HTTP conventions have it, only a 5xx makes the span an error.)
pub fn record_outcome(span: &tracing::Span, status: u16, error: Option<&str>) {
    span.record("http.response.status_code", status);
    match error {
        Some(error) => span.record("error.type", error),
        None if status >= 500 => span.record("error.type", status.to_string()),
        None => span,
    };
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of one request to an upstream, a child of the request's; none when the request
/// is not traced.
pub fn upstream_span(method: &http::Method, uri: &http::Uri) -> Option<tracing::Span> {
    if !traced() {
        return None;
    }
    Some(tracing::info_span!(
        target: TARGET,
        "upstream",
        otel.name = method.as_str(),
        otel.kind = "client",
        http.request.method = method.as_str(),
        server.address = uri.host().unwrap_or_default(),
        server.port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 }),
        url.path = uri.path(),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    ))
}

/// Sets `traceparent` to `span`'s context (the client's `tracestate` is left as it came).
pub fn propagate(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return;
    }
    let value = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    if let Ok(value) = http::HeaderValue::from_str(&value) {
        headers.insert(http::HeaderName::from_static("traceparent"), value);
    }
}

/// The span of one token fetch: a trace of its own (it serves many requests; each links it).
pub fn fetch_span(provider: &str, credential: &str, dialect: &str, endpoint: &str) -> tracing::Span {
    if !on() || !samples(None) {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        parent: None,
        "token fetch",
        otel.kind = "internal",
        token_sidecar.provider = provider,
        token_sidecar.credential = credential,
        token_sidecar.dialect = dialect,
        server.address = endpoint,
        token_sidecar.attempts = tracing::field::Empty,
        token_sidecar.outcome = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// The span of one request to a token endpoint, a child of its fetch's.
pub fn endpoint_span(url: &reqwest::Url) -> tracing::Span {
    if !traced() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "token endpoint",
        otel.name = "POST",
        otel.kind = "client",
        http.request.method = "POST",
        server.address = url.host_str().unwrap_or_default(),
        server.port = url.port_or_known_default().unwrap_or(443),
        url.path = url.path(),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// How a token fetch ended: its attempts, and `ok` or the failure's outcome label.
pub fn record_fetch(span: &tracing::Span, attempts: u32, outcome: &str) {
    span.record("token_sidecar.attempts", attempts);
    span.record("token_sidecar.outcome", outcome);
    if outcome != "ok" {
        span.record("error.type", outcome);
        span.record("otel.status_code", "ERROR");
    }
}

/// The status a token endpoint answered, on its request's span and on the fetch's (whose
/// outcome, [`record_fetch`], says whether the fetch failed).
pub fn record_status(endpoint: &tracing::Span, fetch: &tracing::Span, status: u16) {
    endpoint.record("http.response.status_code", status);
    fetch.record("http.response.status_code", status);
    if status >= 400 {
        endpoint.record("error.type", status.to_string());
        endpoint.record("otel.status_code", "ERROR");
    }
}

/// A request that got no answer: why, on its span.
pub fn record_error(span: &tracing::Span, error: &str) {
    span.record("error.type", error);
    span.record("otel.status_code", "ERROR");
}

/// A span's OpenTelemetry context, for links to it.
pub fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    let context = span.context().span().span_context().clone();
    context.is_valid().then_some(context)
}

/// Links the current span (a request's) to `fetch`, a token fetch it waited for.
pub fn link_current(fetch: &SpanContext) {
    tracing::Span::current().add_link(fetch.clone());
}

/// A span of the fleet's shared tier: a Redis round trip or a lock wait (none while off).
pub fn shared_span(name: &'static str) -> tracing::Span {
    if !traced() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "shared cache",
        otel.name = name,
        otel.kind = "client",
        db.system.name = "redis",
        db.operation.name = name,
    )
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// `response` with `span` held until its body has been sent (or dropped): a request's span
/// covers the whole response, not only its head.
pub fn until_sent(span: tracing::Span, response: http::Response<ProxyBody>) -> http::Response<ProxyBody> {
    response.map(|body| boxed(UntilSent { body, _span: span }))
}

struct UntilSent {
    body: ProxyBody,
    _span: tracing::Span,
}

impl Body for UntilSent {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
