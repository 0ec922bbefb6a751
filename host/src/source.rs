//! Where a plugin's code comes from: a local file, an `http://`/`https://` URL with an
//! optional pinned SHA-256 (feature `hyper-client`), or an OCI registry (feature `oci`), kept
//! in a content-addressed [`ModuleStore`]. What crosses here: a [`PluginSource`] in, the module's bytes and digest out
//! ([`Code`]), for `Plugin::builder(..).build(&code.bytes)`. Every byte fetched or read from
//! the store is hashed; a pinned digest that does not match refuses the code.

use bytes::Bytes;
use core::fmt;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256 as Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A SHA-256 digest, written as 64 lowercase hex digits (`sha256:` prefix accepted).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Sha256 {
        Sha256(Hasher::digest(bytes).into())
    }

    /// Parses `hex` (64 hex digits, optionally after `sha256:`).
    pub fn parse(hex: &str) -> Result<Sha256, SourceError> {
        let digits = hex.strip_prefix("sha256:").unwrap_or(hex).as_bytes();
        let bad = || SourceError::BadDigest(hex.to_owned());
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(Sha256(out))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// Where a plugin's code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PluginSource {
    /// A local file, read whole.
    File(PathBuf),
    /// `http://` or `https://` (with a TLS connector): fetched with GET, unless `sha256` is
    /// given and the store already holds that module.
    Http {
        /// The URL.
        url: String,
        /// The module's digest: checked on every fetch; with it, a stored copy is used
        /// without the network.
        sha256: Option<Sha256>,
    },
    /// An OCI registry: `[oci://]host[:port]/repository[:tag|@sha256:digest]`, the image's
    /// Wasm layer (`application/vnd.wasm.content.layer.v1+wasm`, or the compat layout's
    /// `application/vnd.module.wasm.content.layer.v1+wasm`). Feature `oci`.
    #[cfg(feature = "oci")]
    Oci {
        /// The reference.
        reference: String,
        /// The module's digest (the layer's), checked on every pull.
        sha256: Option<Sha256>,
        /// Whether the module store may answer instead of the registry.
        pull_policy: PullPolicy,
    },
}

/// When a module from a registry is pulled (Istio's `imagePullPolicy`).
#[cfg(feature = "oci")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PullPolicy {
    /// From the module store when it holds the module this reference (or the pinned
    /// digest) gave last time; from the registry otherwise.
    #[default]
    IfNotPresent,
    /// From the registry every time: a registry that cannot be reached refuses the plugin.
    Always,
}

/// How to log in to registries: anonymously (the default), with a user name and password
/// (basic, or exchanged for a bearer token as the registry asks), or with a token.
#[cfg(feature = "oci")]
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryAuth {
    /// No credentials.
    #[default]
    Anonymous,
    /// User name and password.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// A bearer token.
    Bearer(String),
}

#[cfg(feature = "oci")]
impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials never reach a log.
        f.write_str(match self {
            RegistryAuth::Anonymous => "Anonymous",
            RegistryAuth::Basic { .. } => "Basic(..)",
            RegistryAuth::Bearer(_) => "Bearer(..)",
        })
    }
}

/// A module's bytes, with their digest and whether the network was used.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Code {
    /// The module.
    pub bytes: Vec<u8>,
    /// Its SHA-256.
    pub sha256: Sha256,
    /// Read from the [`ModuleStore`] instead of fetched.
    pub from_store: bool,
}

