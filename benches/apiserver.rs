//! What the webhook adds to a Pod CREATE through a real kube-apiserver.
//!
//! Starts etcd + kube-apiserver (tests/support/kube.rs), applies the shipped manifests with the
//! webhook reached on loopback, runs the release binary, and creates the chart-rendered istiod
//! Pod `N` times in an opted-in namespace (the API server calls the webhook, applies its patch)
//! and `N` times in a namespace that did not opt in (no webhook call), interleaved so that drift
//! in the machine affects both alike. Prints p50/p90/p99 of each and the difference.
//!
//! The guard policy's binding is left out: without the Vault injector (not part of this
//! measurement) it would refuse every istiod Pod. Creates go through one HTTP/2 connection of a
//! kube client, sequentially, as the ReplicaSet controller creates a rollout's Pods.
//!
//! Run: `scripts/bench-apiserver` (or `N=300 cargo bench --bench apiserver`).

// The tests' support tree, of which this uses a part.
#[path = "../tests/support"]
#[allow(dead_code)]
mod support {
    pub mod bao;
    pub mod kube;
    pub mod peers;
    pub mod webhook;
}

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

use support::bao::free_port;
use support::kube::ControlPlane;
use support::webhook::{shipped_manifests, start_webhook};

const WEBHOOK: &str = env!("CARGO_BIN_EXE_istio-vault-webhook");

fn main() {
    // `cargo bench` passes `--bench`. `cargo test --all-targets` runs this too, without it: then
    // a smoke run of a few creates checks that the benchmark still works, and measures nothing.
    let bench = std::env::args().any(|a| a == "--bench");
    let default_n = if bench { 300 } else { 3 };
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_n);
    let warmup = if bench { (n / 10).max(10) } else { 1 };

    let cp = ControlPlane::start("bench");
    let port = free_port();
    let objects: Vec<Value> = shipped_manifests(&cp, "cluster1", port)
        .into_iter()
        .filter(|o| o["kind"] != "ValidatingAdmissionPolicyBinding")
        .collect();
    cp.apply(&objects);
    let _webhook = start_webhook(&cp, port, WEBHOOK);
    for (ns, opted_in) in [("with-webhook", true), ("without-webhook", false)] {
        let labels = if opted_in {
            json!({"istio-vault-webhook/inject": "enabled"})
        } else {
            json!({})
        };
        cp.apply(&[
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "labels": labels}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "istiod", "namespace": ns}}),
        ]);
    }

    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pods/istiod.json");
    let mut pod: Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    for field in [
        "managedFields",
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "namespace",
    ] {
        pod["metadata"].as_object_mut().unwrap().remove(field);
    }
    pod.as_object_mut().unwrap().remove("status");
    let pod: Pod = serde_json::from_value(pod).unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (with, without) = runtime.block_on(async {
        let kubeconfig = Kubeconfig::read_from(&cp.admin_kubeconfig).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let with_api: Api<Pod> = Api::namespaced(client.clone(), "with-webhook");
        let without_api: Api<Pod> = Api::namespaced(client, "without-webhook");
        let create = async |api: &Api<Pod>| {
            let start = Instant::now();
            let created = api.create(&PostParams::default(), &pod).await.unwrap();
            let elapsed = start.elapsed();
            (elapsed, created)
        };
        // The webhook's patch must really be in the path being measured.
        let (_, created) = create(&with_api).await;
        let annotations = created.metadata.annotations.unwrap_or_default();
        assert_eq!(
            annotations
                .get("istio-vault-webhook/profile")
                .map(String::as_str),
            Some("istiod")
        );
        let (_, created) = create(&without_api).await;
        let annotations = created.metadata.annotations.unwrap_or_default();
        assert!(!annotations.contains_key("istio-vault-webhook/profile"));

        for _ in 0..warmup {
            create(&with_api).await;
            create(&without_api).await;
        }
        let (mut with, mut without) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            with.push(create(&with_api).await.0);
            without.push(create(&without_api).await.0);
        }
        (with, without)
    });

    if !bench {
        println!(
            "smoke run under `cargo test`, not a measurement (scripts/bench-apiserver measures)"
        );
    }
    let with = Percentiles::of(with);
    let without = Percentiles::of(without);
    println!(
        "Pod CREATE through kube-apiserver, N={n} each (after {warmup} warm-up), istiod chart Pod:"
    );
    println!("  {:<28} {:>9} {:>9} {:>9}", "", "p50", "p90", "p99");
    println!(
        "  {:<28} {:>9} {:>9} {:>9}",
        "without webhook (baseline)",
        ms(without.p50),
        ms(without.p90),
        ms(without.p99)
    );
    println!(
        "  {:<28} {:>9} {:>9} {:>9}",
        "with istio-vault-webhook",
        ms(with.p50),
        ms(with.p90),
        ms(with.p99)
    );
    println!(
        "  {:<28} {:>9} {:>9} {:>9}",
        "added",
        ms(with.p50.saturating_sub(without.p50)),
        ms(with.p90.saturating_sub(without.p90)),
        ms(with.p99.saturating_sub(without.p99))
    );
    println!(
        "  ratio (with / without): p50 {:.2}x, p99 {:.2}x",
        with.p50.as_secs_f64() / without.p50.as_secs_f64(),
        with.p99.as_secs_f64() / without.p99.as_secs_f64()
    );
}

struct Percentiles {
    p50: Duration,
    p90: Duration,
    p99: Duration,
}

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
