//! What a new user runs first, through the real binary: output into a pipe
//! that closes early, lookups written as people write identifiers, the
//! numbers a golden record shows, `ingest -q`, `profile unmerge` twice, and
//! the small contracts of the CLI (formats, colour, ignored stores).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cdp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir)
        .env("CDP_CACHE_DIR", dir.join(".cache"))
        .args(args)
        .output()
        .expect("run cdp")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

const MANIFEST: &str = r#"version: 1
name: first-use
storage: { url: "sqlite://t.db" }
sources:
  loyalty:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { loyalty_id: member, email: email }
      traits: { tier: tier }
  stays:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { loyalty_id: member }
      event: { name: stay_completed }
identity:
  keys:
    loyalty_id: { pattern: '^(?:L-)?(\d{4,10})$', limit: 1 }
    email: { normalize: email }
model:
  traits:
    tier: { type: string, enum: [gold, silver] }
  events:
    stay_completed: { properties: { nights: integer, revenue: number } }
    refund_issued: { properties: { amount: number } }
  computed:
    nights_total: { sum: stay_completed.nights }
    refunds_total: { sum: refund_issued.amount }
"#;

/// A store with one member: `L-2002` (stored as `2002`) with an email and two stays.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cdp.yaml"), MANIFEST).expect("manifest");
    std::fs::write(
        dir.path().join("members.csv"),
        "id,at,member,email,tier\nm1,2026-11-01T10:00:00Z,L-2002,Ada@Example.org,gold\n",
    )
    .expect("csv");
    std::fs::write(
        dir.path().join("stays.jsonl"),
        "{\"id\": \"s1\", \"at\": \"2026-11-02T10:00:00Z\", \"member\": \"L-2002\", \"nights\": 2, \"revenue\": 200}\n\
         {\"id\": \"s2\", \"at\": \"2026-11-09T10:00:00Z\", \"member\": \"2002\", \"nights\": 4, \"revenue\": 410.5}\n",
    )
    .expect("jsonl");
    for (source, file) in [("loyalty", "members.csv"), ("stays", "stays.jsonl")] {
        let o = cdp(dir.path(), &["ingest", source, "-i", file]);
        assert!(o.status.success(), "{}", text(&o));
    }
    dir
}

/// Runs cdp with its standard output read by nobody: the read end is closed
/// before cdp writes.
fn into_closed_pipe(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cdp");
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    (child.wait().expect("wait").code(), err)
}

#[test]
fn a_reader_that_goes_away_ends_cdp_quietly() {
    let dir = workspace();
    for args in [
        &["profile", "get", "loyalty_id=2002"][..],
        &["profile", "explain", "loyalty_id=2002"],
        &["schema", "--markdown"],
        &["schema"],
    ] {
        let (code, err) = into_closed_pipe(dir.path(), args);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?}: {err}");
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
    // validate keeps its verdict: the manifest is valid.
    let (code, err) = into_closed_pipe(dir.path(), &["validate"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn lookups_normalise_the_value_with_the_keys_own_rules() {
    let dir = workspace();
    for kv in ["loyalty_id=L-2002", "loyalty_id=2002", "email=ADA@example.org "] {
        let o = cdp(dir.path(), &["profile", "get", kv, "--format", "json"]);
        assert!(o.status.success(), "{kv}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(v["traits"]["tier"]["value"], "gold", "{kv}");
        let o = cdp(dir.path(), &["profile", "explain", kv]);
        assert!(o.status.success(), "{kv}: {}", text(&o));
    }
    let o = cdp(dir.path(), &["profile", "get", "loyalty_id=X-2002"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("does not match the key's pattern"), "{}", text(&o));
}

#[test]
fn computed_sums_show_integers_as_integers_and_no_negative_zero() {
    let dir = workspace();
    let o = cdp(dir.path(), &["profile", "get", "loyalty_id=2002", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["computed"]["refunds_total"].to_string(), "0.0", "{out}");
    assert!(v["computed"]["nights_total"].is_i64(), "{out}");
    assert_eq!(v["computed"]["nights_total"], 6);
    assert_eq!(v["computed"]["refunds_total"].as_f64(), Some(0.0));
    let o = cdp(dir.path(), &["profile", "get", "loyalty_id=2002"]);
    let human = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = |name: &str| human.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or("").to_owned();
    assert_eq!(line("nights_total").split_whitespace().nth(1), Some("6"), "{human}");
    assert_eq!(line("refunds_total").split_whitespace().nth(1), Some("0.0"), "{human}");
}

#[test]
fn ingest_quiet_still_reports_rejections_and_csv_headers_are_no_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cdp.yaml"), MANIFEST).expect("manifest");
    std::fs::write(
        dir.path().join("one.csv"),
        "id,at,member,email,tier\nm1,2026-11-01T10:00:00Z,2003,b@example.org,gold\n",
    )
    .expect("csv");
    let o = cdp(dir.path(), &["ingest", "loyalty", "-i", "one.csv"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ingested 1 record into"), "{}", text(&o));
    std::fs::write(
        dir.path().join("bad.csv"),
        "id,at,member,email,tier\nm2,2026-11-01T10:00:00Z,2004,c@example.org,platnum\n",
    )
    .expect("csv");
    let o = cdp(dir.path(), &["ingest", "loyalty", "-i", "bad.csv", "-q"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("bad.csv:2: rejected"), "{}", text(&o));
    assert!(err.contains("1 of 1 records rejected"), "{}", text(&o));
    assert!(o.stdout.is_empty(), "--quiet prints no summary: {}", text(&o));
}

#[test]
fn unmerging_an_isolated_identifier_again_changes_nothing() {
    let dir = workspace();
    let profiles = |dir: &Path| {
        let o = Command::new("python3")
            .arg("-c")
            .arg("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT COUNT(*) FROM profiles').fetchone()[0])")
            .arg(dir.join("t.db"))
            .output()
            .expect("python3");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let o = cdp(dir.path(), &["profile", "unmerge", "email=ada@example.org"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("split email=ada@example.org off"), "{}", text(&o));
    let before = profiles(dir.path());
    let o = cdp(dir.path(), &["profile", "unmerge", "email=Ada@Example.org"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already split off"), "{}", text(&o));
    assert_eq!(profiles(dir.path()), before);
}

#[test]
fn report_formats_are_the_ones_each_command_has() {
    let dir = workspace();
    let o = cdp(dir.path(), &["profile", "get", "loyalty_id=2002", "--format", "github"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("invalid value 'github'"), "{}", text(&o));
}

#[test]
fn logs_into_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm = root().join("plugins/dist/dest_file.wasm");
    let o = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir.path())
        .env("CDP_CACHE_DIR", dir.path().join(".cache"))
        .env("CDP_LOG", "debug")
        .args(["plugin", "test", wasm.to_str().expect("path"), "--config", "{path: /out/list.csv}"])
        .args(["--mount", &format!("{}:/out", dir.path().display())])
        .output()
        .expect("run cdp");
    let all = text(&o);
    assert!(all.contains("DEBUG") || all.contains("INFO"), "logs expected: {all}");
    assert!(!all.contains('\u{1b}'), "ANSI escape in piped output: {all}");
}

#[test]
fn stores_beside_example_manifests_are_ignored_by_git() {
    for path in ["examples/quickstart/.cdp/quickstart.db", "examples/travel/.cdp/cdp.db", ".cdp/cdp.db"] {
        let o = Command::new("git").current_dir(root()).args(["check-ignore", "-q", path]).output().expect("git");
        assert!(o.status.success(), "{path} is not ignored");
    }
}
