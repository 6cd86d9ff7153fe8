//! `config.yaml`: schema, defaults and validation (README, "Configuration
//! reference"). Pure: no I/O.
//!
//! Parsing happens in two steps. `RawConfig` is the YAML as the admin wrote it
//! (`deny_unknown_fields` everywhere, so a typo is an error, not a silently
//! ignored key). `Config::parse` validates it and compiles every profile into
//! the exact annotation set it asks for, so the admission path only compares
//! strings and never formats a template per request.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::patch::{PatchOp, Prepared};

/// Where the Vault Agent Injector renders secrets unless told otherwise.
pub const DEFAULT_SECRET_VOLUME_PATH: &str = "/vault/secrets";
/// Key of the config inside the ConfigMap.
pub const CONFIG_MAP_KEY: &str = "config.yaml";

/// The annotation keys the webhook writes or reads. The `vault.hashicorp.com/`
/// ones are read by the Vault Agent Injector; what it does with each, and its
/// default when the annotation is absent, is from hashicorp/vault-k8s
/// `agent-inject/agent/annotations.go` (the constant named in each comment).
/// Which of them a profile sets, and when, is in docs/design.md ("The rules
/// of the patch").
pub mod keys {
    /// The prefix every injector annotation shares; a file name may use what
    /// the longest per-file key leaves of the 63 characters after it.
    pub const VAULT: &str = "vault.hashicorp.com/";
    /// `AnnotationAgentInject`: `"true"` makes the injector add its init
    /// container (and sidecar). Absent: no injection. Parsed strictly as a
    /// boolean; an unparsable value makes the injector refuse the Pod.
    pub const AGENT_INJECT: &str = "vault.hashicorp.com/agent-inject";
    /// `AnnotationAgentInitFirst`: `"true"` puts `vault-agent-init` before
    /// every other init container, so the CA files exist before anything of
    /// istiod runs. Default false (last).
    pub const AGENT_INIT_FIRST: &str = "vault.hashicorp.com/agent-init-first";
    /// `AnnotationVaultRole`: the Vault role the agent logs in with through
    /// the Kubernetes auth method. No default: the injector refuses a Pod
    /// without one.
    pub const ROLE: &str = "vault.hashicorp.com/role";
    /// `AnnotationVaultAuthPath`: the auth mount the agent logs in at. Default
    /// the injector's `-vault-auth-path` flag (`auth/kubernetes`); each
    /// cluster of a mesh has its own mount, hence `vault.authPath`.
    pub const AUTH_PATH: &str = "vault.hashicorp.com/auth-path";
    /// `AnnotationAgentInjectSecret` + `-<name>`: the Vault path of the secret
    /// rendered to `<secret volume>/<name>`. The name is the whole suffix,
    /// lower-cased.
    pub const SECRET_PREFIX: &str = "vault.hashicorp.com/agent-inject-secret-";
    /// `AnnotationAgentInjectTemplate` + `-<name>`: the template for that
    /// secret. Default a generic template that prints the whole secret as Go
    /// maps, which is not a PEM file.
    pub const TEMPLATE_PREFIX: &str = "vault.hashicorp.com/agent-inject-template-";
    /// `AnnotationAgentPrePopulateOnly`: `"true"` injects only the init
    /// container, so nothing re-renders after start (`rotation: init-only`).
    /// Default false (a sidecar keeps rendering).
    pub const PRE_POPULATE_ONLY: &str = "vault.hashicorp.com/agent-pre-populate-only";
    /// `AnnotationVaultSecretVolumePath`: where the secrets volume is mounted
    /// in every container. Default `/vault/secrets`
    /// ([`super::DEFAULT_SECRET_VOLUME_PATH`]), which is then not written.
    pub const SECRET_VOLUME_PATH: &str = "vault.hashicorp.com/secret-volume-path";
    /// `AnnotationVaultService`: the Vault address the agent talks to.
    /// Default the injector's `-vault-address` flag.
    pub const SERVICE: &str = "vault.hashicorp.com/service";
    /// `AnnotationVaultNamespace`: the Vault Enterprise namespace. Default
    /// the injector's `-vault-namespace` flag (none).
    pub const NAMESPACE: &str = "vault.hashicorp.com/namespace";
    /// `AnnotationVaultCACert`: path, inside the agent's containers, of the
    /// CA certificate that verifies Vault's TLS. Default none (system roots).
    pub const CA_CERT: &str = "vault.hashicorp.com/ca-cert";
    /// `AnnotationVaultTLSSecret`: a Kubernetes Secret mounted into the agent
    /// at `/vault/tls` (for `ca-cert` and client certificates). Default none.
    pub const TLS_SECRET: &str = "vault.hashicorp.com/tls-secret";
    /// `AnnotationErrorOnMissingKey` + `-<name>`: `"true"` sets the agent's
    /// `error_on_missing_key` on that file's template, so a key missing from
    /// the secret fails the agent instead of rendering `<no value>` into a
    /// CA file. Default false.
    pub const ERROR_ON_MISSING_KEY_PREFIX: &str = "vault.hashicorp.com/error-on-missing-key-";
    /// `AnnotationTemplateConfigStaticSecretRenderInterval`: copied unparsed
    /// into the agent's `template_config.static_secret_render_interval`, how
    /// often the sidecar re-reads a secret without a lease (KV v2). Default 5
    /// minutes. A KV v1 read carries a lease duration, which the agent
    /// follows instead (hashicorp/consul-template
    /// `dependency/vault_common.go`, `leaseCheckWait`).
    pub const STATIC_SECRET_RENDER_INTERVAL: &str =
        "vault.hashicorp.com/template-static-secret-render-interval";
    /// `AnnotationAgentStatus`: set by the injector itself to `injected`
    /// once it has mutated a Pod; it then skips the Pod. The webhook never
    /// writes it and leaves an injected Pod unchanged.
    pub const INJECT_STATUS: &str = "vault.hashicorp.com/agent-inject-status";
    /// Ours: the profile that was applied (docs/design.md).
    pub const PROFILE: &str = "istio-vault-webhook/profile";
    /// Ours: `sha256:` + 16 hex digits of the config that was applied.
    pub const CONFIG_HASH: &str = "istio-vault-webhook/config-hash";
    /// Set by the kubelet on the API mirror of a static Pod, which cannot be
    /// changed through the API: such Pods are left alone.
    pub const MIRROR: &str = "kubernetes.io/config.mirror";
}

