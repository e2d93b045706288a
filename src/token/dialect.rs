//! Provider dialects as data: what to send to a token endpoint and how to read its answer.
//!
//! Every provider, OAuth2 or Nuapay, compiles at config load into a [`TokenRequest`] (URL,
//! encoding, body fields, client authentication) and a [`ResponseSpec`] (JSON pointers and
//! units). [`parse_response`] is the one place that turns an endpoint's answer into a token.
//! Each dialect builds its request in its own module: [`oauth2`] (with the client
//! authentication methods) and [`nuapay`].

pub mod nuapay;
pub mod oauth2;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use serde_json::Value;

use super::assertion::Assertion;
use super::dpop::DpopKey;
use super::error::FetchError;
use super::jwt;
use crate::secret::{AccessToken, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    Form,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnit {
    Seconds,
    Millis,
}

/// A token request body field's name. The dialects' own are [`shared`], so 10,000
/// credentials do not hold 10,000 copies.
pub type FieldName = Arc<str>;

/// One field of a token request body: 24 bytes, three of them per credential.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyValue {
    /// [`shared`] where the dialect fixes it (`client_credentials`).
    Text(Arc<str>),
    Secret(Secret),
    List(Box<[String]>),
    Number(u64),
}

/// One `Arc` of each name or value a dialect fixes, for every credential that sends it.
pub fn shared(text: &'static str) -> Arc<str> {
    static SHARED: LazyLock<Mutex<HashMap<&'static str, Arc<str>>>> = LazyLock::new(Mutex::default);
    let mut shared = crate::sync::lock(&SHARED);
    shared.entry(text).or_insert_with(|| text.into()).clone()
}

/// Everything needed to ask one token endpoint for one credential's token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Shared by a provider's credentials where it is the provider's (OAuth2 `token_url`).
    pub url: Arc<reqwest::Url>,
    pub encoding: BodyEncoding,
    pub fields: Vec<(FieldName, BodyValue)>,
    /// A ready `Authorization` header value (`Basic …`), when the client authenticates that way.
    pub authorization: Option<Secret>,
    /// Every secret this request carries, as configured: an error answer that echoes one is
    /// never passed on.
    pub secrets: Vec<Secret>,
    /// A client assertion signed afresh for each request (`client_secret_jwt`,
    /// `private_key_jwt`).
    pub assertion: Option<Box<Assertion>>,
    /// The key DPoP proofs are signed with, when the provider binds tokens to one (RFC 9449).
    pub dpop: Option<Arc<DpopKey>>,
}

impl TokenRequest {
    /// The body as bytes, with its content type. Secrets are exposed here and nowhere else.
    /// With an assertion, its fields signed at `now` come last.
    pub fn encode_body(&self, now: SystemTime) -> Result<(&'static str, Vec<u8>), FetchError> {
        let signed = match &self.assertion {
            Some(assertion) => assertion.fields(now)?.to_vec(),
            None => Vec::new(),
        };
        Ok(match self.encoding {
            BodyEncoding::Form => {
                let pairs: Vec<(&str, String)> = self
                    .fields
                    .iter()
                    .map(|(name, value)| (name.as_ref(), form_text(value)))
                    .chain(signed)
                    .collect();
                let body = serde_urlencoded::to_string(pairs).unwrap_or_default();
                ("application/x-www-form-urlencoded", body.into_bytes())
            }
            BodyEncoding::Json => {
                let object: serde_json::Map<String, Value> = self
                    .fields
                    .iter()
                    .map(|(name, value)| (name.to_string(), json_value(value)))
                    .chain(
                        signed
                            .into_iter()
                            .map(|(name, value)| (name.to_owned(), Value::from(value))),
                    )
                    .collect();
                ("application/json", Value::Object(object).to_string().into_bytes())
            }
        })
    }
}

fn form_text(value: &BodyValue) -> String {
    match value {
        BodyValue::Text(text) => text.to_string(),
        BodyValue::Secret(secret) => secret.expose().to_owned(),
        BodyValue::List(items) => items.join(" "),
        BodyValue::Number(number) => number.to_string(),
    }
}

fn json_value(value: &BodyValue) -> Value {
    match value {
        BodyValue::Text(text) => Value::from(&**text),
        BodyValue::Secret(secret) => Value::from(secret.expose()),
        BodyValue::List(items) => Value::from(items.to_vec()),
        BodyValue::Number(number) => Value::from(*number),
    }
}

/// What makes two credentials' tokens interchangeable: the endpoint, the request sent to it
/// (secrets only as digests) and how its answer is read. A SHA-256 (its first 128 bits), never
/// a secret: the token cache is keyed by it, so a credential keeps its token across a reload
/// exactly when none of this changed.
pub fn credential_identity(request: &TokenRequest, response: &ResponseSpec) -> Identity {
    let mut hasher = request.digest(Secrets::AsDigests);
    hash_part(&mut hasher, &format!("{response:?}"));
    Identity::from_digest(hasher)
}

