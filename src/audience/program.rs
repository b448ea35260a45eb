//! Type checking and compilation of audience expressions. A parsed [`Ast`] is
//! checked against the [`Scope`] the manifest's model defines (which names exist
//! and what type each has) and compiled into a [`Program`]: a tree whose
//! variables are resolved to slots and whose regexes and constants are built
//! once, evaluated against a profile's values without any lookup by name.

use super::expr::{self, Ast, AstKind, BinaryOp, UnaryOp};
use crate::units::parse_duration;
use chrono::{DateTime, NaiveDate};
use indexmap::IndexMap;
use std::fmt;
use std::sync::Arc;

/// Static types of the expression language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    Bool,
    Int,
    Number,
    String,
    /// A calendar date.
    Date,
    /// An instant.
    Timestamp,
    Duration,
    List(Box<Type>),
    Null,
}

impl Type {
    fn is_numeric(&self) -> bool {
        matches!(self, Type::Int | Type::Number)
    }

    fn is_time(&self) -> bool {
        matches!(self, Type::Date | Type::Timestamp)
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Bool => f.write_str("bool"),
            Type::Int => f.write_str("int"),
            Type::Number => f.write_str("number"),
            Type::String => f.write_str("string"),
            Type::Date => f.write_str("date"),
            Type::Timestamp => f.write_str("timestamp"),
            Type::Duration => f.write_str("duration"),
            Type::List(t) => write!(f, "list<{t}>"),
            Type::Null => f.write_str("null"),
        }
    }
}

/// The names an expression may use, with their types. Dotted names
/// (`consent.email_marketing`) live under a namespace.
#[derive(Debug, Default, Clone)]
pub struct Scope {
    vars: IndexMap<String, Type>,
    namespaces: IndexMap<String, &'static str>,
}

impl Scope {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a variable; a dotted name declares it inside its namespace.
    pub fn var(&mut self, name: impl Into<String>, ty: Type) -> &mut Self {
        self.vars.insert(name.into(), ty);
        self
    }

    /// Declares a namespace (`consent`, `audiences`, `identities`) with what its members are.
    pub fn namespace(&mut self, name: &str, what: &'static str) -> &mut Self {
        self.namespaces.insert(name.to_owned(), what);
        self
    }

    fn lookup(&self, name: &str) -> Option<&Type> {
        self.vars.get(name)
    }

    fn closest(&self, name: &str, prefix: &str) -> Option<String> {
        crate::text::suggest(name, self.vars.keys().filter(|k| k.starts_with(prefix)).map(|k| &k[prefix.len()..]))
    }
}

/// An error in an expression: unknown names or types that do not fit.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckError {
    pub kind: CheckErrorKind,
    /// Character offset in the expression.
    pub offset: usize,
    pub message: String,
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckErrorKind {
    Syntax,
    Unknown,
    Type,
}

impl From<expr::ParseError> for CheckError {
    fn from(e: expr::ParseError) -> Self {
        CheckError { kind: CheckErrorKind::Syntax, offset: e.offset, message: e.message, hint: e.hint }
    }
}

fn type_err(offset: usize, message: impl Into<String>) -> CheckError {
    CheckError { kind: CheckErrorKind::Type, offset, message: message.into(), hint: None }
}

impl CheckError {
    fn hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }
}

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Num(f64),
    Str(Arc<str>),
    /// Days since 1970-01-01.
    Date(i32),
    /// Milliseconds since the Unix epoch.
    Ts(i64),
    /// Milliseconds.
    Dur(i64),
    List(Arc<[Val]>),
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub struct Program {
    /// The variables it reads, by slot: evaluation takes their values in this order.
    pub vars: Vec<String>,
    /// The result type (always `bool` for an audience rule).
    pub ty: Type,
    root: Node,
}

#[derive(Debug, Clone)]
enum Node {
    Const(Val),
    Var(usize),
    Now,
    Has(usize),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cmp(BinaryOp, Box<Node>, Box<Node>),
    In(Box<Node>, Box<Node>),
    Arith(BinaryOp, Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    List(Vec<Node>),
    Index(Box<Node>, Box<Node>),
    Size(Box<Node>),
    StrFn(StrFn, Box<Node>, Box<Node>),
    Matches(Box<Node>, Arc<regex::Regex>),
    Lower(Box<Node>),
    Upper(Box<Node>),
    ToInt(Box<Node>),
    ToNum(Box<Node>),
    ToStr(Box<Node>),
}

#[derive(Debug, Clone, Copy)]
enum StrFn {
    StartsWith,
    EndsWith,
    Contains,
}

/// Parses, type-checks and compiles `src` as a rule that must yield `bool`.
pub fn compile(src: &str, scope: &Scope) -> Result<Program, CheckError> {
    let ast = expr::parse(src)?;
    let mut c = Compiler { scope, vars: Vec::new() };
    let (root, ty) = c.node(&ast)?;
    if ty != Type::Bool {
        return Err(type_err(0, format!("the rule yields {ty}, not bool"))
            .hint("an audience rule is a condition, e.g. `lifetime_value >= 1000`"));
    }
    Ok(Program { vars: c.vars, ty, root })
}

struct Compiler<'a> {
    scope: &'a Scope,
    vars: Vec<String>,
}

