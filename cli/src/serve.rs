//! `filterbox serve`: a small reverse proxy on hyper that runs a chain of plugins, with an
//! admin listener and hot reload of its config file.
//!
//! The config names follow Envoy's `PluginConfig` / `VmConfig` (`name`, `root_id`,
//! `configuration`, `failure_policy`, `vm_config.vm_id`, `vm_config.runtime`,
//! `vm_config.code.local.filename`, `vm_config.environment_variables`), so an Envoy user
//! recognises them; filterbox's own settings (`limits`, `reload`, `log_level`, capabilities)
//! sit beside them.

use crate::routes::{RouteEntry, RouteUpstream, Router};
use crate::tls::ListenerTls;
use crate::upstream::{Pool, UpstreamEntry};
use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use filterbox::{
    ConnectionInfo, EngineKind, FailurePolicy, FilterChain, FilterLayer, FilteredBody,
    HyperCallouts, Limits, MetricRegistry, Plugin, PluginConfig, ReloadPolicy, SharedChain,
};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::RwLock;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tower_layer::Layer;
use tower_service::Service;

/// The whole `filterbox.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Where the proxy accepts requests, and where each listener sends them.
    pub listeners: Vec<ListenerConfig>,
    /// Upstream name → base URL (`http://host:port`) or a list of them, taken in turn; also
    /// the targets of plugins' HTTP and gRPC calls (the first URL).
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamEntry>,
    /// The admin listener (`/stats`, `/ready`).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The plugins every request goes through, in order (responses in reverse order).
    #[serde(default)]
    pub plugins: Vec<PluginEntry>,
    /// Routes by host and path prefix, the first match wins: each may send to its own
    /// upstream, run only some of the plugins, and give plugins a configuration of its own
    /// (in the same VMs). A request no route matches goes to its listener's upstream through
    /// every plugin.
    #[serde(default)]
    pub routes: Vec<RouteEntry>,
    /// Service plugins (Envoy's bootstrap `WasmService`, singleton): one VM each, on a thread
    /// of its own, given no requests; they run ticks, queues, callouts and shared data (a
    /// queue receiver the filter plugins enqueue to). Same fields as `plugins`. A reload
    /// starts the new ones before the old ones stop.
    #[serde(default)]
    pub services: Vec<PluginEntry>,
    /// Slot threads, each with its own VM per plugin (default: one per core).
    #[serde(default)]
    pub slots: Option<usize>,
    /// How long a plugin may keep a request paused, in milliseconds (default 30 000).
    #[serde(default)]
    pub pause_timeout_ms: Option<u64>,
    /// Largest body read per direction, in bytes (default 16 MiB).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// How long a client may leave a request body waiting for its next bytes, in
    /// milliseconds (default 30 000): a stalled upload then ends (408) and frees what the
    /// plugins held of it.
    #[serde(default)]
    pub body_idle_timeout_ms: Option<u64>,
    /// The most body bytes the plugins may hold paused at once, across every exchange
    /// (default 256 MiB): an exchange that would hold more is answered 503.
    #[serde(default)]
    pub max_held_body_bytes: Option<usize>,
    /// On SIGTERM or SIGINT, how long requests already running get to finish, in
    /// milliseconds (default 30 000), while no new connection is accepted.
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

/// One listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port` to bind.
    pub address: SocketAddr,
    /// The upstream (a key of `upstreams`) requests go to.
    pub upstream: String,
    /// TLS: certificates by server name (the first is the default).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `host:port` to bind.
    pub address: SocketAddr,
}

/// One plugin, Envoy-style.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// The plugin's name (logs, metrics, `plugin_name`).
    pub name: String,
    /// The root id the plugin registered.
    #[serde(default)]
    pub root_id: String,
    /// What the plugin reads in `proxy_on_configure`.
    #[serde(default)]
    pub configuration: String,
    /// `FAIL_RELOAD` (default: answer 503 and rebuild the VM, up to the crash-loop limit),
    /// `FAIL_CLOSED` (answer 503, no rebuild: one overrun of a deadline on a loaded machine
    /// would fail every later request until restart) or `FAIL_OPEN` (skip the plugin,
    /// rebuild the VM). Envoy's default is `FAIL_CLOSED`; filterbox's is the one a server
    /// recovers from.
    #[serde(default)]
    pub failure_policy: EnvoyFailurePolicy,
    /// The VM.
    pub vm_config: VmConfigEntry,
    /// filterbox's resource limits (defaults otherwise).
    #[serde(default)]
    pub limits: Option<Limits>,
    /// filterbox's rebuild policy, for `FAIL_RELOAD` and `FAIL_OPEN` (defaults otherwise).
    #[serde(default)]
    pub reload: Option<ReloadPolicy>,
    /// `trace` … `critical` (default `info`).
    #[serde(default)]
    pub log_level: Option<String>,
    /// Imports the plugin may use (default: all).
    #[serde(default)]
    pub allowed_capabilities: Option<Vec<String>>,
}

