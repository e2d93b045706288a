//! The errors the sidecar itself answers with, as the contract's JSON:
//! `{"error":{"code":"…","message":"…"}}` plus `x-token-sidecar-error: <code>`, so they cannot be
//! mistaken for the upstream's. Messages name routes and credentials, never tokens or secrets.

use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};

use crate::body::{json_response, BoxError, ProxyBody};
use crate::proxy::client_body::BodyFault;
use crate::route::TargetError;
use crate::token::cache::TokenError;
use crate::token::error::FetchError;

pub const ERROR_HEADER: &str = "x-token-sidecar-error";

/// Everything that stops a request from reaching (or coming back from) its upstream. The
/// `Display` text is what the client reads: the sidecar's own words, never a library's; the
/// `source` chain, for the log, keeps the rest.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error(transparent)]
    BadTarget(#[from] TargetError),
    #[error("{0}")]
    UnknownCredential(String),
    #[error(
        "CONNECT is not supported: HTTPS cannot be injected; send plain http:// requests to the sidecar"
    )]
    ConnectNotSupported,
    #[error("TRACE is not supported: it would reflect the injected credentials back")]
    TraceNotAllowed,
    #[error("no usable token for credential `{credential}` from {endpoint}: {cause}")]
    TokenUnavailable {
        credential: String,
        endpoint: String,
        #[source]
        cause: FetchError,
        retry_after: Duration,
    },
    #[error("upstream {upstream} unreachable: {reason}")]
    UpstreamUnreachable {
        upstream: String,
        reason: &'static str,
        #[source]
        source: Option<BoxError>,
    },
    #[error("upstream {upstream} sent no response within {timeout:?}")]
    UpstreamTimeout { upstream: String, timeout: Duration },
    #[error(transparent)]
    Body(#[from] BodyFault),
    #[error("missing or wrong {0} header")]
    Forbidden(String),
    #[error("request headers are larger than the {limit} bytes allowed")]
    HeadersTooLarge { limit: usize },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BadTarget(_) | Self::UnknownCredential(_) => StatusCode::BAD_REQUEST,
            Self::ConnectNotSupported | Self::TraceNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Body(BodyFault::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Body(BodyFault::Stalled { .. }) => StatusCode::REQUEST_TIMEOUT,
            Self::Body(BodyFault::Broken) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::BadTarget(_) | Self::Body(BodyFault::Broken) => "bad_request",
            Self::UnknownCredential(_) => "unknown_credential",
            Self::ConnectNotSupported | Self::TraceNotAllowed => "method_not_allowed",
            Self::TokenUnavailable { .. } => "token_unavailable",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::Body(BodyFault::Stalled { .. }) => "request_timeout",
            Self::Forbidden(_) => "forbidden",
            Self::Body(BodyFault::TooLarge { .. }) | Self::HeadersTooLarge { .. } => "request_too_large",
            Self::Internal(_) => "internal_error",
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let retry_after = match &self {
            Self::TokenUnavailable { retry_after, .. } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            _ => None,
        };
        let mut response = error_response(self.status(), self.code(), &self.to_string());
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<TokenError> for ProxyError {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::Unavailable {
                credential,
                endpoint,
                cause,
                retry_after,
            } => Self::TokenUnavailable {
                credential: credential.to_string(),
                endpoint: endpoint.to_string(),
                cause,
                retry_after,
            },
            TokenError::UnknownCredential(name) => {
                Self::Internal(format!("route names unknown credential `{name}`"))
            }
        }
    }
}

/// The error and its sources, `: `-separated, for one log line.
pub struct Chain<'e>(pub &'e (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
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
        let response = ProxyError::TokenUnavailable {
            credential: "acme".into(),
            endpoint: "auth.example:443".into(),
            cause: FetchError::Status {
                status: 503,
                retry_after: None,
            },
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
    }
}
