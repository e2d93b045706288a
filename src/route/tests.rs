use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::{
    ClientErrorSet, CredentialChoice, CredentialSpec, Inject, RouteOptions, RouteSpec, Upstream,
};

fn credential() -> Arc<CredentialSpec> {
    CredentialSpec::for_test("c", "c-identity")
}

/// A route the tests tell apart by `name`.
fn route(name: &str, host: Option<&str>, prefix: Option<&str>) -> Arc<RouteSpec> {
    let mut purge_on_status = ClientErrorSet::default();
    purge_on_status.insert(http::StatusCode::UNAUTHORIZED);
    Arc::new(RouteSpec {
        index: 0,
        name: name.into(),
        host: host.map(Into::into),
        path_prefix: prefix.map(Into::into),
        upstream: Arc::new(
            Upstream::new(http::uri::Scheme::HTTPS, "h.test".parse().unwrap(), String::new()).unwrap(),
        ),
        credential: CredentialChoice::Fixed(credential()),
        options: Arc::new(RouteOptions {
            client_identity: None,
            inject: Inject::Bearer,
            headers: Box::new([]),
            timeout: Duration::from_secs(1),
            purge_on_status,
            replay_body_limit: 1024,
        }),
    })
}

fn router() -> Router {
    Router::new(
        &[
            route("acme", None, Some("/acme")),
            route("acme-nuapay", None, Some("/acme/nuapay")),
            route("root", None, Some("")),
            route("payu-host", Some("payu.acme.localhost"), None),
            route("payu-host-v2", Some("payu.acme.localhost"), Some("/v2")),
        ],
        &["token-sidecar".to_owned()],
    )
}

fn found(host: Option<&str>, path: &str) -> Option<(String, String)> {
    let router = router();
    router
        .find(host, path)
        .map(|m| (m.route.name.to_string(), m.rest.to_owned()))
}

#[test]
fn longest_prefix_wins_on_whole_segments() {
    assert_eq!(
        found(None, "/acme/nuapay/payments"),
        Some(("acme-nuapay".into(), "/payments".into()))
    );
    assert_eq!(
        found(None, "/acme/nuapay"),
        Some(("acme-nuapay".into(), "".into()))
    );
    assert_eq!(
        found(None, "/acme/nuapayments"),
        Some(("acme".into(), "/nuapayments".into()))
    );
    assert_eq!(found(None, "/acmex"), Some(("root".into(), "/acmex".into())));
}

#[test]
fn host_routes_come_before_path_routes() {
    assert_eq!(
        found(Some("payu.acme.localhost"), "/acme/x"),
        Some(("payu-host".into(), "/acme/x".into()))
    );
    assert_eq!(
        found(Some("payu.acme.localhost"), "/v2/links"),
        Some(("payu-host-v2".into(), "/links".into()))
    );
    assert_eq!(
        found(Some("other.localhost"), "/acme/x"),
        Some(("acme".into(), "/x".into()))
    );
}

#[test]
fn nothing_matches_without_a_catch_all() {
    let router = Router::new(&[route("acme", None, Some("/acme"))], &[]);
    assert!(router.find(None, "/globex/x").is_none());
    assert!(router.find(None, "/").is_none());
}

#[test]
fn path_routes_serve_only_loopback_and_allowed_hosts() {
    assert!(found(Some("localhost"), "/acme/x").is_some());
    assert!(found(Some("127.0.0.1"), "/acme/x").is_some());
    assert!(found(Some("[::1]"), "/acme/x").is_some());
    assert!(found(Some("token-sidecar"), "/acme/x").is_some());
    assert!(found(Some("attacker.example"), "/acme/x").is_none());
    assert!(found(Some("10.0.0.7"), "/acme/x").is_none());
}

#[test]
fn paths_join_onto_the_upstream_base_path() {
    assert_eq!(join_path("/api", "/payments"), "/api/payments");
    assert_eq!(join_path("/api", ""), "/api");
    assert_eq!(join_path("", ""), "/");
    assert_eq!(join_path("", "/x/y"), "/x/y");
}

/// The routing rule written as plainly as possible: host routes first, then the longest
/// prefix, the first configured on a tie; hostless routes only for local hosts.
fn reference_find<'r>(routes: &'r [Arc<RouteSpec>], host: Option<&str>, path: &str) -> Option<&'r str> {
    let local = host.is_none_or(is_loopback_host);
    let mut candidates: Vec<(usize, &Arc<RouteSpec>)> = routes.iter().enumerate().collect();
    candidates.sort_by_key(|(index, r)| {
        let prefix_len = r.path_prefix.as_ref().map_or(0, |prefix| prefix.len());
        (r.host.is_none(), std::cmp::Reverse(prefix_len), *index)
    });
    candidates
        .into_iter()
        .map(|(_, route)| route)
        .find(|route| {
            let host_ok = match &route.host {
                Some(route_host) => host == Some(&**route_host),
                None => local,
            };
            host_ok && strip_prefix(route.path_prefix.as_deref().unwrap_or(""), path).is_some()
        })
        .map(|route| &*route.name)
}

proptest::proptest! {
    #[test]
    fn the_trie_finds_what_the_plain_rule_finds(
        specs in proptest::collection::vec(
            (proptest::option::of(0..3usize), proptest::collection::vec(0..4usize, 0..4)),
            0..12,
        ),
        host in proptest::option::of(0..4usize),
        path in proptest::collection::vec(0..5usize, 0..6),
    ) {
        const HOSTS: [&str; 4] = ["a.test", "b.test", "c.test", "localhost"];
        const SEGMENTS: [&str; 5] = ["pay", "v1", "", "x", "payx"];
        let routes: Vec<Arc<RouteSpec>> = specs
            .iter()
            .enumerate()
            .map(|(i, (host, segments))| {
                let prefix: String = segments.iter().map(|s| format!("/{}", SEGMENTS[*s])).collect();
                let prefix = prefix.trim_end_matches('/').to_owned();
                route(&format!("r{i}"), host.map(|h| HOSTS[h]), Some(prefix.as_str()).filter(|_| i % 3 != 0))
            })
            .collect();
        let path: String = path.iter().map(|s| format!("/{}", SEGMENTS[*s])).collect();
        let path = if path.is_empty() { "/".to_owned() } else { path };
        let host = host.map(|h| HOSTS[h]);
        let router = Router::new(&routes, &[]);
        let found = router.find(host, &path).map(|m| &*m.route.name);
        proptest::prop_assert_eq!(found, reference_find(&routes, host, &path));
    }
}
