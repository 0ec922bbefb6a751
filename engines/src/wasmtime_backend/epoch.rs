//! Deadlines on wasmtime: one thread advances the epoch of every interruptible engine each
//! millisecond while calls run, and a store's epoch callback asks the call's [`RunClock`]
//! whether it has run its deadline.

use super::StoreData;
use crate::lock;
use crate::{EngineError, RunClock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use wasmtime::{EngineWeak, Store};

/// The epoch period: deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// A deadline far enough away to mean "none" without overflowing the epoch counter.
const NO_DEADLINE: u64 = 1 << 48;

/// Every live interruptible engine; one thread ticks them all.
static TICKED: OnceLock<Mutex<Vec<EngineWeak>>> = OnceLock::new();

/// The epoch thread, once started (to wake it).
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();

/// The epoch thread sleeps: no call ran for [`IDLE_TICKS`] ticks, so it stopped ticking (a
/// thousand wake-ups a second cost an idle process CPU for nothing). The first call that
/// finds it set wakes the thread.
static TICKER_ASLEEP: AtomicBool = AtomicBool::new(false);

/// Ticks without a call before the epoch thread sleeps.
const IDLE_TICKS: u32 = 100;

/// How often the sleeping epoch thread looks for running calls anyway.
const ASLEEP_CHECK: Duration = Duration::from_secs(1);

/// Per thread that calls into an interruptible store: calls started and calls ended. Only
/// the owning thread writes them (no shared cache line is written per call); the epoch thread
/// reads them all.
#[derive(Default)]
struct CallCounts {
    started: AtomicU64,
    ended: AtomicU64,
}

/// The [`CallCounts`] of every thread that made a call (a thread that ended drops out).
static CALLERS: Mutex<Vec<Weak<CallCounts>>> = Mutex::new(Vec::new());

thread_local! {
    static CALLS: Arc<CallCounts> = {
        let counts = Arc::new(CallCounts::default());
        lock(&CALLERS).push(Arc::downgrade(&counts));
        counts
    };
}

/// Marks a call into a store as running on this thread from `enter` until dropped, and wakes
/// the epoch thread if it sleeps, so that the call's deadline is enforced.
pub(super) struct Running;

impl Running {
    pub(super) fn enter() -> Running {
        // A store of the call count, then a load of the flag; the epoch thread stores the
        // flag, then loads the counts. Both orders must hold, so that either this call sees
        // the thread asleep and wakes it, or the thread sees the call and stays awake. With
        // membarrier the epoch thread's barrier orders both sides, and this side, which runs
        // on every call, needs only the compiler not to reorder (a SeqCst store is a locked
        // instruction, some twenty cycles a call); without it both sides are SeqCst. A thread
        // being torn down has no counters left and cannot be running wasm.
        let asymmetric = membarrier::ACTIVE.load(Ordering::Relaxed);
        let _ = CALLS.try_with(|counts| {
            let started = counts.started.load(Ordering::Relaxed).wrapping_add(1);
            match asymmetric {
                true => {
                    counts.started.store(started, Ordering::Relaxed);
                    std::sync::atomic::compiler_fence(Ordering::SeqCst);
                }
                false => counts.started.store(started, Ordering::SeqCst),
            }
        });
        if TICKER_ASLEEP.load(Ordering::SeqCst)
            && TICKER_ASLEEP.swap(false, Ordering::SeqCst)
            && let Some(thread) = TICKER.get()
        {
            thread.unpark();
        }
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = CALLS.try_with(|counts| {
            let ended = counts.ended.load(Ordering::Relaxed);
            counts.ended.store(ended.wrapping_add(1), Ordering::Release);
        });
    }
}

/// Calls started so far on every thread, and whether one is running now.
fn call_activity() -> (u64, bool) {
    let mut callers = lock(&CALLERS);
    let (mut started, mut running) = (0u64, false);
    callers.retain(|weak| match weak.upgrade() {
        Some(counts) => {
            let begun = counts.started.load(Ordering::SeqCst);
            running |= begun != counts.ended.load(Ordering::SeqCst);
            started = started.wrapping_add(begun);
            true
        }
        None => false,
    });
    (started, running)
}

/// The epoch thread: ticks every live engine each [`EPOCH_TICK`] while calls run or ran
/// recently; sleeps after [`IDLE_TICKS`] ticks without one until a call wakes it.
fn tick_epochs() {
    let _ = TICKER.set(std::thread::current());
    let (mut seen, mut idle) = (0u64, 0u32);
    loop {
        std::thread::sleep(EPOCH_TICK);
        if let Some(list) = TICKED.get() {
            lock(list).retain(|weak| match weak.upgrade() {
                Some(engine) => {
                    engine.increment_epoch();
                    true
                }
                None => false,
            });
        }
        let (started, running) = call_activity();
        if running || started != seen {
            (seen, idle) = (started, 0);
            continue;
        }
        idle += 1;
        if idle < IDLE_TICKS {
            continue;
        }
        TICKER_ASLEEP.store(true, Ordering::SeqCst);
        // Every calling thread's count store before this point is visible after it, and its
        // flag load after this point sees the flag (see `Running::enter`).
        membarrier::heavy();
        // A call that began before the flag was up did not see it: look once more.
        if call_activity().1 {
            TICKER_ASLEEP.store(false, Ordering::SeqCst);
            continue;
        }
        while TICKER_ASLEEP.load(Ordering::SeqCst) {
            std::thread::park_timeout(ASLEEP_CHECK);
            // A safety net: a running call the wake-up missed still gets its deadline.
            if call_activity().1 {
                TICKER_ASLEEP.store(false, Ordering::SeqCst);
            }
        }
        idle = 0;
    }
}

/// Adds `engine` to the engines the epoch thread ticks, starting the thread the first time.
/// The thread holds only weak references, so dropping an engine takes it off the list.
pub(super) fn tick_epochs_of(engine: &wasmtime::Engine) -> Result<(), EngineError> {
    let mut started = Ok(());
    let list = TICKED.get_or_init(|| {
        // Before any call can run on this engine, so that `Running::enter` and the epoch
        // thread agree on which fences they use.
        membarrier::register();
        started = std::thread::Builder::new()
            .name("filterbox-epoch".into())
            .spawn(tick_epochs)
            .map(drop)
            .map_err(|e| EngineError::Config(format!("cannot start the epoch thread: {e}")));
        Mutex::new(Vec::new())
    });
    started?;
    lock(list).push(engine.weak());
    Ok(())
}

/// Epoch ticks that cover `left` (at least one: a deadline is never now).
fn ticks_for(left: Duration) -> u64 {
    u64::try_from(left.as_nanos().div_ceil(EPOCH_TICK.as_nanos()))
        .unwrap_or(NO_DEADLINE)
        .clamp(1, NO_DEADLINE)
}

/// Starts `deadline` for the store's next call: the epoch first fires one tick in, so that
/// the call's [`RunClock`] reads the thread's CPU clock; see [`on_epoch_deadline`].
pub(super) fn arm<H>(store: &mut Store<StoreData<H>>, deadline: Option<Duration>) {
    let clock = deadline.and_then(RunClock::from_first_tick);
    let armed = match clock {
        Some(_) => 1,
        None => NO_DEADLINE,
    };
    store.data_mut().clock = clock;
    store.set_epoch_deadline(armed);
}

/// The epoch callback: stop the call once its clock says it has run its deadline, else wait
/// for what is left of it.
pub(super) fn on_epoch_deadline(clock: Option<&mut RunClock>) -> wasmtime::UpdateDeadline {
    use wasmtime::UpdateDeadline::{Continue, Interrupt};
    let Some(clock) = clock else {
        return Continue(NO_DEADLINE);
    };
    let now = Instant::now();
    clock.read_cpu();
    match clock.passed(now) {
        true => Interrupt,
        false => Continue(ticks_for(clock.left(now))),
    }
}

/// The process-wide memory barrier of Linux's `membarrier(2)`: the epoch thread, which goes
/// to sleep rarely, pays for a full barrier on every running thread of the process, so that
/// the calls, which run often, need none (an asymmetric Dekker fence).
mod membarrier {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Whether the process registered for expedited private barriers, which `heavy` then
    /// issues. Without it (another OS, an old kernel, a sandbox that refuses the syscall)
    /// both sides use SeqCst fences.
    pub(super) static ACTIVE: AtomicBool = AtomicBool::new(false);

    #[cfg(target_os = "linux")]
    const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    #[cfg(target_os = "linux")]
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    /// Registers the process for expedited private barriers (once, before the first call).
    pub(super) fn register() {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: membarrier takes plain integers and touches no memory of ours; an
            // unsupported command returns -1 with errno set, nothing else happens.
            let result =
                unsafe { libc::syscall(libc::SYS_membarrier, CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) };
            if result == 0 {
                ACTIVE.store(true, Ordering::SeqCst);
            }
        }
    }

    /// A full memory barrier on every running thread of the process. With registration
    /// refused, the SeqCst accesses on both sides order them and a fence here is enough. (A
    /// registered command does not fail; were it to, a call that began as the thread fell
    /// asleep would get its deadline from the sleeping thread's check a second later.)
    pub(super) fn heavy() {
        #[cfg(target_os = "linux")]
        if ACTIVE.load(Ordering::Relaxed) {
            // SAFETY: as in `register`; the command was registered for this process.
            let result = unsafe { libc::syscall(libc::SYS_membarrier, CMD_PRIVATE_EXPEDITED, 0, 0) };
            if result == 0 {
                return;
            }
        }
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}
