//! The text log line: tracing-subscriber's default layout
//! (`2026-12-07T05:43:02.123456Z  INFO admission uid="…" outcome="patched" …`),
//! written with less work, since the webhook logs one line per admission.
//!
//! - [`Timestamp`] formats the date and time once a second and only the
//!   microseconds per line (the default timer formats all of it each time).
//! - [`Fields`] writes the fields with the default's layout and escapes
//!   without going through `nu_ansi_term` styles and `core::fmt` for plain
//!   strings, the common case. It escapes terminal control characters as
//!   the default does in the message, but in every field (the default writes
//!   `%` fields raw); string fields are quoted and escaped, so no value can
//!   forge a line.
//!
//! Both are plugged into the fmt subscriber through its own traits
//! (`FormatTime`, `FormatFields`); the tests compare their output with the
//! default's. Measured in the README, "Benchmarks".

use std::cell::RefCell;
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// RFC 3339 UTC with microseconds, as tracing-subscriber's `SystemTime`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timestamp;

thread_local! {
    /// The second last formatted on this thread, and its text up to the `.`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (secs, micros) = (now.as_secs(), now.subsec_micros());
        SECOND.with_borrow_mut(|(second, text)| {
            if *second != secs {
                text.clear();
                write_second(text, secs)?;
                *second = secs;
            }
            w.write_str(text)
        })?;
        let mut digits = [b'0'; 7];
        let mut rest = micros;
        for d in digits[..6].iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        digits[6] = b'Z';
        // ASCII digits and 'Z'.
        w.write_str(std::str::from_utf8(&digits).unwrap_or("000000Z"))
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` for a Unix second.
fn write_second(out: &mut String, secs: u64) -> fmt::Result {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Writes an event's fields as `message key=value …`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields;

impl<'w> FormatFields<'w> for Fields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            w: writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'w> {
    w: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// Writes the separator and `name=` (nothing for the message).
    fn key(&mut self, field: &Field) -> fmt::Result {
        if !self.first {
            self.w.write_char(' ')?;
        }
        self.first = false;
        let name = field.name();
        if name == "message" {
            return Ok(());
        }
        self.w.write_str(name.strip_prefix("r#").unwrap_or(name))?;
        self.w.write_char('=')
    }

    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(&mut self.w));
        }
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.field(field, |w| write_sanitized(w, value));
        }
        self.field(field, |w| {
            // What `{:?}` writes for a str, without `core::fmt` when nothing
            // needs escaping (printable ASCII but `"` and `\`).
            if value
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
            {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            } else {
                write!(w, "{value:?}")
            }
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The error and its causes, colon-separated, control characters escaped.
        self.field(field, |w| {
            write!(Sanitize(w), "{value}")?;
            let mut source = value.source();
            while let Some(cause) = source {
                write!(Sanitize(w), ": {cause}")?;
                source = cause.source();
            }
            Ok(())
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // Unlike the default, which escapes only the message, every value:
        // `%` fields carry request data (an error naming what was sent).
        self.field(field, |w| write!(Sanitize(w), "{value:?}"));
    }
}

/// A writer that passes text through [`write_sanitized`].
struct Sanitize<'a, 'w>(&'a mut Writer<'w>);

impl Write for Sanitize<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_sanitized(self.0, s)
    }
}

/// Writes `s` with the characters a terminal would act on escaped, as
/// tracing-subscriber does for messages (ESC, BEL, BS, FF, DEL and C1
/// controls), so a logged value cannot rewrite what an admin sees.
fn write_sanitized(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    let risky = |c: char| {
        matches!(
            c,
            '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
        )
    };
    if !s.contains(risky) {
        return w.write_str(s);
    }
    for c in s.chars() {
        match c {
            '\u{80}'..='\u{9f}' => write!(w, "\\u{{{:x}}}", c as u32)?,
            c if risky(c) => write!(w, "\\x{:02x}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[derive(Debug)]
    struct Cause;
    impl fmt::Display for Cause {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("root cause")
        }
    }
    impl std::error::Error for Cause {}

    fn events() {
        let uid = "b7c1-4f2e";
        let weird = "tab\there \"quoted\" back\\slash é \u{1b}[31m \u{85} 日本";
        tracing::info!(
            uid = %uid,
            namespace = "istio-system",
            pod = "istiod-abc-",
            profile = "istiod",
            outcome = "patched",
            dry_run = false,
            duration_us = 12u64,
            reason = "",
            "admission"
        );
        tracing::warn!(error = %weird, "admission: bad request");
        tracing::info!(plain = weird, signed = -3i64, r#type = "x", debug = ?Some(1), "a {} message", "formatted");
        tracing::info!("bell \u{7} in a message \u{1b}[0m");
    }

    /// Formats `events()` with the default formatter, and with ours.
    fn both() -> (String, String) {
        let default = Capture::default();
        let ours = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_target(false)
            .with_ansi(false)
            .with_writer(default.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        let subscriber = tracing_subscriber::fmt()
            .with_target(false)
            .with_ansi(false)
            .with_timer(Timestamp)
            .fmt_fields(Fields)
            .with_writer(ours.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        (default.text(), ours.text())
    }

    /// A line without its timestamp (the part up to the first space).
    fn untimed(line: &str) -> &str {
        line.split_once(' ').map_or(line, |(_, rest)| rest)
    }

    #[test]
    fn lines_are_the_default_formatters() {
        let (default, ours) = both();
        let mut default: Vec<&str> = default.lines().map(untimed).collect();
        let mut ours: Vec<&str> = ours.lines().map(untimed).collect();
        assert_eq!(ours.len(), 4, "{ours:#?}");
        // The one difference: a `%` field's ESC and C1 controls are escaped,
        // not written raw.
        let (escaped, raw) = (ours.remove(1), default.remove(1));
        assert_eq!(
            escaped,
            raw.replace('\u{1b}', r"\x1b").replace('\u{85}', r"\u{85}")
        );
        assert_eq!(ours, default);
        assert!(
            ours[0].starts_with(r#" INFO admission uid=b7c1-4f2e namespace="istio-system""#),
            "{}",
            ours[0]
        );
        // No raw escape character reaches the output.
        assert!(ours.iter().all(|l| !l.contains('\u{1b}')));
    }

    #[test]
    fn errors_name_their_causes_with_control_characters_escaped() {
        #[derive(Debug)]
        struct Outer(Cause);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer \u{1b}")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let ours = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(Fields)
            .with_writer(ours.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let e = Outer(Cause);
            tracing::warn!(error = &e as &(dyn std::error::Error + 'static), "failed");
        });
        assert!(
            ours.text().contains(r"failed error=outer \x1b: root cause"),
            "{}",
            ours.text()
        );
    }

    #[test]
    fn timestamps_are_rfc3339_micros_like_the_default() {
        let mut ours = String::new();
        Timestamp.format_time(&mut Writer::new(&mut ours)).unwrap();
        let mut default = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut default))
            .unwrap();
        assert_eq!(ours.len(), "2026-12-07T05:43:02.123456Z".len(), "{ours}");
        // Taken microseconds apart: the same up to the second (unless a
        // second ended in between, which the second comparison allows).
        assert!(
            ours[..20] == default[..20] || ours[..17] == default[..17],
            "{ours} vs {default}"
        );
        let shape: String = ours
            .chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect();
        assert_eq!(shape, "0000-00-00T00:00:00.000000Z");
        let known = {
            let mut s = String::new();
            write_second(&mut s, 1_796_622_182).unwrap();
            s
        };
        assert_eq!(known, "2026-12-07T05:43:02.");
    }
}
