//! Where the cache gets a token it does not hold: one small interface between the local store
//! and the token endpoint ([`TokenFetcher`]), so that a shared tier — a fleet's cache — can wrap
//! the endpoint without the cache knowing, and tests can stand in for both without sockets.

use std::future::Future;
use std::pin::Pin;

use super::dialect::IssuedToken;
use super::error::FetchError;
use super::fetch::TokenFetcher;
use crate::config::CredentialSpec;

/// What a [`TokenSource`] call returns.
pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, FetchError>> + Send + 'a>>;

/// A source of tokens for the cache. The cache calls it with at most one call in flight per
/// credential identity, and does the retrying and the back-off itself.
pub trait TokenSource: Send + Sync {
    /// One attempt at a token for `credential`.
    fn fetch<'a>(&'a self, credential: &'a CredentialSpec) -> SourceFuture<'a, IssuedToken>;

    /// Revokes the token the provider knows as `token_id` (Nuapay long-lived tokens).
    fn revoke<'a>(&'a self, credential: &'a CredentialSpec, token_id: &'a str) -> SourceFuture<'a, ()>;
}

impl TokenSource for TokenFetcher {
    fn fetch<'a>(&'a self, credential: &'a CredentialSpec) -> SourceFuture<'a, IssuedToken> {
        Box::pin(TokenFetcher::fetch(self, credential))
    }

    fn revoke<'a>(&'a self, credential: &'a CredentialSpec, token_id: &'a str) -> SourceFuture<'a, ()> {
        Box::pin(TokenFetcher::revoke(self, credential, token_id))
    }
}
