//! End-to-end proof that the Vault Agent templates the webhook writes render,
//! with a real agent, into files that are byte-for-byte the values stored in
//! Vault (docs/design.md: the template's trim markers).
//!
//! Each test:
//! 1. starts `bao server -dev` (OpenBao, installed by `scripts/install-test-tools`;
//!    these tests fail — never skip — without it) on a free loopback port;
//! 2. enables the KV mount(s) and stores a CA bundle whose values stress
//!    byte-exactness (trailing newline, none, two, a multi-certificate chain);
//! 3. runs the real binary, `istio-vault-webhook render --patch --config …`,
//!    on a Pod, and applies the JSON patch it prints (RFC 6902, strictly: an
//!    `add` under a missing parent fails as it does in the API server);
//! 4. turns the resulting annotations into the agent configuration the Vault
//!    Agent Injector (hashicorp/vault-k8s) generates for its init container
//!    (see `support/bao.rs`; only the auth method differs) and runs
//!    `bao agent` to completion;
//! 5. checks that the rendered files are exactly the configured ones and that
//!    each equals the stored value byte for byte.

pub mod support {
    pub mod bao;
}

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::bao::{
    self, BaoDev, diff_bytes, host_path, injected_secrets, list_files, run_with_timeout,
};

const WEBHOOK: &str = env!("CARGO_BIN_EXE_istio-vault-webhook");

// ---------------------------------------------------------------------------
// Realistic CA material
// ---------------------------------------------------------------------------

/// A freshly generated root CA and a cluster intermediate signed by it, as PEM.
struct CaMaterial {
    root_cert: String,
    inter_cert: String,
    inter_key: String,
}

