//! `serve`'s routes: which upstream, which of the chain's plugins and which plugin
//! configurations a request gets, by its host and path.
//!
//! Every route of the config becomes a route of the one filter chain
//! ([`filterbox::Route`]): a route's plugin configurations are extra root contexts in the
//! plugins' VMs, not VMs of their own. The router puts the matched route's name
//! ([`RouteName`]) and upstream ([`RouteUpstream`]) on the request for the filter layer and
//! the upstream service.

use filterbox::{Route, RouteName};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One route of `filterbox.yaml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    /// The route's name (logs; default `route-N`, its position from 0).
    #[serde(default)]
    pub name: Option<String>,
    /// What a request must match (default: everything).
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// The upstream (a key of `upstreams`; default: the listener's).
    #[serde(default)]
    pub upstream: Option<String>,
    /// The plugins (by name) this route runs, requests in this order and responses in
    /// reverse (default: all of them, in chain order). The same VMs serve every order.
    #[serde(default)]
    pub plugins: Option<Vec<String>>,
    /// Plugin name → the plugin configuration this route's requests run it with (a root
    /// context of its own in the plugin's VMs: a hundred routes cost no extra VM).
    #[serde(default)]
    pub configuration: BTreeMap<String, String>,
}

/// What a request must match: every field given.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The request's host (`:authority` or `host`, without the port, case-insensitive):
    /// exactly, or any subdomain for `*.example.com`.
    #[serde(default)]
    pub host: Option<String>,
    /// The start of the request's path.
    #[serde(default)]
    pub path_prefix: Option<String>,
}

/// The upstream of the route a request matched (a request extension `serve`'s upstream
/// service reads).
#[derive(Debug, Clone)]
pub struct RouteUpstream(pub Arc<str>);

/// The routes of one config, in order: the first that matches wins.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<(RouteName, RouteMatch, Option<RouteUpstream>)>,
}

impl RouteEntry {
    /// The route's name at position `index`.
    pub fn name_at(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("route-{index}"))
    }

    /// The chain route for this entry.
    pub fn chain_route(&self) -> Route {
        let mut route = Route::new();
        if let Some(runs) = &self.plugins {
            route = route.order(runs.iter().cloned());
        }
        for (plugin, configuration) in &self.configuration {
            route = route.configure(plugin.as_str(), configuration.clone());
        }
        route
    }
}

impl Router {
    /// The router for `entries`.
    pub fn new(entries: &[RouteEntry]) -> Router {
        let routes = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let mut matches = entry.matches.clone();
                matches.host = matches.host.map(|host| host.to_ascii_lowercase());
                (
                    RouteName(entry.name_at(index).into()),
                    matches,
                    entry.upstream.as_deref().map(|u| RouteUpstream(u.into())),
                )
            })
            .collect();
        Router { routes }
    }

    /// Puts the first matching route's name and upstream on `request`; a request no route
    /// matches gets neither (the listener's upstream, every plugin).
    pub fn route<B>(&self, request: &mut http::Request<B>) {
        if self.routes.is_empty() {
            return;
        }
        let host = request_host(request).map(str::to_ascii_lowercase);
        let path = request.uri().path();
        let found = self
            .routes
            .iter()
            .find(|(_, matches, _)| matches.accepts(host.as_deref(), path));
        if let Some((name, _, upstream)) = found {
            let (name, upstream) = (name.clone(), upstream.clone());
            request.extensions_mut().insert(name);
            if let Some(upstream) = upstream {
                request.extensions_mut().insert(upstream);
            }
        }
    }
}

impl RouteMatch {
    fn accepts(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(wanted), Some(host)) => match wanted.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => host == wanted,
            },
        };
        host_ok
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| path.starts_with(prefix))
    }
}

/// The host a request is for, without the port: the URI's authority (HTTP/2, absolute
/// form) or the `host` header.
fn request_host<B>(request: &http::Request<B>) -> Option<&str> {
    let authority = match request.uri().authority() {
        Some(authority) => authority.host(),
        None => request.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    let host = match authority.strip_prefix('[') {
        // [v6]:port
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.split(':').next().unwrap_or(authority),
    };
    Some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(yaml: &str) -> RouteEntry {
        serde_yaml::from_str(yaml).expect("route entry")
    }

    fn routed(router: &Router, host: &str, path: &str) -> Option<(String, Option<String>)> {
        let mut request = http::Request::builder()
            .uri(path)
            .header("host", host)
            .body(())
            .expect("request");
        router.route(&mut request);
        let name = request.extensions().get::<RouteName>()?.0.to_string();
        let upstream = request
            .extensions()
            .get::<RouteUpstream>()
            .map(|u| u.0.to_string());
        Some((name, upstream))
    }

    #[test]
    fn the_first_route_whose_host_and_path_prefix_match_wins() {
        let router = Router::new(&[
            entry(
                "{ name: api, match: { host: api.example.com, path_prefix: /v1 }, upstream: v1 }",
            ),
            entry("{ match: { host: '*.example.com' } }"),
            entry("{ name: static, match: { path_prefix: /static/ } }"),
        ]);
        let api = Some(("api".to_owned(), Some("v1".to_owned())));
        assert_eq!(routed(&router, "api.example.com", "/v1/users"), api);
        assert_eq!(routed(&router, "API.example.com:8080", "/v1"), api);
        let any = Some(("route-1".to_owned(), None));
        assert_eq!(routed(&router, "api.example.com", "/v2"), any);
        assert_eq!(routed(&router, "www.example.com", "/v1"), any);
        // The wildcard wants a subdomain: the bare domain and look-alikes do not match.
        assert_eq!(routed(&router, "example.com", "/x"), None);
        assert_eq!(routed(&router, "badexample.com", "/x"), None);
        let static_files = Some(("static".to_owned(), None));
        assert_eq!(routed(&router, "other.org", "/static/a.css"), static_files);
        assert_eq!(routed(&router, "other.org", "/statics"), None);
        assert_eq!(routed(&router, "[::1]:80", "/static/x"), static_files);
    }

    #[test]
    fn a_route_runs_the_plugins_it_lists_in_its_order_and_configures_the_ones_it_names() {
        let route = entry("{ plugins: [c, b], configuration: { b: 'add x 1' } }");
        let expected = Route::new().order(["c", "b"]).configure("b", "add x 1");
        assert_eq!(route.chain_route(), expected);
        assert_eq!(entry("{}").chain_route(), Route::new());
    }
}
