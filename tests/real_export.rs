//! `istio-vault-webhook export` on the real 1.36 API server, with no webhook at all: the
//! MutatingAdmissionPolicies it prints leave every chart Pod fixture with the same annotations
//! and container env as the webhook's own mutation (`istio-vault-webhook render` on the same Pod,
//! the code path `serve` runs), are idempotent on their own output, a Pod matching two profiles is
//! refused, and the generated guard type-checks and refuses an istiod Pod the Vault injector
//! did not inject.

#[allow(dead_code)]
mod support {
    pub mod bao;
    pub mod chain;
    pub mod kube;
    pub mod mesh_ca;
    pub mod peers;
    pub mod pod;
    pub mod webhook;
}

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::{Value, json};

use support::chain::{
    WEBHOOK, assert_guard_type_checks, create_service_account, opt_in_namespace, pod_fixture,
    refused_eventually, repo, try_create, without_server_fields,
};
use support::kube::{ControlPlane, yaml_documents};

const CONFIG: &str = "manifests/overlays/cluster1/configmap.yaml";

/// The fixtures the webhook admits (istiod-renamed-container it denies; the generated guard
/// refuses it instead, checked below).
const FIXTURES: [&str; 12] = [
    "istiod.json",
    "istiod-already-injected.json",
    "istiod-canary.json",
    "istiod-conflicting-annotations.json",
    "istiod-no-annotations.json",
    "istiod-no-env.json",
    "istiod-preset-rootcadir.json",
    "istiod-valuefrom-rootcadir.json",
    "ingressgateway.json",
    "legacy-ingressgateway.json",
    "egressgateway.json",
    "unrelated.json",
];

fn export() -> Vec<Value> {
    let out = Command::new(WEBHOOK)
        .args(["export", "--config"])
        .arg(repo(CONFIG))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_documents(&String::from_utf8_lossy(&out.stdout))
}

