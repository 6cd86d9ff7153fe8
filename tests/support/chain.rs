//! The steps of the seed's walkthrough on a [`ControlPlane`], shared by the real-control-plane
//! tests: a [`Cluster`] is one Kubernetes cluster with the shipped manifests, our webhook, the
//! Vault Agent Injector and its Vault side set up by `manifests/vault/setup.sh`; then Pods are
//! created through it and their containers run as the kubelet would (`support::pod`).
//! docs/control-plane.md says why each piece is the way it is.

// Shared by several test files, each of which uses a part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use super::bao::{BaoDev, diff_bytes, free_port, run_with_timeout};
use super::kube::{ControlPlane, Process, addr, wait_for_port, yaml_documents};
use super::mesh_ca::{Intermediate, Root};
use super::peers::{istio_source, peer};
use super::pod::{PodFiles, Sandbox, str_at};
use super::webhook::{shipped_manifests, start_webhook};

pub const WEBHOOK: &str = env!("CARGO_BIN_EXE_istio-vault-webhook");
pub const SECRETS: &str = "/vault/secrets";
/// Generous: two cores also build and run everything else.
pub const READY: Duration = Duration::from_secs(120);

pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The real-control-plane tests run Pods' containers in mount namespaces.
pub fn assert_root() {
    let uid = Command::new("id").arg("-u").output();
    assert!(
        uid.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
        "the real-control-plane tests run containers in mount namespaces and need root"
    );
}

/// One cluster of the mesh, steps 1 to 5 of the walkthrough done: etcd + kube-apiserver; the
/// shipped overlay `manifests/overlays/<name>` applied (webhook reached by loopback URL); our
/// webhook running as its ServiceAccount; Vault set up by `setup.sh <name>` with the cluster's
/// intermediate; the Vault Agent Injector registered; Istio's CRDs; `istio-system` opted in
/// with the `istiod` ServiceAccount.
pub struct Cluster {
    pub name: String,
    pub ca: Intermediate,
    pub gateway_tls: Intermediate,
    pub webhook: Process,
    pub injector: Injector,
    pub cp: ControlPlane,
}

/// How a test wants its cluster made, where it differs from the shipped one.
#[derive(Default)]
pub struct Options {
    /// Edits the ConfigMap's `config.yaml` text before it is applied.
    pub edit_config: Option<fn(&str) -> String>,
    /// setup.sh's SECRET_TTL (None: its default).
    pub secret_ttl: Option<&'static str>,
}

impl Cluster {
    pub fn start(name: &str, root: &Root, bao: &BaoDev, options: Options) -> Self {
        assert_root();
        // 1. The API server.
        let cp = ControlPlane::start(name);

        // 2. The shipped manifests, the webhook reached by URL instead of Service.
        let port = free_port();
        let mut objects = shipped_manifests(&cp, name, port);
        if let Some(edit) = options.edit_config {
            for o in &mut objects {
                if o["kind"] == "ConfigMap" && o["metadata"]["name"] == "istio-vault-webhook" {
                    let text = str_at(&o["data"], "config.yaml");
                    o["data"]["config.yaml"] = json!(edit(&text));
                }
            }
        }
        cp.apply(&objects);
        assert_guard_type_checks(&cp);

        // 3. Our webhook, as its own ServiceAccount.
        let webhook = start_webhook(&cp, port, WEBHOOK);

        // 5. (before 4: the injector is told Vault's address) Vault, set up by the shipped script.
        let ca = root.intermediate(name);
        let gateway_tls = root.tls(&format!("{name}-ingressgateway"));
        setup_vault(&cp, bao, name, &ca, &gateway_tls, options.secret_ttl);

        // 4. The Vault Agent Injector.
        let injector = Injector::start(&cp, bao);

        // Istio's base chart (CRDs), and the namespace istiod runs in, opted in.
        apply_istio_crds(&cp);
        opt_in_namespace(&cp, "istio-system");
        create_service_account(&cp, "istio-system", "istiod", true);
        Self {
            name: name.to_string(),
            ca,
            gateway_tls,
            webhook,
            injector,
            cp,
        }
    }

