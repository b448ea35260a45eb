//! Privacy operations against both backends: an erasure leaves no value of
//! the person in any column of any table (only keyed-hash tombstones), and
//! re-ingesting their records re-creates nothing, while a household member
//! keeps their data; the access export holds every record of the person
//! from four sources and nothing of anyone else; a suppressed person's new
//! records are dropped and they leave every destination.

use std::collections::BTreeSet;
use std::sync::Arc;

use cdp::activation::Target;
use cdp::ingest::{Mapper, Record};
use cdp::manifest::{Destination, Manifest, Options, SyncMode, load_str};
use cdp::runtime::activation::Evaluator;
use cdp::store::Store;
use cdp::store::ingest::IdentityConfig;
use serde_json::{Value, json};
use sqlx::{Column, Row};

mod support;

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
      traits: { name: name, address: address }
      event: { name_field: event }
      consent: { email_marketing: optin }
  crm:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { crm_id: crm, email: email, phone: phone }
      traits: { name: name, address: address }
  pos:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { crm_id: crm }
      event: { name_field: event }
  support:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { email: email }
      event: { name_field: event }
identity:
  keys:
    crm_id: { limit: 1 }
    email: { normalize: email }
    phone: { normalize: e164, default_region: SE }
    anonymous_id: {}
model:
  traits:
    name: { type: string }
    address: { type: string }
  events:
    order_completed: { properties: { note: string, total: number } }
    ticket_opened: { properties: { subject: string } }
    page_viewed: { properties: { path: string } }
consent:
  purposes: [email_marketing]
  default: granted
audiences:
  everyone: { where: 'size(identities.email) > 0' }
"#;

/// Values of Ada that must not survive her erasure.
const ADA: [&str; 7] = [
    "ada.lovelace@example.org",
    "+46701234567",
    "C-ADA-1",
    "Adalinda Quist",
    "anon-ada-77",
    "ada-order-note",
    "ada-ticket",
];

fn manifest() -> Manifest {
    let l = load_str(MANIFEST, &Options::validate("."));
    assert!(!l.has_errors(), "{:#?}", l.diagnostics);
    l.manifest.expect("manifest")
}

fn records(m: &Manifest, source: &str, raws: &[Value]) -> Vec<Record> {
    let mut mapper = Mapper::new(m, source).expect("source");
    raws.iter().map(|r| mapper.map(r, 0).unwrap_or_else(|e| panic!("{r}: {e}"))).collect()
}

/// Ada in four sources, Bob (same household address) in two.
fn history(m: &Manifest) -> Vec<(&'static str, Vec<Record>)> {
    vec![
        (
            "web",
            records(
                m,
                "web",
                &[
                    json!({"id": "w1", "at": "2026-10-01T10:00:00Z", "anon": "anon-ada-77", "email": "Ada.Lovelace@example.org",
                           "name": "Adalinda Quist", "address": "Storgatan 1", "optin": true}),
                    json!({"id": "w2", "at": "2026-10-02T10:00:00Z", "anon": "anon-ada-77", "event": "page_viewed", "path": "/shoes"}),
                    json!({"id": "w3", "at": "2026-10-02T11:00:00Z", "email": "bob@example.org", "name": "Bob Quist",
                           "address": "Storgatan 1", "optin": true}),
                ],
            ),
        ),
        (
            "crm",
            records(
                m,
                "crm",
                &[
                    json!({"id": "c1", "at": "2026-10-03T10:00:00Z", "crm": "C-ADA-1", "email": "ada.lovelace@example.org",
                         "phone": "070-123 45 67", "name": "Adalinda Quist"}),
                ],
            ),
        ),
        (
            "pos",
            records(
                m,
                "pos",
                &[
                    json!({"id": "p1", "at": "2026-10-04T10:00:00Z", "crm": "C-ADA-1", "event": "order_completed",
                           "note": "ada-order-note", "total": 120}),
                    json!({"id": "p2", "at": "2026-10-04T11:00:00Z", "crm": "C-BOB-2", "event": "order_completed",
                           "note": "bob-order", "total": 30}),
                ],
            ),
        ),
        (
            "support",
            records(
                m,
                "support",
                &[json!({"id": "s1", "at": "2026-10-05T10:00:00Z", "email": "ada.lovelace@example.org",
                         "event": "ticket_opened", "subject": "ada-ticket"})],
            ),
        ),
    ]
}

