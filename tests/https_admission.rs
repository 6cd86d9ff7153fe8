//! The webhook over real HTTPS, driven the way kube-apiserver drives it
//! (docs/design.md: the rules of the patch and the API server's facts).
//!
//! Every test starts its own `serve` on ephemeral loopback ports with a
//! self-signed certificate and a `--config` file, and talks to it with the
//! API-server-like client of `support/client.rs`: the certificate is verified
//! for `istio-vault-webhook.istio-vault-webhook.svc` against the generated CA
//! only, ALPN offers `http/1.1` only, and one keep-alive connection carries
//! the requests. Patches are decoded from base64 and applied with RFC 6902
//! semantics to the Pod fixtures of `tests/fixtures/pods/` (Pods as the API
//! server sends them, built from the upstream Istio charts).
//!
//! The config is the embedded example (`src/example-config.yaml`) plus an
//! `egressgateway` profile, so both gateway charts have a profile. The
//! expected annotations are written out below from docs/design.md and the README's
//! "Configuration reference", not taken from
//! the crate, so a drift in the config compiler shows up here.

// Public so that helpers this file does not call are not dead code: each
// test file takes only the support modules it uses.
pub mod support {
    pub mod client;
    pub mod review;
}

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::client::{
    EXAMPLE_CONFIG, H1, MUTATE, SERVICE_DNS, TestServer, annotations, chunked, content_type, full,
    is_one_line, tls_config, tls_config_versions, tls_connect, validate_annotations,
};
use support::review::{ReviewSpec, Verdict, pod_create};

// ---------------------------------------------------------------------------
// What the spec says the result is
// ---------------------------------------------------------------------------

const EGRESS_PROFILE: &str = "
    - name: egressgateway
      match: { istio: egressgateway }
      role: istio-egressgateway
      secretPath: kubernetes-cluster1-secrets/egressgateway/certs
      rotation: sidecar
      files: { tls.crt: tls_crt, tls.key: tls_key, ca.crt: ca_crt }
";

/// The example config with an egress gateway profile appended.
fn test_config() -> String {
    assert!(
        EXAMPLE_CONFIG.trim_end().ends_with("ca.crt: ca_crt }"),
        "src/example-config.yaml no longer ends with the ingressgateway profile; \
         update EGRESS_PROFILE in this test"
    );
    format!("{}{EGRESS_PROFILE}", EXAMPLE_CONFIG.trim_end())
}

/// The `istio-vault-webhook/config-hash` value the server must write: the
/// crate's canonical hash of the config file, in the shape the README documents (`sha256:` + 16 hex).
fn config_hash(config: &str) -> String {
    let hash = istio_vault_webhook::config::Config::parse(config)
        .expect("test config is valid")
        .hash;
    let hex = hash
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("config hash {hash:?} must start with sha256:"));
    assert!(
        hex.len() == 16
            && hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
        "config hash {hash:?} must be sha256: + 16 lower-case hex digits"
    );
    hash
}

const SECRET_VOLUME_PATH: &str = "/vault/secrets";
const V: &str = "vault.hashicorp.com/";

/// Annotations the webhook owns that the example config wants absent
/// (rotation sidecar, default volume path, no address/namespace/CA/TLS
/// secret, no render interval).
const OWNED_ABSENT: [&str; 7] = [
    "vault.hashicorp.com/agent-pre-populate-only",
    "vault.hashicorp.com/secret-volume-path",
    "vault.hashicorp.com/service",
    "vault.hashicorp.com/namespace",
    "vault.hashicorp.com/ca-cert",
    "vault.hashicorp.com/tls-secret",
    "vault.hashicorp.com/template-static-secret-render-interval",
];

#[derive(Debug, Clone, Copy)]
struct Profile {
    name: &'static str,
    role: &'static str,
    secret_path: &'static str,
    files: &'static [(&'static str, &'static str)],
    /// The container that gets ROOT_CA_DIR (istiod only).
    container: Option<&'static str>,
}

const ISTIOD: Profile = Profile {
    name: "istiod",
    role: "istiod",
    secret_path: "kubernetes-cluster1-secrets/istiod-service/certs",
    files: &[
        ("ca-key.pem", "ca_key"),
        ("ca-cert.pem", "ca_cert"),
        ("root-cert.pem", "root_cert"),
        ("cert-chain.pem", "cert_chain"),
    ],
    container: Some("discovery"),
};

const GATEWAY_FILES: &[(&str, &str)] = &[
    ("tls.crt", "tls_crt"),
    ("tls.key", "tls_key"),
    ("ca.crt", "ca_crt"),
];

const INGRESS: Profile = Profile {
    name: "ingressgateway",
    role: "istio-ingressgateway",
    secret_path: "kubernetes-cluster1-secrets/ingressgateway/certs",
    files: GATEWAY_FILES,
    container: None,
};

const EGRESS: Profile = Profile {
    name: "egressgateway",
    role: "istio-egressgateway",
    secret_path: "kubernetes-cluster1-secrets/egressgateway/certs",
    files: GATEWAY_FILES,
    container: None,
};

