//! Reads `exp` and `iat` from a JWT's payload. No signature check: we are the token's bearer,
//! not its audience; we only want to know when the provider says it expires.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The `exp` and `iat` claims (seconds since the epoch, fractions allowed), when the token is a
/// JWT that carries them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JwtTimes {
    pub expires_at: Option<f64>,
    pub issued_at: Option<f64>,
}

pub fn read_times(token: &str) -> Option<JwtTimes> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 64 * 1024 {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let claim = |name: &str| claims.get(name).and_then(serde_json::Value::as_f64);
    let times = JwtTimes {
        expires_at: claim("exp").filter(|v| v.is_finite() && *v > 0.0),
        issued_at: claim("iat").filter(|v| v.is_finite() && *v > 0.0),
    };
    (times.expires_at.is_some()).then_some(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn reads_exp_and_iat() {
        let times = read_times(&jwt(r#"{"exp":1637242869,"iat":1637242569}"#)).unwrap();
        assert_eq!(times.expires_at, Some(1637242869.0));
        assert_eq!(times.issued_at, Some(1637242569.0));
    }

    #[test]
    fn reads_fractional_claims_as_the_booking_api_sends_them() {
        let times = read_times(&jwt(r#"{"iat":1710220031.583112,"exp":1710223631.577478}"#)).unwrap();
        assert!((times.expires_at.unwrap() - 1710223631.577478).abs() < 1e-6);
    }

    #[test]
    fn opaque_tokens_and_jwts_without_exp_have_no_times() {
        assert_eq!(read_times("82c38b64e072f3d64da6e4e6efee9789"), None);
        assert_eq!(read_times(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(read_times("a.!!!.c"), None);
        assert_eq!(read_times(&jwt(r#"{"exp":"soon"}"#)), None);
    }
}
