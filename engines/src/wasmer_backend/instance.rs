//! A wasmer instance: usable only on the thread that made it, its callbacks called as typed
//! functions under a metering budget and the watchdog.

use super::{StoreData, Watch, classify, points_for};
use crate::backend::BackendInstance;
use crate::{EngineError, Hostcalls, Returned, RunClock, Trap, TrapKind};
use filterbox_abi::Callback;
use std::mem::ManuallyDrop;
use std::time::Duration;
use wasmer::{Function, FunctionEnv, Global, RuntimeError, Store, TypedFunction, Value};

/// A wasmer instance and the thread that made it. wasmer 7's store is not `Send` (its
/// `on_called` hook is a non-`Send` boxed closure and its objects hold raw pointers), so the
/// instance is only ever touched on that thread: every method checks the calling thread
/// first, and a drop elsewhere leaks the instance rather than free it there. Moving the
/// wrapper between threads copies its bytes and touches nothing it points to, which is what
/// lets filterbox keep wasmer VMs beside `Send` ones in one structure (they stay on their
/// home thread; the others may run on any).
pub(crate) struct WrInstance<H: 'static> {
    home: std::thread::ThreadId,
    bound: ManuallyDrop<Bound<H>>,
}

// SAFETY: `bound` (the only non-`Send` part) is read, written and dropped only on `home`:
// `bound()`/`bound_mut()` are its only accessors and check the current thread, and `Drop`
// leaks it on any other thread. Sending the wrapper therefore never makes two threads use
// the store, nor one thread use it while another holds references into it.
unsafe impl<H: Send + 'static> Send for WrInstance<H> {}

impl<H: 'static> Drop for WrInstance<H> {
    fn drop(&mut self) {
        if self.is_home() {
            // SAFETY: dropped once, here, on its home thread; `bound` is not used after.
            unsafe { ManuallyDrop::drop(&mut self.bound) }
        }
        // Elsewhere the store is leaked: freeing it off its thread is what must not happen.
    }
}

/// Everything of a wasmer instance that must stay on the thread that made it.
struct Bound<H: 'static> {
    store: Store,
    env: FunctionEnv<StoreData<H>>,
    funcs: Vec<Option<Typed>>,
    /// The metering globals (points left, exhausted flag) when metering is compiled in.
    points: Option<(Global, Global)>,
    /// Points each call may spend.
    deadline_points: u64,
    /// How long each call may run in wall-clock time.
    deadline: Option<Duration>,
    interruptible: bool,
}

/// A callback export as a typed function, so a call allocates nothing (wasmer's untyped
/// `Function::call` boxes its results). One variant per shape the callback table has:
/// `V` returns nothing, `R` returns an i32; the digit is the number of i32 parameters.
pub(super) enum Typed {
    V0(TypedFunction<(), ()>),
    R0(TypedFunction<(), i32>),
    V1(TypedFunction<i32, ()>),
    R1(TypedFunction<i32, i32>),
    V2(TypedFunction<(i32, i32), ()>),
    R2(TypedFunction<(i32, i32), i32>),
    V3(TypedFunction<(i32, i32, i32), ()>),
    R3(TypedFunction<(i32, i32, i32), i32>),
    V5(TypedFunction<(i32, i32, i32, i32, i32), ()>),
}

impl Typed {
    pub(super) fn new(
        func: &Function,
        store: &Store,
        arity: usize,
        returns: bool,
    ) -> Result<Typed, EngineError> {
        let bad = |e: RuntimeError| EngineError::Instantiate(e.message());
        Ok(match (arity, returns) {
            (0, false) => Typed::V0(func.typed(store).map_err(bad)?),
            (0, true) => Typed::R0(func.typed(store).map_err(bad)?),
            (1, false) => Typed::V1(func.typed(store).map_err(bad)?),
            (1, true) => Typed::R1(func.typed(store).map_err(bad)?),
            (2, false) => Typed::V2(func.typed(store).map_err(bad)?),
            (2, true) => Typed::R2(func.typed(store).map_err(bad)?),
            (3, false) => Typed::V3(func.typed(store).map_err(bad)?),
            (3, true) => Typed::R3(func.typed(store).map_err(bad)?),
            (5, false) => Typed::V5(func.typed(store).map_err(bad)?),
            _ => {
                return Err(EngineError::Instantiate(format!(
                    "no typed call for {arity} params"
                )));
            }
        })
    }

    fn call(&self, store: &mut Store, a: [i32; 5]) -> Result<Returned, RuntimeError> {
        let [a, b, c, d, e] = a;
        Ok(match self {
            Typed::V0(f) => f.call(store).map(|()| Returned::Nothing)?,
            Typed::R0(f) => Returned::Value(f.call(store)?),
            Typed::V1(f) => f.call(store, a).map(|()| Returned::Nothing)?,
            Typed::R1(f) => Returned::Value(f.call(store, a)?),
            Typed::V2(f) => f.call(store, a, b).map(|()| Returned::Nothing)?,
            Typed::R2(f) => Returned::Value(f.call(store, a, b)?),
            Typed::V3(f) => f.call(store, a, b, c).map(|()| Returned::Nothing)?,
            Typed::R3(f) => Returned::Value(f.call(store, a, b, c)?),
            Typed::V5(f) => f.call(store, a, b, c, d, e).map(|()| Returned::Nothing)?,
        })
    }
}

