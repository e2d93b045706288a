//! Reload: re-read the config file, validate it exactly as `check` does, and swap in what
//! changed — the request snapshot (routes, guards), the credentials (an unchanged identity keeps
//! its token), the clients (rebuilt only when their settings changed). Invalid → nothing
//! changes. Triggered by `SIGHUP`, `POST /config/reload`, and [`watch`]ed file changes.

pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use crate::clock::SharedClock;
use crate::config::{Config, ConfigError};
use crate::forward;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, RequestGuards, Snapshot};
use crate::route::Router;
use crate::tls;
use crate::token::cache::TokenCache;
use crate::token::fetch::TokenFetcher;
use crate::token::shared::SharedTier;
use crate::token::source::TokenSource;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the sidecar was started without a config file: there is nothing to reload")]
    NoFile,
    #[error("the config has problems; the old one keeps serving")]
    Invalid(#[source] ConfigError),
    #[error("the new TLS settings cannot be used; the old config keeps serving")]
    Tls(#[source] tls::TlsError),
    #[error("the token endpoint client cannot be built; the old config keeps serving")]
    TokenClient(#[source] crate::token::fetch::ClientError),
}

impl ReloadError {
    /// The problems, one `file:line: key: message` line each (as `check` prints them).
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Invalid(err) => err.to_string().lines().map(str::to_owned).collect(),
            Self::NoFile | Self::Tls(_) | Self::TokenClient(_) => vec![],
        }
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub routes: usize,
    pub credentials: usize,
    /// The loaded config's version (see [`Config::version`]).
    pub version: String,
}

/// The running configuration, and what was built from it that a reload may reuse.
pub struct Loaded {
    pub config: Config,
    pub tls: rustls::ClientConfig,
    /// The token endpoint clients, one per provider.
    pub fetcher: Arc<TokenFetcher>,
    /// The fleet's shared tier in front of them, with `[cache.shared]`.
    pub shared: Option<Arc<SharedTier>>,
}

/// Reloads the sidecar's configuration; one reload at a time.
pub struct Reloader {
    path: Option<PathBuf>,
    current: tokio::sync::Mutex<Loaded>,
    proxy: Arc<Proxy>,
    tokens: Arc<TokenCache>,
    metrics: Metrics,
    clock: SharedClock,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        loaded: Loaded,
        proxy: Arc<Proxy>,
        tokens: Arc<TokenCache>,
        metrics: Metrics,
        clock: SharedClock,
    ) -> Self {
        metrics.config_loaded(&loaded.config.version);
        Self {
            path,
            current: tokio::sync::Mutex::new(loaded),
            proxy,
            tokens,
            metrics,
            clock,
        }
    }

    /// The config file, if the sidecar was started from one.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// The files the running config read (itself included): what [`watch`] watches.
    pub async fn files(&self) -> Vec<PathBuf> {
        self.current.lock().await.config.files.clone()
    }

    /// Re-reads and applies the config file; logs and counts the outcome.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let outcome = self.try_reload().await;
        match &outcome {
            Ok(reloaded) => {
                self.metrics.config_reload("ok");
                tracing::info!(routes = reloaded.routes, credentials = reloaded.credentials, version = %reloaded.version, "configuration reloaded");
            }
            Err(ReloadError::Invalid(err)) => {
                self.metrics.config_reload("invalid");
                tracing::warn!("configuration not reloaded; the old one keeps serving:\n{err}");
            }
            Err(err) => {
                self.metrics.config_reload("error");
                tracing::warn!(error = %crate::error::Chain(err), "configuration not reloaded");
            }
        }
        outcome
    }

    async fn try_reload(&self) -> Result<Reloaded, ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let mut current = self.current.lock().await;
        let config = Config::load(path).map_err(ReloadError::Invalid)?;
        warn_about_restart_only_changes(&current.config, &config);

        // Either changes every client: the roots they trust, the way out they take.
        let tls_changed =
            config.extra_roots != current.config.extra_roots || config.egress != current.config.egress;
        let tls = if tls_changed {
            tls::client_config(&config.extra_roots, None).map_err(ReloadError::Tls)?
        } else {
            current.tls.clone()
        };
        let fetcher = TokenFetcher::rebuilt(
            &config.providers,
            &config.extra_roots,
            config.egress.as_ref(),
            self.clock.clone(),
            (!tls_changed).then_some(&*current.fetcher),
        )
        .map(Arc::new)
        .map_err(ReloadError::TokenClient)?;
        let running = self.proxy.current();
        let (client, previous) = if tls_changed {
            (
                forward::upstream_client(tls.clone(), config.egress.as_ref()),
                None,
            )
        } else {
            (running.client.clone(), Some(&running.identity_clients))
        };
        let identity_clients = forward::identity_clients(
            &config.routes,
            &config.extra_roots,
            config.egress.as_ref(),
            previous,
        )
        .map_err(ReloadError::Tls)?;

        let shared = current
            .shared
            .as_ref()
            .map(|shared| Arc::new(shared.with_inner(fetcher.clone(), config.cache)));
        let source: Arc<dyn TokenSource> = match &shared {
            Some(shared) => shared.clone(),
            None => fetcher.clone(),
        };
        let applied = self.tokens.apply(&config.credentials, source, config.cache).await;
        self.proxy.swap(Snapshot {
            guards: RequestGuards::from_settings(&config.server),
            router: Router::new(&config.routes, &config.server.allowed_hosts),
            client,
            identity_clients,
            access_log: config.server.access_log,
        });
        tracing::info!(kept = ?applied.kept, changed = ?applied.changed, removed = ?applied.removed, "credentials after the reload");
        self.metrics.config_loaded(&config.version);
        let reloaded = Reloaded {
            routes: config.routes.len(),
            credentials: config.credentials.len(),
            version: config.version.clone(),
        };
        *current = Loaded {
            config,
            tls,
            fetcher,
            shared,
        };
        Ok(reloaded)
    }
}

/// Settings that only take effect at start-up: logged, the rest of the change applies.
fn warn_about_restart_only_changes(old: &Config, new: &Config) {
    let (old_server, new_server) = (&old.server, &new.server);
    let changes = [
        ("server.listen", old_server.listen != new_server.listen),
        (
            "server.admin_listen",
            old_server.admin_listen != new_server.admin_listen,
        ),
        (
            "server.header_read_timeout",
            old_server.header_read_timeout != new_server.header_read_timeout,
        ),
        (
            "server.idle_timeout",
            old_server.idle_timeout != new_server.idle_timeout,
        ),
        (
            "server.max_connections",
            old_server.max_connections != new_server.max_connections,
        ),
        (
            "cache.max_concurrent_fetches",
            old.cache.max_concurrent_fetches != new.cache.max_concurrent_fetches,
        ),
        ("cache.shared", old.shared != new.shared),
    ];
    for (key, changed) in changes {
        if changed {
            tracing::warn!(
                key,
                "changed in the config file, but takes effect only after a restart"
            );
        }
    }
}