/// The two file layouts istiod reads from `ROOT_CA_DIR`
/// (istio/istio `security/pkg/pki/ca` and `pilot/pkg/bootstrap/istio_ca.go`).
const ISTIO_LAYOUT: [&str; 4] = [
    "ca-key.pem",
    "ca-cert.pem",
    "root-cert.pem",
    "cert-chain.pem",
];
const TLS_LAYOUT: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

/// Annotation names are at most 63 characters after the `/`, so a file name
/// gets what the longest per-file prefix leaves: `agent-inject-template-`
/// (22; `error-on-missing-key-` is 21, `agent-inject-secret-` 20) leaves 41.
const MAX_FILE_NAME: usize = 63 + keys::VAULT.len()
    - longest(&[
        keys::SECRET_PREFIX,
        keys::TEMPLATE_PREFIX,
        keys::ERROR_ON_MISSING_KEY_PREFIX,
    ]);

const fn longest(prefixes: &[&str]) -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < prefixes.len() {
        if prefixes[i].len() > max {
            max = prefixes[i].len();
        }
        i += 1;
    }
    max
}

// ---------------------------------------------------------------------------
// Raw schema
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawConfig {
    pub cluster: String,
    pub vault: RawVault,
    #[serde(default = "default_secret_volume_path")]
    pub secret_volume_path: String,
    #[serde(default)]
    pub profiles: RawProfiles,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawVault {
    pub auth_path: String,
    #[serde(default = "default_kv_version")]
    pub kv_version: u8,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub ca_cert: String,
    #[serde(default)]
    pub tls_secret: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawProfiles {
    #[serde(default)]
    pub istiod: Option<RawIstiod>,
    #[serde(default)]
    pub gateways: Vec<RawGateway>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rotation {
    /// The agent stays as a sidecar and re-renders files when Vault changes.
    Sidecar,
    /// Only the init container renders; a rotation needs a Pod restart.
    InitOnly,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawIstiod {
    pub secret_path: String,
    #[serde(default = "default_istiod_role")]
    pub role: String,
    #[serde(default = "default_istiod_match", rename = "match")]
    pub selector: BTreeMap<String, String>,
    #[serde(default = "default_istiod_container")]
    pub container: String,
    #[serde(default = "default_rotation")]
    pub rotation: Rotation,
    /// How often the sidecar agent re-reads the secret, as written (a Go
    /// duration such as `30s`); `rotation: sidecar` only.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration_text"
    )]
    pub render_interval: Option<String>,
    #[serde(default = "default_istiod_files")]
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawGateway {
    pub name: String,
    #[serde(rename = "match")]
    pub selector: BTreeMap<String, String>,
    pub role: String,
    pub secret_path: String,
    #[serde(default = "default_rotation")]
    pub rotation: Rotation,
    /// As for istiod.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "duration_text"
    )]
    pub render_interval: Option<String>,
    pub files: BTreeMap<String, String>,
}

/// `renderInterval` as written. A YAML number (`renderInterval: 30`) is kept
/// as its text so that validation names the field and says a unit is
/// missing, rather than serde's "expected a string".
fn duration_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match serde_yaml_ng::Value::deserialize(d)? {
        serde_yaml_ng::Value::Null => Ok(None),
        serde_yaml_ng::Value::String(s) => Ok(Some(s)),
        serde_yaml_ng::Value::Number(n) => Ok(Some(n.to_string())),
        _ => Err(D::Error::custom(
            "renderInterval must be a duration such as 30s, 5m or 1h30m",
        )),
    }
}

