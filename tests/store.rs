//! Storage, identity resolution and the golden record, run against both
//! backends: a SQLite file in a temp dir and a fresh database on the machine's
//! PostgreSQL (`CDP_TEST_PG`, default `postgres://root@127.0.0.1:5432/test`).
//! Set `CDP_SKIP_PG=1` only where no PostgreSQL can run; CI never does.

use cdp::ingest::{Mapper, Record};
use cdp::manifest::{Manifest, Options, load_str};
use cdp::store::Store;
use cdp::store::ingest::IdentityConfig;
use proptest::prelude::*;
use serde_json::{Value, json};
mod support;

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
      identities: { crm_id: crm, email: email, phone: phone, anonymous_id: anon }
      traits: { tier: tier, points: points, name: name, visits: visits, city: city, signup: signup }
      event: { name_field: event }
      consent: { email_marketing: optin }
  crm:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { crm_id: crm, email: email }
      traits: { tier: tier, name: name }
  pos:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { crm_id: crm }
      entity: { name: booking }
identity:
  keys:
    crm_id: { limit: 1 }
    email: { normalize: email, limit: 2 }
    phone: { normalize: e164, default_region: SE }
    anonymous_id: {}
  priority: [crm_id, email, phone, anonymous_id]
model:
  traits:
    tier: { type: string, merge: { source_priority: [crm, web] } }
    points: { type: integer, merge: max }
    name: { type: string }
    visits: { type: integer, merge: sum }
    city: { type: string, merge: first }
    signup: { type: date, merge: min }
  events:
    order_completed: { properties: { revenue: number } }
  entities:
    booking: { key: booking_id, fields: { booking_id: string, nights: integer } }
  computed:
    ltv: { sum: order_completed.revenue }
consent:
  purposes: [email_marketing]
audiences:
  big: { where: "ltv >= 100" }
"#;

fn manifest() -> Manifest {
    let l = load_str(MANIFEST, &Options::validate("."));
    assert!(!l.has_errors(), "{:#?}", l.diagnostics);
    l.manifest.expect("manifest")
}

fn records(m: &Manifest, source: &str, raws: &[Value]) -> Vec<Record> {
    let mut mapper = Mapper::new(m, source).expect("source");
    raws.iter().map(|r| mapper.map(r, 0).unwrap_or_else(|e| panic!("{r}: {e}"))).collect()
}

#[test]
fn identify_and_events_make_one_golden_record_and_reingest_changes_nothing() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("store").await {
            let batch = records(
                &m,
                "web",
                &[
                    json!({"id": "1", "at": "2026-01-01T00:00:00Z", "anon": "a1", "email": "Ada@X.org", "name": "Ada", "optin": true}),
                    json!({"id": "2", "at": "2026-01-02T00:00:00Z", "anon": "a1", "event": "order_completed", "revenue": 60}),
                    json!({"id": "3", "at": "2026-01-03T00:00:00Z", "anon": "a2", "email": "ada@x.org", "event": "order_completed", "revenue": "50.5"}),
                ],
            );
            let r = store.apply_batch(&cfg, batch.clone(), Some(("test", "3"))).await.expect("apply");
            assert_eq!((r.accepted, r.new_profiles, r.duplicates), (3, 1, 0), "{name}");
            let p = store.find_profile(&m, "email", " ADA@x.org").await.expect("find");
            assert_eq!(store.find_profile(&m, "anonymous_id", "a2").await.expect("a2"), p, "{name}");
            let g = store.golden(&m, p, 10).await.expect("golden");
            assert_eq!(g.identities.len(), 3, "{name}");
            assert_eq!(g.traits["name"].value, json!("Ada"));
            assert_eq!(g.computed["ltv"], json!(110.5), "{name}");
            assert!(g.consent["email_marketing"].granted);
            assert_eq!(g.audiences, vec!["big".to_owned()], "{name}");
            assert_eq!(g.events.len(), 2);
            assert_eq!(store.cursor("test").await.expect("cursor").as_deref(), Some("3"));

            let before = store.partition().await.expect("partition");
            let again = store.apply_batch(&cfg, batch, None).await.expect("again");
            assert_eq!((again.accepted, again.duplicates), (0, 3), "{name}");
            assert_eq!(store.partition().await.expect("partition"), before, "{name}");
            let g2 = store.golden(&m, p, 10).await.expect("golden");
            assert_eq!(g2.computed["ltv"], json!(110.5), "{name}: re-ingest must not double count");
            drop_db(db).await;
        }
    });
}

