//! Workers: one plugin's VM on one thread, replaced when it fails, with the plugin's failure
//! policy applied to the streams it could not serve.

use crate::vm::{Action, HttpStream, LocalResponse, StreamEvent, Vm, VmError};
use crate::{FailurePolicy, HeaderMap, Plugin, Wake};
use bytes::{Bytes, BytesMut};
use core::fmt;
use filterbox_abi::MapType;
use std::time::{Duration, Instant};

mod stream;
mod threads;

pub use stream::{Failure, WorkerStream};
pub(crate) use threads::{ThreadStart, recv_until, spawn_workers};

/// One plugin's VM on one worker thread, kept alive: a VM that traps is dropped (its memory
/// with it), the streams it held get the plugin's [`FailurePolicy`], and a new VM is built
/// from the compiled module for the next stream, after a jittered exponential backoff, until
/// the crash-loop limit of the plugin's [`ReloadPolicy`](crate::ReloadPolicy).
///
/// `Send`, not `Sync`: a proxy keeps one per plugin per worker thread (one on a
/// [thread-bound](filterbox_engines::EngineKind::thread_bound) engine stays on its thread).
pub struct Worker {
    plugin: Plugin,
    vm: Option<Vm>,
    /// The configurations of the root contexts every VM gets beside the plugin's own.
    configurations: Vec<Bytes>,
    /// The current VM's root contexts for `configurations`, in their order.
    roots: Vec<u32>,
    /// Bumped each time the VM is dropped, so streams of an old VM are recognised.
    generation: u64,
    /// Failures since a VM last finished a stream.
    consecutive_failures: u32,
    /// When the next rebuild may run; `None` without a VM means no more rebuilds.
    retry_at: Option<Instant>,
    last_error: Option<VmError>,
    crash_looped: bool,
    /// Given to every VM this worker builds, so events still reach a rebuilt VM.
    wake: Option<Wake>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("plugin", &self.plugin.config().name)
            .field("healthy", &self.vm.is_some())
            .field("consecutive_failures", &self.consecutive_failures)
            .field("crash_looped", &self.crash_looped)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts the first VM. A plugin that cannot start even once is an error here, so a bad
    /// plugin or config is refused before it takes traffic.
    pub fn new(plugin: &Plugin) -> Result<Worker, VmError> {
        Worker::with_root_contexts(plugin, Vec::new())
    }

    /// A worker whose VMs hold one more root context per configuration (see
    /// [`Vm::add_root_context`]), made again in each rebuilt VM; a configuration the plugin
    /// rejects is an error here. [`Worker::create_stream_under`] picks the root.
    pub fn with_root_contexts(
        plugin: &Plugin,
        configurations: Vec<Bytes>,
    ) -> Result<Worker, VmError> {
        let (vm, roots) = start_vm(plugin, &configurations)?;
        Ok(Worker {
            plugin: plugin.clone(),
            vm: Some(vm),
            configurations,
            roots,
            generation: 0,
            consecutive_failures: 0,
            retry_at: None,
            last_error: None,
            crash_looped: false,
            wake: None,
        })
    }

    /// The plugin.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// The live VM, if there is one now.
    pub fn vm(&mut self) -> Option<&mut Vm> {
        self.vm.as_mut()
    }

    /// Calls `wake` whenever an event arrives for the worker's VM (see [`Vm::set_wake`]),
    /// for this VM and every VM the worker builds after it; then call [`Worker::run_due`].
    pub fn set_wake(&mut self, wake: Option<Wake>) {
        if let Some(vm) = self.vm.as_mut() {
            vm.set_wake(wake.clone());
        }
        self.wake = wake;
    }

    /// Whether the worker gave up rebuilding after the crash-loop limit.
    pub fn is_crash_looping(&self) -> bool {
        self.crash_looped
    }

    /// The error that last failed a VM (or a rebuild).
    pub fn last_error(&self) -> Option<&VmError> {
        self.last_error.as_ref()
    }

