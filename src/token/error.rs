//! Why a token could not be had, classified for retry decisions and summarised without secrets.

use std::time::Duration;

use crate::failure::Transport;

/// A failed token fetch. Every variant's text is safe to log and to show in `/tokens`: it
/// carries the endpoint's status and a short reason, never a body, a secret or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// 400/401/403: the endpoint refused our credentials or scopes; retrying soon will not help.
    #[error("token endpoint rejected the credentials ({status}{})", reason_suffix(.reason))]
    Rejected { status: u16, reason: Option<String> },
    /// 429: the endpoint asks us to slow down.
    #[error("token endpoint is rate limiting (429)")]
    RateLimited { retry_after: Option<Duration> },
    /// Any other non-2xx status; a 503 may say when to come back.
    #[error("token endpoint answered {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 2xx, but not an answer we can use.
    #[error("token endpoint answer unusable: {reason}")]
    Malformed { reason: &'static str },
    #[error("token endpoint timed out")]
    Timeout,
    /// The connection failed: our words for why (the library's are in the log only).
    #[error("token endpoint unreachable: {reason}")]
    Unreachable { reason: Transport },
    /// The request could not be made here (the configuration cannot express it).
    #[error("the token request could not be made: {reason}")]
    Unsendable { reason: &'static str },
    /// The provider's fetch budget (`max_fetch_rate`) has no slot within the longest a fetch
    /// waits; the endpoint was not asked.
    #[error("token fetches to this endpoint are throttled by max_fetch_rate")]
    Throttled { retry_after: Duration },
    /// The fetch's task ended before the fetch did (it panicked): nothing was asked or learnt.
    #[error("the token fetch stopped before it finished")]
    Aborted,
    /// Another sidecar of the fleet failed and the fleet backs off (`[cache.shared]`): what
    /// kind of failure, never any text read from Redis.
    #[error("{failure} (the fleet backs off)")]
    FleetBackoff {
        failure: FleetFailure,
        retry_after: Option<Duration>,
    },
}

/// A fetch failure as the fleet shares it: its kind and status, no text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FleetFailure {
    RateLimited,
    Status(u16),
    Malformed,
    Timeout,
    Unreachable,
    /// Anything else (the request could not be made, the fetch stopped).
    Other,
}

impl std::fmt::Display for FleetFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RateLimited => f.write_str("token endpoint is rate limiting (429)"),
            Self::Status(status) => write!(f, "token endpoint answered {status}"),
            Self::Malformed => f.write_str("token endpoint answer unusable"),
            Self::Timeout => f.write_str("token endpoint timed out"),
            Self::Unreachable => f.write_str("token endpoint unreachable"),
            Self::Other => f.write_str("token fetch failed"),
        }
    }
}

impl FleetFailure {
    /// What the fleet is told of `error` (a rejection is shared as itself, see the shared tier).
    pub fn of(error: &FetchError) -> Self {
        match error {
            FetchError::RateLimited { .. } => Self::RateLimited,
            FetchError::Status { status, .. } => Self::Status(*status),
            FetchError::Malformed { .. } => Self::Malformed,
            FetchError::Timeout => Self::Timeout,
            FetchError::Unreachable { .. } => Self::Unreachable,
            FetchError::FleetBackoff { failure, .. } => *failure,
            FetchError::Rejected { .. }
            | FetchError::Unsendable { .. }
            | FetchError::Throttled { .. }
            | FetchError::Aborted => Self::Other,
        }
    }
}

fn reason_suffix(reason: &Option<String>) -> String {
    reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
}

impl FetchError {
    pub fn malformed(reason: &'static str) -> Self {
        Self::Malformed { reason }
    }

