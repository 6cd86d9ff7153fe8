//! A mesh CA hierarchy as a multi-cluster Istio mesh has it: one root, one intermediate per
//! cluster (istiod signs workload certificates with it). Made by the product's own
//! `istio-vault-webhook certs root` / `certs intermediate` (Istio's Makefile defaults: RSA 4096),
//! so the real-control-plane tests also prove that istiod plugs in what `certs` writes.

// Shared by several test files, each of which uses a part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

const WEBHOOK: &str = env!("CARGO_BIN_EXE_istio-vault-webhook");

pub struct Root {
    pub cert_pem: String,
    dir: tempfile::TempDir,
}

/// One cluster's intermediate, in one file layout: file name -> contents.
pub struct Intermediate {
    pub cert_pem: String,
    pub files: BTreeMap<String, String>,
}

static SERIAL: AtomicUsize = AtomicUsize::new(0);

fn certs(args: &[&str]) {
    let out = Command::new(WEBHOOK)
        .arg("certs")
        .args(args)
        .output()
        .expect("running istio-vault-webhook certs");
    assert!(
        out.status.success(),
        "istio-vault-webhook certs {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_dir(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x != "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read_to_string(&p).unwrap())
        })
        .collect()
}

impl Root {
    /// `certs root`.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ivw-mesh-ca-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("root");
        certs(&["root", "--out-dir", root.to_str().unwrap()]);
        let cert_pem = fs::read_to_string(root.join("root-cert.pem")).unwrap();
        Self { cert_pem, dir }
    }

    /// `certs intermediate --cluster NAME` in the Istio layout: `ca-key.pem`, `ca-cert.pem`,
    /// `root-cert.pem`, `cert-chain.pem` (intermediate first, root last).
    pub fn intermediate(&self, cluster: &str) -> Intermediate {
        self.issue(cluster, "istio")
    }

    /// The same in the Kubernetes TLS layout a gateway profile reads: `tls.key`, `tls.crt`
    /// (intermediate then root), `ca.crt`.
    pub fn tls(&self, cluster: &str) -> Intermediate {
        self.issue(cluster, "tls")
    }

    fn issue(&self, cluster: &str, layout: &str) -> Intermediate {
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let out = self.dir.path().join(format!("{cluster}-{layout}-{n}"));
        let root = self.dir.path().join("root");
        certs(&[
            "intermediate",
            "--cluster",
            cluster,
            "--root-dir",
            root.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--layout",
            layout,
        ]);
        let files = read_dir(&out);
        let cert_pem = files
            .get("ca-cert.pem")
            .or_else(|| files.get("tls.crt"))
            .map(|chain| {
                // The intermediate is the first certificate of tls.crt.
                let end = "-----END CERTIFICATE-----";
                let i = chain.find(end).expect("a certificate") + end.len();
                format!("{}\n", &chain[..i])
            })
            .unwrap();
        Intermediate { cert_pem, files }
    }
}

impl Intermediate {
    /// The files istiod reads from `ROOT_CA_DIR` (or a gateway from its secret volume).
    pub fn istiod_files(&self) -> BTreeMap<&str, String> {
        self.files
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect()
    }

    pub fn tls_files(&self) -> BTreeMap<&str, String> {
        self.istiod_files()
    }
}
