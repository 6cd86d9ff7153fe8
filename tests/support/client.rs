//! An API-server-like client for the webhook, and the server under test.
//!
//! The client does what kube-apiserver does when it calls a mutating webhook
//! (docs/design.md, the API server's facts): TLS ≥ 1.2 with a root store
//! holding *only* the webhook's CA (the `caBundle`), the server name `istio-vault-webhook.istio-vault-webhook.svc`,
//! ALPN `http/1.1` only, one HTTP/1.1 keep-alive connection reused for many
//! `POST /mutate?timeout=10s` requests with `Content-Type: application/json`
//! and `User-Agent: kube-apiserver-admission`. An h2 variant (ALPN `h2`) is
//! there too.
//!
//! Answers are decoded by `review.rs`, as the API server decodes them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use istio_vault_webhook::cli::ServeArgs;
use istio_vault_webhook::server::{self, Running};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::review::{Verdict, decode_response};

/// The name the API server verifies: `<service>.<namespace>.svc`.
pub const SERVICE_DNS: &str = "istio-vault-webhook.istio-vault-webhook.svc";
/// The request target the API server uses (`timeoutSeconds: 10`).
pub const MUTATE: &str = "/mutate?timeout=10s";
pub const USER_AGENT: &str = "kube-apiserver-admission";
/// How long one request may take before the test calls it hung.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The embedded example config (the seed's cluster1 layout).
pub const EXAMPLE_CONFIG: &str = include_str!("../../src/example-config.yaml");

// ---------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------

/// `serve` on ephemeral loopback ports with a self-signed certificate,
/// stopped when dropped.
pub struct TestServer {
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub ca_pem: String,
    pub config_path: PathBuf,
    running: Option<Running>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Writes `config_yaml` to a temporary file and runs
    /// `serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --config FILE --tls-self-signed`.
    pub async fn start(config_yaml: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config_yaml).expect("write config");
        let ca_out = dir.path().join("ca.pem");
        let args = serve_args(&[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
            config_path.to_str().unwrap(),
            "--tls-self-signed",
            "--ca-out",
            ca_out.to_str().unwrap(),
            "--service-name",
            "istio-vault-webhook",
            "--namespace",
            "istio-vault-webhook",
        ]);
        let shutdown = CancellationToken::new();
        let running = server::start(args, shutdown.clone())
            .await
            .expect("server::start failed");
        let ca_pem = running
            .ca_pem
            .clone()
            .expect("--tls-self-signed must report the generated CA");
        let written = std::fs::read_to_string(&ca_out).expect("--ca-out file written");
        assert_eq!(written, ca_pem, "--ca-out must hold the CA the server uses");
        TestServer {
            https: running.https_addr,
            admin: running.admin_addr,
            ca_pem,
            config_path,
            running: Some(running),
            shutdown,
            _dir: dir,
        }
    }

    /// A new API-server-like HTTP/1.1 connection.
    pub async fn h1(&self) -> H1 {
        H1::connect(self.https, &self.ca_pem)
            .await
            .expect("HTTP/1.1 connection to the webhook")
    }

    /// A new h2 connection (ALPN `h2`).
    pub async fn h2(&self) -> H2 {
        H2::connect(self.https, &self.ca_pem)
            .await
            .expect("h2 connection to the webhook")
    }

    /// `GET` on the plain-HTTP admin server.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        admin_get(self.admin, path).await
    }

    /// Stops the server and waits for the drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(30), r.wait())
                .await
                .expect("server did not stop within 30 s");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `ServeArgs` as clap parses them from `serve ARGS…`.
pub fn serve_args(args: &[&str]) -> ServeArgs {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        serve: ServeArgs,
    }
    Wrap::try_parse_from(std::iter::once("istio-vault-webhook").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("serve {args:?} does not parse: {e}"))
        .serve
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// A client config trusting only `ca_pem`, TLS 1.2 and 1.3, with `alpn`.
pub fn tls_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    tls_config_versions(
        ca_pem,
        alpn,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

pub fn tls_config_versions(
    ca_pem: &str,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("CA PEM parses"))
            .expect("CA certificate is usable as a trust anchor");
    }
    assert!(!roots.is_empty(), "the CA PEM holds no certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// TCP connect plus TLS handshake, verifying the certificate for `name`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(name.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake hung"))?
}

