//! `--tls-self-signed --webhook-config NAME`: keep that
//! MutatingWebhookConfiguration's `webhooks[*].clientConfig.caBundle`
//! trusting this replica's in-memory CA. What a merge keeps and drops is in
//! `bundle.rs`; this is the loop around it.
//!
//! Each replica writes with `replace` carrying the `resourceVersion` it read:
//! when another replica (or `kubectl apply`) wrote in between, the API server
//! answers 409 Conflict and the replica re-reads and merges again after a
//! short jittered pause, so no replica ever drops another one's CA.
//!
//! The object is re-checked on every change (a watch on that one name) and
//! every `resync` interval, so a `kubectl apply` that resets `caBundle` is
//! repaired within a second or so. On shutdown, after the HTTPS listener has
//! drained, the replica withdraws its CAs (best effort; CAs of replicas that
//! died without withdrawing are pruned when they expire).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use arc_swap::ArcSwap;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{ApiResource, DynamicObject, PostParams, TypeMeta};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_stream};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::bundle::{CaCert, merge_object, object_trusts};
use crate::backoff::Backoff;
use crate::metrics::Metrics;

/// How often the configuration is re-checked besides the watch.
pub const RESYNC: Duration = Duration::from_secs(60);
/// Writes attempted in one reconciliation before giving up until the next.
const MAX_ATTEMPTS: u32 = 10;
/// Between writes that conflicted: short, since the other writer is done,
/// and jittered so that replicas that collided do not collide again in
/// lockstep.
const CONFLICT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
/// Between failed reconciliations (API server unreachable, RBAC); capped at
/// the resync interval, which would retry anyway.
const FAILURE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), RESYNC);

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
pub enum Reconciled {
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
        metrics.ca_bundle_trusted(false);
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
            .ca_bundle_trusted(matches!(status, Status::Trusted { .. }));
        self.status.store(Arc::new(status));
    }

    fn count(&self, result: &'static str) {
        self.metrics.ca_bundle_reconciled(result);
    }

    /// Makes every webhook's caBundle contain the required CAs, starting
    /// from `seen` (an object just received from a watch) or a fresh read.
    pub async fn reconcile(&self, seen: Option<DynamicObject>) -> anyhow::Result<Reconciled> {
        let _busy = self.busy.lock().await;
        if self.withdrawn.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(Reconciled::Unchanged);
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
    fn not_found(&self, withdraw: bool) -> Reconciled {
        self.count("not_found");
        if !withdraw {
            self.set_status(Status::NotFound);
        }
        Reconciled::NotFound
    }

    async fn reconcile_locked(
        &self,
        mut seen: Option<DynamicObject>,
        withdraw: bool,
    ) -> anyhow::Result<Reconciled> {
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
                return Ok(Reconciled::Unchanged);
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
                    return Ok(Reconciled::Updated);
                }
                Err(kube::Error::Api(status)) if status.is_conflict() => {
                    self.count("conflict");
                    let pause = CONFLICT_BACKOFF.jittered(attempt);
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
    pub async fn withdraw(&self) -> anyhow::Result<Reconciled> {
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
                        self.metrics.watch_error("webhookconfiguration");
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
                    let pause = FAILURE_BACKOFF.pause(failures).min(self.resync);
                    failures += 1;
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