fn default_secret_volume_path() -> String {
    DEFAULT_SECRET_VOLUME_PATH.to_owned()
}
fn default_kv_version() -> u8 {
    1
}
fn default_istiod_role() -> String {
    "istiod".to_owned()
}
fn default_istiod_match() -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_owned(), "istiod".to_owned())])
}
fn default_istiod_container() -> String {
    "discovery".to_owned()
}
fn default_rotation() -> Rotation {
    Rotation::Sidecar
}
fn default_istiod_files() -> BTreeMap<String, String> {
    [
        ("ca-key.pem", "ca_key"),
        ("ca-cert.pem", "ca_cert"),
        ("root-cert.pem", "root_cert"),
        ("cert-chain.pem", "cert_chain"),
    ]
    .into_iter()
    .map(|(f, k)| (f.to_owned(), k.to_owned()))
    .collect()
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One or more problems with a config, each naming the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path to the field, e.g. `profiles.gateways[0].files."tls.crt"`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {}", p.field, p.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                field: field.into(),
                reason: reason.into(),
            }],
        }
    }
}

// ---------------------------------------------------------------------------
// Compiled config
// ---------------------------------------------------------------------------

/// A validated config, compiled for the admission path.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: String,
    /// `sha256:` + first 16 hex digits of the canonical (defaulted, sorted) config.
    pub hash: String,
    pub secret_volume_path: String,
    /// istiod first (when configured), then gateways in file order.
    pub profiles: Vec<Profile>,
    /// The validated input with defaults filled in; `render` and `check` show it.
    pub raw: RawConfig,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub selector: BTreeMap<String, String>,
    /// Annotations the Pod must end up with, sorted by key.
    pub annotations: Vec<Annotation>,
    /// Annotations the webhook owns that this profile wants absent.
    pub absent: Vec<Annotation>,
    /// `add` of the whole `/metadata/annotations` map, for a Pod that has none.
    pub add_all: Arc<Prepared>,
    pub kind: ProfileKind,
}

/// What a profile is for, which decides what besides annotations it asks of
/// a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileKind {
    /// `profiles.istiod`: the named container must exist (or the Pod is
    /// denied) and gets `ROOT_CA_DIR`.
    Istiod { container: String },
    /// `profiles.gateways[*]`: annotations only; the gateway reads its files
    /// from the secret volume by path.
    Gateway,
}