    /// Creates the chart-rendered istiod Pod, runs its `vault-agent-init` and returns it with
    /// its files rendered (checked byte for byte against this cluster's intermediate).
    pub fn istiod_pod(&self) -> PodFiles {
        let stored = create_pod(&self.cp, "tests/fixtures/pods/istiod.json");
        let pod = PodFiles::new(&self.cp, stored, &self.cp.dir.join("pods/istiod"));
        let mut init = run_container(&self.cp, &pod, "vault-agent-init");
        wait_success(&mut init, &pod);
        assert_rendered(&pod, &self.ca.istiod_files());
        pod
    }
}

/// The API server type-checks a ValidatingAdmissionPolicy's CEL after accepting it and reports
/// problems in `status.typeChecking`, not as an apply warning: wait for it and require none.
pub fn assert_guard_type_checks(cp: &ControlPlane) {
    let name = "istio-vault-webhook-istiod-requires-vault";
    let deadline = Instant::now() + READY;
    loop {
        let vap = cp.get_json(&["validatingadmissionpolicy", name]);
        if let Some(checked) = vap["status"].get("typeChecking") {
            let warnings = checked["expressionWarnings"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(
                warnings.is_empty(),
                "the guard's CEL does not type-check: {warnings:#?}"
            );
            assert_eq!(
                vap["status"]["observedGeneration"],
                vap["metadata"]["generation"]
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} was never type-checked: {vap}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Istio's CRDs, as its `base` chart installs them (from the module istiod was built from).
pub fn apply_istio_crds(cp: &ControlPlane) {
    let crds = istio_source().join("manifests/charts/base/files/crd-all.gen.yaml");
    let text = fs::read_to_string(&crds).unwrap_or_else(|e| panic!("{}: {e}", crds.display()));
    let out = cp.kubectl_output(
        &["apply", "--server-side", "-f", "-"],
        Some(text.as_bytes()),
    );
    assert!(out.status.success(), "Istio CRDs:\n{}", out.describe());
}

pub fn opt_in_namespace(cp: &ControlPlane, name: &str) {
    cp.apply(&[json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"istio-vault-webhook/inject": "enabled"}},
    })]);
}

/// A ServiceAccount (no controller-manager makes them here). With `auth_delegator`, it may call
/// TokenReview: Vault's Kubernetes auth then reviews the logging-in Pod's token with that same
/// token (setup.sh without TOKEN_REVIEWER_JWT), as the README's Vault section describes.
pub fn create_service_account(
    cp: &ControlPlane,
    namespace: &str,
    name: &str,
    auth_delegator: bool,
) {
    let mut objects = vec![json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    })];
    if auth_delegator {
        objects.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{namespace}-{name}-auth-delegator")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:auth-delegator"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        }));
    }
    cp.apply(&objects);
}

/// vault-k8s `agent-inject`, with only in-cluster credentials (it knows no other:
/// subcommand/injector/command.go calls rest.InClusterConfig), registered as the Vault Helm chart
/// registers it: `vault-agent-injector-cfg`, its rules, `failurePolicy: Ignore`.
pub struct Injector {
    pub process: Process,
    command: Box<dyn Fn() -> Command>,
    port: u16,
}

