//! Plugins: a module compiled and linked once, shared by every VM that runs it.

use crate::callouts::{Callouts, NoCallouts};
use crate::embedder::{ForeignFunction, LogSink, NoProperties, PropertyProvider, TracingLogSink};
use crate::metrics::HostMetrics;
use crate::plugin_metrics::MetricRegistry;
use crate::shared::SharedState;
use crate::state::{ImportSet, PluginShared, VmState};
use crate::{DeniedCapability, PluginConfig};
use core::fmt;
use filterbox_abi::{AbiError, AbiVersion, Import, ModuleInfo};
use filterbox_engines::{
    CacheOutcome, Engine, EngineConfig, EngineError, EngineKind, InstancePre, Module, ModuleCache,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Why a plugin could not be loaded: names the plugin, the engine and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PluginError {
    /// The plugin's name.
    pub plugin: String,
    /// The engine it was loaded on.
    pub engine: EngineKind,
    /// What went wrong.
    pub reason: LoadError,
}

/// What went wrong loading a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    /// The module is not a proxy-wasm module of a supported ABI version.
    Abi(AbiError),
    /// The engine could not be made, or could not compile or link the module.
    Engine(EngineError),
    /// An engine was supplied that is not the one the config names.
    EngineMismatch {
        /// The engine supplied.
        supplied: EngineKind,
    },
    /// `allowed_capabilities` names something that is not an import of the ABI.
    UnknownCapability(String),
    /// The module imports functions `allowed_capabilities` leaves out, and the config says
    /// to refuse such plugins.
    DeniedImports(Vec<String>),
    /// A limit in the config is over what filterbox can honour (the reason says which).
    Limit(String),
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "plugin {:?} on {}: ", self.plugin, self.engine)?;
        match &self.reason {
            LoadError::Abi(e) => e.fmt(f),
            LoadError::Engine(e) => e.fmt(f),
            LoadError::EngineMismatch { supplied } => write!(
                f,
                "the config names {} but a {supplied} engine was supplied",
                self.engine
            ),
            LoadError::UnknownCapability(name) => write!(
                f,
                "allowed_capabilities names {name:?}, which is no proxy-wasm or WASI import"
            ),
            LoadError::DeniedImports(names) => write!(
                f,
                "the module imports {} outside allowed_capabilities",
                names.join(", ")
            ),
            LoadError::Limit(reason) => write!(f, "limits: {reason}"),
        }
    }
}

impl std::error::Error for PluginError {}

/// A loaded plugin: its config, its compiled module linked with filterbox's hostcalls, and the
/// embedder hooks its VMs use. `Send + Sync` and cheap to clone; make one [`Vm`](crate::Vm)
/// per worker thread from it.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    shared: Arc<PluginShared>,
    module: Module,
    pre: Arc<InstancePre<VmState>>,
    cache: Option<CacheOutcome>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.config().name)
            .field("engine", &self.engine())
            .field("abi", &self.abi_version())
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// Loads a plugin with default hooks on a new engine of the kind its config names.
    pub fn load(config: PluginConfig, wasm: &[u8]) -> Result<Plugin, PluginError> {
        Plugin::builder(config).build(wasm)
    }

    /// A builder to set the engine and the embedder hooks.
    pub fn builder(config: PluginConfig) -> PluginBuilder {
        let foreign_functions = crate::foreign::builtins(config.limits.max_body_bytes)
            .into_iter()
            .collect();
        PluginBuilder {
            config,
            engine: None,
            cache: None,
            log: Arc::new(TracingLogSink),
            properties: Arc::new(NoProperties),
            shared_state: None,
            metric_registry: None,
            callouts: Arc::new(NoCallouts),
            foreign_functions,
            latency_every: DEFAULT_LATENCY_EVERY,
        }
    }

    /// The metrics the plugin defined (`proxy_define_metric`).
    pub fn metric_registry(&self) -> &Arc<MetricRegistry> {
        &self.inner.shared.metric_registry
    }

    /// The key-value store and queues the plugin's VMs share.
    pub fn shared_state(&self) -> &SharedState {
        &self.inner.shared.shared_state
    }

    /// The plugin's config.
    pub fn config(&self) -> &PluginConfig {
        &self.inner.shared.config
    }

    /// The ABI version the module declares.
    pub fn abi_version(&self) -> AbiVersion {
        self.inner.shared.abi
    }

    /// The engine it runs on.
    pub fn engine(&self) -> EngineKind {
        self.inner.module.engine()
    }

    /// The module's imports and exports.
    pub fn module_info(&self) -> &ModuleInfo {
        self.inner.module.info()
    }

    /// Metrics about this plugin's VMs, shared by all of them.
    pub fn metrics(&self) -> &HostMetrics {
        &self.inner.shared.metrics
    }

    /// What the module cache did when this plugin was loaded (`None` without a cache).
    pub fn cache_outcome(&self) -> Option<&CacheOutcome> {
        self.inner.cache.as_ref()
    }

    pub(crate) fn shared(&self) -> &Arc<PluginShared> {
        &self.inner.shared
    }

    pub(crate) fn instance_pre(&self) -> &InstancePre<VmState> {
        &self.inner.pre
    }
}

