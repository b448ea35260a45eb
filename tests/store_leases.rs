//! Leases under fire: writer processes contend for 100 leases, each
//! committing batches fenced by the lease it holds, while the test kills
//! them with SIGKILL at random and starts new ones. The store's own log (one
//! identifier `lease|token|writer|n` per fenced commit, ordered by the outbox
//! in commit order) must show, per lease, tokens that never go back (no
//! commit under an old holder after a newer one committed), one writer per
//! token, and every takeover within the lease's expiry.
//!
//! On PostgreSQL, where leases are shared between processes and machines.
//! The writer processes are this test binary again, running
//! `lease_worker` with `CDP_LEASE_WORKER` set.

mod support;

use cdp::ingest::Mapper;
use cdp::manifest::{Manifest, Options, load_str};
use cdp::store::ingest::IdentityConfig;
use cdp::store::{Store, StoreError};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::{drop_db, rt, urls};

const LEASES: usize = 100;
const TTL: Duration = Duration::from_millis(2000);

const MANIFEST: &str = r#"
version: 1
name: leases
sources:
  log:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { anonymous_id: anon }
identity:
  keys:
    anonymous_id: {}
"#;

fn manifest() -> Manifest {
    load_str(MANIFEST, &Options::validate(".")).manifest.expect("manifest")
}