#[test]
fn unique_keys_never_merge_and_the_conflict_is_explained() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("store").await {
            let batch = records(
                &m,
                "crm",
                &[
                    json!({"id": "c1", "at": "2026-01-01T00:00:00Z", "crm": "A", "email": "family@x.org"}),
                    json!({"id": "c2", "at": "2026-01-02T00:00:00Z", "crm": "B", "email": "family@x.org"}),
                ],
            );
            let r = store.apply_batch(&cfg, batch, None).await.expect("apply");
            assert_eq!(r.conflicts, 1, "{name}");
            let a = store.find_profile(&m, "crm_id", "A").await.expect("A");
            let b = store.find_profile(&m, "crm_id", "B").await.expect("B");
            assert_ne!(a, b, "{name}: two CRM ids never merge");
            assert_eq!(
                store.find_profile(&m, "email", "family@x.org").await.expect("email"),
                a,
                "earliest link keeps the email"
            );
            let x = store.explain(b).await.expect("explain");
            assert!(
                x.ledger.iter().any(|e| e["kind"] == "conflict" && e["rule"].as_str().unwrap_or("").contains("crm_id")),
                "{name}: {:?}",
                x.ledger
            );
            drop_db(db).await;
        }
    });
}

#[test]
fn a_late_earlier_record_reresolves_the_component() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("store").await {
            // B claims the email first in arrival order, but A's record is older.
            let late =
                records(&m, "crm", &[json!({"id": "b", "at": "2026-03-01T00:00:00Z", "crm": "B", "email": "e@x.org"})]);
            store.apply_batch(&cfg, late, None).await.expect("b");
            let early =
                records(&m, "crm", &[json!({"id": "a", "at": "2026-01-01T00:00:00Z", "crm": "A", "email": "e@x.org"})]);
            store.apply_batch(&cfg, early, None).await.expect("a");
            let a = store.find_profile(&m, "crm_id", "A").await.expect("A");
            assert_eq!(store.find_profile(&m, "email", "e@x.org").await.expect("email"), a, "{name}");
            assert_eq!(
                store.partition().await.expect("partition"),
                vec![vec!["crm_id=A".to_owned(), "email=e@x.org".to_owned()], vec!["crm_id=B".to_owned()]],
                "{name}"
            );
            drop_db(db).await;
        }
    });
}

#[test]
fn merges_are_logged_with_their_record_and_unmerge_sticks() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("store").await {
            let first = records(
                &m,
                "web",
                &[
                    json!({"id": "1", "at": "2026-01-01T00:00:00Z", "anon": "a1", "email": "p@x.org"}),
                    json!({"id": "2", "at": "2026-01-01T00:00:00Z", "anon": "a2", "phone": "0701234567"}),
                ],
            );
            assert_eq!(store.apply_batch(&cfg, first, None).await.expect("1").new_profiles, 2);
            let joining = records(
                &m,
                "web",
                &[json!({"id": "3", "at": "2026-01-02T00:00:00Z", "email": "p@x.org", "phone": "+46 70 123 45 67"})],
            );
            let r = store.apply_batch(&cfg, joining, None).await.expect("join");
            assert_eq!(r.merges, 1, "{name}");
            let p = store.find_profile(&m, "phone", "070-123 45 67").await.expect("phone");
            assert_eq!(store.find_profile(&m, "anonymous_id", "a1").await.expect("a1"), p, "{name}");
            let x = store.explain(p).await.expect("explain");
            let merge = x.ledger.iter().find(|e| e["kind"] == "merge").expect("merge in ledger");
            assert_eq!(merge["record"], "web/3", "{name}");

            let (from, to) = store.unmerge(&m, "anonymous_id", "a2").await.expect("unmerge");
            assert_eq!(from, p);
            // A later record carrying a2 with the email does not join it back.
            let again = records(
                &m,
                "web",
                &[json!({"id": "4", "at": "2026-01-03T00:00:00Z", "anon": "a2", "email": "p@x.org"})],
            );
            store.apply_batch(&cfg, again, None).await.expect("again");
            assert_eq!(store.find_profile(&m, "anonymous_id", "a2").await.expect("a2"), to, "{name}");
            assert_ne!(store.find_profile(&m, "email", "p@x.org").await.expect("email"), to);
            drop_db(db).await;
        }
    });
}

