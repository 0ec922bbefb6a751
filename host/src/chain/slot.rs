//! Slots: the VMs of a chain, one per plugin per slot, and the jobs exchanges give them.
//!
//! What crosses a slot is a typed [`Job`] for one exchange, answered with a [`Done`]. A slot
//! whose plugins all run on engines with movable instances (wasmtime, wasmi) does the job
//! *inline*, on the thread of the exchange that asks, when no other thread is using the slot;
//! otherwise, and always for a slot with a thread-bound engine (wasmer), the job goes to the
//! slot's own thread and the exchange awaits the answer. That thread also delivers what
//! arrives for the VMs from elsewhere (HTTP and gRPC call answers, queue messages) and runs
//! their ticks. Whatever runs on the VMs then notifies the paused exchanges that now have
//! news, and only those: resumption is pushed, never polled.

use super::error::ChainError;
use super::held::HeldBudget;
use super::phase::{Direction, MapPhase, Step};
use super::route::Plan;
use super::slot_state::SlotState;
use crate::vm::LocalResponse;
use crate::worker::{ThreadStart, recv_until, spawn_workers};
use crate::{HeaderMap, Plugin};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};

/// An exchange as its slot knows it: its id and the index of the chain's route it runs on.
pub(super) type ExchangeKey = (u64, usize);

/// What an exchange asks of its slot.
pub(super) enum Job {
    /// The header (or trailer) callbacks of `direction` over `map`, from position `from` of
    /// its order, until a plugin pauses or answers.
    Map {
        direction: Direction,
        phase: MapPhase,
        map: HeaderMap,
        from: usize,
        /// The client connection, for the streams to keep (with the first request headers).
        connection: Option<Arc<crate::ConnectionInfo>>,
    },
    /// Body bytes through the plugins of `direction` from position `from`.
    Body {
        direction: Direction,
        input: BytesMut,
        end_of_stream: bool,
        from: usize,
    },
    /// Go on with a body the plugin at `position` paused on at the end of the stream.
    ResumeBody {
        direction: Direction,
        position: usize,
    },
    /// The trailers plugins added to `direction`'s message.
    AddedTrailers { direction: Direction },
    /// What plugins still hold of the body, in order.
    ReleaseBuffers,
    /// Whether plugin `index` resumed `direction`; if not, `notify` hears when it has news.
    Resumed {
        index: usize,
        direction: Direction,
        notify: Arc<Notify>,
    },
    /// Properties every plugin's stream of the exchange reads (path, value).
    SetProperties(Vec<(Vec<String>, Bytes)>),
    /// The upstream every plugin's stream of the exchange reads as `upstream.*`.
    SetUpstream(std::net::SocketAddr),
    /// `proxy_on_log` (with these request and response headers, if any) and the end of
    /// every stream of the exchange.
    End { log: Option<(HeaderMap, HeaderMap)> },
}

/// A slot's answer to a [`Job`], variant for variant.
pub(super) enum Done {
    /// Where the map phase stopped, and the map as the plugins left it.
    Map(Step, HeaderMap),
    /// Where the body phase stopped, and what left the last plugin; at the end of the body
    /// (once every plugin let it through) also the trailers plugins added to it (`Some(None)`:
    /// none), so that no job is needed to ask.
    Body(Step, BytesMut, Option<Option<HeaderMap>>),
    /// Added trailers, if any.
    Trailers(Option<HeaderMap>),
    /// Released body bytes.
    Released(BytesMut),
    /// The plugin's answer to the pause, or `None` while it holds on.
    Resumed(Option<Result<Option<HeaderMap>, LocalResponse>>),
    /// The property is set.
    PropertySet,
    /// The exchange's streams are gone.
    Ended,
}

/// How long an exchange waits for its slot to be free before handing the job to the slot's
/// thread.
const INLINE_WAIT: Duration = Duration::from_micros(20);

/// How long each side of a hand-off watches for the other (yielding its core in between)
/// before parking: the exchange for its answer, the slot thread for the next job (the same
/// exchange's next phase, often).
const HANDOFF_SPIN: Duration = Duration::from_micros(50);

/// What a slot thread is asked to do.
enum Command {
    /// Do `job` for exchange `id` and answer on `reply` (if anyone waits).
    Run {
        id: ExchangeKey,
        job: Job,
        reply: Option<oneshot::Sender<Option<Done>>>,
    },
    /// An event arrived for one of the slot's VMs.
    Wake,
    /// The chain is gone: drop the VMs and end the thread.
    Stop,
}

/// One slot of a chain: its VMs (behind a lock, so that any thread may run them when they are
/// movable) and its thread.
pub(super) struct Slot {
    state: Arc<Mutex<Option<SlotState>>>,
    commands: mpsc::Sender<Command>,
    /// Whether exchanges may run jobs on their own thread.
    inline: bool,
}

