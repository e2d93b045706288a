//! What the token side is configured with, as validated types: a provider (how to reach one
//! token endpoint and read its answer), a credential (one merchant at one provider: one cached
//! token) and the cache's settings. `config` builds them; nothing here reads a config file.

use std::sync::Arc;
use std::time::Duration;

use super::budget::FetchRate;
use super::dialect::{Identity, ResponseSpec, TokenRequest};
use super::lifetime::RefreshPolicy;
use crate::tls::ClientIdentity;

/// How to reach one token endpoint.
#[derive(Debug, Clone)]
pub struct ProviderSpec {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    /// Mutual TLS to the token endpoint.
    pub client_identity: Option<Arc<ClientIdentity>>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// How to read the token endpoint's answer.
    pub response: ResponseSpec,
    /// `max_fetch_rate` / `max_fetch_burst`: how fast its endpoint may be asked.
    pub budget: Option<FetchRate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OAuth2,
    Nuapay,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OAuth2 => "oauth2",
            Self::Nuapay => "nuapay",
        }
    }
}

/// One merchant's identity at one provider: one cached token.
#[derive(Debug, Clone)]
pub struct CredentialSpec {
    pub name: Arc<str>,
    /// What the token depends on, hashed ([`crate::token::dialect::credential_identity`]): the
    /// token cache's key.
    pub identity: Identity,
    pub provider: Arc<ProviderSpec>,
    pub request: TokenRequest,
    pub prefetch: bool,
    /// Revoke this credential's token at shutdown (Nuapay long-lived tokens):
    /// `POST {request.url}/{token id}/revoke`.
    pub revoke_on_shutdown: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub refresh: RefreshPolicy,
    /// First pause after a failed token fetch; it doubles per consecutive failure.
    pub failure_backoff: Duration,
    pub max_failure_backoff: Duration,
    /// While requests wait for a failing credential's token, the longest between two probes
    /// of its endpoint (unless the provider said when to come back).
    pub max_probe_interval: Duration,
    /// How long a waiting request's fetch may keep retrying retryable failures.
    pub retry_budget: Duration,
    /// Token fetches in flight at once, across all credentials.
    pub max_concurrent_fetches: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            refresh: RefreshPolicy::default(),
            failure_backoff: Duration::from_secs(1),
            max_failure_backoff: Duration::from_secs(60),
            max_probe_interval: Duration::from_secs(5),
            retry_budget: Duration::from_secs(2),
            max_concurrent_fetches: 8,
        }
    }
}

#[cfg(test)]
impl CredentialSpec {
    /// A credential the tests tell apart by `name` and `identity`, at an endpoint no test
    /// reaches (a stand-in source answers instead).
    pub fn for_test(name: &str, identity: &str) -> Arc<Self> {
        use super::dialect::{BodyEncoding, TokenRequest};
        Arc::new(Self {
            name: name.into(),
            identity: Identity::named(identity),
            provider: Arc::new(ProviderSpec {
                name: "p".into(),
                kind: ProviderKind::OAuth2,
                client_identity: None,
                connect_timeout: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                response: ResponseSpec::oauth2(),
                budget: None,
            }),
            request: TokenRequest {
                url: Arc::new("https://auth.test/token".parse().expect("a URL")),
                encoding: BodyEncoding::Form,
                fields: vec![],
                authorization: None,
                secrets: vec![],
                assertion: None,
                dpop: None,
            },
            prefetch: false,
            revoke_on_shutdown: false,
        })
    }
}
