//! A VM's root contexts, timers, asynchronous events (callout answers, queue messages) and
//! shutdown.

use super::*;

impl Vm {
    /// Adds a root context whose plugin configuration is `configuration`: one plugin, one VM,
    /// several configurations (per-route configuration without a VM per route; proxy-wasm
    /// lets a VM hold several root contexts). Runs `proxy_on_context_create(id, 0)`,
    /// `proxy_on_vm_start` and `proxy_on_configure` on it, as for the first root; a false from
    /// either, or a trap, is an error and the root is gone. Streams made with
    /// [`Vm::create_http_stream_under`] run under it and read its configuration; its timer
    /// (`proxy_set_tick_period_milliseconds`) and the callouts, queues and properties of its
    /// streams are its own.
    pub fn add_root_context(&mut self, configuration: Bytes) -> Result<u32, VmError> {
        let root = self.create_context(ContextKind::Root, 0)?;
        let vm_config = wasm_i32(self.plugin.config().vm_configuration.len());
        let started = self.expect_true(Callback::ProxyOnVmStart, root, &[root as i32, vm_config]);
        let configured = started.and_then(|()| {
            let len = wasm_i32(configuration.len());
            let state = self.state();
            state.configuring = Some(configuration);
            state.phase = Phase::Configure;
            let configured =
                self.expect_true(Callback::ProxyOnConfigure, root, &[root as i32, len]);
            let state = self.state();
            state.configuring = None;
            state.phase = Phase::Other;
            configured
        });
        match configured {
            Ok(()) => {
                self.extra_roots.push(root);
                Ok(root)
            }
            Err(error) => {
                self.forget_context(root);
                Err(error)
            }
        }
    }

    /// The root contexts added with [`Vm::add_root_context`], in order.
    pub fn extra_root_contexts(&self) -> &[u32] {
        &self.extra_roots
    }

    // --- timers and asynchronous events ---

    /// The tick period the plugin set (`proxy_set_tick_period_milliseconds`), if any.
    pub fn tick_period(&self) -> Option<Duration> {
        let state = self.instance.host();
        state
            .ticks
            .get(&self.root_context)
            .map(|(period, _)| *period)
    }

    /// When the next `proxy_on_tick` is due (of any root context), if the plugin set a period.
    pub fn next_tick(&self) -> Option<Instant> {
        self.instance
            .host()
            .ticks
            .values()
            .map(|(_, next)| *next)
            .min()
    }

    /// Calls `proxy_on_tick` on the root context now and schedules the next tick one period
    /// from now. For an embedder that drives the timer by hand.
    ///
    /// The next tick also waits long enough to hold the plugin's ticks to
    /// [`Limits::max_tick_cpu_percent`](crate::Limits) of a core.
    pub fn on_tick(&mut self) -> Result<(), VmError> {
        self.tick_root(self.root_context)
    }

    /// `proxy_on_tick` on `root` now; its next tick one period (or the CPU budget) later.
    fn tick_root(&mut self, root: u32) -> Result<(), VmError> {
        let started = Instant::now();
        if let Some((period, next)) = self.state().ticks.get_mut(&root) {
            *next = started + *period;
        }
        let called = self.call(root, Callback::ProxyOnTick, &[root as i32]);
        let percent = u64::from(
            self.plugin
                .config()
                .limits
                .max_tick_cpu_percent
                .clamp(1, 100),
        );
        let ran = started.elapsed();
        // Busy for `ran`, then idle for ran × (100 − p) / p: the ticks use p% of a core.
        let idle = ran.saturating_mul(u32::try_from(100 - percent).unwrap_or(0))
            / u32::try_from(percent).unwrap_or(1);
        if let Some((_, next)) = self.state().ticks.get_mut(&root) {
            let earliest = started + ran + idle;
            if earliest > *next {
                *next = earliest;
                self.plugin.metrics().tick_postponed();
            }
        }
        called.map(drop)
    }

    /// Whether events wait for [`Vm::dispatch_pending`].
    pub fn has_pending(&self) -> bool {
        !self.instance.host().inbox.is_empty()
    }

