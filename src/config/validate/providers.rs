//! Validation of `[providers]` and `[credentials]`: each provider's settings, then each
//! credential's token request, built by its dialect in [`crate::token::dialect`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::raw::{
    RawBodyEncoding, RawClientAuth, RawClientKeys, RawCredential, RawProvider, RawProviderKind, RawSecret,
    RawSigningAlg, RawTimeUnit, RawTokenChars,
};
use crate::config::validate::values::{MINUTE, YEAR};
use crate::config::validate::{suggest, Validator};
use crate::config::KeyPath;
use crate::secret::Secret;
use crate::tls::ClientIdentity;
use crate::token::assertion::{Assertion, SigningAlg};
use crate::token::budget::FetchRate;
use crate::token::dialect::nuapay::OrganisationToken;
use crate::token::dialect::oauth2::{ClientAuth, OAuth2Client};
use crate::token::dialect::{
    credential_identity, nuapay, oauth2, BodyEncoding, Identity, ResponseSpec, TimeUnit, TokenChars,
    TokenRequest,
};
use crate::token::dpop::DpopKey;
use crate::token::spec::{CredentialSpec, ProviderKind, ProviderSpec};

/// Why a fleet needs its DPoP key in a file.
const FLEET_DPOP_KEY: &str =
    "with [cache.shared], dpop_key must be a file ({ file = \"...\" }) so that the whole fleet proves with one key";

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Draft of a provider, kept until its credentials are built.
pub(super) struct ProviderDraft {
    pub(super) spec: Arc<ProviderSpec>,
    revoke_on_shutdown: bool,
    endpoint: Endpoint,
    scopes: Vec<String>,
}

/// The keys a provider and its credentials share (a credential's own win): its assertion
/// settings, before the key is known to sign, extra body fields and DPoP.
#[derive(Clone, Default)]
pub(super) struct ClientDraft {
    /// The signing key and where it was configured (for errors).
    key: Option<(Secret, KeyPath)>,
    alg: Option<SigningAlg>,
    kid: Option<String>,
    audience: Option<String>,
    params: Vec<(String, String)>,
    /// `dpop`, and the table it was set in.
    dpop: Option<(bool, KeyPath)>,
    /// `dpop_key`, read and checked (`None` inside: it has a problem, reported).
    dpop_key: Option<DpopKeyDraft>,
}

#[derive(Clone)]
pub(super) struct DpopKeyDraft {
    key: Option<Arc<DpopKey>>,
    path: KeyPath,
    from_file: bool,
}

/// A provider's endpoint, by dialect: what its credentials' token requests are built from.
pub(super) enum Endpoint {
    OAuth2(OAuth2Endpoint),
    Nuapay(NuapayEndpoint),
}

pub(super) struct OAuth2Endpoint {
    url: Arc<reqwest::Url>,
    encoding: BodyEncoding,
    client_auth: RawClientAuth,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    keys: Box<ClientDraft>,
}

pub(super) struct NuapayEndpoint {
    base_url: reqwest::Url,
    api_key: Secret,
    expires_in: Option<Duration>,
}

impl Validator {
    pub(super) fn provider(
        &mut self,
        path: &KeyPath,
        name: &str,
        raw: &RawProvider,
    ) -> Option<ProviderDraft> {
        let kind = match raw.kind.unwrap_or(RawProviderKind::Oauth2) {
            RawProviderKind::Oauth2 => ProviderKind::OAuth2,
            RawProviderKind::Nuapay => ProviderKind::Nuapay,
        };
        self.reject_keys_of_other_kind(path, kind, raw);
        let connect_timeout = self.nonzero(
            &path.key("connect_timeout"),
            raw.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
            10 * MINUTE,
        );
        let timeout = self.nonzero(
            &path.key("timeout"),
            raw.timeout,
            DEFAULT_FETCH_TIMEOUT,
            10 * MINUTE,
        );
        let default_ttl = match raw.default_ttl {
            Some(ttl) if ttl.is_zero() => {
                self.problem(&path.key("default_ttl"), "must not be zero");
                None
            }
            Some(ttl) => self.at_most(&path.key("default_ttl"), ttl, YEAR),
            None => None,
        };
        let (endpoint, mut response) = match kind {
            ProviderKind::OAuth2 => self.oauth2_endpoint(path, raw, default_ttl)?,
            ProviderKind::Nuapay => self.nuapay_endpoint(path, raw, default_ttl)?,
        };
        response.token_chars = match raw.token_chars.unwrap_or(RawTokenChars::Token68) {
            RawTokenChars::Token68 => TokenChars::Token68,
            RawTokenChars::VisibleAscii => TokenChars::VisibleAscii,
        };
        if raw.revoke_on_shutdown && self.shared_cache {
            self.warning(
                &path.key("revoke_on_shutdown"),
                "with [cache.shared] a token is revoked only by the last sidecar of the fleet to stop \
                 (or drop it), and only while Redis answers; a sidecar that is killed revokes nothing",
            );
        }
        Some(ProviderDraft {
            revoke_on_shutdown: raw.revoke_on_shutdown,
            spec: Arc::new(ProviderSpec {
                budget: self.fetch_rate(path, raw),
                name: name.into(),
                kind,
                client_identity: self
                    .identity_ref(&path.key("client_identity"), raw.client_identity.as_deref()),
                connect_timeout,
                timeout,
                response,
            }),
            endpoint,
            scopes: raw.scopes.clone().unwrap_or_default(),
        })
    }

