//! Configuration: the TOML file read into a serde mirror ([`raw`]), then validated into the
//! types the rest of the sidecar uses ([`Config`]). Every problem found names the file, the line
//! and the key path, and all of them are reported at once.

mod locate;
pub mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header;
use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue};
use rustls::pki_types::CertificateDer;

pub use locate::KeyPath;

use crate::secret::Secret;
use crate::tls::ClientIdentity;

pub use crate::egress::Egress;
pub use crate::telemetry::TelemetrySettings;
pub use crate::token::shared::settings::SharedCacheSettings;
pub use crate::token::spec::{CacheSettings, CredentialSpec, ProviderKind, ProviderSpec};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    /// Extra trusted roots (`[tls] ca_file`) for upstreams and token endpoints.
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub cache: CacheSettings,
    /// `[cache.shared]`: the fleet's token cache on Redis.
    pub shared: Option<SharedCacheSettings>,
    /// `[egress]`: the CONNECT proxy outbound connections go through.
    pub egress: Option<Egress>,
    pub providers: Vec<Arc<ProviderSpec>>,
    pub credentials: Vec<Arc<CredentialSpec>>,
    pub routes: Vec<Arc<RouteSpec>>,
    /// `[telemetry]`: trace export. Read at start-up only; a reload that changes it warns.
    pub telemetry: TelemetrySettings,
    /// Every file the config read (itself, `ca_file`, `{ file }` references): a change to any
    /// of them reloads it.
    pub files: Vec<PathBuf>,
    /// The first 12 hex characters of the SHA-256 of the config text and every file it read:
    /// which version of the configuration a sidecar runs.
    pub version: String,
    /// What is valid but will not do quite what it reads, as `file:line: key: message` lines
    /// (`check` prints them, `run` logs them).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// `/metrics` and `/healthz` only, on any address: for a scraper outside the pod.
    pub metrics_listen: Option<SocketAddr>,
    /// A header every proxied request must carry, with this value; stripped before forwarding.
    pub require_header: Option<(HeaderName, Secret)>,
    /// Largest request body accepted (413 above it); `None` for no limit.
    pub max_request_body: Option<u64>,
    /// Largest request head (URI and headers) accepted (431 above it).
    pub max_header_bytes: usize,
    /// Slow clients get this long to send their request headers.
    pub header_read_timeout: Duration,
    /// Client connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// A request body that sends nothing for this long is abandoned (408).
    pub body_read_timeout: Duration,
    /// A request body not finished this long after it started is abandoned (408), however
    /// steadily it trickles.
    pub request_body_timeout: Duration,
    /// Non-loopback host names that routes without `host` also serve (lower-case).
    pub allowed_hosts: Vec<String>,
    /// One `token_sidecar::access` event per proxied request.
    pub access_log: bool,
    /// Reload when the config file or a file it references changes.
    pub watch_config: bool,
}

/// Which requests get which credential and where they go.
///
/// One is held per merchant, so it is kept compact: what routes usually share (the upstream,
/// the options) is shared, what they rarely have is boxed, nothing has spare capacity.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// N in `routes[N]`: see [`RouteSpec::label`].
    pub index: u32,
    /// The route's name in metrics: its path prefix and/or host (shared by its series).
    pub name: Arc<str>,
    /// Lower-case host name to match, without port.
    pub host: Option<Box<str>>,
    /// Path prefix without trailing slash (`""` for `/`).
    pub path_prefix: Option<Box<str>>,
    /// One per distinct upstream URL in the config.
    pub upstream: Arc<Upstream>,
    pub credential: CredentialChoice,
    /// One per distinct set of options in the config.
    pub options: Arc<RouteOptions>,
}

/// What a route does with a request besides choosing its upstream and credential: usually the
/// same for all of a provider's merchants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteOptions {
    /// Mutual TLS to the upstream.
    pub client_identity: Option<Arc<ClientIdentity>>,
    pub inject: Inject,
    pub headers: Box<[(HeaderName, HeaderValue)]>,
    pub timeout: Duration,
    /// Upstream statuses that mean "this token was refused": purge it and resend once.
    pub purge_on_status: ClientErrorSet,
    /// Request bodies up to this many bytes are kept so they can be resent.
    pub replay_body_limit: u64,
}

impl RouteSpec {
    /// `routes[N]`, for errors and logs.
    pub fn label(&self) -> String {
        format!("routes[{}]", self.index)
    }
}

