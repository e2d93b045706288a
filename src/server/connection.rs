//! One client connection, from accept to close: every connection must make progress.
//!
//! - A watchdog closes a connection that has no request in flight for too long: before its
//!   first request `header_read_timeout` (silence, half a request line, an HTTP/2 preface and
//!   nothing after), later `idle_timeout`; while the listener is at its connection cap, any
//!   connection idle for [`IDLE_AT_CAP`], so connections doing nothing cannot hold the cap —
//!   nor ones whose request body trickles in: at the cap, a connection reading a body at less
//!   than [`MIN_BODY_RATE_AT_CAP`] for over [`IDLE_AT_CAP`] is closed (its request, if the
//!   cap never fills, still ends at `request_body_timeout`).
//! - HTTP/2 connections are pinged; a peer that stops answering is dropped.
//! - hyper answers an HTTP/1 request it cannot parse (too many headers, a URI over 64 KiB, a
//!   malformed line) itself, with a bare status. [`ConnIo`] recognises such an answer — bytes
//!   written while no request is being served — and sends the contract's JSON error instead.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{ConnectionLimits, Handler};
use crate::body::{boxed, BoxError, ProxyBody};
use crate::proxy::client_body::BodyRecord;
use crate::sync::lock;

/// How long an idle connection is kept while the listener is at its connection cap.
pub const IDLE_AT_CAP: Duration = Duration::from_secs(1);
/// Bytes a second below which a request body being read holds a connection for nothing, at
/// the cap (an application beside the sidecar sends megabytes a second).
pub const MIN_BODY_RATE_AT_CAP: u64 = 1024;
/// How long a connection told to close may take to finish what it is doing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the watchdog and [`ConnIo`] know of a connection's requests.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    /// Requests handed to the service whose responses are not finished.
    in_flight: AtomicUsize,
    /// Whether any request was handed to the service yet.
    served: AtomicBool,
    /// Milliseconds after `started` when the connection last became idle.
    idle_since_ms: AtomicU64,
    /// Bytes arrived while no request was in flight: the start of the next request (or garbage).
    unclaimed_bytes: AtomicBool,
    /// The body of the latest request (the one an HTTP/1 connection is reading).
    latest_body: std::sync::Mutex<Option<Arc<BodyRecord>>>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            unclaimed_bytes: AtomicBool::new(false),
            latest_body: std::sync::Mutex::new(None),
        })
    }

    fn request_started(self: &Arc<Self>, body: Arc<BodyRecord>) -> InFlight {
        *lock(&self.latest_body) = Some(body);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.unclaimed_bytes.store(false, Ordering::Release);
        InFlight(self.clone())
    }

    /// Whether the request being served is one whose body trickles in.
    fn trickling(&self) -> bool {
        lock(&self.latest_body)
            .as_ref()
            .is_some_and(|body| body.trickling(IDLE_AT_CAP, MIN_BODY_RATE_AT_CAP))
    }

    /// No request in flight, yet the client sent something: hyper is parsing a head, and
    /// anything it writes now is its own answer to a head it could not parse.
    fn between_requests(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.unclaimed_bytes.load(Ordering::Acquire)
    }

    /// When the watchdog must next look, or `None` if the connection has been idle too long.
    /// While a request is in flight that is no later than the idle deadline its end can start,
    /// so finished requests need not wake the watchdog: it looks again then and counts from
    /// when the connection became idle.
    fn next_check(&self, limits: &ConnectionLimits, at_cap: bool) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            let mut next = limits.idle_timeout.min(limits.header_read_timeout);
            if at_cap {
                if self.trickling() {
                    return None;
                }
                next = next.min(IDLE_AT_CAP);
            }
            return Some(Instant::now() + next);
        }
        let mut limit = if self.served.load(Ordering::Acquire) {
            limits.idle_timeout
        } else {
            limits.header_read_timeout
        };
        if at_cap {
            limit = limit.min(IDLE_AT_CAP);
        }
        let idle_since = self.started + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        let deadline = idle_since + limit;
        (deadline > Instant::now()).then_some(deadline)
    }
}

/// A request in flight; dropped when its response body is finished (or abandoned).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let idle_ms = activity.started.elapsed().as_millis() as u64;
        activity.idle_since_ms.store(idle_ms, Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is finished.
pub struct TrackedBody {
    inner: ProxyBody,
    _in_flight: InFlight,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a listener shares with each of its connections.
#[derive(Clone)]
pub struct Shared {
    pub builder: auto::Builder<TokioExecutor>,
    pub handler: Handler,
    pub limits: ConnectionLimits,
    /// Whether the listener is at its connection cap now.
    pub at_cap: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Notified when the listener reaches its cap, so idle connections make room.
    pub pressure: Arc<Notify>,
}

/// Serves one connection until it closes, the watchdog closes it, or `shutdown` turns true.
pub async fn serve<T>(io: T, shared: Shared, mut shutdown: watch::Receiver<bool>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let handler = shared.handler.clone();
    let tracker = activity.clone();
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let body = Arc::new(BodyRecord::default());
        let in_flight = tracker.request_started(body.clone());
        request.extensions_mut().insert(body);
        // The body is boxed here, once: everything behind the edge takes a `ProxyBody`.
        let response = handler(request.map(boxed));
        async move {
            let (parts, inner) = response.await.into_parts();
            let body = TrackedBody {
                inner,
                _in_flight: in_flight,
            };
            Ok::<_, std::convert::Infallible>(Response::from_parts(parts, body))
        }
    });
    let io = TokioIo::new(ConnIo::new(io, activity.clone()));
    let connection = shared.builder.serve_connection(io, service);
    tokio::pin!(connection);
    // One timer for the connection's life, moved as its deadline moves: requests do not touch
    // it. Once the connection is closing, it is the end of the grace.
    let mut closing = false;
    let watchdog = tokio::time::sleep_until(Instant::now());
    tokio::pin!(watchdog);
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = watchdog.as_mut() => {
                if closing {
                    break Ok(()); // the grace ran out: drop the connection
                }
                let next = match activity.next_check(&shared.limits, (shared.at_cap)()) {
                    Some(at) => at,
                    None => {
                        tracing::debug!("closing a connection that made no progress (or trickled a body at the cap)");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        Instant::now() + CLOSE_GRACE
                    }
                };
                watchdog.as_mut().reset(next);
            }
            _ = shared.pressure.notified(), if !closing => watchdog.as_mut().reset(Instant::now()),
            _ = shutdown.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
                watchdog.as_mut().reset(Instant::now() + super::SHUTDOWN_GRACE);
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// The client's socket as hyper sees it: reads mark bytes that arrive between requests, and a
/// bare error answer hyper writes between requests is replaced by the contract's JSON.
struct ConnIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// HTTP/2 (its errors are frames, not answers): nothing is held.
    http2: bool,
    first_read: bool,
    /// Bytes hyper wrote between requests, held until it flushes.
    held: BytesMut,
    /// Bytes to pass on before anything else.
    out: Bytes,
}

