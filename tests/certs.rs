//! `istio-vault-webhook certs` against the reference: Istio's own `tools/certs` Makefiles run
//! with openssl and make, compared extension by extension with `openssl x509`; the chains
//! checked with `openssl verify`; files, modes and the `bao kv put` JSON body checked on disk.
//!
//! The Makefiles ship in the Istio module that `scripts/build-peers istio` downloads; a missing
//! module fails these tests (with that command), it never skips them.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_istio-vault-webhook");

fn certs(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("certs")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run istio-vault-webhook")
}

fn certs_ok(dir: &Path, args: &[&str]) -> String {
    let out = certs(dir, args);
    assert!(
        out.status.success(),
        "certs {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn certs_err(dir: &Path, args: &[&str]) -> String {
    let out = certs(dir, args);
    assert!(
        !out.status.success(),
        "certs {args:?} succeeded but should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is on PATH (the reference the Makefiles use)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Istio's `tools/certs`: `$IVW_ISTIO_SRC` (the module directory), else the module that
/// `scripts/build-peers istio` links at `.tools/peers/istio-src`, else the Go module cache at
/// the version pinned in `scripts/peers.env`.
fn istio_tools_certs() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    // Set, it is the only place looked at: a wrong value must not pass on another copy.
    let explicit = std::env::var_os("IVW_ISTIO_SRC").filter(|v| !v.is_empty());
    if let Some(v) = &explicit {
        candidates.push(PathBuf::from(v));
    } else {
        candidates.push(repo.join(".tools/peers/istio-src"));
    }
    let peers = std::fs::read_to_string(repo.join("scripts/peers.env")).unwrap_or_default();
    if let Some(version) = peers
        .lines()
        .find_map(|l| l.strip_prefix("ISTIO_MODULE_VERSION="))
        .filter(|_| explicit.is_none())
    {
        let modcache = std::env::var_os("GOMODCACHE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("GOPATH")
                    .filter(|v| !v.is_empty())
                    .map(|p| PathBuf::from(p).join("pkg/mod"))
            })
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join("go/pkg/mod")));
        if let Some(m) = modcache {
            candidates.push(m.join(format!("istio.io/istio@{}", version.trim())));
        }
    }
    for c in candidates {
        let dir = c.join("tools/certs");
        if dir.join("Makefile.selfsigned.mk").is_file() && dir.join("common.mk").is_file() {
            return dir;
        }
        tried.push(dir.display().to_string());
    }
    panic!(
        "Istio's tools/certs Makefiles are missing (tried {}): run `scripts/build-peers istio` \
         (it downloads the Istio module and links it at .tools/peers/istio-src), or set \
         IVW_ISTIO_SRC to the Istio module directory",
        tried.join(", ")
    );
}