/// What the webhook makes of the Pod: `render` runs the same `mutate` as `serve`.
fn webhook_result(fixture: &str) -> Value {
    let out = Command::new(WEBHOOK)
        .args(["render", "--config"])
        .arg(repo(CONFIG))
        .arg(repo(&format!("tests/fixtures/pods/{fixture}")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render {fixture}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_documents(&String::from_utf8_lossy(&out.stdout)).remove(0)
}

/// The parts of a Pod both mutate: annotations, and each container's env.
fn mutated_parts(pod: &Value) -> Value {
    let env: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| json!({"name": c["name"], "env": c.get("env").cloned().unwrap_or(Value::Null)}))
        .collect();
    json!({
        "annotations": pod["metadata"].get("annotations").cloned().unwrap_or(json!({})),
        "containers": env,
    })
}

/// A stored Pod as a client would send it again.
fn resend(pod: &Value) -> Value {
    without_server_fields(pod.clone())
}

#[test]
fn exported_policies_do_what_the_webhook_does() {
    let cp = ControlPlane::start("export");
    let resources = cp.kubectl(&["api-resources", "--api-group=admissionregistration.k8s.io"]);
    assert!(
        resources
            .lines()
            .any(|l| l.starts_with("mutatingadmissionpolicies ")
                && l.contains("admissionregistration.k8s.io/v1 ")),
        "MutatingAdmissionPolicy v1 is not served:\n{resources}"
    );

    // The fixtures' namespaces, opted in, and their ServiceAccounts (no controller-manager).
    let mut namespaces = BTreeSet::new();
    for f in FIXTURES
        .iter()
        .chain(["istiod-renamed-container.json"].iter())
    {
        let pod = pod_fixture(&format!("tests/fixtures/pods/{f}"));
        let ns = pod["metadata"]["namespace"].as_str().unwrap().to_owned();
        if namespaces.insert(ns.clone()) {
            opt_in_namespace(&cp, &ns);
        }
        let sa = pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        create_service_account(&cp, &ns, sa, false);
    }

    // Everything but the guard's binding: with no Vault injector here the guard would refuse
    // every istiod Pod, which is what it is for (checked at the end).
    let objects = export();
    let kinds: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "MutatingAdmissionPolicy/istio-vault-webhook-istiod",
            "MutatingAdmissionPolicyBinding/istio-vault-webhook-istiod",
            "MutatingAdmissionPolicy/istio-vault-webhook-ingressgateway",
            "MutatingAdmissionPolicyBinding/istio-vault-webhook-ingressgateway",
            "ValidatingAdmissionPolicy/istio-vault-webhook-istiod-requires-vault",
            "ValidatingAdmissionPolicyBinding/istio-vault-webhook-istiod-requires-vault",
            "ValidatingAdmissionPolicy/istio-vault-webhook-one-profile",
            "ValidatingAdmissionPolicyBinding/istio-vault-webhook-one-profile",
        ]
    );
    let (guard_binding, rest): (Vec<Value>, Vec<Value>) = objects.into_iter().partition(|o| {
        o["kind"] == "ValidatingAdmissionPolicyBinding"
            && o["metadata"]["name"] == "istio-vault-webhook-istiod-requires-vault"
    });
    cp.apply(&rest);
    // Both generated validating policies type-check (kube-controller-manager's checker).
    assert_guard_type_checks(&cp);
    let one_profile = wait_type_checked(&cp, "istio-vault-webhook-one-profile");
    assert_eq!(one_profile, json!([]));

    // Policy bindings take effect asynchronously: wait until istiod.json is mutated.
    let istiod = pod_fixture("tests/fixtures/pods/istiod.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let got = try_create(&cp, &istiod).unwrap();
        if got["metadata"]["annotations"]
            .get("istio-vault-webhook/profile")
            .is_some()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the exported policy never mutated istiod: {got}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    for f in FIXTURES {
        let fixture = pod_fixture(&format!("tests/fixtures/pods/{f}"));
        let by_policy = try_create(&cp, &fixture).unwrap_or_else(|e| panic!("{f}: {e}"));
        let by_webhook = webhook_result(f);
        assert_eq!(
            mutated_parts(&by_policy),
            mutated_parts(&by_webhook),
            "{f}: the policy's Pod differs from the webhook's"
        );
        // Idempotent: the policy on its own output changes nothing.
        let again = try_create(&cp, &resend(&by_policy)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(
            resend(&again)["metadata"],
            resend(&by_policy)["metadata"],
            "{f}"
        );
        assert_eq!(again["spec"], by_policy["spec"], "{f}");
    }
    // The istiod fixture really was changed (not two no-ops compared).
    let by_policy = try_create(&cp, &istiod).unwrap();
    let discovery = by_policy["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "discovery")
        .unwrap();
    assert_eq!(
        discovery["env"].as_array().unwrap().last().unwrap(),
        &json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"})
    );
    assert_eq!(
        by_policy["metadata"]["annotations"]["vault.hashicorp.com/role"],
        "istiod"
    );

    // A Pod that matches two profiles is refused, naming both.
    let mut both = istiod.clone();
    both["metadata"]["labels"]["istio"] = json!("ingressgateway");
    // (Eventually: the API server's policy informer takes a moment to see a new binding.)
    let refused = refused_eventually(&cp, &both, "istio-vault-webhook-one-profile");
    assert!(
        refused.contains("istio-vault-webhook-one-profile")
            && refused.contains("match several profiles (istiod, ingressgateway)"),
        "{refused}"
    );

    // The guard: bound, it refuses an istiod Pod no Vault injector ran on, and one whose
    // container the policy could not give ROOT_CA_DIR.
    cp.apply(&guard_binding);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let refused = loop {
        match try_create(&cp, &istiod) {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the guard never refused istiod"
                );
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        }
    };
    assert!(
        refused.contains("istio-vault-webhook-istiod-requires-vault")
            && refused.contains("was not injected by the Vault Agent Injector"),
        "{refused}"
    );
    // (As if the Vault injector had run, so that the container check is the one that fails.)
    let mut renamed = pod_fixture("tests/fixtures/pods/istiod-renamed-container.json");
    renamed["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"] =
        json!("injected");
    let init = renamed["spec"]["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut with_agent = vec![json!({"name": "vault-agent-init", "image": "hashicorp/vault"})];
    with_agent.extend(init);
    renamed["spec"]["initContainers"] = json!(with_agent);
    let refused = try_create(&cp, &renamed).expect_err("istiod without discovery was admitted");
    assert!(
        refused.contains("discovery container does not end with ROOT_CA_DIR=/vault/secrets"),
        "{refused}"
    );
}

/// Waits for the type checker's verdict on a ValidatingAdmissionPolicy; returns its warnings.
fn wait_type_checked(cp: &ControlPlane, name: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let vap = cp.get_json(&["validatingadmissionpolicy", name]);
        if let Some(checked) = vap["status"].get("typeChecking") {
            return checked
                .get("expressionWarnings")
                .cloned()
                .unwrap_or(json!([]));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never type-checked"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}
