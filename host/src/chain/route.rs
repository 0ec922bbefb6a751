//! Routes of a chain: which of the chain's plugins an exchange runs through, and with which
//! configuration, without a VM per route.
//!
//! A route may skip plugins and give others a configuration of its own. Each distinct
//! configuration becomes one more root context in the plugin's VMs (proxy-wasm lets a VM hold
//! several), so a hundred routes with their own configuration of one plugin still cost one
//! VM per slot. What crosses this module: the routes given to the builder in, a [`Plan`]
//! (per plugin, the configurations of the extra root contexts; per route, the root each
//! plugin's stream is created under) out.

use super::error::ChainError;
use crate::Plugin;
use bytes::Bytes;
use std::collections::HashMap;

/// How one route of a [`FilterChain`](super::FilterChain) runs the chain's plugins: every
/// plugin in chain order with its own configuration, except those the route skips or
/// configures otherwise, or only the plugins it names in the order it names them.
///
/// ```
/// use filterbox::Route;
/// let admin = Route::new()
///     .skip("rate-limit")
///     .configure("headers", "add x-route admin");
/// // Authentication before the headers plugin on this route; nothing else.
/// let api = Route::new().order(["auth", "headers"]);
/// # let _ = (admin, api);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    skip: Vec<String>,
    configurations: Vec<(String, Bytes)>,
    order: Option<Vec<String>>,
}

impl Route {
    /// A route that runs every plugin of the chain with its own configuration.
    pub fn new() -> Route {
        Route::default()
    }

    /// Exchanges on this route do not run plugin `plugin` (by its configured name).
    pub fn skip(mut self, plugin: impl Into<String>) -> Route {
        self.skip.push(plugin.into());
        self
    }

    /// Exchanges on this route run only `plugins` (by their configured names), requests in
    /// this order and responses in reverse, whatever the chain's order. Each plugin's VMs are
    /// the chain's: a route's order costs no VM. A name given twice is an error.
    pub fn order<I, S>(mut self, plugins: I) -> Route
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.order = Some(plugins.into_iter().map(Into::into).collect());
        self
    }

    /// Exchanges on this route run plugin `plugin` with `configuration` as its plugin
    /// configuration (what `proxy_on_configure` reads), in a root context of its own in the
    /// same VM. The last one given for a plugin counts.
    pub fn configure(
        mut self,
        plugin: impl Into<String>,
        configuration: impl Into<Bytes>,
    ) -> Route {
        self.configurations
            .push((plugin.into(), configuration.into()));
        self
    }
}

/// A request extension that names the chain route [`FilterService`](super::FilterService)
/// runs the request's exchange on (see [`FilterChainBuilder::route`](super::FilterChainBuilder::route)).
/// A request without one, or naming a route the current chain does not have, runs every
/// plugin with its own configuration. A router in front of the layer inserts it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteName(pub std::sync::Arc<str>);

/// A route of a built chain, from [`FilterChain::route`](super::FilterChain::route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteId(pub(super) usize);

/// Where the routes put each plugin's streams.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Per plugin, the configurations of the root contexts its VMs hold beside their own.
    pub(super) configurations: Vec<Vec<Bytes>>,
    /// Per route (index 0: every plugin on its own root), per plugin: `None` to skip it, else
    /// the root to create the stream under (0: the plugin's own, `n`: `configurations[n - 1]`).
    pub(super) roots: Vec<Vec<Option<usize>>>,
    /// Per route, the plugins it runs (their indices) in request order.
    pub(super) orders: Vec<Vec<usize>>,
    /// Route names to their index in `roots`.
    pub(super) names: HashMap<String, RouteId>,
}

impl Plan {
    /// The plan for `routes` over `plugins`: a name no plugin has is an error, and so is a
    /// route name given twice.
    pub(super) fn new(plugins: &[Plugin], routes: &[(String, Route)]) -> Result<Plan, ChainError> {
        let index_of = |route: &str, name: &str| {
            plugins
                .iter()
                .position(|p| p.config().name == name)
                .ok_or_else(|| ChainError::UnknownPlugin {
                    route: route.to_owned(),
                    plugin: name.to_owned(),
                })
        };
        let mut plan = Plan {
            configurations: vec![Vec::new(); plugins.len()],
            roots: vec![vec![Some(0); plugins.len()]],
            orders: vec![(0..plugins.len()).collect()],
            names: HashMap::new(),
        };
        for (name, route) in routes {
            let mut roots = vec![Some(0); plugins.len()];
            for (plugin, configuration) in &route.configurations {
                let index = index_of(name, plugin)?;
                let own = plugins
                    .get(index)
                    .is_some_and(|p| p.config().configuration == *configuration);
                let root = match own {
                    true => 0,
                    false => plan.root_for(index, configuration),
                };
                if let Some(slot) = roots.get_mut(index) {
                    *slot = Some(root);
                }
            }
            let mut order = match &route.order {
                None => (0..plugins.len()).collect(),
                Some(names) => {
                    let mut order: Vec<usize> = Vec::with_capacity(names.len());
                    for plugin in names {
                        let index = index_of(name, plugin)?;
                        if order.contains(&index) {
                            return Err(ChainError::PluginTwiceInRoute {
                                route: name.clone(),
                                plugin: plugin.clone(),
                            });
                        }
                        order.push(index);
                    }
                    order
                }
            };
            for plugin in &route.skip {
                let index = index_of(name, plugin)?;
                order.retain(|&i| i != index);
            }
            // A plugin the route does not run gets no stream.
            for (index, root) in roots.iter_mut().enumerate() {
                if !order.contains(&index) {
                    *root = None;
                }
            }
            let id = RouteId(plan.roots.len());
            if plan.names.insert(name.clone(), id).is_some() {
                return Err(ChainError::DuplicateRoute(name.clone()));
            }
            plan.roots.push(roots);
            plan.orders.push(order);
        }
        Ok(plan)
    }

    /// The root (1-based among the extra ones) of plugin `index` for `configuration`, added
    /// the first time a route asks for it.
    fn root_for(&mut self, index: usize, configuration: &Bytes) -> usize {
        let Some(configurations) = self.configurations.get_mut(index) else {
            return 0;
        };
        match configurations.iter().position(|c| c == configuration) {
            Some(found) => found + 1,
            None => {
                configurations.push(configuration.clone());
                configurations.len()
            }
        }
    }
}
