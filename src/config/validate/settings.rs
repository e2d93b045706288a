//! Validation of the process-wide tables: `[server]`, `[tls]`, `[cache]` (and `[cache.shared]`),
//! `[egress]` and `[identities]`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rustls::pki_types::CertificateDer;

use crate::config::raw::{RawCache, RawEgress, RawIdentity, RawSecret, RawServer, RawSharedCache, RawTls};
use crate::config::validate::values::{DAY, HOUR, MINUTE, YEAR};
use crate::config::validate::{suggest, Validator};
use crate::config::{is_reserved_header, Egress, KeyPath, ServerSettings};
use crate::secret::{EncryptionKey, Secret, SecretSource};
use crate::tls::ClientIdentity;
use crate::token::lifetime::RefreshPolicy;
use crate::token::shared::settings::{RedisSettings, SharedCacheSettings, Topology};
use crate::token::spec::CacheSettings;

const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(60);

impl Validator {
    pub(super) fn server(&mut self, path: &KeyPath, raw: &RawServer) -> Option<ServerSettings> {
        let listen = match &raw.listen {
            Some(text) => self.socket_addr(&path.key("listen"), text, raw.allow_non_loopback)?,
            None => DEFAULT_LISTEN,
        };
        let admin_listen = match &raw.admin_listen {
            Some(text) => Some(self.socket_addr(&path.key("admin_listen"), text, raw.allow_non_loopback)?),
            None => None,
        };
        // Any address, without allow_non_loopback: it serves nothing but /metrics and /healthz.
        let metrics_listen = match &raw.metrics_listen {
            Some(text) => Some(self.socket_addr(&path.key("metrics_listen"), text, true)?),
            None => None,
        };
        let require_header = match &raw.require_header {
            Some(required) => {
                let key = path.key("require_header");
                let name = self.header_name(&key.key("name"), &required.name)?;
                if is_reserved_header(&name) || name == http::header::AUTHORIZATION {
                    self.problem(
                        &key.key("name"),
                        format!("`{name}` cannot be the required header"),
                    );
                    return None;
                }
                Some((name, self.secret(&key.key("value"), &required.value)?))
            }
            None => None,
        };
        let max_header_bytes = raw.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        for (key, value) in [
            ("max_header_bytes", max_header_bytes),
            ("max_connections", max_connections),
        ] {
            if value == 0 {
                self.problem(&path.key(key), "must be at least 1");
            }
        }
        if raw.max_request_body == Some(0) {
            self.problem(
                &path.key("max_request_body"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
        Some(ServerSettings {
            listen,
            admin_listen,
            metrics_listen,
            require_header,
            max_request_body: raw.max_request_body,
            max_header_bytes,
            header_read_timeout: self.nonzero(
                &path.key("header_read_timeout"),
                raw.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
                HOUR,
            ),
            max_connections,
            idle_timeout: self.nonzero(
                &path.key("idle_timeout"),
                raw.idle_timeout,
                DEFAULT_IDLE_TIMEOUT,
                DAY,
            ),
            body_read_timeout: self.nonzero(
                &path.key("body_read_timeout"),
                raw.body_read_timeout,
                DEFAULT_BODY_READ_TIMEOUT,
                HOUR,
            ),
            request_body_timeout: self.nonzero(
                &path.key("request_body_timeout"),
                raw.request_body_timeout,
                DEFAULT_REQUEST_BODY_TIMEOUT,
                DAY,
            ),
            allowed_hosts: self.allowed_hosts(&path.key("allowed_hosts"), raw.allowed_hosts.as_deref()),
            access_log: raw.access_log.unwrap_or(true),
            watch_config: raw.watch_config.unwrap_or(true),
        })
    }

    pub(super) fn shared_cache(
        &mut self,
        path: &KeyPath,
        raw: &RawSharedCache,
    ) -> Option<SharedCacheSettings> {
        let redis = self.redis(path, raw);
        let key_path = path.key("encryption_key");
        let current = match &raw.encryption_key {
            Some(key) => self.encryption_key(&key_path, key),
            None => {
                self.problem(
                    &key_path,
                    "missing: 32 random bytes, base64 (e.g. `openssl rand -base64 32`)",
                );
                None
            }
        };
        let older: Vec<Option<EncryptionKey>> = raw
            .decryption_keys
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, key)| self.encryption_key(&path.key("decryption_keys").index(i), key))
            .collect();
        let prefix = raw
            .key_prefix
            .clone()
            .unwrap_or_else(|| "token-sidecar:".to_owned());
        if prefix.is_empty() || prefix.contains(['*', '?', '[', ' ', '{', '}']) {
            self.problem(
                &path.key("key_prefix"),
                "must be non-empty, without spaces, braces or glob characters",
            );
        }
        let timeout = self.nonzero(
            &path.key("timeout"),
            raw.timeout,
            Duration::from_millis(250),
            MINUTE,
        );
        let lock_ttl = self.nonzero(
            &path.key("lock_ttl"),
            raw.lock_ttl,
            Duration::from_secs(5),
            10 * MINUTE,
        );
        let mut encryption_keys = vec![current?];
        for key in older {
            encryption_keys.push(key?);
        }
        Some(SharedCacheSettings {
            redis: redis?,
            encryption_keys,
            key_prefix: prefix,
            timeout,
            lock_ttl,
            replicas_hint: raw.replicas_hint.unwrap_or(1).max(1),
        })
    }

    /// Where the fleet's Redis is: `redis_url` for one server, or `sentinels` and
    /// `sentinel_master`, or `cluster_nodes` (then `redis_url` gives at most the scheme and
    /// credentials), with the ACL user and TLS settings.
    fn redis(&mut self, path: &KeyPath, raw: &RawSharedCache) -> Option<RedisSettings> {
        let url_path = path.key("redis_url");
        let url = match &raw.redis_url {
            Some(url) => Some(self.redis_url(&url_path, url)?),
            None => None,
        };
        let topology = self.topology(path, raw, url.as_ref())?;
        let tls = url.as_ref().is_some_and(|url| url.scheme() == "rediss");
        let username = match &raw.username {
            Some(username) => Some(self.text(&path.key("username"), Some(username))?),
            None => url
                .as_ref()
                .map(|url| percent_decode(url.username()))
                .filter(|user| !user.is_empty()),
        };
        let password = match &raw.password {
            Some(password) => Some(self.secret_source(&path.key("password"), password)?),
            None => url
                .as_ref()
                .and_then(|url| url.password())
                .map(|password| SecretSource::Fixed(Secret::new(percent_decode(password)))),
        };
        let identity_path = path.key("client_identity");
        let client_identity = self.identity_ref(&identity_path, raw.client_identity.as_deref());
        if client_identity.is_some() && !tls {
            self.problem(
                &identity_path,
                "a client certificate needs TLS: redis_url = \"rediss://…\"",
            );
            return None;
        }
        let db = match url.as_ref().map(|url| url.path().trim_start_matches('/')) {
            None | Some("") => 0,
            Some(db) => match db.parse() {
                Ok(db) => db,
                Err(_) => {
                    self.problem(&url_path, format!("`{db}` is not a database number"));
                    return None;
                }
            },
        };
        Some(RedisSettings {
            topology,
            tls,
            username,
            password,
            client_identity,
            db,
        })
    }

    /// `redis://` or `rediss://`, else a problem. Credentials with no host
    /// (`rediss://user:password@`, for Sentinel or a Cluster) are read as having none.
    fn redis_url(&mut self, path: &KeyPath, raw: &RawSecret) -> Option<url::Url> {
        let text = self.secret(path, raw)?;
        let parsed = match text.expose().strip_suffix('@') {
            Some(credentials) => url::Url::parse(&format!("{credentials}@{NO_HOST}")),
            None => url::Url::parse(text.expose()),
        };
        match parsed {
            Ok(url) if matches!(url.scheme(), "redis" | "rediss") => Some(url),
            Ok(_) => {
                self.problem(path, "must be a redis:// or rediss:// (TLS) URL");
                None
            }
            Err(_) => {
                self.problem(path, "is not a valid Redis URL");
                None
            }
        }
    }

    fn topology(&mut self, path: &KeyPath, raw: &RawSharedCache, url: Option<&url::Url>) -> Option<Topology> {
        let host = url
            .and_then(|url| url.host_str())
            .filter(|host| !host.is_empty() && *host != NO_HOST);
        let url_path = path.key("redis_url");
        match (&raw.sentinels, &raw.cluster_nodes) {
            (Some(_), Some(_)) => {
                self.problem(
                    &path.key("cluster_nodes"),
                    "sentinels and cluster_nodes exclude each other",
                );
                None
            }
            (Some(sentinels), None) => {
                if host.is_some() {
                    self.problem(
                        &url_path,
                        "with sentinels, redis_url gives only the scheme and credentials, e.g. \"rediss://\"",
                    );
                }
                let sentinels = self.nodes(&path.key("sentinels"), sentinels)?;
                let Some(master) = raw.sentinel_master.clone() else {
                    self.problem(
                        &path.key("sentinel_master"),
                        "missing: the master's name the sentinels know",
                    );
                    return None;
                };
                let password = match &raw.sentinel_password {
                    Some(password) => Some(self.secret_source(&path.key("sentinel_password"), password)?),
                    None => None,
                };
                Some(Topology::Sentinel {
                    sentinels,
                    master,
                    password,
                })
            }
            (None, Some(nodes)) => {
                if host.is_some() {
                    self.problem(&url_path, "with cluster_nodes, redis_url gives only the scheme and credentials, e.g. \"rediss://\"");
                }
                self.refuse_sentinel_keys(path, raw);
                Some(Topology::Cluster {
                    nodes: self.nodes(&path.key("cluster_nodes"), nodes)?,
                })
            }
            (None, None) => {
                self.refuse_sentinel_keys(path, raw);
                let Some(host) = host else {
                    self.problem(&url_path, "missing: where the fleet's Redis is, e.g. \"redis://127.0.0.1:6379\" (or sentinels, or cluster_nodes)");
                    return None;
                };
                let port = url.and_then(|url| url.port()).unwrap_or(6379);
                Some(Topology::Standalone {
                    host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
                    port,
                })
            }
        }
    }

    fn refuse_sentinel_keys(&mut self, path: &KeyPath, raw: &RawSharedCache) {
        for (key, present) in [
            ("sentinel_master", raw.sentinel_master.is_some()),
            ("sentinel_password", raw.sentinel_password.is_some()),
        ] {
            if present {
                self.problem(&path.key(key), "is used only with sentinels");
            }
        }
    }

    /// A non-empty list of `host:port`.
    fn nodes(&mut self, path: &KeyPath, raw: &[String]) -> Option<Vec<(String, u16)>> {
        if raw.is_empty() {
            self.problem(path, "lists no node");
            return None;
        }
        let mut nodes = Vec::with_capacity(raw.len());
        for (i, node) in raw.iter().enumerate() {
            let parsed = node
                .rsplit_once(':')
                .and_then(|(host, port)| {
                    Some((
                        host.trim_start_matches('[').trim_end_matches(']'),
                        port.parse().ok()?,
                    ))
                })
                .filter(|(host, _)| !host.is_empty());
            match parsed {
                Some((host, port)) => nodes.push((host.to_owned(), port)),
                None => self.problem(&path.index(i), format!("`{node}` is not host:port")),
            }
        }
        (nodes.len() == raw.len()).then_some(nodes)
    }

    /// A base64 key of exactly 32 bytes.
    pub(super) fn encryption_key(&mut self, path: &KeyPath, raw: &RawSecret) -> Option<EncryptionKey> {
        let text = self.secret(path, raw)?;
        let key = STANDARD
            .decode(text.expose().trim())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .map(EncryptionKey::new);
        if key.is_none() {
            self.problem(
                path,
                "must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)",
            );
        }
        key
    }

    pub(super) fn egress(&mut self, path: &KeyPath, raw: &RawEgress) -> Option<Egress> {
        let proxy_path = path.key("proxy");
        let Some(text) = &raw.proxy else {
            self.problem(
                &proxy_path,
                "missing: the CONNECT proxy, e.g. \"http://egress.internal:3128\"",
            );
            return None;
        };
        let proxy = match text.parse::<http::Uri>() {
            Ok(uri)
                if uri.scheme_str() == Some("http") && uri.host().is_some() && uri.port_u16().is_some() =>
            {
                uri
            }
            _ => {
                self.problem(
                    &proxy_path,
                    format!("`{text}` is not an http://host:port proxy address"),
                );
                return None;
            }
        };
        let auth = match &raw.proxy_auth {
            Some(auth) => {
                let secret = self.secret(&path.key("proxy_auth"), auth)?;
                if !secret.expose().contains(':') {
                    self.problem(&path.key("proxy_auth"), "must be \"user:password\"");
                    return None;
                }
                Some(secret)
            }
            None => None,
        };
        let no_proxy = raw
            .no_proxy
            .iter()
            .flatten()
            .map(|host| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase()
            })
            .collect();
        Some(Egress {
            proxy,
            auth,
            no_proxy,
        })
    }