/// The writer process: takes free leases and commits under the ones it holds.
#[test]
fn lease_worker() {
    let Ok(spec) = std::env::var("CDP_LEASE_WORKER") else { return };
    let (url, writer) = spec.split_once(' ').expect("url writer");
    let (url, writer) = (url.to_owned(), writer.to_owned());
    rt().block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&url, dir.path()).await.expect("connect");
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        // One task takes free leases (and logs each take at once with a
        // commit under it); this one commits under the leases held.
        let store = std::sync::Arc::new(store);
        let held: std::sync::Arc<std::sync::Mutex<HashMap<usize, (cdp::store::Lease, u64)>>> = Default::default();
        let commit = {
            let (m, cfg, writer) = (m.clone(), cfg.clone(), writer.clone());
            let store = store.clone();
            move |lease: cdp::store::Lease, k: u64, n: u64| {
                let (m, cfg, writer, store) = (m.clone(), cfg.clone(), writer.clone(), store.clone());
                async move {
                    let value = format!("{}|{}|{writer}|{k}", lease.name, lease.token);
                    let raw = json!({"id": format!("{writer}-{n}"), "at": cdp::store::now_ms(), "anon": value});
                    let rec = Mapper::new(&m, "log").expect("source").map(&raw, 0).expect("record");
                    match store.apply_batch_fenced(&cfg, vec![rec], None, Some(&lease)).await {
                        Ok(_) => true,
                        Err(StoreError::LeaseLost { .. }) => false,
                        Err(e) => panic!("{writer}: {e}"),
                    }
                }
            }
        };
        let taker = {
            let (store, held, commit, writer) = (store.clone(), held.clone(), commit.clone(), writer.clone());
            tokio::spawn(async move {
                let mut n = 1u64 << 40;
                loop {
                    for i in 0..LEASES {
                        if held.lock().expect("held").contains_key(&i) {
                            continue;
                        }
                        if let Some(l) = store.try_acquire_lease(&format!("L{i}"), &writer, TTL).await.expect("acquire")
                        {
                            n += 1;
                            if commit(l.clone(), 0, n).await {
                                held.lock().expect("held").insert(i, (l, 1));
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let mut n = 0u64;
        loop {
            let mine: Vec<(usize, (cdp::store::Lease, u64))> = held.lock().expect("held").drain().collect();
            for (i, (lease, k)) in mine {
                // Renew at half time.
                let lease = if lease.expires_at - cdp::store::now_ms() < TTL.as_millis() as i64 / 2 {
                    match store.renew_lease(&lease, TTL).await.expect("renew") {
                        Some(l) => l,
                        None => continue,
                    }
                } else {
                    lease
                };
                n += 1;
                if commit(lease.clone(), k, n).await {
                    held.lock().expect("held").insert(i, (lease, k + 1));
                }
            }
            assert!(!taker.is_finished(), "the taker stopped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

fn spawn_worker(url: &str, writer: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "lease_worker", "--nocapture", "--test-threads=1"])
        .env("CDP_LEASE_WORKER", format!("{url} {writer}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn worker")
}

fn sigkill(child: &mut std::process::Child) {
    let _ = child.kill(); // SIGKILL on Unix
    let _ = child.wait();
}

#[test]
fn killed_holders_never_overlap_and_their_leases_are_taken_over_within_the_expiry() {
    if std::env::var_os("CDP_LEASE_WORKER").is_some() {
        return;
    }
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        // Leases across processes are PostgreSQL's part; SQLite shares them
        // within one process (the other tests cover both).
        for (backend, url, db) in urls(dir.path(), "leasekill").await.into_iter().filter(|u| u.0 == "postgres") {
            let store = Store::connect(&url, dir.path()).await.expect("store");
            let mut workers = [spawn_worker(&url, "w0"), spawn_worker(&url, "w1")];
            let mut writers = ["w0".to_owned(), "w1".to_owned()];
            let mut next = 2;
            let mut rng = cdp::rng::Rng::new(7);
            let started = Instant::now();
            let mut kills = 0;
            let mut killed_at: HashMap<String, i64> = HashMap::new();
            while started.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(400 + rng.below(500))).await;
                let victim = rng.below(2) as usize;
                sigkill(&mut workers[victim]);
                killed_at.insert(writers[victim].clone(), cdp::store::now_ms());
                kills += 1;
                writers[victim] = format!("w{next}");
                workers[victim] = spawn_worker(&url, &writers[victim]);
                next += 1;
            }
            tokio::time::sleep(TTL + Duration::from_millis(1500)).await;
            for w in &mut workers {
                sigkill(w);
            }
            // A commit a killed client had sent may still be finishing on the server.
            tokio::time::sleep(Duration::from_millis(500)).await;

            // The log, in commit order: outbox entries map to the identifier each commit created.
            let mut value_of: HashMap<String, String> = HashMap::new();
            for group in store.partition().await.expect("partition") {
                let v = group[0].trim_start_matches("anonymous_id=").to_owned();
                let (k, val) = group[0].split_once('=').expect("k=v");
                let p = store.find_profile(&manifest(), k, val).await.expect("profile");
                value_of.insert(p.to_string(), v);
            }
            let mut log: Vec<(String, i64, String, i64)> = Vec::new(); // (lease, token, writer, at)
            let mut after = 0;
            loop {
                let entries = store.outbox_after(after, 1000).await.expect("outbox");
                if entries.is_empty() {
                    break;
                }
                for e in &entries {
                    after = e.seq;
                    assert_eq!(e.changes.len(), 1, "{backend}: one commit, one new profile");
                    let p = e.changes.keys().next().expect("profile").to_string();
                    let v = &value_of[&p];
                    let parts: Vec<&str> = v.split('|').collect();
                    log.push((parts[0].to_owned(), parts[1].parse().expect("token"), parts[2].to_owned(), e.at));
                }
            }
            assert!(log.len() > 500, "{backend}: only {} fenced commits", log.len());
            let mut last: HashMap<&str, (i64, &str, i64)> = HashMap::new();
            let mut writer_of: HashMap<(&str, i64), &str> = HashMap::new();
            let mut takeovers = Vec::new();
            for (lease, token, writer, at) in &log {
                let w = writer_of.entry((lease.as_str(), *token)).or_insert(writer.as_str());
                assert_eq!(w, writer, "{backend}: two writers under {lease} token {token}");
                if let Some((t, _, last_at)) = last.get(lease.as_str()) {
                    assert!(token >= t, "{backend}: {lease}: token {token} committed after token {t}");
                    // A lease of a killed holder: taken over how long after the kill?
                    let old = last[lease.as_str()].1;
                    if token > t
                        && let Some(k) = killed_at.get(old)
                        && *k >= *last_at
                    {
                        takeovers.push(at - k);
                    }
                }
                last.insert(lease.as_str(), (*token, writer.as_str(), *at));
            }
            takeovers.sort_unstable();
            let worst = takeovers.last().copied().unwrap_or(0);
            let median = takeovers.get(takeovers.len() / 2).copied().unwrap_or(0);
            eprintln!(
                "{backend}: {} fenced commits, {kills} kills, {} leases of killed holders taken over, after the kill: \
                 median {median} ms, slowest {worst} ms (lease {} ms)",
                log.len(),
                takeovers.len(),
                TTL.as_millis()
            );
            assert!(kills > 5 && !takeovers.is_empty(), "{backend}: no takeover happened");
            // A killed holder's lease is free at most one lease period after
            // the kill; the other writer takes it on its next sweep over the
            // 100 leases (one statement each, up to a second or two on a
            // loaded machine).
            assert!(worst < 2 * TTL.as_millis() as i64 + 1_000, "{backend}: a takeover came {worst} ms after the kill");
            drop(store);
            drop_db(db).await;
        }
    });
}
