//! `cdp ingest` and `cdp profile` end to end through the real binary:
//! bad input is rejected line by line while the rest goes in, a SIGKILL in the
//! middle of an ingest never leaves half a batch, and re-running an ingest
//! changes nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn cdp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp")).current_dir(dir).args(args).output().expect("run cdp")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A temp dir with the benchmark manifest (its store is `bench.db` beside it).
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cdp.yaml"), cdp::bench::people::MANIFEST).expect("manifest");
    dir
}

fn write_jsonl(path: &Path, source: &str, n_people: usize) -> usize {
    let ppl = cdp::bench::people::people(9, n_people);
    let recs = cdp::bench::people::records(9, &ppl, 10);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut n = 0;
    for r in recs.iter().filter(|r| r.source == source) {
        writeln!(f, "{}", r.record).expect("write");
        n += 1;
    }
    n
}

fn sqlite(dir: &Path, sql: &str) -> i64 {
    let v = sqlite_text(dir, sql);
    v.parse().unwrap_or_else(|_| panic!("{sql}: {v}"))
}

fn sqlite_text(dir: &Path, sql: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(c.execute({sql:?}).fetchone()[0] or 0)"
        ))
        .arg(dir.join("bench.db"))
        .output()
        .expect("python3 sqlite3");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn bad_lines_are_rejected_with_line_and_reason_and_the_rest_goes_in() {
    let dir = workspace();
    let input = dir.path().join("in.jsonl");
    let big = "x".repeat(20_000);
    let lines = [
        r#"{"id": "1", "at": "2026-01-01T00:00:00Z", "crm_id": "C1", "email": "ok@x.org", "first_name": "Ok"}"#
            .to_owned(),
        r#"{"id": "2", "at": "2026-01-01T00:00:00Z", "crm_id": "C2", "email": "#.to_owned(),
        r#"{"id": "3", "at": "2026-01-01T00:00:00Z", "crm_id": "C3", "birth_date": "not a date"}"#.to_owned(),
        format!(r#"{{"id": "4", "crm_id": "C4", "first_name": "{big}"}}"#),
        r#"{"id": "5", "email": "n/a"}"#.to_owned(),
        r#"[1, 2, 3]"#.to_owned(),
        r#"{"id": "7", "at": "2026-01-02T00:00:00Z", "crm_id": "C7", "phone": "070-765 43 21"}"#.to_owned(),
    ];
    std::fs::write(&input, lines.join("\n") + "\n").expect("write");
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "in.jsonl", "--rejects", "rejects.jsonl"]);
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("accepted        2"), "{all}");
    assert!(all.contains("rejected        5"), "{all}");
    let rejects = std::fs::read_to_string(dir.path().join("rejects.jsonl")).expect("rejects");
    let rejects: Vec<serde_json::Value> = rejects.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let by_line =
        |n: u64| rejects.iter().find(|r| r["line"] == n).map(|r| r["reason"].as_str().unwrap_or("").to_owned());
    assert!(by_line(2).expect("line 2").contains("malformed JSON"));
    assert!(by_line(3).expect("line 3").contains("birth_date"));
    assert!(by_line(4).expect("line 4").contains("limit"));
    assert!(by_line(5).expect("line 5").contains("no usable identifier"));
    assert!(by_line(6).expect("line 6").contains("object"));
    // The good records are there.
    let out = cdp(dir.path(), &["profile", "get", "phone=+46707654321", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(g["identities"][0]["type"], "crm_id");
    let out = cdp(dir.path(), &["profile", "get", "email=OK@x.org"]);
    assert!(text(&out).contains("\"Ok\""), "{}", text(&out));
    // Unknown source and unknown profile.
    let out = cdp(dir.path(), &["ingest", "nope", "-i", "in.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("`nope` is not a source"), "{}", text(&out));
    let out = cdp(dir.path(), &["profile", "get", "email=nobody@x.org"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn sigkill_mid_ingest_leaves_whole_batches_and_a_rerun_completes_idempotently() {
    let dir = workspace();
    let input: PathBuf = dir.path().join("web.jsonl");
    let total = write_jsonl(&input, "web", 6_000) as i64;
    assert!(total > 40_000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir.path())
        .args(["ingest", "web", "-i", "web.jsonl", "--batch", "500", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until some batches are committed, then kill without warning.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if dir.path().join("bench.db").exists() && sqlite(dir.path(), "SELECT COUNT(*) FROM cursors") > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ingest never committed a batch");
        if let Ok(Some(_)) = child.try_wait() {
            panic!("ingest finished before it could be killed; make the input larger");
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");

    // Every committed batch is whole: the cursor (last line of the last
    // committed batch) equals the records stored, and every record's
    // identifier exists.
    let stored = sqlite(dir.path(), "SELECT COUNT(*) FROM records");
    let cursor = sqlite(dir.path(), "SELECT CAST(position AS INTEGER) FROM cursors");
    assert!(stored > 0 && stored < total, "killed too late or too early: {stored} of {total}");
    assert_eq!(stored, cursor, "records and cursor committed together");
    assert_eq!(stored % 500, 0, "only whole batches of 500");
    assert_eq!(
        sqlite(
            dir.path(),
            "SELECT COUNT(*) FROM records r LEFT JOIN identities i ON i.id = r.identity_id WHERE i.id IS NULL"
        ),
        0
    );
    assert_eq!(sqlite_text(dir.path(), "PRAGMA integrity_check"), "ok");

    // Re-running finishes the job; running again changes nothing.
    let out = cdp(dir.path(), &["ingest", "web", "-i", "web.jsonl", "--batch", "500"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("duplicates      {stored} ")), "{}", text(&out));
    assert_eq!(sqlite(dir.path(), "SELECT COUNT(*) FROM records"), total);
    let snapshot = |d: &Path| {
        (
            sqlite(d, "SELECT COUNT(*) FROM identities"),
            sqlite(d, "SELECT COUNT(DISTINCT profile_id) FROM identities"),
            sqlite(d, "SELECT SUM(n) FROM trait_obs"),
            sqlite(d, "SELECT COUNT(*) FROM links"),
        )
    };
    let before = snapshot(dir.path());
    let out = cdp(dir.path(), &["ingest", "web", "-i", "web.jsonl", "--batch", "500"]);
    assert!(text(&out).contains("accepted        0"), "{}", text(&out));
    assert_eq!(snapshot(dir.path()), before);
    assert_eq!(sqlite(dir.path(), "SELECT COUNT(*) FROM records"), total);
}

#[test]
fn resume_skips_committed_lines_and_explain_and_unmerge_work() {
    let dir = workspace();
    std::fs::write(
        dir.path().join("crm.csv"),
        "id,at,crm_id,email,phone,first_name\n\
         1,2026-01-01T00:00:00Z,C1,a@x.org,,Ann\n\
         2,2026-01-02T00:00:00Z,,a@x.org,0701112233,\n\
         3,2026-01-03T00:00:00Z,C2,b@x.org,0701112233,Bo\n",
    )
    .expect("csv");
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "crm.csv"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "crm.csv", "--resume"]);
    assert!(text(&out).contains("resumed after   3 lines"), "{}", text(&out));
    // The phone is shared by two CRM ids: the earlier record keeps it.
    let out = cdp(dir.path(), &["profile", "explain", "crm_id=C1"]);
    let t = text(&out);
    assert!(t.contains("phone=+46701112233") && t.contains("joined by record crm/2"), "{t}");
    let out = cdp(dir.path(), &["profile", "explain", "crm_id=C2", "--format", "json"]);
    let x: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(x["ledger"].as_array().expect("ledger").iter().any(|e| e["kind"] == "conflict"), "{x}");
    let out = cdp(dir.path(), &["profile", "unmerge", "phone=0701112233"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cdp(dir.path(), &["profile", "get", "phone=0701112233", "--format", "json"]);
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(g["identities"].as_array().expect("ids").len(), 1);
}

#[test]
fn non_regular_files_are_refused_before_reading() {
    let dir = workspace();
    std::fs::create_dir(dir.path().join("dir.jsonl")).unwrap();
    let started = std::time::Instant::now();
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "dir.jsonl"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("it is a directory, not a regular file"), "{}", text(&out));
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "/dev/zero"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot open /dev/zero"), "{}", text(&out));
    assert!(text(&out).contains("it is a device, not a regular file"), "{}", text(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert!(!dir.path().join("bench.db").exists(), "refused before the store was touched");
}

#[test]
fn an_overlong_line_is_rejected_and_the_next_one_goes_in() {
    let dir = workspace();
    let mut input = format!(r#"{{"id": "1", "crm_id": "C1", "first_name": "{}"}}"#, "x".repeat(20 << 20));
    input.push('\n');
    input.push_str(r#"{"id": "2", "at": "2026-01-01T00:00:00Z", "crm_id": "C2"}"#);
    input.push('\n');
    std::fs::write(dir.path().join("in.jsonl"), &input).unwrap();
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "in.jsonl", "--rejects", "rejects.jsonl"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("accepted        1"), "{}", text(&out));
    let rejects = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap();
    let r: serde_json::Value = serde_json::from_str(rejects.lines().next().unwrap()).unwrap();
    assert_eq!(r["line"], 1);
    let limit = cdp::ingest::file::MAX_LINE_BYTES;
    assert_eq!(r["reason"], format!("line is {} bytes; the limit is {limit}", input.find('\n').unwrap()));

    // CSV: the row is rejected as it is read and the next one goes in.
    let csv = format!("id,crm_id,first_name\n3,C3,{}\n4,C4,Ok\n", "x".repeat(20 << 20));
    std::fs::write(dir.path().join("in.csv"), &csv).unwrap();
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "in.csv", "--rejects", "csv-rejects.jsonl"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("accepted        1"), "{}", text(&out));
    let rejects = std::fs::read_to_string(dir.path().join("csv-rejects.jsonl")).unwrap();
    let r: serde_json::Value = serde_json::from_str(rejects.lines().next().unwrap()).unwrap();
    assert_eq!(r["line"], 2);
    assert_eq!(r["reason"], format!("line is {} bytes; the limit is {limit}", (20 << 20) + 5));
}

#[test]
fn many_identifiers_in_one_record_are_rejected_quickly() {
    let dir = workspace();
    let emails: Vec<String> = (0..40_000).map(|i| format!("p{i}@example.org")).collect();
    let line = serde_json::json!({"id": "1", "crm_id": "C1", "email": emails});
    let same = serde_json::json!({"id": "2", "crm_id": "C2", "email": vec!["a@b.se"; 100_000]});
    std::fs::write(dir.path().join("in.jsonl"), format!("{line}\n{same}\n")).unwrap();
    let started = std::time::Instant::now();
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "in.jsonl", "--rejects", "rejects.jsonl"]);
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("accepted        1"), "{}", text(&out));
    let rejects = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap();
    assert!(rejects.contains(r#""line":1"#) && rejects.contains("more than 32 distinct identifiers"), "{rejects}");
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn out_of_range_timestamps_dates_and_duplicate_headers_are_rejected() {
    let dir = workspace();
    let lines = [
        r#"{"id": "1", "at": 1e300, "crm_id": "C1"}"#,
        r#"{"id": "2", "at": 9223372036854775807, "crm_id": "C2"}"#,
        r#"{"id": "3", "at": "2026-01-01T00:00:00Z", "crm_id": "C3", "birth_date": "-9999-01-01"}"#,
        r#"{"id": "4", "at": "+20000-01-01T00:00:00Z", "crm_id": "C4"}"#,
        r#"{"id": "5", "at": "9999-12-31T23:59:59Z", "crm_id": "C5", "birth_date": "0001-01-01"}"#,
    ];
    std::fs::write(dir.path().join("in.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "in.jsonl", "--rejects", "rejects.jsonl"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("accepted        1"), "{}", text(&out));
    let rejects = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap();
    let rejects: Vec<serde_json::Value> = rejects.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let reason = |n: u64| {
        rejects.iter().find(|r| r["line"] == n).map(|r| r["reason"].as_str().unwrap().to_owned()).unwrap_or_default()
    };
    for n in [1, 2, 4] {
        assert!(reason(n).contains("is not a timestamp between the years 1 and 9999"), "{n}: {}", reason(n));
    }
    assert!(reason(3).contains("outside the years 1 to 9999"), "{}", reason(3));
    assert_eq!(sqlite(dir.path(), "SELECT COUNT(*) FROM records"), 1);

    std::fs::write(dir.path().join("dup.csv"), "id,crm_id,email,email\n1,C9,a@x.org,b@x.org\n").unwrap();
    let out = cdp(dir.path(), &["ingest", "crm", "-i", "dup.csv", "--rejects", "dup.jsonl"]);
    let rejects = std::fs::read_to_string(dir.path().join("dup.jsonl")).unwrap();
    assert!(rejects.contains(r#""line":1"#) && rejects.contains("names column `email` twice"), "{rejects}");
    assert!(text(&out).contains("rejected        1"), "{}", text(&out));
}
