//! What a config builds and a reload swaps: plugins, chain, routes and upstreams.

use crate::routes::Router;
use crate::upstream::Pool;
use anyhow::{Context as _, Result, bail};
use filterbox::{
    CodeFetcher, EngineKind, FilterChain, HyperCallouts, ModuleStore, Plugin, PluginSource,
    PullPolicy, RegistryAuth, Sha256,
};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Plugins, chain and upstream URLs built from one config: what a reload swaps.
pub(super) struct Generation {
    pub(super) chain: FilterChain,
    pub(super) router: Router,
    pub(super) upstreams: BTreeMap<String, Arc<Pool>>,
    pub(super) services: Vec<filterbox::Service>,
    /// The compiled modules of this generation's plugins, for the next one to reuse.
    pub(super) modules: Modules,
}

/// Compiled modules by what decides their machine code: the engine, the start deadline the
/// engine is built with, and the code's digest. Each is held by a plugin built on it.
pub(super) type Modules = HashMap<(EngineKind, Option<u64>, Sha256), Plugin>;

/// The largest plugin file `serve` reads (Go SDK plugins are tens of MiB at most).
pub(super) const MAX_PLUGIN_FILE_BYTES: u64 = 256 << 20;

/// Reads a plugin file: a regular file of at most [`MAX_PLUGIN_FILE_BYTES`]. A FIFO or a
/// device (`/dev/zero`) is refused before anything is read, so neither can hang or exhaust
/// the host.
pub(super) fn read_plugin_file(path: &Path) -> Result<Vec<u8>> {
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

/// The module `code` names: the local file, or the remote one fetched (or taken from the
/// module store when its pinned digest is there), its digest checked.
fn plugin_code(
    code: &CodeEntry,
    config: &ServeConfig,
    base: &Path,
    runtime: &tokio::runtime::Handle,
) -> Result<Vec<u8>> {
    match (&code.local, &code.remote) {
        (Some(local), None) => {
            let bytes = read_plugin_file(&base.join(&local.filename))?;
            if let Some(pinned) = &local.sha256 {
                let (expected, actual) = (Sha256::parse(pinned)?, Sha256::of(&bytes));
                if expected != actual {
                    bail!("SHA-256 is {actual}, not the pinned {expected}; refused");
                }
            }
            Ok(bytes)
        }
        (None, Some(remote)) => {
            let uri = &remote.http_uri;
            let upstream = match &uri.cluster {
                Some(name) => Some(config.upstreams.get(name).ok_or_else(|| {
                    anyhow::anyhow!("http_uri.cluster {name:?} is not an upstream")
                })?),
                None => None,
            };
            let connector = crate::upstream::code_connector(&uri.uri, upstream, base)?;
            let mut fetcher =
                CodeFetcher::with_connector(connector, true).max_bytes(MAX_PLUGIN_FILE_BYTES);
            if let Some(timeout) = uri.timeout()? {
                fetcher = fetcher.timeout(timeout);
            }
            if let Some(dir) = &config.module_store {
                fetcher = fetcher.store(ModuleStore::new(base.join(dir)));
            }
            let sha256 = remote.sha256.as_deref().map(Sha256::parse).transpose()?;
            let source = if uri.uri.starts_with("oci://") {
                let login = match &remote.registry_auth {
                    Some(login) => Some(RegistryAuth::Basic {
                        username: login.username.clone(),
                        password: match &login.password_env {
                            Some(var) => std::env::var(var)
                                .with_context(|| format!("registry_auth.password_env {var}"))?,
                            None => login.password.clone().unwrap_or_default(),
                        },
                    }),
                    None => None,
                };
                fetcher = crate::registry::for_registry(fetcher, &uri.uri, remote.insecure, login);
                PluginSource::Oci {
                    reference: uri.uri.clone(),
                    sha256,
                    pull_policy: match remote.image_pull_policy {
                        Some(ImagePullPolicy::Always) => PullPolicy::Always,
                        _ => PullPolicy::IfNotPresent,
                    },
                }
            } else {
                if sha256.is_none() {
                    tracing::warn!(url = %uri.uri, "remote plugin code without a sha256: whatever the server sends will run");
                }
                PluginSource::Http {
                    url: uri.uri.clone(),
                    sha256,
                }
            };
            Ok(runtime.block_on(fetcher.fetch(&source))?.bytes)
        }
        _ => bail!("vm_config.code needs exactly one of `local` and `remote`"),
    }
}

/// Builds every plugin and starts the chain (each VM started and configured once), so a
/// config that cannot serve is refused here. Errors name the plugin, its file and engine.
/// Code that `previous` (the running generation's modules) has compiled is not compiled again.
pub(super) fn build_generation(
    config: &ServeConfig,
    base: &Path,
    registries: &Registries,
    runtime: &tokio::runtime::Handle,
    worker_threads: usize,
    previous: &Modules,
) -> Result<Generation> {
    let mut upstreams = BTreeMap::new();
    // Plugins' calls reach `https://` upstreams through a TLS connector.
    let (connector, https) = crate::upstream::callout_connector(config.upstreams.values(), base)?;
    let mut callouts = HyperCallouts::with_connector(runtime.clone(), connector, https);
    for (name, entry) in &config.upstreams {
        let pool = Pool::new(name, entry, base, worker_threads)?;
        if let Some(first) = entry.urls().first() {
            callouts = callouts
                .upstream(name.clone(), first)
                .map_err(|e| anyhow::anyhow!("upstream {name:?}: {e}"))?;
        }
        let pool = Arc::new(pool);
        crate::upstream::check_health(name, &pool, runtime);
        upstreams.insert(name.clone(), pool);
    }
    let callouts = Arc::new(callouts);
    // Plugins of the same bytes on the same engine (and start deadline, which their engine
    // is built with) share one compiled module: it is compiled once, and the machine code
    // their exchanges run is one copy in the processor's caches instead of one per plugin.
    let mut compiled = Modules::new();
    let mut load = |entry: &PluginEntry| -> Result<Plugin> {
        let file = entry.describe_code(base);
        let plugin_config = entry
            .plugin_config()
            .with_context(|| format!("plugin {:?}", entry.name))?;
        let (engine, start_deadline_ms) =
            (plugin_config.engine, plugin_config.limits.start_deadline_ms);
        let wasm = entry
            .code()
            .and_then(|code| plugin_code(&code, config, base, runtime))
            .with_context(|| format!("plugin {:?}: reading {file}", entry.name))?;
        let mut builder = Plugin::builder(plugin_config)
            .callouts(callouts.clone())
            .metric_registry(registries.of(&entry.name));
        if let Some(shared_state) = &entry.shared_state {
            let state = registries
                .shared_state(&entry.name, shared_state)
                .with_context(|| format!("plugin {:?}", entry.name))?;
            builder = builder.shared_state(state);
        }
        let key = (engine, start_deadline_ms, Sha256::of(&wasm));
        let plugin = match compiled.get(&key).or_else(|| previous.get(&key)) {
            Some(module) => builder.build_from(module),
            None => builder.build(&wasm),
        }
        .map_err(|e| anyhow::anyhow!("plugin {:?} ({file}) on {engine}: {e}", entry.name))?;
        compiled.entry(key).or_insert_with(|| plugin.clone());
        Ok(plugin)
    };
    let plugins = config
        .plugins
        .iter()
        .map(&mut load)
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
                    entry.describe_code(base)
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut builder = FilterChain::builder();
    if let Some(slots) = config.slots.or(config.workers) {
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
    for (index, route) in config.routes.iter().enumerate() {
        builder = builder.route(route.name_at(index), route.chain_route());
    }
    let chain = builder.build(plugins).map_err(|error| {
        // Name the file and engine of the plugin that would not start.
        let source = match &error {
            filterbox::ChainError::Start(vm) => config
                .plugins
                .iter()
                .find(|p| p.name == vm.plugin())
                .map(|p| format!(" ({})", p.describe_code(base))),
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
        modules: compiled,
    })
}