async fn ingest(store: &Store, cfg: &IdentityConfig, batches: Vec<(&str, Vec<Record>)>) -> (u64, u64, u64) {
    let (mut accepted, mut suppressed, mut erased) = (0, 0, 0);
    for (_, b) in batches {
        let r = store.apply_batch(cfg, b, None).await.expect("apply");
        accepted += r.accepted;
        suppressed += r.suppressed;
        erased += r.erased;
    }
    (accepted, suppressed, erased)
}

/// Every text and number of every row of every table, as text.
async fn every_value(store: &Store, postgres: bool) -> Vec<(String, String)> {
    let tables: Vec<String> = if postgres {
        sqlx::query("SELECT CAST(table_name AS TEXT) FROM information_schema.tables WHERE table_schema = 'public'")
    } else {
        sqlx::query("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    .fetch_all(store.pool())
    .await
    .expect("tables")
    .iter()
    .map(|r| r.get(0))
    .collect();
    let mut out = Vec::new();
    for t in tables {
        let rows = sqlx::query(&format!("SELECT * FROM {t}")).fetch_all(store.pool()).await.expect("rows");
        for r in &rows {
            for (i, c) in r.columns().iter().enumerate() {
                let v = r
                    .try_get::<Option<String>, _>(i)
                    .ok()
                    .flatten()
                    .or_else(|| r.try_get::<Option<i64>, _>(i).ok().flatten().map(|n| n.to_string()));
                if let Some(v) = v {
                    out.push((format!("{t}.{}", c.name()), v));
                }
            }
        }
    }
    // On SQLite the audit log is a file of its own.
    for r in store.audit_rows(None, i64::MAX).await.expect("audit rows") {
        out.extend([r.actor, r.action, r.target, r.outcome].map(|v| ("audit".to_owned(), v)));
    }
    out
}

fn leaks<'a>(values: &'a [(String, String)], needles: &[&str]) -> Vec<&'a (String, String)> {
    values.iter().filter(|(_, v)| needles.iter().any(|n| v.to_lowercase().contains(&n.to_lowercase()))).collect()
}

#[test]
fn erasure_leaves_nothing_of_the_person_and_nothing_comes_back() {
    support::rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, url, db) in support::urls(dir.path(), "privacy").await {
            let store = Store::connect(&url, dir.path()).await.expect("store");
            ingest(&store, &cfg, history(&m)).await;
            let ada = store.find_profile(&m, "email", "ada.lovelace@example.org").await.expect("ada");
            let bob = store.find_profile(&m, "email", "bob@example.org").await.expect("bob");
            assert_ne!(ada, bob);
            // The audit log names her before the erasure.
            store
                .audit_append(&cdp::store::audit::AuditEntry {
                    actor: "os:test",
                    via: "cli",
                    action: "profile.get",
                    target: "email=ada.lovelace@example.org",
                    outcome: "ok",
                })
                .await
                .unwrap();
            let before = every_value(&store, name == "postgres").await;
            assert!(leaks(&before, &ADA).len() >= 10, "{name}: the history should hold Ada's values");

            let request = store.open_request("delete", "subject", "email", "os:test", "open").await.unwrap();
            let er = store.erase(request, ada, &|_| Some(true)).await.expect("erase");
            assert!(er.identifiers >= 4 && er.profiles >= 1, "{name}: {er:?}");
            let after = every_value(&store, name == "postgres").await;
            let left = leaks(&after, &ADA);
            assert!(left.is_empty(), "{name}: values of Ada survived: {left:?}");
            // Bob keeps his data, the shared household address included.
            let g = store.golden(&m, bob, 10).await.expect("bob");
            assert_eq!(g.traits["address"].value, json!("Storgatan 1"), "{name}");
            assert_eq!(g.traits["name"].value, json!("Bob Quist"), "{name}");
            assert!(store.find_profile(&m, "crm_id", "C-BOB-2").await.is_ok(), "{name}");

            // Her old records, ingested again, re-create nothing.
            let (accepted, _, erased) = ingest(&store, &cfg, history(&m)).await;
            assert!(erased >= 5, "{name}: {erased} dropped as erased");
            assert_eq!(accepted, 0, "{name}: Bob's records are duplicates, Ada's are dropped");
            let again = every_value(&store, name == "postgres").await;
            assert!(leaks(&again, &ADA).is_empty(), "{name}: re-ingest re-created {:?}", leaks(&again, &ADA));
            assert!(store.find_profile(&m, "email", "ada.lovelace@example.org").await.is_err());
            // A record with an erased identifier and a live one keeps only the live one.
            let mixed = records(
                &m,
                "crm",
                &[json!({"id": "c9", "at": "2026-11-01T10:00:00Z", "email": "bob@example.org", "phone": "+46701234567"})],
            );
            store.apply_batch(&cfg, mixed, None).await.unwrap();
            let left = leaks(&every_value(&store, name == "postgres").await, &ADA).len();
            assert_eq!(left, 0, "{name}: an erased phone came back with Bob's record");
            assert_eq!(store.replay_dead(None).await.unwrap(), 0);
            drop(store);
            support::drop_db(db).await;
        }
    });
}

