//! DPoP (RFC 9449): proof of possession of a key for sender-constrained tokens. Each token
//! request, and each request a DPoP-bound token is sent with, carries a fresh proof: a JWT
//! (`typ` `dpop+jwt`, ES256, the public key as `jwk`) with `htm`, `htu`, `iat`, a unique `jti`,
//! `ath` (the token's SHA-256) on resource requests and the server's `nonce` when it asks for
//! one. Keys are EC P-256: read from a PKCS#8 PEM (`dpop_key`) or made once per process, so a
//! reload keeps them and the tokens bound to them. Key handling is ring's, signing
//! jsonwebtoken's.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{HeaderMap, HeaderName};
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters, Jwk,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::Rng;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// The request header a proof travels in.
pub const DPOP: HeaderName = HeaderName::from_static("dpop");
/// The response header a server hands out its nonce in.
pub const DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");
/// The `token_type` of a DPoP-bound token, and its `Authorization` scheme.
pub const SCHEME: &str = "DPoP";

/// Why a `dpop_key` cannot be used; the text names the problem, never the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopKeyError {
    #[error("the key is an encrypted PEM; give the sidecar a decrypted PKCS#8 key (openssl pkcs8 -topk8 -nocrypt)")]
    Encrypted,
    #[error("the key is not a PKCS#8 PEM EC P-256 private key (DPoP proofs are ES256)")]
    Unsupported,
    #[error("no DPoP key could be made: the system's random source failed")]
    NotMade,
}

/// A DPoP key: signs proofs, shows its public half as a JWK.
pub struct DpopKey {
    signing: EncodingKey,
    jwk: Jwk,
    /// RFC 7638 thumbprint of the public key (`jkt`): what tokens are bound to.
    thumbprint: String,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("jkt", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct ProofClaims<'a> {
    jti: String,
    htm: &'a str,
    htu: &'a str,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ath: Option<String>,
}

impl DpopKey {
    /// A key from a PKCS#8 PEM EC P-256 private key.
    pub fn from_pem(pem: &Secret) -> Result<Self, DpopKeyError> {
        let text = pem.expose();
        if text.contains("ENCRYPTED") {
            return Err(DpopKeyError::Encrypted);
        }
        let der = rustls_pemfile::read_all(&mut text.as_bytes())
            .find_map(|item| match item {
                Ok(rustls_pemfile::Item::Pkcs8Key(key)) => Some(key),
                _ => None,
            })
            .ok_or(DpopKeyError::Unsupported)?;
        Self::from_pkcs8(der.secret_pkcs8_der())
    }

    /// The process's own key, made on first use and kept for its life (reloads included).
    pub fn generated() -> Result<Arc<Self>, DpopKeyError> {
        static KEY: OnceLock<Arc<DpopKey>> = OnceLock::new();
        if let Some(key) = KEY.get() {
            return Ok(key.clone());
        }
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| DpopKeyError::NotMade)?;
        let made = Arc::new(Self::from_pkcs8(pkcs8.as_ref())?);
        Ok(KEY.get_or_init(|| made).clone())
    }