impl Compiler<'_> {
    fn slot(&mut self, name: &str) -> usize {
        if let Some(i) = self.vars.iter().position(|v| v == name) {
            return i;
        }
        self.vars.push(name.to_owned());
        self.vars.len() - 1
    }

    /// The dotted name an identifier or selection spells, if it is one.
    fn path(ast: &Ast) -> Option<String> {
        match &ast.kind {
            AstKind::Ident(n) => Some(n.clone()),
            AstKind::Select(t, f) => Some(format!("{}.{f}", Self::path(t)?)),
            _ => None,
        }
    }

    fn var(&mut self, ast: &Ast) -> Result<(usize, Type), CheckError> {
        let Some(name) = Self::path(ast) else {
            return Err(type_err(ast.offset, "expected a trait name"));
        };
        if let Some(ty) = self.scope.lookup(&name) {
            return Ok((self.slot(&name), ty.clone()));
        }
        let (ns, member) = match name.split_once('.') {
            Some((ns, m)) => (Some(ns), m),
            None => (None, name.as_str()),
        };
        let unknown = |message: String, hint: Option<String>| CheckError {
            kind: CheckErrorKind::Unknown,
            offset: ast.offset,
            message,
            hint,
        };
        Err(match ns {
            Some(ns) if self.scope.namespaces.contains_key(ns) => {
                let what = self.scope.namespaces[ns];
                let hint = self.scope.closest(member, &format!("{ns}.")).map(|s| format!("did you mean `{ns}.{s}`?"));
                unknown(format!("`{member}` is not a defined {what}"), hint)
            }
            Some(ns) => unknown(
                format!("`{ns}` is not a trait or namespace"),
                Some(format!(
                    "namespaces are {}",
                    self.scope.namespaces.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                )),
            ),
            None => {
                let hint =
                    self.scope.closest(&name, "").map(|s| format!("did you mean `{s}`?")).or_else(|| {
                        Some("define it under `model.traits`, `model.computed` or `model.predicted`".into())
                    });
                unknown(format!("`{name}` is not a trait, computed or predicted trait"), hint)
            }
        })
    }

    fn node(&mut self, ast: &Ast) -> Result<(Node, Type), CheckError> {
        let at = ast.offset;
        Ok(match &ast.kind {
            AstKind::Null => (Node::Const(Val::Null), Type::Null),
            AstKind::Bool(b) => (Node::Const(Val::Bool(*b)), Type::Bool),
            AstKind::Int(i) => (Node::Const(Val::Int(*i)), Type::Int),
            AstKind::Float(x) => (Node::Const(Val::Num(*x)), Type::Number),
            AstKind::Str(s) => (Node::Const(Val::Str(s.as_str().into())), Type::String),
            AstKind::List(items) => {
                let mut nodes = Vec::with_capacity(items.len());
                let mut elem: Option<Type> = None;
                for item in items {
                    let (n, t) = self.node(item)?;
                    match &elem {
                        None => elem = Some(t),
                        Some(e) if compatible(e, &t) => {
                            if *e == Type::Int && t == Type::Number {
                                elem = Some(Type::Number);
                            }
                        }
                        Some(e) => return Err(type_err(item.offset, format!("list mixes {e} and {t}"))),
                    }
                    nodes.push(n);
                }
                let ty = Type::List(Box::new(elem.unwrap_or(Type::String)));
                if nodes.iter().all(|n| matches!(n, Node::Const(_))) {
                    let vals: Vec<Val> =
                        nodes.into_iter().map(|n| if let Node::Const(v) = n { v } else { Val::Null }).collect();
                    (Node::Const(Val::List(vals.into())), ty)
                } else {
                    (Node::List(nodes), ty)
                }
            }
            AstKind::Ident(name) if name == "now" && self.scope.lookup("now").is_none() => (Node::Now, Type::Timestamp),
            AstKind::Ident(_) | AstKind::Select(..) => {
                let (slot, ty) = self.var(ast)?;
                (Node::Var(slot), ty)
            }
            AstKind::Index(list, idx) => {
                let (l, lt) = self.node(list)?;
                let (i, it) = self.node(idx)?;
                let Type::List(elem) = lt else {
                    return Err(type_err(at, format!("cannot index a {lt}")));
                };
                if it != Type::Int {
                    return Err(type_err(idx.offset, format!("a list index must be an int, not {it}")));
                }
                (Node::Index(Box::new(l), Box::new(i)), *elem)
            }
            AstKind::Unary(op, inner) => {
                let (n, t) = self.node(inner)?;
                match op {
                    UnaryOp::Not if t == Type::Bool => (Node::Not(Box::new(n)), Type::Bool),
                    UnaryOp::Not => return Err(type_err(at, format!("`!` needs a bool, not {t}"))),
                    UnaryOp::Neg if t.is_numeric() || t == Type::Duration => (Node::Neg(Box::new(n)), t),
                    UnaryOp::Neg => return Err(type_err(at, format!("`-` needs a number, not {t}"))),
                }
            }
            AstKind::Cond(c, a, b) => {
                let (cn, ct) = self.node(c)?;
                if ct != Type::Bool {
                    return Err(type_err(c.offset, format!("the condition of `? :` must be bool, not {ct}")));
                }
                let (an, at_) = self.node(a)?;
                let (bn, bt) = self.node(b)?;
                if !compatible(&at_, &bt) {
                    return Err(type_err(b.offset, format!("the branches of `? :` differ: {at_} and {bt}")));
                }
                let ty = if at_ == Type::Null { bt } else { at_ };
                (Node::Cond(Box::new(cn), Box::new(an), Box::new(bn)), ty)
            }
            AstKind::Binary(op, lhs, rhs) => self.binary(*op, lhs, rhs, at)?,
            AstKind::Call { target, name, args } => self.call(target.as_deref(), name, args, at)?,
        })
    }

    fn binary(&mut self, op: BinaryOp, lhs: &Ast, rhs: &Ast, at: usize) -> Result<(Node, Type), CheckError> {
        let (l, lt) = self.node(lhs)?;
        let (r, rt) = self.node(rhs)?;
        let (l, r) = (Box::new(l), Box::new(r));
        let mismatch = |what: &str| {
            let mut e = type_err(rhs.offset, format!("cannot {what} {lt} and {rt}"));
            if (lt == Type::String && rt.is_numeric()) || (lt.is_numeric() && rt == Type::String) {
                e = e.hint("quote numbers only when the trait is a string; check the trait's `type` in `model.traits`");
            } else if lt.is_time() && rt == Type::String {
                e = e.hint(format!(
                    "write {}(\"…\") to make a {lt} constant",
                    if lt == Type::Date { "date" } else { "timestamp" }
                ));
            } else if lt == Type::Duration || rt == Type::Duration {
                e = e.hint("durations are written duration(\"30d\")");
            }
            e
        };
        Ok(match op {
            BinaryOp::And | BinaryOp::Or => {
                if lt != Type::Bool {
                    return Err(type_err(lhs.offset, format!("`{op}` needs bool operands, not {lt}")));
                }
                if rt != Type::Bool {
                    return Err(type_err(rhs.offset, format!("`{op}` needs bool operands, not {rt}")));
                }
                let n = if op == BinaryOp::And { Node::And(l, r) } else { Node::Or(l, r) };
                (n, Type::Bool)
            }
            BinaryOp::Eq | BinaryOp::Ne => {
                if !compatible(&lt, &rt) {
                    return Err(mismatch("compare"));
                }
                (Node::Cmp(op, l, r), Type::Bool)
            }
            BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
                let ordered = (lt.is_numeric() && rt.is_numeric())
                    || (lt == rt && matches!(lt, Type::String | Type::Date | Type::Timestamp | Type::Duration))
                    || (lt.is_time() && rt.is_time());
                if !ordered {
                    return Err(mismatch("order"));
                }
                (Node::Cmp(op, l, r), Type::Bool)
            }
            BinaryOp::In => {
                let Type::List(elem) = &rt else {
                    return Err(type_err(rhs.offset, format!("`in` needs a list on its right, not {rt}"))
                        .hint("write `tier in [\"gold\", \"silver\"]`"));
                };
                if !compatible(&lt, elem) {
                    return Err(type_err(lhs.offset, format!("cannot look for a {lt} in a list<{elem}>")));
                }
                (Node::In(l, r), Type::Bool)
            }
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Rem => {
                let ty = match (op, &lt, &rt) {
                    (_, Type::Int, Type::Int) => Type::Int,
                    (BinaryOp::Rem, _, _) => return Err(mismatch("take the remainder of")),
                    (_, a, b) if a.is_numeric() && b.is_numeric() => Type::Number,
                    (BinaryOp::Add, Type::String, Type::String) => Type::String,
                    (BinaryOp::Sub, a, b) if a.is_time() && b.is_time() => Type::Duration,
                    (BinaryOp::Add | BinaryOp::Sub, a, Type::Duration) if a.is_time() => a.clone(),
                    (BinaryOp::Add, Type::Duration, b) if b.is_time() => b.clone(),
                    (BinaryOp::Add | BinaryOp::Sub, Type::Duration, Type::Duration) => Type::Duration,
                    (BinaryOp::Mul | BinaryOp::Div, Type::Duration, Type::Int) => Type::Duration,
                    _ => {
                        let verb = match op {
                            BinaryOp::Add => "add",
                            BinaryOp::Sub => "subtract",
                            BinaryOp::Mul => "multiply",
                            _ => "divide",
                        };
                        return Err(mismatch(verb));
                    }
                };
                (Node::Arith(op, l, r), ty)
            }
        })
        .map(|(n, t)| (fold(n), t))
        .map_err(|e: CheckError| CheckError { offset: if e.offset == 0 { at } else { e.offset }, ..e })
    }

    fn call(&mut self, target: Option<&Ast>, name: &str, args: &[Ast], at: usize) -> Result<(Node, Type), CheckError> {
        let arity = |n: usize| -> Result<(), CheckError> {
            if args.len() == n {
                Ok(())
            } else {
                Err(type_err(
                    at,
                    format!("`{name}` takes {n} argument{}, not {}", if n == 1 { "" } else { "s" }, args.len()),
                ))
            }
        };
        let string_const = |a: &Ast| -> Result<String, CheckError> {
            match &a.kind {
                AstKind::Str(s) => Ok(s.clone()),
                _ => Err(type_err(a.offset, format!("`{name}` needs a string constant"))),
            }
        };
        match (target, name) {
            (None, "has") => {
                arity(1)?;
                let (slot, _) = self.var(&args[0])?;
                Ok((Node::Has(slot), Type::Bool))
            }
            (None, "duration") => {
                arity(1)?;
                let s = string_const(&args[0])?;
                let d = parse_duration(&s).map_err(|e| type_err(args[0].offset, e))?;
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                Ok((Node::Const(Val::Dur(ms)), Type::Duration))
            }
            (None, "date") => {
                arity(1)?;
                let s = string_const(&args[0])?;
                let d = parse_date(&s).ok_or_else(|| {
                    type_err(args[0].offset, format!("`{s}` is not a date")).hint("write date(\"2024-12-31\")")
                })?;
                Ok((Node::Const(Val::Date(d)), Type::Date))
            }
            (None, "timestamp") => {
                arity(1)?;
                let s = string_const(&args[0])?;
                let t = parse_timestamp(&s).ok_or_else(|| {
                    type_err(args[0].offset, format!("`{s}` is not an RFC 3339 timestamp"))
                        .hint("write timestamp(\"2024-12-31T23:00:00Z\")")
                })?;
                Ok((Node::Const(Val::Ts(t)), Type::Timestamp))
            }
            (None, "size") | (Some(_), "size") => {
                let subject = match target {
                    Some(t) => {
                        arity(0)?;
                        t
                    }
                    None => {
                        arity(1)?;
                        &args[0]
                    }
                };
                let (n, t) = self.node(subject)?;
                if !matches!(t, Type::String | Type::List(_)) {
                    return Err(type_err(subject.offset, format!("`size` needs a string or list, not {t}")));
                }
                Ok((Node::Size(Box::new(n)), Type::Int))
            }
            (None, "int" | "double" | "string") => {
                arity(1)?;
                let (n, t) = self.node(&args[0])?;
                let ok = match name {
                    "int" | "double" => t.is_numeric() || t == Type::String,
                    _ => !matches!(t, Type::List(_)),
                };
                if !ok {
                    return Err(type_err(args[0].offset, format!("cannot convert {t} with `{name}`")));
                }
                Ok(match name {
                    "int" => (Node::ToInt(Box::new(n)), Type::Int),
                    "double" => (Node::ToNum(Box::new(n)), Type::Number),
                    _ => (Node::ToStr(Box::new(n)), Type::String),
                })
            }
            (Some(t), "startsWith" | "endsWith" | "contains" | "matches" | "lowerAscii" | "upperAscii") => {
                let (tn, tt) = self.node(t)?;
                if tt != Type::String {
                    return Err(type_err(t.offset, format!("`{name}` is a string method; this is a {tt}")));
                }
                let tn = Box::new(tn);
                match name {
                    "lowerAscii" | "upperAscii" => {
                        arity(0)?;
                        Ok((if name == "lowerAscii" { Node::Lower(tn) } else { Node::Upper(tn) }, Type::String))
                    }
                    "matches" => {
                        arity(1)?;
                        let re = string_const(&args[0])?;
                        let re = regex::Regex::new(&re)
                            .map_err(|e| type_err(args[0].offset, format!("invalid regular expression: {e}")))?;
                        Ok((Node::Matches(tn, Arc::new(re)), Type::Bool))
                    }
                    _ => {
                        arity(1)?;
                        let (an, aty) = self.node(&args[0])?;
                        if aty != Type::String {
                            return Err(type_err(args[0].offset, format!("`{name}` needs a string, not {aty}")));
                        }
                        let f = match name {
                            "startsWith" => StrFn::StartsWith,
                            "endsWith" => StrFn::EndsWith,
                            _ => StrFn::Contains,
                        };
                        Ok((Node::StrFn(f, tn, Box::new(an)), Type::Bool))
                    }
                }
            }
            _ => Err(CheckError {
                kind: CheckErrorKind::Unknown,
                offset: at,
                message: format!("`{name}` is not a function"),
                hint: Some(
                    "functions: has, size, duration, date, timestamp, int, double, string; string methods: \
                     startsWith, endsWith, contains, matches, lowerAscii, upperAscii"
                        .into(),
                ),
            }),
        }
    }
}

