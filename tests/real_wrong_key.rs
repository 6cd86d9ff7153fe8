//! A wrong key never becomes a CA file, on the real chain (tests/support/chain.rs).
//!
//! The config names a key the Vault secret does not have. The webhook adds
//! `vault.hashicorp.com/error-on-missing-key-<file>: "true"` for every file; vault-k8s turns it
//! into `error_on_missing_key` in the agent's template config; the real agent then fails instead
//! of rendering, so `vault-agent-init` exits non-zero and istiod (the next container) is never
//! started. The control run: the same annotations without `error-on-missing-key` (an admin's
//! hand-written ones, on a Pod our webhook does not select) make the agent write `<no value>` into
//! `ca-key.pem` and exit 0: istiod would start on a broken CA file.

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
use std::time::Duration;

use serde_json::json;
use support::bao::BaoDev;
use support::chain::{Cluster, Options, annotations, create_pod, pod_fixture, run_container};
use support::mesh_ca::Root;
use support::pod::PodFiles;

/// The istiod profile reads `ca-key.pem` from a key the secret does not have.
fn typo_in_key(config: &str) -> String {
    let fixed = config.replace("ca-key.pem: ca_key", "ca-key.pem: ca_key_typo");
    assert_ne!(
        fixed, config,
        "the overlay's config no longer has `ca-key.pem: ca_key`"
    );
    fixed
}

#[test]
fn a_wrong_key_fails_the_agent_and_never_becomes_a_ca_file() {
    let root = Root::new();
    let bao = BaoDev::start();
    let options = Options {
        edit_config: Some(typo_in_key),
        ..Options::default()
    };
    let cluster = Cluster::start("cluster1", &root, &bao, options);
    let cp = &cluster.cp;

    let stored = create_pod(cp, "tests/fixtures/pods/istiod.json");
    let ours = annotations(&stored);
    for file in [
        "ca-key.pem",
        "ca-cert.pem",
        "root-cert.pem",
        "cert-chain.pem",
    ] {
        let key = format!("vault.hashicorp.com/error-on-missing-key-{file}");
        assert_eq!(ours.get(&key).map(String::as_str), Some("true"), "{key}");
    }
    let pod = PodFiles::new(cp, stored.clone(), &cp.dir.join("pods/istiod"));
    let mut init = run_container(cp, &pod, "vault-agent-init");
    let status = init.wait_exit(Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| !s.success()),
        "vault-agent-init should fail on the missing key ({status:?}); its log:\n{}",
        init.tail()
    );
    let log = init.log_text();
    assert!(
        log.contains("ca_key_typo"),
        "the agent's error does not name the key:\n{log}"
    );
    let volume = pod.volume("vault-secrets");
    assert!(
        !volume.join("ca-key.pem").exists(),
        "ca-key.pem was written although its key is missing"
    );
    for entry in fs::read_dir(volume).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap_or_default();
        assert!(
            !text.contains("<no value>"),
            "{} holds <no value>",
            path.display()
        );
    }
    eprintln!(
        "with error-on-missing-key: vault-agent-init failed ({status:?}); files written: {:?}",
        fs::read_dir(volume)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );

    // Control: the same Vault annotations, minus error-on-missing-key, on a Pod our webhook
    // does not select (its matchConditions want app: istiod); only vault-k8s acts on it.
    let mut control = pod_fixture("tests/fixtures/pods/istiod.json");
    control["metadata"]["generateName"] = json!("istiod-control-");
    control["metadata"]["labels"]["app"] = json!("istiod-control");
    for (key, value) in &ours {
        let hand_written = key.starts_with("vault.hashicorp.com/")
            && !key.starts_with("vault.hashicorp.com/error-on-missing-key-")
            && key != "vault.hashicorp.com/agent-inject-status";
        if hand_written {
            control["metadata"]["annotations"][key] = json!(value);
        }
    }
    let body = serde_json::to_vec(&control).unwrap();
    let out = cp.kubectl_stdin(&["create", "-o", "json", "-f", "-"], Some(&body));
    let stored: serde_json::Value = serde_json::from_str(&out).unwrap();
    let a = annotations(&stored);
    assert!(
        !a.contains_key("istio-vault-webhook/profile"),
        "our webhook saw the control Pod"
    );
    assert_eq!(a["vault.hashicorp.com/agent-inject-status"], "injected");
    let pod = PodFiles::new(cp, stored, &cp.dir.join("pods/istiod-control"));
    let mut init = run_container(cp, &pod, "vault-agent-init");
    let status = init.wait_exit(Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| s.success()),
        "the control agent should succeed ({status:?}); its log:\n{}",
        init.tail()
    );
    let key = fs::read_to_string(pod.volume("vault-secrets").join("ca-key.pem")).unwrap();
    assert_eq!(
        key, "<no value>",
        "without error-on-missing-key the agent writes <no value>"
    );
}
