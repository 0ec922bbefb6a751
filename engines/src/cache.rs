//! A compiled-module cache on disk: serialized artifacts keyed by engine, engine build and
//! configuration, and the module's SHA-256. An entry is checked before it is loaded (magic,
//! the module hash it was built from, a checksum of the artifact); one that fails any check,
//! or that the engine itself refuses, is rebuilt and replaced, never loaded blindly.
//!
//! The engines load artifacts as executable code, so the directory must be writable only by
//! the proxy: the checks catch corruption and mix-ups, not a deliberate forgery.

use crate::{Engine, EngineError, Module, ModuleInner};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"FBXMOD1\n";

/// A [`Hasher`](std::hash::Hasher) that feeds SHA-256, for engine fingerprints in cache file
/// names: std's `DefaultHasher` may change from one Rust release to the next, SHA-256 does
/// not.
#[derive(Default)]
#[cfg(any(feature = "wasmtime", feature = "wasmer"))]
pub(crate) struct Fingerprint(Sha256);

#[cfg(any(feature = "wasmtime", feature = "wasmer"))]
impl std::hash::Hasher for Fingerprint {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

#[cfg(any(feature = "wasmtime", feature = "wasmer"))]
impl Fingerprint {
    /// The first 128 bits of the digest, in hex.
    pub(crate) fn hex(self) -> String {
        self.0
            .finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A directory of compiled modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleCache {
    dir: PathBuf,
}

/// What [`Engine::compile_cached`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded a valid artifact.
    Hit,
    /// There was no artifact: compiled and stored one.
    Miss,
    /// The artifact was unusable (the reason): compiled and replaced it.
    Rebuilt(String),
    /// This engine cannot serialize modules (wasmi): compiled in memory.
    Unsupported,
    /// Compiled, but the artifact could not be written (the reason); the module works.
    NotStored(String),
}

impl ModuleCache {
    /// A cache in `dir` (created on first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ModuleCache { dir: dir.into() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file an engine's artifact of `wasm` lives in.
    pub fn entry_path(&self, engine: &Engine, wasm: &[u8]) -> Option<PathBuf> {
        let fingerprint = engine.artifact_fingerprint()?;
        let hash = hex(&Sha256::digest(wasm));
        Some(self.dir.join(format!(
            "{}-{fingerprint}-{hash}.fbxmod",
            engine.kind().name()
        )))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits a cache entry into the artifact, if the entry is intact and was built from `wasm`.
fn open_entry<'a>(entry: &'a [u8], wasm_hash: &[u8]) -> Result<&'a [u8], String> {
    let rest = entry
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a filterbox cache entry")?;
    let (built_from, rest) = rest.split_at_checked(32).ok_or("truncated header")?;
    if built_from != wasm_hash {
        return Err("entry was built from another module".into());
    }
    let (checksum, artifact) = rest.split_at_checked(32).ok_or("truncated header")?;
    if Sha256::digest(artifact).as_slice() != checksum {
        return Err("artifact checksum mismatch".into());
    }
    Ok(artifact)
}

impl Engine {
    /// What, beside the engine's name, decides whether an artifact fits this engine: its build
    /// and configuration. `None` for engines without serialization.
    fn artifact_fingerprint(&self) -> Option<String> {
        self.inner.fingerprint()
    }

    fn deserialize(&self, artifact: &[u8]) -> Result<ModuleInner, String> {
        self.inner.deserialize(artifact)
    }

    /// Compiles `wasm`, or loads its artifact from `cache`, storing a new one after compiling.
    /// Cache trouble never fails the call: it falls back to compiling and says so.
    pub fn compile_cached(
        &self,
        wasm: &[u8],
        cache: &ModuleCache,
    ) -> Result<(Module, CacheOutcome), EngineError> {
        let Some(path) = cache.entry_path(self, wasm) else {
            return Ok((self.compile(wasm)?, CacheOutcome::Unsupported));
        };
        let wasm_hash = Sha256::digest(wasm);
        let mut rebuilt = None;
        if let Ok(entry) = std::fs::read(&path) {
            match open_entry(&entry, &wasm_hash).and_then(|artifact| self.deserialize(artifact)) {
                Ok(inner) => {
                    let info = filterbox_abi::ModuleInfo::parse(wasm)
                        .map_err(|e| EngineError::Compile(e.to_string()))?;
                    return Ok((
                        Module {
                            kind: self.kind,
                            info: Arc::new(info),
                            inner,
                        },
                        CacheOutcome::Hit,
                    ));
                }
                Err(why) => rebuilt = Some(why),
            }
        }
        let module = self.compile(wasm)?;
        let stored = module.serialize().and_then(|artifact| {
            let mut entry = Vec::with_capacity(MAGIC.len() + 64 + artifact.len());
            entry.extend_from_slice(MAGIC);
            entry.extend_from_slice(&wasm_hash);
            entry.extend_from_slice(&Sha256::digest(&artifact));
            entry.extend_from_slice(&artifact);
            write_atomically(&path, &entry)
        });
        let outcome = match (stored, rebuilt) {
            (Err(why), _) => CacheOutcome::NotStored(why),
            (Ok(()), Some(why)) => CacheOutcome::Rebuilt(why),
            (Ok(()), None) => CacheOutcome::Miss,
        };
        Ok((module, outcome))
    }
}

impl Module {
    fn serialize(&self) -> Result<Vec<u8>, String> {
        self.inner.serialize()
    }
}

/// Writes through a temporary file and a rename, so a reader never sees half an entry.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().ok_or("cache entry has no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("renaming to {}: {e}", path.display()))
}