/// Whether values of two types can be compared for equality.
fn compatible(a: &Type, b: &Type) -> bool {
    a == b
        || *a == Type::Null
        || *b == Type::Null
        || (a.is_numeric() && b.is_numeric())
        || (a.is_time() && b.is_time())
        || matches!((a, b), (Type::List(x), Type::List(y)) if compatible(x, y))
}

/// Folds operations on constants, so `duration("30d") * 2` costs nothing at evaluation.
fn fold(n: Node) -> Node {
    match &n {
        Node::Arith(_, a, b) | Node::Cmp(_, a, b) if matches!(**a, Node::Const(_)) && matches!(**b, Node::Const(_)) => {
            Node::Const(eval_node(&n, &[], 0))
        }
        _ => n,
    }
}

/// Days since 1970-01-01 of `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Option<i32> {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((d - epoch).num_days()).ok()
}

/// Milliseconds since the epoch of an RFC 3339 timestamp.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}

const DAY_MS: i64 = 86_400_000;

impl Program {
    /// Evaluates against the values of [`Program::vars`], in order (`Val::Null`
    /// for an absent value), at time `now_ms`. Absent values make comparisons
    /// false, so an unknown trait never puts someone in an audience.
    pub fn eval(&self, values: &[Val], now_ms: i64) -> Val {
        eval_node(&self.root, values, now_ms)
    }

