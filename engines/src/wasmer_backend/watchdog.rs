//! Wall-clock deadlines on wasmer: a watchdog thread interrupts a call still running a tick
//! after its deadline (metering alone counts operators, not time).

use crate::lock;
use crate::EngineError;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the watchdog looks for calls past their deadline.
const WATCHDOG_TICK: Duration = Duration::from_millis(1);

/// A call being watched: its deadline and how to interrupt its store.
struct Watched {
    id: u64,
    deadline: Instant,
    interrupter: wasmer::Interrupter,
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
/// running a tick after its deadline, and again every tick until the call ends.
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
                            for call in list.calls.iter().filter(|c| c.deadline <= now) {
                                call.interrupter.interrupt();
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
    /// Watches the next call on `store` until `deadline`; `None` when there is no deadline or
    /// the watchdog could not start (metering still bounds the call then).
    pub(super) fn start(store: &wasmer::Store, deadline: Option<Instant>) -> Option<Watch> {
        let deadline = deadline?;
        let list = watchlist().ok()?;
        let mut guard = lock(list);
        let id = guard.next_id;
        guard.next_id = id.wrapping_add(1);
        guard.calls.push(Watched {
            id,
            deadline,
            interrupter: store.interrupter(),
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