/// Runs `make -f Makefile.selfsigned.mk root-ca <cluster>-cacerts` in `dir` with copies of
/// the Makefiles (the module cache is read-only).
fn istio_make(dir: &Path, cluster: &str) {
    let src = istio_tools_certs();
    for f in ["common.mk", "Makefile.selfsigned.mk"] {
        let to = dir.join(f);
        std::fs::copy(src.join(f), &to).expect("copy the Makefile");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let out = Command::new("make")
        .args([
            "-f",
            "Makefile.selfsigned.mk",
            "root-ca",
            &format!("{cluster}-cacerts"),
        ])
        .current_dir(dir)
        .output()
        .expect("make is on PATH");
    assert!(
        out.status.success(),
        "Istio's Makefile failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `Mon DD HH:MM:SS YYYY GMT` (openssl's notBefore/notAfter) as a Unix time.
fn openssl_time(s: &str) -> i64 {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = months
        .iter()
        .position(|m| *m == parts[0])
        .unwrap_or_else(|| panic!("month in {s:?}")) as u8
        + 1;
    let date = time::Date::from_calendar_date(
        parts[3].parse().expect("year"),
        time::Month::try_from(month).expect("month"),
        parts[1].parse().expect("day"),
    )
    .expect("date");
    let hms: Vec<u8> = parts[2]
        .split(':')
        .map(|p| p.parse().expect("hms"))
        .collect();
    let t = time::Time::from_hms(hms[0], hms[1], hms[2]).expect("time");
    time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp()
}

/// What `openssl x509` says about a certificate, field by field.
fn facts(dir: &Path, cert: &Path) -> BTreeMap<String, String> {
    let c = cert.to_str().expect("path");
    let mut f = BTreeMap::new();
    let names = openssl(
        dir,
        &[
            "x509",
            "-in",
            c,
            "-noout",
            "-subject",
            "-issuer",
            "-nameopt",
            "multiline,show_type",
        ],
    );
    let (subject, issuer) = names.split_once("issuer=").expect("issuer");
    f.insert("subject".into(), subject.trim().replace("subject=", ""));
    f.insert("issuer".into(), issuer.trim().to_owned());
    for ext in [
        "basicConstraints",
        "keyUsage",
        "subjectAltName",
        "extendedKeyUsage",
        "nameConstraints",
    ] {
        let text = openssl(dir, &["x509", "-in", c, "-noout", "-ext", ext]);
        f.insert(ext.into(), text.trim().to_owned());
    }
    let text = openssl(dir, &["x509", "-in", c, "-noout", "-text"]);
    // Every extension by name and criticality ("X509v3 Basic Constraints: critical").
    let exts: BTreeSet<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("X509v3 ") && !l.starts_with("X509v3 extensions"))
        .map(|l| {
            let (name, rest) = l.split_once(':').unwrap_or((l, ""));
            if rest.trim() == "critical" {
                format!("{name} (critical)")
            } else {
                name.to_owned()
            }
        })
        .collect();
    f.insert(
        "extensions (set)".into(),
        exts.into_iter().collect::<Vec<_>>().join(", "),
    );
    for (label, prefix) in [
        ("version", "Version:"),
        ("signature algorithm", "Signature Algorithm:"),
        ("public key algorithm", "Public Key Algorithm:"),
        ("public key size", "Public-Key:"),
        ("public key exponent / curve", "Exponent:"),
        ("public key exponent / curve", "NIST CURVE:"),
    ] {
        if let Some(line) = text.lines().map(str::trim).find(|l| l.starts_with(prefix)) {
            f.insert(label.into(), line.to_owned());
        }
    }
    let dates = openssl(dir, &["x509", "-in", c, "-noout", "-startdate", "-enddate"]);
    let mut not_before = 0;
    let mut not_after = 0;
    for l in dates.lines() {
        if let Some(v) = l.strip_prefix("notBefore=") {
            not_before = openssl_time(v);
        }
        if let Some(v) = l.strip_prefix("notAfter=") {
            not_after = openssl_time(v);
        }
    }
    let secs = not_after - not_before;
    f.insert(
        "validity (days, rounded)".into(),
        ((secs + 43_200) / 86_400).to_string(),
    );
    let serial = openssl(dir, &["x509", "-in", c, "-noout", "-serial"]);
    let hex = serial.trim().trim_start_matches("serial=");
    // Both draw 159 random bits (openssl's CAcreateserial / -signkey, ours): the length
    // varies with leading zeros, so compare the kind, not the number.
    let bytes = hex.len().div_ceil(2);
    f.insert(
        "serial (random, 16..=20 bytes)".into(),
        (16..=20).contains(&bytes).to_string(),
    );
    f.insert(
        "subjectKeyIdentifier present".into(),
        key_id(dir, c, "subjectKeyIdentifier").is_some().to_string(),
    );
    f.insert(
        "authorityKeyIdentifier present".into(),
        key_id(dir, c, "authorityKeyIdentifier")
            .is_some()
            .to_string(),
    );
    f
}

/// The hex key id of `-ext subjectKeyIdentifier` / `authorityKeyIdentifier`.
fn key_id(dir: &Path, cert: &str, ext: &str) -> Option<String> {
    let text = openssl(dir, &["x509", "-in", cert, "-noout", "-ext", ext]);
    text.lines()
        .skip(1)
        .map(|l| l.trim().trim_start_matches("keyid:").to_owned())
        .find(|l| !l.is_empty())
}

/// The subjectKeyIdentifier openssl computes for a key with `subjectKeyIdentifier = hash`
/// (`openssl req -x509` adds it), to check that ours is made the same way.
fn openssl_hash_key_id(dir: &Path, key: &Path) -> String {
    let tmp = dir.join("ski-probe.pem");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-x509",
            "-key",
            key.to_str().expect("path"),
            "-subj",
            "/CN=probe",
            "-days",
            "1",
            "-out",
            tmp.to_str().expect("path"),
        ],
    );
    let id = key_id(dir, tmp.to_str().expect("path"), "subjectKeyIdentifier").expect("probe SKI");
    std::fs::remove_file(&tmp).expect("rm probe");
    id
}