/// Every profile merged away points at the one profile that holds its
/// people now, through merges in one batch and across batches.
#[test]
fn merged_profiles_point_at_the_profile_they_live_on_in() {
    use sqlx::Row;
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("merged").await {
            let apart: Vec<Value> = (1..=6)
                .map(|i| json!({"id": format!("s{i}"), "at": "2026-01-01T00:00:00Z", "anon": format!("a{i}")}))
                .collect();
            assert_eq!(store.apply_batch(&cfg, records(&m, "web", &apart), None).await.expect("apart").new_profiles, 6);
            // One batch joins a1..a3 (two merges), another a4..a5.
            let join =
                |id: &str, a: &str, b: &str| json!({"id": id, "at": "2026-01-02T00:00:00Z", "anon": a, "email": b});
            let first = [join("j1", "a1", "p@x.org"), join("j2", "a2", "p@x.org"), join("j3", "a3", "p@x.org")];
            let r = store.apply_batch(&cfg, records(&m, "web", &first), None).await.expect("first");
            assert_eq!(r.merges, 2, "{name}");
            let second = [join("j4", "a4", "q@x.org"), join("j5", "a5", "q@x.org")];
            store.apply_batch(&cfg, records(&m, "web", &second), None).await.expect("second");
            // A later batch joins the two merged profiles and a6: profiles
            // merged into a profile that is now merged away follow it.
            let last = [
                json!({"id": "j6", "at": "2026-01-03T00:00:00Z", "email": "p@x.org", "phone": "0701234567"}),
                json!({"id": "j7", "at": "2026-01-03T00:00:00Z", "anon": "a6", "phone": "0701234567"}),
                json!({"id": "j8", "at": "2026-01-03T00:00:00Z", "email": "q@x.org", "phone": "0701234567"}),
            ];
            store.apply_batch(&cfg, records(&m, "web", &last), None).await.expect("last");
            let live = store.find_profile(&m, "anonymous_id", "a1").await.expect("a1");
            for i in 2..=6 {
                let p = store.find_profile(&m, "anonymous_id", &format!("a{i}")).await.expect("found");
                assert_eq!(p, live, "{name}: a{i} joined");
            }
            let rows = sqlx::query("SELECT id, merged_into FROM profiles").fetch_all(store.pool()).await.expect("rows");
            let mut merged = 0;
            for r in rows {
                let (id, into): (i64, Option<i64>) = (r.try_get(0).expect("id"), r.try_get(1).expect("merged_into"));
                if id == live {
                    assert_eq!(into, None, "{name}: the live profile is not merged");
                } else {
                    assert_eq!(into, Some(live), "{name}: profile {id} points at the live profile");
                    merged += 1;
                }
            }
            assert_eq!(merged, 5, "{name}");
            drop_db(db).await;
        }
    });
}

#[test]
fn merge_policies_keep_provenance() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("store").await {
            let mut batch = records(
                &m,
                "web",
                &[
                    json!({"id": "w1", "at": "2026-01-01T00:00:00Z", "crm": "C", "tier": "bronze", "points": 10, "visits": 2, "city": "Oslo", "signup": "2024-05-01"}),
                    json!({"id": "w2", "at": "2026-02-01T00:00:00Z", "crm": "C", "tier": "gold", "points": 7, "visits": 3, "city": "Bergen", "signup": "2023-01-01", "optin": "no"}),
                ],
            );
            batch.extend(records(&m, "crm", &[json!({"id": "k1", "at": "2025-06-01T00:00:00Z", "crm": "C", "tier": "silver", "name": "Kari"})]));
            store.apply_batch(&cfg, batch, None).await.expect("apply");
            let p = store.find_profile(&m, "crm_id", "C").await.expect("C");
            let g = store.golden(&m, p, 0).await.expect("golden");
            assert_eq!(g.traits["tier"].value, json!("silver"), "{name}: crm outranks web");
            assert_eq!(g.traits["tier"].source, "crm");
            assert_eq!(g.traits["points"].value, json!(10), "{name}: max");
            assert_eq!(g.traits["visits"].value, json!(5), "{name}: sum");
            assert_eq!(g.traits["city"].value, json!("Oslo"), "{name}: first");
            assert_eq!(g.traits["signup"].value, json!("2023-01-01"), "{name}: min");
            assert_eq!(g.traits["name"].observed_at, "2025-06-01T00:00:00Z");
            assert!(!g.consent["email_marketing"].granted, "{name}: withdrawn");
            drop_db(db).await;
        }
    });
}

