//! `serve --tls-self-signed --webhook-config NAME` against a fake API
//! server: replicas keep the MutatingWebhookConfiguration's caBundle
//! trusting their in-memory CAs, together, through conflicts, resets and
//! rotations; an API-server-like client that trusts only the final bundle
//! gets admission answers from each replica.

// Public so that helpers this file does not call are not dead code: each
// test file takes only the support modules it uses.
pub mod support {
    pub mod fake_apiserver;
    pub mod review;
    pub mod runtime;
}

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use support::fake_apiserver::{self, FakeApiServer, webhook_config};
use support::review;
use support::runtime::{self as rt, CONFIG_C1, SERVICE_DNS, Server};

const MWC: &str = "istio-vault-webhook";
const MWC_PATH: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
const WAIT: Duration = Duration::from_secs(15);

fn config_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, CONFIG_C1).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn replica(fake: &FakeApiServer, config: &str, extra: &[&str]) -> Server {
    let url = fake.url();
    let mut args = vec![
        "--config",
        config,
        "--tls-self-signed",
        "--webhook-config",
        MWC,
        "--kube-api",
        &url,
    ];
    args.extend_from_slice(extra);
    rt::start(&args).await
}

/// The certificates (DER) of a PEM bundle (undecodable blocks skipped).
fn ders(pem: &[u8]) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(|c| c.ok().map(|c| c.to_vec()))
        .collect()
}

fn ca_der(r: &Server) -> Vec<u8> {
    let d = ders(r.ca_pem.as_ref().unwrap().as_bytes());
    assert_eq!(d.len(), 1);
    d.into_iter().next().unwrap()
}

/// Waits until every webhook's bundle contains each of `cas`.
async fn bundles_trust(fake: &FakeApiServer, cas: &[Vec<u8>], what: &str) -> Vec<Vec<u8>> {
    rt::eventually(what, WAIT, async || {
        let bundles = fake.ca_bundles(MWC);
        (!bundles.is_empty()
            && bundles
                .iter()
                .all(|b| cas.iter().all(|ca| ders(b).contains(ca))))
        .then_some(bundles)
    })
    .await
}

