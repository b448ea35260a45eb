//! `cdp validate`: exit 0 valid (warnings allowed), 1 invalid, 2 could not run.
//! It resolves the manifest as every other command does ([`crate::resolved`])
//! and adds the checks made with the plugins themselves.

use super::{Format, render};
use crate::manifest::{self, Options, diag};
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

pub fn run(file: &Path, format: Format) -> ExitCode {
    let stdin = file == Path::new("-");
    let base = if stdin { Path::new(".") } else { file.parent().unwrap_or(Path::new(".")) };
    let base = if base.as_os_str().is_empty() { Path::new(".") } else { base };
    let opts = Options::validate(base);
    let loaded = if stdin {
        let mut bytes = Vec::new();
        if let Err(e) = std::io::stdin().take(manifest::MAX_BYTES + 1).read_to_end(&mut bytes) {
            eprintln!("error: cannot read standard input: {e}");
            return ExitCode::from(2);
        }
        manifest::load_bytes(&bytes, &opts)
    } else {
        match manifest::load_file(file, &opts) {
            Ok(l) => l,
            Err(e) => return unreadable(file, &e, format),
        }
    };
    // The manifest as `cdp run` would resolve it; when it does not, the
    // part that typed, for the plugin checks of its intact entries.
    let (m, spans, source, mut diagnostics) = match crate::resolved::resolve_loaded(loaded, base) {
        Ok(r) => (Some(r.manifest), r.spans, Some(r.text), r.warnings),
        Err(l) => {
            let l = *l;
            (l.manifest.or(l.partial).map(std::sync::Arc::new), l.spans, l.source, l.diagnostics)
        }
    };
    if let (Some(m), Some(spans)) = (&m, &spans) {
        let intact = intact_entries(m, &diagnostics);
        match plugin_checks(&intact, base, spans, source.as_deref()) {
            Ok(diags) => diagnostics.extend(diags),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    let name = if stdin { "<stdin>".to_owned() } else { file.display().to_string() };
    let out = match format {
        Format::Human => render::human(&name, source.as_deref(), &diagnostics),
        Format::Json => render::json(&diagnostics) + "\n",
        Format::Github => render::github(&name, &diagnostics),
    };
    let verdict =
        if diagnostics.iter().any(manifest::Diagnostic::is_error) { ExitCode::from(1) } else { ExitCode::SUCCESS };
    match write_stdout(&out) {
        // A reader that went away (`| head`) does not change the verdict.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: cannot write the report: {e}");
            ExitCode::from(2)
        }
        _ => verdict,
    }
}

/// A manifest that cannot be read: CDP001 in the format asked for, exit 2.
fn unreadable(file: &Path, e: &manifest::ReadError, format: Format) -> ExitCode {
    let hint = if e.source.kind() == std::io::ErrorKind::NotFound {
        "pass the manifest with `-f PATH`; the default is ./cdp.yaml"
    } else {
        "check the file's permissions"
    };
    let d = manifest::Diagnostic::error(diag::READ, "", e.to_string()).at(diag::Loc { line: 1, column: 1 }).hint(hint);
    let name = file.display().to_string();
    let out = match format {
        Format::Human => {
            eprintln!("error[{}]: {e}\nhint: {hint}", diag::READ);
            return ExitCode::from(2);
        }
        Format::Json => render::json(std::slice::from_ref(&d)) + "\n",
        Format::Github => render::github(&name, std::slice::from_ref(&d)),
    };
    let _ = write_stdout(&out);
    ExitCode::from(2)
}

fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// The manifest with only the sources and destinations whose plugin checks
/// have intact inputs: the plugin entry typed and has no errors (its file is
/// there and matches its pin), and the entry's own `config` has none. The
/// rest of the manifest may have errors; those are reported already.
fn intact_entries(m: &manifest::Manifest, diags: &[manifest::Diagnostic]) -> manifest::Manifest {
    let broken = |pointer: &str| {
        let at = manifest::yaml::display_path(pointer);
        diags
            .iter()
            .filter(|d| d.is_error())
            .any(|d| d.path == at || d.path.strip_prefix(at.as_str()).is_some_and(|r| r.starts_with(['.', '['])))
    };
    let plugin_ok =
        |name: &str| m.plugins.contains_key(name) && !broken(&manifest::yaml::push_segment("/plugins", name));
    let config_ok = |section: &str, name: &str| {
        !broken(&manifest::yaml::push_segment(&manifest::yaml::push_segment(section, name), "config"))
    };
    let mut m = m.clone();
    m.sources.retain(|n, s| s.plugin.as_deref().is_none_or(|p| plugin_ok(p) && config_ok("/sources", n)));
    m.destinations.retain(|n, d| plugin_ok(&d.plugin) && config_ok("/destinations", n));
    m
}

/// Checks each plugin entry with its plugin (kind, config schema, `check`,
/// secrets written in plain text).
fn plugin_checks(
    m: &manifest::Manifest,
    base: &Path,
    spans: &manifest::yaml::SpanIndex,
    source: Option<&str>,
) -> anyhow::Result<Vec<manifest::Diagnostic>> {
    if crate::plugin::entries::entries(m).is_empty() {
        return Ok(Vec::new());
    }
    let host = crate::plugin::Host::with_default_cache()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut diags = rt.block_on(crate::plugin::entries::check_manifest(&host, m, base, spans));
    let raw = source.and_then(|s| manifest::yaml::parse(s).value).unwrap_or_default();
    diags.extend(rt.block_on(secret_checks(&host, m, base, spans, &raw)));
    diags.sort_by(|a, b| (a.line, a.column, a.code).cmp(&(b.line, b.column, b.code)));
    Ok(diags)
}

/// CDP061 for every config field the plugin marks secret (`x-secret`) that
/// the manifest writes in plain text. `raw` is the document before `${env:…}`
/// was replaced, so a value taken from the environment is not mistaken for one.
async fn secret_checks(
    host: &crate::plugin::Host,
    m: &manifest::Manifest,
    base: &Path,
    spans: &manifest::yaml::SpanIndex,
    raw: &serde_json::Value,
) -> Vec<manifest::Diagnostic> {
    let mut out = Vec::new();
    for entry in crate::plugin::entries::entries(m) {
        // A plugin that does not load was reported by the checks above.
        let Ok(plugin) = crate::plugin::entries::load(host, m, base, entry.plugin) else { continue };
        let Ok(spec) = plugin.spec(entry.plugin).await else { continue };
        let config_ptr = manifest::yaml::push_segment(&entry.pointer(), "config");
        let Some(config) = raw.pointer(&config_ptr) else { continue };
        for pointer in manifest::secrets::plain_secrets(&spec.config_schema, config) {
            let pointer = format!("{config_ptr}{pointer}");
            out.push(
                manifest::Diagnostic::warning(
                    diag::PLAIN_SECRET,
                    manifest::yaml::display_path(&pointer),
                    format!("a secret of plugin `{}` is written in plain text", entry.plugin),
                )
                .at(spans.value(&pointer))
                .hint("write `\"${env:NAME}\"` and keep the secret out of git"),
            );
        }
    }
    out
}
