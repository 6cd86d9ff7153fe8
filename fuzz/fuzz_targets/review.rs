//! AdmissionReview bytes → `admission::review` with a fixed config.
//!
//! Never panics. The webhook's JSON reader accepts exactly what serde_json
//! accepts (but numbers beyond an f64's range). When the answer is an allowed patch, the patch applies to
//! the request's object with RFC 6902 semantics (as the API server applies
//! it), and reviewing the patched object again yields no patch at all.
#![no_main]

use std::sync::LazyLock;

use istio_vault_webhook::config::Config;
use istio_vault_webhook::mutate::{ConfigState, Decision};
use istio_vault_webhook::render;
use istio_vault_webhook::{admission, json};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Both profile kinds, every optional annotation, a non-default volume path.
const CONFIG: &str = r#"
cluster: fuzz
vault:
  authPath: auth/kubernetes-fuzz
  kvVersion: 2
  address: https://vault.example.com:8200
  namespace: team/a
  caCert: /vault/tls/ca.crt
  tlsSecret: vault-tls
secretVolumePath: /etc/istio/vault
profiles:
  istiod:
    secretPath: kv/data/istiod/certs
    rotation: init-only
  gateways:
    - name: ingressgateway
      match: { istio: ingressgateway }
      role: istio-ingressgateway
      secretPath: kv/data/ingressgateway/certs
      renderInterval: 1m30s
      files: { tls.crt: tls_crt, tls.key: tls_key, ca.crt: ca_crt }
    - name: eastwest
      match: { app: istio-eastwestgateway, topology.istio.io/network: net1 }
      role: eastwest
      secretPath: kv/data/eastwest/certs
      files: { ca.crt: ca_crt }
"#;

static CFG: LazyLock<Config> = LazyLock::new(|| Config::parse(CONFIG).expect("fuzz config"));

fuzz_target!(|data: &[u8]| {
    same_verdict_as_serde_json(data);
    let cfg = &*CFG;
    let Ok(first) = admission::review(data, ConfigState::Loaded(cfg)) else {
        return;
    };
    // Every answer is a well-formed AdmissionReview echoing the uid.
    let response: Value = serde_json::from_slice(&first.body).expect("response is JSON");
    assert_eq!(
        response["response"]["uid"].as_str(),
        Some(first.uid.as_str())
    );

    let Decision::Allow { ops, .. } = &first.decision else {
        return;
    };
    if ops.is_empty() {
        assert!(response["response"].get("patch").is_none());
        return;
    }
    // A patch came back, so this was a Pod CREATE with an object. The
    // webhook's reader accepts numbers too large for an f64, which
    // serde_json's Value refuses; the API server never sends one.
    let Ok(mut review) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let object = review
        .pointer_mut("/request/object")
        .expect("patched review has an object");
    if let Err(e) = render::apply(object, ops) {
        panic!("patch does not apply: {e}\nops: {ops:?}\nobject: {object}");
    }
    let again = serde_json::to_vec(&review).unwrap();
    let second = admission::review(&again, ConfigState::Loaded(cfg))
        .expect("the patched review is still a review");
    match &second.decision {
        Decision::Allow { ops, .. } if ops.is_empty() => {}
        other => panic!(
            "second pass is not a no-op: {other:?}\nobject: {}",
            review["request"]["object"]
        ),
    }
});

/// The reader (`json::Reader::skip`) and serde_json agree on whether the
/// input is JSON, apart from numbers beyond an f64's range, which JSON's
/// grammar allows and serde_json's Value refuses.
fn same_verdict_as_serde_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut reader = json::Reader::new(text);
    let ours = reader.skip().and_then(|()| reader.finish());
    match serde_json::from_str::<Value>(text) {
        Ok(_) => assert!(ours.is_ok(), "serde_json accepts, the reader says {ours:?}"),
        Err(e) if e.to_string().starts_with("number out of range") => {}
        Err(e) => assert!(ours.is_err(), "the reader accepts, serde_json says {e}"),
    }
}
