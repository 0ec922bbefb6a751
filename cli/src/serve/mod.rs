//! `filterbox serve`: a small reverse proxy on hyper that runs a chain of plugins, with an
//! admin listener and hot reload of its config file.
//!
//! The config names follow Envoy's `PluginConfig` / `VmConfig` (`name`, `root_id`,
//! `configuration`, `failure_policy`, `vm_config.vm_id`, `vm_config.runtime`,
//! `vm_config.code.local.filename`, `vm_config.environment_variables`), so an Envoy user
//! recognises them; filterbox's own settings (`limits`, `reload`, `log_level`, capabilities)
//! sit beside them.

mod admin;
mod config;
mod generation;
mod proxy;
mod reload;
mod workers;

use crate::routes::Router;
use crate::upstream::Pool;
use anyhow::{Context as _, Result};
use filterbox::{FilterLayer, SharedChain};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::net::TcpListener;
use tower_layer::Layer;

use admin::*;
use config::*;
use generation::*;
use proxy::*;
use reload::*;

/// What every connection shares.
struct Shared {
    chain: SharedChain,
    /// The running service plugins (replaced whole on reload).
    services: parking_lot::Mutex<Vec<filterbox::Service>>,
    /// The running generation's compiled modules: a reload compiles only code they lack.
    modules: parking_lot::Mutex<generation::Modules>,
    /// How long a request body may wait for its client.
    body_idle: Duration,
    upstreams: RwLock<Arc<BTreeMap<String, Arc<Pool>>>>,
    /// Replaced with the chain on reload.
    router: RwLock<Arc<Router>>,
    registries: Registries,
    /// Each worker's open connections (for `/stats`); one per worker thread, none with work
    /// stealing.
    worker_connections: Vec<Arc<std::sync::atomic::AtomicUsize>>,
    /// Watches every client connection, to drain them at shutdown; `None` once draining.
    graceful: parking_lot::Mutex<Option<hyper_util::server::graceful::GracefulShutdown>>,
    requests: AtomicU64,
    upstream_errors: AtomicU64,
    request_body_errors: AtomicU64,
    reloads: AtomicU64,
    reloads_refused: AtomicU64,
}

/// Runs the proxy until the process is stopped.
pub fn serve(config_path: &Path) -> Result<()> {
    let config = ServeConfig::load(config_path)?;
    let base = config_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("filterbox-serve")
        .build()
        .context("starting the tokio runtime")?;
    let workers = match config.work_stealing {
        true => workers::Workers::Stealing(runtime.handle().clone()),
        false => workers::Workers::pinned(
            config
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
        )?,
    };
    let workers = Arc::new(workers);
    let worker_connections = workers.open_connections();
    // Each worker thread gets upstream clients of its own.
    let worker_threads = worker_connections.len();
    let accepting_workers = workers.clone();
    let served = runtime.block_on(async move {
        let workers = accepting_workers;
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
                let none = generation::Modules::new();
                build_generation(&config, &base, &registries, &handle, worker_threads, &none)
            })
            .await??
        };
        let shared = Arc::new(Shared {
            chain: SharedChain::new(first.chain),
            services: parking_lot::Mutex::new(first.services),
            modules: parking_lot::Mutex::new(first.modules),
            upstreams: RwLock::new(Arc::new(first.upstreams)),
            router: RwLock::new(Arc::new(first.router)),
            registries,
            worker_connections,
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
            accepting.push(tokio::spawn(accept_loop(
                socket,
                tls,
                service,
                shared.clone(),
                workers.clone(),
            )));
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
    // The workers stop last: their connections are drained or cut off by now.
    drop(workers);
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use filterbox::{EngineKind, FailurePolicy};

    #[test]
    fn each_plugin_has_its_own_registry() {
        let registries = Registries::default();
        assert!(!Arc::ptr_eq(&registries.of("a"), &registries.of("b")));
        assert!(Arc::ptr_eq(&registries.of("a"), &registries.of("a")));
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
    fn code_comes_from_vm_config_or_from_istios_url_not_both() {
        let parse = |yaml: &str| serde_yaml::from_str::<PluginEntry>(yaml).expect("parse");
        let file = parse("{ name: p, url: file://p.wasm, sha256: ab, vm_config: {} }")
            .code()
            .expect("file url");
        let local = file.local.expect("a local file");
        assert_eq!(local.filename, Path::new("p.wasm"));
        assert_eq!(local.sha256.as_deref(), Some("ab"));
        let oci =
            parse("{ name: p, url: oci://r.example/p:v1, imagePullPolicy: Always, vm_config: {} }")
                .code()
                .expect("oci url");
        let remote = oci.remote.expect("remote");
        assert_eq!(remote.http_uri.uri, "oci://r.example/p:v1");
        assert_eq!(
            remote.image_pull_policy,
            Some(config::ImagePullPolicy::Always)
        );
        let both = parse(
            "{ name: p, url: file://p.wasm, vm_config: { code: { local: { filename: p.wasm } } } }",
        );
        assert!(both.code().is_err());
        assert!(parse("{ name: p, vm_config: {} }").code().is_err());
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
}
