//! A slot's VMs and the streams of the exchanges on them: the phases run plugin by plugin,
//! the body bytes plugins hold, and the paused exchanges waiting for news.

mod phases;

use super::held::{Held, HeldBudget};
use super::phase::{Direction, Step};
use super::route::Plan;
use super::slot::{Done, ExchangeKey, Job};
use crate::HeaderMap;
use crate::vm::{Action, LocalResponse, StreamEvent};
use crate::worker::{Failure, Worker, WorkerStream};
use rustc_hash::FxHashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

/// One exchange's streams, one per plugin, and what each plugin has paused on of the body.
struct Streams {
    /// The route the exchange runs on (the index of its order in the plan).
    route: usize,
    streams: Vec<Option<WorkerStream>>,
    buffers: Vec<Held>,
    /// Trailers plugins added to a message that had none (request, response), in the order
    /// the plugins ran.
    added_trailers: [HeaderMap; 2],
}

/// A slot's VMs and the exchanges running on them.
pub(super) struct SlotState {
    workers: Vec<Worker>,
    /// The chain's routes: which root each plugin's stream is created under.
    plan: Arc<Plan>,
    exchanges: FxHashMap<u64, Streams>,
    /// What plugins may hold paused of bodies.
    held: Arc<HeldBudget>,
    /// Paused exchanges to notify when their plugin has news for them.
    waiters: FxHashMap<u64, Waiter>,
    /// The vectors of ended exchanges, emptied, for the next exchanges to reuse (two
    /// allocations and a reference count per plugin fewer per exchange).
    spare: Vec<Streams>,
    /// The tick the slot thread sleeps until (`None`: no tick), so that a callback run
    /// elsewhere that wants an earlier one can wake it.
    pub(super) armed_tick: Option<Instant>,
}

/// A paused exchange waiting for plugin `index` on its slot.
struct Waiter {
    index: usize,
    notify: Arc<Notify>,
}

/// One exchange's streams beside the slot's VMs, for the length of one job
/// ([`SlotState::open`]): what the phases work on.
struct OpenExchange<'a> {
    workers: &'a mut [Worker],
    /// The plugins of the exchange's route, in request order.
    order: &'a [usize],
    held: &'a HeldBudget,
    streams: &'a mut Streams,
}

