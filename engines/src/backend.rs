//! What a backend provides, and the macro that turns the backend list (in `lib.rs`) into
//! [`EngineKind`](crate::EngineKind) and the enums the public types dispatch through.
//!
//! Adding an engine: a file implementing [`Backend`] and [`BackendInstance`], one entry in
//! the list, and a cargo feature.

use crate::{EngineConfig, EngineError, EngineKind, Hostcalls, InstanceLimits, Returned, Trap};
use filterbox_abi::{AbiVersion, Callback};
use std::time::Duration;

/// One wasm engine behind filterbox's types. Every method is called through the enums the
/// backend list generates; nothing else sees the backend's types.
pub(crate) trait Backend {
    /// A configured engine; cheap to clone.
    type Engine: Clone + Send + Sync;
    /// A compiled module; cheap to clone.
    type Module: Clone + Send + Sync;
    /// A module linked with a host's imports, ready to instantiate.
    type InstancePre<H: Hostcalls>: Clone + Send + Sync;
    /// One instance with its host state.
    type Instance<H: Hostcalls>: BackendInstance<H> + Send;

    /// Makes the engine `kind` (one of this backend's) with `config`.
    fn new_engine(kind: EngineKind, config: &EngineConfig) -> Result<Self::Engine, EngineError>;

    /// Compiles `wasm`; its imports and exports were parsed already.
    fn compile(engine: &Self::Engine, wasm: &[u8]) -> Result<Self::Module, EngineError>;

    /// What, beside the engine's name, decides whether a compiled artifact fits this engine;
    /// `None` (the default) for a backend that cannot serialize modules.
    fn fingerprint(_engine: &Self::Engine) -> Option<String> {
        None
    }

    /// Loads an artifact that [`Backend::serialize`] wrote with the same fingerprint.
    fn deserialize(_engine: &Self::Engine, _artifact: &[u8]) -> Result<Self::Module, String> {
        Err("engine cannot load artifacts".into())
    }

    /// The module as an artifact for the module cache.
    fn serialize(_module: &Self::Module) -> Result<Vec<u8>, String> {
        Err("engine cannot serialize modules".into())
    }

    /// Links `module` with the imports of `H` for ABI `abi`, checking exports and their types
    /// ([`crate::check_callbacks`], [`crate::pick_allocator`]).
    fn link<H: Hostcalls>(
        module: &Self::Module,
        abi: AbiVersion,
    ) -> Result<Self::InstancePre<H>, EngineError>;

    /// Instantiates a linked module that owns `host`, held to `limits`.
    fn instantiate<H: Hostcalls>(
        pre: &Self::InstancePre<H>,
        host: H,
        limits: &InstanceLimits,
    ) -> Result<Self::Instance<H>, EngineError>;
}

/// What an instance does; the public [`Instance`](crate::Instance) documents each method.
pub(crate) trait BackendInstance<H> {
    fn has(&self, callback: Callback) -> bool;
    fn set_deadline(&mut self, deadline: Option<Duration>);
    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap>;
    /// Whether the instance can be used on the calling thread.
    fn is_home(&self) -> bool {
        true
    }
    fn host(&self) -> &H;
    fn host_mut(&mut self) -> &mut H;
    fn memory_size(&mut self) -> usize;
}

impl<H, I: BackendInstance<H>> BackendInstance<H> for Box<I> {
    fn has(&self, callback: Callback) -> bool {
        (**self).has(callback)
    }
    fn set_deadline(&mut self, deadline: Option<Duration>) {
        (**self).set_deadline(deadline)
    }
    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<Returned, Trap> {
        (**self).call(callback, args)
    }
    fn is_home(&self) -> bool {
        (**self).is_home()
    }
    fn host(&self) -> &H {
        (**self).host()
    }
    fn host_mut(&mut self) -> &mut H {
        (**self).host_mut()
    }
    fn memory_size(&mut self) -> usize {
        (**self).memory_size()
    }
}

/// `true` for a backend marked `thread_bound` in the list.
macro_rules! thread_bound_flag {
    (thread_bound) => {
        true
    };
    () => {
        false
    };
}
pub(crate) use thread_bound_flag;

