//! The HTTPS admission endpoint: accept loop, timeouts, graceful drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admission;
use crate::metrics::{AdmissionLabels, Metrics};
use crate::mutate::Outcome;
use crate::source::ConfigStore;

/// The API server sends at most ~3 MiB objects; 7 MiB leaves room for the
/// review envelope (SPEC §5). Larger bodies get 413.
pub const MAX_BODY: usize = 7 * 1024 * 1024;
/// Bound on a TLS handshake and on reading a request's headers. The API
/// server gives up on a webhook after `timeoutSeconds` (≤ 10 s) anyway.
/// hyper also applies the header-read timer while a keep-alive connection
/// waits for its next request, so idle connections close after this long;
/// Go's transport (the API server) notices the close and re-dials.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct App {
    pub config: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

async fn mutate(State(app): State<App>, body: Bytes) -> Response {
    let start = Instant::now();
    let snapshot = app.config.load();
    let result = admission::review(&body, snapshot.state());
    let elapsed = start.elapsed();
    app.metrics
        .admission_duration
        .observe(elapsed.as_secs_f64());
    match result {
        Ok(reviewed) => {
            let outcome = reviewed.outcome();
            let profile = reviewed.decision.profile().unwrap_or("");
            app.metrics
                .admissions
                .get_or_create(&AdmissionLabels {
                    profile: profile.to_owned(),
                    outcome: outcome.as_str(),
                })
                .inc();
            let message = match &reviewed.decision {
                crate::mutate::Decision::Deny { message, .. } => message.as_str(),
                _ => "",
            };
            tracing::info!(
                uid = %reviewed.uid,
                namespace = %reviewed.namespace,
                pod = %reviewed.pod,
                profile,
                outcome = outcome.as_str(),
                dry_run = reviewed.dry_run,
                duration_us = elapsed.as_micros() as u64,
                message,
                "admission"
            );
            ([(header::CONTENT_TYPE, "application/json")], reviewed.body).into_response()
        }
        Err(bad) => {
            app.metrics
                .admissions
                .get_or_create(&AdmissionLabels {
                    profile: String::new(),
                    outcome: Outcome::Error.as_str(),
                })
                .inc();
            tracing::warn!(error = %bad, "admission: bad request");
            let mut line = bad.0;
            line.retain(|c| c != '\n');
            line.push('\n');
            (StatusCode::BAD_REQUEST, line).into_response()
        }
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
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
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
        let builder = builder.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        tokio::spawn(async move {
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
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
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
