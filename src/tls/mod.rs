//! Serving certificates: loaded from files (and reloaded) or generated in
//! memory, served through one lock-free resolver.
//!
//! The resolver hands every new TLS handshake the current `CertifiedKey`
//! from an `ArcSwap`: a rotation affects new connections only, and existing
//! connections finish on the certificate they started with.

pub mod bundle;
pub mod ca_bundle;
pub mod self_signed;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often `--tls-cert/--tls-key` are re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The one crypto provider of the process. kube and rcgen use `ring`;
/// compiling in a second provider would make `ServerConfig::builder()` panic.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs `ring` as the process default (kube's client builds its own
/// rustls config through it). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificate new handshakes get.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

impl CertStore {
    pub fn new(key: CertifiedKey, metrics: Arc<Metrics>) -> Arc<CertStore> {
        let store = Arc::new(CertStore {
            current: ArcSwap::from_pointee(key),
            metrics,
        });
        store.record_expiry();
        store
    }

    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
        self.record_expiry();
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    fn record_expiry(&self) {
        let key = self.current.load();
        if let Some(t) = key.cert.first().and_then(|c| not_after(c)) {
            self.metrics.tls_expiry(t);
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The server's TLS config: TLS 1.2 and 1.3, ALPN h2 then http/1.1 (the API
/// server offers only http/1.1), optional client-certificate verification.
pub fn server_config(
    certs: Arc<CertStore>,
    client_ca: Option<&Path>,
) -> anyhow::Result<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .with_context(|| format!("{}: cannot build client verifier", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_certs(&bytes).with_context(|| path.display().to_string())
}

fn parse_certs(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("invalid PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err(anyhow!("no PEM CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Builds a `CertifiedKey` from a PEM chain and key, checking they belong
/// together (a mismatched pair seen mid-rotation is rejected, not served).
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<CertifiedKey> {
    let chain = parse_certs(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| anyhow!("invalid PEM private key: {e}"))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| anyhow!("certificate and key do not match: {e}"))
}

/// The bytes of a certificate file and its key file, as last read.
pub type PemPair = (Vec<u8>, Vec<u8>);

/// The certificate files of `--tls-cert/--tls-key`.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    fn read(&self) -> anyhow::Result<PemPair> {
        let cert = std::fs::read(&self.cert)
            .with_context(|| format!("cannot read {}", self.cert.display()))?;
        let key = std::fs::read(&self.key)
            .with_context(|| format!("cannot read {}", self.key.display()))?;
        Ok((cert, key))
    }

    /// The served key and the (cert, key) bytes it came from.
    pub fn load(&self) -> anyhow::Result<(CertifiedKey, PemPair)> {
        let (cert, key) = self.read()?;
        let ck = certified_key_from_pem(&cert, &key)
            .with_context(|| format!("{} / {}", self.cert.display(), self.key.display()))?;
        Ok((ck, (cert, key)))
    }

    /// Re-reads both files every [`POLL_INTERVAL`]; a changed, valid pair
    /// replaces the served certificate. Content comparison (not inotify on
    /// the paths) sees kubelet's atomic `..data` symlink swap.
    pub async fn watch(
        self,
        store: Arc<CertStore>,
        mut last: PemPair,
        shutdown: CancellationToken,
    ) {
        let mut reported: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            let files = self.clone();
            let Ok(read) = tokio::task::spawn_blocking(move || files.read()).await else {
                continue;
            };
            let result = read.and_then(|pair| {
                if pair == last {
                    return Ok(None);
                }
                let ck = certified_key_from_pem(&pair.0, &pair.1)?;
                Ok(Some((ck, pair)))
            });
            match result {
                Ok(None) => {}
                Ok(Some((ck, pair))) => {
                    store.set(ck);
                    last = pair;
                    reported = None;
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                }
                Err(e) => {
                    // A half-swapped pair resolves on the next poll; report
                    // each distinct error once.
                    let msg = format!("{e:#}");
                    if reported.as_deref() != Some(&msg) {
                        tracing::warn!(error = %msg, "serving certificate not reloaded; keeping the current one");
                        reported = Some(msg);
                    }
                }
            }
        }
    }
}

/// A certificate's notAfter as Unix seconds.
pub fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}
