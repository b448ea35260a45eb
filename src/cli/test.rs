//! `cdp test [DIR]`: runs the fixture files of DIR (default `tests/cdp`
//! beside the manifest) with [`crate::fixtures`]; a mismatch prints what was
//! expected and what came out, and the exit code is 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use super::load_manifest;

/// Where fixtures live unless DIR is given, relative to the manifest.
pub const DEFAULT_DIR: &str = "tests/cdp";

pub async fn run(manifest: &Path, dir: Option<&Path>) -> Result<ExitCode> {
    let r = load_manifest(manifest)?;
    let base = r.base.as_path();
    let dir: PathBuf = dir.map_or_else(|| base.join(DEFAULT_DIR), Path::to_path_buf);
    let files =
        crate::fixtures::files(&dir).with_context(|| format!("cannot read the fixtures in {}", dir.display()))?;
    if files.is_empty() {
        bail!("no fixture files (*.yaml) in {}", dir.display());
    }
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let scratch = tempfile::tempdir()?;
        let o = crate::fixtures::run(&r, file, scratch.path()).await;
        if o.passed() {
            passed += 1;
            outln!("ok    {} ({} checks)", file.display(), o.checks);
        } else {
            failed += 1;
            outln!("FAIL  {} ({} checks, {} failed)", file.display(), o.checks, o.failures.len());
            for f in &o.failures {
                outln!("      {}", f.what);
                outln!("        expected {}", f.expected);
                outln!("        actual   {}", f.actual);
            }
        }
    }
    outln!("{} fixture file(s): {passed} passed, {failed} failed", files.len());
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
