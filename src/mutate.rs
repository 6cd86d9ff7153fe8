//! The heart of the webhook: (Pod, config) → decision, by the rules in
//! docs/design.md. Pure.
//!
//! The Pod is read through [`PodView`] (`pod.rs`), which holds only the
//! fields the rules look at. The decision carries RFC 6902 operations against the Pod's
//! own JSON, so the same function serves the webhook and `render`.

use serde_json::{Value, json};

use crate::config::{Config, Profile, ProfileKind, keys};
use crate::patch::{Op, PatchOp};
pub use crate::pod::{Container, PodView};

/// The env var istiod reads its plugged-in CA directory from
/// (istio/istio `pilot/pkg/bootstrap/istio_ca.go`, `LocalCertDir`).
pub const ROOT_CA_DIR: &str = "ROOT_CA_DIR";

/// The API server truncates longer warnings; stay under its limit.
const MAX_WARNING: usize = 119;

/// What the config source currently offers the admission path.
#[derive(Debug, Clone, Copy)]
pub enum ConfigState<'a> {
    Loaded(&'a Config),
    /// No valid config: `why` says what is missing and how to fix it.
    Missing {
        why: &'a str,
    },
}

/// The verdict for one Pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admit, applying `ops` (possibly none).
    Allow {
        profile: Option<String>,
        ops: Vec<Op>,
        warnings: Vec<String>,
    },
    /// Refuse the Pod with a message for whoever reads the ReplicaSet events.
    Deny {
        profile: Option<String>,
        message: String,
    },
}

/// A decision summarised for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Patched,
    Unchanged,
    Denied,
    /// No profile applies (or the request is not a Pod CREATE).
    Skipped,
    /// The request could not be read.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Patched => "patched",
            Outcome::Unchanged => "unchanged",
            Outcome::Denied => "denied",
            Outcome::Skipped => "skipped",
            Outcome::Error => "error",
        }
    }
}

impl Decision {
    fn skip() -> Decision {
        Decision::Allow {
            profile: None,
            ops: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Deny { .. } => Outcome::Denied,
            Decision::Allow { profile: None, .. } => Outcome::Skipped,
            Decision::Allow { ops, .. } if ops.is_empty() => Outcome::Unchanged,
            Decision::Allow { .. } => Outcome::Patched,
        }
    }

    pub fn profile(&self) -> Option<&str> {
        match self {
            Decision::Allow { profile, .. } | Decision::Deny { profile, .. } => profile.as_deref(),
        }
    }
}

/// Decides what to do with a Pod being created.
pub fn mutate(pod: &PodView, config: ConfigState<'_>) -> Decision {
    // Static Pods' API mirrors cannot be changed; kubelet owns them.
    if pod.annotation(keys::MIRROR).is_some() {
        return Decision::skip();
    }

    let config = match config {
        ConfigState::Loaded(c) => c,
        ConfigState::Missing { why } => {
            // Fail closed: with no config we cannot know the Vault paths, and an
            // istiod admitted without them boots with a self-signed CA.
            if pod.label("app") == Some("istiod") {
                return Decision::Deny {
                    profile: None,
                    message: format!(
                        "istio-vault-webhook: refusing istiod Pod: no valid config is loaded ({why}); \
                         istiod would start with a self-signed CA instead of the Vault CA"
                    ),
                };
            }
            return Decision::skip();
        }
    };

    let mut matched = config
        .profiles
        .iter()
        .filter(|p| p.matches(|k| pod.label(k)));
    let Some(profile) = matched.next() else {
        return Decision::skip();
    };
    if let Some(second) = matched.next() {
        let mut names = vec![profile.name.as_str(), second.name.as_str()];
        names.extend(matched.map(|p| p.name.as_str()));
        return Decision::Deny {
            profile: None,
            message: format!(
                "istio-vault-webhook: the Pod's labels match several profiles ({}); \
                 refusing to guess which Vault secret it gets. Make the profiles' match \
                 selectors in the config.yaml of cluster {} mutually exclusive",
                names.join(", "),
                config.cluster
            ),
        };
    }

    let profile_name = Some(profile.name.clone());
    if pod.annotation(keys::INJECT_STATUS) == Some("injected") {
        // vault-k8s skips such Pods too; changing annotations now would only
        // make them lie about what was rendered.
        return Decision::Allow {
            profile: profile_name,
            ops: Vec::new(),
            warnings: vec![format!(
                "istio-vault-webhook: {} is already \"injected\"; Pod left unchanged",
                keys::INJECT_STATUS
            )],
        };
    }

    // The istiod container is checked before anything else: without it there
    // is nothing to point at the CA files, so the Pod must not start.
    let container_index = match &profile.kind {
        ProfileKind::Gateway => None,
        ProfileKind::Istiod { container } => {
            let containers = pod.containers();
            match containers
                .iter()
                .enumerate()
                .find(|(_, c)| c.name == container.as_str())
            {
                Some(found) => Some(found),
                None => {
                    let names: Vec<&str> = containers.iter().map(|c| c.name.as_ref()).collect();
                    return Decision::Deny {
                        profile: profile_name,
                        message: format!(
                            "istio-vault-webhook: refusing istiod Pod: it has no container \
                             {container:?} to give ROOT_CA_DIR (containers: {}); set \
                             profiles.{}.container in the config to the istiod container's name",
                            names.join(", "),
                            profile.name
                        ),
                    };
                }
            }
        }
    };

    let mut warnings = Vec::new();
    let mut ops = annotation_ops(pod, profile, &mut warnings);
    if let Some((index, container)) = container_index {
        env_ops(
            container,
            index,
            &config.secret_volume_path,
            &mut ops,
            &mut warnings,
        );
    }
    Decision::Allow {
        profile: profile_name,
        ops,
        warnings,
    }
}

