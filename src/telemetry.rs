//! OpenTelemetry traces (it imports only from the ground floor: metrics, secret, sync, tls), off by
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

mod export;
mod spans;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::{SpanContext, TracerProvider as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use rustls::pki_types::CertificateDer;

use crate::metrics::Metrics;
use crate::secret::Secret;

/// The target of every span made for export (the log's own filter leaves it out).
pub const TARGET: &str = "token_sidecar::otel";

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
    let exporter = export::exporter(settings, extra_roots)?;
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
    let (processor, exporting) = export::QueueProcessor::start(exporter, metrics);
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

pub use spans::*;

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
