//! `certs root` and `certs intermediate` (SPEC §8): the Istio CA hierarchy that Istio's
//! `tools/certs` Makefiles make with openssl (`make root-ca`, `make <cluster>-cacerts`), with the
//! same subjects, extensions, key type and lifetimes, written as istiod's plug-in files and as
//! the JSON body of `bao kv put PATH @file` / `vault kv put PATH @file`.
//!
//! What the Makefiles give (common.mk, Makefile.selfsigned.mk of the Istio module):
//! - root: `openssl genrsa 4096`, 3650 days, subject `O=Istio, CN=Root CA`, SHA-256,
//!   subjectKeyIdentifier=hash, basicConstraints=critical,CA:true,
//!   keyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment,keyCertSign;
//! - intermediate: `openssl genrsa 4096`, 3650 days, subject `O=Istio, CN=Intermediate CA,
//!   L=<cluster>`, SHA-256, subjectKeyIdentifier=hash, authorityKeyIdentifier (openssl's
//!   default), basicConstraints=critical,CA:true,pathlen:0, the same keyUsage,
//!   subjectAltName=DNS:istiod.istio-system.svc.
//!
//! Keys are generated here (RSA with the `rsa` crate, ECDSA with ring through rcgen) and every
//! signature is made by ring. Nothing is shelled out.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// File names of `certs root`, the ones `make root-ca` writes.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// `certs` subcommands.
#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CertsCommand {
    /// Make a self-signed root CA (root-key.pem, root-cert.pem) as Istio's `make root-ca` does.
    Root(RootArgs),
    /// Make a cluster's intermediate CA signed by the root, as Istio's `make <cluster>-cacerts`
    /// does: istiod's files plus the JSON body for `bao kv put PATH @FILE`.
    Intermediate(IntermediateArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyType {
    /// RSA (Istio's Makefiles), --key-size bits.
    Rsa,
    /// ECDSA key on P-256 (it signs with SHA-256).
    EcdsaP256,
    /// ECDSA key on P-384 (it signs with SHA-384).
    EcdsaP384,
}

#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// Key algorithm of the new key. Istio's Makefiles make RSA keys.
    #[arg(long, value_enum, default_value = "rsa")]
    pub key_type: KeyType,
    /// RSA modulus size in bits: 2048, 3072 or 4096 [default: 4096, as Istio's Makefiles].
    #[arg(long, value_name = "BITS", value_parser = parse_rsa_bits)]
    pub key_size: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct RootArgs {
    /// Directory for root-key.pem (mode 0600) and root-cert.pem; created (0700) if missing.
    /// The root key stays here: only `certs intermediate --root-dir` reads it.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Lifetime in days (ROOTCA_DAYS).
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Subject O (ROOTCA_ORG).
    #[arg(long, default_value = "Istio")]
    pub org: String,
    /// Subject CN (ROOTCA_CN).
    #[arg(long, default_value = "Root CA")]
    pub cn: String,
    /// Replace files that already exist (otherwise an existing file is an error).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// ca-key.pem, ca-cert.pem, root-cert.pem, cert-chain.pem (intermediate then root).
    Istio,
    /// tls.key, tls.crt (intermediate then root), ca.crt (root): a kubernetes.io/tls Secret.
    Tls,
}

#[derive(Debug, Clone, Args)]
pub struct IntermediateArgs {
    /// Cluster name: the subject's L, as `make <cluster>-cacerts`. Default: the config's `cluster`.
    #[arg(long, value_name = "NAME", required_unless_present = "config")]
    pub cluster: Option<String>,
    /// Directory holding root-cert.pem and root-key.pem (as `certs root` or `make root-ca`
    /// wrote them).
    #[arg(long, value_name = "DIR", required_unless_present_all = ["root_cert", "root_key"])]
    pub root_dir: Option<PathBuf>,
    /// Root certificate (PEM) [default: <root-dir>/root-cert.pem].
    #[arg(long, value_name = "FILE")]
    pub root_cert: Option<PathBuf>,
    /// Root private key (PEM: PKCS#8, or PKCS#1 for RSA) [default: <root-dir>/root-key.pem].
    #[arg(long, value_name = "FILE")]
    pub root_key: Option<PathBuf>,
    /// Directory for the intermediate's files; created (0700) if missing [default: <cluster>].
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// File layout [default: the config's istiod `files`, else istio].
    #[arg(long, value_enum)]
    pub layout: Option<Layout>,
    /// Config (config.yaml or ConfigMap manifest): the istiod profile's `files` map gives the
    /// layout and the keys of the JSON body; `cluster` the default --cluster.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// JSON body for `bao kv put PATH @FILE` (mode 0600) [default: <out-dir>/<cluster>.json].
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Lifetime in days (INTERMEDIATE_DAYS).
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Subject O (INTERMEDIATE_ORG).
    #[arg(long, default_value = "Istio")]
    pub org: String,
    /// Subject CN (INTERMEDIATE_CN).
    #[arg(long, default_value = "Intermediate CA")]
    pub cn: String,
    /// subjectAltName DNS names, repeatable (INTERMEDIATE_SAN_DNS).
    #[arg(
        long = "san-dns",
        value_name = "NAME",
        default_value = "istiod.istio-system.svc"
    )]
    pub san_dns: Vec<String>,
    /// Replace files that already exist (otherwise an existing file is an error).
    #[arg(long)]
    pub force: bool,
}