/// A root CA that can sign several intermediates (a rotation keeps the root).
struct Root {
    cert: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca_params(org: &str, cn: &str, constraint: rcgen::BasicConstraints) -> rcgen::CertificateParams {
    use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose};
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("certificate params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(constraint);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

impl Root {
    fn new() -> Root {
        let key = rcgen::KeyPair::generate().expect("root key");
        let params = ca_params("Istio", "Root CA", rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("root cert").pem();
        Root {
            cert: cert.trim_end().to_string(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A new intermediate for `cluster`, signed by this root.
    fn intermediate(&self, cluster: &str) -> CaMaterial {
        let inter_key = rcgen::KeyPair::generate().expect("intermediate key");
        let inter_cert = ca_params(
            "Istio",
            &format!("Intermediate CA {cluster}"),
            rcgen::BasicConstraints::Constrained(0),
        )
        .signed_by(&inter_key, &self.issuer)
        .expect("intermediate cert")
        .pem();
        CaMaterial {
            root_cert: self.cert.clone(),
            inter_cert: inter_cert.trim_end().to_string(),
            inter_key: inter_key.serialize_pem().trim_end().to_string(),
        }
    }
}

fn generate_ca(cluster: &str) -> CaMaterial {
    Root::new().intermediate(cluster)
}

/// The Istio plug-in CA bundle, keyed by KV key, each value ending differently.
fn istio_bundle(cluster: &str) -> BTreeMap<String, Vec<u8>> {
    istio_bundle_of(&generate_ca(cluster))
}

fn istio_bundle_of(ca: &CaMaterial) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    // one trailing newline (what `cat key.pem` usually gives)
    m.insert("ca_key".into(), format!("{}\n", ca.inter_key).into_bytes());
    // no trailing newline at all
    m.insert("ca_cert".into(), ca.inter_cert.clone().into_bytes());
    // two trailing newlines
    m.insert(
        "root_cert".into(),
        format!("{}\n\n", ca.root_cert).into_bytes(),
    );
    // multi-certificate chain: issuing intermediate first, root last
    m.insert(
        "cert_chain".into(),
        format!("{}\n{}\n", ca.inter_cert, ca.root_cert).into_bytes(),
    );
    m
}

/// A Kubernetes TLS layout bundle (`tls.crt`, `tls.key`, `ca.crt`).
fn tls_bundle(cluster: &str) -> BTreeMap<String, Vec<u8>> {
    let ca = generate_ca(cluster);
    let mut m = BTreeMap::new();
    // chain without trailing newline
    m.insert(
        "tls_crt".into(),
        format!("{}\n{}", ca.inter_cert, ca.root_cert).into_bytes(),
    );
    // CRLF line endings, as a file edited on Windows would have
    m.insert(
        "tls_key".into(),
        format!("{}\r\n", ca.inter_key.replace('\n', "\r\n")).into_bytes(),
    );
    // openssl-style subject/issuer header (non-ASCII) and two trailing newlines
    m.insert(
        "ca_crt".into(),
        format!(
            "subject=O = Istio, CN = Root CA, L = Zürich\nissuer=O = Istio, CN = Root CA\n{}\n\n",
            ca.root_cert
        )
        .into_bytes(),
    );
    m
}

// ---------------------------------------------------------------------------
// Running the webhook binary
// ---------------------------------------------------------------------------

/// `istio-vault-webhook render --patch --config <config>` with `pod_yaml` on
/// stdin; returns the JSON patch (array of operations) it prints.
fn render_patch(config_yaml: &str, pod_yaml: &str, work: &Path) -> Vec<Value> {
    let config = work.join("config.yaml");
    fs::write(&config, config_yaml).unwrap();
    let mut cmd = Command::new(WEBHOOK);
    cmd.arg("render")
        .arg("--patch")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn");
    let out = run_with_timeout(
        cmd,
        Some(pod_yaml.as_bytes()),
        work,
        Duration::from_secs(30),
    );
    let context = || {
        format!(
            "config:\n{config_yaml}\npod:\n{pod_yaml}\n{}",
            out.describe()
        )
    };
    assert!(
        out.status.success(),
        "`istio-vault-webhook render --patch` failed\n{}",
        context()
    );

    let stdout = String::from_utf8(out.stdout.clone())
        .unwrap_or_else(|_| panic!("render --patch printed non-UTF-8\n{}", context()));
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("render --patch did not print JSON ({e})\n{}", context()));
    let patch = match docs.as_slice() {
        [Value::Array(ops)] if ops.iter().all(Value::is_object) => ops.clone(),
        // one patch per input document, as an array of patches
        [Value::Array(patches)] if patches.len() == 1 && patches[0].is_array() => {
            patches[0].as_array().unwrap().clone()
        }
        _ => panic!(
            "render --patch should print exactly one JSON patch (an array of operations)\n{}",
            context()
        ),
    };
    assert!(
        !patch.is_empty(),
        "render --patch printed an empty patch for a matching Pod\n{}",
        context()
    );
    patch
}

// ---------------------------------------------------------------------------
// RFC 6902, strictly (as the API server applies it)
// ---------------------------------------------------------------------------

fn parse_pointer(ptr: &str) -> Vec<String> {
    if ptr.is_empty() {
        return Vec::new();
    }
    assert!(
        ptr.starts_with('/'),
        "JSON pointer {ptr:?} does not start with '/'"
    );
    ptr[1..]
        .split('/')
        .map(|seg| {
            assert!(
                !seg.contains('~') || seg.replace("~0", "").replace("~1", "").find('~').is_none(),
                "JSON pointer {ptr:?} has an invalid ~ escape"
            );
            seg.replace("~1", "/").replace("~0", "~")
        })
        .collect()
}

fn parent_mut<'a>(doc: &'a mut Value, path: &[String], op: &Value) -> &'a mut Value {
    let mut cur = doc;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get_mut(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .unwrap_or_else(|| {
            panic!("patch operation {op} has a parent path that does not exist in the Pod")
        });
    }
    cur
}

fn apply_patch(doc: &mut Value, patch: &[Value]) {
    for op in patch {
        let kind = op["op"]
            .as_str()
            .unwrap_or_else(|| panic!("patch operation without op: {op}"));
        let path = parse_pointer(
            op["path"]
                .as_str()
                .unwrap_or_else(|| panic!("patch operation without path: {op}")),
        );
        let Some((last, parents)) = path.split_last() else {
            panic!("patch operation on the whole document: {op}")
        };
        let parent = parent_mut(doc, parents, op);
        let value = || {
            op.get("value")
                .cloned()
                .unwrap_or_else(|| panic!("{kind} without value: {op}"))
        };
        match (kind, parent) {
            ("add", Value::Object(m)) => {
                m.insert(last.clone(), value());
            }
            ("add", Value::Array(a)) => {
                let i = if last == "-" {
                    a.len()
                } else {
                    last.parse().unwrap_or(usize::MAX)
                };
                assert!(i <= a.len(), "add at a bad array index: {op}");
                a.insert(i, value());
            }
            ("replace", Value::Object(m)) => {
                assert!(m.contains_key(last), "replace of a missing member: {op}");
                m.insert(last.clone(), value());
            }
            ("replace", Value::Array(a)) => {
                let i: usize = last.parse().unwrap_or(usize::MAX);
                assert!(i < a.len(), "replace at a bad array index: {op}");
                a[i] = value();
            }
            ("remove", Value::Object(m)) => {
                assert!(m.remove(last).is_some(), "remove of a missing member: {op}");
            }
            ("remove", Value::Array(a)) => {
                let i: usize = last.parse().unwrap_or(usize::MAX);
                assert!(i < a.len(), "remove at a bad array index: {op}");
                a.remove(i);
            }
            ("test", Value::Object(m)) => {
                assert_eq!(m.get(last), Some(&value()), "test operation failed: {op}");
            }
            ("test", Value::Array(a)) => {
                let i: usize = last.parse().unwrap_or(usize::MAX);
                assert_eq!(a.get(i), Some(&value()), "test operation failed: {op}");
            }
            (other, _) => panic!("unsupported or misplaced patch operation {other:?}: {op}"),
        }
    }
}

/// Applies the patch and returns the Pod's annotations afterwards.
fn patched_pod(pod: &Value, patch: &[Value]) -> (Value, BTreeMap<String, String>) {
    let mut pod = pod.clone();
    apply_patch(&mut pod, patch);
    let annotations = pod["metadata"]["annotations"]
        .as_object()
        .unwrap_or_else(|| {
            panic!(
                "the patched Pod has no annotations map; patch: {}",
                Value::from(patch.to_vec())
            )
        })
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("annotation {k} is not a string: {v}"));
            (k.clone(), v.to_string())
        })
        .collect();
    (pod, annotations)
}

