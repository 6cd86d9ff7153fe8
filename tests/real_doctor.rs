//! `istio-vault-webhook doctor` against the real API server (tests/support/chain.rs: the shipped
//! overlay, our webhook, the Vault Agent Injector, Vault), healthy and then broken one way at a
//! time, asserting the exact lines an admin reads and the exit code.
//!
//! Needs root and the peers of `scripts/build-peers`, like tests/real_control_plane.rs.

mod support {
    pub mod bao;
    pub mod chain;
    pub mod kube;
    pub mod mesh_ca;
    pub mod peers;
    pub mod pod;
    pub mod webhook;
}

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};

use support::bao::{BaoDev, free_port};
use support::chain::{
    Cluster, Options, WEBHOOK, annotations, create_pod, create_service_account, opt_in_namespace,
};
use support::kube::ControlPlane;
use support::mesh_ca::Root;

const GUARD: &str = "istio-vault-webhook-istiod-requires-vault";

struct Report {
    code: i32,
    lines: Vec<String>,
    stderr: String,
}

impl Report {
    fn failures(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.starts_with('✘'))
            .map(String::as_str)
            .collect()
    }
}

fn doctor_with(kubeconfig: &Path, extra: &[&str]) -> Report {
    let out = Command::new(WEBHOOK)
        .arg("doctor")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(extra)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    Report {
        code: out.status.code().unwrap_or(-1),
        lines: String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn doctor(cp: &ControlPlane, extra: &[&str]) -> Report {
    doctor_with(&cp.admin_kubeconfig, extra)
}

fn config_map(text: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio-vault-webhook", "namespace": "istio-vault-webhook"},
        "data": {"config.yaml": text},
    })
}

/// What `istio-vault-webhook check` says about this ConfigMap: (exit code, stdout, stderr).
fn check(cp: &ControlPlane, text: &str) -> (i32, String, String) {
    let file = cp.dir.join("check-configmap.json");
    std::fs::write(&file, serde_json::to_vec(&config_map(text)).unwrap()).unwrap();
    let out = Command::new(WEBHOOK)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    let strip = |s: &[u8]| {
        String::from_utf8_lossy(s)
            .lines()
            .map(|l| {
                l.strip_prefix(&format!("{}: ", file.display()))
                    .unwrap_or(l)
                    .to_owned()
            })
            .collect::<Vec<_>>()
    };
    (
        out.status.code().unwrap_or(-1),
        strip(&out.stdout).join("\n"),
        strip(&out.stderr).join("; "),
    )
}

/// `sha256:…` of a valid config, as `check` prints it.
fn hash_of(cp: &ControlPlane, text: &str) -> String {
    let (code, stdout, stderr) = check(cp, text);
    assert_eq!(code, 0, "{stderr}");
    stdout
        .rsplit("config-hash ")
        .next()
        .unwrap()
        .trim()
        .trim_end_matches(')')
        .to_owned()
}

