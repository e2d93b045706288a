//! OpenTelemetry traces (ground floor: it imports nothing of ours but the metrics), off by
//! default. On when an OTLP endpoint is configured — `[telemetry] endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` — and not switched off
//! by `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The SDK reads the other standard
//! variables itself (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` and
//! `_ARG`, `OTEL_RESOURCE_ATTRIBUTES`); the `[telemetry]` table wins where it says something.
//!
//! The spans are `tracing` spans of the target [`TARGET`], turned into OpenTelemetry spans by
//! `tracing-opentelemetry`; each is made only while telemetry is on and its request (or fetch)
//! is sampled, so with it off the request path costs what it did, and an unsampled request
//! little more. The sampler (`[telemetry] sampler` or `OTEL_TRACES_SAMPLER`) is applied here,
//! before any span is made, and the SDK records every span it is given. A server span per proxied request, a child of the client's
//! `traceparent`; a client span per upstream request, sent on as its `traceparent` (the
//! client's `tracestate` and `baggage` go on untouched); a span per token fetch, linked from
//! every request that waited for it; spans for the fleet's Redis round trips and lock waits.
//! Attributes follow the HTTP semantic conventions and never carry a token, a secret, a query
//! string or a header's value.
//!
//! Export never blocks or fails a request: ended spans go into a bounded queue (a full queue
//! drops the span), a task exports them in batches under a timeout, and every span dropped —
//! queue full, collector down or slow — is counted in `token_sidecar_trace_spans_dropped_total`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::sync::lock;

/// The target of every span made for export (the log's own filter leaves it out).
pub const TARGET: &str = "token_sidecar::otel";
/// Ended spans waiting for export, at most.
const QUEUE: usize = 2048;
/// Spans in one export.
const BATCH: usize = 512;
/// How long spans wait for their batch to fill.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long one export may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are made and exported.
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// `[telemetry]`: where traces go and what they say of this sidecar. Restart-only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetrySettings {
    /// The collector: `http(s)://host:port` (OTLP/HTTP posts to `/v1/traces` under it).
    pub endpoint: Option<String>,
    pub protocol: Option<OtlpProtocol>,
    /// Sent with every export (an API key, say): secrets.
    pub headers: Vec<(String, Secret)>,
    pub service_name: Option<String>,
    pub sampler: Option<SamplerSetting>,
    pub resource_attributes: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    HttpProtobuf,
    Grpc,
}

/// `sampler` and `sampler_arg`, as OpenTelemetry names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerSetting {
    /// `name` with its `arg` (a ratio, for the ratio samplers), if `name` is one.
    pub fn parse(name: &str, arg: Option<f64>) -> Option<Self> {
        let ratio = arg.unwrap_or(1.0);
        Some(match name {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::TraceIdRatio(ratio),
            "parentbased_always_on" => Self::ParentBasedAlwaysOn,
            "parentbased_always_off" => Self::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Self::ParentBasedTraceIdRatio(ratio),
            _ => return None,
        })
    }

    /// The sampler the environment names (`OTEL_TRACES_SAMPLER`, `…_ARG`), if it names one.
    fn from_env() -> Option<Self> {
        let name = std::env::var("OTEL_TRACES_SAMPLER").ok()?;
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
            .ok()
            .and_then(|arg| arg.trim().parse().ok());
        Self::parse(name.trim(), arg)
    }

    /// Whether a span with this parent (`None` for a root) is recorded: the decision every
    /// span of the request then follows.
    fn samples(self, parent: Option<&SpanContext>) -> bool {
        let ratio = |ratio: f64| rand::random::<f64>() < ratio;
        match (self, parent) {
            (Self::AlwaysOn, _) => true,
            (Self::AlwaysOff, _) => false,
            (Self::TraceIdRatio(r), _) => ratio(r),
            (
                Self::ParentBasedAlwaysOn | Self::ParentBasedAlwaysOff | Self::ParentBasedTraceIdRatio(_),
                Some(parent),
            ) => parent.is_sampled(),
            (Self::ParentBasedAlwaysOn, None) => true,
            (Self::ParentBasedAlwaysOff, None) => false,
            (Self::ParentBasedTraceIdRatio(r), None) => ratio(r),
        }
    }
}

/// How spans are sampled, decided before a span is made: a request that is not sampled makes no
/// span at all (an unsampled `tracing` span would still cost most of a sampled one), and its
/// client's `traceparent` goes upstream untouched. The SDK then records every span it is given.
static SAMPLING: std::sync::OnceLock<SamplerSetting> = std::sync::OnceLock::new();