/// The `value` of env var `name` in container `container`, if any.
fn container_env(pod: &Value, container: &str, name: &str) -> Vec<Value> {
    pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == container)
        .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["name"] == name)
        .collect()
}

// ---------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------

struct Case<'a> {
    /// `config.yaml` given to the webhook.
    config: &'a str,
    /// The Pod, as YAML for the binary and as JSON to apply the patch to.
    pod_yaml: &'a str,
    pod: Value,
    /// KV mount -> KV version to enable.
    mounts: &'a [(&'a str, u8)],
    /// (mount, path inside the mount, API path the stored value is read back from, kv version)
    secret: (&'a str, &'a str, &'a str, u8),
    values: BTreeMap<String, Vec<u8>>,
    /// file name -> KV key, as in the profile's `files`.
    files: &'a [(&'a str, &'a str)],
    /// Where vault-k8s should mount the files (secret-volume-path).
    volume_path: &'a str,
    /// For istiod: the container that must get ROOT_CA_DIR.
    istiod_container: Option<&'a str>,
    /// The profile's `renderInterval`, which must reach the agent's
    /// `template_config.static_secret_render_interval`.
    render_interval: Option<&'a str>,
}

fn run_case(case: Case<'_>) {
    let dev = BaoDev::start();
    let work = dev.dir.path().to_path_buf();

    // -- Vault side -------------------------------------------------------
    for (mount, version) in case.mounts {
        dev.enable_kv(mount, *version);
    }
    let (mount, path, api_path, kv_version) = case.secret;
    dev.put_kv(mount, path, &case.values);
    assert_eq!(
        dev.read_kv(api_path, kv_version),
        case.values,
        "the values stored at {api_path} differ from what was written (the CLI changed bytes?)"
    );

    // -- Webhook ----------------------------------------------------------
    let patch = render_patch(case.config, case.pod_yaml, &work);
    let (pod, annotations) = patched_pod(&case.pod, &patch);
    let shape = if patch.iter().any(|op| op["path"] == "/metadata/annotations") {
        "one add of /metadata/annotations"
    } else {
        "per-key annotation operations"
    };
    let context = format!(
        "patch shape: {shape}\npatch:\n{}\nannotations after the patch:\n{}",
        serde_json::to_string_pretty(&patch).unwrap(),
        serde_json::to_string_pretty(&annotations).unwrap()
    );

    // The Pod must be one the injector picks up and the init container must
    // run before istiod; vault-k8s parses these booleans strictly.
    for key in ["agent-inject", "agent-init-first"] {
        assert_eq!(
            annotations
                .get(&format!("vault.hashicorp.com/{key}"))
                .map(String::as_str),
            Some("true"),
            "vault.hashicorp.com/{key} must be \"true\"\n{context}"
        );
    }
    assert!(
        !annotations.contains_key("vault.hashicorp.com/agent-inject-status"),
        "the webhook must never set agent-inject-status\n{context}"
    );

    // -- vault-k8s --------------------------------------------------------
    let secrets = injected_secrets(&annotations);
    let expected_names: BTreeSet<String> =
        case.files.iter().map(|(f, _)| f.to_lowercase()).collect();
    let names: BTreeSet<String> = secrets.iter().map(|s| s.name.clone()).collect();
    assert_eq!(
        names, expected_names,
        "vault-k8s would inject a different set of secrets\n{context}"
    );
    for s in &secrets {
        assert!(
            s.path.trim() != "",
            "secret {} has no agent-inject-secret path\n{context}",
            s.raw_name
        );
        // A wrong key must fail the agent, not render "<no value>".
        assert!(
            s.error_on_missing_key,
            "secret {} would render \"<no value>\" for a missing key: no \
             error-on-missing-key-{} \"true\"\n{context}",
            s.raw_name, s.raw_name
        );
    }
    let render_interval = bao::render_interval(&annotations);
    assert_eq!(
        render_interval.as_deref(),
        case.render_interval,
        "template-static-secret-render-interval\n{context}"
    );

    // istiod reads ROOT_CA_DIR; the agent must write exactly there.
    if let Some(container) = case.istiod_container {
        let env = container_env(&pod, container, "ROOT_CA_DIR");
        assert_eq!(
            env,
            vec![json!({"name": "ROOT_CA_DIR", "value": case.volume_path})],
            "container {container} must have exactly one ROOT_CA_DIR = {}\npatch:\n{}",
            case.volume_path,
            serde_json::to_string_pretty(&patch).unwrap()
        );
    } else {
        // No env var is added for gateways (docs/design.md, rule 9).
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or_default();
            assert!(
                container_env(&pod, name, "ROOT_CA_DIR").is_empty(),
                "a gateway Pod must not get ROOT_CA_DIR (container {name})\n{context}"
            );
        }
    }

    let pod_root = work.join("pod-fs");
    // The injector mounts an emptyDir at the secret volume path.
    fs::create_dir_all(host_path(&pod_root, case.volume_path)).unwrap();
    let token_file = work.join("root-token");
    fs::write(&token_file, &dev.token).unwrap();
    let config = bao::agent_config(
        &dev.addr,
        &secrets,
        render_interval.as_deref(),
        &pod_root,
        &token_file,
        &work,
    );
    // The agent parses the interval when it loads its configuration: a value
    // it refused would fail this run.
    let agent = bao::run_agent(&dev, &config, &work);

    // -- Exactly the configured files, byte for byte ------------------------
    let volume_dir = host_path(&pod_root, case.volume_path);
    let rendered: BTreeSet<PathBuf> = list_files(&pod_root).into_iter().collect();
    let expected: BTreeSet<PathBuf> = case
        .files
        .iter()
        .map(|(f, _)| volume_dir.strip_prefix(&pod_root).unwrap().join(f))
        .collect();
    assert_eq!(
        rendered,
        expected,
        "the agent rendered a different set of files\n{context}\n--- agent stderr ---\n{}",
        String::from_utf8_lossy(&agent.stderr)
    );
    for (file, key) in case.files {
        let got = fs::read(volume_dir.join(file)).unwrap();
        let want = &case.values[*key];
        assert!(
            &got == want,
            "{}/{file} is not byte-for-byte the value of {key} stored at {api_path}: {}\n{context}\n--- agent stderr ---\n{}",
            case.volume_path,
            diff_bytes(want, &got),
            String::from_utf8_lossy(&agent.stderr)
        );
    }
}

