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
