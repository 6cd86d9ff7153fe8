//! Does a webhook's `caBundle` trust what the webhook serves? A TLS handshake with exactly that
//! bundle as the trust store, for the name the API server verifies.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug)]
pub enum ProbeError {
    /// No TCP connection or no TLS answer: nothing was verified.
    Unreachable(String),
    /// The webhook answered, and its certificate does not verify against the bundle.
    Untrusted(String),
}

/// Connects to `addr` (host:port) and verifies the served chain for `name` against `bundle`.
pub async fn verify(
    addr: &str,
    name: &str,
    bundle: &[u8],
    timeout: Duration,
) -> Result<(), ProbeError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle).flatten() {
        // A certificate webpki cannot use as a trust anchor is simply not one.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(ProbeError::Untrusted(
            "caBundle holds no usable PEM certificate".into(),
        ));
    }
    let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ProbeError::Unreachable(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // What the API server offers.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = ServerName::try_from(name.trim_matches(['[', ']']).to_owned())
        .map_err(|e| ProbeError::Untrusted(format!("{name:?} is not a valid server name: {e}")))?;

    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProbeError::Unreachable(format!("{addr}: connect timed out")))?
        .map_err(|e| ProbeError::Unreachable(format!("{addr}: {e}")))?;
    let connector = TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
        Err(_) => Err(ProbeError::Unreachable(format!(
            "{addr}: TLS handshake timed out"
        ))),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            let rustls_error = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            match rustls_error {
                Some(err) => Err(ProbeError::Untrusted(format!("{err}"))),
                None => Err(ProbeError::Unreachable(format!("{addr}: {e}"))),
            }
        }
    }
}
