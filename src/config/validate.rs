//! Raw config → validated [`Config`], collecting every problem with its line and key path.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{HeaderName, HeaderValue};
use rustls::pki_types::CertificateDer;

use super::locate::{self, KeyPath, SourceMap};
use super::raw::*;
use super::*;
use sha2::{Digest, Sha256};

use crate::secret::{EncryptionKey, Secret};
use crate::tls::ClientIdentity;
use crate::token::assertion::{Assertion, SigningAlg};
use crate::token::dialect::{
    credential_identity, BodyEncoding, BodyValue, ResponseSpec, TimeUnit, TokenChars, TokenRequest,
};

const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
const NUAPAY_MIN_EXPIRES_IN: Duration = Duration::from_secs(10);
const NUAPAY_MAX_EXPIRES_IN: Duration = Duration::from_secs(31_556_926);
const NUAPAY_DEFAULT_TTL: Duration = Duration::from_secs(10);
const DEFAULT_REPLAY_BODY_LIMIT: u64 = 1024 * 1024;
const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers a route may not set or inject: the sidecar owns them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

pub(super) fn validate(source: &str, base_dir: &Path) -> Result<Config, Vec<Problem>> {
    let map = SourceMap::new(source);
    let (raw, shape_problems) = parse(source, &map);
    let mut v = Validator {
        map,
        identities: BTreeMap::new(),
        read: Sha256::new(),
        files: Vec::new(),
        removed: shape_problems.iter().map(|p| p.key_path.clone()).collect(),
        problems: shape_problems,
        base_dir: base_dir.to_owned(),
    };
    // With the keys that had shape problems removed, the rest is still checked: one run
    // reports every problem.
    let Some(raw) = raw else {
        return Err(v.problems);
    };
    let root = KeyPath::root();

    let server = v.server(&root.key("server"), &raw.server);
    let extra_roots = v.tls(&root.key("tls"), &raw.tls);
    let cache = v.cache(&root.key("cache"), &raw.cache);
    let egress = raw
        .egress
        .as_ref()
        .and_then(|egress| v.egress(&root.key("egress"), egress));
    let shared = raw
        .cache
        .shared
        .as_ref()
        .and_then(|shared| v.shared_cache(&root.key("cache").key("shared"), shared));
    for (name, identity) in &raw.identities {
        let parsed = v.identity(&root.key("identities").key(name), name, identity);
        v.identities.insert(name.clone(), parsed);
    }
    let providers: BTreeMap<&str, Option<ProviderDraft>> = raw
        .providers
        .iter()
        .map(|(name, p)| {
            (
                name.as_str(),
                v.provider(&root.key("providers").key(name), name, p),
            )
        })
        .collect();
    let credentials: BTreeMap<&str, Option<Arc<CredentialSpec>>> = raw
        .credentials
        .iter()
        .map(|(name, c)| {
            let spec = v.credential(&root.key("credentials").key(name), name, c, &providers);
            (name.as_str(), spec)
        })
        .collect();
    let routes = v.routes(&root.key("routes"), &raw.routes, &credentials);

    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    let (Some(server), Some(extra_roots), Some(cache)) = (server, extra_roots, cache) else {
        return Err(vec![internal_problem()]);
    };
    Ok(Config {
        server,
        extra_roots,
        cache,
        shared,
        egress,
        providers: providers
            .into_values()
            .flatten()
            .map(|draft| draft.spec)
            .collect(),
        credentials: credentials.into_values().flatten().collect(),
        routes,
        version: version(source, v.read),
        files: v.files,
    })
}

/// The first 12 hex characters of the SHA-256 of the text and the files it read.
fn version(source: &str, files: Sha256) -> String {
    let mut hasher = Sha256::new();
    hasher.update(Sha256::digest(source.as_bytes()));
    hasher.update(files.finalize());
    hex::encode(hasher.finalize())[..12].to_owned()
}

fn internal_problem() -> Problem {
    Problem {
        line: None,
        key_path: String::new(),
        message: "internal error: validation failed without naming a problem".into(),
    }
}

/// TOML syntax and shape (unknown keys, wrong types). serde stops at the first such problem, so
/// each one found is removed from a copy of the document and parsing tried again, until it
/// succeeds: every shape problem is reported at once, with the document that remains (a
/// syntax error stops the search, and leaves no document).
fn parse(source: &str, map: &SourceMap) -> (Option<RawConfig>, Vec<Problem>) {
    const MAX_PROBLEMS: usize = 100;
    let mut problems = Vec::new();
    let mut text = source.to_owned();
    loop {
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(toml::Deserializer::new(&text)) {
            Ok(raw) => return (Some(raw), problems),
            Err(error) => error,
        };
        let mut path = key_path_of(error.path());
        let inner = error.into_inner();
        let message = with_suggestion(inner.message().trim());
        if let Some(field) = unknown_field_name(&message) {
            if !path.ends_with_key(field) {
                path = path.key(field);
            }
        }
        let first = problems.is_empty();
        let line = map.line_of_path(&path).or_else(|| {
            first
                .then(|| inner.span().map(|span| map.line_of(span.start)))
                .flatten()
        });
        problems.push(Problem {
            line,
            key_path: path.to_string(),
            message,
        });
        match locate::remove_path(&text, &path) {
            Some(rest) if problems.len() < MAX_PROBLEMS => text = rest,
            _ => return (None, problems),
        }
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or variant), with the closest
/// expected name first when one is close: "did you mean `a`?".
fn with_suggestion(message: &str) -> String {
    let Some((unknown, expected)) = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))
        .and_then(|rest| rest.split_once('`'))
    else {
        return message.to_owned();
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match closest(unknown, candidates.iter().copied()) {
        Some(best) => format!("{message}; did you mean `{best}`?"),
        None => message.to_owned(),
    }
}

