//! Stand-ins for the four token endpoint shapes of `design/providers.md`, on one server:
//!
//! | path | shape |
//! |---|---|
//! | `POST /organisations/{org}/tokens` | Nuapay: JSON `{scopes, expiresIn}`, API key as Basic user, 201 `data.accessToken` + `data.expiryTime` (ms) |
//! | `POST /organisations/{org}/tokens/{id}/revoke` | Nuapay revocation |
//! | `POST /auth/token` | Setu: form, `accessToken` JWT with no expiry field |
//! | `POST /api/oauth/token` | booking API: JSON body, `access_token` JWT + `expires_in` |
//! | `POST /oauth/token` | PayU: form with space-separated `scope`, opaque `access_token` + `expires_in` |
//!
//! Tests steer them (lifetimes, injected failures, latency) and count their requests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use serde_json::{json, Value};

use super::issued::{IssuedTokens, TokenForm};
use crate::body::{full_body, json_response, ProxyBody};
use crate::clock::unix_millis;
use crate::server::Handler;
use crate::sync::lock;

/// The four token endpoint shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Nuapay,
    Setu,
    Booking,
    PayU,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Nuapay, Shape::Setu, Shape::Booking, Shape::PayU];

    /// The lifetime each provider documents (Setu's sample JWT: 300 s).
    pub fn default_lifetime(self) -> Duration {
        Duration::from_secs(match self {
            Shape::Nuapay => 10,
            Shape::Setu => 300,
            Shape::Booking => 3600,
            Shape::PayU => 7200,
        })
    }
}

/// Who may get tokens.
#[derive(Debug, Clone)]
pub struct Accounts {
    pub nuapay_api_key: String,
    pub nuapay_organisations: Vec<String>,
    /// OAuth client id → client secret (Setu, booking API, PayU).
    pub clients: HashMap<String, String>,
}

/// A failure to answer with instead of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: String,
}

impl Failure {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            retry_after: None,
            body: r#"{"error":"temporarily_unavailable"}"#.into(),
        }
    }
}

#[derive(Default)]
struct Steering {
    lifetimes: HashMap<Shape, Duration>,
    queued_failures: VecDeque<Failure>,
    failing: Option<Failure>,
    latency: Duration,
    /// A 200 whose body is this instead of a token.
    malformed: Option<String>,
    /// Client secrets that replaced the accounts' (a rotation).
    rotated_secrets: HashMap<String, String>,
    /// How long a revocation takes.
    revoke_latency: Duration,
}

/// One request as the stand-in saw it, for tests to assert on.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub shape: Shape,
    /// When it arrived (real time).
    pub at: std::time::Instant,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: String,
}

pub struct MockProviders {
    issued: Arc<IssuedTokens>,
    accounts: Accounts,
    steering: Mutex<Steering>,
    seen: Mutex<Vec<SeenRequest>>,
    revocations: Mutex<Vec<String>>,
}

impl MockProviders {
    pub fn new(issued: Arc<IssuedTokens>, accounts: Accounts) -> Arc<Self> {
        Arc::new(Self {
            issued,
            accounts,
            steering: Mutex::default(),
            seen: Mutex::default(),
            revocations: Mutex::default(),
        })
    }

    pub fn handler(self: &Arc<Self>) -> Handler {
        let providers = self.clone();
        Arc::new(move |request| Box::pin(providers.clone().handle(request)))
    }

