//! Plugin configuration, with names modelled on Envoy's `PluginConfig` / `VmConfig`.

use filterbox_abi::LogLevel;
use filterbox_engines::EngineKind;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
}
