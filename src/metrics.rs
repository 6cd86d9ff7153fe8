//! One Prometheus registry for the process (prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// Profile name, or "" when no profile applied.
    pub profile: String,
    /// patched | unchanged | denied | skipped | error
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub cluster: String,
    pub hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// "file", "configmap" or "embedded".
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    /// What is watched: "configmap" or "webhookconfiguration".
    pub watch: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// updated | unchanged | conflict | not_found | error
    pub result: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub admissions: Family<AdmissionLabels, Counter>,
    pub admission_duration: Histogram,
    pub config_generation: Gauge,
    pub config_loaded: Gauge,
    pub config_load_errors: Family<SourceLabels, Counter>,
    /// 1 for the config in force, labelled with its cluster and hash.
    pub config_info: Family<ConfigLabels, Gauge>,
    pub tls_not_after: Gauge,
    /// Errors of Kubernetes API watches (each is retried with backoff).
    pub watch_errors: Family<WatchLabels, Counter>,
    /// caBundle reconciliations of the MutatingWebhookConfiguration, by result.
    pub ca_bundle_updates: Family<ResultLabels, Counter>,
    /// 1 when the webhook configuration's caBundle is known to trust the
    /// serving certificate of this replica (only with --webhook-config).
    pub ca_bundle_trusted: Gauge,
    /// Self-signed certificate rotations done since start.
    pub tls_rotations: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("istio_vault_webhook");
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews answered, by profile and outcome",
            admissions.clone(),
        );
        // 50 µs .. ~0.8 s: the decision itself takes microseconds; the upper
        // buckets catch a 7 MiB body.
        let admission_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 15),
        );
        registry.register(
            "admission_duration_seconds",
            "Time from request body received to response ready",
            admission_duration.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "config_generation",
            "Number of valid configs loaded since start",
            config_generation.clone(),
        );
        let config_loaded = Gauge::default();
        registry.register(
            "config_loaded",
            "1 when a valid config is in force, 0 when istiod Pods are being denied for lack of one",
            config_loaded.clone(),
        );
        let config_load_errors = Family::<SourceLabels, Counter>::default();
        registry.register(
            "config_load_errors",
            "Configs that failed to load or validate (the last good one stays in force)",
            config_load_errors.clone(),
        );
        let config_info = Family::<ConfigLabels, Gauge>::default();
        registry.register(
            "config_info",
            "The config in force (value 1), by cluster and config hash",
            config_info.clone(),
        );
        let tls_not_after = Gauge::default();
        registry.register(
            "tls_certificate_not_after_timestamp_seconds",
            "Expiry (Unix time) of the serving certificate in use",
            tls_not_after.clone(),
        );
        let watch_errors = Family::<WatchLabels, Counter>::default();
        registry.register(
            "kube_watch_errors",
            "Errors while listing or watching through the Kubernetes API (the watch resumes with backoff)",
            watch_errors.clone(),
        );
        let ca_bundle_updates = Family::<ResultLabels, Counter>::default();
        registry.register(
            "ca_bundle_reconciles",
            "Reconciliations of the MutatingWebhookConfiguration caBundle, by result (updated, unchanged, conflict, not_found, error)",
            ca_bundle_updates.clone(),
        );
        let ca_bundle_trusted = Gauge::default();
        registry.register(
            "ca_bundle_trusted",
            "1 when the MutatingWebhookConfiguration's caBundle trusts this replica's CA (--webhook-config)",
            ca_bundle_trusted.clone(),
        );
        let tls_rotations = Counter::default();
        registry.register(
            "tls_certificate_rotations",
            "Self-signed CA and serving certificate rotations since start",
            tls_rotations.clone(),
        );
        Metrics {
            registry,
            admissions,
            admission_duration,
            config_generation,
            config_loaded,
            config_load_errors,
            config_info,
            tls_not_after,
            watch_errors,
            ca_bundle_updates,
            ca_bundle_trusted,
            tls_rotations,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
