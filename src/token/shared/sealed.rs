//! Tokens as they sit in Redis: encrypted and authenticated (AES-256-GCM) under the fleet's key
//! and bound to their Redis key, so a value cannot be read, altered or moved to another
//! credential. A value is `tag|key id|base64(nonce ‖ ciphertext)`:
//! - the key id says which key sealed it, so keys can rotate (older keys still open values);
//! - the tag (an HMAC of the token under that key) lets a compare-and-delete in Redis drop
//!   exactly the token a sidecar saw refused, without the token being readable there.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::secret::{AccessToken, EncryptionKey};

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

    /// The value to store under `redis_key`.
    pub fn seal(&self, redis_key: &str, token: &SharedToken) -> String {
        let key = &self.keys[0];
        let cipher = Aes256Gcm::new(key.expose().into());
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let plaintext = serde_json::to_vec(token).unwrap_or_default();
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
        format!(
            "{}|{}|{}",
            tag(key, &token.token),
            key.id(),
            STANDARD.encode(bytes)
        )
    }

    /// The token in a value stored under `redis_key`.
    pub fn open(&self, redis_key: &str, value: &str) -> Result<SharedToken, SealError> {
        let mut parts = value.splitn(3, '|');
        let (Some(_tag), Some(key_id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SealError::Format);
        };
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

/// 24 hex characters of HMAC-SHA256(key, token): names the token without revealing it.
fn tag(key: &EncryptionKey, token: &AccessToken) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose()).expect("HMAC takes any key length");
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
