//! Audience expressions: a subset of CEL (the Common Expression Language known
//! from Kubernetes). This file is the lexer and parser: text → [`Ast`] with the
//! character offset of every node, so type errors can point inside the string.
//!
//! Grammar (lowest precedence first):
//! ```text
//! expr    = or ("?" expr ":" expr)?
//! or      = and ("||" and)*
//! and     = rel ("&&" rel)*
//! rel     = add (("=="|"!="|"<"|"<="|">"|">="|"in") add)?
//! add     = mul (("+"|"-") mul)*
//! mul     = unary (("*"|"/"|"%") unary)*
//! unary   = ("!"|"-") unary | member
//! member  = primary ("." IDENT ( "(" args ")" )? | "[" expr "]")*
//! primary = literal | IDENT | IDENT "(" args ")" | "(" expr ")" | "[" args "]"
//! ```

use std::fmt;

/// Longest expression accepted, in bytes.
pub const MAX_LEN: usize = 8 * 1024;
/// Deepest nesting accepted; deeper input is an error, never a stack overflow.
pub const MAX_DEPTH: usize = 48;

#[derive(Debug, Clone, PartialEq)]
pub struct Ast {
    pub kind: AstKind,
    /// Character offset of the node's first character in the expression.
    pub offset: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AstKind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Ast>),
    Ident(String),
    /// `target.field`
    Select(Box<Ast>, String),
    /// `name(args)` or `target.name(args)`
    Call {
        target: Option<Box<Ast>>,
        name: String,
        args: Vec<Ast>,
    },
    Index(Box<Ast>, Box<Ast>),
    Unary(UnaryOp, Box<Ast>),
    Binary(BinaryOp, Box<Ast>, Box<Ast>),
    Cond(Box<Ast>, Box<Ast>, Box<Ast>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Not,
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl fmt::Display for BinaryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BinaryOp::Or => "||",
            BinaryOp::And => "&&",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::In => "in",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Rem => "%",
        })
    }
}

/// A syntax error at a character offset.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
    pub hint: Option<String>,
}

fn err(offset: usize, message: impl Into<String>) -> ParseError {
    ParseError { offset, message: message.into(), hint: None }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Int(i64),
    Float(f64),
    Str(String),
    Ident(String),
    Punct(&'static str),
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Int(i) => write!(f, "`{i}`"),
            Tok::Float(x) => write!(f, "`{x}`"),
            Tok::Str(s) => write!(f, "\"{s}\""),
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Punct(p) => write!(f, "`{p}`"),
            Tok::End => f.write_str("the end of the expression"),
        }
    }
}

const PUNCTS: &[&str] = &[
    "||", "&&", "==", "!=", "<=", ">=", "<", ">", "!", "+", "-", "*", "/", "%", "(", ")", "[", "]", ",", ".", "?", ":",
];

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_') {
                // `1.e3` style exponents with a sign.
                if matches!(chars[i], 'e' | 'E') && matches!(chars.get(i + 1), Some('+' | '-')) {
                    i += 1;
                }
                i += 1;
            }
            let text: String = chars[start..i].iter().filter(|c| **c != '_').collect();
            let tok = if let Some(hex) = text.strip_prefix("0x") {
                i64::from_str_radix(hex, 16).map(Tok::Int).map_err(|_| err(start, format!("bad number `{text}`")))?
            } else if text.contains(['.', 'e', 'E']) {
                text.parse::<f64>().map(Tok::Float).map_err(|_| err(start, format!("bad number `{text}`")))?
            } else {
                text.parse::<i64>().map(Tok::Int).map_err(|_| err(start, format!("bad number `{text}`")))?
            };
            out.push((tok, start));
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), start));
            continue;
        }
        if c == '"' || c == '\'' {
            i += 1;
            let mut s = String::new();
            loop {
                let Some(&ch) = chars.get(i) else {
                    return Err(err(start, "string is never closed").with_hint(format!("add the closing {c}")));
                };
                i += 1;
                if ch == c {
                    break;
                }
                if ch == '\\' {
                    let Some(&esc) = chars.get(i) else { continue };
                    i += 1;
                    s.push(match esc {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '\\' | '"' | '\'' => esc,
                        other => return Err(err(i - 2, format!("unknown escape `\\{other}`"))),
                    });
                } else {
                    s.push(ch);
                }
            }
            out.push((Tok::Str(s), start));
            continue;
        }
        let rest: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        if let Some(p) = PUNCTS.iter().find(|p| rest.starts_with(**p)) {
            i += p.chars().count();
            out.push((Tok::Punct(p), start));
            continue;
        }
        let hint = match c {
            '=' => Some("use `==` to compare"),
            '&' => Some("use `&&` for and"),
            '|' => Some("use `||` for or"),
            _ => None,
        };
        let mut e = err(start, format!("unexpected character `{c}`"));
        e.hint = hint.map(str::to_owned);
        return Err(e);
    }
    out.push((Tok::End, chars.len()));
    Ok(out)
}