/// The exact annotations docs/design.md lists for `profile` (KV v1 templates).
fn owned_annotations(profile: &Profile, hash: &str) -> BTreeMap<String, String> {
    let mut want = BTreeMap::new();
    let mut set = |k: String, v: String| {
        want.insert(k, v);
    };
    set(format!("{V}agent-inject"), "true".into());
    set(format!("{V}agent-init-first"), "true".into());
    set(format!("{V}role"), profile.role.into());
    set(format!("{V}auth-path"), "auth/kubernetes-cluster1".into());
    for (file, key) in profile.files {
        set(
            format!("{V}agent-inject-secret-{file}"),
            profile.secret_path.into(),
        );
        set(
            format!("{V}agent-inject-template-{file}"),
            format!(
                "{{{{- with secret \"{}\" -}}}}{{{{ .Data.{key} }}}}{{{{- end -}}}}",
                profile.secret_path
            ),
        );
        set(format!("{V}error-on-missing-key-{file}"), "true".into());
    }
    set("istio-vault-webhook/profile".into(), profile.name.into());
    set("istio-vault-webhook/config-hash".into(), hash.into());
    want
}

/// `env` after the webhook: the first ROOT_CA_DIR replaced in place by
/// `{name, value: /vault/secrets}`, further ones dropped, appended when
/// absent, every other entry kept in order.
fn expected_env(env: Option<&Value>) -> Value {
    let entry = json!({"name": "ROOT_CA_DIR", "value": SECRET_VOLUME_PATH});
    let mut out = Vec::new();
    let mut seen = false;
    for e in env.and_then(Value::as_array).into_iter().flatten() {
        if e["name"] == "ROOT_CA_DIR" {
            if !seen {
                out.push(entry.clone());
                seen = true;
            }
        } else {
            out.push(e.clone());
        }
    }
    if !seen {
        out.push(entry);
    }
    Value::Array(out)
}

/// The whole Pod as docs/design.md says it must be after the patch: annotations the
/// webhook does not own untouched, owned-but-unwanted ones gone, the profile's
/// set exactly, ROOT_CA_DIR on the istiod container, nothing else changed.
fn expected_pod(original: &Value, profile: &Profile, hash: &str) -> Value {
    let mut pod = original.clone();
    let mut ann = annotations(original);
    for k in OWNED_ABSENT {
        ann.remove(k);
    }
    ann.extend(owned_annotations(profile, hash));
    pod["metadata"]["annotations"] = json!(ann);
    if let Some(name) = profile.container {
        let containers = pod["spec"]["containers"].as_array_mut().unwrap();
        let c = containers
            .iter_mut()
            .find(|c| c["name"] == name)
            .expect("fixture has the istiod container");
        let env = expected_env(c.get("env"));
        c["env"] = env;
    }
    pod
}

/// What the warnings must name: every vault annotation whose value the config
/// overrides or removes, and ROOT_CA_DIR when it had another value.
fn expected_warning_subjects(original: &Value, profile: &Profile, hash: &str) -> Vec<String> {
    let have = annotations(original);
    let mut subjects = Vec::new();
    for (k, v) in owned_annotations(profile, hash) {
        if k.starts_with(V) && have.get(&k).is_some_and(|h| *h != v) {
            subjects.push(k);
        }
    }
    for k in OWNED_ABSENT {
        if have.contains_key(k) {
            subjects.push(k.to_owned());
        }
    }
    if let Some(name) = profile.container {
        let c = original["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        let preset = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["name"] == "ROOT_CA_DIR")
            .collect::<Vec<_>>();
        if preset.len() > 1
            || preset
                .first()
                .is_some_and(|e| e.get("valueFrom").is_some() || e["value"] != SECRET_VOLUME_PATH)
        {
            subjects.push("ROOT_CA_DIR".into());
        }
    }
    subjects
}

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/pods/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"));
    let pod: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {path} is not JSON: {e}"));
    assert_eq!(pod["kind"], "Pod", "fixture {name} is not a Pod");
    pod
}

/// Short JSON diff for failure messages: the top-level paths that differ.
fn diff(got: &Value, want: &Value, path: &str, out: &mut Vec<String>) {
    match (got, want) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = format!("{path}/{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(x, y, &p, out),
                    (x, y) => out.push(format!("{p}: got {x:?}, want {y:?}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(x, y, &format!("{path}/{i}"), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: got {a}, want {b}")),
        _ => {}
    }
}

#[track_caller]
fn assert_json_eq(got: &Value, want: &Value, what: &str) {
    let mut d = Vec::new();
    diff(got, want, "", &mut d);
    assert!(
        d.is_empty(),
        "{what}: the patched Pod differs from docs/design.md:\n  {}",
        d.join("\n  ")
    );
}

