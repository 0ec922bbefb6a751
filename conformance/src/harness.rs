//! What a case runs against: one engine, plugins loaded with captured logs, and helpers to
//! drive streams.

use filterbox::{
    Engine, EngineConfig, EngineKind, HeaderMap, LogLevel, LogSink, Plugin, PluginBuilder,
    PluginConfig, PluginError, SharedState, Vm,
};
use parking_lot::Mutex;
use std::sync::Arc;

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The host did not behave as the case requires.
    Fail(String),
    /// The case cannot run on this engine, and why.
    Skip(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Fail(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::Fail(message.to_owned())
    }
}

/// The result of one case.
pub type CaseResult = Result<(), Failure>;

/// Fails the case with a formatted message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Failure::Fail(format!($($fmt)+)));
        }
    };
}

/// Log lines a plugin wrote, in order.
#[derive(Debug, Default)]
pub struct LogCapture {
    lines: Mutex<Vec<(LogLevel, String)>>,
}

impl LogCapture {
    /// Every line so far.
    pub fn lines(&self) -> Vec<(LogLevel, String)> {
        self.lines.lock().clone()
    }

    /// Whether some line at `level` is exactly `message`.
    pub fn has(&self, level: LogLevel, message: &str) -> bool {
        self.lines
            .lock()
            .iter()
            .any(|(l, m)| *l == level && m == message)
    }

    /// Messages only, in order.
    pub fn messages(&self) -> Vec<String> {
        self.lines.lock().iter().map(|(_, m)| m.clone()).collect()
    }
}

impl LogSink for LogCapture {
    fn log(&self, _plugin: &str, level: LogLevel, message: &str) {
        self.lines.lock().push((level, message.to_owned()));
    }
}

/// One engine, shared by every plugin a case loads.
pub struct Harness {
    engine: Engine,
}

impl Harness {
    /// A harness on `kind`, or why this build cannot make it.
    pub fn new(kind: EngineKind) -> Result<Harness, String> {
        let engine = Engine::new(kind, &EngineConfig::default()).map_err(|e| e.to_string())?;
        Ok(Harness { engine })
    }

    /// The engine's kind.
    pub fn kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Loads `wasm` with `config` (its engine set to this harness's) and captured logs.
    pub fn load(
        &self,
        wasm: &[u8],
        config: PluginConfig,
    ) -> Result<(Plugin, Arc<LogCapture>), PluginError> {
        self.load_with(wasm, config, |b| b)
    }

    /// [`Harness::load`] with more set on the builder by `more` (callouts, shared state,
    /// foreign functions). Each plugin gets a fresh [`SharedState`] unless `more` sets one, so
    /// cases running at once never see each other's data.
    pub fn load_with(
        &self,
        wasm: &[u8],
        config: PluginConfig,
        more: impl FnOnce(PluginBuilder) -> PluginBuilder,
    ) -> Result<(Plugin, Arc<LogCapture>), PluginError> {
        let logs = Arc::new(LogCapture::default());
        let builder = Plugin::builder(config.with_engine(self.engine.kind()))
            .engine(&self.engine)
            .log_sink(logs.clone())
            .shared_state(SharedState::default());
        let plugin = more(builder).build(wasm)?;
        Ok((plugin, logs))
    }

    /// Loads and starts a VM, failing the case with the reason if either fails.
    pub fn start(
        &self,
        wasm: &[u8],
        config: PluginConfig,
    ) -> Result<(Vm, Arc<LogCapture>), Failure> {
        let (plugin, logs) = self
            .load(wasm, config)
            .map_err(|e| format!("load failed: {e}"))?;
        let vm = Vm::new(&plugin)
            .map_err(|e| format!("start failed: {e}; logs: {:?}", logs.messages()))?;
        Ok((vm, logs))
    }
}

/// A request header map from pairs.
pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `(name, value)` pairs of a map as strings, for comparisons.
pub fn pairs_of(map: &HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}
