//! Why a token could not be had, classified for retry decisions and summarised without secrets.

use std::time::Duration;

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
    /// Any other non-2xx status.
    #[error("token endpoint answered {status}")]
    Status { status: u16 },
    /// 2xx, but not an answer we can use.
    #[error("token endpoint answer unusable: {reason}")]
    Malformed { reason: &'static str },
    #[error("token endpoint timed out")]
    Timeout,
    #[error("token endpoint unreachable: {reason}")]
    Unreachable { reason: String },
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
        }
    }

    /// How long the endpoint asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// A safe one-word reason from an error body: the OAuth `error` code or Nuapay's `returnCode`,
/// and only when it looks like a code (never free text, which may echo what we sent).
pub fn error_code_from_body(body: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = json
        .get("error")
        .and_then(|e| e.as_str())
        .or_else(|| json.get("returnCode").and_then(|c| c.as_str()))?;
    let looks_like_code = !code.is_empty()
        && code.len() <= 40
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    looks_like_code.then(|| code.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauth_error_code_is_kept_but_description_is_not() {
        let body = br#"{"error":"invalid_client","error_description":"secret s3cr3t is wrong"}"#;
        assert_eq!(error_code_from_body(body).as_deref(), Some("invalid_client"));
        let err = FetchError::Rejected {
            status: 401,
            reason: error_code_from_body(body),
        };
        assert_eq!(
            err.to_string(),
            "token endpoint rejected the credentials (401: invalid_client)"
        );
    }

    #[test]
    fn free_text_in_error_field_is_dropped() {
        assert_eq!(
            error_code_from_body(br#"{"error":"client s3cr3t not valid"}"#),
            None
        );
        assert_eq!(
            error_code_from_body(br#"{"returnCode":"40000"}"#).as_deref(),
            Some("40000")
        );
        assert_eq!(error_code_from_body(b"<html>"), None);
    }
}