/// What a finished handshake agreed on.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub alpn: Option<Vec<u8>>,
    pub version: Option<ProtocolVersion>,
    pub peer_chain_len: usize,
}

fn tls_info(stream: &TlsStream<TcpStream>) -> TlsInfo {
    let (_, conn) = stream.get_ref();
    TlsInfo {
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version(),
        peer_chain_len: conn.peer_certificates().map_or(0, <[_]>::len),
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

pub type ReqBody = BoxBody<Bytes, Infallible>;

/// A fixed body, sent with `Content-Length`.
pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into()).boxed()
}

/// A body of `total` bytes of `fill`, sent in `chunk`-sized pieces without a
/// length (HTTP/1.1 chunked transfer encoding).
pub fn chunked(total: usize, chunk: usize, fill: u8) -> ReqBody {
    struct Chunks {
        left: usize,
        chunk: usize,
        fill: u8,
    }
    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let n = self.left.min(self.chunk);
            self.left -= n;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![self.fill; n])))))
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::default() // unknown: forces chunked encoding
        }
    }
    Chunks {
        left: total,
        chunk,
        fill,
    }
    .boxed()
}

/// One HTTP answer, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Decodes a 200 AdmissionReview answer for `uid`, panicking with the
    /// reason when it is not one the API server would accept.
    pub fn verdict(&self, uid: &str) -> Verdict {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "expected 200 with an AdmissionReview, got {} {}",
            self.status,
            self.text()
        );
        decode_response(&self.body, uid).unwrap_or_else(|e| panic!("{e}\nbody: {}", self.text()))
    }
}

