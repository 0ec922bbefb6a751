//! Filter chains: plugins run around HTTP exchanges, in chain order on the request and in
//! reverse on the response.
//!
//! A [`FilterChain`] holds the compiled plugins once and a number of *slots*, each with one
//! VM per plugin. An exchange is given to the slot of the thread that starts it and stays
//! there. When every plugin runs on an engine whose VMs may move between threads (wasmtime,
//! wasmi), the exchange runs its callbacks right on its own thread whenever no other thread is
//! using the slot; a slot with a thread-bound engine (wasmer), or one busy on another thread,
//! runs the callbacks on the slot's own thread instead. Either way a guest runs on one thread
//! at a time, and a long callback holds only its own slot (and, inline, the thread that
//! called it, for at most the plugin's callback deadline).
//!
//! Modules, and what crosses each:
//! - `exchange`: the protocol of one exchange (phases, pauses, the end), over maps and bytes;
//! - `slot`: the typed jobs exchanges give a slot, inline or through its thread;
//! - `slot_state`: a slot's VMs and the exchanges' streams on them;
//! - `route`: [`Route`]s, which plugins an exchange runs with which configuration (one
//!   root context per distinct configuration, in the same VMs);
//! - `tower`: [`FilterLayer`] / [`FilterService`], driving exchanges with `http` types;
//! - `body`: [`FilteredBody`]; `error`: [`ChainError`], [`FilterError`]; `local`: local
//!   responses as the client gets them; `held`: the budget of paused body bytes;
//!   `phase`: the words of a phase.

mod body;
mod error;
mod exchange;
mod held;
mod local;
mod phase;
mod route;
mod slot;
mod slot_state;
mod tower;

pub use body::FilteredBody;
pub use error::{BoxError, ChainError, FilterError};
pub use exchange::Exchange;
pub use local::LocalReply;
pub use route::{Route, RouteId, RouteName};
pub use tower::{FilterLayer, FilterService};

use crate::Plugin;
use arc_swap::ArcSwap;
use core::fmt;
use held::HeldBudget;
use route::Plan;
use slot::Slot;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Builds a [`FilterChain`].
#[derive(Debug, Clone)]
pub struct FilterChainBuilder {
    slots: usize,
    pause_timeout: Duration,
    max_body_bytes: usize,
    max_held_bytes: usize,
    routes: Vec<(String, Route)>,
}

impl Default for FilterChainBuilder {
    fn default() -> Self {
        FilterChainBuilder {
            slots: std::thread::available_parallelism().map_or(1, usize::from),
            pause_timeout: Duration::from_secs(30),
            max_body_bytes: 16 << 20,
            max_held_bytes: 256 << 20,
            routes: Vec::new(),
        }
    }
}

impl FilterChainBuilder {
    /// How many slot threads (each with its own VM per plugin) the chain runs; default: the
    /// machine's parallelism. Zero counts as one.
    pub fn slots(mut self, slots: usize) -> Self {
        self.slots = slots.max(1);
        self
    }

    /// How long a plugin may keep an exchange paused before it is answered 504 (default 30 s).
    pub fn pause_timeout(mut self, timeout: Duration) -> Self {
        self.pause_timeout = timeout;
        self
    }

    /// The most body bytes one plugin may hold paused (default 16 MiB): past it a request
    /// is answered 413 and a response 502 (or reset, if its headers are gone). Bodies no
    /// plugin pauses on stream through whatever their size.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// The most body bytes the plugins may hold paused at once across every exchange of the
    /// chain (default 256 MiB), so that many slow uploads cannot add up to more than this:
    /// an exchange whose plugin would hold more is answered 503 (request) or 502 (response).
    pub fn max_held_bytes(mut self, bytes: usize) -> Self {
        self.max_held_bytes = bytes;
        self
    }

    /// Adds route `name`: exchanges started with [`FilterChain::exchange_on`] its
    /// [`RouteId`] run the plugins it runs, in its order ([`Route::order`]), skip the plugins
    /// it skips and run the plugins it configures with its configuration, in a root context
    /// of their own in the same VMs (one per distinct configuration, however many routes
    /// share it).
    pub fn route(mut self, name: impl Into<String>, route: Route) -> Self {
        self.routes.push((name.into(), route));
        self
    }

    /// Starts the slot threads and on each one VM per plugin, started and configured (and
    /// one more root context per distinct route configuration): a plugin or a route
    /// configuration that cannot start refuses the whole chain, before it takes traffic.
    /// Blocks until the VMs are up. Requests run through `plugins` in order, responses in
    /// reverse.
    pub fn build(self, plugins: Vec<Plugin>) -> Result<FilterChain, ChainError> {
        let plan = Arc::new(Plan::new(&plugins, &self.routes)?);
        let mut slots = Vec::with_capacity(self.slots);
        let held = HeldBudget::new(self.max_body_bytes, self.max_held_bytes);
        for index in 0..self.slots {
            slots.push(Slot::spawn(index, &plugins, &plan, held.clone())?);
        }
        Ok(FilterChain {
            inner: Arc::new(ChainInner {
                plugins,
                slots,
                plan,
                pause_timeout: self.pause_timeout,
            }),
        })
    }
}

