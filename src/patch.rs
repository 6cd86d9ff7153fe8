//! RFC 6902 JSON patch operations and RFC 6901 pointer escaping. Pure.

use serde::Serialize;
use serde_json::Value;

use crate::json;

/// One JSON patch operation. Only the three the webhook needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    Add { path: String, value: Value },
    Replace { path: String, value: Value },
    Remove { path: String },
}

impl PatchOp {
    pub fn path(&self) -> &str {
        match self {
            PatchOp::Add { path, .. }
            | PatchOp::Replace { path, .. }
            | PatchOp::Remove { path } => path,
        }
    }

    /// The same operation on a document nested under `prefix` (a JSON
    /// pointer), e.g. a Deployment's `/spec/template` for `render`.
    pub fn under(mut self, prefix: &str) -> PatchOp {
        match &mut self {
            PatchOp::Add { path, .. }
            | PatchOp::Replace { path, .. }
            | PatchOp::Remove { path } => path.insert_str(0, prefix),
        }
        self
    }
}

/// Escapes one reference token: `~` → `~0`, then `/` → `~1` (RFC 6901 §3;
/// the order matters so that `~1` in a key stays `~01`).
pub fn escape(segment: &str) -> std::borrow::Cow<'_, str> {
    if segment.contains(['~', '/']) {
        segment.replace('~', "~0").replace('/', "~1").into()
    } else {
        segment.into()
    }
}

/// Builds a pointer from already-literal segments, escaping each one.
pub fn pointer<'a>(segments: impl IntoIterator<Item = &'a str>) -> String {
    let mut p = String::new();
    for s in segments {
        p.push('/');
        p.push_str(&escape(s));
    }
    p
}

/// Serializes a patch to its JSON bytes (an array of operations).
pub fn to_json(ops: &[PatchOp]) -> Vec<u8> {
    // Sized once for the common case (string values); growing the buffer
    // from serde_json's default 128 bytes cost a dozen reallocations.
    let hint: usize = ops
        .iter()
        .map(|op| {
            let value = match op {
                PatchOp::Add { value, .. } | PatchOp::Replace { value, .. } => {
                    value.as_str().map_or(64, |v| v.len() + 16)
                }
                PatchOp::Remove { .. } => 0,
            };
            op.path().len() + value + 40
        })
        .sum();
    let mut out = Vec::with_capacity(hint + 2);
    // Written by hand, byte for byte what serde_json writes for `ops` (the
    // tests compare the two): `json::write_str` looks at 8 bytes at a time
    // where serde_json's escaper looks at one, and the patch is mostly the
    // annotation templates.
    out.push(b'[');
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let (name, path, value): (&[u8], _, _) = match op {
            PatchOp::Add { path, value } => (b"add", path, Some(value)),
            PatchOp::Replace { path, value } => (b"replace", path, Some(value)),
            PatchOp::Remove { path } => (b"remove", path, None),
        };
        out.extend_from_slice(br#"{"op":""#);
        out.extend_from_slice(name);
        out.extend_from_slice(br#"","path":"#);
        json::write_str(&mut out, path);
        match value {
            None => {}
            Some(Value::String(v)) => {
                out.extend_from_slice(br#","value":"#);
                json::write_str(&mut out, v);
            }
            Some(v) => {
                out.extend_from_slice(br#","value":"#);
                // A Value always serializes.
                let _ = serde_json::to_writer(&mut out, v);
            }
        }
        out.push(b'}');
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_tilde_before_slash() {
        assert_eq!(
            escape("vault.hashicorp.com/role"),
            "vault.hashicorp.com~1role"
        );
        assert_eq!(escape("a~b"), "a~0b");
        assert_eq!(escape("a~1b"), "a~01b");
        assert_eq!(escape("~/"), "~0~1");
        assert_eq!(escape("plain"), "plain");
    }

    #[test]
    fn pointer_joins_escaped_segments() {
        assert_eq!(
            pointer(["metadata", "annotations", "istio-vault-webhook/profile"]),
            "/metadata/annotations/istio-vault-webhook~1profile"
        );
        assert_eq!(pointer([]), "");
    }

    #[test]
    fn serializes_as_rfc6902() {
        let ops = vec![
            PatchOp::Add {
                path: "/a".into(),
                value: Value::String("x".into()),
            },
            PatchOp::Replace {
                path: "/b".into(),
                value: Value::Bool(true),
            },
            PatchOp::Remove { path: "/c".into() },
        ];
        let json: Value = serde_json::from_slice(&to_json(&ops)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"op": "add", "path": "/a", "value": "x"},
                {"op": "replace", "path": "/b", "value": true},
                {"op": "remove", "path": "/c"}
            ])
        );
        // And the json-patch crate (the API server's semantics) accepts it.
        let _: json_patch::Patch = serde_json::from_value(json).unwrap();
    }

    #[test]
    fn writes_the_bytes_serde_json_writes() {
        let mut strings: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        strings.extend(
            [
                "",
                "plain",
                r#"{{- with secret "a/b" -}}{{ .Data.ca_key }}{{- end -}}"#,
                "tab\there \"quoted\" back\\slash \u{1} \u{1f} é ü 日本 \u{10ffff}",
                "0123456789abcdef\"0123456789abcdef\n",
                "~1/~0",
            ]
            .map(String::from),
        );
        let mut ops: Vec<PatchOp> = strings
            .iter()
            .map(|s| PatchOp::Add {
                path: format!("/metadata/annotations/{}", escape(s)),
                value: Value::String(s.clone()),
            })
            .collect();
        ops.push(PatchOp::Replace {
            path: "/spec/containers/0/env/3".into(),
            value: serde_json::json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"}),
        });
        ops.push(PatchOp::Remove {
            path: "/a\"b".into(),
        });
        for op in &ops {
            let one = std::slice::from_ref(op);
            assert_eq!(
                String::from_utf8(to_json(one)).unwrap(),
                serde_json::to_string(one).unwrap()
            );
        }
        assert_eq!(to_json(&ops), serde_json::to_vec(&ops).unwrap());
        assert_eq!(to_json(&[]), b"[]");
    }

    #[test]
    fn under_prefixes_paths() {
        let op = PatchOp::Remove {
            path: "/metadata/annotations".into(),
        }
        .under("/spec/template");
        assert_eq!(op.path(), "/spec/template/metadata/annotations");
    }
}
