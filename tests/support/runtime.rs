//! Helpers shared by the `runtime_*` tests: start the real server
//! in-process (stopped when dropped), talk raw HTTP/1.1 over TLS like the API
//! server does (down to a request head sent without its body), poll with a
//! deadline. Reviews are built and answers decoded by `review.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use istio_vault_webhook::cli::ServeArgs;
use istio_vault_webhook::server::{self, Running};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::review::{Verdict, decode_response};

/// The DNS name the API server verifies for the default Service.
pub const SERVICE_DNS: &str = "istio-vault-webhook.istio-vault-webhook.svc";

pub const CONFIG_C1: &str = "cluster: cluster1
vault:
  authPath: auth/kubernetes-cluster1
profiles:
  istiod:
    secretPath: kubernetes-cluster1-secrets/istiod-service/certs
";

pub const CONFIG_C2: &str = "cluster: cluster2
vault:
  authPath: auth/kubernetes-cluster2
profiles:
  istiod:
    secretPath: kubernetes-cluster2-secrets/istiod-service/certs
";

/// The real server, started in-process; stopped (without waiting for the
/// drain) when dropped, so a failing test does not leave it serving.
pub struct Server(Option<Running>);

impl std::ops::Deref for Server {
    type Target = Running;
    fn deref(&self) -> &Running {
        self.0
            .as_ref()
            .expect("a Server holds its Running until stop")
    }
}

impl Server {
    /// Signals shutdown and waits until the servers have drained and stopped.
    pub async fn stop(mut self) {
        if let Some(running) = self.0.take() {
            running.shutdown.cancel();
            running.wait().await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(running) = &self.0 {
            running.shutdown.cancel();
        }
    }
}

/// Starts the real server in-process on ephemeral loopback ports.
pub async fn start(args: &[&str]) -> Server {
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let mut argv = vec![
        "istio-vault-webhook",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(args);
    let parsed = P::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let running = server::start(parsed.serve, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("server::start {argv:?}: {e:#}"));
    Server(Some(running))
}

/// Polls `f` until it returns Some, failing with `what` after `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- HTTP/1.1 -----------------------------------------------------------------

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }
}

/// A keep-alive HTTP/1.1 connection.
pub struct Http1<S> {
    pub stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Http1<S> {
    pub fn new(stream: S) -> Self {
        Http1 {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<Response> {
        self.send_head(method, path, body.len()).await?;
        self.stream.write_all(body).await?;
        self.stream.flush().await?;
        self.read_response().await
    }

    /// Writes a request line and headers announcing `len` body bytes.
    pub async fn send_head(&mut self, method: &str, path: &str, len: usize) -> std::io::Result<()> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {SERVICE_DNS}:443\r\nUser-Agent: kube-apiserver-admission\r\n\
             Content-Type: application/json\r\nAccept: application/json, */*\r\nContent-Length: {len}\r\n\r\n"
        );
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.flush().await
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    pub async fn read_response(&mut self) -> std::io::Result<Response> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let body = if let Some(len) = header("content-length") {
            let len: usize = len.parse().map_err(std::io::Error::other)?;
            while self.buf.len() < len {
                self.fill().await?;
            }
            self.buf.drain(..len).collect()
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_str = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
                    .map_err(std::io::Error::other)?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    self.fill().await?;
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
            body
        } else {
            loop {
                match self.fill().await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            std::mem::take(&mut self.buf)
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Waits until the peer closes the connection (EOF or reset).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    }
}

/// GET on the plain-HTTP admin server.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Response {
    let tcp = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("admin server {addr}: {e}"));
    let mut c = Http1::new(tcp);
    c.request("GET", path, b"")
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The value of a metric line `name{labels} value` whose name and labels
/// contain `pattern` (a prefix of the line), summed over matches.
pub fn metric(text: &str, pattern: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(pattern))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// --- TLS ----------------------------------------------------------------------

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn roots(pem: &[u8]) -> RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.expect("PEM certificate"))
            .expect("usable root");
    }
    roots
}

/// A client config as the API server builds it: only http/1.1 in ALPN,
/// verifying against `roots`, optionally presenting a client certificate.
pub fn client_config(
    roots: RootCertStore,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

pub async fn tls_connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The serving certificate (DER) a handshake got.
pub fn peer_cert(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("server presented a certificate")
}

/// Connects trusting only `ca_pem` for `name`, POSTs `review` to /mutate and
/// decodes the answer as the API server would.
pub async fn admit(addr: SocketAddr, ca_pem: &[u8], name: &str, review: &[u8]) -> Verdict {
    let tls = tls_connect(addr, client_config(roots(ca_pem), None), name)
        .await
        .unwrap_or_else(|e| panic!("TLS to {addr} as {name}: {e}"));
    let mut c = Http1::new(tls);
    let r = c
        .request("POST", "/mutate?timeout=10s", review)
        .await
        .expect("POST /mutate");
    assert_eq!(r.status, 200, "POST /mutate: {}", r.text());
    let sent: Value = serde_json::from_slice(review).expect("the review is JSON");
    let uid = sent["request"]["uid"].as_str().unwrap_or("");
    decode_response(&r.body, uid).unwrap_or_else(|e| panic!("{e}\nbody: {}", r.text()))
}
