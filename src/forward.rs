//! Forwarding: the shared pooled hyper client over rustls (HTTP/1.1 and HTTP/2 by ALPN), the
//! upstream URI, header hygiene and token injection. Pure functions except the client itself.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::body::{boxed, BoxError, ProxyBody};
use crate::config::{Inject, RouteSpec, Upstream, HOP_BY_HOP};
use crate::egress::{Egress, EgressConnector};
use crate::route::push_path;
use crate::secret::AccessToken;
use crate::tls::TlsError;
use crate::token::dpop;

/// hyper's pooled client over rustls, through the egress proxy where there is one.
pub type UpstreamClient = Client<HttpsConnector<EgressConnector>, ProxyBody>;

/// Where a request goes: the pooled client in production, boxed as a tower service so that
/// the request path can be driven in-process by a `service_fn` stand-in (`proxy/tests.rs`).
pub type UpstreamService = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, BoxError>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept per upstream. Without a bound, a burst (a client's requests held up
/// and let go at once) leaves as many connections open for good, since steady traffic spread
/// over all of them keeps each from ever idling out: the soak saw 57 held after 500 requests
/// were let go at once.
const MAX_IDLE_PER_UPSTREAM: usize = 32;

/// The one client every route forwards through; connections are pooled per upstream, and go
/// through the egress proxy when there is one.
pub fn upstream_client(tls: rustls::ClientConfig, egress: Option<&Egress>) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(EgressConnector::new(http, egress));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(MAX_IDLE_PER_UPSTREAM)
        .build(https)
}

/// `client` as an [`UpstreamService`]: its response bodies boxed, its errors too.
pub fn upstream_service(client: UpstreamClient) -> UpstreamService {
    BoxCloneSyncService::new(
        client
            .map_response(|response: Response<Incoming>| response.map(boxed))
            .map_err(BoxError::from),
    )
}

/// The upstream services of one configuration: the shared one, and one per client identity
/// the routes present (mutual TLS), keyed by the identity's digest.
#[derive(Clone)]
pub struct Upstreams {
    shared: UpstreamService,
    by_identity: HashMap<String, UpstreamService>,
}

impl Upstreams {
    /// The services `routes` need; `previous`'s are kept (with their pooled connections) when
    /// given — it is, unless the trusted roots or the way out changed — for the shared client
    /// and every identity that did not change.
    pub fn build(
        routes: &[Arc<RouteSpec>],
        roots: &[CertificateDer<'static>],
        egress: Option<&Egress>,
        previous: Option<&Upstreams>,
    ) -> Result<Self, TlsError> {
        let shared = match previous {
            Some(previous) => previous.shared.clone(),
            None => upstream_service(upstream_client(crate::tls::client_config(roots, None)?, egress)),
        };
        let mut by_identity = HashMap::new();
        for identity in routes
            .iter()
            .filter_map(|route| route.options.client_identity.as_ref())
        {
            if by_identity.contains_key(&identity.digest) {
                continue;
            }
            let kept = previous.and_then(|previous| previous.by_identity.get(&identity.digest));
            let service = match kept {
                Some(kept) => kept.clone(),
                None => upstream_service(upstream_client(
                    crate::tls::client_config(roots, Some(identity))?,
                    egress,
                )),
            };
            by_identity.insert(identity.digest.clone(), service);
        }
        Ok(Self { shared, by_identity })
    }

    /// Every route sent to `service` (tests).
    pub fn single(service: UpstreamService) -> Self {
        Self {
            shared: service,
            by_identity: HashMap::new(),
        }
    }

    /// The service for `route`: with its client certificate, if it has one.
    pub fn for_route(&self, route: &RouteSpec) -> &UpstreamService {
        route
            .options
            .client_identity
            .as_ref()
            .and_then(|identity| self.by_identity.get(&identity.digest))
            .unwrap_or(&self.shared)
    }
}

/// `upstream` + the path after the route's prefix + the original query.
pub fn upstream_uri(upstream: &Upstream, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
    let mut path_and_query =
        String::with_capacity(upstream.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
    push_path(&mut path_and_query, &upstream.base_path, rest);
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
}

/// Removes hop-by-hop headers, including any that `Connection` names. Only the names present
/// are removed, and `Connection`'s own options (`close`, `keep-alive`) are no header to look for.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = headers.keys().filter(|name| HOP_BY_HOP.contains(name)).count();
    if present == 0 {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|option| !option.eq_ignore_ascii_case("close") && !option.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        if present == 0 {
            break;
        }
        if headers.remove(name).is_some() {
            present -= 1;
        }
    }
}

/// Prepares a client's headers for the upstream: no hop-by-hop headers, no client credentials
/// (`Authorization`), no `Host` (the upstream gets its own), nothing in `strip`.
pub fn clean_request_headers(headers: &mut HeaderMap, strip: &[&HeaderName]) {
    remove_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::HOST);
    for name in strip {
        headers.remove(*name);
    }
}

