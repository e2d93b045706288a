//! The Nuapay dialect: organisation tokens asked for with the partner's API key as the Basic
//! username, read from `data.*` with epoch-millisecond times, revoked by id.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::{shared, BodyEncoding, BodyValue, ResponseSpec, TimeUnit, TokenChars, TokenRequest};
use crate::secret::Secret;

/// The `expiresIn` Nuapay accepts: 10 seconds up to one year.
pub const EXPIRES_IN_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(10)..=Duration::from_secs(31_556_926);
/// Nuapay's own token lifetime when `expiresIn` is not sent.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// One merchant organisation's token request at one Nuapay base URL.
#[derive(Debug, Clone)]
pub struct OrganisationToken {
    pub base_url: reqwest::Url,
    pub api_key: Secret,
    pub organisation: String,
    pub scopes: Vec<String>,
    pub expires_in: Option<Duration>,
}

impl OrganisationToken {
    /// `POST {base}/organisations/{organisation}/tokens`, JSON `scopes` (and `expiresIn`),
    /// the API key as the Basic username.
    pub fn token_request(self) -> TokenRequest {
        let mut url = self.base_url;
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}/organisations/{}/tokens", self.organisation));
        let mut fields = vec![(shared("scopes"), BodyValue::List(self.scopes.into()))];
        if let Some(expires_in) = self.expires_in {
            fields.push((shared("expiresIn"), BodyValue::Number(expires_in.as_secs())));
        }
        TokenRequest {
            url: Arc::new(url),
            encoding: BodyEncoding::Json,
            fields,
            authorization: Some(Secret::new(format!(
                "Basic {}",
                STANDARD.encode(format!("{}:", self.api_key.expose()))
            ))),
            secrets: vec![self.api_key],
            assertion: None,
            dpop: None,
        }
    }
}

/// Whether `text` can be an encoded organisation id (it becomes a path segment).
pub fn is_organisation_id(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `{token url}/{token id}/revoke`, where a token is revoked.
pub fn revoke_url(token_url: &reqwest::Url, token_id: &str) -> Option<reqwest::Url> {
    let mut url = token_url.clone();
    url.path_segments_mut().ok()?.push(token_id).push("revoke");
    Some(url)
}

impl ResponseSpec {
    /// Nuapay organisation tokens: `data.accessToken`, `data.expiryTime` and
    /// `data.createdTimestamp` (epoch ms), `data.id` for revocation.
    pub fn nuapay(default_ttl: Duration) -> Self {
        Self {
            token: "/data/accessToken".into(),
            expires_in: None,
            expires_at: Some(("/data/expiryTime".into(), TimeUnit::Millis)),
            issued_at: Some(("/data/createdTimestamp".into(), TimeUnit::Millis)),
            token_id: Some("/data/id".into()),
            default_ttl: Some(default_ttl),
            token_chars: TokenChars::Token68,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn an_organisation_token_is_asked_for_with_the_api_key_as_basic_username() {
        let request = OrganisationToken {
            base_url: "https://api.nuapay.test/tpp/".parse().unwrap(),
            api_key: Secret::new("key-1"),
            organisation: "5gqg7djvk3".into(),
            scopes: vec!["openbanking_pisp".into()],
            expires_in: Some(Duration::from_secs(3600)),
        }
        .token_request();
        assert_eq!(
            request.url.as_str(),
            "https://api.nuapay.test/tpp/organisations/5gqg7djvk3/tokens"
        );
        let (content_type, body) = request.encode_body(SystemTime::now()).unwrap();
        assert_eq!(content_type, "application/json");
        assert_eq!(body, br#"{"scopes":["openbanking_pisp"],"expiresIn":3600}"#);
        assert_eq!(
            request.authorization.unwrap().expose(),
            format!("Basic {}", STANDARD.encode("key-1:"))
        );
    }

    #[test]
    fn revocation_goes_to_the_token_url_with_the_id() {
        let url = "https://api.nuapay.test/organisations/o1/tokens".parse().unwrap();
        assert_eq!(
            revoke_url(&url, "3fe40be4").unwrap().as_str(),
            "https://api.nuapay.test/organisations/o1/tokens/3fe40be4/revoke"
        );
        assert!(is_organisation_id("5gqg7djvk3") && !is_organisation_id("a/b") && !is_organisation_id(""));
    }
}