#[test]
fn the_access_export_holds_every_record_of_the_person_and_no_one_elses() {
    support::rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, url, db) in support::urls(dir.path(), "export").await {
            let store = Store::connect(&url, dir.path()).await.expect("store");
            ingest(&store, &cfg, history(&m)).await;
            let ada = store.find_profile(&m, "crm_id", "C-ADA-1").await.expect("ada");
            let doc = store.privacy_export(&m, ada).await.expect("export");
            let ids: BTreeSet<&str> =
                doc["records"].as_array().unwrap().iter().filter_map(|r| r["message_id"].as_str()).collect();
            assert_eq!(ids, BTreeSet::from(["w1", "w2", "c1", "p1", "s1"]), "{name}");
            let sources: BTreeSet<&str> =
                doc["records"].as_array().unwrap().iter().filter_map(|r| r["source"].as_str()).collect();
            assert_eq!(sources.len(), 4, "{name}");
            let text = doc.to_string();
            for other in ["bob@example.org", "Bob Quist", "C-BOB-2", "bob-order"] {
                assert!(!text.contains(other), "{name}: the export holds `{other}`");
            }
            assert!(text.contains("ada-ticket") && text.contains("+46701234567"), "{name}");
            assert_eq!(doc["identities"].as_array().unwrap().len(), 4, "{name}: {}", doc["identities"]);
            drop(store);
            support::drop_db(db).await;
        }
    });
}

#[test]
fn a_suppressed_person_is_not_collected_and_leaves_every_destination() {
    support::rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, url, db) in support::urls(dir.path(), "suppress").await {
            let store = Store::connect(&url, dir.path()).await.expect("store");
            ingest(&store, &cfg, history(&m)).await;
            let m = Arc::new(m.clone());
            let target = Target::resolve(
                &m,
                "list",
                &Destination {
                    plugin: "webhook".into(),
                    audience: Some("everyone".into()),
                    purpose: "email_marketing".into(),
                    sync: Some(SyncMode::Membership),
                    fields: vec!["email".into()],
                    hash: vec![],
                    config: None,
                    allow_hosts: vec![],
                    mount: Default::default(),
                    batch: None,
                    rate_limit: None,
                    retry: None,
                    shrink_guard: None,
                },
            )
            .expect("target");
            let resolved = cdp::resolved::Resolved::from_manifest((*m).clone()).expect("resolves");
            let mut ev = Evaluator::new(&resolved, vec![target]);
            while ev.step(&store).await.unwrap() {}
            let ada = store.find_profile(&m, "email", "ada.lovelace@example.org").await.expect("ada");
            assert_eq!(store.destination_held("list").await.unwrap().len(), 2, "{name}");

            store.suppress(ada, true, 1).await.expect("suppress");
            while ev.step(&store).await.unwrap() {}
            let held = store.destination_held("list").await.unwrap();
            assert!(!held.contains_key(&ada) && held.len() == 1, "{name}: she left the destination");
            let exits = store.recent_deliveries("list", 10).await.unwrap();
            assert!(exits.iter().any(|d| d.profile == ada && d.op == "exit"), "{name}");

            let new = records(
                &m,
                "web",
                &[json!({"id": "w9", "at": "2026-11-01T10:00:00Z", "email": "ada.lovelace@example.org", "event": "page_viewed", "path": "/x"})],
            );
            let r = store.apply_batch(&cfg, new.clone(), None).await.unwrap();
            assert_eq!((r.accepted, r.suppressed), (0, 1), "{name}: not collected, counted");
            store.suppress(ada, false, 2).await.expect("unsuppress");
            let r = store.apply_batch(&cfg, new, None).await.unwrap();
            assert_eq!((r.accepted, r.suppressed), (1, 0), "{name}: collected again");
            while ev.step(&store).await.unwrap() {}
            assert!(store.destination_held("list").await.unwrap().contains_key(&ada), "{name}: back in");
            drop(store);
            support::drop_db(db).await;
        }
    });
}

const RETENTION: &str = "retention:\n  records: 365d\n  sources: { web: 30d }\n  events: { ticket_opened: 7d }\n";

fn ago(days: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::days(days)).to_rfc3339()
}