/// A credential's identity ([`credential_identity`]): held inline, one per credential and per
/// cached token, so 16 bytes rather than a 64-character hex string on the heap. A collision
/// needs some 2^64 credentials.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity([u8; 16]);

impl Identity {
    /// The first 128 bits of `hasher`'s digest.
    pub fn from_digest(hasher: Sha256) -> Self {
        let digest = hasher.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self(first)
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// A test's identity, told apart by `name`.
    #[cfg(test)]
    pub fn named(name: &str) -> Self {
        Self::from_digest(Sha256::new_with_prefix(name))
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", hex::encode(self.0))
    }
}

/// How [`TokenRequest::digest`] treats the request's secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Each secret's SHA-256 goes in: the digest changes when a secret does.
    AsDigests,
    /// Secrets are left out: the digest is the same for every holder of the same client id.
    Left,
}

impl TokenRequest {
    /// A SHA-256 of the endpoint, the encoding and the body fields (secrets as `secrets` says);
    /// never a secret itself.
    pub fn digest(&self, secrets: Secrets) -> Sha256 {
        let secret_digest = |secret: &Secret| hex::encode(Sha256::digest(secret.expose().as_bytes()));
        let mut hasher = Sha256::new();
        hash_part(&mut hasher, self.url.as_str());
        hash_part(&mut hasher, &format!("{:?}", self.encoding));
        for (name, value) in &self.fields {
            match (value, secrets) {
                (BodyValue::Secret(_), Secrets::Left) => continue,
                (BodyValue::Secret(secret), Secrets::AsDigests) => {
                    hash_part(&mut hasher, name);
                    hash_part(&mut hasher, &secret_digest(secret));
                }
                (other, _) => {
                    hash_part(&mut hasher, name);
                    hash_part(&mut hasher, &format!("{other:?}"));
                }
            }
        }
        // A bound token is useless without its key: the key's (public) thumbprint is part of
        // what the token depends on.
        if let Some(key) = &self.dpop {
            hash_part(&mut hasher, &format!("dpop:{}", key.thumbprint()));
        }
        if secrets == Secrets::AsDigests {
            let authorization = self.authorization.as_ref().map(secret_digest);
            hash_part(&mut hasher, &authorization.unwrap_or_default());
            let assertion = self.assertion.as_deref().map(Assertion::identity_part);
            hash_part(&mut hasher, &assertion.unwrap_or_default());
        }
        hasher
    }
}

/// One length-prefixed part of a digest, so that parts cannot run into each other.
fn hash_part(hasher: &mut Sha256, part: &str) {
    hasher.update((part.len() as u64).to_be_bytes());
    hasher.update(part.as_bytes());
}

/// Where the token and its expiry sit in an endpoint's JSON answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseSpec {
    /// JSON pointer to the token, e.g. `/access_token` or `/data/accessToken`.
    pub token: String,
    /// JSON pointer to a lifetime in seconds from now.
    pub expires_in: Option<String>,
    /// JSON pointer to an absolute expiry since the epoch.
    pub expires_at: Option<(String, TimeUnit)>,
    /// JSON pointer to the provider's issue time; with `expires_at` it yields a lifetime that
    /// does not depend on the provider's clock agreeing with ours.
    pub issued_at: Option<(String, TimeUnit)>,
    /// JSON pointer to the provider's id for the token (Nuapay's, for revocation).
    pub token_id: Option<String>,
    /// Lifetime when neither the answer nor the JWT says.
    pub default_ttl: Option<Duration>,
    /// Which characters a token may have to be accepted.
    pub token_chars: TokenChars,
}

/// The characters an access token may consist of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenChars {
    /// RFC 6750's `b64token` (RFC 7235 `token68`): letters, digits, `-._~+/`, then `=` padding.
    #[default]
    Token68,
    /// Any visible ASCII character (`!` to `~`), for providers whose tokens are not token68.
    VisibleAscii,
}

impl TokenChars {
    pub fn admits(self, token: &str) -> bool {
        match self {
            Self::Token68 => {
                let body = token.trim_end_matches('=');
                !body.is_empty()
                    && body
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
            }
            Self::VisibleAscii => token.bytes().all(|b| b.is_ascii_graphic()),
        }
    }
}

/// A token read from an endpoint's answer, with its expiry on our clock.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: AccessToken,
    pub expires_at: SystemTime,
    pub lifetime: Duration,
    pub token_id: Option<String>,
    /// `token_type` `DPoP` (RFC 9449): the token is bound to the key the request proved.
    pub dpop: bool,
}

