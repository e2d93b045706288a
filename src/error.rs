//! The errors the sidecar itself answers with, as the contract's JSON:
//! `{"error":{"code":"…","message":"…"}}` plus `x-token-sidecar-error: <code>`, so they cannot be
//! mistaken for the upstream's. Messages name routes and credentials, never tokens or secrets.

use std::time::Duration;

use http::header::{InvalidHeaderValue, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};

use crate::body::{json_response, BoxError, ProxyBody};
use crate::failure::Transport;
use crate::route::TargetError;
use crate::token::cache::TokenError;

pub const ERROR_HEADER: &str = "x-token-sidecar-error";

/// Everything that stops a request from reaching (or coming back from) its upstream. The
/// `Display` text is what the client reads: the sidecar's own words, never a library's; the
/// `source` chain, for the log, keeps the rest. [`ProxyError::class`] is the one place that
/// decides the status and code.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error(transparent)]
    BadTarget(#[from] TargetError),
    #[error("header {header} {}", if *.missing { "is missing; it must name one of this route's credentials" } else { "names none of this route's credentials" })]
    UnknownCredential { header: HeaderName, missing: bool },
    #[error(
        "CONNECT is not supported: HTTPS cannot be injected; send plain http:// requests to the sidecar"
    )]
    ConnectNotSupported,
    #[error("TRACE is not supported: it would reflect the injected credentials back")]
    TraceNotAllowed,
    /// No usable token: the cache's own error, with its credential, endpoint and back-off.
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("upstream {upstream} unreachable: {reason}")]
    UpstreamUnreachable {
        upstream: String,
        reason: Transport,
        #[source]
        source: Option<BoxError>,
    },
    #[error("upstream {upstream} sent no response within {timeout:?}")]
    UpstreamTimeout { upstream: String, timeout: Duration },
    #[error(transparent)]
    Body(#[from] BodyFault),
    #[error("missing or wrong {0} header")]
    Forbidden(HeaderName),
    #[error("request headers are larger than the {limit} bytes allowed")]
    HeadersTooLarge { limit: usize },
    #[error("internal error: {0}")]
    Internal(#[from] InternalError),
}

/// Why a client's request body could not be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyFault {
    #[error("the request body is larger than the {limit} bytes allowed")]
    TooLarge { limit: u64 },
    #[error("the client sent nothing of the request body for {after:?}")]
    Stalled { after: Duration },
    #[error("the client did not finish sending the request body within {within:?}")]
    TooSlow { within: Duration },
    #[error("the request body was cut off or badly framed")]
    Broken,
}

/// A failure of the sidecar's own making: a bug, or a value it cannot put on the wire.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error("cannot build the upstream URI")]
    UpstreamUri(#[source] http::Error),
    #[error("the token is not a valid header value")]
    TokenHeader(#[source] InvalidHeaderValue),
    #[error("the DPoP proof could not be signed")]
    DpopProof(#[source] jsonwebtoken::errors::Error),
}

/// What the client is told of an error: its status, and the contract's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorClass {
    pub status: StatusCode,
    pub code: &'static str,
}

impl ErrorClass {
    const fn new(status: StatusCode, code: &'static str) -> Self {
        Self { status, code }
    }
}

impl ProxyError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NoRoute => ErrorClass::new(StatusCode::NOT_FOUND, "no_route"),
            Self::BadTarget(_) | Self::Body(BodyFault::Broken) => {
                ErrorClass::new(StatusCode::BAD_REQUEST, "bad_request")
            }
            Self::UnknownCredential { .. } => ErrorClass::new(StatusCode::BAD_REQUEST, "unknown_credential"),
            Self::ConnectNotSupported | Self::TraceNotAllowed => {
                ErrorClass::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            Self::Token(TokenError::Unavailable { .. }) => {
                ErrorClass::new(StatusCode::SERVICE_UNAVAILABLE, "token_unavailable")
            }
            Self::UpstreamUnreachable { .. } => {
                ErrorClass::new(StatusCode::BAD_GATEWAY, "upstream_unreachable")
            }
            Self::UpstreamTimeout { .. } => ErrorClass::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Self::Body(BodyFault::TooLarge { .. }) => {
                ErrorClass::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large")
            }
            Self::Body(BodyFault::Stalled { .. } | BodyFault::TooSlow { .. }) => {
                ErrorClass::new(StatusCode::REQUEST_TIMEOUT, "request_timeout")
            }
            Self::Forbidden(_) => ErrorClass::new(StatusCode::FORBIDDEN, "forbidden"),
            Self::HeadersTooLarge { .. } => {
                ErrorClass::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request_too_large")
            }
            Self::Token(TokenError::UnknownCredential(_)) | Self::Internal(_) => {
                ErrorClass::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            }
        }
    }

    /// When the client may try again: a token's back-off, in whole seconds (at least one).
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Token(TokenError::Unavailable { retry_after, .. }) => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            Self::Token(TokenError::UnknownCredential(_))
            | Self::NoRoute
            | Self::BadTarget(_)
            | Self::UnknownCredential { .. }
            | Self::ConnectNotSupported
            | Self::TraceNotAllowed
            | Self::UpstreamUnreachable { .. }
            | Self::UpstreamTimeout { .. }
            | Self::Body(_)
            | Self::Forbidden(_)
            | Self::HeadersTooLarge { .. }
            | Self::Internal(_) => None,
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let class = self.class();
        let mut response = error_response(class.status, class.code, &self.to_string());
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A sidecar JSON error response.
pub fn error_response(status: StatusCode, code: &'static str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut response = json_response(status, &body);
    response
        .headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(code));
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::token::error::FetchError;

    #[tokio::test]
    async fn errors_are_json_with_the_code_header() {
        let response = ProxyError::NoRoute.into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[ERROR_HEADER], "no_route");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "no_route");
        assert!(json["error"]["message"].as_str().unwrap().contains("no route"));
    }

    #[test]
    fn token_unavailable_carries_retry_after_in_whole_seconds() {
        let response = ProxyError::from(TokenError::Unavailable {
            credential: "acme".into(),
            endpoint: "auth.example:443".into(),
            cause: FetchError::Status {
                status: 503,
                retry_after: None,
            },
            retry_after: Duration::from_millis(1500),
        })
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
    }
}