/// Web records 10 and 100 days old, a CRM record 400 days old, support
/// tickets 3 and 20 days old.
fn aged(m: &Manifest) -> Vec<(&'static str, Vec<Record>)> {
    vec![
        (
            "web",
            records(
                m,
                "web",
                &[
                    json!({"id": "w-new", "at": ago(10), "email": "kim@example.org", "event": "page_viewed", "path": "/a"}),
                    json!({"id": "w-old", "at": ago(100), "email": "kim@example.org", "event": "page_viewed", "path": "/b"}),
                ],
            ),
        ),
        (
            "crm",
            records(m, "crm", &[json!({"id": "c-old", "at": ago(400), "crm": "C-KIM", "email": "kim@example.org"})]),
        ),
        (
            "support",
            records(
                m,
                "support",
                &[
                    json!({"id": "s-new", "at": ago(3), "email": "kim@example.org", "event": "ticket_opened", "subject": "x"}),
                    json!({"id": "s-old", "at": ago(20), "email": "kim@example.org", "event": "ticket_opened", "subject": "y"}),
                ],
            ),
        ),
    ]
}

#[test]
fn retention_counts_then_deletes_what_the_rules_no_longer_keep() {
    support::rt().block_on(async {
        let l = load_str(&format!("{MANIFEST}{RETENTION}"), &Options::validate("."));
        assert!(!l.has_errors(), "{:#?}", l.diagnostics);
        let m = l.manifest.unwrap();
        let cfg = IdentityConfig::from_manifest(&m);
        let rules = cdp::privacy::retention_rules(&m).expect("rules");
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, url, db) in support::urls(dir.path(), "retention").await {
            let store = Store::connect(&url, dir.path()).await.expect("store");
            ingest(&store, &cfg, aged(&m)).await;
            let expect =
                vec![("records".to_owned(), 1), ("source web".to_owned(), 1), ("event ticket_opened".to_owned(), 1)];
            assert_eq!(store.retention(&rules, false).await.unwrap(), expect, "{name}: counted");
            let before = store.outbox_read("test", 1000).await.unwrap().len();
            assert_eq!(store.retention(&rules, true).await.unwrap(), expect, "{name}: deleted");
            // Deleted events put their profiles in the outbox (activation re-evaluates them).
            let entries = store.outbox_read("test", 1000).await.unwrap();
            let last = entries.last().expect("an entry");
            assert!(entries.len() > before, "{name}: no outbox entry for the deletion");
            assert!(
                !last.changes.is_empty() && last.changes.values().all(|f| f == &vec!["events".to_owned()]),
                "{name}: {last:?}"
            );
            assert_eq!(store.retention(&rules, false).await.unwrap().iter().map(|c| c.1).sum::<i64>(), 0, "{name}");
            let kim = store.find_profile(&m, "email", "kim@example.org").await.expect("kim stays");
            let doc = store.privacy_export(&m, kim).await.unwrap();
            let ids: BTreeSet<&str> =
                doc["records"].as_array().unwrap().iter().filter_map(|r| r["message_id"].as_str()).collect();
            assert_eq!(ids, BTreeSet::from(["w-new", "s-new"]), "{name}");
            drop(store);
            support::drop_db(db).await;
        }
    });
}

#[test]
fn plan_shows_the_records_a_retention_change_would_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = MANIFEST.replacen("name: t\n", "name: t\nstorage: { url: \"sqlite://cdp.db\" }\n", 1);
    std::fs::write(dir.path().join("cdp.yaml"), &manifest).unwrap();
    let lines: Vec<String> = [("w-new", 10), ("w-old", 100), ("w-older", 200)]
        .iter()
        .map(|(id, d)| {
            json!({"id": id, "at": ago(*d), "email": "lee@example.org", "event": "page_viewed", "path": "/"})
                .to_string()
        })
        .collect();
    std::fs::write(dir.path().join("web.jsonl"), lines.join("\n")).unwrap();
    let cdp = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cdp")).current_dir(dir.path()).args(args).output().unwrap()
    };
    let out = cdp(&["ingest", "web", "--file", "web.jsonl", "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.path().join("cdp.yaml"), format!("{manifest}retention:\n  sources: {{ web: 30d }}\n")).unwrap();
    let out = cdp(&["plan", "--format", "json"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        plan["impact"]["retention"],
        json!([{"rule": "source web", "keep": "30d", "would_delete": 2}]),
        "{plan:#}"
    );
    let human = String::from_utf8_lossy(&cdp(&["plan"]).stdout).into_owned();
    assert!(human.contains("retention source web (keep 30d): 2 records older than that would be deleted"), "{human}");
}
