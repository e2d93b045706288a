//! `[cache.shared]` as validated settings: which Redis the fleet shares (standalone, Sentinel
//! or Cluster; plaintext or TLS; with an ACL user), the keys values are sealed with, and how
//! long the sidecar waits for Redis before it goes on alone.

use std::sync::Arc;
use std::time::Duration;

use crate::secret::{EncryptionKey, Secret, SecretSource};
use crate::tls::ClientIdentity;

/// One token cache for a fleet of sidecars, on Redis (`[cache.shared]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedCacheSettings {
    pub redis: RedisSettings,
    /// 32-byte keys: the first encrypts, every one decrypts (older keys after a rotation).
    pub encryption_keys: Vec<EncryptionKey>,
    /// Every key the sidecar writes starts with this.
    pub key_prefix: String,
    /// How long a Redis command may take before the sidecar goes on without Redis.
    pub timeout: Duration,
    /// How long one sidecar may hold a credential's fleet-wide fetch lock.
    pub lock_ttl: Duration,
    /// How many sidecars to assume the fleet has until Redis has said (for the share of a
    /// fetch budget each keeps while Redis is away).
    pub replicas_hint: u32,
}

/// How to reach the fleet's Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    pub topology: Topology,
    /// `rediss://`: TLS to every node (and sentinel), hostnames verified, trusting the system
    /// roots and `[tls] ca_file`.
    pub tls: bool,
    /// The ACL user (Redis 6+), from `username` or the URL.
    pub username: Option<String>,
    /// From `password` (a file is read again for each new connection) or the URL.
    pub password: Option<SecretSource>,
    /// A client certificate, for a Redis that asks for one (`client_identity`).
    pub client_identity: Option<Arc<ClientIdentity>>,
    /// The database number (standalone and Sentinel), from the URL's path.
    pub db: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Topology {
    /// One server: `redis_url`'s host and port.
    Standalone { host: String, port: u16 },
    /// The master that the sentinels name, followed through failovers.
    Sentinel {
        sentinels: Vec<(String, u16)>,
        master: String,
        password: Option<SecretSource>,
    },
    /// A Redis Cluster, reached through its seed nodes.
    Cluster { nodes: Vec<(String, u16)> },
}

impl RedisSettings {
    /// The password as it is now; `None` without one (or when its file cannot be read: the
    /// connection is then refused by Redis, and counted as Redis failing).
    pub fn current_password(&self) -> Option<Secret> {
        let password = self.password.as_ref()?;
        match password.current() {
            Ok(secret) => Some(secret),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the Redis password file; connecting without it");
                None
            }
        }
    }
}
