//! Validation of `[[routes]]`: matching (prefix, host), upstream, credential choice, injection
//! and static headers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::config::raw::{RawInject, RawRoute};
use crate::config::validate::values::HOUR;
use crate::config::validate::{suggest, Validator};
use crate::config::{
    is_reserved_header, ClientErrorSet, CredentialChoice, HeaderChoice, HeaderInject, Inject, KeyPath,
    RouteOptions, RouteSpec, Upstream,
};
use crate::token::spec::CredentialSpec;

const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_REPLAY_BODY_LIMIT: u64 = 1024 * 1024;

/// What a route matches on: its host and its path prefix.
type Matching = (Option<Box<str>>, Option<Box<str>>);

impl Validator {
    pub(super) fn routes(
        &mut self,
        path: &KeyPath,
        raw: &[RawRoute],
        credentials: &BTreeMap<&str, Option<Arc<CredentialSpec>>>,
    ) -> Vec<Arc<RouteSpec>> {
        let mut routes: Vec<Arc<RouteSpec>> = Vec::new();
        // (host, path_prefix) → the index in `routes` of the route that has them.
        let mut matching: HashMap<Matching, usize> = HashMap::new();
        // One `Upstream` per distinct upstream URL, one `RouteOptions` per distinct set:
        // 10,000 merchants usually share a few.
        let mut upstreams: HashSet<Arc<Upstream>> = HashSet::new();
        let mut options: HashSet<Arc<RouteOptions>> = HashSet::new();
        for (index, raw_route) in raw.iter().enumerate() {
            let route_path = path.index(index);
            let Some(mut route) = self.route(&route_path, raw_route, credentials) else {
                continue;
            };
            let key = (route.host.clone(), route.path_prefix.clone());
            if let Some(&earlier) = matching.get(&key) {
                self.problem(
                    &route_path,
                    format!(
                        "matches the same requests as {} (same host and path_prefix)",
                        routes[earlier].label()
                    ),
                );
                continue;
            }
            matching.insert(key, routes.len());
            route.index = index as u32;
            route.upstream = intern(&mut upstreams, route.upstream);
            route.options = intern(&mut options, route.options);
            routes.push(Arc::new(route));
        }
        routes
    }

    pub(super) fn route(
        &mut self,
        path: &KeyPath,
        raw: &RawRoute,
        credentials: &BTreeMap<&str, Option<Arc<CredentialSpec>>>,
    ) -> Option<RouteSpec> {
        let errors_before = self.problems.len();
        if raw.path_prefix.is_none() && raw.host.is_none() {
            self.problem(path, "needs path_prefix or host (or both) to match requests");
        }
        let path_prefix = raw
            .path_prefix
            .as_deref()
            .and_then(|p| self.path_prefix(&path.key("path_prefix"), p));
        let host = raw.host.as_deref().and_then(|h| self.host(&path.key("host"), h));
        let upstream = self
            .required_url(
                &path.key("upstream"),
                raw.upstream.as_deref(),
                raw.allow_plaintext,
                true,
            )
            .and_then(|url| self.upstream(&path.key("upstream"), &url));
        let client_identity = self.identity_ref(&path.key("client_identity"), raw.client_identity.as_deref());
        let credential = self.credential_choice(path, raw, credentials);
        let inject = self.inject(&path.key("inject"), raw.inject.as_ref());
        if let (Some(choice), Some(inject)) = (&credential, &inject) {
            self.dpop_takes_authorization(&path.key("inject"), choice, inject);
        }
        let headers = self.static_headers(&path.key("headers"), &raw.headers);
        let timeout = self.nonzero(&path.key("timeout"), raw.timeout, DEFAULT_UPSTREAM_TIMEOUT, HOUR);
        let purge_on_status =
            self.purge_statuses(&path.key("purge_on_status"), raw.purge_on_status.as_deref());
        if self.problems.len() > errors_before {
            return None;
        }
        let name = match (&host, &path_prefix) {
            (Some(host), Some(prefix)) => format!("{host}{}", display_prefix(prefix)),
            (Some(host), None) => host.clone(),
            (None, Some(prefix)) => display_prefix(prefix).to_owned(),
            (None, None) => String::new(),
        };
        Some(RouteSpec {
            index: 0, // set by `routes`, which knows it
            name: name.into(),
            host: host.map(String::into_boxed_str),
            path_prefix: path_prefix.map(String::into_boxed_str),
            upstream: Arc::new(upstream?),
            credential: credential?,
            options: Arc::new(RouteOptions {
                client_identity,
                inject: inject?,
                headers: headers?.into_boxed_slice(),
                timeout,
                purge_on_status: purge_on_status?,
                replay_body_limit: raw.replay_body_limit.unwrap_or(DEFAULT_REPLAY_BODY_LIMIT),
            }),
        })
    }

