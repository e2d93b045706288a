//! Outbound connections through the egress proxy (`[egress]`): its settings, and a connector
//! that opens an HTTP `CONNECT` tunnel (hyper-util's `Tunnel`, with `Proxy-Authorization: Basic`
//! up front) for every host not in `no_proxy`, and connects directly to the rest. TLS runs end
//! to end inside the tunnel, on top of this connector. The token endpoint clients (reqwest)
//! take the same settings.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::body::BoxError;
use crate::secret::Secret;

/// Outbound connections through an HTTP CONNECT proxy (`[egress]`), e.g. for allow-listed
/// source addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Egress {
    /// `http://host:port` of the proxy.
    pub proxy: http::Uri,
    /// `user:password` for `Proxy-Authorization: Basic`.
    pub auth: Option<Secret>,
    /// Lower-case hosts reached directly (loopback is not exempt unless listed).
    pub no_proxy: Vec<String>,
}

impl Egress {
    /// Whether connections to `host` go through the proxy.
    pub fn proxies(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        !self.no_proxy.contains(&host)
    }
}

/// Direct, or through the proxy, per destination host.
#[derive(Clone)]
pub struct EgressConnector {
    direct: HttpConnector,
    tunnel: Option<(Tunnel<HttpConnector>, Arc<Egress>)>,
}

impl EgressConnector {
    pub fn new(direct: HttpConnector, egress: Option<&Egress>) -> Self {
        let tunnel = egress.map(|egress| {
            let mut tunnel = Tunnel::new(egress.proxy.clone(), direct.clone());
            if let Some(auth) = &egress.auth {
                let encoded = format!("Basic {}", STANDARD.encode(auth.expose()));
                if let Ok(mut value) = HeaderValue::from_str(&encoded) {
                    value.set_sensitive(true);
                    tunnel = tunnel.with_auth(value);
                }
            }
            (tunnel, Arc::new(egress.clone()))
        });
        Self { direct, tunnel }
    }
}

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(())) // both connectors are always ready
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let host = destination.host().unwrap_or_default();
        match &self.tunnel {
            Some((tunnel, egress)) if egress.proxies(host) => {
                let mut tunnel = tunnel.clone();
                let destination = with_port(destination);
                Box::pin(async move {
                    std::future::poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                    Ok(tunnel.call(destination).await?)
                })
            }
            _ => {
                let mut direct = self.direct.clone();
                Box::pin(async move { Ok(direct.call(destination).await?) })
            }
        }
    }
}

/// The destination with its port spelled out (`CONNECT host:port`; the tunnel would assume 443
/// for a plaintext upstream).
fn with_port(destination: Uri) -> Uri {
    if destination.port().is_some() {
        return destination;
    }
    let port = if destination.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    let host = destination.host().unwrap_or_default();
    let authority = format!("{host}:{port}");
    let mut parts = destination.clone().into_parts();
    match authority.parse() {
        Ok(authority) => {
            parts.authority = Some(authority);
            Uri::from_parts(parts).unwrap_or(destination)
        }
        Err(_) => destination,
    }
}