    pub(super) fn identity(
        &mut self,
        path: &KeyPath,
        name: &str,
        raw: &RawIdentity,
    ) -> Option<Arc<ClientIdentity>> {
        let read = |v: &mut Self, key: &str, value: &Option<RawSecret>| match value {
            Some(value) => v.secret(&path.key(key), value),
            None => {
                v.problem(
                    &path.key(key),
                    "missing: a PEM file, e.g. { file = \"/run/secrets/client.pem\" }",
                );
                None
            }
        };
        let cert = read(self, "cert", &raw.cert);
        let key = read(self, "key", &raw.key);
        match ClientIdentity::from_pem(name, cert?.expose(), key?.expose()) {
            Ok(identity) => Some(Arc::new(identity)),
            Err(message) => {
                self.problem(path, message);
                None
            }
        }
    }

    /// The identity a `client_identity` key names (`None` when absent, unknown or invalid).
    pub(super) fn identity_ref(&mut self, path: &KeyPath, name: Option<&str>) -> Option<Arc<ClientIdentity>> {
        let name = name?;
        match self.identities.get(name) {
            Some(identity) => identity.clone(),
            None => {
                let defined: Vec<&str> = self.identities.keys().map(String::as_str).collect();
                let message = format!(
                    "no identity named `{name}` in [identities]{}",
                    suggest(name, &defined)
                );
                self.problem(path, message);
                None
            }
        }
    }

