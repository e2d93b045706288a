//! Secret values (client secrets, API keys) and access tokens: types that never print themselves.
//!
//! `Debug` and `Display` show a fingerprint (the first 12 hex characters of the value's SHA-256),
//! which is enough to tell two values apart in logs and `/tokens` but useless to an attacker.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The first 12 hex characters of the SHA-256 of `value`.
pub fn fingerprint(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    hex::encode(&digest[..6])
}

/// A configured secret: a client secret, an API key, a shared header value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it goes on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(sha256:{})", fingerprint(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", fingerprint(&self.0))
    }
}

/// A secret that can be read again: a file is read afresh each time it is asked for (so a
/// rotated password file is used on the next connection without a restart); a literal or an
/// environment variable is the value read at load. `Debug` shows the file's path, never a value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Fixed(Secret),
    File(std::path::PathBuf),
}

impl SecretSource {
    /// The secret as it is now (a file's trailing newline trimmed, as at load).
    pub fn current(&self) -> std::io::Result<Secret> {
        match self {
            Self::Fixed(secret) => Ok(secret.clone()),
            Self::File(path) => {
                let text = std::fs::read_to_string(path)?;
                Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
            }
        }
    }
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(secret) => write!(f, "SecretSource({secret:?})"),
            Self::File(path) => write!(f, "SecretSource(file {})", path.display()),
        }
    }
}

/// An access token issued by a provider, with its fingerprint computed once (and held inline:
/// one is cached per credential).
#[derive(Clone)]
pub struct AccessToken {
    value: Arc<str>,
    fingerprint: Fingerprint,
}

impl AccessToken {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        let value = value.into();
        let digest = Sha256::digest(value.as_bytes());
        let mut first = [0; 6];
        first.copy_from_slice(&digest[..6]);
        Self {
            value,
            fingerprint: Fingerprint(first),
        }
    }

    /// The token itself; call only where it is injected into a request.
    pub fn expose(&self) -> &str {
        &self.value
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

/// A token's [`fingerprint`], held as its 6 bytes and shown as its 12 hex characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 6]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl PartialEq for AccessToken {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl Eq for AccessToken {}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessToken(sha256:{})", self.fingerprint)
    }
}

impl fmt::Display for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.fingerprint)
    }
}

/// A 32-byte encryption key (the fleet cache's); prints only its id.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey([u8; 32]);

impl EncryptionKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key itself; call only to encrypt or decrypt.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Which key this is, safe to store beside what it encrypted: the first 8 hex characters
    /// of the SHA-256 of a label and the key.
    pub fn id(&self) -> String {
        let digest = Sha256::new()
            .chain_update(b"token-sidecar key id")
            .chain_update(self.0)
            .finalize();
        hex::encode(&digest[..4])
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey(id:{})", self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("hunter2-very-secret");
        let token = AccessToken::new("eyJhbGciOi.payload.sig");
        for printed in [
            format!("{secret:?}"),
            format!("{secret}"),
            format!("{token:?}"),
            format!("{token}"),
        ] {
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(!printed.contains("eyJhbGciOi"), "{printed}");
            assert!(printed.contains("sha256:"), "{printed}");
        }
    }

    #[test]
    fn fingerprint_is_twelve_hex_chars_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(fingerprint("abc"), "ba7816bf8f01");
        assert_eq!(AccessToken::new("abc").fingerprint().to_string(), "ba7816bf8f01");
    }
}
