//! Hot reload: on SIGHUP or a change of the config file, a new generation replaces the old one
//! if it builds; a bad config leaves the old one serving.

use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

/// Reloads on SIGHUP and when the config file changes (checked every second); returns on
/// SIGTERM or SIGINT.
pub(super) async fn watch(
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
pub(super) async fn reload(
    path: &Path,
    old: &ServeConfig,
    base: &Path,
    shared: &Arc<Shared>,
) -> Result<ServeConfig> {
    let new = ServeConfig::load(path)?;
    if new.listeners != old.listeners
        || new.admin != old.admin
        || new.workers != old.workers
        || new.work_stealing != old.work_stealing
    {
        tracing::warn!("listener, admin and worker changes take effect on restart only");
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
        let threads = shared.worker_connections.len();
        let previous = shared.modules.lock().clone();
        tokio::task::spawn_blocking(move || {
            build_generation(&config, &base, &registries, &handle, threads, &previous)
        })
        .await??
    };
    *shared.modules.lock() = generation.modules;
    *shared.upstreams.write() = Arc::new(generation.upstreams);
    *shared.router.write() = Arc::new(generation.router);
    shared.chain.replace(generation.chain);
    let old = std::mem::replace(&mut *shared.services.lock(), generation.services);
    // Stopping waits for each service's running callback: not on the runtime's threads.
    tokio::task::spawn_blocking(move || drop(old));
    Ok(new)
}
