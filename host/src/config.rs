//! Plugin configuration, with names modelled on Envoy's `PluginConfig` / `VmConfig`.

use filterbox_abi::LogLevel;
use filterbox_engines::{EngineKind, InstanceLimits};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// How to load and start one plugin. Every field has a default, so a config names only what it
/// changes:
///
/// ```
/// let config: filterbox::PluginConfig = serde_json::from_str(
///     r#"{ "name": "add-header", "configuration": "x-hello: world", "engine": "wasmtime" }"#,
/// ).unwrap();
/// assert_eq!(config.root_id, "");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PluginConfig {
    /// The plugin's name: in logs, errors, and the `plugin_name` property.
    pub name: String,
    /// The root context id the plugin's SDK registered (`plugin_root_id`).
    pub root_id: String,
    /// VMs with the same id share state (`plugin_vm_id`).
    pub vm_id: String,
    /// Plugin configuration, read by the plugin in `proxy_on_configure`.
    #[serde(with = "text_bytes")]
    pub configuration: Vec<u8>,
    /// VM configuration, read by the plugin in `proxy_on_vm_start`.
    #[serde(with = "text_bytes")]
    pub vm_configuration: Vec<u8>,
    /// The engine that runs the plugin.
    #[serde(with = "engine_name")]
    pub engine: EngineKind,
    /// The level `proxy_get_log_level` reports; the SDKs drop messages below it.
    #[serde(with = "log_level_name")]
    pub log_level: LogLevel,
    /// Environment variables the plugin sees through WASI `environ_get` (none by default).
    pub environment_variables: Vec<(String, String)>,
    /// Resource limits of each VM and of what the host holds for it.
    pub limits: Limits,
    /// What a stream gets when the VM under it fails.
    pub failure_policy: FailurePolicy,
    /// Whether and how a failed VM is replaced.
    pub reload: ReloadPolicy,
    /// The imports (`proxy_*` hostcalls and WASI functions, by name) the plugin may use;
    /// `None` (the default) allows all.
    pub allowed_capabilities: Option<Vec<String>>,
    /// What happens to a plugin that imports a function outside `allowed_capabilities`.
    pub denied_capability: DeniedCapability,
}

/// Resource limits of one VM, on by default. Engines enforce memory, tables and deadlines;
/// the host enforces the rest, answering the status each hostcall documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Limits {
    /// Largest linear memory in bytes; `memory.grow` past it returns -1 in the guest.
    pub memory_bytes: usize,
    /// Most elements a table may hold.
    pub table_elements: usize,
    /// How long a stream or timer callback may run, in milliseconds (`null`: no limit).
    pub callback_deadline_ms: Option<u64>,
    /// How long the start function, `proxy_on_vm_start` and `proxy_on_configure` may each
    /// run, in milliseconds (`null`: no limit).
    pub start_deadline_ms: Option<u64>,
    /// Most headers a plugin may leave in one header map (`BadArgument` past it); also
    /// bounds the headers of local responses and callouts. At most 16,384.
    pub max_header_count: usize,
    /// Most bytes of names and values in one header map (`BadArgument` past it).
    pub max_header_bytes: usize,
    /// Largest body a plugin may set (`BadArgument` past it).
    pub max_body_bytes: usize,
    /// Longer log lines are cut to this many bytes and marked as cut.
    pub max_log_line_bytes: usize,
    /// Most HTTP and gRPC callouts one VM may have waiting; more answer `InternalFailure`.
    pub max_pending_callouts: usize,
    /// Most bytes one VM's callouts may hold at once: request bodies and gRPC messages until
    /// the client has sent them, answers from when the client reads them until the plugin's
    /// callback has run. A call whose request does not fit answers `InternalFailure`; an
    /// answer that does not fit fails the call (`BrokenConnection` for HTTP, gRPC
    /// `RESOURCE_EXHAUSTED`).
    pub max_pending_callout_bytes: usize,
    /// The most of one core a VM's ticks may use, in percent: after a tick that ran for `t`,
    /// the next comes no sooner than its period and no sooner than the idle time that keeps
    /// the ticks at this share (a 1 ms period whose ticks run 5 ms each gets a tick every
    /// 50 ms at 10%). Postponed ticks count in `filterbox_ticks_postponed_total`.
    pub max_tick_cpu_percent: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 128 << 20,
            table_elements: 100_000,
            callback_deadline_ms: Some(10),
            start_deadline_ms: Some(1000),
            max_header_count: 256,
            max_header_bytes: 96 << 10,
            max_body_bytes: 16 << 20,
            max_log_line_bytes: 16 << 10,
            max_pending_callouts: 1024,
            max_pending_callout_bytes: 64 << 20,
            max_tick_cpu_percent: 10,
        }
    }
}

