//! Activation against a real store: audience membership and destination
//! holdings kept incrementally from the outbox, after random ingests with
//! late and out-of-order events, merges and consent changes, equal a full
//! recomputation — a full pass afterwards changes nothing and sends nothing.

use std::collections::BTreeSet;
use std::sync::Arc;

use cdp::activation::{Target, targets};
use cdp::ingest::Mapper;
use cdp::manifest::{Destination, Manifest, Options, SyncMode, load_str};
use cdp::runtime::activation::Evaluator;
use cdp::store::Store;
use cdp::store::ingest::IdentityConfig;
use proptest::prelude::*;
use serde_json::{Value, json};
use sqlx::Row;

const MANIFEST: &str = r#"
version: 1
name: t
sources:
  web:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { crm_id: crm, email: email }
      traits: { tier: tier, points: points }
      event: { name_field: event }
      consent: { email_marketing: optin }
identity:
  keys:
    crm_id: { limit: 1 }
    email: { normalize: email, limit: 2 }
model:
  traits:
    tier: { type: string }
    points: { type: integer, merge: max }
  events:
    order_completed: { properties: { revenue: number } }
  computed:
    ltv: { sum: order_completed.revenue }
    orders: { count: order_completed }
consent:
  purposes: [email_marketing]
audiences:
  big: { where: "ltv >= 100" }
  gold: { where: 'tier == "gold"' }
  vip: { where: "audiences.big && consent.email_marketing" }
  active: { where: 'orders >= 2 && tier in ["gold", "silver"]' }
"#;

fn manifest() -> Manifest {
    let l = load_str(MANIFEST, &Options::validate("."));
    assert!(!l.has_errors(), "{:#?}", l.diagnostics);
    l.manifest.expect("manifest")
}

fn destination(audience: Option<&str>, sync: SyncMode, fields: &[&str]) -> Destination {
    Destination {
        plugin: "webhook".into(),
        audience: audience.map(str::to_owned),
        purpose: "email_marketing".into(),
        sync: Some(sync),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        hash: vec![],
        config: None,
        allow_hosts: vec![],
        mount: Default::default(),
        batch: None,
        rate_limit: None,
        retry: None,
        shrink_guard: None,
    }
}

fn the_targets(m: &Manifest) -> Vec<Target> {
    assert!(targets(m).expect("targets").is_empty());
    vec![
        Target::resolve(m, "members", &destination(Some("vip"), SyncMode::Membership, &["email", "tier"]))
            .expect("target"),
        Target::resolve(m, "gold_list", &destination(Some("gold"), SyncMode::Membership, &["email"])).expect("target"),
        Target::resolve(m, "crm", &destination(None, SyncMode::Upsert, &["email", "points", "ltv"])).expect("target"),
    ]
}

/// One random record: (person, second identifier of another person?, tier,
/// points, revenue of an order, consent, day).
type Raw = (u8, Option<u8>, Option<u8>, Option<u16>, Option<u16>, Option<bool>, u8);

fn raw(i: usize, r: &Raw) -> Value {
    let (person, other, tier, points, revenue, optin, day) = *r;
    let mut v = json!({"id": format!("m{i}"), "at": format!("2026-10-{:02}T10:00:00Z", 1 + day % 28),
                       "email": format!("p{person}@example.org")});
    if let Some(o) = other {
        v["crm"] = json!(format!("C{o}"));
    }
    if let Some(t) = tier {
        v["tier"] = json!(["gold", "silver", "bronze"][t as usize % 3]);
    }
    if let Some(p) = points {
        v["points"] = json!(p);
    }
    if let Some(r) = revenue {
        v["event"] = json!("order_completed");
        v["revenue"] = json!(r);
    }
    if let Some(o) = optin {
        v["optin"] = json!(o);
    }
    v
}

async fn count(store: &Store, sql: &str) -> i64 {
    sqlx::query(sql).fetch_one(store.pool()).await.expect(sql).try_get(0).expect("count")
}

/// Runs the evaluator until it has nothing left to do.
async fn settle(ev: &mut Evaluator, store: &Store) {
    for _ in 0..10_000 {
        if !ev.step(store).await.expect("step") {
            return;
        }
    }
    panic!("the evaluator never settled");
}

/// Returns how many memberships and deliveries the history produced.
async fn check(store: &Store, batches: &[Vec<Raw>]) -> (usize, i64) {
    let mut ev = evaluator(store).await;
    ingest(&mut ev, store, batches).await;
    verify(store).await
}

/// An evaluator over [`MANIFEST`] and its targets, caught up with the store.
async fn evaluator(store: &Store) -> Evaluator {
    let resolved = cdp::resolved::Resolved::from_manifest(manifest()).expect("resolves");
    let mut ev = Evaluator::new(&resolved, the_targets(&resolved.manifest));
    settle(&mut ev, store).await;
    ev
}