    /// Forgets the crash loop and backoff and tries to build a VM now (for an operator who
    /// fixed what the plugin depends on). Returns whether a VM is running.
    pub fn retry_now(&mut self) -> bool {
        if self.crash_looped {
            self.crash_looped = false;
            self.plugin.metrics().crash_loop(false);
        }
        self.consecutive_failures = 0;
        self.retry_at = Some(Instant::now());
        self.revive();
        self.vm.is_some()
    }

    /// Creates a stream on the current VM, rebuilding a failed VM first if its backoff has
    /// passed. When there is no VM, the stream is born failed and every call on it returns
    /// the policy's [`Failure`].
    pub fn create_stream(&mut self) -> WorkerStream {
        self.create_stream_under(0)
    }

    /// [`Worker::create_stream`] under root context `root`: 0 is the plugin's own, `n` the
    /// one for the `n`-th configuration given to [`Worker::with_root_contexts`].
    pub fn create_stream_under(&mut self, root: usize) -> WorkerStream {
        self.revive();
        let generation = self.generation;
        let created = match (self.vm.as_mut(), root.checked_sub(1)) {
            (Some(vm), None) => vm.create_http_stream(),
            (Some(vm), Some(extra)) => match self.roots.get(extra) {
                Some(&id) => vm.create_http_stream_under(id),
                None => Err(VmError::UnknownRoot {
                    plugin: self.plugin.config().name.clone(),
                    root: u32::try_from(root).unwrap_or(u32::MAX),
                }),
            },
            (None, _) => Err(self.gone()),
        };
        match created {
            Ok(stream) => WorkerStream {
                generation,
                stream: Some(stream),
                failure: None,
            },
            Err(error) => WorkerStream {
                generation,
                stream: None,
                failure: Some(self.fail(error)),
            },
        }
    }

