//! What a module imports and exports, and which ABI version it declares (ABI.md §1.4).

use crate::{AbiVersion, Callback, Import};
use core::fmt;

/// The kind of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// A function.
    Func,
    /// A table.
    Table,
    /// A linear memory.
    Memory,
    /// A global.
    Global,
    /// An exception tag.
    Tag,
}

/// One export of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: ExportKind,
}

impl ExportInfo {
    /// The callback this export provides, if it is a function the host knows.
    pub fn callback(&self) -> Option<Callback> {
        (self.kind == ExportKind::Func)
            .then(|| Callback::from_name(&self.name))
            .flatten()
    }
}

/// One import of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportInfo {
    /// The module it is imported from.
    pub module: String,
    /// Its name.
    pub name: String,
    /// Whether it is a function (the host provides only functions).
    pub is_func: bool,
}

impl ImportInfo {
    /// The host function that satisfies this import, if any.
    pub fn provided_by(&self) -> Option<Import> {
        if self.is_func {
            Import::lookup(&self.module, &self.name)
        } else {
            None
        }
    }
}

/// Why a module cannot be used as a proxy-wasm plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AbiError {
    /// The bytes are not a valid wasm module.
    Malformed(String),
    /// No `proxy_abi_version_*` export.
    MissingAbiVersion {
        /// What the module exports instead.
        exports: Vec<String>,
    },
    /// A `proxy_abi_version_*` export of a version this host does not support.
    UnknownAbiVersion {
        /// The marker found.
        found: String,
        /// What the module exports.
        exports: Vec<String>,
    },
}

impl fmt::Display for AbiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let supported = AbiVersion::ALL.map(AbiVersion::marker).join(", ");
        match self {
            AbiError::Malformed(why) => write!(f, "not a valid wasm module: {why}"),
            AbiError::MissingAbiVersion { exports } => write!(
                f,
                "module has no proxy-wasm ABI version marker (expected one of {supported}); it exports [{}]",
                exports.join(", ")
            ),
            AbiError::UnknownAbiVersion { found, exports } => write!(
                f,
                "module declares unsupported ABI {found} (supported: {supported}); it exports [{}]",
                exports.join(", ")
            ),
        }
    }
}

impl std::error::Error for AbiError {}

/// The imports and exports of a module, read from its binary without compiling it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModuleInfo {
    /// Imports in declaration order.
    pub imports: Vec<ImportInfo>,
    /// Exports in declaration order.
    pub exports: Vec<ExportInfo>,
}

impl ModuleInfo {
    /// Reads the import and export sections of a wasm binary.
    pub fn parse(wasm: &[u8]) -> Result<ModuleInfo, AbiError> {
        use wasmparser::{ExternalKind, Parser, Payload, TypeRef};
        let malformed = |e: wasmparser::BinaryReaderError| AbiError::Malformed(e.to_string());
        let mut info = ModuleInfo::default();
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(malformed)? {
                Payload::Version {
                    encoding: wasmparser::Encoding::Component,
                    ..
                } => {
                    return Err(AbiError::Malformed("a component, not a core module".into()));
                }
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        let import = import.map_err(malformed)?;
                        info.imports.push(ImportInfo {
                            module: import.module.to_owned(),
                            name: import.name.to_owned(),
                            is_func: matches!(import.ty, TypeRef::Func(_) | TypeRef::FuncExact(_)),
                        });
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export.map_err(malformed)?;
                        let kind = match export.kind {
                            ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
                            ExternalKind::Table => ExportKind::Table,
                            ExternalKind::Memory => ExportKind::Memory,
                            ExternalKind::Global => ExportKind::Global,
                            ExternalKind::Tag => ExportKind::Tag,
                        };
                        info.exports.push(ExportInfo {
                            name: export.name.to_owned(),
                            kind,
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// The ABI version the module declares: the first function export named
    /// `proxy_abi_version_*` decides, as in the reference host.
    pub fn abi_version(&self) -> Result<AbiVersion, AbiError> {
        let marker = self
            .exports
            .iter()
            .find(|e| e.kind == ExportKind::Func && e.name.starts_with("proxy_abi_version_"));
        let exports = || self.exports.iter().map(|e| e.name.clone()).collect();
        match marker {
            None => Err(AbiError::MissingAbiVersion { exports: exports() }),
            Some(m) => {
                AbiVersion::from_marker(&m.name).ok_or_else(|| AbiError::UnknownAbiVersion {
                    found: m.name.clone(),
                    exports: exports(),
                })
            }
        }
    }

    /// Function imports the host does not provide.
    pub fn unsupported_imports(&self) -> impl Iterator<Item = &ImportInfo> {
        self.imports.iter().filter(|i| i.provided_by().is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(wat: &str) -> ModuleInfo {
        ModuleInfo::parse(&wat::parse_str(wat).unwrap()).unwrap()
    }

    #[test]
    fn detects_versions_and_names_exports_when_missing() {
        let m = info(
            r#"(module (func (export "proxy_abi_version_0_2_1")) (memory (export "memory") 1))"#,
        );
        assert_eq!(m.abi_version(), Ok(AbiVersion::V0_2_1));
        let m = info(
            r#"(module (func (export "proxy_abi_version_0_1_0")) (func (export "proxy_abi_version_0_2_1")))"#,
        );
        assert_eq!(
            m.abi_version(),
            Ok(AbiVersion::V0_1_0),
            "the first marker decides"
        );
        let m = info(r#"(module (func (export "hello")) (memory (export "memory") 1))"#);
        let err = m.abi_version().unwrap_err();
        assert_eq!(
            err,
            AbiError::MissingAbiVersion {
                exports: vec!["hello".into(), "memory".into()]
            }
        );
        assert!(err.to_string().contains("hello, memory"), "{err}");
        let m = info(r#"(module (func (export "proxy_abi_version_9_9_9")))"#);
        assert!(
            matches!(m.abi_version(), Err(AbiError::UnknownAbiVersion { found, .. }) if found == "proxy_abi_version_9_9_9")
        );
    }

    #[test]
    fn lists_imports_and_flags_unsupported_ones() {
        let m = info(
            r#"(module
                (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (import "env" "mystery" (func)))"#,
        );
        assert_eq!(m.imports.len(), 3);
        assert_eq!(m.imports[0].provided_by(), Some(Import::ProxyLog));
        let unsupported: Vec<_> = m.unsupported_imports().map(|i| i.name.as_str()).collect();
        assert_eq!(unsupported, ["mystery"]);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(matches!(
            ModuleInfo::parse(b"\0asm\x01\0\0\0\x07\xff"),
            Err(AbiError::Malformed(_))
        ));
        assert!(matches!(
            ModuleInfo::parse(b"hello"),
            Err(AbiError::Malformed(_))
        ));
    }
}
