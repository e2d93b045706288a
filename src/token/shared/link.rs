//! The connection to the fleet's Redis, which the sidecar never depends on: commands have a
//! short timeout, and after a failure the connection is dropped and Redis left alone for
//! [`RETRY`] — at most one connection attempt a second, however many requests come — during
//! which every sidecar goes on with its own cache. The next attempt after that reconnects, so
//! sharing resumes within about a second of Redis answering again. The degradation is logged
//! once, and so is the recovery; `token_sidecar_shared_cache_up` says which it is now.
//!
//! Which Redis: one server, the master that Sentinel names (asked again at every connection,
//! so a failover is followed by the next one, and logged), or a Cluster (the `redis` crate
//! routes by slot and follows a master's failover to its replica itself); over TLS with the
//! system roots and `[tls] ca_file`, hostnames verified, and a client certificate where one is
//! configured; as an ACL user whose password file is read again for each new connection.
//!
//! A failure is the link's only when it is the connection's (I/O, timeouts, refusals, a
//! server that refuses our user): a key holding the wrong type is that credential's problem,
//! and [`Failure::of`] keeps it from pausing the link for every credential.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisFuture, RedisResult,
    TlsCertificates, TlsMode,
};
use rustls::pki_types::CertificateDer;
use tokio::time::Instant;

use super::settings::{RedisSettings, Topology};
use crate::failure::Chain;
use crate::metrics::Metrics;
use crate::sync::lock;

/// After a failure, how long before the next connection attempt.
pub const RETRY: Duration = Duration::from_secs(1);

/// What a failed Redis command says about the link.
#[derive(Debug)]
pub enum Failure {
    /// The connection failed: go on without Redis for a while.
    Link(redis::RedisError),
    /// A key of one credential could not be used (the wrong type): that credential goes to its
    /// endpoint this time; nothing else changes.
    Key(redis::RedisError),
}

impl Failure {
    pub fn of(err: redis::RedisError) -> Self {
        let wrong_type =
            err.code() == Some("WRONGTYPE") || err.kind() == redis::ErrorKind::UnexpectedReturnType;
        if wrong_type {
            Self::Key(err)
        } else {
            Self::Link(err)
        }
    }
}

impl From<redis::RedisError> for Failure {
    fn from(err: redis::RedisError) -> Self {
        Self::of(err)
    }
}

/// A connection to the fleet's Redis, whichever kind it is.
#[derive(Clone)]
pub enum Connection {
    /// One server (standalone, or Sentinel's master), reconnected by us after a failure.
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

pub struct Link {
    redis: RedisSettings,
    /// The roots (PEM) TLS connections trust: the system's and `[tls] ca_file`.
    roots_pem: Vec<u8>,
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// No connection attempt before this.
    next_attempt: Mutex<Option<Instant>>,
    degraded: AtomicBool,
    /// The master Sentinel named last: a new one is a failover followed.
    master: Mutex<Option<String>>,
    /// Which seed node a cluster's subscription goes to next.
    next_seed: AtomicUsize,
    metrics: Metrics,
}

impl Link {
    pub fn new(
        redis: RedisSettings,
        extra_roots: &[CertificateDer<'static>],
        timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        metrics.shared_cache_up(true);
        let roots_pem = if redis.tls {
            crate::tls::system_and_extra_roots_pem(extra_roots)
        } else {
            Vec::new()
        };
        Self {
            redis,
            roots_pem,
            timeout,
            connection: tokio::sync::Mutex::new(None),
            next_attempt: Mutex::new(None),
            degraded: AtomicBool::new(false),
            master: Mutex::new(None),
            next_seed: AtomicUsize::new(0),
            metrics,
        }
    }

    /// A connection, unless Redis failed less than [`RETRY`] ago or cannot be reached now.
    pub async fn connection(&self) -> Option<Connection> {
        if self.resting() {
            return None;
        }
        let mut connection = self.connection.lock().await;
        if let Some(connection) = connection.as_ref() {
            return Some(connection.clone());
        }
        // Checked again under the lock: another caller may have just failed to connect.
        if self.resting() {
            return None;
        }
        match tokio::time::timeout(self.connect_timeout(), self.connect()).await {
            Ok(Ok(connected)) => {
                *connection = Some(connected.clone());
                Some(connected)
            }
            Ok(Err(err)) => {
                self.rest(&mut connection, &Chain(&err));
                None
            }
            Err(_) => {
                self.rest(&mut connection, &"connecting timed out");
                None
            }
        }
    }

    fn resting(&self) -> bool {
        lock(&self.next_attempt).is_some_and(|at| at > Instant::now())
    }

    /// A command failed on the connection: drop it, and leave Redis alone for [`RETRY`].
    pub async fn failed(&self, error: &redis::RedisError) {
        let mut connection = self.connection.lock().await;
        self.rest(&mut connection, &Chain(error));
    }

    fn rest(&self, connection: &mut Option<Connection>, error: &dyn std::fmt::Display) {
        *connection = None;
        self.metrics.shared_cache("redis_error");
        *lock(&self.next_attempt) = Some(Instant::now() + RETRY);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.metrics.shared_cache_up(false);
            tracing::warn!(error = %error, retry_in_ms = RETRY.as_millis() as u64, "the fleet's Redis is unavailable; this sidecar goes on with its own cache");
        }
    }

