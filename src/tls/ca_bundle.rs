//! `--tls-self-signed --webhook-config NAME`: keep that
//! MutatingWebhookConfiguration's `webhooks[*].clientConfig.caBundle`
//! trusting this replica's in-memory CA.
//!
//! Several replicas share one configuration, each with its own CA, and no
//! key is stored anywhere. Each replica *merges* its CA into every bundle
//! (other replicas' CAs stay; expired certificates and unparsable junk go)
//! and writes with `replace` carrying the `resourceVersion` it read: when
//! another replica (or `kubectl apply`) wrote in between, the API server
//! answers 409 Conflict and the replica re-reads and merges again after a
//! short jittered pause, so no replica ever drops another one's CA.
//!
//! The object is re-checked on every change (a watch on that one name) and
//! every `resync` interval, so a `kubectl apply` that resets `caBundle` is
//! repaired within a second or so. On shutdown, after the HTTPS listener has
//! drained, the replica withdraws its CAs (best effort; CAs of replicas that
//! died without withdrawing are pruned when they expire).
//!
//! The object is handled as untyped JSON so fields this build does not know
//! survive the round trip.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{ApiResource, DynamicObject, PostParams, TypeMeta};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_stream};
use kube::{Api, Client};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, ResultLabels, WatchLabels};

/// How often the configuration is re-checked besides the watch.
pub const RESYNC: Duration = Duration::from_secs(60);
/// Writes attempted in one reconciliation before giving up until the next.
const MAX_ATTEMPTS: u32 = 10;

/// A CA certificate this replica needs trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCert {
    pub der: Vec<u8>,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

impl CaCert {
    pub fn from_der(der: Vec<u8>) -> anyhow::Result<CaCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
        let not_after = cert.validity().not_after.timestamp();
        Ok(CaCert { der, not_after })
    }

    pub fn pem(&self) -> String {
        pem_encode(&self.der)
    }
}