/// Applies each batch and lets `ev` follow it.
async fn ingest(ev: &mut Evaluator, store: &Store, batches: &[Vec<Raw>]) {
    let m = manifest();
    let cfg = IdentityConfig::from_manifest(&m);
    let mut mapper = Mapper::new(&m, "web").expect("source");
    let mut i = 0;
    for batch in batches {
        let records: Vec<_> = batch
            .iter()
            .map(|r| {
                i += 1;
                mapper.map(&raw(i, r), 0).expect("maps")
            })
            .collect();
        store.apply_batch(&cfg, records, None).await.expect("apply");
        settle(ev, store).await;
    }
}

/// Kept membership, computed traits and destination holdings equal a fresh
/// evaluation, and a full pass from scratch state sends nothing more.
async fn verify(store: &Store) -> (usize, i64) {
    let m = Arc::new(manifest());
    let resolved = cdp::resolved::Resolved::from_manifest((*m).clone()).expect("resolves");

    // Membership and computed traits equal a fresh evaluation of each
    // profile's rows (not the store's kept values), profile by profile.
    let model = cdp::profile::Model::new(&m).expect("model");
    let mut truth = BTreeSet::new();
    let mut computed_truth = BTreeSet::new();
    for p in store.live_profiles().await.expect("profiles") {
        let rows = store.profile_rows(p).await.expect("rows");
        let g = cdp::profile::golden_record(&m, &model, rows, 0, cdp::store::now_ms());
        for a in g.audiences {
            truth.insert((a, p));
        }
        for (n, v) in g.computed {
            computed_truth.insert((p, n, v.to_string()));
        }
    }
    let rows =
        sqlx::query("SELECT profile_id, name, value FROM computed_values").fetch_all(store.pool()).await.unwrap();
    let kept_computed: BTreeSet<(i64, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(kept_computed, computed_truth, "kept computed traits differ from a fresh evaluation");
    // `profile get` reads the kept values and agrees.
    for (p, n, v) in computed_truth.iter().take(5) {
        assert_eq!(&store.golden(&m, *p, 0).await.unwrap().computed[n].to_string(), v);
    }
    let rows = sqlx::query("SELECT audience, profile_id FROM audience_members").fetch_all(store.pool()).await.unwrap();
    let kept: BTreeSet<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(kept, truth, "incremental membership differs from the golden records");

    // A full recomputation from scratch state changes nothing and sends nothing.
    let deliveries = count(store, "SELECT COUNT(*) FROM deliveries").await;
    let changes = count(store, "SELECT COUNT(*) FROM audience_changes").await;
    sqlx::query("DELETE FROM audience_state").execute(store.pool()).await.unwrap();
    sqlx::query("DELETE FROM destination_state").execute(store.pool()).await.unwrap();
    let mut full = Evaluator::new(&resolved, the_targets(&m));
    settle(&mut full, store).await;
    assert_eq!(count(store, "SELECT COUNT(*) FROM audience_changes").await, changes, "a full pass moved members");
    let extra: Vec<String> =
        sqlx::query("SELECT destination || ' ' || op || ' ' || profile_id FROM deliveries ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .skip(deliveries as usize)
            .map(|r| r.get(0))
            .collect();
    assert!(extra.is_empty(), "a full pass sent what the incremental ones missed: {extra:?}");
    // Sizes kept step by step equal the counts.
    for s in store.audience_states().await.unwrap().values() {
        let n = truth.iter().filter(|(a, _)| *a == s.audience).count() as i64;
        assert_eq!(s.members, n, "size of {}", s.audience);
    }
    (truth.len(), deliveries)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn raw_strategy() -> impl Strategy<Value = Raw> {
    (
        0u8..6,
        proptest::option::weighted(0.2, 0u8..6),
        proptest::option::weighted(0.4, 0u8..3),
        proptest::option::weighted(0.3, 0u16..500),
        proptest::option::weighted(0.5, 1u16..90),
        proptest::option::weighted(0.3, any::<bool>()),
        0u8..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full_on_sqlite(batches in proptest::collection::vec(proptest::collection::vec(raw_strategy(), 1..8), 1..6)) {
        rt().block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::connect("sqlite://cdp.db", dir.path()).await.expect("sqlite");
            check(&store, &batches).await;
        });
    }
}

/// Retention deleting old orders changes computed traits and audiences with
/// no record arriving: the deleting transaction puts the profiles in the
/// outbox, so activation follows it as it follows an ingest.
#[test]
fn deleted_events_are_followed_like_ingested_ones() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect("sqlite://cdp.db", dir.path()).await.expect("sqlite");
        let mut ev = evaluator(&store).await;
        // Orders in October (over 30 days ago): ltv 140 and 60, both in `vip`/`big` or not.
        let batches: Vec<Vec<Raw>> = vec![vec![
            (0, None, Some(0), Some(10), Some(80), Some(true), 2),
            (0, None, None, None, Some(60), None, 3),
            (1, None, Some(1), None, Some(60), Some(true), 4),
        ]];
        ingest(&mut ev, &store, &batches).await;
        let members = |store: &Store| {
            let pool = store.pool().clone();
            async move {
                sqlx::query("SELECT COUNT(*) FROM audience_members WHERE audience = 'big'")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    .get::<i64, _>(0)
            }
        };
        assert_eq!(members(&store).await, 1, "one profile has ltv >= 100");
        let with_retention = format!("{MANIFEST}retention:\n  events: {{ order_completed: 30d }}\n");
        let loaded = load_str(&with_retention, &Options::validate("."));
        assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
        let rules = cdp::privacy::retention_rules(&loaded.manifest.expect("manifest")).expect("rules");
        let deleted = store.retention(&rules, true).await.expect("retention");
        assert_eq!(deleted[0].1, 3, "{deleted:?}");
        settle(&mut ev, &store).await;
        assert_eq!(members(&store).await, 0, "no profile has orders left");
        // Kept computed traits and destinations agree with a fresh evaluation.
        verify(&store).await;
    });
}

