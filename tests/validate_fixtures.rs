//! `cdp validate` against the fixture corpus: every manifest under
//! `tests/fixtures/invalid/` is run through the real binary and its human
//! output (with line, column and caret) and exit code compared with the
//! blessed `.expected` file beside it. Re-bless after an intended change with
//!
//! ```sh
//! CDP_BLESS=1 cargo test --test validate_fixtures
//! ```
//! and review the diff of the `.expected` files like code.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Runs `cdp validate` on a file from inside its directory, with an empty
/// environment so `${env:…}` warnings do not depend on the machine.
fn validate(file: &Path, format: &str) -> (String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(file.parent().expect("parent"))
        .env_clear()
        .args(["validate", "--format", format, "-f"])
        .arg(file.file_name().expect("name"))
        .output()
        .expect("run cdp");
    (String::from_utf8_lossy(&out.stdout).into_owned(), out.status.code().unwrap_or(-1))
}

#[test]
fn invalid_manifests_match_blessed_output() {
    let bless = std::env::var_os("CDP_BLESS").is_some();
    let files = fixtures("tests/fixtures/invalid");
    assert!(files.len() >= 40, "the corpus has {} fixtures", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let (stdout, code) = validate(file, "human");
        let actual = format!("{stdout}exit: {code}\n");
        let expected_path = file.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &actual).expect("write expected");
            continue;
        }
        assert_eq!(code, 1, "{} should be invalid (exit 1), got {code}:\n{stdout}", file.display());
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != actual {
            failures.push(format!("--- {}\n+++ actual\n{actual}", expected_path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) differ; re-bless with `CDP_BLESS=1 cargo test --test validate_fixtures` if intended:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn json_format_has_the_stable_shape() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid/73-many-problems.yaml");
    let (stdout, code) = validate(&file, "json");
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(v["valid"], false);
    let diags = v["diagnostics"].as_array().expect("diagnostics");
    assert!(diags.len() >= 6, "{stdout}");
    for d in diags {
        for key in ["severity", "code", "message", "path", "line", "column", "hint"] {
            assert!(d.get(key).is_some(), "missing {key} in {d}");
        }
        assert!(d["line"].as_u64().unwrap() >= 1);
    }
}

#[test]
fn github_format_annotates_each_problem() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid/27-undefined-audience.yaml");
    let (stdout, code) = validate(&file, "github");
    assert_eq!(code, 1);
    assert!(stdout.starts_with("::error file=27-undefined-audience.yaml,line="), "{stdout}");
    assert!(stdout.contains("CDP033"), "{stdout}");
}

#[test]
fn missing_file_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["validate", "-f", "/nonexistent/cdp.yaml"])
        .output()
        .expect("run cdp");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn missing_file_is_cdp001_in_the_machine_formats() {
    let run = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_cdp"))
            .args(["validate", "--format", format, "-f", "/nonexistent/cdp.yaml"])
            .output()
            .expect("run cdp")
    };
    let out = run("json");
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    assert_eq!(v["valid"], false);
    assert_eq!(v["diagnostics"][0]["code"], "CDP001");
    let out = run("github");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("::error file=/nonexistent/cdp.yaml,line=1"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CDP001"));
}