    /// Token requests received for `shape` (answered or failed).
    pub fn token_requests(&self, shape: Shape) -> usize {
        lock(&self.seen).iter().filter(|seen| seen.shape == shape).count()
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.seen).clone()
    }

    /// Provider token ids revoked through the revoke endpoint.
    pub fn revocations(&self) -> Vec<String> {
        lock(&self.revocations).clone()
    }

    pub fn set_lifetime(&self, shape: Shape, lifetime: Duration) {
        lock(&self.steering).lifetimes.insert(shape, lifetime);
    }

    /// The next `count` token requests fail with `failure`.
    pub fn fail_next(&self, count: usize, failure: Failure) {
        let mut steering = lock(&self.steering);
        steering
            .queued_failures
            .extend(std::iter::repeat_n(failure, count));
    }

    /// Every token request fails with `failure` until called with `None`.
    pub fn set_failing(&self, failure: Option<Failure>) {
        lock(&self.steering).failing = failure;
    }

    /// Every token request answers 200 with `body` until called with `None`.
    pub fn set_malformed(&self, body: Option<String>) {
        lock(&self.steering).malformed = body;
    }

    /// From now on, `client_id` authenticates with `secret` only (a secret rotation).
    pub fn rotate_secret(&self, client_id: &str, secret: &str) {
        lock(&self.steering)
            .rotated_secrets
            .insert(client_id.to_owned(), secret.to_owned());
    }

    /// Revocations are answered after `latency` (real time).
    pub fn set_revoke_latency(&self, latency: Duration) {
        lock(&self.steering).revoke_latency = latency;
    }

    /// Token answers are delayed by `latency` (real time).
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.steering).latency = latency;
    }

    async fn handle(self: Arc<Self>, request: Request<ProxyBody>) -> Response<ProxyBody> {
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return json_response(StatusCode::BAD_REQUEST, &json!({"error": "invalid_request"})),
        };
        let path = parts.uri.path().to_owned();
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        if parts.method != Method::POST {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed"}),
            );
        }
        match segments.as_slice() {
            ["organisations", org, "tokens", id, "revoke"] => {
                let latency = lock(&self.steering).revoke_latency;
                tokio::time::sleep(latency).await;
                self.nuapay_revoke(&parts.headers, org, id)
            }
            ["organisations", org, "tokens", "revoke"] => self.nuapay_revoke_all(&parts.headers, org),
            ["organisations", org, "tokens"] => {
                let org = org.to_string();
                self.token(Shape::Nuapay, &parts.headers, body, move |me, headers, body| {
                    me.nuapay_token(headers, &org, body)
                })
                .await
            }
            ["auth", "token"] => {
                self.token(Shape::Setu, &parts.headers, body, Self::setu_token)
                    .await
            }
            ["api", "oauth", "token"] => {
                self.token(Shape::Booking, &parts.headers, body, Self::booking_token)
                    .await
            }
            ["oauth", "token"] => {
                self.token(Shape::PayU, &parts.headers, body, Self::payu_token)
                    .await
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        }
    }

    /// Records the request, applies steering, then answers with `answer`.
    async fn token(
        &self,
        shape: Shape,
        headers: &HeaderMap,
        body: Bytes,
        answer: impl FnOnce(&Self, &HeaderMap, &[u8]) -> Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        lock(&self.seen).push(SeenRequest {
            shape,
            at: std::time::Instant::now(),
            content_type: header_text(headers, CONTENT_TYPE.as_str()),
            authorization: header_text(headers, AUTHORIZATION.as_str()),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        let (latency, failure, malformed) = {
            let mut steering = lock(&self.steering);
            let failure = steering
                .queued_failures
                .pop_front()
                .or_else(|| steering.failing.clone());
            (steering.latency, failure, steering.malformed.clone())
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(failure) = failure {
            return failure_response(&failure);
        }
        if let Some(body) = malformed {
            let mut response = Response::new(full_body(body));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return response;
        }
        answer(self, headers, &body)
    }

    fn lifetime(&self, shape: Shape) -> Duration {
        lock(&self.steering)
            .lifetimes
            .get(&shape)
            .copied()
            .unwrap_or_else(|| shape.default_lifetime())
    }

    fn nuapay_token(&self, headers: &HeaderMap, org: &str, body: &[u8]) -> Response<ProxyBody> {
        if !self.nuapay_key_ok(headers) {
            return nuapay_error(StatusCode::UNAUTHORIZED, None);
        }
        if !self.accounts.nuapay_organisations.iter().any(|o| o == org) {
            return nuapay_error(StatusCode::FORBIDDEN, None);
        }
        if !is_content_type(headers, "application/json") {
            return nuapay_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
        }
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return nuapay_error(StatusCode::BAD_REQUEST, Some(("body", "Malformed JSON")));
        };
        let scopes: Vec<String> = match request.get("scopes").and_then(Value::as_array) {
            Some(scopes) if !scopes.is_empty() && scopes.iter().all(Value::is_string) => scopes
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect(),
            _ => {
                return nuapay_error(
                    StatusCode::BAD_REQUEST,
                    Some(("scopes", "At least one scope is required")),
                )
            }
        };
        let lifetime = match request.get("expiresIn") {
            None => self.lifetime(Shape::Nuapay),
            Some(value) => match value.as_u64() {
                Some(seconds) if (10..=31_556_926).contains(&seconds) => Duration::from_secs(seconds),
                _ => {
                    return nuapay_error(
                        StatusCode::BAD_REQUEST,
                        Some(("expiresIn", "Must be between 10 and 31556926")),
                    )
                }
            },
        };
        let (token, issued) = self.issued.issue(org, lifetime, TokenForm::Jwt);
        let created = unix_millis(issued.issued_at);
        let answer = json!({
            "uri": format!("/organisations/{org}/tokens/{}", issued.id),
            "data": {
                "id": issued.id,
                "accessToken": token,
                "tokenType": "BEARER",
                "expiryTime": created + lifetime.as_millis() as u64,
                "createdTimestamp": created,
                "scopes": scopes,
                "status": "ACTIVE",
                "links": [{"resourceType": "revoketoken", "uri": format!("/tokens/{}/revoke", issued.id)}],
            }
        });
        json_response(StatusCode::CREATED, &answer)
    }

    fn nuapay_revoke(&self, headers: &HeaderMap, org: &str, id: &str) -> Response<ProxyBody> {
        if !self.nuapay_key_ok(headers) {
            return nuapay_error(StatusCode::UNAUTHORIZED, None);
        }
        if !self.issued.revoke_id(id) {
            return nuapay_error(StatusCode::NOT_FOUND, None);
        }
        lock(&self.revocations).push(id.to_owned());
        json_response(
            StatusCode::OK,
            &json!({"uri": format!("/organisations/{org}/tokens/{id}"), "data": {"id": id, "status": "REVOKED"}}),
        )
    }

    fn nuapay_revoke_all(&self, headers: &HeaderMap, org: &str) -> Response<ProxyBody> {
        if !self.nuapay_key_ok(headers) {
            return nuapay_error(StatusCode::UNAUTHORIZED, None);
        }
        let count = self.issued.revoke_subject(org);
        json_response(StatusCode::OK, &json!({"data": {"revokedTokensCount": count}}))
    }

    fn nuapay_key_ok(&self, headers: &HeaderMap) -> bool {
        let expected = format!(
            "Basic {}",
            STANDARD.encode(format!("{}:", self.accounts.nuapay_api_key))
        );
        header_text(headers, AUTHORIZATION.as_str()).as_deref() == Some(expected.as_str())
    }

    fn setu_token(&self, headers: &HeaderMap, body: &[u8]) -> Response<ProxyBody> {
        let (client, _) = match self.oauth_request(headers, body, BodyKind::Form) {
            Ok(accepted) => accepted,
            Err(refusal) => return refusal.response(),
        };
        let lifetime = self.lifetime(Shape::Setu);
        let (token, _) = self.issued.issue(&client, lifetime, TokenForm::Jwt);
        let (refresh, _) = self
            .issued
            .issue(&format!("{client}-refresh"), lifetime * 2, TokenForm::Jwt);
        json_response(
            StatusCode::OK,
            &json!({"accessToken": token, "refreshToken": refresh}),
        )
    }

    fn booking_token(&self, headers: &HeaderMap, body: &[u8]) -> Response<ProxyBody> {
        let (client, _) = match self.oauth_request(headers, body, BodyKind::Json) {
            Ok(accepted) => accepted,
            Err(refusal) => return refusal.response(),
        };
        let lifetime = self.lifetime(Shape::Booking);
        let (token, _) = self.issued.issue(&client, lifetime, TokenForm::Jwt);
        json_response(
            StatusCode::OK,
            &json!({"token_type": "Bearer", "expires_in": lifetime.as_secs(), "access_token": token}),
        )
    }

    fn payu_token(&self, headers: &HeaderMap, body: &[u8]) -> Response<ProxyBody> {
        let (client, fields) = match self.oauth_request(headers, body, BodyKind::Form) {
            Ok(accepted) => accepted,
            Err(refusal) => return refusal.response(),
        };
        let Some(scope) = fields.get("scope").filter(|s| !s.is_empty()) else {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope");
        };
        let lifetime = self.lifetime(Shape::PayU);
        let (token, issued) = self.issued.issue(&client, lifetime, TokenForm::Opaque);
        json_response(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": lifetime.as_secs(),
                "scope": scope,
                "created_at": unix_millis(issued.issued_at) / 1000,
            }),
        )
    }

    /// Decodes a client-credentials request sent as `kind` and authenticates its client;
    /// returns the client id and the body's fields.
    fn oauth_request(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        kind: BodyKind,
    ) -> Result<(String, HashMap<String, String>), OAuthRefusal> {
        let fields = match kind {
            BodyKind::Form if is_content_type(headers, "application/x-www-form-urlencoded") => {
                form_fields(body)
            }
            BodyKind::Json if is_content_type(headers, "application/json") => {
                let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
                    return Err(OAuthRefusal::BadRequest);
                };
                object
                    .into_iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned())))
                    .collect()
            }
            BodyKind::Form | BodyKind::Json => return Err(OAuthRefusal::BadRequest),
        };
        let client = self.oauth_client(headers, &fields)?;
        Ok((client, fields))
    }

    /// The OAuth client, authenticated by body fields or HTTP Basic; `grant_type` checked.
    fn oauth_client(
        &self,
        headers: &HeaderMap,
        fields: &HashMap<String, String>,
    ) -> Result<String, OAuthRefusal> {
        if fields.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return Err(OAuthRefusal::BadRequest);
        }
        let (id, secret) = match basic_credentials(headers) {
            Some(pair) => pair,
            None => (
                fields.get("client_id").cloned().unwrap_or_default(),
                fields.get("client_secret").cloned().unwrap_or_default(),
            ),
        };
        let rotated = lock(&self.steering).rotated_secrets.get(&id).cloned();
        match rotated.as_ref().or_else(|| self.accounts.clients.get(&id)) {
            Some(expected) if *expected == secret => Ok(id),
            _ => Err(OAuthRefusal::BadClient),
        }
    }
}

