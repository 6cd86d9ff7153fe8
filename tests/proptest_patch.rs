//! Properties of the admission answer (docs/design.md, "The rules of the patch") for arbitrary Pods and valid
//! configs, through the whole review path (bytes in, response bytes out):
//!
//! - the patch applies with RFC 6902 semantics (the json-patch crate, as the
//!   API server's evanphx/json-patch would);
//! - the patched Pod carries exactly the annotations the profile owns, with
//!   the values the spec's table gives (computed here from the raw config,
//!   independently of the webhook's compiled profiles), non-owned annotations
//!   untouched, and, for istiod, exactly one `ROOT_CA_DIR` with the right
//!   value where the first one was, every other env entry kept in order;
//! - nothing else in the Pod changes, and a second review of the patched Pod
//!   answers with no patch at all;
//! - ambiguous Pods are denied, istiod Pods without the container are
//!   denied, unrelated / mirror / already-injected Pods are left alone.

use std::collections::BTreeMap;

use base64::Engine;
use istio_vault_webhook::admission;
use istio_vault_webhook::config::{
    Config, RawConfig, RawGateway, RawIstiod, RawProfiles, RawVault, Rotation,
};
use istio_vault_webhook::mutate::ConfigState;
use istio_vault_webhook::patch::{self, PatchOp};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use serde_json::{Map, Value, json};

const VAULT: &str = "vault.hashicorp.com/";
const ISTIO_FILES: [(&str, &str); 4] = [
    ("ca-key.pem", "ca_key"),
    ("ca-cert.pem", "ca_cert"),
    ("root-cert.pem", "root_cert"),
    ("cert-chain.pem", "cert_chain"),
];
const TLS_FILES: [(&str, &str); 3] = [
    ("tls.crt", "tls_crt"),
    ("tls.key", "tls_key"),
    ("ca.crt", "ca_crt"),
];
/// The annotations the webhook sets only when configured (docs/design.md).
const OPTIONAL: [&str; 7] = [
    "vault.hashicorp.com/agent-pre-populate-only",
    "vault.hashicorp.com/secret-volume-path",
    "vault.hashicorp.com/service",
    "vault.hashicorp.com/namespace",
    "vault.hashicorp.com/ca-cert",
    "vault.hashicorp.com/tls-secret",
    "vault.hashicorp.com/template-static-secret-render-interval",
];

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(f, k)| (f.to_string(), k.to_string()))
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    files(pairs)
}

/// A rotation and, with `sidecar` only, maybe a render interval.
fn rotation() -> impl Strategy<Value = (Rotation, Option<String>)> {
    prop_oneof![
        Just((Rotation::Sidecar, None)),
        select(&["30s", "5m", "1h30m", "1.5h", "250ms"][..])
            .prop_map(|d| (Rotation::Sidecar, Some(d.to_string()))),
        Just((Rotation::InitOnly, None)),
    ]
}

fn optional(values: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), select(values).prop_map(String::from)]
}

prop_compose! {
    fn raw_config()(
        kv_version in 1u8..=2,
        address in optional(&["https://vault.example.com:8200", "http://vault.vault:8200"]),
        namespace in optional(&["team-a", "admin/istio"]),
        ca_cert in optional(&["/vault/tls/ca.crt"]),
        tls_secret in optional(&["vault-tls"]),
        secret_volume_path in select(&["/vault/secrets", "/etc/istio/vault", "/var/run/ca~x"][..]),
        istiod in proptest::option::weighted(0.85, (
            any::<bool>(),           // Istio layout or Kubernetes TLS layout
            rotation(),
            select(&["discovery", "pilot"][..]),
            any::<bool>(),           // match on a revision too
        )),
        gateways in subsequence(vec![0usize, 1, 2], 0..=3),
        gateway_rotations in proptest::collection::vec(rotation(), 3),
    ) -> RawConfig {
        // KV v2 paths carry data/ after the mount (config validation insists).
        let path = |name: &str| {
            if kv_version == 2 {
                format!("secret/data/{name}/certs")
            } else {
                format!("secret/{name}/certs")
            }
        };
        let istiod = istiod.map(|(istio_layout, (rotation, render_interval), container, revision)| RawIstiod {
            secret_path: path("istiod"),
            role: "istiod".into(),
            selector: if revision {
                map(&[("app", "istiod"), ("istio.io/rev", "canary")])
            } else {
                map(&[("app", "istiod")])
            },
            container: container.into(),
            rotation,
            // Refused on KV v1, where the secret's lease decides when the agent re-reads.
            render_interval: render_interval.filter(|_| kv_version == 2),
            files: files(if istio_layout { &ISTIO_FILES } else { &TLS_FILES }),
        });
        let all = [
            ("ingressgateway", map(&[("istio", "ingressgateway")]), files(&TLS_FILES)),
            (
                "eastwest",
                map(&[("istio", "eastwestgateway"), ("topology.istio.io/network", "net1")]),
                files(&[("ca.crt", "ca_crt")]),
            ),
            ("legacy", map(&[("app", "istio-ingressgateway")]), files(&[("tls.crt", "crt"), ("tls.key", "key")])),
        ];
        let gateways = gateways
            .into_iter()
            .map(|i| {
                let (name, selector, files) = all[i].clone();
                RawGateway {
                    name: name.into(),
                    selector,
                    role: format!("istio-{name}"),
                    secret_path: path(name),
                    rotation: gateway_rotations[i].0,
                    render_interval: gateway_rotations[i].1.clone().filter(|_| kv_version == 2),
                    files,
                }
            })
            .collect();
        RawConfig {
            cluster: "cluster1".into(),
            vault: RawVault {
                auth_path: "auth/kubernetes-cluster1".into(),
                kv_version,
                address,
                namespace,
                ca_cert,
                tls_secret,
            },
            secret_volume_path: secret_volume_path.into(),
            profiles: RawProfiles { istiod, gateways },
        }
    }
}

