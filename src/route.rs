//! Request → route: match on Host (or the host of an absolute-form URI) and on path prefix by
//! whole segments; host-specific routes first, then the longest prefix.

use std::sync::Arc;

use http::Request;

use crate::config::RouteSpec;

/// The configured routes, ordered so that the first match is the most specific.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Arc<RouteSpec>>,
}

/// A matched route and the part of the path after its prefix.
#[derive(Debug)]
pub struct Matched<'r, 'p> {
    pub route: &'r Arc<RouteSpec>,
    pub rest: &'p str,
}

impl Router {
    pub fn new(routes: &[Arc<RouteSpec>]) -> Self {
        let mut routes = routes.to_vec();
        routes.sort_by_key(|r| {
            let prefix_len = r.path_prefix.as_ref().map_or(0, String::len);
            (r.host.is_none(), std::cmp::Reverse(prefix_len))
        });
        Self { routes }
    }

    /// The most specific route for a request to `host` (lower-case, no port) and `path`.
    pub fn find<'r, 'p>(&'r self, host: Option<&str>, path: &'p str) -> Option<Matched<'r, 'p>> {
        if has_dot_segments(path) {
            return None;
        }
        self.routes.iter().find_map(|route| {
            if let Some(route_host) = &route.host {
                if host != Some(route_host.as_str()) {
                    return None;
                }
            }
            let rest = match &route.path_prefix {
                Some(prefix) => strip_prefix(prefix, path)?,
                None => path,
            };
            Some(Matched { route, rest })
        })
    }
}

/// The host a request is for: the authority of an absolute-form URI (a client using the
/// sidecar as `HTTP_PROXY`), else the `Host` header; lower-case, without port.
pub fn request_host<B>(request: &Request<B>) -> Option<String> {
    let authority = match request.uri().authority() {
        Some(authority) => authority.clone(),
        None => request
            .headers()
            .get(http::header::HOST)?
            .to_str()
            .ok()?
            .parse::<http::uri::Authority>()
            .ok()?,
    };
    Some(authority.host().trim_end_matches('.').to_ascii_lowercase())
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

/// `.` or `..` segments, also percent-encoded: such paths could climb out of a route's prefix
/// or its upstream's base path, so they match no route.
pub fn has_dot_segments(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

#[cfg(test)]
mod tests;
