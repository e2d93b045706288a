//! What a configuration becomes when it runs — the token endpoint clients, the fleet's shared
//! tier in front of them, the upstream clients — built by one function for start-up and for
//! every reload ([`Loaded::build`]), which keeps the previous build's clients (and their pooled
//! connections) where their settings did not change. [`Loaded::snapshot`] turns it into what
//! requests are served with.

use std::sync::Arc;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::forward::Upstreams;
use crate::metrics::Metrics;
use crate::proxy::{RequestGuards, Snapshot};
use crate::route::Router;
use crate::tls::TlsError;
use crate::token::cache::Credentials;
use crate::token::fetch::{ClientError, TokenFetcher};
use crate::token::shared::SharedTier;
use crate::token::source::TokenSource;

/// Why a configuration could not be put to work (it was valid: these are the clients).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the TLS settings cannot be used")]
    Tls(#[from] TlsError),
    #[error("the token endpoint client cannot be built")]
    TokenClient(#[from] ClientError),
}

/// The running configuration and what was built from it.
pub struct Loaded {
    pub config: Config,
    /// The token endpoint clients, one per provider.
    fetcher: Arc<TokenFetcher>,
    /// The fleet's shared tier in front of them, with `[cache.shared]`.
    shared: Option<Arc<SharedTier>>,
    upstreams: Upstreams,
}

impl Loaded {
    /// Builds what `config` needs to serve, keeping what `previous` built wherever its
    /// settings did not change. The shared tier is built once, at start-up: `[cache.shared]`
    /// changes need a restart (the reload says so), so a reload puts the running tier in front
    /// of the new endpoint clients.
    pub fn build(
        config: Config,
        previous: Option<&Loaded>,
        clock: &SharedClock,
        metrics: &Metrics,
    ) -> Result<Self, BuildError> {
        // Either changes every client: the roots they trust, the way out they take.
        let reusable = previous.filter(|previous| {
            previous.config.extra_roots == config.extra_roots && previous.config.egress == config.egress
        });
        let fetcher = Arc::new(TokenFetcher::rebuilt(
            &config.providers,
            &config.extra_roots,
            config.egress.as_ref(),
            (clock.clone(), metrics.clone()),
            reusable.map(|previous| &*previous.fetcher),
        )?);
        let upstreams = Upstreams::build(
            &config.routes,
            &config.extra_roots,
            config.egress.as_ref(),
            reusable.map(|previous| &previous.upstreams),
        )?;
        let shared = match (previous, &config.shared) {
            (Some(previous), _) => previous
                .shared
                .as_ref()
                .map(|shared| Arc::new(shared.with_inner(fetcher.clone(), config.cache))),
            (None, Some(settings)) => Some(Arc::new(SharedTier::new(
                settings,
                &config.extra_roots,
                config.cache,
                fetcher.clone(),
                clock.clone(),
                metrics.clone(),
            ))),
            (None, None) => None,
        };
        Ok(Self {
            config,
            fetcher,
            shared,
            upstreams,
        })
    }

    /// Where the token cache gets tokens it does not hold: the fleet's tier, else the endpoints.
    pub fn source(&self) -> Arc<dyn TokenSource> {
        match &self.shared {
            Some(shared) => shared.clone(),
            None => self.fetcher.clone(),
        }
    }

    /// What requests are served with, `credentials` being this configuration's as the token
    /// cache holds them.
    pub fn snapshot(&self, credentials: Credentials) -> Snapshot {
        let server = &self.config.server;
        Snapshot {
            guards: RequestGuards::from_settings(server),
            router: Router::new(&self.config.routes, &server.allowed_hosts),
            credentials,
            upstreams: self.upstreams.clone(),
            access_log: server.access_log,
        }
    }
}