impl Injector {
    pub fn start(cp: &ControlPlane, bao: &BaoDev) -> Self {
        let namespace = "vault";
        cp.apply(&[
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "vault-agent-injector", "namespace": namespace}}),
            // The chart's injector-clusterrole.yaml.
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": "vault-agent-injector-clusterrole"},
                   "rules": [{"apiGroups": ["admissionregistration.k8s.io"],
                              "resources": ["mutatingwebhookconfigurations"],
                              "verbs": ["get", "list", "watch", "patch"]}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "vault-agent-injector-binding"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": "vault-agent-injector-clusterrole"},
                   "subjects": [{"kind": "ServiceAccount", "name": "vault-agent-injector",
                                 "namespace": namespace}]}),
        ]);

        // What the kubelet would mount at the ServiceAccount path of the injector's Pod.
        let dir = cp.dir.join("injector");
        let sa = dir.join("serviceaccount");
        fs::create_dir_all(&sa).unwrap();
        let token = cp.token(namespace, "vault-agent-injector", None, None);
        fs::write(sa.join("token"), token).unwrap();
        fs::write(sa.join("ca.crt"), &cp.ca.cert_pem).unwrap();
        fs::write(sa.join("namespace"), namespace).unwrap();
        let serving = cp
            .ca
            .serving(&["127.0.0.1", "vault-agent-injector-svc.vault.svc"]);
        fs::write(dir.join("tls.crt"), &serving.cert_pem).unwrap();
        fs::write(dir.join("tls.key"), &serving.key_pem).unwrap();

        let port = free_port();
        let sandbox = Sandbox::default()
            .mount(&sa, "/var/run/secrets/kubernetes.io/serviceaccount")
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", cp.port.to_string())
            .env("NAMESPACE", namespace);
        let argv: Vec<String> = vec![
            peer("vault-k8s").display().to_string(),
            "agent-inject".into(),
            format!("-listen=127.0.0.1:{port}"),
            format!("-tls-cert-file={}", dir.join("tls.crt").display()),
            format!("-tls-key-file={}", dir.join("tls.key").display()),
            format!("-vault-address={}", bao.addr),
            "-log-level=debug".into(),
        ];
        let scratch = dir.join("sandbox");
        let command = Box::new(move || sandbox.command(&scratch, &argv));
        let process = Process::spawn("vault-k8s", command(), &cp.dir);
        let mut injector = Self {
            process,
            command,
            port,
        };
        injector.wait_ready();

        // The chart's injector-mutating-webhook.yaml, caBundle filled as its cert source would.
        let fixture = repo("tests/manifests/fixtures/vault-agent-injector-cfg.yaml");
        let mut mwc = yaml_documents(&fs::read_to_string(fixture).unwrap()).remove(0);
        mwc["webhooks"][0]["clientConfig"] = json!({
            "url": format!("https://127.0.0.1:{port}/mutate"),
            "caBundle": base64::engine::general_purpose::STANDARD.encode(&cp.ca.cert_pem),
        });
        cp.apply(&[mwc]);
        // The API server calls it only once its webhook informer has seen the configuration:
        // wait until a dry-run Pod asking for the agent comes back injected.
        let probe = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "injector-probe", "namespace": namespace,
                         "annotations": {"vault.hashicorp.com/agent-inject": "true",
                                         "vault.hashicorp.com/role": "probe"}},
            "spec": {"serviceAccountName": "vault-agent-injector",
                     "containers": [{"name": "c", "image": "busybox"}]},
        });
        admitted_eventually(cp, &probe, |p| {
            annotations(p).contains_key("vault.hashicorp.com/agent-inject-status")
        });
        injector
    }

    /// It serves only once its MutatingWebhookConfiguration informer has synced.
    fn wait_ready(&mut self) {
        wait_for_port(addr(self.port), &mut self.process, READY);
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }

    pub fn restart(&mut self, cp: &ControlPlane) {
        self.process.stop();
        self.process = Process::spawn("vault-k8s", (self.command)(), &cp.dir);
        self.wait_ready();
    }
}

// ---------------------------------------------------------------------------
// 5. Vault
// ---------------------------------------------------------------------------