    pub(super) fn purge_statuses(&mut self, path: &KeyPath, raw: Option<&[u16]>) -> Option<ClientErrorSet> {
        let mut statuses = ClientErrorSet::default();
        let Some(codes) = raw else {
            statuses.insert(http::StatusCode::UNAUTHORIZED);
            return Some(statuses);
        };
        for (i, code) in codes.iter().enumerate() {
            match http::StatusCode::from_u16(*code) {
                Ok(status) if statuses.insert(status) => {}
                _ => {
                    self.problem(&path.index(i), format!("{code} is not a 4xx status"));
                    return None;
                }
            }
        }
        Some(statuses)
    }

    pub(super) fn path_prefix(&mut self, path: &KeyPath, prefix: &str) -> Option<String> {
        if !prefix.starts_with('/') {
            self.problem(path, format!("`{prefix}` must start with '/'"));
            return None;
        }
        if prefix.contains(['?', '#', ' ']) || prefix.split('/').any(|s| s == "." || s == "..") {
            self.problem(
                path,
                format!("`{prefix}` must be a plain path without query, fragment or dot segments"),
            );
            return None;
        }
        Some(prefix.trim_end_matches('/').to_owned())
    }

    pub(super) fn host(&mut self, path: &KeyPath, host: &str) -> Option<String> {
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if !valid {
            self.problem(
                path,
                format!("`{host}` must be a bare host name, without scheme, port or path"),
            );
            return None;
        }
        Some(host.to_ascii_lowercase())
    }

    pub(super) fn upstream(&mut self, path: &KeyPath, url: &reqwest::Url) -> Option<Upstream> {
        if url.query().is_some() || url.fragment().is_some() {
            self.problem(path, "an upstream URL takes no query or fragment");
            return None;
        }
        let authority = url[url::Position::BeforeHost..url::Position::AfterPort]
            .parse()
            .ok();
        let scheme = if url.scheme() == "https" {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        let base_path = url.path().trim_end_matches('/').to_owned();
        let upstream = authority.and_then(|authority| Upstream::new(scheme, authority, base_path).ok());
        if upstream.is_none() {
            self.problem(path, "upstream host is not valid");
        }
        upstream
    }

    pub(super) fn credential_choice(
        &mut self,
        path: &KeyPath,
        raw: &RawRoute,
        credentials: &BTreeMap<&str, Option<Arc<CredentialSpec>>>,
    ) -> Option<CredentialChoice> {
        match (&raw.credential, &raw.credential_header, &raw.credentials) {
            (Some(name), None, None) => Some(CredentialChoice::Fixed(self.credential_ref(
                &path.key("credential"),
                name,
                credentials,
            )?)),
            (None, Some(header), Some(names)) => {
                let header_path = path.key("credential_header");
                let header = self.header_name(&header_path, header)?;
                if header == http::header::AUTHORIZATION {
                    self.problem(
                        &header_path,
                        "authorization is never forwarded; pick another header",
                    );
                    return None;
                }
                if names.is_empty() {
                    self.problem(&path.key("credentials"), "lists no credential");
                    return None;
                }
                let list_path = path.key("credentials");
                let allowed: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| self.credential_ref(&list_path.index(i), name, credentials))
                    .collect();
                Some(CredentialChoice::FromHeader(Box::new(HeaderChoice {
                    header,
                    allowed: allowed.into_iter().collect::<Option<Vec<_>>>()?,
                })))
            }
            (None, None, None) => {
                self.problem(
                    &path.key("credential"),
                    "missing: which credential's token this route injects",
                );
                None
            }
            (Some(_), _, _) => {
                self.problem(
                    &path.key("credential"),
                    "use either credential or credential_header + credentials",
                );
                None
            }
            (None, Some(_), None) => {
                self.problem(
                    &path.key("credentials"),
                    "missing: the allow-list for credential_header",
                );
                None
            }
            (None, None, Some(_)) => {
                self.problem(
                    &path.key("credential_header"),
                    "missing: the header that names the credential",
                );
                None
            }
        }
    }