    pub(super) fn allowed_hosts(&mut self, path: &KeyPath, raw: Option<&[String]>) -> Vec<String> {
        raw.unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, host)| self.host(&path.index(i), host))
            .collect()
    }

    pub(super) fn socket_addr(
        &mut self,
        path: &KeyPath,
        text: &str,
        allow_non_loopback: bool,
    ) -> Option<SocketAddr> {
        let parsed = text
            .strip_prefix("localhost:")
            .map(|port| format!("127.0.0.1:{port}"))
            .unwrap_or_else(|| text.to_owned())
            .parse::<SocketAddr>();
        let Ok(addr) = parsed else {
            self.problem(
                path,
                format!("`{text}` is not an address such as \"127.0.0.1:8080\""),
            );
            return None;
        };
        if !addr.ip().is_loopback() && !allow_non_loopback {
            self.problem(
                path,
                format!(
                    "{addr} is not a loopback address: anyone who reaches it acts as your merchants; \
                     set server.allow_non_loopback = true if that is intended"
                ),
            );
            return None;
        }
        Some(addr)
    }

    pub(super) fn tls(&mut self, path: &KeyPath, raw: &RawTls) -> Option<Vec<CertificateDer<'static>>> {
        let Some(file) = &raw.ca_file else {
            return Some(Vec::new());
        };
        let path = path.key("ca_file");
        let file = self.resolve(file);
        let pem = match self.read_file(&file) {
            Ok(pem) => pem,
            Err(err) => {
                self.problem(&path, format!("cannot read {}: {err}", file.display()));
                return None;
            }
        };
        let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
        match certs {
            Ok(certs) if !certs.is_empty() => Some(certs),
            Ok(_) => {
                self.problem(&path, format!("{} holds no PEM certificate", file.display()));
                None
            }
            Err(err) => {
                self.problem(&path, format!("{} is not valid PEM: {err}", file.display()));
                None
            }
        }
    }

    pub(super) fn cache(&mut self, path: &KeyPath, raw: &RawCache) -> Option<CacheSettings> {
        let defaults = CacheSettings::default();
        let mut ok = true;
        if let Some(fraction) = raw.refresh_fraction {
            if !(fraction > 0.0 && fraction < 1.0) {
                self.problem(
                    &path.key("refresh_fraction"),
                    "must be between 0 and 1, e.g. 0.25",
                );
                ok = false;
            }
        }
        let problems_before = self.problems.len();
        let mut duration = |key: &str, value: Option<Duration>, default: Duration, max: Duration| {
            self.nonzero(&path.key(key), value, default, max)
        };
        let settings = CacheSettings {
            refresh: RefreshPolicy {
                refresh_fraction: raw.refresh_fraction.unwrap_or(defaults.refresh.refresh_fraction),
                max_refresh_ahead: duration(
                    "max_refresh_ahead",
                    raw.max_refresh_ahead,
                    defaults.refresh.max_refresh_ahead,
                    YEAR,
                ),
                max_expiry_margin: duration(
                    "max_expiry_margin",
                    raw.max_expiry_margin,
                    defaults.refresh.max_expiry_margin,
                    YEAR,
                ),
            },
            failure_backoff: duration(
                "failure_backoff",
                raw.failure_backoff,
                defaults.failure_backoff,
                DAY,
            ),
            max_failure_backoff: duration(
                "max_failure_backoff",
                raw.max_failure_backoff,
                defaults.max_failure_backoff,
                DAY,
            ),
            max_probe_interval: duration(
                "max_probe_interval",
                raw.max_probe_interval,
                defaults.max_probe_interval,
                HOUR,
            ),
            retry_budget: match raw.retry_budget {
                Some(budget) => self
                    .at_most(&path.key("retry_budget"), budget, 10 * MINUTE)
                    .unwrap_or(defaults.retry_budget),
                None => defaults.retry_budget,
            },
            max_concurrent_fetches: raw
                .max_concurrent_fetches
                .unwrap_or(defaults.max_concurrent_fetches),
        };
        ok &= self.problems.len() == problems_before;
        if settings.max_concurrent_fetches == 0 {
            self.problem(&path.key("max_concurrent_fetches"), "must be at least 1");
            ok = false;
        }
        ok.then_some(settings)
    }
}

/// The host a Redis URL of credentials only is read with: it names no host.
const NO_HOST: &str = "no-host.invalid";

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}