fn parse_rsa_bits(s: &str) -> Result<usize, String> {
    match s {
        "2048" => Ok(2048),
        "3072" => Ok(3072),
        "4096" => Ok(4096),
        _ => Err(format!(
            "{s:?}: RSA keys are 2048, 3072 or 4096 bits (ring signs up to 4096)"
        )),
    }
}

/// Runs a `certs` subcommand, printing what it wrote to stdout and warnings to stderr.
pub fn run(args: &CertsArgs) -> anyhow::Result<()> {
    match &args.command {
        CertsCommand::Root(a) => root(a),
        CertsCommand::Intermediate(a) => intermediate(a),
    }
}

/// One file to write: public files get 0644, secrets 0600.
struct Output {
    path: PathBuf,
    contents: Vec<u8>,
    secret: bool,
}

fn root(args: &RootArgs) -> anyhow::Result<()> {
    let key = generate_key(&args.key)?;
    let mut params = ca_params(&args.org, &args.cn, &key, args.days, None)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params
        .self_signed(&key)
        .context("cannot sign the root certificate")?;
    let outputs = vec![
        Output {
            path: args.out_dir.join(ROOT_KEY_FILE),
            contents: key.serialize_pem().into_bytes(),
            secret: true,
        },
        Output {
            path: args.out_dir.join(ROOT_CERT_FILE),
            contents: cert.pem().into_bytes(),
            secret: false,
        },
    ];
    write_all(&outputs, args.force)?;
    report(&outputs);
    println!(
        "root CA: O={}, CN={}, {} days. Keep {} offline; `istio-vault-webhook certs intermediate \
         --cluster NAME --root-dir {}` signs each cluster's intermediate with it.",
        args.org,
        args.cn,
        args.days,
        ROOT_KEY_FILE,
        args.out_dir.display()
    );
    Ok(())
}

/// Subject, validity, serial, key usage and key identifier shared by the root and the
/// intermediate (the Makefiles' `req_ext` sections).
fn ca_params(
    org: &str,
    cn: &str,
    key: &KeyPair,
    days: u32,
    locality: Option<&str>,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // The order of the Makefiles' [ req_dn ] sections: O, CN, L.
    dn.push(
        DnType::OrganizationName,
        DnValue::Utf8String(org.to_owned()),
    );
    dn.push(DnType::CommonName, DnValue::Utf8String(cn.to_owned()));
    if let Some(l) = locality {
        dn.push(DnType::LocalityName, DnValue::Utf8String(l.to_owned()));
    }
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(i64::from(days));
    params.serial_number = Some(random_serial()?);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment, // nonRepudiation
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyCertSign,
    ];
    params.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(key));
    Ok(params)
}

/// openssl's `subjectKeyIdentifier = hash`: SHA-1 of the subjectPublicKey bits (RFC 5280
/// §4.2.1.2, method 1).
fn key_identifier(key: &KeyPair) -> Vec<u8> {
    ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        key.public_key_raw(),
    )
    .as_ref()
    .to_vec()
}

