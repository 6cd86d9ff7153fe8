//! The HTTPS admission endpoint: accept loop, timeouts, graceful drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admission;
use crate::metrics::Metrics;
use crate::mutate::Outcome;
use crate::source::ConfigStore;

/// The API server sends at most ~3 MiB objects; 7 MiB leaves room for the
/// review envelope. Larger bodies get 413.
pub const MAX_BODY: usize = 7 * 1024 * 1024;
/// Bound on a TLS handshake and on reading a request's headers. The API
/// server gives up on a webhook after `timeoutSeconds` (≤ 10 s) anyway.
/// hyper also applies the header-read timer while a keep-alive connection
/// waits for its next request, so idle connections close after this long;
/// Go's transport (the API server) notices the close and re-dials.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on receiving a request body once its headers are in.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct App {
    pub config: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
}

pub fn router(app: App) -> Router {
    Router::new().route("/mutate", post(mutate)).with_state(app)
}

/// Reads the body with a size cap and a deadline: a client trickling a body
/// must not hold a connection (and its memory) forever.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, Response> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body exceeds 7 MiB\n",
        )
            .into_response()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err((
            StatusCode::BAD_REQUEST,
            format!("cannot read request body: {e}\n"),
        )
            .into_response()),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            [(header::CONNECTION, "close")],
            "request body not received within 10 s\n",
        )
            .into_response()),
    }
}

async fn mutate(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_body(&headers, body).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let start = Instant::now();
    let snapshot = app.config.load();
    let result = admission::review(&body, snapshot.state());
    let elapsed = start.elapsed();
    app.metrics.admission_took(elapsed);
    match result {
        Ok(reviewed) => {
            let outcome = reviewed.outcome();
            let profile = reviewed.decision.profile().unwrap_or("");
            app.metrics.admission(profile, outcome);
            // Not `message`: that is the event's own field in JSON logs.
            let reason = match &reviewed.decision {
                crate::mutate::Decision::Deny { message, .. } => message.as_str(),
                _ => "",
            };
            // The request's own strings go in as strings, so they are logged
            // quoted and escaped: a uid with a newline cannot forge a line.
            tracing::info!(
                uid = reviewed.uid.as_str(),
                namespace = reviewed.namespace.as_str(),
                pod = reviewed.pod.as_str(),
                profile,
                outcome = outcome.as_str(),
                dry_run = reviewed.dry_run,
                duration_us = elapsed.as_micros() as u64,
                reason,
                "admission"
            );
            ([(header::CONTENT_TYPE, "application/json")], reviewed.body).into_response()
        }
        Err(bad) => {
            app.metrics.admission("", Outcome::Error);
            tracing::warn!(error = %bad, "admission: bad request");
            let mut line = bad.0;
            line.retain(|c| c != '\n');
            line.push('\n');
            (StatusCode::BAD_REQUEST, line).into_response()
        }
    }
}

/// Where connections are served: the runtime that accepts them, or one of
/// `--workers` single-threaded runtimes (like nginx's workers). A
/// connection stays on one thread for its life: no work stealing, no
/// cross-thread wakeups, no atomics in the scheduler. Both choices, and
/// the default of one worker on a two-core node, were measured with
/// `scripts/bench` (README, "Benchmarks").
#[derive(Clone, Default)]
pub struct Workers(Arc<[Worker]>);