const ISTIO_FILES: &[(&str, &str)] = &[
    ("ca-key.pem", "ca_key"),
    ("ca-cert.pem", "ca_cert"),
    ("root-cert.pem", "root_cert"),
    ("cert-chain.pem", "cert_chain"),
];

const TLS_FILES: &[(&str, &str)] = &[
    ("tls.crt", "tls_crt"),
    ("tls.key", "tls_key"),
    ("ca.crt", "ca_crt"),
];

/// A minimal istiod Pod as Istio's chart creates it, with or without
/// annotations of its own.
fn istiod_pod(with_annotations: bool) -> (String, Value) {
    let annotations_yaml = if with_annotations {
        "  annotations:\n    sidecar.istio.io/inject: \"false\"\n    prometheus.io/scrape: \"true\"\n"
    } else {
        ""
    };
    let yaml = format!(
        "apiVersion: v1
kind: Pod
metadata:
  generateName: istiod-7d4f9c8b5-
  namespace: istio-system
  labels:
    app: istiod
    istio.io/rev: default
{annotations_yaml}spec:
  serviceAccountName: istiod
  containers:
  - name: discovery
    image: docker.io/istio/pilot:1.27.0
    args: [discovery, --monitoringAddr=:15014]
    env:
    - name: PILOT_TRACE_SAMPLING
      value: \"1\"
"
    );
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "istiod-7d4f9c8b5-",
            "namespace": "istio-system",
            "labels": {"app": "istiod", "istio.io/rev": "default"}
        },
        "spec": {
            "serviceAccountName": "istiod",
            "containers": [{
                "name": "discovery",
                "image": "docker.io/istio/pilot:1.27.0",
                "args": ["discovery", "--monitoringAddr=:15014"],
                "env": [{"name": "PILOT_TRACE_SAMPLING", "value": "1"}]
            }]
        }
    });
    if with_annotations {
        pod["metadata"]["annotations"] =
            json!({"sidecar.istio.io/inject": "false", "prometheus.io/scrape": "true"});
    }
    (yaml, pod)
}

