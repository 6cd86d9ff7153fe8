//! One test per rule of the README's "Configuration reference".

use super::*;

const MINIMAL: &str = "
cluster: cluster1
vault: { authPath: auth/kubernetes-cluster1 }
profiles:
  istiod: { secretPath: kubernetes-cluster1-secrets/istiod-service/certs }
";

fn err(yaml: &str) -> String {
    match Config::parse(yaml) {
        Ok(_) => panic!("config was accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn with_istiod(extra: &str) -> String {
    format!(
        "cluster: c\nvault: {{ authPath: auth/k }}\nprofiles:\n  istiod:\n    secretPath: m/p\n{extra}"
    )
}

/// renderInterval only means something on KV v2 (on v1 the secret's lease decides).
fn with_istiod_v2(extra: &str) -> String {
    with_istiod(extra).replace("authPath: auth/k }", "authPath: auth/k, kvVersion: 2 }")
}

fn with_gateway_v2(gateway: &str) -> String {
    with_gateway(gateway).replace("authPath: auth/k }", "authPath: auth/k, kvVersion: 2 }")
}

fn with_gateway(gateway: &str) -> String {
    format!("cluster: c\nvault: {{ authPath: auth/k }}\nprofiles:\n  gateways:\n    - {gateway}\n")
}

fn annotation<'a>(p: &'a Profile, key: &str) -> Option<&'a str> {
    p.annotations
        .iter()
        .find(|a| a.key == key)
        .map(|a| a.value.as_str())
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.cluster, "cluster1");
    assert_eq!(c.secret_volume_path, "/vault/secrets");
    let istiod = c.istiod().unwrap();
    assert_eq!(istiod.name, "istiod");
    assert_eq!(
        istiod.kind,
        ProfileKind::Istiod {
            container: "discovery".into()
        }
    );
    assert_eq!(
        istiod.selector,
        BTreeMap::from([("app".into(), "istiod".into())])
    );
    assert_eq!(annotation(istiod, keys::ROLE), Some("istiod"));
    assert_eq!(
        annotation(istiod, keys::AUTH_PATH),
        Some("auth/kubernetes-cluster1")
    );
    for f in ISTIO_LAYOUT {
        assert_eq!(
            annotation(istiod, &format!("{}{f}", keys::SECRET_PREFIX)),
            Some("kubernetes-cluster1-secrets/istiod-service/certs")
        );
    }
    assert_eq!(c.raw.vault.kv_version, 1);
    assert_eq!(
        c.raw.profiles.istiod.as_ref().unwrap().rotation,
        Rotation::Sidecar
    );
}

#[test]
fn the_embedded_example_is_valid() {
    let c = Config::parse(EXAMPLE_CONFIG).unwrap();
    let names: Vec<_> = c.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["istiod", "ingressgateway"]);
    assert_eq!(c.profiles[1].kind, ProfileKind::Gateway);
}

#[test]
fn exact_annotation_set_for_istiod() {
    let c = Config::parse(MINIMAL).unwrap();
    let keys: Vec<&str> = c
        .istiod()
        .unwrap()
        .annotations
        .iter()
        .map(|a| a.key.as_str())
        .collect();
    let mut expected = vec![
        keys::AGENT_INJECT,
        keys::AGENT_INIT_FIRST,
        keys::ROLE,
        keys::AUTH_PATH,
        keys::PROFILE,
        keys::CONFIG_HASH,
    ];
    let files: Vec<String> = ISTIO_LAYOUT
        .iter()
        .flat_map(|f| {
            [
                format!("{}{f}", keys::SECRET_PREFIX),
                format!("{}{f}", keys::TEMPLATE_PREFIX),
                format!("{}{f}", keys::ERROR_ON_MISSING_KEY_PREFIX),
            ]
        })
        .collect();
    expected.extend(files.iter().map(String::as_str));
    expected.sort();
    assert_eq!(keys, expected);
    // Optional ones are owned but absent.
    let absent: Vec<&str> = c
        .istiod()
        .unwrap()
        .absent
        .iter()
        .map(|a| a.key.as_str())
        .collect();
    for k in [
        keys::PRE_POPULATE_ONLY,
        keys::SECRET_VOLUME_PATH,
        keys::SERVICE,
        keys::NAMESPACE,
        keys::CA_CERT,
        keys::TLS_SECRET,
        keys::STATIC_SECRET_RENDER_INTERVAL,
    ] {
        assert!(absent.contains(&k), "{k} should be owned-absent");
    }
}