/// One profile as the spec describes it, derived from the raw config.
#[derive(Debug, Clone)]
struct Expect {
    name: String,
    selector: BTreeMap<String, String>,
    /// Annotations the Pod must end up with.
    want: BTreeMap<String, String>,
    /// Owned annotations that must be absent.
    absent: Vec<&'static str>,
    /// istiod: the container that gets ROOT_CA_DIR.
    container: Option<String>,
}

fn expectations(raw: &RawConfig, hash: &str) -> Vec<Expect> {
    let mut out = Vec::new();
    let mut add = |name: &str,
                   selector: &BTreeMap<String, String>,
                   role: &str,
                   secret_path: &str,
                   rotation: Rotation,
                   render_interval: Option<&str>,
                   files: &BTreeMap<String, String>,
                   container: Option<&str>| {
        let data = if raw.vault.kv_version == 2 {
            ".Data.data"
        } else {
            ".Data"
        };
        let mut want = BTreeMap::new();
        let mut put = |k: String, v: &str| {
            want.insert(k, v.to_string());
        };
        put(format!("{VAULT}agent-inject"), "true");
        put(format!("{VAULT}agent-init-first"), "true");
        put(format!("{VAULT}role"), role);
        put(format!("{VAULT}auth-path"), &raw.vault.auth_path);
        for (file, key) in files {
            put(format!("{VAULT}agent-inject-secret-{file}"), secret_path);
            put(
                format!("{VAULT}agent-inject-template-{file}"),
                &format!(
                    "{{{{- with secret \"{secret_path}\" -}}}}{{{{ {data}.{key} }}}}{{{{- end -}}}}"
                ),
            );
            put(format!("{VAULT}error-on-missing-key-{file}"), "true");
        }
        let optional = [
            (rotation == Rotation::InitOnly).then_some("true"),
            (raw.secret_volume_path != "/vault/secrets").then_some(raw.secret_volume_path.as_str()),
            (!raw.vault.address.is_empty()).then_some(raw.vault.address.as_str()),
            (!raw.vault.namespace.is_empty()).then_some(raw.vault.namespace.as_str()),
            (!raw.vault.ca_cert.is_empty()).then_some(raw.vault.ca_cert.as_str()),
            (!raw.vault.tls_secret.is_empty()).then_some(raw.vault.tls_secret.as_str()),
            render_interval,
        ];
        let mut absent = Vec::new();
        for (key, value) in OPTIONAL.into_iter().zip(optional) {
            match value {
                Some(v) => put(key.to_string(), v),
                None => absent.push(key),
            }
        }
        put("istio-vault-webhook/profile".into(), name);
        put("istio-vault-webhook/config-hash".into(), hash);
        out.push(Expect {
            name: name.to_string(),
            selector: selector.clone(),
            want,
            absent,
            container: container.map(String::from),
        });
    };
    if let Some(i) = &raw.profiles.istiod {
        add(
            "istiod",
            &i.selector,
            &i.role,
            &i.secret_path,
            i.rotation,
            i.render_interval.as_deref(),
            &i.files,
            Some(&i.container),
        );
    }
    for g in &raw.profiles.gateways {
        add(
            &g.name,
            &g.selector,
            &g.role,
            &g.secret_path,
            g.rotation,
            g.render_interval.as_deref(),
            &g.files,
            None,
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Pods
// ---------------------------------------------------------------------------

fn labels() -> impl Strategy<Value = Option<Map<String, Value>>> {
    let choices = (
        proptest::option::of(select(&["istiod", "istio-ingressgateway", "reviews"][..])),
        proptest::option::of(select(&["ingressgateway", "eastwestgateway", "pilot"][..])),
        proptest::option::of(select(&["default", "canary"][..])),
        proptest::option::of(select(&["net1", "net2"][..])),
        proptest::collection::btree_map("[a-z./~-]{1,12}", "[a-z0-9~/]{0,8}", 0..3),
    );
    proptest::option::weighted(
        0.95,
        choices.prop_map(|(app, istio, rev, network, extra)| {
            let mut m: Map<String, Value> = extra
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            for (k, v) in [
                ("app", app),
                ("istio", istio),
                ("istio.io/rev", rev),
                ("topology.istio.io/network", network),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), Value::String(v.into()));
                }
            }
            m
        }),
    )
}