/// cluster1: KV v1, Istio layout; the Pod has no annotations, so the patch
/// must add the whole map at once.
#[test]
fn istiod_kv_v1_istio_layout_renders_byte_for_byte() {
    let (pod_yaml, pod) = istiod_pod(false);
    run_case(Case {
        config: "cluster: cluster1
vault:
  authPath: auth/kubernetes-cluster1
profiles:
  istiod:
    secretPath: kubernetes-cluster1-secrets/istiod-service/certs
",
        pod_yaml: &pod_yaml,
        pod,
        mounts: &[("kubernetes-cluster1-secrets", 1)],
        secret: (
            "kubernetes-cluster1-secrets",
            "istiod-service/certs",
            "kubernetes-cluster1-secrets/istiod-service/certs",
            1,
        ),
        values: istio_bundle("cluster1"),
        files: ISTIO_FILES,
        volume_path: "/vault/secrets",
        istiod_container: Some("discovery"),
        render_interval: None,
    });
}

/// cluster2: KV v2, Istio layout; the Pod already has annotations of its own,
/// so they are added key by key (and must stay).
///
/// For KV v2 the secretPath is the API path with `data/`
/// (`<mount>/data/<path>`), whose response nests the values under
/// `.Data.data`; the webhook's config check requires that `data/`. Checked by
/// experiment with `bao agent` 2.7.2: a template reading `<mount>/data/<path>`
/// and one reading `<mount>/<path>` both render `.Data.data.<key>` (the
/// agent's consul-template detects the KV v2 mount and inserts `data/` when it
/// is missing; this worked even with a token whose policy only allows reading
/// `<mount>/data/<path>`), so the explicit form is a choice, not a necessity.
/// `.Data.<key>` against a v2 mount renders the literal text `<no value>` and
/// the agent still exits 0, because vault-k8s leaves `error_on_missing_key`
/// false unless `error-on-missing-key-<name>` is set, which the webhook does
/// for every file (tests/real_wrong_key.rs proves that with the real injector).
#[test]
fn istiod_kv_v2_istio_layout_renders_byte_for_byte() {
    let (pod_yaml, pod) = istiod_pod(true);
    run_case(Case {
        config: "cluster: cluster2
vault:
  authPath: auth/kubernetes-cluster2
  kvVersion: 2
profiles:
  istiod:
    secretPath: kubernetes-cluster2-secrets/data/istiod-service/certs
    renderInterval: 1m30s
",
        pod_yaml: &pod_yaml,
        pod: pod.clone(),
        mounts: &[("kubernetes-cluster2-secrets", 2)],
        secret: (
            "kubernetes-cluster2-secrets",
            "istiod-service/certs",
            "kubernetes-cluster2-secrets/data/istiod-service/certs",
            2,
        ),
        values: istio_bundle("cluster2"),
        files: ISTIO_FILES,
        volume_path: "/vault/secrets",
        istiod_container: Some("discovery"),
        render_interval: Some("1m30s"),
    });
}