/// Builds a [`Plugin`]; from [`Plugin::builder`].
pub struct PluginBuilder {
    config: PluginConfig,
    engine: Option<Engine>,
    cache: Option<ModuleCache>,
    log: Arc<dyn LogSink>,
    properties: Arc<dyn PropertyProvider>,
    shared_state: Option<SharedState>,
    metric_registry: Option<Arc<MetricRegistry>>,
    callouts: Arc<dyn Callouts>,
    foreign_functions: HashMap<String, Arc<dyn ForeignFunction>>,
    latency_every: u32,
}

/// By default one call in 16 of each callback is timed.
const DEFAULT_LATENCY_EVERY: u32 = 16;

impl PluginBuilder {
    /// Whether callback latency goes into `filterbox_callback_duration_seconds` (default:
    /// yes, sampled as [`callback_latency_sampling`](Self::callback_latency_sampling) says).
    /// Without it callbacks are still counted (`filterbox_callback_calls_total`,
    /// [`HostMetrics::callback_calls`]).
    ///
    /// [`HostMetrics::callback_calls`]: crate::HostMetrics::callback_calls
    pub fn callback_latency(mut self, on: bool) -> Self {
        self.latency_every = if on { DEFAULT_LATENCY_EVERY } else { 0 };
        self
    }

    /// Times one call in `every` of each callback, per VM, starting with the first (default
    /// 16; 1 times every call; 0 none). A timed call reads the clock twice, which on a
    /// header-rewriting plugin is a tenth of the callback's cost; one in 16 keeps the
    /// histogram's shape at a sixteenth of that. The histogram then counts the timed calls;
    /// `filterbox_callback_calls_total` counts them all.
    pub fn callback_latency_sampling(mut self, every: u32) -> Self {
        self.latency_every = every;
        self
    }

    /// Compiles on `engine` (shared with other plugins) instead of a new one. Its kind must be
    /// the one the config names.
    pub fn engine(mut self, engine: &Engine) -> Self {
        self.engine = Some(engine.clone());
        self
    }

