//! Crash safety of `cdp ingest --resume`, through the real binary on SQLite
//! and PostgreSQL: an ingest of store receipts is killed with SIGKILL again
//! and again, in the middle of a batch and while probabilistic matching
//! links the receipts to CRM contacts, then resumed to the end; the store is
//! then the one a clean run leaves (records, identity partition and golden
//! records alike).
//!
//! Every kill is aimed at a pseudo-random moment (a seeded [`Rng`]) and
//! classified afterwards from what the store holds, so the counts printed and
//! asserted are where the kills landed, not where they were aimed. The store
//! only moves forward (the file's cursor, then matching), so the loop aims at
//! batches while lines remain and at matching after that.

mod support;

use cdp::rng::Rng;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// People in the generated workspace: 1,500 CRM contacts and 1,500 receipts.
const PEOPLE: usize = 1_500;
/// Lines per batch of the killed runs: 15 batches in the receipts file.
const BATCH: u64 = 100;
/// Kills in all; how many of them are aimed at batches first; which one is
/// aimed just after matching committed its links (the runs after it resume
/// matching from a store where some of its merges are done).
const KILLS: usize = 12;
const AIMED_AT_BATCHES: usize = 6;
const AIMED_AFTER_LINKS: usize = 9;
const SEED: u64 = 0x6b11_1009;

/// The kills are timed by how long this machine took to match a moment
/// before: one backend's loop at a time, so the other's does not skew that.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[derive(Clone, Copy, PartialEq, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

#[test]
fn sigkills_mid_batch_and_during_matching_then_resume_leave_a_clean_runs_store_on_sqlite() {
    kill_loop_equals_a_clean_run(Backend::Sqlite);
}

#[test]
fn sigkills_mid_batch_and_during_matching_then_resume_leave_a_clean_runs_store_on_postgres() {
    if std::env::var_os("CDP_SKIP_PG").is_some() {
        eprintln!("CDP_SKIP_PG is set: PostgreSQL skipped");
        return;
    }
    kill_loop_equals_a_clean_run(Backend::Postgres);
}

fn kill_loop_equals_a_clean_run(backend: Backend) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let rt = support::rt();

    // The reference: CRM contacts unmatched, then the receipts in one run that matches.
    let clean = Workspace::new(&rt, backend);
    ok(clean.path(), &["ingest", "crm", "-i", "crm.jsonl", "--quiet", "--no-match"]);
    let matching = clean.timed_matching_run(&rt);
    let want = Outcome::of(&clean, &rt);
    assert!(want.records.get("match").is_some_and(|n| *n > 0), "matching links something in this data");
    // Matching again over the matched store, as a resume does after a kill
    // that let matching commit its links (it finds nothing more to link).
    let rematch_from = Instant::now();
    ok(clean.path(), &["match"]);
    let rematch_run = rematch_from.elapsed();

    let ws = Workspace::new(&rt, backend);
    ok(ws.path(), &["ingest", "crm", "-i", "crm.jsonl", "--quiet", "--no-match"]);
    let startup = ws.startup();
    let timing = Timing { startup, matching, rematching: rematch_run.saturating_sub(startup) };
    let kills = ws.kill_repeatedly(&rt, timing);
    assert_eq!(kills.total(), KILLS);
    assert!(kills.mid_batch >= 3, "{backend:?}: too few kills landed mid-batch: {kills:?}");
    assert!(
        kills.matching() * 3 >= kills.total(),
        "{backend:?}: under a third of the kills landed in matching: {kills:?}"
    );
    assert!(kills.after_links >= 1, "{backend:?}: no kill landed after matching committed links: {kills:?}");

    let out = ok(ws.path(), &["ingest", "pos", "-i", "pos.jsonl", "--resume", "--batch", &BATCH.to_string()]);
    let t = text(&out);
    assert!(t.contains("resumed after") && t.contains("probabilistic matching:"), "{t}");
    let got = Outcome::of(&ws, &rt);
    let diffs = got.differences(&want);
    assert!(
        diffs.is_empty(),
        "{backend:?}: after {kills:?} the store differs from a clean run's:\n{}",
        diffs.join("\n")
    );
    let ms = |d: Duration| d.as_millis();
    println!(
        "{backend:?}: {} kills ({} mid-batch, {} during matching with no links committed by the killed run, \
         {} after it committed links), then the store equals a clean run's; {:.1}s \
         (startup {}ms, matching {}ms, rematching {}ms, seed {SEED:#x})",
        kills.total(),
        kills.mid_batch,
        kills.before_links,
        kills.after_links,
        started.elapsed().as_secs_f64(),
        ms(timing.startup),
        ms(timing.matching),
        ms(timing.rematching),
    );
}

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

