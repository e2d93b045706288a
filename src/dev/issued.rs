//! The stand-in providers' record of the tokens they issued, which the stand-in upstream checks:
//! a request passes only with a token that was issued, is not revoked and has not expired.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::Rng;

use crate::clock::SharedClock;

#[derive(Debug, Clone)]
pub struct Issued {
    pub id: String,
    /// The merchant: Nuapay organisation or OAuth client id.
    pub subject: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    pub revoked: bool,
}

/// Why the upstream refused a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Expired,
    Revoked,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown token",
            Self::Expired => "token expired",
            Self::Revoked => "token revoked",
        }
    }
}

pub struct IssuedTokens {
    clock: SharedClock,
    tokens: Mutex<HashMap<String, Issued>>,
}

/// The form of a new token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenForm {
    /// A JWT (unsigned stand-in) with `exp` and `iat` in seconds.
    Jwt,
    /// 64 hex characters, like PayU's.
    Opaque,
}

impl IssuedTokens {
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Issues a token for `subject` valid for `lifetime` from now; returns it and its record.
    pub fn issue(&self, subject: &str, lifetime: Duration, form: TokenForm) -> (String, Issued) {
        let now = self.clock.now();
        let mut rng = rand::thread_rng();
        let id = format!("{:032x}", rng.gen::<u128>());
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let token = match form {
            TokenForm::Jwt => {
                let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
                let claims = serde_json::json!({
                    "sub": subject, "jti": id, "iat": iat, "exp": iat + lifetime.as_secs(),
                });
                let signature = URL_SAFE_NO_PAD.encode(rng.gen::<[u8; 32]>());
                format!(
                    "{header}.{}.{signature}",
                    URL_SAFE_NO_PAD.encode(claims.to_string())
                )
            }
            TokenForm::Opaque => format!("{:032x}{:032x}", rng.gen::<u128>(), rng.gen::<u128>()),
        };
        let issued = Issued {
            id,
            subject: subject.to_owned(),
            issued_at: now,
            expires_at: now + lifetime,
            revoked: false,
        };
        self.lock().insert(token.clone(), issued.clone());
        (token, issued)
    }

    /// The token's record if it may be used now.
    pub fn check(&self, token: &str) -> Result<Issued, Refusal> {
        let tokens = self.lock();
        let issued = tokens.get(token).ok_or(Refusal::Unknown)?;
        if issued.revoked {
            Err(Refusal::Revoked)
        } else if self.clock.now() >= issued.expires_at {
            Err(Refusal::Expired)
        } else {
            Ok(issued.clone())
        }
    }

    /// Revokes by provider token id; whether such a token existed.
    pub fn revoke_id(&self, id: &str) -> bool {
        let mut tokens = self.lock();
        match tokens.values_mut().find(|issued| issued.id == id) {
            Some(issued) => {
                issued.revoked = true;
                true
            }
            None => false,
        }
    }

    /// Revokes every token of `subject`; how many.
    pub fn revoke_subject(&self, subject: &str) -> usize {
        let mut tokens = self.lock();
        let mut count = 0;
        for issued in tokens.values_mut().filter(|i| i.subject == subject && !i.revoked) {
            issued.revoked = true;
            count += 1;
        }
        count
    }

    /// Every token issued to `subject`, in no particular order.
    pub fn tokens_of(&self, subject: &str) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, issued)| issued.subject == subject)
            .map(|(token, _)| token.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Issued>> {
        crate::sync::lock(&self.tokens)
    }
}
