//! TLS on `serve`'s listeners: certificates and keys from PEM files, picked by the server
//! name the client asks for (SNI), HTTP/2 or HTTP/1.1 by ALPN.
//!
//! What crosses this module: a listener's `tls` entry in, a [`TlsAcceptor`] out.

use anyhow::{Context as _, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// A listener's `tls`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// The certificates; the first serves clients whose server name matches none (or who
    /// send none).
    pub certificates: Vec<CertificateEntry>,
}

/// One certificate chain and its key.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateEntry {
    /// PEM file with the certificate chain, leaf first (relative to the config file).
    pub certificate_chain: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// Server names (SNI) this certificate is for: exact, or `*.example.com` for any
    /// subdomain. Empty: only as the default.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// Picks the certificate for the server name a client asks for.
#[derive(Debug)]
struct BySni {
    /// (server names, lower case; certificate), the default first.
    certificates: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let wanted = hello.server_name().map(str::to_ascii_lowercase);
        let found = wanted.and_then(|name| {
            self.certificates
                .iter()
                .find(|(names, _)| names.iter().any(|n| name_matches(n, &name)))
        });
        found
            .or_else(|| self.certificates.first())
            .map(|(_, key)| key.clone())
    }
}

/// Whether `pattern` (exact or `*.domain`) covers `name`.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        // As certificates do: the wildcard stands for exactly one label.
        Some(domain) => name
            .strip_suffix(domain)
            .and_then(|sub| sub.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => pattern == name,
    }
}

impl ListenerTls {
    /// The acceptor for this listener; files are read relative to `base`. Errors name the
    /// file and what is wrong with it.
    pub fn acceptor(&self, base: &Path) -> Result<TlsAcceptor> {
        if self.certificates.is_empty() {
            bail!("tls: no certificates");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut certificates = Vec::with_capacity(self.certificates.len());
        for entry in &self.certificates {
            let chain_path = base.join(&entry.certificate_chain);
            let chain = CertificateDer::pem_file_iter(&chain_path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("{e:?}"))
                .with_context(|| format!("tls: reading {}", chain_path.display()))?;
            if chain.is_empty() {
                bail!("tls: no certificate in {}", chain_path.display());
            }
            let key_path = base.join(&entry.private_key);
            let key = PrivateKeyDer::from_pem_file(&key_path)
                .map_err(|e| anyhow::anyhow!("{e:?}"))
                .with_context(|| format!("tls: reading {}", key_path.display()))?;
            let key = CertifiedKey::from_der(chain, key, &provider).with_context(|| {
                format!(
                    "tls: the key {} does not fit {}",
                    key_path.display(),
                    chain_path.display()
                )
            })?;
            let names = entry
                .server_names
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect();
            certificates.push((names, Arc::new(key)));
        }
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("tls: protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(BySni { certificates }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label_of_subdomain_only() {
        assert!(name_matches("a.test", "a.test"));
        assert!(!name_matches("a.test", "b.test"));
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "badexample.com"));
    }
}