/// One annotation with the patch operations that set or remove it, prepared
/// when the config loads (`patch::Prepared`), so the admission path neither
/// escapes a key nor serializes an operation.
#[derive(Debug, Clone)]
pub struct Annotation {
    pub key: String,
    pub value: String,
    /// `add` of `/metadata/annotations/<key, ~ and / escaped>` with the value.
    pub add: Arc<Prepared>,
    /// `replace` of the same path with the value.
    pub replace: Arc<Prepared>,
    /// `remove` of the same path.
    pub remove: Arc<Prepared>,
}

impl Annotation {
    fn new(key: &str, value: &str) -> Annotation {
        let path = crate::patch::pointer(["metadata", "annotations", key]);
        let value_json = || Value::String(value.to_owned());
        Annotation {
            key: key.to_owned(),
            value: value.to_owned(),
            add: Prepared::new(PatchOp::Add {
                path: path.clone(),
                value: value_json(),
            }),
            replace: Prepared::new(PatchOp::Replace {
                path: path.clone(),
                value: value_json(),
            }),
            remove: Prepared::new(PatchOp::Remove { path }),
        }
    }

    /// `/metadata/annotations/<key, ~ and / escaped>`.
    pub fn pointer(&self) -> &str {
        self.remove.op.path()
    }
}

impl Profile {
    pub fn is_istiod(&self) -> bool {
        matches!(self.kind, ProfileKind::Istiod { .. })
    }

    /// All selector labels present with equal values.
    pub fn matches<'a>(&self, mut label: impl FnMut(&str) -> Option<&'a str>) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| label(k) == Some(v.as_str()))
    }
}

/// The embedded example: cluster1 of the README's two-cluster layout. `serve` uses it when
/// started with no flags outside a cluster.
pub const EXAMPLE_CONFIG: &str = include_str!("example-config.yaml");

impl Config {
    /// One line about a valid config, as `check` and `doctor` print it:
    /// `cluster C, profiles: a, b, config-hash sha256:…`.
    pub fn summary(&self) -> String {
        let names: Vec<&str> = self.profiles.iter().map(|p| p.name.as_str()).collect();
        let names = if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        };
        format!(
            "cluster {}, profiles: {names}, config-hash {}",
            self.cluster, self.hash
        )
    }

    /// Parses and validates a bare `config.yaml`.
    pub fn parse(yaml: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml_ng::from_str(yaml)
            .map_err(|e| ConfigError::one("config.yaml", yaml_reason(&e)))?;
        Config::compile(raw)
    }

    /// Parses a bare `config.yaml` or a ConfigMap manifest carrying one.
    pub fn from_document(text: &str) -> Result<Config, ConfigError> {
        Config::parse(&config_text_from_document(text)?)
    }

    /// Validates a parsed config and compiles its profiles.
    pub fn compile(raw: RawConfig) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        validate(&raw, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let hash = canonical_hash(&raw);
        let mut profiles = Vec::new();
        if let Some(istiod) = &raw.profiles.istiod {
            profiles.push(compile_profile(
                &raw,
                &hash,
                ProfileSpec {
                    name: "istiod",
                    selector: &istiod.selector,
                    role: &istiod.role,
                    secret_path: &istiod.secret_path,
                    rotation: istiod.rotation,
                    render_interval: istiod.render_interval.as_deref(),
                    files: &istiod.files,
                    kind: ProfileKind::Istiod {
                        container: istiod.container.clone(),
                    },
                },
            ));
        }
        for g in &raw.profiles.gateways {
            profiles.push(compile_profile(
                &raw,
                &hash,
                ProfileSpec {
                    name: &g.name,
                    selector: &g.selector,
                    role: &g.role,
                    secret_path: &g.secret_path,
                    rotation: g.rotation,
                    render_interval: g.render_interval.as_deref(),
                    files: &g.files,
                    kind: ProfileKind::Gateway,
                },
            ));
        }
        Ok(Config {
            cluster: raw.cluster.clone(),
            hash,
            secret_volume_path: raw.secret_volume_path.clone(),
            profiles,
            raw,
        })
    }

    pub fn istiod(&self) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.is_istiod())
    }
}

