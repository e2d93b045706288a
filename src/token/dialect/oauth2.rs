//! The OAuth2 client-credentials dialect (RFC 6749 §4.4): the token request for one client,
//! authenticated by one of the `client_auth` methods. A new method is one [`ClientAuth`] arm
//! and a fixture test below.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::{shared, BodyEncoding, BodyValue, ResponseSpec, TokenChars, TokenRequest};
use crate::secret::Secret;
use std::sync::Arc;

use crate::token::assertion::Assertion;
use crate::token::dpop::DpopKey;

/// Where an RFC 6749 answer keeps its token and lifetime.
pub const TOKEN_POINTER: &str = "/access_token";
pub const EXPIRES_IN_POINTER: &str = "/expires_in";

/// Body fields the sidecar sets itself: a provider's `params` may not name them.
pub const MANAGED_FIELDS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "scope",
];

/// How the client proves itself to the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the body (RFC 6749 §2.3.1).
    Body { secret: Secret },
    /// HTTP Basic with the form-encoded id and secret (RFC 6749 §2.3.1).
    Basic { secret: Secret },
    /// An HS256 assertion keyed by the secret (RFC 7523); the secret itself is never sent.
    ClientSecretJwt {
        secret: Secret,
        audience: String,
        kid: Option<String>,
    },
    /// An assertion signed with the client's private key (RFC 7523).
    PrivateKeyJwt(Assertion),
    /// The client certificate of the mutual-TLS connection (RFC 8705): the body names the
    /// client and carries no secret.
    TlsClientAuth,
}

/// One client of an OAuth2 token endpoint.
#[derive(Debug, Clone)]
pub struct OAuth2Client {
    pub url: Arc<reqwest::Url>,
    pub encoding: BodyEncoding,
    pub client_id: String,
    pub auth: ClientAuth,
    pub scopes: Vec<String>,
    /// Extra body fields (`params`), after the sidecar's own.
    pub params: Vec<(String, String)>,
    /// Ask for DPoP-bound tokens, proving possession of this key.
    pub dpop: Option<Arc<DpopKey>>,
}

impl OAuth2Client {
    /// The client-credentials request: `grant_type`, the client's authentication, `scope`,
    /// then `params`.
    pub fn token_request(self) -> TokenRequest {
        let mut request = TokenRequest {
            url: self.url,
            encoding: self.encoding,
            fields: vec![(
                shared("grant_type"),
                BodyValue::Text(shared("client_credentials")),
            )],
            authorization: None,
            secrets: Vec::new(),
            assertion: None,
            dpop: self.dpop,
        };
        self.auth.apply(&mut request, self.client_id);
        if !self.scopes.is_empty() {
            request
                .fields
                .push((shared("scope"), BodyValue::Text(self.scopes.join(" ").into())));
        }
        for (name, value) in self.params {
            request.fields.push((name.into(), BodyValue::Text(value.into())));
        }
        // Held for the life of the config, once per credential: no spare capacity.
        request.fields.shrink_to_fit();
        request.secrets.shrink_to_fit();
        request
    }
}

impl ClientAuth {
    /// Adds the client's authentication to `request`.
    fn apply(self, request: &mut TokenRequest, client_id: String) {
        match self {
            Self::Body { secret } => {
                request.secrets.push(secret.clone());
                request
                    .fields
                    .push((shared("client_id"), BodyValue::Text(client_id.into())));
                request
                    .fields
                    .push((shared("client_secret"), BodyValue::Secret(secret)));
            }
            Self::Basic { secret } => {
                let user = form_encode(&client_id);
                let password = form_encode(secret.expose());
                request.authorization = Some(Secret::new(format!(
                    "Basic {}",
                    STANDARD.encode(format!("{user}:{password}"))
                )));
                request.secrets.push(secret);
            }
            Self::ClientSecretJwt {
                secret,
                audience,
                kid,
            } => {
                request.assertion = Some(Box::new(Assertion::client_secret_jwt(
                    &secret, &client_id, &audience, kid,
                )));
                request.secrets.push(secret);
                request
                    .fields
                    .push((shared("client_id"), BodyValue::Text(client_id.into())));
            }
            Self::PrivateKeyJwt(assertion) => {
                request.assertion = Some(Box::new(assertion));
                request
                    .fields
                    .push((shared("client_id"), BodyValue::Text(client_id.into())));
            }
            Self::TlsClientAuth => {
                request
                    .fields
                    .push((shared("client_id"), BodyValue::Text(client_id.into())));
            }
        }
    }
}

