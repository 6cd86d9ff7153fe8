//! `--config-map NAMESPACE/NAME`: the config lives in a ConfigMap, key
//! `config.yaml`, followed through the Kubernetes API.
//!
//! One kube-runtime `watcher` on that single object (field selector
//! `metadata.name=NAME`, so RBAC can be limited to that name) feeds the
//! [`ConfigStore`]; admissions never call the API. The watcher lists, then
//! watches from the list's resourceVersion; when the stream ends it re-watches
//! from the last version seen (the API server replays what was missed), and
//! when that version is too old (410 Gone) it lists again. Errors are logged,
//! counted and retried with kube's default backoff (0.8 s doubling to 30 s,
//! jittered).
//!
//! Semantics:
//! - absent (after a complete list) or deleted → no config: istiod Pods are
//!   denied with a message naming the ConfigMap and how to create it;
//! - created or changed → parsed and validated; valid → served, invalid or
//!   without a `config.yaml` key → rejected, the last good config stays;
//! - unchanged `config.yaml` (a relist, an edit of another key or of labels)
//!   → nothing happens.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_stream};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::ConfigStore;
use crate::config::Config;
use crate::metrics::Metrics;

/// The key of the ConfigMap that holds the config.
pub const KEY: &str = "config.yaml";

/// `NAMESPACE/NAME` of a ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMapRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ConfigMapRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ConfigMapRef {
    /// Parses `NAMESPACE/NAME` (or a bare `NAME` in `default_namespace`).
    pub fn parse(s: &str, default_namespace: &str) -> anyhow::Result<ConfigMapRef> {
        let (namespace, name) = match s.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => (default_namespace, s),
        };
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 253
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        };
        if !valid(namespace) || !valid(name) {
            anyhow::bail!(
                "--config-map {s:?}: expected NAMESPACE/NAME (lower-case DNS names), \
                 e.g. istio-vault-webhook/istio-vault-webhook"
            );
        }
        Ok(ConfigMapRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The message istiod denials carry while the ConfigMap does not exist.
    pub fn absent_message(&self) -> String {
        format!(
            "ConfigMap {self} not found; create it with a {KEY} key: \
             kubectl -n {ns} create configmap {name} --from-file={KEY}",
            ns = self.namespace,
            name = self.name
        )
    }

    /// The message before the first complete read of the ConfigMap.
    pub fn pending_message(&self) -> String {
        format!("ConfigMap {self} has not been read from the Kubernetes API yet")
    }
}

/// What was last fed into the store, so relists and edits of unrelated
/// fields do not reload (and do not bump the config generation).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Nothing,
    Absent,
    /// The `config.yaml` text, or why there is none.
    Text(Result<String, String>),
}

/// Turns watcher events into store updates. Pure apart from the store, so
/// the event semantics are unit-tested without an API server.
pub struct Tracker {
    target: ConfigMapRef,
    store: Arc<ConfigStore>,
    seen: Seen,
    /// Between `Init` and `InitDone`: whether the object was listed.
    listing: Option<bool>,
    /// A complete list has been received at least once.
    synced: bool,
    /// The last error reported into the store before the first sync.
    reported: Option<String>,
}

impl Tracker {
    pub fn new(target: ConfigMapRef, store: Arc<ConfigStore>) -> Tracker {
        Tracker {
            target,
            store,
            seen: Seen::Nothing,
            listing: None,
            synced: false,
            reported: None,
        }
    }

    pub fn handle(&mut self, event: Event<ConfigMap>) {
        match event {
            Event::Init => self.listing = Some(false),
            Event::InitApply(cm) => {
                if self.is_target(&cm) {
                    self.listing = Some(true);
                    self.apply(&cm);
                }
            }
            Event::InitDone => {
                // A relist without the object means it was deleted while we
                // were not watching.
                if self.listing.take() == Some(false) {
                    self.absent();
                }
                self.synced = true;
            }
            Event::Apply(cm) => {
                if self.is_target(&cm) {
                    self.apply(&cm);
                }
            }
            Event::Delete(cm) => {
                if self.is_target(&cm) {
                    self.absent();
                }
            }
        }
    }

    /// A list or watch error. Before the first complete list the store says
    /// why there is no config yet (e.g. RBAC forbids reading the ConfigMap);
    /// afterwards the last state stays in force while the watcher retries.
    pub fn error(&mut self, error: &str) {
        if self.synced || self.seen != Seen::Nothing {
            return;
        }
        let why = format!(
            "cannot read ConfigMap {} from the Kubernetes API: {error}",
            self.target
        );
        if self.reported.as_deref() != Some(&why) {
            self.store.clear(why.clone());
            self.reported = Some(why);
        }
    }

