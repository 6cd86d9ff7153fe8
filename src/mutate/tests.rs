//! One test per rule of the patch (docs/design.md), on the pure decision function.

use serde_json::{Map, Value, json};

use super::*;
use crate::config::EXAMPLE_CONFIG;
use crate::render::apply;

fn example() -> Config {
    Config::parse(EXAMPLE_CONFIG).unwrap()
}

fn istiod_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "istiod-5d8f7c9b6-",
            "namespace": "istio-system",
            "labels": {"app": "istiod", "istio.io/rev": "default", "istio": "pilot"},
            "annotations": {"sidecar.istio.io/inject": "false", "example.com/keep": "yes"}
        },
        "spec": {"containers": [{
            "name": "discovery",
            "image": "docker.io/istio/pilot:1.28.0",
            "env": [
                {"name": "REVISION", "value": "default"},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}
            ]
        }]}
    })
}

/// The Pod as the webhook reads it. Leaked: a test's Pods live as long as
/// the test anyway.
fn read_pod(pod: &Value) -> PodView<'static> {
    PodView::parse(String::leak(pod.to_string())).unwrap()
}

fn decide(pod: &Value, config: &Config) -> Decision {
    let view = read_pod(pod);
    mutate(&view, ConfigState::Loaded(config))
}

/// Applies the decision's patch and returns (patched Pod, warnings).
fn patched(pod: &Value, config: &Config) -> (Value, Vec<String>) {
    match decide(pod, config) {
        Decision::Allow { ops, warnings, .. } => {
            let mut out = pod.clone();
            apply(&mut out, &ops).unwrap_or_else(|e| panic!("{e}\nops: {ops:#?}"));
            (out, warnings)
        }
        d => panic!("expected Allow, got {d:?}"),
    }
}

fn ops(d: &Decision) -> Vec<&PatchOp> {
    match d {
        Decision::Allow { ops, .. } => ops.iter().map(Op::patch_op).collect(),
        Decision::Deny { message, .. } => panic!("denied: {message}"),
    }
}

fn annotations(pod: &Value) -> &Map<String, Value> {
    pod["metadata"]["annotations"].as_object().unwrap()
}

fn env(pod: &Value, container: usize) -> &Vec<Value> {
    pod["spec"]["containers"][container]["env"]
        .as_array()
        .unwrap()
}

fn assert_owned_annotations(pod: &Value, profile: &Profile) {
    let have = annotations(pod);
    for a in &profile.annotations {
        assert_eq!(
            have.get(&a.key),
            Some(&Value::String(a.value.clone())),
            "{}",
            a.key
        );
    }
    for a in &profile.absent {
        assert!(!have.contains_key(&a.key), "{} should be absent", a.key);
    }
    assert!(!have.contains_key(keys::INJECT_STATUS));
}

fn assert_idempotent(pod: &Value, config: &Config) {
    let d = decide(pod, config);
    assert!(
        ops(&d).is_empty(),
        "second pass patched again: {:#?}",
        ops(&d)
    );
}

#[test]
fn istiod_gets_annotations_and_root_ca_dir() {
    let c = example();
    let pod = istiod_pod();
    let (out, warnings) = patched(&pod, &c);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_owned_annotations(&out, c.istiod().unwrap());
    assert_eq!(annotations(&out)["example.com/keep"], "yes");
    assert_eq!(annotations(&out)["sidecar.istio.io/inject"], "false");
    assert_eq!(annotations(&out)[keys::PROFILE], "istiod");
    assert_eq!(annotations(&out)[keys::CONFIG_HASH], c.hash.as_str());
    let e = env(&out, 0);
    assert_eq!(e.len(), 3);
    assert_eq!(e[0]["name"], "REVISION");
    assert_eq!(e[1]["name"], "POD_NAME");
    assert_eq!(
        e[2],
        json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"})
    );
    assert_idempotent(&out, &c);
}