#[test]
fn entities_attach_to_profiles_and_keep_the_newest_row() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        for (name, store, db, _dir) in backends("store").await {
            let batch = records(
                &m,
                "pos",
                &[
                    json!({"id": "b1", "at": "2026-01-02T00:00:00Z", "crm": "Z", "booking_id": "BK1", "nights": "3"}),
                    json!({"id": "b0", "at": "2026-01-01T00:00:00Z", "crm": "Z", "booking_id": "BK1", "nights": "2"}),
                ],
            );
            store.apply_batch(&cfg, batch, None).await.expect("apply");
            let p = store.find_profile(&m, "crm_id", "Z").await.expect("Z");
            let g = store.golden(&m, p, 0).await.expect("golden");
            assert_eq!(g.entities.len(), 1, "{name}");
            assert_eq!(g.entities[0]["fields"]["nights"], json!(3), "{name}");
            drop_db(db).await;
        }
    });
}

#[test]
fn probabilistic_matching_links_people_without_a_shared_key() {
    rt().block_on(async {
        let text = cdp::bench::people::MANIFEST;
        let m = load_str(text, &Options::validate(".")).manifest.expect("bench manifest");
        let cfg = IdentityConfig::from_manifest(&m);
        let ppl = cdp::bench::people::people(5, 400);
        let recs = cdp::bench::people::records(5, &ppl, 3);
        for (name, store, db, _dir) in backends("store").await {
            for src in ["crm", "pos"] {
                let raws: Vec<Value> = recs.iter().filter(|r| r.source == src).map(|r| r.record.clone()).collect();
                let mut mapper = Mapper::new(&m, src).expect("source");
                let batch: Vec<Record> = raws.iter().filter_map(|r| mapper.map(r, 0).ok()).collect();
                store.apply_batch(&cfg, batch, None).await.expect("apply");
            }
            let before = store.partition().await.expect("partition").len();
            let r = store.match_profiles(&m).await.expect("match");
            assert!(r.candidates > 0 && r.links > 300, "{name}: {r:?}");
            let after = store.partition().await.expect("partition").len();
            assert!(after <= before - 300, "{name}: {before} -> {after}");
            // Running again links nothing new.
            let again = store.match_profiles(&m).await.expect("match");
            assert_eq!(again.batch.merges, 0, "{name}");
            // The merge is explained with its score.
            let p = store.find_profile(&m, "receipt", "R0").await.expect("R0");
            let x = store.explain(p).await.expect("explain");
            if x.identities.len() > 1 {
                let linked: Vec<&Value> = x.identities.iter().flat_map(|i| i.linked_by.iter()).collect();
                assert!(
                    linked.iter().any(|l| l["rule"] == "probabilistic (Fellegi-Sunter)"
                        && l["probability"].as_f64().unwrap_or(0.0) >= 0.95),
                    "{name}: {linked:?}"
                );
            }
            drop_db(db).await;
        }
    });
}

