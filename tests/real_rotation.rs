//! Rotation without a restart, on the real chain (tests/support/chain.rs): the `vault-agent`
//! sidecar that vault-k8s put in the stored istiod Pod runs beside istiod; a new cluster1
//! intermediate (same root) is written into Vault; the sidecar rewrites the files in place,
//! istiod reloads its CA without restarting and the certificate it serves next chains through the
//! new intermediate.
//!
//! cluster1 is KV v1, where the agent re-reads a secret after about 90% of its lease: the
//! secret's `ttl` key, which `setup.sh` writes (SECRET_TTL; 3 s here, 1 h by default).

mod support {
    pub mod bao;
    pub mod chain;
    pub mod kube;
    pub mod mesh_ca;
    pub mod peers;
    pub mod pod;
    pub mod webhook;
}

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use support::bao::BaoDev;
use support::chain::{Cluster, Istiod, Options, READY, pem_body, run_container, served_chain};
use support::mesh_ca::Root;

/// What istiod logs when it has loaded a new intermediate from `ROOT_CA_DIR`
/// (istio/istio pilot/pkg/bootstrap/istio_ca.go, `handleEvent`).
const RELOADED: &str =
    "Istiod has detected the newly added intermediate CA and updated its key and certs accordingly";

#[test]
fn a_rotated_intermediate_reaches_istiod_without_a_restart() {
    let root = Root::new();
    let bao = BaoDev::start();
    let options = Options {
        secret_ttl: Some("3s"),
        ..Options::default()
    };
    let cluster = Cluster::start("cluster1", &root, &bao, options);
    let cp = &cluster.cp;
    let pod = cluster.istiod_pod();
    let mut istiod = Istiod::start(cp, &pod);
    istiod.assert_uses_vault_ca(cp, &root, &cluster.ca);
    let pid = istiod.process.id();

    // The sidecar, from the stored Pod (rotation: sidecar), as the kubelet starts it.
    let mut sidecar = run_container(cp, &pod, "vault-agent");
    // Its first read is of the old intermediate (what vault-agent-init rendered); only then
    // rotate, so what follows is a re-read, not a first render.
    sidecar.wait_for_log("template server received new token", READY);
    sidecar.wait_for_log("(runner) starting", READY);
    std::thread::sleep(Duration::from_secs(1));

    // A new intermediate for cluster1 under the same root, written where the templates read.
    let rotated = root.intermediate("cluster1");
    let files = cp.dir.join("cluster1-rotated");
    fs::create_dir_all(&files).unwrap();
    let mut args = vec![
        "write".to_string(),
        "kubernetes-cluster1-secrets/istiod-service/certs".to_string(),
        "ttl=3s".to_string(),
    ];
    for (file, key) in [
        ("ca-key.pem", "ca_key"),
        ("ca-cert.pem", "ca_cert"),
        ("root-cert.pem", "root_cert"),
        ("cert-chain.pem", "cert_chain"),
    ] {
        fs::write(files.join(file), &rotated.istiod_files()[file]).unwrap();
        args.push(format!("{key}=@{}", files.join(file).display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let written = Instant::now();
    bao.cli(&args);

    // The files change in place, to exactly the new values.
    let volume = pod.volume("vault-secrets").to_path_buf();
    let want = rotated.istiod_files();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now: BTreeMap<&str, String> = want
            .keys()
            .map(|f| (*f, fs::read_to_string(volume.join(f)).unwrap_or_default()))
            .collect();
        if now == want {
            break;
        }
        sidecar.assert_running();
        assert!(
            Instant::now() < deadline,
            "the sidecar did not re-render the rotated intermediate within 60 s; its log:\n{}",
            sidecar.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rendered_after = written.elapsed();

    // istiod reloads it, without a restart: same process, still running.
    istiod.process.wait_for_log(RELOADED, READY);
    assert_eq!(istiod.process.id(), pid, "istiod was restarted");
    istiod.process.assert_running();

    // The certificate it serves next chains through the new intermediate.
    let deadline = Instant::now() + READY;
    loop {
        let served = served_chain(istiod.secure_grpc, &cp.dir);
        if served.len() > 1 && pem_body(&served[1]) == pem_body(&rotated.cert_pem) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "istiod still serves a certificate from the old intermediate"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    istiod.assert_serves_chain_to(cp, &root, &rotated);
    eprintln!(
        "rotated intermediate rendered {rendered_after:?} after the write; istiod reloaded it"
    );
}