    /// Evaluates a rule to membership: true only for a `true` result.
    pub fn matches(&self, values: &[Val], now_ms: i64) -> bool {
        matches!(self.eval(values, now_ms), Val::Bool(true))
    }

    /// Whether the rule reads the clock (`now`): its result can change with
    /// time alone, so only a scheduled re-evaluation keeps it current.
    pub fn reads_clock(&self) -> bool {
        fn walk(n: &Node) -> bool {
            match n {
                Node::Now => true,
                Node::Const(_) | Node::Var(_) | Node::Has(_) => false,
                Node::Not(a)
                | Node::Neg(a)
                | Node::Size(a)
                | Node::Matches(a, _)
                | Node::Lower(a)
                | Node::Upper(a)
                | Node::ToInt(a)
                | Node::ToNum(a)
                | Node::ToStr(a) => walk(a),
                Node::And(a, b)
                | Node::Or(a, b)
                | Node::Cmp(_, a, b)
                | Node::In(a, b)
                | Node::Arith(_, a, b)
                | Node::Index(a, b)
                | Node::StrFn(_, a, b) => walk(a) || walk(b),
                Node::Cond(a, b, c) => walk(a) || walk(b) || walk(c),
                Node::List(items) => items.iter().any(walk),
            }
        }
        walk(&self.root)
    }
}

