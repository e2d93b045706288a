//! Listeners and lifecycle: builds the sidecar from a [`Config`], serves the proxy and admin
//! listeners, prefetches tokens, and shuts down gracefully on SIGINT/SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, AdminState};
use crate::body::ProxyBody;
use crate::clock::SharedClock;
use crate::config::{Config, ServerSettings};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::{self, Reloader};
use crate::running::{BuildError, Loaded};
use crate::token::cache::TokenCache;

mod connection;

/// How long open requests may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// HTTP/2 connections are pinged this often; a peer that does not answer within the timeout
/// is dropped.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits on the connections one listener serves.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A new connection must deliver its first request head within this long.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl ConnectionLimits {
    pub fn from_settings(settings: &crate::config::ServerSettings) -> Self {
        Self {
            header_read_timeout: settings.header_read_timeout,
            idle_timeout: settings.idle_timeout,
            max_connections: settings.max_connections,
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot catch shutdown signals")]
    Signals(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A request handler: what a listener calls for each request (its body boxed at the
/// connection's edge, so that handlers can be driven in-process).
pub type Handler = Arc<dyn Fn(Request<ProxyBody>) -> BoxedResponse + Send + Sync>;
pub type BoxedResponse = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// A started sidecar.
pub struct RunningSidecar {
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub tokens: Arc<TokenCache>,
    pub metrics: Metrics,
    pub reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningSidecar {
    /// Stops accepting, lets open requests finish (up to a grace period), revokes the tokens
    /// that ask for it, and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.tokens.revoke_on_shutdown().await;
    }
}

/// Binds the listeners and starts serving; returns once both listen. Without a config file,
/// there is nothing to reload.
pub async fn start(config: Config, clock: SharedClock) -> Result<RunningSidecar, StartError> {
    start_from(config, None, clock).await
}

/// [`start`] for a config read from `path`: `POST /config/reload`, `SIGHUP` (with [`run`])
/// and changes to the file and the files it references reload it.
pub async fn start_from(
    config: Config,
    path: Option<PathBuf>,
    clock: SharedClock,
) -> Result<RunningSidecar, StartError> {
    start_with(config, path, clock, Metrics::new()).await
}

/// [`start_from`], counting into `metrics` (which the trace exporter, started before it,
/// counts its dropped spans into too).
pub async fn start_with(
    config: Config,
    path: Option<PathBuf>,
    clock: SharedClock,
    metrics: Metrics,
) -> Result<RunningSidecar, StartError> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let loaded = Loaded::build(config, None, &clock, &metrics)?;
    let (settings, routes) = (loaded.config.server.clone(), loaded.config.routes.len());
    let watching = path.is_some() && settings.watch_config;
    let tokens = TokenCache::new(
        &loaded.config.credentials,
        loaded.source(),
        loaded.config.cache,
        clock.clone(),
        metrics.clone(),
    );
    let proxy = Arc::new(Proxy::new(
        loaded.snapshot(tokens.credentials()),
        tokens.clone(),
        metrics.clone(),
    ));
    let reloader = Arc::new(Reloader::new(
        path,
        loaded,
        proxy.clone(),
        tokens.clone(),
        metrics.clone(),
        clock,
    ));

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let proxy_handler: Handler = Arc::new(move |request| Box::pin(proxy.clone().handle(request)));
    let proxy_addr = listen(
        &settings,
        settings.listen,
        proxy_handler,
        Some(&metrics),
        &shutdown_rx,
        &mut tasks,
    )
    .await?;
    if !proxy_addr.ip().is_loopback() {
        tracing::warn!(%proxy_addr, "listening beyond loopback (allow_non_loopback): anyone who reaches this address acts as your merchants");
    }
    let admin = Arc::new(AdminState::new(
        tokens.clone(),
        metrics.clone(),
        reloader.clone(),
        &settings,
    ));
    let admin_addr = match settings.admin_listen {
        Some(addr) => {
            let state = admin.clone();
            let admin_handler: Handler =
                Arc::new(move |request| Box::pin(admin::handle(state.clone(), request)));
            Some(listen(&settings, addr, admin_handler, None, &shutdown_rx, &mut tasks).await?)
        }
        None => None,
    };
    let metrics_addr = match settings.metrics_listen {
        Some(addr) => {
            let scrape_handler: Handler =
                Arc::new(move |request| Box::pin(admin::scrape(admin.clone(), request)));
            Some(listen(&settings, addr, scrape_handler, None, &shutdown_rx, &mut tasks).await?)
        }
        None => None,
    };
    tasks.push(tokio::spawn(tokens.clone().run_refresher(shutdown_rx.clone())));
    if watching {
        tasks.push(tokio::spawn(reload::watch::run(reloader.clone(), shutdown_rx)));
    }
    tokens.prefetch();
    tracing::info!(%proxy_addr, admin_addr = ?admin_addr, metrics_addr = ?metrics_addr, routes, "token-sidecar listening");
    Ok(RunningSidecar {
        proxy_addr,
        admin_addr,
        metrics_addr,
        tokens,
        metrics,
        reloader,
        shutdown,
        tasks,
    })
}

/// Binds `addr` and serves `handler` there on a task of its own; the address bound.
async fn listen(
    settings: &ServerSettings,
    addr: SocketAddr,
    handler: Handler,
    metrics: Option<&Metrics>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<SocketAddr, StartError> {
    let listener = bind(addr).await?;
    let bound = local_addr(&listener, addr);
    let limits = ConnectionLimits::from_settings(settings);
    let serving = serve(
        listener,
        None,
        handler,
        shutdown.clone(),
        limits,
        metrics.cloned(),
    );
    tasks.push(tokio::spawn(serving));
    Ok(bound)
}

/// Serves the config read from `path` until SIGINT or SIGTERM, then shuts down gracefully;
/// SIGHUP reloads it.
pub async fn run(
    config: Config,
    path: PathBuf,
    clock: SharedClock,
    metrics: Metrics,
) -> Result<(), StartError> {
    let mut signals = Signals::install().map_err(StartError::Signals)?;
    let running = start_with(config, Some(path), clock, metrics).await?;
    while signals.next().await == Signal::Reload {
        let _ = running.reloader.reload().await;
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT or SIGTERM.
    Shutdown,
    /// SIGHUP.
    Reload,
}

/// SIGINT, SIGTERM and SIGHUP, caught from the moment this is created, so that a signal
/// arriving while the sidecar starts is not lost (nor kills it without a graceful shutdown).
pub struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    #[cfg(not(unix))]
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {})
    }

    /// The next signal.
    pub async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Shutdown,
            _ = self.terminate.recv() => Signal::Shutdown,
            _ = self.hangup.recv() => Signal::Reload,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Shutdown
        }
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

/// Accepts connections until `shutdown` turns true, serving HTTP/1.1 and HTTP/2 (over TLS
/// when `tls` is given), then lets open connections finish within the grace period.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Handler,
    shutdown: watch::Receiver<bool>,
    limits: ConnectionLimits,
    metrics: Option<Metrics>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let shared = connection::Shared {
        builder: http_builder(&limits),
        handler,
        limits,
        at_cap: {
            let slots = slots.clone();
            Arc::new(move || slots.available_permits() == 0)
        },
        pressure: Arc::new(tokio::sync::Notify::new()),
    };
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        let (stream, slot) = tokio::select! {
            accepted = accept(&listener, &slots, &shared.pressure) => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        while connections.try_join_next().is_some() {}
        let (shared, tls, metrics, shutdown) =
            (shared.clone(), tls.clone(), metrics.clone(), shutdown.clone());
        connections.spawn(async move {
            let _ = stream.set_nodelay(true);
            if let Some(metrics) = &metrics {
                metrics.connection_opened();
            }
            match tls {
                None => connection::serve(stream, shared, shutdown).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => connection::serve(stream, shared, shutdown).await,
                        Ok(Err(err)) => tracing::debug!(error = %err, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            if let Some(metrics) = &metrics {
                metrics.connection_closed();
            }
            drop(slot);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!("open connections did not finish within the grace period");
    }
}

/// hyper's HTTP/1 and HTTP/2 settings for a listener: head read timeout, HTTP/2 pings.
fn http_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// Waits for a free connection slot, then for a connection. When none is free, idle
/// connections are told to make room.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
    pressure: &tokio::sync::Notify,
) -> std::io::Result<(TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    let slot = match slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            pressure.notify_waiters();
            slots
                .clone()
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?
        }
    };
    let (stream, _) = listener.accept().await?;
    Ok((stream, slot))
}
