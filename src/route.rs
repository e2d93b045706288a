//! Request → route: match on Host (or the host of an absolute-form URI) and on path prefix by
//! whole segments; host-specific routes first, then the longest prefix. Routes without a host
//! serve only loopback hosts and `server.allowed_hosts`, so a web page cannot drive them.
//! [`target`] checks the host and path before any of this.

pub mod target;

use std::sync::Arc;

use crate::config::RouteSpec;

pub use target::{check_path, is_loopback_host, request_host, TargetError};

/// The configured routes, ordered so that the first match is the most specific.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Arc<RouteSpec>>,
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
        let mut routes = routes.to_vec();
        routes.sort_by_key(|r| {
            let prefix_len = r.path_prefix.as_ref().map_or(0, String::len);
            (r.host.is_none(), std::cmp::Reverse(prefix_len))
        });
        Self {
            routes,
            allowed_hosts: allowed_hosts.to_vec(),
        }
    }

    /// The most specific route for a request to `host` (as [`request_host`] returns it) and
    /// `path` (already passed by [`check_path`]).
    pub fn find<'r, 'p>(&'r self, host: Option<&str>, path: &'p str) -> Option<Matched<'r, 'p>> {
        let local =
            host.is_none_or(|host| is_loopback_host(host) || self.allowed_hosts.iter().any(|a| a == host));
        self.routes.iter().find_map(|route| {
            match &route.host {
                Some(route_host) if host != Some(route_host.as_str()) => return None,
                None if !local => return None,
                _ => {}
            }
            let rest = match &route.path_prefix {
                Some(prefix) => strip_prefix(prefix, path)?,
                None => path,
            };
            Some(Matched { route, rest })
        })
    }
}

/// `path` without `prefix` when `prefix` matches whole segments: `/a/b` matches `/a/b`,
/// `/a/b/c` and `/a/b?…`, never `/a/bc`. The rest is `""` or starts with `/`.
pub fn strip_prefix<'p>(prefix: &str, path: &'p str) -> Option<&'p str> {
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// The upstream path: its base path joined with what followed the route's prefix.
pub fn join_path(base_path: &str, rest: &str) -> String {
    let joined = format!("{base_path}{rest}");
    if joined.is_empty() {
        "/".to_owned()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests;