#[track_caller]
fn assert_warnings_short(v: &Verdict, what: &str) {
    for w in &v.warnings {
        assert!(
            w.chars().count() < 120,
            "{what}: warning longer than the API server keeps (120): {w:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// The fixture checks
// ---------------------------------------------------------------------------

/// A Pod CREATE for a fixture that a profile patches: the patched Pod is
/// exactly the result docs/design.md specifies, warnings name every override (and only exist
/// when something is overridden), a dryRun review gets the same answer, the
/// annotations pass the API server's validation, and re-sending the patched
/// Pod yields no patch at all.
async fn assert_patched(name: &str, pod: Value, profile: Profile) {
    let config = test_config();
    let hash = config_hash(&config);
    let server = TestServer::start(&config).await;
    let mut conn = server.h1().await;

    let review = pod_create(&pod);
    let verdict = conn.review(&review).await;
    assert!(
        verdict.allowed,
        "{name}: expected allowed, got {}",
        verdict.raw
    );
    assert!(
        verdict.patch.is_some(),
        "{name}: expected a JSONPatch, got {}",
        verdict.raw
    );
    let patched = verdict
        .apply(&pod)
        .unwrap_or_else(|e| panic!("{name}: patch does not apply (API server would 500): {e}"));
    assert_json_eq(&patched, &expected_pod(&pod, &profile, &hash), name);
    validate_annotations(&patched)
        .unwrap_or_else(|e| panic!("{name}: API server would reject the patched Pod: {e}"));
    assert!(
        !annotations(&patched).contains_key("vault.hashicorp.com/agent-inject-status"),
        "{name}: the webhook must never set agent-inject-status"
    );

    // Warnings: each override named, none when nothing was overridden.
    let subjects = expected_warning_subjects(&pod, &profile, &hash);
    for s in &subjects {
        assert!(
            verdict.warnings.iter().any(|w| w.contains(s.as_str())),
            "{name}: no warning names the overridden {s}; warnings: {:?}",
            verdict.warnings
        );
    }
    if subjects.is_empty() {
        assert!(
            verdict.warnings.is_empty(),
            "{name}: nothing was overridden but got warnings {:?}",
            verdict.warnings
        );
    }
    assert_warnings_short(&verdict, name);

    // dryRun: exactly the same answer.
    let dry = ReviewSpec::pod_create(&pod).dry_run(true);
    let dry_verdict = conn.review(&dry.to_json()).await;
    assert_eq!(
        (
            &dry_verdict.patch_b64,
            &dry_verdict.warnings,
            dry_verdict.allowed
        ),
        (&verdict.patch_b64, &verdict.warnings, verdict.allowed),
        "{name}: dryRun must behave exactly like a real request"
    );

    // Idempotence over the wire: the webhook's own output needs no patch.
    let again = conn.review(&pod_create(&patched)).await;
    again.assert_allowed_unpatched(&format!("{name} (re-sent after the patch)"));
    assert!(
        again.warnings.is_empty(),
        "{name}: re-sending the patched Pod warns: {:?}",
        again.warnings
    );
    assert!(
        !conn.is_closed(),
        "{name}: the server closed the keep-alive connection"
    );
}

async fn assert_fixture_patched(name: &str, profile: Profile) {
    assert_patched(name, fixture(name), profile).await;
}

fn discovery_env(pod: &Value) -> Vec<Value> {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "discovery")
        .and_then(|c| c["env"].as_array())
        .cloned()
        .unwrap_or_default()
}

/// The facts the user cares about, checked in so many words on top of the
/// whole-Pod comparison.
async fn assert_istiod_basics(name: &str) {
    let pod = fixture(name);
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    let verdict = conn.review(&pod_create(&pod)).await;
    let patched = verdict.apply(&pod).expect("patch applies");
    let env = discovery_env(&patched);
    let root: Vec<&Value> = env.iter().filter(|e| e["name"] == "ROOT_CA_DIR").collect();
    assert_eq!(
        root,
        [&json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"})],
        "{name}: discovery must end with exactly one ROOT_CA_DIR=/vault/secrets"
    );
    let others = |env: &[Value]| -> Vec<Value> {
        env.iter()
            .filter(|e| e["name"] != "ROOT_CA_DIR")
            .cloned()
            .collect()
    };
    assert_eq!(
        others(&env),
        others(&discovery_env(&pod)),
        "{name}: the other env entries and their order must be kept"
    );
    let ann = annotations(&patched);
    for (k, v) in annotations(&pod) {
        if !k.starts_with(V) && !k.starts_with("istio-vault-webhook/") {
            assert_eq!(
                ann.get(&k),
                Some(&v),
                "{name}: unrelated annotation {k} changed"
            );
        }
    }
    assert_eq!(ann[&format!("{V}agent-inject")], "true");
    assert_eq!(ann[&format!("{V}role")], "istiod");
    assert_eq!(ann["istio-vault-webhook/profile"], "istiod");
}

#[tokio::test]
async fn istiod_default_revision_gets_the_vault_ca() {
    assert_fixture_patched("istiod", ISTIOD).await;
    assert_istiod_basics("istiod").await;
}

#[tokio::test]
async fn istiod_canary_revision_gets_the_vault_ca() {
    let pod = fixture("istiod-canary");
    assert_eq!(pod["metadata"]["labels"]["istio.io/rev"], "canary");
    assert_patched("istiod-canary", pod, ISTIOD).await;
    assert_istiod_basics("istiod-canary").await;
}

#[tokio::test]
async fn istiod_preset_root_ca_dir_is_replaced_in_place_with_a_warning() {
    let pod = fixture("istiod-preset-rootcadir");
    let before = discovery_env(&pod);
    let at = before
        .iter()
        .position(|e| e["name"] == "ROOT_CA_DIR")
        .expect("fixture presets ROOT_CA_DIR");
    assert_ne!(before[at]["value"], SECRET_VOLUME_PATH);
    assert_fixture_patched("istiod-preset-rootcadir", ISTIOD).await;
    assert_istiod_basics("istiod-preset-rootcadir").await;
}

#[tokio::test]
async fn istiod_valuefrom_root_ca_dir_is_replaced_with_a_warning() {
    let pod = fixture("istiod-valuefrom-rootcadir");
    assert!(
        discovery_env(&pod)
            .iter()
            .any(|e| e["name"] == "ROOT_CA_DIR" && e.get("valueFrom").is_some()),
        "fixture must set ROOT_CA_DIR through valueFrom"
    );
    assert_fixture_patched("istiod-valuefrom-rootcadir", ISTIOD).await;
    assert_istiod_basics("istiod-valuefrom-rootcadir").await;
}

#[tokio::test]
async fn istiod_without_annotations_gets_the_whole_map_in_one_add() {
    let pod = fixture("istiod-no-annotations");
    assert!(pod["metadata"].get("annotations").is_none());
    assert_fixture_patched("istiod-no-annotations", ISTIOD).await;
    assert_istiod_basics("istiod-no-annotations").await;
}

#[tokio::test]
async fn istiod_without_env_gets_an_env_list() {
    let pod = fixture("istiod-no-env");
    assert!(discovery_env(&pod).is_empty());
    assert_fixture_patched("istiod-no-env", ISTIOD).await;
    assert_istiod_basics("istiod-no-env").await;
}

#[tokio::test]
async fn istiod_conflicting_annotations_are_overridden_with_warnings() {
    let pod = fixture("istiod-conflicting-annotations");
    let subjects = expected_warning_subjects(&pod, &ISTIOD, &config_hash(&test_config()));
    assert!(
        !subjects.is_empty(),
        "fixture istiod-conflicting-annotations has no conflicting vault annotation"
    );
    assert_fixture_patched("istiod-conflicting-annotations", ISTIOD).await;
    assert_istiod_basics("istiod-conflicting-annotations").await;
}

#[tokio::test]
async fn istiod_already_injected_is_left_unchanged_with_a_warning() {
    let pod = fixture("istiod-already-injected");
    assert_eq!(
        annotations(&pod)["vault.hashicorp.com/agent-inject-status"],
        "injected"
    );
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    let v = conn.review(&pod_create(&pod)).await;
    v.assert_allowed_unpatched("istiod-already-injected");
    assert!(
        v.warnings.iter().any(|w| w.contains("injected")),
        "istiod-already-injected: expected a warning saying the Pod is already injected, got {:?}",
        v.warnings
    );
    assert_warnings_short(&v, "istiod-already-injected");
}

#[tokio::test]
async fn istiod_renamed_container_is_denied_naming_the_container() {
    let pod = fixture("istiod-renamed-container");
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    for dry_run in [false, true] {
        let review = ReviewSpec::pod_create(&pod).dry_run(dry_run).to_json();
        let v = conn.review(&review).await;
        assert!(
            !v.allowed,
            "renamed container must be denied, got {}",
            v.raw
        );
        let message = v.message.clone().unwrap_or_default();
        assert!(
            message.contains("\"discovery\"") && message.contains("pilot"),
            "the denial must name the missing container (discovery) and the Pod's containers \
             (pilot); got {message:?}"
        );
        assert!(
            message.contains("profiles.istiod.container"),
            "the denial must say how to fix it (profiles.istiod.container); got {message:?}"
        );
        assert_eq!(v.status_code, Some(403), "denial status code: {}", v.raw);
    }
}

/// A gateway Pod gets its profile's annotations and no container change.
async fn assert_gateway(name: &str, profile: Profile) {
    let pod = fixture(name);
    assert_fixture_patched(name, profile).await;
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    let v = conn.review(&pod_create(&pod)).await;
    let patched = v.apply(&pod).unwrap();
    assert_eq!(
        patched["spec"], pod["spec"],
        "{name}: a gateway Pod's spec (containers, env) must not change"
    );
    for op in v.patch.as_deref().unwrap_or_default() {
        assert!(
            op.path().starts_with("/metadata/annotations"),
            "{name}: gateway patch touches {}",
            op.path()
        );
    }
    assert_eq!(
        annotations(&patched)["istio-vault-webhook/profile"],
        profile.name
    );
}

#[tokio::test]
async fn ingressgateway_gets_annotations_but_no_env() {
    assert_gateway("ingressgateway", INGRESS).await;
}

#[tokio::test]
async fn legacy_ingressgateway_gets_annotations_but_no_env() {
    assert_gateway("legacy-ingressgateway", INGRESS).await;
}

#[tokio::test]
async fn egressgateway_gets_annotations_but_no_env() {
    assert_gateway("egressgateway", EGRESS).await;
}

#[tokio::test]
async fn unrelated_pod_gets_no_patch() {
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    for dry_run in [false, true] {
        let review = ReviewSpec::pod_create(&fixture("unrelated"))
            .dry_run(dry_run)
            .to_json();
        let v = conn.review(&review).await;
        v.assert_allowed_unpatched("unrelated");
        assert!(
            v.warnings.is_empty(),
            "unrelated: warnings {:?}",
            v.warnings
        );
    }
}

#[tokio::test]
async fn egressgateway_without_a_profile_gets_no_patch() {
    // With the example config as shipped (no egress profile) the egress
    // gateway is just another Pod.
    let server = TestServer::start(EXAMPLE_CONFIG).await;
    let mut conn = server.h1().await;
    conn.review(&pod_create(&fixture("egressgateway")))
        .await
        .assert_allowed_unpatched("egressgateway with the example config");
}

#[tokio::test]
async fn pod_matching_two_profiles_is_denied_naming_both() {
    let mut pod = fixture("istiod");
    pod["metadata"]["labels"]["istio"] = json!("ingressgateway");
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    let v = conn.review(&pod_create(&pod)).await;
    assert!(!v.allowed, "ambiguous Pod must be denied: {}", v.raw);
    let message = v.message.unwrap_or_default();
    assert!(
        message.contains("istiod") && message.contains("ingressgateway"),
        "the denial must name both profiles: {message:?}"
    );
}

// ---------------------------------------------------------------------------
// Other requests the API server sends
// ---------------------------------------------------------------------------

#[tokio::test]
async fn update_and_delete_are_allowed_without_patch() {
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    let pod = fixture("istiod");
    for dry_run in [false, true] {
        let mut update = ReviewSpec::pod_create(&pod)
            .operation("UPDATE")
            .dry_run(dry_run);
        update.name = Some("istiod-7687b8b697-abcde".into());
        update.old_object = Some(pod.clone());
        conn.review(&update.to_json())
            .await
            .assert_allowed_unpatched("Pod UPDATE");

        let mut delete = ReviewSpec::pod_create(&pod)
            .operation("DELETE")
            .dry_run(dry_run);
        delete.name = Some("istiod-7687b8b697-abcde".into());
        delete.object = None;
        delete.old_object = Some(pod.clone());
        conn.review(&delete.to_json())
            .await
            .assert_allowed_unpatched("Pod DELETE");
    }
}

#[tokio::test]
async fn deployment_and_subresource_reviews_are_allowed_without_patch() {
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    // The upstream istiod Deployment (helm template output), as JSON.
    let path = format!(
        "{}/tests/fixtures/workloads/istiod-deployment.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let yaml = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let deployment: Value =
        serde_yaml_ng::from_str(&yaml).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["app"], "istiod",
        "the Deployment's Pod template is an istiod Pod (the webhook would patch it as a Pod)"
    );
    let mut review = ReviewSpec::pod_create(&deployment);
    review.kind = ("apps", "v1", "Deployment");
    review.resource = ("apps", "v1", "deployments");
    review.name = Some("istiod".into());
    conn.review(&review.to_json())
        .await
        .assert_allowed_unpatched("Deployment CREATE");

    // pods/eviction CREATE: a Pod subresource, not a Pod.
    let mut eviction = ReviewSpec::pod_create(&json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "istiod-7687b8b697-abcde", "namespace": "istio-system"}
    }));
    eviction.kind = ("policy", "v1", "Eviction");
    eviction.sub_resource = Some("eviction");
    eviction.name = Some("istiod-7687b8b697-abcde".into());
    conn.review(&eviction.to_json())
        .await
        .assert_allowed_unpatched("pods/eviction CREATE");
}