    /// Calls `wake` (on the producing thread) whenever an event arrives for this VM: a queue
    /// it registered got a message, or a callout answered. The embedder then has its thread
    /// call [`Vm::dispatch_pending`].
    pub fn set_wake(&mut self, wake: Option<Wake>) {
        self.state().inbox.set_wake(wake);
    }

    /// Delivers what waits for this VM, in arrival order: `proxy_on_queue_ready` for queue
    /// messages, `proxy_on_http_call_response` for HTTP calls, the `proxy_on_grpc_*` callbacks
    /// for gRPC calls and streams. Answers to calls the plugin cancelled, and events for
    /// contexts that are gone, are dropped. Returns how many callbacks ran.
    pub fn dispatch_pending(&mut self) -> Result<usize, VmError> {
        let events = self.state().inbox.take();
        let mut ran = 0;
        for event in events {
            if self.deliver(event)? {
                ran += 1;
            }
        }
        Ok(ran)
    }

    /// Runs what is due at `now`: pending events, then the tick if its time has come.
    pub fn run_due(&mut self, now: Instant) -> Result<usize, VmError> {
        let mut ran = self.dispatch_pending()?;
        let due: Vec<u32> = match self.next_tick() {
            Some(next) if next <= now => {
                let mut due: Vec<u32> = (self.state().ticks.iter())
                    .filter(|(_, (_, next))| *next <= now)
                    .map(|(root, _)| *root)
                    .collect();
                due.sort_unstable();
                due
            }
            _ => Vec::new(),
        };
        for root in due {
            self.tick_root(root)?;
            ran += 1;
        }
        Ok(ran)
    }

    /// Blocks the thread until an event waits, the next tick is due, or `timeout` passes;
    /// then runs what is due ([`Vm::run_due`]).
    pub fn wait_and_run(&mut self, timeout: Duration) -> Result<usize, VmError> {
        let mut until = Instant::now() + timeout;
        if let Some(tick) = self.next_tick() {
            until = until.min(tick);
        }
        let inbox = self.state().inbox.clone();
        inbox.wait(until);
        self.run_due(Instant::now())
    }

    /// Waits (on tokio) until an event waits or the next tick is due, then runs what is due.
    /// A worker task loops on it beside its streams; it never returns `Ok(0)` forever: with
    /// nothing scheduled it waits for an event.
    #[cfg(feature = "tokio")]
    pub async fn wait_and_run_async(&mut self) -> Result<usize, VmError> {
        let inbox = self.state().inbox.clone();
        inbox.wait_async(self.next_tick()).await;
        self.run_due(Instant::now())
    }

    /// Asks the plugin to shut its root context down (`proxy_on_done`). `Ok(true)`: it is
    /// gone (`proxy_on_delete` ran). `Ok(false)`: the plugin asked to finish first and will
    /// call `proxy_done` from a later callback; [`Vm::is_done`] tells when.
    ///
    /// Root contexts added with [`Vm::add_root_context`] go first: `proxy_on_done` then
    /// `proxy_on_delete` each, without waiting for a `proxy_done` (only the first root
    /// context's shutdown may be finished later).
    pub fn shutdown(&mut self) -> Result<bool, VmError> {
        if self.done {
            return Ok(true);
        }
        for root in std::mem::take(&mut self.extra_roots) {
            let done = self.call(root, Callback::ProxyOnDone, &[root as i32]);
            let deleted = self.call(root, Callback::ProxyOnDelete, &[root as i32]);
            self.forget_context(root);
            done.and(deleted)?;
        }
        let root = self.root_context;
        match self.call(root, Callback::ProxyOnDone, &[root as i32])? {
            Returned::Value(0) if !self.done => {
                self.state().done_pending = true;
                Ok(false)
            }
            _ => {
                if !self.done {
                    self.delete_root()?;
                }
                Ok(true)
            }
        }
    }

    /// Asks the plugin whether `configuration` would be acceptable
    /// (`proxy_validate_configuration`), without applying it: during the call the plugin
    /// configuration buffer reads `configuration`. A plugin without the export accepts
    /// everything, as in the reference host.
    pub fn validate_configuration(&mut self, configuration: &[u8]) -> Result<bool, VmError> {
        let root = self.root_context;
        let state = self.state();
        state.configuring = Some(Bytes::copy_from_slice(configuration));
        state.phase = Phase::Configure;
        let args = [root as i32, wasm_i32(configuration.len())];
        let result = self.call(root, Callback::ProxyValidateConfiguration, &args);
        let state = self.state();
        state.configuring = None;
        state.phase = Phase::Other;
        Ok(!matches!(result?, Returned::Value(0)))
    }