/// Two CRM records of one person under different CRM ids share an email;
/// `crm_id: { limit: 1 }` keeps them apart. With `cross_limits`, a match of
/// their profiles strong enough joins them, and the joined profile still
/// takes a web visitor by the email; without, the limit holds.
#[test]
fn a_strong_match_crosses_a_unique_key_only_where_the_manifest_allows() {
    rt().block_on(async {
        const FIRST: [&str; 12] =
            ["Anna", "Erik", "Maria", "Lars", "Karin", "Johan", "Eva", "Nils", "Sara", "Olof", "Ida", "Per"];
        const LAST: [&str; 10] =
            ["Berg", "Lind", "Holm", "Ek", "Sjöberg", "Wall", "Strand", "Falk", "Nyman", "Dahl"];
        let crm = |id: &str, i: usize| {
            json!({
                "id": format!("{id}-rec"), "at": format!("2026-01-{:02}T00:00:00Z", 1 + i % 27), "crm_id": id,
                "email": format!("p{i}@x.org"), "first_name": FIRST[i % 12], "last_name": LAST[(i / 12) % 10],
                "birth_date": format!("19{:02}-{:02}-{:02}", 40 + i % 50, 1 + i % 12, 1 + i % 28),
                "postcode": format!("1{i:04}"),
            })
        };
        let mut raws: Vec<Value> = (0..300).map(|i| crm(&format!("C{i}"), i)).collect();
        // Five people entered again under new contact ids.
        raws.extend((0..5).map(|i| crm(&format!("D{i}"), i * 37)));
        let web = json!({"id": "w1", "at": "2026-02-01T00:00:00Z", "anonymousId": "cookie-1", "email": "p37@x.org", "event": "product_viewed", "sku": "s"});
        let mut seen = Vec::new();
        for cross in [true, false] {
            let shipped = "\n    cross_limits: { crm_id: 0.995 }";
            assert!(cdp::bench::people::MANIFEST.contains(shipped));
            let text = if cross {
                cdp::bench::people::MANIFEST.to_owned()
            } else {
                cdp::bench::people::MANIFEST.replace(shipped, "")
            };
            let l = load_str(&text, &Options::validate("."));
            assert!(!l.has_errors(), "{:#?}", l.diagnostics);
            let m = l.manifest.expect("manifest");
            let cfg = IdentityConfig::from_manifest(&m);
            for (name, store, db, _dir) in backends("store").await {
                store.apply_batch(&cfg, records(&m, "crm", &raws), None).await.expect("crm");
                let apart = store.find_profile(&m, "crm_id", "D1").await.expect("D1");
                assert_ne!(apart, store.find_profile(&m, "crm_id", "C37").await.expect("C37"), "{name}");
                store.match_profiles(&m).await.expect("match");
                store.apply_batch(&cfg, records(&m, "web", std::slice::from_ref(&web)), None).await.expect("web");
                let c37 = store.find_profile(&m, "crm_id", "C37").await.expect("C37");
                let d1 = store.find_profile(&m, "crm_id", "D1").await.expect("D1");
                let cookie = store.find_profile(&m, "anonymous_id", "cookie-1").await.expect("cookie");
                assert_eq!(c37, cookie, "{name}: the visitor joins by the email");
                assert_eq!(c37 == d1, cross, "{name}: cross_limits {cross}");
                let joined = duplicates_joined(&store, &m).await;
                seen.push((cross, name, joined));
                drop_db(db).await;
            }
        }
        // With cross_limits all five pairs join, on both backends; without, none.
        for (cross, name, joined) in seen {
            assert_eq!(joined, if cross { 5 } else { 0 }, "{name}: cross_limits {cross}");
        }
    });
}

/// How many of the duplicates `D0…D4` share a profile with their first CRM id.
async fn duplicates_joined(store: &Store, m: &Manifest) -> usize {
    let mut n = 0;
    for i in 0..5 {
        let d = store.find_profile(m, "crm_id", &format!("D{i}")).await.expect("D");
        let c = store.find_profile(m, "crm_id", &format!("C{}", i * 37)).await.expect("C");
        n += usize::from(c == d);
    }
    n
}

/// Random records over a small pool of identifiers, so merges, limits and
/// conflicts are frequent.
fn arb_records() -> impl Strategy<Value = Vec<Value>> {
    let rec = (0..4usize, 0..3usize, 0..4usize, 0..5usize, 0..30i64, 0..3usize, prop::bool::ANY).prop_map(
        |(crm, email, phone, anon, day, tier, with_crm)| {
            let mut o = serde_json::Map::new();
            if with_crm {
                o.insert("crm".into(), json!(format!("C{crm}")));
            }
            if email > 0 {
                o.insert("email".into(), json!(format!("e{email}@x.org")));
            }
            if phone > 0 {
                o.insert("phone".into(), json!(format!("+4670000000{phone}")));
            }
            o.insert("anon".into(), json!(format!("a{anon}")));
            o.insert("at".into(), json!(format!("2026-01-{:02}T00:00:00Z", day + 1)));
            o.insert("tier".into(), json!(["bronze", "silver", "gold"][tier]));
            o.insert("visits".into(), json!(1));
            Value::Object(o)
        },
    );
    prop::collection::vec(rec, 1..24).prop_map(|mut v| {
        for (i, r) in v.iter_mut().enumerate() {
            r["id"] = json!(format!("m{i}"));
        }
        v
    })
}

