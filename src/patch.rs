//! RFC 6902 JSON patch operations and RFC 6901 pointer escaping. Pure.
//!
//! Most of a patch is fixed by the config: the `add`, `replace` or `remove`
//! of each annotation the webhook owns. Those are [`Prepared`] once, when the
//! config loads, down to their base64 text, and a response copies them
//! ([`encode_base64`]); only what depends on the Pod (the `ROOT_CA_DIR`
//! operations) is written and encoded per request. docs/design.md,
//! "Prepared operations", explains why the pieces can simply be joined.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
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
    /// The value of an `add` or `replace`.
    pub fn value(&self) -> Option<&Value> {
        match self {
            PatchOp::Add { value, .. } | PatchOp::Replace { value, .. } => Some(value),
            PatchOp::Remove { .. } => None,
        }
    }

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

/// One operation of a decision: fixed by the config and prepared when it
/// loaded, or built for this Pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Prepared(Arc<Prepared>),
    Built(PatchOp),
}

impl Op {
    /// The operation itself, whichever way it was made.
    pub fn patch_op(&self) -> &PatchOp {
        match self {
            Op::Prepared(p) => &p.op,
            Op::Built(op) => op,
        }
    }

    pub fn into_patch_op(self) -> PatchOp {
        match self {
            Op::Prepared(p) => Arc::unwrap_or_clone(p).op,
            Op::Built(op) => op,
        }
    }
}

impl AsRef<PatchOp> for Op {
    fn as_ref(&self) -> &PatchOp {
        self.patch_op()
    }
}

impl AsRef<PatchOp> for PatchOp {
    fn as_ref(&self) -> &PatchOp {
        self
    }
}

/// An operation serialized and base64-encoded in advance, as the first
/// element of a patch array (`[` before it) and as a later one (`,`).
///
/// Each piece is padded with spaces (JSON whitespace) to a multiple of three
/// bytes: base64 turns every three bytes into four characters on their own,
/// so the encodings of such pieces, joined, are the encoding of the joined
/// bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub op: PatchOp,
    first: Box<str>,
    later: Box<str>,
}

impl Prepared {
    pub fn new(op: PatchOp) -> Arc<Prepared> {
        let piece = |sep: u8| {
            let mut raw = vec![sep];
            write_op(&mut raw, &op);
            pad(&mut raw);
            STANDARD.encode(raw).into_boxed_str()
        };
        Arc::new(Prepared {
            first: piece(b'['),
            later: piece(b','),
            op,
        })
    }
}

/// Pads JSON text with spaces to a whole number of base64 groups.
fn pad(raw: &mut Vec<u8>) {
    while !raw.len().is_multiple_of(3) {
        raw.push(b' ');
    }
}

/// About how long [`encode_base64`] makes `ops`: exact for prepared
/// operations, a generous guess for built ones (a `ROOT_CA_DIR` entry).
pub fn base64_len_hint(ops: &[Op]) -> usize {
    let built = |op: &PatchOp| op.path().len() + 96;
    ops.iter()
        .map(|op| match op {
            Op::Prepared(p) => p.later.len(),
            Op::Built(op) => built(op).div_ceil(3) * 4,
        })
        .sum::<usize>()
        + 8
}

