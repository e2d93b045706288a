//! Where the cache gets a token it does not hold: one small interface between the local store
//! and the token endpoint ([`TokenFetcher`]), so that a shared tier — a fleet's cache — can wrap
//! the endpoint without the cache knowing, and tests can stand in for both without sockets.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::broadcast;

use super::dialect::IssuedToken;
use super::error::FetchError;
use super::fetch::TokenFetcher;
use crate::secret::AccessToken;
use crate::token::spec::CredentialSpec;

/// Why a token is being fetched, for a source that keeps a back-off of its own (the fleet's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchContext {
    /// An admin's forced refresh: no back-off holds it.
    pub forced: bool,
    /// A request has no usable token and waits: a back-off the provider did not ask for
    /// yields to a probe after `max_probe_interval`.
    pub waiting: bool,
    /// Which part of the provider's fetch budget the fetch draws on.
    pub share: super::budget::Share,
    /// A token issued before this will not do (the replay after a refusal): a source that
    /// holds tokens (the fleet's) passes older ones over.
    pub issued_since: Option<std::time::SystemTime>,
}

/// What a [`TokenSource`] call returns.
pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, FetchError>> + Send + 'a>>;

/// A source of tokens for the cache. The cache calls it with at most one call in flight per
/// credential identity, and does the retrying and the back-off itself.
pub trait TokenSource: Send + Sync {
    /// One attempt at a token for `credential`.
    fn fetch<'a>(
        &'a self,
        credential: &'a CredentialSpec,
        context: FetchContext,
    ) -> SourceFuture<'a, IssuedToken>;

    /// Revokes the token the provider knows as `token_id` (Nuapay long-lived tokens), unless
    /// others still use it (a fleet's other sidecars).
    fn revoke<'a>(
        &'a self,
        credential: &'a CredentialSpec,
        token_id: &'a str,
    ) -> SourceFuture<'a, Revocation>;

    /// The upstream refused `token`: forget it wherever this source keeps tokens (a shared
    /// tier), unless it was already replaced. The endpoint keeps none.
    fn purge<'a>(&'a self, _credential: &'a CredentialSpec, _token: &'a AccessToken) -> SourceFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Tokens that others (a fleet's other sidecars) saw refused, as they are announced.
    fn refused_elsewhere(&self) -> Option<broadcast::Receiver<RefusedToken>> {
        None
    }

    /// Whether `refused` names `token`, this sidecar's token for `credential`.
    fn names(&self, _refused: &RefusedToken, _credential: &CredentialSpec, _token: &AccessToken) -> bool {
        false
    }
}

/// What became of a token asked to be revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// Other sidecars of the fleet still hold it (or the fleet could not be asked): it was
    /// dropped here and lives on until the last of them stops, or it expires.
    LeftToFleet,
}

/// A token another sidecar saw refused, named without being revealed: its credential's fleet
/// identity and a tag (an HMAC of the token under the fleet's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedToken {
    pub fleet_identity: String,
    pub tag: String,
}

impl TokenSource for TokenFetcher {
    fn fetch<'a>(
        &'a self,
        credential: &'a CredentialSpec,
        context: FetchContext,
    ) -> SourceFuture<'a, IssuedToken> {
        Box::pin(TokenFetcher::fetch(self, credential, context.share))
    }

    fn revoke<'a>(
        &'a self,
        credential: &'a CredentialSpec,
        token_id: &'a str,
    ) -> SourceFuture<'a, Revocation> {
        Box::pin(async move {
            TokenFetcher::revoke(self, credential, token_id).await?;
            Ok(Revocation::Revoked)
        })
    }
}
