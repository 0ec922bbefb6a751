//! The config file: Envoy-style plugin entries beside filterbox's own settings, and how they
//! map onto `PluginConfig`.

use crate::routes::RouteEntry;
use crate::tls::ListenerTls;
use crate::upstream::UpstreamEntry;
use anyhow::{Context as _, Result, bail};
use filterbox::{EngineKind, FailurePolicy, Limits, PluginConfig, ReloadPolicy};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Slot threads, each with its own VM per plugin (default: `workers`, else one per core).
    #[serde(default)]
    pub slots: Option<usize>,
    /// Threads serving client connections (default: one per core). Each runs its own
    /// connections from accept to close, their plugin callbacks inline on the slot of the
    /// same thread: keep it equal to `slots` (both default to the cores).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Serve connections on one runtime whose threads steal each other's tasks instead of
    /// one runtime per worker thread (default `false`): a long plugin callback then delays
    /// only its own request, but exchanges often meet their VMs busy on another thread,
    /// which costs throughput. Restart to change it, as `workers`.
    #[serde(default)]
    pub work_stealing: bool,
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
    /// A directory where remote plugin code is kept by its SHA-256 (relative to this file):
    /// a plugin with a pinned `sha256` found there starts without the network.
    #[serde(default)]
    pub module_store: Option<PathBuf>,
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
    /// Where the plugin's shared data and queues live (default: in this process).
    #[serde(default)]
    pub shared_state: Option<SharedStateEntry>,
    /// Istio's `WasmPlugin` spelling of the code's place, instead of `vm_config.code`:
    /// `file://path` (relative to this file, or absolute), `https://…`, or `oci://…`.
    #[serde(default)]
    pub url: Option<String>,
    /// With `url`: the module's SHA-256 (Istio's `sha256`).
    #[serde(default)]
    pub sha256: Option<String>,
    /// With an `oci://` `url`: Istio's `imagePullPolicy`.
    #[serde(default, alias = "imagePullPolicy")]
    pub image_pull_policy: Option<ImagePullPolicy>,
}

/// `shared_state:` of a plugin: `backend: local` (the default) or `backend: redis`, shared by
/// every `serve` process pointing at the same server and key prefix.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum SharedStateEntry {
    /// In this process, shared by the plugins with the same `vm_id`.
    Local,
    /// On a Redis server.
    Redis {
        /// `redis://host:port/db`.
        url: String,
        /// Put before every key (default `filterbox:`).
        #[serde(default)]
        key_prefix: Option<String>,
        /// The longest a hostcall waits for the server, in ms (default 5).
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Keep read values until the server says they changed (default true).
        #[serde(default)]
        local_cache: Option<bool>,
    },
}

impl SharedStateEntry {
    /// The world this entry describes.
    pub(super) fn build(&self) -> Result<filterbox::SharedState> {
        match self {
            SharedStateEntry::Local => Ok(filterbox::SharedState::global()),
            SharedStateEntry::Redis {
                url,
                key_prefix,
                timeout_ms,
                local_cache,
            } => {
                let mut config = filterbox::RedisConfig::new(url);
                if let Some(prefix) = key_prefix {
                    config = config.with_key_prefix(prefix);
                }
                if let Some(ms) = timeout_ms {
                    config = config.with_timeout(std::time::Duration::from_millis(*ms));
                }
                if let Some(on) = local_cache {
                    config = config.with_local_cache(*on);
                }
                filterbox::SharedState::redis(config, filterbox::SharedLimits::default())
                    .map_err(|e| anyhow::anyhow!("shared_state: {e}"))
            }
        }
    }
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
    /// Where the module is (or the plugin's `url`).
    #[serde(default)]
    pub code: Option<CodeEntry>,
    /// What the plugin reads in `proxy_on_vm_start`.
    #[serde(default)]
    pub configuration: String,
    /// Environment the plugin sees through WASI.
    #[serde(default)]
    pub environment_variables: EnvEntry,
}

/// Envoy's `AsyncDataSource`: a local file or a remote URL, exactly one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeEntry {
    /// The file.
    #[serde(default)]
    pub local: Option<LocalFile>,
    /// The URL, with its digest.
    #[serde(default)]
    pub remote: Option<RemoteCode>,
}

