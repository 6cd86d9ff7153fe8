//! The plain-HTTP admin server: liveness, readiness, metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::source::ConfigStore;

#[derive(Clone)]
pub struct Admin {
    pub config: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    /// True while the HTTPS listener accepts connections.
    pub serving: Arc<AtomicBool>,
    /// With `--webhook-config`: ready only once the caBundle trusts us.
    pub ca_bundle: Option<Arc<crate::tls::ca_bundle::CaBundle>>,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(admin)
}

/// Ready as soon as HTTPS serves, config or not: an unready webhook gives
/// the API server a connection error (an opaque failure for the user), while
/// a serving one denies istiod with a message saying what to fix. The config
/// state is reported in the body.
async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    let snap = admin.config.load();
    let mut body = String::new();
    // An untrusted certificate fails every call with an opaque TLS error, so
    // a replica the caBundle does not trust yet takes no traffic.
    let trusted = admin.ca_bundle.as_ref().is_none_or(|b| b.status().ready());
    let status = if !admin.serving.load(Ordering::Relaxed) {
        body.push_str("not ready: HTTPS not serving\n");
        StatusCode::SERVICE_UNAVAILABLE
    } else if !trusted {
        body.push_str(
            "not ready: the webhook configuration's caBundle does not trust this replica yet\n",
        );
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        body.push_str("ready: HTTPS serving\n");
        StatusCode::OK
    };
    if let Some(b) = &admin.ca_bundle {
        body.push_str(&b.describe());
        body.push('\n');
    }
    match &snap.config {
        Some(c) => body.push_str(&format!(
            "config: loaded, cluster {}, {}, generation {}\n",
            c.cluster, c.hash, snap.generation
        )),
        None => body.push_str(&format!(
            "config: MISSING, istiod Pods are denied: {}\n",
            snap.missing
        )),
    }
    if let Some(e) = &snap.last_error {
        body.push_str("last config error (last good config kept): ");
        body.push_str(&e.replace('\n', "; "));
        body.push('\n');
    }
    (status, body)
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics.encode(),
    )
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin server failed");
    }
}