/// 159 random bits, as `openssl x509 -CAcreateserial` and `-signkey` use.
fn random_serial() -> anyhow::Result<SerialNumber> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 20];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow!("the system random number generator failed"))?;
    // Positive, and 20 bytes long in DER.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn generate_key(args: &KeyArgs) -> anyhow::Result<KeyPair> {
    match (args.key_type, args.key_size) {
        (KeyType::Rsa, bits) => {
            let bits = bits.unwrap_or(4096);
            let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits)
                .map_err(|e| anyhow!("cannot generate a {bits}-bit RSA key: {e}"))?;
            let der = rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&key)
                .map_err(|e| anyhow!("cannot encode the RSA key: {e}"))?;
            KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(der.as_bytes()),
                &rcgen::PKCS_RSA_SHA256,
            )
            .context("cannot load the generated RSA key")
        }
        (_, Some(_)) => bail!("--key-size is for --key-type rsa; ECDSA curves have a fixed size"),
        (KeyType::EcdsaP256, None) => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("cannot generate a P-256 key"),
        (KeyType::EcdsaP384, None) => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .context("cannot generate a P-384 key"),
    }
}

/// The root CA as read back from disk: what signing an intermediate needs.
struct Root {
    cert_pem: String,
    cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// DER of the root's subject, which the intermediate's issuer must equal byte for byte
    /// (Go's crypto/x509, i.e. istiod, matches issuers by raw bytes).
    subject_der: Vec<u8>,
    not_after: OffsetDateTime,
    /// The root has a subjectKeyIdentifier, which the intermediate's authorityKeyIdentifier
    /// then repeats (openssl's default); without one there is nothing to refer to.
    has_ski: bool,
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    let bytes = fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    String::from_utf8(bytes).map_err(|_| anyhow!("{}: not a PEM file (not UTF-8)", path.display()))
}

fn load_root(cert_path: &Path, key_path: &Path) -> anyhow::Result<Root> {
    let cert_pem = read_text(cert_path)?;
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: not a PEM certificate: {e}", cert_path.display()))?;
    let [der] = certs.as_slice() else {
        bail!(
            "{}: holds {} certificates; give the one root that signs (exactly one CERTIFICATE)",
            cert_path.display(),
            certs.len()
        );
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("{}: not an X.509 certificate: {e}", cert_path.display()))?;

    let bc = cert
        .basic_constraints()
        .map_err(|e| anyhow!("{}: bad basicConstraints: {e}", cert_path.display()))?;
    match bc.map(|b| b.value) {
        Some(b) if b.ca => {
            if b.path_len_constraint == Some(0) {
                bail!(
                    "{}: its basicConstraints pathlen:0 forbids any intermediate below it",
                    cert_path.display()
                );
            }
        }
        _ => bail!(
            "{}: not a CA certificate (no basicConstraints CA:TRUE)",
            cert_path.display()
        ),
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        bail!(
            "{}: its keyUsage lacks keyCertSign, it cannot sign certificates",
            cert_path.display()
        );
    }
    let not_after = cert.validity().not_after.to_datetime();
    if not_after <= OffsetDateTime::now_utc() {
        bail!("{}: expired on {not_after}", cert_path.display());
    }

    let key = load_key(key_path)?;
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        bail!(
            "{} is not the key of {} (their public keys differ)",
            key_path.display(),
            cert_path.display()
        );
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(cert.subject())
        .with_context(|| format!("{}: subject", cert_path.display()))?;
    // The intermediate's authorityKeyIdentifier is the root's subjectKeyIdentifier as written.
    let ski = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        });
    let has_ski = ski.is_some();
    params.key_identifier_method = KeyIdMethod::PreSpecified(ski.unwrap_or_default());
    let subject_der = cert.subject().as_raw().to_vec();
    Ok(Root {
        cert_pem,
        cert_path: cert_path.to_owned(),
        issuer: Issuer::new(params, key),
        subject_der,
        not_after,
        has_ski,
    })
}