#[tokio::test]
async fn dry_run_reviews_get_the_same_answers() {
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    for name in [
        "istiod",
        "istiod-conflicting-annotations",
        "istiod-already-injected",
        "istiod-renamed-container",
        "ingressgateway",
        "unrelated",
    ] {
        let pod = fixture(name);
        let real = conn.review(&pod_create(&pod)).await;
        let dry = conn
            .review(&ReviewSpec::pod_create(&pod).dry_run(true).to_json())
            .await;
        let strip = |v: &Verdict| {
            let mut r = v.raw["response"].clone();
            r.as_object_mut().unwrap().remove("uid");
            r
        };
        assert_eq!(strip(&dry), strip(&real), "{name}: dryRun answer differs");
    }
}

// ---------------------------------------------------------------------------
// TLS and HTTP
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tls_certificate_verifies_for_the_service_name_against_the_ca_only() {
    let server = TestServer::start(&test_config()).await;

    // The API server's view: caBundle = the CA, name = <svc>.<ns>.svc.
    let conn = server.h1().await;
    assert_eq!(
        conn.tls.alpn.as_deref(),
        Some(&b"http/1.1"[..]),
        "ALPN must settle on http/1.1 when the client offers only that"
    );
    assert!(conn.tls.peer_chain_len >= 1, "server sent no certificate");
    drop(conn);

    // Also the short service names the certificate is expected to carry.
    for name in [
        SERVICE_DNS,
        "istio-vault-webhook.istio-vault-webhook.svc.cluster.local",
        "localhost",
    ] {
        tls_connect(
            server.https,
            tls_config(&server.ca_pem, &[b"http/1.1"]),
            name,
        )
        .await
        .unwrap_or_else(|e| panic!("certificate must verify for {name}: {e}"));
    }

    // Another name: refused by verification.
    let err = tls_connect(
        server.https,
        tls_config(&server.ca_pem, &[b"http/1.1"]),
        "istio-vault-webhook.other-namespace.svc",
    )
    .await
    .expect_err("certificate must not verify for another namespace's service");
    assert!(
        err.to_string().contains("NotValidForName") || err.to_string().contains("not valid"),
        "expected a name mismatch, got {err}"
    );

    // Another CA (a different caBundle): refused.
    let other = rcgen::generate_simple_self_signed(vec![SERVICE_DNS.to_owned()]).unwrap();
    let err = tls_connect(
        server.https,
        tls_config(&other.cert.pem(), &[b"http/1.1"]),
        SERVICE_DNS,
    )
    .await
    .expect_err("certificate must not verify against an unrelated CA");
    assert!(
        err.to_string().contains("UnknownIssuer") || err.to_string().contains("invalid peer"),
        "expected an unknown-issuer error, got {err}"
    );
}