/// Most headers [`Limits::max_header_count`] may allow: the `http` crate's header maps hold
/// at most 24,576 entries (and panic past that), and a proxy must be able to carry what a
/// plugin leaves.
pub(crate) const MAX_HEADER_COUNT: usize = 16_384;

impl Limits {
    /// Refuses limits filterbox cannot honour.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !(1..=100).contains(&self.max_tick_cpu_percent) {
            return Err(format!(
                "max_tick_cpu_percent {} is not a percentage from 1 to 100",
                self.max_tick_cpu_percent
            ));
        }
        if self.max_header_count > MAX_HEADER_COUNT {
            return Err(format!(
                "max_header_count {} is over {MAX_HEADER_COUNT}, the most HTTP header maps hold",
                self.max_header_count
            ));
        }
        Ok(())
    }

    /// What the engine enforces for each instance.
    pub(crate) fn instance(&self) -> InstanceLimits {
        InstanceLimits::default()
            .with_max_memory_bytes(self.memory_bytes)
            .with_max_table_elements(self.table_elements)
            .with_start_deadline(self.start_deadline())
    }

    pub(crate) fn callback_deadline(&self) -> Option<Duration> {
        self.callback_deadline_ms.map(Duration::from_millis)
    }

    pub(crate) fn start_deadline(&self) -> Option<Duration> {
        self.start_deadline_ms.map(Duration::from_millis)
    }
}

/// What a stream gets when the VM under it traps (or is already failed, or cannot be
/// rebuilt). Either way the embedder also gets a [`Failure`](crate::Failure) naming the cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Answer the client with a local response of this status (503 by default) and no body.
    FailClosed {
        /// The HTTP status of the local response.
        status: u32,
    },
    /// Let the stream go on as if the plugin were not there.
    FailOpen,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy::FailClosed { status: 503 }
    }
}

/// How a failed VM is replaced: on the first stream after a jittered exponential backoff,
/// until the crash-loop limit. Envoy's `FAIL_RELOAD` is `fail_closed` with this on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReloadPolicy {
    /// Rebuild failed VMs at all (on by default). Off, a failed plugin stays failed.
    pub enabled: bool,
    /// Wait before the second consecutive rebuild; the first is immediate, each later wait
    /// doubles, and each is jittered down by up to half.
    pub backoff_initial_ms: u64,
    /// The longest wait between rebuilds.
    pub backoff_max_ms: u64,
    /// After this many consecutive failures with no stream finished in between (a VM that
    /// fails at start counts too), the plugin stays failed and says so in logs and metrics.
    pub crash_loop_limit: u32,
}

impl Default for ReloadPolicy {
    fn default() -> Self {
        ReloadPolicy {
            enabled: true,
            backoff_initial_ms: 100,
            backoff_max_ms: 30_000,
            crash_loop_limit: 5,
        }
    }
}

/// What happens to a plugin that imports a function `allowed_capabilities` leaves out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeniedCapability {
    /// The import links to a stub answering `Unimplemented` (WASI: `ENOSYS`).
    #[default]
    Stub,
    /// The plugin does not load.
    Refuse,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            name: String::new(),
            root_id: String::new(),
            vm_id: String::new(),
            configuration: Vec::new(),
            vm_configuration: Vec::new(),
            engine: EngineKind::Wasmtime,
            log_level: LogLevel::Info,
            environment_variables: Vec::new(),
            limits: Limits::default(),
            failure_policy: FailurePolicy::default(),
            reload: ReloadPolicy::default(),
            allowed_capabilities: None,
            denied_capability: DeniedCapability::Stub,
        }
    }
}

impl PluginConfig {
    /// A config with a name and every other field at its default.
    pub fn named(name: impl Into<String>) -> Self {
        PluginConfig {
            name: name.into(),
            ..PluginConfig::default()
        }
    }

    /// Sets the plugin configuration.
    pub fn with_configuration(mut self, configuration: impl Into<Vec<u8>>) -> Self {
        self.configuration = configuration.into();
        self
    }

    /// Sets the VM configuration.
    pub fn with_vm_configuration(mut self, configuration: impl Into<Vec<u8>>) -> Self {
        self.vm_configuration = configuration.into();
        self
    }

