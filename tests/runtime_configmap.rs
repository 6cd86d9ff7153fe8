//! `serve --config-map NAMESPACE/NAME` against a fake API server: every
//! semantic of the ConfigMap source (`src/source/configmap.rs`), driven through the real server (in-process)
//! and observed the way the API server and an operator would — admission
//! answers over TLS, `/readyz`, `/metrics` — plus what went over the wire.

// Public so that helpers this file does not call are not dead code: each
// test file takes only the support modules it uses.
pub mod support {
    pub mod fake_apiserver;
    pub mod review;
    pub mod runtime;
}

use std::time::Duration;

use serde_json::json;
use support::fake_apiserver::{FakeApiServer, Kind};
use support::review::{self, Verdict};
use support::runtime::{self as rt, CONFIG_C1, CONFIG_C2, SERVICE_DNS, Server};

const NS: &str = "istio-vault-webhook";
const NAME: &str = "istio-vault-webhook";
const CM_PATH: &str = "/api/v1/namespaces/istio-vault-webhook/configmaps";
/// "Within seconds": generous for a loaded CI machine, far below a relist.
const WAIT: Duration = Duration::from_secs(15);

async fn start(fake: &FakeApiServer) -> Server {
    rt::start(&[
        "--config-map",
        &format!("{NS}/{NAME}"),
        "--kube-api",
        &fake.url(),
        "--tls-self-signed",
    ])
    .await
}

async fn decide(running: &Server, labels: serde_json::Value) -> Verdict {
    let ca = running.ca_pem.as_ref().expect("self-signed CA");
    let v = rt::admit(
        running.https_addr,
        ca.as_bytes(),
        SERVICE_DNS,
        &review::labelled_review("uid-1", labels),
    )
    .await;
    assert_eq!(v.uid, "uid-1");
    v
}

async fn istiod(running: &Server) -> Verdict {
    decide(running, json!({"app": "istiod"})).await
}

/// Waits until istiod Pods are admitted with `cluster`'s auth path.
async fn served(running: &Server, cluster: &str) -> Verdict {
    let want = format!("auth/kubernetes-{cluster}");
    rt::eventually(&format!("istiod admitted with {want}"), WAIT, async || {
        let v = istiod(running).await;
        (v.allowed && v.auth_path().as_deref() == Some(want.as_str())).then_some(v)
    })
    .await
}

/// Waits until istiod Pods are denied with a message containing `needle`.
async fn denied(running: &Server, needle: &str) -> Verdict {
    rt::eventually(
        &format!("istiod denied with a message containing {needle:?}"),
        WAIT,
        async || {
            let v = istiod(running).await;
            (!v.allowed && v.message().contains(needle)).then_some(v)
        },
    )
    .await
}

async fn readyz(running: &Server) -> rt::Response {
    rt::admin_get(running.admin_addr, "/readyz").await
}

async fn metrics(running: &Server) -> String {
    rt::admin_get(running.admin_addr, "/metrics").await.text()
}

fn lists(fake: &FakeApiServer) -> usize {
    fake.requests()
        .iter()
        .filter(|l| {
            l.method == "GET"
                && l.path_and_query.starts_with(CM_PATH)
                && !l.path_and_query.contains("watch=")
        })
        .count()
}