/// Generates, from the backend list: the backend modules (each behind its feature),
/// [`EngineKind`](crate::EngineKind) with every engine of every backend (built or not), and
/// the enums `EngineInner`, `ModuleInner`, `InstancePreInner<H>` and `InstanceInner<H>` with
/// one variant per built backend and one method per [`Backend`] operation.
macro_rules! backend_list {
    ($(
        $module:ident :: $backend:ident if $feature:literal $(, $bound:ident)? => {
            $( $(#[doc = $doc:literal])* $kind:ident = $name:literal, )+
        }
    )+) => {
        $(
            #[cfg(feature = $feature)]
            mod $module;
        )+

        /// The engines filterbox knows, by the names configs and reports use.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EngineKind {
            $($( $(#[doc = $doc])* $kind, )+)+
        }

        impl EngineKind {
            /// Every engine filterbox knows, whether or not this build has it.
            pub const ALL: [EngineKind; [$($(EngineKind::$kind,)+)+].len()] = [$($(EngineKind::$kind,)+)+];

            /// The engine's name in configs and reports.
            pub const fn name(self) -> &'static str {
                match self {
                    $($( EngineKind::$kind => $name, )+)+
                }
            }

            /// Whether this build includes the engine.
            pub const fn is_built(self) -> bool {
                match self {
                    $($( EngineKind::$kind => cfg!(feature = $feature), )+)+
                }
            }

            /// Whether the engine's instances must stay on the thread that made them
            /// (wasmer's). An [`Instance`] of such an engine is `Send` so that it can live
            /// beside others, but used on another thread its calls fail and
            /// [`Instance::host`] panics: keep it home.
            pub const fn thread_bound(self) -> bool {
                match self {
                    $( $(EngineKind::$kind)|+ => $crate::backend::thread_bound_flag!($($bound)?), )+
                }
            }
        }

        #[derive(Clone)]
        enum EngineInner {
            $( #[cfg(feature = $feature)] $backend(<$module::$backend as Backend>::Engine), )+
        }

        #[derive(Clone)]
        enum ModuleInner {
            $( #[cfg(feature = $feature)] $backend(<$module::$backend as Backend>::Module), )+
        }

        enum InstancePreInner<H: Hostcalls> {
            $( #[cfg(feature = $feature)] $backend(<$module::$backend as Backend>::InstancePre<H>), )+
            /// Never made: keeps `H` used whichever backends are built.
            #[allow(dead_code)]
            Unused(std::convert::Infallible, PhantomData<fn() -> H>),
        }

        enum InstanceInner<H: Hostcalls> {
            $( #[cfg(feature = $feature)] $backend(<$module::$backend as Backend>::Instance<H>), )+
            /// Never made: keeps `H` used whichever backends are built.
            #[allow(dead_code)]
            Unused(std::convert::Infallible, PhantomData<fn() -> H>),
        }

        impl EngineInner {
            fn new(kind: EngineKind, config: &EngineConfig) -> Result<EngineInner, EngineError> {
                match kind {
                    $($(
                        #[cfg(feature = $feature)]
                        EngineKind::$kind => Ok(EngineInner::$backend(
                            <$module::$backend as Backend>::new_engine(kind, config)?,
                        )),
                    )+)+
                    #[allow(unreachable_patterns)]
                    _ => Err(EngineError::NotBuilt {
                        engine: kind,
                        built: EngineKind::built(),
                    }),
                }
            }

            fn compile(&self, wasm: &[u8]) -> Result<ModuleInner, EngineError> {
                match self {
                    $( #[cfg(feature = $feature)] EngineInner::$backend(engine) =>
                        <$module::$backend as Backend>::compile(engine, wasm).map(ModuleInner::$backend), )+
                }
            }

            fn fingerprint(&self) -> Option<String> {
                match self {
                    $( #[cfg(feature = $feature)] EngineInner::$backend(engine) =>
                        <$module::$backend as Backend>::fingerprint(engine), )+
                }
            }

            fn deserialize(&self, artifact: &[u8]) -> Result<ModuleInner, String> {
                match self {
                    $( #[cfg(feature = $feature)] EngineInner::$backend(engine) =>
                        <$module::$backend as Backend>::deserialize(engine, artifact).map(ModuleInner::$backend), )+
                }
            }
        }

        impl ModuleInner {
            fn serialize(&self) -> Result<Vec<u8>, String> {
                match self {
                    $( #[cfg(feature = $feature)] ModuleInner::$backend(module) =>
                        <$module::$backend as Backend>::serialize(module), )+
                }
            }

            fn link<H: Hostcalls>(&self, abi: AbiVersion) -> Result<InstancePreInner<H>, EngineError> {
                match self {
                    $( #[cfg(feature = $feature)] ModuleInner::$backend(module) =>
                        <$module::$backend as Backend>::link::<H>(module, abi).map(InstancePreInner::$backend), )+
                }
            }
        }

        impl<H: Hostcalls> Clone for InstancePreInner<H> {
            fn clone(&self) -> Self {
                match self {
                    $( #[cfg(feature = $feature)] InstancePreInner::$backend(pre) => InstancePreInner::$backend(pre.clone()), )+
                    InstancePreInner::Unused(never, _) => match *never {},
                }
            }
        }

        impl<H: Hostcalls> InstancePreInner<H> {
            fn instantiate(&self, host: H, limits: &InstanceLimits) -> Result<InstanceInner<H>, EngineError> {
                match self {
                    $( #[cfg(feature = $feature)] InstancePreInner::$backend(pre) =>
                        <$module::$backend as Backend>::instantiate(pre, host, limits).map(InstanceInner::$backend), )+
                    InstancePreInner::Unused(never, _) => match *never {},
                }
            }
        }

        impl<H: Hostcalls> InstanceInner<H> {
            fn get(&self) -> &dyn BackendInstance<H> {
                match self {
                    $( #[cfg(feature = $feature)] InstanceInner::$backend(instance) => instance, )+
                    InstanceInner::Unused(never, _) => match *never {},
                }
            }

            fn get_mut(&mut self) -> &mut dyn BackendInstance<H> {
                match self {
                    $( #[cfg(feature = $feature)] InstanceInner::$backend(instance) => instance, )+
                    InstanceInner::Unused(never, _) => match *never {},
                }
            }
        }
    };
}
pub(crate) use backend_list;
