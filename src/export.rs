//! `export --config FILE`: the same config as native admission policies
//! (`admissionregistration.k8s.io/v1`, Kubernetes ≥ 1.36), for clusters that would rather run no
//! webhook process:
//!
//! * one MutatingAdmissionPolicy + binding per profile: an `ApplyConfiguration` mutation sets the
//!   profile's annotations (the same key/value list the webhook's patch produces, including
//!   `istio-vault-webhook/profile` and `config-hash`), a `JSONPatch` mutation removes the owned
//!   annotations the profile wants absent, and for istiod a `JSONPatch` leaves the container with
//!   exactly one `ROOT_CA_DIR` (the first one replaced in place, later duplicates dropped, else
//!   appended), as the webhook does;
//! * the guard ValidatingAdmissionPolicy + binding, generated from the config (the istiod
//!   profile's match, container and secret volume path);
//! * a ValidatingAdmissionPolicy + binding refusing a Pod that matches two profiles.
//!
//! MutatingAdmissionPolicies run before every mutating webhook (the API server's plugin order),
//! so the Vault Agent Injector always sees the annotations: no name ordering is involved.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use serde_json::{Value, json};

use crate::config::{Config, Profile, ProfileKind, keys};

pub const PREFIX: &str = "istio-vault-webhook";
pub const GUARD: &str = "istio-vault-webhook-istiod-requires-vault";
pub const ONE_PROFILE: &str = "istio-vault-webhook-one-profile";
pub const ROOT_CA_DIR: &str = "ROOT_CA_DIR";

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Config file (bare config.yaml or ConfigMap manifest).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Namespace label KEY=VALUE that opts a namespace in.
    #[arg(
        long,
        value_name = "KEY=VALUE",
        default_value = "istio-vault-webhook/inject=enabled"
    )]
    pub namespace_label: String,
}