/// Why code could not be had.
#[derive(Debug)]
#[non_exhaustive]
pub enum SourceError {
    /// Reading or writing a file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// The URL does not parse, or its scheme is not one the fetcher speaks.
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// Not 64 hex digits.
    BadDigest(String),
    /// The server could not be reached or the exchange failed.
    Fetch {
        /// The URL.
        url: String,
        /// What the client said.
        error: String,
    },
    /// The server answered with another status than 200.
    Status {
        /// The URL.
        url: String,
        /// Its status.
        status: StatusCode,
    },
    /// No answer within the fetcher's timeout.
    Timeout {
        /// The URL.
        url: String,
    },
    /// The module is larger than the fetcher takes.
    TooLarge {
        /// Where it came from.
        source: String,
        /// The limit, in bytes.
        max_bytes: u64,
    },
    /// The registry refused, or could not be reached, or the image has no Wasm layer.
    Registry {
        /// The reference.
        reference: String,
        /// What went wrong, with the registry's answer.
        error: String,
    },
    /// The module's digest is not the pinned one: it is refused.
    DigestMismatch {
        /// Where it came from.
        source: String,
        /// The pinned digest.
        expected: Sha256,
        /// What the bytes hash to.
        actual: Sha256,
    },
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            SourceError::BadUrl { url, reason } => write!(f, "{url:?}: {reason}"),
            SourceError::BadDigest(text) => {
                write!(f, "{text:?} is not a SHA-256 (64 hex digits)")
            }
            SourceError::Fetch { url, error } => write!(f, "fetching {url}: {error}"),
            SourceError::Status { url, status } => write!(f, "fetching {url}: HTTP {status}"),
            SourceError::Timeout { url } => write!(f, "fetching {url}: timed out"),
            SourceError::Registry { reference, error } => write!(f, "pulling {reference}: {error}"),
            SourceError::TooLarge { source, max_bytes } => {
                write!(f, "{source}: larger than {max_bytes} bytes")
            }
            SourceError::DigestMismatch {
                source,
                expected,
                actual,
            } => write!(
                f,
                "{source}: SHA-256 is {actual}, not the pinned {expected}; refused"
            ),
        }
    }
}

impl std::error::Error for SourceError {}

/// Modules by their SHA-256 in a directory (`<dir>/sha256/<hex>`). A read hashes the file
/// again and ignores a copy that no longer matches its name (a disk error, a hand edit).
#[derive(Debug, Clone)]
pub struct ModuleStore {
    dir: PathBuf,
}

impl ModuleStore {
    /// A store in `dir` (made on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ModuleStore { dir: dir.into() }
    }

    fn path(&self, digest: &Sha256) -> PathBuf {
        self.dir.join("sha256").join(digest.to_string())
    }

    /// The module with `digest`, if the store holds an intact copy.
    pub fn get(&self, digest: &Sha256) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.path(digest)).ok()?;
        if Sha256::of(&bytes) == *digest {
            return Some(bytes);
        }
        tracing::warn!(%digest, "module store: a stored module no longer matches its digest");
        None
    }

    /// The digest `reference` (a URL or an OCI reference) gave when it was last fetched.
    pub fn recall(&self, reference: &str) -> Option<Sha256> {
        let text = std::fs::read_to_string(self.ref_path(reference)).ok()?;
        Sha256::parse(text.trim()).ok()
    }

    /// Notes that `reference` gave the module `digest`, for [`ModuleStore::recall`].
    pub fn remember(&self, reference: &str, digest: &Sha256) -> Result<(), SourceError> {
        let path = self.ref_path(reference);
        let io = |error| SourceError::Io {
            path: path.clone(),
            error,
        };
        let parent = self.dir.join("refs");
        std::fs::create_dir_all(&parent).map_err(io)?;
        let tmp = parent.join(format!(
            ".{}.{}",
            Sha256::of(reference.as_bytes()),
            std::process::id()
        ));
        std::fs::write(&tmp, digest.to_string()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// A reference's file: named by the reference's own digest, so any text is a safe name.
    fn ref_path(&self, reference: &str) -> PathBuf {
        self.dir
            .join("refs")
            .join(Sha256::of(reference.as_bytes()).to_string())
    }

    /// Keeps `bytes` under their digest (written whole, then renamed into place).
    pub fn put(&self, bytes: &[u8]) -> Result<Sha256, SourceError> {
        let digest = Sha256::of(bytes);
        let path = self.path(&digest);
        let io = |error| SourceError::Io {
            path: path.clone(),
            error,
        };
        let parent = self.dir.join("sha256");
        std::fs::create_dir_all(&parent).map_err(io)?;
        let tmp = parent.join(format!(".{digest}.{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(digest)
    }
}

/// Gets plugin code from a [`PluginSource`]: files, and URLs through a hyper client.
pub struct CodeFetcher<C = HttpConnector> {
    client: Client<C, Empty<Bytes>>,
    https: bool,
    store: Option<ModuleStore>,
    max_bytes: u64,
    timeout: Duration,
    #[cfg(feature = "oci")]
    registries: Registries,
}

/// How the fetcher talks to OCI registries.
#[cfg(feature = "oci")]
#[derive(Clone, Default)]
struct Registries {
    auth: RegistryAuth,
    /// Registries spoken to over plain HTTP (`host:port`).
    insecure: Vec<String>,
    /// Told as a layer arrives.
    progress: Option<std::sync::Arc<dyn Fn(Progress) + Send + Sync>>,
}

/// How far a download has come.
#[cfg(feature = "oci")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Bytes received so far.
    pub received: u64,
    /// Bytes the registry said the layer has.
    pub total: u64,
}

/// What [`CodeFetcher::push`] pushed.
#[cfg(feature = "oci")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pushed {
    /// The module's digest (its layer's): what `sha256` pins.
    pub sha256: Sha256,
    /// The image manifest's digest (`sha256:…`): `repo@<it>` names exactly this image.
    pub manifest_digest: String,
}

/// A layer being received: bounded, and reported to the progress callback.
#[cfg(feature = "oci")]
struct Download<'a> {
    bytes: Vec<u8>,
    max: u64,
    total: u64,
    progress: Option<&'a (dyn Fn(Progress) + Send + Sync)>,
}