/// Envoy's `FailurePolicy`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum EnvoyFailurePolicy {
    /// Answer 503; the plugin stays failed.
    #[serde(rename = "FAIL_CLOSED")]
    Closed,
    /// Answer 503 and rebuild the VM (the default).
    #[default]
    #[serde(rename = "FAIL_RELOAD")]
    Reload,
    /// Let requests through and rebuild the VM.
    #[serde(rename = "FAIL_OPEN")]
    Open,
}

/// Envoy's `VmConfig`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigEntry {
    /// VMs with one id share data and queues.
    #[serde(default)]
    pub vm_id: String,
    /// `wasmtime`, `wasmer-cranelift`, `wasmer-singlepass`, `wasmi`, or Envoy's
    /// `envoy.wasm.runtime.<name>` (default wasmtime).
    #[serde(default)]
    pub runtime: Option<String>,
    /// Where the module is.
    pub code: CodeEntry,
    /// What the plugin reads in `proxy_on_vm_start`.
    #[serde(default)]
    pub configuration: String,
    /// Environment the plugin sees through WASI.
    #[serde(default)]
    pub environment_variables: EnvEntry,
}

/// Envoy's `AsyncDataSource`, local files only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeEntry {
    /// The file.
    pub local: LocalFile,
}

/// A local file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    /// Path to the `.wasm` file, relative to the config file.
    pub filename: PathBuf,
}

/// Envoy's `EnvironmentVariables`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvEntry {
    /// Variables copied from filterbox's own environment.
    #[serde(default)]
    pub host_env_keys: Vec<String>,
    /// Fixed variables.
    #[serde(default)]
    pub key_values: BTreeMap<String, String>,
}

impl ServeConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<ServeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let config: ServeConfig = serde_yaml::from_str(&text)
            .with_context(|| format!("parsing config {}", path.display()))?;
        if config.listeners.is_empty() {
            bail!("{}: no listeners", path.display());
        }
        let mut names = std::collections::HashSet::new();
        for plugin in config.plugins.iter().chain(&config.services) {
            if !names.insert(plugin.name.as_str()) {
                bail!(
                    "{}: two plugins are named {:?}; names must be unique (metrics and logs use them)",
                    path.display(),
                    plugin.name
                );
            }
        }
        for (index, route) in config.routes.iter().enumerate() {
            let name = route.name_at(index);
            if let Some(upstream) = &route.upstream
                && !config.upstreams.contains_key(upstream)
            {
                bail!(
                    "{}: route {name:?} names upstream {upstream:?}, which is not in upstreams",
                    path.display()
                );
            }
            let named = route.plugins.iter().flatten();
            for plugin in named.chain(route.configuration.keys()) {
                if !config.plugins.iter().any(|p| p.name == *plugin) {
                    bail!(
                        "{}: route {name:?} names plugin {plugin:?}, which is not in plugins",
                        path.display()
                    );
                }
            }
        }
        for listener in &config.listeners {
            if !config.upstreams.contains_key(&listener.upstream) {
                bail!(
                    "{}: listener {} names upstream {:?}, which is not in upstreams",
                    path.display(),
                    listener.address,
                    listener.upstream
                );
            }
        }
        Ok(config)
    }
}

impl PluginEntry {
    fn plugin_config(&self) -> Result<PluginConfig> {
        let engine = match self.vm_config.runtime.as_deref() {
            None => EngineKind::Wasmtime,
            Some(name) => {
                let name = name.strip_prefix("envoy.wasm.runtime.").unwrap_or(name);
                EngineKind::from_name(name).map_err(|e| anyhow::anyhow!("{e}"))?
            }
        };
        let mut env: Vec<(String, String)> = self
            .vm_config
            .environment_variables
            .host_env_keys
            .iter()
            .filter_map(|key| std::env::var(key).ok().map(|value| (key.clone(), value)))
            .collect();
        env.extend(
            self.vm_config
                .environment_variables
                .key_values
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let mut config = PluginConfig::named(&self.name)
            .with_configuration(self.configuration.as_bytes())
            .with_vm_configuration(self.vm_config.configuration.as_bytes())
            .with_vm_id(&self.vm_config.vm_id)
            .with_engine(engine);
        config.root_id = self.root_id.clone();
        config.environment_variables = env;
        if let Some(limits) = &self.limits {
            config.limits = limits.clone();
        }
        config.reload = self.reload.clone().unwrap_or_default();
        match self.failure_policy {
            EnvoyFailurePolicy::Closed => {
                config.failure_policy = FailurePolicy::FailClosed { status: 503 };
                config.reload.enabled = false;
            }
            EnvoyFailurePolicy::Reload => {
                config.failure_policy = FailurePolicy::FailClosed { status: 503 };
            }
            EnvoyFailurePolicy::Open => config.failure_policy = FailurePolicy::FailOpen,
        }
        if let Some(level) = &self.log_level {
            config.log_level = filterbox::LogLevel::ALL
                .iter()
                .copied()
                .find(|l| l.name().eq_ignore_ascii_case(level))
                .ok_or_else(|| anyhow::anyhow!("unknown log level {level:?} (trace … critical)"))?;
        }
        config.allowed_capabilities = self.allowed_capabilities.clone();
        Ok(config)
    }
}

/// Plugins, chain and upstream URLs built from one config: what a reload swaps.
struct Generation {
    chain: FilterChain,
    router: Router,
    upstreams: BTreeMap<String, Arc<Pool>>,
    services: Vec<filterbox::Service>,
}

/// The largest plugin file `serve` reads (Go SDK plugins are tens of MiB at most).
const MAX_PLUGIN_FILE_BYTES: u64 = 256 << 20;

/// Reads a plugin file: a regular file of at most [`MAX_PLUGIN_FILE_BYTES`]. A FIFO or a
/// device (`/dev/zero`) is refused before anything is read, so neither can hang or exhaust
/// the host.
fn read_plugin_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let metadata = std::fs::metadata(path)?;
    if !metadata.is_file() {
        bail!("not a regular file");
    }
    if metadata.len() > MAX_PLUGIN_FILE_BYTES {
        bail!(
            "{} bytes, over the {} MiB a plugin may have",
            metadata.len(),
            MAX_PLUGIN_FILE_BYTES >> 20
        );
    }
    let mut wasm = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_PLUGIN_FILE_BYTES + 1)
        .read_to_end(&mut wasm)?;
    if wasm.len() as u64 > MAX_PLUGIN_FILE_BYTES {
        bail!("grew past {} MiB while read", MAX_PLUGIN_FILE_BYTES >> 20);
    }
    Ok(wasm)
}

