//! The proxy-wasm ABI (versions 0.1.0, 0.2.0 and 0.2.1) as data.
//!
//! - [`for_each_import!`] and [`for_each_callback!`]: the one table of every hostcall and
//!   callback, from which [`Import`], [`Callback`], the engines' linkers and the host's dispatch
//!   trait are all generated.
//! - Every enum with its exact wire value ([`Status`], [`LogLevel`], [`BufferType`], ...).
//! - Strict codecs for header maps ([`pairs`]) and property paths ([`property_path`]).
//! - [`ModuleInfo`]: imports, exports and the ABI version a module declares.
//!
//! This crate has no engine and does no I/O.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod enums;
mod module;
pub mod pairs;
pub mod property_path;
mod table;

pub use enums::*;
pub use module::{AbiError, ExportInfo, ExportKind, ImportInfo, ModuleInfo};

/// A version of the proxy-wasm ABI, as declared by a module's `proxy_abi_version_*` export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbiVersion {
    /// `proxy_abi_version_0_1_0`.
    V0_1_0,
    /// `proxy_abi_version_0_2_0`.
    V0_2_0,
    /// `proxy_abi_version_0_2_1`.
    V0_2_1,
}

impl AbiVersion {
    /// Every supported version, oldest first.
    pub const ALL: [AbiVersion; 3] = [AbiVersion::V0_1_0, AbiVersion::V0_2_0, AbiVersion::V0_2_1];

    /// The export that marks a module as built for this version.
    pub const fn marker(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "proxy_abi_version_0_1_0",
            AbiVersion::V0_2_0 => "proxy_abi_version_0_2_0",
            AbiVersion::V0_2_1 => "proxy_abi_version_0_2_1",
        }
    }

    /// The version a marker export names, if it is a supported one.
    pub fn from_marker(name: &str) -> Option<AbiVersion> {
        AbiVersion::ALL.into_iter().find(|v| v.marker() == name)
    }

    /// The version as the spec writes it (`"0.2.1"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            AbiVersion::V0_1_0 => 1,
            AbiVersion::V0_2_0 => 2,
            AbiVersion::V0_2_1 => 4,
        }
    }
}

impl core::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of ABI versions: which versions define a hostcall or callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AbiVersions(u8);

impl AbiVersions {
    /// Every version.
    pub const ALL: AbiVersions = AbiVersions(7);
    /// ABI 0.1.0 only.
    pub const V0_1_0: AbiVersions = AbiVersions(1);
    /// ABI 0.2.0 and 0.2.1.
    pub const V0_2_X: AbiVersions = AbiVersions(6);
    /// ABI 0.2.1 only.
    pub const V0_2_1: AbiVersions = AbiVersions(4);

    /// Whether `version` is in the set.
    pub const fn contains(self, version: AbiVersion) -> bool {
        self.0 & version.bit() != 0
    }
}

/// A wasm value type that crosses the proxy-wasm boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValType {
    /// `i32`: pointers, sizes, ids, enums, booleans, statuses.
    I32,
    /// `i64`: metric values and a few WASI arguments.
    I64,
}

impl core::fmt::Display for ValType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ValType::I32 => "i32",
            ValType::I64 => "i64",
        })
    }
}

/// The module an import comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImportModule {
    /// `env`: the proxy-wasm hostcalls and the emscripten helpers.
    Env,
    /// WASI preview1, linked under both [`WASI_MODULES`] names.
    Wasi,
}

/// The module names WASI preview1 functions are imported from (both are linked).
pub const WASI_MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

macro_rules! val_type {
    (i32) => {
        ValType::I32
    };
    (i64) => {
        ValType::I64
    };
}

macro_rules! result_type {
    (i32) => {
        Some(ValType::I32)
    };
    (()) => {
        None
    };
}

macro_rules! import_module {
    (env) => {
        ImportModule::Env
    };
    (wasi) => {
        ImportModule::Wasi
    };
}

macro_rules! define_imports {
    ($($variant:ident : $module:ident $name:ident ( $($arg:ident : $ty:ident),* ) -> $ret:tt , $vers:ident ;)*) => {
        /// Every function a proxy-wasm host provides to guests: the `proxy_*` hostcalls, the
        /// emscripten helpers and WASI preview1. Generated from [`for_each_import!`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Import {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                $variant,
            )*
        }

        impl Import {
            /// Every import, in table order.
            pub const ALL: &'static [Import] = &[$(Import::$variant),*];

            /// The import's field name.
            pub const fn name(self) -> &'static str {
                match self { $(Import::$variant => stringify!($name)),* }
            }

            /// The module it is imported from.
            pub const fn module(self) -> ImportModule {
                match self { $(Import::$variant => import_module!($module)),* }
            }

            /// Parameter types.
            pub const fn params(self) -> &'static [ValType] {
                match self { $(Import::$variant => &[$(val_type!($ty)),*]),* }
            }

            /// Parameter names, as the reference names them.
            pub const fn param_names(self) -> &'static [&'static str] {
                match self { $(Import::$variant => &[$(stringify!($arg)),*]),* }
            }

            /// Result type (`None` for a function that returns nothing).
            pub const fn result(self) -> Option<ValType> {
                match self { $(Import::$variant => result_type!($ret)),* }
            }

            /// The ABI versions that define it.
            pub const fn versions(self) -> AbiVersions {
                match self { $(Import::$variant => AbiVersions::$vers),* }
            }
        }
    };
}
for_each_import!(define_imports);

