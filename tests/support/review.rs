//! AdmissionReviews in and out, for every test that talks to the webhook: one
//! builder for what the API server sends ([`ReviewSpec`]) and one decoder for
//! what it gets back ([`Verdict`]), which refuses what the API server would
//! refuse (`apiVersion`, `kind`, `uid`, `patch`/`patchType` together) and
//! applies the base64 JSON patch with RFC 6902 semantics (`render::apply`,
//! the json-patch crate).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use istio_vault_webhook::patch::PatchOp;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// AdmissionReview in
// ---------------------------------------------------------------------------

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// A fresh uid shaped like the API server's (a UUID).
pub fn new_uid() -> String {
    let n = NEXT_UID.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!(
        "{pid:08x}-{:04x}-4{:03x}-8000-{n:012x}",
        n >> 48 & 0xffff,
        n >> 36 & 0xfff
    )
}

/// The fields of an `AdmissionRequest` a test varies.
#[derive(Debug, Clone)]
pub struct ReviewSpec {
    pub uid: String,
    /// (group, version, kind) of the object.
    pub kind: (&'static str, &'static str, &'static str),
    /// (group, version, resource).
    pub resource: (&'static str, &'static str, &'static str),
    pub sub_resource: Option<&'static str>,
    pub namespace: String,
    pub name: Option<String>,
    pub operation: &'static str,
    pub dry_run: bool,
    pub object: Option<Value>,
    pub old_object: Option<Value>,
}

impl ReviewSpec {
    /// A Pod CREATE in the Pod's namespace (default `istio-system`).
    pub fn pod_create(pod: &Value) -> ReviewSpec {
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("istio-system")
            .to_owned();
        ReviewSpec {
            uid: new_uid(),
            kind: ("", "v1", "Pod"),
            resource: ("", "v1", "pods"),
            sub_resource: None,
            namespace,
            name: None,
            operation: "CREATE",
            dry_run: false,
            object: Some(pod.clone()),
            old_object: None,
        }
    }

    pub fn operation(mut self, op: &'static str) -> Self {
        self.operation = op;
        self
    }

    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = uid.to_owned();
        self
    }

    /// The review as the bytes the API server POSTs.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_json()).expect("a Value serializes")
    }

    /// The `AdmissionReview` JSON the API server would POST.
    pub fn to_json(&self) -> Value {
        let (g, v, k) = self.kind;
        let (rg, rv, r) = self.resource;
        let operation_options = match self.operation {
            "CREATE" => json!({"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}),
            "UPDATE" => json!({"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"}),
            "DELETE" => json!({"apiVersion": "meta.k8s.io/v1", "kind": "DeleteOptions"}),
            _ => Value::Null,
        };
        let mut request = json!({
            "uid": self.uid,
            "kind": {"group": g, "version": v, "kind": k},
            "resource": {"group": rg, "version": rv, "resource": r},
            "requestKind": {"group": g, "version": v, "kind": k},
            "requestResource": {"group": rg, "version": rv, "resource": r},
            "namespace": self.namespace,
            "operation": self.operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "6b1f1c8e-4c1a-4f7e-9a59-3b0c1d6c0b7e",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": self.object.clone().unwrap_or(Value::Null),
            "oldObject": self.old_object.clone().unwrap_or(Value::Null),
            "dryRun": self.dry_run,
            "options": operation_options,
        });
        if let Some(name) = &self.name {
            request["name"] = Value::String(name.clone());
        }
        if let Some(sub) = self.sub_resource {
            request["subResource"] = Value::String(sub.to_owned());
        }
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request,
        })
    }
}

/// A Pod CREATE review for `pod`.
pub fn pod_create(pod: &Value) -> Value {
    ReviewSpec::pod_create(pod).to_json()
}

/// A small Pod in `istio-system` with `labels` and one `discovery`
/// container, as a ReplicaSet would create it (no name yet).
pub fn labelled_pod(labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "pod-", "namespace": "istio-system", "labels": labels},
        "spec": {"containers": [{"name": "discovery", "image": "istio/pilot:1.28.0"}]}
    })
}

/// A Pod CREATE review, with `uid`, of a [`labelled_pod`].
pub fn labelled_review(uid: &str, labels: Value) -> Vec<u8> {
    ReviewSpec::pod_create(&labelled_pod(labels))
        .uid(uid)
        .to_bytes()
}

/// A Pod CREATE review, with `uid`, of a Pod the istiod profile matches.
pub fn istiod_review(uid: &str) -> Vec<u8> {
    labelled_review(uid, json!({"app": "istiod", "istio.io/rev": "default"}))
}

// ---------------------------------------------------------------------------
// AdmissionReview out
// ---------------------------------------------------------------------------

/// A decoded `AdmissionResponse`.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub uid: String,
    pub allowed: bool,
    /// The decoded JSON patch, when the response carries one.
    pub patch: Option<Vec<PatchOp>>,
    /// The raw `patch` string as sent (base64).
    pub patch_b64: Option<String>,
    pub warnings: Vec<String>,
    pub status_code: Option<u64>,
    pub message: Option<String>,
    pub raw: Value,
}

