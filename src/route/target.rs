//! What a request is for, checked before routing: its host (one, well-formed) and its path
//! (nothing that could climb out of a route's prefix or an upstream's base path).
//!
//! The path rule, applied to every `/`-separated segment of the raw path:
//! - no `\`, raw or percent-encoded;
//! - after one and after two rounds of percent-decoding: no `/` or `\`, the bytes are UTF-8
//!   (so overlong forms such as `%c0%ae` are refused), and the segment — up to its first `;` —
//!   is not `.` or `..`.
//!
//! Servers differ in whether they decode `%2F`, treat `\` as a separator, strip `;parameters`
//! or decode twice; a path passing this rule means the same to all of them.

use std::borrow::Cow;

use http::header::HOST;
use http::{Request, Version};
use percent_encoding::percent_decode_str;

/// Why a request's target was refused; the text is safe to show the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the request carries several Host headers")]
    DuplicateHost,
    #[error("an HTTP/1.1 request must carry a Host header")]
    MissingHost,
    #[error("the Host header is not a valid host name")]
    InvalidHost,
    #[error("the path has a dot segment or an encoded separator, which could leave the route's base path")]
    UnsafePath,
}

/// The host a request is for: the authority of an absolute-form URI (a client using the
/// sidecar as `HTTP_PROXY`, or HTTP/2's `:authority`), else the one `Host` header; lower-case,
/// without port or a final dot. `None` only for an HTTP/1.0 request without a Host.
pub fn request_host<B>(request: &Request<B>) -> Result<Option<String>, TargetError> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(TargetError::DuplicateHost);
    }
    let authority = match (request.uri().authority(), header) {
        (Some(authority), _) => authority.as_str().to_owned(),
        (None, Some(value)) => value.to_str().map_err(|_| TargetError::InvalidHost)?.to_owned(),
        (None, None) if request.version() == Version::HTTP_10 => return Ok(None),
        (None, None) => return Err(TargetError::MissingHost),
    };
    let authority: http::uri::Authority = authority.parse().map_err(|_| TargetError::InvalidHost)?;
    normalize_host(authority.host()).map(Some)
}

/// A host name as routes compare it: lower-case, one optional final dot removed, no empty label.
fn normalize_host(host: &str) -> Result<String, TargetError> {
    if host.starts_with('[') {
        return Ok(host.to_ascii_lowercase()); // an IPv6 literal, already checked by `Authority`
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.split('.').any(str::is_empty) {
        return Err(TargetError::InvalidHost);
    }
    Ok(host.to_ascii_lowercase())
}

/// Whether `host` (as [`request_host`] returns it) names this machine's loopback: `localhost`,
/// a `*.localhost` name (RFC 6761), `127.0.0.0/8` or `[::1]`.
pub fn is_loopback_host(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") || host == "[::1]" {
        return true;
    }
    host.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Checks the path rule in the module doc; allocates only for segments with a `%`.
pub fn check_path(path: &str) -> Result<(), TargetError> {
    if path.split('/').all(segment_is_safe) {
        Ok(())
    } else {
        Err(TargetError::UnsafePath)
    }
}

fn segment_is_safe(raw: &str) -> bool {
    if raw.contains('\\') {
        return false;
    }
    if !raw.contains('%') {
        return !is_dot_segment(raw);
    }
    let Some(once) = decode(raw) else {
        return false;
    };
    if once.contains(['/', '\\']) || is_dot_segment(&once) {
        return false;
    }
    if !once.contains('%') {
        return true;
    }
    decode(&once).is_some_and(|twice| !twice.contains(['/', '\\']) && !is_dot_segment(&twice))
}

/// One round of percent-decoding; `None` when the bytes are not UTF-8.
fn decode(text: &str) -> Option<Cow<'_, str>> {
    percent_decode_str(text).decode_utf8().ok()
}

/// `.` or `..`, also with `;parameters` after it.
fn is_dot_segment(segment: &str) -> bool {
    let name = segment.split(';').next().unwrap_or(segment);
    name == "." || name == ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/",
            "/acme/payu/payment-links",
            "/a/b%20c/d",
            "/a/%E2%82%AC",
            "/a/b;v=1/c",
            "/a/..b/c.",
            "/a/...",
            "/files/report.pdf",
            "",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn every_traversal_form_from_the_review_is_refused() {
        for path in [
            "/r/normal/../admin",
            "/r/normal/./admin",
            "/r/normal/%2e%2e/admin",
            "/r/normal/%2E%2e/admin",
            "/r/normal/%2e%2e%2fadmin",
            "/r/normal/..%2fadmin",
            "/r/normal/..%2Fadmin",
            "/r/normal/..%5cadmin",
            "/r/normal/..\\admin",
            "/r/normal/..;/admin",
            "/r/normal/.;/admin",
            "/r/normal/..;x=1/admin",
            "/r/normal/%252e%252e/admin",
            "/r/normal/%252e%252e%252fadmin",
            "/r/normal/%c0%ae%c0%ae/admin",
            "/r/normal/%2e%2e%3b/admin",
            "/r/a%2fb",
            "/r/a%252fb",
            "/r/a%5cb",
            "/r/..",
        ] {
            assert_eq!(check_path(path), Err(TargetError::UnsafePath), "{path}");
        }
    }

    #[test]
    fn hosts_are_normalised_and_malformed_ones_refused() {
        assert_eq!(
            normalize_host("Payu.ACME.localhost."),
            Ok("payu.acme.localhost".into())
        );
        assert_eq!(normalize_host("a.."), Err(TargetError::InvalidHost));
        assert_eq!(normalize_host("a..b"), Err(TargetError::InvalidHost));
        assert_eq!(normalize_host("."), Err(TargetError::InvalidHost));
    }

    #[test]
    fn loopback_names_and_addresses() {
        for host in ["localhost", "api.localhost", "127.0.0.1", "127.1.2.3", "[::1]"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "attacker.example",
            "localhost.example",
            "10.0.0.1",
            "[::2]",
            "169.254.169.254",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    fn request(version: Version, hosts: &[&str], uri: &str) -> Request<()> {
        let mut builder = Request::builder().version(version).uri(uri);
        for host in hosts {
            builder = builder.header(HOST, *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn host_header_rules() {
        let one = request(Version::HTTP_11, &["LocalHost:8080"], "/x");
        assert_eq!(request_host(&one), Ok(Some("localhost".into())));
        let two = request(Version::HTTP_11, &["a", "b"], "/x");
        assert_eq!(request_host(&two), Err(TargetError::DuplicateHost));
        let none = request(Version::HTTP_11, &[], "/x");
        assert_eq!(request_host(&none), Err(TargetError::MissingHost));
        let old = request(Version::HTTP_10, &[], "/x");
        assert_eq!(request_host(&old), Ok(None));
        let absolute = request(Version::HTTP_11, &["ignored"], "http://payu.acme.localhost/x");
        assert_eq!(request_host(&absolute), Ok(Some("payu.acme.localhost".into())));
        let dots = request(Version::HTTP_11, &["localhost.."], "/x");
        assert_eq!(request_host(&dots), Err(TargetError::InvalidHost));
    }
}
