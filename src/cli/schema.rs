//! `cdp schema [--markdown]`: the manifest's JSON Schema as checked in, or
//! the field reference as Markdown, generated from the schema (so from the
//! doc comments of the manifest types). The README embeds the reference and
//! the table of diagnostic codes; a test holds them equal to these renderers.

use serde_json::Value;
use std::process::ExitCode;

use crate::manifest::diag;
use crate::manifest::schema::{resolve, schema, schema_text};

/// `cdp schema`.
pub fn run(markdown: bool) -> anyhow::Result<ExitCode> {
    if markdown {
        out!("{}", reference_markdown());
    } else {
        out!("{}", schema_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// The manifest reference as Markdown, one table row per field, generated from
/// the schema (so from the doc comments of the types). The README embeds it.
pub fn reference_markdown() -> String {
    let root = schema();
    let mut rows = Vec::new();
    if let Some(top) = resolve(root, root) {
        walk_fields(root, top, "", &mut rows, 0);
    }
    let mut out = String::from("| field | type | default | description |\n|---|---|---|---|\n");
    for (path, ty, default, desc) in rows {
        out.push_str(&format!("| `{path}` | {ty} | {default} | {desc} |\n"));
    }
    out
}

fn walk_fields(
    root: &Value,
    node: &Value,
    prefix: &str,
    rows: &mut Vec<(String, String, String, String)>,
    depth: usize,
) {
    if depth > 8 {
        return;
    }
    let Some(props) = node.get("properties").and_then(Value::as_object) else { return };
    let required: Vec<&str> = node
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (key, prop) in props {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let desc = prop
            .get("description")
            .or_else(|| resolve(root, prop).and_then(|r| r.get("description")))
            .and_then(Value::as_str)
            .unwrap_or("")
            .replace('\n', " ")
            .replace('|', "\\|");
        let default = if required.contains(&key.as_str()) {
            "**required**".to_owned()
        } else {
            match prop.get("default") {
                None | Some(Value::Null) => String::new(),
                Some(Value::Object(_)) => String::new(),
                Some(Value::Array(a)) if a.is_empty() => String::new(),
                Some(v) => format!("`{v}`"),
            }
        };
        rows.push((path.clone(), type_name(root, prop), default, desc));
        // Descend into objects, maps of objects and lists of objects.
        let target = unwrap_optional(root, prop);
        if let Some(obj) = object_branch(root, prop) {
            walk_fields(root, obj, &path, rows, depth + 1);
        } else if let Some(t) = target {
            if let Some(inner) =
                t.get("additionalProperties").filter(|a| a.is_object()).and_then(|a| object_branch(root, a))
            {
                walk_fields(root, inner, &format!("{path}.<name>"), rows, depth + 1);
            } else if let Some(inner) = t.get("items").and_then(|i| object_branch(root, i)) {
                walk_fields(root, inner, &format!("{path}[]"), rows, depth + 1);
            }
        }
    }
}

/// The object branch of a choice such as `merge: latest | {source_priority: …}`.
fn object_branch<'a>(root: &'a Value, node: &'a Value) -> Option<&'a Value> {
    let n = unwrap_optional(root, node)?;
    if n.get("properties").is_some() {
        return Some(n);
    }
    n.get("anyOf")
        .or_else(|| n.get("oneOf"))?
        .as_array()?
        .iter()
        .filter_map(|b| unwrap_optional(root, b))
        .find(|b| b.get("properties").is_some())
}

/// Follows `$ref` and `Option` (anyOf with null), but not real choices.
fn unwrap_optional<'a>(root: &'a Value, node: &'a Value) -> Option<&'a Value> {
    let mut node = node;
    for _ in 0..8 {
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            node = root.pointer(r.strip_prefix('#')?)?;
        } else if let Some(b) = node.get("anyOf").and_then(Value::as_array)
            && b.len() == 2
            && b.iter().any(|x| x.get("type") == Some(&Value::String("null".into())))
        {
            node = b.iter().find(|x| x.get("type") != Some(&Value::String("null".into())))?;
        } else {
            return Some(node);
        }
    }
    None
}

fn type_name(root: &Value, node: &Value) -> String {
    let Some(n) = unwrap_optional(root, node) else { return String::new() };
    if let Some(choices) = n.get("oneOf").and_then(Value::as_array) {
        // Documented enums mix `const` branches and one `enum` branch.
        let mut consts = Vec::new();
        for c in choices {
            match (c.get("const"), c.get("enum").and_then(Value::as_array)) {
                (Some(v), _) => consts.push(v),
                (None, Some(vs)) => consts.extend(vs),
                _ => {
                    consts.clear();
                    break;
                }
            }
        }
        if !consts.is_empty() {
            return consts.iter().map(|c| format!("`{}`", c.as_str().unwrap_or(""))).collect::<Vec<_>>().join(" \\| ");
        }
    }
    if let Some(e) = n.get("enum").and_then(Value::as_array) {
        return e.iter().map(|c| format!("`{}`", c.as_str().unwrap_or(""))).collect::<Vec<_>>().join(" \\| ");
    }
    if let Some(choices) = n.get("anyOf").or_else(|| n.get("oneOf")).and_then(Value::as_array) {
        return choices.iter().map(|c| type_name(root, c)).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(", or ");
    }
    match n.get("type") {
        Some(Value::String(t)) => match t.as_str() {
            "object" => match n.get("additionalProperties") {
                Some(a) if a.is_object() => format!("map of name → {}", type_name(root, a)),
                _ if n.get("properties").is_some() => "mapping".into(),
                _ => "mapping (plugin-defined)".into(),
            },
            "array" => format!("list of {}", n.get("items").map(|i| type_name(root, i)).unwrap_or_default()),
            "integer" => "integer".into(),
            other => other.into(),
        },
        Some(Value::Array(ts)) => {
            ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect::<Vec<_>>().join(" or ")
        }
        _ => "any".into(),
    }
}

/// The diagnostic codes as a Markdown table (embedded in the README).
pub fn codes_markdown() -> String {
    let mut out = String::from("| code | meaning |\n|---|---|\n");
    for c in diag::CODES {
        out.push_str(&format!("| `{}` | {} |\n", c.code, c.title));
    }
    out
}
