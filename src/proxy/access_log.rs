//! The access log: one `tracing` event per proxied request, target `token_sidecar::access`,
//! emitted when the response body is finished (or abandoned), so that it has the bytes sent
//! and the whole duration. The path is logged without its query (queries carry personal
//! data); the token only as its fingerprint.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::client_body::BodyRecord;
use crate::body::{BoxError, ProxyBody};
use crate::config::RouteSpec;
use crate::secret::AccessToken;

/// The metrics and log label for requests that matched no route.
static NO_ROUTE: LazyLock<Arc<str>> = LazyLock::new(|| "none".into());

/// What is known of one request, filled in as it goes through the request path.
pub struct Exchange {
    pub started: Instant,
    pub method: Method,
    uri: Uri,
    pub route: Option<Arc<RouteSpec>>,
    pub credential: Option<Arc<str>>,
    pub token: Option<AccessToken>,
    pub upstream_status: Option<u16>,
    pub replayed: bool,
    /// The sidecar's error code, when it answered itself.
    pub error: Option<&'static str>,
    /// The request body's bytes (and fault), shared with the body as it streams.
    pub body: Arc<BodyRecord>,
}

/// The sent token's fingerprint in the access log, `-` when none was sent.
struct TokenFingerprint<'a>(Option<&'a AccessToken>);

impl fmt::Display for TokenFingerprint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(token) => token.fingerprint().fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl Exchange {
    pub fn new<B>(request: &Request<B>) -> Self {
        Self {
            started: Instant::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            route: None,
            credential: None,
            token: None,
            upstream_status: None,
            replayed: false,
            error: None,
            // Made at the connection's edge, which watches it too (a handler driven
            // in-process has none).
            body: request
                .extensions()
                .get::<Arc<BodyRecord>>()
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// The route's name in metrics and logs (`none` when nothing matched).
    pub fn route_label(&self) -> &Arc<str> {
        self.route.as_ref().map_or(&NO_ROUTE, |route| &route.name)
    }

    fn log(&self, status: u16, bytes_out: u64) {
        tracing::info!(
            target: "token_sidecar::access",
            route = &**self.route_label(),
            credential = self.credential.as_deref().unwrap_or("-"),
            method = %self.method,
            path = self.uri.path(),
            status,
            upstream_status = self.upstream_status.unwrap_or(0),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes_in = self.body.bytes(),
            bytes_out,
            token = %TokenFingerprint(self.token.as_ref()),
            replayed = self.replayed,
            error = self.error.unwrap_or("-"),
            "request"
        );
    }
}

/// Whether the log's filter lets access events through: when it does not, a response's body
/// is not wrapped to count for an event no one would see.
pub fn enabled() -> bool {
    tracing::enabled!(target: "token_sidecar::access", tracing::Level::INFO)
}

/// `body` as sent to the client, logging `exchange` once it is finished or dropped.
pub fn logged(body: ProxyBody, exchange: Exchange, status: u16) -> ProxyBody {
    LoggedBody {
        inner: body,
        exchange,
        status,
        bytes_out: 0,
    }
    .boxed_unsync()
}

struct LoggedBody {
    inner: ProxyBody,
    exchange: Exchange,
    status: u16,
    bytes_out: u64,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes_out += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.exchange.log(self.status, self.bytes_out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_events_count_as_enabled_only_where_the_filter_lets_them_through() {
        let quiet = tracing_subscriber::fmt().with_env_filter("warn").finish();
        tracing::subscriber::with_default(quiet, || assert!(!enabled()));
        let loud = tracing_subscriber::fmt()
            .with_env_filter("warn,token_sidecar::access=info")
            .finish();
        tracing::subscriber::with_default(loud, || assert!(enabled()));
    }
}