struct Worker {
    handle: tokio::runtime::Handle,
    /// Open connections, to hand each new one to the least loaded worker.
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Workers {
    /// Serves connections on the calling runtime.
    pub fn current() -> Workers {
        Workers::default()
    }

    /// Starts `n` threads, each driving a single-threaded runtime, to serve
    /// connections on. They stop when the returned [`WorkerThreads`] drops.
    pub fn spawn(n: usize) -> anyhow::Result<(Workers, WorkerThreads)> {
        use anyhow::Context;
        let stop = CancellationToken::new();
        let mut threads = WorkerThreads {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        let mut workers = Vec::new();
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            workers.push(Worker {
                handle: rt.handle().clone(),
                open: Default::default(),
            });
            let stop = stop.clone();
            // Returning drops the runtime and with it any connection still
            // open (those the drain gave up on).
            let thread = std::thread::Builder::new()
                .name(format!("https-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()))
                .context("starting a worker thread")?;
            threads.threads.push(thread);
        }
        Ok((Workers(workers.into()), threads))
    }

    fn serve<F, Fut>(&self, tcp: tokio::net::TcpStream, serve: F)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        use std::sync::atomic::Ordering;
        let Some(worker) = self.0.iter().min_by_key(|w| w.open.load(Ordering::Relaxed)) else {
            tokio::spawn(serve(tcp));
            return;
        };
        // The socket is registered with the accepting runtime's reactor;
        // move it to the worker's.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        let open = worker.open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        worker.handle.spawn(async move {
            struct Closed(Arc<std::sync::atomic::AtomicUsize>);
            impl Drop for Closed {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::Relaxed);
                }
            }
            let _closed = Closed(open);
            match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => tracing::debug!(error = %e, "cannot register a connection"),
            }
        });
    }
}

/// The threads of [`Workers::spawn`]: dropping this stops and joins them.
pub struct WorkerThreads {
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for WorkerThreads {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::io::BufReader<tokio::net::TcpStream>>;
/// rustls reads from the socket 4 KiB at a time: three `recvfrom` per 10 KB
/// admission review. A buffer under it takes what the kernel has in one
/// (writes pass through unbuffered).
const READ_BUFFER: usize = 32 * 1024;
type ConnResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// HTTP/2 has no header-read timer in hyper: a peer that completes TLS and
/// then never sends its preface or a request would hold the connection
/// forever. Give it [`HEADER_READ_TIMEOUT`] to send its first request.
async fn serve_h2(
    builder: &auto::Builder<TokioExecutor>,
    tls: TlsStream,
    router: TowerToHyperService<Router>,
    watcher: hyper_util::server::graceful::Watcher,
) -> ConnResult {
    use std::sync::atomic::{AtomicBool, Ordering};
    let seen = Arc::new(AtomicBool::new(false));
    let flag = seen.clone();
    let service = hyper::service::service_fn(move |req| {
        flag.store(true, Ordering::Relaxed);
        hyper::service::Service::call(&router, req)
    });
    let conn = builder
        .serve_connection(TokioIo::new(tls), service)
        .into_owned();
    let conn = watcher.watch(conn);
    tokio::pin!(conn);
    tokio::select! {
        result = &mut conn => return result,
        _ = tokio::time::sleep(HEADER_READ_TIMEOUT) => {}
    }
    if seen.load(Ordering::Relaxed) {
        conn.await
    } else {
        Ok(()) // dropping the connection closes it
    }
}

/// Serves `router` over TLS on `listener` until `shutdown`, then drains:
/// no new connections, in-flight requests finish, idle keep-alive
/// connections are closed, and after `drain_timeout` the rest are dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: CancellationToken,
    drain_timeout: Duration,
    workers: Workers,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    // The protocol is fixed by ALPN before the first byte of HTTP: a builder
    // per protocol lets hyper start the HTTP/1 header-read timer at once
    // (auto-detection would first wait, unbounded, for a preface).
    let mut h1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    h1.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let mut h2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    h2.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(256);
    let (h1, h2) = (Arc::new(h1), Arc::new(h2));
    let service = TowerToHyperService::new(router);

    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let (h1, h2) = (h1.clone(), h2.clone());
        let service = service.clone();
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        workers.serve(tcp, move |tcp| async move {
            let tcp = tokio::io::BufReader::with_capacity(READ_BUFFER, tcp);
            let tls = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match r {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let result = if is_h2 {
                serve_h2(&h2, tls, service, watcher).await
            } else {
                let conn = h1.serve_connection(TokioIo::new(tls), service).into_owned();
                watcher.watch(conn).await
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("draining HTTPS connections");
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing remaining connections");
    }
}