/// istiod with the Kubernetes TLS layout (`tls.crt`, `tls.key`, `ca.crt`), a
/// non-default secretVolumePath and init-only rotation, on KV v2.
#[test]
fn istiod_kubernetes_tls_layout_renders_byte_for_byte() {
    let (pod_yaml, pod) = istiod_pod(false);
    run_case(Case {
        config: "cluster: cluster3
vault:
  authPath: auth/kubernetes-cluster3
  kvVersion: 2
secretVolumePath: /etc/istio/vault-ca
profiles:
  istiod:
    secretPath: kubernetes-cluster3-secrets/data/istiod-service/tls
    rotation: init-only
    files:
      tls.crt: tls_crt
      tls.key: tls_key
      ca.crt: ca_crt
",
        pod_yaml: &pod_yaml,
        pod,
        mounts: &[("kubernetes-cluster3-secrets", 2)],
        secret: (
            "kubernetes-cluster3-secrets",
            "istiod-service/tls",
            "kubernetes-cluster3-secrets/data/istiod-service/tls",
            2,
        ),
        values: tls_bundle("cluster3"),
        files: TLS_FILES,
        volume_path: "/etc/istio/vault-ca",
        istiod_container: Some("discovery"),
        render_interval: None,
    });
}

/// An ingress gateway profile next to the istiod profile, on KV v1: only the
/// gateway's files are rendered, and no ROOT_CA_DIR is added.
#[test]
fn gateway_profile_renders_byte_for_byte() {
    let pod_yaml = "apiVersion: v1
kind: Pod
metadata:
  generateName: istio-ingressgateway-5b9c7d6f4-
  namespace: istio-ingress
  labels:
    app: istio-ingressgateway
    istio: ingressgateway
spec:
  serviceAccountName: istio-ingressgateway
  containers:
  - name: istio-proxy
    image: docker.io/istio/proxyv2:1.27.0
    args: [proxy, router]
";
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "istio-ingressgateway-5b9c7d6f4-",
            "namespace": "istio-ingress",
            "labels": {"app": "istio-ingressgateway", "istio": "ingressgateway"}
        },
        "spec": {
            "serviceAccountName": "istio-ingressgateway",
            "containers": [{
                "name": "istio-proxy",
                "image": "docker.io/istio/proxyv2:1.27.0",
                "args": ["proxy", "router"]
            }]
        }
    });
    run_case(Case {
        config: "cluster: cluster1
vault:
  authPath: auth/kubernetes-cluster1
profiles:
  istiod:
    secretPath: kubernetes-cluster1-secrets/istiod-service/certs
  gateways:
  - name: ingressgateway
    match: { istio: ingressgateway }
    role: istio-ingressgateway
    secretPath: kubernetes-cluster1-secrets/ingressgateway/certs
    files: { tls.crt: tls_crt, tls.key: tls_key, ca.crt: ca_crt }
",
        pod_yaml,
        pod,
        mounts: &[("kubernetes-cluster1-secrets", 1)],
        secret: (
            "kubernetes-cluster1-secrets",
            "ingressgateway/certs",
            "kubernetes-cluster1-secrets/ingressgateway/certs",
            1,
        ),
        values: tls_bundle("cluster1-gw"),
        files: TLS_FILES,
        volume_path: "/vault/secrets",
        istiod_container: None,
        render_interval: None,
    });
}

