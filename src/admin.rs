//! The admin listener: liveness, readiness, Prometheus metrics and token administration.
//! `/tokens` shows fingerprints, never tokens.

use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::error::{error_response, full_body, ProxyBody, ProxyError};
use crate::metrics::Metrics;
use crate::token::cache::{TokenCache, TokenError};

pub struct AdminState {
    tokens: Arc<TokenCache>,
    metrics: Metrics,
}

impl AdminState {
    pub fn new(tokens: Arc<TokenCache>, metrics: Metrics) -> Self {
        Self { tokens, metrics }
    }
}

pub async fn handle(state: Arc<AdminState>, request: Request<Incoming>) -> Response<ProxyBody> {
    let path = request.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (request.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        (&Method::GET, ["readyz"]) => readiness(&state).await,
        (&Method::GET, ["metrics"]) => metrics(&state),
        (&Method::GET, ["tokens"]) => json(StatusCode::OK, serde_json::json!(state.tokens.snapshots().await)),
        (&Method::POST, ["tokens", credential, "refresh"]) => refresh(&state, credential).await,
        (_, ["healthz" | "readyz" | "metrics" | "tokens"]) | (_, ["tokens", _, "refresh"]) => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this admin path",
        ),
        _ => error_response(StatusCode::NOT_FOUND, "no_route", "no such admin path"),
    }
}

/// Ready once the listeners are up (they are, if this answers) and every `prefetch`
/// credential holds a usable token.
async fn readiness(state: &AdminState) -> Response<ProxyBody> {
    let mut pending = Vec::new();
    for credential in state.tokens.prefetch_credentials() {
        if !state.tokens.has_usable(&credential).await {
            pending.push(credential.to_string());
        }
    }
    if pending.is_empty() {
        json(StatusCode::OK, serde_json::json!({ "status": "ready" }))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "waiting for tokens", "pending": pending }),
        )
    }
}

fn metrics(state: &AdminState) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(state.metrics.render()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

async fn refresh(state: &AdminState, credential: &str) -> Response<ProxyBody> {
    match state.tokens.refresh_now(credential).await {
        Ok(_) => match state.tokens.snapshot(credential).await {
            Some(snapshot) => json(StatusCode::OK, serde_json::json!(snapshot)),
            None => error_response(StatusCode::NOT_FOUND, "unknown_credential", "no such credential"),
        },
        Err(TokenError::UnknownCredential(_)) => {
            error_response(StatusCode::NOT_FOUND, "unknown_credential", "no such credential")
        }
        Err(err) => ProxyError::from(err).into_response(),
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