/// A token that lives less than this cannot be used safely: it is a failed fetch.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// The longest token accepted (it goes in a header of every request).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The largest token answer we read; anything bigger is an error.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Reads a 2xx answer. `requested_at` is when we sent the request: lifetimes count from then,
/// so time spent in flight is never added to a token's life.
pub fn parse_response(
    spec: &ResponseSpec,
    body: &[u8],
    requested_at: SystemTime,
) -> Result<IssuedToken, FetchError> {
    let json: Value =
        serde_json::from_slice(body).map_err(|_| FetchError::malformed("answer is not JSON"))?;
    let token = match json.pointer(&spec.token) {
        Some(Value::String(token)) if !token.is_empty() => token,
        Some(Value::String(_)) => return Err(FetchError::malformed("token field is empty")),
        Some(_) => return Err(FetchError::malformed("token field is not a string")),
        None => return Err(FetchError::malformed("answer has no token field")),
    };
    if token.len() > MAX_TOKEN_BYTES {
        return Err(FetchError::malformed("token is longer than 16 KiB"));
    }
    if !spec.token_chars.admits(token) {
        return Err(FetchError::malformed(
            "token has characters outside the allowed set (token_chars)",
        ));
    }
    let expires_at = expiry(spec, &json, token, requested_at)?;
    let lifetime = expires_at
        .duration_since(requested_at)
        .ok()
        .filter(|lifetime| !lifetime.is_zero())
        .ok_or_else(|| FetchError::malformed("token had expired when it arrived"))?;
    if lifetime < MIN_LIFETIME {
        return Err(FetchError::malformed("token lives less than a second"));
    }
    let token_id = spec
        .token_id
        .as_deref()
        .and_then(|pointer| json.pointer(pointer))
        .and_then(|id| id.as_str().map(str::to_owned));
    let dpop = json
        .pointer("/token_type")
        .and_then(Value::as_str)
        .is_some_and(|token_type| token_type.eq_ignore_ascii_case(super::dpop::SCHEME));
    Ok(IssuedToken {
        token: AccessToken::new(token.as_str()),
        expires_at,
        lifetime,
        token_id,
        dpop,
    })
}

/// The earliest expiry the answer and the JWT state; `default_ttl` only when neither does.
fn expiry(
    spec: &ResponseSpec,
    json: &Value,
    token: &str,
    requested_at: SystemTime,
) -> Result<SystemTime, FetchError> {
    let mut candidates = Vec::new();
    if let Some(pointer) = &spec.expires_in {
        if let Some(seconds) = read_number(json, pointer, "expires_in field is not a number")? {
            candidates.push(requested_at + duration_from_secs(seconds));
        }
    }
    if let Some((pointer, unit)) = &spec.expires_at {
        if let Some(at) = read_number(json, pointer, "expiry time field is not a number")? {
            let issued = match &spec.issued_at {
                Some((pointer, unit)) => read_number(json, pointer, "issue time field is not a number")?
                    .map(|issued| to_seconds(issued, *unit)),
                None => None,
            };
            candidates.push(absolute_expiry(to_seconds(at, *unit), issued, requested_at));
        }
    }
    if let Some(times) = jwt::read_times(token) {
        if let Some(exp) = times.expires_at {
            candidates.push(absolute_expiry(exp, times.issued_at, requested_at));
        }
    }
    if candidates.is_empty() {
        let ttl = spec.default_ttl.ok_or_else(|| {
            FetchError::malformed("answer states no expiry and no default_ttl is configured")
        })?;
        candidates.push(requested_at + ttl);
    }
    Ok(candidates.into_iter().min().unwrap_or(requested_at))
}

/// An absolute expiry on our clock. With the provider's own issue time we keep only the
/// lifetime (`exp - iat`), which is immune to skew between its clock and ours.
fn absolute_expiry(expires_secs: f64, issued_secs: Option<f64>, requested_at: SystemTime) -> SystemTime {
    match issued_secs {
        Some(issued) if issued <= expires_secs => requested_at + duration_from_secs(expires_secs - issued),
        _ => SystemTime::UNIX_EPOCH + duration_from_secs(expires_secs),
    }
}

fn read_number(json: &Value, pointer: &str, wrong_type: &'static str) -> Result<Option<f64>, FetchError> {
    match json.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => number
            .as_f64()
            .map(Some)
            .ok_or_else(|| FetchError::malformed(wrong_type)),
        Some(Value::String(text)) => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .map(Some)
            .ok_or_else(|| FetchError::malformed(wrong_type)),
        Some(_) => Err(FetchError::malformed(wrong_type)),
    }
}

fn to_seconds(value: f64, unit: TimeUnit) -> f64 {
    match unit {
        TimeUnit::Seconds => value,
        TimeUnit::Millis => value / 1000.0,
    }
}

/// Seconds as a duration; negative or absurd values clamp to zero or ~100 years.
fn duration_from_secs(seconds: f64) -> Duration {
    const HUNDRED_YEARS: f64 = 100.0 * 365.0 * 86_400.0;
    Duration::from_secs_f64(seconds.clamp(0.0, HUNDRED_YEARS))
}

#[cfg(test)]
mod tests;
