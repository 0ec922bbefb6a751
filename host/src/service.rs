//! Service plugins: a plugin that runs on its own, outside any filter chain, as Envoy's
//! bootstrap `WasmService` with `singleton: true`. It gets a root context and nothing else (no
//! HTTP streams) and lives on ticks, queue messages, callout answers and shared data: a queue
//! receiver the filter plugins' VMs enqueue to, a fetcher that keeps shared data fresh.

use crate::worker::{ThreadStart, Worker, recv_until, spawn_workers};
use crate::{Plugin, VmError};
use core::fmt;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a stopping service lets a plugin that asked to finish (`proxy_on_done` answered
/// false) deliver what it waits for before its VM is dropped anyway.
const FINISH_GRACE: Duration = Duration::from_secs(1);

/// A service plugin running on its own thread: one VM, rebuilt after a trap as the plugin's
/// [`ReloadPolicy`](crate::ReloadPolicy) says. Dropping it stops it (see [`Service::stop`]).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use filterbox::{Plugin, PluginConfig, Service};
/// let wasm = std::fs::read("queue-receiver.wasm")?;
/// let plugin = Plugin::load(PluginConfig::named("receiver"), &wasm)?;
/// let service = Service::start(&plugin)?; // ticks, queues and callouts run from here on
/// // ... the filter plugins enqueue to the receiver's queue ...
/// service.stop();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Service {
    plugin: Plugin,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

enum Command {
    /// An event waits for the VM.
    Wake,
    Stop,
}

/// Why a service did not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServiceError {
    /// The plugin's VM did not start (instantiation, `proxy_on_vm_start` or
    /// `proxy_on_configure` failed).
    Start(VmError),
    /// The service thread could not be started.
    Thread(std::io::Error),
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceError::Start(error) => write!(f, "the service did not start: {error}"),
            ServiceError::Thread(error) => write!(f, "starting the service thread: {error}"),
        }
    }
}

// The inner error is part of the message, so it is not also a `source()` (printed twice
// by error reporters that walk the chain).
impl std::error::Error for ServiceError {}

impl Service {
    /// Starts the plugin's VM (start function, `proxy_on_vm_start`, `proxy_on_configure`), an
    /// error if it does not start, and a thread `filterbox-service-<name>` that runs its
    /// ticks, queue messages and callout answers until the service is stopped.
    pub fn start(plugin: &Plugin) -> Result<Service, ServiceError> {
        let (commands, received) = mpsc::channel();
        let wake_sender = commands.clone();
        let wake: crate::Wake = Arc::new(move || {
            let _ = wake_sender.send(Command::Wake);
        });
        let serve = move |workers: Vec<Worker>| {
            for mut worker in workers {
                run(&mut worker, &received);
                finish(&mut worker);
            }
        };
        let name = format!("filterbox-service-{}", plugin.config().name);
        match spawn_workers(name, vec![(plugin.clone(), Vec::new())], wake, serve) {
            Ok(thread) => Ok(Service {
                plugin: plugin.clone(),
                commands,
                thread: Some(thread),
            }),
            Err(ThreadStart::Start(error)) => Err(ServiceError::Start(error)),
            Err(ThreadStart::Thread(error)) => Err(ServiceError::Thread(error)),
        }
    }

    /// The plugin this service runs.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Stops the service once the callback running now returns: the plugin's root context
    /// is shut down (`proxy_on_done`; a plugin that asks to finish first gets up to a second
    /// to deliver what it waits for) and the VM dropped. Blocks until then.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(plugin = %self.plugin.config().name, "the service thread panicked");
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Runs what is due until told to stop: events as they arrive, the tick when it is due, a
/// rebuild when a failed VM's backoff has passed.
fn run(worker: &mut Worker, commands: &mpsc::Receiver<Command>) {
    loop {
        let now = Instant::now();
        let rebuild_at = worker.revive_due();
        match worker.run_due(now) {
            Ok(ran) if ran > 0 => worker.ran_cleanly(),
            Ok(_) => {}
            // The worker logged it and dropped the VM; the next rebuild is scheduled.
            Err(_) => continue,
        }
        let next = [worker.next_tick(), rebuild_at].into_iter().flatten().min();
        match recv_until(commands, next) {
            Ok(Some(Command::Stop)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Shuts the root context down, letting a plugin that asks to finish deliver its events for
/// up to [`FINISH_GRACE`].
fn finish(worker: &mut Worker) {
    let Some(vm) = worker.vm() else {
        return;
    };
    match vm.shutdown_within(FINISH_GRACE) {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            plugin = %vm.plugin().config().name,
            "did not finish within {} ms of proxy_on_done", FINISH_GRACE.as_millis()
        ),
        Err(error) => tracing::warn!(plugin = %vm.plugin().config().name, "shutdown: {error}"),
    }
}
