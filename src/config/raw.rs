//! The TOML file as written: a serde mirror of the contract's keys, with no meaning attached.
//!
//! Every struct denies unknown keys. Validation into real types lives in `validate.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub identities: BTreeMap<String, RawIdentity>,
    pub egress: Option<RawEgress>,
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
}

/// `[telemetry]`: OpenTelemetry trace export (the `OTEL_*` variables say the same).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub headers: Option<BTreeMap<String, RawSecret>>,
    pub service_name: Option<String>,
    pub sampler: Option<String>,
    pub sampler_arg: Option<f64>,
    pub resource_attributes: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub metrics_listen: Option<String>,
    #[serde(default)]
    pub allow_non_loopback: bool,
    pub require_header: Option<RawRequireHeader>,
    pub max_request_body: Option<u64>,
    pub max_header_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub body_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_body_timeout: Option<Duration>,
    pub allowed_hosts: Option<Vec<String>>,
    pub access_log: Option<bool>,
    pub watch_config: Option<bool>,
}

/// `require_header = { name = "X-Sidecar-Key", value = { env = "…" } }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequireHeader {
    pub name: String,
    pub value: RawSecret,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub shared: Option<RawSharedCache>,
    pub refresh_fraction: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub max_refresh_ahead: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_expiry_margin: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub failure_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_failure_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_probe_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub retry_budget: Option<Duration>,
    pub max_concurrent_fetches: Option<usize>,
}

/// `[egress]`: every outbound connection through an HTTP CONNECT proxy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    pub proxy: Option<String>,
    /// `"user:password"`, sent as `Proxy-Authorization: Basic`.
    pub proxy_auth: Option<RawSecret>,
    /// Hosts reached directly.
    pub no_proxy: Option<Vec<String>>,
}

/// `[identities.NAME]`: a client certificate for mutual TLS.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub cert: Option<RawSecret>,
    pub key: Option<RawSecret>,
}

