//! The rustls client configuration shared by the forwarding client and the token fetcher:
//! the Mozilla roots (webpki-roots) plus any `[tls] ca_file` roots, ring as crypto provider.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("ca_file certificate rejected")]
    BadRoot(#[source] rustls::Error),
    #[error("TLS setup failed")]
    Setup(#[source] rustls::Error),
}

/// A client config trusting the public web PKI and `extra_roots`.
pub fn client_config(extra_roots: &[CertificateDer<'static>]) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for root in extra_roots {
        roots.add(root.clone()).map_err(TlsError::BadRoot)?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
