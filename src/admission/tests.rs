//! The review envelope: what the API server sends and requires back
//! (docs/design.md: the rules of the patch and the API server's facts).

use base64::Engine;
use serde_json::{Value, json};

use super::*;
use crate::config::{Config, EXAMPLE_CONFIG};

fn config() -> Config {
    Config::parse(EXAMPLE_CONFIG).unwrap()
}

fn review_of(operation: &str, kind: Value, object: Value, dry_run: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": kind,
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": kind,
            "namespace": "istio-system",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": dry_run,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    }))
    .unwrap()
}

fn pod_kind() -> Value {
    json!({"group": "", "version": "v1", "kind": "Pod"})
}

fn istiod() -> Value {
    json!({
        "metadata": {"generateName": "istiod-abc-", "labels": {"app": "istiod"}},
        "spec": {"containers": [{"name": "discovery"}]}
    })
}

fn answer(body: &[u8]) -> (Reviewed, Value) {
    let c = config();
    let r = review(body, ConfigState::Loaded(&c)).unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    (r, v)
}

#[test]
fn response_envelope_echoes_uid_and_kind() {
    let (r, v) = answer(&review_of("CREATE", pod_kind(), istiod(), false));
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], "0df28fbd-5f5f-11e8-bc74-36e6bb280816");
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["patchType"], "JSONPatch");
    assert_eq!(r.uid, "0df28fbd-5f5f-11e8-bc74-36e6bb280816");
    assert_eq!(r.namespace, "istio-system");
    assert_eq!(r.pod, "istiod-abc-");
}

#[test]
fn patch_is_a_base64_string_of_a_json_patch() {
    let (_, v) = answer(&review_of("CREATE", pod_kind(), istiod(), false));
    let b64 = v["response"]["patch"]
        .as_str()
        .expect("patch must be a string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut pod = istiod();
    json_patch::patch(&mut pod, &patch).unwrap();
    assert_eq!(
        pod["metadata"]["annotations"]["vault.hashicorp.com/agent-inject"],
        "true"
    );
}

#[test]
fn no_patch_means_neither_patch_nor_patch_type() {
    let unrelated = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}});
    let (r, v) = answer(&review_of("CREATE", pod_kind(), unrelated, false));
    let resp = v["response"].as_object().unwrap();
    assert_eq!(resp["allowed"], true);
    assert!(
        !resp.contains_key("patch") && !resp.contains_key("patchType"),
        "{resp:?}"
    );
    assert!(!resp.contains_key("warnings"));
    assert_eq!(r.outcome(), Outcome::Skipped);
}

#[test]
fn update_delete_and_other_kinds_pass_untouched() {
    for (op, kind) in [
        ("UPDATE", pod_kind()),
        ("DELETE", pod_kind()),
        ("CONNECT", pod_kind()),
        (
            "CREATE",
            json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
        ),
        (
            "CREATE",
            json!({"group": "", "version": "v1", "kind": "ConfigMap"}),
        ),
    ] {
        let (r, v) = answer(&review_of(op, kind.clone(), istiod(), false));
        assert_eq!(v["response"]["allowed"], true, "{op} {kind}");
        assert!(v["response"].get("patch").is_none(), "{op} {kind}");
        assert_eq!(r.outcome(), Outcome::Skipped);
    }
}

#[test]
fn subresource_requests_pass_untouched() {
    let mut body: Value =
        serde_json::from_slice(&review_of("CREATE", pod_kind(), istiod(), false)).unwrap();
    body["request"]["subResource"] = json!("binding");
    let (_, v) = answer(&serde_json::to_vec(&body).unwrap());
    assert!(v["response"].get("patch").is_none());
}

#[test]
fn dry_run_behaves_exactly_like_a_real_request() {
    let (real, _) = answer(&review_of("CREATE", pod_kind(), istiod(), false));
    let (dry, _) = answer(&review_of("CREATE", pod_kind(), istiod(), true));
    assert!(dry.dry_run && !real.dry_run);
    assert_eq!(real.body, dry.body);
}

#[test]
fn denial_carries_a_403_status_and_no_patch() {
    let mut pod = istiod();
    pod["spec"]["containers"][0]["name"] = json!("pilot");
    let (r, v) = answer(&review_of("CREATE", pod_kind(), pod, false));
    assert_eq!(r.outcome(), Outcome::Denied);
    assert_eq!(v["response"]["allowed"], false);
    assert_eq!(v["response"]["status"]["code"], 403);
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("discovery")
    );
    assert!(v["response"].get("patch").is_none() && v["response"].get("patchType").is_none());
}