fn truthy(v: &Val) -> bool {
    matches!(v, Val::Bool(true))
}

fn as_f64(v: &Val) -> Option<f64> {
    match v {
        Val::Int(i) => Some(*i as f64),
        Val::Num(x) => Some(*x),
        _ => None,
    }
}

/// Time values on one axis (ms since epoch) so dates and timestamps compare.
fn as_ms(v: &Val) -> Option<i64> {
    match v {
        Val::Date(d) => Some(i64::from(*d) * DAY_MS),
        Val::Ts(t) => Some(*t),
        _ => None,
    }
}

fn order(a: &Val, b: &Val) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(y)),
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        (Val::Dur(x), Val::Dur(y)) => Some(x.cmp(y)),
        (Val::Date(x), Val::Date(y)) => Some(x.cmp(y)),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        _ => {
            if let (Some(x), Some(y)) = (as_f64(a), as_f64(b)) {
                x.partial_cmp(&y)
            } else if let (Some(x), Some(y)) = (as_ms(a), as_ms(b)) {
                Some(x.cmp(&y))
            } else {
                None
            }
        }
    }
}

fn equal(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::Null, Val::Null) => true,
        (Val::Null, _) | (_, Val::Null) => false,
        (Val::List(x), Val::List(y)) => x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| equal(p, q)),
        _ => order(a, b) == Some(std::cmp::Ordering::Equal),
    }
}

