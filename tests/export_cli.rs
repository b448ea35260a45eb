//! Identity at the edges, through the real binary: identifiers and traits
//! normalised before matching, `cdp export` of records and golden records,
//! `cdp ingest --max-rejects`, and matching that a crash interrupted finished
//! by the next run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

fn cdp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp")).current_dir(dir).args(args).output().expect("run cdp")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(dir: &Path, args: &[&str]) -> Output {
    let out = cdp(dir, args);
    assert!(out.status.success(), "cdp {args:?}: {}", text(&out));
    out
}

/// A temp dir with the benchmark manifest and its generated records, one file per source.
fn bench_workspace(n_people: usize) -> (tempfile::TempDir, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cdp.yaml"), cdp::bench::people::MANIFEST).expect("manifest");
    let ppl = cdp::bench::people::people(5, n_people);
    let recs = cdp::bench::people::records(5, &ppl, 6);
    for src in ["crm", "web", "pos"] {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.path().join(format!("{src}.jsonl"))).unwrap());
        for r in recs.iter().filter(|r| r.source == src) {
            writeln!(f, "{}", r.record).expect("write");
        }
    }
    (dir, recs.len())
}

fn jsonl(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes).lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// `(source, message id)` → profile id, from `cdp export records`.
fn exported_records(dir: &Path) -> BTreeMap<(String, String), String> {
    let out = ok(dir, &["export", "records", "--quiet"]);
    let mut by_record = BTreeMap::new();
    for r in jsonl(&out.stdout) {
        let key = (r["source"].as_str().unwrap().to_owned(), r["message_id"].as_str().unwrap().to_owned());
        let previous = by_record.insert(key.clone(), r["profile_id"].as_str().unwrap().to_owned());
        assert!(previous.is_none(), "{key:?} exported twice");
    }
    by_record
}

/// The clustering of records, independent of profile ids.
fn partition(by_record: &BTreeMap<(String, String), String>) -> BTreeSet<BTreeSet<(String, String)>> {
    let mut groups: HashMap<&str, BTreeSet<(String, String)>> = HashMap::new();
    for (k, p) in by_record {
        groups.entry(p.as_str()).or_default().insert(k.clone());
    }
    groups.into_values().collect()
}

