//! The manifest's JSON Schema: generated from the types in `types.rs`, checked
//! in as `schemas/cdp.schema.json` (a test holds the two equal), printed by
//! `cdp schema` (which also renders the Markdown field reference from it),
//! and used to validate every document before the semantic rules run. Schema
//! errors are translated into cdp diagnostics here, located through the span
//! index and with "did you mean" hints from the schema itself.

use super::diag::{self, Diagnostic};
use super::types::Manifest;
use super::yaml::{SpanIndex, display_path, push_segment};
use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::Value;
use std::sync::OnceLock;

/// Where the published schema lives, for editors' `$schema` lines.
pub const SCHEMA_ID: &str = "https://cdp.dev/schemas/cdp.schema.json";

/// The manifest schema as JSON.
pub fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut v = serde_json::to_value(schemars::schema_for!(Manifest)).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            map.insert("$id".into(), Value::String(SCHEMA_ID.into()));
        }
        v
    })
}

/// The schema, pretty-printed with a trailing newline, as checked in.
pub fn schema_text() -> String {
    let mut s = serde_json::to_string_pretty(schema()).unwrap_or_default();
    s.push('\n');
    s
}

fn validator() -> Option<&'static jsonschema::Validator> {
    static V: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    V.get_or_init(|| jsonschema::validator_for(schema()).ok()).as_ref()
}

/// Validates a document against the schema; every violation becomes a diagnostic.
pub fn check(doc: &Value, spans: &SpanIndex) -> Vec<Diagnostic> {
    let Some(v) = validator() else {
        return vec![Diagnostic::error(diag::READ, "", "internal error: the manifest schema does not compile")];
    };
    let mut out = Vec::new();
    for e in v.iter_errors(doc) {
        translate(&e, doc, spans, &mut out);
    }
    out.sort_by_key(|d| (d.line, d.column));
    out.dedup();
    out
}

