//! Where the config comes from, and the store the admission path reads.
//!
//! Every source (embedded example, file, ConfigMap) writes into one
//! [`ConfigStore`]; the admission path takes a snapshot with a lock-free
//! `ArcSwap` load, so a slow writer can never stall an admission.

pub mod configmap;
pub mod file;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::mutate::ConfigState;

/// What the admission path sees at one instant.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Option<Arc<Config>>,
    /// Why there is no config (shown in denials), when `config` is None.
    pub missing: String,
    /// The most recent load error, kept until a valid config loads.
    pub last_error: Option<String>,
    /// Valid configs loaded so far.
    pub generation: u64,
}

impl Snapshot {
    pub fn state(&self) -> ConfigState<'_> {
        match &self.config {
            Some(c) => ConfigState::Loaded(c),
            None => ConfigState::Missing { why: &self.missing },
        }
    }
}

pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    metrics: Arc<Metrics>,
    source: &'static str,
}

impl ConfigStore {
    pub fn new(metrics: Arc<Metrics>, source: &'static str, missing: impl Into<String>) -> Self {
        metrics.config_missing(None);
        ConfigStore {
            current: ArcSwap::from_pointee(Snapshot {
                config: None,
                missing: missing.into(),
                last_error: None,
                generation: 0,
            }),
            metrics,
            source,
        }
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// A valid config is now in force.
    pub fn set(&self, config: Config) {
        let old = self.current.load_full();
        let generation = old.generation + 1;
        self.metrics.config_loaded(
            generation,
            &config.cluster,
            &config.hash,
            old.config.as_deref().map(labels),
        );
        tracing::info!(
            cluster = %config.cluster,
            hash = %config.hash,
            generation,
            source = self.source,
            "config loaded"
        );
        self.current.store(Arc::new(Snapshot {
            config: Some(Arc::new(config)),
            missing: String::new(),
            last_error: None,
            generation,
        }));
    }

    /// The config is gone (e.g. the ConfigMap was deleted): fail closed.
    pub fn clear(&self, why: impl Into<String>) {
        let old = self.current.load_full();
        self.metrics
            .config_missing(old.config.as_deref().map(labels));
        let why = why.into();
        tracing::warn!(source = self.source, reason = %why, "no config: istiod Pods will be denied");
        self.current.store(Arc::new(Snapshot {
            config: None,
            missing: why,
            last_error: old.last_error.clone(),
            generation: old.generation,
        }));
    }

    /// A load failed: keep the last good config, remember and count the error.
    pub fn reject(&self, error: impl Into<String>) {
        let error = error.into();
        self.metrics.config_rejected(self.source);
        let old = self.current.load_full();
        tracing::error!(
            source = self.source,
            error = %error,
            kept = old.config.as_ref().map(|c| c.hash.as_str()).unwrap_or("none"),
            "config rejected; the last good config stays in force"
        );
        let missing = if old.config.is_none() {
            format!("the config is invalid: {}", first_line(&error))
        } else {
            old.missing.clone()
        };
        self.current.store(Arc::new(Snapshot {
            config: old.config.clone(),
            missing,
            last_error: Some(error),
            generation: old.generation,
        }));
    }
}

/// The labels of a config's `config_info` series.
fn labels(c: &Config) -> (&str, &str) {
    (&c.cluster, &c.hash)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}
