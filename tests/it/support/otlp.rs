//! An OTLP/HTTP trace receiver on 127.0.0.1: decodes each export with the official
//! `opentelemetry-proto` messages and keeps the spans, the raw bytes and the headers it got.
//! It can also answer slowly (a collector that hangs), for the tests that export must not
//! hold requests up.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use token_sidecar::body::full_body;
use token_sidecar::server;

/// What the receiver has been sent.
#[derive(Default)]
pub struct Received {
    pub spans: Vec<Span>,
    /// The resource attributes of every export, flattened.
    pub resource: Vec<(String, String)>,
    /// Every export's body as it arrived, and its headers as `name: value` lines.
    pub raw: Vec<Vec<u8>>,
    pub headers: Vec<String>,
}

pub struct Collector {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Received>>,
}

impl Collector {
    /// A collector that answers every export at once.
    pub async fn start() -> Self {
        Self::answering_after(Duration::ZERO).await
    }

    /// A collector that keeps every export waiting `delay` before it answers.
    pub async fn answering_after(delay: Duration) -> Self {
        let received = Arc::new(Mutex::new(Received::default()));
        let sink = received.clone();
        let handler: server::Handler = Arc::new(move |request| {
            let sink = sink.clone();
            Box::pin(async move {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                if parts.uri.path() == "/v1/traces" {
                    keep(&sink, &parts.headers, &bytes);
                }
                tokio::time::sleep(delay).await;
                let mut response = http::Response::new(full_body(""));
                *response.status_mut() = if parts.uri.path() == "/v1/traces" {
                    http::StatusCode::OK
                } else {
                    http::StatusCode::NOT_FOUND
                };
                response
            })
        });
        let addr = super::spawn_plain_server(handler).await;
        Self { addr, received }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }
}

fn keep(sink: &Mutex<Received>, headers: &http::HeaderMap, bytes: &[u8]) {
    let export = ExportTraceServiceRequest::decode(bytes).expect("an OTLP trace export");
    let mut received = sink.lock().unwrap();
    received.raw.push(bytes.to_vec());
    for (name, value) in headers {
        received
            .headers
            .push(format!("{name}: {}", value.to_str().unwrap_or("<binary>")));
    }
    for resource_spans in export.resource_spans {
        if let Some(resource) = &resource_spans.resource {
            received.resource.extend(resource.attributes.iter().map(flat));
        }
        for scope in resource_spans.scope_spans {
            received.spans.extend(scope.spans);
        }
    }
}

/// An attribute as `(key, value as text)`.
pub fn flat(attribute: &KeyValue) -> (String, String) {
    let value = match attribute.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::IntValue(n)) => n.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    };
    (attribute.key.clone(), value)
}

/// `span`'s attribute `key`, as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .map(flat)
        .find_map(|(k, v)| (k == key).then_some(v))
}

/// An OTLP/gRPC trace receiver: the collector's `TraceService`, served by tonic.
pub struct GrpcCollector {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Received>>,
}

struct TraceSink(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for TraceSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let mut headers = http::HeaderMap::new();
        for (name, value) in request.metadata().clone().into_headers() {
            if let Some(name) = name {
                headers.insert(name, value);
            }
        }
        let bytes = request.get_ref().encode_to_vec();
        keep(&self.0, &headers, &bytes);
        Ok(tonic::Response::new(Default::default()))
    }
}

impl GrpcCollector {
    pub async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let received = Arc::new(Mutex::new(Received::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(TraceSink(received.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream_of(listener)),
        );
        Self { addr, received }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }
}

/// The listener's connections as the stream tonic serves.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
