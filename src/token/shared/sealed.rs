//! Everything the sidecar reads back from Redis, sealed: encrypted and authenticated
//! (AES-256-GCM) under the fleet's key and bound to its Redis key, so a value cannot be read,
//! forged, altered or moved to another key. A sealed value is `key id|base64(nonce ‖
//! ciphertext)`, the key id saying which key sealed it, so keys can rotate (older keys still
//! open values). A token's value starts with a tag, `tag|…`: an HMAC of the token, so that a
//! compare-and-delete in Redis drops exactly the token a sidecar saw refused, without the token
//! being readable there. Lock holders are a nonce and its HMAC; credentials are named by an
//! HMAC of their identity (secrets included), which tells secret versions apart and cannot be
//! guessed offline.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::secret::{AccessToken, EncryptionKey};
use crate::token::dialect::Identity;

/// Why a stored value could not be opened (it is then treated as absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the value is not in the sealed format")]
    Format,
    #[error("the value was sealed with a key this sidecar does not have")]
    UnknownKey,
    #[error("the value does not authenticate (altered, or moved from another key)")]
    Forged,
}

/// A token and what the cache needs to know of it, as shared between sidecars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedToken {
    #[serde(rename = "t", with = "token_text")]
    pub token: AccessToken,
    /// Unix milliseconds.
    #[serde(rename = "e")]
    pub expires_at_ms: u64,
    /// Unix milliseconds: when it was asked for.
    #[serde(rename = "o")]
    pub obtained_at_ms: u64,
    #[serde(rename = "i")]
    pub token_id: Option<String>,
    /// Bound to the credential's DPoP key (`token_type` `DPoP`).
    #[serde(rename = "d", default)]
    pub dpop: bool,
}

mod token_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::secret::AccessToken;

    pub fn serialize<S: Serializer>(token: &AccessToken, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(token.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<AccessToken, D::Error> {
        String::deserialize(deserializer).map(AccessToken::new)
    }
}

/// Seals with the first key, opens with any.
pub struct Sealer {
    keys: Vec<EncryptionKey>,
}

impl Sealer {
    /// `keys[0]` seals; all of them open. `keys` is never empty (config validation).
    pub fn new(keys: Vec<EncryptionKey>) -> Self {
        Self { keys }
    }

    /// `value`, sealed for `redis_key`.
    pub fn seal_value<T: Serialize>(&self, redis_key: &str, value: &T) -> String {
        let key = &self.keys[0];
        let cipher = Aes256Gcm::new(key.expose().into());
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let plaintext = serde_json::to_vec(value).unwrap_or_default();
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plaintext,
                    aad: redis_key.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!("{}|{}", key.id(), STANDARD.encode(bytes))
    }

    /// The value sealed for `redis_key`, if it opens.
    pub fn open_value<T: DeserializeOwned>(&self, redis_key: &str, value: &str) -> Result<T, SealError> {
        let (key_id, body) = value.split_once('|').ok_or(SealError::Format)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id() == key_id)
            .ok_or(SealError::UnknownKey)?;
        let bytes = STANDARD.decode(body).map_err(|_| SealError::Format)?;
        if bytes.len() < 12 {
            return Err(SealError::Format);
        }
        let (nonce, sealed) = bytes.split_at(12);
        let cipher = Aes256Gcm::new(key.expose().into());
        let plaintext = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: redis_key.as_bytes(),
                },
            )
            .map_err(|_| SealError::Forged)?;
        serde_json::from_slice(&plaintext).map_err(|_| SealError::Format)
    }

    /// The value to store `token` under `redis_key`: its tag, then the sealed token.
    pub fn seal(&self, redis_key: &str, token: &SharedToken) -> String {
        let tag = tag(&self.keys[0], &token.token);
        format!("{tag}|{}", self.seal_value(redis_key, token))
    }

    /// The token in a value stored under `redis_key`.
    pub fn open(&self, redis_key: &str, value: &str) -> Result<SharedToken, SealError> {
        let (_tag, sealed) = value.split_once('|').ok_or(SealError::Format)?;
        self.open_value(redis_key, sealed)
    }

    /// The fleet's name for a credential of `identity`: the same on every sidecar that shares
    /// the key and has the same definition — secrets and client certificate included, so a
    /// rotated or wrong secret is a credential of its own.
    pub fn fleet_identity(&self, identity: Identity) -> String {
        let mut mac = hmac(&self.keys[0]);
        mac.update(b"token-sidecar fleet identity\0");
        mac.update(&identity.to_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// The fleet's name for `what` (an endpoint): an HMAC, the same on every member.
    pub fn name_of(&self, what: &str) -> String {
        let mut mac = hmac(&self.keys[0]);
        mac.update(b"token-sidecar name\0");
        mac.update(what.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// A fresh lock holder for `lock_key`: a nonce and its HMAC, so that a waiter can tell a
    /// sidecar's lock from one written by anyone else.
    pub fn holder(&self, lock_key: &str) -> String {
        let nonce = hex::encode(rand::thread_rng().gen::<[u8; 16]>());
        let mac = holder_mac(&self.keys[0], lock_key, &nonce);
        format!("{nonce}.{mac}")
    }

    /// Whether `value` is a holder a sidecar of the fleet made for `lock_key`.
    pub fn is_holder(&self, lock_key: &str, value: &str) -> bool {
        let Some((nonce, mac)) = value.split_once('.') else {
            return false;
        };
        self.keys.iter().any(|key| {
            let expected = holder_mac(key, lock_key, nonce);
            bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), mac.as_bytes()))
        })
    }

    /// The tag of `token` under the current key (announced with a refusal).
    pub fn tag(&self, token: &AccessToken) -> String {
        tag(&self.keys[0], token)
    }

    /// The prefixes (`tag|`) a value holding `token` starts with, one per key.
    pub fn tags(&self, token: &AccessToken) -> Vec<String> {
        self.keys
            .iter()
            .map(|key| format!("{}|", tag(key, token)))
            .collect()
    }
}