#[tokio::test]
async fn tls12_and_tls13_clients_are_served() {
    let server = TestServer::start(&test_config()).await;
    for (versions, want) in [
        (
            &[&rustls::version::TLS12][..],
            rustls::ProtocolVersion::TLSv1_2,
        ),
        (
            &[&rustls::version::TLS13][..],
            rustls::ProtocolVersion::TLSv1_3,
        ),
    ] {
        let config = tls_config_versions(&server.ca_pem, &[b"http/1.1"], versions);
        let tls = tls_connect(server.https, config, SERVICE_DNS)
            .await
            .unwrap_or_else(|e| panic!("{want:?} handshake failed: {e}"));
        assert_eq!(tls.get_ref().1.protocol_version(), Some(want));
        let mut conn = H1::over(tls).await.unwrap();
        let pod = fixture("istiod");
        let v = conn.review(&pod_create(&pod)).await;
        assert!(v.patch.is_some(), "{want:?}: no patch");
    }
}

#[tokio::test]
async fn keep_alive_connection_carries_many_reviews() {
    const REQUESTS: usize = 300;
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    let pods = [
        ("istiod", fixture("istiod")),
        ("ingressgateway", fixture("ingressgateway")),
        ("unrelated", fixture("unrelated")),
        (
            "istiod-renamed-container",
            fixture("istiod-renamed-container"),
        ),
    ];
    for i in 0..REQUESTS {
        let (name, pod) = &pods[i % pods.len()];
        let review = pod_create(pod);
        let uid = review["request"]["uid"].as_str().unwrap().to_owned();
        let reply = conn
            .post(serde_json::to_vec(&review).unwrap())
            .await
            .unwrap_or_else(|e| panic!("request {i} ({name}) on the kept-alive connection: {e}"));
        assert!(
            !reply
                .headers
                .get(hyper::header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close")),
            "request {i}: server asked to close the connection"
        );
        assert!(
            reply.headers.get(hyper::header::RETRY_AFTER).is_none(),
            "never answer with Retry-After"
        );
        assert_eq!(content_type(&reply), "application/json");
        let v = reply.verdict(&uid);
        match *name {
            "istiod" | "ingressgateway" => {
                v.apply(pod).expect("patch applies");
                assert!(v.patch.is_some(), "request {i} ({name}): no patch");
            }
            "unrelated" => v.assert_allowed_unpatched(name),
            _ => assert!(!v.allowed, "request {i} ({name}) must be denied"),
        }
    }
    assert_eq!(conn.answered, REQUESTS);
    assert!(
        !conn.is_closed(),
        "connection closed after {REQUESTS} requests"
    );
}

#[tokio::test]
async fn h2_via_alpn_serves_concurrent_streams() {
    let server = TestServer::start(&test_config()).await;
    let conn = server.h2().await;
    assert_eq!(
        conn.tls.alpn.as_deref(),
        Some(&b"h2"[..]),
        "the server must offer h2 through ALPN"
    );
    let pod = fixture("istiod");
    let hash = config_hash(&test_config());
    let want = expected_pod(&pod, &ISTIOD, &hash);
    let results = futures_join(
        (0..64)
            .map(|_| {
                let review = pod_create(&pod);
                let conn = &conn;
                async move { conn.review(&review).await }
            })
            .collect(),
    )
    .await;
    for (i, v) in results.into_iter().enumerate() {
        let patched = v
            .apply(&pod)
            .unwrap_or_else(|e| panic!("h2 stream {i}: {e}"));
        assert_json_eq(&patched, &want, &format!("h2 stream {i}"));
    }
    let reply = conn
        .send(Method::GET, "/mutate", full(Vec::new()))
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "h2 GET /mutate"
    );
}