/// Compiled plugins and the slot threads that run them, ready to filter exchanges; cheap to
/// clone. Each exchange holds the chain it started on, so a chain replaced in a
/// [`SharedChain`] keeps its VMs until its last exchange ends; then its threads stop.
#[derive(Clone)]
pub struct FilterChain {
    inner: Arc<ChainInner>,
}

impl fmt::Debug for FilterChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .inner
            .plugins
            .iter()
            .map(|p| p.config().name.as_str())
            .collect();
        f.debug_struct("FilterChain")
            .field("plugins", &names)
            .field("slots", &self.inner.slots.len())
            .finish_non_exhaustive()
    }
}

struct ChainInner {
    plugins: Vec<Plugin>,
    slots: Vec<Slot>,
    plan: Arc<Plan>,
    pause_timeout: Duration,
}

thread_local! {
    /// The slot of this runtime thread, given out round-robin on first use.
    static THREAD_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}
static NEXT_THREAD_SLOT: AtomicUsize = AtomicUsize::new(0);

impl FilterChain {
    /// A builder with the default slots, pause timeout and body limit.
    pub fn builder() -> FilterChainBuilder {
        FilterChainBuilder::default()
    }

    /// A chain with the defaults; see [`FilterChainBuilder::build`].
    pub fn new(plugins: Vec<Plugin>) -> Result<FilterChain, ChainError> {
        FilterChainBuilder::default().build(plugins)
    }

    /// Starts an HTTP exchange through the chain, on the slot of the calling thread: see
    /// [`Exchange`]. The tower layer makes one per request; a proxy of its own calls this.
    pub fn exchange(&self) -> Exchange {
        Exchange::new(self.clone(), 0)
    }

    /// [`FilterChain::exchange`] or [`FilterChain::exchange_on`], keeping this handle for the
    /// exchange instead of cloning it (a clone and a drop are two writes to a counter every
    /// thread's exchanges share).
    pub(crate) fn into_exchange(self, route: Option<RouteId>) -> Exchange {
        let route = route.map_or(0, |route| self.route_index(route));
        Exchange::new(self, route)
    }

    /// The index of `route` in this chain's plan; a route of another chain is the default.
    fn route_index(&self, route: RouteId) -> usize {
        match route.0 < self.inner.plan.roots.len() {
            true => route.0,
            false => 0,
        }
    }

    /// The route the builder was given as `name` ([`FilterChainBuilder::route`]).
    pub fn route(&self, name: &str) -> Option<RouteId> {
        self.inner.plan.names.get(name).copied()
    }

    /// [`FilterChain::exchange`] on `route`: the exchange runs the plugins the route does not
    /// skip, each under the route's configuration. A `RouteId` of another chain (one that
    /// replaced it has other routes) falls back to every plugin with its own configuration;
    /// look the route up by name on the chain the exchange starts on.
    pub fn exchange_on(&self, route: RouteId) -> Exchange {
        Exchange::new(self.clone(), self.route_index(route))
    }

    /// How long a phase a plugin paused waits for it (the builder's
    /// [`FilterChainBuilder::pause_timeout`]).
    pub fn pause_timeout(&self) -> Duration {
        self.inner.pause_timeout
    }

    /// The plugins, in request order.
    pub fn plugins(&self) -> &[Plugin] {
        &self.inner.plugins
    }

    /// The slot a new exchange of the calling thread runs on: the thread's own, unless
    /// another thread is running it right now and another slot whose callbacks may run here
    /// is free (an exchange stays on its slot, so picking a free one spares it the hand-off).
    pub(super) fn slot_index(&self) -> usize {
        let index = THREAD_SLOT.with(|cell| match cell.get() {
            Some(index) => index,
            None => {
                let index = NEXT_THREAD_SLOT.fetch_add(1, Ordering::Relaxed);
                cell.set(Some(index));
                index
            }
        });
        let slots = &self.inner.slots;
        let count = slots.len().max(1);
        let home = index % count;
        (0..count)
            .map(|offset| (home + offset) % count)
            .find(|&i| slots.get(i).is_some_and(Slot::is_free_here))
            .unwrap_or(home)
    }
}

/// A [`FilterChain`] that can be replaced while it serves: exchanges already started finish
/// on the chain they started on, new ones take the new chain. Cheap to clone.
#[derive(Clone)]
pub struct SharedChain {
    /// Read on every exchange by every thread: an `ArcSwap` reads without writing to a shared
    /// lock word (a read-write lock's reader count is written twice per read).
    current: Arc<ArcSwap<ChainInner>>,
}

impl fmt::Debug for SharedChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedChain")
            .field("current", &self.current())
            .finish()
    }
}

impl SharedChain {
    /// Serves `chain` until it is replaced.
    pub fn new(chain: FilterChain) -> Self {
        SharedChain {
            current: Arc::new(ArcSwap::new(chain.inner)),
        }
    }

    /// The chain new exchanges start on.
    pub fn current(&self) -> FilterChain {
        FilterChain {
            inner: self.current.load_full(),
        }
    }

    /// Puts `chain` in place for new exchanges and returns the one it replaces.
    pub fn replace(&self, chain: FilterChain) -> FilterChain {
        FilterChain {
            inner: self.current.swap(chain.inner),
        }
    }
}