async fn ready(r: &Server) -> rt::Response {
    rt::eventually("/readyz 200", WAIT, async || {
        let resp = rt::admin_get(r.admin_addr, "/readyz").await;
        (resp.status == 200).then_some(resp)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_webhook_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir);
    let fake = FakeApiServer::start().await;
    fake.apply_webhook_config(webhook_config(MWC, 2, b""));
    // Writes race as they do when a Deployment starts two replicas at once;
    // on top of that, the first two updates lose against another writer.
    fake.inject_conflicts(2);
    let (a, b) = tokio::join!(replica(&fake, &config, &[]), replica(&fake, &config, &[]));
    let (ca_a, ca_b) = (ca_der(&a), ca_der(&b));
    assert_ne!(ca_a, ca_b, "each replica has its own CA");

    let bundles = bundles_trust(
        &fake,
        &[ca_a.clone(), ca_b.clone()],
        "both CAs in every caBundle",
    )
    .await;
    assert_eq!(bundles.len(), 2);
    for r in [&a, &b] {
        let body = ready(r).await.text();
        assert!(body.contains("trusts this replica (2 webhooks)"), "{body}");
    }

    // Conflicts happened and were retried, not lost.
    assert!(
        fake.count("PUT", MWC_PATH, 409) >= 2,
        "{:#?}",
        fake.requests()
    );
    let mut conflicts = 0.0;
    for r in [&a, &b] {
        let m = rt::admin_get(r.admin_addr, "/metrics").await.text();
        conflicts += rt::metric(
            &m,
            "istio_vault_webhook_ca_bundle_reconciles_total{result=\"conflict\"}",
        );
        assert_eq!(
            rt::metric(&m, "istio_vault_webhook_ca_bundle_trusted "),
            1.0,
            "{m}"
        );
    }
    assert!(conflicts >= 2.0, "conflicts counted: {conflicts}");
    // The rest of the object survived the read-modify-write.
    let obj = fake
        .get(fake_apiserver::Kind::MutatingWebhookConfiguration, "", MWC)
        .unwrap();
    assert_eq!(
        obj["webhooks"][1]["x-future-field"]["kept"], true,
        "{obj:#}"
    );
    assert_eq!(obj["metadata"]["labels"]["app"], "istio-vault-webhook");

    // An API-server-like client trusting only the final bundle verifies
    // each replica for the Service name and gets an admission answer.
    for bundle in &bundles {
        for (name, r) in [("a", &a), ("b", &b)] {
            let v = rt::admit(
                r.https_addr,
                bundle,
                SERVICE_DNS,
                &review::istiod_review("u"),
            )
            .await;
            assert!(
                v.allowed && v.config_hash().is_some(),
                "replica {name}: {v:?}"
            );
        }
    }

    // A replica that stops withdraws its CA; the other's stays.
    a.stop().await;
    let after = fake.ca_bundles(MWC);
    for bundle in &after {
        let d = ders(bundle);
        assert!(
            !d.contains(&ca_a),
            "stopped replica's CA withdrawn; requests: {:#?}",
            fake.requests()
        );
        assert!(d.contains(&ca_b), "running replica's CA kept");
    }
    rt::admit(
        b.https_addr,
        &after[0],
        SERVICE_DNS,
        &review::istiod_review("u"),
    )
    .await;
    b.stop().await;
}

/// `openssl verify -CAfile <bundle> <leaf>` for the Service name, the check
/// `curl --cacert` and `openssl s_client` make: Ok, or what OpenSSL said.
fn openssl_verify(
    dir: &std::path::Path,
    bundle: &[u8],
    leaf_der: &[u8],
    name: &str,
) -> Result<(), String> {
    use istio_vault_webhook::tls::bundle::CaCert;
    let bundle_path = dir.join("bundle.pem");
    let leaf_path = dir.join(format!("leaf-{name}.pem"));
    std::fs::write(&bundle_path, bundle).unwrap();
    let leaf = CaCert::from_der(leaf_der.to_vec()).expect("a certificate");
    std::fs::write(&leaf_path, leaf.pem()).unwrap();
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&bundle_path)
        .args(["-purpose", "sslserver", "-verify_hostname", SERVICE_DNS])
        .arg(&leaf_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (install it to run this test): {e}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl verify of replica {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Two CAs generated in the same second, merged into one bundle as the
/// replicas do: OpenSSL must find each leaf's own CA, not the first one.
#[test]
fn self_signed_identities_of_one_second_each_verify_with_openssl() {
    use istio_vault_webhook::tls::{bundle, self_signed};
    let names = self_signed::service_names("istio-vault-webhook", "istio-vault-webhook");
    let validity = Duration::from_secs(3600);
    // Same second, like two replicas of one Deployment: retry the rare
    // pair that straddles a second boundary.
    let (a, b) = loop {
        let second = time::OffsetDateTime::now_utc().unix_timestamp();
        let a = self_signed::generate(&names, validity).unwrap();
        let b = self_signed::generate(&names, validity).unwrap();
        if time::OffsetDateTime::now_utc().unix_timestamp() == second {
            break (a, b);
        }
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let bundle = bundle::merge(b"", &[a.ca(), b.ca()], &[], now).bundle;
    let dir = tempfile::tempdir().unwrap();
    let failures: Vec<String> = [("a", &a), ("b", &b)]
        .into_iter()
        .filter_map(|(name, s)| openssl_verify(dir.path(), &bundle, &s.key.cert[0], name).err())
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The same through two replicas started at once: each served chain
/// verifies with OpenSSL against the caBundle the API server ends up with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_each_verify_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir);
    let fake = FakeApiServer::start().await;
    fake.apply_webhook_config(webhook_config(MWC, 1, b""));
    let (a, b) = tokio::join!(replica(&fake, &config, &[]), replica(&fake, &config, &[]));
    let bundle = bundles_trust(&fake, &[ca_der(&a), ca_der(&b)], "both CAs in the caBundle")
        .await
        .remove(0);
    let mut failures = Vec::new();
    for (name, r) in [("a", &a), ("b", &b)] {
        let tls = rt::tls_connect(
            r.https_addr,
            rt::client_config(rt::roots(&bundle), None),
            SERVICE_DNS,
        )
        .await
        .unwrap_or_else(|e| panic!("replica {name}: {e}"));
        let served = rt::peer_cert(&tls);
        failures.extend(openssl_verify(dir.path(), &bundle, &served, name).err());
    }
    assert!(failures.is_empty(), "{failures:#?}");
    for r in [a, b] {
        r.stop().await;
    }
}

/// A CA certificate that expired yesterday.
fn expired_ca_pem() -> String {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(30);
    p.not_after = now - time::Duration::days(1);
    p.self_signed(&key).unwrap().pem()
}

fn foreign_ca_pem() -> String {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_by_kubectl_apply_is_repaired_and_bundle_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir);
    let fake = FakeApiServer::start().await;
    fake.apply_webhook_config(webhook_config(MWC, 1, b""));
    let r = replica(&fake, &config, &[]).await;
    let ours = ca_der(&r);
    bundles_trust(&fake, std::slice::from_ref(&ours), "our CA published").await;
    ready(&r).await;

    // `kubectl apply` of the chart resets caBundle: to nothing …
    fake.apply_webhook_config(webhook_config(MWC, 1, b""));
    bundles_trust(
        &fake,
        std::slice::from_ref(&ours),
        "caBundle repaired after reset to empty",
    )
    .await;

    // … or to a bundle with another CA, an expired one and junk.
    let foreign = foreign_ca_pem();
    let expired = expired_ca_pem();
    let dirty = format!(
        "# copied from somewhere\n{foreign}-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n{expired}"
    );
    fake.apply_webhook_config(webhook_config(MWC, 1, dirty.as_bytes()));
    let foreign_der = ders(foreign.as_bytes()).remove(0);
    let bundles = bundles_trust(
        &fake,
        &[foreign_der.clone(), ours.clone()],
        "caBundle repaired after reset to a foreign bundle",
    )
    .await;
    let got = ders(&bundles[0]);
    assert_eq!(
        got,
        vec![foreign_der, ours],
        "foreign CA kept first, expired and junk dropped"
    );
    assert!(!String::from_utf8_lossy(&bundles[0]).contains("copied"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_configuration_is_filled_when_created() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir);
    let fake = FakeApiServer::start().await;
    let r = replica(&fake, &config, &[]).await;
    // Nothing calls the webhook through a configuration that does not exist:
    // ready, and the body says what is going on.
    let body = ready(&r).await.text();
    assert!(
        body.contains("MutatingWebhookConfiguration istio-vault-webhook not found"),
        "{body}"
    );

    fake.apply_webhook_config(webhook_config(MWC, 3, b""));
    let bundles = bundles_trust(
        &fake,
        &[ca_der(&r)],
        "caBundle set once the configuration exists",
    )
    .await;
    assert_eq!(bundles.len(), 3);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unready_until_the_api_server_trusts_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir);
    let fake = FakeApiServer::start().await;
    fake.apply_webhook_config(webhook_config(MWC, 1, b""));
    fake.stop().await;
    let r = replica(&fake, &config, &[]).await;
    let resp = rt::eventually("/readyz explains the caBundle failure", WAIT, async || {
        let resp = rt::admin_get(r.admin_addr, "/readyz").await;
        resp.text()
            .contains("cannot read MutatingWebhookConfiguration")
            .then_some(resp)
    })
    .await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(
        resp.text().contains("does not trust this replica yet"),
        "{}",
        resp.text()
    );

    fake.restart().await;
    bundles_trust(
        &fake,
        &[ca_der(&r)],
        "caBundle set once the API server is back",
    )
    .await;
    ready(&r).await;
    r.stop().await;
}

/// Verifies the server certificate against the caBundle stored in the fake
/// API server *at the moment of the handshake* — what an API server whose
/// informer is up to date would do.
struct LiveBundle {
    fake: FakeApiServer,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl std::fmt::Debug for LiveBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveBundle")
    }
}

impl ServerCertVerifier for LiveBundle {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.fake.ca_bundles(MWC).remove(0);
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(rt::roots(&bundle)),
            rt::provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        self.seen.lock().unwrap().push(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rt::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rt::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rt::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_publishes_the_new_ca_before_serving_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir);
    let ca_out = dir.path().join("ca.pem");
    let fake = FakeApiServer::start().await;
    fake.apply_webhook_config(webhook_config(MWC, 1, b""));
    // 6 s lifetime: rotation every ~4 s.
    let r = replica(
        &fake,
        &config,
        &[
            "--self-signed-validity",
            "6s",
            "--ca-out",
            ca_out.to_str().unwrap(),
        ],
    )
    .await;
    bundles_trust(&fake, &[ca_der(&r)], "first CA published").await;
    // Each publication takes a while: a replica that switched certificates
    // before the API server confirmed would be caught in that window.
    fake.delay_writes(Duration::from_millis(300));

    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut client = rustls::ClientConfig::builder_with_provider(rt::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LiveBundle {
            fake: fake.clone(),
            seen: seen.clone(),
        }))
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Full handshakes only: a resumed session presents no certificate.
    client.resumption = rustls::client::Resumption::disabled();

    // Handshake continuously through two rotations: every single one must
    // verify against the bundle as it is at that instant.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut handshakes = 0;
    loop {
        let tls = rt::tls_connect(r.https_addr, client.clone(), SERVICE_DNS)
            .await
            .unwrap_or_else(|e| panic!("handshake {handshakes} failed: the served certificate was not trusted by the caBundle at that moment: {e}"));
        let mut c = rt::Http1::new(tls);
        let resp = c
            .request("POST", "/mutate", &review::istiod_review("r"))
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        handshakes += 1;
        let mut distinct = seen.lock().unwrap().clone();
        distinct.dedup();
        let distinct: std::collections::BTreeSet<_> = distinct.into_iter().collect();
        if distinct.len() >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} serving certificates seen in {handshakes} handshakes",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = rt::admin_get(r.admin_addr, "/metrics").await.text();
    assert!(
        rt::metric(&m, "istio_vault_webhook_tls_certificate_rotations_total ") >= 2.0,
        "{m}"
    );
    // The ca-out file trusts the certificate served now.
    let current = r.certs.current();
    let out = std::fs::read(&ca_out).unwrap();
    let roots = rt::roots(&out);
    let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), rt::provider())
        .build()
        .unwrap();
    v.verify_server_cert(
        &current.cert[0],
        &[],
        &ServerName::try_from(SERVICE_DNS).unwrap(),
        &[],
        UnixTime::now(),
    )
    .expect("--ca-out trusts the current serving certificate");
    r.stop().await;
}
