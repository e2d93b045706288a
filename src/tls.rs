//! The rustls client configurations for upstreams and token endpoints: the Mozilla roots
//! (webpki-roots) plus any `[tls] ca_file` roots, ring as crypto provider, and — for mutual
//! TLS — a client certificate from `[identities]`.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use rustls::crypto::ring::{default_provider, sign::any_supported_type};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("ca_file certificate rejected")]
    BadRoot(#[source] rustls::Error),
    #[error("TLS setup failed")]
    Setup(#[source] rustls::Error),
}

/// A client certificate and its key (`[identities.NAME]`), e.g. an eIDAS QWAC. `Debug` shows
/// its name and a digest, never the key.
pub struct ClientIdentity {
    pub name: Arc<str>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The PEM text, for clients that take it so (Redis's).
    cert_pem: Secret,
    key_pem: Secret,
    /// SHA-256 of the certificate chain and key: changes when either is rotated.
    pub digest: String,
}

/// Two identities are the same when their certificate chains and keys are.
impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for ClientIdentity {}

impl std::hash::Hash for ClientIdentity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.digest.hash(state);
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientIdentity({}, sha256:{})", self.name, &self.digest[..12])
    }
}

impl ClientIdentity {
    /// An identity from PEM text: the certificate chain (leaf first) and its private key,
    /// checked to belong together.
    pub fn from_pem(name: &str, cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| "cert is not valid PEM".to_owned())?;
        if certs.is_empty() {
            return Err("cert holds no PEM certificate".into());
        }
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or("key holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")?;
        let signer = any_supported_type(&key).map_err(|_| "key is not a supported private key".to_owned())?;
        CertifiedKey::new(certs.clone(), signer)
            .keys_match()
            .map_err(|_| "key does not belong to the certificate".to_owned())?;
        let mut hasher = Sha256::new();
        for cert in &certs {
            hasher.update(cert.as_ref());
        }
        hasher.update(key.secret_der());
        Ok(Self {
            name: name.into(),
            certs,
            key,
            cert_pem: Secret::new(cert_pem),
            key_pem: Secret::new(key_pem),
            digest: hex::encode(hasher.finalize()),
        })
    }
}

impl ClientIdentity {
    /// The certificate chain and the key, as PEM text.
    pub fn pem(&self) -> (&Secret, &Secret) {
        (&self.cert_pem, &self.key_pem)
    }
}

/// A PEM bundle of the system's trusted roots (what the OS trusts: `/etc/ssl/certs` in the
/// image) and `extra_roots`, for clients that take their roots as PEM. Roots the system store
/// cannot give are left out, with a warning.
pub fn system_and_extra_roots_pem(extra_roots: &[CertificateDer<'static>]) -> Vec<u8> {
    let system = rustls_native_certs::load_native_certs();
    if let Some(err) = system.errors.first() {
        tracing::warn!(error = %err, "some of the system's trusted roots could not be read");
    }
    let mut pem = String::new();
    for cert in system.certs.iter().chain(extra_roots) {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem.into_bytes()
}

/// A client config trusting the public web PKI and `extra_roots`, presenting `identity` when
/// the server asks for a client certificate.
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<&ClientIdentity>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for root in extra_roots {
        roots.add(root.clone()).map_err(TlsError::BadRoot)?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots);
    match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.certs.clone(), identity.key.clone_key())
            .map_err(TlsError::Setup),
        None => Ok(builder.with_no_client_auth()),
    }
}
