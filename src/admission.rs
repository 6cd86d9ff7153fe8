//! AdmissionReview bytes → decision → response bytes. Pure: the server only
//! moves bytes and measures time.
//!
//! The review is read with small borrowed types instead of
//! `kube::core::admission::AdmissionReview<DynamicObject>`: the object is kept
//! as raw JSON and only a Pod CREATE is parsed further, into the handful of
//! fields the rules need. The response is written by hand-picked serde types
//! because kube's `AdmissionResponse` serializes `patch` as an array of
//! numbers instead of the base64 string the API documents (kube-rs#1781).
//! `tests/admission_compat.rs` checks both shapes against kube's types.

use std::borrow::Cow;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::mutate::{ConfigState, Decision, MapOnly, Outcome, PodView, mutate};
use crate::patch::{self, PatchOp};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// `O` is what `request.object` is read as: a [`PodView`] in the one-pass
/// fast path, raw JSON in the exact path (see [`review`]).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
struct ReviewIn<'a, O> {
    #[serde(borrow)]
    api_version: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    request: Option<RequestIn<'a, O>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "O: Deserialize<'de>"))]
struct RequestIn<'a, O> {
    #[serde(borrow)]
    uid: Cow<'a, str>,
    #[serde(borrow)]
    kind: GroupVersionKind<'a>,
    #[serde(borrow, default)]
    sub_resource: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    namespace: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    operation: Cow<'a, str>,
    #[serde(default)]
    dry_run: Option<bool>,
    #[serde(default)]
    object: Option<O>,
}

#[derive(Deserialize)]
struct GroupVersionKind<'a> {
    #[serde(borrow, default)]
    group: Cow<'a, str>,
    #[serde(borrow, default)]
    version: Cow<'a, str>,
    #[serde(borrow, default)]
    kind: Cow<'a, str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

#[derive(Serialize)]
struct StatusOut<'a> {
    code: u16,
    reason: &'static str,
    message: &'a str,
}

/// A body that is not an AdmissionReview; the server answers 400 with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The answer to one review, with what the log line and metrics need.
#[derive(Debug)]
pub struct Reviewed {
    /// The serialized `AdmissionReview` response.
    pub body: Vec<u8>,
    pub uid: String,
    pub namespace: String,
    pub pod: String,
    pub dry_run: bool,
    pub decision: Decision,
}

impl Reviewed {
    pub fn outcome(&self) -> Outcome {
        self.decision.outcome()
    }
}

/// Answers one AdmissionReview body.
pub fn review(body: &[u8], config: ConfigState<'_>) -> Result<Reviewed, BadRequest> {
    // Fast path: one pass over the body, `request.object` read straight into
    // a PodView. Whatever it cannot read (invalid UTF-8, an object that is not
    // Pod-shaped, malformed JSON) takes the exact path below, which keeps the
    // object raw and gives the same answer or error as always.
    if let Ok(text) = std::str::from_utf8(body)
        && let Ok(review) = serde_json::from_str::<ReviewIn<'_, MapOnly<PodView>>>(text)
    {
        return answer(review, config, |pod| Ok(pod.0));
    }
    let review: ReviewIn<'_, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| BadRequest(format!("body is not an AdmissionReview: {e}")))?;
    answer(review, config, |object| {
        serde_json::from_str::<MapOnly<PodView>>(object.get())
            .map(|pod| pod.0)
            .map_err(|e| BadRequest(format!("request.object is not a Pod: {e}")))
    })
}

fn answer<O>(
    review: ReviewIn<'_, O>,
    config: ConfigState<'_>,
    pod_view: impl FnOnce(O) -> Result<PodView, BadRequest>,
) -> Result<Reviewed, BadRequest> {
    match (review.api_version.as_deref(), review.kind.as_deref()) {
        (Some(API_VERSION), Some(KIND)) => {}
        (v, k) => {
            return Err(BadRequest(format!(
                "expected apiVersion {API_VERSION} kind {KIND}, got apiVersion {:?} kind {:?}; \
                 set admissionReviewVersions: [v1] in the webhook configuration",
                v.unwrap_or(""),
                k.unwrap_or("")
            )));
        }
    }
    let Some(request) = review.request else {
        return Err(BadRequest("AdmissionReview has no request".into()));
    };

    let is_pod_create = request.kind.group.is_empty()
        && request.kind.version == "v1"
        && request.kind.kind == "Pod"
        && request.sub_resource.as_deref().unwrap_or("").is_empty()
        && request.operation == "CREATE";

    let mut pod_name = request.name.as_deref().unwrap_or("").to_owned();
    let decision = if is_pod_create {
        let Some(object) = request.object else {
            return Err(BadRequest("Pod CREATE request has no object".into()));
        };
        let pod = pod_view(object)?;
        if pod_name.is_empty() {
            pod_name = pod.display_name().to_owned();
        }
        mutate(&pod, config)
    } else {
        Decision::Allow {
            profile: None,
            ops: Vec::new(),
            warnings: Vec::new(),
        }
    };

    let body = response_body(&request.uid, &decision);
    Ok(Reviewed {
        body,
        uid: request.uid.into_owned(),
        namespace: request.namespace.map(Cow::into_owned).unwrap_or_default(),
        pod: pod_name,
        dry_run: request.dry_run.unwrap_or(false),
        decision,
    })
}

/// Serializes the `AdmissionReview` response for a decision.
pub fn response_body(uid: &str, decision: &Decision) -> Vec<u8> {
    if let Decision::Allow { ops, warnings, .. } = decision
        && !ops.is_empty()
    {
        return patched_body(uid, ops, warnings);
    }
    let response = match decision {
        Decision::Allow { ops, warnings, .. } => ResponseOut {
            uid,
            allowed: true,
            status: None,
            // An empty patch is no patch: `patch` and `patchType` come together
            // or not at all.
            patch_type: (!ops.is_empty()).then_some("JSONPatch"),
            patch: (!ops.is_empty())
                .then(|| base64::engine::general_purpose::STANDARD.encode(patch::to_json(ops))),
            warnings,
        },
        Decision::Deny { message, .. } => ResponseOut {
            uid,
            allowed: false,
            status: Some(StatusOut {
                code: 403,
                reason: "Forbidden",
                message,
            }),
            patch_type: None,
            patch: None,
            warnings: &[],
        },
    };
    let out = ReviewOut {
        api_version: API_VERSION,
        kind: KIND,
        response,
    };
    // Only strings, bools and numbers: serialization cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The same bytes serde would write for an `Allow` with a patch, built by
/// hand: the base64 patch is most of the body and needs no JSON escaping, so
/// it is encoded straight into a buffer sized once instead of being copied
/// through the string serializer.
fn patched_body(uid: &str, ops: &[PatchOp], warnings: &[String]) -> Vec<u8> {
    const HEAD: &[u8] =
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#;
    const PATCH: &[u8] = br#","allowed":true,"patchType":"JSONPatch","patch":""#;
    let patch = patch::to_json(ops);
    let encoded = base64::encoded_len(patch.len(), true).unwrap_or(0);
    let extra: usize = warnings.iter().map(|w| w.len() + 8).sum();
    let mut out = Vec::with_capacity(HEAD.len() + PATCH.len() + uid.len() + encoded + extra + 32);
    out.extend_from_slice(HEAD);
    // Writing strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, uid);
    out.extend_from_slice(PATCH);
    let start = out.len();
    out.resize(start + encoded, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(&patch, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
    out.push(b'"');
    if !warnings.is_empty() {
        out.extend_from_slice(br#","warnings":"#);
        let _ = serde_json::to_writer(&mut out, warnings);
    }
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
mod tests;
