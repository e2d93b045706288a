//! Client assertions (RFC 7523; OpenID Connect Core §9): the client proves itself with a short,
//! signed JWT instead of sending a secret — `client_secret_jwt` signs it HS256 with the client
//! secret, `private_key_jwt` RS256, PS256 or ES256 with a PKCS#8 PEM key. Signing is
//! jsonwebtoken's (on ring); every key is tried once at config load, so a key that cannot sign
//! is a `check` error, not a failed fetch.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::FetchError;
use crate::secret::Secret;

/// `client_assertion_type` for a JWT assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long an assertion is valid (OpenID Connect asks for a short `exp`; at most 5 minutes).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// The signing algorithms `private_key_jwt` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlg {
    Rs256,
    Ps256,
    Es256,
}

/// Why a signing key cannot be used; the text names the key's problem, never the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is an encrypted PEM; give the sidecar a decrypted PKCS#8 key (openssl pkcs8 -topk8 -nocrypt)")]
    Encrypted,
    #[error("the key is not a PKCS#8 PEM RSA or EC P-256 private key")]
    Unsupported,
    #[error("{alg} needs an {needs} key, but this is an {found} key")]
    Mismatch {
        alg: &'static str,
        needs: &'static str,
        found: &'static str,
    },
    #[error("the key cannot sign {alg} (RSA keys must have at least 2048 bits): {reason}")]
    CannotSign { alg: &'static str, reason: String },
}

/// How to sign one credential's assertions.
#[derive(Clone)]
pub struct Assertion {
    algorithm: Algorithm,
    key: Arc<EncodingKey>,
    kid: Option<String>,
    client_id: String,
    audience: String,
    /// SHA-256 of the key material: part of the credential's identity, never the key.
    key_digest: String,
}

impl fmt::Debug for Assertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assertion")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .field("audience", &self.audience)
            .field("key", &format_args!("sha256:{}", &self.key_digest[..12]))
            .finish()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

impl Assertion {
    /// `client_secret_jwt`: HS256 with the client secret.
    pub fn client_secret_jwt(secret: &Secret, client_id: &str, audience: &str, kid: Option<String>) -> Self {
        Self {
            algorithm: Algorithm::HS256,
            key: Arc::new(EncodingKey::from_secret(secret.expose().as_bytes())),
            kid,
            client_id: client_id.to_owned(),
            audience: audience.to_owned(),
            key_digest: digest(secret.expose()),
        }
    }

    /// `private_key_jwt` with `pem` (a PKCS#8 RSA or EC P-256 key); `alg` defaults to RS256
    /// for RSA keys and ES256 for EC keys. The key signs once here, so that it is known to work.
    pub fn private_key_jwt(
        pem: &Secret,
        alg: Option<SigningAlg>,
        kid: Option<String>,
        client_id: &str,
        audience: &str,
    ) -> Result<Self, KeyError> {
        let text = pem.expose();
        if text.contains("ENCRYPTED") {
            return Err(KeyError::Encrypted);
        }
        let (key, found) = match (
            EncodingKey::from_rsa_pem(text.as_bytes()),
            EncodingKey::from_ec_pem(text.as_bytes()),
        ) {
            (Ok(key), _) => (key, "RSA"),
            (_, Ok(key)) => (key, "EC"),
            _ => return Err(KeyError::Unsupported),
        };
        let alg = alg.unwrap_or(if found == "RSA" {
            SigningAlg::Rs256
        } else {
            SigningAlg::Es256
        });
        let (algorithm, name, needs) = match alg {
            SigningAlg::Rs256 => (Algorithm::RS256, "RS256", "RSA"),
            SigningAlg::Ps256 => (Algorithm::PS256, "PS256", "RSA"),
            SigningAlg::Es256 => (Algorithm::ES256, "ES256", "EC"),
        };
        if needs != found {
            return Err(KeyError::Mismatch {
                alg: name,
                needs,
                found,
            });
        }
        let assertion = Self {
            algorithm,
            key: Arc::new(key),
            kid,
            client_id: client_id.to_owned(),
            audience: audience.to_owned(),
            key_digest: digest(text),
        };
        assertion
            .sign(SystemTime::now())
            .map_err(|err| KeyError::CannotSign {
                alg: name,
                reason: err.to_string(),
            })?;
        Ok(assertion)
    }

    /// A fresh assertion: `iss` = `sub` = client id, `aud`, a unique `jti`, `iat` now and `exp`
    /// a minute later.
    pub fn sign(&self, now: SystemTime) -> Result<String, jsonwebtoken::errors::Error> {
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            iss: &self.client_id,
            sub: &self.client_id,
            aud: &self.audience,
            jti: hex::encode(rand::thread_rng().gen::<[u8; 16]>()),
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        let mut header = Header::new(self.algorithm);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, &claims, &self.key)
    }

    /// The body fields that carry a fresh assertion.
    pub fn fields(&self, now: SystemTime) -> Result<[(&'static str, String); 2], FetchError> {
        let signed = self
            .sign(now)
            .map_err(|_| FetchError::malformed("the client assertion could not be signed"))?;
        Ok([
            ("client_assertion_type", ASSERTION_TYPE.to_owned()),
            ("client_assertion", signed),
        ])
    }

    /// What the credential's identity takes from the assertion: never the key.
    pub fn identity_part(&self) -> String {
        format!(
            "{:?}|{:?}|{}|{}",
            self.algorithm, self.kid, self.audience, self.key_digest
        )
    }
}

fn digest(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec_key() -> (Secret, String) {
        let pair = rcgen::KeyPair::generate().unwrap();
        (Secret::new(pair.serialize_pem()), pair.public_key_pem())
    }

    #[test]
    fn an_es256_assertion_verifies_with_the_public_key_and_carries_the_claims() {
        let (private, public) = ec_key();
        let assertion =
            Assertion::private_key_jwt(&private, None, Some("k1".into()), "acme", "https://as/token")
                .unwrap();
        let jwt = assertion.sign(SystemTime::now()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_ec_pem(public.as_bytes()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["https://as/token"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&jwt, &key, &validation).unwrap();
        assert_eq!(data.header.kid.as_deref(), Some("k1"));
        assert_eq!(data.claims["iss"], "acme");
        assert_eq!(data.claims["sub"], "acme");
        let (iat, exp) = (
            data.claims["iat"].as_u64().unwrap(),
            data.claims["exp"].as_u64().unwrap(),
        );
        assert!(exp > iat && exp - iat <= 300, "a short exp");
        let other = assertion.sign(SystemTime::now()).unwrap();
        let jti = |jwt: &str| {
            jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &validation)
                .unwrap()
                .claims["jti"]
                .clone()
        };
        assert_ne!(jti(&jwt), jti(&other), "a unique jti per assertion");
    }

    #[test]
    fn a_key_that_does_not_fit_the_algorithm_is_refused() {
        let (ec, _) = ec_key();
        let err = Assertion::private_key_jwt(&ec, Some(SigningAlg::Rs256), None, "a", "b").unwrap_err();
        assert_eq!(err.to_string(), "RS256 needs an RSA key, but this is an EC key");
        let err = Assertion::private_key_jwt(&Secret::new("not a key"), None, None, "a", "b").unwrap_err();
        assert_eq!(err, KeyError::Unsupported);
    }

    #[test]
    fn debug_shows_no_key() {
        let secret = Secret::new("hs256-client-secret");
        let printed = format!("{:?}", Assertion::client_secret_jwt(&secret, "a", "b", None));
        assert!(!printed.contains("hs256-client-secret"), "{printed}");
    }
}