fn request(method: Method, uri: &str, host: Option<&str>, body: ReqBody) -> Request<ReqBody> {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(host) = host {
        req = req.header(header::HOST, host);
    }
    req.header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, */*")
        .header(header::USER_AGENT, USER_AGENT)
        .body(body)
        .expect("request builds")
}

async fn read_reply(res: hyper::Response<hyper::body::Incoming>) -> Result<Reply, String> {
    let (parts, body) = res.into_parts();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, body.collect())
        .await
        .map_err(|_| "response body hung".to_owned())?
        .map_err(|e| format!("reading the response body failed: {e}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// An HTTP/1.1 keep-alive connection, as the API server keeps one.
pub struct H1 {
    sender: http1::SendRequest<ReqBody>,
    driver: JoinHandle<Result<(), hyper::Error>>,
    pub tls: TlsInfo,
    /// Requests answered on this connection.
    pub answered: usize,
}

impl H1 {
    /// Connects with ALPN `http/1.1` only, like the API server.
    pub async fn connect(addr: SocketAddr, ca_pem: &str) -> Result<H1, String> {
        let config = tls_config(ca_pem, &[b"http/1.1"]);
        let tls = tls_connect(addr, config, SERVICE_DNS)
            .await
            .map_err(|e| format!("TLS connection to {addr} failed: {e}"))?;
        Self::over(tls).await
    }

    pub async fn over(tls: TlsStream<TcpStream>) -> Result<H1, String> {
        let info = tls_info(&tls);
        let (sender, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake failed: {e}"))?;
        let driver = tokio::spawn(conn);
        Ok(H1 {
            sender,
            driver,
            tls: info,
            answered: 0,
        })
    }

    /// True when the connection can no longer carry requests.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: ReqBody,
    ) -> Result<Reply, String> {
        let host = format!("{SERVICE_DNS}:443");
        let req = request(method, path, Some(&host), body);
        let fut = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready (closed by the server?): {e}"))?;
            let res = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| format!("request failed on the connection: {e}"))?;
            read_reply(res).await
        };
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))??;
        self.answered += 1;
        Ok(reply)
    }

    /// `POST /mutate?timeout=10s` with `body`.
    pub async fn post(&mut self, body: impl Into<Bytes>) -> Result<Reply, String> {
        self.send(Method::POST, MUTATE, full(body)).await
    }

    /// Posts an AdmissionReview and decodes the 200 answer for its uid.
    pub async fn review(&mut self, review: &Value) -> Verdict {
        let uid = review["request"]["uid"].as_str().unwrap_or("").to_owned();
        let reply = self
            .post(serde_json::to_vec(review).unwrap())
            .await
            .unwrap_or_else(|e| panic!("POST {MUTATE}: {e}"));
        reply.verdict(&uid)
    }
}

impl Drop for H1 {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// An h2 connection (ALPN `h2`); `SendRequest` clones share it.
pub struct H2 {
    pub sender: http2::SendRequest<ReqBody>,
    driver: JoinHandle<Result<(), hyper::Error>>,
    pub tls: TlsInfo,
}

impl H2 {
    pub async fn connect(addr: SocketAddr, ca_pem: &str) -> Result<H2, String> {
        let config = tls_config(ca_pem, &[b"h2"]);
        let tls = tls_connect(addr, config, SERVICE_DNS)
            .await
            .map_err(|e| format!("TLS connection to {addr} failed: {e}"))?;
        let info = tls_info(&tls);
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("h2 handshake failed: {e}"))?;
        let driver = tokio::spawn(conn);
        Ok(H2 {
            sender,
            driver,
            tls: info,
        })
    }

    /// One request on a clone of the sender (streams run concurrently).
    pub async fn send(&self, method: Method, path: &str, body: ReqBody) -> Result<Reply, String> {
        let mut sender = self.sender.clone();
        let uri = format!("https://{SERVICE_DNS}{path}");
        let req = request(method, &uri, None, body);
        let fut = async {
            sender
                .ready()
                .await
                .map_err(|e| format!("h2 connection not ready: {e}"))?;
            let res = sender
                .send_request(req)
                .await
                .map_err(|e| format!("h2 request failed: {e}"))?;
            read_reply(res).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| format!("no h2 answer within {REQUEST_TIMEOUT:?}"))?
    }

    pub async fn review(&self, review: &Value) -> Verdict {
        let uid = review["request"]["uid"].as_str().unwrap_or("").to_owned();
        let reply = self
            .send(
                Method::POST,
                MUTATE,
                full(serde_json::to_vec(review).unwrap()),
            )
            .await
            .unwrap_or_else(|e| panic!("h2 POST {MUTATE}: {e}"));
        reply.verdict(&uid)
    }
}

impl Drop for H2 {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// `GET path` on a plain-HTTP address (the admin server).
pub async fn admin_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to admin server");
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .expect("admin HTTP handshake");
    let driver = tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::new())
        .unwrap();
    let res = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req))
        .await
        .expect("admin server answers in time")
        .expect("admin request");
    let reply = read_reply(res).await.expect("admin body");
    driver.abort();
    (reply.status, reply.text())
}

/// Annotations of a Pod as a map (empty when absent).
pub fn annotations(pod: &Value) -> BTreeMap<String, String> {
    pod["metadata"]["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .expect("annotation values are strings")
                            .to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the API server checks on a Pod's annotations after the patch: keys
/// are `[prefix/]name` with a DNS-subdomain prefix and a name of ≤ 63
/// `[A-Za-z0-9._-]` starting and ending alphanumeric, values are strings, and
/// all of them together are ≤ 256 KiB.
pub fn validate_annotations(pod: &Value) -> Result<(), String> {
    let Some(map) = pod["metadata"]["annotations"].as_object() else {
        return Ok(());
    };
    let mut total = 0;
    for (k, v) in map {
        let v = v
            .as_str()
            .ok_or_else(|| format!("annotation {k} is not a string: {v}"))?;
        total += k.len() + v.len();
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            || !alnum(name.chars().next())
            || !alnum(name.chars().last())
        {
            return Err(format!(
                "annotation key {k:?}: name part is not a valid qualified name"
            ));
        }
        if let Some(p) = prefix
            && (p.is_empty()
                || p.len() > 253
                || !p.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                }))
        {
            return Err(format!(
                "annotation key {k:?}: prefix is not a DNS subdomain"
            ));
        }
    }
    if total > 256 * 1024 {
        return Err(format!("annotations total {total} bytes > 256 KiB"));
    }
    Ok(())
}

/// True when `s` is a non-empty single line (a trailing newline allowed).
pub fn is_one_line(s: &str) -> bool {
    let s = s.strip_suffix('\n').unwrap_or(s);
    !s.trim().is_empty() && !s.contains('\n')
}

/// The content type of a reply, or "".
pub fn content_type(reply: &Reply) -> &str {
    reply
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .unwrap_or("")
}
