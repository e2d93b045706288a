//! Asks a token endpoint for a token: one reqwest client per provider (its own timeouts), no
//! redirects followed (a redirect would carry our secrets elsewhere), answers capped in size,
//! and every request within the provider's fetch budget ([`super::budget`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, StatusCode};
use tracing::Instrument;

use super::budget::{Budget, Share};
use super::dialect::{parse_response, IssuedToken, MAX_RESPONSE_BYTES};
use super::dpop::{self, Nonces};
use super::error::{error_code_from_body, FetchError};
use crate::clock::SharedClock;
use crate::egress::Egress;
use crate::failure::{Chain, Transport};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::telemetry;
use crate::token::spec::{CredentialSpec, ProviderSpec};
use rustls::pki_types::CertificateDer;

/// Fetches tokens for any configured credential.
pub struct TokenFetcher {
    clients: HashMap<Arc<str>, ProviderClient>,
    clock: SharedClock,
    metrics: Metrics,
    /// The latest DPoP nonce each token endpoint handed out.
    dpop_nonces: Arc<Nonces>,
}

/// One provider's HTTP client and the settings it was built with.
struct ProviderClient {
    timeouts: (Duration, Duration),
    /// The client certificate's digest, for mutual TLS.
    identity: Option<String>,
    client: reqwest::Client,
    /// `max_fetch_rate`: kept across reloads while the rate stays.
    budget: Option<Arc<Budget>>,
}

/// Why a token endpoint client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("the HTTP client could not be built")]
    Http(#[from] reqwest::Error),
}