    /// A short label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Rejected { .. } => "rejected",
            Self::RateLimited { .. } => "rate_limited",
            Self::Status { .. } => "error_status",
            Self::Malformed { .. } => "malformed",
            Self::Timeout => "timeout",
            Self::Unreachable { .. } => "unreachable",
            Self::Unsendable { .. } => "unsendable",
            Self::Throttled { .. } => "throttled",
            Self::Aborted => "aborted",
            Self::FleetBackoff { .. } => "fleet_backoff",
        }
    }

    /// How long the endpoint asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after }
            | Self::Status { retry_after, .. }
            | Self::FleetBackoff { retry_after, .. } => *retry_after,
            Self::Throttled { retry_after } => Some(*retry_after),
            Self::Rejected { .. }
            | Self::Malformed { .. }
            | Self::Timeout
            | Self::Unreachable { .. }
            | Self::Unsendable { .. }
            | Self::Aborted => None,
        }
    }
}

/// The error codes of RFC 6749 §5.2, RFC 6750 §3.1, RFC 8707 and RFC 9449: the only strings
/// from an OAuth error body that are passed on.
const OAUTH_ERROR_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_token",
    "insufficient_scope",
    "access_denied",
    "server_error",
    "temporarily_unavailable",
    "invalid_target",
    "invalid_dpop_proof",
    "use_dpop_nonce",
];

/// Whether `reason` is one a rejection may carry: a standard OAuth code or a short number.
pub fn is_safe_reason(reason: &str) -> bool {
    OAUTH_ERROR_CODES.contains(&reason) || is_numeric_code(reason)
}

fn is_numeric_code(code: &str) -> bool {
    (1..=6).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit())
}

/// A safe reason from an error body: a standard OAuth `error` code, or Nuapay's numeric
/// `returnCode` (`"40000"`), and never one equal to or containing any of `secrets` — an
/// endpoint may echo what we sent, so free text is never passed on.
pub fn error_code_from_body(body: &[u8], secrets: &[&str]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = match (json.get("error"), json.get("returnCode")) {
        (Some(serde_json::Value::String(code)), _) if OAUTH_ERROR_CODES.contains(&code.as_str()) => code,
        (_, Some(serde_json::Value::String(code))) if is_numeric_code(code) => code,
        _ => return None,
    };
    let echoes_a_secret = secrets
        .iter()
        .any(|secret| !secret.is_empty() && (code.contains(secret) || secret.contains(code.as_str())));
    (!echoes_a_secret).then(|| code.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauth_error_code_is_kept_but_description_is_not() {
        let body = br#"{"error":"invalid_client","error_description":"secret s3cr3t is wrong"}"#;
        assert_eq!(error_code_from_body(body, &[]).as_deref(), Some("invalid_client"));
        let err = FetchError::Rejected {
            status: 401,
            reason: error_code_from_body(body, &[]),
        };
        assert_eq!(
            err.to_string(),
            "token endpoint rejected the credentials (401: invalid_client)"
        );
    }

    #[test]
    fn free_text_in_error_field_is_dropped() {
        assert_eq!(
            error_code_from_body(br#"{"error":"client s3cr3t not valid"}"#, &[]),
            None
        );
        assert_eq!(
            error_code_from_body(br#"{"returnCode":"40000"}"#, &[]).as_deref(),
            Some("40000")
        );
        assert_eq!(error_code_from_body(b"<html>", &[]), None);
    }

    #[test]
    fn an_echoed_secret_that_looks_like_a_code_is_dropped() {
        let echo = br#"{"error":"Sup3rSecretValue42"}"#;
        assert_eq!(error_code_from_body(echo, &["Sup3rSecretValue42"]), None);
        assert_eq!(error_code_from_body(echo, &[]), None, "not a standard code");
        let numeric = br#"{"returnCode":"424242"}"#;
        assert_eq!(error_code_from_body(numeric, &["424242"]), None);
        let standard = br#"{"error":"invalid_scope"}"#;
        assert_eq!(
            error_code_from_body(standard, &["other-secret"]).as_deref(),
            Some("invalid_scope")
        );
    }
}