/// Appends the base64 text of the patch `ops` (a JSON array, as
/// [`to_json`] writes it apart from spaces between elements) to `out`.
/// Prepared operations are copied; built ones are written and encoded here.
pub fn encode_base64(ops: &[Op], out: &mut Vec<u8>) {
    // JSON of built operations not yet encoded.
    let mut raw: Vec<u8> = Vec::new();
    let encode = |raw: &mut Vec<u8>, out: &mut Vec<u8>| {
        let start = out.len();
        out.resize(start + raw.len().div_ceil(3) * 4, 0);
        // The slice is exactly the encoded length: this cannot fail.
        let written = STANDARD.encode_slice(&raw, &mut out[start..]).unwrap_or(0);
        out.truncate(start + written);
        raw.clear();
    };
    for (i, op) in ops.iter().enumerate() {
        let sep = if i == 0 { b'[' } else { b',' };
        match op {
            Op::Prepared(p) => {
                if !raw.is_empty() {
                    pad(&mut raw);
                    encode(&mut raw, out);
                }
                out.extend_from_slice(if i == 0 { &p.first } else { &p.later }.as_bytes());
            }
            Op::Built(op) => {
                raw.push(sep);
                write_op(&mut raw, op);
            }
        }
    }
    if ops.is_empty() {
        raw.push(b'[');
    }
    raw.push(b']');
    encode(&mut raw, out);
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
pub fn to_json<T: AsRef<PatchOp>>(ops: &[T]) -> Vec<u8> {
    // Sized once for the common case (string values); growing the buffer
    // from serde_json's default 128 bytes cost a dozen reallocations.
    let hint: usize = ops
        .iter()
        .map(|op| {
            let op = op.as_ref();
            let value = op
                .value()
                .map_or(0, |v| v.as_str().map_or(64, |v| v.len() + 16));
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
        write_op(&mut out, op.as_ref());
    }
    out.push(b']');
    out
}

/// Appends one operation as a JSON object.
fn write_op(out: &mut Vec<u8>, op: &PatchOp) {
    let (name, path, value): (&[u8], _, _) = match op {
        PatchOp::Add { path, value } => (b"add", path, Some(value)),
        PatchOp::Replace { path, value } => (b"replace", path, Some(value)),
        PatchOp::Remove { path } => (b"remove", path, None),
    };
    out.extend_from_slice(br#"{"op":""#);
    out.extend_from_slice(name);
    out.extend_from_slice(br#"","path":"#);
    json::write_str(out, path);
    match value {
        None => {}
        Some(Value::String(v)) => {
            out.extend_from_slice(br#","value":"#);
            json::write_str(out, v);
        }
        Some(v) => {
            out.extend_from_slice(br#","value":"#);
            // A Value always serializes.
            let _ = serde_json::to_writer(&mut *out, v);
        }
    }
    out.push(b'}');
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
        assert_eq!(to_json::<PatchOp>(&[]), b"[]");
    }

    #[test]
    fn prepared_and_built_pieces_join_into_the_patch() {
        // Lengths that leave every remainder mod 3, so every kind of padding
        // meets every neighbour.
        let all: Vec<PatchOp> = (0..3)
            .map(|n| PatchOp::Add {
                path: format!("/metadata/annotations/a~1{}", "b".repeat(n)),
                value: Value::String(format!("{}\"é\n", "v".repeat(n))),
            })
            .chain([
                PatchOp::Replace {
                    path: "/spec/containers/0/env/2".into(),
                    value: serde_json::json!({"name": "ROOT_CA_DIR", "value": "/vault/secrets"}),
                },
                PatchOp::Remove {
                    path: "/metadata/annotations/x".into(),
                },
            ])
            .collect();
        for len in 1..=all.len() {
            let ops = &all[..len];
            let want = serde_json::to_value(ops).unwrap();
            let squeeze =
                |b: &[u8]| -> Vec<u8> { b.iter().copied().filter(|&b| b != b' ').collect() };
            for mask in 0u32..1 << len {
                let mixed: Vec<Op> = ops
                    .iter()
                    .enumerate()
                    .map(|(i, op)| match mask >> i & 1 {
                        1 => Op::Prepared(Prepared::new(op.clone())),
                        _ => Op::Built(op.clone()),
                    })
                    .collect();
                let mut out = b"prefix".to_vec();
                encode_base64(&mixed, &mut out);
                // The hint the response buffer is sized with covers it.
                assert!(out.len() - 6 <= base64_len_hint(&mixed), "mask {mask:b}");
                let decoded = STANDARD.decode(&out[6..]).unwrap();
                let parsed: Value = serde_json::from_slice(&decoded)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&decoded)));
                assert_eq!(parsed, want, "mask {mask:b}");
                // Nothing but spaces between elements was added.
                assert_eq!(
                    squeeze(&decoded),
                    squeeze(&to_json(&mixed)),
                    "mask {mask:b}"
                );
                assert!(decoded.len() < to_json(ops).len() + 3 * len);
            }
        }
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
