//! The upstream binaries the real-control-plane tests run: etcd, kube-apiserver, kubectl,
//! vault-k8s and pilot-discovery, built by `scripts/build-peers` (versions in
//! `scripts/peers.env`) and linked into `.tools/peers/`. A missing binary fails the test with
//! the command that builds it: these tests are the proof, they never skip.

// Shared by several test files, each of which uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `$IVW_PEERS_DIR/<name>`, else `<repo>/.tools/peers/<name>`.
pub fn peer(name: &str) -> PathBuf {
    let dir = std::env::var_os("IVW_PEERS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/peers"));
    let path = dir.join(name);
    let usable = std::fs::metadata(&path).is_ok_and(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.is_dir() || (m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    assert!(
        usable,
        "{} is missing: run `scripts/build-peers` (it builds etcd, kube-apiserver, kubectl, \
         vault-k8s and istiod from the Go module proxy), or point IVW_PEERS_DIR at a directory \
         holding them",
        path.display()
    );
    path
}

/// The directory of the Istio module the istiod binary was built from (CRDs, tools/certs).
pub fn istio_source() -> PathBuf {
    let link = peer("istio-src");
    std::fs::canonicalize(&link).unwrap_or(link)
}