    /// `max_fetch_rate` and `max_fetch_burst`, when a rate is given.
    fn fetch_rate(&mut self, path: &KeyPath, raw: &RawProvider) -> Option<FetchRate> {
        let burst_path = path.key("max_fetch_burst");
        let Some(text) = &raw.max_fetch_rate else {
            if raw.max_fetch_burst.is_some() {
                self.problem(&burst_path, "is used only with max_fetch_rate");
            }
            return None;
        };
        let rate_path = path.key("max_fetch_rate");
        let parsed = text.split_once('/').and_then(|(count, per)| {
            let count: u32 = count.trim().parse().ok().filter(|count| *count > 0)?;
            let period = match per.trim() {
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3600),
                _ => return None,
            };
            Some(period / count)
        });
        let Some(interval) = parsed.filter(|interval| !interval.is_zero()) else {
            self.problem(
                &rate_path,
                format!("`{text}` is not a rate such as \"50/s\", \"3000/m\" or \"100000/h\""),
            );
            return None;
        };
        let burst = raw.max_fetch_burst.unwrap_or(1);
        if burst == 0 || burst > 10_000 {
            self.problem(&burst_path, "must be between 1 and 10000");
            return None;
        }
        Some(FetchRate { interval, burst })
    }

    pub(super) fn reject_keys_of_other_kind(
        &mut self,
        path: &KeyPath,
        kind: ProviderKind,
        raw: &RawProvider,
    ) {
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
            ("dpop", raw.dpop.is_some()),
            ("dpop_key", raw.dpop_key.is_some()),
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

    pub(super) fn oauth2_endpoint(
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
        let token = pointer(self, "token_field", &raw.token_field, Some(oauth2::TOKEN_POINTER));
        let expires_in = pointer(
            self,
            "expires_in_field",
            &raw.expires_in_field,
            Some(oauth2::EXPIRES_IN_POINTER),
        );
        let expires_at = pointer(self, "expires_at_field", &raw.expires_at_field, None);
        if raw.expires_at_unit.is_some() && raw.expires_at_field.is_none() {
            self.problem(&path.key("expires_at_unit"), "needs expires_at_field");
        }
        let unit = match raw.expires_at_unit.unwrap_or(RawTimeUnit::S) {
            RawTimeUnit::S => TimeUnit::Seconds,
            RawTimeUnit::Ms => TimeUnit::Millis,
        };
        let endpoint = Endpoint::OAuth2(OAuth2Endpoint {
            url: Arc::new(url?),
            encoding: match raw.body.unwrap_or(RawBodyEncoding::Form) {
                RawBodyEncoding::Form => BodyEncoding::Form,
                RawBodyEncoding::Json => BodyEncoding::Json,
            },
            client_auth: raw.client_auth.unwrap_or(RawClientAuth::Body),
            client_id: self.text(&path.key("client_id"), raw.client_id.as_ref()),
            client_secret,
            keys: Box::new(self.client_keys(path, &raw.client_keys(), ClientDraft::default())),
        });
        let response = ResponseSpec {
            token: token??,
            expires_in: expires_in?,
            expires_at: expires_at?.map(|p| (p, unit)),
            default_ttl,
            ..ResponseSpec::oauth2()
        };
        Some((endpoint, response))
    }

    pub(super) fn nuapay_endpoint(
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
            if !nuapay::EXPIRES_IN_RANGE.contains(&expires_in) {
                self.problem(
                    &path.key("expires_in"),
                    "Nuapay accepts 10s up to 31556926s (one year)",
                );
            }
        }
        let endpoint = Endpoint::Nuapay(NuapayEndpoint {
            base_url: base_url?,
            api_key: api_key?,
            expires_in: raw.expires_in,
        });
        let response =
            ResponseSpec::nuapay(default_ttl.unwrap_or(raw.expires_in.unwrap_or(nuapay::DEFAULT_TTL)));
        Some((endpoint, response))
    }

    pub(super) fn credential(
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
            Endpoint::OAuth2(endpoint) => self.oauth2_request(path, raw, provider, endpoint, scopes)?,
            Endpoint::Nuapay(endpoint) => self.nuapay_request(path, raw, endpoint, scopes)?,
        };
        Some(Arc::new(CredentialSpec {
            name: name.into(),
            identity: with_client_identity(
                credential_identity(&request, &provider.spec.response),
                provider.spec.client_identity.as_deref(),
            ),
            provider: provider.spec.clone(),
            request,
            prefetch: raw.prefetch,
            revoke_on_shutdown: provider.revoke_on_shutdown,
        }))
    }

    pub(super) fn oauth2_request(
        &mut self,
        path: &KeyPath,
        raw: &RawCredential,
        provider: &ProviderDraft,
        endpoint: &OAuth2Endpoint,
        scopes: Vec<String>,
    ) -> Option<TokenRequest> {
        let OAuth2Endpoint {
            url,
            encoding,
            client_auth,
            client_id,
            client_secret,
            keys,
        } = endpoint;
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
        let keys = self.client_keys(path, &raw.client_keys(), (**keys).clone());
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
        let audience = keys.audience.clone().unwrap_or_else(|| url.to_string());
        let auth = match client_auth {
            RawClientAuth::TlsClientAuth => {
                if provider.spec.client_identity.is_none() {
                    self.problem(
                        path,
                        format!(
                            "client_auth = tls_client_auth needs client_identity on provider `{provider_name}`"
                        ),
                    );
                    return None;
                }
                self.refuse_signing_keys(&keys, *client_auth);
                ClientAuth::TlsClientAuth
            }
            RawClientAuth::PrivateKeyJwt => {
                ClientAuth::PrivateKeyJwt(self.private_key_assertion(path, &keys, &client_id, &audience)?)
            }
            RawClientAuth::Body => ClientAuth::Body {
                secret: self.client_secret(path, client_secret, &keys, provider, *client_auth)?,
            },
            RawClientAuth::Basic => ClientAuth::Basic {
                secret: self.client_secret(path, client_secret, &keys, provider, *client_auth)?,
            },
            RawClientAuth::ClientSecretJwt => ClientAuth::ClientSecretJwt {
                secret: self.client_secret(path, client_secret, &keys, provider, *client_auth)?,
                audience,
                kid: keys.kid.clone(),
            },
        };
        let dpop = self.dpop(&keys).ok()?;
        let client = OAuth2Client {
            url: url.clone(),
            encoding: *encoding,
            client_id,
            auth,
            scopes,
            params: keys.params,
            dpop,
        };
        Some(client.token_request())
    }

    /// The client secret of a method that sends or signs with one: it must be there, and no
    /// signing key may be configured beside it.
    fn client_secret(
        &mut self,
        path: &KeyPath,
        secret: Option<Secret>,
        keys: &ClientDraft,
        provider: &ProviderDraft,
        client_auth: RawClientAuth,
    ) -> Option<Secret> {
        let Some(secret) = secret else {
            self.problem(
                path,
                format!(
                    "needs client_id and client_secret, here or on provider `{}`",
                    provider.spec.name
                ),
            );
            return None;
        };
        self.refuse_signing_keys(keys, client_auth);
        Some(secret)
    }

    /// A provider's client keys, with a credential's own (`raw`) winning.
    pub(super) fn client_keys(
        &mut self,
        path: &KeyPath,
        raw: &RawClientKeys<'_>,
        base: ClientDraft,
    ) -> ClientDraft {
        let key = match raw.signing_key {
            Some(key) => self
                .secret(&path.key("signing_key"), key)
                .map(|key| (key, path.key("signing_key"))),
            None => base.key,
        };
        let mut params = base.params;
        for (name, value) in raw.params.into_iter().flatten() {
            if oauth2::MANAGED_FIELDS.contains(&name.as_str()) {
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
        let dpop_key = match raw.dpop_key {
            Some(key) => Some(self.dpop_key_draft(&path.key("dpop_key"), key)),
            None => base.dpop_key,
        };
        ClientDraft {
            key,
            alg: alg.or(base.alg),
            kid: raw.signing_kid.cloned().or(base.kid),
            audience: raw.assertion_audience.cloned().or(base.audience),
            params,
            dpop: raw.dpop.map(|dpop| (dpop, path.clone())).or(base.dpop),
            dpop_key,
        }
    }

    /// A `dpop_key`, read once where it is configured.
    fn dpop_key_draft(&mut self, path: &KeyPath, raw: &RawSecret) -> DpopKeyDraft {
        let key = self
            .secret(path, raw)
            .and_then(|pem| match DpopKey::from_pem(&pem) {
                Ok(key) => Some(Arc::new(key)),
                Err(err) => {
                    self.problem(path, err.to_string());
                    None
                }
            });
        DpopKeyDraft {
            key,
            path: path.clone(),
            from_file: matches!(raw, RawSecret::File(_)),
        }
    }

    /// The key a credential's DPoP proofs are signed with: `Ok(None)` without `dpop = true`;
    /// `dpop_key`, or the process's own key (not with a fleet: its members must share one).
    fn dpop(&mut self, keys: &ClientDraft) -> Result<Option<Arc<DpopKey>>, ()> {
        let Some((true, table)) = &keys.dpop else {
            if let Some(draft) = &keys.dpop_key {
                self.problem(&draft.path, "is used only with dpop = true");
                return Err(());
            }
            return Ok(None);
        };
        match &keys.dpop_key {
            Some(draft) if self.shared_cache && !draft.from_file => {
                self.problem(&draft.path, FLEET_DPOP_KEY);
                Err(())
            }
            Some(draft) => draft.key.clone().map(Some).ok_or(()),
            None if self.shared_cache => {
                self.problem(&table.key("dpop_key"), format!("missing: {FLEET_DPOP_KEY}"));
                Err(())
            }
            None => match DpopKey::generated() {
                Ok(key) => Ok(Some(key)),
                Err(err) => {
                    self.problem(&table.key("dpop"), err.to_string());
                    Err(())
                }
            },
        }
    }

    /// The `private_key_jwt` assertion: the key must be there and sign.
    pub(super) fn private_key_assertion(
        &mut self,
        path: &KeyPath,
        signing: &ClientDraft,
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

    pub(super) fn refuse_signing_keys(&mut self, signing: &ClientDraft, client_auth: RawClientAuth) {
        if let Some((_, key_path)) = &signing.key {
            self.problem(
                key_path,
                format!("is used only with client_auth = private_key_jwt (this one has {client_auth:?})"),
            );
        }
    }

    pub(super) fn nuapay_request(
        &mut self,
        path: &KeyPath,
        raw: &RawCredential,
        endpoint: &NuapayEndpoint,
        scopes: Vec<String>,
    ) -> Option<TokenRequest> {
        let NuapayEndpoint {
            base_url,
            api_key,
            expires_in,
        } = endpoint;
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
        let keys = raw.client_keys();
        for (key, present) in [
            ("signing_key", keys.signing_key.is_some()),
            ("signing_alg", keys.signing_alg.is_some()),
            ("signing_kid", keys.signing_kid.is_some()),
            ("assertion_audience", keys.assertion_audience.is_some()),
            ("params", keys.params.is_some()),
            ("dpop", keys.dpop.is_some()),
            ("dpop_key", keys.dpop_key.is_some()),
        ] {
            if present {
                self.problem(&path.key(key), "not a key of a nuapay credential");
            }
        }
        let organisation = self.text(&path.key("organisation"), raw.organisation.as_ref());
        let organisation = match (organisation.as_deref(), &raw.organisation) {
            (Some(org), _) if nuapay::is_organisation_id(org) => org,
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
        let request = OrganisationToken {
            base_url: base_url.clone(),
            api_key: api_key.clone(),
            organisation: organisation.to_owned(),
            scopes,
            expires_in: *expires_in,
        };
        Some(request.token_request())
    }
}

/// A credential's identity, also bound to the client certificate its tokens are fetched with
/// (certificate-bound tokens, RFC 8705): rotating the certificate gets a new token.
fn with_client_identity(identity: Identity, client: Option<&ClientIdentity>) -> Identity {
    match client {
        Some(client) => Identity::from_digest(
            Sha256::new()
                .chain_update(identity.to_bytes())
                .chain_update(client.digest.as_bytes()),
        ),
        None => identity,
    }
}
