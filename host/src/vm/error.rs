//! Why a VM could not start or a call failed.

use core::fmt;
use filterbox_abi::Callback;
use filterbox_engines::{EngineError, EngineKind, Trap};

/// Why a VM could not start or a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmError {
    /// The module could not be instantiated (or its start section trapped).
    Instantiate {
        /// The plugin.
        plugin: String,
        /// The engine.
        engine: EngineKind,
        /// The engine's reason.
        error: EngineError,
    },
    /// `proxy_on_vm_start` or `proxy_on_configure` returned false.
    Rejected {
        /// The plugin.
        plugin: String,
        /// The callback that said no.
        callback: Callback,
    },
    /// The guest trapped; the VM is failed from now on.
    Trap {
        /// The plugin.
        plugin: String,
        /// The callback that trapped.
        callback: Callback,
        /// The trap.
        trap: Trap,
    },
    /// The VM failed earlier and runs nothing more.
    Failed {
        /// The plugin.
        plugin: String,
        /// The trap that failed it.
        trap: Trap,
    },
    /// The stream belongs to another VM.
    ForeignStream {
        /// The plugin.
        plugin: String,
    },
    /// No live root context of the VM has this id.
    UnknownRoot {
        /// The plugin.
        plugin: String,
        /// The id asked for.
        root: u32,
    },
}

impl VmError {
    /// The name of the plugin the error is about.
    pub fn plugin(&self) -> &str {
        match self {
            VmError::Instantiate { plugin, .. }
            | VmError::Rejected { plugin, .. }
            | VmError::Trap { plugin, .. }
            | VmError::Failed { plugin, .. }
            | VmError::ForeignStream { plugin }
            | VmError::UnknownRoot { plugin, .. } => plugin,
        }
    }
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Instantiate {
                plugin,
                engine,
                error,
            } => write!(f, "plugin {plugin:?} on {engine}: {error}"),
            VmError::Rejected { plugin, callback } => {
                write!(f, "plugin {plugin:?}: {} returned false", callback.name())
            }
            VmError::Trap {
                plugin,
                callback,
                trap,
            } => write!(
                f,
                "plugin {plugin:?} trapped in {}: {trap}",
                callback.name()
            ),
            VmError::Failed { plugin, trap } => {
                write!(f, "plugin {plugin:?} is failed after an earlier {trap}")
            }
            VmError::ForeignStream { plugin } => {
                write!(f, "plugin {plugin:?}: stream belongs to another VM")
            }
            VmError::UnknownRoot { plugin, root } => {
                write!(f, "plugin {plugin:?}: no root context {root}")
            }
        }
    }
}

impl std::error::Error for VmError {}