/// Compares two fact maps; returns one line per difference.
fn compare(
    what: &str,
    ours: &BTreeMap<String, String>,
    reference: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let keys: BTreeSet<&String> = ours.keys().chain(reference.keys()).collect();
    for k in keys {
        let (a, b) = (ours.get(k), reference.get(k));
        let same = if k == "validity (days, rounded)" {
            let a: i64 = a.map_or(-1, |v| v.parse().expect("days"));
            let b: i64 = b.map_or(-1, |v| v.parse().expect("days"));
            (a - b).abs() <= 1
        } else {
            a == b
        };
        println!(
            "{what:<13} {k:<32} {} {}",
            if same { "same" } else { "DIFF" },
            a.map_or("<absent>".to_owned(), |v| v.replace('\n', " | "))
        );
        if !same {
            diffs.push(format!(
                "{what}: {k}: certs has {a:?}, Istio's Makefile {b:?}"
            ));
        }
    }
    diffs
}

#[test]
fn matches_istio_makefile_extension_by_extension_and_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = tmp.path().join("istio-make");
    let ours = tmp.path().join("certs");
    std::fs::create_dir_all(&reference).expect("mkdir");
    std::fs::create_dir_all(&ours).expect("mkdir");

    istio_make(&reference, "cluster1");
    certs_ok(&ours, &["root", "--out-dir", "."]);
    certs_ok(
        &ours,
        &["intermediate", "--cluster", "cluster1", "--root-dir", "."],
    );

    let mut diffs = Vec::new();
    diffs.extend(compare(
        "root",
        &facts(&ours, &ours.join("root-cert.pem")),
        &facts(&reference, &reference.join("root-cert.pem")),
    ));
    diffs.extend(compare(
        "intermediate",
        &facts(&ours, &ours.join("cluster1/ca-cert.pem")),
        &facts(&reference, &reference.join("cluster1/ca-cert.pem")),
    ));

    // The same files, the same modes for the keys, the same key encoding (PKCS#8).
    for (ours_rel, ref_rel) in [
        ("root-key.pem", "root-key.pem"),
        ("cluster1/ca-key.pem", "cluster1/ca-key.pem"),
    ] {
        let (a, b) = (ours.join(ours_rel), reference.join(ref_rel));
        if mode(&a) != mode(&b) {
            diffs.push(format!(
                "{ours_rel}: mode {:o}, the Makefile's {:o}",
                mode(&a),
                mode(&b)
            ));
        }
        let first = |p: &Path| read(p).lines().next().unwrap_or_default().to_owned();
        if first(&a) != first(&b) {
            diffs.push(format!(
                "{ours_rel}: {:?}, the Makefile's {:?}",
                first(&a),
                first(&b)
            ));
        }
        assert_eq!(mode(&a), 0o600, "{}", a.display());
    }
    let mut ours_files: Vec<String> = std::fs::read_dir(ours.join("cluster1"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != "cluster1.json")
        .collect();
    let mut ref_files: Vec<String> = std::fs::read_dir(reference.join("cluster1"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    ours_files.sort();
    ref_files.sort();
    if ours_files != ref_files {
        diffs.push(format!(
            "cluster1/: files {ours_files:?}, the Makefile's {ref_files:?}"
        ));
    }
    // cert-chain.pem is `cat ca-cert.pem root-cert.pem` in both; root-cert.pem a copy.
    for dir in [&ours, &reference] {
        let c = dir.join("cluster1");
        assert_eq!(
            read(&c.join("cert-chain.pem")),
            read(&c.join("ca-cert.pem")) + &read(&dir.join("root-cert.pem")),
            "{}",
            c.display()
        );
        assert_eq!(
            read(&c.join("root-cert.pem")),
            read(&dir.join("root-cert.pem"))
        );
    }

    // Key identifiers: made like openssl's `subjectKeyIdentifier = hash`, and the
    // intermediate's authorityKeyIdentifier is the root's subjectKeyIdentifier, as in the
    // Makefile's output.
    for dir in [&ours, &reference] {
        let root_ski = key_id(dir, "root-cert.pem", "subjectKeyIdentifier").expect("root SKI");
        let int_aki =
            key_id(dir, "cluster1/ca-cert.pem", "authorityKeyIdentifier").expect("int AKI");
        assert_eq!(
            root_ski,
            int_aki,
            "{}: AKI is not the root's SKI",
            dir.display()
        );
    }
    for (cert, key) in [
        ("root-cert.pem", "root-key.pem"),
        ("cluster1/ca-cert.pem", "cluster1/ca-key.pem"),
    ] {
        let ski = key_id(&ours, cert, "subjectKeyIdentifier").expect("SKI");
        let expected = openssl_hash_key_id(&ours, &ours.join(key));
        if ski != expected {
            diffs.push(format!(
                "{cert}: subjectKeyIdentifier {ski}, openssl's hash {expected}"
            ));
        }
    }

    // The chain verifies, and the intermediate's key signs a workload leaf that verifies
    // through it (what istiod does with it).
    verify_chain(&ours, Path::new("."), "cluster1");
    verify_chain(&reference, Path::new("."), "cluster1");

    assert!(
        diffs.is_empty(),
        "certs differs from Istio's Makefile:\n{}",
        diffs.join("\n")
    );
}

/// `openssl verify` of the intermediate against the root, of cert-chain.pem, and of a leaf
/// signed with ca-key.pem through ca-cert.pem.
fn verify_chain(dir: &Path, root_dir: &Path, cluster: &str) {
    let root = root_dir.join("root-cert.pem");
    let root = root.to_str().expect("path");
    let int = format!("{cluster}/ca-cert.pem");
    let key = format!("{cluster}/ca-key.pem");
    let chain = format!("{cluster}/cert-chain.pem");
    for cert in [&int, &chain] {
        let out = openssl(dir, &["verify", "-x509_strict", "-CAfile", root, cert]);
        assert!(out.contains(": OK"), "{}: {out}", dir.display());
    }
    // A workload certificate as the Makefile's %/workload.conf describes it.
    let conf = dir.join(format!("{cluster}/leaf.conf"));
    std::fs::write(
        &conf,
        "[ req ]\nprompt = no\ndistinguished_name = dn\n[ dn ]\nO = Istio\nCN = Workload\n\
         [ ext ]\nbasicConstraints = critical, CA:false\nkeyUsage = digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth, clientAuth\n\
         subjectAltName = URI:spiffe://cluster.local/ns/default/sa/default\n\
         subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
    )
    .expect("write leaf.conf");
    let leaf_key = format!("{cluster}/leaf-key.pem");
    let csr = format!("{cluster}/leaf.csr");
    let leaf = format!("{cluster}/leaf-cert.pem");
    let conf = conf.to_str().expect("path");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &leaf_key,
        ],
    );
    openssl(
        dir,
        &[
            "req", "-new", "-config", conf, "-key", &leaf_key, "-out", &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "1",
            "-in",
            &csr,
            "-CA",
            &int,
            "-CAkey",
            &key,
            "-set_serial",
            "42",
            "-extfile",
            conf,
            "-extensions",
            "ext",
            "-out",
            &leaf,
        ],
    );
    let out = openssl(
        dir,
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            root,
            "-untrusted",
            &int,
            "-purpose",
            "sslserver",
            &leaf,
        ],
    );
    assert!(out.contains(": OK"), "{}: {out}", dir.display());
    // Without the intermediate the leaf must not verify: the chain really goes through it.
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", root, &leaf])
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        !out.status.success(),
        "leaf verified without its intermediate"
    );
}

