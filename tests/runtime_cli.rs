//! `cdp run`, `cdp sync` and `cdp status` end to end through the real
//! binary, with the shipped source-csv plugin in the sandbox and a SQLite
//! store: scheduled runs land in the run history, a changed manifest is
//! applied without a restart, an invalid one leaves the old one running and
//! shows in `cdp status`, a failing sync fails alone, SIGTERM drains.
//!
//! Needs the shipped plugins (`plugins/build.sh`, as `scripts/test` runs it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cdp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp")).current_dir(dir).args(args).output().expect("run cdp")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("plugin")))
}

const MEMBERS_HEADER: &str = "member_no,email,phone,first_name,last_name,tier,email_opt_in,updated_at\n";

/// Member `i`: gold when `i` is even, silver when odd.
fn member(i: usize) -> String {
    let tier = if i.is_multiple_of(2) { "gold" } else { "silver" };
    format!(
        "L-{:04},m{i}@example.org,070-{:03} 00 00,Ann{i},Lee,{tier},true,2026-11-01T09:00:00Z\n",
        1000 + i,
        i % 1000
    )
}

/// A temp dir with the source-csv plugin, a members file of `n` rows and a
/// manifest whose `loyalty` source runs on `schedule`.
fn workspace(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("plugins")).expect("plugins dir");
    std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
    let src = repo().join("plugins/dist/source_csv.wasm");
    assert!(src.exists(), "{} is missing: run plugins/build.sh", src.display());
    std::fs::copy(&src, dir.path().join("plugins/source_csv.wasm")).expect("copy plugin");
    let mut rows = String::from(MEMBERS_HEADER);
    for i in 0..n {
        rows.push_str(&member(i));
    }
    std::fs::write(dir.path().join("data/members.csv"), rows).expect("members");
    write_manifest(dir.path(), "* * * * * *", "tier == \"gold\"", "");
    dir
}

fn write_manifest(dir: &Path, schedule: &str, audience: &str, extra_sources: &str) {
    let sha = sha256(&dir.join("plugins/source_csv.wasm"));
    let text = format!(
        r#"version: 1
name: runtime-test
storage: {{ url: "sqlite://state/cdp.db" }}
plugins:
  csv: {{ path: plugins/source_csv.wasm, sha256: "{sha}", timeout: 5s }}
sources:
  loyalty:
    plugin: csv
    schedule: "{schedule}"
    config: {{ file: /input/members.csv, incremental: {{ by: offset }} }}
    mount: {{ "data": /input }}
    map:
      message_id: member_no
      timestamp: updated_at
      identities: {{ loyalty_id: member_no, email: email, phone: phone }}
      traits: {{ first_name: first_name, last_name: last_name, tier: tier }}
      consent: {{ email_marketing: email_opt_in }}
{extra_sources}identity:
  keys:
    loyalty_id: {{ limit: 1 }}
    email: {{ normalize: email, limit: 5 }}
    phone: {{ normalize: e164, default_region: SE, limit: 3 }}
  priority: [loyalty_id, email, phone]
model:
  traits:
    first_name: {{ type: string }}
    last_name: {{ type: string }}
    tier: {{ type: string, enum: [bronze, silver, gold] }}
consent:
  purposes: [email_marketing]
audiences:
  gold: {{ where: '{audience}' }}
"#
    );
    // Write and rename, as editors save.
    let tmp = dir.join(".cdp.yaml.tmp");
    std::fs::write(&tmp, text).expect("manifest");
    std::fs::rename(&tmp, dir.join("cdp.yaml")).expect("rename manifest");
}

fn status(dir: &Path) -> Value {
    let out = cdp(dir, &["status", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", text(&out)))
}

fn sync_status<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["syncs"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name)).unwrap_or(&Value::Null)
}

struct Runtime {
    child: Child,
    log: PathBuf,
}