/// How a stand-in expects its token request body.
#[derive(Debug, Clone, Copy)]
enum BodyKind {
    Form,
    Json,
}

/// Why an OAuth token request was refused.
#[derive(Debug, Clone, Copy)]
enum OAuthRefusal {
    BadRequest,
    BadClient,
}

impl OAuthRefusal {
    fn response(self) -> Response<ProxyBody> {
        match self {
            Self::BadRequest => oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
            Self::BadClient => oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
        }
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = header_text(headers, AUTHORIZATION.as_str())?;
    let decoded = STANDARD.decode(value.strip_prefix("Basic ")?).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((decode(id), decode(secret)))
}

fn form_fields(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn is_content_type(headers: &HeaderMap, expected: &str) -> bool {
    header_text(headers, CONTENT_TYPE.as_str()).is_some_and(|value| value.starts_with(expected))
}

fn failure_response(failure: &Failure) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(failure.body.clone()));
    *response.status_mut() =
        StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(seconds) = failure.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn oauth_error(status: StatusCode, code: &str) -> Response<ProxyBody> {
    let description = match code {
        "invalid_client" => "Client authentication failed",
        "invalid_scope" => "Missing or invalid scope",
        _ => "Missing or invalid grant_type",
    };
    json_response(status, &json!({"error": code, "error_description": description}))
}

fn nuapay_error(status: StatusCode, detail: Option<(&str, &str)>) -> Response<ProxyBody> {
    let body = match detail {
        Some((field, description)) => json!({
            "returnCode": "40000",
            "returnDescription": "Input validation errors",
            "details": [{"code": "40001", "field": field, "description": description}],
        }),
        None => json!({"returnCode": null, "returnDescription": null, "details": null}),
    };
    json_response(status, &body)
}