macro_rules! define_callbacks {
    ($($variant:ident : $name:ident ( $($arg:ident : $ty:ident),* ) -> $ret:tt , $vers:ident ;)*) => {
        /// Every export a proxy-wasm host may call. Generated from [`for_each_callback!`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Callback {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                $variant,
            )*
        }

        impl Callback {
            /// Every callback, in table order (`Callback::ALL[c as usize] == c`).
            pub const ALL: &'static [Callback] = &[$(Callback::$variant),*];

            /// The export's name.
            pub const fn name(self) -> &'static str {
                match self { $(Callback::$variant => stringify!($name)),* }
            }

            const fn params_v0_2(self) -> &'static [ValType] {
                match self { $(Callback::$variant => &[$(val_type!($ty)),*]),* }
            }

            /// Parameter names (ABI 0.2.x).
            pub const fn param_names(self) -> &'static [&'static str] {
                match self { $(Callback::$variant => &[$(stringify!($arg)),*]),* }
            }

            /// Result type (`None` for a callback that returns nothing).
            pub const fn result(self) -> Option<ValType> {
                match self { $(Callback::$variant => result_type!($ret)),* }
            }

            /// The ABI versions that define it.
            pub const fn versions(self) -> AbiVersions {
                match self { $(Callback::$variant => AbiVersions::$vers),* }
            }
        }
    };
}
for_each_callback!(define_callbacks);

impl Callback {
    /// The number of callbacks in the table.
    pub const COUNT: usize = Callback::ALL.len();

    /// Parameter types in `version`. Only the header callbacks differ: ABI 0.1.0 has no
    /// `end_of_stream` argument there.
    pub fn params(self, version: AbiVersion) -> &'static [ValType] {
        let params = self.params_v0_2();
        match (self, version) {
            (
                Callback::ProxyOnRequestHeaders | Callback::ProxyOnResponseHeaders,
                AbiVersion::V0_1_0,
            ) => params.split_last().map_or(params, |(_, rest)| rest),
            _ => params,
        }
    }

    /// The callback exported under `name`, if any.
    pub fn from_name(name: &str) -> Option<Callback> {
        Callback::ALL.iter().copied().find(|c| c.name() == name)
    }
}

impl Import {
    /// The import a module asks for as `module`.`name`, if the host provides it.
    pub fn lookup(module: &str, name: &str) -> Option<Import> {
        let wanted = match module {
            "env" => ImportModule::Env,
            m if WASI_MODULES.contains(&m) => ImportModule::Wasi,
            _ => return None,
        };
        Import::ALL
            .iter()
            .copied()
            .find(|i| i.module() == wanted && i.name() == name)
    }

    /// Whether this is a `proxy_*` hostcall (as opposed to WASI or an emscripten helper).
    pub fn is_hostcall(self) -> bool {
        self.module() == ImportModule::Env && self.name().starts_with("proxy_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_every_hostcall_of_the_reference() {
        let hostcalls = Import::ALL.iter().filter(|i| i.is_hostcall()).count();
        assert_eq!(hostcalls, 43, "ABI.md §4.0 lists 43 proxy_* hostcalls");
        let wasi = Import::ALL
            .iter()
            .filter(|i| i.module() == ImportModule::Wasi)
            .count();
        assert_eq!(wasi, 46, "WASI preview1 has 46 functions");
        for (i, c) in Callback::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn only_metric_values_are_i64_among_hostcalls() {
        for import in Import::ALL.iter().filter(|i| i.is_hostcall()) {
            let has_i64 = import.params().contains(&ValType::I64);
            let metric = matches!(
                import,
                Import::ProxyIncrementMetric | Import::ProxyRecordMetric
            );
            assert_eq!(has_i64, metric, "{}", import.name());
            assert_eq!(import.result(), Some(ValType::I32), "{}", import.name());
            assert_eq!(import.params().len(), import.param_names().len());
        }
    }

    #[test]
    fn lookup_and_versions() {
        assert_eq!(Import::lookup("env", "proxy_log"), Some(Import::ProxyLog));
        assert_eq!(
            Import::lookup("wasi_unstable", "fd_write"),
            Some(Import::FdWrite)
        );
        assert_eq!(
            Import::lookup("wasi_snapshot_preview1", "proc_exit"),
            Some(Import::ProcExit)
        );
        assert_eq!(Import::lookup("env", "fd_write"), None);
        assert_eq!(Import::lookup("other", "proxy_log"), None);
        assert!(
            Import::ProxyGetConfiguration
                .versions()
                .contains(AbiVersion::V0_1_0)
        );
        assert!(
            !Import::ProxyGetConfiguration
                .versions()
                .contains(AbiVersion::V0_2_1)
        );
        assert!(
            !Import::ProxyGetLogLevel
                .versions()
                .contains(AbiVersion::V0_2_0)
        );
        assert!(
            Import::ProxyContinueStream
                .versions()
                .contains(AbiVersion::V0_2_0)
        );
        assert_eq!(
            Callback::ProxyOnRequestHeaders
                .params(AbiVersion::V0_1_0)
                .len(),
            2
        );
        assert_eq!(
            Callback::ProxyOnRequestHeaders
                .params(AbiVersion::V0_2_1)
                .len(),
            3
        );
        assert_eq!(
            Callback::from_name("proxy_on_log"),
            Some(Callback::ProxyOnLog)
        );
    }
}