/// Reads the config and prints the policies as YAML documents; exit code 0, or 1 with the
/// config's errors (as `check` prints them) on stderr.
pub fn main(args: &ExportArgs) -> u8 {
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", args.config.display());
            return 1;
        }
    };
    let config = match Config::from_document(&text) {
        Ok(c) => c,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("{}: {line}", args.config.display());
            }
            return 1;
        }
    };
    let Some((key, value)) = args.namespace_label.split_once('=') else {
        eprintln!("--namespace-label must be KEY=VALUE");
        return 2;
    };
    match to_yaml(&objects(&config, (key, value))) {
        Ok(s) => {
            print!("{s}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

pub fn to_yaml(objects: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(o).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// A CEL string literal.
fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn has_annotation(key: &str) -> String {
    format!(
        "has(object.metadata.annotations) && {} in object.metadata.annotations",
        lit(key)
    )
}

/// CEL: the Pod carries every label of `selector`.
fn selects(selector: &BTreeMap<String, String>) -> String {
    let mut parts = vec!["has(object.metadata.labels)".to_owned()];
    for (k, v) in selector {
        parts.push(format!(
            "{k} in object.metadata.labels && object.metadata.labels[{k}] == {v}",
            k = lit(k),
            v = lit(v)
        ));
    }
    parts.join(" && ")
}

fn resource_rules() -> Value {
    json!([{
        "operations": ["CREATE"],
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "resources": ["pods"],
        "scope": "Namespaced",
    }])
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": PREFIX, "app.kubernetes.io/part-of": PREFIX})
}

pub fn objects(config: &Config, namespace_label: (&str, &str)) -> Vec<Value> {
    let ns_selector = json!({"matchLabels": {namespace_label.0: namespace_label.1}});
    let mut out = Vec::new();
    for p in &config.profiles {
        let name = format!("{PREFIX}-{}", p.name);
        out.push(mutating_policy(config, p, &name, &ns_selector));
        out.push(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": name, "labels": labels()},
            "spec": {"policyName": name},
        }));
    }
    if let Some(istiod) = config.istiod() {
        out.push(guard(config, istiod, &ns_selector));
        out.push(validating_binding(GUARD));
    }
    if let Some(policy) = one_profile(config, &ns_selector) {
        out.push(policy);
        out.push(validating_binding(ONE_PROFILE));
    }
    out
}

fn validating_binding(name: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": labels()},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    })
}

fn mutating_policy(config: &Config, p: &Profile, name: &str, ns_selector: &Value) -> Value {
    let annotations: Vec<String> = p
        .annotations
        .iter()
        .map(|a| format!("{}: {}", lit(&a.key), lit(&a.value)))
        .collect();
    let mut mutations = vec![json!({
        "patchType": "ApplyConfiguration",
        "applyConfiguration": {
            "expression": format!(
                "Object{{metadata: Object.metadata{{annotations: {{{}}}}}}}",
                annotations.join(", ")
            ),
        },
    })];
    if !p.absent.is_empty() {
        let removals: Vec<String> = p
            .absent
            .iter()
            .map(|a| {
                format!(
                    "({} ? [JSONPatch{{op: \"remove\", path: {}}}] : [])",
                    has_annotation(&a.key),
                    lit(a.pointer())
                )
            })
            .collect();
        mutations.push(json!({
            "patchType": "JSONPatch",
            "jsonPatch": {"expression": removals.join(" + ")},
        }));
    }
    let mut variables = Vec::new();
    if let ProfileKind::Istiod { container } = &p.kind {
        let c = "object.spec.containers[variables.container]";
        let root = lit(ROOT_CA_DIR);
        variables.push(json!({
            "name": "container",
            "expression": format!("object.spec.containers.map(c, c.name).indexOf({})", lit(container)),
        }));
        variables.push(json!({
            "name": "first",
            "expression": format!(
                "variables.container < 0 || !has({c}.env) ? -1 : {c}.env.map(e, e.name).indexOf({root})"
            ),
        }));
        let entry = format!(
            "Object.spec.containers.env{{name: {root}, value: {}}}",
            lit(&config.secret_volume_path)
        );
        let base = "\"/spec/containers/\" + string(variables.container) + \"/env\"";
        // Single-object values only: kube-apiserver 1.36.3 panics (HTTP/2 INTERNAL_ERROR to the
        // client) converting a JSONPatch `value` that is a list of objects, e.g. one built by
        // transformList over the Pod's env or a literal `[Object.spec.containers.env{…}]`
        // (cel-go baseList.ConvertToNative to structpb.Value); tests/real_export.rs found it.
        let expression = format!(
            "variables.container < 0 ? [] :\n\
             !has({c}.env) ? [JSONPatch{{op: \"add\", path: {base}, value: []}},\n  \
             JSONPatch{{op: \"add\", path: {base} + \"/-\", value: {entry}}}] :\n\
             variables.first < 0 ? [JSONPatch{{op: \"add\", path: {base} + \"/-\", value: {entry}}}] :\n\
             [JSONPatch{{op: \"replace\", path: {base} + \"/\" + string(variables.first), value: {entry}}}] +\n\
             lists.range(size({c}.env)).map(j, size({c}.env) - 1 - j)\n  \
             .filter(i, i > variables.first && {c}.env[i].name == {root})\n  \
             .map(i, JSONPatch{{op: \"remove\", path: {base} + \"/\" + string(i)}})"
        );
        mutations.push(json!({
            "patchType": "JSONPatch",
            "jsonPatch": {"expression": expression},
        }));
    }
    let mut spec = json!({
        "failurePolicy": "Fail",
        "reinvocationPolicy": "Never",
        "matchConstraints": {
            "matchPolicy": "Equivalent",
            "resourceRules": resource_rules(),
            "namespaceSelector": ns_selector,
            "objectSelector": {"matchLabels": p.selector},
        },
        // What the webhook leaves alone: mirror Pods, and Pods the Vault injector already
        // injected (their annotations describe what was rendered).
        "matchConditions": [
            {"name": "not-a-mirror-pod", "expression": format!("!({})", has_annotation(keys::MIRROR))},
            {"name": "not-already-injected", "expression": format!(
                "!({} && object.metadata.annotations[{}] == \"injected\")",
                has_annotation(keys::INJECT_STATUS),
                lit(keys::INJECT_STATUS)
            )},
        ],
        "mutations": mutations,
    });
    if !variables.is_empty() {
        spec["variables"] = Value::Array(variables);
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": name, "labels": labels()},
        "spec": spec,
    })
}

/// The shipped guard (manifests/base/validatingadmissionpolicy.yaml), with the istiod profile's
/// match, container and secret volume path filled in.
fn guard(config: &Config, istiod: &Profile, ns_selector: &Value) -> Value {
    let container = match &istiod.kind {
        ProfileKind::Istiod { container } => container.as_str(),
        ProfileKind::Gateway => "discovery",
    };
    let dir = &config.secret_volume_path;
    let last = format!(
        "c.env.filter(e, e.name == {r})[size(c.env.filter(e, e.name == {r})) - 1]",
        r = lit(ROOT_CA_DIR)
    );
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": GUARD, "labels": labels()},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "matchPolicy": "Equivalent",
                "resourceRules": resource_rules(),
                "namespaceSelector": ns_selector,
                "objectSelector": {"matchLabels": istiod.selector},
            },
            "validations": [
                {
                    "expression": format!(
                        "{} && object.metadata.annotations[{}] == \"injected\"",
                        has_annotation(keys::INJECT_STATUS),
                        lit(keys::INJECT_STATUS)
                    ),
                    "reason": "Forbidden",
                    "message": "istiod Pod was not injected by the Vault Agent Injector (no \
                        vault.hashicorp.com/agent-inject-status=injected), so it would start \
                        without its Vault CA. Check that the vault-agent-injector is running.",
                },
                {
                    "expression": "has(object.spec.initContainers) && \
                        size(object.spec.initContainers) > 0 && \
                        object.spec.initContainers[0].name == \"vault-agent-init\"",
                    "reason": "Forbidden",
                    "message": "istiod Pod's first init container is not vault-agent-init, so \
                        the CA files may not exist when istiod starts.",
                },
                {
                    "expression": format!(
                        "object.spec.containers.exists(c, c.name == {n}) && \
                         object.spec.containers.all(c, c.name != {n} || (has(c.env) && \
                         c.env.exists(e, e.name == {r}) && has({last}.value) && \
                         {last}.value == {d}))",
                        n = lit(container),
                        r = lit(ROOT_CA_DIR),
                        d = lit(dir),
                    ),
                    "reason": "Forbidden",
                    "message": format!(
                        "istiod Pod's {container} container does not end with \
                         ROOT_CA_DIR={dir}, so istiod would fall back to a self-signed CA."
                    ),
                },
            ],
        },
    })
}

