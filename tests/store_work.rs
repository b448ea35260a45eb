//! Work sharing through the store, on both backends: leases with fencing
//! tokens (and a batch committed under a lease that expired fails with
//! nothing written), the job queue, and the outbox of changed profiles.

mod support;

use cdp::ingest::{Mapper, Record};
use cdp::manifest::{Manifest, Options, load_str};
use cdp::store::ingest::IdentityConfig;
use cdp::store::{Store, StoreError};
use serde_json::{Value, json};
use std::time::Duration;
use support::{backends, drop_db, rt};

const MANIFEST: &str = r#"
version: 1
name: t
sources:
  web:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { email: email, anonymous_id: anon }
      traits: { name: name, points: points }
      event: { name_field: event }
identity:
  keys:
    email: { normalize: email }
    anonymous_id: {}
model:
  traits:
    name: { type: string }
    points: { type: integer, merge: max }
  events:
    page: {}
"#;

fn manifest() -> Manifest {
    let l = load_str(MANIFEST, &Options::validate("."));
    assert!(!l.has_errors(), "{:#?}", l.diagnostics);
    l.manifest.expect("manifest")
}

fn records(m: &Manifest, raws: &[Value]) -> Vec<Record> {
    let mut mapper = Mapper::new(m, "web").expect("source");
    raws.iter().map(|r| mapper.map(r, 0).unwrap_or_else(|e| panic!("{r}: {e}"))).collect()
}

async fn count(store: &Store, table: &str) -> i64 {
    use sqlx::Row;
    sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(store.pool())
        .await
        .and_then(|r| r.try_get(0))
        .expect("count")
}

#[test]
fn a_lease_has_one_holder_and_a_new_token_each_time_it_changes_hands() {
    rt().block_on(async {
        for (name, store, db, _dir) in backends("lease").await {
            let ttl = Duration::from_millis(400);
            let a = store.try_acquire_lease("sync:crm", "a", ttl).await.expect("acquire").expect("free lease");
            assert_eq!((a.holder.as_str(), a.token), ("a", 1), "{name}");
            assert!(store.try_acquire_lease("sync:crm", "b", ttl).await.expect("acquire").is_none(), "{name}");
            assert!(store.try_acquire_lease("sync:crm", "a", ttl).await.expect("acquire").is_none(), "{name}");
            assert_eq!(store.lease_holder("sync:crm").await.expect("holder"), Some(a.clone()), "{name}");
            let a2 = store.renew_lease(&a, ttl).await.expect("renew").expect("still held");
            assert!(a2.expires_at >= a.expires_at, "{name}");
            assert_eq!(a2.token, a.token, "{name}");
            // Other names are independent.
            let other = store.try_acquire_lease("sync:web", "b", ttl).await.expect("acquire").expect("free");
            assert_eq!(other.token, 1, "{name}");

            tokio::time::sleep(ttl + Duration::from_millis(150)).await;
            assert_eq!(store.lease_holder("sync:crm").await.expect("holder"), None, "{name}: expired");
            let b = store.try_acquire_lease("sync:crm", "b", ttl).await.expect("acquire").expect("expired lease");
            assert_eq!((b.holder.as_str(), b.token), ("b", 2), "{name}");
            assert_eq!(store.renew_lease(&a, ttl).await.expect("renew"), None, "{name}: a lost it");
            store.release_lease(&a).await.expect("release of a lost lease");
            assert_eq!(store.lease_holder("sync:crm").await.expect("holder"), Some(b.clone()), "{name}");
            store.release_lease(&b).await.expect("release");
            assert_eq!(store.lease_holder("sync:crm").await.expect("holder"), None, "{name}");
            assert_eq!(store.renew_lease(&b, ttl).await.expect("renew"), None, "{name}: released");
            let c = store.try_acquire_lease("sync:crm", "c", ttl).await.expect("acquire").expect("released lease");
            assert_eq!(c.token, 3, "{name}: tokens only grow");
            drop_db(db).await;
        }
    });
}

