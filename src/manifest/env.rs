//! `${env:NAME}` interpolation in manifest strings. Secrets stay out of git:
//! the manifest names the variable, the process environment holds the value.
//! `$${` writes a literal `${`. Offline validation never needs the values: a
//! missing variable is a warning there and an error when cdp runs.

use super::diag::{self, Diagnostic};
use super::yaml::{SpanIndex, display_path, push_segment};
use serde_json::Value;

/// Whether a missing variable is an error (running) or a warning (validating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvMode {
    Validate,
    Run,
}

/// Replaces every `${env:NAME}` in the string values of `value`, reporting
/// malformed references and missing variables. Missing variables are left as
/// written so later checks still see that a reference was there.
pub fn interpolate(
    value: &mut Value,
    spans: &SpanIndex,
    lookup: &dyn Fn(&str) -> Option<String>,
    mode: EnvMode,
) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    walk(value, String::new(), spans, lookup, mode, &mut diags);
    diags
}

fn walk(
    value: &mut Value,
    pointer: String,
    spans: &SpanIndex,
    lookup: &dyn Fn(&str) -> Option<String>,
    mode: EnvMode,
    diags: &mut Vec<Diagnostic>,
) {
    match value {
        Value::String(s) if s.contains('$') => match expand(s, lookup) {
            Ok((out, missing)) => {
                for name in missing {
                    let d = if mode == EnvMode::Run {
                        Diagnostic::error(
                            diag::ENV_MISSING,
                            display_path(&pointer),
                            format!("environment variable `{name}` is not set"),
                        )
                    } else {
                        Diagnostic::warning(
                            diag::ENV_MISSING,
                            display_path(&pointer),
                            format!(
                                "environment variable `{name}` is not set here; cdp needs it where it uses this value"
                            ),
                        )
                    };
                    diags
                        .push(d.at(spans.value(&pointer)).hint(format!(
                            "export {name}=… in the environment of the commands that use this manifest"
                        )));
                }
                if let Some(out) = out {
                    *s = out;
                }
            }
            Err(msg) => diags.push(
                Diagnostic::error(diag::ENV_SYNTAX, display_path(&pointer), msg)
                    .at(spans.value(&pointer))
                    .hint("write `${env:NAME}` with NAME made of letters, digits and `_`; `$${` for a literal `${`"),
            ),
        },
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                walk(v, push_segment(&pointer, &i.to_string()), spans, lookup, mode, diags);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                walk(v, push_segment(&pointer, k), spans, lookup, mode, diags);
            }
        }
        _ => {}
    }
}

/// Expands one string. Returns the new string (None when any variable is
/// missing, so the reference stays visible) and the missing names.
fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<(Option<String>, Vec<String>), String> {
    let mut out = String::with_capacity(s.len());
    let mut missing = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').ok_or_else(|| format!("`{s}` has a `${{` that is never closed"))?;
            let inner = &r[..end];
            let name = inner
                .strip_prefix("env:")
                .ok_or_else(|| format!("`${{{inner}}}` is not a known reference; only `${{env:NAME}}` is"))?;
            let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("`{name}` is not a valid environment variable name"));
            }
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => missing.push(name.to_owned()),
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok((missing.is_empty().then_some(out), missing))
}

/// Whether a string holds an `${env:…}` reference (used to tell secrets written
/// in plain text from references).
pub fn is_reference(s: &str) -> bool {
    s.contains("${env:")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cret".to_owned())
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(expand("Bearer ${env:TOKEN}", &lookup).unwrap(), (Some("Bearer s3cret".into()), vec![]));
        assert_eq!(expand("cost $5, $${env:X}", &lookup).unwrap(), (Some("cost $5, ${env:X}".into()), vec![]));
        assert_eq!(expand("${env:NOPE}", &lookup).unwrap(), (None, vec!["NOPE".to_owned()]));
        assert!(expand("${env:1X}", &lookup).is_err());
        assert!(expand("${secret:X}", &lookup).is_err());
        assert!(expand("${env:X", &lookup).is_err());
    }

    #[test]
    fn missing_is_a_warning_when_validating() {
        let mut v = serde_json::json!({"server": {"admin_token": "${env:NOPE}"}});
        let d = interpolate(&mut v, &SpanIndex::default(), &lookup, EnvMode::Validate);
        assert_eq!(d.len(), 1);
        assert!(!d[0].is_error());
        assert_eq!(d[0].path, "server.admin_token");
        let d = interpolate(&mut v, &SpanIndex::default(), &lookup, EnvMode::Run);
        assert!(d[0].is_error());
    }
}