#[test]
fn templates_for_kv_v1_and_v2() {
    assert_eq!(
        template(1, "m/p", "ca_key"),
        r#"{{- with secret "m/p" -}}{{ .Data.ca_key }}{{- end -}}"#
    );
    assert_eq!(
        template(2, "m/data/p", "ca_key"),
        r#"{{- with secret "m/data/p" -}}{{ .Data.data.ca_key }}{{- end -}}"#
    );
    let c = Config::parse(
        "cluster: c\nvault: { authPath: auth/k, kvVersion: 2 }\nprofiles:\n  istiod: { secretPath: m/data/p }\n",
    )
    .unwrap();
    assert_eq!(
        annotation(
            c.istiod().unwrap(),
            "vault.hashicorp.com/agent-inject-template-root-cert.pem"
        ),
        Some(r#"{{- with secret "m/data/p" -}}{{ .Data.data.root_cert }}{{- end -}}"#)
    );
}

#[test]
fn optional_vault_fields_become_annotations() {
    let c = Config::parse(
        "cluster: c
vault:
  authPath: auth/k
  address: https://vault.vault:8200
  namespace: admin/istio
  caCert: /vault/tls/ca.crt
  tlsSecret: vault-tls
secretVolumePath: /etc/istio-ca
profiles:
  istiod: { secretPath: m/p, rotation: init-only }
",
    )
    .unwrap();
    let p = c.istiod().unwrap();
    assert_eq!(
        annotation(p, keys::SERVICE),
        Some("https://vault.vault:8200")
    );
    assert_eq!(annotation(p, keys::NAMESPACE), Some("admin/istio"));
    assert_eq!(annotation(p, keys::CA_CERT), Some("/vault/tls/ca.crt"));
    assert_eq!(annotation(p, keys::TLS_SECRET), Some("vault-tls"));
    assert_eq!(
        annotation(p, keys::SECRET_VOLUME_PATH),
        Some("/etc/istio-ca")
    );
    assert_eq!(annotation(p, keys::PRE_POPULATE_ONLY), Some("true"));
    // Only the render interval, which init-only cannot have, stays absent.
    let absent: Vec<&str> = p.absent.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(absent, [keys::STATIC_SECRET_RENDER_INTERVAL]);
    assert_eq!(c.secret_volume_path, "/etc/istio-ca");
}

#[test]
fn config_hash_is_canonical() {
    let a = Config::parse(MINIMAL).unwrap();
    // Same content, other formatting, comments, and defaults spelled out.
    let b = Config::parse(
        "# comment
profiles:
  istiod:
    role: istiod
    secretPath: kubernetes-cluster1-secrets/istiod-service/certs
    match: { app: istiod }
vault:
  kvVersion: 1
  authPath: auth/kubernetes-cluster1
cluster: cluster1
",
    )
    .unwrap();
    assert_eq!(a.hash, b.hash);
    assert!(a.hash.starts_with("sha256:"));
    assert_eq!(a.hash.len(), "sha256:".len() + 16);
    assert!(
        a.hash[7..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    let c = Config::parse(&MINIMAL.replace("cluster1-secrets", "cluster2-secrets")).unwrap();
    assert_ne!(a.hash, c.hash);
    assert_eq!(
        annotation(a.istiod().unwrap(), keys::CONFIG_HASH),
        Some(a.hash.as_str())
    );
}

#[test]
fn rejects_missing_required_fields() {
    assert!(err("vault: { authPath: auth/k }\n").contains("missing field `cluster`"));
    assert!(err("cluster: c\nvault: {}\n").contains("authPath"));
    let e = err("cluster: c\nvault: { authPath: auth/k }\nprofiles: { istiod: { role: x } }\n");
    assert!(
        e.contains("profiles.istiod") && e.contains("secretPath"),
        "{e}"
    );
    let e = err(&with_gateway(
        "{ name: gw, match: { istio: ingressgateway }, secretPath: m/p, files: { tls.crt: k } }",
    ));
    assert!(e.contains("role"), "{e}");
    let e = err(&with_gateway(
        "{ name: gw, role: r, secretPath: m/p, files: { tls.crt: k } }",
    ));
    assert!(e.contains("match"), "{e}");
    let e = err(&with_gateway(
        "{ name: gw, match: { istio: x }, role: r, secretPath: m/p }",
    ));
    assert!(e.contains("files"), "{e}");
}

#[test]
fn rejects_unknown_fields_naming_them() {
    let e = err(&with_istiod("    secretPth: x\n"));
    assert!(
        e.contains("profiles.istiod") && e.contains("unknown field `secretPth`"),
        "{e}"
    );
    let e = err("cluster: c\nvault: { authPath: auth/k, adress: x }\n");
    assert!(
        e.contains("vault") && e.contains("unknown field `adress`"),
        "{e}"
    );
    let e = err("cluster: c\nvault: { authPath: auth/k }\nprofile: {}\n");
    assert!(e.contains("unknown field `profile`"), "{e}");
}

#[test]
fn rejects_kv_version_other_than_1_or_2() {
    let e = err("cluster: c\nvault: { authPath: auth/k, kvVersion: 3 }\n");
    assert!(e.contains("vault.kvVersion: must be 1 or 2, got 3"), "{e}");
    let e = err("cluster: c\nvault: { authPath: auth/k, kvVersion: two }\n");
    assert!(e.contains("kvVersion"), "{e}");
}

#[test]
fn kv_v2_accepts_paths_with_or_without_the_data_segment() {
    // The agent adds `data/` itself for a KV v2 mount (tests/vault_agent.rs
    // renders both forms), so both spellings are valid.
    for path in ["m/data/p", "m/p"] {
        let yaml = format!(
            "cluster: c\nvault: {{ authPath: auth/k, kvVersion: 2 }}\nprofiles: {{ istiod: {{ secretPath: {path} }} }}\n"
        );
        assert!(Config::parse(&yaml).is_ok(), "{path}");
    }
}

#[test]
fn rejects_empty_paths_and_values() {
    let e = err(
        "cluster: ''\nvault: { authPath: '' }\nprofiles: { istiod: { secretPath: '', role: '', container: '' } }\n",
    );
    for field in [
        "cluster: must not be empty",
        "vault.authPath: must not be empty",
        "profiles.istiod.secretPath: must not be empty",
        "profiles.istiod.role: must not be empty",
        "profiles.istiod.container: must not be empty",
    ] {
        assert!(e.contains(field), "missing {field:?} in:\n{e}");
    }
    let e = err("cluster: c\nvault: { authPath: auth/k }\nsecretVolumePath: ''\n");
    assert!(e.contains("secretVolumePath"), "{e}");
    let e = err("cluster: c\nvault: { authPath: auth/k }\nsecretVolumePath: vault/secrets\n");
    assert!(e.contains("absolute"), "{e}");
}

#[test]
fn rejects_paths_that_would_break_the_template() {
    for bad in [r#"m/"p"#, "m/p }}", "/m/p", "m//p", "m/p/", "m p"] {
        let e = err(&with_istiod("").replace("m/p", bad));
        assert!(e.contains("profiles.istiod.secretPath"), "{bad}: {e}");
    }
    let e = err("cluster: c\nvault: { authPath: kubernetes }\n");
    assert!(e.contains("vault.authPath") && e.contains("auth/"), "{e}");
}

#[test]
fn rejects_file_names_kubernetes_refuses() {
    let long = "a".repeat(42);
    let ok41 = "b".repeat(41);
    let gw = |file: &str| {
        with_gateway(&format!(
            "{{ name: gw, match: {{ istio: x }}, role: r, secretPath: m/p, files: {{ '{file}': k }} }}"
        ))
    };
    let c = Config::parse(&gw(&ok41)).expect("41 characters fit");
    // Every per-file annotation name, error-on-missing-key- (21) and
    // agent-inject-template- (22) included, stays within 63 characters.
    for a in &c.profiles[0].annotations {
        let name = a.key.split_once('/').map_or(a.key.as_str(), |(_, n)| n);
        assert!(name.len() <= 63, "{} is {} characters", a.key, name.len());
    }
    assert!(
        c.profiles[0]
            .annotations
            .iter()
            .any(|a| a.key.len() == "vault.hashicorp.com/".len() + 63),
        "the template annotation uses all 63 characters"
    );
    let e = err(&gw(&long));
    assert!(e.contains("is 42 characters; at most 41"), "{e}");
    for bad in ["-tls.crt", "tls.crt.", "tls/crt", "tls crt", "tls:crt", "ÿ"] {
        let e = err(&gw(bad));
        assert!(
            e.contains("profiles.gateways[0].files") && e.contains("letters, digits"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn rejects_file_prefix_the_injector_reads_differently() {
    let e = err(&with_gateway(
        "{ name: gw, match: { istio: x }, role: r, secretPath: m/p, files: { file-tls.crt: k } }",
    ));
    assert!(
        e.contains("\"file-\"") && e.contains("agent-inject-file-"),
        "{e}"
    );
    let e = err(&with_gateway(
        "{ name: gw, match: { istio: x }, role: r, secretPath: m/p, files: { File-x: k } }",
    ));
    assert!(e.contains("\"file-\""), "{e}");
}

#[test]
fn rejects_file_names_differing_only_in_case() {
    let e = err(&with_gateway(
        "{ name: gw, match: { istio: x }, role: r, secretPath: m/p, files: { tls.crt: a, TLS.crt: b } }",
    ));
    assert!(e.contains("only in case"), "{e}");
}

#[test]
fn rejects_keys_that_are_not_template_identifiers() {
    let e = err(&with_gateway(
        "{ name: gw, match: { istio: x }, role: r, secretPath: m/p, files: { tls.crt: tls-crt } }",
    ));
    assert!(e.contains("template identifier"), "{e}");
}

#[test]
fn istiod_files_must_be_one_complete_layout() {
    let partial = with_istiod("    files: { ca-key.pem: a, ca-cert.pem: b, root-cert.pem: c }\n");
    let e = err(&partial);
    assert!(
        e.contains("profiles.istiod.files") && e.contains("exactly one complete layout"),
        "{e}"
    );
    let mixed = with_istiod(
        "    files: { ca-key.pem: a, ca-cert.pem: b, root-cert.pem: c, cert-chain.pem: d, tls.crt: e }\n",
    );
    assert!(err(&mixed).contains("exactly one complete layout"));
    let tls = with_istiod("    files: { tls.crt: tls_crt, tls.key: tls_key, ca.crt: ca_crt }\n");
    assert!(Config::parse(&tls).is_ok());
    let extra = with_istiod("    files: { tls.crt: a, tls.key: b, ca.crt: c, extra.pem: d }\n");
    assert!(err(&extra).contains("exactly one complete layout"));
}

#[test]
fn rejects_repeated_selectors_and_names() {
    let e = err(
        "cluster: c\nvault: { authPath: auth/k }\nprofiles:\n  istiod: { secretPath: m/p }\n  gateways:\n    - { name: gw, match: { app: istiod }, role: r, secretPath: m/q, files: { a: k } }\n",
    );
    assert!(
        e.contains(
            "profiles.gateways[0].match: profile \"gw\" has the same selector {app: istiod} \
             as profile \"istiod\" (profiles.istiod.match)"
        ),
        "{e}"
    );
    let e = err(
        "cluster: c\nvault: { authPath: auth/k }\nprofiles:\n  gateways:\n    - { name: gw, match: { istio: a }, role: r, secretPath: m/q, files: { a: k } }\n    - { name: gw, match: { istio: b }, role: r, secretPath: m/q, files: { a: k } }\n",
    );
    assert!(
        e.contains("profiles.gateways[1].name: profile name \"gw\" is already used"),
        "{e}"
    );
    let e = err(&with_gateway(
        "{ name: istiod, match: { istio: a }, role: r, secretPath: m/q, files: { a: k } }",
    )
    .replace("profiles:\n", "profiles:\n  istiod: { secretPath: m/p }\n"));
    assert!(e.contains("already used by"), "{e}");
}

#[test]
fn a_repeated_selector_names_both_gateways() {
    let e = err(
        "cluster: c\nvault: { authPath: auth/k }\nprofiles:\n  gateways:\n    - { name: ingressgateway, match: { istio: ingressgateway }, role: r, secretPath: m/q, files: { a: k } }\n    - { name: egressgateway, match: { istio: egressgateway }, role: r, secretPath: m/q, files: { a: k } }\n    - { name: egress, match: { istio: ingressgateway }, role: r, secretPath: m/q, files: { a: k } }\n",
    );
    assert_eq!(
        e,
        "profiles.gateways[2].match: profile \"egress\" has the same selector \
         {istio: ingressgateway} as profile \"ingressgateway\" (profiles.gateways[0].match); \
         one of the two could never apply, so give them different labels"
    );
}

#[test]
fn rejects_bad_gateway_names_and_empty_selectors() {
    let e = err(&with_gateway(
        "{ name: Ingress_GW, match: { istio: a }, role: r, secretPath: m/q, files: { a: k } }",
    ));
    assert!(
        e.contains("profiles.gateways[0].name") && e.contains("DNS label"),
        "{e}"
    );
    let e = err(&with_gateway(
        "{ name: gw, match: {}, role: r, secretPath: m/q, files: { a: k } }",
    ));
    assert!(
        e.contains("profiles.gateways[0].match") && e.contains("at least one label"),
        "{e}"
    );
    let e = err(&with_istiod("    match: {}\n"));
    assert!(e.contains("profiles.istiod.match"), "{e}");
    let e = err(&with_gateway(
        "{ name: gw, match: { istio: a }, role: r, secretPath: m/q, files: {} }",
    ));
    assert!(e.contains("at least one file"), "{e}");
}

#[test]
fn reports_every_problem_at_once() {
    let e = Config::parse("cluster: ''\nvault: { authPath: '', kvVersion: 7 }\n").unwrap_err();
    assert_eq!(e.problems.len(), 3, "{e}");
}

#[test]
fn reads_config_from_a_configmap_manifest() {
    let cm = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{ name: istio-vault-webhook }}\ndata:\n  config.yaml: |\n{}",
        MINIMAL
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    let c = Config::from_document(&cm).unwrap();
    assert_eq!(c.hash, Config::parse(MINIMAL).unwrap().hash);
    let e = Config::from_document("kind: ConfigMap\ndata: { other: x }\n").unwrap_err();
    assert!(e.to_string().contains("data.\"config.yaml\""), "{e}");
    let e = Config::from_document("kind: ConfigMap\ndata:\n  config.yaml: 5\n").unwrap_err();
    assert!(e.to_string().contains("must be a string"), "{e}");
}

#[test]
fn hostile_yaml_is_an_error_not_a_panic() {
    for text in [
        "",
        "[",
        "- a\n- b\n",
        "cluster: [",
        "\u{0}",
        "a: &a [*a]",
        "cluster: !!binary x",
    ] {
        assert!(Config::parse(text).is_err(), "{text:?}");
    }
}

#[test]
fn every_file_of_every_profile_errors_on_a_missing_key() {
    let c = Config::parse(EXAMPLE_CONFIG).unwrap();
    for p in &c.profiles {
        let files: Vec<&str> = p
            .annotations
            .iter()
            .filter_map(|a| a.key.strip_prefix(keys::SECRET_PREFIX))
            .collect();
        assert!(!files.is_empty(), "{}", p.name);
        for f in files {
            assert_eq!(
                annotation(p, &format!("{}{f}", keys::ERROR_ON_MISSING_KEY_PREFIX)),
                Some("true"),
                "{}: {f}",
                p.name
            );
        }
    }
}

#[test]
fn render_interval_becomes_the_annotation_as_written() {
    let c = Config::parse(
        "cluster: c
vault: { authPath: auth/k, kvVersion: 2 }
profiles:
  istiod: { secretPath: m/data/p, renderInterval: 1h30m }
  gateways:
    - { name: gw, match: { istio: gw }, role: r, secretPath: m/data/q, files: { a: k }, renderInterval: 90s }
    - { name: other, match: { istio: other }, role: r, secretPath: m/data/q, files: { a: k } }
",
    )
    .unwrap();
    let got: Vec<Option<&str>> = c
        .profiles
        .iter()
        .map(|p| annotation(p, keys::STATIC_SECRET_RENDER_INTERVAL))
        .collect();
    assert_eq!(got, [Some("1h30m"), Some("90s"), None]);
    // Without it the annotation is owned and kept absent.
    assert!(
        c.profiles[2]
            .absent
            .iter()
            .any(|a| a.key == keys::STATIC_SECRET_RENDER_INTERVAL)
    );
}

#[test]
fn render_interval_is_refused_on_kv_v1() {
    let e = err(&with_istiod("    renderInterval: 1m\n"));
    assert!(
        e.starts_with("profiles.istiod.renderInterval: has no effect with vault.kvVersion 1")
            && e.contains("put a `ttl` key in the secret"),
        "{e}"
    );
    assert!(Config::parse(&with_istiod_v2("    renderInterval: 1m\n")).is_ok());
}

#[test]
fn render_interval_needs_rotation_sidecar() {
    let e = err(&with_istiod_v2(
        "    rotation: init-only\n    renderInterval: 30s\n",
    ));
    assert!(
        e.starts_with("profiles.istiod.renderInterval: only applies with rotation: sidecar"),
        "{e}"
    );
    let e = err(&with_gateway_v2(
        "{ name: gw, match: { istio: x }, role: r, secretPath: m/p, files: { a: k }, rotation: init-only, renderInterval: 5m }",
    ));
    assert!(
        e.starts_with("profiles.gateways[0].renderInterval: only applies with rotation: sidecar")
            && e.contains("remove renderInterval or set rotation: sidecar"),
        "{e}"
    );
}

#[test]
fn render_interval_must_be_a_positive_go_duration() {
    for (text, nanos) in [
        ("30s", 30_000_000_000),
        ("5m", 300_000_000_000),
        ("1h30m", 5_400_000_000_000),
        ("1.5h", 5_400_000_000_000),
        (".5s", 500_000_000),
        ("5.s", 5_000_000_000),
        ("1m30.25s", 90_250_000_000),
        ("250ms", 250_000_000),
        ("10us", 10_000),
        ("10\u{b5}s", 10_000),
        ("10\u{3bc}s", 10_000),
        ("7ns", 7),
        ("1h0m0s", 3_600_000_000_000),
        ("2562047h", 2_562_047 * 3_600_000_000_000),
    ] {
        assert_eq!(go_duration_nanos(text), Ok(nanos), "{text}");
        let yaml = with_istiod_v2(&format!("    renderInterval: \"{text}\"\n"));
        assert!(Config::parse(&yaml).is_ok(), "{text} refused");
    }
    for (text, why) in [
        ("", "empty"),
        ("30", "has no unit"),
        ("0", "has no unit"),
        ("5m30", "has no unit"),
        ("5min", "unknown unit \"min\""),
        ("1d", "unknown unit \"d\""),
        ("5 m", "unknown unit \" m\""),
        ("-5m", "\"-\" has no number before it"),
        ("+5m", "\"+\" has no number before it"),
        ("s", "\"s\" has no number before it"),
        (".s", "a lone '.' is not a number"),
        ("1.2.3s", "has two '.'"),
        ("2562048h", "too long"),
    ] {
        let e = err(&with_istiod_v2(&format!(
            "    renderInterval: \"{text}\"\n"
        )));
        assert!(
            e.starts_with(&format!(
                "profiles.istiod.renderInterval: {text:?} is not a duration ("
            )) && e.contains(why)
                && e.contains("e.g. 30s, 5m or 1h30m"),
            "{text}: {e}"
        );
    }
    for zero in ["0s", "0h0m", "0.0000000001s"] {
        let e = err(&with_istiod_v2(&format!(
            "    renderInterval: \"{zero}\"\n"
        )));
        assert!(e.contains("must be longer than zero"), "{zero}: {e}");
    }
    // A YAML number is not a duration; the error says what to write.
    let e = err(&with_istiod_v2("    renderInterval: 30\n"));
    assert!(
        e.starts_with(
            "profiles.istiod.renderInterval: \"30\" is not a duration (\"30\" has no unit)"
        ),
        "{e}"
    );
    let e = err(&with_istiod_v2("    renderInterval: [30s]\n"));
    assert!(
        e.contains("profiles.istiod: renderInterval must be a duration such as 30s"),
        "{e}"
    );
}

#[test]
fn an_unset_render_interval_leaves_the_config_hash_as_it_was() {
    // Absent from the canonical form, so configs written before the field
    // existed keep their hash; setting it changes the hash.
    let a = Config::parse(&with_istiod_v2("")).unwrap();
    assert!(
        !serde_json::to_string(&a.raw)
            .unwrap()
            .contains("renderInterval")
    );
    let b = Config::parse(&with_istiod_v2("    renderInterval: 1m\n")).unwrap();
    assert_ne!(a.hash, b.hash);
    // Written back from its defaulted form, it loads with the same hash.
    let again = Config::parse(&serde_yaml_ng::to_string(&b.raw).unwrap()).unwrap();
    assert_eq!(again.hash, b.hash);
}