async fn resolve_all(m: &Manifest, raws: &[Value], batch: usize) -> Vec<(Vec<Vec<String>>, Vec<Value>)> {
    let cfg = IdentityConfig::from_manifest(m);
    let mut out = Vec::new();
    for (_, store, db, _dir) in backends("store").await {
        for chunk in raws.chunks(batch.max(1)) {
            store.apply_batch(&cfg, records(m, "web", chunk), None).await.expect("apply");
        }
        let partition = store.partition().await.expect("partition");
        let mut golden = Vec::new();
        for group in &partition {
            let (k, v) = group[0].split_once('=').expect("k=v");
            let p = store.find_profile(m, k, v).await.expect("find");
            let g = store.golden(m, p, 0).await.expect("golden");
            golden.push(json!({"tier": g.traits.get("tier").map(|t| &t.value), "visits": g.traits.get("visits").map(|t| &t.value)}));
        }
        out.push((partition, golden));
        drop_db(db).await;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any arrival order, in any batch sizes, yields the same partition of
    /// identifiers and the same golden traits, on both backends.
    #[test]
    fn arrival_order_does_not_change_the_result(raws in arb_records(), seed in 0u64..1000, batch in 1usize..8) {
        let m = manifest();
        let mut shuffled = raws.clone();
        // Deterministic shuffle from the seed.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let rt = rt();
        let want = rt.block_on(resolve_all(&m, &raws, raws.len()));
        let got = rt.block_on(resolve_all(&m, &shuffled, batch));
        for (w, g) in want.iter().zip(&got) {
            prop_assert_eq!(&w.0, &g.0);
            prop_assert_eq!(&w.1, &g.1);
        }
        // Both backends agree with each other too.
        if want.len() == 2 {
            prop_assert_eq!(&want[0], &want[1]);
        }
    }
}

/// Every trait type, numeric ones next to string ones and present in only
/// some records, over enough batches that PostgreSQL reuses its prepared
/// statements: a NULL float bound first once fixed a parameter's type and
/// failed later batches ("incorrect binary data format in bind parameter").
#[test]
fn mixed_trait_types_ingest_alike_on_both_backends() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        let raws: Vec<Value> = (0..25_000)
            .map(|i| {
                let mut r =
                    json!({"id": format!("m{i}"), "at": 1_700_000_000_000i64 + i, "crm": format!("c{}", i % 9_000)});
                if i % 3 != 0 {
                    r["points"] = json!(i % 97);
                }
                if i % 2 == 0 {
                    r["tier"] = json!(["gold", "silver"][i as usize % 2]);
                    r["visits"] = json!(i % 5);
                }
                if i % 5 == 0 {
                    r["name"] = json!(format!("N{i}"));
                    r["city"] = json!("Lund");
                    r["signup"] = json!("2020-02-03");
                }
                r
            })
            .collect();
        let mut golden = Vec::new();
        for (name, store, db, _dir) in backends("store").await {
            for chunk in raws.chunks(5_000) {
                let r = store.apply_batch(&cfg, records(&m, "web", chunk), None).await;
                assert!(r.is_ok(), "{name}: {r:?}");
            }
            let mut traits = Vec::new();
            for c in ["c0", "c1", "c5", "c8999"] {
                let p = store.find_profile(&m, "crm_id", c).await.expect("profile");
                let g = store.golden(&m, p, 0).await.expect("golden");
                let mut t: Vec<(String, Value)> = g.traits.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect();
                t.sort_by(|a, b| a.0.cmp(&b.0));
                traits.push(t);
            }
            assert!(traits[1].iter().any(|(k, v)| k == "points" && v.is_number()), "{name}: {traits:?}");
            golden.push(traits);
            drop_db(db).await;
        }
        if golden.len() == 2 {
            assert_eq!(golden[0], golden[1], "both backends agree");
        }
    });
}

