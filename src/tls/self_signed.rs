//! A CA and serving certificate generated in memory (rcgen). The private
//! keys never touch disk; only the CA certificate is ever written out.
//!
//! Rotation: when less than a third of the lifetime remains, a new CA and
//! serving certificate are generated; the new CA is published first (into
//! the webhook configuration's caBundle and/or the `--ca-out` file) next to
//! the old one, and only once the API server has confirmed the update (plus
//! a short propagation delay for other API server replicas' informers) do
//! new TLS handshakes get the new certificate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::CertStore;
use super::bundle::CaCert;
use super::ca_bundle::CaBundle;
use crate::backoff::Backoff;
use crate::metrics::Metrics;

/// Between failed attempts to publish the next CA: the current certificate
/// is still valid for a third of its life, so there is no hurry.
const PUBLISH_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// One generated CA with the serving certificate it signed.
pub struct SelfSigned {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub key: CertifiedKey,
    pub not_after: OffsetDateTime,
    /// The lifetime asked for (not counting the clock-skew allowance).
    pub validity: Duration,
}

impl SelfSigned {
    pub fn ca(&self) -> CaCert {
        CaCert {
            der: self.ca_der.clone(),
            not_after: self.not_after.unix_timestamp(),
        }
    }

    /// When to rotate: once less than a third of the lifetime remains.
    pub fn renew_at(&self) -> OffsetDateTime {
        self.not_after - self.validity / 3
    }
}

/// The DNS names the API server may use for a Service: `svc`, `svc.ns`,
/// `svc.ns.svc` (it verifies `<service>.<namespace>.svc`), plus the
/// cluster-local FQDN.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Generates a CA valid for `validity` and a serving certificate for
/// `dns_names` (and 127.0.0.1 / ::1 for local use).
pub fn generate(dns_names: &[String], validity: Duration) -> anyhow::Result<SelfSigned> {
    let now = OffsetDateTime::now_utc();
    // Tolerate clock skew between this Pod and the API server.
    let not_before = now - time::Duration::minutes(5);
    let not_after = now + validity;

    let ca_key = KeyPair::generate().context("generating CA key")?;
    let mut ca = CertificateParams::default();
    // Every replica's CA ends up in one caBundle. OpenSSL takes the first
    // CA of the bundle that looks like the leaf's issuer and tries no other
    // (openssl/openssl crypto/x509/x509_lu.c, X509_STORE_CTX_get1_issuer);
    // "looks like" is the subject name plus, when the leaf carries one, the
    // authority key identifier (crypto/x509/v3_purp.c, X509_check_issued).
    // Two CAs of one name without identifiers make it check one replica's
    // leaf against the other's key. Hence a subject unique per CA key and
    // key identifiers on both certificates.
    ca.key_identifier_method = KeyIdMethod::Sha256;
    ca.use_authority_key_identifier_extension = true;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        ca_common_name(replica_name().as_deref(), &ca.key_identifier(&ca_key)),
    );
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).context("self-signing CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate().context("generating serving key")?;
    let mut leaf =
        CertificateParams::new(dns_names.to_vec()).context("serving certificate names")?;
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    leaf.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    leaf.distinguished_name = dn;
    // rcgen writes a subject key identifier only next to basicConstraints,
    // so the leaf states CA:FALSE explicitly.
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_identifier_method = KeyIdMethod::Sha256;
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &issuer)
        .context("signing serving certificate")?;

    let key = super::certified_key_from_pem(
        leaf_cert.pem().as_bytes(),
        leaf_key.serialize_pem().as_bytes(),
    )?;
    Ok(SelfSigned {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().to_vec(),
        key,
        not_after,
        validity,
    })
}

/// RFC 5280's upper bound for a common name (`ub-common-name`).
const MAX_COMMON_NAME: usize = 64;

/// `istio-vault-webhook CA <replica> <hex>`: the replica says which Pod made
/// the CA (for whoever reads a caBundle), the hex (the first 8 bytes of the
/// CA's key identifier, a digest of its freshly generated key) makes the
/// name unique even for two replicas of one name started in one second.
fn ca_common_name(replica: Option<&str>, key_id: &[u8]) -> String {
    const PREFIX: &str = "istio-vault-webhook CA";
    let hex: String = key_id.iter().take(8).map(|b| format!("{b:02x}")).collect();
    // The Deployment's Pods are istio-vault-webhook-<hash>-<suffix>: the
    // prefix already says the first part.
    let Some(replica) = replica
        .map(|r| r.strip_prefix("istio-vault-webhook-").unwrap_or(r))
        .filter(|r| !r.is_empty())
    else {
        return format!("{PREFIX} {hex}");
    };
    // Keep the end of a long Pod name: Pods of one workload differ in their
    // hash and random suffix, not in their prefix.
    let room = MAX_COMMON_NAME.saturating_sub(PREFIX.len() + hex.len() + 2);
    let tail = &replica[replica.len().saturating_sub(room)..];
    let tail = tail.trim_start_matches(['-', '.']);
    format!("{PREFIX} {tail} {hex}")
}

/// The Pod this process runs in: `POD_NAME` (the downward API) when set,
/// else the host name, which the kubelet sets to the Pod name. Printable
/// ASCII only, so the subject stays a plain string.
fn replica_name() -> Option<String> {
    let raw = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    let name: String = raw.chars().filter(char::is_ascii_graphic).collect();
    (!name.is_empty()).then_some(name)
}

/// Rotates a self-signed CA and serving certificate before they expire.
pub struct Rotator {
    pub names: Vec<String>,
    pub validity: Duration,
    pub certs: Arc<CertStore>,
    /// The webhook configuration whose caBundle must trust the CA.
    pub bundle: Option<Arc<CaBundle>>,
    /// `--ca-out`: rewritten with the old and new CA before the switch.
    pub ca_out: Option<PathBuf>,
    pub metrics: Arc<Metrics>,
}

