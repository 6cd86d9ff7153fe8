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
    pub mod kube;
    pub mod mesh_ca;
    pub mod peers;
    pub mod pod;
    pub mod webhook;
}

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use support::bao::{BaoDev, diff_bytes, free_port, run_with_timeout};
use support::kube::{ControlPlane, Process, addr, wait_for_port, yaml_documents};
use support::mesh_ca::{Intermediate, Root};
use support::peers::{istio_source, peer};
use support::pod::{PodFiles, Sandbox, str_at};
use support::webhook::{shipped_manifests, start_webhook};

const WEBHOOK: &str = env!("CARGO_BIN_EXE_istio-vault-webhook");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const SECRETS: &str = "/vault/secrets";
/// Generous: two cores also build and run everything else.
const READY: Duration = Duration::from_secs(120);

fn repo(path: &str) -> PathBuf {
    Path::new(REPO).join(path)
}

#[test]
fn istiod_takes_its_ca_from_vault_through_the_real_control_plane() {
    assert!(
        nix_is_root(),
        "the real-control-plane test runs Pods' containers in mount namespaces and needs root"
    );
    // 1. The API server.
    let cp = ControlPlane::start("cluster1");

    // 2. The shipped manifests, the webhook reached by URL instead of Service.
    let webhook_port = free_port();
    let objects = shipped_manifests(&cp, webhook_port);
    cp.apply(&objects);
    assert_guard_type_checks(&cp);

    // 3. Our webhook, as its own ServiceAccount.
    let mut webhook = start_webhook(&cp, webhook_port, WEBHOOK);

    // 5. (before 4: the injector's config names the Vault address) OpenBao, set up by the
    // shipped script.
    let root = Root::new();
    let cluster1 = root.intermediate("cluster1");
    let gateway_tls = root.intermediate("ingressgateway");
    let bao = BaoDev::start();
    setup_vault(&cp, &bao, "cluster1", &cluster1, &gateway_tls);

    // 4. The Vault Agent Injector.
    let mut injector = Injector::start(&cp, &bao);

    // 6. The istiod Pod, through both webhooks, in a cluster with Istio's base chart (CRDs).
    apply_istio_crds(&cp);
    opt_in_namespace(&cp, "istio-system");
    create_service_account(&cp, "istio-system", "istiod", true);
    let stored = create_pod(&cp, "tests/fixtures/pods/istiod.json");
    assert_injected_istiod(&stored);

    // 7. vault-agent-init, as the kubelet would run it.
    let istiod_pod = PodFiles::new(&cp, stored, &cp.dir.join("pods/istiod"));
    run_init_agent(&cp, &istiod_pod);
    assert_rendered(&istiod_pod, &cluster1.istiod_files());

    // 8. istiod plugs in the Vault CA.
    let mut istiod = Istiod::start(&cp, &istiod_pod);
    istiod.assert_uses_vault_ca(&cp, &root, &cluster1);
    istiod.process.stop();

    // 9. An ingress gateway Pod gets its files the same way, and no ROOT_CA_DIR.
    opt_in_namespace(&cp, "istio-ingress");
    create_service_account(&cp, "istio-ingress", "istio-ingressgateway", true);
    let stored = create_pod(&cp, "tests/fixtures/pods/ingressgateway.json");
    assert_injected_gateway(&stored);
    let gateway_pod = PodFiles::new(&cp, stored, &cp.dir.join("pods/ingressgateway"));
    run_init_agent(&cp, &gateway_pod);
    assert_rendered(&gateway_pod, &gateway_tls.tls_files());

    // 10. How it fails, through the real API server.
    never_sent_to_us(&cp, &mut webhook);
    refusals(&cp, &mut webhook, &mut injector);
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

// ---------------------------------------------------------------------------
// 2. Manifests
// ---------------------------------------------------------------------------

/// The API server type-checks a ValidatingAdmissionPolicy's CEL after accepting it and reports
/// problems in `status.typeChecking`, not as an apply warning: wait for it and require none.
fn assert_guard_type_checks(cp: &ControlPlane) {
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
fn apply_istio_crds(cp: &ControlPlane) {
    let crds = istio_source().join("manifests/charts/base/files/crd-all.gen.yaml");
    let text = fs::read_to_string(&crds).unwrap_or_else(|e| panic!("{}: {e}", crds.display()));
    let out = cp.kubectl_output(
        &["apply", "--server-side", "-f", "-"],
        Some(text.as_bytes()),
    );
    assert!(out.status.success(), "Istio CRDs:\n{}", out.describe());
}

fn opt_in_namespace(cp: &ControlPlane, name: &str) {
    cp.apply(&[json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"istio-vault-webhook/inject": "enabled"}},
    })]);
}

