//! Secret fields of a plugin's config: the plugin's config schema marks them
//! `"x-secret": true`. `cdp validate` warns (CDP061) where a manifest writes
//! one in plain text instead of `${env:…}`; `cdp plugin inspect` lists them.
//! Pure functions over JSON values; loading the plugins is the caller's part.

use serde_json::Value;

/// The secret fields a config schema declares, as dotted paths below the
/// config: `signing_secret`, `headers.*` (every value of a map), `auth.bearer`.
pub fn secret_fields(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fields(schema, "", &mut out, 0);
    out.dedup();
    out
}

fn fields(schema: &Value, at: &str, out: &mut Vec<String>, depth: usize) {
    if depth > 32 {
        return;
    }
    if is_secret(schema) && !at.is_empty() && !out.iter().any(|o| o == at) {
        out.push(at.to_owned());
    }
    let join = |k: &str| if at.is_empty() { k.to_owned() } else { format!("{at}.{k}") };
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            fields(v, &join(k), out, depth + 1);
        }
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        fields(extra, &join("*"), out, depth + 1);
    }
    if let Some(items) = schema.get("items").filter(|v| v.is_object()) {
        fields(items, &format!("{at}[]"), out, depth + 1);
    }
    for branch in alternatives(schema) {
        fields(branch, at, out, depth + 1);
    }
}

/// The JSON pointers (below the config) of secret fields whose value is
/// written in the manifest rather than taken from `${env:…}`. `config` is the
/// config as written, before interpolation.
pub fn plain_secrets(schema: &Value, config: &Value) -> Vec<String> {
    let mut out = Vec::new();
    plain(schema, config, String::new(), &mut out, 0);
    out.sort();
    out.dedup();
    out
}

fn plain(schema: &Value, value: &Value, pointer: String, out: &mut Vec<String>, depth: usize) {
    if depth > 32 {
        return;
    }
    if is_secret(schema)
        && let Value::String(s) = value
        && !s.is_empty()
        && !super::env::is_reference(s)
    {
        out.push(pointer.clone());
    }
    for branch in alternatives(schema) {
        plain(branch, value, pointer.clone(), out, depth + 1);
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|v| v.is_object());
            for (k, v) in map {
                if let Some(s) = props.and_then(|p| p.get(k)).or(extra) {
                    plain(s, v, super::yaml::push_segment(&pointer, k), out, depth + 1);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items").filter(|v| v.is_object()) {
                for (i, v) in items.iter().enumerate() {
                    plain(s, v, format!("{pointer}/{i}"), out, depth + 1);
                }
            }
        }
        _ => {}
    }
}

fn is_secret(schema: &Value) -> bool {
    schema.get("x-secret").and_then(Value::as_bool) == Some(true)
}

fn alternatives(schema: &Value) -> impl Iterator<Item = &Value> {
    ["oneOf", "anyOf", "allOf"].into_iter().filter_map(|k| schema.get(k).and_then(Value::as_array)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "url": {"type": "string"},
            "signing_secret": {"type": "string", "x-secret": true},
            "headers": {"type": "object", "additionalProperties": {"type": "string", "x-secret": true}},
            "auth": {"oneOf": [
                {"type": "object", "properties": {"bearer": {"type": "string", "x-secret": true}}},
                {"type": "object", "properties": {"header": {"type": "string"}, "value": {"type": "string", "x-secret": true}}}
            ]}
        }})
    }

    #[test]
    fn lists_nested_and_map_secrets() {
        assert_eq!(secret_fields(&schema()), ["signing_secret", "headers.*", "auth.bearer", "auth.value"]);
    }

    #[test]
    fn finds_plain_text_secrets_only() {
        let config = json!({
            "url": "https://x.example",
            "signing_secret": "hunter2",
            "headers": {"Authorization": "Bearer abc", "X-Key": "${env:KEY}"},
            "auth": {"bearer": "sk_live_123"}
        });
        assert_eq!(plain_secrets(&schema(), &config), ["/auth/bearer", "/headers/Authorization", "/signing_secret"]);
        let safe = json!({"signing_secret": "${env:SECRET}", "auth": {"bearer": "${env:TOKEN}"}});
        assert!(plain_secrets(&schema(), &safe).is_empty());
    }
}