#[cfg(feature = "oci")]
impl tokio::io::AsyncWrite for Download<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let received = self.bytes.len() as u64 + buf.len() as u64;
        if received > self.max {
            // A registry that sends more than the manifest said, or more than we take.
            return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                "the layer is larger than {} bytes",
                self.max
            ))));
        }
        self.bytes.extend_from_slice(buf);
        if let Some(progress) = self.progress {
            progress(Progress {
                received,
                total: self.total,
            });
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Default for CodeFetcher {
    fn default() -> Self {
        CodeFetcher::with_connector(HttpConnector::new(), false)
    }
}

impl<C> CodeFetcher<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// A fetcher through `connector`; `https`: the connector speaks TLS for `https://` URLs.
    /// No store, at most 256 MiB, 30 s per fetch.
    pub fn with_connector(connector: C, https: bool) -> Self {
        CodeFetcher {
            client: Client::builder(TokioExecutor::new()).build(connector),
            https,
            store: None,
            max_bytes: 256 << 20,
            timeout: Duration::from_secs(30),
            #[cfg(feature = "oci")]
            registries: Registries::default(),
        }
    }

    /// Logs in to registries with `auth`.
    #[cfg(feature = "oci")]
    pub fn registry_auth(mut self, auth: RegistryAuth) -> Self {
        self.registries.auth = auth;
        self
    }

    /// Calls `progress` as a registry layer arrives (a command line shows it).
    #[cfg(feature = "oci")]
    pub fn on_progress(mut self, progress: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        self.registries.progress = Some(std::sync::Arc::new(progress));
        self
    }

    /// Speaks plain HTTP to the registry at `host` (`host:port`), as for a local one.
    #[cfg(feature = "oci")]
    pub fn insecure_registry(mut self, host: impl Into<String>) -> Self {
        self.registries.insecure.push(host.into());
        self
    }

    /// Keeps fetched modules in `store`, and takes pinned ones from it without the network.
    pub fn store(mut self, store: ModuleStore) -> Self {
        self.store = Some(store);
        self
    }

    /// The largest module taken, in bytes.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// How long one fetch may take, connecting and the whole body included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The code `source` names, checked against its pinned digest if it has one.
    pub async fn fetch(&self, source: &PluginSource) -> Result<Code, SourceError> {
        match source {
            PluginSource::File(path) => self.read_file(path),
            PluginSource::Http { url, sha256 } => {
                if let (Some(digest), Some(store)) = (sha256, &self.store)
                    && let Some(bytes) = store.get(digest)
                {
                    return Ok(Code {
                        bytes,
                        sha256: *digest,
                        from_store: true,
                    });
                }
                let bytes = self.get(url).await?;
                let digest = check(url, &bytes, sha256.as_ref())?;
                if let Some(store) = &self.store {
                    store.put(&bytes)?;
                }
                Ok(Code {
                    bytes,
                    sha256: digest,
                    from_store: false,
                })
            }
            #[cfg(feature = "oci")]
            PluginSource::Oci {
                reference,
                sha256,
                pull_policy,
            } => {
                let name = reference.strip_prefix("oci://").unwrap_or(reference);
                if *pull_policy == PullPolicy::IfNotPresent
                    && let Some(store) = &self.store
                    && let Some(digest) = sha256.or_else(|| store.recall(name))
                    && let Some(bytes) = store.get(&digest)
                {
                    return Ok(Code {
                        bytes,
                        sha256: digest,
                        from_store: true,
                    });
                }
                let bytes = tokio::time::timeout(self.timeout, self.pull(name))
                    .await
                    .map_err(|_| SourceError::Timeout {
                        url: reference.clone(),
                    })??;
                let digest = check(reference, &bytes, sha256.as_ref())?;
                if let Some(store) = &self.store {
                    store.put(&bytes)?;
                    store.remember(name, &digest)?;
                }
                Ok(Code {
                    bytes,
                    sha256: digest,
                    from_store: false,
                })
            }
        }
    }

    #[cfg(feature = "oci")]
    fn oci_client(&self) -> (oci_client::Client, oci_client::secrets::RegistryAuth) {
        let config = oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(
                self.registries.insecure.clone(),
            ),
            ..Default::default()
        };
        let auth = match &self.registries.auth {
            RegistryAuth::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
            RegistryAuth::Basic { username, password } => {
                oci_client::secrets::RegistryAuth::Basic(username.clone(), password.clone())
            }
            RegistryAuth::Bearer(token) => oci_client::secrets::RegistryAuth::Bearer(token.clone()),
        };
        (oci_client::Client::new(config), auth)
    }

    /// The Wasm layer of the image `name`: the manifest first, so that a layer larger than
    /// [`CodeFetcher::max_bytes`] is refused before it is downloaded.
    #[cfg(feature = "oci")]
    async fn pull(&self, name: &str) -> Result<Vec<u8>, SourceError> {
        let failed = registry_error(name);
        let reference = parse_reference(name)?;
        let (client, auth) = self.oci_client();
        let (manifest, _) = client
            .pull_image_manifest(&reference, &auth)
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        // A Wasm layer; else the compat layout's single-layer image with `plugin.wasm` in
        // a (gzipped) tar.
        let wasm_layer = manifest
            .layers
            .iter()
            .find(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()));
        let (layer, tar) = match (wasm_layer, manifest.layers.as_slice()) {
            (Some(layer), _) => (layer, false),
            (None, [only]) if TAR_LAYER_TYPES.contains(&only.media_type.as_str()) => (only, true),
            _ => {
                return Err(failed(format!(
                    "no Wasm layer (one of {WASM_LAYER_TYPES:?}) and not a single-layer \
                     image with plugin.wasm"
                )));
            }
        };
        if u64::try_from(layer.size).unwrap_or(u64::MAX) > self.max_bytes {
            return Err(SourceError::TooLarge {
                source: name.to_owned(),
                max_bytes: self.max_bytes,
            });
        }
        let total = u64::try_from(layer.size).unwrap_or(0);
        let mut download = Download {
            bytes: Vec::with_capacity(usize::try_from(total).unwrap_or(0)),
            // What the manifest declared is all that is taken.
            max: total.min(self.max_bytes),
            total,
            progress: self.registries.progress.as_deref(),
        };
        client
            .pull_blob(&reference, layer, &mut download)
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        let bytes = download.bytes;
        // The registry's own digest of the layer, whatever the client checked.
        let actual = Sha256::of(&bytes);
        let expected = Sha256::parse(&layer.digest)?;
        if actual != expected {
            return Err(SourceError::DigestMismatch {
                source: name.to_owned(),
                expected,
                actual,
            });
        }
        match tar {
            false => Ok(bytes),
            true => plugin_in_tar(&bytes, self.max_bytes).map_err(|e| failed(e.to_owned())),
        }
    }

    /// Pushes `module` to the registry as a Wasm OCI artifact tagged by `reference`. Feature
    /// `oci`.
    #[cfg(feature = "oci")]
    pub async fn push(&self, module: &[u8], reference: &str) -> Result<Pushed, SourceError> {
        let name = reference.strip_prefix("oci://").unwrap_or(reference);
        let failed = registry_error(name);
        let parsed = parse_reference(name)?;
        let (client, auth) = self.oci_client();
        let layer = oci_client::client::ImageLayer::new(
            module.to_vec(),
            oci_client::manifest::WASM_LAYER_MEDIA_TYPE.to_owned(),
            None,
        );
        let config = oci_client::client::Config::new(
            b"{}".to_vec(),
            oci_client::manifest::WASM_CONFIG_MEDIA_TYPE.to_owned(),
            None,
        );
        let layers = [layer];
        let push = client.push(&parsed, &layers, config, &auth, None);
        tokio::time::timeout(self.timeout, push)
            .await
            .map_err(|_| SourceError::Timeout {
                url: reference.to_owned(),
            })?
            .map_err(|e| failed(error_chain(&e)))?;
        let manifest_digest = client
            .fetch_manifest_digest(&parsed, &auth)
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        Ok(Pushed {
            sha256: Sha256::of(module),
            manifest_digest,
        })
    }

    fn read_file(&self, path: &Path) -> Result<Code, SourceError> {
        use std::io::Read;
        let io = |error| SourceError::Io {
            path: path.to_owned(),
            error,
        };
        // A FIFO or a device (`/dev/zero`) is refused before anything is read.
        let metadata = std::fs::metadata(path).map_err(io)?;
        if !metadata.is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(self.max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(SourceError::TooLarge {
                source: path.display().to_string(),
                max_bytes: self.max_bytes,
            });
        }
        Ok(Code {
            sha256: Sha256::of(&bytes),
            bytes,
            from_store: false,
        })
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, SourceError> {
        let bad = |reason| SourceError::BadUrl {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") if self.https => {}
            Some("https") => return Err(bad("https:// needs a fetcher with a TLS connector")),
            _ => return Err(bad("only http:// and https:// are fetched")),
        }
        let request = Request::get(uri)
            .body(Empty::new())
            .map_err(|_| bad("not a request URL"))?;
        let fetch = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| SourceError::Fetch {
                    url: url.to_owned(),
                    error: error_chain(&e),
                })?;
            if response.status() != StatusCode::OK {
                return Err(SourceError::Status {
                    url: url.to_owned(),
                    status: response.status(),
                });
            }
            let limit = usize::try_from(self.max_bytes).unwrap_or(usize::MAX);
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(
                    |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                        Some(_) => SourceError::TooLarge {
                            source: url.to_owned(),
                            max_bytes: self.max_bytes,
                        },
                        None => SourceError::Fetch {
                            url: url.to_owned(),
                            error: e.to_string(),
                        },
                    },
                )?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(self.timeout, fetch)
            .await
            .map_err(|_| SourceError::Timeout {
                url: url.to_owned(),
            })?
    }
}