fn jsonl(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes).lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// A scratch PostgreSQL database, dropped however the test ends.
struct ScratchPg(String);

impl Drop for ScratchPg {
    fn drop(&mut self) {
        support::rt().block_on(support::drop_db(Some(self.0.clone())));
    }
}

/// A running `cdp`, killed however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How long the phases a kill aims at take on this machine and backend.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// From spawn until a run that has nothing to read starts matching.
    startup: Duration,
    /// Matching over the whole store, from the last batch's commit to the exit.
    matching: Duration,
    /// Matching again once its links are committed (shorter: fewer profiles, nothing to link).
    rematching: Duration,
}

/// What the store holds between runs, read while `cdp` writes.
#[derive(Clone, Copy, Debug)]
struct State {
    /// The receipts file's cursor: its last committed line.
    cursor: u64,
    /// Match links committed (records of the `match` source).
    links: i64,
    /// Whether a matching run completed (`identity:matched` is written last).
    matched: bool,
}

/// Where the kills landed, as the store shows after each.
#[derive(Debug, Default)]
struct Kills {
    /// Batches were committed by the killed run and lines remained.
    mid_batch: usize,
    /// Every line was in and matching pending, with no links committed by the killed run.
    before_links: usize,
    /// As above, after the killed run committed match links.
    after_links: usize,
}

impl Kills {
    fn matching(&self) -> usize {
        self.before_links + self.after_links
    }

    fn total(&self) -> usize {
        self.mid_batch + self.matching()
    }
}

/// What a kill is aimed at.
#[derive(Debug)]
enum Aim {
    /// Once the run committed `batches` batches, `delay` into the next one.
    MidBatch { batches: u64, delay: Duration },
    /// `delay` into matching.
    Matching { delay: Duration },
    /// `delay` after matching committed its links, before it records that it is done.
    AfterLinks { delay: Duration },
}

/// A temp dir with the benchmark manifest, its people's CRM and POS files,
/// and a store of its own on the backend.
struct Workspace {
    dir: tempfile::TempDir,
    backend: Backend,
    store_url: String,
    lines: u64,
    _pg: Option<ScratchPg>,
}

