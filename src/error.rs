//! The errors the sidecar itself answers with, as the contract's JSON:
//! `{"error":{"code":"…","message":"…"}}` plus `x-token-sidecar-error: <code>`, so they cannot be
//! mistaken for the upstream's. Messages name routes and credentials, never tokens or secrets.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::token::cache::TokenError;

/// Errors from any body we stream through.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of everything the sidecar sends and receives.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub const ERROR_HEADER: &str = "x-token-sidecar-error";

/// Everything that stops a request from reaching (or coming back from) its upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("{0}")]
    UnknownCredential(String),
    #[error(
        "CONNECT is not supported: HTTPS cannot be injected; send plain http:// requests to the sidecar"
    )]
    ConnectNotSupported,
    #[error("no usable token for credential `{credential}`: {cause}")]
    TokenUnavailable {
        credential: String,
        cause: String,
        retry_after: Duration,
    },
    #[error("upstream {upstream} unreachable: {cause}")]
    UpstreamUnreachable { upstream: String, cause: String },
    #[error("upstream {upstream} sent no response within {timeout:?}")]
    UpstreamTimeout { upstream: String, timeout: Duration },
    #[error("request body could not be read: {0}")]
    RequestBody(String),
    #[error("missing or wrong {0} header")]
    Forbidden(String),
    #[error("request body is larger than the {limit} bytes allowed")]
    BodyTooLarge { limit: u64 },
    #[error("request headers are larger than the {limit} bytes allowed")]
    HeadersTooLarge { limit: usize },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::UnknownCredential(_) => StatusCode::BAD_REQUEST,
            Self::ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            Self::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestBody(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::UnknownCredential(_) => "unknown_credential",
            Self::ConnectNotSupported => "method_not_allowed",
            Self::TokenUnavailable { .. } => "token_unavailable",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::RequestBody(_) => "bad_request",
            Self::Forbidden(_) => "forbidden",
            Self::BodyTooLarge { .. } | Self::HeadersTooLarge { .. } => "request_too_large",
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
                cause,
                retry_after,
            } => Self::TokenUnavailable {
                credential: credential.to_string(),
                cause: cause.to_string(),
                retry_after,
            },
            TokenError::UnknownCredential(name) => {
                Self::Internal(format!("route names unknown credential `{name}`"))
            }
        }
    }
}

/// A sidecar JSON error response.
pub fn error_response(status: StatusCode, code: &'static str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
    response
}

/// A complete in-memory body.
pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
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
            cause: "token endpoint answered 503".into(),
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
    }
}