impl Rotator {
    /// Time between publishing a new CA and serving with it: lets every API
    /// server replica's informer see the new caBundle first.
    pub fn propagation_delay(&self) -> Duration {
        (self.validity / 20).min(Duration::from_secs(10))
    }

    /// Rotates `current` (already served and published) forever.
    pub async fn run(self, mut current: SelfSigned, shutdown: CancellationToken) {
        loop {
            // Sleep in bounded steps: tokio timers cap out near two years,
            // and the wall clock may jump while the Pod is suspended.
            loop {
                let left = current.renew_at() - OffsetDateTime::now_utc();
                let Ok(left) = Duration::try_from(left) else {
                    break;
                };
                if left.is_zero() {
                    break;
                }
                if !pause(left.min(Duration::from_secs(3600)), &shutdown).await {
                    return;
                }
            }
            let next = match generate(&self.names, self.validity) {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot generate the next certificate");
                    if !pause(Duration::from_secs(10), &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let both = [current.ca(), next.ca()];
            let mut failures = 0u32;
            loop {
                match self.publish(&both).await {
                    Ok(()) => break,
                    Err(e) => {
                        let wait = PUBLISH_BACKOFF.pause(failures);
                        failures += 1;
                        tracing::warn!(
                            error = %format!("{e:#}"),
                            retry_in_s = wait.as_secs_f32(),
                            "cannot publish the next CA; still serving the current certificate"
                        );
                        if !pause(wait, &shutdown).await {
                            return;
                        }
                    }
                }
            }
            if !pause(self.propagation_delay(), &shutdown).await {
                return;
            }
            self.certs.set(next.key.clone());
            if let Some(bundle) = &self.bundle {
                // The old CA stays in the bundle until it expires (or this
                // replica shuts down): connections made before the switch
                // finish on it.
                bundle.require(vec![next.ca()]);
            }
            self.metrics.tls_rotated();
            tracing::info!(
                not_after = %next.not_after,
                renew_at = %next.renew_at(),
                "self-signed CA and serving certificate rotated"
            );
            current = next;
        }
    }

    async fn publish(&self, cas: &[CaCert]) -> anyhow::Result<()> {
        if let Some(path) = &self.ca_out {
            let pem: String = cas.iter().map(CaCert::pem).collect();
            write_atomic(path, pem.as_bytes())?;
        }
        if let Some(bundle) = &self.bundle {
            bundle.require(cas.to_vec());
            let outcome = bundle.reconcile(None).await?;
            tracing::info!(
                webhook_config = bundle.name(),
                ?outcome,
                "next CA published next to the current one"
            );
        }
        Ok(())
    }
}

/// Sleeps `d` unless shut down first; false when shut down.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Replaces a public file atomically (readers never see half a bundle).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use x509_parser::extensions::ParsedExtension;

    use super::*;

    #[test]
    fn common_name_fits_rfc_5280_and_keeps_the_end_of_a_long_pod_name() {
        let id = [0xab; 20];
        assert_eq!(
            ca_common_name(Some("istio-vault-webhook-7d4b9c8f6-abcde"), &id),
            "istio-vault-webhook CA 7d4b9c8f6-abcde abababababababab"
        );
        assert_eq!(
            ca_common_name(Some("webhook-6f7c9-x2k4p"), &id),
            "istio-vault-webhook CA webhook-6f7c9-x2k4p abababababababab"
        );
        assert_eq!(
            ca_common_name(None, &id),
            "istio-vault-webhook CA abababababababab"
        );
        let long = format!("{}-7d4b9c8f6-abcde", "x".repeat(80));
        let cn = ca_common_name(Some(&long), &id);
        assert_eq!(cn.len(), MAX_COMMON_NAME, "{cn}");
        assert!(cn.ends_with("x-7d4b9c8f6-abcde abababababababab"), "{cn}");
        // A cut never leaves the name starting with a separator.
        let cn = ca_common_name(
            Some(&format!("a{}-{}", "b".repeat(30), "c".repeat(23))),
            &id,
        );
        assert!(cn.starts_with("istio-vault-webhook CA ccc"), "{cn}");
        assert!(cn.len() <= MAX_COMMON_NAME, "{cn}");
    }

    /// (subject, subject key id, authority key id) of a certificate.
    fn ids(der: &[u8]) -> (String, Option<Vec<u8>>, Option<Vec<u8>>) {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let (mut ski, mut aki) = (None, None);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => {}
            }
        }
        (cert.subject().to_string(), ski, aki)
    }

    #[test]
    fn every_ca_has_its_own_subject_and_leaves_name_their_ca_key() {
        let names = service_names("svc", "ns");
        let a = generate(&names, Duration::from_secs(60)).unwrap();
        let b = generate(&names, Duration::from_secs(60)).unwrap();
        let (subject_a, ca_ski_a, ca_aki_a) = ids(&a.ca_der);
        let (subject_b, ..) = ids(&b.ca_der);
        assert_ne!(subject_a, subject_b);
        assert!(
            subject_a.starts_with("CN=istio-vault-webhook CA "),
            "{subject_a}"
        );
        let ca_ski_a = ca_ski_a.expect("CA subject key identifier");
        assert_eq!(
            ca_aki_a.as_ref(),
            Some(&ca_ski_a),
            "self-signed CA names itself"
        );
        let (_, leaf_ski, leaf_aki) = ids(&a.key.cert[0]);
        assert!(leaf_ski.is_some(), "leaf subject key identifier");
        assert_eq!(leaf_aki, Some(ca_ski_a), "leaf names its CA's key");
    }
}
