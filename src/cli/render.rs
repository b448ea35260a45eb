//! How `cdp validate` and every command that refuses an invalid manifest
//! show diagnostics: for a person (the source line with a caret under the
//! column), as JSON (the stable shape of `validate --format json`) and as
//! GitHub Actions annotations. The diagnostics themselves come from
//! `manifest::diag`; the runtime hands its load errors here to be shown.

use serde::Serialize;
use std::fmt::Write as _;

use crate::manifest::{Diagnostic, Severity};
use crate::runtime::LoadError;

/// A manifest the runtime could not load, as `cdp validate` prints its errors.
pub fn load_error(e: &LoadError) -> String {
    match e {
        LoadError::Read { .. } => format!("error: {e}\n"),
        LoadError::Invalid { path, source_text, diagnostics } => {
            let errors: Vec<_> = diagnostics.iter().filter(|d| d.is_error()).cloned().collect();
            human(path, source_text.as_deref(), &errors)
        }
    }
}

/// The stable JSON shape of `validate --format json`.
#[derive(Serialize)]
pub struct JsonReport<'a> {
    pub valid: bool,
    pub diagnostics: &'a [Diagnostic],
}

/// Renders diagnostics for a person: the source line with a caret under the column.
pub fn human(file: &str, source: Option<&str>, diags: &[Diagnostic]) -> String {
    let lines: Vec<&str> = source.map(|s| s.lines().collect()).unwrap_or_default();
    let mut out = String::new();
    for d in diags {
        let sev = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(out, "{sev}[{}]: {}", d.code, d.message);
        if d.line > 0 {
            let _ = writeln!(out, "  --> {file}:{}:{}", d.line, d.column);
        } else {
            let _ = writeln!(out, "  --> {file}");
        }
        if !d.path.is_empty() {
            let _ = writeln!(out, "   = at `{}`", d.path);
        }
        if let Some(text) = d.line.checked_sub(1).and_then(|i| lines.get(i)) {
            let text = truncate_line(text, d.column);
            let width = d.line.to_string().len();
            let _ = writeln!(out, "{:width$} |", "");
            let _ = writeln!(out, "{} | {}", d.line, text.0);
            let caret_col = d.column.saturating_sub(1).saturating_sub(text.1);
            let _ = writeln!(out, "{:width$} | {}^", "", " ".repeat(caret_col));
        }
        if let Some(h) = &d.hint {
            let _ = writeln!(out, "   = hint: {h}");
        }
        out.push('\n');
    }
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    if errors == 0 {
        let _ = writeln!(out, "{file}: valid ({warnings} warning{})", plural(warnings));
    } else {
        let _ =
            writeln!(out, "{file}: invalid ({errors} error{}, {warnings} warning{})", plural(errors), plural(warnings));
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Long lines (minified files) are cut around the column so output stays readable.
/// Returns the shown text and how many characters were cut from its start.
fn truncate_line(text: &str, column: usize) -> (String, usize) {
    const WIDTH: usize = 160;
    let count = text.chars().count();
    if count <= WIDTH {
        return (text.replace('\t', " "), 0);
    }
    let start = column.saturating_sub(WIDTH / 2).min(count - WIDTH);
    let shown: String = text.chars().skip(start).take(WIDTH).collect();
    (shown.replace('\t', " "), start)
}

/// GitHub Actions workflow commands: one annotation per diagnostic.
pub fn github(file: &str, diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diags {
        let kind = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut msg = format!("{} {}", d.code, d.message);
        if let Some(h) = &d.hint {
            msg.push_str(" (hint: ");
            msg.push_str(h);
            msg.push(')');
        }
        let _ = writeln!(
            out,
            "::{kind} file={},line={},col={},title={}::{}",
            escape_property(file),
            d.line.max(1),
            d.column.max(1),
            escape_property(d.code),
            escape_data(&msg)
        );
    }
    out
}

// Workflow command escaping, as the GitHub Actions toolkit does it.
fn escape_data(s: &str) -> String {
    s.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A")
}

fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// JSON output: `{"valid": bool, "diagnostics": [...]}`.
pub fn json(diags: &[Diagnostic]) -> String {
    let report = JsonReport { valid: !diags.iter().any(Diagnostic::is_error), diagnostics: diags };
    serde_json::to_string_pretty(&report).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::diag::{BAD_NAME, Loc, SYNTAX};

    #[test]
    fn human_output_points_at_the_column() {
        let src = "version: 1\nname: Bad Name\n";
        let d = Diagnostic::error(BAD_NAME, "name", "bad").at(Loc { line: 2, column: 7 });
        let out = human("cdp.yaml", Some(src), &[d]);
        assert!(out.contains("2 | name: Bad Name\n  |       ^"), "{out}");
        assert!(out.contains("cdp.yaml:2:7"));
    }

    #[test]
    fn github_output_escapes_newlines_and_commas() {
        let d = Diagnostic::error(SYNTAX, "", "a,b\nc").at(Loc { line: 3, column: 1 });
        let out = github("dir,x/cdp.yaml", &[d]);
        assert_eq!(out, "::error file=dir%2Cx/cdp.yaml,line=3,col=1,title=CDP004::CDP004 a,b%0Ac\n");
    }
}