/// Reads a file's text as either a bare config or a ConfigMap manifest that
/// carries it under `data."config.yaml"` (what `check` and `--config` accept).
pub fn config_text_from_document(text: &str) -> Result<std::borrow::Cow<'_, str>, ConfigError> {
    #[derive(Deserialize)]
    struct Probe {
        kind: Option<serde_yaml_ng::Value>,
        data: Option<BTreeMap<String, serde_yaml_ng::Value>>,
    }
    let probe: Probe = match serde_yaml_ng::from_str(text) {
        Ok(p) => p,
        // Not a mapping at all: let the real parser produce the error.
        Err(_) => return Ok(text.into()),
    };
    if probe.kind.as_ref().and_then(|k| k.as_str()) != Some("ConfigMap") {
        return Ok(text.into());
    }
    match probe.data.as_ref().and_then(|d| d.get(CONFIG_MAP_KEY)) {
        Some(serde_yaml_ng::Value::String(s)) => Ok(s.clone().into()),
        Some(_) => Err(ConfigError::one(
            "data.\"config.yaml\"",
            "must be a string (use a YAML block scalar: `config.yaml: |`)",
        )),
        None => Err(ConfigError::one(
            "data.\"config.yaml\"",
            "the ConfigMap has no config.yaml key; put the config under data.\"config.yaml\"",
        )),
    }
}

fn yaml_reason(e: &serde_yaml_ng::Error) -> String {
    // serde_yaml_ng already prefixes the message with the field path
    // (`profiles.istiod: unknown field ...`); keep it on one line.
    e.to_string().replace('\n', " ")
}