fn translate(e: &jsonschema::ValidationError<'_>, doc: &Value, spans: &SpanIndex, out: &mut Vec<Diagnostic>) {
    let pointer = e.instance_path().to_string();
    let path = display_path(&pointer);
    let at = spans.value(&pointer);
    let instance = doc.pointer(&pointer).unwrap_or(&Value::Null);
    let here = if path.is_empty() { "the manifest".to_owned() } else { format!("`{path}`") };
    match e.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let allowed = allowed_keys(&pointer);
            for key in unexpected {
                if key == "<<" {
                    // The YAML reader already reported the merge key itself.
                    continue;
                }
                let child = push_segment(&pointer, key);
                let mut d = Diagnostic::error(
                    diag::UNKNOWN_KEY,
                    display_path(&child),
                    format!("unknown key `{key}` in {here}"),
                )
                .at(spans.key(&child));
                d = match super::suggest(key, allowed.iter().map(String::as_str)) {
                    Some(s) => d.hint(format!("did you mean `{s}`?")),
                    None if pointer.is_empty() => d.hint(format!(
                        "allowed keys: {}; top-level keys starting with `x-` are ignored (a place for anchors)",
                        allowed.join(", ")
                    )),
                    None if !allowed.is_empty() => d.hint(format!("allowed keys: {}", allowed.join(", "))),
                    None => d,
                };
                out.push(d);
            }
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => article(&t.to_string()),
                TypeKind::Multiple(ts) => ts.iter().map(|t| article(&t.to_string())).collect::<Vec<_>>().join(" or "),
            };
            let found = describe(instance);
            let mut d =
                Diagnostic::error(diag::WRONG_TYPE, &path, format!("{here} must be {expected}, found {found}")).at(at);
            let described = pointer
                .rsplit_once('/')
                .and_then(|(parent, key)| field_description(parent, &key.replace("~1", "/").replace("~0", "~")))
                .filter(|desc| desc.contains("e.g."));
            if let Some(desc) = described.filter(|_| expected.contains("string") && instance.is_number()) {
                // `rate_limit: 20` or `max_wait: 5`: quoting alone would not make it valid.
                d = d.hint(format!("write {}", example(&desc)));
            } else if expected.contains("string") && !instance.is_object() && !instance.is_array() {
                d = d.hint("quote the value");
            } else if expected.contains("mapping") {
                d = d.hint("write a mapping of `key: value` lines, indented under this key");
            } else if expected.contains("list") {
                d = d.hint("write a list: `[a, b]` or one `- item` per line");
            }
            out.push(d);
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            let desc = field_description(&pointer, name);
            let mut d =
                Diagnostic::error(diag::MISSING_KEY, &path, format!("{here} is missing the required key `{name}`"))
                    .at(spans.key(&pointer));
            if let Some(desc) = desc {
                d = d.hint(format!("add `{name}:` ({})", first_sentence(&desc)));
            }
            out.push(d);
        }
        ValidationErrorKind::Enum { options } => {
            let opts: Vec<String> = options
                .as_array()
                .map(|a| a.iter().filter_map(|o| o.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let got = instance.as_str().map_or_else(|| describe(instance), |s| format!("`{s}`"));
            let mut d = Diagnostic::error(diag::NOT_ALLOWED, &path, format!("{got} is not allowed for {here}")).at(at);
            d = match instance.as_str().and_then(|s| super::suggest(s, opts.iter().map(String::as_str))) {
                Some(s) => d.hint(format!("did you mean `{s}`? allowed: {}", opts.join(", "))),
                None => d.hint(format!("allowed: {}", opts.join(", "))),
            };
            out.push(d);
        }
        ValidationErrorKind::AnyOf { .. } | ValidationErrorKind::OneOfNotValid { .. }
            if constants(e, &pointer).is_some() =>
        {
            // A documented enum is a `oneOf` of constants: report it like `enum`.
            let opts: Vec<String> = constants(e, &pointer)
                .unwrap_or_default()
                .iter()
                .filter_map(|o| o.as_str().map(str::to_owned))
                .collect();
            let got = instance.as_str().map_or_else(|| describe(instance), |s| format!("`{s}`"));
            let mut d = Diagnostic::error(diag::NOT_ALLOWED, &path, format!("{got} is not allowed for {here}")).at(at);
            d = match instance.as_str().and_then(|s| super::suggest(s, opts.iter().map(String::as_str))) {
                Some(s) => d.hint(format!("did you mean `{s}`? allowed: {}", opts.join(", "))),
                None => d.hint(format!("allowed: {}", opts.join(", "))),
            };
            out.push(d);
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            // An untagged choice (e.g. `merge: latest` or `merge: {source_priority: […]}`):
            // report the branch whose shape matches what was written.
            let branch = context.iter().filter(|errs| !errs.is_empty()).min_by_key(|errs| {
                let type_miss = errs.iter().any(|x| {
                    matches!(x.kind(), ValidationErrorKind::Type { .. }) && x.instance_path().to_string() == pointer
                });
                (type_miss, errs.len())
            });
            match branch {
                Some(errs)
                    if !errs.iter().any(|x| {
                        matches!(x.kind(), ValidationErrorKind::Type { .. }) && x.instance_path().to_string() == pointer
                    }) =>
                {
                    for x in errs {
                        translate(x, doc, spans, out);
                    }
                }
                _ => out.push(
                    Diagnostic::error(
                        diag::WRONG_TYPE,
                        &path,
                        format!("{here} has the wrong shape: found {}", describe(instance)),
                    )
                    .at(at)
                    .hint(shape_hint(&pointer)),
                ),
            }
        }
        _ => {
            let mut d = Diagnostic::error(diag::OUT_OF_RANGE, &path, format!("{here}: {}", e.masked())).at(at);
            if let Some((parent, key)) = pointer.rsplit_once('/')
                && let Some(desc) = field_description(parent, key)
            {
                d = d.hint(first_sentence(&desc));
            }
            out.push(d);
        }
    }
}

/// The constants a choice allows, when every branch is a constant (or `null`
/// for an optional value).
fn constants(e: &jsonschema::ValidationError<'_>, pointer: &str) -> Option<Vec<Value>> {
    match e.kind() {
        ValidationErrorKind::Constant { expected_value } => Some(vec![(**expected_value).clone()]),
        ValidationErrorKind::Enum { options } => options.as_array().cloned(),
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            let mut all = Vec::new();
            for branch in context {
                let null_branch = branch.iter().all(|x| {
                    matches!(x.kind(), ValidationErrorKind::Type { .. }) && x.instance_path().to_string() == pointer
                });
                if null_branch && !branch.is_empty() {
                    continue;
                }
                let [only] = branch.as_slice() else { return None };
                all.extend(constants(only, pointer)?);
            }
            (!all.is_empty()).then_some(all)
        }
        _ => None,
    }
}