#[test]
fn signs_with_a_root_istios_makefile_made() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    istio_make(dir, "cluster1");
    certs_ok(
        dir,
        &[
            "intermediate",
            "--cluster",
            "cluster2",
            "--root-dir",
            ".",
            "--key-type",
            "ecdsa-p256",
        ],
    );
    verify_chain(dir, Path::new("."), "cluster2");
    let f = facts(dir, &dir.join("cluster2/ca-cert.pem"));
    assert_eq!(
        f["public key algorithm"],
        "Public Key Algorithm: id-ecPublicKey"
    );
    assert_eq!(
        f["signature algorithm"],
        "Signature Algorithm: sha256WithRSAEncryption"
    );
    assert_eq!(
        key_id(dir, "root-cert.pem", "subjectKeyIdentifier"),
        key_id(dir, "cluster2/ca-cert.pem", "authorityKeyIdentifier")
    );
    // The Makefile's intermediate and ours carry the same subject layout and extensions.
    let reference = facts(dir, &dir.join("cluster1/ca-cert.pem"));
    for k in [
        "issuer",
        "basicConstraints",
        "keyUsage",
        "subjectAltName",
        "extensions (set)",
    ] {
        assert_eq!(f[k], reference[k], "{k}");
    }
    assert_eq!(
        f["subject"],
        reference["subject"].replace("cluster1", "cluster2"),
        "subject"
    );
}