/// Refuses a Pod whose labels match two profiles, as the webhook does.
fn one_profile(config: &Config, ns_selector: &Value) -> Option<Value> {
    let mut validations = Vec::new();
    for (i, a) in config.profiles.iter().enumerate() {
        for b in &config.profiles[i + 1..] {
            let conflict = a
                .selector
                .iter()
                .any(|(k, v)| b.selector.get(k).is_some_and(|w| w != v));
            if conflict {
                continue;
            }
            validations.push(json!({
                "expression": format!("!(({}) && ({}))", selects(&a.selector), selects(&b.selector)),
                "reason": "Forbidden",
                "message": format!(
                    "istio-vault-webhook: the Pod's labels match several profiles ({}, {}); \
                     refusing to guess which Vault secret it gets. Make the profiles' match \
                     selectors in the config.yaml of cluster {} mutually exclusive",
                    a.name, b.name, config.cluster
                ),
            }));
        }
    }
    if validations.is_empty() {
        return None;
    }
    Some(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": ONE_PROFILE, "labels": labels()},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "matchPolicy": "Equivalent",
                "resourceRules": resource_rules(),
                "namespaceSelector": ns_selector,
            },
            "validations": validations,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_policy_per_profile_plus_guard_and_one_profile() {
        let config = Config::parse(crate::config::EXAMPLE_CONFIG).unwrap();
        let objects = objects(&config, ("istio-vault-webhook/inject", "enabled"));
        let kinds: Vec<(&str, &str)> = objects
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert!(kinds.contains(&("MutatingAdmissionPolicy", "istio-vault-webhook-istiod")));
        assert!(kinds.contains(&("ValidatingAdmissionPolicy", GUARD)));
        let text = to_yaml(&objects).unwrap();
        assert!(text.contains("Object.spec.containers.env{name: \"ROOT_CA_DIR\""));
    }

    #[test]
    fn cel_literals_escape() {
        assert_eq!(lit("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
    }
}
