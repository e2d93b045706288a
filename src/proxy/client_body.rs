//! The application's request body on its way upstream: cut off at `max_request_body`,
//! abandoned when the client stops sending for `body_read_timeout` or has not finished within
//! `request_body_timeout` (a body trickled a byte at a time never stops sending), and —
//! whatever fails — the failure recorded as the client's, so it is answered as such (413, 408,
//! 400) and not blamed on the upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::body::{BoxError, ProxyBody};
use crate::error::BodyFault;

/// Where a [`ClientBody`] records the bytes it passed on and its fault, for the request handler
/// to read after the upstream call failed (the upstream client reports only that the body
/// failed) and for the access log.
///
/// Made at the connection's edge and handed down in the request's extensions, so that the
/// connection's watchdog can tell a body that trickles in from a slow upstream.
#[derive(Debug, Default)]
pub struct BodyRecord {
    fault: AtomicU8,
    bytes: AtomicU64,
    /// Since when the body has been read, while it is (cleared once it ended or failed).
    reading_since: std::sync::Mutex<Option<Instant>>,
}

impl BodyRecord {
    /// Whether the body is still being read, for longer than `grace`, at less than
    /// `min_rate` bytes a second on average: a sender that holds its connection for nothing.
    pub fn trickling(&self, grace: Duration, min_rate: u64) -> bool {
        let Some(since) = *crate::sync::lock(&self.reading_since) else {
            return false;
        };
        let reading = since.elapsed();
        reading > grace && (self.bytes() as f64) < reading.as_secs_f64() * min_rate as f64
    }

    fn reading(&self, reading: bool) {
        *crate::sync::lock(&self.reading_since) = reading.then(Instant::now);
    }

    /// Bytes of the request body read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn set(&self, fault: BodyFault) {
        let code = match fault {
            BodyFault::TooLarge { .. } => 1,
            BodyFault::Stalled { .. } => 2,
            BodyFault::Broken => 3,
            BodyFault::TooSlow { .. } => 4,
        };
        let _ = self
            .fault
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The first fault recorded, given the limits the body ran with.
    pub fn fault(&self, limits: &BodyLimits) -> Option<BodyFault> {
        match self.fault.load(Ordering::Acquire) {
            1 => Some(BodyFault::TooLarge {
                limit: limits.max_bytes.unwrap_or(u64::MAX),
            }),
            2 => Some(BodyFault::Stalled {
                after: limits.idle_timeout,
            }),
            3 => Some(BodyFault::Broken),
            4 => Some(BodyFault::TooSlow {
                within: limits.total_timeout,
            }),
            _ => None,
        }
    }
}

/// The limits a request body is read under.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: Option<u64>,
    /// The longest the client may send nothing.
    pub idle_timeout: Duration,
    /// The longest the whole body may take, from the request's arrival.
    pub total_timeout: Duration,
}

/// A client's request body under [`BodyLimits`].
pub struct ClientBody {
    inner: ProxyBody,
    read: u64,
    limits: BodyLimits,
    /// When the whole body must have arrived.
    finish_by: Instant,
    /// Armed when the client is waited on; `None` until the first wait (no timer for bodies
    /// that arrive at once).
    deadline: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    record: Arc<BodyRecord>,
}

impl ClientBody {
    /// `inner` read under `limits`, its whole deadline counted from now.
    pub fn new(inner: ProxyBody, limits: BodyLimits, record: Arc<BodyRecord>) -> Self {
        record.reading(true);
        Self {
            inner,
            read: 0,
            limits,
            finish_by: Instant::now() + limits.total_timeout,
            deadline: None,
            waiting: false,
            record,
        }
    }

    fn fail(&mut self, fault: BodyFault) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.record.set(fault);
        self.record.reading(false);
        Poll::Ready(Some(Err(Box::new(fault))))
    }

    /// Starts the idle clock when the client is first waited on after sending something (never
    /// past the body's whole deadline), and says which limit ran out, if one did.
    fn waited_out(&mut self, cx: &mut Context<'_>) -> Option<BodyFault> {
        let idle_until = (Instant::now() + self.limits.idle_timeout).min(self.finish_by);
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(idle_until)));
        if !self.waiting {
            deadline.as_mut().reset(idle_until);
            self.waiting = true;
        }
        if deadline.as_mut().poll(cx).is_pending() {
            return None;
        }
        Some(if Instant::now() >= self.finish_by {
            BodyFault::TooSlow {
                within: self.limits.total_timeout,
            }
        } else {
            BodyFault::Stalled {
                after: self.limits.idle_timeout,
            }
        })
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if let Some(data) = frame.data_ref() {
                    this.read += data.len() as u64;
                    this.record.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some(limit) = this.limits.max_bytes.filter(|limit| this.read > *limit) {
                        return this.fail(BodyFault::TooLarge { limit });
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                tracing::debug!(error = %err, "request body failed");
                this.fail(BodyFault::Broken)
            }
            Poll::Ready(None) => {
                this.record.reading(false);
                Poll::Ready(None)
            }
            Poll::Pending => match this.waited_out(cx) {
                Some(fault) => this.fail(fault),
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        self.record.reading(false);
    }
}
