//! The whole chain with the upstream binaries, on one machine: a real kube-apiserver calls this
//! webhook and the real Vault Agent Injector (vault-k8s); a real `bao agent` logs in with the
//! Kubernetes auth method and renders the CA files; a real istiod plugs them in.
//!
//! It reads like the walkthrough in the README ("What it was proven against"):
//!  1. etcd + kube-apiserver on loopback (RBAC, ServiceAccount tokens, admin client cert);
//!  2. the shipped manifests (`kubectl kustomize manifests/overlays/cluster1`) applied, with
//!     one change: `clientConfig.service` becomes a loopback `url` (no kube-proxy here);
//!  3. the webhook as a local process, authenticated as the manifests' own ServiceAccount,
//!     keeping the caBundle of its configuration itself (`--tls-self-signed --webhook-config`);
//!  4. vault-k8s in its own mount namespace with in-cluster credentials, registered as the
//!     Vault Helm chart registers it;
//!  5. `bao server -dev` set up by `manifests/vault/setup.sh cluster1`, with a real root and
//!     cluster1 intermediate;
//!  6. the chart-rendered istiod Pod created through the API server;
//!  7. its `vault-agent-init` container run as the kubelet would run it;
//!  8. istiod started with the stored `discovery` container's env, plugging in the Vault CA;
//!  9. an ingress gateway Pod gets its files the same way;
//! 10. how it fails: webhook down, config gone, injector down, our configuration deleted; and
//!     what is never sent to us.
//!
//! The binaries come from `scripts/build-peers` (versions in `scripts/peers.env`); the test fails
//! — never skips — when one is missing. It needs root (mount namespaces).

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

use base64::Engine as _;
use serde_json::{Value, json};

use support::bao::{BaoDev, free_port};
use support::chain::{
    Cluster, Injector, Istiod, Options, READY, SECRETS, admitted_eventually, annotations,
    assert_rendered, container, container_names, create_pod, create_service_account, named_pod,
    opt_in_namespace, refused_eventually, repo, run_container, try_create, wait_success,
};
use support::kube::{ControlPlane, Process};
use support::mesh_ca::Root;
use support::pod::PodFiles;
use support::webhook::shipped_manifests;

#[test]
fn istiod_takes_its_ca_from_vault_through_the_real_control_plane() {
    // 1. to 5.: the API server, the shipped manifests, our webhook, Vault set up by setup.sh,
    // the Vault Agent Injector (tests/support/chain.rs, Cluster::start).
    let root = Root::new();
    let bao = BaoDev::start();
    let mut cluster = Cluster::start("cluster1", &root, &bao, Options::default());
    let cp = &cluster.cp;

    // 6. The istiod Pod, through both webhooks.
    let stored = create_pod(cp, "tests/fixtures/pods/istiod.json");
    assert_injected_istiod(&stored);

    // 7. vault-agent-init, as the kubelet would run it: files equal to the Vault values.
    let istiod_pod = PodFiles::new(cp, stored, &cp.dir.join("pods/istiod"));
    wait_success(
        &mut run_container(cp, &istiod_pod, "vault-agent-init"),
        &istiod_pod,
    );
    assert_rendered(&istiod_pod, &cluster.ca.istiod_files());

    // 8. istiod plugs in the Vault CA.
    let mut istiod = Istiod::start(cp, &istiod_pod);
    istiod.assert_uses_vault_ca(cp, &root, &cluster.ca);
    istiod.process.stop();

    // 9. An ingress gateway Pod gets its files the same way, and no ROOT_CA_DIR.
    opt_in_namespace(cp, "istio-ingress");
    create_service_account(cp, "istio-ingress", "istio-ingressgateway", true);
    let stored = create_pod(cp, "tests/fixtures/pods/ingressgateway.json");
    assert_injected_gateway(&stored);
    let gateway_pod = PodFiles::new(cp, stored, &cp.dir.join("pods/ingressgateway"));
    wait_success(
        &mut run_container(cp, &gateway_pod, "vault-agent-init"),
        &gateway_pod,
    );
    assert_rendered(&gateway_pod, &cluster.gateway_tls.tls_files());

    // 10. How it fails, through the real API server.
    let Cluster {
        cp,
        webhook,
        injector,
        ..
    } = &mut cluster;
    never_sent_to_us(cp, webhook);
    refusals(cp, webhook, injector);
}

