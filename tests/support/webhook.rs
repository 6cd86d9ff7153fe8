//! The webhook as the shipped manifests deploy it, on a [`ControlPlane`].

// Shared by several test files, each of which uses a part.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::bao::free_port;
use super::kube::{ControlPlane, Process, addr, kustomize, wait_for_port};

const READY: Duration = Duration::from_secs(120);

/// `kubectl kustomize manifests/overlays/<overlay>`, with the one change the lack of kube-proxy
/// forces: our webhook is called at `https://127.0.0.1:<port>/mutate`.
pub fn shipped_manifests(cp: &ControlPlane, overlay: &str, webhook_port: u16) -> Vec<Value> {
    let mut objects = kustomize(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("manifests/overlays")
            .join(overlay),
        &cp.dir,
    );
    let mut rewritten = 0;
    for object in &mut objects {
        if object["kind"] == "MutatingWebhookConfiguration" {
            for hook in object["webhooks"].as_array_mut().into_iter().flatten() {
                let service = &hook["clientConfig"]["service"];
                assert_eq!(service["name"], "istio-vault-webhook", "{hook}");
                let path = service["path"].as_str().unwrap_or("/").to_string();
                hook["clientConfig"] =
                    json!({"url": format!("https://127.0.0.1:{webhook_port}{path}")});
                rewritten += 1;
            }
        }
    }
    assert_eq!(rewritten, 1, "the overlay has one webhook to rewrite");
    objects
}

/// The webhook binary `bin` as a local process, authenticated as the manifests' own
/// ServiceAccount (so their RBAC is all it gets), watching the shipped ConfigMap and keeping the
/// caBundle of the shipped configuration itself. Returns once the API server's copy of that
/// configuration trusts it.
pub fn start_webhook(cp: &ControlPlane, port: u16, bin: &str) -> Process {
    // The manifests' own ServiceAccount: its RBAC is all the webhook gets.
    let kubeconfig = cp.service_account_kubeconfig("istio-vault-webhook", "istio-vault-webhook");
    let admin_port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--config-map",
        "istio-vault-webhook/istio-vault-webhook",
        "--tls-self-signed",
        "--webhook-config",
        "istio-vault-webhook",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin-listen",
        &format!("127.0.0.1:{admin_port}"),
    ])
    .env("KUBECONFIG", &kubeconfig)
    .env("RUST_LOG", "info")
    .env_remove("KUBERNETES_SERVICE_HOST");
    let mut webhook = Process::spawn("istio-vault-webhook", cmd, &cp.dir);
    wait_for_port(addr(port), &mut webhook, READY);
    // Ready = config loaded and caBundle published; wait for the API server's view of it.
    let deadline = Instant::now() + READY;
    loop {
        let mwc = cp.get_json(&["mutatingwebhookconfiguration", "istio-vault-webhook"]);
        if mwc["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .is_some_and(|b| !b.is_empty())
        {
            break;
        }
        webhook.assert_running();
        assert!(
            Instant::now() < deadline,
            "no caBundle written:\n{}",
            webhook.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    webhook
}
