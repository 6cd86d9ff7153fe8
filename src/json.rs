//! JSON both ways for the admission path: a validating pull reader that hands
//! out only what the caller asks for, and the writers the response is built
//! with.
//!
//! Why not serde_json for reading: an istiod AdmissionReview is ~10 KB, of
//! which the rules read well under 1 KB (labels, annotations, container names
//! and env). Skipping the rest through serde's derive machinery (every value
//! a visitor call, and `managedFields` alone is almost half of the Pod) was
//! most of the webhook's CPU per request (README, "Benchmarks"). This reader skips with one flat loop (no
//! recursion, 8 bytes at a time inside strings) and lends strings out of the
//! body instead of copying them.
//!
//! It is still a full validator (RFC 8259): every byte of the body is
//! checked, read or skipped, so anything serde_json refuses as a
//! `serde_json::Value` is refused here too, apart from numbers too large for
//! an f64, which JSON's grammar allows. Nesting deeper than [`MAX_DEPTH`]
//! is refused, like serde_json does, so hostile input cannot exhaust the
//! stack. Duplicate keys are the caller's business: the readers in this
//! crate let the last one win, as Go's encoding/json and
//! `serde_json::Value` do.
//!
//! The input is a `&str`, so UTF-8 is checked once, up front, by
//! `std::str::from_utf8` (fast on ASCII); positions the reader slices at are
//! always next to an ASCII byte and so on character boundaries.
//!
//! # Reading one more Pod field
//!
//! The Pod is read in `pod.rs`: [`Reader::object`] calls a closure per key,
//! and each closure either reads the value or [`Reader::skip`]s it. To make
//! the rules see, say, `metadata.ownerReferences` or `spec.serviceAccountName`:
//! 1. add the field to `pod::Meta` or `pod::PodView`, as a `Cow<'a, str>` (or
//!    `Option` of one) so it stays borrowed from the body;
//! 2. add a match arm in `read_meta` (or `PodView::read`'s `spec` closure)
//!    that reads it with `opt_str` / `opt_bool` / `opt_object` / `opt_array`,
//!    passing the field's dotted name, which a wrong type's error message
//!    carries; `null` reads as absent, as in Go;
//! 3. extend the serde_json comparison in `src/pod/tests.rs`, which checks the
//!    reader against serde_json on generated and damaged Pods.
//!
//! Everything not matched keeps being validated and skipped.
//!
//! # Writing
//!
//! [`write_str`] appends a string literal with exactly serde_json's escapes;
//! `patch::to_json` and `admission::response_body` build the response around
//! it, so the bytes are what serde_json would write (their tests compare).

use std::borrow::Cow;
use std::fmt;

/// Deepest nesting of arrays and objects accepted: what serde_json accepts
/// (it refuses the 128th level).
pub const MAX_DEPTH: usize = 127;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    /// Byte offset into the input where the problem was found.
    pub offset: usize,
    pub message: Cow<'static, str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not JSON at all.
    Syntax,
    /// Valid JSON, but a value has a type the caller cannot use. The reader
    /// has moved past that value, so the caller may carry on.
    Shape,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the inner loops return: just the message, two registers wide, so the
/// hot path does not move a full [`Error`] around. The position is the
/// reader's at the time; [`Reader::fail`] turns it into an [`Error`].
type Step<T = ()> = std::result::Result<T, &'static str>;

/// The type of the next value, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    pub fn article(self) -> &'static str {
        match self {
            Kind::Object => "an object",
            Kind::Array => "an array",
            Kind::String => "a string",
            Kind::Number => "a number",
            Kind::Bool => "a boolean",
            Kind::Null => "null",
        }
    }
}