#[test]
fn contenders_racing_for_a_lease_get_it_once() {
    rt().block_on(async {
        for (name, store, db, _dir) in backends("leaserace").await {
            let store = std::sync::Arc::new(store);
            for round in 0..5 {
                let lease = format!("race{round}");
                let tasks: Vec<_> = (0..8)
                    .map(|i| {
                        let (store, lease) = (store.clone(), lease.clone());
                        tokio::spawn(async move {
                            store.try_acquire_lease(&lease, &format!("h{i}"), Duration::from_secs(30)).await
                        })
                    })
                    .collect();
                let mut won = 0;
                for t in tasks {
                    if t.await.expect("task").expect("acquire").is_some() {
                        won += 1;
                    }
                }
                assert_eq!(won, 1, "{name}: round {round}");
            }
            drop(store);
            drop_db(db).await;
        }
    });
}

#[test]
fn a_batch_under_a_lease_that_was_taken_over_commits_nothing() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("fence").await {
            let ttl = Duration::from_millis(300);
            let a = store.try_acquire_lease("ingest:web", "a", ttl).await.expect("acquire").expect("free");
            let first =
                records(&m, &[json!({"id": "1", "at": "2026-01-01T00:00:00Z", "email": "a@x.se", "name": "A"})]);
            let r = store.apply_batch_fenced(&cfg, first, Some(("web", "1")), Some(&a)).await.expect("held");
            assert_eq!(r.accepted, 1, "{name}");

            tokio::time::sleep(ttl + Duration::from_millis(100)).await;
            let late = records(&m, &[json!({"id": "2", "at": "2026-01-02T00:00:00Z", "email": "b@x.se", "name": "B"})]);
            // Expired but not taken yet: still refused (the token may move any moment).
            match store.apply_batch_fenced(&cfg, late.clone(), Some(("web", "2")), Some(&a)).await {
                Err(StoreError::LeaseLost { name: n, token }) => assert_eq!((n.as_str(), token), ("ingest:web", 1)),
                other => panic!("{name}: expected LeaseLost, got {other:?}"),
            }
            let b = store
                .try_acquire_lease("ingest:web", "b", Duration::from_secs(60))
                .await
                .expect("acquire")
                .expect("expired");
            assert!(matches!(
                store.apply_batch_fenced(&cfg, late.clone(), Some(("web", "2")), Some(&a)).await,
                Err(StoreError::LeaseLost { .. })
            ));
            assert_eq!(count(&store, "records").await, 1, "{name}: nothing of the fenced-off batch");
            assert_eq!(count(&store, "identities").await, 1, "{name}");
            assert_eq!(store.cursor("web").await.expect("cursor").as_deref(), Some("1"), "{name}");
            let r = store.apply_batch_fenced(&cfg, late, Some(("web", "2")), Some(&b)).await.expect("new holder");
            assert_eq!(r.accepted, 1, "{name}");
            assert_eq!(store.cursor("web").await.expect("cursor").as_deref(), Some("2"), "{name}");
            drop_db(db).await;
        }
    });
}

#[test]
fn jobs_are_claimed_once_retried_when_failed_and_reclaimed_when_a_claim_runs_out() {
    rt().block_on(async {
        for (name, store, db, _dir) in backends("jobs").await {
            let store = std::sync::Arc::new(store);
            let mut ids = Vec::new();
            for i in 0..20 {
                ids.push(store.enqueue("deliver", &format!("job {i}"), None).await.expect("enqueue"));
            }
            let later = store.enqueue("deliver", "later", Some(cdp::store::now_ms() + 60_000)).await.expect("enqueue");
            store.enqueue("other", "elsewhere", None).await.expect("enqueue");
            // Four workers claim concurrently until nothing is due.
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut got = Vec::new();
                        while let Some(job) =
                            store.claim_job("deliver", &format!("w{w}"), Duration::from_secs(30)).await.expect("claim")
                        {
                            assert!(store.complete_job(&job).await.expect("complete"));
                            got.push(job.id);
                        }
                        got
                    })
                })
                .collect();
            let mut claimed = Vec::new();
            for w in workers {
                claimed.extend(w.await.expect("worker"));
            }
            claimed.sort_unstable();
            assert_eq!(claimed, ids, "{name}: every due job exactly once, the future one not yet");
            assert_eq!(store.job_state(later).await.expect("state").expect("job").state, "ready", "{name}");

            // Failure with a retry time, failure for good, and a claim that runs out.
            let retry = store.enqueue("q2", "flaky", None).await.expect("enqueue");
            let job = store.claim_job("q2", "w", Duration::from_secs(30)).await.expect("claim").expect("due");
            assert_eq!((job.id, job.attempts), (retry, 1));
            assert!(store.fail_job(&job, "timeout", Some(cdp::store::now_ms() + 200)).await.expect("fail"));
            assert!(store.claim_job("q2", "w", Duration::from_secs(30)).await.expect("claim").is_none(), "{name}");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let job = store.claim_job("q2", "w", Duration::from_millis(200)).await.expect("claim").expect("retry due");
            assert_eq!(job.attempts, 2, "{name}");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let taken =
                store.claim_job("q2", "v", Duration::from_secs(30)).await.expect("claim").expect("claim ran out");
            assert_eq!((taken.id, taken.attempts, taken.claimed_by.as_str()), (retry, 3, "v"), "{name}");
            assert!(!store.complete_job(&job).await.expect("complete"), "{name}: the stale claim cannot complete");
            assert!(store.fail_job(&taken, "gave up", None).await.expect("fail"));
            let state = store.job_state(retry).await.expect("state").expect("job");
            assert_eq!((state.state.as_str(), state.last_error.as_deref()), ("failed", Some("gave up")), "{name}");
            assert!(store.claim_job("q2", "w", Duration::from_secs(30)).await.expect("claim").is_none(), "{name}");
            drop(store);
            drop_db(db).await;
        }
    });
}

