//! `[cache.shared]` as validated settings: where the fleet's Redis is, the keys values are sealed
//! with, and how long the sidecar waits for Redis before it goes on alone.

use std::time::Duration;

use crate::secret::{EncryptionKey, Secret};

/// One token cache for a fleet of sidecars, on Redis (`[cache.shared]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedCacheSettings {
    /// `redis://[user:password@]host:port[/db]` (a secret: it may hold a password).
    pub redis_url: Secret,
    /// 32-byte keys: the first encrypts, every one decrypts (older keys after a rotation).
    pub encryption_keys: Vec<EncryptionKey>,
    /// Every key the sidecar writes starts with this.
    pub key_prefix: String,
    /// How long a Redis command may take before the sidecar goes on without Redis.
    pub timeout: Duration,
    /// How long one sidecar may hold a credential's fleet-wide fetch lock.
    pub lock_ttl: Duration,
}