    /// Loads the compiled module from `cache` when it holds a valid artifact, and stores one
    /// after compiling otherwise (engines that cannot serialize just compile).
    pub fn module_cache(mut self, cache: ModuleCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Sends plugin log lines to `sink` instead of `tracing`.
    pub fn log_sink(mut self, sink: Arc<dyn LogSink>) -> Self {
        self.log = sink;
        self
    }

    /// Shares data and queues through `state` (default: [`SharedState::global`]).
    pub fn shared_state(mut self, state: SharedState) -> Self {
        self.shared_state = Some(state);
        self
    }

    /// Puts the metrics the plugin defines in `registry` (default: one of its own).
    pub fn metric_registry(mut self, registry: Arc<MetricRegistry>) -> Self {
        self.metric_registry = Some(registry);
        self
    }

    /// Carries out the plugin's HTTP and gRPC calls (default: [`NoCallouts`]).
    pub fn callouts(mut self, callouts: Arc<dyn Callouts>) -> Self {
        self.callouts = callouts;
        self
    }

    /// Registers a function the plugin can call with `proxy_call_foreign_function`. Every
    /// plugin has Envoy's `compress` and `uncompress` (zlib; `uncompress` refuses to inflate
    /// past `max_body_bytes`) and `set_envoy_filter_state` (the value becomes the property
    /// `filter_state.<key>`); a function registered under one of those names replaces it.
    pub fn foreign_function(
        mut self,
        name: impl Into<String>,
        function: Arc<dyn ForeignFunction>,
    ) -> Self {
        self.foreign_functions.insert(name.into(), function);
        self
    }

    /// Answers property lookups filterbox does not answer itself.
    pub fn properties(mut self, provider: Arc<dyn PropertyProvider>) -> Self {
        self.properties = provider;
        self
    }

    /// Checks the module's ABI version, compiles it and links it with filterbox's hostcalls.
    pub fn build(self, wasm: &[u8]) -> Result<Plugin, PluginError> {
        let fail = |reason| PluginError {
            plugin: self.config.name.clone(),
            engine: self.config.engine,
            reason,
        };
        self.config
            .limits
            .check()
            .map_err(|reason| fail(LoadError::Limit(reason)))?;
        let abi = ModuleInfo::parse(wasm)
            .and_then(|info| info.abi_version())
            .map_err(|e| fail(LoadError::Abi(e)))?;
        let engine = match &self.engine {
            Some(engine) if engine.kind() != self.config.engine => {
                return Err(fail(LoadError::EngineMismatch {
                    supplied: engine.kind(),
                }));
            }
            Some(engine) => engine.clone(),
            None => {
                let mut engine_config = EngineConfig::default();
                if let Some(deadline) = self.config.limits.start_deadline() {
                    engine_config.start_deadline = deadline;
                }
                Engine::new(self.config.engine, &engine_config)
                    .map_err(|e| fail(LoadError::Engine(e)))?
            }
        };
        let (module, cache) = match &self.cache {
            Some(cache) => engine
                .compile_cached(wasm, cache)
                .map(|(module, outcome)| (module, Some(outcome))),
            None => engine.compile(wasm).map(|module| (module, None)),
        }
        .map_err(|e| fail(LoadError::Engine(e)))?;
        let pre = module
            .link::<VmState>(abi)
            .map_err(|e| fail(LoadError::Engine(e)))?;
        self.assemble(abi, module, Arc::new(pre), cache)
    }

    /// Builds a plugin on the module `compiled` was built from, without compiling or linking
    /// again: how a new plugin configuration (or new hooks) is applied to a loaded module, for
    /// a hot reload or for many short-lived plugins of one module. Plugins of the same bytes in
    /// one chain should be built this way too: their VMs then run one copy of the machine code,
    /// which stays in the processor's caches, instead of one copy each (`filterbox serve` does
    /// this for plugins of the same code and engine). The config must name `compiled`'s
    /// engine; capabilities are checked again against the new config.
    pub fn build_from(self, compiled: &Plugin) -> Result<Plugin, PluginError> {
        if compiled.engine() != self.config.engine {
            return Err(PluginError {
                plugin: self.config.name.clone(),
                engine: self.config.engine,
                reason: LoadError::EngineMismatch {
                    supplied: compiled.engine(),
                },
            });
        }
        let inner = &compiled.inner;
        self.assemble(
            inner.shared.abi,
            inner.module.clone(),
            inner.pre.clone(),
            inner.cache.clone(),
        )
    }

    /// The plugin of a compiled and linked module with this builder's config and hooks.
    fn assemble(
        self,
        abi: AbiVersion,
        module: Module,
        pre: Arc<InstancePre<VmState>>,
        cache: Option<CacheOutcome>,
    ) -> Result<Plugin, PluginError> {
        let PluginBuilder {
            config,
            engine: _,
            cache: _,
            log,
            properties,
            shared_state,
            metric_registry,
            callouts,
            foreign_functions,
            latency_every,
        } = self;
        let denied = match denied_imports(&config, module.info()) {
            Ok(denied) => denied,
            Err(reason) => {
                return Err(PluginError {
                    plugin: config.name.clone(),
                    engine: config.engine,
                    reason,
                });
            }
        };
        let shared = Arc::new(PluginShared {
            config,
            abi,
            log,
            properties,
            metrics: HostMetrics::default(),
            denied,
            shared_state: shared_state.unwrap_or_else(SharedState::global),
            reads_properties: module
                .info()
                .imports
                .iter()
                .any(|i| i.provided_by() == Some(Import::ProxyGetProperty)),
            metric_registry: metric_registry.unwrap_or_default(),
            callouts,
            foreign_functions,
            latency_every,
        });
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                shared,
                module,
                pre,
                cache,
            }),
        })
    }
}

/// The imports `allowed_capabilities` leaves out, or the reason the plugin may not load.
fn denied_imports(config: &PluginConfig, info: &ModuleInfo) -> Result<ImportSet, LoadError> {
    let Some(allowed) = &config.allowed_capabilities else {
        return Ok(ImportSet::default());
    };
    let mut allowed_set = ImportSet::default();
    for name in allowed {
        let import = Import::ALL
            .iter()
            .find(|i| i.name() == name)
            .ok_or_else(|| LoadError::UnknownCapability(name.clone()))?;
        allowed_set.insert(*import);
    }
    let mut denied = ImportSet::default();
    for import in Import::ALL.iter().filter(|i| !allowed_set.contains(**i)) {
        denied.insert(*import);
    }
    if config.denied_capability == DeniedCapability::Refuse {
        let used: Vec<String> = info
            .imports
            .iter()
            .filter_map(|i| Import::lookup(&i.module, &i.name))
            .filter(|i| denied.contains(*i))
            .map(|i| i.name().to_owned())
            .collect();
        if !used.is_empty() {
            return Err(LoadError::DeniedImports(used));
        }
    }
    Ok(denied)
}

