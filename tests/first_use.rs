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

fn sqlite(db: &Path, sql: &str) -> String {
    let o = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; r=sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone(); print(r[0] if r else '')")
        .arg(db)
        .arg(sql)
        .output()
        .expect("python3 sqlite3");
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

#[test]
fn explain_tells_a_probabilistic_link_the_same_way_in_both_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cdp.yaml"), cdp::bench::people::MANIFEST).expect("manifest");
    let ppl = cdp::bench::people::people(3, 300);
    for source in ["crm", "pos"] {
        let lines: Vec<String> = cdp::bench::people::records(3, &ppl, 10)
            .into_iter()
            .filter(|r| r.source == source)
            .map(|r| r.record.to_string())
            .collect();
        std::fs::write(dir.path().join("in.jsonl"), lines.join("\n") + "\n").expect("write");
        let o = cdp(dir.path(), &["ingest", source, "-i", "in.jsonl"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let db = dir.path().join("bench.db");
    let link = sqlite(&db, "SELECT message_id FROM records WHERE source = 'match' ORDER BY message_id LIMIT 1");
    let (first, _) = link.split_once('~').unwrap_or_else(|| panic!("no probabilistic link among 300 people: `{link}`"));
    let o = cdp(dir.path(), &["profile", "explain", first, "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let record = format!("match/{link}");
    let merges: Vec<&serde_json::Value> =
        v["ledger"].as_array().into_iter().flatten().filter(|e| e["record"] == record.as_str()).collect();
    assert!(!merges.is_empty(), "{v:#}");
    for e in merges {
        assert_eq!(e["rule"], "probabilistic (Fellegi-Sunter)", "{e}");
        assert!(e["probability"].as_f64().is_some_and(|p| p >= 0.95), "{e}");
    }
    let o = cdp(dir.path(), &["profile", "explain", first]);
    let human = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = human.lines().filter(|l| l.contains(&record)).collect();
    assert!(!lines.is_empty(), "{human}");
    for l in lines {
        assert!(l.contains("probabilistic (Fellegi-Sunter), probability "), "{l}");
        assert!(l.contains("weights: "), "{l}");
        assert!(!l.contains("deterministic"), "{l}");
    }
}

#[test]
fn plain_text_secrets_in_plugin_configs_are_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hook = root().join("plugins/dist/dest_webhook.wasm");
    let http = root().join("plugins/dist/source_http.wasm");
    let manifest = format!(
        r#"version: 1
name: secrets
plugins:
  hook: {{ path: {hook} }}
  http: {{ path: {http} }}
identity:
  keys:
    email: {{ normalize: email }}
consent:
  purposes: [email_marketing]
sources:
  api:
    plugin: http
    schedule: "0 0 * * * *"
    allow_hosts: [api.example.com]
    config: {{ url: "https://api.example.com/people", auth: {{ bearer: "sk_live_123" }} }}
    map:
      identities: {{ email: email }}
destinations:
  hook:
    plugin: hook
    purpose: email_marketing
    allow_hosts: [hooks.example.com]
    config:
      url: "https://hooks.example.com/x"
      signing_secret: "hunter2"
      headers: {{ Authorization: "Bearer abc", X-Tenant: "${{env:TENANT}}" }}
"#,
        hook = hook.display(),
        http = http.display()
    );
    std::fs::write(dir.path().join("cdp.yaml"), manifest).expect("write");
    let o = cdp(dir.path(), &["validate", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let mut secret_paths: Vec<&str> = v["diagnostics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["code"] == "CDP061")
        .filter_map(|d| d["path"].as_str())
        .collect();
    secret_paths.sort_unstable();
    assert_eq!(
        secret_paths,
        [
            "destinations.hook.config.headers.Authorization",
            "destinations.hook.config.signing_secret",
            "sources.api.config.auth.bearer"
        ],
        "{v:#}"
    );
    let o = cdp(dir.path(), &["plugin", "inspect", hook.to_str().expect("path"), "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["secrets"], serde_json::json!(["config.headers.*", "config.signing_secret"]), "{v:#}");
    let o = cdp(dir.path(), &["plugin", "inspect", http.to_str().expect("path")]);
    assert!(text(&o).contains("config.auth.bearer, config.auth.value"), "{}", text(&o));
}

#[test]
fn the_pin_line_of_plugin_build_pastes_into_a_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = cdp(dir.path(), &["plugin", "new", "my-dest", "--kind", "destination"]);
    assert!(o.status.success(), "{}", text(&o));
    let hints = text(&o);
    assert!(!hints.contains("cd my-dest && cdp") && hints.contains("cdp plugin build my-dest"), "{hints}");
    let o = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir.path())
        .env("CDP_CACHE_DIR", dir.path().join(".cache"))
        .env("CARGO_TARGET_DIR", dir.path().join("my-dest/target"))
        .args(["plugin", "build", "my-dest"])
        .output()
        .expect("run cdp");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let pin = out.lines().find(|l| l.contains("sha256: \"")).unwrap_or_else(|| panic!("{out}"));
    assert!(pin.trim_start().starts_with("my_dest: { path: my-dest/target/"), "{pin}");
    std::fs::write(dir.path().join("cdp.yaml"), format!("version: 1\nname: partner\nplugins:\n{pin}\n"))
        .expect("write");
    let o = cdp(dir.path(), &["validate", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn input_spellings_are_accepted_as_documented() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = MANIFEST
        .replace(
            "      traits: { tier: tier }",
            "      traits: { tier: tier, name: name }\n      consent: { email_marketing: optin }",
        )
        .replace(
            "    tier: { type: string, enum: [gold, silver] }",
            "    tier: { type: string, enum: [gold, silver] }\n    name: { type: string }",
        )
        .replace("model:", "consent:\n  purposes: [email_marketing]\nmodel:");
    std::fs::write(dir.path().join("cdp.yaml"), manifest).expect("manifest");
    let rows = [
        r#"{"id": "1", "member": "3001", "name": 123, "optin": "yes"}"#,
        r#"{"id": "2", "member": "3002", "optin": "Y"}"#,
        r#"{"id": "3", "member": "3003", "optin": "granted"}"#,
        r#"{"id": "4", "member": "3004", "optin": 1}"#,
        r#"{"id": "5", "member": "3005", "optin": "opt-out"}"#,
        r#"{"id": "6", "member": "3006", "optin": "maybe"}"#,
    ];
    std::fs::write(dir.path().join("in.jsonl"), rows.join("\n") + "\n").expect("write");
    let o = cdp(dir.path(), &["ingest", "loyalty", "-i", "in.jsonl"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("in.jsonl:6: rejected"), "{}", text(&o));
    assert!(text(&o).contains("rejected        1"), "{}", text(&o));
    let o = cdp(dir.path(), &["profile", "get", "loyalty_id=3001", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["traits"]["name"]["value"], "123");
    for (member, granted) in [("3001", true), ("3002", true), ("3003", true), ("3004", true), ("3005", false)] {
        let o = cdp(dir.path(), &["profile", "get", &format!("loyalty_id={member}"), "--format", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(v["consent"]["email_marketing"]["granted"], granted, "{member}: {v:#}");
    }
}
