//! Small traits the embedder implements to connect plugins to its proxy. Each has a default.

use bytes::Bytes;
use filterbox_abi::LogLevel;

/// Where plugin log lines go (`proxy_log` and WASI stdout/stderr).
pub trait LogSink: Send + Sync {
    /// One log line from plugin `plugin`.
    fn log(&self, plugin: &str, level: LogLevel, message: &str);

    /// Whether a line of `level` from `plugin` would be kept. The host asks before it decodes
    /// a line, so lines nobody keeps cost no UTF-8 conversion; `log` is still called only
    /// when this says `true`. The default keeps every line.
    fn enabled(&self, plugin: &str, level: LogLevel) -> bool {
        let _ = (plugin, level);
        true
    }
}

/// The default sink: `tracing` events with target `filterbox::plugin` and a `plugin` field.
/// Critical maps to `ERROR`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingLogSink;

impl LogSink for TracingLogSink {
    fn log(&self, plugin: &str, level: LogLevel, message: &str) {
        match level {
            LogLevel::Trace => tracing::trace!(target: "filterbox::plugin", plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "filterbox::plugin", plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: "filterbox::plugin", plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "filterbox::plugin", plugin, "{message}"),
            LogLevel::Error | LogLevel::Critical => {
                tracing::error!(target: "filterbox::plugin", plugin, critical = level == LogLevel::Critical, "{message}")
            }
        }
    }

    /// What the current `tracing` subscriber (or its absence) enables for the target.
    fn enabled(&self, _plugin: &str, level: LogLevel) -> bool {
        use tracing::Level;
        match level {
            LogLevel::Trace => tracing::enabled!(target: "filterbox::plugin", Level::TRACE),
            LogLevel::Debug => tracing::enabled!(target: "filterbox::plugin", Level::DEBUG),
            LogLevel::Info => tracing::enabled!(target: "filterbox::plugin", Level::INFO),
            LogLevel::Warn => tracing::enabled!(target: "filterbox::plugin", Level::WARN),
            LogLevel::Error | LogLevel::Critical => {
                tracing::enabled!(target: "filterbox::plugin", Level::ERROR)
            }
        }
    }
}

/// Answers `proxy_get_property` for the names filterbox does not answer itself
/// (it answers `plugin_name`, `plugin_root_id` and `plugin_vm_id`).
pub trait PropertyProvider: Send + Sync {
    /// The encoded value at `path` (ABI.md §3.3), or `None` if there is none.
    fn property(&self, path: &[&[u8]]) -> Option<Bytes>;
}

/// A provider that knows no properties.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProperties;

impl PropertyProvider for NoProperties {
    fn property(&self, _path: &[&[u8]]) -> Option<Bytes> {
        None
    }
}

/// A host function plugins call by name with `proxy_call_foreign_function`. It gets the
/// argument bytes and answers result bytes, or a status for the guest. Closures
/// `Fn(&[u8]) -> Result<Bytes, Status>` are foreign functions.
pub trait ForeignFunction: Send + Sync {
    /// Runs the function. A panic is caught and answers `InternalFailure`.
    fn call(&self, args: &[u8]) -> Result<Bytes, filterbox_abi::Status>;
}

impl<F> ForeignFunction for F
where
    F: Fn(&[u8]) -> Result<Bytes, filterbox_abi::Status> + Send + Sync,
{
    fn call(&self, args: &[u8]) -> Result<Bytes, filterbox_abi::Status> {
        self(args)
    }
}
