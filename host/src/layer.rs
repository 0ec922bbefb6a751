//! A tower [`Layer`] that runs a chain of plugins around any `Service<http::Request<_>>`.
//!
//! The model is thread-per-worker: a [`FilterChain`] holds the compiled plugins once and a
//! number of *slots*. Each slot is a thread that owns one VM per plugin (a [`Worker`]) and
//! runs every callback of the exchanges given to it, so VMs never move between threads (a
//! wasmer instance must not) and guest code never blocks the async runtime's threads. An
//! exchange is given to the slot of the runtime thread that starts it and stays there; its
//! future sends the slot one command per phase and awaits the answer.
//!
//! Between commands the slot thread delivers what arrives for its VMs from elsewhere (HTTP
//! and gRPC call answers, queue messages) and runs their ticks; an exchange a plugin paused
//! waits until the plugin resumes it, answers it, or the chain's pause timeout passes.

use crate::http_parts::HttpPartsError;
use crate::vm::{Action, LocalResponse, StreamEvent};
use crate::worker::{Failure, ThreadStart, Worker, WorkerStream, recv_until, spawn_workers};
use crate::{HeaderMap, Plugin, VmError};
use bytes::{Buf, Bytes, BytesMut};
use core::fmt;
use filterbox_abi::{GrpcStatus, MapType, StreamType};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use parking_lot::RwLock;
use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};
use tower_layer::Layer;
use tower_service::Service;

/// An error that boxes whatever a body or the inner service failed with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a [`FilterChain`] could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum ChainError {
    /// A slot thread could not be started.
    Thread(std::io::Error),
    /// A plugin's first VM did not start (instantiation, `proxy_on_vm_start` or
    /// `proxy_on_configure` failed), so the chain is refused before it takes traffic.
    Start(VmError),
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::Thread(error) => write!(f, "starting a slot thread: {error}"),
            ChainError::Start(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for ChainError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChainError::Thread(error) => Some(error),
            ChainError::Start(error) => Some(error),
        }
    }
}

/// Why a filtered exchange failed without an HTTP answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum FilterError {
    /// Reading the request body failed.
    RequestBody(BoxError),
    /// Reading the response body failed.
    ResponseBody(BoxError),
    /// The inner service failed.
    Service(BoxError),
    /// A plugin answered the exchange (or a limit was hit) after the response headers had
    /// gone to the client: the response body ends with this error, which resets the stream.
    Reset(LocalResponse),
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::RequestBody(e) => write!(f, "reading the request body: {e}"),
            FilterError::ResponseBody(e) => write!(f, "reading the response body: {e}"),
            FilterError::Service(e) => write!(f, "inner service: {e}"),
            FilterError::Reset(response) => write!(
                f,
                "the filter chain answered {} ({}) after the response headers were sent",
                response.status_code, response.details
            ),
        }
    }
}

impl std::error::Error for FilterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FilterError::RequestBody(e)
            | FilterError::ResponseBody(e)
            | FilterError::Service(e) => Some(e.as_ref()),
            FilterError::Reset(_) => None,
        }
    }
}

/// Builds a [`FilterChain`].
#[derive(Debug, Clone)]
pub struct FilterChainBuilder {
    slots: usize,
    pause_timeout: Duration,
    max_body_bytes: usize,
    max_held_bytes: usize,
}