#[test]
fn ecdsa_hierarchy_in_the_tls_layout_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    certs_ok(
        dir,
        &[
            "root",
            "--out-dir",
            "root",
            "--key-type",
            "ecdsa-p256",
            "--days",
            "30",
        ],
    );
    certs_ok(
        dir,
        &[
            "intermediate",
            "--cluster",
            "east",
            "--root-dir",
            "root",
            "--out-dir",
            "east",
            "--layout",
            "tls",
            "--key-type",
            "ecdsa-p256",
            "--days",
            "7",
        ],
    );
    let east = dir.join("east");
    let mut names: Vec<String> = std::fs::read_dir(&east)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "east.json", "tls.crt", "tls.key"]);
    assert_eq!(mode(&east.join("tls.key")), 0o600);
    assert_eq!(mode(&east.join("east.json")), 0o600);
    assert_eq!(mode(&east.join("tls.crt")), 0o644);
    assert_eq!(
        read(&east.join("ca.crt")),
        read(&dir.join("root/root-cert.pem"))
    );
    let out = openssl(
        dir,
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "root/root-cert.pem",
            "east/tls.crt",
        ],
    );
    assert!(out.contains(": OK"), "{out}");
    // tls.crt is the chain: intermediate first, then the root.
    let chain = read(&east.join("tls.crt"));
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(chain.ends_with(&read(&dir.join("root/root-cert.pem"))));
    let f = facts(dir, &east.join("tls.crt"));
    assert_eq!(f["validity (days, rounded)"], "7");
    assert_eq!(f["public key exponent / curve"], "NIST CURVE: P-256");
    assert_eq!(
        f["signature algorithm"],
        "Signature Algorithm: ecdsa-with-SHA256"
    );
    assert!(
        f["subject"].contains("localityName              = UTF8STRING:east"),
        "{}",
        f["subject"]
    );
    let body: BTreeMap<String, String> =
        serde_json::from_str(&read(&east.join("east.json"))).expect("json");
    let keys: Vec<&str> = body.keys().map(String::as_str).collect();
    assert_eq!(keys, ["ca_crt", "tls_crt", "tls_key"]);
    assert_eq!(body["tls_key"], read(&east.join("tls.key")));
    assert_eq!(body["tls_crt"], chain);
    assert_eq!(body["ca_crt"], read(&east.join("ca.crt")));
}

