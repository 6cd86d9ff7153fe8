//! A CA and serving certificate generated in memory (rcgen). The private
//! keys never touch disk; only the CA certificate is ever written out.

use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// One generated CA with the serving certificate it signed.
pub struct SelfSigned {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub key: CertifiedKey,
    pub not_after: OffsetDateTime,
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
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("istio-vault-webhook CA {}", now.unix_timestamp()),
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
    })
}