    /// [`Vm::shutdown`], and for a plugin that asks to finish first, its events delivered
    /// until it calls `proxy_done` or `grace` passes. Returns whether the root context is gone.
    pub fn shutdown_within(&mut self, grace: Duration) -> Result<bool, VmError> {
        if self.shutdown()? {
            return Ok(true);
        }
        let until = Instant::now() + grace;
        while !self.done && Instant::now() < until {
            self.wait_and_run(until.saturating_duration_since(Instant::now()))?;
        }
        Ok(self.done)
    }

    /// Whether the root context has been shut down.
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub(super) fn delete_root(&mut self) -> Result<(), VmError> {
        self.done = true;
        self.state().done_pending = false;
        let root = self.root_context;
        let result = self.call(root, Callback::ProxyOnDelete, &[root as i32]);
        self.forget_context(root);
        result.map(drop)
    }

    /// Calls `proxy_on_foreign_function(root, function_id, size)` with `args` readable as the
    /// call-data buffer: how an embedder's extension calls back into a plugin.
    pub fn on_foreign_function(&mut self, function_id: u32, args: &[u8]) -> Result<(), VmError> {
        let root = self.root_context;
        let mut data = BytesMut::from(args);
        let call_args = [root as i32, function_id as i32, wasm_i32(args.len())];
        self.with_body(BufferType::CallData, &mut data, |vm| {
            vm.call(root, Callback::ProxyOnForeignFunction, &call_args)
        })
        .map(drop)
    }

    /// Delivers one event; false if it was dropped. A local response the plugin sent from
    /// it becomes a [`StreamEvent::Respond`] of its stream.
    fn deliver(&mut self, event: Pending) -> Result<bool, VmError> {
        self.state().local_response = None;
        let before = self.state().events.len();
        let delivered = self.deliver_event(event);
        let state = self.state();
        if let Some((context, response)) = state.local_response.take() {
            // The local response wins over a resume of the same stream in the same callback
            // (`send_http_response` then `resume_http_request`), as in Envoy.
            let mut added = state.events.split_off(before.min(state.events.len()));
            added.retain(|(c, e)| !(*c == context && matches!(e, StreamEvent::Continue(_))));
            state.events.extend(added);
            state.events.push((context, StreamEvent::Respond(response)));
        }
        delivered
    }

    fn deliver_event(&mut self, event: Pending) -> Result<bool, VmError> {
        match event {
            Pending::QueueReady { root, token } => {
                if !self.state().contexts.contains_key(&root) {
                    return Ok(false);
                }
                let args = [root as i32, token as i32];
                self.call(root, Callback::ProxyOnQueueReady, &args)?;
            }
            // The claim is given back once the callback has run.
            Pending::HttpResponse {
                token,
                outcome,
                claim: _claim,
            } => {
                let Some(root) = self.state().http_calls.remove(&token) else {
                    return Ok(false);
                };
                self.deliver_http(root, token, outcome)?;
            }
            Pending::Grpc {
                token,
                event,
                claim: _claim,
            } => return self.deliver_grpc(token, event),
        }
        Ok(true)
    }