    /// Sets the vm_id: VMs with the same one share data and queues.
    pub fn with_vm_id(mut self, vm_id: impl Into<String>) -> Self {
        self.vm_id = vm_id.into();
        self
    }

    /// Sets the engine.
    pub fn with_engine(mut self, engine: EngineKind) -> Self {
        self.engine = engine;
        self
    }

    /// Sets the log level the plugin is told.
    pub fn with_log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// Sets the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the failure policy.
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// Sets the reload policy.
    pub fn with_reload(mut self, reload: ReloadPolicy) -> Self {
        self.reload = reload;
        self
    }

    /// Allows only these imports; `denied` says what happens to a plugin that uses others.
    pub fn with_allowed_capabilities<S: Into<String>>(
        mut self,
        allowed: impl IntoIterator<Item = S>,
        denied: DeniedCapability,
    ) -> Self {
        self.allowed_capabilities = Some(allowed.into_iter().map(Into::into).collect());
        self.denied_capability = denied;
        self
    }
}

/// Configuration bytes are text in configs (JSON, YAML); binary configs are set from code.
mod text_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match core::str::from_utf8(bytes) {
            Ok(text) => s.serialize_str(text),
            Err(_) => Err(serde::ser::Error::custom(
                "configuration is not UTF-8 and cannot be written as text",
            )),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        String::deserialize(d).map(String::into_bytes)
    }
}

mod engine_name {
    use super::*;

