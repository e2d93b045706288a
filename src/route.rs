//! Request → route: match on Host (or the host of an absolute-form URI) and on path prefix by
//! whole segments; host-specific routes first, then the longest prefix. Routes without a host
//! serve only loopback hosts and `server.allowed_hosts`, so a web page cannot drive them.
//! [`target`] checks the host and path before any of this.

pub mod target;

use foldhash::HashMap;
use std::sync::Arc;

use crate::config::RouteSpec;

pub use target::{check_path, is_loopback_host, request_host, TargetError};

/// The configured routes, indexed so that finding one costs the same however many there are:
/// a map from host to that host's routes, each set a trie of path-prefix segments.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Routes with a `host`, by host (lower-case).
    by_host: HashMap<Box<str>, PrefixTrie>,
    /// Routes without a `host`.
    hostless: PrefixTrie,
    /// Non-loopback hosts that routes without a `host` also serve (lower-case).
    allowed_hosts: Vec<String>,
}

/// A matched route and the part of the path after its prefix.
#[derive(Debug)]
pub struct Matched<'r, 'p> {
    pub route: &'r Arc<RouteSpec>,
    pub rest: &'p str,
}

impl Router {
    pub fn new(routes: &[Arc<RouteSpec>], allowed_hosts: &[String]) -> Self {
        let mut router = Self {
            allowed_hosts: allowed_hosts.to_vec(),
            ..Self::default()
        };
        for route in routes {
            let trie = match &route.host {
                Some(host) => router.by_host.entry(host.clone()).or_default(),
                None => &mut router.hostless,
            };
            trie.insert(route);
        }
        router
    }

    /// The most specific route for a request to `host` (as [`request_host`] returns it) and
    /// `path` (already passed by [`check_path`]): the longest prefix among the host's own
    /// routes, else (for loopback and allowed hosts) the longest among routes without a host.
    pub fn find<'r, 'p>(&'r self, host: Option<&str>, path: &'p str) -> Option<Matched<'r, 'p>> {
        let own = host
            .and_then(|host| self.by_host.get(host))
            .and_then(|trie| trie.longest(path));
        own.or_else(|| {
            let local = host
                .is_none_or(|host| is_loopback_host(host) || self.allowed_hosts.iter().any(|a| a == host));
            local.then(|| self.hostless.longest(path)).flatten()
        })
    }
}

/// Routes by path prefix, one node per segment: a lookup walks the request path's segments
/// once, keeping the deepest node that has a route.
#[derive(Debug, Clone, Default)]
struct PrefixTrie {
    /// The route whose prefix ends here (the first configured, should two).
    route: Option<Arc<RouteSpec>>,
    /// Boxed: most nodes are leaves (one per merchant), and an empty map is 48 bytes where
    /// `None` is 8 (clippy's lint assumes the map is the only cost).
    #[allow(clippy::box_collection)]
    children: Option<Box<HashMap<Box<str>, PrefixTrie>>>,
}

impl PrefixTrie {
    fn insert(&mut self, route: &Arc<RouteSpec>) {
        let prefix = route.path_prefix.as_deref().unwrap_or("");
        let node = segments(prefix).fold(self, |node, segment| {
            let children = node.children.get_or_insert_with(Box::default);
            children.entry(segment.into()).or_default()
        });
        node.route.get_or_insert_with(|| route.clone());
    }

    fn longest<'r, 'p>(&'r self, path: &'p str) -> Option<Matched<'r, 'p>> {
        let mut deepest = self.route.as_ref();
        let mut node = self;
        for segment in segments(path) {
            let Some(child) = node.children.as_ref().and_then(|children| children.get(segment)) else {
                break;
            };
            node = child;
            deepest = node.route.as_ref().or(deepest);
        }
        let route = deepest?;
        let rest = strip_prefix(route.path_prefix.as_deref().unwrap_or(""), path)?;
        Some(Matched { route, rest })
    }
}

/// The segments of a path after its leading `/`: `/a/b` → `a`, `b`; `""` → none.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.strip_prefix('/')
        .into_iter()
        .flat_map(|rest| rest.split('/'))
}

/// `path` without `prefix` when `prefix` matches whole segments: `/a/b` matches `/a/b`,
/// `/a/b/c` and `/a/b?…`, never `/a/bc`. The rest is `""` or starts with `/`.
pub fn strip_prefix<'p>(prefix: &str, path: &'p str) -> Option<&'p str> {
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// The upstream path: its base path joined with what followed the route's prefix.
pub fn join_path(base_path: &str, rest: &str) -> String {
    let mut joined = String::new();
    push_path(&mut joined, base_path, rest);
    joined
}

/// [`join_path`] onto the end of `out`, which may then take a query without growing again.
pub fn push_path(out: &mut String, base_path: &str, rest: &str) {
    if base_path.is_empty() && rest.is_empty() {
        out.push('/');
        return;
    }
    out.reserve(base_path.len() + rest.len());
    out.push_str(base_path);
    out.push_str(rest);
}

#[cfg(test)]
mod tests;
