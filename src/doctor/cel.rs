//! A deliberately small CEL evaluator: the subset admission `matchConditions` over Pod labels
//! are written in (the shipped one and the usual extensions of it). Anything outside the subset
//! is an [`Error::Unsupported`], which `doctor` reports as "cannot evaluate" instead of guessing.
//!
//! Supported: string, integer, bool and null literals; list literals; the variable `object`;
//! field selection `a.b`; indexing `a['k']` / `a[0]`; `has(a.b.c)`; `in` (list membership, map
//! key); `==`, `!=`; `!`, `&&`, `||` (with CEL's error absorption: `false && error` is `false`,
//! `true || error` is `true`); parentheses.
//!
//! Why not a CEL crate: the `cel` / `cel-interpreter` crates pull in a generated parser and
//! many dependencies for what is here a few label lookups, and a subset that says clearly what
//! it does not understand is more honest for a diagnostic than a full evaluator without the
//! Kubernetes CEL libraries.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The expression uses CEL this evaluator does not implement.
    Unsupported(String),
    /// CEL would fail at run time (e.g. a missing key): the API server then applies the
    /// webhook's failurePolicy.
    Runtime(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unsupported(s) => write!(f, "not evaluated (CEL beyond what doctor reads: {s})"),
            Error::Runtime(s) => write!(f, "evaluation error: {s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Str(String),
    Int(i64),
    Ident(String),
    Punct(&'static str),
}

fn tokenize(src: &str) -> Result<Vec<Token>, Error> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '\'' || c == '"' {
            let quote = c;
            i += 1;
            let mut s = String::new();
            loop {
                let Some(&c) = chars.get(i) else {
                    return Err(Error::Unsupported("unterminated string".into()));
                };
                i += 1;
                if c == quote {
                    break;
                }
                if c == '\\' {
                    let Some(&e) = chars.get(i) else {
                        return Err(Error::Unsupported("unterminated string".into()));
                    };
                    i += 1;
                    s.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        '\\' | '\'' | '"' => e,
                        other => {
                            return Err(Error::Unsupported(format!("string escape \\{other}")));
                        }
                    });
                } else {
                    s.push(c);
                }
            }
            out.push(Token::Str(s));
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while chars.get(i).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let n = text
                .parse()
                .map_err(|_| Error::Unsupported(format!("number {text}")))?;
            out.push(Token::Int(n));
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while chars
                .get(i)
                .is_some_and(|c| c.is_alphanumeric() || *c == '_')
            {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
            continue;
        }
        let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let punct = match two.as_str() {
            "&&" => Some("&&"),
            "||" => Some("||"),
            "==" => Some("=="),
            "!=" => Some("!="),
            _ => None,
        };
        if let Some(p) = punct {
            out.push(Token::Punct(p));
            i += 2;
            continue;
        }
        let one = match c {
            '!' => "!",
            '(' => "(",
            ')' => ")",
            '[' => "[",
            ']' => "]",
            '.' => ".",
            ',' => ",",
            other => return Err(Error::Unsupported(format!("operator {other:?}"))),
        };
        out.push(Token::Punct(one));
        i += 1;
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Expr {
    Lit(Value),
    List(Vec<Expr>),
    Var(String),
    Select(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Has(Box<Expr>, String),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Eq(Box<Expr>, Box<Expr>, bool),
    In(Box<Expr>, Box<Expr>),
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, p: &str) -> bool {
        if matches!(self.peek(), Some(Token::Punct(q)) if *q == p) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, p: &str) -> Result<(), Error> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "expected {p:?} at token {}",
                self.pos
            )))
        }
    }

    fn or(&mut self) -> Result<Expr, Error> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, Error> {
        let mut left = self.relation()?;
        while self.eat("&&") {
            left = Expr::And(Box::new(left), Box::new(self.relation()?));
        }
        Ok(left)
    }

    fn relation(&mut self) -> Result<Expr, Error> {
        let left = self.unary()?;
        if self.eat("==") {
            return Ok(Expr::Eq(Box::new(left), Box::new(self.unary()?), true));
        }
        if self.eat("!=") {
            return Ok(Expr::Eq(Box::new(left), Box::new(self.unary()?), false));
        }
        if matches!(self.peek(), Some(Token::Ident(s)) if s == "in") {
            self.pos += 1;
            return Ok(Expr::In(Box::new(left), Box::new(self.unary()?)));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, Error> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Expr, Error> {
        let mut e = self.primary()?;
        loop {
            if self.eat(".") {
                match self.tokens.get(self.pos).cloned() {
                    Some(Token::Ident(name)) => {
                        self.pos += 1;
                        if matches!(self.peek(), Some(Token::Punct("("))) {
                            return Err(Error::Unsupported(format!("method .{name}()")));
                        }
                        e = Expr::Select(Box::new(e), name);
                    }
                    _ => return Err(Error::Unsupported("'.' not followed by a name".into())),
                }
            } else if self.eat("[") {
                let index = self.or()?;
                self.expect("]")?;
                e = Expr::Index(Box::new(e), Box::new(index));
            } else {
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, Error> {
        let Some(token) = self.tokens.get(self.pos).cloned() else {
            return Err(Error::Unsupported("unexpected end".into()));
        };
        self.pos += 1;
        match token {
            Token::Str(s) => Ok(Expr::Lit(Value::String(s))),
            Token::Int(n) => Ok(Expr::Lit(Value::from(n))),
            Token::Punct("(") => {
                let e = self.or()?;
                self.expect(")")?;
                Ok(e)
            }
            Token::Punct("[") => {
                let mut items = Vec::new();
                if !self.eat("]") {
                    loop {
                        items.push(self.or()?);
                        if self.eat("]") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                Ok(Expr::List(items))
            }
            Token::Ident(name) => match name.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                "has" => {
                    self.expect("(")?;
                    let inner = self.postfix()?;
                    self.expect(")")?;
                    match inner {
                        Expr::Select(target, field) => Ok(Expr::Has(target, field)),
                        _ => Err(Error::Unsupported("has() of something not a field".into())),
                    }
                }
                _ if matches!(self.peek(), Some(Token::Punct("("))) => {
                    Err(Error::Unsupported(format!("function {name}()")))
                }
                _ => Ok(Expr::Var(name)),
            },
            Token::Punct(p) => Err(Error::Unsupported(format!("unexpected {p:?}"))),
        }
    }
}

fn parse(src: &str) -> Result<Expr, Error> {
    let mut p = Parser {
        tokens: tokenize(src)?,
        pos: 0,
    };
    let e = p.or()?;
    if p.pos != p.tokens.len() {
        return Err(Error::Unsupported(format!(
            "unexpected token at {} of {}",
            p.pos,
            p.tokens.len()
        )));
    }
    Ok(e)
}

fn eval(e: &Expr, object: &Value) -> Result<Value, Error> {
    match e {
        Expr::Lit(v) => Ok(v.clone()),
        Expr::List(items) => Ok(Value::Array(
            items
                .iter()
                .map(|i| eval(i, object))
                .collect::<Result<_, _>>()?,
        )),
        Expr::Var(name) if name == "object" => Ok(object.clone()),
        Expr::Var(name) => Err(Error::Unsupported(format!("variable {name}"))),
        Expr::Select(target, field) => match eval(target, object)? {
            Value::Object(map) => map
                .get(field)
                .cloned()
                .ok_or_else(|| Error::Runtime(format!("no such key: {field}"))),
            other => Err(Error::Runtime(format!("select .{field} on {other}"))),
        },
        Expr::Has(target, field) => match eval(target, object)? {
            Value::Object(map) => Ok(Value::Bool(map.get(field).is_some_and(|v| !v.is_null()))),
            other => Err(Error::Runtime(format!("has(.{field}) on {other}"))),
        },
        Expr::Index(target, index) => {
            let target = eval(target, object)?;
            let index = eval(index, object)?;
            match (&target, &index) {
                (Value::Object(map), Value::String(k)) => map
                    .get(k)
                    .cloned()
                    .ok_or_else(|| Error::Runtime(format!("no such key: {k}"))),
                (Value::Array(items), Value::Number(n)) => n
                    .as_u64()
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| items.get(i).cloned())
                    .ok_or_else(|| Error::Runtime(format!("index {n} out of range"))),
                _ => Err(Error::Runtime(format!("{target}[{index}]"))),
            }
        }
        Expr::Not(inner) => Ok(Value::Bool(!boolean(&eval(inner, object)?)?)),
        Expr::And(a, b) => {
            let a = eval(a, object).and_then(|v| boolean(&v));
            if a == Ok(false) {
                return Ok(Value::Bool(false));
            }
            let b = eval(b, object).and_then(|v| boolean(&v));
            match (a, b) {
                (_, Ok(false)) => Ok(Value::Bool(false)),
                (Ok(true), Ok(true)) => Ok(Value::Bool(true)),
                (Err(e), _) | (_, Err(e)) => Err(e),
                _ => Ok(Value::Bool(false)),
            }
        }
        Expr::Or(a, b) => {
            let a = eval(a, object).and_then(|v| boolean(&v));
            if a == Ok(true) {
                return Ok(Value::Bool(true));
            }
            let b = eval(b, object).and_then(|v| boolean(&v));
            match (a, b) {
                (_, Ok(true)) => Ok(Value::Bool(true)),
                (Ok(false), Ok(false)) => Ok(Value::Bool(false)),
                (Err(e), _) | (_, Err(e)) => Err(e),
                _ => Ok(Value::Bool(false)),
            }
        }
        Expr::Eq(a, b, equal) => {
            let same = eval(a, object)? == eval(b, object)?;
            Ok(Value::Bool(same == *equal))
        }
        Expr::In(item, container) => {
            let item = eval(item, object)?;
            match eval(container, object)? {
                Value::Array(items) => Ok(Value::Bool(items.contains(&item))),
                Value::Object(map) => match &item {
                    Value::String(k) => Ok(Value::Bool(map.contains_key(k))),
                    other => Err(Error::Runtime(format!("{other} in map"))),
                },
                other => Err(Error::Runtime(format!("in {other}"))),
            }
        }
    }
}

fn boolean(v: &Value) -> Result<bool, Error> {
    v.as_bool()
        .ok_or_else(|| Error::Runtime(format!("{v} is not a bool")))
}

/// Evaluates a boolean expression with `object` bound to the given object.
pub fn evaluate(expression: &str, object: &Value) -> Result<bool, Error> {
    boolean(&eval(&parse(expression)?, object)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHIPPED: &str = "has(object.metadata.labels) &&
          (('app' in object.metadata.labels && object.metadata.labels['app'] == 'istiod') ||
          ('istio' in object.metadata.labels &&
          object.metadata.labels['istio'] in ['ingressgateway', 'egressgateway']))";

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"labels": labels}})
    }

    #[test]
    fn shipped_expression() {
        assert_eq!(evaluate(SHIPPED, &pod(json!({"app": "istiod"}))), Ok(true));
        assert_eq!(
            evaluate(SHIPPED, &pod(json!({"istio": "ingressgateway"}))),
            Ok(true)
        );
        assert_eq!(
            evaluate(SHIPPED, &pod(json!({"istio": "eastwestgateway"}))),
            Ok(false)
        );
        assert_eq!(evaluate(SHIPPED, &pod(json!({"app": "web"}))), Ok(false));
        assert_eq!(evaluate(SHIPPED, &json!({"metadata": {}})), Ok(false));
    }

    #[test]
    fn error_absorption_and_errors() {
        let o = pod(json!({}));
        assert_eq!(
            evaluate("false && object.metadata.labels['x'] == 'y'", &o),
            Ok(false)
        );
        assert!(matches!(
            evaluate("object.metadata.labels['x'] == 'y'", &o),
            Err(Error::Runtime(_))
        ));
        assert!(matches!(
            evaluate("object.metadata.labels.exists(k, k == 'a')", &o),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            evaluate("size(object.metadata.labels) > 0", &o),
            Err(Error::Unsupported(_))
        ));
        assert_eq!(evaluate("!('a' in object.metadata.labels)", &o), Ok(true));
        assert_eq!(evaluate("[1, 2][1] == 2", &o), Ok(true));
    }
}
