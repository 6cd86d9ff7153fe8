//! A `caBundle`, merged: which CA certificates a MutatingWebhookConfiguration
//! trusts, and how this replica's CAs are added to (and withdrawn from) it
//! without dropping anyone else's. Pure: bytes and JSON in, bytes and JSON
//! out; `ca_bundle.rs` is the loop that reads and writes the object.
//!
//! Several replicas share one configuration, each with its own CA, and no
//! key is stored anywhere, so a merge keeps every other valid certificate in
//! its order, drops expired ones and unparsable junk, and appends what is
//! missing. Formatting alone (line endings, wrapping) is not a change, so
//! replicas that agree on the content never write.
//!
//! The object is handled as untyped JSON so fields this build does not know
//! survive the round trip.

use anyhow::anyhow;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use kube::api::DynamicObject;
use serde_json::Value;

/// A CA certificate this replica needs trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCert {
    pub der: Vec<u8>,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

impl CaCert {
    pub fn from_der(der: Vec<u8>) -> anyhow::Result<CaCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
        let not_after = cert.validity().not_after.timestamp();
        Ok(CaCert { der, not_after })
    }

    pub fn pem(&self) -> String {
        pem_encode(&self.der)
    }
}

fn pem_encode(der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// One entry of an existing bundle.
#[derive(Debug)]
enum Entry {
    Cert { der: Vec<u8>, not_after: i64 },
    Junk,
}

/// Splits a PEM bundle into certificates and junk (text outside PEM blocks,
/// other block types, undecodable or unparsable certificates).
fn parse_bundle(bytes: &[u8]) -> Vec<Entry> {
    const BEGIN: &str = "-----BEGIN ";
    let text = String::from_utf8_lossy(bytes);
    let mut entries = Vec::new();
    let mut rest: &str = &text;
    loop {
        let Some(start) = rest.find(BEGIN) else {
            if !rest.trim().is_empty() {
                entries.push(Entry::Junk);
            }
            break;
        };
        if !rest[..start].trim().is_empty() {
            entries.push(Entry::Junk);
        }
        let block = &rest[start..];
        let Some(label_end) = block[BEGIN.len()..].find("-----") else {
            entries.push(Entry::Junk);
            break;
        };
        let label = &block[BEGIN.len()..BEGIN.len() + label_end];
        let body_start = BEGIN.len() + label_end + 5;
        let end_marker = format!("-----END {label}-----");
        let Some(end) = block.find(&end_marker) else {
            entries.push(Entry::Junk);
            break;
        };
        let body: String = block[body_start..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        rest = &block[end + end_marker.len()..];
        if label != "CERTIFICATE" {
            entries.push(Entry::Junk);
            continue;
        }
        match BASE64
            .decode(body.as_bytes())
            .ok()
            .and_then(|der| CaCert::from_der(der).ok())
        {
            Some(ca) => entries.push(Entry::Cert {
                der: ca.der,
                not_after: ca.not_after,
            }),
            None => entries.push(Entry::Junk),
        }
    }
    entries
}

/// The result of merging into one bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The new bundle (PEM).
    pub bundle: Vec<u8>,
    /// Whether it differs (in content, not formatting) from the old one.
    pub changed: bool,
    pub added: usize,
    pub expired: usize,
    pub junk: usize,
    pub removed: usize,
}

/// Merges `add` into the PEM bundle `existing`: keeps every other valid
/// certificate in its order, drops expired ones (notAfter before `now`),
/// junk and the certificates in `remove`, then appends the missing `add`.
pub fn merge(existing: &[u8], add: &[CaCert], remove: &[Vec<u8>], now: i64) -> Merged {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut before: Vec<Vec<u8>> = Vec::new();
    let (mut expired, mut junk, mut removed, mut added) = (0, 0, 0, 0);
    for entry in parse_bundle(existing) {
        match entry {
            Entry::Junk => junk += 1,
            Entry::Cert { der, not_after } => {
                before.push(der.clone());
                if remove.contains(&der) && !add.iter().any(|a| a.der == der) {
                    removed += 1;
                } else if not_after < now {
                    expired += 1;
                } else if !out.contains(&der) {
                    out.push(der);
                }
            }
        }
    }
    for ca in add {
        if !out.contains(&ca.der) {
            out.push(ca.der.clone());
            added += 1;
        }
    }
    let changed = junk > 0 || out != before;
    let bundle = if changed {
        out.iter()
            .map(|d| pem_encode(d))
            .collect::<String>()
            .into_bytes()
    } else {
        existing.to_vec()
    };
    Merged {
        bundle,
        changed,
        added,
        expired,
        junk,
        removed,
    }
}

/// Whether every `cas` is in the PEM bundle.
pub fn trusts(bundle: &[u8], cas: &[CaCert]) -> bool {
    let ders: Vec<Vec<u8>> = parse_bundle(bundle)
        .into_iter()
        .filter_map(|e| match e {
            Entry::Cert { der, .. } => Some(der),
            Entry::Junk => None,
        })
        .collect();
    cas.iter().all(|ca| ders.contains(&ca.der))
}

/// The merge applied to every webhook of a MutatingWebhookConfiguration.
#[derive(Debug)]
pub struct ObjectMerge {
    /// The object to write back, when any bundle changed.
    pub updated: Option<DynamicObject>,
    /// How many webhooks the object has.
    pub webhooks: usize,
    /// What changed, per webhook, for the log line.
    pub summary: String,
}

pub fn merge_object(
    obj: &DynamicObject,
    add: &[CaCert],
    remove: &[Vec<u8>],
    now: i64,
) -> ObjectMerge {
    let mut updated = obj.clone();
    let mut changes = Vec::new();
    let mut count = 0;
    if let Some(webhooks) = updated
        .data
        .get_mut("webhooks")
        .and_then(Value::as_array_mut)
    {
        for webhook in webhooks.iter_mut() {
            let Some(webhook) = webhook.as_object_mut() else {
                continue;
            };
            count += 1;
            let name = webhook
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned();
            let client_config = webhook
                .entry("clientConfig")
                .or_insert_with(|| Value::Object(Default::default()));
            let Some(client_config) = client_config.as_object_mut() else {
                continue;
            };
            let old = client_config
                .get("caBundle")
                .and_then(Value::as_str)
                .unwrap_or("");
            let (old_bytes, undecodable) = match BASE64.decode(old) {
                Ok(b) => (b, false),
                Err(_) => (Vec::new(), true),
            };
            let merged = merge(&old_bytes, add, remove, now);
            if merged.changed || undecodable {
                changes.push(format!(
                    "{name}: +{} -{} expired -{} junk -{} withdrawn",
                    merged.added,
                    merged.expired,
                    merged.junk + usize::from(undecodable),
                    merged.removed
                ));
                client_config.insert(
                    "caBundle".into(),
                    Value::String(BASE64.encode(&merged.bundle)),
                );
            }
        }
    }
    ObjectMerge {
        updated: (!changes.is_empty()).then_some(updated),
        webhooks: count,
        summary: changes.join("; "),
    }
}

/// Whether every webhook of the object trusts all of `cas`.
pub fn object_trusts(obj: &DynamicObject, cas: &[CaCert]) -> bool {
    obj.data
        .get("webhooks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .all(|w| {
            let b64 = w
                .pointer("/clientConfig/caBundle")
                .and_then(Value::as_str)
                .unwrap_or("");
            BASE64
                .decode(b64)
                .map(|bytes| trusts(&bytes, cas))
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::self_signed;

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn ca(validity: Duration) -> CaCert {
        let s = self_signed::generate(&["svc".into()], validity).unwrap();
        CaCert::from_der(s.ca_der).unwrap()
    }

    #[test]
    fn merge_into_empty_adds() {
        let a = ca(Duration::from_secs(3600));
        let m = merge(b"", std::slice::from_ref(&a), &[], now());
        assert!(m.changed);
        assert_eq!(m.added, 1);
        assert!(trusts(&m.bundle, std::slice::from_ref(&a)));
        // Idempotent.
        let again = merge(&m.bundle, &[a], &[], now());
        assert!(!again.changed);
        assert_eq!(again.bundle, m.bundle);
    }

    #[test]
    fn merge_keeps_others_drops_expired_and_junk() {
        let ours = ca(Duration::from_secs(3600));
        let other = ca(Duration::from_secs(3600));
        let old = ca(Duration::from_secs(10));
        let mut existing = String::from("garbage line\n");
        existing.push_str(&other.pem());
        existing
            .push_str("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n");
        existing.push_str(&old.pem());
        existing.push_str("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let m = merge(
            existing.as_bytes(),
            std::slice::from_ref(&ours),
            &[],
            old.not_after + 1,
        );
        assert!(m.changed);
        assert_eq!((m.added, m.expired, m.junk), (1, 1, 3));
        let text = String::from_utf8(m.bundle.clone()).unwrap();
        assert_eq!(text, format!("{}{}", other.pem(), ours.pem()));
    }

    #[test]
    fn merge_removes_withdrawn() {
        let a = ca(Duration::from_secs(3600));
        let b = ca(Duration::from_secs(3600));
        let bundle = format!("{}{}", a.pem(), b.pem());
        let m = merge(bundle.as_bytes(), &[], std::slice::from_ref(&a.der), now());
        assert_eq!(m.removed, 1);
        assert_eq!(String::from_utf8(m.bundle).unwrap(), b.pem());
    }

    #[test]
    fn formatting_alone_is_not_a_change() {
        let a = ca(Duration::from_secs(3600));
        let crlf = a.pem().replace('\n', "\r\n");
        let m = merge(crlf.as_bytes(), std::slice::from_ref(&a), &[], now());
        assert!(!m.changed);
    }

    #[test]
    fn object_merge_touches_every_webhook_and_keeps_unknown_fields() {
        let a = ca(Duration::from_secs(3600));
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "w", "resourceVersion": "5"},
            "webhooks": [
                {"name": "a.x", "clientConfig": {"service": {"name": "s", "namespace": "n"}}, "futureField": 1},
                {"name": "b.x", "clientConfig": {"caBundle": "!!!"}}
            ]
        }))
        .unwrap();
        let m = merge_object(&obj, std::slice::from_ref(&a), &[], now());
        let updated = m.updated.unwrap();
        assert_eq!(m.webhooks, 2);
        assert!(object_trusts(&updated, std::slice::from_ref(&a)));
        assert!(!object_trusts(&obj, std::slice::from_ref(&a)));
        assert_eq!(updated.data["webhooks"][0]["futureField"], 1);
        assert_eq!(updated.metadata.resource_version.as_deref(), Some("5"));
        let again = merge_object(&updated, &[a], &[], now());
        assert!(again.updated.is_none());
    }
}
