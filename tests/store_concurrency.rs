//! Many writers at once, on both backends: four tasks in this process and
//! two `cdp ingest` processes apply overlapping people to one store at the
//! same time, and the result (identity partition and golden traits) equals
//! one serial run of the same records, with no error and no id collision.
//! A property test does the same over random splits and batch sizes.

mod support;

use cdp::bench::people::{self, Labeled};
use cdp::ingest::Mapper;
use cdp::manifest::{Manifest, Options, load_str};
use cdp::store::Store;
use cdp::store::ingest::IdentityConfig;
use proptest::prelude::*;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use support::{drop_db, rt, urls};

fn manifest(url: &str) -> (String, Manifest) {
    let text = people::MANIFEST.replace("sqlite://bench.db", url);
    let l = load_str(&text, &Options::validate("."));
    assert!(!l.has_errors(), "{:#?}", l.diagnostics);
    (text, l.manifest.expect("manifest"))
}

/// What must not depend on who wrote when: each profile's identifiers, and
/// its golden traits.
async fn snapshot(store: &Store, m: &Manifest) -> Vec<(Vec<String>, Vec<(String, Value)>)> {
    let mut out = Vec::new();
    for group in store.partition().await.expect("partition") {
        let (k, v) = group[0].split_once('=').expect("k=v");
        let p = store.find_profile(m, k, v).await.expect("find");
        let g = store.golden(m, p, 0).await.expect("golden");
        let mut traits: Vec<(String, Value)> = g.traits.iter().map(|(k, t)| (k.clone(), t.value.clone())).collect();
        traits.sort_by(|a, b| a.0.cmp(&b.0));
        out.push((group, traits));
    }
    out
}

/// Applies `recs` (one source's or mixed) in batches of `batch`.
async fn apply(store: &Store, m: &Manifest, recs: &[Labeled], batch: usize) {
    let cfg = IdentityConfig::from_manifest(m);
    for chunk in recs.chunks(batch.max(1)) {
        let mut mapped = Vec::new();
        for r in chunk {
            let mut mapper = Mapper::new(m, r.source).expect("source");
            mapped.push(mapper.map(&r.record, 0).unwrap_or_else(|e| panic!("{}: {e}", r.record)));
        }
        store.apply_batch(&cfg, mapped, None).await.expect("concurrent batch");
    }
}

fn write_jsonl(path: &Path, recs: &[&Labeled]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    for r in recs {
        writeln!(f, "{}", r.record).expect("write");
    }
}

