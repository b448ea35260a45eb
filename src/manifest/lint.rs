//! Checks of values that parse but cannot do what was meant: a comparison
//! with a value outside a trait's `enum`, a rule over a trait cdp does not
//! compute yet, a cron schedule that never fires, a YAML 1.1 boolean word
//! written unquoted. Pure functions; `rules` and `yaml` report what they find.

use crate::audience::expr::{Ast, AstKind, BinaryOp};
use std::str::FromStr;

/// Plain scalars YAML 1.1 reads as booleans (`NO` is Norway to cdp, `false`
/// to PyYAML and many other tools), as yamllint's `truthy` rule lists them.
pub const YAML11_BOOLEANS: &[&str] =
    &["yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF", "y", "Y", "n", "N"];

/// Calls `f` on every node of an expression.
pub fn visit<'a>(ast: &'a Ast, f: &mut dyn FnMut(&'a Ast)) {
    f(ast);
    match &ast.kind {
        AstKind::List(items) => items.iter().for_each(|a| visit(a, f)),
        AstKind::Select(t, _) => visit(t, f),
        AstKind::Call { target, args, .. } => {
            if let Some(t) = target {
                visit(t, f);
            }
            args.iter().for_each(|a| visit(a, f));
        }
        AstKind::Index(a, b) | AstKind::Binary(_, a, b) => {
            visit(a, f);
            visit(b, f);
        }
        AstKind::Unary(_, a) => visit(a, f),
        AstKind::Cond(a, b, c) => {
            visit(a, f);
            visit(b, f);
            visit(c, f);
        }
        _ => {}
    }
}

/// A string compared with a trait that can never hold it.
#[derive(Debug, PartialEq, Eq)]
pub struct EnumMiss {
    /// Character offset of the string in the expression.
    pub offset: usize,
    pub name: String,
    pub value: String,
}

/// Strings compared (`==`, `!=`, `in [...]`) with a trait whose `enum` does
/// not contain them. `allowed` gives a name's enum, if it has one.
pub fn enum_misses<'a>(ast: &Ast, allowed: &dyn Fn(&str) -> Option<&'a [String]>) -> Vec<EnumMiss> {
    let mut out = Vec::new();
    visit(ast, &mut |node| {
        let AstKind::Binary(op, l, r) = &node.kind else { return };
        let (name, values): (&str, Vec<&Ast>) = match (op, &l.kind, &r.kind) {
            (BinaryOp::Eq | BinaryOp::Ne, AstKind::Ident(n), AstKind::Str(_)) => (n, vec![r]),
            (BinaryOp::Eq | BinaryOp::Ne, AstKind::Str(_), AstKind::Ident(n)) => (n, vec![l]),
            (BinaryOp::In, AstKind::Ident(n), AstKind::List(items)) => (n, items.iter().collect()),
            _ => return,
        };
        let Some(allowed) = allowed(name).filter(|a| !a.is_empty()) else { return };
        for v in values {
            if let AstKind::Str(s) = &v.kind
                && !allowed.contains(s)
            {
                out.push(EnumMiss { offset: v.offset, name: name.to_owned(), value: s.clone() });
            }
        }
    });
    out
}

/// The names an expression reads, with their offsets.
pub fn names(ast: &Ast) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    visit(ast, &mut |node| {
        if let AstKind::Ident(n) = &node.kind {
            out.push((node.offset, n.as_str()));
        }
    });
    out
}

/// Whether a valid cron schedule never fires (`0 0 3 31 2 *`: February 31st).
pub fn never_fires(schedule: &str) -> bool {
    cron::Schedule::from_str(schedule).is_ok_and(|s| s.upcoming(chrono::Utc).next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::expr::parse;

    #[test]
    fn finds_values_outside_an_enum() {
        let tiers = vec!["gold".to_owned(), "platinum".to_owned()];
        let allowed = |n: &str| (n == "tier").then_some(tiers.as_slice());
        let ast = parse(r#"tier == "platnum" || tier in ["gold", "silver"] || "gold" == tier"#).unwrap();
        let misses = enum_misses(&ast, &allowed);
        let values: Vec<&str> = misses.iter().map(|m| m.value.as_str()).collect();
        assert_eq!(values, ["platnum", "silver"]);
        assert_eq!(misses[0].offset, 8);
    }

    #[test]
    fn cron_that_never_fires() {
        assert!(never_fires("0 0 3 31 2 *"));
        assert!(!never_fires("0 0 3 29 2 *"));
        assert!(!never_fires("0 */15 * * * *"));
    }
}
