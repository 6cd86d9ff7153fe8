//! The Pod reader against an oracle written over `serde_json::Value`:
//! same fields, same null-means-absent rule, same refusals.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

/// What the rules should see, computed from a parsed Value; `None` when the
/// Pod is not Pod-shaped.
#[derive(Debug, PartialEq)]
struct Expected {
    metadata: Option<ExpectedMeta>,
    containers: Option<Vec<(String, Option<Vec<ExpectedEnv>>)>>,
}
/// name, generateName, namespace, labels, annotations.
type ExpectedMeta = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<Map>,
    Option<Map>,
);
/// name, value, has valueFrom.
type ExpectedEnv = (String, Option<String>, bool);
type Map = BTreeMap<String, String>;

fn string(v: Option<&Value>) -> Option<Option<String>> {
    match v {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => Some(Some(s.clone())),
        Some(_) => None,
    }
}

fn items(v: Option<&Value>) -> Option<Option<&Vec<Value>>> {
    match v {
        None | Some(Value::Null) => Some(None),
        Some(Value::Array(a)) if a.iter().all(Value::is_object) => Some(Some(a)),
        Some(_) => None,
    }
}

fn map(v: Option<&Value>) -> Option<Option<Map>> {
    match v {
        None | Some(Value::Null) => Some(None),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect::<Option<Map>>()
            .map(Some),
        Some(_) => None,
    }
}

fn oracle(pod: &Value) -> Option<Expected> {
    let pod = pod.as_object()?;
    let metadata = match pod.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some((
            string(m.get("name"))?,
            string(m.get("generateName"))?,
            string(m.get("namespace"))?,
            map(m.get("labels"))?,
            map(m.get("annotations"))?,
        )),
        Some(_) => return None,
    };
    let containers = match pod.get("spec") {
        None | Some(Value::Null) => None,
        Some(Value::Object(spec)) => match items(spec.get("containers"))? {
            None => None,
            Some(cs) => Some(
                cs.iter()
                    .map(|c| {
                        let env = match items(c.get("env"))? {
                            None => None,
                            Some(es) => Some(
                                es.iter()
                                    .map(|e| {
                                        Some((
                                            string(e.get("name"))?.unwrap_or_default(),
                                            string(e.get("value"))?,
                                            !matches!(e.get("valueFrom"), None | Some(Value::Null)),
                                        ))
                                    })
                                    .collect::<Option<Vec<_>>>()?,
                            ),
                        };
                        Some((string(c.get("name"))?.unwrap_or_default(), env))
                    })
                    .collect::<Option<Vec<_>>>()?,
            ),
        },
        Some(_) => return None,
    };
    Some(Expected {
        metadata,
        containers,
    })
}

