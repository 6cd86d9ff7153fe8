//! Two clusters, one root: the seed's multi-cluster mesh on the real chain
//! (tests/support/chain.rs). Two API servers with the shipped overlays `cluster1` and
//! `cluster2`, one OpenBao with each cluster's auth mount and KV mount made by
//! `manifests/vault/setup.sh`, one root and two intermediates. Each istiod plugs in its own
//! intermediate; the certificate each serves verifies against the other cluster's
//! `root-cert.pem` (shared trust); and cluster1's istiod cannot read cluster2's CA, because the
//! Vault policy refuses it.

mod support {
    pub mod bao;
    pub mod chain;
    pub mod kube;
    pub mod mesh_ca;
    pub mod peers;
    pub mod pod;
    pub mod webhook;
}

use std::fs;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::bao::{BaoDev, run_with_timeout};
use support::chain::{Cluster, Istiod, Options, pem_body, served_chain};
use support::mesh_ca::Root;
use support::pod::str_at;

#[test]
fn two_clusters_trust_one_root_and_keep_their_intermediates_apart() {
    let root = Root::new();
    let bao = BaoDev::start();
    let one = Cluster::start("cluster1", &root, &bao, Options::default());
    let two = Cluster::start("cluster2", &root, &bao, Options::default());

    let mut istiods = Vec::new();
    let mut pods = Vec::new();
    for cluster in [&one, &two] {
        let pod = cluster.istiod_pod();
        let mut istiod = Istiod::start(&cluster.cp, &pod);
        istiod.assert_uses_vault_ca(&cluster.cp, &root, &cluster.ca);
        istiods.push(istiod);
        pods.push(pod);
    }

    // Shared trust: each istiod's certificate verifies against the other cluster's root file.
    for (i, j) in [(0, 1), (1, 0)] {
        let served = served_chain(istiods[i].secure_grpc, &one.cp.dir);
        let own = if i == 0 { &one.ca } else { &two.ca };
        assert_eq!(pem_body(&served[1]), pem_body(&own.cert_pem));
        let dir = one.cp.dir.join(format!("cross-{i}-{j}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("leaf.pem"), &served[0]).unwrap();
        fs::write(dir.join("untrusted.pem"), served[1..].concat()).unwrap();
        let other_root = pods[j].volume("vault-secrets").join("root-cert.pem");
        let mut cmd = Command::new("openssl");
        cmd.current_dir(&dir)
            .arg("verify")
            .arg("-CAfile")
            .arg(&other_root);
        cmd.args(["-untrusted", "untrusted.pem", "leaf.pem"]);
        let out = run_with_timeout(cmd, None, &dir, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "cluster{}'s istiod does not verify against cluster{}'s root-cert.pem:\n{}",
            i + 1,
            j + 1,
            out.describe()
        );
    }

    // Separation: cluster1's istiod logs in as its agent does and may read its own CA only.
    let token = one
        .cp
        .token("istio-system", "istiod", Some(&pods[0].name()), None);
    let jwt = one.cp.dir.join("istiod.jwt");
    fs::write(&jwt, token).unwrap();
    let login = bao.cli(&[
        "write",
        "-format=json",
        "auth/kubernetes-cluster1/login",
        "role=istiod",
        &format!("jwt=@{}", jwt.display()),
    ]);
    let login: Value = serde_json::from_slice(&login.stdout).unwrap();
    let client_token = str_at(&login["auth"], "client_token");
    let read = |path: &str| {
        let mut cmd = bao.command();
        cmd.env("BAO_TOKEN", &client_token)
            .args(["read", "-format=json", path]);
        run_with_timeout(cmd, None, &one.cp.dir, Duration::from_secs(30))
    };
    let own = read("kubernetes-cluster1-secrets/istiod-service/certs");
    assert!(
        own.status.success(),
        "cluster1's istiod cannot read its own CA:\n{}",
        own.describe()
    );
    let other = read("kubernetes-cluster2-secrets/istiod-service/certs");
    let refusal = String::from_utf8_lossy(&other.stderr).into_owned();
    assert!(
        !other.status.success() && refusal.contains("permission denied"),
        "cluster1's istiod read cluster2's CA:\n{}",
        other.describe()
    );
    eprintln!(
        "cluster1's istiod reading cluster2's CA: {}",
        refusal.trim()
    );
    // And cluster2's auth mount does not accept cluster1's token at all (another issuer's keys).
    let cross = bao
        .command()
        .args([
            "write",
            "auth/kubernetes-cluster2/login",
            "role=istiod",
            &format!("jwt=@{}", jwt.display()),
        ])
        .output()
        .unwrap();
    assert!(
        !cross.status.success(),
        "cluster2's auth mount accepted cluster1's token"
    );
}