#[test]
fn refuses_to_overwrite_and_writes_keys_0600() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let fast = ["--key-type", "ecdsa-p256"];
    certs_ok(dir, &[&["root", "--out-dir", "ca"][..], &fast].concat());
    let key = dir.join("ca/root-key.pem");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir.join("ca/root-cert.pem")), 0o644);
    assert_eq!(
        mode(&dir.join("ca")),
        0o700,
        "a new directory for keys is 0700"
    );
    let before = read(&key);

    // root: the key exists; nothing is touched, and the error names the file.
    let err = certs_err(dir, &[&["root", "--out-dir", "ca"][..], &fast].concat());
    assert!(err.contains("ca/root-key.pem exists"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(read(&key), before);
    // Only the certificate exists: still refused, and the key is not written either.
    std::fs::create_dir(dir.join("ca2")).expect("mkdir");
    std::fs::write(dir.join("ca2/root-cert.pem"), "keep me").expect("write");
    let err = certs_err(dir, &[&["root", "--out-dir", "ca2"][..], &fast].concat());
    assert!(err.contains("ca2/root-cert.pem exists"), "{err}");
    assert!(
        !dir.join("ca2/root-key.pem").exists(),
        "wrote the key before refusing"
    );
    assert_eq!(read(&dir.join("ca2/root-cert.pem")), "keep me");

    // intermediate: the same, for every output including the JSON body.
    let int = [
        "intermediate",
        "--cluster",
        "c1",
        "--root-dir",
        "ca",
        "--key-type",
        "ecdsa-p256",
    ];
    certs_ok(dir, &int);
    for f in ["ca-key.pem", "c1.json"] {
        assert_eq!(mode(&dir.join("c1").join(f)), 0o600, "{f}");
    }
    for f in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
        assert_eq!(mode(&dir.join("c1").join(f)), 0o644, "{f}");
    }
    let int_key = read(&dir.join("c1/ca-key.pem"));
    std::fs::remove_file(dir.join("c1/ca-key.pem")).expect("rm");
    std::fs::write(dir.join("c1/ca-key.pem"), &int_key).expect("write");
    let err = certs_err(dir, &int);
    assert!(err.contains("c1/"), "{err}");
    assert!(err.contains("exists; refusing to overwrite"), "{err}");
    assert_eq!(read(&dir.join("c1/ca-key.pem")), int_key);

    // --force replaces, and a key that had become world-readable comes back 0600.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(
        dir.join("c1/ca-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    certs_ok(
        dir,
        &[&["root", "--out-dir", "ca", "--force"][..], &fast].concat(),
    );
    assert_ne!(read(&key), before, "--force did not replace the root key");
    assert_eq!(mode(&key), 0o600);
    certs_ok(dir, &[&int[..], &["--force"]].concat());
    assert_ne!(read(&dir.join("c1/ca-key.pem")), int_key);
    assert_eq!(mode(&dir.join("c1/ca-key.pem")), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("c1"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn json_body_has_exactly_the_configured_keys_and_the_file_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    certs_ok(
        dir,
        &["root", "--out-dir", "root", "--key-type", "ecdsa-p256"],
    );

    // Default keys: those of manifests/overlays/cluster1/configmap.yaml.
    let out = certs_ok(
        dir,
        &[
            "intermediate",
            "--cluster",
            "cluster1",
            "--root-dir",
            "root",
            "--key-type",
            "ecdsa-p256",
        ],
    );
    assert!(out.contains("@cluster1/cluster1.json"), "{out}");
    let body: BTreeMap<String, String> =
        serde_json::from_str(&read(&dir.join("cluster1/cluster1.json"))).expect("json");
    let expected = [
        ("ca_cert", "ca-cert.pem"),
        ("ca_key", "ca-key.pem"),
        ("cert_chain", "cert-chain.pem"),
        ("root_cert", "root-cert.pem"),
    ];
    assert_eq!(
        body.keys().map(String::as_str).collect::<Vec<_>>(),
        expected.map(|(k, _)| k)
    );
    for (k, f) in expected {
        assert_eq!(
            body[k].as_bytes(),
            std::fs::read(dir.join("cluster1").join(f)).expect("read"),
            "{k}"
        );
    }

    // The real ConfigMap of the overlay: same keys, and its secretPath in the hint.
    let configmap =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/overlays/cluster1/configmap.yaml");
    let out = certs_ok(
        dir,
        &[
            "intermediate",
            "--config",
            configmap.to_str().expect("path"),
            "--root-dir",
            "root",
            "--out-dir",
            "from-cm",
            "--json",
            "cm.json",
            "--key-type",
            "ecdsa-p256",
        ],
    );
    assert!(
        out.contains("bao kv put kubernetes-cluster1-secrets/istiod-service/certs @cm.json"),
        "{out}"
    );
    let body: BTreeMap<String, String> =
        serde_json::from_str(&read(&dir.join("cm.json"))).expect("json");
    assert_eq!(
        body.keys().map(String::as_str).collect::<Vec<_>>(),
        expected.map(|(k, _)| k)
    );
    let subject = facts(dir, &dir.join("from-cm/ca-cert.pem"))["subject"].clone();
    assert!(
        subject.contains("UTF8STRING:cluster1"),
        "the config's cluster is L: {subject}"
    );

    // A config with its own keys, in the TLS layout: exactly those keys, byte-exact values.
    std::fs::write(
        dir.join("tls-config.yaml"),
        "cluster: west\nvault:\n  authPath: auth/kubernetes-west\nprofiles:\n  istiod:\n    \
         secretPath: kv/west/istiod\n    files:\n      tls.crt: chain\n      tls.key: signing_key\n      \
         ca.crt: trust_anchor\n",
    )
    .expect("write config");
    certs_ok(
        dir,
        &[
            "intermediate",
            "--config",
            "tls-config.yaml",
            "--root-dir",
            "root",
            "--key-type",
            "ecdsa-p256",
        ],
    );
    let raw = read(&dir.join("west/west.json"));
    let body: BTreeMap<String, String> = serde_json::from_str(&raw).expect("json");
    assert_eq!(
        body.keys().map(String::as_str).collect::<Vec<_>>(),
        ["chain", "signing_key", "trust_anchor"]
    );
    for (k, f) in [
        ("chain", "tls.crt"),
        ("signing_key", "tls.key"),
        ("trust_anchor", "ca.crt"),
    ] {
        assert_eq!(
            body[k].as_bytes(),
            std::fs::read(dir.join("west").join(f)).expect("read"),
            "{k}"
        );
    }
    assert!(!dir.join("west/ca-key.pem").exists());

    // Contradictions are errors that name the flag and the file.
    let err = certs_err(
        dir,
        &[
            "intermediate",
            "--config",
            "tls-config.yaml",
            "--root-dir",
            "root",
            "--layout",
            "istio",
        ],
    );
    assert!(
        err.contains("--layout istio") && err.contains("tls-config.yaml"),
        "{err}"
    );
    let err = certs_err(
        dir,
        &[
            "intermediate",
            "--config",
            "tls-config.yaml",
            "--cluster",
            "east",
            "--root-dir",
            "root",
        ],
    );
    assert!(
        err.contains("--cluster east") && err.contains("west"),
        "{err}"
    );
    std::fs::write(dir.join("bad.yaml"), "cluster: x\n").expect("write");
    let err = certs_err(
        dir,
        &["intermediate", "--config", "bad.yaml", "--root-dir", "root"],
    );
    assert!(err.contains("bad.yaml"), "{err}");
}

#[test]
fn bad_roots_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let err = certs_err(
        dir,
        &["intermediate", "--cluster", "c", "--root-dir", "nowhere"],
    );
    assert!(err.contains("nowhere/root-cert.pem"), "{err}");

    certs_ok(dir, &["root", "--out-dir", "a", "--key-type", "ecdsa-p256"]);
    certs_ok(dir, &["root", "--out-dir", "b", "--key-type", "ecdsa-p256"]);
    let err = certs_err(
        dir,
        &[
            "intermediate",
            "--cluster",
            "c",
            "--root-cert",
            "a/root-cert.pem",
            "--root-key",
            "b/root-key.pem",
        ],
    );
    assert!(
        err.contains("b/root-key.pem is not the key of a/root-cert.pem"),
        "{err}"
    );
    assert!(!dir.join("c").exists(), "wrote files for a mismatched root");

    // An intermediate is no root for another intermediate (pathlen:0).
    certs_ok(
        dir,
        &[
            "intermediate",
            "--cluster",
            "c",
            "--root-dir",
            "a",
            "--key-type",
            "ecdsa-p256",
        ],
    );
    let err = certs_err(
        dir,
        &[
            "intermediate",
            "--cluster",
            "d",
            "--root-cert",
            "c/ca-cert.pem",
            "--root-key",
            "c/ca-key.pem",
        ],
    );
    assert!(
        err.contains("c/ca-cert.pem") && err.contains("pathlen:0"),
        "{err}"
    );

    let err = certs_err(
        dir,
        &[
            "root",
            "--out-dir",
            "e",
            "--key-type",
            "ecdsa-p256",
            "--key-size",
            "2048",
        ],
    );
    assert!(err.contains("--key-size"), "{err}");
    let err = certs_err(dir, &["root", "--out-dir", "e", "--key-size", "1024"]);
    assert!(err.contains("1024"), "{err}");
}

/// `bao`: `$BAO_BIN`, else `<repo>/.tools/bin/bao`, else on PATH (scripts/install-test-tools
/// installs it); missing fails the test.
fn find_bao() -> PathBuf {
    if let Some(b) = std::env::var_os("BAO_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(b);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/bao");
    if local.is_file() {
        return local;
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("bao"))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "OpenBao's bao is missing (BAO_BIN, {}, PATH): run `scripts/install-test-tools`",
                local.display()
            )
        })
}