fn watches_from(fake: &FakeApiServer, rv: u64) -> usize {
    let needle = format!("resourceVersion={rv}");
    fake.requests()
        .iter()
        .filter(|l| {
            l.path_and_query.starts_with(CM_PATH)
                && l.path_and_query.contains("watch=")
                && l.path_and_query
                    .split('&')
                    .any(|p| p.ends_with(&needle) && p.starts_with("resourceVersion="))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_configmap_denies_istiod_with_instructions_and_allows_others() {
    let fake = FakeApiServer::start().await;
    let running = start(&fake).await;

    // `start` waited for the first list: the answer is already definitive.
    let v = istiod(&running).await;
    assert!(!v.allowed, "istiod must be denied without a config: {v:?}");
    assert!(
        v.message()
            .contains("ConfigMap istio-vault-webhook/istio-vault-webhook not found"),
        "the denial names the ConfigMap: {}",
        v.message()
    );
    assert!(
        v.message().contains(
            "kubectl -n istio-vault-webhook create configmap istio-vault-webhook --from-file=config.yaml"
        ),
        "the denial says how to create it: {}",
        v.message()
    );

    let other = decide(&running, json!({"app": "productpage"})).await;
    assert!(other.allowed && other.annotations().is_empty(), "{other:?}");

    // Ready (so the API server gets our clear denial), config state in the body.
    let r = readyz(&running).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("config: MISSING"), "{}", r.text());
    assert!(r.text().contains("not found"), "{}", r.text());
    let m = metrics(&running).await;
    assert_eq!(
        rt::metric(&m, "istio_vault_webhook_config_loaded "),
        0.0,
        "{m}"
    );

    // It used a field selector on the one name (what RBAC resourceNames needs).
    assert!(
        fake.requests()
            .iter()
            .any(|l| l.path_and_query.starts_with(CM_PATH)
                && l.path_and_query
                    .contains("fieldSelector=metadata.name%3Distio-vault-webhook")),
        "{:#?}",
        fake.requests()
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_then_edited_configmap_is_served_and_changes_the_config_hash() {
    let fake = FakeApiServer::start().await;
    let running = start(&fake).await;
    assert!(!istiod(&running).await.allowed);

    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C1)]);
    let first = served(&running, "cluster1").await;
    let h1 = first.config_hash().expect("config-hash annotation");
    assert!(h1.starts_with("sha256:"), "{h1}");

    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C2)]);
    let second = served(&running, "cluster2").await;
    let h2 = second.config_hash().expect("config-hash annotation");
    assert_ne!(h1, h2, "config-hash must change with the config");

    let r = readyz(&running).await;
    assert!(
        r.text().contains("config: loaded, cluster cluster2"),
        "{}",
        r.text()
    );
    let m = metrics(&running).await;
    assert_eq!(
        rt::metric(&m, "istio_vault_webhook_config_generation "),
        2.0,
        "{m}"
    );
    assert_eq!(
        rt::metric(&m, "istio_vault_webhook_config_loaded "),
        1.0,
        "{m}"
    );
    assert!(
        m.contains(&format!("hash=\"{h2}\"")),
        "config_info carries the hash: {m}"
    );
    // One list, then watch events: no polling of the object.
    assert_eq!(lists(&fake), 1, "{:#?}", fake.requests());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_keeps_the_last_good_config_and_reports_it() {
    let fake = FakeApiServer::start().await;
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C1)]);
    let running = start(&fake).await;
    // Served right after start, without polling.
    let good = istiod(&running).await;
    assert!(good.allowed, "{good:?}");
    let hash = good.config_hash().unwrap();

    let broken = CONFIG_C1.replace("secretPath:", "bogusField: 1\n    secretPath:");
    fake.apply_configmap(NS, NAME, &[("config.yaml", &broken)]);
    let body = rt::eventually("/readyz reports the config error", WAIT, async || {
        let r = readyz(&running).await;
        r.text().contains("last config error").then_some(r)
    })
    .await;
    assert_eq!(body.status, 200);
    let text = body.text();
    assert!(
        text.contains("bogusField"),
        "the error names the field: {text}"
    );
    assert!(
        text.contains("ConfigMap istio-vault-webhook/istio-vault-webhook"),
        "{text}"
    );
    assert!(text.contains("config: loaded, cluster cluster1"), "{text}");
    let m = metrics(&running).await;
    assert_eq!(
        rt::metric(
            &m,
            "istio_vault_webhook_config_load_errors_total{source=\"configmap\"}"
        ),
        1.0,
        "{m}"
    );
    let still = istiod(&running).await;
    assert!(still.allowed);
    assert_eq!(
        still.config_hash().as_deref(),
        Some(hash.as_str()),
        "last good config kept"
    );

    // A ConfigMap without the key is rejected too, with a clear message.
    fake.apply_configmap(NS, NAME, &[("config.yml", CONFIG_C2)]);
    rt::eventually("/readyz reports the missing key", WAIT, async || {
        let t = readyz(&running).await.text();
        t.contains("has no config.yaml key (it has: config.yml)")
            .then_some(())
    })
    .await;
    assert!(istiod(&running).await.allowed);
    let m = metrics(&running).await;
    assert_eq!(
        rt::metric(
            &m,
            "istio_vault_webhook_config_load_errors_total{source=\"configmap\"}"
        ),
        2.0,
        "{m}"
    );

    // Fixed: served, the error is gone.
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C2)]);
    served(&running, "cluster2").await;
    let t = readyz(&running).await.text();
    assert!(!t.contains("last config error"), "{t}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_configmap_denies_istiod_again() {
    let fake = FakeApiServer::start().await;
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C1)]);
    let running = start(&fake).await;
    assert!(istiod(&running).await.allowed);

    assert!(fake.delete_configmap(NS, NAME));
    let v = denied(
        &running,
        "ConfigMap istio-vault-webhook/istio-vault-webhook not found",
    )
    .await;
    assert!(
        v.message()
            .contains("kubectl -n istio-vault-webhook create configmap"),
        "{}",
        v.message()
    );
    let m = metrics(&running).await;
    assert_eq!(
        rt::metric(&m, "istio_vault_webhook_config_loaded "),
        0.0,
        "{m}"
    );

    // And back.
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C1)]);
    served(&running, "cluster1").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_closed_by_the_server_is_resumed_from_the_last_version() {
    let fake = FakeApiServer::start().await;
    let rv = fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C1)]);
    let running = start(&fake).await;
    assert!(istiod(&running).await.allowed);
    rt::eventually("a watch is open", WAIT, async || {
        (fake.open_watches(Kind::ConfigMap) == 1).then_some(())
    })
    .await;
    let before = watches_from(&fake, rv);
    assert_eq!(before, 1, "{:#?}", fake.requests());

    // The server ends the stream (timeoutSeconds, an API server rolling).
    fake.close_watches();
    rt::eventually(
        "the watch is re-opened from the last resourceVersion",
        WAIT,
        async || (watches_from(&fake, rv) == 2).then_some(()),
    )
    .await;
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C2)]);
    served(&running, "cluster2").await;
    assert_eq!(
        lists(&fake),
        1,
        "resumed without a relist: {:#?}",
        fake.requests()
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_then_back_replays_changes_made_meanwhile() {
    let fake = FakeApiServer::start().await;
    let rv = fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C1)]);
    let running = start(&fake).await;
    assert!(istiod(&running).await.allowed);
    rt::eventually("a watch is open", WAIT, async || {
        (fake.open_watches(Kind::ConfigMap) == 1).then_some(())
    })
    .await;

    // Unreachable: connections drop and new ones are refused; meanwhile the
    // ConfigMap changes (through another API server replica, say).
    fake.stop().await;
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C2)]);
    rt::eventually("the failed re-watch is counted", WAIT, async || {
        let m = metrics(&running).await;
        (rt::metric(
            &m,
            "istio_vault_webhook_kube_watch_errors_total{watch=\"configmap\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    // Still serving the last good config while disconnected.
    let v = istiod(&running).await;
    assert_eq!(v.auth_path().as_deref(), Some("auth/kubernetes-cluster1"));

    fake.restart().await;
    served(&running, "cluster2").await;
    assert!(
        watches_from(&fake, rv) >= 2,
        "re-watched from {rv}: {:#?}",
        fake.requests()
    );
    assert_eq!(
        lists(&fake),
        1,
        "caught up by replay, not relist: {:#?}",
        fake.requests()
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_old_resource_version_relists_and_notices_a_deletion() {
    let fake = FakeApiServer::start().await;
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C1)]);
    let running = start(&fake).await;
    assert!(istiod(&running).await.allowed);
    rt::eventually("a watch is open", WAIT, async || {
        (fake.open_watches(Kind::ConfigMap) == 1).then_some(())
    })
    .await;

    // Down long enough for the history to be compacted; the ConfigMap was
    // deleted meanwhile, so no DELETED event can be replayed.
    fake.stop().await;
    fake.delete_configmap(NS, NAME);
    fake.compact();
    fake.restart().await;

    // The re-watch gets a 410 ERROR event, the watcher relists, and the
    // complete list without the object means: deleted.
    denied(&running, "not found").await;
    assert_eq!(lists(&fake), 2, "{:#?}", fake.requests());

    // And it keeps following: created again.
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C2)]);
    served(&running, "cluster2").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_at_start_serves_and_explains_then_recovers() {
    let fake = FakeApiServer::start().await;
    fake.apply_configmap(NS, NAME, &[("config.yaml", CONFIG_C1)]);
    fake.stop().await;
    let t0 = std::time::Instant::now();
    let running = start(&fake).await;
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "start must not hang on an unreachable API server: {:?}",
        t0.elapsed()
    );
    let v = istiod(&running).await;
    assert!(!v.allowed);
    assert!(
        v.message()
            .contains("cannot read ConfigMap istio-vault-webhook/istio-vault-webhook"),
        "{}",
        v.message()
    );
    fake.restart().await;
    served(&running, "cluster1").await;
    running.stop().await;
}
