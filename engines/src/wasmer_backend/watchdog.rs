//! Deadlines on wasmer: a watchdog thread interrupts a call that has run past its deadline
//! (metering alone counts operators, not time), by the wall clock and the CPU clock of the
//! call's thread.

use crate::{EngineError, RunClock, ThreadCpuClock, lock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the watchdog looks for calls past their deadline.
const WATCHDOG_TICK: Duration = Duration::from_millis(1);

/// How long the watchdog waits before interrupting a call again that its first interrupt did
/// not end. Every interrupt is a signal that wasmer turns into a trap wherever it lands on
/// the wasm stack, its own runtime code around hostcalls included; one per call (and a
/// rare retry) keeps that chance small. A call looping through hostcalls needs none: every
/// hostcall checks the deadline first.
const RESEND_AFTER: Duration = Duration::from_millis(100);

/// A call being watched: its deadline and how to interrupt its store.
struct Watched {
    id: u64,
    /// The call's deadline, counted as on the other engines.
    clock: RunClock,
    /// The CPU clock of the call's thread (the watchdog runs on another thread).
    cpu: Option<ThreadCpuClock>,
    interrupter: wasmer::Interrupter,
    /// Set while the call runs a hostcall: no signal then (the hostcall checks the deadline
    /// itself, and wasmer traps as it returns to an interrupted store).
    in_host: Arc<AtomicBool>,
    /// When the last interrupt was sent.
    sent: Option<Instant>,
}

impl Watched {
    /// Whether the call has run for its budget, as [`RunClock::passed`] counts it with the
    /// CPU clock of the call's thread. The first reading of that clock is taken at the
    /// watchdog's first look at the call, however soon (as wasmtime's first epoch tick does).
    fn overdue(&mut self, now: Instant) -> bool {
        let cpu = self.cpu;
        let read = || cpu.and_then(ThreadCpuClock::read);
        self.clock.read_cpu_with(read);
        self.clock.passed_with(now, read)
    }
}

/// The calls running under a deadline, and the next watch id.
struct Watchlist {
    calls: Vec<Watched>,
    next_id: u64,
    /// The watchdog found no call and sleeps until one is watched (so that an idle process
    /// does not wake a thousand times a second).
    asleep: bool,
}

/// The watchdog thread, to wake it.
static WATCHDOG: OnceLock<std::thread::Thread> = OnceLock::new();

/// How long the sleeping watchdog waits before it looks at the list anyway.
const ASLEEP_CHECK: Duration = Duration::from_secs(1);

static WATCHLIST: OnceLock<Result<Mutex<Watchlist>, String>> = OnceLock::new();

/// The watchlist, starting the watchdog thread the first time. Metering counts operators at a
/// fixed rate, which a loaded or slow machine stretches into seconds; the watchdog interrupts
/// (a signal to the running thread, wasmer's `experimental-host-interrupt`) any call still
/// running a tick after its deadline and not inside a hostcall, and again every
/// [`RESEND_AFTER`] until the call ends.
fn watchlist() -> Result<&'static Mutex<Watchlist>, EngineError> {
    let list = WATCHLIST.get_or_init(|| {
        std::thread::Builder::new()
            .name("filterbox-wasmer-watchdog".into())
            .spawn(|| {
                let _ = WATCHDOG.set(std::thread::current());
                loop {
                    let asleep = match WATCHLIST.get() {
                        Some(Ok(list)) => {
                            // The interrupt is sent with the lock held: a call removes its
                            // entry under the same lock once it has returned, so no interrupt
                            // meant for one call can reach the next call on the same store.
                            let mut list = lock(list);
                            let now = Instant::now();
                            for call in list.calls.iter_mut() {
                                let resend = call
                                    .sent
                                    .is_none_or(|sent| now.duration_since(sent) >= RESEND_AFTER);
                                // `overdue` first: it takes the first CPU reading of a new call.
                                if call.overdue(now)
                                    && resend
                                    && !call.in_host.load(Ordering::Acquire)
                                {
                                    call.interrupter.interrupt();
                                    call.sent = Some(now);
                                }
                            }
                            list.asleep = list.calls.is_empty();
                            list.asleep
                        }
                        _ => false,
                    };
                    // Asleep, a watched call unparks the thread (or the check comes anyway).
                    match asleep {
                        true => std::thread::park_timeout(ASLEEP_CHECK),
                        false => std::thread::sleep(WATCHDOG_TICK),
                    }
                }
            })
            .map(|_| {
                Mutex::new(Watchlist {
                    calls: Vec::new(),
                    next_id: 0,
                    asleep: false,
                })
            })
            .map_err(|e| format!("cannot start the wasmer watchdog thread: {e}"))
    });
    list.as_ref().map_err(|e| EngineError::Config(e.clone()))
}

/// A call on the watchlist; dropping it (after the call returned) takes it off.
pub(super) struct Watch {
    id: u64,
    list: &'static Mutex<Watchlist>,
}

impl Watch {
    /// Watches the next call on `store`, made on this thread, for `budget`; `None` when there
    /// is no budget or the watchdog could not start (metering still bounds the call then).
    /// `in_host` is set while the call runs a hostcall.
    pub(super) fn start(
        store: &wasmer::Store,
        budget: Option<Duration>,
        in_host: &Arc<AtomicBool>,
    ) -> Option<Watch> {
        let clock = RunClock::start(budget?)?;
        let cpu = ThreadCpuClock::current();
        let list = watchlist().ok()?;
        let mut guard = lock(list);
        let id = guard.next_id;
        guard.next_id = id.wrapping_add(1);
        guard.calls.push(Watched {
            id,
            clock,
            cpu,
            interrupter: store.interrupter(),
            in_host: in_host.clone(),
            sent: None,
        });
        if std::mem::take(&mut guard.asleep)
            && let Some(watchdog) = WATCHDOG.get()
        {
            watchdog.unpark();
        }
        Some(Watch { id, list })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(self.list).calls.retain(|c| c.id != self.id);
    }
}
