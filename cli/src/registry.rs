//! `filterbox push` and `filterbox pull`: a plugin to and from an OCI registry, as a Wasm OCI
//! artifact (`application/vnd.wasm.content.layer.v1+wasm`).

use anyhow::{Context as _, Result};
use filterbox::{CodeFetcher, PluginSource, Progress, PullPolicy, RegistryAuth};
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
    /// A fetcher for `reference` with these settings: the login given, else the one Docker's
    /// `config.json` has for the registry, else none.
    pub fn fetcher(&self, reference: &str) -> CodeFetcher {
        let login = self.username.as_ref().map(|username| RegistryAuth::Basic {
            username: username.clone(),
            password: self
                .password
                .clone()
                .or_else(|| std::env::var("FILTERBOX_REGISTRY_PASSWORD").ok())
                .unwrap_or_default(),
        });
        for_registry(CodeFetcher::default(), reference, self.insecure, login)
    }
}

/// `fetcher` set up for the registry of `reference`: plain HTTP to it if `insecure`, and
/// `login` if given, else the one Docker's `config.json` has for the registry, else none.
pub fn for_registry<C>(
    mut fetcher: CodeFetcher<C>,
    reference: &str,
    insecure: bool,
    login: Option<RegistryAuth>,
) -> CodeFetcher<C>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let registry = registry_of(reference);
    if insecure {
        fetcher = fetcher.insecure_registry(registry.clone());
    }
    if let Some(login) = login.or_else(|| docker_login(&registry)) {
        fetcher = fetcher.registry_auth(login);
    }
    fetcher
}

/// The login Docker keeps for `registry` in `$DOCKER_CONFIG/config.json` (or
/// `~/.docker/config.json`): `auths.<registry>.auth`, base64 of `user:password`. Credential
/// helpers (`credsStore`) are not asked.
pub fn docker_login(registry: &str) -> Option<RegistryAuth> {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
    };
    docker_login_in(&dir, registry)
}

/// [`docker_login`] from the `config.json` in `dir`.
fn docker_login_in(dir: &Path, registry: &str) -> Option<RegistryAuth> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let auths = config.get("auths")?.as_object()?;
    let entry = auths.get(registry).or_else(|| {
        // Docker also writes `https://host/v1/`-style keys.
        auths
            .iter()
            .find(|(key, _)| {
                key.trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .split('/')
                    .next()
                    == Some(registry)
            })
            .map(|(_, v)| v)
    })?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.get("auth")?.as_str()?)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (username, password) = text.split_once(':')?;
    Some(RegistryAuth::Basic {
        username: username.to_owned(),
        password: password.to_owned(),
    })
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
    let pushed = runtime.block_on(fetcher.push(&code.bytes, reference))?;
    Ok(format!(
        "pushed {} ({} bytes) to {reference}\nsha256: {}\nmanifest: {}\n",
        file.display(),
        code.bytes.len(),
        pushed.sha256,
        pushed.manifest_digest
    ))
}

/// Pulls `reference` and writes the module to `output` (or only checks it); says what it got.
pub fn pull(reference: &str, output: Option<&PathBuf>, registry: &RegistryArgs) -> Result<String> {
    let source = PluginSource::Oci {
        reference: reference.to_owned(),
        sha256: None,
        pull_policy: PullPolicy::Always,
    };
    let started = std::time::Instant::now();
    let shown = std::sync::Mutex::new(started);
    let fetcher = registry.fetcher(reference).on_progress(move |p: Progress| {
        // A line on stderr at most every quarter second, and at the end.
        let Ok(mut last) = shown.lock() else { return };
        if last.elapsed().as_millis() < 250 && p.received < p.total {
            return;
        }
        *last = std::time::Instant::now();
        let seconds = started.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\r{} / {} bytes, {:.0} KiB/s   ",
            p.received,
            p.total,
            p.received as f64 / 1024.0 / seconds
        );
        if p.received >= p.total {
            eprintln!();
        }
    });
    let code = runtime()?.block_on(fetcher.fetch(&source))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_logins_are_read_by_registry() {
        let dir = std::env::temp_dir().join(format!("filterbox-docker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        // "alice:s3cret:x" and "bob:pw"
        std::fs::write(
            dir.join("config.json"),
            r#"{"auths": {"reg.example:5000": {"auth": "YWxpY2U6czNjcmV0Ong="},
                "https://index.docker.io/v1/": {"auth": "Ym9iOnB3"},
                "broken.example": {"auth": "%%%"}}}"#,
        )
        .expect("config");
        let basic = |u: &str, p: &str| {
            Some(RegistryAuth::Basic {
                username: u.to_owned(),
                password: p.to_owned(),
            })
        };
        assert_eq!(
            docker_login_in(&dir, "reg.example:5000"),
            basic("alice", "s3cret:x")
        );
        assert_eq!(docker_login_in(&dir, "index.docker.io"), basic("bob", "pw"));
        assert_eq!(docker_login_in(&dir, "broken.example"), None);
        assert_eq!(docker_login_in(&dir, "other.example"), None);
        assert_eq!(
            registry_of("oci://reg.example:5000/a/b:v1"),
            "reg.example:5000"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
