//! A throwaway certificate authority (rcgen) for the local stand-ins, so that `dev` and the
//! tests speak real TLS to them.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("TLS server setup failed")]
    Tls(#[from] rustls::Error),
}

/// A CA made at start-up, never written to disk.
pub struct TestPki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl TestPki {
    pub fn new() -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "token-sidecar test CA");
        let ca_key = KeyPair::generate()?;
        let ca_cert = params.self_signed(&ca_key)?;
        Ok(Self { ca_cert, ca_key })
    }

    /// The CA certificate, to trust (`[tls] ca_file` or `Config::extra_roots`).
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_cert.der().clone()
    }

    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    /// A client certificate for `name` signed by this CA, and its key: PEM text.
    pub fn client_certificate(&self, name: &str) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Like [`TestPki::acceptor`], but the client must present a certificate this CA signed
    /// (mutual TLS).
    pub fn mtls_acceptor(&self, names: &[&str]) -> Result<TlsAcceptor, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|err| PkiError::Tls(rustls::Error::General(err.to_string())))?;
        self.acceptor_with(names, Some(verifier))
    }

    /// A TLS acceptor for a server certificate naming `names` (host names or IP addresses),
    /// offering HTTP/2 and HTTP/1.1 by ALPN.
    pub fn acceptor(&self, names: &[&str]) -> Result<TlsAcceptor, PkiError> {
        self.acceptor_with(names, None)
    }

    /// A server certificate for `names` signed by this CA, and its key, as PEM text: for a
    /// server of another process (the tests' OAuth server).
    pub fn server_certificate(&self, names: &[&str]) -> Result<(String, String), PkiError> {
        let (cert, key) = self.server_cert(names)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn server_cert(&self, names: &[&str]) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok((cert, key))
    }

    fn acceptor_with(
        &self,
        names: &[&str],
        clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Result<TlsAcceptor, PkiError> {
        let (cert, key) = self.server_cert(names)?;
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let builder =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?;
        let builder = match clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(vec![cert.der().clone(), self.ca_der()], private_key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}