fn eval_node(n: &Node, vals: &[Val], now: i64) -> Val {
    use std::cmp::Ordering::*;
    match n {
        Node::Const(v) => v.clone(),
        Node::Var(i) => vals.get(*i).cloned().unwrap_or(Val::Null),
        Node::Now => Val::Ts(now),
        Node::Has(i) => Val::Bool(!matches!(vals.get(*i), None | Some(Val::Null))),
        Node::Not(a) => match eval_node(a, vals, now) {
            Val::Bool(b) => Val::Bool(!b),
            _ => Val::Null,
        },
        Node::Neg(a) => match eval_node(a, vals, now) {
            Val::Int(i) => i.checked_neg().map_or(Val::Null, Val::Int),
            Val::Num(x) => Val::Num(-x),
            Val::Dur(d) => Val::Dur(-d),
            _ => Val::Null,
        },
        Node::And(a, b) => Val::Bool(truthy(&eval_node(a, vals, now)) && truthy(&eval_node(b, vals, now))),
        Node::Or(a, b) => Val::Bool(truthy(&eval_node(a, vals, now)) || truthy(&eval_node(b, vals, now))),
        Node::Cmp(op, a, b) => {
            let (a, b) = (eval_node(a, vals, now), eval_node(b, vals, now));
            Val::Bool(match op {
                BinaryOp::Eq => equal(&a, &b),
                BinaryOp::Ne => !equal(&a, &b),
                _ => match order(&a, &b) {
                    None => false,
                    Some(o) => match op {
                        BinaryOp::Lt => o == Less,
                        BinaryOp::Le => o != Greater,
                        BinaryOp::Gt => o == Greater,
                        _ => o != Less,
                    },
                },
            })
        }
        Node::In(a, b) => {
            let a = eval_node(a, vals, now);
            match eval_node(b, vals, now) {
                Val::List(items) => Val::Bool(items.iter().any(|i| equal(&a, i))),
                _ => Val::Bool(false),
            }
        }
        Node::Arith(op, a, b) => arith(*op, &eval_node(a, vals, now), &eval_node(b, vals, now)),
        Node::Cond(c, a, b) => {
            if truthy(&eval_node(c, vals, now)) {
                eval_node(a, vals, now)
            } else {
                eval_node(b, vals, now)
            }
        }
        Node::List(items) => Val::List(items.iter().map(|i| eval_node(i, vals, now)).collect()),
        Node::Index(l, i) => match (eval_node(l, vals, now), eval_node(i, vals, now)) {
            (Val::List(items), Val::Int(i)) => {
                usize::try_from(i).ok().and_then(|i| items.get(i).cloned()).unwrap_or(Val::Null)
            }
            _ => Val::Null,
        },
        Node::Size(a) => match eval_node(a, vals, now) {
            Val::Str(s) => Val::Int(s.chars().count() as i64),
            Val::List(l) => Val::Int(l.len() as i64),
            _ => Val::Null,
        },
        Node::StrFn(f, a, b) => match (eval_node(a, vals, now), eval_node(b, vals, now)) {
            (Val::Str(a), Val::Str(b)) => Val::Bool(match f {
                StrFn::StartsWith => a.starts_with(&*b),
                StrFn::EndsWith => a.ends_with(&*b),
                StrFn::Contains => a.contains(&*b),
            }),
            _ => Val::Bool(false),
        },
        Node::Matches(a, re) => match eval_node(a, vals, now) {
            Val::Str(s) => Val::Bool(re.is_match(&s)),
            _ => Val::Bool(false),
        },
        Node::Lower(a) => match eval_node(a, vals, now) {
            Val::Str(s) => Val::Str(s.to_ascii_lowercase().into()),
            _ => Val::Null,
        },
        Node::Upper(a) => match eval_node(a, vals, now) {
            Val::Str(s) => Val::Str(s.to_ascii_uppercase().into()),
            _ => Val::Null,
        },
        Node::ToInt(a) => match eval_node(a, vals, now) {
            Val::Int(i) => Val::Int(i),
            Val::Num(x) if x.is_finite() && x.abs() < 9.2e18 => Val::Int(x.trunc() as i64),
            Val::Str(s) => s.trim().parse().map_or(Val::Null, Val::Int),
            _ => Val::Null,
        },
        Node::ToNum(a) => match eval_node(a, vals, now) {
            Val::Int(i) => Val::Num(i as f64),
            Val::Num(x) => Val::Num(x),
            Val::Str(s) => s.trim().parse().map_or(Val::Null, Val::Num),
            _ => Val::Null,
        },
        Node::ToStr(a) => match eval_node(a, vals, now) {
            Val::Null => Val::Null,
            Val::Str(s) => Val::Str(s),
            Val::Bool(b) => Val::Str(b.to_string().into()),
            Val::Int(i) => Val::Str(i.to_string().into()),
            Val::Num(x) => Val::Str(x.to_string().into()),
            Val::Date(d) => Val::Str(
                NaiveDate::from_ymd_opt(1970, 1, 1)
                    .and_then(|e| e.checked_add_signed(chrono::TimeDelta::days(i64::from(d))))
                    .map_or_else(String::new, |d| d.to_string())
                    .into(),
            ),
            Val::Ts(t) => {
                Val::Str(DateTime::from_timestamp_millis(t).map_or_else(String::new, |t| t.to_rfc3339()).into())
            }
            Val::Dur(d) => Val::Str(format!("{}ms", d).into()),
            Val::List(_) => Val::Null,
        },
    }
}