#[test]
fn every_ingested_record_is_exported_once_with_the_profile_profile_get_shows() {
    let (dir, generated) = bench_workspace(60);
    let d = dir.path();
    let mut accepted = 0usize;
    for src in ["crm", "web", "pos"] {
        let out = ok(d, &["ingest", src, "-i", &format!("{src}.jsonl")]);
        let t = text(&out);
        let line = t.lines().find(|l| l.trim_start().starts_with("accepted")).expect("accepted line");
        accepted += line.split_whitespace().last().unwrap().parse::<usize>().unwrap();
    }
    assert_eq!(accepted, generated, "the generator's records all map");
    let out = ok(d, &["export", "records", "--quiet"]);
    let rows = jsonl(&out.stdout);
    assert_eq!(rows.len(), accepted);
    let by_record = exported_records(d);
    assert_eq!(by_record.len(), accepted);
    // The profile `profile get` shows for each record's anchor identifier.
    let mut shown: HashMap<(String, String), String> = HashMap::new();
    for r in &rows {
        let id =
            (r["identity"]["type"].as_str().unwrap().to_owned(), r["identity"]["value"].as_str().unwrap().to_owned());
        let profile = shown.entry(id.clone()).or_insert_with(|| {
            let out = ok(d, &["profile", "get", &format!("{}={}", id.0, id.1), "--format", "json"]);
            let g: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            g["profile_id"].as_str().unwrap().to_owned()
        });
        assert_eq!(r["profile_id"].as_str().unwrap(), profile, "{r}");
    }
    // CSV carries the same rows.
    ok(d, &["export", "records", "--format", "csv", "--out", "records.csv"]);
    let mut csv = csv::Reader::from_path(d.join("records.csv")).expect("csv");
    assert_eq!(csv.headers().unwrap().iter().collect::<Vec<_>>()[..3], ["source", "message_id", "at"]);
    assert_eq!(csv.records().count(), accepted);

    // Golden records: one line per profile, each identifier in exactly one.
    let out = ok(d, &["export", "profiles", "--out", "profiles.jsonl"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("exported"), "{}", text(&out));
    let profiles = jsonl(&std::fs::read(d.join("profiles.jsonl")).unwrap());
    let mut owner: HashMap<(String, String), String> = HashMap::new();
    for p in &profiles {
        assert!(p.get("events").is_none() && p["traits"].is_object() && p["consent"].is_object(), "{p}");
        for i in p["identities"].as_array().unwrap() {
            let id = (i["type"].as_str().unwrap().to_owned(), i["value"].as_str().unwrap().to_owned());
            assert!(owner.insert(id, p["profile_id"].as_str().unwrap().to_owned()).is_none());
        }
    }
    for (id, profile) in &shown {
        assert_eq!(owner.get(id), Some(profile), "{id:?}");
    }
    ok(d, &["export", "profiles", "--format", "csv", "--out", "profiles.csv", "--quiet"]);
    let mut csv = csv::Reader::from_path(d.join("profiles.csv")).expect("csv");
    let header: Vec<String> = csv.headers().unwrap().iter().map(str::to_owned).collect();
    assert!(header.contains(&"id.email".to_owned()) && header.contains(&"trait.first_name".to_owned()), "{header:?}");
    assert_eq!(csv.records().count(), profiles.len());
}

#[test]
fn max_rejects_fails_the_run_past_a_count_or_a_share_of_lines() {
    let (dir, _) = bench_workspace(1);
    let d = dir.path();
    let mut lines = Vec::new();
    for i in 0..10 {
        if i < 3 {
            lines.push(format!(r#"{{"id": "{i}", "crm_id": "C{i}", "birth_date": "not a date"}}"#));
        } else {
            lines.push(format!(r#"{{"id": "{i}", "crm_id": "C{i}"}}"#));
        }
    }
    std::fs::write(d.join("in.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = cdp(d, &["ingest", "crm", "-i", "in.jsonl", "--max-rejects", "2", "--no-match"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("3 of 10 lines rejected (30.0%), more than --max-rejects 2 lines"), "{}", text(&out));
    // The accepted records are stored all the same; a re-run adds nothing.
    for (limit, code) in [("3", 0), ("30%", 0), ("29.5%", 3), ("0", 3)] {
        let out = cdp(d, &["ingest", "crm", "-i", "in.jsonl", "--max-rejects", limit, "--no-match", "--quiet"]);
        assert_eq!(out.status.code(), Some(code), "--max-rejects {limit}: {}", text(&out));
    }
    let out = cdp(d, &["ingest", "crm", "-i", "in.jsonl", "--max-rejects", "lots"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("neither a number of lines"), "{}", text(&out));
}

#[test]
fn matching_left_pending_by_a_crash_is_finished_by_the_next_run() {
    // Reference: a clean run that matches after each file.
    let (clean, _) = bench_workspace(150);
    for src in ["crm", "pos"] {
        ok(clean.path(), &["ingest", src, "-i", &format!("{src}.jsonl"), "--quiet"]);
    }
    let want = partition(&exported_records(clean.path()));

    // The same files, with the batches committed but matching never run (as
    // when the process dies during matching): `--resume` reads no new line and
    // still finishes matching.
    let (dir, _) = bench_workspace(150);
    let d = dir.path();
    for src in ["crm", "pos"] {
        ok(d, &["ingest", src, "-i", &format!("{src}.jsonl"), "--no-match", "--quiet"]);
    }
    let before = partition(&exported_records(d));
    assert_ne!(before, want, "matching merges something in this data");
    let out = ok(d, &["ingest", "pos", "-i", "pos.jsonl", "--resume"]);
    let t = text(&out);
    assert!(t.contains("resumed after") && t.contains("probabilistic matching:"), "{t}");
    assert_eq!(partition(&exported_records(d)), want);
    // Nothing is pending any more: the next resume does not match again.
    let out = ok(d, &["ingest", "pos", "-i", "pos.jsonl", "--resume"]);
    assert!(!text(&out).contains("probabilistic matching:"), "{}", text(&out));
}

const NORMALISING: &str = r#"
version: 1
name: normalising
storage: { url: "sqlite://n.db" }
sources:
  crm:
    collector: {}
    map:
      message_id: id
      identities: { phone: phone, email: email, crm_id: crm_id }
      traits: { birth_date: born, postcode: postcode, last_name: last_name }
identity:
  keys:
    crm_id: { limit: 1 }
    phone: { normalize: e164, default_region: SE }
    email: { normalize: email, provider_rules: true }
model:
  traits:
    birth_date: { type: date, format: "%Y%m%d" }
    postcode: { type: string, normalize: [remove_whitespace, uppercase] }
    last_name: { type: string, normalize: [collapse_whitespace, strip_accents, lowercase] }
"#;

#[test]
fn phones_emails_and_traits_are_normalised_before_matching() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("cdp.yaml"), NORMALISING).unwrap();
    let lines = [
        r#"{"id": "1", "crm_id": "A", "phone": "+46 (0)70 123 45 67", "born": "19921119", "postcode": "se 114 55", "last_name": " Öberg  Ståhl"}"#,
        r#"{"id": "2", "phone": "070-123 45 67", "email": "Ada.Love+news@googlemail.com"}"#,
        r#"{"id": "3", "email": "adalove@gmail.com", "born": "1992-11-19"}"#,
        r#"{"id": "4", "crm_id": "B", "born": "19921341"}"#,
    ];
    std::fs::write(d.join("in.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = cdp(d, &["ingest", "crm", "-i", "in.jsonl"]);
    let t = text(&out);
    assert!(t.contains("accepted        3") && t.contains("is not a date in the format `%Y%m%d`"), "{t}");
    let out = ok(d, &["profile", "get", "email=ADA.LOVE@gmail.com", "--format", "json"]);
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: BTreeSet<String> = g["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{}={}", i["type"].as_str().unwrap(), i["value"].as_str().unwrap()))
        .collect();
    let want: BTreeSet<String> =
        ["crm_id=A", "phone=+46701234567", "email=adalove@gmail.com"].iter().map(|s| s.to_string()).collect();
    assert_eq!(ids, want, "{g}");
    assert_eq!(g["traits"]["birth_date"]["value"], "1992-11-19");
    assert_eq!(g["traits"]["postcode"]["value"], "SE11455");
    assert_eq!(g["traits"]["last_name"]["value"], "oberg stahl");

    // `validate` refuses options that cannot apply.
    let bad =
        NORMALISING.replace("{ type: date, format: \"%Y%m%d\" }", "{ type: string, format: \"%Y%m%d\" }").replace(
            "{ normalize: e164, default_region: SE }",
            "{ normalize: e164, default_region: XX, provider_rules: true }",
        );
    std::fs::write(d.join("bad.yaml"), bad).unwrap();
    let out = cdp(d, &["validate", "-f", "bad.yaml"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("`format` only applies to `date` and `timestamp` traits"), "{t}");
    assert!(t.contains("`XX` is not an ISO 3166 alpha-2 region"), "{t}");
    assert!(t.contains("`provider_rules` only applies to `normalize: email`"), "{t}");
}

/// A value from the SQLite store of a workspace (python3's sqlite3 reads it while cdp writes).
fn sqlite_text(db: &Path, sql: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); r=c.execute({sql:?}).fetchone(); print(r[0] if r else '')"
        ))
        .arg(db)
        .output()
        .expect("python3 sqlite3");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn sigkill_during_matching_is_finished_by_resume_as_a_clean_run_would() {
    // CRM contacts first, unmatched; matching after the store receipts links them.
    let (clean, _) = bench_workspace(1_500);
    ok(clean.path(), &["ingest", "crm", "-i", "crm.jsonl", "--quiet", "--no-match"]);
    ok(clean.path(), &["ingest", "pos", "-i", "pos.jsonl", "--quiet"]);
    let want = partition(&exported_records(clean.path()));

    let (dir, _) = bench_workspace(1_500);
    let d = dir.path();
    ok(d, &["ingest", "crm", "-i", "crm.jsonl", "--quiet", "--no-match"]);
    let lines = std::fs::read_to_string(d.join("pos.jsonl")).unwrap().lines().count();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(d)
        .args(["ingest", "pos", "-i", "pos.jsonl", "--quiet"])
        .spawn()
        .expect("spawn");
    // Every batch is committed once the file's cursor is at its last line;
    // matching runs after that. Kill it there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let db = d.join("bench.db");
    loop {
        std::thread::sleep(std::time::Duration::from_millis(5));
        if db.exists()
            && sqlite_text(&db, "SELECT position FROM cursors WHERE stream LIKE 'file:pos:%'") == lines.to_string()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the ingest never committed its last batch");
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    if sqlite_text(&db, "SELECT position FROM cursors WHERE stream = 'identity:matched'").is_empty() {
        // Killed before matching completed: the store is split until the next run.
        assert!(partition(&exported_records(d)) != want, "matching merges something in this data");
    }
    let out = ok(d, &["ingest", "pos", "-i", "pos.jsonl", "--resume"]);
    assert!(text(&out).contains("resumed after"), "{}", text(&out));
    assert!(partition(&exported_records(d)) == want, "the store differs from a clean run's");
}
