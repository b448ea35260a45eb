//! The audit log through the real binary: `cdp profile get|explain|unmerge`
//! append a row with the operating-system user (found or not), `cdp audit`
//! lists them (`--since`, `--limit`, both formats), and a profile command
//! whose row cannot be written shows nothing.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const MANIFEST: &str = r#"version: 1
name: audited
storage: { url: "sqlite://t.db" }
sources:
  crm:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { email: email, crm_id: crm }
      traits: { name: name }
identity:
  keys:
    email: { normalize: email }
    crm_id: {}
model:
  traits:
    name: { type: string }
"#;

/// `cdp` in `dir` as the OS user `user` (`None`: neither `$USER` nor `$LOGNAME` is set).
fn cdp_as(dir: &Path, user: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cdp"));
    c.current_dir(dir).env_remove("USER").env_remove("LOGNAME").args(args);
    if let Some(u) = user {
        c.env("USER", u);
    }
    c.output().expect("run cdp")
}

fn cdp(dir: &Path, args: &[&str]) -> Output {
    cdp_as(dir, Some("ada-ops"), args)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A store with one person: ada@example.org, crm id C1, and a second profile with crm id C2.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cdp.yaml"), MANIFEST).expect("manifest");
    std::fs::write(
        dir.path().join("crm.jsonl"),
        concat!(
            r#"{"id": "1", "at": "2026-11-01T10:00:00Z", "email": "ada@example.org", "crm": "C1", "name": "Ada"}"#,
            "\n",
            r#"{"id": "2", "at": "2026-11-01T11:00:00Z", "crm": "C2", "name": "Bo"}"#,
            "\n"
        ),
    )
    .expect("records");
    let o = cdp(dir.path(), &["ingest", "crm", "-i", "crm.jsonl", "-q"]);
    assert!(o.status.success(), "{}", text(&o));
    dir
}

