//! AdmissionReview bytes → decision → response bytes. Pure: the server only
//! moves bytes and measures time.
//!
//! The review is read with [`crate::json::Reader`] instead of
//! `kube::core::admission::AdmissionReview<DynamicObject>`: only the
//! envelope fields and, for a Pod CREATE, the handful of Pod fields the
//! rules need are kept; the rest is validated and skipped without copying.
//! The response is written here, not with kube's `AdmissionResponse`, which
//! serializes `patch` as an array of numbers instead of the base64 string the
//! API documents (kube-rs#1781): a response with a patch by hand, its
//! patch mostly copied from pieces the config prepared in base64
//! (`patch::encode_base64`), the others through small serde types.

use std::borrow::Cow;

use serde::Serialize;

use crate::json::{self, ErrorKind, Kind, Reader};
use crate::mutate::{ConfigState, Decision, Outcome, PodView, mutate};
use crate::patch::{self, Op};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// The fields of `request` the webhook uses.
#[derive(Default)]
struct Request<'a> {
    uid: Option<Cow<'a, str>>,
    kind: Option<GroupVersionKind<'a>>,
    sub_resource: Option<Cow<'a, str>>,
    namespace: Option<Cow<'a, str>>,
    name: Option<Cow<'a, str>>,
    operation: Option<Cow<'a, str>>,
    dry_run: Option<bool>,
    object: Object<'a>,
}

#[derive(Default)]
struct GroupVersionKind<'a> {
    group: Cow<'a, str>,
    version: Cow<'a, str>,
    kind: Cow<'a, str>,
}

/// `request.object`, read as a Pod wherever it comes: the webhook is only
/// registered for Pods, and reading a Pod costs the same as skipping it.
/// Whether the request is a Pod CREATE is decided once the whole request has
/// been read, since JSON does not fix the order of the keys.
#[derive(Default)]
enum Object<'a> {
    #[default]
    Absent,
    Pod(PodView<'a>),
    /// Valid JSON but not Pod-shaped: an error only for a Pod CREATE.
    NotAPod(json::Error),
}

impl Request<'_> {
    fn is_pod_create(&self) -> bool {
        self.kind
            .as_ref()
            .is_some_and(|k| k.group.is_empty() && k.version == "v1" && k.kind == "Pod")
            && self.sub_resource.as_deref().unwrap_or("").is_empty()
            && self.operation.as_deref() == Some("CREATE")
    }
}

/// The top level of the body: `apiVersion`, `kind` and `request`.
#[derive(Default)]
struct Envelope<'a> {
    api_version: Option<Cow<'a, str>>,
    kind: Option<Cow<'a, str>>,
    request: Option<Request<'a>>,
}

fn read_envelope(text: &str) -> json::Result<Envelope<'_>> {
    let mut r = Reader::new(text);
    if r.peek()? != Kind::Object {
        return r.wrong_type("the body", "an object");
    }
    let mut envelope = Envelope::default();
    r.object(|r, key| {
        match &*key {
            "apiVersion" => envelope.api_version = r.opt_str("apiVersion")?,
            "kind" => envelope.kind = r.opt_str("kind")?,
            "request" => envelope.request = read_request(r)?,
            _ => r.skip()?,
        }
        Ok(())
    })?;
    r.finish()?;
    Ok(envelope)
}