/// Annotation keys a Pod may already carry: every key some profile owns,
/// plus others (with `/` and `~`) the webhook must leave alone.
fn annotation_keys(expect: &[Expect]) -> Vec<String> {
    let mut keys: Vec<String> = expect
        .iter()
        .flat_map(|e| e.want.keys().cloned())
        .chain(OPTIONAL.iter().map(|k| k.to_string()))
        .chain(
            [
                "vault.hashicorp.com/agent-inject-secret-other.pem",
                "vault.hashicorp.com/agent-inject-status",
                "example.com/a~b/c",
                "x/y~1z",
                "~",
                "/",
                "a~0b",
                "prometheus.io/scrape",
                "sidecar.istio.io/inject",
            ]
            .map(String::from),
        )
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn annotation_value(expect: &[Expect]) -> impl Strategy<Value = String> + use<> {
    let mut right: Vec<String> = expect
        .iter()
        .flat_map(|e| e.want.values().cloned())
        .collect();
    right.push("true".into());
    prop_oneof![
        3 => select(right),
        2 => "[a-z0-9 \"{}~/\\\\.-]{0,16}",
        1 => select(&["true", "false", "injected", ""][..]).prop_map(String::from),
    ]
}

fn annotations(expect: &[Expect]) -> impl Strategy<Value = Option<Map<String, Value>>> + use<> {
    let keys = annotation_keys(expect);
    let entry = (select(keys), annotation_value(expect));
    proptest::option::weighted(
        0.8,
        proptest::collection::vec(entry, 0..12).prop_map(|entries| {
            entries
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect()
        }),
    )
}

fn env_entry(dirs: Vec<String>) -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (0..20u8).prop_map(|i| json!({"name": format!("VAR_{i}"), "value": format!("v{i}")})),
        1 => (0..3u8).prop_map(|i| json!({"name": format!("FROM_{i}"), "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})),
        2 => select(dirs).prop_map(|d| json!({"name": "ROOT_CA_DIR", "value": d})),
        1 => Just(json!({"name": "ROOT_CA_DIR", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})),
        1 => Just(json!({"name": "ROOT_CA_DIR"})),
    ]
}

fn containers(dir: &str) -> impl Strategy<Value = Value> + use<> {
    let dirs = vec![
        dir.to_string(),
        "/etc/cacerts".to_string(),
        "./etc/cacerts".to_string(),
        String::new(),
    ];
    let names = subsequence(vec!["discovery", "pilot", "istio-proxy", "app"], 0..=4).prop_shuffle();
    names
        .prop_flat_map(move |names| {
            let envs = proptest::collection::vec(
                proptest::option::weighted(
                    0.8,
                    proptest::collection::vec(env_entry(dirs.clone()), 0..6),
                ),
                names.len(),
            );
            (Just(names), envs)
        })
        .prop_map(|(names, envs)| {
            let list: Vec<Value> = names
                .into_iter()
                .zip(envs)
                .map(|(name, env)| {
                    let mut c = json!({"name": name, "image": format!("example.com/{name}:1")});
                    if let Some(env) = env {
                        c["env"] = Value::Array(env);
                    }
                    c
                })
                .collect();
            Value::Array(list)
        })
}

/// Mostly a profile's own selector (plus random labels, which may make the
/// Pod match a second profile too), else random labels.
fn labels_for(expect: &[Expect]) -> BoxedStrategy<Option<Map<String, Value>>> {
    let selectors: Vec<BTreeMap<String, String>> =
        expect.iter().map(|e| e.selector.clone()).collect();
    if selectors.is_empty() {
        return labels().boxed();
    }
    prop_oneof![
        2 => labels(),
        3 => (select(selectors), labels()).prop_map(|(selector, extra)| {
            let mut m = extra.unwrap_or_default();
            for (k, v) in selector {
                m.insert(k, Value::String(v));
            }
            Some(m)
        }),
    ]
    .boxed()
}

fn pod(expect: Vec<Expect>, dir: String) -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        labels_for(&expect),
        annotations(&expect),
        proptest::option::weighted(0.9, containers(&dir)),
        proptest::bool::weighted(0.03),
    )
        .prop_map(|(has_metadata, labels, annotations, containers, mirror)| {
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod"});
            if has_metadata || labels.is_some() || annotations.is_some() {
                let mut meta = json!({"generateName": "p-", "namespace": "istio-system"});
                if let Some(l) = labels {
                    meta["labels"] = Value::Object(l);
                }
                if let Some(mut a) = annotations {
                    if mirror {
                        a.insert("kubernetes.io/config.mirror".into(), "x".into());
                    }
                    meta["annotations"] = Value::Object(a);
                }
                pod["metadata"] = meta;
            }
            pod["spec"] = match containers {
                Some(c) => json!({"containers": c, "restartPolicy": "Always"}),
                None => json!({"restartPolicy": "Always"}),
            };
            pod
        })
}