impl Workspace {
    fn new(rt: &tokio::runtime::Runtime, backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store_url, pg) = match backend {
            Backend::Sqlite => (format!("sqlite://{}", dir.path().join("bench.db").display()), None),
            Backend::Postgres => {
                let (url, name) = rt.block_on(support::scratch_pg("killloop"));
                (url, Some(ScratchPg(name)))
            }
        };
        let manifest = cdp::bench::people::MANIFEST.replace("sqlite://bench.db", &store_url);
        std::fs::write(dir.path().join("cdp.yaml"), manifest).expect("manifest");
        let ppl = cdp::bench::people::people(5, PEOPLE);
        let recs = cdp::bench::people::records(5, &ppl, 6);
        let mut lines = 0;
        for src in ["crm", "pos"] {
            let file = std::fs::File::create(dir.path().join(format!("{src}.jsonl"))).expect("create");
            let mut f = std::io::BufWriter::new(file);
            for r in recs.iter().filter(|r| r.source == src) {
                writeln!(f, "{}", r.record).expect("write");
                lines += u64::from(src == "pos");
            }
        }
        Workspace { dir, backend, store_url, lines, _pg: pg }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A connection to the store for reading while `cdp` writes (it must exist).
    fn probe<'a>(&self, rt: &'a tokio::runtime::Runtime) -> Probe<'a> {
        sqlx::any::install_default_drivers();
        let pool = rt
            .block_on(sqlx::pool::PoolOptions::<sqlx::Any>::new().max_connections(1).connect(&self.store_url))
            .unwrap_or_else(|e| panic!("{}: {e}", self.store_url));
        Probe { rt, pool }
    }

    fn spawn(&self, args: &[&str]) -> Running {
        let child = Command::new(env!("CARGO_BIN_EXE_cdp"))
            .current_dir(self.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cdp");
        Running(child)
    }

    /// Ingests the receipts in one clean run that matches, timing its matching.
    fn timed_matching_run(&self, rt: &tokio::runtime::Runtime) -> Duration {
        let probe = self.probe(rt);
        let mut run = self.spawn(&["ingest", "pos", "-i", "pos.jsonl", "--quiet"]);
        let lines = self.lines;
        probe.wait_for(&mut run, "the clean run's last batch", |s| s.cursor == lines);
        let matching_from = Instant::now();
        let status = run.0.wait().expect("wait");
        assert!(status.success(), "the clean run failed: {status}");
        let matching = matching_from.elapsed();
        assert!(probe.state().matched, "the clean run completed matching");
        matching
    }

    /// How long `cdp ingest` takes to start when it has nothing to do: a
    /// resume of the CRM file, already all in.
    fn startup(&self) -> Duration {
        let started = Instant::now();
        ok(self.path(), &["ingest", "crm", "-i", "crm.jsonl", "--resume", "--no-match", "--quiet"]);
        started.elapsed()
    }

    /// Starts `cdp ingest pos --resume` and kills it with SIGKILL, [`KILLS`]
    /// times, each at a moment drawn from a seeded generator.
    fn kill_repeatedly(&self, rt: &tokio::runtime::Runtime, timing: Timing) -> Kills {
        let probe = self.probe(rt);
        let mut rng = Rng::new(SEED);
        let mut kills = Kills::default();
        let batch = BATCH.to_string();
        for n in 0..KILLS {
            let before = probe.state();
            assert!(!before.matched, "matching completed before kill {n}");
            let aim = self.aim(n, before, timing, &mut rng);
            let mut run = self.spawn(&["ingest", "pos", "-i", "pos.jsonl", "--resume", "--batch", &batch, "--quiet"]);
            self.wait_for_aim(&probe, &mut run, &aim, before, timing);
            if let Some(status) = run.0.try_wait().expect("try_wait") {
                panic!("{:?}: run {n} ended ({status}) before its kill, aimed {aim:?} with {timing:?}", self.backend);
            }
            run.0.kill().expect("SIGKILL");
            run.0.wait().expect("wait");
            let after = probe.state();
            assert!(!after.matched, "{:?}: run {n} completed matching before its kill ({aim:?})", self.backend);
            if after.cursor < self.lines {
                assert!(after.cursor > before.cursor, "{:?}: kill {n} landed before a batch ({aim:?})", self.backend);
                kills.mid_batch += 1;
            } else if after.links > before.links {
                kills.after_links += 1;
            } else {
                kills.before_links += 1;
            }
        }
        kills
    }

    /// Kill `n`'s aim: batches while lines remain (up to [`AIMED_AT_BATCHES`]),
    /// then matching, once just after its links.
    fn aim(&self, n: usize, before: State, timing: Timing, rng: &mut Rng) -> Aim {
        if before.cursor < self.lines && n < AIMED_AT_BATCHES {
            Aim::MidBatch { batches: 1 + rng.below(2), delay: Duration::from_micros(rng.below(8_000)) }
        } else if n == AIMED_AFTER_LINKS && before.links == 0 {
            Aim::AfterLinks { delay: Duration::from_micros(rng.below(10_000)) }
        } else {
            // In the first half of this run's matching: it ends well after
            // even on a machine that got faster since it was timed.
            let whole = if before.links == 0 { timing.matching } else { timing.rematching };
            let window = whole.as_micros() as u64 / 2;
            Aim::Matching { delay: Duration::from_micros(rng.below(window)) }
        }
    }

    /// Returns at the moment `aim` names, in the run started on `before`.
    fn wait_for_aim(&self, probe: &Probe, run: &mut Running, aim: &Aim, before: State, timing: Timing) {
        let lines = self.lines;
        match *aim {
            Aim::MidBatch { batches, delay } => {
                let target = (before.cursor + batches * BATCH).min(lines);
                probe.wait_for(run, "a batch", |s| s.cursor >= target);
                std::thread::sleep(delay);
            }
            Aim::Matching { delay } if before.cursor < lines => {
                probe.wait_for(run, "the last batch", |s| s.cursor == lines);
                std::thread::sleep(delay);
            }
            Aim::Matching { delay } => std::thread::sleep(timing.startup + delay),
            Aim::AfterLinks { delay } => {
                probe.wait_for(run, "match links", |s| s.links > 0);
                std::thread::sleep(delay);
            }
        }
    }
}

/// Reads the store while `cdp` writes it.
struct Probe<'a> {
    rt: &'a tokio::runtime::Runtime,
    pool: sqlx::AnyPool,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.rt.block_on(self.pool.close());
    }
}

