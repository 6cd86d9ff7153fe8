//! The reader against serde_json: the same texts accepted, the same strings
//! decoded, for hand-picked edge cases and for generated and mutated texts.

use proptest::prelude::*;
use serde_json::Value;

use super::*;

/// Whether the reader accepts `text` as one JSON value.
fn accepts(text: &str) -> Result<()> {
    let mut r = Reader::new(text);
    r.skip()?;
    r.finish()
}

/// serde_json's verdict; `None` when it stopped at a number too large for
/// an f64, which JSON's grammar allows (RFC 8259 §6 leaves the range to
/// implementations) and which hides whatever follows.
fn serde_accepts(text: &str) -> Option<bool> {
    match serde_json::from_str::<Value>(text) {
        Ok(_) => Some(true),
        Err(e) if e.to_string().starts_with("number out of range") => None,
        Err(_) => Some(false),
    }
}

#[test]
fn agrees_with_serde_json_on_edge_cases() {
    let cases = [
        "",
        " ",
        "null",
        " true ",
        "false",
        "nul",
        "truex",
        "0",
        "-0",
        "01",
        "-",
        "1.",
        ".5",
        "1.5e",
        "1e+5",
        "1E-5",
        "-1.25e10",
        "1e400",
        "\"\"",
        "\"a\\\"b\"",
        "\"\\u00e9\"",
        "\"\\ud83d\\ude00\"",
        "\"\\ud83d\"",
        "\"\\ude00\"",
        "\"\\ud83dx\"",
        "\"\\ud83d\\u0041\"",
        "\"\\x\"",
        "\"\\u12\"",
        "\"\\u12G4\"",
        "\"a\nb\"",
        "\"tab\there\"",
        "\"unterminated",
        "\"é ✓ 😀\"",
        "[]",
        "[ ]",
        "[1,]",
        "[,1]",
        "[1 2]",
        "[1,[2,[3]]]",
        "{}",
        "{ }",
        "{\"a\":1}",
        "{\"a\" : 1 , \"b\" : [true, null]}",
        "{\"a\":1,}",
        "{\"a\"}",
        "{\"a\":}",
        "{1:2}",
        "{\"a\":1 \"b\":2}",
        "{\"a\":1,\"a\":2}",
        "[}",
        "{]",
        "[1]]",
        "{} {}",
        "[1] x",
        "\u{feff}[]",
        "[1]\n\t \r",
    ];
    for text in cases {
        assert_eq!(
            Some(accepts(text).is_ok()),
            serde_accepts(text).or(Some(true)),
            "{text:?}: reader says {:?}",
            accepts(text)
        );
    }
}

#[test]
fn nesting_is_bounded() {
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    assert!(accepts(&nested(MAX_DEPTH)).is_ok());
    for n in [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1] {
        assert_eq!(
            Some(accepts(&nested(n)).is_ok()),
            serde_accepts(&nested(n)),
            "{n}"
        );
    }
    let e = accepts(&nested(MAX_DEPTH + 1)).unwrap_err();
    assert!(e.message.contains("too deep"), "{e}");
    // Deep enough to overflow a recursive parser's stack: refused, no crash.
    assert!(accepts(&nested(1_000_000)).is_err());
    let objects = format!(
        "{}1{}",
        "{\"a\":".repeat(MAX_DEPTH + 1),
        "}".repeat(MAX_DEPTH + 1)
    );
    assert!(accepts(&objects).is_err());
    // The depth counts across the reader's own object() calls and skip().
    let mut r = Reader::new(&objects);
    let mut depth = 0;
    fn dive(r: &mut Reader<'_>, depth: &mut usize) -> Result<()> {
        r.object(|r, _| {
            *depth += 1;
            if r.peek()? == Kind::Object {
                dive(r, depth)
            } else {
                r.skip()
            }
        })
    }
    assert!(dive(&mut r, &mut depth).is_err());
    assert_eq!(depth, MAX_DEPTH);
}

#[test]
fn strings_decode_like_serde_json() {
    for text in [
        r#""plain""#,
        r#""esc \" \\ \/ \b \f \n \r \t""#,
        r#""\u0000 \u001f \u00e9 \u2713 \ud83d\ude00""#,
        r#""mixed é and \u00e9 and 😀""#,
        r#""a long string that crosses several eight-byte words \n then more text""#,
    ] {
        let mut r = Reader::new(text);
        let got = r.str().unwrap();
        let want: String = serde_json::from_str(text).unwrap();
        assert_eq!(got, want, "{text}");
        assert_eq!(
            matches!(got, Cow::Borrowed(_)),
            !text.contains('\\'),
            "{text}"
        );
    }
}

#[test]
fn errors_say_where() {
    let e = accepts("{\"a\": [1, 2,, 3]}").unwrap_err();
    assert_eq!((e.kind, e.offset), (ErrorKind::Syntax, 12));
    assert_eq!(e.to_string(), "expected a JSON value at byte 12");
    let e = accepts("[1, 2").unwrap_err();
    assert_eq!(e.to_string(), "unexpected end of input at byte 5");
    let mut r = Reader::new("{\"a\": {\"b\": 1}, \"c\": 2}");
    let e = r
        .object(|r, key| match &*key {
            "a" => r.opt_str("a").map(drop),
            _ => r.skip(),
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape);
    assert_eq!(
        e.to_string(),
        "a: expected a string, found an object at byte 6"
    );
}

/// Any JSON value, as serde_json would hold it.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[\"\\\\/a-z\u{0}-\u{1f}é😀]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(("[a-z\"\\\\]{0,6}", inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Beside this file, not in a directory at the top of the repository.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    /// Whatever serde_json writes, compact or pretty, reads back.
    #[test]
    fn reads_what_serde_json_writes(v in value()) {
        let compact = serde_json::to_string(&v).unwrap();
        prop_assert!(accepts(&compact).is_ok(), "{}: {:?}", compact, accepts(&compact));
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        prop_assert!(accepts(&pretty).is_ok(), "{}: {:?}", pretty, accepts(&pretty));
    }

    /// A JSON text with one byte inserted, removed or changed: the reader
    /// and serde_json agree on whether it is still JSON.
    #[test]
    fn agrees_with_serde_json_on_damaged_texts(
        v in value(),
        at in any::<prop::sample::Index>(),
        edit in 0u8..3,
        byte in prop::sample::select(&b"{}[],:\"\\0123456789.eE+-tfnul \n\x01\xc3\xa9"[..]),
    ) {
        let mut bytes = serde_json::to_vec(&v).unwrap();
        let i = at.index(bytes.len() + 1);
        match edit {
            0 => bytes.insert(i, byte),
            1 if i < bytes.len() => { bytes.remove(i); }
            _ if i < bytes.len() => bytes[i] = byte,
            _ => bytes.push(byte),
        }
        // Both take text; what is not UTF-8 is refused before either reads it.
        if let Ok(text) = std::str::from_utf8(&bytes)
            && let Some(serde) = serde_accepts(text)
        {
            prop_assert_eq!(accepts(text).is_ok(), serde, "{}", text);
        }
    }
}

#[test]
fn write_str_writes_what_serde_json_writes() {
    let mut strings: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
    strings.extend(
        [
            "",
            "0123456789abcdef\"0123456789abcdef\n",
            "tab\there é ü 日本 \u{10ffff} \u{7f}",
        ]
        .map(String::from),
    );
    for s in &strings {
        let mut out = Vec::new();
        write_str(&mut out, s);
        assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
    }
}