    fn from_pkcs8(der: &[u8]) -> Result<Self, DpopKeyError> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|_| DpopKeyError::Unsupported)?;
        // An uncompressed P-256 point: 0x04, then x and y, 32 bytes each.
        let point = pair.public_key().as_ref();
        let (x, y) = (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..65]),
        );
        let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#
        )));
        let jwk = Jwk {
            common: CommonParameters::default(),
            algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: jsonwebtoken::jwk::EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x,
                y,
            }),
        };
        Ok(Self {
            signing: EncodingKey::from_ec_der(der),
            jwk,
            thumbprint,
        })
    }

    /// The RFC 7638 thumbprint of the public key.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A fresh proof for `method` on `url` (its query and fragment are dropped), carrying the
    /// server's `nonce` and, for a resource request, the hash of `access_token`.
    pub fn proof(
        &self,
        method: &str,
        url: &str,
        now: SystemTime,
        nonce: Option<&str>,
        access_token: Option<&str>,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = ProofClaims {
            jti: hex::encode(rand::thread_rng().gen::<[u8; 16]>()),
            htm: method,
            htu: htu(url),
            iat: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            nonce,
            ath: access_token.map(|token| URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk = Some(self.jwk.clone());
        jsonwebtoken::encode(&header, &claims, &self.signing)
    }
}

/// `url` without its query and fragment: a proof's `htu`.
fn htu(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

/// The nonce a server asked proofs to carry, from its `DPoP-Nonce` header.
pub fn nonce_in(headers: &HeaderMap) -> Option<String> {
    let nonce = headers.get(DPOP_NONCE)?.to_str().ok()?.trim();
    // RFC 9449 §8.1: a nonce is visible ASCII; anything else is not one.
    (!nonce.is_empty() && nonce.len() <= 1024 && nonce.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| nonce.to_owned())
}

/// The latest nonce each server gave, by origin (`scheme://host:port`).
#[derive(Debug, Default)]
pub struct Nonces {
    by_origin: Mutex<HashMap<String, String>>,
}

/// More origins than any config has: past it the map starts over rather than grow.
const MAX_ORIGINS: usize = 4096;

impl Nonces {
    pub fn get(&self, origin: &str) -> Option<String> {
        self.lock().get(origin).cloned()
    }

    pub fn remember(&self, origin: &str, nonce: String) {
        let mut by_origin = self.lock();
        if by_origin.len() >= MAX_ORIGINS && !by_origin.contains_key(origin) {
            by_origin.clear();
        }
        by_origin.insert(origin.to_owned(), nonce);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        crate::sync::lock(&self.by_origin)
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation};

    use super::*;

    fn decode(proof: &str) -> (jsonwebtoken::Header, serde_json::Value) {
        let header = jsonwebtoken::decode_header(proof).unwrap();
        let key = DecodingKey::from_jwk(header.jwk.as_ref().unwrap()).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let claims = jsonwebtoken::decode::<serde_json::Value>(proof, &key, &validation)
            .unwrap()
            .claims;
        (header, claims)
    }

    #[test]
    fn a_proof_verifies_with_its_own_jwk_and_carries_the_request() {
        let key = DpopKey::generated().unwrap();
        let now = SystemTime::now();
        let proof = key
            .proof(
                "GET",
                "https://api.test/v1/pay?x=1#f",
                now,
                Some("n-1"),
                Some("tok"),
            )
            .unwrap();
        let (header, claims) = decode(&proof);
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://api.test/v1/pay");
        assert_eq!(claims["nonce"], "n-1");
        assert_eq!(claims["ath"], URL_SAFE_NO_PAD.encode(Sha256::digest(b"tok")));
        let other = key
            .proof("GET", "https://api.test/v1/pay", now, None, None)
            .unwrap();
        let (_, other) = decode(&other);
        assert_ne!(claims["jti"], other["jti"], "a unique jti per proof");
        assert!(other.get("nonce").is_none() && other.get("ath").is_none());
    }

    #[test]
    fn the_jwk_is_public_only_and_the_thumbprint_is_rfc_7638() {
        let key = DpopKey::generated().unwrap();
        let proof = key
            .proof("POST", "https://as.test/token", SystemTime::now(), None, None)
            .unwrap();
        let header_json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(proof.split('.').next().unwrap()).unwrap())
                .unwrap();
        let jwk = header_json["jwk"].as_object().unwrap();
        let mut members: Vec<&str> = jwk.keys().map(String::as_str).collect();
        members.sort_unstable();
        assert_eq!(members, ["crv", "kty", "x", "y"], "no private part, nothing else");
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":{},"y":{}}}"#,
            jwk["x"], jwk["y"]
        );
        assert_eq!(
            key.thumbprint(),
            URL_SAFE_NO_PAD.encode(Sha256::digest(canonical))
        );
        assert_eq!(
            DpopKey::generated().unwrap().thumbprint(),
            key.thumbprint(),
            "one key per process"
        );
    }

    #[test]
    fn a_pem_key_gives_its_own_thumbprint_and_other_keys_are_refused() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let key = DpopKey::from_pem(&Secret::new(pair.serialize_pem())).unwrap();
        assert_ne!(key.thumbprint(), DpopKey::generated().unwrap().thumbprint());
        let rsa = Secret::new(include_str!("../../tests/fixtures/keys/rsa-2048.pem"));
        assert_eq!(DpopKey::from_pem(&rsa).unwrap_err(), DpopKeyError::Unsupported);
        assert_eq!(
            DpopKey::from_pem(&Secret::new("not a key")).unwrap_err(),
            DpopKeyError::Unsupported
        );
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn nonces_are_kept_per_origin_and_junk_is_not_a_nonce() {
        let nonces = Nonces::default();
        nonces.remember("https://a:443", "n1".into());
        assert_eq!(nonces.get("https://a:443").as_deref(), Some("n1"));
        assert_eq!(nonces.get("https://b:443"), None);
        let mut headers = HeaderMap::new();
        headers.insert(DPOP_NONCE, "eyJ7S_zG.eyJH0-Z.HX4w-7v".parse().unwrap());
        assert_eq!(nonce_in(&headers).as_deref(), Some("eyJ7S_zG.eyJH0-Z.HX4w-7v"));
        headers.insert(DPOP_NONCE, "two words".parse().unwrap());
        assert_eq!(nonce_in(&headers), None);
    }
}
