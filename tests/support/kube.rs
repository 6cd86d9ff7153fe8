//! A real Kubernetes control plane on loopback: etcd and kube-apiserver, started the way
//! controller-runtime's envtest starts them (pkg/internal/testing/controlplane/apiserver.go),
//! plus `kubectl` against it. There is no controller-manager, scheduler or kubelet: tests create
//! ServiceAccounts and Pods themselves, and run a Pod's containers with `support::pod`.
//!
//! What is deliberately like a cluster: RBAC authorization, ServiceAccount tokens (TokenRequest,
//! TokenReview) signed by the API server's own key, the default admission plugins (the
//! ServiceAccount plugin adds the token volume vault-k8s needs), webhooks called over TLS.
//! What is not: webhooks are reached by `clientConfig.url` on 127.0.0.1 (there is no
//! kube-proxy to route a `service`), and nothing ever schedules or runs a Pod by itself.

// Shared by several test files, each of which uses a part.
#![allow(dead_code)]

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::Value;

use super::bao::{ChildGuard, Output, free_port, run_with_timeout, tail};
use super::peers::peer;

/// How long etcd and the API server may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one kubectl call may take.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// A long-running process whose output goes to a log file; killed when dropped.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    guard: ChildGuard,
}

impl Process {
    /// Starts `cmd` with stdout and stderr appended to `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = file.try_clone().expect("cloning a log file handle");
        cmd.stdin(Stdio::null()).stdout(file).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_string(),
            log,
            guard: ChildGuard::new(child),
        }
    }

    pub fn id(&self) -> u32 {
        self.guard.id()
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    pub fn tail(&self) -> String {
        tail(&self.log, 6000)
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.guard.try_wait() {
            panic!("{} exited ({status}); its log:\n{}", self.name, self.tail());
        }
    }

    /// Waits until the log contains `needle`; panics (with the log) on exit or timeout.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} within {timeout:?}; its log:\n{}",
                self.name,
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.guard.wait_timeout(timeout)
    }

    pub fn stop(&mut self) {
        self.guard.kill();
    }
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, process: &mut Process, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        process.assert_running();
        assert!(
            Instant::now() < deadline,
            "{} does not listen on {addr} after {timeout:?}; its log:\n{}",
            process.name,
            process.tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A CA that signs serving and client certificates (rcgen, ECDSA P-256).
pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct KeyPairPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(common_name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signing the CA");
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A serving certificate for `names` (DNS names or IP addresses).
    pub fn serving(&self, names: &[&str]) -> KeyPairPem {
        let mut params = CertificateParams::default();
        for name in names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().expect("a DNS name")),
            });
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0]);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: Kubernetes takes the user from CN and the groups from O.
    pub fn client(&self, user: &str, group: &str) -> KeyPairPem {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        dn.push(DnType::OrganizationName, group);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> KeyPairPem {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        KeyPairPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

// ---------------------------------------------------------------------------
// etcd + kube-apiserver
// ---------------------------------------------------------------------------

/// etcd and kube-apiserver on loopback, killed (and their data removed) when dropped. A fresh
/// one per test: namespace deletion never finishes without a controller-manager.
pub struct ControlPlane {
    /// Scratch directory: certificates, kubeconfigs, every process log.
    pub dir: PathBuf,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub port: u16,
    pub admin_kubeconfig: PathBuf,
    controller_manager: Option<Process>,
    pub apiserver: Process,
    /// Dropped after the API server (fields drop in order).
    _etcd: Process,
    tmp: Option<tempfile::TempDir>,
}

impl Drop for ControlPlane {
    /// A failed test keeps its directory (every process log is there) and says where.
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(tmp) = self.tmp.take()
        {
            eprintln!(
                "kept the control plane's directory for inspection: {}",
                tmp.keep().display()
            );
        }
    }
}

impl ControlPlane {
    pub fn start(name: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("ivw-{name}-"))
            .tempdir()
            .expect("a temp dir");
        let dir = tmp.path().to_path_buf();

        // etcd: envtest's flags, on free loopback ports, without fsync (a test's data is
        // thrown away).
        let (client, peer_port) = (free_port(), free_port());
        let mut etcd = Command::new(peer("etcd"));
        etcd.arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=default=http://127.0.0.1:{peer_port}"
            ))
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        let mut etcd = Process::spawn("etcd", etcd, &dir);
        wait_for_port(
            format!("127.0.0.1:{client}").parse().unwrap(),
            &mut etcd,
            START_TIMEOUT,
        );

        let ca = TestCa::new(&format!("{name} cluster CA"));
        let serving = ca.serving(&[
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "10.0.0.1",
        ]);
        let admin = ca.client("admin", "system:masters");
        let write = |file: &str, text: &str| {
            let path = dir.join(file);
            fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            path
        };
        let ca_file = write("ca.crt", &ca.cert_pem);
        let tls_cert = write("apiserver.crt", &serving.cert_pem);
        let tls_key = write("apiserver.key", &serving.key_pem);
        // One ECDSA key signs ServiceAccount tokens; TokenReview checks them with its public half
        // (which k8s.io/client-go/util/keyutil reads only from a PUBLIC KEY block, not PKCS#8).
        let sa = KeyPair::generate().expect("SA key");
        let sa_key = write("service-account.key", &sa.serialize_pem());
        let sa_pub = write("service-account.pub", &sa.public_key_pem());

        let port = free_port();
        let mut api = Command::new(peer("kube-apiserver"));
        api.arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--tls-cert-file={}", tls_cert.display()))
            .arg(format!("--tls-private-key-file={}", tls_key.display()))
            .arg(format!("--client-ca-file={}", ca_file.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--allow-privileged=true")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            // Where the API server would otherwise write self-signed certificates.
            .arg(format!(
                "--cert-dir={}",
                dir.join("apiserver-certs").display()
            ));
        let apiserver = Process::spawn("kube-apiserver", api, &dir);

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            port,
            &ca.cert_pem,
            Credentials::Cert(&admin),
        );
        let mut this = Self {
            dir,
            ca,
            ca_file,
            port,
            admin_kubeconfig,
            controller_manager: None,
            apiserver,
            _etcd: etcd,
            tmp: Some(tmp),
        };
        // Ready means every post-start hook ran: RBAC bootstrap roles exist, the default
        // namespace and the kubernetes Service are there.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = this.kubectl_output(&["get", "--raw", "/readyz"], None);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                break;
            }
            this.apiserver.assert_running();
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready after {START_TIMEOUT:?}: {}\nits log:\n{}",
                out.describe(),
                this.apiserver.tail()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        // kube-controller-manager with one controller: the ValidatingAdmissionPolicy type
        // checker, which reports CEL problems in status.typeChecking (the API server does not).
        let mut kcm = Command::new(peer("kube-controller-manager"));
        kcm.arg(format!("--kubeconfig={}", this.admin_kubeconfig.display()))
            .arg("--controllers=validatingadmissionpolicy-status-controller")
            .arg("--leader-elect=false")
            .arg("--secure-port=0");
        this.controller_manager = Some(Process::spawn("kube-controller-manager", kcm, &this.dir));
        this
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Runs kubectl as cluster admin and returns what it printed, whatever its exit code.
    pub fn kubectl_output(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        kubectl_with(&self.admin_kubeconfig, &self.dir, args, stdin)
    }

    /// Runs kubectl as cluster admin; panics unless it succeeds. Returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.kubectl_output(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {} failed\n{}",
            args.join(" "),
            out.describe()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl get -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["get", "-o", "json"];
        all.extend_from_slice(args);
        let out = self.kubectl(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {all:?}: not JSON ({e})"))
    }

    /// Creates (or updates) objects from JSON, and fails on any warning the API server returns:
    /// a deprecated field or a CEL expression that does not type-check is a defect of ours.
    pub fn apply(&self, objects: &[Value]) -> String {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let body = serde_json::to_vec(&list).unwrap();
        let out = self.kubectl_output(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&body),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("Warning"),
            "kubectl apply was refused or warned\n{}",
            out.describe()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A ServiceAccount token from the TokenRequest API (`kubectl create token`), optionally
    /// bound to a Pod and for other audiences than the API server's.
    pub fn token(
        &self,
        namespace: &str,
        sa: &str,
        pod: Option<&str>,
        audience: Option<&str>,
    ) -> String {
        let mut args = vec!["create", "token", sa, "-n", namespace, "--duration=1h"];
        let bound;
        if let Some(pod) = pod {
            bound = format!("--bound-object-name={pod}");
            args.extend_from_slice(&["--bound-object-kind=Pod", &bound]);
        }
        let aud;
        if let Some(audience) = audience {
            aud = format!("--audience={audience}");
            args.push(&aud);
        }
        self.kubectl(&args).trim().to_string()
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/sa` with a fresh token.
    pub fn service_account_kubeconfig(&self, namespace: &str, sa: &str) -> PathBuf {
        let token = self.token(namespace, sa, None, None);
        let path = self.dir.join(format!("{namespace}-{sa}.kubeconfig"));
        write_kubeconfig(
            &path,
            self.port,
            &self.ca.cert_pem,
            Credentials::Token(&token),
        );
        path
    }
}

pub enum Credentials<'a> {
    Cert(&'a KeyPairPem),
    Token(&'a str),
}

pub fn write_kubeconfig(path: &Path, port: u16, ca_pem: &str, credentials: Credentials<'_>) {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user = match credentials {
        Credentials::Cert(kp) => serde_json::json!({
            "client-certificate-data": b64(&kp.cert_pem),
            "client-key-data": b64(&kp.key_pem),
        }),
        Credentials::Token(token) => serde_json::json!({"token": token}),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": format!("https://127.0.0.1:{port}"),
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    });
    fs::write(path, serde_json::to_vec_pretty(&config).unwrap())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// kubectl with `kubeconfig`; its output is kept in `<dir>/kubectl/`.
pub fn kubectl_with(kubeconfig: &Path, dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let logs = dir.join("kubectl");
    fs::create_dir_all(&logs).unwrap();
    let mut cmd = Command::new(peer("kubectl"));
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", dir)
        .current_dir(dir);
    run_with_timeout(cmd, stdin, &logs, KUBECTL_TIMEOUT)
}

/// `kubectl kustomize DIR` with the pinned kubectl, parsed into objects.
pub fn kustomize(dir: &Path, scratch: &Path) -> Vec<Value> {
    let mut cmd = Command::new(peer("kubectl"));
    cmd.arg("kustomize").arg(dir).env("HOME", scratch);
    let out = run_with_timeout(cmd, None, scratch, KUBECTL_TIMEOUT);
    assert!(
        out.status.success(),
        "kubectl kustomize {}\n{}",
        dir.display(),
        out.describe()
    );
    yaml_documents(&String::from_utf8_lossy(&out.stdout))
}

/// The objects of a multi-document YAML stream, as JSON values.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}