#[test]
fn pod_without_annotations_gets_one_add_of_the_whole_map() {
    let c = example();
    let mut pod = istiod_pod();
    pod["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let d = decide(&pod, &c);
    let annotation_ops: Vec<_> = ops(&d)
        .into_iter()
        .filter(|o| o.path().starts_with("/metadata"))
        .collect();
    assert_eq!(annotation_ops.len(), 1);
    assert_eq!(annotation_ops[0].path(), "/metadata/annotations");
    let (out, _) = patched(&pod, &c);
    assert_owned_annotations(&out, c.istiod().unwrap());
    assert_idempotent(&out, &c);
}

#[test]
fn pod_without_metadata_gets_metadata_added() {
    let c = example();
    let view = read_pod(&json!({"spec": {}}));
    // No labels: nothing matches; a template without metadata is still handled.
    assert_eq!(
        mutate(&view, ConfigState::Loaded(&c)).outcome(),
        Outcome::Skipped
    );
}

#[test]
fn annotation_keys_are_escaped_in_pointers() {
    let c = example();
    let d = decide(&istiod_pod(), &c);
    let paths: Vec<&str> = ops(&d).iter().map(|o| o.path()).collect();
    assert!(
        paths.contains(&"/metadata/annotations/vault.hashicorp.com~1role"),
        "{paths:?}"
    );
    assert!(paths.contains(&"/metadata/annotations/istio-vault-webhook~1config-hash"));
    assert!(paths.iter().all(|p| !p.contains("//")));
}

#[test]
fn env_list_is_created_when_absent() {
    let c = example();
    let mut pod = istiod_pod();
    pod["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("env");
    let (out, _) = patched(&pod, &c);
    assert_eq!(
        env(&out, 0),
        &vec![json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"})]
    );
    assert_idempotent(&out, &c);
}

#[test]
fn preset_root_ca_dir_is_replaced_in_place_with_a_warning() {
    let c = example();
    let mut pod = istiod_pod();
    pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .insert(1, json!({"name": "ROOT_CA_DIR", "value": "/etc/cacerts"}));
    let (out, warnings) = patched(&pod, &c);
    let e = env(&out, 0);
    let names: Vec<&str> = e.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["REVISION", "ROOT_CA_DIR", "POD_NAME"]);
    assert_eq!(
        e[1],
        json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"})
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("ROOT_CA_DIR") && w.contains("/etc/cacerts")),
        "{warnings:?}"
    );
    assert_idempotent(&out, &c);
}

#[test]
fn value_from_root_ca_dir_is_replaced() {
    let c = example();
    let mut pod = istiod_pod();
    pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "ROOT_CA_DIR",
            "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}}
        }));
    let (out, warnings) = patched(&pod, &c);
    assert_eq!(
        env(&out, 0)[2],
        json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"})
    );
    assert!(warnings.iter().any(|w| w.contains("valueFrom")));
    assert_idempotent(&out, &c);
}

#[test]
fn duplicate_root_ca_dir_entries_collapse_to_one() {
    let c = example();
    let mut pod = istiod_pod();
    let env_list = pod["spec"]["containers"][0]["env"].as_array_mut().unwrap();
    env_list.insert(0, json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"}));
    env_list.push(json!({"name": "ROOT_CA_DIR", "value": "/a"}));
    env_list.push(json!({"name": "X", "value": "1"}));
    env_list.push(json!({"name": "ROOT_CA_DIR", "value": "/b"}));
    let (out, _) = patched(&pod, &c);
    let names: Vec<&str> = env(&out, 0)
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ROOT_CA_DIR", "REVISION", "POD_NAME", "X"]);
    assert_eq!(env(&out, 0)[0]["value"], "/vault/secrets");
    assert_idempotent(&out, &c);
}

#[test]
fn root_ca_dir_goes_to_the_named_container_only() {
    let c = example();
    let mut pod = istiod_pod();
    let containers = pod["spec"]["containers"].as_array_mut().unwrap();
    containers.insert(
        0,
        json!({"name": "sidecar", "env": [{"name": "A", "value": "1"}]}),
    );
    let (out, _) = patched(&pod, &c);
    assert_eq!(env(&out, 0), &vec![json!({"name": "A", "value": "1"})]);
    assert_eq!(env(&out, 1).last().unwrap()["name"], "ROOT_CA_DIR");
}

#[test]
fn custom_secret_volume_path_is_the_root_ca_dir() {
    let c = Config::parse(
        "cluster: c\nvault: { authPath: auth/k }\nsecretVolumePath: /etc/istio/vault\nprofiles: { istiod: { secretPath: m/p } }\n",
    )
    .unwrap();
    let (out, _) = patched(&istiod_pod(), &c);
    assert_eq!(env(&out, 0)[2]["value"], "/etc/istio/vault");
    assert_eq!(
        annotations(&out)[keys::SECRET_VOLUME_PATH],
        "/etc/istio/vault"
    );
}

#[test]
fn config_wins_over_conflicting_annotations_with_warnings() {
    let c = example();
    let mut pod = istiod_pod();
    let a = pod["metadata"]["annotations"].as_object_mut().unwrap();
    a.insert(keys::ROLE.into(), json!("wrong"));
    a.insert(keys::AUTH_PATH.into(), json!("auth/kubernetes"));
    a.insert(keys::PRE_POPULATE_ONLY.into(), json!("true"));
    a.insert(
        "vault.hashicorp.com/agent-inject-secret-other".into(),
        json!("x/y"),
    );
    let (out, warnings) = patched(&pod, &c);
    assert_owned_annotations(&out, c.istiod().unwrap());
    // Not owned by the webhook: untouched.
    assert_eq!(
        annotations(&out)["vault.hashicorp.com/agent-inject-secret-other"],
        "x/y"
    );
    assert_eq!(annotations(&out)["example.com/keep"], "yes");
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(keys::ROLE) && w.contains("wrong"))
    );
    assert!(warnings.iter().any(|w| w.contains(keys::AUTH_PATH)));
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(keys::PRE_POPULATE_ONLY) && w.contains("removed"))
    );
    assert!(warnings.iter().all(|w| w.len() < 120), "{warnings:?}");
    assert_idempotent(&out, &c);
}