fn canonical_hash(raw: &RawConfig) -> String {
    // Structs serialize in declaration order and maps are BTreeMaps, so this
    // JSON is canonical: equal configs (after defaults) hash equally whatever
    // their YAML formatting, key order or comments.
    let canonical = serde_json::to_vec(raw).unwrap_or_default();
    let digest = Sha256::digest(&canonical);
    let mut hex = String::with_capacity(7 + 16);
    hex.push_str("sha256:");
    for b in &digest[..8] {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

struct ProfileSpec<'a> {
    name: &'a str,
    selector: &'a BTreeMap<String, String>,
    role: &'a str,
    secret_path: &'a str,
    rotation: Rotation,
    render_interval: Option<&'a str>,
    files: &'a BTreeMap<String, String>,
    kind: ProfileKind,
}

fn compile_profile(raw: &RawConfig, hash: &str, p: ProfileSpec<'_>) -> Profile {
    let mut want: BTreeMap<String, String> = BTreeMap::new();
    let mut absent = Vec::new();
    let mut set = |k: &str, v: &str| {
        want.insert(k.to_owned(), v.to_owned());
    };
    set(keys::AGENT_INJECT, "true");
    set(keys::AGENT_INIT_FIRST, "true");
    set(keys::ROLE, p.role);
    set(keys::AUTH_PATH, &raw.vault.auth_path);
    for (file, key) in p.files {
        set(&format!("{}{file}", keys::SECRET_PREFIX), p.secret_path);
        set(
            &format!("{}{file}", keys::TEMPLATE_PREFIX),
            &template(raw.vault.kv_version, p.secret_path, key),
        );
        set(
            &format!("{}{file}", keys::ERROR_ON_MISSING_KEY_PREFIX),
            "true",
        );
    }
    for (key, value, present) in [
        (
            keys::PRE_POPULATE_ONLY,
            "true",
            p.rotation == Rotation::InitOnly,
        ),
        (
            keys::SECRET_VOLUME_PATH,
            raw.secret_volume_path.as_str(),
            raw.secret_volume_path != DEFAULT_SECRET_VOLUME_PATH,
        ),
        (
            keys::SERVICE,
            raw.vault.address.as_str(),
            !raw.vault.address.is_empty(),
        ),
        (
            keys::NAMESPACE,
            raw.vault.namespace.as_str(),
            !raw.vault.namespace.is_empty(),
        ),
        (
            keys::CA_CERT,
            raw.vault.ca_cert.as_str(),
            !raw.vault.ca_cert.is_empty(),
        ),
        (
            keys::TLS_SECRET,
            raw.vault.tls_secret.as_str(),
            !raw.vault.tls_secret.is_empty(),
        ),
        (
            keys::STATIC_SECRET_RENDER_INTERVAL,
            p.render_interval.unwrap_or_default(),
            p.render_interval.is_some(),
        ),
    ] {
        if present {
            set(key, value);
        } else {
            absent.push(Annotation::new(key, ""));
        }
    }
    set(keys::PROFILE, p.name);
    set(keys::CONFIG_HASH, hash);
    let map = want
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Profile {
        name: p.name.to_owned(),
        selector: p.selector.clone(),
        annotations: want.iter().map(|(k, v)| Annotation::new(k, v)).collect(),
        absent,
        add_all: Prepared::new(PatchOp::Add {
            path: "/metadata/annotations".into(),
            value: Value::Object(map),
        }),
        kind: p.kind,
    }
}

/// The Vault Agent template for one file (docs/design.md). The trim markers make the
/// rendered file exactly the stored value: no newline added or lost.
pub fn template(kv_version: u8, secret_path: &str, key: &str) -> String {
    let data = if kv_version == 2 {
        ".Data.data"
    } else {
        ".Data"
    };
    format!("{{{{- with secret \"{secret_path}\" -}}}}{{{{ {data}.{key} }}}}{{{{- end -}}}}")
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

fn validate(raw: &RawConfig, problems: &mut Vec<Problem>) {
    let mut bad = |field: String, reason: String| problems.push(Problem { field, reason });

    if raw.cluster.trim().is_empty() {
        bad("cluster".into(), "must not be empty".into());
    }
    check_path(&raw.vault.auth_path, "vault.authPath", &mut bad);
    if !raw.vault.auth_path.starts_with("auth/") && !raw.vault.auth_path.is_empty() {
        bad(
            "vault.authPath".into(),
            format!(
                "{:?} must be the auth mount's full path, e.g. auth/kubernetes-cluster1",
                raw.vault.auth_path
            ),
        );
    }
    if !matches!(raw.vault.kv_version, 1 | 2) {
        bad(
            "vault.kvVersion".into(),
            format!("must be 1 or 2, got {}", raw.vault.kv_version),
        );
    }
    if !raw.secret_volume_path.starts_with('/') || raw.secret_volume_path.len() < 2 {
        bad(
            "secretVolumePath".into(),
            format!(
                "{:?} must be an absolute directory path such as /vault/secrets",
                raw.secret_volume_path
            ),
        );
    } else if raw.secret_volume_path.contains(char::is_whitespace) {
        bad(
            "secretVolumePath".into(),
            "must not contain whitespace".into(),
        );
    }

    let mut names: Vec<(String, &str)> = Vec::new(); // (field, profile name)
    // (field, profile name, selector)
    let mut selectors: Vec<(String, &str, &BTreeMap<String, String>)> = Vec::new();

    if let Some(i) = &raw.profiles.istiod {
        let f = "profiles.istiod";
        names.push((f.into(), "istiod"));
        selectors.push((f.into(), "istiod", &i.selector));
        check_profile_common(f, &i.role, &i.secret_path, &i.selector, &i.files, &mut bad);
        check_render_interval(
            f,
            raw.vault.kv_version,
            i.rotation,
            i.render_interval.as_deref(),
            &mut bad,
        );
        if i.container.trim().is_empty() {
            bad(format!("{f}.container"), "must not be empty".into());
        }
        let names: Vec<&str> = i.files.keys().map(String::as_str).collect();
        let is = |layout: &[&str]| {
            names.len() == layout.len() && layout.iter().all(|n| i.files.contains_key(*n))
        };
        if !is(&ISTIO_LAYOUT) && !is(&TLS_LAYOUT) {
            bad(
                format!("{f}.files"),
                format!(
                    "istiod needs exactly one complete layout: {{{}}} or {{{}}}, got {{{}}} \
                     (a partial set makes istiod refuse to start or fall back to a self-signed CA)",
                    ISTIO_LAYOUT.join(", "),
                    TLS_LAYOUT.join(", "),
                    names.join(", ")
                ),
            );
        }
    }

    for (idx, g) in raw.profiles.gateways.iter().enumerate() {
        let f = format!("profiles.gateways[{idx}]");
        if !is_dns_label(&g.name) {
            bad(
                format!("{f}.name"),
                format!(
                    "{:?} must be a DNS label: 1-63 lowercase letters, digits or '-', \
                     starting and ending with a letter or digit",
                    g.name
                ),
            );
        }
        names.push((format!("{f}.name"), &g.name));
        selectors.push((f.clone(), &g.name, &g.selector));
        check_profile_common(&f, &g.role, &g.secret_path, &g.selector, &g.files, &mut bad);
        check_render_interval(
            &f,
            raw.vault.kv_version,
            g.rotation,
            g.render_interval.as_deref(),
            &mut bad,
        );
        if g.files.is_empty() {
            bad(format!("{f}.files"), "must name at least one file".into());
        }
    }

    for (i, (field, name)) in names.iter().enumerate() {
        if let Some((first, _)) = names[..i].iter().find(|(_, n)| n == name) {
            bad(
                field.clone(),
                format!("profile name {name:?} is already used by {first}"),
            );
        }
    }
    // Both profiles by name as well as by index: in a long gateway list an
    // index alone sends the reader counting.
    for (i, (field, name, sel)) in selectors.iter().enumerate() {
        if let Some((first, first_name, _)) = selectors[..i].iter().find(|(_, _, s)| s == sel) {
            let labels: Vec<String> = sel.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            bad(
                format!("{field}.match"),
                format!(
                    "profile {name:?} has the same selector {{{}}} as profile {first_name:?} \
                     ({first}.match); one of the two could never apply, so give them \
                     different labels",
                    labels.join(", ")
                ),
            );
        }
    }
}

fn check_profile_common(
    f: &str,
    role: &str,
    secret_path: &str,
    selector: &BTreeMap<String, String>,
    files: &BTreeMap<String, String>,
    bad: &mut impl FnMut(String, String),
) {
    if role.trim().is_empty() {
        bad(format!("{f}.role"), "must not be empty".into());
    }
    check_path(secret_path, &format!("{f}.secretPath"), bad);
    if selector.is_empty() {
        bad(
            format!("{f}.match"),
            "must name at least one label (an empty selector matches every Pod)".into(),
        );
    }
    for (k, v) in selector {
        if k.is_empty() {
            bad(format!("{f}.match"), "label keys must not be empty".into());
        }
        if v.len() > 63 {
            bad(
                format!("{f}.match.{k:?}"),
                "label values are at most 63 characters".into(),
            );
        }
    }
    let mut lower: BTreeMap<String, &str> = BTreeMap::new();
    for (file, key) in files {
        let field = format!("{f}.files.{file:?}");
        if let Some(reason) = file_name_problem(file) {
            bad(field.clone(), reason);
        }
        if let Some(other) = lower.insert(file.to_ascii_lowercase(), file) {
            bad(
                field.clone(),
                format!(
                    "differs from {other:?} only in case; the injector lower-cases file names, \
                     so both would render to the same file"
                ),
            );
        }
        if !is_template_identifier(key) {
            bad(
                field,
                format!(
                    "key {key:?} must be a template identifier (letters, digits, '_', not \
                     starting with a digit) so that .Data.{key} works; store it as e.g. ca_key"
                ),
            );
        }
    }
}

fn check_render_interval(
    f: &str,
    kv_version: u8,
    rotation: Rotation,
    interval: Option<&str>,
    bad: &mut impl FnMut(String, String),
) {
    let Some(interval) = interval else {
        return;
    };
    let field = format!("{f}.renderInterval");
    // A KV v1 read carries a lease (the secret's `ttl` key, else the mount's default lease TTL,
    // 768 h), and the agent re-reads after about 90% of it whatever the render interval says
    // (hashicorp/consul-template dependency/vault_common.go, leaseCheckWait; measured with
    // OpenBao 2.7.2 in tests/vault_agent.rs). Accepting the field would promise a re-read that
    // never comes.
    if kv_version == 1 {
        bad(
            field.clone(),
            "has no effect with vault.kvVersion 1: the agent re-reads a KV v1 secret after \
             about 90% of its lease, so put a `ttl` key in the secret instead (setup.sh \
             stores ttl=1h; SECRET_TTL changes it), or use a KV v2 mount (kvVersion: 2)"
                .into(),
        );
    }
    if rotation == Rotation::InitOnly {
        bad(
            field.clone(),
            "only applies with rotation: sidecar (with init-only the agent renders once, \
             before the Pod starts, and never again); remove renderInterval or set \
             rotation: sidecar"
                .into(),
        );
    }
    match go_duration_nanos(interval) {
        Err(why) => bad(
            field,
            format!(
                "{interval:?} is not a duration ({why}): write numbers with units \
                 ns, us, ms, s, m or h, e.g. 30s, 5m or 1h30m"
            ),
        ),
        Ok(0) => bad(
            field,
            format!("{interval:?} must be longer than zero, e.g. 30s or 5m"),
        ),
        Ok(_) => {}
    }
}

/// Nanoseconds of a duration in the syntax of Go's `time.ParseDuration`
/// (what the agent's `parseutil.ParseDurationSecond` hands it: openbao/openbao
/// and hashicorp/vault command/agent/config/config.go,
/// `parseTemplateConfig`), without a sign: one or more `<decimal><unit>`,
/// the decimal with digits before or after an optional `.`, the unit one
/// of `ns us µs μs ms s m h`. Go's limit, about 292 years, is kept; digits
/// of a fraction beyond a nanosecond are dropped, as Go drops them.
fn go_duration_nanos(text: &str) -> Result<u64, String> {
    const UNITS: [(&str, u64); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("\u{b5}s", 1_000),
        ("\u{3bc}s", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    if text.is_empty() {
        return Err("empty".into());
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        rest = after;
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(if number.is_empty() {
                format!("{unit:?} has no number before it")
            } else {
                "a lone '.' is not a number".into()
            });
        }
        if fraction.contains('.') {
            return Err(format!("{number:?} has two '.'"));
        }
        if unit.is_empty() {
            return Err(format!("{number:?} has no unit"));
        }
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(format!("unknown unit {unit:?}"));
        };
        let scale = u128::from(scale);
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| "too long".to_owned())?
        };
        // The first 19 digits of a fraction reach far below a nanosecond
        // even in hours (Go stops near 18) and keep the product in range.
        let digits = &fraction[..fraction.len().min(19)];
        let fraction_nanos = if digits.is_empty() {
            0
        } else {
            let value: u128 = digits.parse().map_err(|_| "too long".to_owned())?;
            value * scale / 10u128.pow(digits.len() as u32)
        };
        total = whole
            .checked_mul(scale)
            .and_then(|n| n.checked_add(fraction_nanos))
            .and_then(|n| n.checked_add(total))
            .ok_or_else(|| "too long".to_owned())?;
        if total > i64::MAX as u128 {
            return Err("too long: at most about 292 years".into());
        }
    }
    u64::try_from(total).map_err(|_| "too long".to_owned())
}