fn read_request<'a>(r: &mut Reader<'a>) -> json::Result<Option<Request<'a>>> {
    let mut req = Request::default();
    let found = r.opt_object("request", |r, key| {
        match &*key {
            "uid" => req.uid = r.opt_str("request.uid")?,
            "kind" => req.kind = read_gvk(r)?,
            "subResource" => req.sub_resource = r.opt_str("request.subResource")?,
            "namespace" => req.namespace = r.opt_str("request.namespace")?,
            "name" => req.name = r.opt_str("request.name")?,
            "operation" => req.operation = r.opt_str("request.operation")?,
            "dryRun" => req.dry_run = r.opt_bool("request.dryRun")?,
            "object" => req.object = read_object(r)?,
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(found.then_some(req))
}

fn read_gvk<'a>(r: &mut Reader<'a>) -> json::Result<Option<GroupVersionKind<'a>>> {
    let mut gvk = GroupVersionKind::default();
    let found = r.opt_object("request.kind", |r, key| {
        match &*key {
            "group" => gvk.group = r.opt_str("request.kind.group")?.unwrap_or_default(),
            "version" => gvk.version = r.opt_str("request.kind.version")?.unwrap_or_default(),
            "kind" => gvk.kind = r.opt_str("request.kind.kind")?.unwrap_or_default(),
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(found.then_some(gvk))
}

fn read_object<'a>(r: &mut Reader<'a>) -> json::Result<Object<'a>> {
    if r.null()? {
        return Ok(Object::Absent);
    }
    let mark = *r;
    match PodView::read(r) {
        Ok(pod) => Ok(Object::Pod(pod)),
        Err(e) if e.kind == ErrorKind::Shape => {
            // Go back and skip the whole object, which still checks that it
            // is JSON; whether its shape matters is known at the end.
            *r = mark;
            r.skip()?;
            Ok(Object::NotAPod(e))
        }
        Err(e) => Err(e),
    }
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
    let not_a_review =
        |e: &dyn std::fmt::Display| BadRequest(format!("body is not an AdmissionReview: {e}"));
    let text = std::str::from_utf8(body).map_err(|e| not_a_review(&e))?;
    let envelope = read_envelope(text).map_err(|e| not_a_review(&e))?;
    match (envelope.api_version.as_deref(), envelope.kind.as_deref()) {
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
    let Some(request) = envelope.request else {
        return Err(BadRequest("AdmissionReview has no request".into()));
    };
    let missing = |field: &str| not_a_review(&format_args!("request.{field} is missing"));
    if request.kind.is_none() {
        return Err(missing("kind"));
    }
    if request.operation.is_none() {
        return Err(missing("operation"));
    }
    let is_pod_create = request.is_pod_create();
    let Request {
        uid,
        namespace,
        name,
        dry_run,
        object,
        ..
    } = request;
    let Some(uid) = uid else {
        return Err(missing("uid"));
    };

    let mut pod_name = name.as_deref().unwrap_or("").to_owned();
    let decision = if is_pod_create {
        let pod = match object {
            Object::Absent => return Err(BadRequest("Pod CREATE request has no object".into())),
            Object::Pod(pod) => pod,
            Object::NotAPod(e) => {
                return Err(BadRequest(format!("request.object is not a Pod: {e}")));
            }
        };
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

    let body = response_body(&uid, &decision);
    Ok(Reviewed {
        body,
        uid: uid.into_owned(),
        namespace: namespace.map(Cow::into_owned).unwrap_or_default(),
        pod: pod_name,
        dry_run: dry_run.unwrap_or(false),
        decision,
    })
}

/// Serializes the `AdmissionReview` response for a decision.
pub fn response_body(uid: &str, decision: &Decision) -> Vec<u8> {
    let response = match decision {
        Decision::Allow { ops, warnings, .. } if !ops.is_empty() => {
            return patched_body(uid, ops, warnings);
        }
        // An empty patch is no patch: `patch` and `patchType` come together
        // or not at all.
        Decision::Allow { warnings, .. } => ResponseOut {
            uid,
            allowed: true,
            status: None,
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

/// The response to an `Allow` with a patch, written by hand: the base64
/// patch is most of the body, needs no JSON escaping, and is mostly copied
/// from the operations the config prepared (`patch::encode_base64`).
fn patched_body(uid: &str, ops: &[Op], warnings: &[String]) -> Vec<u8> {
    const HEAD: &[u8] =
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#;
    const PATCH: &[u8] = br#","allowed":true,"patchType":"JSONPatch","patch":""#;
    let warnings_len: usize = warnings.iter().map(|w| w.len() + 8).sum();
    let mut out = Vec::with_capacity(
        HEAD.len() + uid.len() + PATCH.len() + patch::base64_len_hint(ops) + warnings_len + 24,
    );
    out.extend_from_slice(HEAD);
    json::write_str(&mut out, uid);
    out.extend_from_slice(PATCH);
    patch::encode_base64(ops, &mut out);
    out.push(b'"');
    if !warnings.is_empty() {
        out.extend_from_slice(br#","warnings":"#);
        // Writing strings into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, warnings);
    }
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
mod tests;