impl TokenFetcher {
    pub fn new(
        providers: &[Arc<ProviderSpec>],
        roots: &[CertificateDer<'static>],
        egress: Option<&Egress>,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Result<Self, ClientError> {
        Self::rebuilt(providers, roots, egress, (clock, metrics), None)
    }

    /// A fetcher for `providers` that keeps `previous`'s client for every provider whose
    /// settings did not change (`previous` is `None` when the TLS settings did).
    pub fn rebuilt(
        providers: &[Arc<ProviderSpec>],
        roots: &[CertificateDer<'static>],
        egress: Option<&Egress>,
        (clock, metrics): (SharedClock, Metrics),
        previous: Option<&TokenFetcher>,
    ) -> Result<Self, ClientError> {
        let mut clients = HashMap::new();
        for provider in providers {
            let timeouts = (provider.connect_timeout, provider.timeout);
            let identity = provider.client_identity.as_ref().map(|id| id.digest.clone());
            let kept = previous
                .and_then(|previous| previous.clients.get(&provider.name))
                .filter(|kept| kept.timeouts == timeouts && kept.identity == identity);
            let client = match kept {
                Some(kept) => kept.client.clone(),
                None => {
                    let tls = crate::tls::client_config(roots, provider.client_identity.as_deref())?;
                    provider_client(provider, tls, egress)?
                }
            };
            let budget = match (
                previous.and_then(|previous| previous.clients.get(&provider.name)),
                provider.budget,
            ) {
                (Some(kept), Some(rate)) => kept
                    .budget
                    .clone()
                    .filter(|budget| budget.rate() == rate)
                    .or_else(|| Some(Arc::new(Budget::new(rate)))),
                (None, Some(rate)) => Some(Arc::new(Budget::new(rate))),
                (_, None) => None,
            };
            clients.insert(
                provider.name.clone(),
                ProviderClient {
                    timeouts,
                    identity,
                    client,
                    budget,
                },
            );
        }
        let dpop_nonces = previous.map_or_else(Default::default, |previous| previous.dpop_nonces.clone());
        Ok(Self {
            clients,
            clock,
            metrics,
            dpop_nonces,
        })
    }

    /// One request to the credential's token endpoint; no retries here, except the one round
    /// a DPoP server may ask for to hand out its nonce (`use_dpop_nonce`).
    pub async fn fetch(&self, credential: &CredentialSpec, share: Share) -> Result<IssuedToken, FetchError> {
        let request = &credential.request;
        let origin = request.url.origin().ascii_serialization();
        let mut nonce = request.dpop.as_ref().and_then(|_| self.dpop_nonces.get(&origin));
        let mut nonce_round = false;
        loop {
            self.within_budget(credential, share).await?;
            let requested_at = self.clock.now();
            let (content_type, body) = request.encode_body(requested_at)?;
            let mut builder = self
                .post(credential, reqwest::Url::clone(&request.url))?
                .header(CONTENT_TYPE, content_type)
                .body(body);
            if let Some(key) = &request.dpop {
                let proof = key
                    .proof("POST", request.url.as_str(), requested_at, nonce.as_deref(), None)
                    .map_err(|_| FetchError::malformed("the DPoP proof could not be signed"))?;
                builder = builder.header(dpop::DPOP, proof);
            }
            let response = send(builder, &request.url).await?;
            let status = response.status();
            let retry_after = response.headers().get(RETRY_AFTER).and_then(parse_retry_after);
            let offered = request
                .dpop
                .as_ref()
                .and_then(|_| dpop::nonce_in(response.headers()));
            if let Some(offered) = &offered {
                self.dpop_nonces.remember(&origin, offered.clone());
            }
            let body = read_capped(response).await?;
            match classify(status, retry_after, &body, &request.secrets) {
                Err(FetchError::Rejected {
                    reason: Some(reason), ..
                }) if reason == "use_dpop_nonce" && offered.is_some() && !nonce_round => {
                    nonce = offered;
                    nonce_round = true;
                    continue;
                }
                outcome => outcome?,
            }
            let issued = parse_response(&credential.provider.response, &body, requested_at)?;
            if issued.dpop && request.dpop.is_none() {
                return Err(FetchError::malformed(
                    "the token is DPoP-bound, but the provider does not have dpop = true",
                ));
            }
            return Ok(issued);
        }
    }

    /// Waits for the provider's next fetch slot (`share` of its budget), or fails throttled
    /// when that is too far away.
    async fn within_budget(&self, credential: &CredentialSpec, share: Share) -> Result<(), FetchError> {
        let provider = &credential.provider.name;
        let Some(budget) = self
            .clients
            .get(provider)
            .and_then(|client| client.budget.as_ref())
        else {
            return Ok(());
        };
        match budget.reserve(share, tokio::time::Instant::now()) {
            Ok(wait) if wait.is_zero() => Ok(()),
            Ok(wait) => {
                self.metrics.fetch_throttled(provider);
                tokio::time::sleep(wait).await;
                Ok(())
            }
            Err(retry_after) => {
                self.metrics.fetch_throttled(provider);
                Err(FetchError::Throttled { retry_after })
            }
        }
    }

    /// Revokes a Nuapay token: `POST {token url}/{token_id}/revoke` with the API key.
    pub async fn revoke(&self, credential: &CredentialSpec, token_id: &str) -> Result<(), FetchError> {
        let url = super::dialect::nuapay::revoke_url(&credential.request.url, token_id).ok_or(
            FetchError::Unsendable {
                reason: "the token URL cannot take a revocation path",
            },
        )?;
        let response = self
            .post(credential, url)?
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let body = read_capped(response).await?;
        classify(status, None, &body, &credential.request.secrets)
    }

    /// A POST to the credential's provider, authenticated as the credential says.
    fn post(
        &self,
        credential: &CredentialSpec,
        url: reqwest::Url,
    ) -> Result<reqwest::RequestBuilder, FetchError> {
        let client = self
            .clients
            .get(&credential.provider.name)
            .map(|provider| &provider.client)
            .ok_or(FetchError::Unsendable {
                reason: "its provider was removed by a reload",
            })?;
        let mut builder = client.post(url).header(ACCEPT, "application/json");
        if let Some(authorization) = &credential.request.authorization {
            let mut value =
                HeaderValue::from_str(authorization.expose()).map_err(|_| FetchError::Unsendable {
                    reason: "the client credentials are not header-safe",
                })?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        Ok(builder)
    }
}

/// A client for one token endpoint: HTTP/1.1, its own timeouts, no redirects, and no proxy but
/// the egress proxy (`CONNECT`, as on the forwarding path).
fn provider_client(
    provider: &ProviderSpec,
    mut tls: rustls::ClientConfig,
    egress: Option<&Egress>,
) -> Result<reqwest::Client, reqwest::Error> {
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let builder = match egress {
        Some(egress) => {
            let mut proxy = reqwest::Proxy::all(egress.proxy.to_string())?
                .no_proxy(reqwest::NoProxy::from_string(&egress.no_proxy.join(",")));
            if let Some((user, password)) = egress
                .auth
                .as_ref()
                .and_then(|auth| auth.expose().split_once(':'))
            {
                proxy = proxy.basic_auth(user, password);
            }
            reqwest::Client::builder().proxy(proxy)
        }
        None => reqwest::Client::builder().no_proxy(),
    };
    builder
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(provider.connect_timeout)
        .timeout(provider.timeout)
        .user_agent(concat!("token-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Sends a token request, in a trace span of its own while telemetry is on.
async fn send(builder: reqwest::RequestBuilder, url: &reqwest::Url) -> Result<reqwest::Response, FetchError> {
    if !telemetry::on() {
        return builder.send().await.map_err(transport_error);
    }
    let span = telemetry::endpoint_span(url);
    let sent = builder.send().instrument(span.clone()).await;
    match &sent {
        Ok(response) => {
            telemetry::record_status(&span, &tracing::Span::current(), response.status().as_u16())
        }
        Err(err) => telemetry::record_error(
            &span,
            if err.is_timeout() {
                "timeout"
            } else {
                "unreachable"
            },
        ),
    }
    sent.map_err(transport_error)
}

fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    secrets: &[Secret],
) -> Result<(), FetchError> {
    match status.as_u16() {
        200..=299 => Ok(()),
        400 | 401 | 403 => {
            let secrets: Vec<&str> = secrets.iter().map(Secret::expose).collect();
            Err(FetchError::Rejected {
                status: status.as_u16(),
                reason: error_code_from_body(body, &secrets),
            })
        }
        429 => Err(FetchError::RateLimited { retry_after }),
        other => Err(FetchError::Status {
            status: other,
            retry_after,
        }),
    }
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(FetchError::malformed("answer is larger than 256 KiB"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` in seconds (the HTTP-date form is rare for token endpoints and ignored).
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let seconds: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds.min(3600)))
}

/// A failed exchange with the endpoint, classified as the upstream path classifies its own
/// ([`Transport::of`]); the library's words go to the log, never into the error.
fn transport_error(err: reqwest::Error) -> FetchError {
    if err.is_timeout() {
        return FetchError::Timeout;
    }
    tracing::debug!(error = %Chain(&err), "token endpoint request failed");
    FetchError::Unreachable {
        reason: Transport::of(&err),
    }
}