impl OpenExchange<'_> {
    /// The plugin at `position` of `direction`'s order; `None` past the last.
    fn plugin_at(&self, direction: Direction, position: usize) -> Option<usize> {
        direction.plugin_at(self.order, position)
    }

    /// Plugin `index`'s VM and its stream of the exchange; `None` if the route skips it.
    fn plugin(&mut self, index: usize) -> Option<(&mut Worker, &mut WorkerStream)> {
        let worker = self.workers.get_mut(index)?;
        let stream = self.streams.streams.get_mut(index)?.as_mut()?;
        Some((worker, stream))
    }

    /// Runs one callback of plugin `index`; a failure becomes its policy's action.
    fn call(
        &mut self,
        index: usize,
        callback: impl FnOnce(&mut Worker, &mut WorkerStream) -> Result<Action, Failure>,
    ) -> Action {
        let Some((worker, stream)) = self.plugin(index) else {
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

    /// Runs `f` on every plugin's stream of the exchange (those its route does not skip).
    fn each_stream(&mut self, mut f: impl FnMut(&mut Worker, &WorkerStream)) {
        for (worker, stream) in self.workers.iter_mut().zip(&self.streams.streams) {
            if let Some(stream) = stream {
                f(worker, stream);
            }
        }
    }

    /// Whether plugin `index` resumed `direction`, answered the stream, or failed it; `None`
    /// while it is still paused (the caller then waits for its news). A resumed header phase
    /// gives the headers as the plugin left them.
    fn poll_resumed(
        &mut self,
        index: usize,
        direction: Direction,
    ) -> Option<Result<Option<HeaderMap>, LocalResponse>> {
        let Some((worker, stream)) = self.plugin(index) else {
            return Some(Ok(None));
        };
        if let Some(failure) = worker.stream_failure(stream) {
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
                    return Some(Err(LocalResponse::new(
                        502,
                        "filterbox_stream_closed_by_plugin",
                    )));
                }
                StreamEvent::Continue(_) | StreamEvent::ClearRouteCache => {}
            }
        }
        None
    }

    /// What [`SlotState::execute`] does for `job`, and the wait to register if the job
    /// found the exchange still paused.
    fn run(mut self, job: Job) -> (Done, Option<Waiter>) {
        let done = match job {
            Job::Map {
                direction,
                phase,
                mut map,
                from,
                connection,
            } => {
                if let Some(connection) = connection {
                    self.each_stream(|worker, stream| {
                        worker.set_stream_connection(stream, connection.clone());
                    });
                }
                let step = self.map_phase((direction, phase), &mut map, from);
                Done::Map(step, map)
            }
            Job::Body {
                direction,
                input,
                end_of_stream,
                from,
            } => {
                let (step, out) = self.body(direction, input, end_of_stream, from);
                let added = (end_of_stream && matches!(step, Step::Continue))
                    .then(|| self.take_added_trailers(direction));
                Done::Body(step, out, added)
            }
            Job::ResumeBody {
                direction,
                position,
            } => {
                // Only a body paused at its end is resumed this way.
                let (step, out) = self.resume_body(direction, position);
                let added =
                    matches!(step, Step::Continue).then(|| self.take_added_trailers(direction));
                Done::Body(step, out, added)
            }
            Job::AddedTrailers { direction } => Done::Trailers(self.take_added_trailers(direction)),
            Job::ReleaseBuffers => Done::Released(self.release_buffers()),
            Job::SetProperties(properties) => {
                for (path, value) in properties {
                    let path: Vec<&str> = path.iter().map(String::as_str).collect();
                    self.each_stream(|worker, stream| {
                        worker.set_stream_property(stream, &path, value.clone());
                    });
                }
                Done::PropertySet
            }
            Job::SetUpstream(address) => {
                self.each_stream(|worker, stream| {
                    worker.set_stream_upstream(stream, address);
                });
                Done::PropertySet
            }
            Job::Resumed {
                index,
                direction,
                notify,
            } => {
                let resumed = self.poll_resumed(index, direction);
                if resumed.is_none() {
                    return (Done::Resumed(None), Some(Waiter { index, notify }));
                }
                Done::Resumed(resumed)
            }
            // Ended by `SlotState::execute`, which needs the slot's other exchanges for it.
            Job::End { .. } => Done::Ended,
        };
        (done, None)
    }
}

impl SlotState {
    /// The state of a slot whose VMs are `workers`.
    pub(super) fn new(workers: Vec<Worker>, plan: Arc<Plan>, held: Arc<HeldBudget>) -> SlotState {
        SlotState {
            workers,
            plan,
            exchanges: FxHashMap::default(),
            held,
            waiters: FxHashMap::default(),
            spare: Vec::new(),
            armed_tick: None,
        }
    }

