//! The body types everything else streams through (ground floor: it imports nothing of ours):
//! the one boxed body of every request and response, its error, and the small bodies the
//! sidecar writes itself (JSON answers, kept request bodies).

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// Errors from any body we stream through.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of everything the sidecar sends and receives: boxed once, at the connection
/// edge for what a client sends, by the upstream client for what comes back.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Any body, boxed as a [`ProxyBody`] (its error boxed too).
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A JSON answer (with the trailing newline a terminal wants).
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(format!("{value}\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