/// `manifests/vault/setup.sh CLUSTER` against the dev server, as the README tells an admin to run
/// it, with the cluster's intermediate and the gateway's TLS files stored byte for byte.
pub fn setup_vault(
    cp: &ControlPlane,
    bao: &BaoDev,
    cluster: &str,
    ca: &Intermediate,
    tls: &Intermediate,
    secret_ttl: Option<&str>,
) {
    let write_dir = |name: &str, files: &BTreeMap<&str, String>| {
        let dir = cp.dir.join(name);
        fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            fs::write(dir.join(file), text).unwrap();
        }
        dir
    };
    let istiod_dir = write_dir(&format!("{cluster}-cacerts"), &ca.istiod_files());
    let tls_dir = write_dir(&format!("{cluster}-gateway-tls"), &tls.tls_files());
    let mut cmd = Command::new(repo("manifests/vault/setup.sh"));
    cmd.arg(cluster)
        .env("BAO_ADDR", &bao.addr)
        .env("BAO_TOKEN", &bao.token)
        .env("VAULT_CLI", &bao.bin)
        .env("KUBERNETES_HOST", cp.url())
        .env("KUBERNETES_CA_CERT", &cp.ca_file)
        .env("ISTIOD_CA_DIR", &istiod_dir)
        .env("GATEWAY_TLS_DIR", &tls_dir)
        .env("HOME", &cp.dir);
    if let Some(ttl) = secret_ttl {
        cmd.env("SECRET_TTL", ttl);
    }
    let out = run_with_timeout(cmd, None, &cp.dir, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "setup.sh {cluster}:\n{}",
        out.describe()
    );
}

/// A chart-rendered Pod fixture, as the ReplicaSet controller would create it.
pub fn pod_fixture(path: &str) -> Value {
    without_server_fields(serde_json::from_slice(&fs::read(repo(path)).unwrap()).unwrap())
}

/// A Pod as a client sends it: without what the API server writes itself (a client that sends
/// those is overruled anyway).
pub fn without_server_fields(mut pod: Value) -> Value {
    let meta = pod["metadata"].as_object_mut().unwrap();
    for field in [
        "managedFields",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        meta.remove(field);
    }
    pod.as_object_mut().unwrap().remove("status");
    pod
}

/// Creates `pod` and returns it as stored.
pub fn create_pod(cp: &ControlPlane, fixture: &str) -> Value {
    let body = serde_json::to_vec(&pod_fixture(fixture)).unwrap();
    let out = cp.kubectl_stdin(&["create", "-o", "json", "-f", "-"], Some(&body));
    serde_json::from_str(&out).unwrap()
}

pub fn annotations(pod: &Value) -> BTreeMap<String, String> {
    pod["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

/// The container `name` of a stored Pod.
pub fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {}", pod["spec"]))
}

pub fn container_names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| str_at(c, "name"))
        .collect()
}

/// Starts one of the Pod's Vault agent containers (`vault-agent-init` or the `vault-agent`
/// sidecar) with its own command (`/bin/sh -ec 'echo ${VAULT_CONFIG?} | base64 -d >
/// /home/vault/config.json && vault agent -config=…'`), env and volumes, unmodified. `vault` is
/// OpenBao's `bao`, which reads the same configuration. It logs in with the Pod-bound token
/// through the cluster's Kubernetes auth mount and renders into the Pod's secrets volume.
pub fn run_container(cp: &ControlPlane, pod: &PodFiles, container: &str) -> Process {
    let sandbox = pod
        .sandbox(container)
        .link("/usr/local/bin/vault", super::bao::find_bao());
    let argv = pod.argv(container, &[]);
    let dir = pod.dir.join(container);
    Process::spawn(
        &format!("{}-{container}", pod.name()),
        sandbox.command(&dir, &argv),
        &cp.dir,
    )
}

/// Waits for an init container to exit 0, as the kubelet does before it starts the next one.
pub fn wait_success(process: &mut Process, pod: &PodFiles) {
    match process.wait_exit(Duration::from_secs(90)) {
        Some(status) if status.success() => {}
        other => panic!(
            "{} of {} did not succeed ({other:?}); its log:\n{}",
            process.name,
            pod.name(),
            process.tail()
        ),
    }
}