/// Decodes a response the way the API server does and reports anything it
/// would refuse: wrong `apiVersion`/`kind`, a `uid` that differs from the
/// request's, `patch` without `patchType` (or the reverse), a `patchType`
/// other than `JSONPatch`, a patch that is not base64 of a JSON array of
/// RFC 6902 operations.
pub fn decode_response(body: &[u8], uid: &str) -> Result<Verdict, String> {
    let raw: Value =
        serde_json::from_slice(body).map_err(|e| format!("response is not JSON: {e}"))?;
    if raw["apiVersion"] != "admission.k8s.io/v1" {
        return Err(format!(
            "response apiVersion is {}, not admission.k8s.io/v1",
            raw["apiVersion"]
        ));
    }
    if raw["kind"] != "AdmissionReview" {
        return Err(format!(
            "response kind is {}, not AdmissionReview",
            raw["kind"]
        ));
    }
    let response = raw
        .get("response")
        .and_then(Value::as_object)
        .ok_or("response has no `response` object")?;
    let got_uid = response
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("response.uid is missing or not a string")?;
    if got_uid != uid {
        return Err(format!("response.uid {got_uid:?} != request.uid {uid:?}"));
    }
    let allowed = response
        .get("allowed")
        .and_then(Value::as_bool)
        .ok_or("response.allowed is missing or not a boolean")?;
    let (patch, patch_b64) = match (response.get("patch"), response.get("patchType")) {
        (None, None) => (None, None),
        (Some(p), Some(t)) => {
            if t != "JSONPatch" {
                return Err(format!("patchType is {t}, not \"JSONPatch\""));
            }
            let b64 = p
                .as_str()
                .ok_or_else(|| format!("patch must be a base64 string, got {p}"))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("patch is not base64: {e}"))?;
            let ops: Vec<Value> = serde_json::from_slice(&bytes)
                .map_err(|e| format!("decoded patch is not a JSON array: {e}"))?;
            if ops.is_empty() {
                return Err("an empty patch must be no patch at all (no patch/patchType)".into());
            }
            let ops = ops.iter().map(patch_op).collect::<Result<Vec<_>, _>>()?;
            (Some(ops), Some(b64.to_owned()))
        }
        (p, t) => {
            return Err(format!(
                "patch and patchType must be both present or both absent (patch: {}, patchType: {})",
                p.is_some(),
                t.is_some()
            ));
        }
    };
    if !allowed && patch.is_some() {
        return Err("a denial carries a patch".into());
    }
    let warnings = match response.get("warnings") {
        None => Vec::new(),
        Some(Value::Array(ws)) => ws
            .iter()
            .map(|w| {
                w.as_str()
                    .map(str::to_owned)
                    .ok_or(format!("warning {w} is not a string"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("warnings is not an array: {other}")),
    };
    let status = response.get("status");
    Ok(Verdict {
        uid: got_uid.to_owned(),
        allowed,
        patch,
        patch_b64,
        warnings,
        status_code: status.and_then(|s| s["code"].as_u64()),
        message: status
            .and_then(|s| s["message"].as_str())
            .map(str::to_owned),
        raw,
    })
}

/// One wire operation → `PatchOp`, refusing anything but the webhook's three
/// operations with exactly their fields.
fn patch_op(op: &Value) -> Result<PatchOp, String> {
    let obj = op
        .as_object()
        .ok_or_else(|| format!("patch operation {op} is not an object"))?;
    let path = obj
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("patch operation {op} has no string path"))?
        .to_owned();
    let value = obj.get("value").cloned();
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    let op = match (obj.get("op").and_then(Value::as_str), value) {
        (Some("add"), Some(value)) if keys.len() == 3 => PatchOp::Add { path, value },
        (Some("replace"), Some(value)) if keys.len() == 3 => PatchOp::Replace { path, value },
        (Some("remove"), None) if keys.len() == 2 => PatchOp::Remove { path },
        _ => return Err(format!("unexpected patch operation {op}")),
    };
    Ok(op)
}

impl Verdict {
    /// The Pod after the API server applied the patch (RFC 6902, as
    /// evanphx/json-patch: an `add` below a missing parent fails).
    pub fn apply(&self, pod: &Value) -> Result<Value, String> {
        let mut out = pod.clone();
        if let Some(ops) = &self.patch {
            istio_vault_webhook::render::apply(&mut out, ops)?;
        }
        Ok(out)
    }

    /// The denial's message, or "".
    pub fn message(&self) -> &str {
        self.message.as_deref().unwrap_or("")
    }

    /// The annotations the patch sets (key → value), whether one by one or
    /// as a whole map.
    pub fn annotations(&self) -> BTreeMap<String, Value> {
        let mut set = BTreeMap::new();
        for op in self.patch.iter().flatten() {
            let (PatchOp::Add { path, value } | PatchOp::Replace { path, value }) = op else {
                continue;
            };
            if path == "/metadata/annotations" {
                let map = value.as_object().cloned().unwrap_or_default();
                set.extend(map);
            } else if let Some(k) = path.strip_prefix("/metadata/annotations/") {
                set.insert(k.replace("~1", "/").replace("~0", "~"), value.clone());
            }
        }
        set
    }

    fn annotation(&self, key: &str) -> Option<String> {
        self.annotations()
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    pub fn config_hash(&self) -> Option<String> {
        self.annotation("istio-vault-webhook/config-hash")
    }

    pub fn auth_path(&self) -> Option<String> {
        self.annotation("vault.hashicorp.com/auth-path")
    }

    /// Asserts the response is an allow with neither `patch` nor `patchType`.
    pub fn assert_allowed_unpatched(&self, what: &str) {
        assert!(self.allowed, "{what}: expected allowed, got {}", self.raw);
        let response = &self.raw["response"];
        assert!(
            response.get("patch").is_none() && response.get("patchType").is_none(),
            "{what}: expected no patch and no patchType, got {}",
            self.raw
        );
    }
}