    fn is_target(&self, cm: &ConfigMap) -> bool {
        cm.name_any() == self.target.name
            && cm.namespace().is_none_or(|ns| ns == self.target.namespace)
    }

    fn apply(&mut self, cm: &ConfigMap) {
        let text = config_text(cm);
        let seen = Seen::Text(text.clone());
        if self.seen == seen {
            tracing::debug!(configmap = %self.target, "ConfigMap {KEY} unchanged");
            return;
        }
        self.seen = seen;
        let version = cm.resource_version().unwrap_or_default();
        let parsed =
            text.and_then(|text| Config::parse(&text).map_err(|e| format!("key {KEY}: {e}")));
        match parsed {
            Ok(config) => {
                tracing::info!(configmap = %self.target, resource_version = %version, "ConfigMap read");
                self.store.set(config);
            }
            Err(e) => self.store.reject(format!(
                "ConfigMap {} (resourceVersion {version}) {e}",
                self.target
            )),
        }
    }

    fn absent(&mut self) {
        if self.seen != Seen::Absent {
            self.seen = Seen::Absent;
            self.store.clear(self.target.absent_message());
        }
    }
}

/// The `config.yaml` text of a ConfigMap (from `data`, or UTF-8
/// `binaryData`), or why there is none.
fn config_text(cm: &ConfigMap) -> Result<String, String> {
    if let Some(text) = cm.data.as_ref().and_then(|d| d.get(KEY)) {
        return Ok(text.clone());
    }
    if let Some(bytes) = cm.binary_data.as_ref().and_then(|d| d.get(KEY)) {
        return String::from_utf8(bytes.0.clone())
            .map_err(|_| format!("binaryData.{KEY} is not UTF-8 text"));
    }
    let mut keys: Vec<&str> = cm
        .data
        .iter()
        .flat_map(|d| d.keys())
        .chain(cm.binary_data.iter().flat_map(|d| d.keys()))
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let has = if keys.is_empty() {
        "it has no keys".to_owned()
    } else {
        format!("it has: {}", keys.join(", "))
    };
    Err(format!(
        "has no {KEY} key ({has}); put the config under data.{KEY}"
    ))
}

/// Follows the ConfigMap until `shutdown`. `first_read` fires once the
/// first list completed or failed (the store then says what is in force).
pub async fn watch(
    client: Client,
    target: ConfigMapRef,
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
    first_read: Option<tokio::sync::oneshot::Sender<()>>,
    shutdown: CancellationToken,
) {
    let mut first_read = first_read;
    let api: Api<ConfigMap> = Api::namespaced(client, &target.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", target.name));
    let mut events = watch_stream(api, config).default_backoff().boxed();
    let mut tracker = Tracker::new(target.clone(), store);
    tracing::info!(configmap = %target, "watching ConfigMap");
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = events.next() => next,
        };
        match next {
            Some(Ok(event)) => {
                let done = matches!(event, Event::InitDone);
                tracker.handle(event);
                if done && let Some(tx) = first_read.take() {
                    let _ = tx.send(());
                }
            }
            Some(Err(e)) => {
                metrics.watch_error("configmap");
                let error = describe(&e);
                tracing::warn!(configmap = %target, error = %error, "ConfigMap watch failed; retrying with backoff");
                tracker.error(&error);
                if let Some(tx) = first_read.take() {
                    let _ = tx.send(());
                }
            }
            None => return,
        }
    }
}

