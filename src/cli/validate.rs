//! `cdp validate`: exit 0 valid (warnings allowed), 1 invalid, 2 could not run.

use super::Format;
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
            Err(e) => {
                eprintln!("error: {e}");
                if e.source.kind() == std::io::ErrorKind::NotFound {
                    eprintln!("hint: pass the manifest with `-f PATH`; the default is ./cdp.yaml");
                }
                return ExitCode::from(2);
            }
        }
    };
    let mut loaded = loaded;
    if let (Some(m), Some(spans)) = (&loaded.manifest, &loaded.spans) {
        match plugin_checks(m, base, spans) {
            Ok(diags) => loaded.diagnostics.extend(diags),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    let name = if stdin { "<stdin>".to_owned() } else { file.display().to_string() };
    let out = match format {
        Format::Human => diag::render_human(&name, loaded.source.as_deref(), &loaded.diagnostics),
        Format::Json => diag::render_json(&loaded.diagnostics) + "\n",
        Format::Github => diag::render_github(&name, &loaded.diagnostics),
    };
    print!("{out}");
    if loaded.has_errors() { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

/// Checks each plugin entry with its plugin (kind, config schema, `check`):
/// once the manifest itself is valid, since they need its plugins to load.
fn plugin_checks(
    m: &manifest::Manifest,
    base: &Path,
    spans: &manifest::yaml::SpanIndex,
) -> anyhow::Result<Vec<manifest::Diagnostic>> {
    if crate::plugin::entries::entries(m).is_empty() {
        return Ok(Vec::new());
    }
    let host = crate::plugin::Host::with_default_cache()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut diags = rt.block_on(crate::plugin::entries::check_manifest(&host, m, base, spans));
    diags.sort_by(|a, b| (a.line, a.column, a.code).cmp(&(b.line, b.column, b.code)));
    Ok(diags)
}