    fn deliver_http(
        &mut self,
        root: u32,
        token: u32,
        outcome: HttpCallOutcome,
    ) -> Result<(), VmError> {
        let limits = &self.plugin.config().limits;
        let fits = |m: &HeaderMap| m.len() <= limits.max_header_count;
        let outcome = match outcome {
            HttpCallOutcome::Response(r)
                if r.body.len() > limits.max_body_bytes
                    || !fits(&r.headers)
                    || !fits(&r.trailers) =>
            {
                HttpCallOutcome::Failed("response too large".into())
            }
            other => other,
        };
        match outcome {
            HttpCallOutcome::Response(response) => {
                let args = [
                    root as i32,
                    token as i32,
                    wasm_i32(response.headers.len()),
                    wasm_i32(response.body.len()),
                    wasm_i32(response.trailers.len()),
                ];
                let state = self.state();
                state.maps[MapType::HttpCallResponseHeaders as usize] = Some(response.headers);
                state.maps[MapType::HttpCallResponseTrailers as usize] = Some(response.trailers);
                state.body = Some((
                    BufferType::HttpCallResponseBody,
                    BytesMut::from(&response.body[..]),
                ));
                let result = self.call(root, Callback::ProxyOnHttpCallResponse, &args);
                let state = self.state();
                state.maps[MapType::HttpCallResponseHeaders as usize] = None;
                state.maps[MapType::HttpCallResponseTrailers as usize] = None;
                state.body = None;
                result.map(drop)
            }
            HttpCallOutcome::Failed(message) => {
                // Envoy's failure: no headers, and proxy_get_status says why.
                let status = (Status::BrokenConnection.as_u32(), Bytes::from(message));
                self.with_status(status, |vm| {
                    let args = [root as i32, token as i32, 0, 0, 0];
                    vm.call(root, Callback::ProxyOnHttpCallResponse, &args)
                })
            }
        }
    }

    fn with_status(
        &mut self,
        status: (u32, Bytes),
        f: impl FnOnce(&mut Self) -> Result<Returned, VmError>,
    ) -> Result<(), VmError> {
        self.state().status = status;
        let result = f(self);
        self.state().status = (0, Bytes::new());
        result.map(drop)
    }

    fn metadata_call(
        &mut self,
        root: u32,
        (map, callback): (MapType, Callback),
        metadata: &mut HeaderMap,
        args: &[i32],
    ) -> Result<Returned, VmError> {
        self.with_map(map, metadata, |vm| vm.call(root, callback, args))
    }

    fn deliver_grpc(&mut self, token: u32, event: GrpcEvent) -> Result<bool, VmError> {
        let Some(open) = self.state().grpc.get_mut(&token) else {
            return Ok(false);
        };
        let (root, unary) = (open.root, open.unary);
        let t = token as i32;
        match event {
            // A unary call hears one callback: the message on success, the close otherwise
            // (as Envoy's async request client).
            GrpcEvent::InitialMetadata(_) | GrpcEvent::TrailingMetadata(_) if unary => {
                return Ok(false);
            }
            GrpcEvent::Message(message) if unary => {
                open.message = Some(message);
                return Ok(false);
            }
            GrpcEvent::InitialMetadata(mut map) => {
                let args = [root as i32, t, wasm_i32(map.len())];
                let phase = (
                    MapType::GrpcReceiveInitialMetadata,
                    Callback::ProxyOnGrpcReceiveInitialMetadata,
                );
                self.metadata_call(root, phase, &mut map, &args)?;
            }
            GrpcEvent::TrailingMetadata(mut map) => {
                let args = [root as i32, t, wasm_i32(map.len())];
                let phase = (
                    MapType::GrpcReceiveTrailingMetadata,
                    Callback::ProxyOnGrpcReceiveTrailingMetadata,
                );
                self.metadata_call(root, phase, &mut map, &args)?;
            }
            GrpcEvent::Message(message) => {
                let args = [root as i32, t, wasm_i32(message.len())];
                let mut body = BytesMut::from(&message[..]);
                self.with_body(BufferType::GrpcReceiveBuffer, &mut body, |vm| {
                    vm.call(root, Callback::ProxyOnGrpcReceive, &args)
                })?;
            }
            GrpcEvent::Close { status, message } => {
                let open = self.state().grpc.remove(&token);
                match open.and_then(|o| o.message) {
                    Some(response) if unary && status == 0 => {
                        let args = [root as i32, t, wasm_i32(response.len())];
                        let mut body = BytesMut::from(&response[..]);
                        self.with_body(BufferType::GrpcReceiveBuffer, &mut body, |vm| {
                            vm.call(root, Callback::ProxyOnGrpcReceive, &args)
                        })?;
                    }
                    _ => {
                        let status_pair = (status, Bytes::from(message));
                        self.with_status(status_pair, |vm| {
                            let args = [root as i32, t, status as i32];
                            vm.call(root, Callback::ProxyOnGrpcClose, &args)
                        })?;
                    }
                }
            }
        }
        Ok(true)
    }
}