fn check_path(path: &str, field: &str, bad: &mut impl FnMut(String, String)) {
    if path.trim().is_empty() {
        bad(field.into(), "must not be empty".into());
        return;
    }
    // The path lands inside a Go template string literal and an annotation.
    if path.starts_with('/')
        || path.ends_with('/')
        || path.contains("//")
        || path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | '{' | '}'))
    {
        bad(
            field.into(),
            format!(
                "{path:?} must be a Vault path like mount/dir/name: no leading or trailing '/', \
                 no empty segment, no whitespace, quotes, backslashes or braces"
            ),
        );
    }
}

/// Why a file name cannot be used, if it cannot (the rules are in the
/// README's "Configuration reference").
fn file_name_problem(file: &str) -> Option<String> {
    if file.is_empty() {
        return Some("file name must not be empty".into());
    }
    if file.len() > MAX_FILE_NAME {
        return Some(format!(
            "file name is {} characters; at most {MAX_FILE_NAME} fit in the annotation name \
             vault.hashicorp.com/agent-inject-template-<file> (63 characters after the '/')",
            file.len()
        ));
    }
    let ok_chars = file
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let ok_ends = file.starts_with(|c: char| c.is_ascii_alphanumeric())
        && file.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok_chars || !ok_ends {
        return Some(
            "file name must be letters, digits, '.', '_' or '-', starting and ending with a \
             letter or digit (it becomes part of an annotation name)"
                .into(),
        );
    }
    if file.to_ascii_lowercase().starts_with("file-") {
        return Some(
            "file name must not start with \"file-\": the injector reads \
             agent-inject-file-* as a different annotation"
                .into(),
        );
    }
    None
}

fn is_template_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests;