#[test]
fn long_conflicting_values_make_short_warnings() {
    let c = example();
    let mut pod = istiod_pod();
    pod["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .insert(
            "vault.hashicorp.com/agent-inject-template-ca-key.pem".into(),
            json!("é".repeat(500)),
        );
    let (_, warnings) = patched(&pod, &c);
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].len() < 120 && warnings[0].ends_with("..."),
        "{warnings:?}"
    );
}

#[test]
fn already_injected_pods_are_left_alone_with_a_warning() {
    let c = example();
    let mut pod = istiod_pod();
    pod["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .insert(keys::INJECT_STATUS.into(), json!("injected"));
    match decide(&pod, &c) {
        Decision::Allow {
            ops,
            warnings,
            profile,
        } => {
            assert!(ops.is_empty());
            assert_eq!(profile.as_deref(), Some("istiod"));
            assert_eq!(warnings.len(), 1);
            assert!(warnings[0].contains("injected"));
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn istiod_without_its_container_is_denied() {
    let c = example();
    let mut pod = istiod_pod();
    pod["spec"]["containers"][0]["name"] = json!("pilot");
    match decide(&pod, &c) {
        Decision::Deny { message, profile } => {
            assert_eq!(profile.as_deref(), Some("istiod"));
            assert!(message.contains("\"discovery\""), "{message}");
            assert!(message.contains("pilot"), "{message}");
            assert!(message.contains("profiles.istiod.container"), "{message}");
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn istiod_is_denied_when_no_config_is_loaded() {
    let view = read_pod(&istiod_pod());
    let why = "ConfigMap istio-vault-webhook/istio-vault-webhook not found";
    match mutate(&view, ConfigState::Missing { why }) {
        Decision::Deny { message, .. } => {
            assert!(message.contains(why), "{message}");
            assert!(message.contains("self-signed"), "{message}");
        }
        d => panic!("{d:?}"),
    }
    // Anything else passes untouched.
    let mut other = istiod_pod();
    other["metadata"]["labels"] = json!({"app": "web"});
    let view = read_pod(&other);
    assert_eq!(
        mutate(&view, ConfigState::Missing { why }).outcome(),
        Outcome::Skipped
    );
}

#[test]
fn pods_matching_several_profiles_are_denied_naming_them() {
    let c = Config::parse(
        "cluster: c
vault: { authPath: auth/k }
profiles:
  istiod: { secretPath: m/p }
  gateways:
    - { name: canary, match: { istio.io/rev: canary }, role: r, secretPath: m/q, files: { tls.crt: k } }
",
    )
    .unwrap();
    let mut pod = istiod_pod();
    pod["metadata"]["labels"]["istio.io/rev"] = json!("canary");
    match decide(&pod, &c) {
        Decision::Deny { message, .. } => {
            assert!(message.contains("istiod, canary"), "{message}");
        }
        d => panic!("{d:?}"),
    }
}

#[test]
fn gateways_get_annotations_but_no_env() {
    let c = example();
    let pod = json!({
        "metadata": {"labels": {"app": "istio-ingressgateway", "istio": "ingressgateway"}},
        "spec": {"containers": [{"name": "istio-proxy", "env": [{"name": "A", "value": "1"}]}]}
    });
    let (out, _) = patched(&pod, &c);
    assert_eq!(annotations(&out)[keys::PROFILE], "ingressgateway");
    assert_eq!(annotations(&out)[keys::ROLE], "istio-ingressgateway");
    assert_eq!(
        annotations(&out)["vault.hashicorp.com/agent-inject-template-tls.crt"],
        r#"{{- with secret "kubernetes-cluster1-secrets/ingressgateway/certs" -}}{{ .Data.tls_crt }}{{- end -}}"#
    );
    assert_eq!(env(&out, 0), &vec![json!({"name": "A", "value": "1"})]);
    assert_owned_annotations(&out, &c.profiles[1]);
    assert_idempotent(&out, &c);
}

#[test]
fn unrelated_and_mirror_pods_are_skipped() {
    let c = example();
    let pod = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "nginx"}]}});
    assert_eq!(decide(&pod, &c).outcome(), Outcome::Skipped);
    let mut mirror = istiod_pod();
    mirror["metadata"]["annotations"][keys::MIRROR] = json!("abc");
    assert_eq!(decide(&mirror, &c).outcome(), Outcome::Skipped);
    // A partial match is no match.
    let pod = json!({"metadata": {"labels": {"app": "istiod-like"}}});
    assert_eq!(decide(&pod, &c).outcome(), Outcome::Skipped);
}

#[test]
fn removes_optional_annotations_the_config_does_not_set() {
    let c = example();
    let mut pod = istiod_pod();
    let a = pod["metadata"]["annotations"].as_object_mut().unwrap();
    a.insert(keys::SECRET_VOLUME_PATH.into(), json!("/elsewhere"));
    a.insert(keys::SERVICE.into(), json!("https://other-vault:8200"));
    let (out, warnings) = patched(&pod, &c);
    assert!(!annotations(&out).contains_key(keys::SECRET_VOLUME_PATH));
    assert!(!annotations(&out).contains_key(keys::SERVICE));
    assert_eq!(warnings.len(), 2, "{warnings:?}");
}

#[test]
fn outcome_reflects_the_decision() {
    let c = example();
    let (out, _) = patched(&istiod_pod(), &c);
    assert_eq!(decide(&istiod_pod(), &c).outcome(), Outcome::Patched);
    assert_eq!(decide(&out, &c).outcome(), Outcome::Unchanged);
}

#[test]
fn display_name_prefers_name_then_generate_name() {
    let v = read_pod(&json!({"metadata": {"name": "a", "generateName": "b-"}}));
    assert_eq!(v.display_name(), "a");
    let v = read_pod(&json!({"metadata": {"generateName": "b-"}}));
    assert_eq!(v.display_name(), "b-");
    assert_eq!(PodView::default().display_name(), "");
}

#[test]
fn error_on_missing_key_is_set_for_every_file_and_wins_over_false() {
    let c = example();
    let mut pod = istiod_pod();
    let key = format!("{}ca-key.pem", keys::ERROR_ON_MISSING_KEY_PREFIX);
    pod["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .insert(key.clone(), json!("false"));
    let (out, warnings) = patched(&pod, &c);
    assert_owned_annotations(&out, c.istiod().unwrap());
    for f in [
        "ca-key.pem",
        "ca-cert.pem",
        "root-cert.pem",
        "cert-chain.pem",
    ] {
        assert_eq!(
            annotations(&out)[&format!("{}{f}", keys::ERROR_ON_MISSING_KEY_PREFIX)],
            "true",
            "{f}"
        );
    }
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&key) && warnings[0].contains("\"false\""),
        "{warnings:?}"
    );
    assert_idempotent(&out, &c);
}

#[test]
fn render_interval_is_set_from_the_config_or_removed() {
    let with = Config::parse(
        "cluster: c
vault: { authPath: auth/k, kvVersion: 2 }
profiles:
  istiod: { secretPath: m/data/p, renderInterval: 1m }
",
    )
    .unwrap();
    let without = Config::parse(
        "cluster: c
vault: { authPath: auth/k, kvVersion: 2 }
profiles:
  istiod: { secretPath: m/data/p }
",
    )
    .unwrap();
    let mut pod = istiod_pod();
    pod["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .insert(keys::STATIC_SECRET_RENDER_INTERVAL.into(), json!("10m"));

    // Configured: the config's value, as written, replaces the Pod's.
    let (out, warnings) = patched(&pod, &with);
    assert_owned_annotations(&out, with.istiod().unwrap());
    assert_eq!(annotations(&out)[keys::STATIC_SECRET_RENDER_INTERVAL], "1m");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(keys::STATIC_SECRET_RENDER_INTERVAL) && warnings[0].contains("10m"),
        "{warnings:?}"
    );
    assert_idempotent(&out, &with);

    // Not configured: owned, so removed, with a warning.
    let (out, warnings) = patched(&pod, &without);
    assert_owned_annotations(&out, without.istiod().unwrap());
    assert!(!annotations(&out).contains_key(keys::STATIC_SECRET_RENDER_INTERVAL));
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(keys::STATIC_SECRET_RENDER_INTERVAL) && w.contains("removed")),
        "{warnings:?}"
    );
    assert_idempotent(&out, &without);
}