fn case() -> impl Strategy<Value = (RawConfig, Config, Vec<Expect>, Value)> {
    raw_config().prop_flat_map(|raw| {
        let config = Config::compile(raw.clone()).expect("generated config is valid");
        let expect = expectations(&raw, &config.hash);
        let dir = raw.secret_volume_path.clone();
        (
            Just(raw),
            Just(config),
            Just(expect.clone()),
            pod(expect, dir),
        )
    })
}

// ---------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------

fn review_body(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b9e1e2c-5f0a-4d3e-9c1b-7a6f5e4d3c2b",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "istio-system",
            "operation": "CREATE",
            "object": pod,
            "dryRun": false
        }
    }))
    .unwrap()
}

/// (allowed, patch ops as JSON if any, warnings, denial message)
fn answer(config: &Config, pod: &Value) -> (bool, Option<Value>, Vec<String>, String) {
    let reviewed = admission::review(&review_body(pod), ConfigState::Loaded(config))
        .unwrap_or_else(|e| panic!("review rejected: {e}\npod: {pod}"));
    let body: Value = serde_json::from_slice(&reviewed.body).unwrap();
    let r = &body["response"];
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    assert_eq!(r["uid"], "0b9e1e2c-5f0a-4d3e-9c1b-7a6f5e4d3c2b");
    // patch and patchType come together or not at all.
    assert_eq!(
        r.get("patch").is_some(),
        r.get("patchType").is_some(),
        "{r}"
    );
    let patch = r.get("patch").map(|p| {
        assert_eq!(r["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(p.as_str().expect("patch is a base64 string"))
            .expect("patch is base64");
        serde_json::from_slice::<Value>(&bytes).expect("patch is JSON")
    });
    let warnings: Vec<String> = r
        .get("warnings")
        .map(|w| {
            w.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    for w in &warnings {
        assert!(w.len() < 120, "warning too long for the API server: {w}");
    }
    let message = r["status"]["message"].as_str().unwrap_or("").to_string();
    (r["allowed"].as_bool().unwrap(), patch, warnings, message)
}

fn label<'a>(pod: &'a Value, key: &str) -> Option<&'a str> {
    pod.pointer("/metadata/labels")?.get(key)?.as_str()
}

fn annotation<'a>(pod: &'a Value, key: &str) -> Option<&'a str> {
    pod.pointer("/metadata/annotations")?.get(key)?.as_str()
}

/// The Pod the rules of the patch (docs/design.md) say it must produce.
fn expected_pod(pod: &Value, e: &Expect, dir: &str) -> Value {
    let mut out = pod.clone();
    let mut annotations = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for k in &e.absent {
        annotations.remove(*k);
    }
    for (k, v) in &e.want {
        annotations.insert(k.clone(), Value::String(v.clone()));
    }
    if out.get("metadata").is_none() {
        out["metadata"] = json!({});
    }
    out["metadata"]["annotations"] = Value::Object(annotations);
    if let Some(name) = &e.container {
        let containers = out["spec"]["containers"].as_array_mut().unwrap();
        let c = containers
            .iter_mut()
            .find(|c| c["name"] == name.as_str())
            .unwrap();
        let entry = json!({"name": "ROOT_CA_DIR", "value": dir});
        let env: Vec<Value> = c
            .get("env")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut seen = false;
        let mut new = Vec::new();
        for v in env {
            if v["name"] == "ROOT_CA_DIR" {
                if !seen {
                    seen = true;
                    new.push(entry.clone());
                }
            } else {
                new.push(v);
            }
        }
        if !seen {
            new.push(entry);
        }
        c["env"] = Value::Array(new);
    }
    out
}

