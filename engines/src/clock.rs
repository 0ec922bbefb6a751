//! Clocks for call deadlines.

use std::time::Duration;

/// The CPU time the calling thread has run, where the platform keeps a clock for it
/// (`CLOCK_THREAD_CPUTIME_ID` on unixes); `None` elsewhere.
#[cfg(all(unix, any(feature = "wasmtime", feature = "wasmi", feature = "wasmer")))]
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    read_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The time on clock `id`; `None` if the clock cannot be read (a thread's clock after the
/// thread ended).
#[cfg(all(unix, any(feature = "wasmtime", feature = "wasmi", feature = "wasmer")))]
fn read_clock(id: libc::clockid_t) -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable `timespec` for the length of the call; an id that
    // names no clock makes the call fail (checked), and it writes nothing else.
    let status = unsafe { libc::clock_gettime(id, &mut now) };
    if status != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(now.tv_sec).ok()?,
        u32::try_from(now.tv_nsec).ok()?,
    ))
}

/// A thread's CPU clock, which another thread can read (wasmer's watchdog reads the clock of
/// the thread running a watched call).
#[cfg(feature = "wasmer")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThreadCpuClock {
    #[cfg(unix)]
    id: libc::clockid_t,
}

#[cfg(feature = "wasmer")]
impl ThreadCpuClock {
    /// The calling thread's CPU clock; `None` where the platform keeps none.
    #[cfg(unix)]
    pub(crate) fn current() -> Option<ThreadCpuClock> {
        let mut id: libc::clockid_t = 0;
        // SAFETY: `pthread_self` is the calling thread, alive for the call; `id` is a valid,
        // writable `clockid_t`, the only thing the call writes.
        let status = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) };
        (status == 0).then_some(ThreadCpuClock { id })
    }

    /// The CPU time the thread has run; `None` if its clock cannot be read.
    #[cfg(unix)]
    pub(crate) fn read(self) -> Option<Duration> {
        read_clock(self.id)
    }

    /// No thread CPU clock here.
    #[cfg(not(unix))]
    pub(crate) fn current() -> Option<ThreadCpuClock> {
        None
    }

    /// No thread CPU clock here.
    #[cfg(not(unix))]
    pub(crate) fn read(self) -> Option<Duration> {
        None
    }
}

/// A call's deadline, counted in the time its thread runs. Past the deadline on the wall
/// clock, the thread's CPU clock decides whether the call ran that long or its thread was
/// preempted (a loaded machine, a busy proxy thread); then it goes on for what it has not
/// run, up to [`RunClock::WALL_DEADLINES`] deadlines on the wall clock. The CPU clock is read
/// first a millisecond or more into the call (at wasmtime's first epoch tick, or wasmi's first
/// check after that), so short calls never read it; what ran before counts as one millisecond.
/// On wasmtime the wall clock too is first read at that tick (the call is taken to have
/// started a millisecond before), so a call that ends sooner reads no clock at all.
/// Without a CPU clock, the wall clock decides.
#[cfg(any(feature = "wasmtime", feature = "wasmi", feature = "wasmer"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunClock {
    /// When the call started; `None` until the first reading of a clock made with
    /// [`RunClock::from_first_tick`].
    start: Option<std::time::Instant>,
    budget: Duration,
    /// The thread's CPU clock at the first reading.
    first: FirstReading,
    /// When the call is next past its deadline on the wall clock (`None` with `start`).
    due: Option<std::time::Instant>,
}

/// The first reading of a call's CPU clock.
#[cfg(any(feature = "wasmtime", feature = "wasmi", feature = "wasmer"))]
#[derive(Debug, Clone, Copy)]
enum FirstReading {
    NotYet,
    Cpu(Duration),
    /// The platform keeps no CPU clock for threads.
    NoClock,
}

#[cfg(any(feature = "wasmtime", feature = "wasmi", feature = "wasmer"))]
impl RunClock {
    /// The wall clock a call lasts at most, in deadlines.
    const WALL_DEADLINES: u32 = 10;

    /// When the CPU clock is first read; what the call did before counts as this much running.
    const FIRST_READING: Duration = Duration::from_millis(1);

