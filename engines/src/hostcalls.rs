//! The host side of the imports: what a hostcall sees of its caller, and the trait the
//! host implements, generated from the ABI table.

use crate::{GuestMemory, MemoryError, Trap, TrapKind};
use filterbox_abi::Import;

/// What a guest sees of its caller from inside a hostcall: the host state, its own memory
/// (checked), and its allocator. Engines implement it; hostcalls take `&mut dyn Caller<H>`.
pub trait Caller<H> {
    /// The host state.
    fn host(&mut self) -> &mut H;
    /// The guest's memory. Empty if the module has none (every access then fails).
    fn memory(&mut self) -> GuestMemory<'_>;
    /// Host state and memory at once.
    fn split(&mut self) -> (&mut H, GuestMemory<'_>);
    /// Makes the guest trap with `trap` as soon as the current hostcall returns (WASI
    /// `proc_exit`). The instance fails like on any trap.
    fn trap(&mut self, trap: Trap);
    /// Calls the guest allocator for `size` (> 0) bytes and checks that the whole returned
    /// range is inside memory before the host writes through it. A trap in the allocator fails
    /// the instance once the hostcall returns.
    fn allocate(&mut self, size: u32) -> Result<u32, MemoryError>;
    /// Whether the running call is past its deadline. Checked before every hostcall, so a
    /// loop whose body is a hostcall stops in time on engines that measure deadlines by
    /// counting work (wasmi's fuel, wasmer's metering) and do not count the host's share.
    fn deadline_passed(&mut self) -> bool {
        false
    }
}

macro_rules! default_body {
    (i32, $cx:ident, $import:expr) => {
        Self::unimplemented($cx, $import)
    };
    ((), $cx:ident, $import:expr) => {{
        let _ = Self::unimplemented($cx, $import);
    }};
}

macro_rules! define_hostcalls_trait {
    ($($variant:ident : $module:ident $name:ident ( $($arg:ident : $ty:ident),* ) -> $ret:tt , $vers:ident ;)*) => {
        /// The host side of every import in the ABI table, one method per import, generated
        /// from [`abi::for_each_import!`](filterbox_abi::for_each_import). Arguments are the raw wasm values. Methods not
        /// overridden call [`Hostcalls::unimplemented`].
        #[allow(unused_variables)]
        pub trait Hostcalls: Sized + Send + 'static {
            /// Result of an import the implementation does not provide: a `proxy_*` call
            /// should answer `Status::Unimplemented`, a WASI call `ENOSYS`.
            fn unimplemented(cx: &mut dyn Caller<Self>, import: Import) -> i32;

            /// Runs before every import: `Some(answer)` answers the call with `answer` (for
            /// an import that returns nothing, just returns) instead of running it, which is
            /// how a host refuses calls by phase or capability. By default every call runs.
            fn admit(cx: &mut dyn Caller<Self>, import: Import) -> Option<i32> {
                None
            }

            /// Runs after every import with its raw arguments and its result (`None` for an
            /// import that returns nothing), whether it ran or `admit` answered it: the place
            /// for a hostcall trace. By default nothing.
            fn returned(cx: &mut dyn Caller<Self>, import: Import, args: &[i64], result: Option<i32>) {}

            $(
                #[doc = concat!("`", stringify!($module), ".", stringify!($name), "`")]
                fn $name(cx: &mut dyn Caller<Self>, $($arg: $ty),*) -> $ret {
                    default_body!($ret, cx, Import::$variant)
                }
            )*
        }
    };
}
filterbox_abi::for_each_import!(define_hostcalls_trait);

/// A hostcall result that an [`Hostcalls::admit`] answer can stand in for.
pub(crate) trait FromAnswer {
    fn from_answer(answer: i32) -> Self;
    fn answer(&self) -> Option<i32>;
}

impl FromAnswer for i32 {
    fn from_answer(answer: i32) -> Self {
        answer
    }

    fn answer(&self) -> Option<i32> {
        Some(*self)
    }
}

impl FromAnswer for () {
    fn from_answer(_: i32) -> Self {}

    fn answer(&self) -> Option<i32> {
        None
    }
}

/// Runs one import through [`Hostcalls::admit`] and then, if admitted, its method; then
/// [`Hostcalls::returned`].
pub(crate) fn dispatch<H: Hostcalls, R: FromAnswer>(
    cx: &mut dyn Caller<H>,
    import: Import,
    args: &[i64],
    call: impl FnOnce(&mut dyn Caller<H>) -> R,
) -> R {
    if cx.deadline_passed() {
        cx.trap(Trap {
            kind: TrapKind::Interrupted,
            message: format!("deadline passed before the hostcall {}", import.name()),
        });
        // The answer is never seen: the guest traps as the hostcall returns.
        return R::from_answer(-1);
    }
    let result = match H::admit(cx, import) {
        Some(answer) => R::from_answer(answer),
        None => call(cx),
    };
    H::returned(cx, import, args, result.answer());
    result
}

/// The [`Caller`] methods wasmtime's and wasmi's callers write alike (their `Caller` and
/// `Memory` types have the same shape): for a struct with a `caller` field whose store data
/// holds `host`, `memory` and `pending_trap`.
#[cfg(any(feature = "wasmtime", feature = "wasmi"))]
macro_rules! store_caller_basics {
    () => {
        fn host(&mut self) -> &mut H {
            &mut self.caller.data_mut().host
        }

        fn memory(&mut self) -> GuestMemory<'_> {
            match self.caller.data().memory {
                Some(memory) => GuestMemory::new(memory.data_mut(&mut *self.caller)),
                None => GuestMemory::empty(),
            }
        }

        fn split(&mut self) -> (&mut H, GuestMemory<'_>) {
            match self.caller.data().memory {
                Some(memory) => {
                    let (bytes, data) = memory.data_and_store_mut(&mut *self.caller);
                    (&mut data.host, GuestMemory::new(bytes))
                }
                None => (&mut self.caller.data_mut().host, GuestMemory::empty()),
            }
        }

        fn trap(&mut self, trap: Trap) {
            self.caller.data_mut().pending_trap = Some(trap);
        }
    };
}
#[cfg(any(feature = "wasmtime", feature = "wasmi"))]
pub(crate) use store_caller_basics;

/// What a backend's caller keeps beside [`Caller`]: the trap a nested guest call (the
/// allocator) or [`Caller::trap`] left for the outer call.
pub(crate) trait PendingTrap {
    fn take_pending_trap(&mut self) -> Option<Trap>;
}

/// Runs one import for a backend's host function: through [`dispatch`], with a panic turned
/// into a host trap (it never unwinds through wasm frames), and a trap left pending during
/// the call failing the outer call. The backend turns the `Err` into its own error type.
pub(crate) fn run_import<H: Hostcalls, C: Caller<H> + PendingTrap, R: FromAnswer>(
    cx: &mut C,
    import: Import,
    args: &[i64],
    call: impl FnOnce(&mut dyn Caller<H>) -> R,
) -> Result<R, Trap> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dispatch(&mut *cx, import, args, call)
    }));
    let value = result.map_err(|panic| crate::panic_trap(import.name(), &*panic))?;
    match cx.take_pending_trap() {
        Some(trap) => Err(trap),
        None => Ok(value),
    }
}
