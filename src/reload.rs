//! Reload: re-read the config file, validate it exactly as `check` does, build it as start-up
//! does ([`Loaded::build`], keeping the clients whose settings did not change), and swap it in
//! — the credentials (an unchanged identity keeps its token) and the request snapshot holding
//! them in one step, the removed identities' tokens dropped after. Invalid → nothing changes.
//! Triggered by `SIGHUP`, `POST /config/reload`, and [`watch`]ed file changes.

pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use crate::clock::SharedClock;
use crate::config::{Config, ConfigError};
use crate::failure::Chain;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::running::{BuildError, Loaded};
use crate::token::cache::TokenCache;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the sidecar was started without a config file: there is nothing to reload")]
    NoFile,
    #[error("the config has problems; the old one keeps serving")]
    Invalid(#[source] ConfigError),
    #[error("the new config cannot be put to work; the old one keeps serving")]
    Build(#[source] BuildError),
}

impl ReloadError {
    /// The problems, one `file:line: key: message` line each (as `check` prints them).
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Invalid(err) => err.to_string().lines().map(str::to_owned).collect(),
            Self::NoFile | Self::Build(_) => vec![],
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

/// Reloads the sidecar's configuration; one reload at a time.
pub struct Reloader {
    path: Option<PathBuf>,
    current: tokio::sync::Mutex<Loaded>,
    /// Successful reloads so far (the watcher follows what others reloaded).
    reloads: std::sync::atomic::AtomicU64,
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
            reloads: std::sync::atomic::AtomicU64::new(0),
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

    /// How many reloads succeeded so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Acquire)
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
                tracing::warn!(error = %Chain(err), "configuration not reloaded");
            }
        }
        outcome
    }

    async fn try_reload(&self) -> Result<Reloaded, ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let mut current = self.current.lock().await;
        let config = Config::load(path).map_err(ReloadError::Invalid)?;
        warn_about_restart_only_changes(&current.config, &config);
        let loaded =
            Loaded::build(config, Some(&current), &self.clock, &self.metrics).map_err(ReloadError::Build)?;
        let credentials = self.tokens.prepare(&loaded.config.credentials, loaded.source());
        // One step for requests: nothing between the cache's credentials and the snapshot that
        // holds them (a request on the old snapshot keeps the old credentials, and shares
        // their fetches).
        let replaced = self.tokens.install(&credentials, loaded.config.cache);
        self.proxy.swap(loaded.snapshot(credentials));
        let applied = replaced.applied();
        tracing::info!(kept = ?applied.kept, changed = ?applied.changed, removed = ?applied.removed, "credentials after the reload");
        // Revoking can take a while, and requests no longer wait for it.
        let tokens = self.tokens.clone();
        tokio::spawn(async move { tokens.retire(replaced).await });
        let config = &loaded.config;
        self.metrics.config_loaded(&config.version);
        let reloaded = Reloaded {
            routes: config.routes.len(),
            credentials: config.credentials.len(),
            version: config.version.clone(),
        };
        *current = loaded;
        self.reloads.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
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
            "server.metrics_listen",
            old_server.metrics_listen != new_server.metrics_listen,
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
        ("telemetry", old.telemetry != new.telemetry),
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