/// A cursor over one JSON text. Cheap to copy: a copy is a bookmark that can
/// be read from again.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    text: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Reader<'a> {
    pub fn new(text: &'a str) -> Self {
        Reader {
            text,
            pos: 0,
            depth: 0,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn byte(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn syntax<T>(&self, message: &'static str) -> Result<T> {
        Err(self.fail(message))
    }

    /// A syntax error at the cursor (at the end of input, saying so).
    #[cold]
    fn fail(&self, message: &'static str) -> Error {
        let message = if self.pos >= self.bytes().len() {
            "unexpected end of input"
        } else {
            message
        };
        Error {
            kind: ErrorKind::Syntax,
            offset: self.pos,
            message: message.into(),
        }
    }

    #[inline(always)]
    fn ws(&mut self) {
        // Compact JSON (what the API server sends) has none: one test.
        while let Some(&b) = self.bytes().get(self.pos)
            && b <= b' '
            && matches!(b, b' ' | b'\n' | b'\r' | b'\t')
        {
            self.pos += 1;
        }
    }

    /// Consumes `b` (after whitespace) or fails with `message`.
    fn expect(&mut self, b: u8, message: &'static str) -> Result<()> {
        self.ws();
        if self.byte() != Some(b) {
            return self.syntax(message);
        }
        self.pos += 1;
        Ok(())
    }

    /// The type of the next value, without consuming it.
    pub fn peek(&mut self) -> Result<Kind> {
        self.ws();
        Ok(match self.byte() {
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::Array,
            Some(b'"') => Kind::String,
            Some(b'-' | b'0'..=b'9') => Kind::Number,
            Some(b't' | b'f') => Kind::Bool,
            Some(b'n') => Kind::Null,
            _ => return self.syntax("expected a JSON value"),
        })
    }

    /// Skips the next value, reporting a [`ErrorKind::Shape`] error that names
    /// what `field` should have been.
    pub fn wrong_type<T>(&mut self, field: &str, expected: &str) -> Result<T> {
        let found = self.peek()?;
        let at = self.pos;
        self.skip()?;
        Err(Error {
            kind: ErrorKind::Shape,
            offset: at,
            message: format!("{field}: expected {expected}, found {}", found.article()).into(),
        })
    }

    /// Consumes a `null` if that is what comes next.
    pub fn null(&mut self) -> Result<bool> {
        if self.peek()? == Kind::Null {
            self.word(b"null")?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A string, or `None` for null; any other value is a shape error.
    pub fn opt_str(&mut self, field: &str) -> Result<Option<Cow<'a, str>>> {
        match self.peek()? {
            Kind::String => self.str().map(Some),
            Kind::Null => self.word(b"null").map(|()| None),
            _ => self.wrong_type(field, "a string"),
        }
    }

    /// A boolean, or `None` for null; any other value is a shape error.
    pub fn opt_bool(&mut self, field: &str) -> Result<Option<bool>> {
        self.ws();
        match self.byte() {
            Some(b't') => self.word(b"true").map(|()| Some(true)),
            Some(b'f') => self.word(b"false").map(|()| Some(false)),
            Some(b'n') => self.word(b"null").map(|()| None),
            _ => self.wrong_type(field, "a boolean"),
        }
    }

    /// A string, borrowed from the input unless it has escapes.
    pub fn str(&mut self) -> Result<Cow<'a, str>> {
        self.expect(b'"', "expected a string")?;
        let start = self.pos;
        let end = self.plain_run(start);
        if self.bytes().get(end) == Some(&b'"') {
            self.pos = end + 1;
            return Ok(Cow::Borrowed(self.slice(start, end)));
        }
        self.pos = end;
        let mut owned = String::with_capacity(end - start + 16);
        owned.push_str(self.slice(start, end));
        loop {
            match self.byte() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Owned(owned));
                }
                Some(b'\\') => owned.push(self.escape().map_err(|m| self.fail(m))?),
                _ => return self.syntax("control character in string"),
            }
            let run = self.pos;
            self.pos = self.plain_run(run);
            owned.push_str(self.slice(run, self.pos));
        }
    }

    /// `text[start..end]`; both ends sit next to ASCII bytes, so this never
    /// splits a character (and an impossible miss reads as empty).
    fn slice(&self, start: usize, end: usize) -> &'a str {
        self.text.get(start..end).unwrap_or("")
    }

    /// End of the run of string bytes at `i` that need no attention: the
    /// index of the first `"`, `\` or control byte (or the end of input).
    fn plain_run(&self, mut i: usize) -> usize {
        let bytes = self.bytes();
        while let Some(chunk) = bytes.get(i..).and_then(<[u8]>::first_chunk::<8>) {
            let mask = special(u64::from_le_bytes(*chunk));
            if mask != 0 {
                return i + (mask.trailing_zeros() / 8) as usize;
            }
            i += 8;
        }
        while let Some(&b) = bytes.get(i) {
            if b == b'"' || b == b'\\' || b < 0x20 {
                break;
            }
            i += 1;
        }
        i
    }

    /// Reads the escape at the cursor (a backslash) as a character.
    fn escape(&mut self) -> Step<char> {
        self.pos += 1;
        let c = match self.byte() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.pos += 1;
                let unit = self.hex4()?;
                let scalar = match unit {
                    0xD800..=0xDBFF => {
                        // A high surrogate must be followed by a low one.
                        if self.bytes().get(self.pos..self.pos + 2) != Some(b"\\u") {
                            return Err("lone leading surrogate in \\u escape");
                        }
                        self.pos += 2;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err("lone leading surrogate in \\u escape");
                        }
                        0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err("lone trailing surrogate in \\u escape"),
                    _ => u32::from(unit),
                };
                return char::from_u32(scalar).ok_or("invalid \\u escape");
            }
            _ => return Err("invalid escape in string"),
        };
        self.pos += 1;
        Ok(c)
    }

    fn hex4(&mut self) -> Step<u16> {
        let Some(digits) = self.bytes().get(self.pos..self.pos + 4) else {
            return Err("truncated \\u escape");
        };
        let mut unit = 0u16;
        for &d in digits {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err("invalid hex digit in \\u escape"),
            };
            unit = unit << 4 | u16::from(v);
        }
        self.pos += 4;
        Ok(unit)
    }

    /// Skips a string (cursor on its opening quote), checking its escapes.
    #[inline(always)]
    fn skip_str(&mut self) -> Step {
        self.pos += 1;
        loop {
            self.pos = self.plain_run(self.pos);
            match self.byte() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                // One-letter escapes inline (managedFields keys are full of
                // `\"`); `\u` goes through `escape`, which checks surrogates.
                Some(b'\\') => match self.bytes().get(self.pos + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 2,
                    _ => {
                        self.escape()?;
                    }
                },
                _ => return Err("control character in string"),
            }
        }
    }

    /// `literal` for the public readers.
    fn word(&mut self, word: &'static [u8]) -> Result<()> {
        self.literal(word).map_err(|m| self.fail(m))
    }

    fn literal(&mut self, word: &'static [u8]) -> Step {
        if self.bytes().get(self.pos..self.pos + word.len()) != Some(word) {
            return Err("invalid literal");
        }
        self.pos += word.len();
        Ok(())
    }

    fn digits(&mut self) -> Step {
        if !matches!(self.byte(), Some(b'0'..=b'9')) {
            return Err("invalid number");
        }
        while let Some(b'0'..=b'9') = self.byte() {
            self.pos += 1;
        }
        Ok(())
    }

    /// Skips a number, checking RFC 8259's grammar (no leading zeros, digits
    /// after `.` and `e`).
    fn skip_number(&mut self) -> Step {
        if self.byte() == Some(b'-') {
            self.pos += 1;
        }
        match self.byte() {
            Some(b'0') => self.pos += 1,
            _ => self.digits()?,
        }
        if self.byte() == Some(b'.') {
            self.pos += 1;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.byte() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.byte() {
                self.pos += 1;
            }
            self.digits()?;
        }
        Ok(())
    }

    /// Skips a scalar value (cursor on its first byte).
    #[inline(always)]
    fn skip_scalar(&mut self) -> Step {
        match self.byte() {
            Some(b'"') => self.skip_str(),
            Some(b'-' | b'0'..=b'9') => self.skip_number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            _ => Err("expected a JSON value"),
        }
    }

    /// Skips `"key":` inside an object.
    #[inline(always)]
    fn skip_key(&mut self) -> Step {
        self.ws();
        if self.byte() != Some(b'"') {
            return Err("expected a string key");
        }
        self.skip_str()?;
        self.ws();
        if self.byte() != Some(b':') {
            return Err("expected ':' after an object key");
        }
        self.pos += 1;
        Ok(())
    }

    /// One level deeper into arrays and objects, up to [`MAX_DEPTH`].
    fn enter(&mut self) -> Step {
        if self.depth >= MAX_DEPTH {
            return Err("nesting too deep");
        }
        self.depth += 1;
        Ok(())
    }

    /// Skips one value of any type, checking it is valid JSON.
    pub fn skip(&mut self) -> Result<()> {
        // On a copy that lives in registers: through `&mut self` every step
        // would store the position back to the caller's memory.
        let mut r = *self;
        let result = r.skip_value();
        *self = r;
        result.map_err(|m| self.fail(m))
    }

    /// One loop with a bit stack (1 = inside an object) instead of
    /// recursion; the string, key and scalar steps are inlined into it.
    fn skip_value(&mut self) -> Step {
        let base = self.depth;
        let mut objects: u128 = 0;
        loop {
            // A value is expected here.
            self.ws();
            match self.byte() {
                // `{}` and `[]` are common (managedFields is mostly `"f:x":{}`);
                // they still count as a level of nesting. (`}` and `]` are two
                // code points after `{` and `[`.)
                Some(open @ (b'{' | b'['))
                    if self.depth < MAX_DEPTH
                        && self.bytes().get(self.pos + 1) == Some(&(open + 2)) =>
                {
                    self.pos += 2;
                }
                Some(open @ (b'{' | b'[')) => {
                    self.enter()?;
                    self.pos += 1;
                    let is_object = open == b'{';
                    objects = objects << 1 | u128::from(is_object);
                    self.ws();
                    let close = if is_object { b'}' } else { b']' };
                    if self.byte() != Some(close) {
                        if is_object {
                            self.skip_key()?;
                        }
                        continue;
                    }
                    // Empty: fall through to "after a value" as if closed.
                    self.pos += 1;
                    self.depth -= 1;
                    objects >>= 1;
                }
                _ => self.skip_scalar()?,
            }
            // After a value: a separator, or closers, or done.
            loop {
                if self.depth == base {
                    return Ok(());
                }
                self.ws();
                let in_object = objects & 1 == 1;
                match self.byte() {
                    Some(b',') => {
                        self.pos += 1;
                        if in_object {
                            self.skip_key()?;
                        }
                        break;
                    }
                    Some(b'}') if in_object => {}
                    Some(b']') if !in_object => {}
                    _ if in_object => return Err("expected ',' or '}' in an object"),
                    _ => return Err("expected ',' or ']' in an array"),
                }
                self.pos += 1;
                self.depth -= 1;
                objects >>= 1;
            }
        }
    }

    /// Reads an object, calling `field` with each key; `field` must consume
    /// exactly one value (read it or [`Reader::skip`] it).
    pub fn object(
        &mut self,
        mut field: impl FnMut(&mut Self, Cow<'a, str>) -> Result<()>,
    ) -> Result<()> {
        self.expect(b'{', "expected an object")?;
        self.enter().map_err(|m| self.fail(m))?;
        self.ws();
        if self.byte() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            let key = self.str()?;
            self.expect(b':', "expected ':' after an object key")?;
            field(self, key)?;
            self.ws();
            match self.byte() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.syntax("expected ',' or '}' in an object"),
            }
        }
    }

    /// Reads an array, calling `item` for each element; `item` must consume
    /// exactly one value.
    pub fn array(&mut self, mut item: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.expect(b'[', "expected an array")?;
        self.enter().map_err(|m| self.fail(m))?;
        self.ws();
        if self.byte() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            item(self)?;
            self.ws();
            match self.byte() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.syntax("expected ',' or ']' in an array"),
            }
        }
    }

    /// An object or null: calls `field` for each key of an object and
    /// returns whether there was one; any other value is a shape error.
    pub fn opt_object(
        &mut self,
        name: &str,
        field: impl FnMut(&mut Self, Cow<'a, str>) -> Result<()>,
    ) -> Result<bool> {
        match self.peek()? {
            Kind::Object => self.object(field).map(|()| true),
            Kind::Null => self.word(b"null").map(|()| false),
            _ => self.wrong_type(name, "an object"),
        }
    }

    /// An array or null: calls `item` for each element of an array and
    /// returns whether there was one; any other value is a shape error.
    pub fn opt_array(
        &mut self,
        name: &str,
        item: impl FnMut(&mut Self) -> Result<()>,
    ) -> Result<bool> {
        match self.peek()? {
            Kind::Array => self.array(item).map(|()| true),
            Kind::Null => self.word(b"null").map(|()| false),
            _ => self.wrong_type(name, "an array"),
        }
    }

    /// Checks that nothing but whitespace follows.
    pub fn finish(&mut self) -> Result<()> {
        self.ws();
        if self.pos != self.bytes().len() {
            return self.syntax("trailing characters after the JSON value");
        }
        Ok(())
    }
}

/// Appends `s` as a JSON string literal with serde_json's escapes (`\"`,
/// `\\`, `\b \f \n \r \t`, other control characters as `\u00xx`).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0; // first byte not yet copied
    let mut i = 0;
    while i < bytes.len() {
        // Skip 8 plain bytes at a time.
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            let mask = special(word);
            if mask == 0 {
                i += 8;
                continue;
            }
            i += (mask.trailing_zeros() / 8) as usize;
        }
        let b = bytes[i];
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// High bit set in the first byte of `chunk` (little-endian) that is a `"`,
/// a `\` or a control character (< 0x20); bits above it may be false
/// positives, so only the lowest set bit means anything. Eight bytes per
/// step is what makes long strings cheap to skip and to escape.
fn special(chunk: u64) -> u64 {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES << 7;
    let quote = chunk ^ (ONES * u64::from(b'"'));
    let backslash = chunk ^ (ONES * u64::from(b'\\'));
    let control = chunk.wrapping_sub(ONES * 0x20) & !chunk;
    let quote = quote.wrapping_sub(ONES) & !quote;
    let backslash = backslash.wrapping_sub(ONES) & !backslash;
    (control | quote | backslash) & HIGH
}

#[cfg(test)]
mod tests;