#[test]
fn the_outbox_lists_each_batchs_changed_profiles_in_commit_order() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("outbox").await {
            store
                .apply_batch(
                    &cfg,
                    records(
                        &m,
                        &[
                            json!({"id": "1", "at": "2026-01-01T00:00:00Z", "email": "a@x.se", "name": "A"}),
                            json!({"id": "2", "at": "2026-01-01T00:00:01Z", "anon": "z", "event": "page"}),
                        ],
                    ),
                    None,
                )
                .await
                .expect("apply");
            let a = store.find_profile(&m, "email", "a@x.se").await.expect("a");
            let z = store.find_profile(&m, "anonymous_id", "z").await.expect("z");
            let got = store.outbox_read("audiences", 10).await.expect("read");
            assert_eq!(got.len(), 1, "{name}");
            assert_eq!(got[0].seq, 1);
            assert_eq!(got[0].changes[&a], vec!["identities", "name"], "{name}");
            assert_eq!(got[0].changes[&z], vec!["events", "identities"], "{name}");
            store.outbox_commit("audiences", got[0].seq).await.expect("commit");
            assert!(store.outbox_read("audiences", 10).await.expect("read").is_empty(), "{name}");

            // A duplicate batch changes nothing and adds no entry; a merge does.
            store
                .apply_batch(&cfg, records(&m, &[json!({"id": "1", "at": "2026-01-01T00:00:00Z", "email": "a@x.se"})]), None)
                .await
                .expect("dup");
            assert!(store.outbox_read("audiences", 10).await.expect("read").is_empty(), "{name}");
            store
                .apply_batch(
                    &cfg,
                    records(&m, &[json!({"id": "3", "at": "2026-01-02T00:00:00Z", "anon": "z", "email": "a@x.se", "points": 5})]),
                    None,
                )
                .await
                .expect("merge");
            let got = store.outbox_read("audiences", 10).await.expect("read");
            assert_eq!(got.len(), 1, "{name}");
            assert_eq!(got[0].seq, 2, "{name}");
            let kept = store.find_profile(&m, "email", "a@x.se").await.expect("a");
            let gone = if kept == a { z } else { a };
            assert!(got[0].changes[&kept].contains(&"points".to_owned()), "{name}: {:?}", got[0].changes);
            assert_eq!(got[0].changes[&gone], vec!["identities", "merged"], "{name}");
            // Another reader starts from the beginning; positions never move back.
            assert_eq!(store.outbox_read("other", 10).await.expect("read").len(), 2, "{name}");
            store.outbox_commit("audiences", 2).await.expect("commit");
            store.outbox_commit("audiences", 1).await.expect("commit");
            assert_eq!(store.outbox_position("audiences").await.expect("pos"), 2, "{name}");

            // An identifier seen earlier than its first sighting re-dates it:
            // the profile's identities read differently (first seen, order).
            store
                .apply_batch(&cfg, records(&m, &[json!({"id": "4", "at": "2025-12-31T00:00:00Z", "email": "a@x.se"})]), None)
                .await
                .expect("earlier");
            let got = store.outbox_read("audiences", 10).await.expect("read");
            assert_eq!(got.len(), 1, "{name}");
            assert_eq!(got[0].changes[&kept], vec!["identities"], "{name}");
            drop_db(db).await;
        }
    });
}
