//! Command-line interface (README, "Running it"). Parsing only; `main.rs` dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "istio-vault-webhook",
    version,
    about = "Mutating admission webhook: istiod and Istio gateways get their CA from Vault"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
// Parsed once per process; boxing would only add noise.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve the webhook (HTTPS) and the admin endpoints (HTTP).
    Serve(ServeArgs),
    /// Print Pods or workloads from files (or stdin) as the webhook would mutate them.
    Render(RenderArgs),
    /// Validate config files or ConfigMap manifests; exit 1 if any is invalid.
    Check(CheckArgs),
    /// Make the Istio CA hierarchy: a root, and per cluster an intermediate as istiod's files
    /// and as a `bao kv put PATH @FILE` body.
    Certs(crate::certs::CertsArgs),
    /// Check a live cluster: webhook and injector registration, policies, ConfigMap, Pods.
    Doctor(crate::doctor::DoctorArgs),
    /// Print the config as native admission policies (MutatingAdmissionPolicy, Kubernetes >= 1.36).
    Export(crate::export::ExportArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTPS address for POST /mutate. Default 0.0.0.0:8443 (127.0.0.1:8443
    /// when running the embedded example outside a cluster).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Plain-HTTP address for /healthz, /readyz and /metrics. Default
    /// 0.0.0.0:8080 (127.0.0.1:8080 for the embedded example).
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,

    /// Watch this ConfigMap (NAMESPACE/NAME, key config.yaml) through the
    /// Kubernetes API. Default inside a cluster: <pod namespace>/istio-vault-webhook.
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "config")]
    pub config_map: Option<String>,
    /// Read the config from a file (a bare config.yaml or a ConfigMap
    /// manifest), re-read when it changes.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serving certificate chain (PEM), reloaded when the file changes.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "tls_self_signed"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Serving private key (PEM), reloaded with the certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Generate a CA and serving certificate in memory at start.
    #[arg(long)]
    pub tls_self_signed: bool,
    /// With --tls-self-signed: keep this MutatingWebhookConfiguration's
    /// caBundle trusting the generated CA.
    #[arg(long, value_name = "NAME", requires = "tls_self_signed")]
    pub webhook_config: Option<String>,
    /// Write the self-signed CA certificate (public part only) to this file.
    #[arg(long, value_name = "FILE", requires = "tls_self_signed")]
    pub ca_out: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Lifetime of the self-signed CA and serving certificate; they are
    /// rotated when a third of it remains (default 1 year; for tests).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, hide = true)]
    pub self_signed_validity: Option<std::time::Duration>,
    /// Kubernetes API server URL, unauthenticated (for tests). Default: the
    /// kubeconfig ($KUBECONFIG, ~/.kube/config), else the in-cluster config.
    #[arg(long, value_name = "URL", hide = true)]
    pub kube_api: Option<String>,

    /// Service name the API server calls (for the self-signed certificate's SANs).
    #[arg(long, default_value = "istio-vault-webhook")]
    pub service_name: String,
    /// Namespace of that Service. Default: $POD_NAMESPACE, else istio-vault-webhook.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-vault-webhook")]
    pub namespace: String,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Threads serving HTTPS connections, each with its own event loop (like
    /// nginx's workers). One serves tens of thousands of admissions a second,
    /// far beyond what istiod and gateway rollouts ask; more only pay off
    /// with CPUs to spare beside them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,
    /// How long SIGTERM waits for in-flight requests before closing anyway.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// Config file (bare config.yaml or ConfigMap manifest).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Print the RFC 6902 JSON patch (one JSON array per document) instead of YAML.
    #[arg(long)]
    pub patch: bool,
    /// YAML files with Pods or workloads; stdin when none.
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Config files or ConfigMap manifests.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// Parses `10s`, `500ms`, `2m`, `1h`, `365d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s"))?;
    Ok(match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "h" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "d" => std::time::Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(format!("{s:?}: unit must be ms, s, m, h or d")),
    })
}