/// Puts the token into `headers` as the route asks, marked sensitive (HPACK never indexes it,
/// and `Debug` does not print it).
pub fn inject_token(
    headers: &mut HeaderMap,
    inject: &Inject,
    token: &AccessToken,
) -> Result<(), InvalidHeaderValue> {
    let token = token.expose();
    let (name, mut value) = match inject {
        Inject::Bearer => (header::AUTHORIZATION, joined(&["Bearer ", token, ""])?),
        Inject::BasicUsername => (
            header::AUTHORIZATION,
            joined(&["Basic ", &STANDARD.encode(format!("{token}:")), ""])?,
        ),
        Inject::Header(header) => (
            header.name.clone(),
            joined(&[&header.prefix, token, &header.suffix])?,
        ),
    };
    value.set_sensitive(true);
    headers.insert(name, value);
    Ok(())
}

/// A header value of `parts` in a row, checked once and not copied again.
fn joined(parts: &[&str; 3]) -> Result<HeaderValue, InvalidHeaderValue> {
    let mut bytes = BytesMut::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        bytes.extend_from_slice(part.as_bytes());
    }
    HeaderValue::from_maybe_shared(bytes.freeze())
}

/// Puts a DPoP-bound token in (`Authorization: DPoP`, RFC 9449 §7.1) with its `proof`, both
/// marked sensitive.
pub fn inject_dpop_token(
    headers: &mut HeaderMap,
    token: &AccessToken,
    proof: &str,
) -> Result<(), InvalidHeaderValue> {
    let mut authorization = HeaderValue::from_str(&format!("{} {}", dpop::SCHEME, token.expose()))?;
    authorization.set_sensitive(true);
    let mut proof = HeaderValue::from_str(proof)?;
    proof.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, authorization);
    headers.insert(dpop::DPOP, proof);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base_path: &str) -> Upstream {
        Upstream::new(
            http::uri::Scheme::HTTPS,
            "h.test:8443".parse().unwrap(),
            base_path.into(),
        )
        .unwrap()
    }

    #[test]
    fn prefix_rest_joins_onto_base_path_and_keeps_the_query() {
        let uri = upstream_uri(&upstream("/api"), "/payments", Some("x=1&y=%20")).unwrap();
        assert_eq!(uri.to_string(), "https://h.test:8443/api/payments?x=1&y=%20");
        assert_eq!(
            upstream_uri(&upstream(""), "", None).unwrap().to_string(),
            "https://h.test:8443/"
        );
    }

    #[test]
    fn client_credentials_and_hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-own"),
        );
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("x-merchant", HeaderValue::from_static("acme"));
        headers.insert(header::HOST, HeaderValue::from_static("localhost:8080"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert("x-keep", HeaderValue::from_static("yes"));
        let merchant = HeaderName::from_static("x-merchant");
        clean_request_headers(&mut headers, &[&merchant]);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-keep"]);
    }

    #[test]
    fn injection_modes() {
        let token = AccessToken::new("tok");
        let mut headers = HeaderMap::new();
        inject_token(&mut headers, &Inject::Bearer, &token).unwrap();
        assert_eq!(headers[header::AUTHORIZATION], "Bearer tok");
        assert!(headers[header::AUTHORIZATION].is_sensitive());
        inject_token(&mut headers, &Inject::BasicUsername, &token).unwrap();
        assert_eq!(
            headers[header::AUTHORIZATION],
            format!("Basic {}", STANDARD.encode("tok:"))
        );
        let custom = Inject::Header(Box::new(crate::config::HeaderInject {
            name: HeaderName::from_static("x-auth-token"),
            prefix: "Token ".into(),
            suffix: "".into(),
        }));
        inject_token(&mut headers, &custom, &token).unwrap();
        assert_eq!(headers["x-auth-token"], "Token tok");
    }
}