fn seen(pod: &PodView<'_>) -> Expected {
    let owned = |s: &Option<Cow<'_, str>>| s.as_deref().map(str::to_owned);
    let pairs = |p: &Option<Pairs<'_>>| {
        p.as_ref().map(|p| {
            p.0.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    };
    Expected {
        metadata: pod.metadata.as_ref().map(|m| {
            (
                owned(&m.name),
                owned(&m.generate_name),
                owned(&m.namespace),
                pairs(&m.labels),
                pairs(&m.annotations),
            )
        }),
        containers: pod.containers.as_ref().map(|cs| {
            cs.iter()
                .map(|c| {
                    let env = c.env.as_ref().map(|es| {
                        es.iter()
                            .map(|e| (e.name.to_string(), owned(&e.value), e.value_from))
                            .collect()
                    });
                    (c.name.to_string(), env)
                })
                .collect()
        }),
    }
}

/// A value that is usually of the expected type and sometimes not.
fn sometimes(right: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop_oneof![
        8 => right,
        1 => Just(Value::Null),
        1 => prop_oneof![
            Just(json!(7)),
            Just(json!(true)),
            Just(json!("text")),
            Just(json!([])),
            Just(json!({})),
        ],
    ]
    .boxed()
}

fn text() -> BoxedStrategy<Value> {
    "[a-zA-Z0-9_./\"\\\\é-]{0,10}".prop_map(Value::from).boxed()
}

fn object(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let keys: Vec<&'static str> = fields.iter().map(|(k, _)| *k).collect();
    let values: Vec<BoxedStrategy<Option<Value>>> = fields
        .into_iter()
        .map(|(_, v)| proptest::option::weighted(0.8, v).boxed())
        .collect();
    values
        .prop_map(move |vs| {
            let mut m = serde_json::Map::new();
            for (k, v) in keys.iter().zip(vs) {
                if let Some(v) = v {
                    m.insert((*k).to_owned(), v);
                }
            }
            m.insert("ignored".into(), json!({"f:nested": [1, {"x": null}]}));
            Value::Object(m)
        })
        .boxed()
}

fn pod() -> impl Strategy<Value = Value> {
    let labels = sometimes(
        prop::collection::btree_map("[a-z./]{1,8}", sometimes(text()), 0..5)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
            .boxed(),
    );
    let env = object(vec![
        ("name", sometimes(text())),
        ("value", sometimes(text())),
        (
            "valueFrom",
            sometimes(Just(json!({"fieldRef": {"fieldPath": "x"}})).boxed()),
        ),
    ]);
    let container = object(vec![
        ("name", sometimes(text())),
        (
            "env",
            sometimes(
                prop::collection::vec(sometimes(env), 0..4)
                    .prop_map(Value::Array)
                    .boxed(),
            ),
        ),
    ]);
    let spec = object(vec![(
        "containers",
        sometimes(
            prop::collection::vec(sometimes(container), 0..3)
                .prop_map(Value::Array)
                .boxed(),
        ),
    )]);
    let metadata = object(vec![
        ("name", sometimes(text())),
        ("generateName", sometimes(text())),
        ("namespace", sometimes(text())),
        ("labels", labels.clone()),
        ("annotations", labels),
    ]);
    sometimes(object(vec![
        ("metadata", sometimes(metadata)),
        ("spec", sometimes(spec)),
    ]))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        // Beside this file, not in a directory at the top of the repository.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn reads_what_the_oracle_reads(pod in pod()) {
        let text = pod.to_string();
        match (PodView::parse(&text), oracle(&pod)) {
            (Ok(view), Some(want)) => prop_assert_eq!(seen(&view), want),
            (Err(e), None) => prop_assert_eq!(e.kind, json::ErrorKind::Shape, "{}", e),
            (got, want) => prop_assert!(false, "{}\nreader: {:?}\noracle: {:?}", text, got, want),
        }
    }
}

#[test]
fn the_last_of_duplicate_keys_wins() {
    let text = r#"{"metadata": {"labels": {"app": "web", "app": "istiod"}, "name": "a", "name": "b"},
                   "spec": {"containers": [{"name": "x"}]}, "spec": {"containers": [{"name": "y"}]}}"#;
    let pod = PodView::parse(text).unwrap();
    assert_eq!(pod.label("app"), Some("istiod"));
    assert_eq!(pod.display_name(), "b");
    assert_eq!(pod.containers()[0].name, "y");
    // serde_json's Value and Go's decoder read it the same way.
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(v["metadata"]["labels"]["app"], "istiod");
}

#[test]
fn shape_errors_name_the_field() {
    for (text, want) in [
        (r#"[]"#, "the Pod: expected an object, found an array"),
        (
            r#"{"metadata": []}"#,
            "metadata: expected an object, found an array",
        ),
        (
            r#"{"metadata": {"labels": {"app": 7}}}"#,
            r#"metadata.labels["app"]: expected a string, found a number"#,
        ),
        (
            r#"{"spec": {"containers": {}}}"#,
            "spec.containers: expected an array, found an object",
        ),
        (
            r#"{"spec": {"containers": [{"env": [1]}]}}"#,
            "spec.containers[].env[]: expected an object, found a number",
        ),
    ] {
        let e = PodView::parse(text).unwrap_err();
        assert_eq!(e.kind, json::ErrorKind::Shape, "{text}");
        assert!(e.to_string().starts_with(want), "{text}: {e}");
    }
}

#[test]
fn escaped_keys_and_values_are_decoded() {
    let pod =
        PodView::parse(r#"{"metadata": {"l\u0061bels": {"\u0061pp": "istio\u0064"}}}"#).unwrap();
    assert_eq!(pod.label("app"), Some("istiod"));
}