#[test]
fn missing_config_denies_istiod() {
    let body = review_of("CREATE", pod_kind(), istiod(), false);
    let r = review(
        &body,
        ConfigState::Missing {
            why: "no ConfigMap",
        },
    )
    .unwrap();
    assert_eq!(r.outcome(), Outcome::Denied);
}

#[test]
fn warnings_are_returned() {
    let mut pod = istiod();
    pod["metadata"]["annotations"] = json!({"vault.hashicorp.com/role": "wrong"});
    let (_, v) = answer(&review_of("CREATE", pod_kind(), pod, false));
    let w = v["response"]["warnings"].as_array().unwrap();
    assert_eq!(w.len(), 1);
}

#[test]
fn bad_bodies_are_one_line_errors() {
    let c = config();
    let cases: Vec<(&[u8], &str)> = vec![
        (b"", "not an AdmissionReview"),
        (b"{", "not an AdmissionReview"),
        (b"[]", "not an AdmissionReview"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE"}}"#,
            "admissionReviewVersions",
        ),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "no request"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":5}}"#, "not an AdmissionReview"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE"}}"#,
            "no object",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE","object":{"metadata":{"labels":{"app":7}}}}}"#,
            "not a Pod",
        ),
        (b"\xff\xfe", "not an AdmissionReview"),
    ];
    for (body, expect) in cases {
        let e = review(body, ConfigState::Loaded(&c)).unwrap_err();
        assert!(
            e.0.contains(expect),
            "{:?}: {}",
            String::from_utf8_lossy(body),
            e.0
        );
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(review(deep.as_bytes(), ConfigState::Loaded(&c)).is_err());
}

#[test]
fn response_deserializes_into_kube_types() {
    use kube::core::DynamicObject;
    use kube::core::admission::AdmissionReview;
    let body = review_of("CREATE", pod_kind(), istiod(), false);
    // The request we parse is what kube's types accept too.
    let _: AdmissionReview<DynamicObject> = serde_json::from_slice(&body).unwrap();
    let (_, v) = answer(&body);
    // kube reads `patch` as bytes, so only check the rest of the envelope;
    // and kube's type insists on a `status` the API server treats as optional.
    let mut v = v;
    let resp = v["response"].as_object_mut().unwrap();
    resp.remove("patch");
    resp.remove("patchType");
    resp.insert("status".into(), json!({}));
    let parsed: AdmissionReview<DynamicObject> = serde_json::from_value(v).unwrap();
    let resp = parsed.response.unwrap();
    assert!(resp.allowed);
    assert_eq!(resp.uid, "0df28fbd-5f5f-11e8-bc74-36e6bb280816");
}

#[test]
fn key_order_does_not_matter() {
    // serde_json writes keys sorted, so `object` comes before `operation`;
    // the API server writes them the other way round.
    let sorted = review_of("CREATE", pod_kind(), istiod(), false);
    assert!(
        String::from_utf8_lossy(&sorted).find("\"object\"")
            < String::from_utf8_lossy(&sorted).find("\"operation\"")
    );
    let (r, _) = answer(&sorted);
    assert_eq!(r.outcome(), Outcome::Patched);
    // A later duplicate decides, as in Go: this one is an UPDATE.
    let text = String::from_utf8(sorted).unwrap();
    let update = text.replacen(
        "\"operation\":\"CREATE\"",
        "\"operation\":\"CREATE\",\"operation\":\"UPDATE\"",
        1,
    );
    assert_eq!(answer(update.as_bytes()).0.outcome(), Outcome::Skipped);
    // An object that is not Pod-shaped only matters for a Pod CREATE,
    // whichever comes first.
    let odd = review_of("CREATE", pod_kind(), json!({"metadata": 7}), false);
    let e = review(&odd, ConfigState::Loaded(&config())).unwrap_err();
    assert!(
        e.0.starts_with("request.object is not a Pod: metadata: expected an object"),
        "{}",
        e.0
    );
    let odd_update = review_of("UPDATE", pod_kind(), json!({"metadata": 7}), false);
    assert_eq!(answer(&odd_update).0.outcome(), Outcome::Skipped);
}
