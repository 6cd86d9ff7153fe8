//! A mesh CA hierarchy as a multi-cluster Istio mesh has it: one root, one intermediate per
//! cluster (istiod signs workload certificates with it), written in istiod's plug-in layout.

// Shared by several test files, each of which uses a part.
#![allow(dead_code)]

use std::collections::BTreeMap;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub struct Root {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// One cluster's intermediate: the four files istiod reads from `ROOT_CA_DIR`.
pub struct Intermediate {
    pub cert_pem: String,
    pub key_pem: String,
    pub root_pem: String,
}

fn ca_params(cn: &str, constraint: BasicConstraints) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Istio");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(constraint);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = rcgen::KeyIdMethod::Sha256;
    p.use_authority_key_identifier_extension = true;
    p
}

impl Root {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("root key");
        let params = ca_params("Root CA", BasicConstraints::Unconstrained);
        let cert_pem = params.self_signed(&key).expect("root cert").pem();
        Self {
            cert_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// `cluster`'s intermediate (path length 0: it signs only workload certificates).
    pub fn intermediate(&self, cluster: &str) -> Intermediate {
        let key = KeyPair::generate().expect("intermediate key");
        let mut params = ca_params(
            &format!("Intermediate CA {cluster}"),
            BasicConstraints::Constrained(0),
        );
        let mut dn = params.distinguished_name.clone();
        dn.push(DnType::LocalityName, cluster);
        params.distinguished_name = dn;
        let cert_pem = params
            .signed_by(&key, &self.issuer)
            .expect("intermediate")
            .pem();
        Intermediate {
            cert_pem,
            key_pem: key.serialize_pem(),
            root_pem: self.cert_pem.clone(),
        }
    }
}

impl Intermediate {
    /// The Istio layout, by file name: `cert-chain.pem` is the intermediate first, root last.
    pub fn istiod_files(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("ca-key.pem", self.key_pem.clone()),
            ("ca-cert.pem", self.cert_pem.clone()),
            ("root-cert.pem", self.root_pem.clone()),
            (
                "cert-chain.pem",
                format!("{}{}", self.cert_pem, self.root_pem),
            ),
        ])
    }

    /// The Kubernetes TLS layout a gateway profile reads.
    pub fn tls_files(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("tls.crt", format!("{}{}", self.cert_pem, self.root_pem)),
            ("tls.key", self.key_pem.clone()),
            ("ca.crt", self.root_pem.clone()),
        ])
    }
}