/// The same on PostgreSQL, on one fixed history with merges, late events and a withdrawal.
#[test]
fn incremental_equals_full_on_postgres() {
    if std::env::var_os("CDP_SKIP_PG").is_some() {
        return;
    }
    rt().block_on(async {
        let admin_url = std::env::var("CDP_TEST_PG").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into());
        let name = format!("cdp_act_{}", std::process::id());
        sqlx::any::install_default_drivers();
        let admin = sqlx::AnyPool::connect(&admin_url).await.expect("PostgreSQL is required (CDP_SKIP_PG=1 skips)");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
        let url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
        let store = Store::connect(&url, std::path::Path::new(".")).await.expect("postgres");
        let batches: Vec<Vec<Raw>> = vec![
            vec![
                (0, None, Some(0), Some(10), Some(80), Some(true), 20),
                (1, None, Some(1), None, Some(50), Some(true), 5),
            ],
            vec![(0, None, None, None, Some(30), None, 2), (1, Some(0), None, Some(99), Some(70), None, 1)],
            vec![(2, None, Some(0), None, Some(60), Some(true), 9), (2, None, None, None, Some(60), None, 3)],
            vec![(0, None, None, None, None, Some(false), 30), (3, Some(2), Some(1), None, Some(5), None, 0)],
        ];
        let (members, deliveries) = check(&store, &batches).await;
        assert!(members >= 3 && deliveries >= 5, "{members} memberships, {deliveries} deliveries");
        drop(store);
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await;
    });
}

/// `profile get` reads the kept computed traits while activation is current,
/// and evaluates them again when the definitions differ or a change is pending.
#[test]
fn the_golden_record_reads_kept_computed_traits_only_while_they_are_current() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect("sqlite://cdp.db", dir.path()).await.expect("sqlite");
        let batches =
            vec![vec![(0, None, Some(0), None, Some(80), Some(true), 3), (0, None, None, None, Some(40), None, 4)]];
        check(&store, &batches).await;
        let m = manifest();
        let p = store.find_profile(&m, "email", "p0@example.org").await.unwrap();
        assert_eq!(store.golden(&m, p, 0).await.unwrap().computed["ltv"], json!(120.0));
        // A kept value is what the golden record shows…
        sqlx::query("UPDATE computed_values SET value = '999' WHERE name = 'ltv'").execute(store.pool()).await.unwrap();
        let g = store.golden(&m, p, 0).await.unwrap();
        assert_eq!((g.computed["ltv"].clone(), g.audiences.contains(&"big".to_owned())), (json!(999), true));
        // …unless the definitions changed…
        let other = load_str(
            &MANIFEST.replace("ltv: { sum: order_completed.revenue }", "ltv: { max: order_completed.revenue }"),
            &Options::validate("."),
        )
        .manifest
        .unwrap();
        assert_eq!(store.golden(&other, p, 0).await.unwrap().computed["ltv"], json!(80.0));
        // …or a change is waiting in the outbox.
        let cfg = IdentityConfig::from_manifest(&m);
        let mut mapper = Mapper::new(&m, "web").unwrap();
        let r = mapper.map(&raw(99, &(0, None, None, None, Some(5), None, 9)), 0).unwrap();
        store.apply_batch(&cfg, vec![r], None).await.unwrap();
        assert_eq!(store.golden(&m, p, 0).await.unwrap().computed["ltv"], json!(125.0));
    });
}
