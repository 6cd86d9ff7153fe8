//! Kubernetes label selectors (`matchLabels`, `matchExpressions`), as the API server applies a
//! webhook's or policy's `namespaceSelector` / `objectSelector`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// Whether `selector` selects an object with `labels`. An absent selector selects everything
/// (as in webhook configurations); an unknown operator selects nothing.
pub fn matches(selector: Option<&LabelSelector>, labels: &Labels) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// `k=v,k2=v2`, for messages.
pub fn show(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors() {
        let injector = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "app.kubernetes.io/name".into(),
                operator: "NotIn".into(),
                values: Some(vec!["vault-agent-injector".into()]),
            }]),
            match_labels: None,
        };
        assert!(matches(Some(&injector), &labels(&[("app", "istiod")])));
        assert!(!matches(
            Some(&injector),
            &labels(&[("app.kubernetes.io/name", "vault-agent-injector")])
        ));
        let opt_in = LabelSelector {
            match_labels: Some(
                [("istio-vault-webhook/inject".to_string(), "enabled".into())].into(),
            ),
            match_expressions: None,
        };
        assert!(matches(
            Some(&opt_in),
            &labels(&[("istio-vault-webhook/inject", "enabled")])
        ));
        assert!(!matches(Some(&opt_in), &labels(&[])));
        assert!(matches(None, &labels(&[])));
    }
}