/// A set of 4xx statuses, as bits: no allocation per route, one shift per lookup. (Two `u64`s,
/// not a `u128`, whose 16-byte alignment would pad every route.)
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ClientErrorSet([u64; 2]);

impl ClientErrorSet {
    /// Adds `status`; `false` (and nothing added) unless it is a 4xx.
    pub fn insert(&mut self, status: http::StatusCode) -> bool {
        let Some((word, bit)) = Self::position(status.as_u16()) else {
            return false;
        };
        self.0[word] |= bit;
        true
    }

    pub fn contains(&self, status: http::StatusCode) -> bool {
        Self::position(status.as_u16()).is_some_and(|(word, bit)| self.0[word] & bit != 0)
    }

    /// The word and bit of a 4xx `status`.
    fn position(status: u16) -> Option<(usize, u64)> {
        let offset = status.checked_sub(400).filter(|offset| *offset < 100)?;
        Some((usize::from(offset / 64), 1 << (offset % 64)))
    }
}

impl fmt::Debug for ClientErrorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let statuses = (400..500u16)
            .filter(|status| Self::position(*status).is_some_and(|(word, bit)| self.0[word] & bit != 0));
        f.debug_set().entries(statuses).finish()
    }
}

/// Where a route forwards to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The upstream URL's path without trailing slash (`""` for none).
    pub base_path: String,
    /// The `Host` an HTTP/1 request to it carries: its authority (the URL's, so without the
    /// scheme's default port), made once rather than by the client per request.
    pub host: HeaderValue,
}

impl Upstream {
    pub fn new(
        scheme: Scheme,
        authority: Authority,
        base_path: String,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let host = HeaderValue::from_str(authority.as_str())?;
        Ok(Self {
            scheme,
            authority,
            base_path,
            host,
        })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

#[derive(Debug, Clone)]
pub enum CredentialChoice {
    Fixed(Arc<CredentialSpec>),
    /// The request names its credential in a header, from an allow-list.
    FromHeader(Box<HeaderChoice>),
}

/// A credential chosen by the request: the header naming it, and the credentials it may name.
#[derive(Debug, Clone)]
pub struct HeaderChoice {
    pub header: HeaderName,
    pub allowed: Vec<Arc<CredentialSpec>>,
}

/// How the token goes into the forwarded request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Inject {
    /// `Authorization: Bearer <token>`
    Bearer,
    /// `Authorization: Basic base64("<token>:")`
    BasicUsername,
    /// `<header>: <prefix><token><suffix>`
    Header(Box<HeaderInject>),
}

/// A token injected into a header of the route's choice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeaderInject {
    pub name: HeaderName,
    pub prefix: String,
    pub suffix: String,
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), and proxy credentials.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers a route may not set or inject: the sidecar owns them (the hop-by-hop ones, the
/// upstream's `Host`, the body's framing).
pub fn is_reserved_header(name: &HeaderName) -> bool {
    name == http::header::HOST || name == http::header::CONTENT_LENGTH || HOP_BY_HOP.contains(name)
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(.path, .problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub key_path: String,
    pub message: String,
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| {
            let location = match p.line {
                Some(line) => format!("{}:{line}", path.display()),
                None => path.display().to_string(),
            };
            if p.key_path.is_empty() {
                format!("{location}: {}", p.message)
            } else {
                format!("{location}: {}: {}", p.key_path, p.message)
            }
        })
        .collect();
    lines.join("\n")
}

impl Config {
    /// Reads and validates a config file, resolving every secret it references.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let _loading = crate::allocator::PurgeAtOnce::begin();
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml(&source, path)?;
        config.files.insert(0, path.to_owned());
        Ok(config)
    }

    /// Validates config text; `path` names it in errors and anchors relative file paths.
    pub fn from_toml(source: &str, path: &Path) -> Result<Config, ConfigError> {
        let base_dir = path.parent().unwrap_or(Path::new(""));
        let (mut config, warnings) =
            validate::validate(source, base_dir).map_err(|problems| ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })?;
        config.warnings = render_problems(path, &warnings)
            .lines()
            .map(str::to_owned)
            .collect();
        Ok(config)
    }

    /// One line for `check`: what the file configures.
    pub fn summary(&self) -> String {
        format!(
            "{} provider(s), {} credential(s), {} route(s); listening on {}{}",
            self.providers.len(),
            self.credentials.len(),
            self.routes.len(),
            self.server.listen,
            self.server
                .admin_listen
                .map(|admin| format!(", admin on {admin}"))
                .unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests;