fn article(t: &str) -> String {
    match t {
        "object" => "a mapping".into(),
        "array" => "a list".into(),
        "integer" => "an integer".into(),
        "null" => "empty".into(),
        t => format!("a {t}"),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("the boolean `{b}`"),
        Value::Number(n) => format!("the number `{n}`"),
        Value::String(s) => format!("the string \"{}\"", s.chars().take(40).collect::<String>()),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// The examples a field description gives: "e.g. `20/s`, `1000/m`".
fn example(desc: &str) -> String {
    let from = desc.find("e.g.").unwrap_or(0);
    let rest = &desc[from..];
    let end = rest[4.min(rest.len())..].find(". ").map_or(rest.len(), |i| i + 4);
    rest[..end].trim_end_matches('.').replace('\n', " ")
}

fn first_sentence(s: &str) -> String {
    let s = s.split("\n\n").next().unwrap_or(s).replace('\n', " ");
    s.split(". ").next().unwrap_or(&s).trim_end_matches('.').to_owned()
}

/// The subschema describing the value at an instance pointer.
fn schema_at(pointer: &str) -> Option<&'static Value> {
    let root = schema();
    let mut node = resolve(root, root)?;
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        node = step(root, node, &seg)?;
    }
    Some(node)
}

/// Follows `$ref`s, and into the object branch of an `Option<T>` or an
/// untagged enum, to the subschema that describes a value's fields.
pub fn resolve<'a>(root: &'a Value, node: &'a Value) -> Option<&'a Value> {
    let mut node = node;
    for _ in 0..16 {
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            node = root.pointer(r.strip_prefix('#')?)?;
            continue;
        }
        // `Option<T>` and untagged enums: follow the branch that is an object.
        if let Some(branches) = node.get("anyOf").or_else(|| node.get("oneOf")).and_then(Value::as_array) {
            let objectish = branches.iter().find_map(|b| {
                let b = resolve(root, b)?;
                (b.get("properties").is_some() || b.get("additionalProperties").is_some() || b.get("items").is_some())
                    .then_some(b)
            });
            if let Some(b) = objectish {
                node = b;
                continue;
            }
        }
        return Some(node);
    }
    None
}

fn step<'a>(root: &'a Value, node: &'a Value, seg: &str) -> Option<&'a Value> {
    let next = if let Some(p) = node.get("properties").and_then(|p| p.get(seg)) {
        p
    } else if let Some(items) = node.get("items") {
        items
    } else {
        node.get("additionalProperties").filter(|a| a.is_object())?
    };
    resolve(root, next)
}

fn allowed_keys(pointer: &str) -> Vec<String> {
    schema_at(pointer)
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn field_description(pointer: &str, name: &str) -> Option<String> {
    let s = schema_at(pointer)?.get("properties")?.get(name)?;
    let own = s.get("description").and_then(Value::as_str);
    let s = resolve(schema(), s).unwrap_or(s);
    own.or_else(|| s.get("description").and_then(Value::as_str)).map(str::to_owned)
}

fn shape_hint(pointer: &str) -> String {
    let described = pointer
        .rsplit_once('/')
        .and_then(|(parent, key)| field_description(parent, &key.replace("~1", "/").replace("~0", "~")));
    match described.as_deref().or_else(|| schema_at(pointer).and_then(|s| s.get("description")).and_then(Value::as_str))
    {
        Some(d) => first_sentence(d),
        None => "see the manifest reference in the README".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_valid_and_describes_fields() {
        assert!(validator().is_some());
        let d = field_description("/destinations/x", "purpose").unwrap();
        assert!(d.contains("consent purpose"), "{d}");
        assert!(allowed_keys("/sources/web").contains(&"schedule".to_owned()));
        assert!(allowed_keys("/identity/match").contains(&"block_on".to_owned()));
    }
}