fn annotation_ops(pod: &PodView, profile: &Profile, warnings: &mut Vec<String>) -> Vec<Op> {
    let Some(existing) = pod.annotations() else {
        // No annotations map: one `add` of the whole map (an `add` below a
        // missing parent would make the API server fail the request).
        return match &pod.metadata {
            Some(_) => vec![Op::Prepared(profile.add_all.clone())],
            // No metadata at all (only a hostile or hand-made review): the
            // prepared map, one level up.
            None => vec![Op::Built(PatchOp::Add {
                path: "/metadata".into(),
                value: json!({ "annotations": profile.add_all.op.value() }),
            })],
        };
    };

    let mut ops = Vec::new();
    for want in &profile.annotations {
        match existing.get(&want.key) {
            Some(have) if *have == want.value => {}
            Some(have) => {
                if want.key.starts_with(keys::VAULT) {
                    warnings.push(override_warning(&want.key, have));
                }
                ops.push(Op::Prepared(want.replace.clone()));
            }
            None => ops.push(Op::Prepared(want.add.clone())),
        }
    }
    for unwanted in &profile.absent {
        if let Some(have) = existing.get(&unwanted.key) {
            warnings.push(truncate(format!(
                "istio-vault-webhook: removed {}={:?} (not in the config)",
                unwanted.key, have
            )));
            ops.push(Op::Prepared(unwanted.remove.clone()));
        }
    }
    ops
}

/// Leaves `container` with exactly one `ROOT_CA_DIR` whose value is
/// `dir`, keeping every other entry and their order.
fn env_ops(
    container: &Container,
    index: usize,
    dir: &str,
    ops: &mut Vec<Op>,
    warnings: &mut Vec<String>,
) {
    let entry = || json!({ "name": ROOT_CA_DIR, "value": dir });
    let base = format!("/spec/containers/{index}/env");
    let Some(env) = &container.env else {
        ops.push(Op::Built(PatchOp::Add {
            path: base,
            value: Value::Array(vec![entry()]),
        }));
        return;
    };
    let mut found = env
        .iter()
        .enumerate()
        .filter(|(_, e)| e.name == ROOT_CA_DIR);
    let Some((first, current)) = found.next() else {
        ops.push(Op::Built(PatchOp::Add {
            path: format!("{base}/-"),
            value: entry(),
        }));
        return;
    };
    let duplicates: Vec<usize> = found.map(|(i, _)| i).collect();
    // Highest index first, so earlier removals do not shift later ones.
    for &i in duplicates.iter().rev() {
        ops.push(Op::Built(PatchOp::Remove {
            path: format!("{base}/{i}"),
        }));
    }
    if !duplicates.is_empty() {
        warnings.push(format!(
            "istio-vault-webhook: removed {} duplicate {ROOT_CA_DIR} entries from container {}",
            duplicates.len(),
            container.name
        ));
    }
    let exact = current.value.as_deref() == Some(dir) && !current.value_from;
    if !exact {
        let was = match (current.value_from, &current.value) {
            (true, _) => "valueFrom".to_owned(),
            (false, Some(v)) => format!("{v:?}"),
            (false, None) => "\"\"".to_owned(),
        };
        warnings.push(truncate(format!(
            "istio-vault-webhook: {ROOT_CA_DIR} in container {} was {was}, set to {dir:?}",
            container.name
        )));
        ops.push(Op::Built(PatchOp::Replace {
            path: format!("{base}/{first}"),
            value: entry(),
        }));
    }
}

fn override_warning(key: &str, have: &str) -> String {
    truncate(format!(
        "istio-vault-webhook: overrode {key} (was {have:?})"
    ))
}

/// Cuts a warning to what the API server keeps, on a character boundary.
fn truncate(mut s: String) -> String {
    if s.len() > MAX_WARNING {
        let mut end = MAX_WARNING - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests;