fn audit_json(dir: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--format", "json"];
    args.extend_from_slice(extra);
    let o = cdp(dir, &args);
    assert!(o.status.success(), "{}", text(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).expect("json");
    doc["rows"].as_array().expect("rows").clone()
}

/// (actor, via, action, target, outcome) of each row.
fn summary(rows: &[Value]) -> Vec<[String; 5]> {
    rows.iter()
        .map(|r| ["actor", "via", "action", "target", "outcome"].map(|f| r[f].as_str().expect(f).to_owned()))
        .collect()
}

fn row(actor: &str, action: &str, target: &str, outcome: &str) -> [String; 5] {
    [actor, "cli", action, target, outcome].map(str::to_owned)
}

#[test]
fn profile_commands_leave_rows_that_cdp_audit_lists() {
    let dir = workspace();
    let d = dir.path();
    assert!(audit_json(d, &[]).is_empty(), "ingest reads no profile, so it leaves no row");

    let o = cdp(d, &["profile", "get", "email=Ada@Example.org", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let g: Value = serde_json::from_slice(&o.stdout).expect("golden record");
    assert_eq!(g["traits"]["name"]["value"], "Ada");
    let o = cdp(d, &["profile", "get", "email=nobody@example.org"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(o.stdout.is_empty() && text(&o).contains("no profile has email"), "{}", text(&o));
    let o = cdp(d, &["profile", "explain", "crm_id=C1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cdp(d, &["profile", "get", "shoe_size=44"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = cdp(d, &["profile", "unmerge", "crm_id=C1"]);
    assert!(o.status.success(), "{}", text(&o));

    let rows = audit_json(d, &[]);
    let s = summary(&rows);
    assert_eq!(s.len(), 5, "{rows:#?}");
    assert_eq!(s[0], row("os:ada-ops", "profile.get", "email=Ada@Example.org", "ok"), "the target as typed");
    assert_eq!(s[1], row("os:ada-ops", "profile.get", "email=nobody@example.org", "not_found"));
    assert_eq!(s[2], row("os:ada-ops", "profile.explain", "crm_id=C1", "ok"));
    assert!(s[3][4].starts_with("error: ") && s[3][4].contains("shoe_size"), "{:?}", s[3]);
    assert_eq!(s[4], row("os:ada-ops", "profile.unmerge", "crm_id=C1", "ok"));
    let now = chrono::Utc::now().timestamp_millis();
    for r in &rows {
        let (id, at) = (r["id"].as_i64().expect("id"), r["at"].as_i64().expect("at"));
        assert!(id > 0 && at <= now && at > now - 600_000, "{r}");
    }

    // Human: one line per row, RFC 3339 first.
    let o = cdp(d, &["audit"]);
    assert!(o.status.success(), "{}", text(&o));
    let human = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 5, "{human}");
    let fields: Vec<&str> = lines[1].split_whitespace().collect();
    assert!(chrono::DateTime::parse_from_rfc3339(fields[0]).is_ok(), "{human}");
    assert_eq!(fields[1..], ["os:ada-ops", "cli", "profile.get", "email=nobody@example.org", "not_found"], "{human}");

    // --since: a duration ago, a date, RFC 3339; --limit.
    assert_eq!(audit_json(d, &["--since", "1h"]).len(), 5);
    assert_eq!(audit_json(d, &["--since", "2000-01-01"]).len(), 5);
    assert!(audit_json(d, &["--since", "2999-01-01T00:00:00Z"]).is_empty());
    let o = cdp(d, &["audit", "--format", "json", "--limit", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(summary(doc["rows"].as_array().expect("rows")), s[..2]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("more rows follow"), "{}", text(&o));
    let o = cdp(d, &["audit", "--since", "yesterday"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("neither a time"), "{}", text(&o));
}

#[test]
fn without_user_or_logname_the_actor_is_still_the_os_user() {
    let dir = workspace();
    let o = cdp_as(dir.path(), None, &["profile", "get", "crm_id=C2"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = audit_json(dir.path(), &[]);
    let actor = rows[0]["actor"].as_str().expect("actor");
    let name = actor.strip_prefix("os:").unwrap_or_else(|| panic!("{actor}"));
    assert!(!name.is_empty() && name != "unknown", "{actor}: /proc and /etc/passwd name the uid");
}

#[test]
fn a_profile_command_whose_row_cannot_be_written_shows_nothing() {
    let dir = workspace();
    let d = dir.path();
    // The audit log (a SQLite store keeps it in `<file>-audit`) refuses rows
    // from now on (python3's sqlite3, as in export_cli).
    let refuse =
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'audit log offline'); END";
    let o = Command::new("python3")
        .arg("-c")
        .arg(format!("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute({refuse:?}); c.commit()"))
        .arg(d.join(format!("t.db{}", cdp::store::AUDIT_SUFFIX)))
        .output()
        .expect("python3 sqlite3");
    assert!(o.status.success(), "{}", text(&o));
    for args in [
        &["profile", "get", "email=ada@example.org", "--format", "json"][..],
        &["profile", "get", "email=ada@example.org"],
        &["profile", "explain", "email=ada@example.org"],
        &["profile", "get", "email=nobody@example.org"],
    ] {
        let o = cdp(d, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(o.stdout.is_empty(), "{args:?} printed: {}", String::from_utf8_lossy(&o.stdout));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("cannot write the audit log") && !err.contains("Ada"), "{args:?}: {err}");
    }
    let o = cdp(d, &["profile", "unmerge", "crm_id=C1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("was done, but the audit log cannot be written"), "{}", text(&o));
}

#[test]
fn an_export_is_audited_before_and_after() {
    let dir = workspace();
    let d = dir.path();
    let out = cdp(d, &["export", "profiles", "--format", "jsonl", "--quiet"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let rows = summary(&audit_json(d, &[]));
    assert_eq!(
        rows,
        vec![
            row("os:ada-ops", "export.profiles", "stdout", "started"),
            row("os:ada-ops", "export.profiles", "stdout", "ok: 2 profiles"),
        ]
    );
}