/// A private key in PEM: PKCS#8 (openssl 3's `genrsa`, `certs root`) or PKCS#1 RSA (older
/// openssl). ring reads PKCS#8 only, so PKCS#1 is converted.
fn load_key(path: &Path) -> anyhow::Result<KeyPair> {
    let pem = read_text(path)?;
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow!("{}: not a PEM private key: {e}", path.display()))?;
    let pkcs8 = match key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => {
            let rsa = <rsa::PrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_der(
                k.secret_pkcs1_der(),
            )
            .map_err(|e| anyhow!("{}: bad RSA private key: {e}", path.display()))?;
            rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&rsa)
                .map_err(|e| anyhow!("{}: cannot re-encode the key: {e}", path.display()))?
                .as_bytes()
                .to_vec()
        }
        PrivateKeyDer::Sec1(_) => bail!(
            "{}: an `EC PRIVATE KEY`; convert it to PKCS#8 first: \
             openssl pkcs8 -topk8 -nocrypt -in {0} -out root-key.p8.pem",
            path.display()
        ),
        _ => bail!("{}: unsupported private key format", path.display()),
    };
    KeyPair::try_from(pkcs8.as_slice()).map_err(|e| {
        anyhow!(
            "{}: unsupported key ({e}); RSA 2048-4096, ECDSA P-256/P-384 or Ed25519",
            path.display()
        )
    })
}

/// The root's subject as rcgen params, attribute by attribute and with the same string types,
/// so that rcgen writes the same bytes (checked after signing).
fn distinguished_name(name: &x509_parser::x509::X509Name<'_>) -> anyhow::Result<DistinguishedName> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let [attr] = rdn.iter().collect::<Vec<_>>()[..] else {
            bail!("multi-valued RDNs are not supported");
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| anyhow!("attribute type OID too large"))?
            .collect();
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            bail!("attribute {} appears twice", attr.attr_type());
        }
        let data = attr.attr_value().data;
        let text = || {
            std::str::from_utf8(data)
                .map_err(|_| anyhow!("attribute {} is not text", attr.attr_type()))
        };
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(text()?.try_into()?),
            Tag::Ia5String => DnValue::Ia5String(text()?.try_into()?),
            Tag::T61String => DnValue::TeletexString(text()?.try_into()?),
            Tag::BmpString => {
                DnValue::BmpString(rcgen::string::BmpString::from_utf16be(data.to_vec())?)
            }
            Tag::UniversalString => DnValue::UniversalString(
                rcgen::string::UniversalString::from_utf32be(data.to_vec())?,
            ),
            t => bail!(
                "attribute {} has unsupported string type {t}",
                attr.attr_type()
            ),
        };
        dn.push(ty, value);
    }
    Ok(dn)
}

/// The files of one layout: file name -> contents.
fn layout_files(
    layout: Layout,
    key_pem: &str,
    cert_pem: &str,
    root_pem: &str,
) -> BTreeMap<&'static str, String> {
    // cert-chain.pem is `cat ca-cert.pem root-cert.pem` in the Makefile; keep a line break
    // between them even if the root file has no trailing newline.
    let mut chain = cert_pem.to_owned();
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    chain.push_str(root_pem);
    match layout {
        Layout::Istio => BTreeMap::from([
            ("ca-key.pem", key_pem.to_owned()),
            ("ca-cert.pem", cert_pem.to_owned()),
            ("root-cert.pem", root_pem.to_owned()),
            ("cert-chain.pem", chain),
        ]),
        Layout::Tls => BTreeMap::from([
            ("tls.key", key_pem.to_owned()),
            ("tls.crt", chain),
            ("ca.crt", root_pem.to_owned()),
        ]),
    }
}

/// Keys of the JSON body when no config names them: those of manifests/overlays/cluster1.
fn default_keys(layout: Layout) -> BTreeMap<String, String> {
    let pairs: &[(&str, &str)] = match layout {
        Layout::Istio => &[
            ("ca-key.pem", "ca_key"),
            ("ca-cert.pem", "ca_cert"),
            ("root-cert.pem", "root_cert"),
            ("cert-chain.pem", "cert_chain"),
        ],
        Layout::Tls => &[
            ("tls.key", "tls_key"),
            ("tls.crt", "tls_crt"),
            ("ca.crt", "ca_crt"),
        ],
    };
    pairs
        .iter()
        .map(|(f, k)| ((*f).to_owned(), (*k).to_owned()))
        .collect()
}

