//! `render`: workload YAML in, mutated YAML (or the JSON patch) out, through
//! the very same `mutate` the webhook runs. Pure: text in, text out.

use serde::Deserialize;
use serde_json::Value;

use crate::config::Config;
use crate::mutate::{ConfigState, Decision, PodView, mutate};
use crate::patch::{self, PatchOp};

/// Where the Pod template sits inside each kind `render` understands.
fn pod_pointer(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Pod" => "",
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => return None,
    })
}

/// The result for one input document.
#[derive(Debug)]
pub struct Rendered {
    /// `Kind namespace/name` for messages.
    pub what: String,
    /// The document after the patch (unchanged when nothing applies).
    pub document: Value,
    /// The patch against the whole document (paths include the template's).
    pub ops: Vec<PatchOp>,
    pub warnings: Vec<String>,
    /// The webhook would refuse the Pods of this workload.
    pub denied: Option<String>,
    pub profile: Option<String>,
}

/// Renders every document of a (multi-document) YAML stream.
pub fn render(config: &Config, yaml: &str) -> Result<Vec<Rendered>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let document = Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if document.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        out.push(
            render_document(config, document).map_err(|e| format!("document {}: {e}", i + 1))?,
        );
    }
    Ok(out)
}

fn render_document(config: &Config, mut document: Value) -> Result<Rendered, String> {
    let kind = document
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let meta = |k: &str| {
        document
            .pointer(&format!("/metadata/{k}"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let name = match meta("name") {
        n if n.is_empty() => meta("generateName"),
        n => n,
    };
    let what = match meta("namespace").as_str() {
        "" => format!("{kind} {name}"),
        ns => format!("{kind} {ns}/{name}"),
    };
    let mut rendered = Rendered {
        what,
        document: Value::Null,
        ops: Vec::new(),
        warnings: Vec::new(),
        denied: None,
        profile: None,
    };
    let Some(pointer) = pod_pointer(&kind) else {
        rendered.document = document;
        return Ok(rendered);
    };
    let Some(template) = document.pointer_mut(pointer) else {
        return Err(format!("{} has no {pointer}", rendered.what));
    };
    // Read through the same reader as the webhook, so both see a Pod alike.
    let text = template.to_string();
    let pod = PodView::parse(&text)
        .map_err(|e| format!("{}: the Pod template is malformed: {e}", rendered.what))?;
    match mutate(&pod, ConfigState::Loaded(config)) {
        Decision::Deny { message, profile } => {
            rendered.denied = Some(message);
            rendered.profile = profile;
        }
        Decision::Allow {
            profile,
            ops,
            warnings,
        } => {
            apply(template, &ops).map_err(|e| format!("{}: {e}", rendered.what))?;
            rendered.ops = ops
                .into_iter()
                .map(|op| op.into_patch_op().under(pointer))
                .collect();
            rendered.warnings = warnings;
            rendered.profile = profile;
        }
    }
    rendered.document = document;
    Ok(rendered)
}

/// Applies operations with RFC 6902 semantics (the json-patch crate, as the
/// API server's evanphx/json-patch would).
pub fn apply<T: AsRef<PatchOp>>(target: &mut Value, ops: &[T]) -> Result<(), String> {
    let parsed: json_patch::Patch = serde_json::from_slice(&patch::to_json(ops))
        .map_err(|e| format!("internal error: patch does not parse: {e}"))?;
    json_patch::patch(target, &parsed).map_err(|e| format!("patch does not apply: {e}"))
}

/// Joins documents as a YAML stream.
pub fn to_yaml(docs: &[Rendered]) -> Result<String, String> {
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml_ng::to_string(&d.document).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(crate::config::EXAMPLE_CONFIG).unwrap()
    }

    const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: istiod, namespace: istio-system }
spec:
  selector: { matchLabels: { app: istiod } }
  template:
    metadata: { labels: { app: istiod, istio.io/rev: default } }
    spec:
      containers:
        - name: discovery
          image: docker.io/istio/pilot:1.28.0
          env: [ { name: REVISION, value: default } ]
---
apiVersion: v1
kind: Service
metadata: { name: istiod, namespace: istio-system }
spec: { ports: [ { port: 443 } ] }
"#;

    #[test]
    fn renders_deployment_template_and_passes_other_kinds_through() {
        let out = render(&config(), DEPLOYMENT).unwrap();
        assert_eq!(out.len(), 2);
        let d = &out[0].document;
        assert_eq!(
            d.pointer("/spec/template/metadata/annotations/vault.hashicorp.com~1role"),
            Some(&Value::String("istiod".into()))
        );
        assert_eq!(
            d.pointer("/spec/template/spec/containers/0/env/1"),
            Some(&serde_json::json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"}))
        );
        assert!(
            out[0]
                .ops
                .iter()
                .all(|op| op.path().starts_with("/spec/template/"))
        );
        assert!(out[1].ops.is_empty());
        assert_eq!(out[1].document["kind"], "Service");
        // Rendering the output again changes nothing.
        let again = render(&config(), &to_yaml(&out).unwrap()).unwrap();
        assert!(again.iter().all(|r| r.ops.is_empty()));
    }

    #[test]
    fn reports_denials_and_bad_documents() {
        let renamed = DEPLOYMENT.replace("name: discovery", "name: pilot");
        let out = render(&config(), &renamed).unwrap();
        assert!(
            out[0]
                .denied
                .as_deref()
                .unwrap()
                .contains("no container \"discovery\"")
        );
        let err = render(
            &config(),
            "kind: Deployment\nspec: { template: [ {}, {} ] }\n",
        )
        .unwrap_err();
        assert!(err.contains("malformed"), "{err}");
        let err = render(&config(), "kind: Deployment\nspec: {}\n").unwrap_err();
        assert!(
            err.contains("document 1") && err.contains("/spec/template"),
            "{err}"
        );
    }
}