/// The files in the Pod's secrets volume are exactly `expected`, byte for byte.
pub fn assert_rendered(pod: &PodFiles, expected: &BTreeMap<&str, String>) {
    let volume = pod.volume("vault-secrets");
    let mut found: Vec<String> = fs::read_dir(volume)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let want: Vec<String> = expected.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        found,
        want,
        "files rendered into {SECRETS} of {}",
        pod.name()
    );
    for (file, text) in expected {
        let got = fs::read(volume.join(file)).unwrap();
        assert!(
            got == text.as_bytes(),
            "{file} of {} differs from the Vault value: {}",
            pod.name(),
            diff_bytes(text.as_bytes(), &got)
        );
    }
}

/// istiod from the stored `discovery` container: its args, its env (with our ROOT_CA_DIR), its
/// volumes (the secrets volume vault-agent-init filled); loopback addresses and a kubeconfig.
pub struct Istiod {
    pub process: Process,
    pub secure_grpc: u16,
}

/// What istiod logs for a plugged-in CA, and for the self-signed fallback
/// (istio/istio pilot/pkg/bootstrap/istio_ca.go, createIstioCA and
/// createSelfSignedCACertificateOptions).
pub const PLUGGED_IN: [&str; 2] = [
    "Using istiod file format for signing ca files",
    "Use local CA certificate",
];
pub const SELF_SIGNED: [&str; 3] = [
    "Use self-signed certificate as the CA certificate",
    "Use local self-signed CA certificate for testing",
    "will create one",
];

impl Istiod {
    pub fn start(cp: &ControlPlane, pod: &PodFiles) -> Self {
        let secure_grpc = free_port();
        // The image's entrypoint is /usr/local/bin/pilot-discovery; the chart gives only args.
        let mut argv = pod.argv(
            "discovery",
            &[&peer("pilot-discovery").display().to_string()],
        );
        argv.extend([
            format!("--kubeconfig={}", cp.admin_kubeconfig.display()),
            format!("--httpAddr=127.0.0.1:{}", free_port()),
            format!("--httpsAddr=127.0.0.1:{}", free_port()),
            format!("--grpcAddr=127.0.0.1:{}", free_port()),
            format!("--secureGRPCAddr=127.0.0.1:{secure_grpc}"),
            format!("--monitoringAddr=127.0.0.1:{}", free_port()),
        ]);
        let sandbox = pod.sandbox("discovery");
        let command = sandbox.command(&pod.dir.join("discovery"), &argv);
        Self {
            process: Process::spawn("istiod", command, &cp.dir),
            secure_grpc,
        }
    }