/// What the config says: its cluster, the istiod profile's files map (file -> key) and the
/// layout that map is, and where in Vault it reads.
struct FromConfig {
    cluster: String,
    files: BTreeMap<String, String>,
    layout: Layout,
    secret_path: String,
}

fn from_config(path: &Path) -> anyhow::Result<FromConfig> {
    let text = read_text(path)?;
    let config = crate::config::Config::from_document(&text)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let Some(istiod) = config.raw.profiles.istiod.as_ref() else {
        bail!(
            "{}: has no profiles.istiod, whose `files` would name the keys",
            path.display()
        );
    };
    // The loader accepts exactly one complete layout; tls.crt tells which.
    let layout = if istiod.files.contains_key("tls.crt") {
        Layout::Tls
    } else {
        Layout::Istio
    };
    Ok(FromConfig {
        cluster: config.cluster.clone(),
        files: istiod.files.clone(),
        layout,
        secret_path: istiod.secret_path.clone(),
    })
}

fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::Istio => "istio",
        Layout::Tls => "tls",
    }
}

fn intermediate(args: &IntermediateArgs) -> anyhow::Result<()> {
    let config = args.config.as_deref().map(from_config).transpose()?;
    let cluster = match (&args.cluster, &config) {
        (Some(c), Some(cfg)) if *c != cfg.cluster => bail!(
            "--cluster {c} but {} is the config of cluster {}",
            args.config.as_deref().unwrap_or(Path::new("")).display(),
            cfg.cluster
        ),
        (Some(c), _) => c.clone(),
        (None, Some(cfg)) => cfg.cluster.clone(),
        (None, None) => bail!("--cluster NAME is required without --config"),
    };
    // It names the default directory and JSON file too: keep it one plain path segment.
    if cluster.is_empty()
        || cluster.starts_with('.')
        || !cluster
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!("--cluster {cluster:?}: use letters, digits, '.', '_' and '-' (not first '.')");
    }
    let layout = match (args.layout, &config) {
        (Some(l), Some(cfg)) if l != cfg.layout => bail!(
            "--layout {} but the istiod profile of {} names the {} files",
            layout_name(l),
            args.config.as_deref().unwrap_or(Path::new("")).display(),
            layout_name(cfg.layout)
        ),
        (Some(l), _) => l,
        (None, Some(cfg)) => cfg.layout,
        (None, None) => Layout::Istio,
    };
    let (root_cert, root_key) = match (&args.root_cert, &args.root_key, &args.root_dir) {
        (c, k, Some(dir)) => (
            c.clone().unwrap_or_else(|| dir.join(ROOT_CERT_FILE)),
            k.clone().unwrap_or_else(|| dir.join(ROOT_KEY_FILE)),
        ),
        (Some(c), Some(k), None) => (c.clone(), k.clone()),
        _ => bail!("--root-dir DIR (or --root-cert FILE and --root-key FILE) is required"),
    };
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cluster));
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| out_dir.join(format!("{cluster}.json")));

    let root = load_root(&root_cert, &root_key)?;
    let key = generate_key(&args.key)?;
    let mut params = ca_params(&args.org, &args.cn, &key, args.days, Some(&cluster))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.use_authority_key_identifier_extension = root.has_ski;
    params.subject_alt_names = args
        .san_dns
        .iter()
        .map(|n| {
            n.as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| anyhow!("--san-dns {n:?}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let cert = params
        .signed_by(&key, &root.issuer)
        .context("cannot sign the intermediate certificate")?;
    check_issuer(cert.der(), &root)?;
    // By seconds it always does with both at 3650 days, as with the Makefile: say so only
    // when it matters.
    if params.not_after - root.not_after > time::Duration::days(1) {
        eprintln!(
            "warning: the intermediate outlives its root: it is valid until {}, {} only until {}",
            params.not_after.date(),
            root.cert_path.display(),
            root.not_after.date()
        );
    }

    let files = layout_files(layout, &key.serialize_pem(), &cert.pem(), &root.cert_pem);
    let keys = match &config {
        Some(cfg) => cfg.files.clone(),
        None => default_keys(layout),
    };
    let mut body = serde_json::Map::new();
    for (file, kv_key) in &keys {
        let contents = files.get(file.as_str()).ok_or_else(|| {
            anyhow!("the config's istiod files name {file:?}, which is no file of the layout")
        })?;
        body.insert(kv_key.clone(), serde_json::Value::String(contents.clone()));
    }
    let mut json = serde_json::to_string_pretty(&serde_json::Value::Object(body))
        .context("cannot encode the JSON body")?;
    json.push('\n');

    let mut outputs: Vec<Output> = files
        .iter()
        .map(|(name, contents)| Output {
            path: out_dir.join(name),
            contents: contents.clone().into_bytes(),
            secret: matches!(*name, "ca-key.pem" | "tls.key"),
        })
        .collect();
    outputs.push(Output {
        path: json_path.clone(),
        contents: json.into_bytes(),
        secret: true,
    });
    write_all(&outputs, args.force)?;
    report(&outputs);
    let vault_path = config
        .as_ref()
        .map_or("<profiles.istiod.secretPath>", |c| c.secret_path.as_str());
    println!(
        "intermediate CA for {cluster}: O={}, CN={}, L={cluster}, {} days, signed by {}.",
        args.org,
        args.cn,
        args.days,
        root_cert.display()
    );
    println!(
        "store it: bao kv put {vault_path} @{}   (or vault kv put …; or ISTIOD_CA_DIR={} \
         manifests/vault/setup.sh {cluster})",
        json_path.display(),
        out_dir.display()
    );
    Ok(())
}

/// The intermediate must name its root exactly as the root names itself.
fn check_issuer(der: &[u8], root: &Root) -> anyhow::Result<()> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("cannot re-read the intermediate: {e}"))?;
    if cert.issuer().as_raw() != root.subject_der.as_slice() {
        bail!(
            "{}: its subject cannot be reproduced byte for byte as the intermediate's issuer",
            root.cert_path.display()
        );
    }
    Ok(())
}