fn pem_encode(der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// One entry of an existing bundle.
#[derive(Debug)]
enum Entry {
    Cert { der: Vec<u8>, not_after: i64 },
    Junk,
}

/// Splits a PEM bundle into certificates and junk (text outside PEM blocks,
/// other block types, undecodable or unparsable certificates).
fn parse_bundle(bytes: &[u8]) -> Vec<Entry> {
    const BEGIN: &str = "-----BEGIN ";
    let text = String::from_utf8_lossy(bytes);
    let mut entries = Vec::new();
    let mut rest: &str = &text;
    loop {
        let Some(start) = rest.find(BEGIN) else {
            if !rest.trim().is_empty() {
                entries.push(Entry::Junk);
            }
            break;
        };
        if !rest[..start].trim().is_empty() {
            entries.push(Entry::Junk);
        }
        let block = &rest[start..];
        let Some(label_end) = block[BEGIN.len()..].find("-----") else {
            entries.push(Entry::Junk);
            break;
        };
        let label = &block[BEGIN.len()..BEGIN.len() + label_end];
        let body_start = BEGIN.len() + label_end + 5;
        let end_marker = format!("-----END {label}-----");
        let Some(end) = block.find(&end_marker) else {
            entries.push(Entry::Junk);
            break;
        };
        let body: String = block[body_start..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        rest = &block[end + end_marker.len()..];
        if label != "CERTIFICATE" {
            entries.push(Entry::Junk);
            continue;
        }
        match BASE64
            .decode(body.as_bytes())
            .ok()
            .and_then(|der| CaCert::from_der(der).ok())
        {
            Some(ca) => entries.push(Entry::Cert {
                der: ca.der,
                not_after: ca.not_after,
            }),
            None => entries.push(Entry::Junk),
        }
    }
    entries
}

/// The result of merging into one bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The new bundle (PEM).
    pub bundle: Vec<u8>,
    /// Whether it differs (in content, not formatting) from the old one.
    pub changed: bool,
    pub added: usize,
    pub expired: usize,
    pub junk: usize,
    pub removed: usize,
}

/// Merges `add` into the PEM bundle `existing`: keeps every other valid
/// certificate in its order, drops expired ones (notAfter before `now`),
/// junk and the certificates in `remove`, then appends the missing `add`.
pub fn merge(existing: &[u8], add: &[CaCert], remove: &[Vec<u8>], now: i64) -> Merged {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut before: Vec<Vec<u8>> = Vec::new();
    let (mut expired, mut junk, mut removed, mut added) = (0, 0, 0, 0);
    for entry in parse_bundle(existing) {
        match entry {
            Entry::Junk => junk += 1,
            Entry::Cert { der, not_after } => {
                before.push(der.clone());
                if remove.contains(&der) && !add.iter().any(|a| a.der == der) {
                    removed += 1;
                } else if not_after < now {
                    expired += 1;
                } else if !out.contains(&der) {
                    out.push(der);
                }
            }
        }
    }
    for ca in add {
        if !out.contains(&ca.der) {
            out.push(ca.der.clone());
            added += 1;
        }
    }
    let changed = junk > 0 || out != before;
    let bundle = if changed {
        out.iter()
            .map(|d| pem_encode(d))
            .collect::<String>()
            .into_bytes()
    } else {
        existing.to_vec()
    };
    Merged {
        bundle,
        changed,
        added,
        expired,
        junk,
        removed,
    }
}

/// Whether every `cas` is in the PEM bundle.
pub fn trusts(bundle: &[u8], cas: &[CaCert]) -> bool {
    let ders: Vec<Vec<u8>> = parse_bundle(bundle)
        .into_iter()
        .filter_map(|e| match e {
            Entry::Cert { der, .. } => Some(der),
            Entry::Junk => None,
        })
        .collect();
    cas.iter().all(|ca| ders.contains(&ca.der))
}

/// The merge applied to every webhook of a MutatingWebhookConfiguration.
#[derive(Debug)]
pub struct ObjectMerge {
    /// The object to write back, when any bundle changed.
    pub updated: Option<DynamicObject>,
    /// Whether every webhook trusts all of `add` after the merge.
    pub webhooks: usize,
    pub summary: String,
}

pub fn merge_object(
    obj: &DynamicObject,
    add: &[CaCert],
    remove: &[Vec<u8>],
    now: i64,
) -> ObjectMerge {
    let mut updated = obj.clone();
    let mut changes = Vec::new();
    let mut count = 0;
    if let Some(webhooks) = updated
        .data
        .get_mut("webhooks")
        .and_then(Value::as_array_mut)
    {
        for webhook in webhooks.iter_mut() {
            let Some(webhook) = webhook.as_object_mut() else {
                continue;
            };
            count += 1;
            let name = webhook
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned();
            let client_config = webhook
                .entry("clientConfig")
                .or_insert_with(|| Value::Object(Default::default()));
            let Some(client_config) = client_config.as_object_mut() else {
                continue;
            };
            let old = client_config
                .get("caBundle")
                .and_then(Value::as_str)
                .unwrap_or("");
            let (old_bytes, undecodable) = match BASE64.decode(old) {
                Ok(b) => (b, false),
                Err(_) => (Vec::new(), true),
            };
            let merged = merge(&old_bytes, add, remove, now);
            if merged.changed || undecodable {
                changes.push(format!(
                    "{name}: +{} -{} expired -{} junk -{} withdrawn",
                    merged.added,
                    merged.expired,
                    merged.junk + usize::from(undecodable),
                    merged.removed
                ));
                client_config.insert(
                    "caBundle".into(),
                    Value::String(BASE64.encode(&merged.bundle)),
                );
            }
        }
    }
    ObjectMerge {
        updated: (!changes.is_empty()).then_some(updated),
        webhooks: count,
        summary: changes.join("; "),
    }
}

/// Whether every webhook of the object trusts all of `cas`.
pub fn object_trusts(obj: &DynamicObject, cas: &[CaCert]) -> bool {
    obj.data
        .get("webhooks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .all(|w| {
            let b64 = w
                .pointer("/clientConfig/caBundle")
                .and_then(Value::as_str)
                .unwrap_or("");
            BASE64
                .decode(b64)
                .map(|bytes| trusts(&bytes, cas))
                .unwrap_or(false)
        })
}

/// What the last reconciliation found, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not checked yet.
    Pending,
    /// Every webhook's caBundle trusts the current CA.
    Trusted { webhooks: usize },
    /// The configuration does not exist: nothing calls this webhook through it.
    NotFound,
    /// It exists but could not be updated (yet).
    Failed(String),
}

impl Status {
    /// Whether the API server can verify this replica: only then should the
    /// Service send it traffic. A missing configuration sends none.
    pub fn ready(&self) -> bool {
        matches!(self, Status::Trusted { .. } | Status::NotFound)
    }
}