impl<H: 'static> WrInstance<H> {
    /// An instance at home on the calling thread, with no deadline set yet.
    pub(super) fn new(
        store: Store,
        env: FunctionEnv<StoreData<H>>,
        funcs: Vec<Option<Typed>>,
        points: Option<(Global, Global)>,
        interruptible: bool,
    ) -> WrInstance<H> {
        WrInstance {
            home: std::thread::current().id(),
            bound: ManuallyDrop::new(Bound {
                store,
                env,
                funcs,
                points,
                deadline_points: u64::MAX,
                deadline: None,
                interruptible,
            }),
        }
    }

    /// Whether the calling thread is the one that made the instance.
    pub(crate) fn is_home(&self) -> bool {
        std::thread::current().id() == self.home
    }

    fn bound(&self) -> Option<&Bound<H>> {
        self.is_home().then_some(&*self.bound)
    }

    fn bound_mut(&mut self) -> Option<&mut Bound<H>> {
        match self.is_home() {
            true => Some(&mut *self.bound),
            false => None,
        }
    }
}

/// What a wasmer instance moved off its home thread answers a call with.
fn away_from_home() -> Trap {
    Trap {
        kind: TrapKind::Other,
        message: "a wasmer instance was used on a thread other than the one that made it".into(),
    }
}

/// What `host()` says when it cannot answer.
const AWAY_FROM_HOME: &str =
    "a wasmer instance's host state was used on a thread other than the one that made it";

impl<H: Hostcalls> BackendInstance<H> for WrInstance<H> {
    fn has(&self, callback: Callback) -> bool {
        self.bound().is_some_and(|b| b.has(callback))
    }

    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        match self.bound_mut() {
            Some(bound) => bound.call(callback, args),
            None => Err(away_from_home()),
        }
    }

    fn set_deadline(&mut self, deadline: Option<Duration>) {
        if let Some(bound) = self.bound_mut() {
            bound.set_deadline(deadline);
        }
    }

    fn host(&self) -> &H {
        match self.bound() {
            Some(bound) => bound.host(),
            None => panic!("{AWAY_FROM_HOME}"),
        }
    }

    fn host_mut(&mut self) -> &mut H {
        match self.bound_mut() {
            Some(bound) => bound.host_mut(),
            None => panic!("{AWAY_FROM_HOME}"),
        }
    }

    fn memory_size(&mut self) -> usize {
        self.bound_mut().map_or(0, Bound::memory_size)
    }

    fn is_home(&self) -> bool {
        WrInstance::is_home(self)
    }
}

impl<H: Hostcalls> Bound<H> {
    fn has(&self, callback: Callback) -> bool {
        matches!(self.funcs.get(callback as usize), Some(Some(_)))
    }

    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        let Some(Some(func)) = self.funcs.get(callback as usize) else {
            return Ok(Returned::Missing);
        };
        let mut params = [0; 5];
        for (slot, arg) in params.iter_mut().zip(args) {
            *slot = *arg;
        }
        if let Some((left, exhausted)) = &self.points {
            // The globals were made by the middleware with these types; a failed set would
            // leave the previous budget, never an unbounded one.
            let _ = left.set(&mut self.store, Value::I64(self.deadline_points as i64));
            let _ = exhausted.set(&mut self.store, Value::I32(0));
        }
        let budget = self.deadline.filter(|_| self.interruptible);
        self.env.as_mut(&mut self.store).deadline = budget.and_then(RunClock::start);
        let watch = Watch::start(&self.store, budget, &self.env.as_ref(&self.store).in_host);
        let outcome = func.call(&mut self.store, params);
        drop(watch);
        let data = self.env.as_mut(&mut self.store);
        data.pending_trap = None;
        data.deadline = None;
        outcome.map_err(|e| {
            let mut trap = classify(&e);
            if self.points_exhausted() {
                trap.kind = TrapKind::Interrupted;
                trap.message = "metering budget of the deadline used up".into();
            }
            trap
        })
    }

    fn points_exhausted(&mut self) -> bool {
        match &self.points {
            Some((_, exhausted)) => matches!(exhausted.get(&mut self.store), Value::I32(1)),
            None => false,
        }
    }

    fn set_deadline(&mut self, deadline: Option<Duration>) {
        self.deadline_points = points_for(deadline);
        self.deadline = deadline;
    }

    fn host(&self) -> &H {
        &self.env.as_ref(&self.store).host
    }

    fn host_mut(&mut self) -> &mut H {
        &mut self.env.as_mut(&mut self.store).host
    }

    fn memory_size(&mut self) -> usize {
        match &self.env.as_ref(&self.store).memory {
            Some(m) => m.view(&self.store).data_size() as usize,
            None => 0,
        }
    }
}