/// Writes every output, or none when one of them exists and `force` is off. New directories
/// are 0700; secrets 0600, the rest 0644, whatever the umask or an overwritten file had.
fn write_all(outputs: &[Output], force: bool) -> anyhow::Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for o in outputs {
        if !seen.insert(&o.path) {
            bail!(
                "{} would be written twice (check --json and --out-dir)",
                o.path.display()
            );
        }
    }
    if !force {
        for o in outputs {
            if fs::symlink_metadata(&o.path).is_ok() {
                bail!(
                    "{} exists; refusing to overwrite it (pass --force to replace it)",
                    o.path.display()
                );
            }
        }
    }
    for o in outputs {
        let dir = match o.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
        write_one(o, dir, force)?;
    }
    Ok(())
}

fn write_one(o: &Output, dir: &Path, force: bool) -> anyhow::Result<()> {
    let mode = if o.secret { 0o600 } else { 0o644 };
    let name = o
        .path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file name", o.path.display()))?;
    // Without --force, O_EXCL on the final name: an existing file (or symlink) is never
    // touched. With --force, a fresh file renamed over the old one, so the mode is ours.
    let target = if force {
        let mut tmp = std::ffi::OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".tmp{}", std::process::id()));
        dir.join(tmp)
    } else {
        o.path.clone()
    };
    let open = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&target);
    let mut file = match open {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} exists; refusing to overwrite it (pass --force to replace it)",
            target.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot create", target.display())),
    };
    let written = file
        .write_all(&o.contents)
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&target);
        return Err(e).with_context(|| format!("{}: cannot write", target.display()));
    }
    if force && let Err(e) = fs::rename(&target, &o.path) {
        let _ = fs::remove_file(&target);
        return Err(e).with_context(|| format!("{}: cannot replace", o.path.display()));
    }
    Ok(())
}

fn report(outputs: &[Output]) {
    for o in outputs {
        let mode = if o.secret { "0600" } else { "0644" };
        println!("wrote {} ({mode})", o.path.display());
    }
}