// ---------------------------------------------------------------------------
// 6. and 9. What both webhooks leave on the stored Pods
// ---------------------------------------------------------------------------

/// Both webhooks' work on the stored istiod Pod, ours first.
fn assert_injected_istiod(pod: &Value) {
    let a = annotations(pod);
    let expect = [
        ("istio-vault-webhook/profile", "istiod"),
        ("vault.hashicorp.com/agent-inject", "true"),
        ("vault.hashicorp.com/agent-init-first", "true"),
        ("vault.hashicorp.com/role", "istiod"),
        ("vault.hashicorp.com/auth-path", "auth/kubernetes-cluster1"),
        // vault-k8s' mark that it injected the agent.
        ("vault.hashicorp.com/agent-inject-status", "injected"),
    ];
    for (key, value) in expect {
        assert_eq!(
            a.get(key).map(String::as_str),
            Some(value),
            "{key} in {a:#?}"
        );
    }
    for file in [
        "ca-key.pem",
        "ca-cert.pem",
        "root-cert.pem",
        "cert-chain.pem",
    ] {
        assert_eq!(
            a[&format!("vault.hashicorp.com/agent-inject-secret-{file}")],
            "kubernetes-cluster1-secrets/istiod-service/certs"
        );
    }
    // agent-init-first: vault-agent-init runs before any other init container.
    assert_eq!(
        container_names(pod, "initContainers")
            .first()
            .map(String::as_str),
        Some("vault-agent-init")
    );
    // rotation: sidecar -> the agent keeps running beside istiod.
    assert!(container_names(pod, "containers").contains(&"vault-agent".to_string()));
    let discovery = container(pod, "discovery");
    let env = discovery["env"].as_array().unwrap();
    let root_ca_dir: Vec<&Value> = env.iter().filter(|e| e["name"] == "ROOT_CA_DIR").collect();
    assert_eq!(root_ca_dir.len(), 1, "{env:?}");
    assert_eq!(root_ca_dir[0]["value"], SECRETS);
    // vault-k8s mounts the secrets volume into every container present when it runs.
    assert!(
        discovery["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == SECRETS),
        "discovery does not mount {SECRETS}: {discovery}"
    );
}

fn assert_injected_gateway(pod: &Value) {
    let a = annotations(pod);
    assert_eq!(a["istio-vault-webhook/profile"], "ingressgateway");
    assert_eq!(a["vault.hashicorp.com/role"], "istio-ingressgateway");
    assert_eq!(a["vault.hashicorp.com/agent-inject-status"], "injected");
    assert_eq!(
        container_names(pod, "initContainers")
            .first()
            .map(String::as_str),
        Some("vault-agent-init")
    );
    for c in pod["spec"]["containers"].as_array().unwrap() {
        let env = c["env"].as_array().into_iter().flatten();
        assert!(
            !env.clone().any(|e| e["name"] == "ROOT_CA_DIR"),
            "gateway got ROOT_CA_DIR: {c}"
        );
    }
}

// ---------------------------------------------------------------------------
// 10. How it fails
// ---------------------------------------------------------------------------

/// The matchConditions and the namespaceSelector keep everything else away from the webhook:
/// neither an unrelated Pod in an opted-in namespace nor an istiod Pod in a namespace that did
/// not opt in appears in its admission log, while a probe istiod Pod does.
fn never_sent_to_us(cp: &ControlPlane, webhook: &mut Process) {
    cp.apply(&[
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "not-opted-in"}}),
    ]);
    create_service_account(cp, "not-opted-in", "istiod", false);
    create_service_account(cp, "istio-system", "default", false);
    let unrelated = named_pod(
        "tests/fixtures/pods/unrelated.json",
        "unrelated-probe",
        "istio-system",
    );
    try_create(cp, &unrelated).expect("an unrelated Pod is admitted");
    let elsewhere = named_pod(
        "tests/fixtures/pods/istiod.json",
        "istiod-elsewhere-probe",
        "not-opted-in",
    );
    let admitted =
        try_create(cp, &elsewhere).expect("istiod outside opted-in namespaces is left alone");
    assert!(!annotations(&admitted).contains_key("istio-vault-webhook/profile"));
    let probe = named_pod(
        "tests/fixtures/pods/istiod.json",
        "istiod-probe",
        "istio-system",
    );
    try_create(cp, &probe).expect("an istiod Pod is admitted");
    webhook.wait_for_log("istiod-probe", READY);
    let log = webhook.log_text();
    for name in ["unrelated-probe", "istiod-elsewhere-probe"] {
        assert!(
            !log.contains(name),
            "{name} was sent to the webhook:\n{}",
            webhook.tail()
        );
    }
}