fn apply(pod: &Value, patch: &Value) -> Result<Value, String> {
    let p: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| e.to_string())?;
    let mut out = pod.clone();
    json_patch::patch(&mut out, &p).map_err(|e| e.to_string())?;
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn the_patch_applies_satisfies_the_spec_and_is_idempotent(
        (raw, config, expect, pod) in case()
    ) {
        let (allowed, patch, warnings, message) = answer(&config, &pod);
        let matching: Vec<&Expect> = expect
            .iter()
            .filter(|e| e.selector.iter().all(|(k, v)| label(&pod, k) == Some(v.as_str())))
            .collect();

        if annotation(&pod, "kubernetes.io/config.mirror").is_some() || matching.is_empty() {
            prop_assert!(allowed && patch.is_none(), "left alone: {pod}");
            return Ok(());
        }
        if matching.len() > 1 {
            prop_assert!(!allowed, "ambiguous Pod must be denied: {pod}");
            for e in &matching {
                prop_assert!(message.contains(&e.name), "{message}");
            }
            return Ok(());
        }
        let e = matching[0];
        if annotation(&pod, "vault.hashicorp.com/agent-inject-status") == Some("injected") {
            prop_assert!(allowed && patch.is_none() && !warnings.is_empty());
            return Ok(());
        }
        if let Some(name) = &e.container {
            let has = pod["spec"]["containers"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["name"] == name.as_str()));
            if !has {
                prop_assert!(!allowed, "istiod without {name} must be denied: {pod}");
                prop_assert!(message.contains(name.as_str()), "{message}");
                return Ok(());
            }
        }
        prop_assert!(allowed, "denied: {message}");

        let want = expected_pod(&pod, e, &raw.secret_volume_path);
        let patched = match &patch {
            Some(p) => apply(&pod, p).map_err(|err| {
                TestCaseError::fail(format!("patch does not apply: {err}\npatch: {p}\npod: {pod}"))
            })?,
            None => pod.clone(),
        };
        prop_assert_eq!(&patched, &want, "patch: {:?}", patch);
        // No patch exactly when there is nothing to change.
        prop_assert_eq!(patch.is_none(), pod == want);

        // Every overridden Vault annotation is named in a warning.
        for (k, v) in &e.want {
            if k.starts_with(VAULT)
                && annotation(&pod, k).is_some_and(|have| have != v)
            {
                prop_assert!(warnings.iter().any(|w| w.contains(k.as_str())), "{k}: {warnings:?}");
            }
        }

        // Second pass: nothing left to do.
        let (allowed, again, _, _) = answer(&config, &patched);
        prop_assert!(allowed);
        prop_assert!(again.is_none(), "second pass patched: {:?}", again);
    }

    /// patch::to_json writes what serde_json writes, for any strings.
    #[test]
    fn patch_json_is_serde_json(path in any::<String>(), value in any::<String>(), other in "[\\x00-\\x7f]{0,40}") {
        let ops = vec![
            PatchOp::Add { path: path.clone(), value: Value::String(value.clone()) },
            PatchOp::Replace { path: other.clone(), value: json!({"name": value, "n": 1}) },
            PatchOp::Remove { path: other },
        ];
        prop_assert_eq!(patch::to_json(&ops), serde_json::to_vec(&ops).unwrap());
    }
}

/// A Pod given as an array of its fields (serde's sequence form of a struct)
/// is not a Pod: 400, not a patch the API server cannot apply.
#[test]
fn array_shaped_objects_are_bad_requests() {
    let config = Config::parse(istio_vault_webhook::config::EXAMPLE_CONFIG).unwrap();
    for object in [
        json!([null, {"containers": [{"name": "discovery"}]}]),
        json!({"metadata": ["n", null, null, {"app": "istiod"}], "spec": {"containers": [{"name": "discovery"}]}}),
        json!({"metadata": {"labels": {"app": "istiod"}}, "spec": [[["discovery", null]]]}),
        json!({"metadata": {"labels": {"app": "istiod"}}, "spec": {"containers": [["discovery", [["ROOT_CA_DIR", "x"]]]]}}),
    ] {
        let result = admission::review(&review_body(&object), ConfigState::Loaded(&config));
        assert!(
            result.is_err(),
            "{object} was answered: {:?}",
            result.map(|r| r.decision)
        );
    }
}