    /// Asks Redis whether it answers (a `PING`), connecting first if there is no connection —
    /// at most once a second, as any attempt. Run every [`RETRY`], it keeps the link's state
    /// true while no request needs Redis: a dead connection is dropped, and one to a restarted
    /// server (or a new Sentinel master) made, before the next request needs it.
    pub async fn check(&self) {
        let Some(mut connection) = self.connection().await else {
            return;
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.timeout, ping.query_async::<()>(&mut connection)).await {
            Ok(Ok(())) => self.succeeded(),
            Ok(Err(err)) => {
                if let Failure::Link(err) = Failure::of(err) {
                    self.failed(&err).await;
                }
            }
            Err(_) => {
                let mut connection = self.connection.lock().await;
                self.rest(&mut connection, &"PING timed out");
            }
        }
    }

    /// How long a connection (or a subscription) may take to be made.
    pub fn connect_timeout(&self) -> Duration {
        self.timeout * 4
    }

    /// A command succeeded: Redis is back if it was away.
    pub fn succeeded(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            self.metrics.shared_cache_up(true);
            tracing::info!("the fleet's Redis is back; sharing tokens again");
        }
    }

    /// One connection attempt, to whichever Redis the settings name.
    async fn connect(&self) -> RedisResult<Connection> {
        match &self.redis.topology {
            Topology::Standalone { .. } | Topology::Sentinel { .. } => {
                let client = self.server().await?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(0);
                Ok(Connection::Single(
                    client.get_connection_manager_with_config(config).await?,
                ))
            }
            Topology::Cluster { nodes } => {
                let nodes = nodes
                    .iter()
                    .map(|(host, port)| self.node(host, *port))
                    .collect::<RedisResult<Vec<_>>>()?;
                let mut builder = ClusterClientBuilder::new(nodes)
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .retries(1);
                if let Some(username) = &self.redis.username {
                    builder = builder.username(username);
                }
                if let Some(password) = self.redis.current_password() {
                    builder = builder.password(password.expose());
                }
                if self.redis.tls {
                    builder = builder.tls(TlsMode::Secure).certs(self.certificates());
                }
                Ok(Connection::Cluster(
                    builder.build()?.get_async_connection().await?,
                ))
            }
        }
    }

    /// A client of one server that takes commands and subscriptions: the standalone server,
    /// the master Sentinel names now, or (a Cluster's) the next seed node.
    pub async fn server(&self) -> RedisResult<Client> {
        match &self.redis.topology {
            Topology::Standalone { host, port } => self.client(host, *port),
            Topology::Sentinel {
                sentinels,
                master,
                password,
            } => self.sentinel_master(sentinels, master, password.as_ref()).await,
            Topology::Cluster { nodes } => {
                let (host, port) = &nodes[self.next_seed.fetch_add(1, Ordering::Relaxed) % nodes.len()];
                self.client(host, *port)
            }
        }
    }

    async fn sentinel_master(
        &self,
        sentinels: &[(String, u16)],
        master: &str,
        password: Option<&crate::secret::SecretSource>,
    ) -> RedisResult<Client> {
        let addresses = sentinels.iter().map(|(host, port)| self.address(host, *port));
        let mut builder = SentinelClientBuilder::new(addresses, master, SentinelServerType::Master)?
            .set_client_to_redis_db(self.redis.db);
        if let Some(username) = &self.redis.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = self.redis.current_password() {
            builder = builder.set_client_to_redis_password(password.expose());
        }
        if let Some(password) = password.and_then(|password| password.current().ok()) {
            builder = builder.set_client_to_sentinel_password(password.expose());
        }
        if self.redis.tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_redis_certificates(self.certificates())
                .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_certificates(self.certificates());
        }
        let client = builder.build()?.async_get_client().await?;
        self.note_master(client.get_connection_info().addr());
        Ok(client)
    }

    /// Logs and counts a master other than the last one Sentinel named: a failover followed.
    fn note_master(&self, addr: &ConnectionAddr) {
        let now = match addr {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                format!("{host}:{port}")
            }
            other => format!("{other:?}"),
        };
        let before = lock(&self.master).replace(now.clone());
        if let Some(before) = before.filter(|before| *before != now) {
            self.metrics.shared_cache("failover");
            tracing::info!(from = %before, to = %now, "the fleet's Redis master moved (a Sentinel failover); following it");
        }
    }

    /// A client of `host:port`, as the settings say (TLS, user, password as it is now, db).
    fn client(&self, host: &str, port: u16) -> RedisResult<Client> {
        let info = self.node(host, port)?;
        if self.redis.tls {
            Client::build_with_tls(info, self.certificates())
        } else {
            Client::open(info)
        }
    }

    fn node(&self, host: &str, port: u16) -> RedisResult<redis::ConnectionInfo> {
        let mut settings = RedisConnectionInfo::default().set_db(self.redis.db);
        if let Some(username) = &self.redis.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = self.redis.current_password() {
            settings = settings.set_password(password.expose());
        }
        Ok(self
            .address(host, port)
            .into_connection_info()?
            .set_redis_settings(settings))
    }

    fn address(&self, host: &str, port: u16) -> ConnectionAddr {
        if self.redis.tls {
            ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_owned(), port)
        }
    }

    fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self.redis.client_identity.as_ref().map(|identity| {
                let (cert, key) = identity.pem();
                redis::ClientTlsConfig {
                    client_cert: cert.expose().as_bytes().to_vec(),
                    client_key: key.expose().as_bytes().to_vec(),
                }
            }),
            root_cert: Some(self.roots_pem.clone()),
        }
    }
}