/// The layer media types of the two Wasm image layouts in use: the Wasm OCI artifact and the
/// compat (Solo/WebAssembly Hub) one.
#[cfg(feature = "oci")]
const WASM_LAYER_TYPES: [&str; 2] = [
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.module.wasm.content.layer.v1+wasm",
];

/// Layer types of a single-layer image that carries `plugin.wasm` in a tar (the compat
/// layout's other form, as `docker build` makes it from `FROM scratch` + `ADD plugin.wasm`).
#[cfg(feature = "oci")]
const TAR_LAYER_TYPES: [&str; 4] = [
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// What a registry operation on `reference` failed with, as a [`SourceError`].
#[cfg(feature = "oci")]
fn registry_error(reference: &str) -> impl Fn(String) -> SourceError + '_ {
    move |error| SourceError::Registry {
        reference: reference.to_owned(),
        error,
    }
}

/// `name` (an OCI reference without `oci://`) parsed.
#[cfg(feature = "oci")]
fn parse_reference(name: &str) -> Result<oci_client::Reference, SourceError> {
    name.parse()
        .map_err(|e| registry_error(name)(format!("not a reference: {e}")))
}

/// `plugin.wasm` from a tar layer, gzipped or not, at most `max_bytes` of it.
#[cfg(feature = "oci")]
fn plugin_in_tar(layer: &[u8], max_bytes: u64) -> Result<Vec<u8>, &'static str> {
    use std::io::Read;
    let gzipped = layer.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read + '_> = match gzipped {
        true => Box::new(flate2::read::GzDecoder::new(layer)),
        false => Box::new(layer),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|_| "the layer is not a tar")?;
    for entry in entries {
        let mut entry = entry.map_err(|_| "the layer's tar is damaged")?;
        // `plugin.wasm`, `./plugin.wasm` and `/plugin.wasm` are the same file in a layer.
        let is_plugin = entry.path().ok().is_some_and(|path| {
            let path = path.strip_prefix("./").unwrap_or(&path);
            path.strip_prefix("/").unwrap_or(path) == Path::new("plugin.wasm")
        });
        if !is_plugin {
            continue;
        }
        let mut bytes = Vec::new();
        entry
            .by_ref()
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|_| "the layer's tar is damaged")?;
        if bytes.len() as u64 > max_bytes {
            return Err("plugin.wasm is larger than the fetcher takes");
        }
        return Ok(bytes);
    }
    Err("the layer's tar has no plugin.wasm")
}