/// A local file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    /// Path to the `.wasm` file, relative to the config file.
    pub filename: PathBuf,
    /// Its SHA-256, checked when it is read (filterbox's; optional).
    #[serde(default)]
    pub sha256: Option<String>,
}

/// Envoy's `RemoteDataSource`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCode {
    /// Where to fetch it.
    pub http_uri: HttpUri,
    /// Its SHA-256 (64 hex digits): a module that hashes otherwise is refused. Recommended:
    /// without it any bytes the server sends are run.
    #[serde(default)]
    pub sha256: Option<String>,
    /// For `oci://` URIs (Istio's `imagePullPolicy`): `IfNotPresent` (default: the module
    /// store answers when it holds what this reference gave last time) or `Always`.
    #[serde(default, alias = "imagePullPolicy")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// For `oci://` URIs: speak plain HTTP to the registry (a local one).
    #[serde(default)]
    pub insecure: bool,
    /// For `oci://` URIs: the registry's user name and password.
    #[serde(default)]
    pub registry_auth: Option<RegistryCredentials>,
}

/// Istio's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// From the module store when it has the module.
    IfNotPresent,
    /// From the registry every time.
    Always,
}

/// A registry login.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    /// User name.
    pub username: String,
    /// Password; better `password_env`.
    #[serde(default)]
    pub password: Option<String>,
    /// An environment variable of `serve`'s that holds the password.
    #[serde(default)]
    pub password_env: Option<String>,
}

/// Envoy's `HttpUri`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpUri {
    /// `http://` or `https://` URL of the module, or an OCI reference
    /// `oci://host[:port]/repo[:tag|@sha256:…]`.
    pub uri: String,
    /// An upstream whose `ca_file` the server's certificate is checked against (default:
    /// the system's roots).
    #[serde(default)]
    pub cluster: Option<String>,
    /// How long the fetch may take, as Envoy writes it (`10s`, `1.5s`, `500ms`; default 30s).
    #[serde(default)]
    pub timeout: Option<String>,
}

impl HttpUri {
    pub(super) fn timeout(&self) -> Result<Option<std::time::Duration>> {
        let Some(text) = &self.timeout else {
            return Ok(None);
        };
        let (number, scale) = match text.strip_suffix("ms") {
            Some(ms) => (ms, 0.001),
            None => (text.strip_suffix('s').unwrap_or(text), 1.0),
        };
        let seconds = number
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| anyhow::anyhow!("http_uri.timeout {text:?}: not like 10s or 500ms"))?;
        Ok(Some(std::time::Duration::from_secs_f64(seconds * scale)))
    }
}

impl CodeEntry {
    /// The file or URL, for messages.
    pub(super) fn describe(&self, base: &Path) -> String {
        match (&self.local, &self.remote) {
            (Some(local), _) => base.join(&local.filename).display().to_string(),
            (None, Some(remote)) => remote.http_uri.uri.clone(),
            (None, None) => "no code".to_owned(),
        }
    }
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
    /// Where the module is: `vm_config.code`, or Istio's `url` (exactly one of them).
    pub(super) fn code(&self) -> Result<CodeEntry> {
        match (&self.url, &self.vm_config.code) {
            (None, Some(code)) => Ok(code.clone()),
            (Some(url), None) => Ok(match url.strip_prefix("file://") {
                Some(path) => CodeEntry {
                    local: Some(LocalFile {
                        filename: PathBuf::from(path),
                        sha256: self.sha256.clone(),
                    }),
                    remote: None,
                },
                None => CodeEntry {
                    local: None,
                    remote: Some(RemoteCode {
                        http_uri: HttpUri {
                            uri: url.clone(),
                            cluster: None,
                            timeout: None,
                        },
                        sha256: self.sha256.clone(),
                        image_pull_policy: self.image_pull_policy,
                        insecure: false,
                        registry_auth: None,
                    }),
                },
            }),
            (Some(_), Some(_)) => bail!("give either `url` or `vm_config.code`, not both"),
            (None, None) => bail!("no code: give `vm_config.code` or `url`"),
        }
    }

    /// The module's file or URL, for messages.
    pub(super) fn describe_code(&self, base: &Path) -> String {
        self.code()
            .map(|code| code.describe(base))
            .unwrap_or_else(|e| e.to_string())
    }

    pub(super) fn plugin_config(&self) -> Result<PluginConfig> {
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