/// The candidate most like `wanted`, if any is close enough to be a typo of it.
pub(super) fn closest<'c>(wanted: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .map(|candidate| (strsim::jaro_winkler(wanted, candidate), candidate))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// "; did you mean `x`?" (when one is close) and the names that exist.
fn suggest(wanted: &str, defined: &[&str]) -> String {
    let hint = closest(wanted, defined.iter().copied())
        .map(|best| format!("; did you mean `{best}`?"))
        .unwrap_or_default();
    if defined.is_empty() {
        format!("{hint} (none are defined)")
    } else {
        format!("{hint} (defined: {})", defined.join(", "))
    }
}

fn key_path_of(path: &serde_path_to_error::Path) -> KeyPath {
    let mut key_path = KeyPath::root();
    for segment in path.iter() {
        key_path = match segment {
            serde_path_to_error::Segment::Seq { index } => key_path.index(*index),
            serde_path_to_error::Segment::Map { key } => key_path.key(key),
            serde_path_to_error::Segment::Enum { variant } => key_path.key(variant),
            serde_path_to_error::Segment::Unknown => key_path,
        };
    }
    key_path
}

fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// Draft of a provider, kept until its credentials are built.
struct ProviderDraft {
    spec: Arc<ProviderSpec>,
    revoke_on_shutdown: bool,
    endpoint: Endpoint,
    scopes: Vec<String>,
    response: ResponseSpec,
}

/// A client's assertion settings (on a provider; a credential's own win), before the key is
/// known to sign.
#[derive(Clone, Default)]
struct SigningDraft {
    /// The key and where it was configured (for errors).
    key: Option<(Secret, KeyPath)>,
    alg: Option<SigningAlg>,
    kid: Option<String>,
    audience: Option<String>,
    params: Vec<(String, String)>,
}

/// Body fields the sidecar sets itself: `params` may not name them.
const MANAGED_FIELDS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "scope",
];

enum Endpoint {
    OAuth2 {
        url: reqwest::Url,
        encoding: BodyEncoding,
        client_auth: RawClientAuth,
        client_id: Option<String>,
        client_secret: Option<Secret>,
        signing: SigningDraft,
    },
    Nuapay {
        base_url: reqwest::Url,
        api_key: Secret,
        expires_in: Option<Duration>,
    },
}

struct Validator {
    map: SourceMap,
    /// `[identities]`, parsed (`None`: it has problems of its own).
    identities: BTreeMap<String, Option<Arc<ClientIdentity>>>,
    /// The digest of every file read so far, for the config's version.
    read: Sha256,
    files: Vec<PathBuf>,
    problems: Vec<Problem>,
    /// Key paths removed for shape problems: what follows from their absence is not reported.
    removed: Vec<String>,
    /// The config file's directory: relative file paths in it are relative to it.
    base_dir: PathBuf,
}