#[test]
fn doctor_on_the_real_control_plane() {
    let root = Root::new();
    let bao = BaoDev::start();
    let mut cluster = Cluster::start("cluster1", &root, &bao, Options::default());
    let cp = &cluster.cp;

    // An istiod and an ingress gateway Pod, through both webhooks.
    let istiod = create_pod(cp, "tests/fixtures/pods/istiod.json");
    opt_in_namespace(cp, "istio-ingress");
    create_service_account(cp, "istio-ingress", "istio-ingressgateway", true);
    let gateway = create_pod(cp, "tests/fixtures/pods/ingressgateway.json");
    let istiod_name = istiod["metadata"]["name"].as_str().unwrap().to_owned();
    let gateway_name = gateway["metadata"]["name"].as_str().unwrap().to_owned();
    let hash = annotations(&istiod)["istio-vault-webhook/config-hash"].clone();
    let mwc = cp.get_json(&["mutatingwebhookconfiguration", "istio-vault-webhook"]);
    let url = mwc["webhooks"][0]["clientConfig"]["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let cm = cp.get_json(&[
        "configmap",
        "istio-vault-webhook",
        "-n",
        "istio-vault-webhook",
    ]);
    let shipped_config = cm["data"]["config.yaml"].as_str().unwrap().to_owned();
    assert_eq!(hash_of(cp, &shipped_config), hash);

    // Healthy: every line ✔, exit 0.
    let healthy = doctor(cp, &[]);
    let expected_healthy = vec![
        "✔ MutatingWebhookConfiguration istio-vault-webhook exists".to_owned(),
        "✔ the Vault Agent Injector's MutatingWebhookConfiguration exists: vault-agent-injector-cfg".to_owned(),
        "✔ istio-vault-webhook runs before the Vault Agent Injector (vault-agent-injector-cfg): istio-vault-webhook sorts before vault-agent-injector-cfg".to_owned(),
        "✔ pods.istio-vault-webhook.svc fails closed (failurePolicy Fail)".to_owned(),
        format!("✔ caBundle of pods.istio-vault-webhook.svc trusts the webhook's certificate: {url} verified for 127.0.0.1"),
        "✔ namespaces opted in: istio-ingress, istio-system".to_owned(),
        "✔ vault-agent-injector-cfg lets the opted-in namespaces' istiod and gateway Pods through: istio-ingress, istio-system".to_owned(),
        "✔ the webhook's matchConditions admit every profile's Pods: istiod, ingressgateway".to_owned(),
        format!("✔ guard ValidatingAdmissionPolicy {GUARD} exists and type-checks"),
        format!("✔ guard policy {GUARD} is bound with validationActions Deny"),
        format!("✔ guard policy {GUARD} selects the istiod profile's Pods: app=istiod"),
        format!("✔ ConfigMap istio-vault-webhook/istio-vault-webhook is valid: cluster cluster1, profiles: istiod, ingressgateway, config-hash {hash}"),
        "✔ istiod and gateway Pods in opted-in namespaces are injected with the current config: 2 Pods".to_owned(),
    ];
    assert_eq!(healthy.lines, expected_healthy, "{}", healthy.stderr);
    assert_eq!(healthy.code, 0);
    println!("healthy:\n{}", healthy.lines.join("\n"));

    // The same as JSON, for scripts.
    let json_out = Command::new(WEBHOOK)
        .args(["doctor", "--output", "json", "--kubeconfig"])
        .arg(&cp.admin_kubeconfig)
        .output()
        .unwrap();
    assert!(json_out.status.success());
    let checks: Vec<Value> = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(checks.len(), expected_healthy.len());
    assert!(checks.iter().all(|c| c["ok"] == true && c["fix"] == ""));
    assert_eq!(
        checks[0],
        json!({"check": "MutatingWebhookConfiguration istio-vault-webhook exists",
               "ok": true, "message": "", "fix": ""})
    );

    // Missing permissions: the webhook's own ServiceAccount may not list configurations,
    // namespaces or policies; each check says which verb on which resource it lacks.
    let sa = cp.service_account_kubeconfig("istio-vault-webhook", "istio-vault-webhook");
    let limited = doctor_with(&sa, &[]);
    assert_eq!(limited.code, 1, "{}", limited.stderr);
    let user = "system:serviceaccount:istio-vault-webhook:istio-vault-webhook";
    assert!(
        limited.lines.contains(&format!(
            "✘ MutatingWebhookConfiguration istio-vault-webhook exists: not checked: forbidden to \
             list mutatingwebhookconfigurations: mutatingwebhookconfigurations.admissionregistration.k8s.io \
             is forbidden: User \"{user}\" cannot list resource \"mutatingwebhookconfigurations\" in \
             API group \"admissionregistration.k8s.io\" at the cluster scope — fix: grant the user \
             doctor runs as `list` on mutatingwebhookconfigurations (kubectl auth can-i list \
             mutatingwebhookconfigurations), or run doctor as a cluster admin"
        )),
        "{:#?}",
        limited.lines
    );
    assert!(
        limited
            .lines
            .iter()
            .any(|l| l
                .starts_with("✘ namespaces opted in: not checked: forbidden to list namespaces")),
        "{:#?}",
        limited.lines
    );
    // It may read its own ConfigMap.
    assert!(limited.lines.contains(&expected_healthy[11]));

    // failurePolicy Ignore.
    let set_policy = |policy: &str| {
        cp.kubectl(&[
            "patch",
            "mutatingwebhookconfiguration",
            "istio-vault-webhook",
            "--type=json",
            "-p",
            &json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": policy}])
                .to_string(),
        ]);
    };
    set_policy("Ignore");
    let r = doctor(cp, &[]);
    assert_eq!(
        r.failures(),
        [
            "✘ pods.istio-vault-webhook.svc fails closed (failurePolicy Fail): failurePolicy is \
             Ignore: while the webhook is down istiod Pods are admitted without Vault annotations \
             and start with a self-signed CA — fix: kubectl patch mutatingwebhookconfiguration \
             istio-vault-webhook --type=json -p \
             '[{\"op\":\"replace\",\"path\":\"/webhooks/0/failurePolicy\",\"value\":\"Fail\"}]'"
        ]
    );
    assert_eq!(r.code, 1);
    println!("failurePolicy Ignore:\n{}", r.lines.join("\n"));
    set_policy("Fail");

    // Renamed so that it sorts after the injector's configuration (which never reinvokes).
    let mut renamed = mwc.clone();
    renamed["metadata"] = json!({"name": "zz-istio-vault-webhook"});
    cp.apply(&[renamed]);
    let r = doctor(cp, &["--webhook-config", "zz-istio-vault-webhook"]);
    assert_eq!(
        r.failures(),
        [
            "✘ zz-istio-vault-webhook runs before the Vault Agent Injector (vault-agent-injector-cfg): \
             zz-istio-vault-webhook sorts after vault-agent-injector-cfg and vault.hashicorp.com is \
             not reinvoked, so the injector runs first and never sees the Vault annotations — fix: \
             name our MutatingWebhookConfiguration so it sorts before vault-agent-injector-cfg (the \
             shipped name istio-vault-webhook does), or set reinvocationPolicy: IfNeeded on the \
             injector's webhook (components/vault-injector-reinvocation)"
        ]
    );
    assert_eq!(r.code, 1);
    cp.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "zz-istio-vault-webhook",
    ]);

    // A caBundle that does not trust what the webhook serves (a copy of our configuration that
    // the webhook does not keep current, with the cluster CA as its bundle).
    let mut untrusted = mwc.clone();
    untrusted["metadata"] = json!({"name": "aa-istio-vault-webhook"});
    untrusted["webhooks"][0]["clientConfig"]["caBundle"] =
        json!(base64::engine::general_purpose::STANDARD.encode(&cp.ca.cert_pem));
    cp.apply(&[untrusted]);
    let r = doctor(cp, &["--webhook-config", "aa-istio-vault-webhook"]);
    assert_eq!(
        r.failures(),
        [format!(
            "✘ caBundle of pods.istio-vault-webhook.svc trusts the webhook's certificate: {url} \
             serves a certificate caBundle does not verify: invalid peer certificate: \
             UnknownIssuer — fix: the webhook fills it itself with --tls-self-signed \
             --webhook-config (check its logs and its RBAC on mutatingwebhookconfigurations), or \
             cert-manager's CA injector does (components/cert-manager)"
        )]
    );
    assert_eq!(r.code, 1);
    cp.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "aa-istio-vault-webhook",
    ]);

    // A guard whose CEL does not type-check (status.typeChecking, not an apply warning).
    let guard = cp.get_json(&["validatingadmissionpolicy", GUARD]);
    let mut broken = json!({
        "apiVersion": guard["apiVersion"], "kind": guard["kind"],
        "metadata": {"name": GUARD}, "spec": guard["spec"].clone(),
    });
    broken["spec"]["validations"][0]["expression"] = json!("object.spec.noSuchField == 'x'");
    cp.apply(&[broken]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let r = loop {
        let r = doctor(cp, &[]);
        if !r.failures().is_empty() || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let failures = r.failures();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    let prefix = format!(
        "✘ guard ValidatingAdmissionPolicy {GUARD} exists and type-checks: its CEL does not \
         type-check: spec.validations[0].expression: "
    );
    assert!(
        failures[0].starts_with(&prefix)
            && failures[0].contains("noSuchField")
            && failures[0].ends_with(
                "— fix: re-apply the shipped policy (manifests/base/validatingadmissionpolicy.yaml)"
            ),
        "{}",
        failures[0]
    );
    println!("guard does not type-check:\n{}", failures[0]);
    cp.apply(&[json!({
        "apiVersion": guard["apiVersion"], "kind": guard["kind"],
        "metadata": {"name": GUARD}, "spec": guard["spec"].clone(),
    })]);
    // Re-checked: same generation observed, and no warnings left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let vap = cp.get_json(&["validatingadmissionpolicy", GUARD]);
        if vap["status"]["observedGeneration"] == vap["metadata"]["generation"]
            && vap["status"]["typeChecking"]["expressionWarnings"].is_null()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{vap}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    // The guard's binding deleted.
    cp.kubectl(&["delete", "validatingadmissionpolicybinding", GUARD]);
    let r = doctor(cp, &[]);
    assert_eq!(
        r.failures(),
        [format!(
            "✘ guard policy {GUARD} is bound with validationActions Deny: no \
             ValidatingAdmissionPolicyBinding names it, so the policy never runs — fix: kubectl \
             apply -k manifests (manifests/base/validatingadmissionpolicy.yaml)"
        )]
    );
    assert_eq!(r.code, 1);
    cp.apply(&[json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": GUARD},
        "spec": {"policyName": GUARD, "validationActions": ["Deny"]},
    })]);

    // An invalid ConfigMap: the same errors as `check`.
    let invalid = shipped_config.replace("kvVersion: 1", "kvVersion: 3\n  kvVersoin: 1");
    let (code, _, errors) = check(cp, &invalid);
    assert_eq!(code, 1);
    assert!(errors.contains("kvVersoin"), "{errors}");
    cp.apply(&[config_map(&invalid)]);
    let r = doctor(cp, &[]);
    assert_eq!(
        r.failures(),
        [format!(
            "✘ ConfigMap istio-vault-webhook/istio-vault-webhook is valid: {errors} — fix: kubectl \
             edit configmap istio-vault-webhook -n istio-vault-webhook (validate first: \
             istio-vault-webhook check FILE); the webhook keeps serving its last valid config, or \
             denies istiod Pods if it never had one"
        )]
    );
    assert_eq!(r.code, 1);
    println!("invalid ConfigMap:\n{}", r.failures().join("\n"));

    // The config changed since the Pods were created: they need a rollout restart.
    // istiod's rotation (the first one in the file) becomes init-only: valid, another hash.
    let changed = shipped_config.replacen("rotation: sidecar", "rotation: init-only", 1);
    assert_ne!(changed, shipped_config);
    let new_hash = hash_of(cp, &changed);
    assert_ne!(new_hash, hash);
    cp.apply(&[config_map(&changed)]);
    let stale = [
        format!(
            "✘ Pod istio-ingress/{gateway_name} (profile ingressgateway) is injected with the \
             current config: injected with config-hash {hash}, the ConfigMap is now {new_hash} — \
             fix: kubectl rollout restart deployment/istio-ingressgateway -n istio-ingress"
        ),
        format!(
            "✘ Pod istio-system/{istiod_name} (profile istiod) is injected with the current \
             config: injected with config-hash {hash}, the ConfigMap is now {new_hash} — fix: \
             kubectl rollout restart deployment/istiod -n istio-system"
        ),
    ];
    let r = doctor(cp, &[]);
    assert_eq!(r.failures(), stale);
    assert_eq!(r.code, 1);
    println!("stale Pods:\n{}", r.failures().join("\n"));

    // A gateway profile whose selector the webhook's matchConditions do not admit.
    let eastwest = format!(
        "{changed}    - name: eastwestgateway\n      match: {{ istio: eastwestgateway }}\n      \
         role: istio-eastwestgateway\n      secretPath: kubernetes-cluster1-secrets/eastwest/certs\n      \
         files: {{ tls.crt: tls_crt, tls.key: tls_key, ca.crt: ca_crt }}\n"
    );
    let eastwest_hash = hash_of(cp, &eastwest);
    cp.apply(&[config_map(&eastwest)]);
    let r = doctor(cp, &[]);
    let mut expected: Vec<String> = vec![
        "✘ the webhook is called for profile eastwestgateway's Pods: matchCondition \
         istiod-or-istio-gateway is false for Pods labelled istio=eastwestgateway, so the API \
         server never sends them to the webhook — fix: extend matchCondition \
         istiod-or-istio-gateway of mutatingwebhookconfiguration/istio-vault-webhook to admit \
         istio=eastwestgateway (manifests/base/mutatingwebhookconfiguration.yaml), then re-apply"
            .to_owned(),
    ];
    expected.extend(stale.iter().map(|l| l.replace(&new_hash, &eastwest_hash)));
    assert_eq!(r.failures(), expected);
    assert_eq!(r.code, 1);

    // Back to the shipped config: healthy again.
    cp.apply(&[config_map(&shipped_config)]);
    let r = doctor(cp, &[]);
    assert_eq!(r.lines, expected_healthy);
    assert_eq!(r.code, 0);

    // The webhook down: the caBundle cannot be verified, and doctor says so instead of passing.
    cluster.webhook.stop();
    let addr = url
        .trim_start_matches("https://")
        .trim_end_matches("/mutate")
        .to_owned();
    let r = doctor(cp, &[]);
    assert_eq!(
        r.failures(),
        [format!(
            "✘ caBundle of pods.istio-vault-webhook.svc trusts the webhook's certificate: not \
             verified: the webhook is not reachable from here ({addr}: Connection refused (os \
             error 111)) — fix: start the webhook (kubectl get pods -n istio-vault-webhook), or \
             run doctor where clientConfig's address is reachable"
        )]
    );
    assert_eq!(r.code, 1);

    // Our configuration deleted.
    cp.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "istio-vault-webhook",
    ]);
    let r = doctor(cp, &[]);
    assert_eq!(
        r.failures(),
        [
            "✘ MutatingWebhookConfiguration istio-vault-webhook exists: not found, so no Pod gets \
             the Vault annotations — fix: kubectl apply -k manifests (or your overlay), or pass \
             --webhook-config with its name"
        ]
    );
    assert_eq!(r.code, 1);
    println!("configuration deleted:\n{}", r.lines.join("\n"));
}

/// No API server behind the kubeconfig: one clear line on stderr and exit code 2.
#[test]
fn doctor_reports_an_unreachable_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
             https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  \
             user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             current-context: c\n"
        ),
    )
    .unwrap();
    let r = doctor_with(&kubeconfig, &[]);
    assert_eq!(r.code, 2);
    assert!(r.lines.is_empty(), "{:?}", r.lines);
    let line = r.stderr.trim();
    let prefix = format!(
        "✘ the Kubernetes API is reachable: cannot reach the Kubernetes API at \
         https://127.0.0.1:{port}: "
    );
    assert!(line.starts_with(&prefix), "{line}");
    assert!(line.contains("Connection refused"), "{line}");
    assert!(
        line.ends_with(
            "— fix: check that the cluster is up and that the kubeconfig (--kubeconfig, \
             $KUBECONFIG, --context) points at it: kubectl cluster-info"
        ),
        "{line}"
    );

    // A context that is not in the kubeconfig.
    let r = doctor_with(&kubeconfig, &["--context", "nope"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("nope"), "{}", r.stderr);
}