/// Rotation without restart, as far as the agent goes: with `rotation:
/// sidecar` and `renderInterval: 2s` on KV v2, the sidecar (started after
/// the init container, as the kubelet does) rewrites every file in place
/// with a new intermediate under the same root within a few seconds, where
/// the agent's default would take about 5 minutes.
#[test]
fn the_sidecar_re_renders_a_rotated_intermediate_within_the_render_interval() {
    let dev = BaoDev::start();
    let work = dev.dir.path().to_path_buf();
    dev.enable_kv("kubernetes-cluster2-secrets", 2);
    let root = Root::new();
    let first = istio_bundle_of(&root.intermediate("cluster2"));
    dev.put_kv(
        "kubernetes-cluster2-secrets",
        "istiod-service/certs",
        &first,
    );
    let config = "cluster: cluster2
vault:
  authPath: auth/kubernetes-cluster2
  kvVersion: 2
profiles:
  istiod:
    secretPath: kubernetes-cluster2-secrets/data/istiod-service/certs
    renderInterval: 2s
";
    let (pod_yaml, pod) = istiod_pod(false);
    let patch = render_patch(config, &pod_yaml, &work);
    let (_, annotations) = patched_pod(&pod, &patch);

    let pod_root = work.join("pod-fs");
    let volume = host_path(&pod_root, "/vault/secrets");
    fs::create_dir_all(&volume).unwrap();
    let token_file = work.join("root-token");
    fs::write(&token_file, &dev.token).unwrap();
    let secrets = injected_secrets(&annotations);
    let init = bao::agent_config(
        &dev.addr,
        &secrets,
        bao::render_interval(&annotations).as_deref(),
        &pod_root,
        &token_file,
        &work,
    );
    assert_eq!(
        init["template_config"]["static_secret_render_interval"], "2s",
        "{init:#}"
    );
    bao::run_agent(&dev, &init, &work);
    let files_hold = |bundle: &BTreeMap<String, Vec<u8>>| {
        ISTIO_FILES
            .iter()
            .all(|(f, k)| fs::read(volume.join(f)).ok().as_ref() == Some(&bundle[*k]))
    };
    assert!(
        files_hold(&first),
        "the init agent rendered the first bundle"
    );

    let (mut sidecar, log) = bao::spawn_agent(&dev, &bao::sidecar_config(&init), &work);
    // The sidecar's first render rewrites the same bytes; let it settle.
    std::thread::sleep(Duration::from_millis(500));
    let rotated = istio_bundle_of(&root.intermediate("cluster2"));
    assert_eq!(first["root_cert"], rotated["root_cert"], "same root");
    let written = std::time::Instant::now();
    dev.put_kv(
        "kubernetes-cluster2-secrets",
        "istiod-service/certs",
        &rotated,
    );
    let deadline = written + Duration::from_secs(20);
    while !files_hold(&rotated) {
        if let Some(status) = sidecar.try_wait() {
            panic!("the sidecar exited ({status}):\n{}", bao::tail(&log, 8000));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the files still hold the old intermediate 20 s after the rotation:\n{}",
            bao::tail(&log, 8000)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = written.elapsed();
    eprintln!("rotated intermediate rendered {took:?} after it was written to Vault");
    assert!(
        took < Duration::from_secs(10),
        "renderInterval 2s, yet the rotation took {took:?}"
    );
    sidecar.kill();
}