fn hmac(key: &EncryptionKey) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(key.expose()).expect("HMAC takes any key length")
}

fn holder_mac(key: &EncryptionKey, lock_key: &str, nonce: &str) -> String {
    let mut mac = hmac(key);
    mac.update(b"token-sidecar lock holder\0");
    mac.update(lock_key.as_bytes());
    mac.update(b"\0");
    mac.update(nonce.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// 24 hex characters of HMAC-SHA256(key, token): names the token without revealing it.
fn tag(key: &EncryptionKey, token: &AccessToken) -> String {
    let mut mac = hmac(key);
    mac.update(b"token-sidecar purge tag\0");
    mac.update(token.expose().as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SharedToken {
        SharedToken {
            token: AccessToken::new("eyJ.secret-token.sig"),
            expires_at_ms: 1_700_000_600_000,
            obtained_at_ms: 1_700_000_000_000,
            token_id: Some("id-1".into()),
            dpop: true,
        }
    }

    fn key(byte: u8) -> EncryptionKey {
        EncryptionKey::new([byte; 32])
    }

    #[test]
    fn a_sealed_token_opens_and_shows_nothing_of_itself() {
        let sealer = Sealer::new(vec![key(1)]);
        let value = sealer.seal("p:token:abc", &token());
        assert!(!value.contains("secret-token"));
        assert!(!value.contains(&STANDARD.encode("eyJ.secret-token.sig")));
        assert_eq!(sealer.open("p:token:abc", &value), Ok(token()));
    }

    #[test]
    fn a_token_sealed_under_an_old_key_still_opens_after_rotation() {
        let old = Sealer::new(vec![key(1)]);
        let value = old.seal("p:token:abc", &token());
        let rotated = Sealer::new(vec![key(2), key(1)]);
        assert_eq!(rotated.open("p:token:abc", &value), Ok(token()));
        let new_value = rotated.seal("p:token:abc", &token());
        assert_eq!(old.open("p:token:abc", &new_value), Err(SealError::UnknownKey));
    }

    #[test]
    fn altered_or_moved_values_do_not_open() {
        let sealer = Sealer::new(vec![key(1)]);
        let value = sealer.seal("p:token:abc", &token());
        assert_eq!(sealer.open("p:token:other", &value), Err(SealError::Forged));
        let mut altered = value.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(sealer.open("p:token:abc", &altered).is_err());
        assert_eq!(sealer.open("p:token:abc", "garbage"), Err(SealError::Format));
    }

    #[test]
    fn a_lock_holder_is_told_from_a_forged_or_moved_one() {
        let sealer = Sealer::new(vec![key(1)]);
        let holder = sealer.holder("p:{abc}:lock");
        assert!(sealer.is_holder("p:{abc}:lock", &holder));
        assert!(!sealer.is_holder("p:{other}:lock", &holder), "bound to its key");
        assert!(!sealer.is_holder("p:{abc}:lock", "stuck"));
        assert!(!Sealer::new(vec![key(2)]).is_holder("p:{abc}:lock", &holder));
    }

    #[test]
    fn the_fleet_identity_depends_on_the_key_and_hides_the_identity() {
        let identity = Identity::named("credential");
        let (one, two) = (Sealer::new(vec![key(1)]), Sealer::new(vec![key(2)]));
        assert_eq!(one.fleet_identity(identity), one.fleet_identity(identity));
        assert_ne!(one.fleet_identity(identity), two.fleet_identity(identity));
        assert_ne!(
            one.fleet_identity(identity),
            one.fleet_identity(Identity::named("other"))
        );
        assert!(!one
            .fleet_identity(identity)
            .contains(&hex::encode(identity.to_bytes())));
    }

    #[test]
    fn the_purge_tag_matches_the_value_it_was_sealed_with() {
        let sealer = Sealer::new(vec![key(2), key(1)]);
        let value = Sealer::new(vec![key(1)]).seal("k", &token());
        assert!(sealer
            .tags(&token().token)
            .iter()
            .any(|tag| value.starts_with(tag.as_str())));
        assert!(!sealer
            .tags(&AccessToken::new("another"))
            .iter()
            .any(|tag| value.starts_with(tag.as_str())));
    }
}