/// What one reconciliation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Updated,
    Unchanged,
    NotFound,
}

#[derive(Default)]
struct Cas {
    /// Must be in every bundle (the serving CA, and the next during rotation).
    required: Vec<CaCert>,
    /// Every CA this replica generated (withdrawn at shutdown).
    owned: Vec<CaCert>,
}

/// Keeps one MutatingWebhookConfiguration's caBundle trusting our CAs.
pub struct CaBundle {
    api: Api<DynamicObject>,
    name: String,
    metrics: Arc<Metrics>,
    cas: Mutex<Cas>,
    status: ArcSwap<Status>,
    /// One reconciliation at a time within this replica.
    busy: tokio::sync::Mutex<()>,
    /// Set by `withdraw`: no reconciliation may add our CAs back.
    withdrawn: std::sync::atomic::AtomicBool,
    resync: Duration,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaBundle({})", self.name)
    }
}

fn api_resource() -> ApiResource {
    ApiResource::erase::<MutatingWebhookConfiguration>(&())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl CaBundle {
    pub fn new(
        client: Client,
        name: impl Into<String>,
        metrics: Arc<Metrics>,
        resync: Duration,
    ) -> Arc<CaBundle> {
        metrics.ca_bundle_trusted.set(0);
        Arc::new(CaBundle {
            api: Api::all_with(client, &api_resource()),
            name: name.into(),
            metrics,
            cas: Mutex::new(Cas::default()),
            status: ArcSwap::from_pointee(Status::Pending),
            busy: tokio::sync::Mutex::new(()),
            withdrawn: std::sync::atomic::AtomicBool::new(false),
            resync,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the CAs every bundle must contain from now on.
    pub fn require(&self, cas: Vec<CaCert>) {
        let mut state = self.cas.lock().unwrap_or_else(|e| e.into_inner());
        for ca in &cas {
            if !state.owned.contains(ca) {
                state.owned.push(ca.clone());
            }
        }
        state.required = cas;
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.load_full()
    }

    /// A one-line description for `/readyz`.
    pub fn describe(&self) -> String {
        match &**self.status.load() {
            Status::Pending => format!(
                "caBundle: MutatingWebhookConfiguration {} not checked yet",
                self.name
            ),
            Status::Trusted { webhooks } => format!(
                "caBundle: MutatingWebhookConfiguration {} trusts this replica ({webhooks} webhooks)",
                self.name
            ),
            Status::NotFound => format!(
                "caBundle: MutatingWebhookConfiguration {} not found; it will be updated when created",
                self.name
            ),
            Status::Failed(e) => format!(
                "caBundle: MutatingWebhookConfiguration {} does not trust this replica yet: {e}",
                self.name
            ),
        }
    }

    fn set_status(&self, status: Status) {
        self.metrics
            .ca_bundle_trusted
            .set(i64::from(matches!(status, Status::Trusted { .. })));
        self.status.store(Arc::new(status));
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .ca_bundle_updates
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Makes every webhook's caBundle contain the required CAs, starting
    /// from `seen` (an object just received from a watch) or a fresh read.
    pub async fn reconcile(&self, seen: Option<DynamicObject>) -> anyhow::Result<Outcome> {
        let _busy = self.busy.lock().await;
        if self.withdrawn.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(Outcome::Unchanged);
        }
        let result = self.reconcile_locked(seen, false).await;
        match &result {
            Ok(_) => {}
            Err(e) => {
                self.count("error");
                self.set_status(Status::Failed(format!("{e:#}")));
            }
        }
        result
    }

    /// The configuration does not exist (yet): nothing to trust us with.
    fn not_found(&self, withdraw: bool) -> Outcome {
        self.count("not_found");
        if !withdraw {
            self.set_status(Status::NotFound);
        }
        Outcome::NotFound
    }

    async fn reconcile_locked(
        &self,
        mut seen: Option<DynamicObject>,
        withdraw: bool,
    ) -> anyhow::Result<Outcome> {
        for attempt in 0..MAX_ATTEMPTS {
            let obj = match seen.take() {
                Some(obj) => obj,
                None => match self.api.get_opt(&self.name).await {
                    Ok(Some(obj)) => obj,
                    Ok(None) => return Ok(self.not_found(withdraw)),
                    Err(e) => {
                        return Err(anyhow!(
                            "cannot read MutatingWebhookConfiguration {}: {e}",
                            self.name
                        ));
                    }
                },
            };
            let (required, remove) = {
                let cas = self.cas.lock().unwrap_or_else(|e| e.into_inner());
                if withdraw {
                    (
                        Vec::new(),
                        cas.owned.iter().map(|c| c.der.clone()).collect::<Vec<_>>(),
                    )
                } else {
                    (cas.required.clone(), Vec::new())
                }
            };
            let merged = merge_object(&obj, &required, &remove, now());
            let Some(mut updated) = merged.updated else {
                self.count("unchanged");
                if !withdraw {
                    self.set_status(Status::Trusted {
                        webhooks: merged.webhooks,
                    });
                }
                return Ok(Outcome::Unchanged);
            };
            // Objects from a list carry no apiVersion/kind; a PUT needs them.
            updated.types = Some(TypeMeta {
                api_version: "admissionregistration.k8s.io/v1".into(),
                kind: "MutatingWebhookConfiguration".into(),
            });
            let version = updated
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default();
            match self
                .api
                .replace(&self.name, &PostParams::default(), &updated)
                .await
            {
                Ok(written) => {
                    self.count("updated");
                    tracing::info!(
                        webhook_config = %self.name,
                        resource_version = %written.metadata.resource_version.clone().unwrap_or_default(),
                        changes = %merged.summary,
                        "caBundle updated"
                    );
                    if !withdraw {
                        let trusted = object_trusts(&written, &required);
                        self.set_status(if trusted {
                            Status::Trusted {
                                webhooks: merged.webhooks,
                            }
                        } else {
                            Status::Failed("the API server did not keep the caBundle".into())
                        });
                    }
                    return Ok(Outcome::Updated);
                }
                Err(kube::Error::Api(status)) if status.is_conflict() => {
                    self.count("conflict");
                    let pause = jitter(attempt);
                    tracing::debug!(
                        webhook_config = %self.name,
                        resource_version = %version,
                        retry_in_ms = pause.as_millis() as u64,
                        "caBundle update conflicted with another writer; re-reading"
                    );
                    tokio::time::sleep(pause).await;
                }
                Err(kube::Error::Api(status)) if status.is_not_found() => {
                    return Ok(self.not_found(withdraw));
                }
                Err(e) => {
                    return Err(anyhow!(
                        "cannot update MutatingWebhookConfiguration {}: {e}",
                        self.name
                    ));
                }
            }
        }
        Err(anyhow!(
            "MutatingWebhookConfiguration {}: {MAX_ATTEMPTS} conflicting updates in a row",
            self.name
        ))
    }

    /// Removes every CA this replica generated from the bundles. Called
    /// after the HTTPS listener has stopped; best effort.
    pub async fn withdraw(&self) -> anyhow::Result<Outcome> {
        let _busy = self.busy.lock().await;
        self.withdrawn
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.reconcile_locked(None, true).await
    }

    /// Reconciles on start, on every change of the object, every `resync`,
    /// and retries failures with backoff, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watch_stream(self.api.clone(), config)
            .default_backoff()
            .boxed();
        // The first tick is immediate: the start-up reconciliation does not
        // wait for the watch (whose failures are only retried, not shown).
        let mut resync = tokio::time::interval(self.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures: u32 = 0;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let seen = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = resync.tick() => None,
                _ = sleep_until(retry_at) => None,
                event = events.next() => match event {
                    Some(Ok(Event::Apply(obj) | Event::InitApply(obj))) => Some(obj),
                    Some(Ok(Event::Delete(_))) => {
                        self.set_status(Status::NotFound);
                        continue;
                    }
                    Some(Ok(Event::Init | Event::InitDone)) => continue,
                    Some(Err(e)) => {
                        self.metrics
                            .watch_errors
                            .get_or_create(&WatchLabels { watch: "webhookconfiguration" })
                            .inc();
                        tracing::warn!(
                            webhook_config = %self.name,
                            error = %crate::source::configmap::describe(&e),
                            "MutatingWebhookConfiguration watch failed; retrying with backoff"
                        );
                        continue;
                    }
                    None => return,
                },
            };
            retry_at = None;
            match self.reconcile(seen).await {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    let pause = Duration::from_millis(500)
                        .saturating_mul(1 << failures.min(6))
                        .min(self.resync);
                    tracing::warn!(
                        webhook_config = %self.name,
                        error = %format!("{e:#}"),
                        retry_in_s = pause.as_secs_f32(),
                        "caBundle not reconciled"
                    );
                    retry_at = Some(tokio::time::Instant::now() + pause);
                }
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A pause before retrying after conflict number `attempt`: 50 ms doubling,
/// capped at 2 s, scaled by a random factor in [0.5, 1.5) so that replicas
/// that collided do not collide again in lockstep.
fn jitter(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let r = (h.finish() % 1000) as f64 / 1000.0;
    let base = Duration::from_millis(50)
        .saturating_mul(1 << attempt.min(6))
        .min(Duration::from_secs(2));
    base.mul_f64(0.5 + r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::self_signed;

    fn ca(validity: Duration) -> CaCert {
        let s = self_signed::generate(&["svc".into()], validity).unwrap();
        CaCert::from_der(s.ca_der).unwrap()
    }

    #[test]
    fn merge_into_empty_adds() {
        let a = ca(Duration::from_secs(3600));
        let m = merge(b"", std::slice::from_ref(&a), &[], now());
        assert!(m.changed);
        assert_eq!(m.added, 1);
        assert!(trusts(&m.bundle, std::slice::from_ref(&a)));
        // Idempotent.
        let again = merge(&m.bundle, &[a], &[], now());
        assert!(!again.changed);
        assert_eq!(again.bundle, m.bundle);
    }

    #[test]
    fn merge_keeps_others_drops_expired_and_junk() {
        let ours = ca(Duration::from_secs(3600));
        let other = ca(Duration::from_secs(3600));
        let old = ca(Duration::from_secs(10));
        let mut existing = String::from("garbage line\n");
        existing.push_str(&other.pem());
        existing
            .push_str("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n");
        existing.push_str(&old.pem());
        existing.push_str("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let m = merge(
            existing.as_bytes(),
            std::slice::from_ref(&ours),
            &[],
            old.not_after + 1,
        );
        assert!(m.changed);
        assert_eq!((m.added, m.expired, m.junk), (1, 1, 3));
        let text = String::from_utf8(m.bundle.clone()).unwrap();
        assert_eq!(text, format!("{}{}", other.pem(), ours.pem()));
    }

    #[test]
    fn merge_removes_withdrawn() {
        let a = ca(Duration::from_secs(3600));
        let b = ca(Duration::from_secs(3600));
        let bundle = format!("{}{}", a.pem(), b.pem());
        let m = merge(bundle.as_bytes(), &[], std::slice::from_ref(&a.der), now());
        assert_eq!(m.removed, 1);
        assert_eq!(String::from_utf8(m.bundle).unwrap(), b.pem());
    }

    #[test]
    fn formatting_alone_is_not_a_change() {
        let a = ca(Duration::from_secs(3600));
        let crlf = a.pem().replace('\n', "\r\n");
        let m = merge(crlf.as_bytes(), std::slice::from_ref(&a), &[], now());
        assert!(!m.changed);
    }

    #[test]
    fn object_merge_touches_every_webhook_and_keeps_unknown_fields() {
        let a = ca(Duration::from_secs(3600));
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "w", "resourceVersion": "5"},
            "webhooks": [
                {"name": "a.x", "clientConfig": {"service": {"name": "s", "namespace": "n"}}, "futureField": 1},
                {"name": "b.x", "clientConfig": {"caBundle": "!!!"}}
            ]
        }))
        .unwrap();
        let m = merge_object(&obj, std::slice::from_ref(&a), &[], now());
        let updated = m.updated.unwrap();
        assert_eq!(m.webhooks, 2);
        assert!(object_trusts(&updated, std::slice::from_ref(&a)));
        assert!(!object_trusts(&obj, std::slice::from_ref(&a)));
        assert_eq!(updated.data["webhooks"][0]["futureField"], 1);
        assert_eq!(updated.metadata.resource_version.as_deref(), Some("5"));
        let again = merge_object(&updated, &[a], &[], now());
        assert!(again.updated.is_none());
    }

    #[test]
    fn jitter_is_bounded() {
        for attempt in 0..20 {
            let j = jitter(attempt);
            assert!(
                j >= Duration::from_millis(25) && j < Duration::from_secs(3),
                "{j:?}"
            );
        }
    }
}