/// Kills the dev server when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bao_kv_put_at_file_stores_exactly_the_files() {
    let bao = find_bao();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    certs_ok(
        dir,
        &["root", "--out-dir", "root", "--key-type", "ecdsa-p256"],
    );
    let configmap =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/overlays/cluster1/configmap.yaml");
    certs_ok(
        dir,
        &[
            "intermediate",
            "--config",
            configmap.to_str().expect("path"),
            "--root-dir",
            "root",
            "--key-type",
            "ecdsa-p256",
        ],
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let token = "ivw-certs-test";
    let log = std::fs::File::create(dir.join("bao.log")).expect("log");
    let _server = Killed(
        Command::new(&bao)
            .args([
                "server",
                "-dev",
                "-dev-no-store-token",
                &format!("-dev-root-token-id={token}"),
                &format!("-dev-listen-address={addr}"),
            ])
            .env("HOME", dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start bao server -dev"),
    );
    let cli = |args: &[&str]| {
        Command::new(&bao)
            .args(args)
            .current_dir(dir)
            .env("HOME", dir)
            .env("BAO_ADDR", format!("http://{addr}"))
            .env("BAO_TOKEN", token)
            .output()
            .expect("run bao")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cli(&["status"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "bao server -dev did not come up: {}",
            read(&dir.join("bao.log"))
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The overlay's KV v1 mount (manifests/vault/setup.sh), then the README's command.
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(cli(&[
        "secrets",
        "enable",
        "-path=kubernetes-cluster1-secrets",
        "-version=1",
        "kv",
    ]));
    let path = "kubernetes-cluster1-secrets/istiod-service/certs";
    ok(cli(&["kv", "put", path, "@cluster1/cluster1.json"]));
    let got: serde_json::Value =
        serde_json::from_str(&ok(cli(&["kv", "get", "-format=json", path]))).expect("json");
    let stored: BTreeMap<String, String> =
        serde_json::from_value(got["data"].clone()).expect("data is a map of strings");
    for (key, file) in [
        ("ca_key", "ca-key.pem"),
        ("ca_cert", "ca-cert.pem"),
        ("root_cert", "root-cert.pem"),
        ("cert_chain", "cert-chain.pem"),
    ] {
        assert_eq!(
            stored.get(key).map(String::as_bytes),
            Some(
                std::fs::read(dir.join("cluster1").join(file))
                    .expect("read")
                    .as_slice()
            ),
            "{key}"
        );
    }
    assert_eq!(stored.len(), 4, "{:?}", stored.keys());
}
