//! A stand-in partner API: accepts only tokens the stand-in providers issued and that are still
//! valid, and echoes what it received as JSON (headers, merchant, body size and SHA-256).
//!
//! Special paths (after any prefix): `…/redirect` answers 302; `…/bytes/N` streams N bytes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use futures_util::stream;
use http::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::issued::{Issued, IssuedTokens, Refusal};
use crate::body::json_response;
use crate::body::{full_body, BoxError, ProxyBody};
use crate::server::Handler;

/// Header the upstream also accepts a token in (for routes with `inject = { header = … }`).
pub const CUSTOM_TOKEN_HEADER: &str = "x-auth-token";

pub struct EchoUpstream {
    issued: Arc<IssuedTokens>,
    accepted: AtomicUsize,
    refused: Mutex<Vec<Refusal>>,
}

impl EchoUpstream {
    pub fn new(issued: Arc<IssuedTokens>) -> Arc<Self> {
        Arc::new(Self {
            issued,
            accepted: AtomicUsize::new(0),
            refused: Mutex::default(),
        })
    }

    pub fn handler(self: &Arc<Self>) -> Handler {
        let upstream = self.clone();
        Arc::new(move |request| Box::pin(upstream.clone().handle(request)))
    }

    /// Requests that carried a valid token.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Why requests were refused, in order.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks the request's token and records refusals.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(Issued, &'static str), Refusal> {
        let checked = match presented_token(headers) {
            Some((token, scheme)) => self.issued.check(&token).map(|issued| (issued, scheme)),
            None => Err(Refusal::Unknown),
        };
        if let Err(refusal) = checked {
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(refusal);
        }
        checked
    }

    async fn handle(self: Arc<Self>, request: Request<ProxyBody>) -> Response<ProxyBody> {
        let (issued, scheme) = match self.authorize(request.headers()) {
            Ok(accepted) => accepted,
            Err(refusal) => return unauthorized(refusal),
        };
        self.accepted.fetch_add(1, Ordering::SeqCst);
        let path = request.uri().path().to_owned();
        if path.ends_with("/redirect") {
            let mut response = Response::new(full_body(Bytes::new()));
            *response.status_mut() = StatusCode::FOUND;
            response.headers_mut().insert(
                LOCATION,
                HeaderValue::from_static("https://elsewhere.test/landing"),
            );
            return response;
        }
        if let Some(count) = path
            .rsplit_once("/bytes/")
            .and_then(|(_, n)| n.parse::<u64>().ok())
        {
            return stream_bytes(count);
        }
        echo(request, issued, scheme).await
    }
}

/// The 401 a refused token gets.
pub fn unauthorized(refusal: Refusal) -> Response<ProxyBody> {
    let mut response = json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"error": "invalid_token", "error_description": refusal.as_str()}),
    );
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    response
}

/// The token a request carries and how: `Bearer`, Basic username, or the custom header.
pub fn presented_token(headers: &HeaderMap) -> Option<(String, &'static str)> {
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(token) = value.strip_prefix("Bearer ") {
            return Some((token.to_owned(), "bearer"));
        }
        if let Some(encoded) = value.strip_prefix("Basic ") {
            let decoded = String::from_utf8(STANDARD.decode(encoded).ok()?).ok()?;
            return Some((decoded.strip_suffix(':')?.to_owned(), "basic-username"));
        }
        return None;
    }
    let value = headers.get(CUSTOM_TOKEN_HEADER)?.to_str().ok()?;
    Some((value.rsplit(' ').next()?.to_owned(), "header"))
}

async fn echo(request: Request<ProxyBody>, issued: Issued, scheme: &str) -> Response<ProxyBody> {
    let (parts, mut body) = request.into_parts();
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    length += data.len() as u64;
                }
            }
            Err(_) => return json_response(StatusCode::BAD_REQUEST, &json!({"error": "body read failed"})),
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .filter(|(name, _)| *name != AUTHORIZATION && name.as_str() != CUSTOM_TOKEN_HEADER)
        .map(|(name, value)| (name.to_string(), json!(value.to_str().unwrap_or("<binary>"))))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "merchant": issued.subject,
            "auth": scheme,
            "headers": headers,
            "body_bytes": length,
            "body_sha256": hex::encode(hasher.finalize()),
        }),
    )
}

/// `count` bytes of a repeating pattern, produced chunk by chunk.
fn stream_bytes(count: u64) -> Response<ProxyBody> {
    const CHUNK: u64 = 64 * 1024;
    let chunks = stream::unfold(0u64, move |sent| async move {
        if sent >= count {
            return None;
        }
        let size = CHUNK.min(count - sent);
        let data = Bytes::from(pattern(sent, size as usize));
        Some((Ok::<_, BoxError>(Frame::data(data)), sent + size))
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    response
}

/// The bytes `offset..offset+len` of the stream that `…/bytes/N` sends.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((offset + i) % 251) as u8).collect()
}
