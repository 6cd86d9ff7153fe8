//! Certificates from files: kubelet's Secret-volume update (a `..data`
//! symlink swapped atomically) reaches new connections without a restart
//! while existing ones finish; `--client-ca` requires a client certificate
//! signed by that CA.

// Public so that helpers this file does not call are not dead code: each
// test file takes only the support modules it uses.
pub mod support {
    pub mod review;
    pub mod runtime;
}

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::review;
use support::runtime::{self as rt, CONFIG_C1, SERVICE_DNS};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certificate (PEM) and key (PEM) signed by `ca`.
fn leaf(ca: &Ca, names: &[&str], eku: ExtendedKeyUsagePurpose, days: i64) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.extended_key_usages = vec![eku];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::days(days);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn config_file(dir: &Path) -> String {
    let path = dir.join("config.yaml");
    std::fs::write(&path, CONFIG_C1).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Writes a Secret volume's payload the way kubelet's AtomicWriter does:
/// a fresh timestamped directory, a `..data_tmp` symlink to it renamed over
/// `..data`, then the old directory removed. `tls.crt`/`tls.key` are
/// symlinks to `..data/…` created once.
fn kubelet_write(volume: &Path, generation: u32, cert: &str, key: &str) {
    use std::os::unix::fs::symlink;
    let ts = format!("..2026_01_01_00_00_0{generation}.00000000{generation}");
    let dir = volume.join(&ts);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), key).unwrap();
    let old = std::fs::read_link(volume.join("..data")).ok();
    let tmp = volume.join("..data_tmp");
    symlink(&ts, &tmp).unwrap();
    std::fs::rename(&tmp, volume.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(volume.join(f)).is_err() {
            symlink(format!("..data/{f}"), volume.join(f)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(volume.join(old)).unwrap();
    }
}

fn not_after(pem: &str) -> i64 {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    istio_vault_webhook::tls::not_after(&der).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_symlink_swap_reloads_the_serving_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("tls");
    std::fs::create_dir(&volume).unwrap();
    let ca1 = ca("ca one");
    let ca2 = ca("ca two");
    let (cert1, key1) = leaf(
        &ca1,
        &[SERVICE_DNS],
        ExtendedKeyUsagePurpose::ServerAuth,
        30,
    );
    let (cert2, key2) = leaf(
        &ca2,
        &[SERVICE_DNS],
        ExtendedKeyUsagePurpose::ServerAuth,
        60,
    );
    kubelet_write(&volume, 1, &cert1, &key1);

    let config = config_file(dir.path());
    let crt = volume.join("tls.crt");
    let key = volume.join("tls.key");
    let r = rt::start(&[
        "--config",
        &config,
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;

    // A keep-alive connection made before the rotation.
    let tls = rt::tls_connect(
        r.https_addr,
        rt::client_config(rt::roots(ca1.pem.as_bytes()), None),
        SERVICE_DNS,
    )
    .await
    .expect("first certificate served");
    let first = rt::peer_cert(&tls);
    let mut before = rt::Http1::new(tls);
    let resp = before
        .request("POST", "/mutate", &review::istiod_review("a"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);

    kubelet_write(&volume, 2, &cert2, &key2);

    // New connections get the new certificate within seconds.
    let second = rt::eventually(
        "new connections get the new certificate",
        Duration::from_secs(10),
        async || {
            let tls = rt::tls_connect(
                r.https_addr,
                rt::client_config(rt::roots(ca2.pem.as_bytes()), None),
                SERVICE_DNS,
            )
            .await
            .ok()?;
            Some(rt::peer_cert(&tls))
        },
    )
    .await;
    assert_ne!(first, second);
    let expected = CertificateDer::from_pem_slice(cert2.as_bytes()).unwrap();
    assert_eq!(second, expected.to_vec());
    // And no longer the old one.
    assert!(
        rt::tls_connect(
            r.https_addr,
            rt::client_config(rt::roots(ca1.pem.as_bytes()), None),
            SERVICE_DNS
        )
        .await
        .is_err()
    );

    // The connection made before finishes on the certificate it started with.
    let resp = before
        .request("POST", "/mutate", &review::istiod_review("b"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["response"]["uid"], "b");

    let m = rt::admin_get(r.admin_addr, "/metrics").await.text();
    assert_eq!(
        rt::metric(
            &m,
            "istio_vault_webhook_tls_certificate_not_after_timestamp_seconds "
        ),
        not_after(&cert2) as f64,
        "{m}"
    );
    r.stop().await;
}

fn client_identity(
    cert: &str,
    key: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        CertificateDer::pem_slice_iter(cert.as_bytes())
            .map(Result::unwrap)
            .collect(),
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
}

/// Whether a request with `config` gets an answer (TLS 1.3 reports a
/// refused client certificate only after the client's handshake is done).
async fn answered(addr: std::net::SocketAddr, config: rustls::ClientConfig) -> bool {
    let Ok(tls) = rt::tls_connect(addr, config, SERVICE_DNS).await else {
        return false;
    };
    let mut c = rt::Http1::new(tls);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), c.request("POST", "/mutate", &review::istiod_review("c"))).await,
        Ok(Ok(resp)) if resp.status == 200
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_requires_a_certificate_signed_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = ca("api server client CA");
    let other_ca = ca("someone else");
    let ca_path = dir.path().join("client-ca.pem");
    std::fs::write(&ca_path, &client_ca.pem).unwrap();
    let config = config_file(dir.path());
    let r = rt::start(&[
        "--config",
        &config,
        "--tls-self-signed",
        "--client-ca",
        ca_path.to_str().unwrap(),
    ])
    .await;
    let server_ca = r.ca_pem.clone().unwrap();

    let none = rt::client_config(rt::roots(server_ca.as_bytes()), None);
    assert!(
        !answered(r.https_addr, none).await,
        "a client without a certificate is refused"
    );

    let (c, k) = leaf(
        &other_ca,
        &["kube-apiserver"],
        ExtendedKeyUsagePurpose::ClientAuth,
        30,
    );
    let wrong = rt::client_config(
        rt::roots(server_ca.as_bytes()),
        Some(client_identity(&c, &k)),
    );
    assert!(
        !answered(r.https_addr, wrong).await,
        "a certificate from another CA is refused"
    );

    let (c, k) = leaf(
        &client_ca,
        &["kube-apiserver"],
        ExtendedKeyUsagePurpose::ClientAuth,
        30,
    );
    let good = rt::client_config(
        rt::roots(server_ca.as_bytes()),
        Some(client_identity(&c, &k)),
    );
    assert!(
        answered(r.https_addr, good).await,
        "a certificate signed by --client-ca gets through"
    );
    r.stop().await;
}
