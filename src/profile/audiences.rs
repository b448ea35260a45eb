//! Membership: which of the manifest's audiences one profile is in now.
//! The caller (the golden record, [`super::golden_record`]) says what each name a rule
//! reads is worth for the profile; this module compiles the rules, evaluates
//! them and settles audiences that refer to other audiences. Pure: values
//! in, audience names out.

use serde_json::Value;

use crate::audience::program::{parse_date, parse_timestamp};
use crate::audience::{Program, Val, compile};
use crate::manifest::{FieldType, Manifest};

/// Every audience's rule compiled against the manifest's model, in the
/// manifest's order; the first that does not compile is the error, named
/// (validation refuses it with its place in the file).
pub fn programs(m: &Manifest) -> Result<Vec<(String, Program)>, String> {
    let scope = crate::manifest::rules::audience_scope(m);
    m.audiences
        .iter()
        .map(|(n, a)| {
            compile(&a.rule, &scope).map(|p| (n.clone(), p)).map_err(|e| format!("audience `{n}`: {}", e.message))
        })
        .collect()
}

/// The audiences whose rules match, in the manifest's order. `value` gives
/// the profile's value of a name a rule reads (a trait, `consent.<purpose>`,
/// `identities.<key>`, …), `None` for a name it does not know;
/// `audiences.<name>` is answered here from the other rules.
pub fn members(programs: &[(String, Program)], now: i64, value: impl Fn(&str) -> Option<Val>) -> Vec<String> {
    let mut member: indexmap::IndexMap<String, bool> = indexmap::IndexMap::new();
    // Audiences may depend on audiences (no cycles: validation refuses them);
    // evaluate until nothing changes.
    for _ in 0..=programs.len() {
        let mut changed = false;
        for (name, p) in programs {
            let vals: Vec<Val> = p
                .vars
                .iter()
                .map(|v| {
                    value(v)
                        .or_else(|| {
                            v.strip_prefix("audiences.").map(|a| Val::Bool(member.get(a).copied().unwrap_or(false)))
                        })
                        .unwrap_or(Val::Null)
                })
                .collect();
            let now_in = p.matches(&vals, now);
            if member.insert(name.clone(), now_in) != Some(now_in) {
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    member.into_iter().filter(|(_, v)| *v).map(|(k, _)| k).collect()
}

/// A JSON value as the rule language sees it, read as `kind` when the model
/// declares one: dates and timestamps from their text, integers as integers.
/// A value that does not fit is null (a rule never matches on it).
pub fn json_val(v: &Value, kind: Option<FieldType>) -> Val {
    match (v, kind) {
        (Value::Null, _) => Val::Null,
        (Value::Bool(b), _) => Val::Bool(*b),
        (Value::Number(n), Some(FieldType::Integer)) => n.as_i64().map_or(Val::Null, Val::Int),
        (Value::Number(n), _) => n
            .as_i64()
            .filter(|_| n.is_i64() && kind.is_none())
            .map_or_else(|| n.as_f64().map_or(Val::Null, Val::Num), Val::Int),
        (Value::String(s), Some(FieldType::Date)) => parse_date(s).map_or(Val::Null, Val::Date),
        (Value::String(s), Some(FieldType::Timestamp)) => parse_timestamp(s).map_or(Val::Null, Val::Ts),
        (Value::String(s), _) => Val::Str(s.as_str().into()),
        (Value::Array(a), _) => Val::List(a.iter().map(|x| json_val(x, None)).collect()),
        (Value::Object(_), _) => Val::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Options, load_str};
    use serde_json::json;

    fn manifest(audiences: &str) -> Manifest {
        let text = format!(
            "version: 1\nname: t\nidentity:\n  keys:\n    email: {{ normalize: email }}\n\
             model:\n  traits:\n    tier: {{ type: string }}\n    points: {{ type: integer }}\naudiences:\n{audiences}"
        );
        let l = load_str(&text, &Options::validate("."));
        assert!(!l.has_errors(), "{:#?}", l.diagnostics);
        l.manifest.expect("manifest")
    }

    #[test]
    fn audiences_that_read_audiences_settle_whatever_their_order() {
        // `top` reads `gold`, declared after it: a second round settles it.
        let m = manifest(
            "  top:\n    where: 'audiences.gold && points > 100'\n  gold:\n    where: 'tier == \"gold\"'\n  \
             silver:\n    where: 'tier == \"silver\"'\n",
        );
        let value = |points: i64| {
            move |v: &str| match v {
                "tier" => Some(Val::Str("gold".into())),
                "points" => Some(Val::Int(points)),
                _ => None,
            }
        };
        assert_eq!(members(&programs(&m).expect("programs"), 0, value(500)), ["top", "gold"]);
        assert_eq!(members(&programs(&m).expect("programs"), 0, value(50)), ["gold"]);
    }

    #[test]
    fn json_values_take_the_declared_type() {
        assert_eq!(json_val(&json!(6), None), Val::Int(6));
        assert_eq!(json_val(&json!(6), Some(FieldType::Number)), Val::Num(6.0));
        assert_eq!(json_val(&json!(6.5), Some(FieldType::Integer)), Val::Null);
        assert_eq!(json_val(&json!("1970-01-02"), Some(FieldType::Date)), Val::Date(1));
        assert_eq!(json_val(&json!("1970-01-01T00:00:01Z"), Some(FieldType::Timestamp)), Val::Ts(1000));
        assert_eq!(json_val(&json!({"a": 1}), None), Val::Null);
    }
}