    pub fn serialize<S: Serializer>(engine: &EngineKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(engine.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EngineKind, D::Error> {
        let name = String::deserialize(d)?;
        EngineKind::from_name(&name).map_err(serde::de::Error::custom)
    }
}

mod log_level_name {
    use super::*;

    pub fn serialize<S: Serializer>(level: &LogLevel, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&level.name().to_ascii_lowercase())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LogLevel, D::Error> {
        let name = String::deserialize(d)?;
        LogLevel::ALL
            .iter()
            .copied()
            .find(|l| l.name().eq_ignore_ascii_case(&name))
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown log level {name:?} (trace, debug, info, warn, error, critical)"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json_and_rejects_bad_names() {
        let config = PluginConfig::named("p")
            .with_configuration("a: b")
            .with_log_level(LogLevel::Trace);
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<PluginConfig>(&json).unwrap(), config);
        let err = serde_json::from_str::<PluginConfig>(r#"{"engine": "v8"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown engine \"v8\""), "{err}");
        let err = serde_json::from_str::<PluginConfig>(r#"{"log_level": "loud"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown log level"), "{err}");
        let err = serde_json::from_str::<PluginConfig>(r#"{"nmae": "typo"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn policies_and_limits_read_from_json() {
        let config: PluginConfig = serde_json::from_str(
            r#"{"failure_policy": "fail_open", "reload": {"crash_loop_limit": 2},
                "limits": {"memory_bytes": 1048576, "callback_deadline_ms": null},
                "allowed_capabilities": ["proxy_log"], "denied_capability": "refuse"}"#,
        )
        .unwrap();
        assert_eq!(config.failure_policy, FailurePolicy::FailOpen);
        assert_eq!(config.reload.crash_loop_limit, 2);
        assert!(config.reload.enabled);
        assert_eq!(config.limits.memory_bytes, 1 << 20);
        assert_eq!(config.limits.callback_deadline_ms, None);
        assert_eq!(config.limits.start_deadline_ms, Some(1000));
        assert_eq!(config.denied_capability, DeniedCapability::Refuse);
        let closed: PluginConfig =
            serde_json::from_str(r#"{"failure_policy": {"fail_closed": {"status": 500}}}"#)
                .unwrap();
        assert_eq!(
            closed.failure_policy,
            FailurePolicy::FailClosed { status: 500 }
        );
        let json = serde_json::to_string(&closed).unwrap();
        assert_eq!(serde_json::from_str::<PluginConfig>(&json).unwrap(), closed);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            proptest::string::string_regex("[ -~\\n\u{80}-\u{10FF}]{0,24}").expect("regex")
        }

        fn limits() -> impl Strategy<Value = Limits> {
            (
                any::<usize>(),
                any::<usize>(),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>()),
                (any::<usize>(), any::<usize>(), any::<usize>()),
                (any::<usize>(), any::<usize>(), any::<usize>(), any::<u32>()),
            )
                .prop_map(
                    |(
                        memory,
                        table,
                        deadline,
                        start,
                        (hc, hb, body),
                        (log, callouts, callout_bytes, tick),
                    )| {
                        Limits {
                            memory_bytes: memory,
                            table_elements: table,
                            callback_deadline_ms: deadline,
                            start_deadline_ms: start,
                            max_header_count: hc,
                            max_header_bytes: hb,
                            max_body_bytes: body,
                            max_log_line_bytes: log,
                            max_pending_callouts: callouts,
                            max_pending_callout_bytes: callout_bytes,
                            max_tick_cpu_percent: tick,
                        }
                    },
                )
        }

        fn config() -> impl Strategy<Value = PluginConfig> {
            (
                (text(), text(), text(), text(), text()),
                (0..EngineKind::ALL.len(), 0..LogLevel::ALL.len()),
                proptest::collection::vec((text(), text()), 0..3),
                limits(),
                (
                    proptest::option::of(any::<u32>()),
                    any::<bool>(),
                    any::<u64>(),
                    any::<u32>(),
                ),
                proptest::option::of(proptest::collection::vec(text(), 0..3)),
                any::<bool>(),
            )
                .prop_map(
                    |(
                        (name, root_id, vm_id, configuration, vm_configuration),
                        (engine, level),
                        environment_variables,
                        limits,
                        (closed, reload, backoff, crash_loop_limit),
                        allowed_capabilities,
                        refuse,
                    )| PluginConfig {
                        name,
                        root_id,
                        vm_id,
                        configuration: configuration.into_bytes(),
                        vm_configuration: vm_configuration.into_bytes(),
                        engine: EngineKind::ALL[engine],
                        log_level: LogLevel::ALL[level],
                        environment_variables,
                        limits,
                        failure_policy: match closed {
                            Some(status) => FailurePolicy::FailClosed { status },
                            None => FailurePolicy::FailOpen,
                        },
                        reload: ReloadPolicy {
                            enabled: reload,
                            backoff_initial_ms: backoff,
                            backoff_max_ms: backoff,
                            crash_loop_limit,
                        },
                        allowed_capabilities,
                        denied_capability: match refuse {
                            true => DeniedCapability::Refuse,
                            false => DeniedCapability::Stub,
                        },
                    },
                )
        }

        /// JSON made of the config's own field names and odd values, so the parser gets
        /// past the first key and into the custom deserializers.
        fn json_soup() -> impl Strategy<Value = String> {
            let key = proptest::sample::select(vec![
                "name",
                "engine",
                "log_level",
                "configuration",
                "limits",
                "memory_bytes",
                "callback_deadline_ms",
                "failure_policy",
                "fail_closed",
                "status",
                "reload",
                "environment_variables",
                "allowed_capabilities",
                "denied_capability",
                "x",
            ]);
            let value = proptest::sample::select(vec![
                "null",
                "0",
                "-1",
                "18446744073709551616",
                "1e400",
                "\"wasmi\"",
                "\"v8\"",
                "\"TRACE\"",
                "\"fail_open\"",
                "[]",
                "[[\"a\",\"b\"]]",
                "{}",
                "true",
                "\"\\ud800\"",
            ]);
            proptest::collection::vec((key, value, any::<bool>()), 0..6).prop_map(|fields| {
                let mut out = String::from("{");
                for (n, (key, value, nest)) in fields.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    match nest {
                        true => out.push_str(&format!("\"{key}\": {{\"{key}\": {value}}}")),
                        false => out.push_str(&format!("\"{key}\": {value}")),
                    }
                }
                out.push('}');
                out
            })
        }

        proptest! {
            #[test]
            fn any_text_config_round_trips_through_json(config in config()) {
                let json = serde_json::to_string(&config).expect("text configs serialize");
                let back: PluginConfig = serde_json::from_str(&json).expect("and parse back");
                prop_assert_eq!(back, config);
            }

            #[test]
            fn odd_json_is_parsed_or_refused_without_panicking(json in json_soup()) {
                if let Ok(config) = serde_json::from_str::<PluginConfig>(&json) {
                    let again = serde_json::to_string(&config).expect("serializes");
                    prop_assert_eq!(serde_json::from_str::<PluginConfig>(&again).ok(), Some(config));
                }
            }

            #[test]
            fn arbitrary_bytes_are_parsed_or_refused_with_a_reason(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
                match serde_json::from_slice::<PluginConfig>(&bytes) {
                    Ok(config) => {
                        let again = serde_json::to_string(&config).expect("serializes");
                        prop_assert_eq!(serde_json::from_str::<PluginConfig>(&again).ok(), Some(config));
                    }
                    Err(error) => prop_assert!(!error.to_string().is_empty()),
                }
            }
        }
    }
}