impl ResponseSpec {
    /// RFC 6749: `access_token` and `expires_in` (seconds), nothing else assumed.
    pub fn oauth2() -> Self {
        Self {
            token: TOKEN_POINTER.into(),
            expires_in: Some(EXPIRES_IN_POINTER.into()),
            expires_at: None,
            issued_at: None,
            token_id: None,
            default_ttl: None,
            token_chars: TokenChars::Token68,
        }
    }
}

/// RFC 6749 §2.3.1: both parts of Basic client authentication are form-encoded first.
fn form_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn client(auth: ClientAuth) -> TokenRequest {
        OAuth2Client {
            url: Arc::new("https://as.test/token".parse().unwrap()),
            encoding: BodyEncoding::Form,
            client_id: "acme id".into(),
            auth,
            scopes: vec!["payments".into(), "refunds".into()],
            params: vec![("audience".into(), "https://api.test".into())],
            dpop: None,
        }
        .token_request()
    }

    fn body(request: &TokenRequest) -> String {
        let (content_type, body) = request.encode_body(SystemTime::now()).unwrap();
        assert_eq!(content_type, "application/x-www-form-urlencoded");
        String::from_utf8(body).unwrap()
    }

    fn secret() -> Secret {
        Secret::new("s3cr:et&")
    }

    #[test]
    fn body_auth_sends_id_and_secret_in_the_form() {
        let request = client(ClientAuth::Body { secret: secret() });
        assert_eq!(
            body(&request),
            "grant_type=client_credentials&client_id=acme+id&client_secret=s3cr%3Aet%26&scope=payments+refunds&audience=https%3A%2F%2Fapi.test"
        );
        assert!(request.authorization.is_none());
        assert_eq!(request.secrets, [secret()]);
    }

    #[test]
    fn basic_auth_form_encodes_both_parts_and_keeps_the_secret_out_of_the_body() {
        let request = client(ClientAuth::Basic { secret: secret() });
        let expected = format!("Basic {}", STANDARD.encode("acme+id:s3cr%3Aet%26"));
        assert_eq!(request.authorization.as_ref().unwrap().expose(), expected);
        assert_eq!(
            body(&request),
            "grant_type=client_credentials&scope=payments+refunds&audience=https%3A%2F%2Fapi.test"
        );
    }

    #[test]
    fn client_secret_jwt_sends_an_assertion_and_never_the_secret() {
        let request = client(ClientAuth::ClientSecretJwt {
            secret: secret(),
            audience: "https://as.test".into(),
            kid: None,
        });
        let body = body(&request);
        assert!(body.contains("client_id=acme+id"), "{body}");
        assert!(body.contains(
            "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
        ));
        assert!(body.contains("client_assertion=ey"), "{body}");
        assert!(!body.contains("s3cr"), "{body}");
    }

    #[test]
    fn private_key_jwt_sends_an_assertion_signed_with_the_key() {
        let key = Secret::new(rcgen::KeyPair::generate().unwrap().serialize_pem());
        let assertion = Assertion::private_key_jwt(&key, None, None, "acme id", "https://as.test").unwrap();
        let request = client(ClientAuth::PrivateKeyJwt(assertion));
        let body = body(&request);
        assert!(body.contains("client_assertion=ey"), "{body}");
        assert!(request.secrets.is_empty());
    }

    #[test]
    fn tls_client_auth_names_the_client_and_sends_no_secret() {
        let request = client(ClientAuth::TlsClientAuth);
        assert_eq!(
            body(&request),
            "grant_type=client_credentials&client_id=acme+id&scope=payments+refunds&audience=https%3A%2F%2Fapi.test"
        );
        assert!(request.secrets.is_empty() && request.authorization.is_none());
    }
}