impl Runtime {
    fn start(dir: &Path) -> Runtime {
        let log = dir.join("run.log");
        let child = Command::new(env!("CARGO_BIN_EXE_cdp"))
            .current_dir(dir)
            .args(["run", "--drain", "10s", "--listen", "127.0.0.1:0"])
            .env("CDP_LOG", "cdp=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start cdp run");
        Runtime { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `f` until it returns `Some` or `limit` passes; shows the runtime's log if it never does.
    fn wait_for<T>(&self, limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; cdp run logged:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status within `limit`.
    fn stop(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(start.elapsed() < limit, "cdp run did not stop within {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn run_syncs_on_schedule_reloads_changes_and_keeps_the_old_manifest_when_the_new_one_is_invalid() {
    let dir = workspace(20);
    let rt = Runtime::start(dir.path());
    let pid = rt.child.id();

    // The loyalty source runs every second; its first run takes all 20 rows.
    let first = rt.wait_for(Duration::from_secs(60), "a first successful run", || {
        let doc = status(dir.path());
        let s = sync_status(&doc, "loyalty");
        let all_in = cdp(dir.path(), &["profile", "get", "loyalty_id=L-1019"]).status.success();
        // `status` reads the store query by query, not as one snapshot: wait
        // until the applied manifest shows too.
        (s["last_run"]["state"] == "succeeded" && all_in && doc["manifest"]["sha256"].is_string()).then(|| doc.clone())
    });
    assert_eq!(first["runtime"]["alive"], true, "{first:#}");
    assert_eq!(first["runtime"]["pid"], pid);
    assert!(first["syncs"][0]["next_run"].as_i64().is_some(), "{first:#}");
    let out = cdp(dir.path(), &["profile", "get", "loyalty_id=L-1003", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));

    // New rows are picked up by a later run from the checkpoint.
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join("data/members.csv")).expect("open");
    for i in 20..25 {
        f.write_all(member(i).as_bytes()).expect("append");
    }
    drop(f);
    rt.wait_for(Duration::from_secs(30), "the appended rows", || {
        cdp(dir.path(), &["profile", "get", "loyalty_id=L-1024"]).status.success().then_some(())
    });

    // A changed schedule and audience: applied without a restart.
    let before =
        first["manifest"]["sha256"].as_str().unwrap_or_else(|| panic!("no applied manifest: {first:#}")).to_owned();
    let changed = Instant::now();
    write_manifest(dir.path(), "*/2 * * * * *", "tier == \"silver\"", "");
    let doc = rt.wait_for(Duration::from_secs(10), "the reload", || {
        let doc = status(dir.path());
        (doc["manifest"]["sha256"].as_str() != Some(&before) && doc["reload"]["ok"] == true).then_some(doc)
    });
    assert!(changed.elapsed() < Duration::from_secs(5), "reload took {:?}", changed.elapsed());
    assert_eq!(doc["runtime"]["pid"], pid, "{doc:#}");
    assert_eq!(sync_status(&doc, "loyalty")["schedule"], "*/2 * * * * *");
    // What the reload changed, as `cdp plan` names it (the two resolved manifests diffed).
    assert_eq!(doc["reload"]["changes"], serde_json::json!(["~sources.loyalty", "~audiences.gold"]), "{doc:#}");
    let human = text(&cdp(dir.path(), &["status"]));
    assert!(human.contains("~sources.loyalty ~audiences.gold"), "{human}");

    // An invalid manifest: the old one keeps running, status shows why.
    let applied = doc["manifest"]["sha256"].clone();
    write_manifest(dir.path(), "0 61 * * * *", "tier == \"silver\"", "");
    let doc = rt.wait_for(Duration::from_secs(10), "the failed reload", || {
        let doc = status(dir.path());
        (doc["reload"]["ok"] == false).then_some(doc)
    });
    assert_eq!(doc["manifest"]["sha256"], applied, "{doc:#}");
    let errors = doc["reload"]["errors"].to_string();
    assert!(errors.contains("CDP043"), "{doc:#}");
    let human = text(&cdp(dir.path(), &["status"]));
    assert!(human.contains("FAILED") && human.contains("CDP043"), "{human}");
    let last_id = sync_status(&doc, "loyalty")["last_run"]["id"].as_i64().expect("run id");
    rt.wait_for(Duration::from_secs(15), "a run under the old manifest", || {
        let doc = status(dir.path());
        (sync_status(&doc, "loyalty")["last_run"]["id"].as_i64() > Some(last_id)).then_some(())
    });

    // Fixed: applied.
    write_manifest(dir.path(), "* * * * * *", "tier == \"gold\"", "");
    rt.wait_for(Duration::from_secs(10), "the fixed manifest", || {
        let doc = status(dir.path());
        (doc["reload"]["ok"] == true && doc["manifest"]["sha256"] != applied).then_some(())
    });

    let exit = rt.stop(Duration::from_secs(20));
    assert!(exit.success(), "cdp run exited with {exit}");
    let doc = status(dir.path());
    assert_eq!(doc["runtime"]["alive"], false, "{doc:#}");
}

#[test]
fn sync_runs_once_resumes_from_its_checkpoint_and_full_rereads() {
    let dir = workspace(30);
    let out = cdp(dir.path(), &["sync", "loyalty"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("read 30, accepted 30, rejected 0"), "{}", text(&out));

    let out = cdp(dir.path(), &["sync", "loyalty"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("read 0, accepted 0"), "{}", text(&out));

    let out = cdp(dir.path(), &["sync", "loyalty", "--full"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("read 30, accepted 0, rejected 0, duplicates 30"), "{}", text(&out));

    let out = cdp(dir.path(), &["sync", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not a plugin source"), "{}", text(&out));

    let doc = status(dir.path());
    let s = sync_status(&doc, "loyalty");
    assert_eq!(s["last_run"]["trigger"], "manual", "{doc:#}");
    assert_eq!(s["state"], "succeeded", "{doc:#}");
}

#[test]
fn a_failing_sync_fails_alone_with_its_class_in_the_history() {
    let dir = workspace(10);
    let broken = r#"  broken:
    plugin: csv
    schedule: "* * * * * *"
    config: { file: /input/missing.csv }
    mount: { "data": /input }
    map:
      message_id: member_no
      identities: { loyalty_id: member_no }
"#;
    write_manifest(dir.path(), "* * * * * *", "tier == \"gold\"", broken);
    let rt = Runtime::start(dir.path());
    let doc = rt.wait_for(Duration::from_secs(60), "both syncs to have run", || {
        let doc = status(dir.path());
        let ok = sync_status(&doc, "loyalty")["last_run"]["state"] == "succeeded";
        let failed = sync_status(&doc, "broken")["last_error"]["class"].is_string();
        (ok && failed).then_some(doc)
    });
    let broken = sync_status(&doc, "broken");
    assert_eq!(broken["state"], "failed", "{doc:#}");
    assert!(broken["last_error"]["message"].as_str().unwrap_or("").contains("missing.csv"), "{doc:#}");
    // The healthy sync keeps its schedule: more runs follow.
    let id = sync_status(&doc, "loyalty")["last_run"]["id"].as_i64().expect("id");
    rt.wait_for(Duration::from_secs(15), "another loyalty run", || {
        let doc = status(dir.path());
        (sync_status(&doc, "loyalty")["last_run"]["id"].as_i64() > Some(id)).then_some(())
    });
    let log = rt.log();
    assert!(log.contains("sync failed"), "{log}");
    drop(rt);
}

fn members_of(dir: &Path, audience: &str, n: usize) -> usize {
    (0..n)
        .filter(|i| {
            let out = cdp(dir, &["profile", "get", &format!("loyalty_id=L-{:04}", 1000 + i), "--format", "json"]);
            assert!(out.status.success(), "{}", text(&out));
            let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
            doc["audiences"].as_array().is_some_and(|a| a.iter().any(|x| x == audience))
        })
        .count()
}

#[test]
fn plan_lists_changes_and_predicts_the_audience_moves_that_then_happen() {
    let dir = workspace(10);
    // Nothing applied yet: everything is new.
    let out = cdp(dir.path(), &["plan"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("+ sources.loyalty"), "{}", text(&out));
    assert!(text(&out).contains("syncs: a running `cdp run` restarts loyalty"), "{}", text(&out));

    let out = cdp(dir.path(), &["sync", "loyalty"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cdp(dir.path(), &["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("No changes."), "{}", text(&out));
    assert_eq!(members_of(dir.path(), "gold", 10), 5);

    // The `gold` audience's rule changes to select the silver members instead.
    write_manifest(dir.path(), "* * * * * *", "tier == \"silver\"", "");
    let out = cdp(dir.path(), &["plan", "--format", "json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).expect("plan json");
    let changes = plan["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 1, "{plan:#}");
    assert_eq!(changes[0]["section"], "audiences");
    assert_eq!(changes[0]["name"], "gold");
    assert_eq!(changes[0]["kind"], "changed");
    assert_eq!(changes[0]["fields"], serde_json::json!(["where"]));
    // An audience's rule is not what a sync reads: no sync restarts.
    assert_eq!(plan["impact"]["syncs"], serde_json::json!({"restart": [], "stop": []}), "{plan:#}");
    let gold = &plan["impact"]["audiences"][0];
    assert_eq!(
        (gold["enter"].as_u64(), gold["exit"].as_u64(), gold["stay"].as_u64()),
        (Some(5), Some(5), Some(0)),
        "{plan:#}"
    );
    assert_eq!(gold["enter_examples"].as_array().map(Vec::len), Some(3));
    let human = text(&cdp(dir.path(), &["plan"]));
    assert!(human.contains("~ audiences.gold (where)") && human.contains("5 enter, 5 exit, 0 stay"), "{human}");

    // Applied (by a sync): what the plan predicted is what happened.
    let out = cdp(dir.path(), &["sync", "loyalty"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(members_of(dir.path(), "gold", 10), 5);
    let out = cdp(dir.path(), &["profile", "get", "loyalty_id=L-1001", "--format", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["audiences"], serde_json::json!(["gold"]), "silver member 1 entered gold: {doc:#}");
    let out = cdp(dir.path(), &["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // A new schedule restarts the sync under a running `cdp run`.
    write_manifest(dir.path(), "*/5 * * * * *", "tier == \"silver\"", "");
    let out = cdp(dir.path(), &["plan", "--format", "json"]);
    let plan: Value = serde_json::from_slice(&out.stdout).expect("plan json");
    assert_eq!(plan["impact"]["syncs"], serde_json::json!({"restart": ["loyalty"], "stop": []}), "{plan:#}");
}

#[test]
fn test_passes_on_the_shipped_fixtures_and_fails_with_a_diff_on_a_broken_one() {
    let out = cdp(&repo(), &["test"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ok    "), "{}", text(&out));

    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = std::fs::read_to_string(repo().join("tests/cdp/quickstart.yaml")).expect("fixture");
    let broken =
        fixture.replace("traits: { tier: gold, first_name: Ada }", "traits: { tier: silver, first_name: Ada }");
    assert_ne!(broken, fixture);
    std::fs::write(dir.path().join("broken.yaml"), broken).expect("write");
    let manifest = repo().join("cdp.yaml");
    let out = cdp(&repo(), &["-f", manifest.to_str().expect("path"), "test", dir.path().to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("FAIL") && all.contains("profile loyalty_id=L-1001: trait tier"), "{all}");
    assert!(all.contains("expected \"silver\"") && all.contains("actual   \"gold\""), "{all}");
    assert!(all.contains("0 passed, 1 failed"), "{all}");
}

/// The identity partition of a store: each profile's identifiers, sorted.
fn partition(db: &Path) -> (i64, Vec<String>) {
    let script = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
records = c.execute("SELECT COUNT(*) FROM records").fetchone()[0]
groups = {}
for p, k, v in c.execute("SELECT profile_id, key, value FROM identities"):
    groups.setdefault(p, []).append(k + "=" + v)
print(records)
for g in sorted(",".join(sorted(g)) for g in groups.values()):
    print(g)
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(db).output().expect("python3 sqlite3");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.lines();
    let records = lines.next().and_then(|l| l.parse().ok()).expect("record count");
    (records, lines.map(str::to_owned).collect())
}

#[test]
fn sigkill_during_a_large_sync_loses_nothing_and_applies_nothing_twice() {
    let rows: usize = std::env::var("CDP_CRASH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(300_000);
    let dir = workspace(0);
    // Households: every 50th member shares the email of the one before, so
    // profiles merge across batches.
    let mut csv = String::from(MEMBERS_HEADER);
    for i in 0..rows {
        let email = if i % 50 == 49 { i - 1 } else { i };
        csv.push_str(&format!("M-{i:07},m{email}@example.org,,Ann,Lee,gold,true,2026-11-01T09:00:00Z\n"));
    }
    std::fs::write(dir.path().join("data/members.csv"), csv).expect("members");

    // The reference: one clean ingest of the same file into another store.
    let clean = std::fs::read_to_string(dir.path().join("cdp.yaml"))
        .expect("manifest")
        .replace("sqlite://state/cdp.db", "sqlite://clean/cdp.db");
    std::fs::write(dir.path().join("clean.yaml"), clean).expect("clean manifest");
    let out = cdp(dir.path(), &["-f", "clean.yaml", "ingest", "loyalty", "--file", "data/members.csv", "-q"]);
    assert!(out.status.success(), "{}", text(&out));
    let expected = partition(&dir.path().join("clean/cdp.db"));
    assert_eq!(expected.0, rows as i64);

    // Ten SIGKILLs at moments spread over the sync, restarting each time.
    let mut rng = cdp::rng::Rng::new(7);
    for kill in 0..10 {
        let rt = Runtime::start(dir.path());
        std::thread::sleep(Duration::from_millis(300 + rng.below(2_500)));
        let mut rt = rt;
        rt.child.kill().expect("SIGKILL");
        let _ = rt.child.wait();
        eprintln!("kill {kill} done");
    }
    // Then one runtime until the file is in.
    let rt = Runtime::start(dir.path());
    let last = format!("loyalty_id=M-{:07}", rows - 1);
    rt.wait_for(Duration::from_secs(600), "the whole file", || {
        let doc = status(dir.path());
        let done = sync_status(&doc, "loyalty")["last_run"]["state"] == "succeeded"
            && cdp(dir.path(), &["profile", "get", &last]).status.success();
        done.then_some(())
    });
    let exit = rt.stop(Duration::from_secs(30));
    assert!(exit.success(), "{exit}");
    let got = partition(&dir.path().join("state/cdp.db"));
    assert_eq!(got.0, expected.0, "records");
    assert!(
        got.1 == expected.1,
        "the identity partition differs from a clean run ({} vs {} profiles)",
        got.1.len(),
        expected.1.len()
    );
}

#[test]
fn a_source_plugin_that_spins_or_traps_fails_its_own_sync_only() {
    let dir = workspace(5);
    let guest = repo().join("plugins/target/wasm32-wasip2/release/test_hostile_source.wasm");
    assert!(guest.exists(), "{} is missing: run plugins/build.sh --test-guests", guest.display());
    std::fs::copy(&guest, dir.path().join("plugins/hostile_source.wasm")).expect("copy guest");
    let hostile = |name: &str, behave: &str| {
        format!(
            "  {name}:\n    plugin: hostile\n    schedule: \"* * * * * *\"\n    config: {{ behave: {behave} }}\n    map:\n      identities: {{ email: identities.email }}\n"
        )
    };
    write_manifest(
        dir.path(),
        "* * * * * *",
        "tier == \"gold\"",
        &(hostile("spinner", "spin") + &hostile("trapper", "trap")),
    );
    let text = std::fs::read_to_string(dir.path().join("cdp.yaml")).expect("manifest");
    let text = text.replace("plugins:\n", "plugins:\n  hostile: { path: plugins/hostile_source.wasm, timeout: 1s }\n");
    std::fs::write(dir.path().join("cdp.yaml"), text).expect("manifest");

    let rt = Runtime::start(dir.path());
    let doc = rt.wait_for(Duration::from_secs(60), "the spinner and the trapper to fail", || {
        let doc = status(dir.path());
        let class = |s: &str| sync_status(&doc, s)["last_error"]["class"].as_str().map(str::to_owned);
        (class("spinner").as_deref() == Some("timeout") && class("trapper").as_deref() == Some("trap")).then_some(doc)
    });
    assert!(
        sync_status(&doc, "spinner")["last_error"]["message"].as_str().unwrap_or("").contains("deadline"),
        "{doc:#}"
    );
    // The healthy sync ran and keeps running.
    let id = rt.wait_for(Duration::from_secs(30), "a loyalty run", || {
        let doc = status(dir.path());
        let s = sync_status(&doc, "loyalty");
        (s["last_run"]["state"] == "succeeded").then(|| s["last_run"]["id"].as_i64())
    });
    rt.wait_for(Duration::from_secs(15), "another loyalty run", || {
        let doc = status(dir.path());
        (sync_status(&doc, "loyalty")["last_run"]["id"].as_i64() > id).then_some(())
    });
    assert!(cdp(dir.path(), &["profile", "get", "loyalty_id=L-1004"]).status.success());
    let exit = rt.stop(Duration::from_secs(20));
    assert!(exit.success(), "{exit}");
}