    /// Request headers arrived: see [`Vm::on_request_headers`].
    pub fn on_request_headers(
        &mut self,
        stream: &mut WorkerStream,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, Failure> {
        self.drive(stream, |vm, s| {
            vm.on_request_headers(s, headers, end_of_stream)
        })
    }

    /// [`Vm::set_request_headers_seen`] on the stream's VM, if it still has one.
    #[cfg(feature = "tower")]
    pub(crate) fn set_request_headers_seen(
        &mut self,
        stream: &WorkerStream,
        headers: Option<HeaderMap>,
    ) {
        if stream.failure.is_some() {
            return;
        }
        if let (Some(s), Some(vm)) = (&stream.stream, self.live_vm(stream.generation)) {
            vm.set_request_headers_seen(s, headers);
        }
    }

    /// Request body data arrived: see [`Vm::on_request_body`].
    pub fn on_request_body(
        &mut self,
        stream: &mut WorkerStream,
        body: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, Failure> {
        self.drive(stream, |vm, s| vm.on_request_body(s, body, end_of_stream))
    }

    /// Request trailers arrived: see [`Vm::on_request_trailers`].
    pub fn on_request_trailers(
        &mut self,
        stream: &mut WorkerStream,
        trailers: &mut HeaderMap,
    ) -> Result<Action, Failure> {
        self.drive(stream, |vm, s| vm.on_request_trailers(s, trailers))
    }

    /// Response headers arrived: see [`Vm::on_response_headers`].
    pub fn on_response_headers(
        &mut self,
        stream: &mut WorkerStream,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<Action, Failure> {
        self.drive(stream, |vm, s| {
            vm.on_response_headers(s, headers, end_of_stream)
        })
    }

    /// Response body data arrived: see [`Vm::on_response_body`].
    pub fn on_response_body(
        &mut self,
        stream: &mut WorkerStream,
        body: &mut BytesMut,
        end_of_stream: bool,
    ) -> Result<Action, Failure> {
        self.drive(stream, |vm, s| vm.on_response_body(s, body, end_of_stream))
    }

    /// Response trailers arrived: see [`Vm::on_response_trailers`].
    pub fn on_response_trailers(
        &mut self,
        stream: &mut WorkerStream,
        trailers: &mut HeaderMap,
    ) -> Result<Action, Failure> {
        self.drive(stream, |vm, s| vm.on_response_trailers(s, trailers))
    }

    /// The exchange is complete: see [`Vm::on_log`].
    pub fn on_log(
        &mut self,
        stream: &mut WorkerStream,
        request_headers: &mut HeaderMap,
        response_headers: &mut HeaderMap,
    ) -> Result<(), Failure> {
        self.drive(stream, |vm, s| {
            vm.on_log(s, request_headers, response_headers)
        })
    }

    /// Takes what the plugin asked of the stream (resume, close) since the last call.
    pub fn take_stream_events(&mut self, stream: &WorkerStream) -> Vec<StreamEvent> {
        match (&stream.stream, self.live_vm(stream.generation)) {
            (Some(s), Some(vm)) => vm.take_stream_events(s),
            _ => Vec::new(),
        }
    }

    /// Whether a paused stream has news for its exchange: the plugin asked something of it
    /// (see [`Worker::take_stream_events`]) or its VM is gone (see [`Worker::stream_failure`]).
    pub fn has_news(&mut self, stream: &WorkerStream) -> bool {
        if stream.failure.is_some() {
            return true;
        }
        match (&stream.stream, self.live_vm(stream.generation)) {
            (Some(s), Some(vm)) => vm.has_stream_events(s),
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The failure of `stream`: the one it met, or, if its VM failed under another stream
    /// since, the plugin's policy for that (recorded, so every later call gets the same).
    pub fn stream_failure<'s>(&mut self, stream: &'s mut WorkerStream) -> Option<&'s Failure> {
        if stream.failure.is_none()
            && stream.stream.is_some()
            && self.live_vm(stream.generation).is_none()
        {
            let error = self.gone();
            stream.failure = Some(self.fail(error));
        }
        stream.failure.as_ref()
    }

    /// Sets a property of `stream` for the plugin to read: see [`Vm::set_stream_property`].
    /// Nothing happens on a stream whose VM is gone.
    pub fn set_stream_property(&mut self, stream: &WorkerStream, path: &[&str], value: Bytes) {
        if let (Some(s), Some(vm)) = (&stream.stream, self.live_vm(stream.generation)) {
            vm.set_stream_property(s, path, value);
        }
    }

    /// The upstream of `stream`'s request: see [`Vm::set_stream_upstream`]. Nothing
    /// happens on a stream whose VM is gone.
    pub fn set_stream_upstream(&mut self, stream: &WorkerStream, address: std::net::SocketAddr) {
        if let (Some(s), Some(vm)) = (&stream.stream, self.live_vm(stream.generation)) {
            vm.set_stream_upstream(s, address);
        }
    }

    /// The client connection of `stream`'s request: see [`Vm::set_stream_connection`].
    /// Nothing happens on a stream whose VM is gone.
    pub fn set_stream_connection(
        &mut self,
        stream: &WorkerStream,
        connection: std::sync::Arc<crate::ConnectionInfo>,
    ) {
        if let (Some(s), Some(vm)) = (&stream.stream, self.live_vm(stream.generation)) {
            vm.set_stream_connection(s, connection);
        }
    }

    /// Trailers the plugin added in its last body callback: see [`Vm::take_added_trailers`].
    pub fn take_added_trailers(
        &mut self,
        stream: &WorkerStream,
        map: MapType,
    ) -> Option<HeaderMap> {
        match (&stream.stream, self.live_vm(stream.generation)) {
            (Some(s), Some(vm)) => vm.take_added_trailers(s, map),
            _ => None,
        }
    }

    /// The headers of a stream that paused in a header callback, as the plugin left them:
    /// see [`Vm::take_paused_headers`].
    pub fn take_paused_headers(
        &mut self,
        stream: &WorkerStream,
        map: MapType,
    ) -> Option<HeaderMap> {
        match (&stream.stream, self.live_vm(stream.generation)) {
            (Some(s), Some(vm)) => vm.take_paused_headers(s, map),
            _ => None,
        }
    }

    /// Ends a stream (`proxy_on_done`, `proxy_on_delete`). A stream that already failed has
    /// nothing left to run and ends with `Ok`. A stream that ends cleanly proves the VM
    /// healthy and resets the crash-loop count.
    pub fn finish_stream(&mut self, mut stream: WorkerStream) -> Result<(), Failure> {
        if stream.failure.is_some() {
            return Ok(());
        }
        let (Some(s), Some(vm)) = (stream.stream.take(), self.live_vm(stream.generation)) else {
            return Ok(());
        };
        match vm.finish_stream(s) {
            Ok(()) => {
                self.consecutive_failures = 0;
                Ok(())
            }
            Err(error) => Err(self.fail(error)),
        }
    }

    /// The VM, if it is the one streams of `generation` were created on (a stream of a
    /// dropped VM must never reach its successor).
    /// Runs what is due on the worker's VM ([`Vm::run_due`]): callout answers, queue
    /// wake-ups, the tick. A trap retires the VM as in a stream callback and is returned.
    pub fn run_due(&mut self, now: Instant) -> Result<usize, VmError> {
        let Some(vm) = self.vm.as_mut() else {
            return Ok(0);
        };
        vm.run_due(now).inspect_err(|error| self.retire(error))
    }

    /// When the worker's VM next wants [`Worker::run_due`] for its tick.
    pub fn next_tick(&self) -> Option<Instant> {
        self.vm.as_ref().and_then(Vm::next_tick)
    }

    fn live_vm(&mut self, generation: u64) -> Option<&mut Vm> {
        match self.generation == generation {
            true => self.vm.as_mut(),
            false => None,
        }
    }

    /// Runs one callback of a live stream, turning errors into the policy's [`Failure`].
    fn drive<R>(
        &mut self,
        stream: &mut WorkerStream,
        call: impl FnOnce(&mut Vm, &HttpStream) -> Result<R, VmError>,
    ) -> Result<R, Failure> {
        if let Some(failure) = &stream.failure {
            return Err(failure.clone());
        }
        let result = match (&stream.stream, self.live_vm(stream.generation)) {
            (Some(s), Some(vm)) => call(vm, s),
            // Its VM failed under another stream and is gone.
            _ => Err(self.gone()),
        };
        result.map_err(|error| {
            let failure = self.fail(error);
            stream.failure = Some(failure.clone());
            failure
        })
    }

    /// The error for a stream whose VM is gone.
    fn gone(&self) -> VmError {
        let plugin = self.plugin.config().name.clone();
        match &self.last_error {
            Some(VmError::Trap { trap, .. } | VmError::Failed { trap, .. }) => VmError::Failed {
                plugin,
                trap: trap.clone(),
            },
            Some(other) => other.clone(),
            None => VmError::ForeignStream { plugin },
        }
    }

    /// Retires the VM if `error` failed it.
    fn retire(&mut self, error: &VmError) {
        let vm_failed = match &self.vm {
            Some(vm) => vm.failure().is_some(),
            None => false,
        };
        if vm_failed {
            self.vm = None;
            self.generation += 1;
            self.last_error = Some(error.clone());
            self.consecutive_failures += 1;
            tracing::warn!(plugin = %self.plugin.config().name, "{error}; VM dropped");
            self.schedule_rebuild();
        }
    }

    /// Applies the policy to `error`, and retires the VM if the error failed it.
    fn fail(&mut self, error: VmError) -> Failure {
        self.retire(&error);
        let action = match self.plugin.config().failure_policy {
            FailurePolicy::FailClosed { status } => {
                Action::Respond(LocalResponse::new(status, "filterbox_plugin_failed"))
            }
            FailurePolicy::FailOpen => Action::Continue,
        };
        self.plugin
            .metrics()
            .stream_failed(matches!(action, Action::Respond(_)));
        Failure::new(error, action)
    }

    /// Decides when the next rebuild may run, or that there will be none.
    fn schedule_rebuild(&mut self) {
        let reload = &self.plugin.config().reload;
        if !reload.enabled {
            self.retry_at = None;
            return;
        }
        if self.consecutive_failures >= reload.crash_loop_limit {
            self.retry_at = None;
            if !self.crash_looped {
                self.crash_looped = true;
                self.plugin.metrics().crash_loop(true);
                tracing::error!(
                    plugin = %self.plugin.config().name,
                    failures = self.consecutive_failures,
                    "plugin is crash-looping; no more rebuilds until retry_now or a reload"
                );
            }
            return;
        }
        let delay = backoff(
            self.consecutive_failures,
            Duration::from_millis(reload.backoff_initial_ms),
            Duration::from_millis(reload.backoff_max_ms),
        );
        self.retry_at = Some(Instant::now() + delay);
    }

    /// For a worker that serves no streams (a service): rebuilds the VM if its backoff has
    /// passed, and tells when the next rebuild is due if there is still no VM.
    pub(crate) fn revive_due(&mut self) -> Option<Instant> {
        self.revive();
        match self.vm {
            Some(_) => None,
            None => self.retry_at,
        }
    }

    /// A callback ran to its end: the VM is healthy, and the crash-loop count starts over.
    pub(crate) fn ran_cleanly(&mut self) {
        self.consecutive_failures = 0;
    }

    /// Builds a new VM if there is none and its backoff has passed.
    fn revive(&mut self) {
        if self.vm.is_some() {
            return;
        }
        let Some(at) = self.retry_at else { return };
        if Instant::now() < at {
            return;
        }
        match start_vm(&self.plugin, &self.configurations) {
            Ok((mut vm, roots)) => {
                vm.set_wake(self.wake.clone());
                self.roots = roots;
                self.plugin.metrics().vm_restarted();
                tracing::info!(plugin = %self.plugin.config().name, "VM rebuilt");
                self.vm = Some(vm);
                self.retry_at = None;
            }
            Err(error) => {
                tracing::warn!(plugin = %self.plugin.config().name, "rebuild failed: {error}");
                self.last_error = Some(error);
                self.consecutive_failures += 1;
                self.schedule_rebuild();
            }
        }
    }
}

/// A started VM of `plugin` with a root context per configuration, and their ids.
fn start_vm(plugin: &Plugin, configurations: &[Bytes]) -> Result<(Vm, Vec<u32>), VmError> {
    let mut vm = Vm::new(plugin)?;
    let roots = configurations
        .iter()
        .map(|configuration| vm.add_root_context(configuration.clone()))
        .collect::<Result<_, _>>()?;
    Ok((vm, roots))
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.crash_looped {
            self.plugin.metrics().crash_loop(false);
        }
    }
}

/// The wait before rebuilding after the `failures`-th consecutive failure: none after the
/// first, then `initial` doubling up to `max`, each cut by a random amount of up to half so
/// that many workers do not rebuild in step.
fn backoff(failures: u32, initial: Duration, max: Duration) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    // A day is the longest wait however the config is set, so the deadline never overflows.
    let max = max.min(Duration::from_secs(86_400));
    let doublings = (failures - 2).min(30);
    let full = initial.saturating_mul(1 << doublings).min(max);
    let mut random = [0u8; 2];
    let jitter = match getrandom::fill(&mut random) {
        Ok(()) => f64::from(u16::from_le_bytes(random)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    };
    full.mul_f64(1.0 - jitter / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_doubles_with_jitter_up_to_the_cap() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(1, initial, max), Duration::ZERO);
        for (failures, full) in [
            (2, 100),
            (3, 200),
            (4, 400),
            (5, 800),
            (6, 1000),
            (40, 1000),
        ] {
            let d = backoff(failures, initial, max);
            let full = Duration::from_millis(full);
            assert!(d <= full && d >= full / 2, "{failures}: {d:?} vs {full:?}");
        }
    }
}