impl Default for FilterChainBuilder {
    fn default() -> Self {
        FilterChainBuilder {
            slots: std::thread::available_parallelism().map_or(1, usize::from),
            pause_timeout: Duration::from_secs(30),
            max_body_bytes: 16 << 20,
            max_held_bytes: 256 << 20,
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

    /// Starts the slot threads and on each one VM per plugin, started and configured: a
    /// plugin that cannot start refuses the whole chain, before it takes traffic. Blocks
    /// until the VMs are up. Requests run through `plugins` in order, responses in reverse.
    pub fn build(self, plugins: Vec<Plugin>) -> Result<FilterChain, ChainError> {
        let mut slots = Vec::with_capacity(self.slots);
        let held = HeldBudget::new(self.max_body_bytes, self.max_held_bytes);
        for index in 0..self.slots {
            slots.push(SlotHandle::spawn(index, &plugins, held.clone())?);
        }
        Ok(FilterChain {
            inner: Arc::new(ChainInner {
                plugins,
                slots,
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
    slots: Vec<SlotHandle>,
    pause_timeout: Duration,
}

impl Drop for ChainInner {
    fn drop(&mut self) {
        for slot in &self.slots {
            let _ = slot.commands.send(Command::Stop);
        }
    }
}

/// What a slot thread is asked to do.
enum Command {
    /// Run this on the slot's VMs.
    Run(Box<dyn FnOnce(&mut SlotState) + Send>),
    /// An event arrived for one of the slot's VMs.
    Wake,
    /// The chain is gone: drop the VMs and end the thread.
    Stop,
}

/// The chain's side of a slot thread.
struct SlotHandle {
    commands: mpsc::Sender<Command>,
    /// Notified after the slot delivered events: paused exchanges look at theirs again.
    progress: Arc<Notify>,
}

impl SlotHandle {
    fn spawn(
        index: usize,
        plugins: &[Plugin],
        held: Arc<HeldBudget>,
    ) -> Result<SlotHandle, ChainError> {
        let (commands, receiver) = mpsc::channel();
        let progress = Arc::new(Notify::new());
        let wake_sender = commands.clone();
        let wake: crate::Wake = Arc::new(move || {
            let _ = wake_sender.send(Command::Wake);
        });
        let thread_progress = progress.clone();
        let serve = move |workers| {
            let state = SlotState {
                workers,
                exchanges: HashMap::new(),
                held,
            };
            state.serve(&receiver, &thread_progress);
        };
        match spawn_workers(
            format!("filterbox-slot-{index}"),
            plugins.to_vec(),
            wake,
            serve,
        ) {
            Ok(_) => Ok(SlotHandle { commands, progress }),
            Err(ThreadStart::Start(error)) => Err(ChainError::Start(error)),
            Err(ThreadStart::Thread(error)) => Err(ChainError::Thread(error)),
        }
    }
}

/// Which way a phase runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Request,
    Response,
}

impl Direction {
    fn stream_type(self) -> StreamType {
        match self {
            Direction::Request => StreamType::HttpRequest,
            Direction::Response => StreamType::HttpResponse,
        }
    }

    fn header_map(self) -> MapType {
        match self {
            Direction::Request => MapType::HttpRequestHeaders,
            Direction::Response => MapType::HttpResponseHeaders,
        }
    }

    fn trailer_map(self) -> MapType {
        match self {
            Direction::Request => MapType::HttpRequestTrailers,
            Direction::Response => MapType::HttpResponseTrailers,
        }
    }

    /// From position `from` of the order this direction runs `plugins` plugins in: each
    /// position with its plugin's index (requests in chain order, responses reversed).
    fn positions(self, plugins: usize, from: usize) -> impl Iterator<Item = (usize, usize)> {
        (from..plugins).map(move |position| match self {
            Direction::Request => (position, position),
            Direction::Response => (position, plugins - 1 - position),
        })
    }
}

/// Where a phase stopped.
enum Step {
    /// Every plugin let it through.
    Continue,
    /// Answer the client with this.
    Respond(LocalResponse),
    /// The plugin at `position` of the phase's order (plugin `index`) paused it.
    Paused { position: usize, index: usize },
}

/// Which header map a map phase runs over.
#[derive(Clone, Copy, Debug)]
enum MapPhase {
    Headers { end_of_stream: bool },
    Trailers,
}

/// The header phase of a message with `body`.
fn headers_phase(body: &impl Body) -> MapPhase {
    MapPhase::Headers {
        end_of_stream: body.is_end_stream(),
    }
}

/// What the body bytes plugins hold paused may add up to: per plugin and exchange, and
/// across the whole chain.
#[derive(Debug)]
struct HeldBudget {
    per_plugin: usize,
    total: usize,
    held: AtomicUsize,
}

impl HeldBudget {
    fn new(per_plugin: usize, total: usize) -> Arc<Self> {
        Arc::new(HeldBudget {
            per_plugin,
            total,
            held: AtomicUsize::new(0),
        })
    }

    /// Whether `bytes` more may be held.
    fn has_room(&self, bytes: usize) -> bool {
        self.held
            .load(Ordering::Acquire)
            .checked_add(bytes)
            .is_some_and(|total| total <= self.total)
    }
}

/// Body bytes one plugin holds paused, counted in the chain's [`HeldBudget`].
struct Held {
    bytes: BytesMut,
    budget: Arc<HeldBudget>,
}

impl Held {
    fn new(budget: &Arc<HeldBudget>) -> Self {
        Held {
            bytes: BytesMut::new(),
            budget: budget.clone(),
        }
    }

    /// Takes the bytes out (they are no longer held).
    fn take(&mut self) -> BytesMut {
        self.budget
            .held
            .fetch_sub(self.bytes.len(), Ordering::AcqRel);
        std::mem::take(&mut self.bytes)
    }

    /// Holds `bytes` instead of what was held.
    fn put(&mut self, bytes: BytesMut) {
        drop(self.take());
        self.budget.held.fetch_add(bytes.len(), Ordering::AcqRel);
        self.bytes = bytes;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// One exchange's streams, one per plugin, and what each plugin has paused on of the body.
struct Streams {
    streams: Vec<Option<WorkerStream>>,
    buffers: Vec<Held>,
    /// Trailers plugins added to a message that had none (request, response), in the order
    /// the plugins ran.
    added_trailers: [HeaderMap; 2],
}

/// A slot thread's VMs and the exchanges running on them.
struct SlotState {
    workers: Vec<Worker>,
    exchanges: HashMap<u64, Streams>,
    /// What plugins may hold paused of bodies.
    held: Arc<HeldBudget>,
}

impl SlotState {
    /// Runs commands until the chain stops; delivers events when woken and ticks when due.
    fn serve(mut self, commands: &mpsc::Receiver<Command>, progress: &Notify) {
        loop {
            let tick = self.workers.iter().filter_map(Worker::next_tick).min();
            let Ok(received) = recv_until(commands, tick) else {
                return;
            };
            let woken = match received {
                Some(Command::Stop) => return,
                Some(Command::Run(job)) => {
                    // Guest panics are already traps; this keeps the slot alive for a bug of
                    // ours, and the exchange that hit it gets no answer (503).
                    if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut self))).is_err() {
                        tracing::error!("a filter chain command panicked");
                    }
                    false
                }
                Some(Command::Wake) | None => true,
            };
            let now = Instant::now();
            if woken || tick.is_some_and(|tick| tick <= now) {
                for worker in &mut self.workers {
                    if let Err(error) = worker.run_due(now) {
                        tracing::warn!(plugin = %worker.plugin().config().name, "{error}");
                    }
                }
                progress.notify_waiters();
            }
        }
    }

    /// The streams of exchange `id`, created on first use.
    fn streams(&mut self, id: u64) -> &mut Streams {
        let workers = &mut self.workers;
        let held = &self.held;
        self.exchanges.entry(id).or_insert_with(|| Streams {
            streams: workers
                .iter_mut()
                .map(|w| Some(w.create_stream()))
                .collect(),
            buffers: workers.iter().map(|_| Held::new(held)).collect(),
            added_trailers: Default::default(),
        })
    }

    /// Runs one callback of plugin `index` for exchange `id`; a failure becomes its policy's
    /// action.
    fn call(
        &mut self,
        id: u64,
        index: usize,
        callback: impl FnOnce(&mut Worker, &mut WorkerStream) -> Result<Action, Failure>,
    ) -> Action {
        self.streams(id);
        let stream = self
            .exchanges
            .get_mut(&id)
            .and_then(|s| s.streams.get_mut(index));
        let (Some(worker), Some(Some(stream))) = (self.workers.get_mut(index), stream) else {
            return Action::Continue;
        };
        match callback(worker, stream) {
            Ok(action) => action,
            Err(failure) => {
                // The worker logged the trap when it happened; every later phase of the
                // stream gets the same failure, which is not news.
                tracing::debug!("{failure}");
                failure.into_action()
            }
        }
    }

    /// The header (or trailer) callbacks of `direction` over `map`, from position `from` of
    /// its order, until a plugin pauses or answers.
    fn map_phase(
        &mut self,
        id: u64,
        (direction, phase): (Direction, MapPhase),
        map: &mut HeaderMap,
        from: usize,
    ) -> Step {
        for (position, index) in direction.positions(self.workers.len(), from) {
            let action = self.call(id, index, |worker, stream| match (direction, phase) {
                (Direction::Request, MapPhase::Headers { end_of_stream }) => {
                    worker.on_request_headers(stream, map, end_of_stream)
                }
                (Direction::Response, MapPhase::Headers { end_of_stream }) => {
                    worker.on_response_headers(stream, map, end_of_stream)
                }
                (Direction::Request, MapPhase::Trailers) => worker.on_request_trailers(stream, map),
                (Direction::Response, MapPhase::Trailers) => {
                    worker.on_response_trailers(stream, map)
                }
            });
            match action {
                Action::Continue => {}
                Action::Respond(response) => return Step::Respond(response),
                Action::Pause => return Step::Paused { position, index },
            }
        }
        Step::Continue
    }

    /// Runs body bytes through the plugins of `direction` from position `from`: each plugin
    /// sees what it paused on so far plus the new bytes, and what it lets through goes to the
    /// next. Returns what left the last plugin. A pause at the end of the stream waits for the
    /// plugin to resume ([`SlotState::resume_body`]); any other pause keeps the bytes.
    fn body(
        &mut self,
        id: u64,
        direction: Direction,
        mut input: BytesMut,
        end_of_stream: bool,
        from: usize,
    ) -> (Step, BytesMut) {
        for (position, index) in direction.positions(self.workers.len(), from) {
            let mut body = match self.streams(id).buffers.get_mut(position) {
                Some(buffer) => {
                    let mut body = buffer.take();
                    body.extend_from_slice(&input);
                    body
                }
                None => break,
            };
            if body.len() > self.held.per_plugin {
                let status = match direction {
                    Direction::Request => 413,
                    Direction::Response => 502,
                };
                return (
                    Step::Respond(local(status, "filterbox_body_too_large")),
                    BytesMut::new(),
                );
            }
            let mut added = None;
            let action = self.call(id, index, |worker, stream| {
                let action = match direction {
                    Direction::Request => worker.on_request_body(stream, &mut body, end_of_stream),
                    Direction::Response => {
                        worker.on_response_body(stream, &mut body, end_of_stream)
                    }
                };
                added = worker.take_added_trailers(stream, direction.trailer_map());
                action
            });
            if let Some(added) = added {
                let held = &mut self.streams(id).added_trailers[direction as usize];
                for (name, value) in added.iter() {
                    held.add(name.clone(), value.clone());
                }
            }
            match action {
                Action::Continue => input = body,
                Action::Respond(response) => return (Step::Respond(response), BytesMut::new()),
                Action::Pause => {
                    if !self.held.has_room(body.len()) {
                        let status = match direction {
                            Direction::Request => 503,
                            Direction::Response => 502,
                        };
                        tracing::warn!(
                            "the plugins hold {} body bytes, the most allowed: an exchange is \
                             answered {status} rather than hold {} more",
                            self.held.total,
                            body.len()
                        );
                        return (
                            Step::Respond(local(status, "filterbox_held_bodies_over_limit")),
                            BytesMut::new(),
                        );
                    }
                    if let Some(buffer) = self.streams(id).buffers.get_mut(position) {
                        buffer.put(body);
                    }
                    let step = match end_of_stream {
                        true => Step::Paused { position, index },
                        false => Step::Continue,
                    };
                    return (step, BytesMut::new());
                }
            }
        }
        (Step::Continue, input)
    }

    /// Goes on with a body the plugin at `position` paused on at the end of the stream.
    fn resume_body(&mut self, id: u64, direction: Direction, position: usize) -> (Step, BytesMut) {
        let held = match self.streams(id).buffers.get_mut(position) {
            Some(buffer) => buffer.take(),
            None => BytesMut::new(),
        };
        self.body(id, direction, held, true, position + 1)
    }

    /// The trailers plugins added to `direction`'s message, if any.
    fn take_added_trailers(&mut self, id: u64, direction: Direction) -> Option<HeaderMap> {
        let held = std::mem::take(&mut self.streams(id).added_trailers[direction as usize]);
        (!held.is_empty()).then_some(held)
    }

    /// What plugins still hold of the body, in order (released once trailers went through).
    fn release_buffers(&mut self, id: u64) -> BytesMut {
        let mut released = BytesMut::new();
        for buffer in &mut self.streams(id).buffers {
            released.extend_from_slice(&buffer.take());
        }
        released
    }

    /// Whether plugin `index` resumed `direction`, answered the stream, or failed it; `None`
    /// while it is still paused. A resumed header phase gives the headers as the plugin left
    /// them.
    fn poll_resumed(
        &mut self,
        id: u64,
        index: usize,
        direction: Direction,
    ) -> Option<Result<Option<HeaderMap>, LocalResponse>> {
        let stream = self.exchanges.get(&id).and_then(|s| s.streams.get(index));
        let (Some(worker), Some(Some(stream))) = (self.workers.get_mut(index), stream) else {
            return Some(Ok(None));
        };
        if let Some(failure) = stream.failure() {
            return Some(match failure.action() {
                Action::Respond(response) => Err(response.clone()),
                Action::Continue | Action::Pause => Ok(None),
            });
        }
        for event in worker.take_stream_events(stream) {
            match event {
                StreamEvent::Continue(kind) if kind == direction.stream_type() => {
                    return Some(Ok(
                        worker.take_paused_headers(stream, direction.header_map())
                    ));
                }
                StreamEvent::Respond(response) => return Some(Err(response)),
                StreamEvent::Close(_) => {
                    return Some(Err(local(502, "filterbox_stream_closed_by_plugin")));
                }
                StreamEvent::Continue(_) | StreamEvent::ClearRouteCache => {}
            }
        }
        None
    }

    /// Runs `proxy_on_log` (if `log`) and ends every stream of exchange `id`.
    fn end(&mut self, id: u64, log: Option<(HeaderMap, HeaderMap)>) {
        let Some(mut streams) = self.exchanges.remove(&id) else {
            return;
        };
        let (mut request, mut response) = log.clone().unwrap_or_default();
        for (worker, stream) in self.workers.iter_mut().zip(streams.streams.iter_mut()) {
            let Some(mut stream) = stream.take() else {
                continue;
            };
            // A failure here was logged by the worker when its trap happened.
            if log.is_some()
                && let Err(failure) = worker.on_log(&mut stream, &mut request, &mut response)
            {
                tracing::debug!("{failure}");
            }
            if let Err(failure) = worker.finish_stream(stream) {
                tracing::debug!("{failure}");
            }
        }
    }
}

thread_local! {
    /// The slot of this runtime thread, given out round-robin on first use.
    static THREAD_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}
static NEXT_THREAD_SLOT: AtomicUsize = AtomicUsize::new(0);
static NEXT_EXCHANGE: AtomicU64 = AtomicU64::new(1);

impl FilterChain {
    /// A builder with the default slots, pause timeout and body limit.
    pub fn builder() -> FilterChainBuilder {
        FilterChainBuilder::default()
    }

    /// A chain with the defaults; see [`FilterChainBuilder::build`].
    pub fn new(plugins: Vec<Plugin>) -> Result<FilterChain, ChainError> {
        FilterChainBuilder::default().build(plugins)
    }

    /// The plugins, in request order.
    pub fn plugins(&self) -> &[Plugin] {
        &self.inner.plugins
    }

    /// The slot of the calling thread.
    fn slot_index(&self) -> usize {
        let index = THREAD_SLOT.with(|cell| match cell.get() {
            Some(index) => index,
            None => {
                let index = NEXT_THREAD_SLOT.fetch_add(1, Ordering::Relaxed);
                cell.set(Some(index));
                index
            }
        });
        index % self.inner.slots.len().max(1)
    }
}

/// A [`FilterChain`] that can be replaced while it serves: exchanges already started finish
/// on the chain they started on, new ones take the new chain. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedChain {
    current: Arc<RwLock<FilterChain>>,
}

impl SharedChain {
    /// Serves `chain` until it is replaced.
    pub fn new(chain: FilterChain) -> Self {
        SharedChain {
            current: Arc::new(RwLock::new(chain)),
        }
    }

    /// The chain new exchanges start on.
    pub fn current(&self) -> FilterChain {
        self.current.read().clone()
    }

    /// Puts `chain` in place for new exchanges and returns the one it replaces.
    pub fn replace(&self, chain: FilterChain) -> FilterChain {
        std::mem::replace(&mut *self.current.write(), chain)
    }
}

/// The tower layer: wraps a service in a [`FilterService`].
#[derive(Clone, Debug)]
pub struct FilterLayer {
    chain: SharedChain,
}

impl FilterLayer {
    /// Runs every exchange through `chain`.
    pub fn new(chain: FilterChain) -> Self {
        FilterLayer {
            chain: SharedChain::new(chain),
        }
    }

    /// Runs every exchange through whatever chain `chain` holds when the exchange starts.
    pub fn shared(chain: SharedChain) -> Self {
        FilterLayer { chain }
    }
}

impl<S> Layer<S> for FilterLayer {
    type Service = FilterService<S>;

    fn layer(&self, inner: S) -> FilterService<S> {
        FilterService {
            chain: self.chain.clone(),
            inner,
        }
    }
}

/// Runs the chain's plugins on a request, passes what they let through to the inner service,
/// and runs them (in reverse order) on its response. Bodies stream through the plugins frame
/// by frame with the proxy-wasm buffering semantics: a plugin that pauses on a chunk holds it
/// and sees the body accumulate on the next call; what a plugin lets through goes on at once
/// (the request body while the inner service runs, the response body from a task). Local
/// responses (a plugin's, the failure policy's, a limit's) go to the client without running
/// the response callbacks; `proxy_on_log` runs for every exchange, once its response body
/// has been read (or dropped).
#[derive(Clone, Debug)]
pub struct FilterService<S> {
    chain: SharedChain,
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for FilterService<S>
where
    S: Service<http::Request<FilteredBody>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError> + Send,
    RB: Body + Send + Unpin + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError> + Send,
{
    type Response = http::Response<FilteredBody>;
    type Error = FilterError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, FilterError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FilterError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| FilterError::Service(e.into()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was driven to ready serves this call (tower's usual dance).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let chain = self.chain.current();
        Box::pin(Exchange::new(chain).run(inner, request))
    }
}

/// One exchange on its slot. Ends its streams (`proxy_on_done`, `proxy_on_delete`) when
/// dropped, so a client that goes away leaves no stream contexts behind.
struct Exchange {
    chain: FilterChain,
    slot: usize,
    id: u64,
    ended: bool,
    request_headers: HeaderMap,
    response_headers: HeaderMap,
}

impl Exchange {
    fn new(chain: FilterChain) -> Exchange {
        let slot = chain.slot_index();
        Exchange {
            chain,
            slot,
            id: NEXT_EXCHANGE.fetch_add(1, Ordering::Relaxed),
            ended: false,
            request_headers: HeaderMap::new(),
            response_headers: HeaderMap::new(),
        }
    }

    fn handle(&self) -> Option<&SlotHandle> {
        self.chain.inner.slots.get(self.slot)
    }

    /// Runs `job` on the slot thread and returns its result; a slot that is gone answers 503.
    async fn on_slot<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut SlotState) -> R + Send + 'static,
    ) -> Result<R, LocalResponse> {
        let unavailable = || local(503, "filterbox_slot_unavailable");
        let (reply, answer) = oneshot::channel();
        let command = Command::Run(Box::new(move |state| {
            let _ = reply.send(job(state));
        }));
        let handle = self.handle().ok_or_else(unavailable)?;
        handle.commands.send(command).map_err(|_| unavailable())?;
        answer.await.map_err(|_| unavailable())
    }

    /// Waits until plugin `index` resumes `direction` (giving the headers as it left them,
    /// in a header phase), answers the exchange, or the pause times out (504).
    async fn wait_resumed(
        &self,
        index: usize,
        direction: Direction,
    ) -> Result<Option<HeaderMap>, LocalResponse> {
        let deadline = tokio::time::Instant::now() + self.chain.inner.pause_timeout;
        let progress = match self.handle() {
            Some(handle) => handle.progress.clone(),
            None => return Err(local(503, "filterbox_slot_unavailable")),
        };
        let id = self.id;
        loop {
            let notified = progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(resumed) = self
                .on_slot(move |s| s.poll_resumed(id, index, direction))
                .await?
            {
                return resumed;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let plugin = self
                    .chain
                    .inner
                    .plugins
                    .get(index)
                    .map(|p| p.config().name.clone());
                tracing::warn!(
                    plugin = plugin.unwrap_or_default(),
                    "exchange paused past the pause timeout"
                );
                return Err(local(504, "filterbox_pause_timeout"));
            }
            // A plugin can also resume from a callback of another exchange, which does not
            // notify: look again now and then.
            let _ =
                tokio::time::timeout_at(deadline.min(now + Duration::from_millis(50)), notified)
                    .await;
        }
    }

    /// The header (or trailer) phase of `direction`; returns the map as the plugins left it.
    async fn map_phase(
        &self,
        direction: Direction,
        phase: MapPhase,
        mut map: HeaderMap,
    ) -> Result<HeaderMap, LocalResponse> {
        if self.chain.inner.plugins.is_empty() {
            return Ok(map);
        }
        let (id, mut from) = (self.id, 0);
        loop {
            let (step, back) = self
                .on_slot(move |s| {
                    let step = s.map_phase(id, (direction, phase), &mut map, from);
                    (step, map)
                })
                .await?;
            map = back;
            match step {
                Step::Continue => return Ok(map),
                Step::Respond(response) => return Err(response),
                Step::Paused { position, index } => {
                    let parked = self.wait_resumed(index, direction).await?;
                    // A plugin resumed from elsewhere may have changed the headers it paused on.
                    if let (MapPhase::Headers { .. }, Some(parked)) = (phase, parked) {
                        map = parked;
                    }
                    from = position + 1;
                }
            }
        }
    }

    /// The trailers plugins added at the end of `direction`'s body (none had come), as `http`
    /// trailers; `None` if they added none.
    async fn added_trailers(
        &self,
        direction: Direction,
    ) -> Option<Result<http::HeaderMap, LocalResponse>> {
        if self.chain.inner.plugins.is_empty() {
            return None;
        }
        let id = self.id;
        let added = match self
            .on_slot(move |s| s.take_added_trailers(id, direction))
            .await
        {
            Ok(added) => added?,
            Err(response) => return Some(Err(response)),
        };
        Some(added.to_http().map_err(invalid_edit))
    }

    /// One body chunk through the plugins of `direction`; returns what left the chain.
    async fn body_chunk(
        &self,
        direction: Direction,
        chunk: Bytes,
        end_of_stream: bool,
    ) -> Result<BytesMut, LocalResponse> {
        if self.chain.inner.plugins.is_empty() {
            return Ok(BytesMut::from(chunk));
        }
        let id = self.id;
        let input = BytesMut::from(chunk);
        let (mut step, mut out) = self
            .on_slot(move |s| s.body(id, direction, input, end_of_stream, 0))
            .await?;
        loop {
            match step {
                Step::Continue => return Ok(out),
                Step::Respond(response) => return Err(response),
                Step::Paused { position, index } => {
                    // Nothing more will come: the plugin has to resume (after a callout, say).
                    self.wait_resumed(index, direction).await?;
                    (step, out) = self
                        .on_slot(move |s| s.resume_body(id, direction, position))
                        .await?;
                }
            }
        }
    }

    /// Reads `body` frame by frame through the plugins of `direction` and sends what leaves
    /// the chain to `out` as it goes (each plugin sees a body it pauses on accumulate).
    async fn pump<B>(
        &self,
        direction: Direction,
        mut first: Option<Frame<B::Data>>,
        mut body: B,
        out: &BodySender,
    ) -> Result<(), PumpEnd>
    where
        B: Body + Unpin,
        B::Error: Into<BoxError>,
    {
        let send = |frame: Frame<Bytes>| async move {
            out.send(Ok(frame)).await.map_err(|_| PumpEnd::Gone)
        };
        let mut trailers = None;
        loop {
            let frame = match first.take() {
                Some(frame) => frame,
                None => match body.frame().await {
                    Some(frame) => frame.map_err(|e| PumpEnd::Body(e.into()))?,
                    None => break,
                },
            };
            let frame = match frame.into_data() {
                Ok(mut data) => {
                    let chunk = data.copy_to_bytes(data.remaining());
                    // A body that knows it is done (a content length reached) ends with this
                    // chunk, as Envoy marks the last data frame, saving an empty call.
                    let ended = body.is_end_stream();
                    let passed = self
                        .body_chunk(direction, chunk, ended)
                        .await
                        .map_err(PumpEnd::Local)?;
                    if !passed.is_empty() {
                        send(Frame::data(passed.freeze())).await?;
                    }
                    if ended {
                        if let Some(added) = self.added_trailers(direction).await {
                            send(Frame::trailers(added.map_err(PumpEnd::Local)?)).await?;
                        }
                        return Ok(());
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(map) = frame.into_trailers() {
                trailers = Some(HeaderMap::from_http(&map));
            }
        }
        let Some(trailers) = trailers else {
            let passed = self
                .body_chunk(direction, Bytes::new(), true)
                .await
                .map_err(PumpEnd::Local)?;
            if !passed.is_empty() {
                send(Frame::data(passed.freeze())).await?;
            }
            if let Some(added) = self.added_trailers(direction).await {
                send(Frame::trailers(added.map_err(PumpEnd::Local)?)).await?;
            }
            return Ok(());
        };
        let trailers = self
            .map_phase(direction, MapPhase::Trailers, trailers)
            .await
            .map_err(PumpEnd::Local)?;
        // What plugins still held once the trailers went through is released, in order.
        let id = self.id;
        let released = match self.chain.inner.plugins.is_empty() {
            true => BytesMut::new(),
            false => self
                .on_slot(move |s| s.release_buffers(id))
                .await
                .map_err(PumpEnd::Local)?,
        };
        if !released.is_empty() {
            send(Frame::data(released.freeze())).await?;
        }
        let trailers = trailers
            .to_http()
            .map_err(|e| PumpEnd::Local(invalid_edit(e)))?;
        send(Frame::trailers(trailers)).await
    }

    /// The whole exchange: request phase (its body streamed to the inner service while the
    /// service runs), then the response phase, whose body streams from a task that ends the
    /// exchange when the body is done.
    async fn run<S, B, RB>(
        mut self,
        mut inner: S,
        request: http::Request<B>,
    ) -> Result<http::Response<FilteredBody>, FilterError>
    where
        S: Service<http::Request<FilteredBody>, Response = http::Response<RB>>,
        S::Error: Into<BoxError>,
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        RB: Body + Send + Unpin + 'static,
        RB::Data: Send,
        RB::Error: Into<BoxError> + Send,
    {
        if self.chain.inner.plugins.is_empty() {
            // Nothing to run: the bodies pass through untouched (lengths and all).
            self.ended = true;
            let request = request.map(|body| FilteredBody::boxed(body, FilterError::RequestBody));
            let response = inner
                .call(request)
                .await
                .map_err(|e| FilterError::Service(e.into()))?;
            return Ok(response.map(|body| FilteredBody::boxed(body, FilterError::ResponseBody)));
        }
        let (mut parts, body) = request.into_parts();
        let headers = HeaderMap::from_request_parts(&parts);
        // `proxy_on_log` sees these if the request phase ends in a local response.
        self.request_headers = headers.clone();
        let headers = match self
            .map_phase(Direction::Request, headers_phase(&body), headers)
            .await
        {
            Ok(headers) => headers,
            Err(response) => return Ok(self.local_reply(response).await),
        };
        self.request_headers = headers;
        if let Err(error) = self.request_headers.to_request_parts(&mut parts) {
            return Ok(self.local_reply(invalid_edit(error)).await);
        }
        let had_body = !body.is_end_stream();
        let (sender, receiver) = tokio::sync::mpsc::channel(BODY_FRAMES_IN_FLIGHT);
        let request_body = match had_body {
            true => FilteredBody::stream(receiver),
            false => FilteredBody::empty(),
        };
        let early = {
            let this = &self;
            let pump = async move {
                match had_body {
                    true => this.pump(Direction::Request, None, body, &sender).await,
                    false => Ok(()),
                }
                // `sender` drops here: the body the service reads ends.
            };
            let call = inner.call(http::Request::from_parts(parts, request_body));
            tokio::pin!(pump, call);
            let mut pumping = true;
            loop {
                tokio::select! {
                    ended = &mut pump, if pumping => match ended {
                        Ok(()) | Err(PumpEnd::Gone) => pumping = false,
                        Err(PumpEnd::Local(response)) => break Early::Local(response),
                        Err(PumpEnd::Body(error)) => break Early::Failed(FilterError::RequestBody(error)),
                    },
                    // An upstream that answers before reading the whole body ends the
                    // request phase there.
                    response = &mut call => break Early::Response(response.map_err(|e| FilterError::Service(e.into()))),
                }
            }
        };
        let response = match early {
            Early::Response(Ok(response)) => response,
            Early::Local(response) => return Ok(self.local_reply(response).await),
            Early::Response(Err(error)) | Early::Failed(error) => {
                // `proxy_on_log` runs for failed exchanges too (an access log wants them).
                self.end(true);
                return Err(error);
            }
        };
        let (mut parts, body) = response.into_parts();
        let headers = HeaderMap::from_response_parts(&parts);
        let headers = match self
            .map_phase(Direction::Response, headers_phase(&body), headers)
            .await
        {
            Ok(headers) => headers,
            Err(response) => return Ok(self.local_response(response)),
        };
        self.response_headers = headers;
        if let Err(error) = self.response_headers.to_response_parts(&mut parts) {
            return Ok(self.local_response(invalid_edit(error)));
        }
        if body.is_end_stream() {
            self.end(true);
            return Ok(http::Response::from_parts(parts, FilteredBody::empty()));
        }
        // The headers go out with the first body frame. A body that is whole in that frame
        // (the common small response) is filtered here and sent in one piece: no pump, and a
        // plugin that answers on it can still replace the response.
        let mut body = body;
        let first = match body.frame().await {
            Some(Ok(frame)) => Some(frame),
            Some(Err(error)) => {
                self.end(true);
                return Err(FilterError::ResponseBody(error.into()));
            }
            None => None,
        };
        let (whole, first) = match first.map(Frame::into_data) {
            None => (Some(Bytes::new()), None),
            Some(Ok(mut data)) if body.is_end_stream() => {
                (Some(data.copy_to_bytes(data.remaining())), None)
            }
            Some(Ok(data)) => (None, Some(Frame::data(data))),
            Some(Err(frame)) => (None, Some(frame)),
        };
        if let Some(chunk) = whole {
            return match self.body_chunk(Direction::Response, chunk, true).await {
                Ok(passed) => {
                    let added = match self.added_trailers(Direction::Response).await {
                        Some(Err(response)) => return Ok(self.local_response(response)),
                        Some(Ok(trailers)) => Some(trailers),
                        None => None,
                    };
                    self.end(true);
                    // Known in full, its length can be right whatever the plugins did.
                    if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
                        let length = http::HeaderValue::from(passed.len());
                        parts.headers.insert(http::header::CONTENT_LENGTH, length);
                    }
                    let body = match added {
                        None => FilteredBody::full(passed.freeze()),
                        Some(trailers) => FilteredBody::with_trailers(passed.freeze(), trailers),
                    };
                    Ok(http::Response::from_parts(parts, body))
                }
                Err(response) => Ok(self.local_response(response)),
            };
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(BODY_FRAMES_IN_FLIGHT);
        // Whoever reads the body drives the pump (no task of its own: one fewer thread hop
        // per frame); a reader that drops the body drops the pump and with it the exchange.
        let pump = Box::pin(async move {
            let pumped = self.pump(Direction::Response, first, body, &sender).await;
            let error = match pumped {
                Ok(()) | Err(PumpEnd::Gone) => None,
                Err(PumpEnd::Body(error)) => Some(FilterError::ResponseBody(error)),
                Err(PumpEnd::Local(response)) => {
                    // The response headers are gone: the client can only see the body break.
                    tracing::warn!(
                        status = response.status_code,
                        details = %response.details,
                        "a plugin answered after the response headers were sent; resetting"
                    );
                    Some(FilterError::Reset(response))
                }
            };
            if let Some(error) = error {
                let _ = sender.send(Err(error)).await;
            }
            self.end(true);
        });
        Ok(http::Response::from_parts(
            parts,
            FilteredBody::pumped(receiver, pump),
        ))
    }

    /// A local response sent before the upstream answered (a plugin's, or the chain's own),
    /// sent as Envoy sends one: through every plugin's response phase, in response order, so
    /// that plugins add their response headers to it (a rate limiter's `Retry-After`) and see
    /// its body. If a plugin answers again, or its pause times out, the first response goes
    /// out as it was.
    async fn local_reply(&mut self, local: LocalResponse) -> http::Response<FilteredBody> {
        let (_, headers, body) = local_message(&local, is_grpc(&self.request_headers));
        let phase = MapPhase::Headers {
            end_of_stream: body.is_empty(),
        };
        let Ok(headers) = self.map_phase(Direction::Response, phase, headers).await else {
            return self.local_response(local);
        };
        let body = match body.is_empty() {
            true => BytesMut::new(),
            false => match self.body_chunk(Direction::Response, body, true).await {
                Ok(body) => body,
                Err(_) => return self.local_response(local),
            },
        };
        let mut parts = http::Response::new(()).into_parts().0;
        if headers.to_response_parts(&mut parts).is_err() {
            return self.local_response(local);
        }
        self.response_headers = headers;
        self.end(true);
        http::Response::from_parts(parts, FilteredBody::full(body.freeze()))
    }

    /// The HTTP response for a plugin's (or the chain's) local response, sent as it is: for
    /// answers after the response phase began (as Envoy sends those directly) and when the
    /// response phase of [`Exchange::local_reply`] cannot run. Headers `http` refuses are
    /// left out.
    fn local_response(&mut self, local: LocalResponse) -> http::Response<FilteredBody> {
        let (status, headers, body) = local_message(&local, is_grpc(&self.request_headers));
        let mut response = http::Response::new(FilteredBody::full(body));
        *response.status_mut() = status;
        let mut seen = HeaderMap::new();
        for (name, value) in headers.iter() {
            let kept = match name.as_ref() {
                b":status" => true,
                _ => match (
                    http::HeaderName::from_bytes(name),
                    http::HeaderValue::from_bytes(value),
                ) {
                    (Ok(header), Ok(value)) => {
                        response.headers_mut().try_append(header, value).is_ok()
                    }
                    _ => false,
                },
            };
            if kept {
                seen.add(name.clone(), value.clone());
            }
        }
        self.response_headers = seen;
        self.end(true);
        response
    }

    /// Ends the exchange's streams on its slot, after `proxy_on_log` if `log`. Nobody waits.
    fn end(&mut self, log: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        if self.chain.inner.plugins.is_empty() {
            return;
        }
        let id = self.id;
        let headers = log.then(|| {
            (
                std::mem::take(&mut self.request_headers),
                std::mem::take(&mut self.response_headers),
            )
        });
        if let Some(handle) = self.handle() {
            let _ = handle
                .commands
                .send(Command::Run(Box::new(move |s| s.end(id, headers))));
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // An exchange dropped mid-way (the client went away) still frees its contexts.
        self.end(false);
    }
}

/// Whether the request is a gRPC call (its `content-type` is `application/grpc…`).
fn is_grpc(request: &HeaderMap) -> bool {
    request
        .get_str("content-type")
        .is_some_and(|t| t.starts_with("application/grpc"))
}

/// A local response as the client gets it: the status, the response headers (with that
/// `:status`) and the body. Framing and hop-by-hop headers a plugin set are left out: the
/// proxy frames the body it sends. A gRPC call gets what Envoy sends: a trailers-only
/// response (HTTP 200, `content-type: application/grpc`, `grpc-status` from the plugin or
/// mapped from the HTTP status, the body as `grpc-message`) with no body.
fn local_message(local: &LocalResponse, grpc: bool) -> (http::StatusCode, HeaderMap, Bytes) {
    let status = local_status(local.status_code);
    let sent = if grpc { http::StatusCode::OK } else { status };
    let mut headers = HeaderMap::new();
    headers.add(":status", sent.as_str().to_owned());
    for (name, value) in local.headers.iter() {
        if !is_framing(name) {
            headers.add(name.clone(), value.clone());
        }
    }
    if !grpc {
        if let Some(code) = local.grpc_status {
            headers.replace("grpc-status", code.as_u32().to_string());
        }
        return (sent, headers, local.body.clone());
    }
    let code = local
        .grpc_status
        .map_or_else(|| grpc_status_of(status), GrpcStatus::as_u32);
    headers.replace("content-type", "application/grpc");
    headers.replace("grpc-status", code.to_string());
    if !local.body.is_empty() {
        headers.replace("grpc-message", percent_encode(&local.body));
    }
    (sent, headers, Bytes::new())
}

/// The gRPC status Envoy gives a local reply of HTTP `status` that names none.
fn grpc_status_of(status: http::StatusCode) -> u32 {
    let code = match status.as_u16() {
        400 => GrpcStatus::Internal,
        401 => GrpcStatus::Unauthenticated,
        403 => GrpcStatus::PermissionDenied,
        404 => GrpcStatus::Unimplemented,
        429 | 502 | 503 | 504 => GrpcStatus::Unavailable,
        _ => GrpcStatus::Unknown,
    };
    code.as_u32()
}

/// `grpc-message` encoding: printable ASCII but `%` as it is, every other byte `%XX`.
fn percent_encode(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text {
        match byte {
            b' '..=b'~' if byte != b'%' => out.push(char::from(byte)),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// A local response's status as HTTP has it (500 for one out of range).
fn local_status(code: u32) -> http::StatusCode {
    u16::try_from(code)
        .ok()
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
}

/// Headers a plugin may not set on a local response: the proxy frames the body it sends (a
/// plugin's `content-length` next to a body of another length would split the response).
fn is_framing(name: &[u8]) -> bool {
    name == b"content-length" || crate::http_parts::is_hop_by_hop(name)
}

fn local(status: u32, details: &str) -> LocalResponse {
    LocalResponse {
        status_code: status,
        details: details.to_owned(),
        body: Bytes::new(),
        headers: HeaderMap::new(),
        grpc_status: None,
    }
}

/// A plugin left headers `http` cannot carry: answer 500 rather than forward garbage.
fn invalid_edit(error: HttpPartsError) -> LocalResponse {
    tracing::warn!("plugin left invalid headers: {error}");
    local(500, "filterbox_invalid_headers")
}

/// How many body frames may wait between the chain and the reader of a filtered body.
const BODY_FRAMES_IN_FLIGHT: usize = 4;

type BodySender = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, FilterError>>;

/// Why a body pump stopped early.
enum PumpEnd {
    /// A plugin (or a limit) answered the exchange.
    Local(LocalResponse),
    /// The body being read failed.
    Body(BoxError),
    /// Nobody reads the filtered body any more.
    Gone,
}

/// How the request phase ended.
enum Early<R> {
    Response(Result<R, FilterError>),
    Local(LocalResponse),
    Failed(FilterError),
}

/// A body that went through the chain: what the plugins let through, frame by frame as they
/// let it through (so a body no plugin pauses on streams), then its trailers. A plugin that
/// changes a body's length owns the `content-length` header, as in Envoy (SDK plugins remove
/// it in their header callback).
#[derive(Debug, Default)]
pub struct FilteredBody {
    kind: BodyKind,
}

#[derive(Default)]
enum BodyKind {
    #[default]
    Empty,
    Full(Bytes),
    Stream(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, FilterError>>),
    /// Frames from a pump that this body drives as it is read.
    Pumped {
        frames: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, FilterError>>,
        pump: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    },
    /// A body no plugin sees, passed through as it is.
    Boxed(UnsyncBoxBody<Bytes, FilterError>),
}

impl fmt::Debug for BodyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyKind::Empty => "Empty",
            BodyKind::Full(_) => "Full",
            BodyKind::Stream(_) => "Stream",
            BodyKind::Pumped { .. } => "Pumped",
            BodyKind::Boxed(_) => "Boxed",
        })
    }
}

impl FilteredBody {
    /// An empty body.
    pub fn empty() -> Self {
        FilteredBody::default()
    }

    /// A body of `data`.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        FilteredBody {
            kind: match data.is_empty() {
                true => BodyKind::Empty,
                false => BodyKind::Full(data),
            },
        }
    }

    /// A body of `data` followed by `trailers`.
    fn with_trailers(data: Bytes, trailers: http::HeaderMap) -> Self {
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        // Two frames fit in a fresh channel of two.
        let _ = sender.try_send(Ok(Frame::data(data)));
        let _ = sender.try_send(Ok(Frame::trailers(trailers)));
        FilteredBody::stream(receiver)
    }

    /// `body` as it is, its errors wrapped by `error`.
    fn boxed<B>(body: B, error: fn(BoxError) -> FilterError) -> Self
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let body = body
            .map_frame(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
            .map_err(move |e| error(e.into()))
            .boxed_unsync();
        FilteredBody {
            kind: BodyKind::Boxed(body),
        }
    }

    fn pumped(
        frames: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, FilterError>>,
        pump: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Self {
        FilteredBody {
            kind: BodyKind::Pumped {
                frames,
                pump: Some(pump),
            },
        }
    }

    fn stream(receiver: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, FilterError>>) -> Self {
        FilteredBody {
            kind: BodyKind::Stream(receiver),
        }
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = FilterError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, FilterError>>> {
        match &mut self.kind {
            BodyKind::Empty => Poll::Ready(None),
            BodyKind::Full(_) => match std::mem::take(&mut self.kind) {
                BodyKind::Full(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                _ => Poll::Ready(None),
            },
            BodyKind::Stream(receiver) => receiver.poll_recv(cx),
            BodyKind::Pumped { frames, pump } => {
                if let Poll::Ready(frame) = frames.poll_recv(cx) {
                    return Poll::Ready(frame);
                }
                // Run the pump until it sends a frame, waits, or ends (its sender then drops
                // and the frames end once read).
                if let Some(running) = pump
                    && running.as_mut().poll(cx).is_ready()
                {
                    *pump = None;
                }
                frames.poll_recv(cx)
            }
            BodyKind::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Empty => true,
            BodyKind::Boxed(body) => body.is_end_stream(),
            BodyKind::Full(_) | BodyKind::Stream(_) | BodyKind::Pumped { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Empty => SizeHint::with_exact(0),
            BodyKind::Full(data) => SizeHint::with_exact(data.len() as u64),
            BodyKind::Stream(_) | BodyKind::Pumped { .. } => SizeHint::default(),
            BodyKind::Boxed(body) => body.size_hint(),
        }
    }
}
