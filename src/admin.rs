//! The admin listener: liveness, readiness, Prometheus metrics and token administration.
//! `/tokens` shows fingerprints, never tokens. `POST`s carrying an `Origin` header (a web page
//! in a local browser) are refused, and so is any request for a host name that is neither a
//! loopback name nor in `server.allowed_hosts` (a page that rebinds its own name to 127.0.0.1
//! sends that name); IP addresses pass, so a scraper that calls the pod by its IP is served.

use std::sync::Arc;

use http::header::{CONTENT_TYPE, ORIGIN};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde_json::json;

use crate::body::{full_body, json_response, ProxyBody};
use crate::config::ServerSettings;
use crate::error::{error_response, ProxyError, ERROR_HEADER};
use crate::metrics::{CredentialReading, Metrics};
use crate::reload::{ReloadError, Reloader};
use crate::route::{is_loopback_host, request_host};
use crate::token::cache::{TokenCache, TokenError};

pub struct AdminState {
    tokens: Arc<TokenCache>,
    metrics: Metrics,
    reloader: Arc<Reloader>,
    /// `server.allowed_hosts` at start-up (the admin listener is restart-only).
    allowed_hosts: Vec<String>,
}

impl AdminState {
    pub fn new(
        tokens: Arc<TokenCache>,
        metrics: Metrics,
        reloader: Arc<Reloader>,
        settings: &ServerSettings,
    ) -> Self {
        Self {
            tokens,
            metrics,
            reloader,
            allowed_hosts: settings.allowed_hosts.clone(),
        }
    }

    /// Whether a request for `host` may be served: see the module doc.
    fn serves(&self, host: &str) -> bool {
        let address = host.trim_start_matches('[').trim_end_matches(']');
        is_loopback_host(host)
            || address.parse::<std::net::IpAddr>().is_ok()
            || self.allowed_hosts.iter().any(|allowed| allowed == host)
    }
}

/// The metrics listener (`server.metrics_listen`): `GET /metrics` and `GET /healthz`, for any
/// host (it changes nothing and shows no token); nothing else.
pub async fn scrape(state: Arc<AdminState>, request: Request<ProxyBody>) -> Response<ProxyBody> {
    let path = request.uri().path().trim_end_matches('/');
    match (request.method(), path) {
        (&Method::GET, "/metrics") => metrics(&state).await,
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        (_, "/metrics" | "/healthz") => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the metrics listener answers GET only",
        ),
        _ => error_response(
            StatusCode::NOT_FOUND,
            "no_route",
            "the metrics listener serves /metrics and /healthz only",
        ),
    }
}

pub async fn handle(state: Arc<AdminState>, request: Request<ProxyBody>) -> Response<ProxyBody> {
    match request_host(&request) {
        Ok(Some(host)) if !state.serves(&host) => {
            return error_response(
                StatusCode::NOT_FOUND,
                "no_route",
                "the admin listener serves loopback names, addresses and server.allowed_hosts only",
            )
        }
        Ok(_) => {}
        Err(err) => return ProxyError::from(err).into_response(),
    }
    if request.method() == Method::POST && request.headers().contains_key(ORIGIN) {
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "admin POSTs from a web page (with an Origin header) are refused",
        );
    }
    let path = request.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (request.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        (&Method::GET, ["readyz"]) => readiness(&state).await,
        (&Method::GET, ["metrics"]) => metrics(&state).await,
        (&Method::GET, ["tokens"]) => json_response(StatusCode::OK, &json!(state.tokens.snapshots().await)),
        (&Method::POST, ["tokens", credential, "refresh"]) => {
            refresh(&state, credential, forced(request.uri().query())).await
        }
        (&Method::POST, ["config", "reload"]) => reload(&state).await,
        (_, ["healthz" | "readyz" | "metrics" | "tokens"])
        | (_, ["tokens", _, "refresh"])
        | (_, ["config", "reload"]) => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this admin path",
        ),
        _ => error_response(StatusCode::NOT_FOUND, "no_route", "no such admin path"),
    }
}

/// Ready once the listeners are up (they are, if this answers) and every `prefetch`
/// credential has had a token since start-up. A provider outage after that does not make the
/// pod unready — every replica would leave the Service at once, turning one degraded provider
/// into an outage of the whole application — it shows as `degraded` instead.
async fn readiness(state: &AdminState) -> Response<ProxyBody> {
    let mut pending = Vec::new();
    let mut degraded = Vec::new();
    for credential in state.tokens.prefetch_credentials() {
        if !state.tokens.ever_fetched(&credential) {
            pending.push(credential.to_string());
        } else if !state.tokens.has_usable(&credential).await {
            degraded.push(credential.to_string());
        }
    }
    if pending.is_empty() {
        json_response(
            StatusCode::OK,
            &json!({ "status": "ready", "degraded": degraded }),
        )
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": "waiting for tokens", "pending": pending }),
        )
    }
}

/// `POST /config/reload`: 200 with what was loaded, or 422 `invalid_config` with the
/// problems (the old configuration keeps serving).
async fn reload(state: &AdminState) -> Response<ProxyBody> {
    match state.reloader.reload().await {
        Ok(reloaded) => json_response(
            StatusCode::OK,
            &json!({
                "reloaded": true,
                "routes": reloaded.routes,
                "credentials": reloaded.credentials,
                "version": reloaded.version,
            }),
        ),
        Err(err @ ReloadError::Invalid(_)) => {
            let mut response = json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({ "error": {
                    "code": "invalid_config",
                    "message": err.to_string(),
                    "problems": err.problems(),
                }}),
            );
            response
                .headers_mut()
                .insert(ERROR_HEADER, HeaderValue::from_static("invalid_config"));
            response
        }
        Err(err @ ReloadError::NoFile) => {
            error_response(StatusCode::CONFLICT, "no_config_file", &err.to_string())
        }
        Err(err) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reload_failed",
            &crate::failure::Chain(&err).to_string(),
        ),
    }
}

async fn metrics(state: &AdminState) -> Response<ProxyBody> {
    let readings = state
        .tokens
        .snapshots()
        .await
        .into_iter()
        .map(|snapshot| CredentialReading {
            credential: snapshot.credential.into(),
            state: snapshot.state,
            expires_in_seconds: snapshot.expires_in_ms.map(|ms| ms as f64 / 1000.0),
        });
    state.metrics.credentials_now(readings);
    let mut response = Response::new(full_body(state.metrics.render()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// `?force=true` overrides the credential's back-off.
fn forced(query: Option<&str>) -> bool {
    query.is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "force=true" || pair == "force")
    })
}

async fn refresh(state: &AdminState, credential: &str, force: bool) -> Response<ProxyBody> {
    match state.tokens.refresh_now(credential, force).await {
        Ok(_) => match state.tokens.snapshot(credential).await {
            Some(snapshot) => json_response(StatusCode::OK, &json!(snapshot)),
            None => error_response(StatusCode::NOT_FOUND, "unknown_credential", "no such credential"),
        },
        Err(TokenError::UnknownCredential(_)) => {
            error_response(StatusCode::NOT_FOUND, "unknown_credential", "no such credential")
        }
        Err(err) => ProxyError::from(err).into_response(),
    }
}