/// Builds every plugin and starts the chain (each VM started and configured once), so a
/// config that cannot serve is refused here. Errors name the plugin, its file and engine.
fn build_generation(
    config: &ServeConfig,
    base: &Path,
    registries: &Registries,
    runtime: &tokio::runtime::Handle,
) -> Result<Generation> {
    let mut upstreams = BTreeMap::new();
    // Plugins' calls reach `https://` upstreams through a TLS connector.
    let (connector, https) = crate::upstream::callout_connector(config.upstreams.values(), base)?;
    let mut callouts = HyperCallouts::with_connector(runtime.clone(), connector, https);
    for (name, entry) in &config.upstreams {
        let pool = Pool::new(name, entry, base)?;
        if let Some(first) = entry.urls().first() {
            callouts = callouts
                .upstream(name.clone(), first)
                .map_err(|e| anyhow::anyhow!("upstream {name:?}: {e}"))?;
        }
        upstreams.insert(name.clone(), Arc::new(pool));
    }
    let callouts = Arc::new(callouts);
    let load = |entry: &PluginEntry| -> Result<Plugin> {
        let file = base.join(&entry.vm_config.code.local.filename);
        let plugin_config = entry
            .plugin_config()
            .with_context(|| format!("plugin {:?}", entry.name))?;
        let engine = plugin_config.engine;
        let wasm = read_plugin_file(&file)
            .with_context(|| format!("plugin {:?}: reading {}", entry.name, file.display()))?;
        Plugin::builder(plugin_config)
            .callouts(callouts.clone())
            .metric_registry(registries.of(&entry.name))
            .build(&wasm)
            .map_err(|e| {
                anyhow::anyhow!(
                    "plugin {:?} ({}) on {engine}: {e}",
                    entry.name,
                    file.display()
                )
            })
    };
    let plugins = config
        .plugins
        .iter()
        .map(load)
        .collect::<Result<Vec<_>>>()?;
    let services = config
        .services
        .iter()
        .map(|entry| {
            let plugin = load(entry)?;
            filterbox::Service::start(&plugin).map_err(|e| {
                anyhow::anyhow!(
                    "service {:?} ({}): {e}",
                    entry.name,
                    base.join(&entry.vm_config.code.local.filename).display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut builder = FilterChain::builder();
    if let Some(slots) = config.slots {
        builder = builder.slots(slots);
    }
    if let Some(ms) = config.pause_timeout_ms {
        builder = builder.pause_timeout(Duration::from_millis(ms));
    }
    if let Some(bytes) = config.max_body_bytes {
        builder = builder.max_body_bytes(bytes);
    }
    if let Some(bytes) = config.max_held_body_bytes {
        builder = builder.max_held_bytes(bytes);
    }
    let names: Vec<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
    for (index, route) in config.routes.iter().enumerate() {
        builder = builder.route(route.name_at(index), route.chain_route(&names));
    }
    let chain = builder.build(plugins).map_err(|error| {
        // Name the file and engine of the plugin that would not start.
        let source = match &error {
            filterbox::ChainError::Start(vm) => config
                .plugins
                .iter()
                .find(|p| p.name == vm.plugin())
                .map(|p| {
                    format!(
                        " ({})",
                        base.join(&p.vm_config.code.local.filename).display()
                    )
                }),
            _ => None,
        };
        anyhow::anyhow!(
            "starting the plugin chain: {error}{}",
            source.unwrap_or_default()
        )
    })?;
    Ok(Generation {
        chain,
        router: Router::new(&config.routes),
        upstreams,
        services,
    })
}

/// What every connection shares.
struct Shared {
    chain: SharedChain,
    /// The running service plugins (replaced whole on reload).
    services: parking_lot::Mutex<Vec<filterbox::Service>>,
    /// How long a request body may wait for its client.
    body_idle: Duration,
    upstreams: RwLock<Arc<BTreeMap<String, Arc<Pool>>>>,
    /// Replaced with the chain on reload.
    router: RwLock<Arc<Router>>,
    registries: Registries,
    /// Watches every client connection, to drain them at shutdown; `None` once draining.
    graceful: parking_lot::Mutex<Option<hyper_util::server::graceful::GracefulShutdown>>,
    requests: AtomicU64,
    upstream_errors: AtomicU64,
    request_body_errors: AtomicU64,
    reloads: AtomicU64,
    reloads_refused: AtomicU64,
}

/// The inner service: forwards a filtered request to the listener's upstream.
#[derive(Clone)]
struct Upstream {
    shared: Arc<Shared>,
    name: Arc<str>,
}

impl Service<http::Request<FilteredBody>> for Upstream {
    type Response = http::Response<Incoming>;
    type Error = anyhow::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<FilteredBody>) -> Self::Future {
        let shared = self.shared.clone();
        let name = match request.extensions().get::<RouteUpstream>() {
            Some(route) => route.0.clone(),
            None => self.name.clone(),
        };
        Box::pin(async move {
            let pool = shared.upstreams.read().get(&*name).cloned();
            let pool = pool.with_context(|| format!("upstream {name:?} is gone"))?;
            // The upstream hop is filterbox's own connection: HTTP/1.1, whatever the client
            // spoke (hyper sets `host` from the URI when an HTTP/2 client sent none).
            *request.version_mut() = http::Version::HTTP_11;
            filterbox::strip_hop_by_hop(request.headers_mut());
            // A request without a body can be sent again: it tries every address until one
            // connects. One with a body goes to one address (its body is read once).
            let replayable = request.body().is_end_stream();
            let order = pool.order();
            let mut addresses = order.iter().peekable();
            let mut response = loop {
                let Some(&base) = addresses.next() else {
                    anyhow::bail!("upstream {name:?} has no address");
                };
                let mut attempt = match (replayable, addresses.peek()) {
                    (true, Some(_)) => replay(&request),
                    _ => std::mem::replace(&mut request, http::Request::new(FilteredBody::empty())),
                };
                let mut parts = base.clone().into_parts();
                parts.path_and_query = attempt.uri().path_and_query().cloned();
                *attempt.uri_mut() = http::Uri::from_parts(parts)?;
                match pool.client().request(attempt).await {
                    Ok(response) => break response,
                    Err(error) if error.is_connect() => {
                        pool.mark_down(base);
                        tracing::warn!(upstream = %name, address = %base, "{error}");
                        if !replayable || addresses.peek().is_none() {
                            return Err(error.into());
                        }
                    }
                    Err(error) => return Err(error.into()),
                }
            };
            // Upgrades are not proxied (their headers are hop-by-hop and dropped): a 101
            // passed on would switch a client that never asked to.
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                anyhow::bail!(
                    "upstream answered 101 Switching Protocols; upgrades are not proxied"
                );
            }
            filterbox::strip_hop_by_hop(response.headers_mut());
            Ok(response)
        })
    }
}

/// A copy of a request without a body, to send again.
fn replay(request: &http::Request<FilteredBody>) -> http::Request<FilteredBody> {
    let mut copy = http::Request::new(FilteredBody::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    copy
}

type ProxyBody = http_body_util::Either<FilteredBody, Full<Bytes>>;

/// Runs the proxy until the process is stopped.
pub fn serve(config_path: &Path) -> Result<()> {
    let config = ServeConfig::load(config_path)?;
    let base = config_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("filterbox-serve")
        .build()
        .context("starting the tokio runtime")?;
    let served = runtime.block_on(async move {
        let registries = Registries::default();
        let handle = tokio::runtime::Handle::current();
        let first = {
            let (config, base, registries, handle) = (
                config.clone(),
                base.clone(),
                registries.clone(),
                handle.clone(),
            );
            tokio::task::spawn_blocking(move || {
                build_generation(&config, &base, &registries, &handle)
            })
            .await??
        };
        let shared = Arc::new(Shared {
            chain: SharedChain::new(first.chain),
            services: parking_lot::Mutex::new(first.services),
            upstreams: RwLock::new(Arc::new(first.upstreams)),
            router: RwLock::new(Arc::new(first.router)),
            registries,
            body_idle: config
                .body_idle_timeout_ms
                .map_or(BODY_IDLE_TIMEOUT, Duration::from_millis),
            graceful: parking_lot::Mutex::new(Some(Default::default())),
            requests: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
            request_body_errors: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
        });
        let mut accepting = Vec::new();
        for listener in &config.listeners {
            let socket = TcpListener::bind(listener.address)
                .await
                .with_context(|| format!("binding listener {}", listener.address))?;
            let service = FilterLayer::shared(shared.chain.clone()).layer(Upstream {
                shared: shared.clone(),
                name: listener.upstream.as_str().into(),
            });
            tracing::info!(address = %listener.address, upstream = %listener.upstream, "listening");
            let tls = match &listener.tls {
                Some(tls) => Some(
                    tls.acceptor(&base)
                        .with_context(|| format!("listener {}", listener.address))?,
                ),
                None => None,
            };
            accepting.push(tokio::spawn(accept_loop(socket, tls, service, shared.clone())));
        }
        if let Some(admin) = &config.admin {
            let socket = TcpListener::bind(admin.address)
                .await
                .with_context(|| format!("binding admin listener {}", admin.address))?;
            tracing::info!(address = %admin.address, "admin listening");
            if !admin.address.ip().is_loopback() {
                tracing::warn!(
                    address = %admin.address,
                    "the admin listener is reachable from other hosts; /stats shows every plugin's metrics"
                );
            }
            tokio::spawn(admin_loop(socket, shared.clone()));
        }
        eprintln!(
            "filterbox: serving {} plugin(s) and {} service(s) on {}",
            config.plugins.len(),
            config.services.len(),
            config
                .listeners
                .iter()
                .map(|l| l.address.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let drain = config
            .drain_timeout_ms
            .map_or(DRAIN_TIMEOUT, Duration::from_millis);
        let watched = watch(config_path.to_path_buf(), config, base, shared.clone()).await;
        // No new connections; the open ones finish the requests they are serving.
        for listener in accepting {
            listener.abort();
        }
        let graceful = shared.graceful.lock().take();
        if let Some(graceful) = graceful {
            let open = graceful.count();
            match tokio::time::timeout(drain, graceful.shutdown()).await {
                Ok(()) => tracing::info!(connections = open, "drained"),
                Err(_) => tracing::warn!(
                    "requests still running after the {} ms drain timeout are cut off",
                    drain.as_millis()
                ),
            }
        }
        // Services end cleanly (`proxy_on_done`), off the runtime's threads.
        let services = std::mem::take(&mut *shared.services.lock());
        let _ = tokio::task::spawn_blocking(move || drop(services)).await;
        watched
    });
    // A reload still building on a blocking thread (a stuck plugin read) must not hold up
    // the exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
    served
}

/// How long running requests get to finish at shutdown by default.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request body may wait for its client's next bytes by default.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A request body that fails when its client sends nothing for `idle` while the proxy waits
/// for it: a stalled upload cannot hold a connection and the plugins' buffers for ever. Only
/// time spent waiting on the client counts (not time the plugins keep the body unread).
struct IdleBody {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleBody {
    fn new(inner: Incoming, idle: Duration) -> Self {
        IdleBody {
            inner,
            idle,
            timer: None,
        }
    }
}

impl Body for IdleBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdle(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client sent no request body bytes for this long.
#[derive(Debug)]
struct BodyIdle(Duration);

impl std::fmt::Display for BodyIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent no request body for {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyIdle {}

/// How long a client may take to send a request's head (and an idle keep-alive connection
/// may wait for the next one).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to a request `serve` does not forward: a CONNECT (it proxies no tunnels), or
/// one with more than one `Host` (which one the upstream and the plugins believe would
/// differ).
fn refuse<B>(request: &http::Request<B>) -> Option<http::Response<ProxyBody>> {
    if request.method() == http::Method::CONNECT {
        return Some(text(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "filterbox: CONNECT is not proxied\n".into(),
        ));
    }
    if request.headers().get_all(http::header::HOST).iter().count() > 1 {
        return Some(text(
            http::StatusCode::BAD_REQUEST,
            "filterbox: more than one Host header\n".into(),
        ));
    }
    None
}

/// How long an accept loop waits after a failed accept (EMFILE: out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What a listener serves its requests with: the filter layer around the upstream.
trait ListenerService:
    Service<
        http::Request<IdleBody>,
        Response = http::Response<FilteredBody>,
        Error = filterbox::FilterError,
        Future: Send,
    > + Clone
    + Send
    + 'static
{
}

impl<S> ListenerService for S where
    S: Service<
            http::Request<IdleBody>,
            Response = http::Response<FilteredBody>,
            Error = filterbox::FilterError,
            Future: Send,
        > + Clone
        + Send
        + 'static
{
}

/// Accepts client connections on `socket` (with TLS when `tls` is set) and serves each on a
/// task of its own until the listener is stopped.
async fn accept_loop<S: ListenerService>(
    socket: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    service: S,
    shared: Arc<Shared>,
) {
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!("accept: {error}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (service, shared, tls) = (service.clone(), shared.clone(), tls.clone());
        tokio::spawn(async move {
            let mut connection = ConnectionInfo {
                source: Some(peer),
                destination: stream.local_addr().ok(),
                ..ConnectionInfo::default()
            };
            let Some(tls) = tls else {
                return serve_client(stream, Arc::new(connection), service, shared).await;
            };
            // The handshake gets the time a request head gets.
            let stream = match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return tracing::debug!(%peer, "TLS handshake: {error}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let (_, session) = stream.get_ref();
            connection.tls_version = session.protocol_version().map(envoy_tls_version);
            connection.requested_server_name = session.server_name().map(str::to_owned);
            serve_client(stream, Arc::new(connection), service, shared).await;
        });
    }
}

/// A TLS version in Envoy's spelling (`TLSv1.3`).
fn envoy_tls_version(version: rustls::ProtocolVersion) -> String {
    match version {
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        other => format!("{other:?}").replace("TLSv1_", "TLSv1."),
    }
}

/// Serves one client connection: every request through `service` (the plugins, then the
/// upstream), with the connection's attributes for the plugins.
async fn serve_client<I, S>(io: I, connection: Arc<ConnectionInfo>, service: S, shared: Arc<Shared>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ListenerService,
{
    let graceful = shared.clone();
    let graceful = &graceful.graceful;
    let handler = service_fn(move |request: http::Request<Incoming>| {
        let mut service = service.clone();
        let shared = shared.clone();
        let connection = connection.clone();
        async move {
            shared.requests.fetch_add(1, Ordering::Relaxed);
            if let Some(refused) = refuse(&request) {
                return Ok::<_, std::convert::Infallible>(refused);
            }
            let idle = shared.body_idle;
            let mut request = request.map(|body| IdleBody::new(body, idle));
            request.extensions_mut().insert(connection);
            let router = shared.router.read().clone();
            router.route(&mut request);
            let response: http::Response<ProxyBody> = match service.call(request).await {
                Ok(response) => response.map(http_body_util::Either::Left),
                // The client's fault: a malformed (chunked) body or one that stalled. The
                // upstream request was dropped unfinished with it.
                Err(filterbox::FilterError::RequestBody(error)) => {
                    shared.request_body_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("request body: {error}");
                    let status = match error.is::<BodyIdle>() {
                        true => http::StatusCode::REQUEST_TIMEOUT,
                        false => http::StatusCode::BAD_REQUEST,
                    };
                    text(status, format!("filterbox: request body: {error}\n"))
                }
                Err(error) => {
                    shared.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("{error}");
                    text(
                        http::StatusCode::BAD_GATEWAY,
                        format!("filterbox: {error}\n"),
                    )
                }
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    // HTTP/1.1 or HTTP/2 (ALPN on TLS, prior knowledge otherwise). A client gets
    // HEADER_READ_TIMEOUT to send a request head, so half-sent requests cannot hold
    // connections for ever.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Shutting down: the connection came in as the listener stopped.
    let Some(watcher) = graceful.lock().as_ref().map(|g| g.watcher()) else {
        return;
    };
    let connection = builder.serve_connection(TokioIo::new(io), handler);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!("connection: {error}");
    }
}

fn text(status: http::StatusCode, body: String) -> http::Response<ProxyBody> {
    let mut response =
        http::Response::new(http_body_util::Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
}

async fn admin_loop(socket: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match socket.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors (or another passing error): wait instead of
                // spinning on accept.
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |request: http::Request<Incoming>| {
                let shared = shared.clone();
                async move {
                    let response = match request.uri().path() {
                        "/ready" => text(http::StatusCode::OK, "ready\n".into()),
                        "/stats" | "/stats/prometheus" => {
                            text(http::StatusCode::OK, render_stats(&shared))
                        }
                        _ => text(http::StatusCode::NOT_FOUND, "try /stats or /ready\n".into()),
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await;
        });
    }
}

/// Prometheus text: plugin metrics, host metrics per plugin, and the proxy's own counters.
fn render_stats(shared: &Shared) -> String {
    let mut plugins = String::new();
    for (name, registry) in shared.registries.all() {
        let mut text = String::new();
        registry.render_prometheus(&mut text);
        plugins.push_str(&label_samples(&text, &name));
    }
    let plugins = merge_families(&plugins);
    let mut host = String::new();
    for plugin in shared.chain.current().plugins() {
        plugin
            .metrics()
            .render_prometheus(&plugin.config().name, &mut host);
    }
    for service in shared.services.lock().iter() {
        let plugin = service.plugin();
        plugin
            .metrics()
            .render_prometheus(&plugin.config().name, &mut host);
    }
    let mut out = plugins;
    out.push_str(&merge_families(&host));
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "filterbox_serve_requests_total",
        "Requests the listeners received.",
        shared.requests.load(Ordering::Relaxed),
    );
    counter(
        "filterbox_serve_upstream_errors_total",
        "Requests answered 502 because the upstream or a response body failed.",
        shared.upstream_errors.load(Ordering::Relaxed),
    );
    counter(
        "filterbox_serve_request_body_errors_total",
        "Requests answered 400 (malformed body) or 408 (stalled body).",
        shared.request_body_errors.load(Ordering::Relaxed),
    );
    counter(
        "filterbox_serve_reloads_total",
        "Configs reloaded.",
        shared.reloads.load(Ordering::Relaxed),
    );
    counter(
        "filterbox_serve_reloads_refused_total",
        "New configs refused (the old one kept serving).",
        shared.reloads_refused.load(Ordering::Relaxed),
    );
    out
}

/// The metrics plugins define, one registry per plugin name: a plugin can neither use up
/// another's metric slots nor reach another's metrics by guessing ids. A registry outlives
/// reloads, so a reloaded plugin's counters go on.
#[derive(Clone, Default)]
struct Registries(Arc<parking_lot::Mutex<BTreeMap<String, Arc<MetricRegistry>>>>);

impl Registries {
    /// Metrics one plugin may define.
    const MAX_METRICS_PER_PLUGIN: usize = 10_000;

    fn of(&self, plugin: &str) -> Arc<MetricRegistry> {
        self.0
            .lock()
            .entry(plugin.to_owned())
            .or_insert_with(|| Arc::new(MetricRegistry::new(Self::MAX_METRICS_PER_PLUGIN)))
            .clone()
    }

    fn all(&self) -> Vec<(String, Arc<MetricRegistry>)> {
        let registries = self.0.lock();
        registries
            .iter()
            .map(|(name, registry)| (name.clone(), registry.clone()))
            .collect()
    }
}

/// Adds a `plugin` label to every sample line of Prometheus text, so that two plugins that
/// define a metric of the same name report two series of one family.
fn label_samples(text: &str, plugin: &str) -> String {
    let plugin = plugin.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with('#') {
            out.push_str(line);
        } else if let Some((name, rest)) = line.split_once('{') {
            let _ = write!(out, "{name}{{plugin=\"{plugin}\",{rest}");
        } else if let Some((name, value)) = line.split_once(' ') {
            let _ = write!(out, "{name}{{plugin=\"{plugin}\"}} {value}");
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Groups the samples of each metric family under one `# HELP` / `# TYPE` pair, as the text
/// format requires when several plugins report the same family.
fn merge_families(text: &str) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let meta = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "));
        if let Some(rest) = meta {
            current = rest.split(' ').next().unwrap_or_default().to_owned();
        }
        let family = families.entry(current.clone()).or_insert_with(|| {
            order.push(current.clone());
            (Vec::new(), Vec::new())
        });
        match meta {
            Some(_) if !family.0.iter().any(|l| l == line) => family.0.push(line.to_owned()),
            Some(_) => {}
            None => family.1.push(line.to_owned()),
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some((meta, samples)) = families.get(&name) {
            for line in meta.iter().chain(samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Reloads on SIGHUP and when the config file changes (checked every second); returns on
/// SIGTERM or SIGINT.
async fn watch(
    path: PathBuf,
    mut config: ServeConfig,
    base: PathBuf,
    shared: Arc<Shared>,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut last = std::fs::read(&path).ok();
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        let forced = tokio::select! {
            _ = hangup.recv() => true,
            _ = interval.tick() => false,
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        let now = std::fs::read(&path).ok();
        if !forced && now == last {
            continue;
        }
        last = now;
        // A reload can be slow (compiling) or stuck (a plugin path that blocks): shutdown
        // signals still end the process meanwhile.
        let reloaded = tokio::select! {
            reloaded = reload(&path, &config, &base, &shared) => reloaded,
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        match reloaded {
            Ok(new) => {
                config = new;
                shared.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!("reloaded {}", path.display());
                eprintln!("filterbox: reloaded {}", path.display());
            }
            Err(error) => {
                shared.reloads_refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "refused new config {}: {error:#}; the old one keeps serving",
                    path.display()
                );
                eprintln!(
                    "filterbox: refused new config {}: {error:#}; the old one keeps serving",
                    path.display()
                );
            }
        }
    }
}

/// Builds and starts the new config, then swaps it in: exchanges already running finish on
/// the old chain, whose VMs go away with its last exchange.
async fn reload(
    path: &Path,
    old: &ServeConfig,
    base: &Path,
    shared: &Arc<Shared>,
) -> Result<ServeConfig> {
    let new = ServeConfig::load(path)?;
    if new.listeners != old.listeners || new.admin != old.admin {
        tracing::warn!("listener and admin changes take effect on restart only");
    }
    // The running listeners keep their upstreams until a restart: each must still exist.
    for listener in &old.listeners {
        if !new.upstreams.contains_key(&listener.upstream) {
            bail!(
                "listener {} sends to upstream {:?}, which the new config removes (listeners change on restart only)",
                listener.address,
                listener.upstream
            );
        }
    }
    let generation = {
        let (config, base, registries) =
            (new.clone(), base.to_path_buf(), shared.registries.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || build_generation(&config, &base, &registries, &handle))
            .await??
    };
    *shared.upstreams.write() = Arc::new(generation.upstreams);
    *shared.router.write() = Arc::new(generation.router);
    shared.chain.replace(generation.chain);
    let old = std::mem::replace(&mut *shared.services.lock(), generation.services);
    // Stopping waits for each service's running callback: not on the runtime's threads.
    tokio::task::spawn_blocking(move || drop(old));
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_plugin_has_its_own_registry_and_its_samples_carry_its_name() {
        let registries = Registries::default();
        assert!(!Arc::ptr_eq(&registries.of("a"), &registries.of("b")));
        assert!(Arc::ptr_eq(&registries.of("a"), &registries.of("a")));
        let text = "# TYPE hits counter\nhits 3\n# TYPE t histogram\nt_bucket{le=\"1\"} 2\n";
        assert_eq!(
            label_samples(text, "p\"q"),
            "# TYPE hits counter\nhits{plugin=\"p\\\"q\"} 3\n# TYPE t histogram\n\
             t_bucket{plugin=\"p\\\"q\",le=\"1\"} 2\n"
        );
    }

    #[test]
    fn plugin_files_must_be_regular_files() {
        let error = read_plugin_file(Path::new("/dev/zero")).expect_err("/dev/zero read");
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }

    #[test]
    fn configs_with_two_plugins_of_one_name_are_refused() {
        let path = std::env::temp_dir().join(format!("filterbox-dup-{}.yaml", std::process::id()));
        let yaml = r#"
listeners: [{ address: "127.0.0.1:8080", upstream: backend }]
upstreams: { backend: "http://127.0.0.1:9000" }
plugins:
  - { name: same, vm_config: { code: { local: { filename: a.wasm } } } }
  - { name: same, vm_config: { code: { local: { filename: b.wasm } } } }
"#;
        std::fs::write(&path, yaml).expect("write config");
        let error = ServeConfig::load(&path).expect_err("duplicate names accepted");
        let _ = std::fs::remove_file(&path);
        assert!(
            error.to_string().contains("two plugins are named"),
            "{error}"
        );
    }

    #[test]
    fn an_envoy_style_plugin_entry_becomes_a_plugin_config() {
        let yaml = r#"
listeners: [{ address: "127.0.0.1:8080", upstream: backend }]
upstreams: { backend: "http://127.0.0.1:9000" }
plugins:
  - name: add
    root_id: add_root
    configuration: "add x-a 1"
    failure_policy: FAIL_OPEN
    vm_config:
      vm_id: shared
      runtime: envoy.wasm.runtime.wasmi
      code: { local: { filename: add.wasm } }
      configuration: vm
      environment_variables: { key_values: { A: b } }
"#;
        let config: ServeConfig = serde_yaml::from_str(yaml).expect("parse");
        let plugin = config.plugins[0].plugin_config().expect("convert");
        assert_eq!(plugin.name, "add");
        assert_eq!(plugin.root_id, "add_root");
        assert_eq!(plugin.vm_id, "shared");
        assert_eq!(plugin.engine, EngineKind::Wasmi);
        assert_eq!(plugin.configuration, b"add x-a 1");
        assert_eq!(plugin.vm_configuration, b"vm");
        assert_eq!(plugin.failure_policy, FailurePolicy::FailOpen);
        assert_eq!(plugin.environment_variables, vec![("A".into(), "b".into())]);
    }

    #[test]
    fn fail_reload_is_the_default_fail_closed_does_not_rebuild_and_unknown_fields_are_refused() {
        let entry: PluginEntry = serde_yaml::from_str(
            "{ name: p, vm_config: { code: { local: { filename: p.wasm } } } }",
        )
        .expect("parse");
        let config = entry.plugin_config().expect("convert");
        assert!(config.reload.enabled);
        assert_eq!(
            config.failure_policy,
            FailurePolicy::FailClosed { status: 503 }
        );
        let entry: PluginEntry = serde_yaml::from_str(
            "{ name: p, failure_policy: FAIL_CLOSED, vm_config: { code: { local: { filename: p.wasm } } } }",
        )
        .expect("parse");
        let config = entry.plugin_config().expect("convert");
        assert!(!config.reload.enabled);
        let error = serde_yaml::from_str::<PluginEntry>(
            "{ name: p, fail_opn: true, vm_config: { code: { local: { filename: p.wasm } } } }",
        )
        .expect_err("typo accepted");
        assert!(error.to_string().contains("fail_opn"), "{error}");
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "yes"),
        ] {
            headers.insert(name, http::HeaderValue::from_static(value));
        }
        filterbox::strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-kept"], "yes");
    }

    #[test]
    fn families_reported_by_several_plugins_get_one_type_line() {
        let text = "# HELP a x\n# TYPE a counter\na{plugin=\"p\"} 1\n# HELP a x\n# TYPE a counter\na{plugin=\"q\"} 2\n";
        assert_eq!(
            merge_families(text),
            "# HELP a x\n# TYPE a counter\na{plugin=\"p\"} 1\na{plugin=\"q\"} 2\n"
        );
    }
}
