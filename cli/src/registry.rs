//! `filterbox push` and `filterbox pull`: a plugin to and from an OCI registry, as a Wasm OCI
//! artifact (`application/vnd.wasm.content.layer.v1+wasm`).

use anyhow::{Context as _, Result};
use filterbox::{CodeFetcher, PluginSource, PullPolicy, RegistryAuth};
use std::path::{Path, PathBuf};

/// How to reach the registry.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to the registry (a local one), not HTTPS.
    #[arg(long)]
    pub insecure: bool,
    /// User name for the registry (basic auth, or a token exchange if the registry asks).
    #[arg(long)]
    pub username: Option<String>,
    /// Its password (better: the FILTERBOX_REGISTRY_PASSWORD environment variable, which
    /// stays out of the process list).
    #[arg(long)]
    pub password: Option<String>,
}

impl RegistryArgs {
    /// A fetcher for `reference` with these settings.
    pub fn fetcher(&self, reference: &str) -> CodeFetcher {
        let mut fetcher = CodeFetcher::default();
        if self.insecure {
            fetcher = fetcher.insecure_registry(registry_of(reference));
        }
        if let Some(username) = &self.username {
            fetcher = fetcher.registry_auth(RegistryAuth::Basic {
                username: username.clone(),
                password: self
                    .password
                    .clone()
                    .or_else(|| std::env::var("FILTERBOX_REGISTRY_PASSWORD").ok())
                    .unwrap_or_default(),
            });
        }
        fetcher
    }
}

/// The `host[:port]` part of a reference.
pub fn registry_of(reference: &str) -> String {
    let name = reference.strip_prefix("oci://").unwrap_or(reference);
    name.split('/').next().unwrap_or(name).to_owned()
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")
}

/// Pushes the module in `file` as `reference`; says what it pushed.
pub fn push(file: &Path, reference: &str, registry: &RegistryArgs) -> Result<String> {
    let fetcher = registry.fetcher(reference);
    let runtime = runtime()?;
    let code = runtime
        .block_on(fetcher.fetch(&PluginSource::File(file.to_owned())))
        .with_context(|| format!("reading {}", file.display()))?;
    let digest = runtime.block_on(fetcher.push(&code.bytes, reference))?;
    Ok(format!(
        "pushed {} ({} bytes) to {reference}\nsha256: {digest}\n",
        file.display(),
        code.bytes.len()
    ))
}

/// Pulls `reference` and writes the module to `output` (or only checks it); says what it got.
pub fn pull(reference: &str, output: Option<&PathBuf>, registry: &RegistryArgs) -> Result<String> {
    let source = PluginSource::Oci {
        reference: reference.to_owned(),
        sha256: None,
        pull_policy: PullPolicy::Always,
    };
    let code = runtime()?.block_on(registry.fetcher(reference).fetch(&source))?;
    let mut said = format!(
        "pulled {reference} ({} bytes)\nsha256: {}\n",
        code.bytes.len(),
        code.sha256
    );
    if let Some(path) = output {
        std::fs::write(path, &code.bytes).with_context(|| format!("writing {}", path.display()))?;
        said.push_str(&format!("written to {}\n", path.display()));
    }
    Ok(said)
}
