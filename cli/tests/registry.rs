//! Plugins through a real OCI registry (Debian's `docker-registry`, Distribution, started by
//! the test on 127.0.0.1): `filterbox push` and `pull`, `serve` from an `oci://` reference
//! with its digest checked, a hot reload onto a new tag, a wrong digest refused, and with the
//! registry stopped `IfNotPresent` starting from the module store while `Always` refuses.
//! Skipped, saying so, only when `docker-registry` cannot be started.

use bytes::Bytes;
use filterbox_conformance::guests;
use filterbox_conformance::servers::{free_port, wait_until_answering};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// A `docker-registry` on a free loopback port, storing in `dir`; stopped when dropped.
struct Registry {
    child: Child,
    address: SocketAddr,
}

impl Registry {
    fn start(dir: &Path) -> Result<Registry, String> {
        let address = free_port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{ level: error }}\nstorage: {{ filesystem: {{ rootdirectory: {} }} }}\nhttp: {{ addr: \"{address}\" }}\n",
                dir.join("registry-data").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("could not run docker-registry (Debian package docker-registry): {e}")
            })?;
        let mut registry = Registry { child, address };
        wait_until_answering(&mut registry.child, "docker-registry", address, || {
            registry_answers(address)
        })?;
        Ok(registry)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /v2/` at `address` answers 200: the registry is up.
fn registry_answers(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pushes an image whose one layer is a gzipped tar with `plugin.wasm`, as `docker build`
/// makes from `FROM scratch` and `ADD plugin.wasm`.
async fn push_tar_image(reference: &str, module: &[u8]) {
    use std::io::Write as _;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(module.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "plugin.wasm", module)
        .expect("tar");
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&tar.into_inner().expect("tar"))
        .expect("gzip");
    let layer = oci_client::client::ImageLayer::oci_v1_gzip(gzip.finish().expect("gzip"), None);
    let config = oci_client::client::Config::oci_v1(
        br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec(),
        None,
    );
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let reference: oci_client::Reference = reference.parse().expect("reference");
    client
        .push(
            &reference,
            &[layer],
            config,
            &oci_client::secrets::RegistryAuth::Anonymous,
            None,
        )
        .await
        .expect("push the compat image");
}

fn filterbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_filterbox"))
        .args(args)
        .output()
        .expect("run filterbox")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `serve`'s config with one plugin whose code the lines `code` (under the plugin) name.
fn config_with_code(listen: SocketAddr, echo: SocketAddr, code: &str) -> String {
    format!(
        r#"listeners: [{{ address: "{listen}", upstream: echo }}]
upstreams: {{ echo: "http://{echo}" }}
module_store: store
slots: 1
plugins:
  - name: filter
    configuration: add x-added from-registry
{code}"#
    )
}

/// [`config_with_code`] with the code from the registry in Envoy's spelling.
fn config(listen: SocketAddr, echo: SocketAddr, reference: &str, sha: &str) -> String {
    let code = format!(
        r#"    vm_config:
      code:
        remote:
          http_uri: {{ uri: "oci://{reference}", timeout: 20s }}
          sha256: "{sha}"
          insecure: true
"#
    );
    config_with_code(listen, echo, &code)
}

#[test]
fn plugins_are_pushed_pulled_and_served_through_an_oci_registry() {
    let dir = test_dir("registry");
    let _ = std::fs::remove_dir_all(dir.join("store"));
    let mut registry = match Registry::start(&dir) {
        Ok(registry) => registry,
        Err(e) => {
            eprintln!("SKIPPED: no docker-registry to test against: {e}");
            return;
        }
    };
    std::fs::write(dir.join("headers.wasm"), guests::HEADERS).expect("headers.wasm");
    std::fs::write(dir.join("deny.wasm"), guests::DENY).expect("deny.wasm");
    let v1 = format!("{}/plugins/filter:v1", registry.address);
    let v2 = format!("{}/plugins/filter:v2", registry.address);
    let (sha1, sha2) = (
        filterbox::Sha256::of(guests::HEADERS).to_string(),
        filterbox::Sha256::of(guests::DENY).to_string(),
    );

    // Push two versions; pull one back, byte for byte, by tag and by manifest digest.
    let mut manifests = Vec::new();
    for (file, reference, sha) in [("headers.wasm", &v1, &sha1), ("deny.wasm", &v2, &sha2)] {
        let file = dir.join(file);
        let pushed = filterbox(&["push", &file.to_string_lossy(), reference, "--insecure"]);
        let said = text(&pushed);
        assert!(pushed.status.success(), "{said}");
        assert!(said.contains(sha.as_str()), "{said}");
        let manifest = said
            .lines()
            .find_map(|l| l.strip_prefix("manifest: "))
            .unwrap_or_else(|| panic!("no manifest digest: {said}"));
        manifests.push(manifest.trim().to_owned());
    }
    let by_digest = format!("{}/plugins/filter@{}", registry.address, manifests[0]);
    for reference in [&v1, &by_digest] {
        let out = dir.join("pulled.wasm");
        let _ = std::fs::remove_file(&out);
        let pulled = filterbox(&[
            "pull",
            reference,
            "--insecure",
            "-o",
            &out.to_string_lossy(),
        ]);
        assert!(pulled.status.success(), "{reference}: {}", text(&pulled));
        assert_eq!(
            std::fs::read(&out).expect("pulled file"),
            guests::HEADERS,
            "{reference}"
        );
    }
    // The compat layout's other form: one gzipped tar layer holding plugin.wasm.
    let compat = format!("{}/plugins/compat:v1", registry.address);
    runtime().block_on(push_tar_image(&compat, guests::HEADERS));
    let out = dir.join("compat.wasm");
    let pulled = filterbox(&["pull", &compat, "--insecure", "-o", &out.to_string_lossy()]);
    assert!(pulled.status.success(), "{}", text(&pulled));
    assert_eq!(std::fs::read(&out).expect("pulled file"), guests::HEADERS);
    let missing = filterbox(&[
        "pull",
        &format!("{}/plugins/none:v1", registry.address),
        "--insecure",
    ]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("plugins/none"),
        "{}",
        text(&missing)
    );

    runtime().block_on(async {
        let echo = x_added_upstream().await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();

        // Served from the registry, digest checked.
        let listen = free_port();
        let proxy = serve_until_listening(&dir, &config(listen, echo, &v1, &sha1), listen).await;
        let (status, _, body) = get(&client, format!("http://{listen}/"), None)
            .await
            .expect("request");
        assert_eq!((status, body.as_str()), (200, "from-registry"));

        // The tag moves on to v2 (the deny plugin, denying `/`): the reload takes it.
        let v2_config = config(listen, echo, &v2, &sha2).replace(
            "configuration: add x-added from-registry",
            "configuration: /",
        );
        let tmp = dir.join("filterbox.yaml.tmp");
        std::fs::write(&tmp, &v2_config).expect("config");
        std::fs::rename(&tmp, dir.join("filterbox.yaml")).expect("rename");
        let started = Instant::now();
        loop {
            let (status, _, _) = get(&client, format!("http://{listen}/"), None)
                .await
                .expect("request during reload");
            if status == 403 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "v2 never served"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(proxy);

        // A digest the image's module does not have: refused.
        let wrong = filterbox::Sha256::of(b"something else").to_string();
        let said = refused(&dir, &config(free_port(), echo, &v1, &wrong));
        assert!(said.contains("refused") && said.contains(&wrong), "{said}");

        // The registry gone: IfNotPresent starts from the module store (here in Istio's
        // spelling: `url`, `sha256`, `imagePullPolicy`), Always cannot.
        registry.stop();
        let listen = free_port();
        let istio = config_with_code(
            listen,
            echo,
            &format!(
                "    url: oci://{v1}\n    sha256: {sha1}\n    imagePullPolicy: IfNotPresent\n    vm_config: {{}}\n"
            ),
        );
        let _proxy = serve_until_listening(&dir, &istio, listen).await;
        let (status, _, body) = get(&client, format!("http://{listen}/"), None)
            .await
            .expect("request");
        assert_eq!((status, body.as_str()), (200, "from-registry"));
        let always = config(free_port(), echo, &v1, &sha1).replace(
            "          insecure: true\n",
            "          insecure: true\n          image_pull_policy: Always\n",
        );
        let said = refused(&dir, &always);
        assert!(
            said.contains("pulling") && said.contains("plugins/filter:v1"),
            "{said}"
        );
    });
}