impl ParseError {
    fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

/// Parses an expression.
pub fn parse(src: &str) -> Result<Ast, ParseError> {
    if src.len() > MAX_LEN {
        return Err(err(0, format!("expression is longer than {MAX_LEN} bytes")));
    }
    if src.trim().is_empty() {
        return Err(err(0, "the expression is empty").with_hint("write a rule such as `lifetime_value >= 1000`"));
    }
    let mut p = Parser { toks: lex(src)?, pos: 0, depth: 0 };
    let ast = p.expr()?;
    match p.peek() {
        Tok::End => Ok(ast),
        Tok::Punct("=") => Err(err(p.offset(), "unexpected `=`").with_hint("use `==` to compare")),
        t => {
            let t = t.clone();
            Err(err(p.offset(), format!("unexpected {t} after a complete expression"))
                .with_hint("join conditions with `&&` or `||`"))
        }
    }
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos.min(self.toks.len() - 1)].0
    }

    fn offset(&self) -> usize {
        self.toks[self.pos.min(self.toks.len() - 1)].1
    }

    fn bump(&mut self) -> (Tok, usize) {
        let t = self.toks[self.pos.min(self.toks.len() - 1)].clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn eat(&mut self, p: &str) -> bool {
        if matches!(self.peek(), Tok::Punct(q) if *q == p) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, p: &str) -> Result<(), ParseError> {
        if self.eat(p) {
            Ok(())
        } else {
            let t = self.peek().clone();
            Err(err(self.offset(), format!("expected `{p}`, found {t}")))
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(err(self.offset(), format!("expression nests deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn expr(&mut self) -> Result<Ast, ParseError> {
        self.enter()?;
        let cond = self.or()?;
        let out = if self.eat("?") {
            let a = self.expr()?;
            self.expect(":")?;
            let b = self.expr()?;
            let offset = cond.offset;
            Ast { kind: AstKind::Cond(Box::new(cond), Box::new(a), Box::new(b)), offset }
        } else {
            cond
        };
        self.depth -= 1;
        Ok(out)
    }

    fn binary_chain(
        &mut self,
        ops: &[(&str, BinaryOp)],
        next: fn(&mut Self) -> Result<Ast, ParseError>,
        once: bool,
    ) -> Result<Ast, ParseError> {
        let mut lhs = next(self)?;
        loop {
            let op = match self.peek() {
                Tok::Punct(p) => ops.iter().find(|(s, _)| s == p).map(|(_, op)| *op),
                Tok::Ident(id) if id == "in" => ops.iter().find(|(s, _)| *s == "in").map(|(_, op)| *op),
                _ => None,
            };
            let Some(op) = op else { return Ok(lhs) };
            self.pos += 1;
            let rhs = next(self)?;
            let offset = lhs.offset;
            lhs = Ast { kind: AstKind::Binary(op, Box::new(lhs), Box::new(rhs)), offset };
            if once {
                if let Tok::Punct(p) = self.peek()
                    && ops.iter().any(|(s, _)| s == p)
                {
                    return Err(err(self.offset(), "comparisons cannot be chained").with_hint("write `a < b && b < c`"));
                }
                return Ok(lhs);
            }
        }
    }

    fn or(&mut self) -> Result<Ast, ParseError> {
        self.binary_chain(&[("||", BinaryOp::Or)], Self::and, false)
    }

    fn and(&mut self) -> Result<Ast, ParseError> {
        self.binary_chain(&[("&&", BinaryOp::And)], Self::rel, false)
    }

    fn rel(&mut self) -> Result<Ast, ParseError> {
        self.binary_chain(
            &[
                ("==", BinaryOp::Eq),
                ("!=", BinaryOp::Ne),
                ("<=", BinaryOp::Le),
                (">=", BinaryOp::Ge),
                ("<", BinaryOp::Lt),
                (">", BinaryOp::Gt),
                ("in", BinaryOp::In),
            ],
            Self::add,
            true,
        )
    }

    fn add(&mut self) -> Result<Ast, ParseError> {
        self.binary_chain(&[("+", BinaryOp::Add), ("-", BinaryOp::Sub)], Self::mul, false)
    }

    fn mul(&mut self) -> Result<Ast, ParseError> {
        self.binary_chain(&[("*", BinaryOp::Mul), ("/", BinaryOp::Div), ("%", BinaryOp::Rem)], Self::unary, false)
    }

    fn unary(&mut self) -> Result<Ast, ParseError> {
        let offset = self.offset();
        let op = if self.eat("!") {
            UnaryOp::Not
        } else if self.eat("-") {
            UnaryOp::Neg
        } else {
            return self.member();
        };
        self.enter()?;
        let inner = self.unary()?;
        self.depth -= 1;
        // Fold negative literals so `-5` is one constant.
        let kind = match (op, inner.kind) {
            (UnaryOp::Neg, AstKind::Int(i)) => AstKind::Int(-i),
            (UnaryOp::Neg, AstKind::Float(x)) => AstKind::Float(-x),
            (op, kind) => AstKind::Unary(op, Box::new(Ast { kind, offset: inner.offset })),
        };
        Ok(Ast { kind, offset })
    }

    fn member(&mut self) -> Result<Ast, ParseError> {
        let mut node = self.primary()?;
        loop {
            if self.eat(".") {
                let (tok, at) = self.bump();
                let Tok::Ident(name) = tok else {
                    return Err(err(at, format!("expected a name after `.`, found {tok}")));
                };
                if self.eat("(") {
                    let args = self.args(")")?;
                    let offset = node.offset;
                    node = Ast { kind: AstKind::Call { target: Some(Box::new(node)), name, args }, offset };
                } else {
                    let offset = node.offset;
                    node = Ast { kind: AstKind::Select(Box::new(node), name), offset };
                }
            } else if self.eat("[") {
                let idx = self.expr()?;
                self.expect("]")?;
                let offset = node.offset;
                node = Ast { kind: AstKind::Index(Box::new(node), Box::new(idx)), offset };
            } else {
                return Ok(node);
            }
        }
    }

    fn args(&mut self, close: &str) -> Result<Vec<Ast>, ParseError> {
        self.enter()?;
        let mut args = Vec::new();
        if !self.eat(close) {
            loop {
                args.push(self.expr()?);
                if self.eat(close) {
                    break;
                }
                self.expect(",")?;
            }
        }
        self.depth -= 1;
        Ok(args)
    }

    fn primary(&mut self) -> Result<Ast, ParseError> {
        let (tok, offset) = self.bump();
        let kind = match tok {
            Tok::Int(i) => AstKind::Int(i),
            Tok::Float(x) => AstKind::Float(x),
            Tok::Str(s) => AstKind::Str(s),
            Tok::Ident(id) => match id.as_str() {
                "true" => AstKind::Bool(true),
                "false" => AstKind::Bool(false),
                "null" => AstKind::Null,
                "and" | "or" | "not" => {
                    let sym = match id.as_str() {
                        "and" => "&&",
                        "or" => "||",
                        _ => "!",
                    };
                    return Err(err(offset, format!("`{id}` is not an operator")).with_hint(format!("use `{sym}`")));
                }
                _ => {
                    if self.eat("(") {
                        AstKind::Call { target: None, name: id, args: self.args(")")? }
                    } else {
                        AstKind::Ident(id)
                    }
                }
            },
            Tok::Punct("(") => {
                let inner = self.expr()?;
                self.expect(")")?;
                return Ok(Ast { kind: inner.kind, offset });
            }
            Tok::Punct("[") => AstKind::List(self.args("]")?),
            Tok::End => {
                return Err(err(offset, "the expression ends too early").with_hint("complete the last condition"));
            }
            t => return Err(err(offset, format!("unexpected {t}"))),
        };
        Ok(Ast { kind, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> String {
        format!("{:?}", parse(src).unwrap().kind)
    }

    #[test]
    fn precedence() {
        let ast = parse("a >= 1 && b < 2 || !c").unwrap();
        let AstKind::Binary(BinaryOp::Or, lhs, rhs) = ast.kind else { panic!() };
        assert!(matches!(lhs.kind, AstKind::Binary(BinaryOp::And, _, _)));
        assert!(matches!(rhs.kind, AstKind::Unary(UnaryOp::Not, _)));
        assert_eq!(rhs.offset, 19);
    }

    #[test]
    fn members_calls_and_lists() {
        assert!(kinds("email.endsWith(\"@acme.com\")").contains("Call"));
        assert!(kinds("consent.email_marketing").contains("Select"));
        assert!(kinds("tier in ['gold', \"silver\"]").contains("List"));
        assert!(kinds("now - last_seen > duration('30d')").contains("Sub"));
        assert_eq!(parse("-5").unwrap().kind, AstKind::Int(-5));
    }

    #[test]
    fn errors_point_at_the_offending_character() {
        let e = parse("ltv >= 1000 & x").unwrap_err();
        assert_eq!(e.offset, 12);
        assert_eq!(e.hint.as_deref(), Some("use `&&` for and"));
        let e = parse("tier = 'gold'").unwrap_err();
        assert_eq!(e.offset, 5);
        assert_eq!(parse("a < b < c").unwrap_err().message, "comparisons cannot be chained");
        assert_eq!(parse("(a && b").unwrap_err().offset, 7);
        assert_eq!(parse("'open").unwrap_err().offset, 0);
        assert!(parse("a and b").unwrap_err().hint.unwrap().contains("&&"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_an_overflow() {
        let src = format!("{}a{}", "(".repeat(3_000), ")".repeat(3_000));
        assert!(parse(&src).unwrap_err().message.contains("deeper"));
        let src = format!("{}a", "!".repeat(3_000));
        assert!(parse(&src).is_err());
    }
}