    /// istiod logs that it uses the plugged-in CA (and never the self-signed fallback), publishes
    /// the Vault root in `istio-ca-root-cert`, and serves a certificate that chains to the Vault
    /// root through the cluster's intermediate.
    pub fn assert_uses_vault_ca(&mut self, cp: &ControlPlane, root: &Root, ca: &Intermediate) {
        for line in PLUGGED_IN {
            self.process.wait_for_log(line, READY);
        }
        let log = self.process.log_text();
        for line in SELF_SIGNED {
            assert!(
                !log.contains(line),
                "istiod fell back to a self-signed CA ({line:?}):\n{}",
                self.process.tail()
            );
        }

        let deadline = Instant::now() + READY;
        let published = loop {
            let out = cp.kubectl_output(
                &[
                    "get",
                    "configmap",
                    "istio-ca-root-cert",
                    "-n",
                    "istio-system",
                    "-o",
                    "json",
                ],
                None,
            );
            if out.status.success() {
                let cm: Value = serde_json::from_slice(&out.stdout).unwrap();
                break str_at(&cm["data"], "root-cert.pem");
            }
            self.process.assert_running();
            assert!(
                Instant::now() < deadline,
                "no istio-ca-root-cert ConfigMap:\n{}",
                self.process.tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(
            published.trim(),
            root.cert_pem.trim(),
            "istio-ca-root-cert is not the Vault root"
        );

        wait_for_port(addr(self.secure_grpc), &mut self.process, READY);
        self.assert_serves_chain_to(cp, root, ca);
    }

    /// The certificate on the secure gRPC port is issued by `ca` and verifies (`openssl verify`)
    /// up to `root` through it, and not directly by the root.
    pub fn assert_serves_chain_to(&self, cp: &ControlPlane, root: &Root, ca: &Intermediate) {
        let served = served_chain(self.secure_grpc, &cp.dir);
        assert!(served.len() >= 2, "istiod served no chain: {served:?}");
        assert_eq!(
            pem_body(&served[1]),
            pem_body(&ca.cert_pem),
            "istiod's serving certificate is not issued through the cluster1 intermediate"
        );
        let dir = cp.dir.join("istiod-served");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("leaf.pem"), &served[0]).unwrap();
        fs::write(dir.join("untrusted.pem"), served[1..].concat()).unwrap();
        fs::write(dir.join("root.pem"), &root.cert_pem).unwrap();
        let verify = |untrusted: bool| {
            let mut cmd = Command::new("openssl");
            cmd.current_dir(&dir)
                .args(["verify", "-CAfile", "root.pem"]);
            if untrusted {
                cmd.args(["-untrusted", "untrusted.pem"]);
            }
            cmd.arg("leaf.pem");
            run_with_timeout(cmd, None, &dir, Duration::from_secs(30))
        };
        let out = verify(true);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("leaf.pem: OK"),
            "openssl verify of istiod's certificate against the Vault root:\n{}",
            out.describe()
        );
        // And not directly by the root: the intermediate is what signs.
        assert!(!verify(false).status.success());
    }
}

/// The certificates a TLS server on 127.0.0.1:`port` sends, leaf first (`openssl s_client`).
pub fn served_chain(port: u16, dir: &Path) -> Vec<String> {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-servername",
        "istiod.istio-system.svc",
        "-alpn",
        "h2",
        "-showcerts",
    ]);
    let out = run_with_timeout(cmd, Some(b""), dir, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut certs = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let end_marker = "-----END CERTIFICATE-----";
        let end = rest[start..].find(end_marker).expect("an END line") + start + end_marker.len();
        certs.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    assert!(
        !certs.is_empty(),
        "openssl s_client got no certificate:\n{}",
        out.describe()
    );
    certs
}

pub fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

/// `kubectl create --dry-run=server`: every webhook and policy runs, nothing is stored.
pub fn try_create(cp: &ControlPlane, pod: &Value) -> Result<Value, String> {
    let body = serde_json::to_vec(pod).unwrap();
    let out = cp.kubectl_output(
        &["create", "--dry-run=server", "-o", "json", "-f", "-"],
        Some(&body),
    );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The istiod fixture with a fixed name, so the webhook's admission log can be searched for it.
pub fn named_pod(fixture: &str, name: &str, namespace: &str) -> Value {
    let mut pod = pod_fixture(fixture);
    let meta = pod["metadata"].as_object_mut().unwrap();
    meta.remove("generateName");
    meta.insert("name".into(), json!(name));
    meta.insert("namespace".into(), json!(namespace));
    pod
}

/// Retries a dry-run create until it is refused with `needle` in the error (informers and
/// watches take a moment to see a change); returns the error.
pub fn refused_eventually(cp: &ControlPlane, pod: &Value, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match try_create(cp, pod) {
            Err(e) if e.contains(needle) => return e,
            Err(e) => e,
            Ok(_) => "admitted".to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "expected a refusal with {needle:?}, last: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Retries a dry-run create until the API server admits `pod` and `done` holds for what it
/// returns (informers take a moment to see a new webhook or policy); returns that Pod.
pub fn admitted_eventually(cp: &ControlPlane, pod: &Value, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match try_create(cp, pod) {
            Ok(p) if done(&p) => return p,
            Ok(p) => format!("admitted as {}", p["metadata"]),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "not admitted as expected within 60 s: {last}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