    pub(super) fn credential_ref(
        &mut self,
        path: &KeyPath,
        name: &str,
        credentials: &BTreeMap<&str, Option<Arc<CredentialSpec>>>,
    ) -> Option<Arc<CredentialSpec>> {
        match credentials.get(name) {
            Some(spec) => spec.clone(), // an invalid credential reports its own problems
            None => {
                let defined: Vec<&str> = credentials.keys().copied().collect();
                self.problem(
                    path,
                    format!(
                        "no credential named `{name}` in [credentials]{}",
                        suggest(name, &defined)
                    ),
                );
                None
            }
        }
    }

    /// DPoP-bound tokens go in `Authorization: DPoP`: a route sending one cannot inject
    /// elsewhere.
    fn dpop_takes_authorization(&mut self, path: &KeyPath, choice: &CredentialChoice, inject: &Inject) {
        let credentials = match choice {
            CredentialChoice::Fixed(credential) => std::slice::from_ref(credential),
            CredentialChoice::FromHeader(choice) => choice.allowed.as_slice(),
        };
        let dpop = credentials
            .iter()
            .find(|credential| credential.request.dpop.is_some());
        if let (Some(credential), false) = (dpop, matches!(inject, Inject::Bearer)) {
            self.problem(
                path,
                format!(
                    "credential `{}` uses DPoP, whose tokens go in Authorization: DPoP; remove inject",
                    credential.name
                ),
            );
        }
    }

    pub(super) fn inject(&mut self, path: &KeyPath, raw: Option<&RawInject>) -> Option<Inject> {
        match raw {
            None | Some(RawInject::Bearer) => Some(Inject::Bearer),
            Some(RawInject::BasicUsername) => Some(Inject::BasicUsername),
            Some(RawInject::Header { header, format }) => {
                let name = self.header_name(&path.key("header"), header)?;
                if is_reserved_header(&name) {
                    self.problem(&path.key("header"), format!("`{name}` is managed by the sidecar"));
                    return None;
                }
                let format = format.as_deref().unwrap_or("{token}");
                let Some((prefix, suffix)) = format.split_once("{token}") else {
                    self.problem(&path.key("format"), "must contain {token}, where the token goes");
                    return None;
                };
                if suffix.contains("{token}") || HeaderValue::from_str(&format!("{prefix}{suffix}")).is_err()
                {
                    self.problem(
                        &path.key("format"),
                        "must contain {token} once and only header-safe text",
                    );
                    return None;
                }
                Some(Inject::Header(Box::new(HeaderInject {
                    name,
                    prefix: prefix.to_owned(),
                    suffix: suffix.to_owned(),
                })))
            }
        }
    }

    pub(super) fn static_headers(
        &mut self,
        path: &KeyPath,
        raw: &BTreeMap<String, String>,
    ) -> Option<Vec<(HeaderName, HeaderValue)>> {
        let mut headers = Vec::new();
        let mut ok = true;
        for (name, value) in raw {
            let key_path = path.key(name);
            let Some(header) = self.header_name(&key_path, name) else {
                ok = false;
                continue;
            };
            if is_reserved_header(&header) || header == http::header::AUTHORIZATION {
                self.problem(&key_path, format!("`{header}` is managed by the sidecar"));
                ok = false;
                continue;
            }
            match HeaderValue::from_str(value) {
                Ok(value) => headers.push((header, value)),
                Err(_) => {
                    self.problem(&key_path, "not a valid header value");
                    ok = false;
                }
            }
        }
        ok.then_some(headers)
    }

    pub(super) fn header_name(&mut self, path: &KeyPath, name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(header) => Some(header),
            Err(_) => {
                self.problem(path, format!("`{name}` is not a valid header name"));
                None
            }
        }
    }
}

/// The `Arc` in `seen` equal to `value`, or `value`, now in `seen`.
fn intern<T: Eq + std::hash::Hash>(seen: &mut HashSet<Arc<T>>, value: Arc<T>) -> Arc<T> {
    match seen.get(&value) {
        Some(same) => same.clone(),
        None => {
            seen.insert(value.clone());
            value
        }
    }
}

fn display_prefix(prefix: &str) -> &str {
    if prefix.is_empty() {
        "/"
    } else {
        prefix
    }
}