/// `[cache.shared]`: one token cache for a fleet of sidecars, on Redis.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSharedCache {
    pub redis_url: Option<RawSecret>,
    /// The ACL user.
    pub username: Option<RawSecret>,
    pub password: Option<RawSecret>,
    /// An `[identities]` entry, for a Redis that asks for client certificates.
    pub client_identity: Option<String>,
    /// Sentinel: the sentinels' `host:port`s and the master's name.
    pub sentinels: Option<Vec<String>>,
    pub sentinel_master: Option<String>,
    pub sentinel_password: Option<RawSecret>,
    /// Redis Cluster: seed nodes, `host:port`.
    pub cluster_nodes: Option<Vec<String>>,
    pub encryption_key: Option<RawSecret>,
    /// Earlier keys, still accepted for reading after a rotation.
    pub decryption_keys: Option<Vec<RawSecret>>,
    pub key_prefix: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub lock_ttl: Option<Duration>,
    pub replicas_hint: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawProviderKind {
    Oauth2,
    Nuapay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawBodyEncoding {
    Form,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawClientAuth {
    Body,
    Basic,
    ClientSecretJwt,
    PrivateKeyJwt,
    TlsClientAuth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RawSigningAlg {
    Rs256,
    Ps256,
    Es256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawTokenChars {
    Token68,
    VisibleAscii,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawTimeUnit {
    S,
    Ms,
}

/// A `[providers.NAME]` table; which keys apply depends on `kind`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: Option<RawProviderKind>,
    // oauth2
    pub token_url: Option<String>,
    pub body: Option<RawBodyEncoding>,
    pub client_auth: Option<RawClientAuth>,
    pub client_id: Option<RawSecret>,
    pub client_secret: Option<RawSecret>,
    // client assertions (private_key_jwt, client_secret_jwt), also on credentials
    pub signing_key: Option<RawSecret>,
    pub signing_alg: Option<RawSigningAlg>,
    pub signing_kid: Option<String>,
    pub assertion_audience: Option<String>,
    /// Extra fields sent in the token request body.
    pub params: Option<BTreeMap<String, String>>,
    // DPoP (RFC 9449), also on credentials
    pub dpop: Option<bool>,
    pub dpop_key: Option<RawSecret>,
    pub token_field: Option<String>,
    pub expires_in_field: Option<String>,
    pub expires_at_field: Option<String>,
    pub expires_at_unit: Option<RawTimeUnit>,
    #[serde(default, with = "humantime_serde")]
    pub default_ttl: Option<Duration>,
    pub scopes: Option<Vec<String>>,
    // nuapay
    pub base_url: Option<String>,
    pub api_key: Option<RawSecret>,
    #[serde(default, with = "humantime_serde")]
    pub expires_in: Option<Duration>,
    #[serde(default)]
    pub revoke_on_shutdown: bool,
    // both
    /// `"50/s"`, `"3000/m"`, `"100000/h"`: token requests to this endpoint at most.
    pub max_fetch_rate: Option<String>,
    pub max_fetch_burst: Option<u32>,
    pub client_identity: Option<String>,
    pub token_chars: Option<RawTokenChars>,
    #[serde(default)]
    pub allow_plaintext: bool,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// A `[credentials.NAME]` table: one merchant at one provider.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub provider: Option<String>,
    pub client_id: Option<RawSecret>,
    pub client_secret: Option<RawSecret>,
    pub organisation: Option<RawSecret>,
    // client assertions: these win over the provider's
    pub signing_key: Option<RawSecret>,
    pub signing_alg: Option<RawSigningAlg>,
    pub signing_kid: Option<String>,
    pub assertion_audience: Option<String>,
    /// Extra fields sent in the token request body.
    pub params: Option<BTreeMap<String, String>>,
    pub dpop: Option<bool>,
    pub dpop_key: Option<RawSecret>,
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub prefetch: bool,
}

/// One `[[routes]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path_prefix: Option<String>,
    pub host: Option<String>,
    pub upstream: Option<String>,
    pub credential: Option<String>,
    pub credential_header: Option<String>,
    pub credentials: Option<Vec<String>>,
    pub client_identity: Option<String>,
    pub inject: Option<RawInject>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub allow_plaintext: bool,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub purge_on_status: Option<Vec<u16>>,
    pub replay_body_limit: Option<u64>,
}

/// The keys a provider and its credentials share (a credential's own win): client assertions,
/// extra body fields and DPoP.
pub struct RawClientKeys<'r> {
    pub signing_key: Option<&'r RawSecret>,
    pub signing_alg: Option<RawSigningAlg>,
    pub signing_kid: Option<&'r String>,
    pub assertion_audience: Option<&'r String>,
    pub params: Option<&'r BTreeMap<String, String>>,
    pub dpop: Option<bool>,
    pub dpop_key: Option<&'r RawSecret>,
}

macro_rules! client_keys {
    ($table:ty) => {
        impl $table {
            pub fn client_keys(&self) -> RawClientKeys<'_> {
                RawClientKeys {
                    signing_key: self.signing_key.as_ref(),
                    signing_alg: self.signing_alg,
                    signing_kid: self.signing_kid.as_ref(),
                    assertion_audience: self.assertion_audience.as_ref(),
                    params: self.params.as_ref(),
                    dpop: self.dpop,
                    dpop_key: self.dpop_key.as_ref(),
                }
            }
        }
    };
}
client_keys!(RawProvider);
client_keys!(RawCredential);

/// `"literal"`, `{ env = "NAME" }` or `{ file = "/path" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSecret {
    Literal(String),
    Env(String),
    File(PathBuf),
}

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;

        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = RawSecret;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a string, { env = "NAME" } or { file = "/path" }"#)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawSecret, E> {
                Ok(RawSecret::Literal(value.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSecret, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        r#"empty secret table: expected { env = "NAME" } or { file = "/path" }"#,
                    ));
                };
                let secret = match key.as_str() {
                    "env" => RawSecret::Env(map.next_value()?),
                    "file" => RawSecret::File(map.next_value()?),
                    other => return Err(de::Error::unknown_field(other, &["env", "file"])),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "a secret takes exactly one of `env` or `file`, found also `{extra}`"
                    )));
                }
                Ok(secret)
            }
        }

        deserializer.deserialize_any(SecretVisitor)
    }
}

/// `"bearer"`, `"basic-username"` or `{ header = "X-Auth", format = "{token}" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawInject {
    Bearer,
    BasicUsername,
    Header { header: String, format: Option<String> },
}

impl<'de> Deserialize<'de> for RawInject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InjectVisitor;

        impl<'de> Visitor<'de> for InjectVisitor {
            type Value = RawInject;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""bearer", "basic-username" or { header = "X-Name", format = "{token}" }"#)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawInject, E> {
                match value {
                    "bearer" => Ok(RawInject::Bearer),
                    "basic-username" => Ok(RawInject::BasicUsername),
                    other => Err(de::Error::unknown_variant(other, &["bearer", "basic-username"])),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawInject, A::Error> {
                let mut header = None;
                let mut format = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "header" => header = Some(map.next_value()?),
                        "format" => format = Some(map.next_value()?),
                        other => return Err(de::Error::unknown_field(other, &["header", "format"])),
                    }
                }
                let header = header.ok_or_else(|| de::Error::missing_field("header"))?;
                Ok(RawInject::Header { header, format })
            }
        }

        deserializer.deserialize_any(InjectVisitor)
    }
}
