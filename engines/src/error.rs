//! Errors and traps.

use crate::EngineKind;
use core::fmt;

/// Why an engine could not be made, a module compiled or linked, or an instance made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineError {
    /// No engine has this name.
    UnknownEngine(String),
    /// The engine exists but this build does not include it.
    NotBuilt {
        /// The engine asked for.
        engine: EngineKind,
        /// The engines this build has.
        built: Vec<EngineKind>,
    },
    /// The engine rejected its configuration.
    Config(String),
    /// The bytes are not a valid module for this engine.
    Compile(String),
    /// The module imports functions the host does not provide.
    UnsupportedImports(Vec<String>),
    /// The module lacks an export the host needs.
    MissingExport(&'static str),
    /// An export has a different type than the ABI gives it.
    BadExportSignature {
        /// The export.
        name: &'static str,
        /// The type the ABI gives it.
        expected: String,
        /// The type the module gives it.
        found: String,
    },
    /// Linking or instantiation failed.
    Instantiate(String),
    /// The start section trapped during instantiation.
    StartTrapped(Trap),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::UnknownEngine(name) => {
                let all: Vec<_> = EngineKind::ALL.iter().map(|k| k.name()).collect();
                write!(f, "unknown engine {name:?} (known: {})", all.join(", "))
            }
            EngineError::NotBuilt { engine, built } => {
                let built: Vec<_> = built.iter().map(|k| k.name()).collect();
                write!(
                    f,
                    "engine {engine} is not in this build (built: {}); enable its cargo feature",
                    built.join(", ")
                )
            }
            EngineError::Config(why) => write!(f, "engine configuration rejected: {why}"),
            EngineError::Compile(why) => write!(f, "module does not compile: {why}"),
            EngineError::UnsupportedImports(names) => write!(
                f,
                "module imports unsupported functions: {}",
                names.join(", ")
            ),
            EngineError::MissingExport(name) => write!(f, "module does not export {name}"),
            EngineError::BadExportSignature {
                name,
                expected,
                found,
            } => {
                write!(
                    f,
                    "export {name} has type {found}, the ABI gives it {expected}"
                )
            }
            EngineError::Instantiate(why) => write!(f, "instantiation failed: {why}"),
            EngineError::StartTrapped(trap) => write!(f, "start section trapped: {trap}"),
        }
    }
}

impl std::error::Error for EngineError {}

/// The class of a trap, the same whatever the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrapKind {
    /// `unreachable` was executed (Rust SDK panics end here).
    Unreachable,
    /// A memory or table access was out of bounds.
    OutOfBounds,
    /// The wasm stack was exhausted.
    StackOverflow,
    /// Execution was interrupted (deadline or fuel).
    Interrupted,
    /// A memory or table could not grow, or an allocation was too large.
    OutOfMemory,
    /// Integer overflow, division by zero or a bad float-to-int conversion.
    Arithmetic,
    /// An indirect call to a null or mistyped function.
    BadCall,
    /// A host function failed or panicked.
    Host,
    /// The guest called WASI `proc_exit`.
    Exit,
    /// Anything else the engine reports.
    Other,
}

impl TrapKind {
    /// Every class, in a fixed order (for tables indexed by `kind as usize`).
    pub const ALL: [TrapKind; 10] = [
        TrapKind::Unreachable,
        TrapKind::OutOfBounds,
        TrapKind::StackOverflow,
        TrapKind::Interrupted,
        TrapKind::OutOfMemory,
        TrapKind::Arithmetic,
        TrapKind::BadCall,
        TrapKind::Host,
        TrapKind::Exit,
        TrapKind::Other,
    ];

    /// A short lower-case name for reports and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            TrapKind::Unreachable => "unreachable",
            TrapKind::OutOfBounds => "out_of_bounds",
            TrapKind::StackOverflow => "stack_overflow",
            TrapKind::Interrupted => "interrupted",
            TrapKind::OutOfMemory => "out_of_memory",
            TrapKind::Arithmetic => "arithmetic",
            TrapKind::BadCall => "bad_call",
            TrapKind::Host => "host",
            TrapKind::Exit => "exit",
            TrapKind::Other => "other",
        }
    }
}

/// A trap raised while running guest code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trap {
    /// Its class.
    pub kind: TrapKind,
    /// The engine's description.
    pub message: String,
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} trap: {}", self.kind.name(), self.message)
    }
}

impl std::error::Error for Trap {}

#[derive(Debug)]
pub(crate) struct HostTrap(pub(crate) Trap);

impl fmt::Display for HostTrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for HostTrap {}

/// The trap for a panic in host code.
pub(crate) fn panic_trap(name: &str, payload: &(dyn std::any::Any + Send)) -> Trap {
    Trap {
        kind: TrapKind::Host,
        message: format!("hostcall {name} panicked: {}", panic_message(payload)),
    }
}

/// Turns a panic payload into a message.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