/// Runs futures concurrently on this task (no extra dependency).
async fn futures_join<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let set = futures.into_iter().map(|f| Box::pin(f)).collect::<Vec<_>>();
    let mut outputs: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    let mut set: Vec<Option<_>> = set.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, out) in set.iter_mut().zip(outputs.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn other_paths_are_404_and_get_mutate_is_405() {
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    let body = serde_json::to_vec(&pod_create(&fixture("istiod"))).unwrap();
    for path in [
        "/",
        "/mutate/",
        "/validate",
        "/healthz",
        "/metrics",
        "/mutatex",
    ] {
        let reply = conn
            .send(Method::POST, path, full(body.clone()))
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "POST {path}");
    }
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let reply = conn
            .send(method.clone(), MUTATE, full(Vec::new()))
            .await
            .unwrap_or_else(|e| panic!("{method} {MUTATE}: {e}"));
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {MUTATE}"
        );
    }
    // The connection survives all of that.
    let v = conn.review(&pod_create(&fixture("istiod"))).await;
    assert!(v.patch.is_some());
}

/// An istiod review padded to `size` bytes with a long container arg.
fn padded_review(size: usize) -> Vec<u8> {
    let mut pod = fixture("istiod");
    pod["spec"]["containers"][0]["args"]
        .as_array_mut()
        .unwrap()
        .push(json!(""));
    let base = serde_json::to_vec(&pod_create(&pod)).unwrap().len();
    let pad = size.checked_sub(base).expect("size above the base review");
    let args = pod["spec"]["containers"][0]["args"].as_array_mut().unwrap();
    *args.last_mut().unwrap() = json!("x".repeat(pad));
    let body = serde_json::to_vec(&pod_create(&pod)).unwrap();
    assert_eq!(body.len(), size);
    body
}