    /// A budget past this is no deadline (a clock that could not represent its end).
    #[cfg(feature = "wasmtime")]
    const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);

    /// A clock for a call of `budget` starting now; `None` for a budget too far to represent.
    #[cfg(any(feature = "wasmi", feature = "wasmer"))]
    pub(crate) fn start(budget: Duration) -> Option<RunClock> {
        let start = std::time::Instant::now();
        let due = start.checked_add(budget)?;
        Some(RunClock {
            start: Some(start),
            budget,
            first: FirstReading::NotYet,
            due: Some(due),
        })
    }

    /// A clock for a call of `budget` whose start is taken at its first reading (wasmtime's
    /// first epoch tick, at most a tick into the call), as [`RunClock::FIRST_READING`] before
    /// it: a call that ends before the tick never reads the wall clock. `None` for a budget
    /// too far to represent.
    #[cfg(feature = "wasmtime")]
    pub(crate) fn from_first_tick(budget: Duration) -> Option<RunClock> {
        (budget < Self::LONGEST).then_some(RunClock {
            start: None,
            budget,
            first: FirstReading::NotYet,
            due: None,
        })
    }

    /// The call's start and when it is next due, taking them at `now` on the first reading.
    fn started(&mut self, now: std::time::Instant) -> (std::time::Instant, std::time::Instant) {
        match (self.start, self.due) {
            (Some(start), Some(due)) => (start, due),
            _ => {
                let start = now.checked_sub(Self::FIRST_READING).unwrap_or(now);
                let due = start.checked_add(self.budget).unwrap_or(now);
                (self.start, self.due) = (Some(start), Some(due));
                (start, due)
            }
        }
    }

    /// How long until the call is next due on the wall clock.
    #[cfg(any(feature = "wasmtime", feature = "wasmi"))]
    pub(crate) fn left(&mut self, now: std::time::Instant) -> Duration {
        let (_, due) = self.started(now);
        due.saturating_duration_since(now)
    }

    /// Takes the first reading of the CPU clock now, if it has not been taken.
    #[cfg(feature = "wasmtime")]
    pub(crate) fn read_cpu(&mut self) {
        self.read_cpu_with(thread_cpu_time);
    }

    /// Takes the first reading of the CPU clock now, if it has not been taken, with the CPU
    /// time of the call's thread read by `cpu`.
    pub(crate) fn read_cpu_with(&mut self, cpu: impl Fn() -> Option<Duration>) {
        if let FirstReading::NotYet = self.first {
            self.first = match cpu() {
                Some(cpu) => FirstReading::Cpu(cpu),
                None => FirstReading::NoClock,
            };
        }
    }

    /// Whether the call, running on the calling thread, has run for its budget, with `now`
    /// from the wall clock.
    pub(crate) fn passed(&mut self, now: std::time::Instant) -> bool {
        self.passed_with(now, thread_cpu_time)
    }

    /// [`RunClock::passed`] with the CPU time of the call's thread read by `cpu` (wasmer's
    /// watchdog reads the clock of the thread it watches).
    pub(crate) fn passed_with(
        &mut self,
        now: std::time::Instant,
        cpu: impl Fn() -> Option<Duration>,
    ) -> bool {
        let (start, due) = self.started(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Self::FIRST_READING {
            self.read_cpu_with(&cpu);
        }
        if now < due {
            return false;
        }
        if elapsed >= self.budget.saturating_mul(Self::WALL_DEADLINES) {
            return true;
        }
        let ran = match self.first {
            FirstReading::Cpu(first) => cpu().map_or(elapsed, |cpu| {
                Self::FIRST_READING + cpu.saturating_sub(first)
            }),
            FirstReading::NotYet | FirstReading::NoClock => elapsed,
        };
        if ran >= self.budget {
            return true;
        }
        if let Some(next) = now.checked_add(self.budget - ran) {
            self.due = Some(next);
        }
        false
    }
}

/// See the unix version: no thread CPU clock here, deadlines count wall time.
#[cfg(all(
    not(unix),
    any(feature = "wasmtime", feature = "wasmi", feature = "wasmer")
))]
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    None
}