/// The digest of `bytes`, refused if it is not the pinned one.
fn check(source: &str, bytes: &[u8], pinned: Option<&Sha256>) -> Result<Sha256, SourceError> {
    let actual = Sha256::of(bytes);
    match pinned {
        Some(expected) if *expected != actual => Err(SourceError::DigestMismatch {
            source: source.to_owned(),
            expected: *expected,
            actual,
        }),
        _ => Ok(actual),
    }
}

/// An error and its causes, one after the other (hyper's own message is terse).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_print_and_refuse_nonsense() {
        let digest = Sha256::of(b"abc");
        let text = digest.to_string();
        assert_eq!(
            text,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Sha256::parse(&text).ok(), Some(digest));
        assert_eq!(Sha256::parse(&format!("sha256:{text}")).ok(), Some(digest));
        for bad in [
            "",
            "abc",
            &text[..62],
            &format!("{}zz", &text[..62]),
            "é".repeat(32).as_str(),
        ] {
            assert!(Sha256::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_store_verifies_what_it_reads() {
        let dir = std::env::temp_dir().join(format!("filterbox-store-test-{}", std::process::id()));
        let store = ModuleStore::new(&dir);
        let digest = store.put(b"module").expect("put");
        assert_eq!(store.get(&digest).as_deref(), Some(&b"module"[..]));
        std::fs::write(dir.join("sha256").join(digest.to_string()), b"tampered").expect("edit");
        assert_eq!(
            store.get(&digest),
            None,
            "a copy that no longer matches is not used"
        );
        assert_eq!(store.get(&Sha256::of(b"other")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An HTTP server, a thread per connection: `/big` is 100 bytes, `/slow` answers nothing
    /// for 10 s, `/ok` is `module`, anything else 404.
    fn server() -> std::net::SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut head = [0u8; 1024];
                    let n = stream.read(&mut head).unwrap_or(0);
                    let head =
                        String::from_utf8_lossy(head.get(..n).unwrap_or_default()).into_owned();
                    let answer = |status: &str, body: &[u8]| {
                        let mut out = format!(
                            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        out.extend_from_slice(body);
                        out
                    };
                    let reply = if head.starts_with("GET /big ") {
                        answer("200 OK", &[0; 100])
                    } else if head.starts_with("GET /slow ") {
                        std::thread::sleep(Duration::from_secs(10));
                        return;
                    } else if head.starts_with("GET /ok ") {
                        answer("200 OK", b"module")
                    } else {
                        answer("404 Not Found", b"")
                    };
                    let _ = stream.write_all(&reply);
                });
            }
        });
        addr
    }

    #[test]
    fn fetches_are_checked_and_bounded_in_size_and_time() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let addr = server();
        // Patient enough for a loaded machine; the slow fetch gets a short timeout of its own.
        let fetcher = CodeFetcher::default()
            .max_bytes(10)
            .timeout(Duration::from_secs(30));
        let impatient = CodeFetcher::default().timeout(Duration::from_millis(300));
        let fetch = |path: &str, sha256: Option<Sha256>| {
            let source = PluginSource::Http {
                url: format!("http://{addr}{path}"),
                sha256,
            };
            runtime.block_on(fetcher.fetch(&source))
        };
        let code = fetch("/ok", Some(Sha256::of(b"module"))).expect("pinned and matching");
        assert_eq!(
            (code.bytes.as_slice(), code.from_store),
            (&b"module"[..], false)
        );
        assert!(matches!(
            fetch("/ok", Some(Sha256::of(b"other"))),
            Err(SourceError::DigestMismatch { .. })
        ));
        assert!(matches!(
            fetch("/big", None),
            Err(SourceError::TooLarge { .. })
        ));
        let slow = PluginSource::Http {
            url: format!("http://{addr}/slow"),
            sha256: None,
        };
        assert!(matches!(
            runtime.block_on(impatient.fetch(&slow)),
            Err(SourceError::Timeout { .. })
        ));
        match fetch("/missing", None) {
            Err(e @ SourceError::Status { .. }) => {
                assert!(e.to_string().contains("404"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let https = PluginSource::Http {
            url: format!("https://{addr}/ok"),
            sha256: None,
        };
        assert!(matches!(
            runtime.block_on(fetcher.fetch(&https)),
            Err(SourceError::BadUrl { .. })
        ));
    }

    #[cfg(feature = "oci")]
    #[test]
    fn the_compat_tar_layer_gives_its_plugin_wasm() {
        let tar_of = |name: &str, body: &[u8]| {
            let mut builder = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, body)
                .expect("append");
            builder.into_inner().expect("tar")
        };
        let gzip = |bytes: &[u8]| {
            use std::io::Write;
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(bytes).expect("gzip");
            encoder.finish().expect("gzip")
        };
        let plain = tar_of("./plugin.wasm", b"\0asm module");
        assert_eq!(
            plugin_in_tar(&plain, 100).as_deref(),
            Ok(&b"\0asm module"[..])
        );
        assert_eq!(
            plugin_in_tar(&gzip(&plain), 100).as_deref(),
            Ok(&b"\0asm module"[..])
        );
        assert!(plugin_in_tar(&plain, 5).is_err(), "over the limit");
        assert!(plugin_in_tar(&tar_of("other.wasm", b"x"), 100).is_err());
        assert!(plugin_in_tar(b"not a tar at all", 100).is_err());
    }

    #[test]
    fn a_pinned_digest_refuses_other_bytes() {
        let pinned = Sha256::of(b"good");
        assert!(check("x", b"good", Some(&pinned)).is_ok());
        assert!(matches!(
            check("x", b"evil", Some(&pinned)),
            Err(SourceError::DigestMismatch { .. })
        ));
        assert_eq!(check("x", b"any", None).ok(), Some(Sha256::of(b"any")));
    }
}