impl Slot {
    /// Starts slot `index`'s thread and on it one VM per plugin; returns once they started.
    pub(super) fn spawn(
        index: usize,
        plugins: &[Plugin],
        plan: &Arc<Plan>,
        held: Arc<HeldBudget>,
    ) -> Result<Slot, ChainError> {
        let (commands, receiver) = mpsc::channel();
        let wake_sender = commands.clone();
        let wake: crate::Wake = Arc::new(move || {
            let _ = wake_sender.send(Command::Wake);
        });
        let state = Arc::new(Mutex::new(None));
        let thread_state = state.clone();
        let routes = plan.clone();
        let serve = move |workers| {
            *thread_state.lock() = Some(SlotState::new(workers, routes, held));
            serve(&thread_state, &receiver);
        };
        let inline = !plugins.iter().any(|p| p.engine().thread_bound());
        let with_roots = plugins
            .iter()
            .zip(
                plan.configurations
                    .iter()
                    .cloned()
                    .chain(std::iter::repeat(Vec::new())),
            )
            .map(|(plugin, configurations)| (plugin.clone(), configurations))
            .collect();
        match spawn_workers(format!("filterbox-slot-{index}"), with_roots, wake, serve) {
            Ok(_) => Ok(Slot {
                state,
                commands,
                inline,
            }),
            Err(ThreadStart::Start(error)) => Err(ChainError::Start(error)),
            Err(ThreadStart::Thread(error)) => Err(ChainError::Thread(error)),
        }
    }

    /// Whether a job would run on the calling thread right now: the slot's VMs may run here
    /// and no thread is running them.
    pub(super) fn is_free_here(&self) -> bool {
        self.inline && !self.state.is_locked()
    }

    /// Does `job` for exchange `id`: here if the slot is free and its VMs may run on this
    /// thread, else on the slot's thread. `None` if the slot is gone or the job panicked.
    pub(super) async fn run(&self, id: ExchangeKey, job: Job) -> Option<Done> {
        let job = match self.try_inline(id, job) {
            Ok(done) => return done,
            Err(job) => job,
        };
        let (reply, mut answer) = oneshot::channel();
        let command = Command::Run {
            id,
            job,
            reply: Some(reply),
        };
        self.commands.send(command).ok()?;
        // Most jobs take microseconds: watching for the answer that long is cheaper than
        // parking this thread and being woken (tens of microseconds on a VM).
        let empty =
            |e: &oneshot::error::TryRecvError| matches!(e, oneshot::error::TryRecvError::Empty);
        match watch(|| answer.try_recv(), empty) {
            Ok(done) => return done,
            Err(oneshot::error::TryRecvError::Closed) => return None,
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        answer.await.ok().flatten()
    }

    /// Does `job` for exchange `id` without waiting for the answer (the end of an exchange,
    /// from a `Drop`).
    pub(super) fn run_detached(&self, id: ExchangeKey, job: Job) {
        if let Err(job) = self.try_inline(id, job) {
            let _ = self.commands.send(Command::Run {
                id,
                job,
                reply: None,
            });
        }
    }

    /// Runs `job` on this thread if the slot allows it and nobody else is using it; gives the
    /// job back otherwise.
    fn try_inline(&self, id: ExchangeKey, job: Job) -> Result<Option<Done>, Job> {
        if !self.inline {
            return Err(job);
        }
        // Another thread running a callback here holds the slot for microseconds: waiting
        // that long costs less than handing the job over (two thread wake-ups), and handing
        // over would keep the slot busier still. A slot busy for longer (a slow guest, the
        // slot thread's own work) gets the job through its thread.
        let Some(mut guard) = self.state.try_lock_for(INLINE_WAIT) else {
            return Err(job);
        };
        let Some(state) = guard.as_mut() else {
            return Err(job);
        };
        let done = state.execute(id, job);
        if state.tick_needs_wake() {
            // A callback set a tick period: the slot thread sleeps on the old one.
            let _ = self.commands.send(Command::Wake);
        }
        Ok(done)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
    }
}

/// A slot thread: runs the jobs handed to it, delivers events when woken and ticks when due,
/// until the chain stops; then drops the VMs here, on the thread that made them.
fn serve(state: &Mutex<Option<SlotState>>, commands: &mpsc::Receiver<Command>) {
    let mut just_ran = false;
    loop {
        let tick = {
            let mut guard = state.lock();
            let Some(slot) = guard.as_mut() else {
                return;
            };
            slot.armed_tick = slot.next_tick();
            slot.armed_tick
        };
        // The same exchange's next phase often follows at once.
        let empty = |e: &mpsc::TryRecvError| matches!(e, mpsc::TryRecvError::Empty);
        let watched = match just_ran {
            true => watch(|| commands.try_recv(), empty).ok(),
            false => None,
        };
        let received = match watched {
            Some(command) => Some(command),
            None => match recv_until(commands, tick) {
                Ok(received) => received,
                Err(_) => break,
            },
        };
        just_ran = matches!(received, Some(Command::Run { .. }));
        let mut guard = state.lock();
        let Some(slot) = guard.as_mut() else {
            return;
        };
        let woken = match received {
            Some(Command::Stop) => break,
            Some(Command::Run { id, job, reply }) => {
                let done = slot.execute(id, job);
                if let Some(reply) = reply {
                    let _ = reply.send(done);
                }
                false
            }
            Some(Command::Wake) | None => true,
        };
        if woken || tick.is_some_and(|tick| tick <= Instant::now()) {
            slot.run_due();
            slot.notify_waiters();
        }
    }
    drop(state.lock().take());
}

/// `try_take` until it gives something, fails otherwise than `is_empty`, or
/// [`HANDOFF_SPIN`] passes (then its last answer), yielding the core in between rather than
/// spinning: on a machine with few cores the thread that is to answer may need this one.
fn watch<T, E>(
    mut try_take: impl FnMut() -> Result<T, E>,
    is_empty: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let until = Instant::now() + HANDOFF_SPIN;
    loop {
        match try_take() {
            Err(error) if is_empty(&error) && Instant::now() < until => {
                std::thread::yield_now();
            }
            taken => return taken,
        }
    }
}