#[tokio::test]
async fn bodies_over_7_mib_are_413_and_below_are_served() {
    const LIMIT: usize = 7 * 1024 * 1024;
    let server = TestServer::start(&test_config()).await;

    // Exactly at the limit: a normal answer, with a patch that applies.
    let mut conn = server.h1().await;
    let body = padded_review(LIMIT);
    let review: Value = serde_json::from_slice(&body).unwrap();
    let reply = conn.post(body).await.expect("7 MiB body answered");
    let v = reply.verdict(review["request"]["uid"].as_str().unwrap());
    v.apply(&review["request"]["object"])
        .expect("patch of a 7 MiB review applies");
    assert!(v.patch.is_some());

    // One byte more, with Content-Length.
    let mut conn = server.h1().await;
    let reply = conn
        .post(padded_review(LIMIT + 1))
        .await
        .expect("a 7 MiB + 1 body must be answered, not dropped");
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "7 MiB + 1 byte: {}",
        reply.text()
    );

    // Chunked, no length announced: 8 MiB.
    let mut conn = server.h1().await;
    let reply = conn
        .send(
            Method::POST,
            MUTATE,
            chunked(8 * 1024 * 1024, 64 * 1024, b' '),
        )
        .await
        .expect("a chunked 8 MiB body must be answered, not dropped");
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "chunked 8 MiB: {}",
        reply.text()
    );

    // The server is fine afterwards.
    let mut conn = server.h1().await;
    assert!(
        conn.review(&pod_create(&fixture("istiod")))
            .await
            .patch
            .is_some()
    );
}

#[tokio::test]
async fn malformed_bodies_are_400_with_a_one_line_reason() {
    let server = TestServer::start(&test_config()).await;
    let mut conn = server.h1().await;
    let good = pod_create(&fixture("istiod"));
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", Vec::new()),
        ("not JSON", b"hello".to_vec()),
        (
            "truncated JSON",
            serde_json::to_vec(&good).unwrap()[..200].to_vec(),
        ),
        ("JSON array", b"[]".to_vec()),
        ("JSON null", b"null".to_vec()),
        ("JSON string", b"\"AdmissionReview\"".to_vec()),
        ("empty object", b"{}".to_vec()),
        (
            "v1beta1 review",
            with(&|v| v["apiVersion"] = json!("admission.k8s.io/v1beta1")),
        ),
        (
            "wrong kind",
            with(&|v| v["kind"] = json!("AdmissionResponse")),
        ),
        (
            "no request",
            with(&|v| {
                v.as_object_mut().unwrap().remove("request");
            }),
        ),
        ("request null", with(&|v| v["request"] = Value::Null)),
        ("request is a string", with(&|v| v["request"] = json!("x"))),
        (
            "no uid",
            with(&|v| {
                v["request"].as_object_mut().unwrap().remove("uid");
            }),
        ),
        ("uid is a number", with(&|v| v["request"]["uid"] = json!(7))),
        (
            "kind is a string",
            with(&|v| v["request"]["kind"] = json!("Pod")),
        ),
        (
            "no operation",
            with(&|v| {
                v["request"].as_object_mut().unwrap().remove("operation");
            }),
        ),
        (
            "Pod CREATE without object",
            with(&|v| {
                v["request"].as_object_mut().unwrap().remove("object");
            }),
        ),
        (
            "object is an array",
            with(&|v| v["request"]["object"] = json!([1, 2])),
        ),
        (
            "labels are a list",
            with(&|v| v["request"]["object"]["metadata"]["labels"] = json!(["app"])),
        ),
        (
            "label value is a number",
            with(&|v| v["request"]["object"]["metadata"]["labels"]["app"] = json!(1)),
        ),
        (
            "containers is an object",
            with(&|v| v["request"]["object"]["spec"]["containers"] = json!({})),
        ),
        (
            "env value is a bool",
            with(&|v| {
                v["request"]["object"]["spec"]["containers"][0]["env"][0]["value"] = json!(true)
            }),
        ),
        (
            "dryRun is a string",
            with(&|v| v["request"]["dryRun"] = json!("yes")),
        ),
        ("trailing garbage", {
            let mut b = serde_json::to_vec(&good).unwrap();
            b.extend_from_slice(b"}}");
            b
        }),
        ("invalid UTF-8 in a string", {
            let mut b = serde_json::to_vec(&good).unwrap();
            let at = b.windows(9).position(|w| w == b"discovery").unwrap();
            b[at] = 0xff;
            b
        }),
        ("10000 nested arrays", {
            let mut b = b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":".to_vec();
            b.extend(std::iter::repeat_n(b'[', 10_000));
            b
        }),
    ];
    for (what, body) in cases {
        let reply = conn
            .post(body)
            .await
            .unwrap_or_else(|e| panic!("{what}: no answer / connection dropped: {e}"));
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{what}: expected 400, got {} {}",
            reply.status,
            reply.text()
        );
        assert!(
            is_one_line(&reply.text()),
            "{what}: the 400 body must be a non-empty single line, got {:?}",
            reply.text()
        );
        assert!(
            reply.text().len() < 1024,
            "{what}: reason is {} bytes",
            reply.text().len()
        );
    }
    assert!(
        !conn.is_closed(),
        "the connection must survive bad requests"
    );
    assert!(conn.review(&good).await.patch.is_some());
}

