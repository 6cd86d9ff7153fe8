//! One Prometheus registry for the process (prometheus-client), and one
//! method per thing worth counting, so callers say what happened
//! (`metrics.admission(profile, outcome)`) instead of which family to poke.
//!
//! Every family is registered in [`Metrics::new`], grouped by the part of
//! the webhook it describes; the names and help texts are the README's
//! "Metrics" table.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

use crate::mutate::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    /// Profile name, or "" when no profile applied.
    profile: String,
    /// patched | unchanged | denied | skipped | error
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigLabels {
    cluster: String,
    hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    /// "file", "configmap" or "embedded".
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    /// What is watched: "configmap" or "webhookconfiguration".
    watch: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// updated | unchanged | conflict | not_found | error
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    admission: AdmissionFamilies,
    config: ConfigFamilies,
    tls: TlsFamilies,
    ca_bundle: CaBundleFamilies,
    /// Errors of Kubernetes API watches (each is retried with backoff).
    watch_errors: Family<WatchLabels, Counter>,
}

struct AdmissionFamilies {
    count: Family<AdmissionLabels, Counter>,
    duration: Histogram,
}

struct ConfigFamilies {
    generation: Gauge,
    loaded: Gauge,
    load_errors: Family<SourceLabels, Counter>,
    /// 1 for the config in force, labelled with its cluster and hash.
    info: Family<ConfigLabels, Gauge>,
}

struct TlsFamilies {
    not_after: Gauge,
    rotations: Counter,
}

struct CaBundleFamilies {
    reconciles: Family<ResultLabels, Counter>,
    trusted: Gauge,
}

/// Registers `metric` under `name` and hands it back.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("istio_vault_webhook");
        let r = &mut registry;
        let admission = AdmissionFamilies {
            count: register(
                r,
                "admissions",
                "Admission reviews answered, by profile and outcome",
                Family::default(),
            ),
            // 50 µs .. ~0.8 s: the decision itself takes microseconds; the
            // upper buckets catch a 7 MiB body.
            duration: register(
                r,
                "admission_duration_seconds",
                "Time from request body received to response ready",
                Histogram::new(exponential_buckets(0.000_05, 2.0, 15)),
            ),
        };
        let config = ConfigFamilies {
            generation: register(
                r,
                "config_generation",
                "Number of valid configs loaded since start",
                Gauge::default(),
            ),
            loaded: register(
                r,
                "config_loaded",
                "1 when a valid config is in force, 0 when istiod Pods are being denied for lack of one",
                Gauge::default(),
            ),
            load_errors: register(
                r,
                "config_load_errors",
                "Configs that failed to load or validate (the last good one stays in force)",
                Family::default(),
            ),
            info: register(
                r,
                "config_info",
                "The config in force (value 1), by cluster and config hash",
                Family::default(),
            ),
        };
        let tls = TlsFamilies {
            not_after: register(
                r,
                "tls_certificate_not_after_timestamp_seconds",
                "Expiry (Unix time) of the serving certificate in use",
                Gauge::default(),
            ),
            rotations: register(
                r,
                "tls_certificate_rotations",
                "Self-signed CA and serving certificate rotations since start",
                Counter::default(),
            ),
        };
        let watch_errors = register(
            r,
            "kube_watch_errors",
            "Errors while listing or watching through the Kubernetes API (the watch resumes with backoff)",
            Family::default(),
        );
        let ca_bundle = CaBundleFamilies {
            reconciles: register(
                r,
                "ca_bundle_reconciles",
                "Reconciliations of the MutatingWebhookConfiguration caBundle, by result (updated, unchanged, conflict, not_found, error)",
                Family::default(),
            ),
            trusted: register(
                r,
                "ca_bundle_trusted",
                "1 when the MutatingWebhookConfiguration's caBundle trusts this replica's CA (--webhook-config)",
                Gauge::default(),
            ),
        };
        Metrics {
            registry,
            admission,
            config,
            tls,
            ca_bundle,
            watch_errors,
        }
    }

    /// One admission answered (`profile` "" when none applied).
    pub fn admission(&self, profile: &str, outcome: Outcome) {
        self.admission
            .count
            .get_or_create(&AdmissionLabels {
                profile: profile.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// How long one admission took, body in to response ready.
    pub fn admission_took(&self, elapsed: Duration) {
        self.admission.duration.observe(elapsed.as_secs_f64());
    }

    /// Config `generation` of `cluster` with `hash` is now in force;
    /// `previous` was, if any.
    pub fn config_loaded(
        &self,
        generation: u64,
        cluster: &str,
        hash: &str,
        previous: Option<(&str, &str)>,
    ) {
        if let Some((cluster, hash)) = previous {
            self.config.info.remove(&config_labels(cluster, hash));
        }
        self.config.generation.set(generation as i64);
        self.config.loaded.set(1);
        self.config
            .info
            .get_or_create(&config_labels(cluster, hash))
            .set(1);
    }

    /// No config is in force (any more); `previous` was, if any.
    pub fn config_missing(&self, previous: Option<(&str, &str)>) {
        if let Some((cluster, hash)) = previous {
            self.config.info.remove(&config_labels(cluster, hash));
        }
        self.config.loaded.set(0);
    }

    /// A config from `source` failed to load or validate.
    pub fn config_rejected(&self, source: &'static str) {
        self.config
            .load_errors
            .get_or_create(&SourceLabels { source })
            .inc();
    }

    /// The serving certificate in use now expires at `not_after` (Unix time).
    pub fn tls_expiry(&self, not_after: i64) {
        self.tls.not_after.set(not_after);
    }

    pub fn tls_rotated(&self) {
        self.tls.rotations.inc();
    }

    /// A list or watch of `watch` failed and will be retried.
    pub fn watch_error(&self, watch: &'static str) {
        self.watch_errors
            .get_or_create(&WatchLabels { watch })
            .inc();
    }

    /// One caBundle reconciliation ended with `result`.
    pub fn ca_bundle_reconciled(&self, result: &'static str) {
        self.ca_bundle
            .reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn ca_bundle_trusted(&self, trusted: bool) {
        self.ca_bundle.trusted.set(i64::from(trusted));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn config_labels(cluster: &str, hash: &str) -> ConfigLabels {
    ConfigLabels {
        cluster: cluster.to_owned(),
        hash: hash.to_owned(),
    }
}
