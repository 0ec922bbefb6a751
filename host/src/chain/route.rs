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
/// configures otherwise.
///
/// ```
/// use filterbox::Route;
/// let admin = Route::new()
///     .skip("rate-limit")
///     .configure("headers", "add x-route admin");
/// # let _ = admin;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    skip: Vec<String>,
    configurations: Vec<(String, Bytes)>,
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
            for plugin in &route.skip {
                if let Some(slot) = roots.get_mut(index_of(name, plugin)?) {
                    *slot = None;
                }
            }
            let id = RouteId(plan.roots.len());
            if plan.names.insert(name.clone(), id).is_some() {
                return Err(ChainError::DuplicateRoute(name.clone()));
            }
            plan.roots.push(roots);
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