#[cfg(all(test, feature = "wasmtime"))]
mod tests {
    use super::*;
    use crate::{HeaderMap, LogLevel, Vm};

    /// Adds its whole plugin configuration as the value of request header `x-config`.
    const CONFIG_ECHO: &str = r#"(module
        (import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
        (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 16) "x-config")
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "proxy_on_configure") (param i32 i32) (result i32)
            (drop (call $get (i32.const 7) (i32.const 0) (i32.const 512) (i32.const 0) (i32.const 4)))
            (i32.const 1))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (drop (call $add (i32.const 0) (i32.const 16) (i32.const 8)
                (i32.load (i32.const 0)) (i32.load (i32.const 4))))
            (i32.const 0)))"#;

    fn x_config(plugin: &Plugin) -> Option<String> {
        let mut vm = Vm::new(plugin).ok()?;
        let stream = vm.create_http_stream().ok()?;
        let mut headers = HeaderMap::new();
        vm.on_request_headers(&stream, &mut headers, true).ok()?;
        headers.get_str("x-config").map(str::to_owned)
    }

    /// Logs "quiet" at debug and "loud" at info; adds request header `x-status` with the
    /// status `proxy_log` answered the debug line ("0" is Ok).
    const TWO_LINES: &str = r#"(module
        (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
        (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 16) "quiet")
        (data (i32.const 32) "loud")
        (data (i32.const 48) "x-status")
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            (i32.store8 (i32.const 64)
                (i32.add (i32.const 48) (call $log (i32.const 1) (i32.const 16) (i32.const 5))))
            (drop (call $log (i32.const 2) (i32.const 32) (i32.const 4)))
            (drop (call $add (i32.const 0) (i32.const 48) (i32.const 8) (i32.const 64) (i32.const 1)))
            (i32.const 0)))"#;

    /// Keeps info and above, and counts what it was asked and given.
    #[derive(Default)]
    struct InfoAndUp {
        asked: parking_lot::Mutex<Vec<LogLevel>>,
        lines: parking_lot::Mutex<Vec<String>>,
    }

    impl LogSink for InfoAndUp {
        fn log(&self, _: &str, _: LogLevel, message: &str) {
            self.lines.lock().push(message.to_owned());
        }

        fn enabled(&self, _: &str, level: LogLevel) -> bool {
            self.asked.lock().push(level);
            level.as_u32() >= LogLevel::Info.as_u32()
        }
    }

    #[test]
    fn a_line_the_sink_does_not_keep_is_not_delivered_and_still_answers_ok() {
        let wasm = wat::parse_str(TWO_LINES).expect("parses");
        let sink = Arc::new(InfoAndUp::default());
        let plugin = Plugin::builder(PluginConfig::named("p"))
            .log_sink(sink.clone())
            .build(&wasm)
            .expect("loads");
        let mut vm = Vm::new(&plugin).expect("vm");
        let stream = vm.create_http_stream().expect("stream");
        let mut headers = HeaderMap::new();
        vm.on_request_headers(&stream, &mut headers, true)
            .expect("callback");
        assert_eq!(headers.get_str("x-status"), Some("0"));
        assert_eq!(*sink.asked.lock(), [LogLevel::Debug, LogLevel::Info]);
        assert_eq!(*sink.lines.lock(), ["loud"]);
    }

    #[test]
    fn build_from_reuses_the_module_with_a_new_config() {
        let wasm = wat::parse_str(CONFIG_ECHO).expect("parses");
        let first = Plugin::builder(PluginConfig::named("p").with_configuration("one"))
            .build(&wasm)
            .expect("loads");
        let second = Plugin::builder(PluginConfig::named("p").with_configuration("two"))
            .build_from(&first)
            .expect("rebuilt");
        assert_eq!(x_config(&first).as_deref(), Some("one"));
        assert_eq!(x_config(&second).as_deref(), Some("two"));
        assert_eq!(second.abi_version(), AbiVersion::V0_2_1);

        let other_engine = PluginConfig::named("p").with_engine(EngineKind::Wasmi);
        let error = Plugin::builder(other_engine)
            .build_from(&first)
            .expect_err("engine mismatch");
        assert!(
            matches!(error.reason, LoadError::EngineMismatch { .. }),
            "{error}"
        );
        let refused = PluginConfig::named("p")
            .with_allowed_capabilities(["proxy_log"], DeniedCapability::Refuse);
        let error = Plugin::builder(refused)
            .build_from(&first)
            .expect_err("capabilities are checked again");
        assert!(
            matches!(error.reason, LoadError::DeniedImports(_)),
            "{error}"
        );
    }
}