    /// The job's view of exchange `id`: its streams, created (on route `route`) on first
    /// use (a plugin the route skips gets none), beside the slot's VMs. One lookup serves the
    /// whole job.
    fn open(&mut self, id: u64, route: usize) -> OpenExchange<'_> {
        let SlotState {
            workers,
            plan,
            exchanges,
            held,
            spare,
            ..
        } = self;
        let streams = exchanges
            .entry(id)
            .or_insert_with(|| new_streams(workers, plan, held, spare, route));
        OpenExchange {
            order: plan.orders.get(streams.route).map_or(&[], Vec::as_slice),
            workers,
            held,
            streams,
        }
    }

    /// Notifies every waiting exchange its plugin has news for (and forgets it: it asks
    /// again if the news was not what it waits for). Runs after anything the VMs did.
    pub(super) fn notify_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let (workers, exchanges) = (&mut self.workers, &self.exchanges);
        self.waiters.retain(|id, waiter| {
            let stream = exchanges.get(id).and_then(|s| s.streams.get(waiter.index));
            let news = match (workers.get_mut(waiter.index), stream) {
                (Some(worker), Some(Some(stream))) => worker.has_news(stream),
                _ => true,
            };
            if news {
                waiter.notify.notify_one();
            }
            !news
        });
    }

    /// Runs what is due on every VM (events that arrived, ticks).
    pub(super) fn run_due(&mut self) {
        let now = Instant::now();
        for worker in &mut self.workers {
            if let Err(error) = worker.run_due(now) {
                tracing::warn!(plugin = %worker.plugin().config().name, "{error}");
            }
        }
    }

    /// The earliest tick a VM wants.
    pub(super) fn next_tick(&self) -> Option<Instant> {
        self.workers.iter().filter_map(Worker::next_tick).min()
    }

    /// Whether the slot thread sleeps past a tick some VM now wants.
    pub(super) fn tick_needs_wake(&self) -> bool {
        match (self.next_tick(), self.armed_tick) {
            (Some(wanted), Some(armed)) => wanted < armed,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Does `job` for exchange `id`, then notifies the exchanges it gave news to. `None` if
    /// it panicked (a bug of ours; guest panics are already traps): the slot lives on and
    /// the exchange is answered 503.
    pub(super) fn execute(&mut self, (id, route): ExchangeKey, job: Job) -> Option<Done> {
        let done = std::panic::catch_unwind(AssertUnwindSafe(|| match job {
            Job::End { log } => {
                self.end(id, log);
                Done::Ended
            }
            job => {
                let (done, waiter) = self.open(id, route).run(job);
                if let Some(waiter) = waiter {
                    self.waiters.insert(id, waiter);
                }
                done
            }
        }));
        self.notify_waiters();
        match done {
            Ok(done) => Some(done),
            Err(_) => {
                tracing::error!("a filter chain job panicked");
                None
            }
        }
    }

    /// Runs `proxy_on_log` (if `log`) and ends every stream of exchange `id`.
    fn end(&mut self, id: u64, log: Option<(HeaderMap, HeaderMap)>) {
        self.waiters.remove(&id);
        let Some(mut streams) = self.exchanges.remove(&id) else {
            return;
        };
        let logged = log.is_some();
        let (mut request, mut response) = log.unwrap_or_default();
        for (worker, stream) in self.workers.iter_mut().zip(streams.streams.iter_mut()) {
            let Some(mut stream) = stream.take() else {
                continue;
            };
            // A failure here was logged by the worker when its trap happened.
            if logged && let Err(failure) = worker.on_log(&mut stream, &mut request, &mut response)
            {
                tracing::debug!("{failure}");
            }
            if let Err(failure) = worker.finish_stream(stream) {
                tracing::debug!("{failure}");
            }
        }
        // Kept for the next exchange, emptied: what plugins still held goes, as it would
        // with the exchange.
        if self.spare.len() < SPARE_STREAMS {
            for held in &mut streams.buffers {
                drop(held.take());
            }
            streams.added_trailers = Default::default();
            self.spare.push(streams);
        }
    }
}

/// The streams of a new exchange on `route`, in vectors an ended exchange left in `spare`
/// if there are: one per plugin, none for a plugin the route skips.
fn new_streams(
    workers: &mut [Worker],
    plan: &Plan,
    held: &Arc<HeldBudget>,
    spare: &mut Vec<Streams>,
    route: usize,
) -> Streams {
    let roots = plan.roots.get(route).map(Vec::as_slice).unwrap_or(&[]);
    let mut streams = spare.pop().unwrap_or_else(|| Streams {
        route,
        streams: Vec::with_capacity(workers.len()),
        buffers: workers.iter().map(|_| Held::new(held)).collect(),
        added_trailers: Default::default(),
    });
    streams.route = route;
    streams.streams.clear();
    let created = workers
        .iter_mut()
        .enumerate()
        .map(|(index, worker)| match roots.get(index) {
            Some(None) => None,
            Some(&Some(root)) => Some(worker.create_stream_under(root)),
            None => Some(worker.create_stream()),
        });
    streams.streams.extend(created);
    streams
}

/// How many ended exchanges' vectors a slot keeps for reuse: as many as run on it at once in
/// a busy proxy, about; beyond that they are freed.
const SPARE_STREAMS: usize = 64;