/// Each way the chain can break refuses istiod, each with a message that says why.
fn refusals(cp: &ControlPlane, webhook: &mut Process, injector: &mut Injector) {
    let istiod = named_pod(
        "tests/fixtures/pods/istiod.json",
        "istiod-refusal-probe",
        "istio-system",
    );
    let guard = "istiod Pod was not injected by the Vault Agent Injector";

    // A later mutating webhook strips ROOT_CA_DIR: the guard refuses, naming the variable.
    let mut stripper = start_root_ca_dir_stripper(cp);
    let why = refused_eventually(cp, &istiod, "does not end with ROOT_CA_DIR=/vault/secrets");
    assert!(why.contains("ValidatingAdmissionPolicy"), "{why}");
    cp.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "zz-strip-root-ca-dir",
    ]);
    stripper.stop();
    admitted_injected(cp, &istiod);

    // The ConfigMap deleted: the webhook itself refuses, fail closed.
    cp.kubectl(&[
        "delete",
        "configmap",
        "istio-vault-webhook",
        "-n",
        "istio-vault-webhook",
    ]);
    let why = refused_eventually(cp, &istiod, "no valid config is loaded");
    assert!(
        why.contains("istio-vault-webhook: refusing istiod Pod"),
        "{why}"
    );
    // ... and admitted again once it is back (the watch picks it up, no restart).
    let objects = shipped_manifests(cp, "cluster1", 0);
    let config: Vec<Value> = objects
        .into_iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .collect();
    cp.apply(&config);
    admitted_injected(cp, &istiod);

    // The injector down: its failurePolicy Ignore lets the Pod through uninjected, the guard
    // refuses it.
    injector.stop();
    let why = refused_eventually(cp, &istiod, guard);
    assert!(why.contains("ValidatingAdmissionPolicy"), "{why}");
    injector.restart(cp);
    admitted_injected(cp, &istiod);

    // The webhook down: failurePolicy Fail.
    webhook.stop();
    refused_eventually(
        cp,
        &istiod,
        "failed calling webhook \"pods.istio-vault-webhook.svc\"",
    );

    // Our configuration deleted: nothing adds the Vault annotations, the injector skips the Pod,
    // the guard refuses it.
    cp.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "istio-vault-webhook",
    ]);
    refused_eventually(cp, &istiod, guard);
}

/// tests/fixtures/webhooks/strip_root_ca_dir.py, registered to run after every other webhook
/// (configurations are called in name order).
fn start_root_ca_dir_stripper(cp: &ControlPlane) -> Process {
    let dir = cp.dir.join("stripper");
    fs::create_dir_all(&dir).unwrap();
    let serving = cp.ca.serving(&["127.0.0.1"]);
    fs::write(dir.join("tls.crt"), &serving.cert_pem).unwrap();
    fs::write(dir.join("tls.key"), &serving.key_pem).unwrap();
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.arg(repo("tests/fixtures/webhooks/strip_root_ca_dir.py"))
        .arg(port.to_string())
        .arg(dir.join("tls.crt"))
        .arg(dir.join("tls.key"));
    let mut process = Process::spawn("strip-root-ca-dir", cmd, &cp.dir);
    process.wait_for_log("listening on", READY);
    cp.apply(&[json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "zz-strip-root-ca-dir"},
        "webhooks": [{
            "name": "strip.example.com",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{port}/mutate"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&cp.ca.cert_pem),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"]}],
            "objectSelector": {"matchLabels": {"app": "istiod"}},
        }],
    })]);
    process
}

fn admitted_injected(cp: &ControlPlane, pod: &Value) {
    admitted_eventually(cp, pod, |p| {
        annotations(p).contains_key("vault.hashicorp.com/agent-inject-status")
    });
}