/// A ServiceAccount (no controller-manager makes them here). With `auth_delegator`, it may call
/// TokenReview: Vault's Kubernetes auth then reviews the logging-in Pod's token with that same
/// token (setup.sh without TOKEN_REVIEWER_JWT), as the README's Vault section describes.
fn create_service_account(cp: &ControlPlane, namespace: &str, name: &str, auth_delegator: bool) {
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

// ---------------------------------------------------------------------------
// 4. The Vault Agent Injector
// ---------------------------------------------------------------------------

/// vault-k8s `agent-inject`, with only in-cluster credentials (it knows no other:
/// subcommand/injector/command.go calls rest.InClusterConfig), registered as the Vault Helm chart
/// registers it: `vault-agent-injector-cfg`, its rules, `failurePolicy: Ignore`.
struct Injector {
    process: Process,
    command: Box<dyn Fn() -> Command>,
    port: u16,
}

impl Injector {
    fn start(cp: &ControlPlane, bao: &BaoDev) -> Self {
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
        injector
    }

    /// It serves only once its MutatingWebhookConfiguration informer has synced.
    fn wait_ready(&mut self) {
        wait_for_port(addr(self.port), &mut self.process, READY);
    }

    fn stop(&mut self) {
        self.process.stop();
    }

    fn restart(&mut self, cp: &ControlPlane) {
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
fn setup_vault(
    cp: &ControlPlane,
    bao: &BaoDev,
    cluster: &str,
    ca: &Intermediate,
    tls: &Intermediate,
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
    let out = run_with_timeout(cmd, None, &cp.dir, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "setup.sh {cluster}:\n{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------
// 6. Pods through both webhooks
// ---------------------------------------------------------------------------

/// A chart-rendered Pod fixture, as the ReplicaSet controller would create it.
fn pod_fixture(path: &str) -> Value {
    let mut pod: Value = serde_json::from_slice(&fs::read(repo(path)).unwrap()).unwrap();
    // Written by the API server itself; a client that sends them is overruled anyway.
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
fn create_pod(cp: &ControlPlane, fixture: &str) -> Value {
    let body = serde_json::to_vec(&pod_fixture(fixture)).unwrap();
    let out = cp.kubectl_stdin(&["create", "-o", "json", "-f", "-"], Some(&body));
    serde_json::from_str(&out).unwrap()
}

fn annotations(pod: &Value) -> BTreeMap<String, String> {
    pod["metadata"]["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

fn container_names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| str_at(c, "name"))
        .collect()
}

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
    let discovery = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "discovery")
        .unwrap();
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
// 7. vault-agent-init
// ---------------------------------------------------------------------------

/// Runs the Pod's `vault-agent-init` container: its own command (`/bin/sh -ec 'echo
/// ${VAULT_CONFIG?} | base64 -d > /home/vault/config.json && vault agent -config=…'`), env and
/// volumes, unmodified. `vault` is OpenBao's `bao`, which reads the same configuration. It logs in
/// with the Pod-bound token through `auth/kubernetes-cluster1`, renders the files and exits.
fn run_init_agent(cp: &ControlPlane, pod: &PodFiles) {
    let sandbox = pod
        .sandbox("vault-agent-init")
        .link("/usr/local/bin/vault", support::bao::find_bao());
    let argv = pod.argv("vault-agent-init", &[]);
    let dir = pod.dir.join("vault-agent-init");
    let mut agent = Process::spawn(
        &format!("{}-vault-agent-init", pod.name()),
        sandbox.command(&dir, &argv),
        &cp.dir,
    );
    match agent.wait_exit(Duration::from_secs(90)) {
        Some(status) if status.success() => {}
        other => panic!(
            "vault-agent-init of {} did not succeed ({other:?}); its log:\n{}",
            pod.name(),
            agent.tail()
        ),
    }
}

/// The files in the Pod's secrets volume are exactly `expected`, byte for byte.
fn assert_rendered(pod: &PodFiles, expected: &BTreeMap<&str, String>) {
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

// ---------------------------------------------------------------------------
// 8. istiod
// ---------------------------------------------------------------------------

/// istiod from the stored `discovery` container: its args, its env (with our ROOT_CA_DIR), its
/// volumes (the secrets volume vault-agent-init filled); loopback addresses and a kubeconfig.
struct Istiod {
    process: Process,
    secure_grpc: u16,
}

/// What istiod logs for a plugged-in CA, and for the self-signed fallback
/// (istio/istio pilot/pkg/bootstrap/istio_ca.go, createIstioCA and
/// createSelfSignedCACertificateOptions).
const PLUGGED_IN: [&str; 2] = [
    "Using istiod file format for signing ca files",
    "Use local CA certificate",
];
const SELF_SIGNED: [&str; 3] = [
    "Use self-signed certificate as the CA certificate",
    "Use local self-signed CA certificate for testing",
    "will create one",
];

impl Istiod {
    fn start(cp: &ControlPlane, pod: &PodFiles) -> Self {
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
    fn assert_uses_vault_ca(&mut self, cp: &ControlPlane, root: &Root, ca: &Intermediate) {
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
fn served_chain(port: u16, dir: &Path) -> Vec<String> {
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

fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

// ---------------------------------------------------------------------------
// 10. How it fails
// ---------------------------------------------------------------------------

/// `kubectl create --dry-run=server`: every webhook and policy runs, nothing is stored.
fn try_create(cp: &ControlPlane, pod: &Value) -> Result<Value, String> {
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
fn named_pod(fixture: &str, name: &str, namespace: &str) -> Value {
    let mut pod = pod_fixture(fixture);
    let meta = pod["metadata"].as_object_mut().unwrap();
    meta.remove("generateName");
    meta.insert("name".into(), json!(name));
    meta.insert("namespace".into(), json!(namespace));
    pod
}

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
    admitted_eventually(cp, &istiod);

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
    let objects = shipped_manifests(cp, 0);
    let config: Vec<Value> = objects
        .into_iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .collect();
    cp.apply(&config);
    admitted_eventually(cp, &istiod);

    // The injector down: its failurePolicy Ignore lets the Pod through uninjected, the guard
    // refuses it.
    injector.stop();
    let why = refused_eventually(cp, &istiod, guard);
    assert!(why.contains("ValidatingAdmissionPolicy"), "{why}");
    injector.restart(cp);
    admitted_eventually(cp, &istiod);

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

/// Retries a dry-run create until it is refused with `needle` in the error (informers and
/// watches take a moment to see a change); returns the error.
fn refused_eventually(cp: &ControlPlane, pod: &Value, needle: &str) -> String {
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

fn admitted_eventually(cp: &ControlPlane, pod: &Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match try_create(cp, pod) {
            Ok(p) if annotations(&p).contains_key("vault.hashicorp.com/agent-inject-status") => {
                return;
            }
            other => assert!(
                Instant::now() < deadline,
                "istiod not admitted injected: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