#[test]
fn four_tasks_and_two_processes_give_the_serial_result() {
    let recs = people::records(5, &people::people(5, 1_200), 8);
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        for (backend, url, db) in urls(dir.path(), "conc").await {
            let (text, m) = manifest(&url);
            std::fs::write(dir.path().join("cdp.yaml"), &text).expect("manifest");
            let store = Arc::new(Store::connect(&url, dir.path()).await.expect("store"));
            // Two processes: every third CRM and web record; four tasks: the rest, interleaved.
            let (mut crm, mut web, mut rest) = (Vec::new(), Vec::new(), Vec::new());
            for (i, r) in recs.iter().enumerate() {
                match (i % 3, r.source) {
                    (0, "crm") => crm.push(r),
                    (0, "web") => web.push(r),
                    _ => rest.push(r.clone()),
                }
            }
            write_jsonl(&dir.path().join("crm.jsonl"), &crm);
            write_jsonl(&dir.path().join("web.jsonl"), &web);
            let procs: Vec<_> = [("crm", "crm.jsonl"), ("web", "web.jsonl")]
                .iter()
                .map(|(source, file)| {
                    std::process::Command::new(env!("CARGO_BIN_EXE_cdp"))
                        .current_dir(dir.path())
                        .args(["ingest", source, "--file", file, "--batch", "150", "--no-match", "--quiet"])
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .expect("spawn cdp")
                })
                .collect();
            let tasks: Vec<_> = (0..4)
                .map(|t| {
                    let part: Vec<Labeled> = rest.iter().skip(t).step_by(4).cloned().collect();
                    let (store, m) = (store.clone(), m.clone());
                    tokio::spawn(async move { apply(&store, &m, &part, 97).await })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
            for p in procs {
                let out = p.wait_with_output().expect("cdp");
                assert!(
                    out.status.success(),
                    "{backend}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let got = snapshot(&store, &m).await;
            drop(store);
            drop_db(db).await;

            // The serial run of the same records, on the same backend.
            let serial_dir = tempfile::tempdir().expect("tempdir");
            let serial_url = match backend {
                "sqlite" => format!("sqlite://{}", serial_dir.path().join("serial.db").display()),
                _ => support::scratch_pg("serial").await.0,
            };
            let serial = Store::connect(&serial_url, serial_dir.path()).await.expect("serial store");
            apply(&serial, &m, &recs, recs.len()).await;
            let want = snapshot(&serial, &m).await;
            assert_eq!(got.len(), want.len(), "{backend}: profile count");
            assert!(got == want, "{backend}: concurrent result differs from the serial one");
            if let Some(name) = serial_url.rsplit('/').next().filter(|_| backend == "postgres") {
                drop(serial);
                drop_db(Some(name.to_owned())).await;
            }
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Random splits of the records over four concurrent tasks, in random
    /// batch sizes, give the serial result on both backends.
    #[test]
    fn random_interleavings_give_the_serial_result(seed in 0u64..1000, batch in 1usize..40, people_n in 20usize..80) {
        let recs = people::records(seed, &people::people(seed, people_n), 6);
        rt().block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            for (backend, url, db) in urls(dir.path(), "prop").await {
                let (_, m) = manifest(&url);
                let store = Arc::new(Store::connect(&url, dir.path()).await.expect("store"));
                let mut s = seed | 1;
                let mut parts: Vec<Vec<Labeled>> = vec![Vec::new(); 4];
                for r in &recs {
                    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                    parts[(s % 4) as usize].push(r.clone());
                }
                let tasks: Vec<_> = parts
                    .into_iter()
                    .map(|part| {
                        let (store, m) = (store.clone(), m.clone());
                        tokio::spawn(async move { apply(&store, &m, &part, batch).await })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
                let got = snapshot(&store, &m).await;
                drop(store);
                drop_db(db).await;
                let serial_dir = tempfile::tempdir().expect("tempdir");
                let serial = Store::connect("sqlite://s.db", serial_dir.path()).await.expect("serial");
                apply(&serial, &m, &recs, recs.len()).await;
                let want = snapshot(&serial, &m).await;
                assert!(got == want, "{backend}: seed {seed} batch {batch}: differs from the serial run");
            }
        });
    }
}

/// Two `cdp ingest` processes on one SQLite file at once: the second waits
/// for the write lock between the first's batches; both complete and every
/// record is stored, with the partition of a serial run.
#[test]
fn two_ingest_processes_share_one_sqlite_file() {
    let recs = people::records(11, &people::people(11, 2_000), 8);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    let (text, m) = manifest(&url);
    std::fs::write(dir.path().join("cdp.yaml"), &text).expect("manifest");
    let crm: Vec<&Labeled> = recs.iter().filter(|r| r.source == "crm").collect();
    let web: Vec<&Labeled> = recs.iter().filter(|r| r.source == "web").collect();
    write_jsonl(&dir.path().join("crm.jsonl"), &crm);
    write_jsonl(&dir.path().join("web.jsonl"), &web);
    let procs: Vec<_> = [("crm", "crm.jsonl"), ("web", "web.jsonl")]
        .iter()
        .map(|(source, file)| {
            std::process::Command::new(env!("CARGO_BIN_EXE_cdp"))
                .current_dir(dir.path())
                .args(["ingest", source, "--file", file, "--batch", "500", "--no-match", "--quiet"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn cdp")
        })
        .collect();
    for p in procs {
        let out = p.wait_with_output().expect("cdp");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    rt().block_on(async {
        let store = Store::connect(&url, dir.path()).await.expect("store");
        let got = snapshot(&store, &m).await;
        let serial = Store::connect("sqlite://serial.db", dir.path()).await.expect("serial");
        let both: Vec<Labeled> = crm.iter().chain(&web).map(|r| (*r).clone()).collect();
        apply(&serial, &m, &both, both.len()).await;
        use sqlx::Row;
        let count = |s: &Store| {
            let pool = s.pool().clone();
            async move {
                sqlx::query("SELECT COUNT(*) FROM records").fetch_one(&pool).await.and_then(|r| r.try_get::<i64, _>(0))
            }
        };
        assert_eq!(count(&store).await.expect("count"), (crm.len() + web.len()) as i64, "every record stored");
        assert!(got == snapshot(&serial, &m).await, "the serial run's profiles");
    });
}

/// Reads never wait for the writer on SQLite: golden-record lookups while a
/// `cdp ingest` process writes the same file (its records pile onto the
/// profiles being read). The p50 and p99 are printed;
/// `CDP_P99_RECORDS` sets the ingest's size (200,000 by default; the README
/// figure is from 1,000,000 with a release build).
#[test]
fn profile_reads_stay_fast_during_a_large_sqlite_ingest() {
    let n: usize = std::env::var("CDP_P99_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let recs = people::records(13, &people::people(13, n.div_ceil(8)), 8);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("big.db").display());
    let (text, m) = manifest(&url);
    std::fs::write(dir.path().join("cdp.yaml"), &text).expect("manifest");
    let crm: Vec<&Labeled> = recs.iter().filter(|r| r.source == "crm").collect();
    let web: Vec<&Labeled> = recs.iter().filter(|r| r.source == "web").take(n).collect();
    write_jsonl(&dir.path().join("crm.jsonl"), &crm[..crm.len() / 10]);
    write_jsonl(&dir.path().join("web.jsonl"), &web);
    let cdp = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cdp")).current_dir(dir.path()).args(args).output().expect("cdp")
    };
    let first = cdp(&["ingest", "crm", "--file", "crm.jsonl", "--no-match", "--quiet"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let emails: Vec<String> =
        crm[..crm.len() / 10].iter().filter_map(|r| r.record["email"].as_str().map(str::to_owned)).take(200).collect();
    let mut ingest = std::process::Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir.path())
        .args(["ingest", "web", "--file", "web.jsonl", "--no-match", "--quiet"])
        .spawn()
        .expect("spawn ingest");
    let times = rt().block_on(async {
        let store = Store::connect(&url, dir.path()).await.expect("reader");
        let mut times = Vec::new();
        let mut i = 0;
        while ingest.try_wait().expect("wait").is_none() {
            let started = std::time::Instant::now();
            let p = store.find_profile(&m, "email", &emails[i % emails.len()]).await.expect("find");
            store.golden(&m, p, 10).await.expect("golden");
            times.push(started.elapsed().as_secs_f64() * 1e3);
            i += 1;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        times
    });
    assert!(ingest.wait().expect("ingest").success());
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    eprintln!(
        "profile reads during a {}-record SQLite ingest: {} reads, p50 {:.1} ms, p99 {p99:.1} ms, max {:.1} ms",
        web.len(),
        sorted.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    assert!(sorted.len() > 50, "the ingest ended before reads could be measured");
    // A read that waited for the writer would wait for a whole batch
    // (hundreds of milliseconds); the bound leaves room for a loaded test
    // machine, `CDP_P99_MS` tightens it (the target is 50 ms).
    let bound: f64 = std::env::var("CDP_P99_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(200.0);
    assert!(p99 < bound, "p99 {p99:.1} ms");
}

/// A second SQLite writer that cannot get the write lock in time says which
/// process holds the store; once the holder lets go it goes through.
#[test]
fn a_waiting_sqlite_writer_names_the_process_holding_the_store() {
    let recs = people::records(17, &people::people(17, 20), 4);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("held.db").display());
    let (text, m) = manifest(&url);
    std::fs::write(dir.path().join("cdp.yaml"), &text).expect("manifest");
    let web: Vec<&Labeled> = recs.iter().filter(|r| r.source == "web").collect();
    write_jsonl(&dir.path().join("web.jsonl"), &web);
    let ingest = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cdp"))
            .current_dir(dir.path())
            .env("CDP_STORE_WAIT_SECS", "1")
            .args(["ingest", "web", "--file", "web.jsonl", "--no-match", "--quiet"])
            .output()
            .expect("cdp")
    };
    rt().block_on(async {
        let store = Store::connect(&url, dir.path()).await.expect("store");
        let cfg = IdentityConfig::from_manifest(&m);
        store.apply_batch(&cfg, Vec::new(), None).await.expect("a first write registers this process");
        let held = store.begin_write().await.expect("hold the write lock");
        let out = ingest();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("locked by another writer"), "{err}");
        assert!(err.contains(&format!("process {} ", std::process::id())), "{err}");
        drop(held);
        let out = ingest();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    });
}