fn samples(parent: Option<&SpanContext>) -> bool {
    SAMPLING
        .get()
        .copied()
        .unwrap_or(SamplerSetting::ParentBasedAlwaysOn)
        .samples(parent)
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP exporter cannot be built")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    #[error("the collector's TLS cannot be set up")]
    Tls(#[source] crate::tls::TlsError),
    #[error("the collector's HTTP client cannot be built")]
    Client(#[source] reqwest::Error),
}

/// The running exporter: keep it for as long as spans should go out.
pub struct Tracing {
    provider: SdkTracerProvider,
    exporting: tokio::task::JoinHandle<()>,
}

impl Tracing {
    /// The layer that turns [`TARGET`] spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use tracing_subscriber::Layer as _;
        let tracer = self.provider.tracer("token-sidecar");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE),
            )
    }

    /// Exports what is queued (best effort, for at most `within`), at shutdown.
    pub async fn shutdown(self, within: Duration) {
        ON.store(false, Ordering::Relaxed);
        let _ = self.provider.shutdown();
        let _ = tokio::time::timeout(within, self.exporting).await;
    }
}

/// Whether the settings and the environment ask for traces.
pub fn wanted(settings: &TelemetrySettings) -> bool {
    let env = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|value| value.eq_ignore_ascii_case("none"))
    {
        return false;
    }
    settings.endpoint.is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
}

/// Starts exporting as `settings` and the environment say (in a tokio runtime), or `None`
/// when they do not ask for traces.
pub fn start(
    settings: &TelemetrySettings,
    extra_roots: &[CertificateDer<'static>],
    metrics: Metrics,
) -> Result<Option<Tracing>, TelemetryError> {
    if !wanted(settings) {
        return Ok(None);
    }
    let exporter = exporter(settings, extra_roots)?;
    let mut resource = Resource::builder();
    if let Some(name) = &settings.service_name {
        resource = resource.with_service_name(name.clone());
    } else if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("token-sidecar");
    }
    resource = resource.with_attributes(
        settings
            .resource_attributes
            .iter()
            .map(|(key, value)| opentelemetry::KeyValue::new(key.clone(), value.clone())),
    );
    let (processor, exporting) = QueueProcessor::start(exporter, metrics);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .with_sampler(Sampler::AlwaysOn)
        .build();
    let sampling = settings
        .sampler
        .or_else(SamplerSetting::from_env)
        .unwrap_or(SamplerSetting::ParentBasedAlwaysOn);
    let _ = SAMPLING.set(sampling);
    ON.store(true, Ordering::Relaxed);
    Ok(Some(Tracing { provider, exporting }))
}

/// The collector's client for OTLP/HTTP: rustls, trusting the web PKI and `[tls] ca_file`.
fn export_client(extra_roots: &[CertificateDer<'static>]) -> Result<reqwest::Client, TelemetryError> {
    let tls = crate::tls::client_config(extra_roots, None).map_err(TelemetryError::Tls)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(TelemetryError::Client)
}

fn exporter(
    settings: &TelemetrySettings,
    extra_roots: &[CertificateDer<'static>],
) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let protocol = settings.protocol.or_else(|| {
        let env = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .ok()?;
        (env.trim() == "grpc").then_some(OtlpProtocol::Grpc)
    });
    match protocol.unwrap_or(OtlpProtocol::HttpProtobuf) {
        OtlpProtocol::HttpProtobuf => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(Exporting(export_client(extra_roots)?))
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(endpoint) = &settings.endpoint {
                builder = builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
            }
            if !settings.headers.is_empty() {
                let headers: HashMap<String, String> = settings
                    .headers
                    .iter()
                    .map(|(name, value)| (name.clone(), value.expose().to_owned()))
                    .collect();
                builder = builder.with_headers(headers);
            }
            builder.build().map_err(TelemetryError::Exporter)
        }
        OtlpProtocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc)
                .with_timeout(EXPORT_TIMEOUT);
            let endpoint = settings.endpoint.clone().or_else(|| {
                std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
                    .ok()
            });
            if let Some(endpoint) = endpoint {
                if endpoint.starts_with("https://") {
                    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
                    let roots = Certificate::from_pem(crate::tls::system_and_extra_roots_pem(extra_roots));
                    builder = builder.with_tls_config(ClientTlsConfig::new().ca_certificate(roots));
                }
                builder = builder.with_endpoint(endpoint);
            }
            if !settings.headers.is_empty() {
                let mut headers = http::HeaderMap::new();
                for (name, value) in &settings.headers {
                    let name = http::HeaderName::from_bytes(name.as_bytes());
                    if let (Ok(name), Ok(value)) = (name, http::HeaderValue::from_str(value.expose())) {
                        headers.insert(name, value);
                    }
                }
                builder = builder.with_metadata(
                    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers),
                );
            }
            builder.build().map_err(TelemetryError::Exporter)
        }
    }
}