// ---------------------------------------------------------------------------
// Admin server
// ---------------------------------------------------------------------------

/// `name{labels} value` lines of a Prometheus exposition, labels sorted.
fn samples(text: &str) -> BTreeMap<(String, BTreeSet<String>), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n.to_owned(),
                l.trim_end_matches('}')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            None => (series.to_owned(), BTreeSet::new()),
        };
        if let Ok(v) = value.parse() {
            out.insert((name, labels), v);
        }
    }
    out
}

#[tokio::test]
async fn readyz_and_metrics_count_admissions_by_profile_and_outcome() {
    let server = TestServer::start(&test_config()).await;
    let (status, body) = server.admin_get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "/healthz: {body}");
    let (status, body) = server.admin_get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "/readyz: {body}");
    assert!(
        body.contains("cluster1") && body.contains(&config_hash(&test_config())),
        "/readyz should report the loaded config (cluster, hash): {body}"
    );

    let mut conn = server.h1().await;
    let mut send = async |name: &str, times: usize| {
        for _ in 0..times {
            conn.review(&pod_create(&fixture(name))).await;
        }
    };
    send("istiod", 3).await;
    send("istiod-canary", 1).await;
    send("ingressgateway", 2).await;
    send("egressgateway", 1).await;
    send("unrelated", 2).await;
    send("istiod-renamed-container", 1).await;
    send("istiod-already-injected", 1).await;
    let reply = conn.post(b"{".to_vec()).await.unwrap();
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let (status, text) = server.admin_get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let got = samples(&text);
    let count = |profile: &str, outcome: &str| {
        let labels: BTreeSet<String> = [
            format!("profile=\"{profile}\""),
            format!("outcome=\"{outcome}\""),
        ]
        .into();
        got.get(&("istio_vault_webhook_admissions_total".to_owned(), labels))
            .copied()
    };
    for (profile, outcome, want) in [
        ("istiod", "patched", 4.0),
        ("ingressgateway", "patched", 2.0),
        ("egressgateway", "patched", 1.0),
        ("", "skipped", 2.0),
        ("istiod", "denied", 1.0),
        ("istiod", "unchanged", 1.0),
        ("", "error", 1.0),
    ] {
        assert_eq!(
            count(profile, outcome),
            Some(want),
            "istio_vault_webhook_admissions_total{{profile={profile:?},outcome={outcome:?}}}; \
             metrics:\n{text}"
        );
    }
    let histogram_count = got
        .iter()
        .find(|((n, _), _)| n == "istio_vault_webhook_admission_duration_seconds_count")
        .map(|(_, v)| *v);
    assert_eq!(
        histogram_count,
        Some(12.0),
        "admission latency histogram must count every admission; metrics:\n{text}"
    );
}

#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_and_the_listener() {
    let server = TestServer::start(&test_config()).await;
    let addr = server.https;
    let mut conn = server.h1().await;
    assert!(
        conn.review(&pod_create(&fixture("istiod")))
            .await
            .patch
            .is_some()
    );
    // The connection is now idle; the drain must close it at once instead
    // of waiting for the drain timeout (20 s by default).
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), server.stop())
        .await
        .expect("drain finishes");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown with one idle keep-alive connection took {took:?}: idle connections must be \
         closed by the drain, not waited for"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener must be closed after shutdown"
    );
    let after = conn.post(b"{}".to_vec()).await;
    assert!(
        after.is_err(),
        "the idle connection must be closed by the drain, but it answered {:?}",
        after.map(|r| r.status)
    );
}