fn arith(op: BinaryOp, a: &Val, b: &Val) -> Val {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => {
            let r = match op {
                BinaryOp::Add => x.checked_add(*y),
                BinaryOp::Sub => x.checked_sub(*y),
                BinaryOp::Mul => x.checked_mul(*y),
                BinaryOp::Div => x.checked_div(*y),
                _ => x.checked_rem(*y),
            };
            r.map_or(Val::Null, Val::Int)
        }
        (Val::Str(x), Val::Str(y)) if op == BinaryOp::Add => Val::Str(format!("{x}{y}").into()),
        (Val::Dur(x), Val::Dur(y)) => match op {
            BinaryOp::Add => x.checked_add(*y).map_or(Val::Null, Val::Dur),
            BinaryOp::Sub => x.checked_sub(*y).map_or(Val::Null, Val::Dur),
            _ => Val::Null,
        },
        (Val::Dur(x), Val::Int(y)) => match op {
            BinaryOp::Mul => x.checked_mul(*y).map_or(Val::Null, Val::Dur),
            BinaryOp::Div => x.checked_div(*y).map_or(Val::Null, Val::Dur),
            _ => Val::Null,
        },
        (Val::Dur(d), t) | (t, Val::Dur(d)) if as_ms(t).is_some() && matches!(op, BinaryOp::Add | BinaryOp::Sub) => {
            let d = if op == BinaryOp::Sub { -d } else { *d };
            match t {
                Val::Date(day) => Val::Date(day.saturating_add(i32::try_from(d / DAY_MS).unwrap_or(0))),
                Val::Ts(ms) => ms.checked_add(d).map_or(Val::Null, Val::Ts),
                _ => Val::Null,
            }
        }
        _ => {
            if let (Some(x), Some(y)) = (as_ms(a), as_ms(b))
                && op == BinaryOp::Sub
            {
                return x.checked_sub(y).map_or(Val::Null, Val::Dur);
            }
            let (Some(x), Some(y)) = (as_f64(a), as_f64(b)) else { return Val::Null };
            let r = match op {
                BinaryOp::Add => x + y,
                BinaryOp::Sub => x - y,
                BinaryOp::Mul => x * y,
                BinaryOp::Div => x / y,
                _ => x % y,
            };
            if r.is_finite() { Val::Num(r) } else { Val::Null }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        let mut s = Scope::new();
        s.namespace("consent", "consent purpose").namespace("audiences", "audience");
        s.var("lifetime_value", Type::Number)
            .var("orders_90d", Type::Int)
            .var("tier", Type::String)
            .var("email", Type::String)
            .var("last_seen", Type::Timestamp)
            .var("birth_date", Type::Date)
            .var("tags", Type::List(Box::new(Type::String)))
            .var("consent.email_marketing", Type::Bool);
        s
    }

    fn run(src: &str, vals: &[(&str, Val)]) -> bool {
        let p = compile(src, &scope()).unwrap_or_else(|e| panic!("{src}: {e:?}"));
        let values: Vec<Val> =
            p.vars.iter().map(|v| vals.iter().find(|(n, _)| n == v).map_or(Val::Null, |(_, x)| x.clone())).collect();
        p.matches(&values, parse_timestamp("2026-11-22T00:00:00Z").unwrap())
    }

    #[test]
    fn evaluates_rules() {
        let ltv = ("lifetime_value", Val::Num(1500.0));
        let orders = ("orders_90d", Val::Int(3));
        assert!(run("lifetime_value >= 1000 && orders_90d >= 2", &[ltv.clone(), orders.clone()]));
        assert!(!run("lifetime_value >= 1000 && orders_90d >= 5", &[ltv.clone(), orders]));
        assert!(run("tier in ['gold', 'silver']", &[("tier", Val::Str("gold".into()))]));
        assert!(run("email.endsWith('@acme.com')", &[("email", Val::Str("a@acme.com".into()))]));
        assert!(run("consent.email_marketing", &[("consent.email_marketing", Val::Bool(true))]));
        assert!(run("'vip' in tags", &[("tags", Val::List(vec![Val::Str("vip".into())].into()))]));
        assert!(run("size(tags) == 0", &[("tags", Val::List(Vec::new().into()))]));
        let seen = ("last_seen", Val::Ts(parse_timestamp("2026-11-01T00:00:00Z").unwrap()));
        assert!(run("now - last_seen > duration('14d')", std::slice::from_ref(&seen)));
        assert!(!run("now - last_seen > duration('30d')", &[seen]));
        assert!(run(
            "birth_date < date('2000-01-01')",
            &[("birth_date", Val::Date(parse_date("1990-05-01").unwrap()))]
        ));
        assert!(run("lifetime_value > 10 ? tier == 'gold' : false", &[ltv, ("tier", Val::Str("gold".into()))]));
    }

    #[test]
    fn absent_values_never_match() {
        assert!(!run("lifetime_value >= 0", &[]));
        assert!(!run("tier == 'gold'", &[]));
        assert!(run("!has(tier)", &[]));
        assert!(run("tier == null", &[]));
    }

    #[test]
    fn type_errors_point_inside_the_expression() {
        let e = compile("lifetime_value >= 1000 && tier > 5", &scope()).unwrap_err();
        assert_eq!((e.kind, e.offset), (CheckErrorKind::Type, 33));
        assert!(e.message.contains("string and int"), "{}", e.message);
        let e = compile("tier == 'gold' && lifetime_valu > 3", &scope()).unwrap_err();
        assert_eq!((e.kind, e.offset), (CheckErrorKind::Unknown, 18));
        assert_eq!(e.hint.as_deref(), Some("did you mean `lifetime_value`?"));
        let e = compile("consent.emial_marketing", &scope()).unwrap_err();
        assert_eq!(e.hint.as_deref(), Some("did you mean `consent.email_marketing`?"));
        let e = compile("lifetime_value + 1", &scope()).unwrap_err();
        assert!(e.message.contains("yields number"));
        assert!(compile("last_seen > '2024-01-01'", &scope()).unwrap_err().hint.unwrap().contains("timestamp("));
        assert!(compile("tier.matches('[')", &scope()).unwrap_err().message.contains("regular expression"));
        assert_eq!(compile("frob(1)", &scope()).unwrap_err().kind, CheckErrorKind::Unknown);
    }

    #[test]
    fn constants_fold() {
        let p = compile("duration('1d') * 2 == duration('48h')", &scope()).unwrap();
        assert!(matches!(p.root, Node::Const(Val::Bool(true))), "{:?}", p.root);
    }
}