impl<T> ConnIo<T> {
    fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            http2: false,
            first_read: true,
            held: BytesMut::new(),
            out: Bytes::new(),
        }
    }

    /// Moves what is held to `out`, its hyper error answer (if it ends with one) replaced.
    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = self.held.split().freeze();
        self.out = match bare_error_at_end(&held) {
            Some((start, status)) => {
                let mut out = BytesMut::from(&held[..start]);
                out.extend_from_slice(&json_error_answer(status));
                out.freeze()
            }
            None => held,
        };
    }
}

impl<T: AsyncWrite + Unpin> ConnIo<T> {
    fn poll_drain_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    fn holding(&self) -> bool {
        !self.http2 && self.activity.between_requests()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let arrived = &buf.filled()[before..];
        if !arrived.is_empty() {
            if self.first_read {
                self.first_read = false;
                self.http2 = arrived.starts_with(b"PRI * HTTP/2");
            }
            if self.activity.in_flight.load(Ordering::Acquire) == 0 {
                self.activity.unclaimed_bytes.store(true, Ordering::Release);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain_out(cx))?;
        if this.holding() {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        if !this.held.is_empty() {
            this.release_held();
            ready!(this.poll_drain_out(cx))?;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.out.is_empty() && this.held.is_empty() && !this.holding() {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let first = bufs
            .iter()
            .find(|buf| !buf.is_empty())
            .map_or(&[][..], |buf| &buf[..]);
        Pin::new(this).poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.release_held();
        ready!(this.poll_drain_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.release_held();
        ready!(this.poll_drain_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Where hyper's own error answer starts in `written`, if `written` ends with one: a complete
/// `400`, `414` or `431` head with no body and only the headers hyper adds.
fn bare_error_at_end(written: &[u8]) -> Option<(usize, StatusCode)> {
    const MARK: &[u8] = b"HTTP/1.";
    let start = written.windows(MARK.len()).rposition(|window| window == MARK)?;
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = response.parse(&written[start..]).ok()? else {
        return None;
    };
    let status = StatusCode::from_u16(response.code?).ok()?;
    let only_hyper_headers = response.headers.iter().all(|header| {
        let name = header.name.to_ascii_lowercase();
        name == "date" || name == "connection" || (name == "content-length" && header.value == b"0")
    });
    let is_parse_error = matches!(status.as_u16(), 400 | 414 | 431);
    (start + len == written.len() && only_hyper_headers && is_parse_error).then_some((start, status))
}

/// The contract's JSON error for a request hyper could not parse; the connection then closes.
fn json_error_answer(status: StatusCode) -> Vec<u8> {
    let (code, message) = match status {
        StatusCode::BAD_REQUEST => (
            "bad_request",
            "malformed request: its request line or a header could not be parsed",
        ),
        StatusCode::URI_TOO_LONG => ("request_too_large", "the request target is longer than 64 KiB"),
        _ => (
            "request_too_large",
            "the request head has more headers or bytes than the sidecar accepts",
        ),
    };
    let body = format!(
        "{}\n",
        serde_json::json!({ "error": { "code": code, "message": message } })
    );
    let reason = status.canonical_reason().unwrap_or("Error");
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\nx-token-sidecar-error: {code}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_error_answers_are_recognised_at_the_end_only() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 23 Nov 2026 10:00:00 GMT\r\n\r\n";
        assert_eq!(
            bare_error_at_end(bare),
            Some((0, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
        );
        let mut after_tail = b"...end of an earlier body".to_vec();
        after_tail.extend_from_slice(bare);
        assert_eq!(bare_error_at_end(&after_tail).map(|(start, _)| start), Some(25));
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nhi";
        assert_eq!(bare_error_at_end(with_body), None);
        let ours =
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-token-sidecar-error: bad_request\r\n\r\n";
        assert_eq!(bare_error_at_end(ours), None);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(bare_error_at_end(ok), None);
    }

    #[test]
    fn the_replacement_is_the_contract_json() {
        let answer = String::from_utf8(json_error_answer(StatusCode::URI_TOO_LONG)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{answer}");
        assert!(answer.contains("x-token-sidecar-error: request_too_large\r\n"));
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "request_too_large");
        assert!(answer.contains(&format!("content-length: {}\r\n", body.len())));
    }
}
