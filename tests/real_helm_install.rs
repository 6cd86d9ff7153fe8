//! `helm install` of manifests/chart/istio-vault-webhook into a real kube-apiserver
//! (tests/support/kube.rs), with cluster1's config as values: every object is accepted, the
//! webhook (run as a local process, as the chart's ServiceAccount) keeps the chart's
//! MutatingWebhookConfiguration trusting it and patches a gateway Pod; the chart's guard refuses
//! an istiod Pod while no Vault injector runs, and admits it, patched by both webhooks, once the
//! injector is registered.

mod support {
    pub mod bao;
    pub mod chain;
    pub mod kube;
    pub mod mesh_ca;
    pub mod peers;
    pub mod pod;
    pub mod webhook;
}

use std::fs;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::bao::{BaoDev, free_port, run_with_timeout};
use support::chain::{
    Injector, admitted_eventually, annotations, assert_guard_type_checks, container, create_pod,
    create_service_account, named_pod, opt_in_namespace, refused_eventually, repo,
};
use support::kube::ControlPlane;
use support::peers::peer;
use support::webhook::start_webhook;

#[test]
fn helm_install_then_the_webhook_patches_pods() {
    let cp = ControlPlane::start("helm");
    let port = free_port();

    // cluster1's config (the overlay's ConfigMap) as the chart's `config` value.
    let overlay = fs::read_to_string(repo("manifests/overlays/cluster1/configmap.yaml")).unwrap();
    let cm: serde_json::Value = serde_yaml_ng::from_str(&overlay).unwrap();
    let config: serde_json::Value =
        serde_yaml_ng::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let values = cp.dir.join("values.json");
    fs::write(
        &values,
        serde_json::to_vec(&json!({"config": config})).unwrap(),
    )
    .unwrap();

    // As the README says: the namespace first, with its Pod Security labels.
    cp.apply(&[
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "istio-vault-webhook",
        "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}),
    ]);
    let mut helm = Command::new(peer("helm"));
    helm.args(["install", "istio-vault-webhook"])
        .arg(repo("manifests/chart/istio-vault-webhook"))
        .args(["--namespace", "istio-vault-webhook", "-f"])
        .arg(&values)
        // No kube-proxy here: the API server calls the webhook on loopback.
        .arg(format!("--set=webhook.url=https://127.0.0.1:{port}/mutate"))
        .env("KUBECONFIG", &cp.admin_kubeconfig)
        .env("HOME", &cp.dir)
        .env("HELM_CACHE_HOME", cp.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", cp.dir.join("helm/config"))
        .env("HELM_DATA_HOME", cp.dir.join("helm/data"));
    let out = run_with_timeout(helm, None, &cp.dir, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("Warning") && !stderr.contains("W1"),
        "helm install failed or warned:\n{}",
        out.describe()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("STATUS: deployed"),
        "{}",
        out.describe()
    );
    assert_guard_type_checks(&cp);

    // The chart's RBAC is all the webhook gets; its caBundle is what the API server trusts.
    let _webhook = start_webhook(&cp, port, env!("CARGO_BIN_EXE_istio-vault-webhook"));

    opt_in_namespace(&cp, "istio-ingress");
    create_service_account(&cp, "istio-ingress", "istio-ingressgateway", false);
    // The API server calls the webhook once its informer has the caBundle the webhook wrote.
    let probe = named_pod(
        "tests/fixtures/pods/ingressgateway.json",
        "gateway-probe",
        "istio-ingress",
    );
    admitted_eventually(&cp, &probe, |p| {
        annotations(p).contains_key("istio-vault-webhook/profile")
    });
    let gateway = create_pod(&cp, "tests/fixtures/pods/ingressgateway.json");
    let a = annotations(&gateway);
    assert_eq!(a["istio-vault-webhook/profile"], "ingressgateway", "{a:#?}");
    assert_eq!(
        a["vault.hashicorp.com/auth-path"],
        "auth/kubernetes-cluster1"
    );

    // No Vault injector in this cluster: the chart's guard refuses istiod rather than let it
    // start without its CA, after our webhook patched it.
    opt_in_namespace(&cp, "istio-system");
    create_service_account(&cp, "istio-system", "istiod", false);
    let istiod = named_pod(
        "tests/fixtures/pods/istiod.json",
        "istiod-helm-probe",
        "istio-system",
    );
    // (Eventually: the API server's policy informer takes a moment to see a new binding.)
    refused_eventually(
        &cp,
        &istiod,
        "istiod Pod was not injected by the Vault Agent Injector",
    );

    // With the Vault Agent Injector registered, istiod goes through, patched by us first.
    let bao = BaoDev::start();
    let _injector = Injector::start(&cp, &bao);
    let stored = create_pod(&cp, "tests/fixtures/pods/istiod.json");
    let a = annotations(&stored);
    assert_eq!(a["istio-vault-webhook/profile"], "istiod", "{a:#?}");
    assert_eq!(
        a["vault.hashicorp.com/agent-inject-status"], "injected",
        "{a:#?}"
    );
    let discovery = container(&stored, "discovery");
    let env = discovery["env"].as_array().unwrap();
    assert_eq!(env.last().unwrap()["name"], "ROOT_CA_DIR", "{env:?}");
    assert_eq!(env.last().unwrap()["value"], "/vault/secrets");
}