impl Validator {
    fn problem(&mut self, path: &KeyPath, message: impl Into<String>) {
        let key_path = path.to_string();
        let follows_from_a_removal = self.removed.iter().any(|removed| {
            removed == &key_path
                || removed
                    .strip_prefix(key_path.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        });
        if follows_from_a_removal && !key_path.is_empty() {
            return;
        }
        self.problems.push(Problem {
            line: self.map.line_of_path(path),
            key_path: path.to_string(),
            message: message.into(),
        });
    }

    fn server(&mut self, path: &KeyPath, raw: &RawServer) -> Option<ServerSettings> {
        let listen = match &raw.listen {
            Some(text) => self.socket_addr(&path.key("listen"), text, raw.allow_non_loopback)?,
            None => DEFAULT_LISTEN,
        };
        let admin_listen = match &raw.admin_listen {
            Some(text) => Some(self.socket_addr(&path.key("admin_listen"), text, raw.allow_non_loopback)?),
            None => None,
        };
        let require_header = match &raw.require_header {
            Some(required) => {
                let key = path.key("require_header");
                let name = self.header_name(&key.key("name"), &required.name)?;
                if RESERVED_HEADERS.contains(&name.as_str()) || name == http::header::AUTHORIZATION {
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
            require_header,
            max_request_body: raw.max_request_body,
            max_header_bytes,
            header_read_timeout: self.nonzero(
                &path.key("header_read_timeout"),
                raw.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            max_connections,
            idle_timeout: self.nonzero(&path.key("idle_timeout"), raw.idle_timeout, DEFAULT_IDLE_TIMEOUT),
            body_read_timeout: self.nonzero(
                &path.key("body_read_timeout"),
                raw.body_read_timeout,
                DEFAULT_BODY_READ_TIMEOUT,
            ),
            allowed_hosts: self.allowed_hosts(&path.key("allowed_hosts"), raw.allowed_hosts.as_deref()),
            access_log: raw.access_log.unwrap_or(true),
            watch_config: raw.watch_config.unwrap_or(true),
        })
    }

    fn shared_cache(&mut self, path: &KeyPath, raw: &RawSharedCache) -> Option<SharedCacheSettings> {
        let url_path = path.key("redis_url");
        let redis_url = match &raw.redis_url {
            Some(url) => self.secret(&url_path, url),
            None => {
                self.problem(
                    &url_path,
                    "missing: where the fleet's Redis is, e.g. \"redis://127.0.0.1:6379\"",
                );
                None
            }
        };
        if let Some(url) = &redis_url {
            if !url.expose().starts_with("redis://") {
                self.problem(
                    &url_path,
                    "must be a redis:// URL (TLS, Sentinel and Cluster URLs are not supported yet)",
                );
            } else if redis::Client::open(url.expose()).is_err() {
                self.problem(&url_path, "is not a valid Redis URL");
            }
        }
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
        if prefix.is_empty() || prefix.contains(['*', '?', '[', ' ']) {
            self.problem(
                &path.key("key_prefix"),
                "must be non-empty, without spaces or glob characters",
            );
        }
        let timeout = self.nonzero(&path.key("timeout"), raw.timeout, Duration::from_millis(250));
        let lock_ttl = self.nonzero(&path.key("lock_ttl"), raw.lock_ttl, Duration::from_secs(5));
        let mut encryption_keys = vec![current?];
        for key in older {
            encryption_keys.push(key?);
        }
        Some(SharedCacheSettings {
            redis_url: redis_url?,
            encryption_keys,
            key_prefix: prefix,
            timeout,
            lock_ttl,
        })
    }

    /// A base64 key of exactly 32 bytes.
    fn encryption_key(&mut self, path: &KeyPath, raw: &RawSecret) -> Option<EncryptionKey> {
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

    fn egress(&mut self, path: &KeyPath, raw: &RawEgress) -> Option<Egress> {
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

    fn identity(&mut self, path: &KeyPath, name: &str, raw: &RawIdentity) -> Option<Arc<ClientIdentity>> {
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
    fn identity_ref(&mut self, path: &KeyPath, name: Option<&str>) -> Option<Arc<ClientIdentity>> {
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

    fn allowed_hosts(&mut self, path: &KeyPath, raw: Option<&[String]>) -> Vec<String> {
        raw.unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, host)| self.host(&path.index(i), host))
            .collect()
    }

    fn socket_addr(&mut self, path: &KeyPath, text: &str, allow_non_loopback: bool) -> Option<SocketAddr> {
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

    fn tls(&mut self, path: &KeyPath, raw: &RawTls) -> Option<Vec<CertificateDer<'static>>> {
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

    fn cache(&mut self, path: &KeyPath, raw: &RawCache) -> Option<CacheSettings> {
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
        let mut duration = |key: &str, value: Option<Duration>, default: Duration| match value {
            Some(d) if d.is_zero() => {
                self.problem(&path.key(key), "must not be zero");
                ok = false;
                default
            }
            Some(d) => d,
            None => default,
        };
        let settings = CacheSettings {
            refresh: RefreshPolicy {
                refresh_fraction: raw.refresh_fraction.unwrap_or(defaults.refresh.refresh_fraction),
                max_refresh_ahead: duration(
                    "max_refresh_ahead",
                    raw.max_refresh_ahead,
                    defaults.refresh.max_refresh_ahead,
                ),
                max_expiry_margin: duration(
                    "max_expiry_margin",
                    raw.max_expiry_margin,
                    defaults.refresh.max_expiry_margin,
                ),
            },
            failure_backoff: duration("failure_backoff", raw.failure_backoff, defaults.failure_backoff),
            max_failure_backoff: duration(
                "max_failure_backoff",
                raw.max_failure_backoff,
                defaults.max_failure_backoff,
            ),
            retry_budget: raw.retry_budget.unwrap_or(defaults.retry_budget),
            max_concurrent_fetches: raw
                .max_concurrent_fetches
                .unwrap_or(defaults.max_concurrent_fetches),
        };
        if settings.max_concurrent_fetches == 0 {
            self.problem(&path.key("max_concurrent_fetches"), "must be at least 1");
            ok = false;
        }
        ok.then_some(settings)
    }

    fn provider(&mut self, path: &KeyPath, name: &str, raw: &RawProvider) -> Option<ProviderDraft> {
        let kind = match raw.kind.unwrap_or(RawProviderKind::Oauth2) {
            RawProviderKind::Oauth2 => ProviderKind::OAuth2,
            RawProviderKind::Nuapay => ProviderKind::Nuapay,
        };
        self.reject_keys_of_other_kind(path, kind, raw);
        let connect_timeout = self.nonzero(
            &path.key("connect_timeout"),
            raw.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        );
        let timeout = self.nonzero(&path.key("timeout"), raw.timeout, DEFAULT_FETCH_TIMEOUT);
        let default_ttl = match raw.default_ttl {
            Some(ttl) if ttl.is_zero() => {
                self.problem(&path.key("default_ttl"), "must not be zero");
                None
            }
            other => other,
        };
        let (endpoint, mut response) = match kind {
            ProviderKind::OAuth2 => self.oauth2_endpoint(path, raw, default_ttl)?,
            ProviderKind::Nuapay => self.nuapay_endpoint(path, raw, default_ttl)?,
        };
        response.token_chars = match raw.token_chars.unwrap_or(RawTokenChars::Token68) {
            RawTokenChars::Token68 => TokenChars::Token68,
            RawTokenChars::VisibleAscii => TokenChars::VisibleAscii,
        };
        Some(ProviderDraft {
            revoke_on_shutdown: raw.revoke_on_shutdown,
            spec: Arc::new(ProviderSpec {
                name: name.into(),
                kind,
                client_identity: self
                    .identity_ref(&path.key("client_identity"), raw.client_identity.as_deref()),
                connect_timeout,
                timeout,
            }),
            endpoint,
            scopes: raw.scopes.clone().unwrap_or_default(),
            response,
        })
    }

    fn reject_keys_of_other_kind(&mut self, path: &KeyPath, kind: ProviderKind, raw: &RawProvider) {
        let oauth2_only = [
            ("token_url", raw.token_url.is_some()),
            ("body", raw.body.is_some()),
            ("client_auth", raw.client_auth.is_some()),
            ("client_id", raw.client_id.is_some()),
            ("client_secret", raw.client_secret.is_some()),
            ("signing_key", raw.signing_key.is_some()),
            ("signing_alg", raw.signing_alg.is_some()),
            ("signing_kid", raw.signing_kid.is_some()),
            ("assertion_audience", raw.assertion_audience.is_some()),
            ("params", raw.params.is_some()),
            ("token_field", raw.token_field.is_some()),
            ("expires_in_field", raw.expires_in_field.is_some()),
            ("expires_at_field", raw.expires_at_field.is_some()),
            ("expires_at_unit", raw.expires_at_unit.is_some()),
        ];
        let nuapay_only = [
            ("base_url", raw.base_url.is_some()),
            ("api_key", raw.api_key.is_some()),
            ("expires_in", raw.expires_in.is_some()),
            ("revoke_on_shutdown", raw.revoke_on_shutdown),
        ];
        let foreign = match kind {
            ProviderKind::OAuth2 => &nuapay_only[..],
            ProviderKind::Nuapay => &oauth2_only[..],
        };
        for (key, present) in foreign {
            if *present {
                self.problem(
                    &path.key(key),
                    format!("not a key of a {} provider", kind.as_str()),
                );
            }
        }
    }

    fn oauth2_endpoint(
        &mut self,
        path: &KeyPath,
        raw: &RawProvider,
        default_ttl: Option<Duration>,
    ) -> Option<(Endpoint, ResponseSpec)> {
        let url = self.required_url(
            &path.key("token_url"),
            raw.token_url.as_deref(),
            raw.allow_plaintext,
            false,
        );
        let client_secret = match &raw.client_secret {
            Some(secret) => Some(self.secret(&path.key("client_secret"), secret)?),
            None => None,
        };
        let pointer = |v: &mut Self, key: &str, value: &Option<String>, default: Option<&str>| match value
            .as_deref()
            .or(default)
        {
            Some(p) if p.starts_with('/') => Some(Some(p.to_owned())),
            Some(p) => {
                v.problem(
                    &path.key(key),
                    format!(
                        "`{p}` is not a JSON pointer; write it as \"/{}\"",
                        p.replace('.', "/")
                    ),
                );
                None
            }
            None => Some(None),
        };
        let token = pointer(self, "token_field", &raw.token_field, Some("/access_token"));
        let expires_in = pointer(
            self,
            "expires_in_field",
            &raw.expires_in_field,
            Some("/expires_in"),
        );
        let expires_at = pointer(self, "expires_at_field", &raw.expires_at_field, None);
        if raw.expires_at_unit.is_some() && raw.expires_at_field.is_none() {
            self.problem(&path.key("expires_at_unit"), "needs expires_at_field");
        }
        let unit = match raw.expires_at_unit.unwrap_or(RawTimeUnit::S) {
            RawTimeUnit::S => TimeUnit::Seconds,
            RawTimeUnit::Ms => TimeUnit::Millis,
        };
        let endpoint = Endpoint::OAuth2 {
            url: url?,
            encoding: match raw.body.unwrap_or(RawBodyEncoding::Form) {
                RawBodyEncoding::Form => BodyEncoding::Form,
                RawBodyEncoding::Json => BodyEncoding::Json,
            },
            client_auth: raw.client_auth.unwrap_or(RawClientAuth::Body),
            client_id: self.text(&path.key("client_id"), raw.client_id.as_ref()),
            client_secret,
            signing: self.signing(path, &raw.signing(), SigningDraft::default()),
        };
        let response = ResponseSpec {
            token: token??,
            expires_in: expires_in?,
            expires_at: expires_at?.map(|p| (p, unit)),
            issued_at: None,
            token_id: None,
            default_ttl,
            token_chars: TokenChars::Token68,
        };
        Some((endpoint, response))
    }

    fn nuapay_endpoint(
        &mut self,
        path: &KeyPath,
        raw: &RawProvider,
        default_ttl: Option<Duration>,
    ) -> Option<(Endpoint, ResponseSpec)> {
        let base_url = self.required_url(
            &path.key("base_url"),
            raw.base_url.as_deref(),
            raw.allow_plaintext,
            true,
        );
        let api_key = match &raw.api_key {
            Some(secret) => self.secret(&path.key("api_key"), secret),
            None => {
                self.problem(
                    &path.key("api_key"),
                    "missing: a nuapay provider needs its API key",
                );
                None
            }
        };
        if let Some(expires_in) = raw.expires_in {
            if !(NUAPAY_MIN_EXPIRES_IN..=NUAPAY_MAX_EXPIRES_IN).contains(&expires_in) {
                self.problem(
                    &path.key("expires_in"),
                    "Nuapay accepts 10s up to 31556926s (one year)",
                );
            }
        }
        let endpoint = Endpoint::Nuapay {
            base_url: base_url?,
            api_key: api_key?,
            expires_in: raw.expires_in,
        };
        let response =
            ResponseSpec::nuapay(default_ttl.unwrap_or(raw.expires_in.unwrap_or(NUAPAY_DEFAULT_TTL)));
        Some((endpoint, response))
    }

    fn credential(
        &mut self,
        path: &KeyPath,
        name: &str,
        raw: &RawCredential,
        providers: &BTreeMap<&str, Option<ProviderDraft>>,
    ) -> Option<Arc<CredentialSpec>> {
        let Some(provider_name) = raw.provider.as_deref() else {
            self.problem(
                &path.key("provider"),
                "missing: which provider issues this credential's tokens",
            );
            return None;
        };
        let provider = match providers.get(provider_name) {
            Some(Some(provider)) => provider,
            Some(None) => return None, // the provider's own problems are reported already
            None => {
                self.problem(
                    &path.key("provider"),
                    format!(
                        "no provider named `{provider_name}` in [providers]{}",
                        suggest(provider_name, &providers.keys().copied().collect::<Vec<_>>())
                    ),
                );
                return None;
            }
        };
        let scopes = raw.scopes.clone().unwrap_or_else(|| provider.scopes.clone());
        let request = match &provider.endpoint {
            Endpoint::OAuth2 { .. } => self.oauth2_request(path, raw, provider, scopes)?,
            Endpoint::Nuapay { .. } => self.nuapay_request(path, raw, provider, scopes)?,
        };
        Some(Arc::new(CredentialSpec {
            name: name.into(),
            identity: with_client_identity(
                credential_identity(&request, &provider.response),
                provider.spec.client_identity.as_deref(),
            ),
            provider: provider.spec.clone(),
            request,
            response: provider.response.clone(),
            prefetch: raw.prefetch,
            revoke_on_shutdown: provider.revoke_on_shutdown,
        }))
    }

    fn oauth2_request(
        &mut self,
        path: &KeyPath,
        raw: &RawCredential,
        provider: &ProviderDraft,
        scopes: Vec<String>,
    ) -> Option<TokenRequest> {
        let Endpoint::OAuth2 {
            url,
            encoding,
            client_auth,
            client_id,
            client_secret,
            signing,
        } = &provider.endpoint
        else {
            return None;
        };
        if raw.organisation.is_some() {
            self.problem(
                &path.key("organisation"),
                "only nuapay credentials name an organisation",
            );
        }
        let own_secret = match &raw.client_secret {
            Some(secret) => Some(self.secret(&path.key("client_secret"), secret)?),
            None => None,
        };
        let client_id = self
            .text(&path.key("client_id"), raw.client_id.as_ref())
            .or_else(|| client_id.clone());
        let client_secret = own_secret.or_else(|| client_secret.clone());
        let signing = self.signing(path, &raw.signing(), signing.clone());
        let provider_name = &provider.spec.name;
        let Some(client_id) = client_id else {
            let needs = match client_auth {
                RawClientAuth::PrivateKeyJwt | RawClientAuth::TlsClientAuth => "client_id",
                RawClientAuth::Body | RawClientAuth::Basic | RawClientAuth::ClientSecretJwt => {
                    "client_id and client_secret"
                }
            };
            self.problem(
                path,
                format!("needs {needs}, here or on provider `{provider_name}`"),
            );
            return None;
        };
        let mut request = TokenRequest {
            url: url.clone(),
            encoding: *encoding,
            fields: vec![(
                "grant_type".to_owned(),
                BodyValue::Text("client_credentials".into()),
            )],
            authorization: None,
            secrets: Vec::new(),
            assertion: None,
        };
        let audience = signing.audience.clone().unwrap_or_else(|| url.to_string());
        let client_auth = *client_auth;
        if client_auth == RawClientAuth::TlsClientAuth {
            // RFC 8705: the client certificate authenticates; the body names the client.
            if provider.spec.client_identity.is_none() {
                self.problem(
                    path,
                    format!(
                        "client_auth = tls_client_auth needs client_identity on provider `{provider_name}`"
                    ),
                );
                return None;
            }
            self.refuse_signing_keys(&signing, client_auth);
            request
                .fields
                .push(("client_id".into(), BodyValue::Text(client_id)));
        } else if client_auth == RawClientAuth::PrivateKeyJwt {
            let assertion = self.private_key_assertion(path, &signing, &client_id, &audience)?;
            request
                .fields
                .push(("client_id".into(), BodyValue::Text(client_id)));
            request.assertion = Some(assertion);
        } else {
            let Some(secret) = client_secret else {
                self.problem(
                    path,
                    format!("needs client_id and client_secret, here or on provider `{provider_name}`"),
                );
                return None;
            };
            self.refuse_signing_keys(&signing, client_auth);
            request.secrets.push(secret.clone());
            client_secret_auth(
                &mut request,
                client_auth,
                client_id,
                secret,
                &audience,
                signing.kid.clone(),
            );
        }
        if !scopes.is_empty() {
            request
                .fields
                .push(("scope".into(), BodyValue::Text(scopes.join(" "))));
        }
        for (name, value) in signing.params {
            request.fields.push((name, BodyValue::Text(value)));
        }
        Some(request)
    }

    /// A provider's assertion settings, with a credential's own (`raw`) winning.
    fn signing(&mut self, path: &KeyPath, raw: &RawSigningKeys<'_>, base: SigningDraft) -> SigningDraft {
        let key = match raw.signing_key {
            Some(key) => self
                .secret(&path.key("signing_key"), key)
                .map(|key| (key, path.key("signing_key"))),
            None => base.key,
        };
        let mut params = base.params;
        for (name, value) in raw.params.into_iter().flatten() {
            if MANAGED_FIELDS.contains(&name.as_str()) {
                self.problem(
                    &path.key("params").key(name),
                    "is set by the sidecar; it cannot be a param",
                );
                continue;
            }
            params.retain(|(existing, _)| existing != name);
            params.push((name.clone(), value.clone()));
        }
        let alg = raw.signing_alg.map(|alg| match alg {
            RawSigningAlg::Rs256 => SigningAlg::Rs256,
            RawSigningAlg::Ps256 => SigningAlg::Ps256,
            RawSigningAlg::Es256 => SigningAlg::Es256,
        });
        SigningDraft {
            key,
            alg: alg.or(base.alg),
            kid: raw.signing_kid.cloned().or(base.kid),
            audience: raw.assertion_audience.cloned().or(base.audience),
            params,
        }
    }

    /// The `private_key_jwt` assertion: the key must be there and sign.
    fn private_key_assertion(
        &mut self,
        path: &KeyPath,
        signing: &SigningDraft,
        client_id: &str,
        audience: &str,
    ) -> Option<Assertion> {
        let Some((key, key_path)) = &signing.key else {
            self.problem(
                &path.key("signing_key"),
                "missing: client_auth = private_key_jwt signs with a PKCS#8 PEM key, here or on the provider",
            );
            return None;
        };
        match Assertion::private_key_jwt(key, signing.alg, signing.kid.clone(), client_id, audience) {
            Ok(assertion) => Some(assertion),
            Err(err) => {
                self.problem(key_path, err.to_string());
                None
            }
        }
    }

    fn refuse_signing_keys(&mut self, signing: &SigningDraft, client_auth: RawClientAuth) {
        if let Some((_, key_path)) = &signing.key {
            self.problem(
                key_path,
                format!("is used only with client_auth = private_key_jwt (this one has {client_auth:?})"),
            );
        }
    }

    fn nuapay_request(
        &mut self,
        path: &KeyPath,
        raw: &RawCredential,
        provider: &ProviderDraft,
        scopes: Vec<String>,
    ) -> Option<TokenRequest> {
        let Endpoint::Nuapay {
            base_url,
            api_key,
            expires_in,
        } = &provider.endpoint
        else {
            return None;
        };
        for (key, present) in [
            ("client_id", raw.client_id.is_some()),
            ("client_secret", raw.client_secret.is_some()),
        ] {
            if present {
                self.problem(
                    &path.key(key),
                    "nuapay credentials use the provider's api_key, not client credentials",
                );
            }
        }
        let organisation = self.text(&path.key("organisation"), raw.organisation.as_ref());
        let organisation = match (organisation.as_deref(), &raw.organisation) {
            (Some(org), _)
                if org
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                org
            }
            (Some(org), _) => {
                self.problem(
                    &path.key("organisation"),
                    format!("`{org}` is not an encoded organisation id"),
                );
                return None;
            }
            (None, Some(_)) => return None, // the reference's own problem is reported
            (None, None) => {
                self.problem(
                    &path.key("organisation"),
                    "missing: the merchant's encoded organisation id",
                );
                return None;
            }
        };
        if scopes.is_empty() {
            self.problem(
                &path.key("scopes"),
                "Nuapay requires at least one scope, e.g. [\"openbanking_pisp\"]",
            );
            return None;
        }
        let mut url = base_url.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}/organisations/{organisation}/tokens"));
        let mut fields = vec![("scopes".to_owned(), BodyValue::List(scopes))];
        if let Some(expires_in) = expires_in {
            fields.push(("expiresIn".into(), BodyValue::Number(expires_in.as_secs())));
        }
        Some(TokenRequest {
            url,
            encoding: BodyEncoding::Json,
            fields,
            authorization: Some(Secret::new(format!(
                "Basic {}",
                STANDARD.encode(format!("{}:", api_key.expose()))
            ))),
            secrets: vec![api_key.clone()],
            assertion: None,
        })
    }

    fn routes(
        &mut self,
        path: &KeyPath,
        raw: &[RawRoute],
        credentials: &BTreeMap<&str, Option<Arc<CredentialSpec>>>,
    ) -> Vec<Arc<RouteSpec>> {
        let mut routes: Vec<Arc<RouteSpec>> = Vec::new();
        for (index, raw_route) in raw.iter().enumerate() {
            let route_path = path.index(index);
            let Some(route) = self.route(&route_path, raw_route, credentials) else {
                continue;
            };
            if let Some(earlier) = routes
                .iter()
                .find(|r| r.host == route.host && r.path_prefix == route.path_prefix)
            {
                self.problem(
                    &route_path,
                    format!(
                        "matches the same requests as {} (same host and path_prefix)",
                        earlier.label
                    ),
                );
                continue;
            }
            routes.push(Arc::new(route));
        }
        routes
    }

    fn route(
        &mut self,
        path: &KeyPath,
        raw: &RawRoute,
        credentials: &BTreeMap<&str, Option<Arc<CredentialSpec>>>,
    ) -> Option<RouteSpec> {
        let errors_before = self.problems.len();
        if raw.path_prefix.is_none() && raw.host.is_none() {
            self.problem(path, "needs path_prefix or host (or both) to match requests");
        }
        let path_prefix = raw
            .path_prefix
            .as_deref()
            .and_then(|p| self.path_prefix(&path.key("path_prefix"), p));
        let host = raw.host.as_deref().and_then(|h| self.host(&path.key("host"), h));
        let upstream = self
            .required_url(
                &path.key("upstream"),
                raw.upstream.as_deref(),
                raw.allow_plaintext,
                true,
            )
            .and_then(|url| self.upstream(&path.key("upstream"), &url));
        let client_identity = self.identity_ref(&path.key("client_identity"), raw.client_identity.as_deref());
        let credential = self.credential_choice(path, raw, credentials);
        let inject = self.inject(&path.key("inject"), raw.inject.as_ref());
        let headers = self.static_headers(&path.key("headers"), &raw.headers);
        let timeout = self.nonzero(&path.key("timeout"), raw.timeout, DEFAULT_UPSTREAM_TIMEOUT);
        let purge_on_status =
            self.purge_statuses(&path.key("purge_on_status"), raw.purge_on_status.as_deref());
        if self.problems.len() > errors_before {
            return None;
        }
        let name = match (&host, &path_prefix) {
            (Some(host), Some(prefix)) => format!("{host}{}", display_prefix(prefix)),
            (Some(host), None) => host.clone(),
            (None, Some(prefix)) => display_prefix(prefix).to_owned(),
            (None, None) => String::new(),
        };
        Some(RouteSpec {
            label: path.to_string(),
            name,
            host,
            path_prefix,
            upstream: upstream?,
            client_identity,
            credential: credential?,
            inject: inject?,
            headers: headers?,
            timeout,
            purge_on_status: purge_on_status?,
            replay_body_limit: raw.replay_body_limit.unwrap_or(DEFAULT_REPLAY_BODY_LIMIT),
        })
    }

    fn purge_statuses(&mut self, path: &KeyPath, raw: Option<&[u16]>) -> Option<Vec<http::StatusCode>> {
        let Some(codes) = raw else {
            return Some(vec![http::StatusCode::UNAUTHORIZED]);
        };
        let mut statuses = Vec::new();
        for (i, code) in codes.iter().enumerate() {
            match http::StatusCode::from_u16(*code) {
                Ok(status) if status.is_client_error() => statuses.push(status),
                _ => {
                    self.problem(&path.index(i), format!("{code} is not a 4xx status"));
                    return None;
                }
            }
        }
        Some(statuses)
    }

    fn path_prefix(&mut self, path: &KeyPath, prefix: &str) -> Option<String> {
        if !prefix.starts_with('/') {
            self.problem(path, format!("`{prefix}` must start with '/'"));
            return None;
        }
        if prefix.contains(['?', '#', ' ']) || prefix.split('/').any(|s| s == "." || s == "..") {
            self.problem(
                path,
                format!("`{prefix}` must be a plain path without query, fragment or dot segments"),
            );
            return None;
        }
        Some(prefix.trim_end_matches('/').to_owned())
    }

    fn host(&mut self, path: &KeyPath, host: &str) -> Option<String> {
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if !valid {
            self.problem(
                path,
                format!("`{host}` must be a bare host name, without scheme, port or path"),
            );
            return None;
        }
        Some(host.to_ascii_lowercase())
    }

    fn upstream(&mut self, path: &KeyPath, url: &reqwest::Url) -> Option<Upstream> {
        if url.query().is_some() || url.fragment().is_some() {
            self.problem(path, "an upstream URL takes no query or fragment");
            return None;
        }
        let authority = url[url::Position::BeforeHost..url::Position::AfterPort]
            .parse()
            .ok();
        let Some(authority) = authority else {
            self.problem(path, "upstream host is not valid");
            return None;
        };
        let scheme = if url.scheme() == "https" {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        Some(Upstream {
            scheme,
            authority,
            base_path: url.path().trim_end_matches('/').to_owned(),
        })
    }

    fn credential_choice(
        &mut self,
        path: &KeyPath,
        raw: &RawRoute,
        credentials: &BTreeMap<&str, Option<Arc<CredentialSpec>>>,
    ) -> Option<CredentialChoice> {
        match (&raw.credential, &raw.credential_header, &raw.credentials) {
            (Some(name), None, None) => Some(CredentialChoice::Fixed(self.credential_ref(
                &path.key("credential"),
                name,
                credentials,
            )?)),
            (None, Some(header), Some(names)) => {
                let header_path = path.key("credential_header");
                let header = self.header_name(&header_path, header)?;
                if header == http::header::AUTHORIZATION {
                    self.problem(
                        &header_path,
                        "authorization is never forwarded; pick another header",
                    );
                    return None;
                }
                if names.is_empty() {
                    self.problem(&path.key("credentials"), "lists no credential");
                    return None;
                }
                let list_path = path.key("credentials");
                let allowed: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| self.credential_ref(&list_path.index(i), name, credentials))
                    .collect();
                Some(CredentialChoice::FromHeader {
                    header,
                    allowed: allowed.into_iter().collect::<Option<Vec<_>>>()?,
                })
            }
            (None, None, None) => {
                self.problem(
                    &path.key("credential"),
                    "missing: which credential's token this route injects",
                );
                None
            }
            (Some(_), _, _) => {
                self.problem(
                    &path.key("credential"),
                    "use either credential or credential_header + credentials",
                );
                None
            }
            (None, Some(_), None) => {
                self.problem(
                    &path.key("credentials"),
                    "missing: the allow-list for credential_header",
                );
                None
            }
            (None, None, Some(_)) => {
                self.problem(
                    &path.key("credential_header"),
                    "missing: the header that names the credential",
                );
                None
            }
        }
    }

    fn credential_ref(
        &mut self,
        path: &KeyPath,
        name: &str,
        credentials: &BTreeMap<&str, Option<Arc<CredentialSpec>>>,
    ) -> Option<Arc<CredentialSpec>> {
        match credentials.get(name) {
            Some(spec) => spec.clone(), // an invalid credential reports its own problems
            None => {
                let defined: Vec<&str> = credentials.keys().copied().collect();
                self.problem(
                    path,
                    format!(
                        "no credential named `{name}` in [credentials]{}",
                        suggest(name, &defined)
                    ),
                );
                None
            }
        }
    }

    fn inject(&mut self, path: &KeyPath, raw: Option<&RawInject>) -> Option<Inject> {
        match raw {
            None | Some(RawInject::Bearer) => Some(Inject::Bearer),
            Some(RawInject::BasicUsername) => Some(Inject::BasicUsername),
            Some(RawInject::Header { header, format }) => {
                let name = self.header_name(&path.key("header"), header)?;
                if RESERVED_HEADERS.contains(&name.as_str()) {
                    self.problem(&path.key("header"), format!("`{name}` is managed by the sidecar"));
                    return None;
                }
                let format = format.as_deref().unwrap_or("{token}");
                let Some((prefix, suffix)) = format.split_once("{token}") else {
                    self.problem(&path.key("format"), "must contain {token}, where the token goes");
                    return None;
                };
                if suffix.contains("{token}") || HeaderValue::from_str(&format!("{prefix}{suffix}")).is_err()
                {
                    self.problem(
                        &path.key("format"),
                        "must contain {token} once and only header-safe text",
                    );
                    return None;
                }
                Some(Inject::Header {
                    name,
                    prefix: prefix.to_owned(),
                    suffix: suffix.to_owned(),
                })
            }
        }
    }

    fn static_headers(
        &mut self,
        path: &KeyPath,
        raw: &BTreeMap<String, String>,
    ) -> Option<Vec<(HeaderName, HeaderValue)>> {
        let mut headers = Vec::new();
        let mut ok = true;
        for (name, value) in raw {
            let key_path = path.key(name);
            let Some(header) = self.header_name(&key_path, name) else {
                ok = false;
                continue;
            };
            if RESERVED_HEADERS.contains(&header.as_str()) || header == http::header::AUTHORIZATION {
                self.problem(&key_path, format!("`{header}` is managed by the sidecar"));
                ok = false;
                continue;
            }
            match HeaderValue::from_str(value) {
                Ok(value) => headers.push((header, value)),
                Err(_) => {
                    self.problem(&key_path, "not a valid header value");
                    ok = false;
                }
            }
        }
        ok.then_some(headers)
    }

    fn header_name(&mut self, path: &KeyPath, name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(header) => Some(header),
            Err(_) => {
                self.problem(path, format!("`{name}` is not a valid header name"));
                None
            }
        }
    }

    /// A URL that must be present; `https` unless `allow_plaintext`.
    fn required_url(
        &mut self,
        path: &KeyPath,
        text: Option<&str>,
        allow_plaintext: bool,
        is_base: bool,
    ) -> Option<reqwest::Url> {
        let Some(text) = text else {
            self.problem(path, "missing");
            return None;
        };
        let url = match reqwest::Url::parse(text) {
            Ok(url) if url.host_str().is_some() => url,
            Ok(_) | Err(_) => {
                self.problem(path, format!("`{text}` is not an absolute http(s) URL"));
                return None;
            }
        };
        match url.scheme() {
            "https" => {}
            "http" if allow_plaintext => {}
            "http" => {
                self.problem(
                    path,
                    "http:// would send tokens and secrets in clear text; use https:// \
                     (or allow_plaintext = true on this table for a local test server)",
                );
                return None;
            }
            other => {
                self.problem(path, format!("scheme `{other}` is not http or https"));
                return None;
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(
                path,
                "credentials in the URL are not allowed; use the secret keys",
            );
            return None;
        }
        if is_base && url.query().is_some() {
            self.problem(path, "must not carry a query");
            return None;
        }
        Some(url)
    }

    fn nonzero(&mut self, path: &KeyPath, value: Option<Duration>, default: Duration) -> Duration {
        match value {
            Some(d) if d.is_zero() => {
                self.problem(path, "must not be zero");
                default
            }
            Some(d) => d,
            None => default,
        }
    }

    fn secret(&mut self, path: &KeyPath, raw: &RawSecret) -> Option<Secret> {
        self.reference(path, raw, "secret").map(Secret::new)
    }

    /// A value that may be written in place or come from `{ env }` / `{ file }`, as secrets
    /// may (a client id, an organisation): not secret, but often kept beside one.
    fn text(&mut self, path: &KeyPath, raw: Option<&RawSecret>) -> Option<String> {
        self.reference(path, raw?, "value")
    }

    fn reference(&mut self, path: &KeyPath, raw: &RawSecret, what: &str) -> Option<String> {
        let value = match raw {
            RawSecret::Literal(value) => value.clone(),
            RawSecret::Env(name) => match std::env::var(name) {
                Ok(value) => value,
                Err(_) => {
                    self.problem(path, format!("environment variable {name} is not set"));
                    return None;
                }
            },
            RawSecret::File(file) => match self.read_file(&self.resolve(file)).and_then(|bytes| {
                String::from_utf8(bytes).map_err(|_| std::io::Error::other("not UTF-8 text"))
            }) {
                Ok(contents) => contents.trim_end_matches(['\n', '\r']).to_owned(),
                Err(err) => {
                    self.problem(path, format!("cannot read {what} file {}: {err}", file.display()));
                    return None;
                }
            },
        };
        if value.is_empty() {
            self.problem(path, format!("the {what} is empty"));
            return None;
        }
        Some(value)
    }

    /// Reads a file the config names, noting it (for reload) and its content (for the version).
    fn read_file(&mut self, file: &Path) -> std::io::Result<Vec<u8>> {
        self.files.push(file.to_owned());
        let bytes = std::fs::read(file)?;
        self.read.update(Sha256::digest(&bytes));
        Ok(bytes)
    }

    /// A path from the config file: relative ones are relative to the file's directory.
    fn resolve(&self, file: &Path) -> PathBuf {
        if file.is_relative() {
            self.base_dir.join(file)
        } else {
            file.to_owned()
        }
    }
}

fn display_prefix(prefix: &str) -> &str {
    if prefix.is_empty() {
        "/"
    } else {
        prefix
    }
}

/// Client authentication with the client secret: in the body, as HTTP Basic, or as the HS256
/// key of a `client_secret_jwt` assertion (then never sent itself).
fn client_secret_auth(
    request: &mut TokenRequest,
    client_auth: RawClientAuth,
    client_id: String,
    secret: Secret,
    audience: &str,
    kid: Option<String>,
) {
    match client_auth {
        RawClientAuth::Body => {
            request
                .fields
                .push(("client_id".into(), BodyValue::Text(client_id)));
            request
                .fields
                .push(("client_secret".into(), BodyValue::Secret(secret)));
        }
        RawClientAuth::Basic => {
            // RFC 6749 §2.3.1: both parts form-encoded before Basic encoding.
            let user = form_encode(&client_id);
            let password = form_encode(secret.expose());
            request.authorization = Some(Secret::new(format!(
                "Basic {}",
                STANDARD.encode(format!("{user}:{password}"))
            )));
        }
        RawClientAuth::ClientSecretJwt | RawClientAuth::PrivateKeyJwt | RawClientAuth::TlsClientAuth => {
            request.assertion = Some(Assertion::client_secret_jwt(&secret, &client_id, audience, kid));
            request
                .fields
                .push(("client_id".into(), BodyValue::Text(client_id)));
        }
    }
}

/// A credential's identity, also bound to the client certificate its tokens are fetched with
/// (certificate-bound tokens, RFC 8705): rotating the certificate gets a new token.
fn with_client_identity(identity: Arc<str>, client: Option<&ClientIdentity>) -> Arc<str> {
    match client {
        Some(client) => {
            let digest = Sha256::new()
                .chain_update(identity.as_bytes())
                .chain_update(client.digest.as_bytes())
                .finalize();
            hex::encode(digest).into()
        }
        None => identity,
    }
}

fn form_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