/// A watcher error in one line, with the API server's message when it sent one.
pub fn describe(e: &watcher::Error) -> String {
    use std::error::Error as _;
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::metrics::Metrics;

    const GOOD: &str =
        "cluster: c1\nvault: {authPath: auth/k}\nprofiles:\n  istiod: {secretPath: s/p}\n";
    const GOOD2: &str =
        "cluster: c2\nvault: {authPath: auth/k}\nprofiles:\n  istiod: {secretPath: s/p}\n";

    fn target() -> ConfigMapRef {
        ConfigMapRef::parse("ns/cm", "x").unwrap()
    }

    fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn tracker() -> (Tracker, Arc<ConfigStore>) {
        let store = Arc::new(ConfigStore::new(
            Arc::new(Metrics::new()),
            "configmap",
            target().pending_message(),
        ));
        (Tracker::new(target(), store.clone()), store)
    }

    fn cluster(store: &ConfigStore) -> Option<String> {
        store.load().config.as_ref().map(|c| c.cluster.clone())
    }

    #[test]
    fn parse_ref() {
        assert_eq!(
            ConfigMapRef::parse("a/b", "x").unwrap(),
            ConfigMapRef {
                namespace: "a".into(),
                name: "b".into()
            }
        );
        assert_eq!(ConfigMapRef::parse("b", "x").unwrap().namespace, "x");
        assert!(ConfigMapRef::parse("a/", "x").is_err());
        assert!(ConfigMapRef::parse("A/b", "x").is_err());
        assert!(ConfigMapRef::parse("a/b/c", "x").is_err());
    }

    #[test]
    fn absent_after_initial_list_names_the_configmap() {
        let (mut t, store) = tracker();
        t.handle(Event::Init);
        t.handle(Event::InitDone);
        let snap = store.load();
        assert!(snap.config.is_none());
        assert!(
            snap.missing.contains("ConfigMap ns/cm not found"),
            "{}",
            snap.missing
        );
        assert!(
            snap.missing
                .contains("kubectl -n ns create configmap cm --from-file=config.yaml")
        );
    }

    #[test]
    fn listed_then_edited_then_broken_then_deleted() {
        let (mut t, store) = tracker();
        t.handle(Event::Init);
        t.handle(Event::InitApply(cm("cm", &[(KEY, GOOD)])));
        t.handle(Event::InitDone);
        assert_eq!(cluster(&store).as_deref(), Some("c1"));
        assert_eq!(store.load().generation, 1);

        // A relist with the same content does not reload.
        t.handle(Event::Init);
        t.handle(Event::InitApply(cm("cm", &[(KEY, GOOD)])));
        t.handle(Event::InitDone);
        assert_eq!(store.load().generation, 1);

        t.handle(Event::Apply(cm("cm", &[(KEY, GOOD2)])));
        assert_eq!(cluster(&store).as_deref(), Some("c2"));
        assert_eq!(store.load().generation, 2);

        t.handle(Event::Apply(cm("cm", &[(KEY, "cluster: [")])));
        let snap = store.load();
        assert_eq!(
            snap.config.as_ref().unwrap().cluster,
            "c2",
            "last good kept"
        );
        assert!(
            snap.last_error
                .as_ref()
                .unwrap()
                .contains("ConfigMap ns/cm")
        );

        t.handle(Event::Apply(cm("cm", &[("other", "x")])));
        let snap = store.load();
        assert_eq!(snap.config.as_ref().unwrap().cluster, "c2");
        let err = snap.last_error.as_ref().unwrap();
        assert!(
            err.contains("has no config.yaml key (it has: other)"),
            "{err}"
        );

        t.handle(Event::Delete(cm("cm", &[])));
        let snap = store.load();
        assert!(snap.config.is_none());
        assert!(snap.missing.contains("not found"));
    }

    #[test]
    fn relist_without_the_object_means_deleted() {
        let (mut t, store) = tracker();
        t.handle(Event::Init);
        t.handle(Event::InitApply(cm("cm", &[(KEY, GOOD)])));
        t.handle(Event::InitDone);
        t.handle(Event::Init);
        // Until the list is complete the config stays.
        assert!(store.load().config.is_some());
        t.handle(Event::InitDone);
        assert!(store.load().config.is_none());
    }

    #[test]
    fn other_names_are_ignored() {
        let (mut t, store) = tracker();
        t.handle(Event::Init);
        t.handle(Event::InitApply(cm("other", &[(KEY, GOOD)])));
        t.handle(Event::InitDone);
        assert!(store.load().config.is_none());
    }

    #[test]
    fn recreated_with_same_text_loads_again() {
        let (mut t, store) = tracker();
        t.handle(Event::Apply(cm("cm", &[(KEY, GOOD)])));
        t.handle(Event::Delete(cm("cm", &[(KEY, GOOD)])));
        t.handle(Event::Apply(cm("cm", &[(KEY, GOOD)])));
        assert_eq!(cluster(&store).as_deref(), Some("c1"));
    }

    #[test]
    fn errors_before_first_sync_explain_the_missing_config() {
        let (mut t, store) = tracker();
        t.error("configmaps \"cm\" is forbidden");
        assert!(store.load().missing.contains("forbidden"));
        t.handle(Event::Init);
        t.handle(Event::InitApply(cm("cm", &[(KEY, GOOD)])));
        t.handle(Event::InitDone);
        t.error("connection refused");
        assert!(store.load().config.is_some());
    }
}
