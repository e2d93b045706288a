//! The exporter: OTLP over HTTP (on the sidecar's own reqwest client) or gRPC, fed from a
//! bounded queue by a task that exports in batches under a timeout, counting what it drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use super::{OtlpProtocol, TelemetryError, TelemetrySettings};
use crate::metrics::Metrics;
use crate::sync::lock;

/// Ended spans waiting for export, at most.
const QUEUE: usize = 2048;
/// Spans in one export.
const BATCH: usize = 512;
/// How long spans wait for their batch to fill.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long one export may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

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

pub(super) fn exporter(
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
pub(super) struct QueueProcessor {
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
    pub(super) fn start(
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