/// OTLP/HTTP over the sidecar's own reqwest client (rustls with ring, like every client here).
#[derive(Debug)]
struct Exporting(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Exporting {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut outgoing = self.0.request(parts.method, parts.uri.to_string()).body(body);
        for (name, value) in &parts.headers {
            outgoing = outgoing.header(name, value);
        }
        let response = outgoing.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        Ok(http::Response::builder().status(status).body(body)?)
    }
}

/// Queues ended spans (dropping, and counting, what does not fit) for a task that exports them
/// in batches: a slow or dead collector never holds up the span's own work.
#[derive(Debug)]
struct QueueProcessor {
    /// `None` once shut down: the export task then drains the queue and ends.
    spans: Mutex<Option<mpsc::Sender<SpanData>>>,
    exporter: Arc<Mutex<Option<opentelemetry_otlp::SpanExporter>>>,
    metrics: MetricsHandle,
}

#[derive(Clone)]
struct MetricsHandle(Metrics);

impl std::fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl QueueProcessor {
    fn start(
        exporter: opentelemetry_otlp::SpanExporter,
        metrics: Metrics,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (spans, queue) = mpsc::channel(QUEUE);
        let exporter = Arc::new(Mutex::new(Some(exporter)));
        let metrics = MetricsHandle(metrics);
        let exporting = tokio::spawn(export(queue, exporter.clone(), metrics.clone()));
        let processor = Self {
            spans: Mutex::new(Some(spans)),
            exporter,
            metrics,
        };
        (processor, exporting)
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let queued = lock(&self.spans)
            .as_ref()
            .is_some_and(|spans| spans.try_send(span).is_ok());
        if !queued {
            self.metrics.0.trace_spans_dropped(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        lock(&self.spans).take();
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(exporter) = lock(&self.exporter).as_mut() {
            exporter.set_resource(resource);
        }
    }
}

/// Exports queued spans in batches of up to [`BATCH`], at least every [`FLUSH_EVERY`].
async fn export(
    mut queue: mpsc::Receiver<SpanData>,
    exporter: Arc<Mutex<Option<opentelemetry_otlp::SpanExporter>>>,
    metrics: MetricsHandle,
) {
    // The resource is set before the first span ends: take the exporter once there is work.
    let mut batch = Vec::with_capacity(BATCH);
    let mut taken = None;
    loop {
        let Some(first) = queue.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        if taken.is_none() {
            taken = lock(&exporter).take();
        }
        let Some(exporter) = &taken else {
            return;
        };
        let count = batch.len() as u64;
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(std::mem::take(&mut batch))).await;
        if !matches!(sent, Ok(Ok(()))) {
            metrics.0.trace_spans_dropped(count);
        }
    }
}

// --- the spans ----------------------------------------------------------------------------

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

/// The span of one request to an upstream, a child of the request's.
pub fn upstream_span(method: &http::Method, uri: &http::Uri) -> tracing::Span {
    if !traced() {
        return tracing::Span::none();
    }
    tracing::info_span!(
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
    )
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

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    fn parent(sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from(7),
            SpanId::from(9),
            flags,
            true,
            TraceState::default(),
        )
    }

    #[test]
    fn parent_based_samplers_follow_the_clients_decision_and_the_others_their_own() {
        for sampler in [
            SamplerSetting::ParentBasedAlwaysOn,
            SamplerSetting::ParentBasedAlwaysOff,
            SamplerSetting::ParentBasedTraceIdRatio(0.0),
        ] {
            assert!(sampler.samples(Some(&parent(true))), "{sampler:?}");
            assert!(!sampler.samples(Some(&parent(false))), "{sampler:?}");
        }
        assert!(SamplerSetting::ParentBasedAlwaysOn.samples(None));
        assert!(!SamplerSetting::ParentBasedAlwaysOff.samples(None));
        assert!(SamplerSetting::AlwaysOn.samples(Some(&parent(false))));
        assert!(!SamplerSetting::AlwaysOff.samples(Some(&parent(true))));
        assert!(!SamplerSetting::TraceIdRatio(0.0).samples(Some(&parent(true))));
        assert!(SamplerSetting::TraceIdRatio(1.0).samples(None));
    }

    #[test]
    fn a_ratio_sampler_samples_about_its_ratio_of_root_requests() {
        let sampled = (0..10_000)
            .filter(|_| SamplerSetting::ParentBasedTraceIdRatio(0.1).samples(None))
            .count();
        assert!((800..1200).contains(&sampled), "{sampled} of 10,000");
    }
}
