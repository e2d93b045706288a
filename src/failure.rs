//! Reading an error's chain, once for everyone (ground floor): its causes — also those an
//! `io::Error` wraps, which its `source()` skips —, the chain as one log line, and why a
//! connection to a server failed, in the sidecar's own words. The upstream path and the token
//! endpoint path classify transport failures with the same [`Transport::of`]; what a client or
//! `/tokens` reads is a [`Transport`], never a library's text (that stays in the log's chain).

use std::error::Error;
use std::fmt;

/// `err` and each error below it: `source()`, and the error an `io::Error` wraps.
pub fn causes<'e>(err: &'e (dyn Error + 'static)) -> impl Iterator<Item = &'e (dyn Error + 'static)> {
    std::iter::successors(Some(err), |&cause| {
        let wrapped = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn Error + 'static));
        wrapped.or_else(|| cause.source())
    })
}

/// The error and its causes, `: `-separated, for one log line.
pub struct Chain<'e>(pub &'e (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for cause in causes(self.0) {
            if !first {
                f.write_str(": ")?;
            }
            write!(f, "{cause}")?;
            first = false;
        }
        Ok(())
    }
}

/// Why a connection to a server (an upstream, a token endpoint, a proxy) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Refused,
    ConnectTimedOut,
    Closed,
    UntrustedCertificate,
    CertificateNameMismatch,
    CertificateRefused,
    Handshake,
    /// Connecting failed for another reason (a name that does not resolve, a refused tunnel).
    Connect,
    /// The connection failed after it was made, before an answer arrived.
    Exchange,
    /// The server answered 101 though no upgrade was asked for: the connection is unusable.
    UnsolicitedUpgrade,
}

impl Transport {
    /// The first cause in `err`'s chain that says what happened; where none does, whether it
    /// failed while connecting (as hyper and reqwest tell) or after.
    pub fn of(err: &(dyn Error + 'static)) -> Self {
        causes(err).find_map(Self::named_by).unwrap_or_else(|| {
            if connecting(err) {
                Self::Connect
            } else {
                Self::Exchange
            }
        })
    }

    fn named_by(cause: &(dyn Error + 'static)) -> Option<Self> {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(Self::of_tls(tls));
        }
        let io = cause.downcast_ref::<std::io::Error>()?;
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => Some(Self::Refused),
            std::io::ErrorKind::TimedOut => Some(Self::ConnectTimedOut),
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => Some(Self::Closed),
            _ => None,
        }
    }

    fn of_tls(tls: &rustls::Error) -> Self {
        use rustls::CertificateError;
        match tls {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => Self::UntrustedCertificate,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => Self::CertificateNameMismatch,
            rustls::Error::InvalidCertificate(_) => Self::CertificateRefused,
            _ => Self::Handshake,
        }
    }
}

/// Whether hyper's or reqwest's error says it failed while connecting.
fn connecting(err: &(dyn Error + 'static)) -> bool {
    causes(err).any(|cause| {
        cause
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(|err| err.is_connect())
            || cause
                .downcast_ref::<reqwest::Error>()
                .is_some_and(|err| err.is_connect())
    })
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Refused => "connection refused",
            Self::ConnectTimedOut => "connecting timed out",
            Self::Closed => "the connection was closed",
            Self::UntrustedCertificate => "its TLS certificate is not from a trusted issuer",
            Self::CertificateNameMismatch => "its TLS certificate is not valid for its name",
            Self::CertificateRefused => "its TLS certificate was refused",
            Self::Handshake => "the TLS handshake failed",
            Self::Connect => "connecting failed",
            Self::Exchange => "the connection failed before a response arrived",
            Self::UnsolicitedUpgrade => "it switched protocols (101) though no upgrade was asked for",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_reach_inside_io_errors() {
        let tls = std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let err = Outer(tls);
        assert_eq!(Transport::of(&err), Transport::UntrustedCertificate);
        assert_eq!(causes(&err).count(), 3, "outer, io, rustls");
        assert!(Chain(&err).to_string().starts_with("outer: "));
    }

    #[test]
    fn io_kinds_are_named_and_the_rest_is_an_exchange_failure() {
        let refused = Outer(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(Transport::of(&refused), Transport::Refused);
        let reset = Outer(std::io::ErrorKind::ConnectionReset.into());
        assert_eq!(Transport::of(&reset), Transport::Closed);
        let other = Outer(std::io::Error::other("something"));
        assert_eq!(Transport::of(&other), Transport::Exchange);
        assert_eq!(
            Transport::Exchange.to_string(),
            "the connection failed before a response arrived"
        );
    }
}