/// Batches large enough for PostgreSQL's bulk path (COPY into a staging
/// table) store what the small-batch path and SQLite store: text with the
/// characters COPY's format reserves, numbers and NULLs, duplicates of
/// stored records counted as such, upserts of stored rows; and no staged
/// row outlives its batch.
#[test]
fn large_batches_store_the_same_on_both_backends() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        let raw = |i: i64| {
            let tier = ["gold", "silver\tplus"][i as usize % 2];
            let mut r = json!({
                "id": format!("m{i}\t{}", i % 3),
                "at": 1_700_000_000_000i64 + i,
                "crm": format!("c{}\\{}", i % 4_000, i % 2),
                "name": format!("Ada\n{i}\r\\N"),
                "tier": tier,
            });
            if i % 3 == 0 {
                r["points"] = json!(i % 101);
                r["email"] = json!(format!("p{}@x.org", i % 5_000));
            }
            if i % 7 == 0 {
                r["visits"] = json!(1);
            }
            r
        };
        let first: Vec<Value> = (0..6_000).map(raw).collect();
        // Half of these are stored already.
        let second: Vec<Value> = (3_000..9_000).map(raw).collect();
        let mut seen = Vec::new();
        for (name, store, db, _dir) in backends("store").await {
            if name == "postgres" {
                // Rows of a batch whose process died: the first batch staged
                // by this process sweeps them.
                sqlx::query(
                    "INSERT INTO cdp_stage (batch, seq, staged_at, c1) VALUES (-1, 0, now() - interval '2 hours', 'x')",
                )
                .execute(store.pool())
                .await
                .expect("stale row");
            }
            let a = store.apply_batch(&cfg, records(&m, "web", &first), None).await.expect("first batch");
            assert_eq!((a.accepted, a.duplicates), (6_000, 0), "{name}");
            let b = store.apply_batch(&cfg, records(&m, "web", &second), None).await.expect("second batch");
            assert_eq!((b.accepted, b.duplicates), (3_000, 3_000), "{name}");
            assert_eq!(store.record_count().await.expect("count"), 9_000, "{name}");
            let mut golden = Vec::new();
            for c in ["c0\\0", "c1\\1", "c3999\\1"] {
                let p = store.find_profile(&m, "crm_id", c).await.expect("profile");
                let g = store.golden(&m, p, 0).await.expect("golden");
                let mut t: Vec<(String, Value)> = g.traits.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect();
                t.sort_by(|a, b| a.0.cmp(&b.0));
                golden.push(t);
            }
            assert!(
                golden[0].iter().any(|(k, v)| k == "name" && v.as_str().is_some_and(|s| s.contains('\n'))),
                "{name}: {golden:?}"
            );
            if name == "postgres" {
                let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cdp_stage")
                    .fetch_one(store.pool())
                    .await
                    .expect("staged rows");
                assert_eq!(left, 0, "no staged row outlives its batch, and none of a dead one is left");
            }
            seen.push((store.partition().await.expect("partition"), golden));
            drop_db(db).await;
        }
        if seen.len() == 2 {
            assert_eq!(seen[0], seen[1], "both backends agree");
        }
    });
}

/// An escaped NUL in any string ingests on both backends: removed from text
/// stored as such (identifiers, names, message ids), kept in JSON values.
#[test]
fn a_nul_character_in_strings_does_not_abort_ingest() {
    rt().block_on(async {
        let m = manifest();
        let cfg = IdentityConfig::from_manifest(&m);
        let raw: Value = serde_json::from_str(
            r#"[{"id": "n\u00001", "at": "2026-01-01T00:00:00Z", "anon": "a\u0000b", "name": "Ad\u0000a", "tier": "x"},
                {"id": "n2", "at": "2026-01-02T00:00:00Z", "anon": "ok", "event": "order_completed", "revenue": 5, "note": "x\u0000"}]"#,
        )
        .expect("json");
        let raws = raw.as_array().expect("array").clone();
        for (name, store, db, _dir) in backends("store").await {
            let r = store.apply_batch(&cfg, records(&m, "web", &raws), None).await.expect("ingest with NUL");
            assert_eq!(r.accepted, 2, "{name}");
            let p = store.find_profile(&m, "anonymous_id", "ab").await.expect("NUL removed from the identifier");
            let g = store.golden(&m, p, 0).await.expect("golden");
            assert_eq!(g.traits["name"].value, json!("Ad\u{0}a"), "{name}: kept in the JSON value");
            drop_db(db).await;
        }
    });
}