impl Probe<'_> {
    fn state(&self) -> State {
        use sqlx::Row;
        let row = self
            .rt
            .block_on(
                sqlx::query(
                    "SELECT (SELECT position FROM cursors WHERE stream LIKE 'file:pos:%'), \
                     (SELECT COUNT(*) FROM records WHERE source = 'match'), \
                     (SELECT COUNT(*) FROM cursors WHERE stream = 'identity:matched')",
                )
                .fetch_one(&self.pool),
            )
            .expect("read the store");
        let cursor: Option<String> = row.get(0);
        State {
            cursor: cursor.map_or(0, |c| c.parse().expect("a line number")),
            links: row.get(1),
            matched: row.get::<i64, _>(2) > 0,
        }
    }

    /// Polls until `done` holds, failing if the run exits first.
    fn wait_for(&self, run: &mut Running, what: &str, done: impl Fn(State) -> bool) -> State {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.state();
            if done(s) {
                return s;
            }
            if let Some(status) = run.0.try_wait().expect("try_wait") {
                panic!("waiting for {what}, the run ended first ({status}) at {s:?}");
            }
            assert!(Instant::now() < deadline, "waited a minute for {what}: {s:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stored records per source, match links included.
    fn records(&self) -> BTreeMap<String, i64> {
        use sqlx::Row;
        let rows = self
            .rt
            .block_on(sqlx::query("SELECT source, COUNT(*) FROM records GROUP BY source").fetch_all(&self.pool))
            .expect("count records");
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }
}

type Id = (String, String);

/// What must not depend on where the kills landed.
struct Outcome {
    /// Stored records per source, match links included.
    records: BTreeMap<String, i64>,
    /// Whether a matching run completed (in the killed store, only the final
    /// resume can have: every kill is checked to leave it pending).
    matched: bool,
    /// The clustering of exported records, independent of profile ids.
    partition: BTreeSet<BTreeSet<Id>>,
    /// Each golden record's identifiers.
    groups: BTreeSet<BTreeSet<Id>>,
    /// Each golden record without its profile id or matching's clock, keys
    /// and identifiers sorted.
    profiles: BTreeSet<String>,
}

impl Outcome {
    fn of(ws: &Workspace, rt: &tokio::runtime::Runtime) -> Self {
        let probe = ws.probe(rt);
        let (records, matched) = (probe.records(), probe.state().matched);
        drop(probe);
        let out = ok(ws.path(), &["export", "records", "--quiet"]);
        let mut by_profile: HashMap<String, BTreeSet<Id>> = HashMap::new();
        let mut exported = BTreeSet::new();
        for r in jsonl(&out.stdout) {
            let key = (r["source"].as_str().unwrap().to_owned(), r["message_id"].as_str().unwrap().to_owned());
            assert!(exported.insert(key.clone()), "{key:?} exported twice");
            by_profile.entry(r["profile_id"].as_str().unwrap().to_owned()).or_default().insert(key);
        }
        let partition: BTreeSet<BTreeSet<Id>> = by_profile.into_values().collect();
        let stored: i64 = records.iter().filter(|(s, _)| *s != "match").map(|(_, n)| n).sum();
        assert_eq!(exported.len() as i64, stored, "every stored record is exported");

        let out = ok(ws.path(), &["export", "profiles", "--quiet"]);
        let mut groups = BTreeSet::new();
        let mut profiles = BTreeSet::new();
        for mut p in jsonl(&out.stdout) {
            let ids: BTreeSet<Id> = p["identities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| (i["type"].as_str().unwrap().to_owned(), i["value"].as_str().unwrap().to_owned()))
                .collect();
            groups.insert(ids);
            p.as_object_mut().unwrap().remove("profile_id");
            let ids = p["identities"].as_array_mut().unwrap();
            ids.sort_by_key(|i| (i["type"].to_string(), i["value"].to_string()));
            // An identifier a match link joined is first seen when matching
            // ran, by the clock: two clean runs differ there too.
            for i in ids.iter_mut().filter(|i| i["source"] == "match") {
                i["first_seen"] = Value::from("(when matching ran)");
            }
            profiles.insert(sorted_keys(p).to_string());
        }
        Outcome { records, matched, partition, groups, profiles }
    }

    /// Every way `self` differs from `want`, each with a few examples.
    fn differences(&self, want: &Outcome) -> Vec<String> {
        let mut out = Vec::new();
        if self.records != want.records {
            out.push(format!("records per source: {:?}, a clean run {:?}", self.records, want.records));
        }
        if self.matched != want.matched {
            out.push(format!("matching done: {}, in a clean run {}", self.matched, want.matched));
        }
        out.extend(difference("the identity partition", &self.partition, &want.partition));
        out.extend(difference("the profiles' identifiers", &self.groups, &want.groups));
        out.extend(difference("the golden records", &self.profiles, &want.profiles));
        out
    }
}

fn difference<T: Ord + std::fmt::Debug>(what: &str, got: &BTreeSet<T>, want: &BTreeSet<T>) -> Option<String> {
    (got != want).then(|| {
        let extra: Vec<&T> = got.difference(want).take(3).collect();
        let missing: Vec<&T> = want.difference(got).take(3).collect();
        format!(
            "{what}: {} entries, a clean run {}; {} only here, e.g. {extra:?}; {} only in the clean run, e.g. {missing:?}",
            got.len(),
            want.len(),
            got.difference(want).count(),
            want.difference(got).count(),
        )
    })
}

/// `v` with every object's keys in sorted order.
fn sorted_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<String, Value> = m.into_iter().map(|(k, v)| (k, sorted_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted_keys).collect()),
        v => v,
    }
}
