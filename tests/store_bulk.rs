//! Bulk profile reads on both backends: a page of profiles read at once
//! gives each profile exactly the rows a read of it alone gives, and live
//! profiles page through the store in order.

mod support;

use cdp::ingest::{Mapper, Record};
use cdp::manifest::{Manifest, Options, load_str};
use cdp::profile::{Model, ProfileRows, audiences_of, golden_record};
use cdp::store::Store;
use cdp::store::ingest::IdentityConfig;
use serde_json::{Value, json};
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
      traits: { tier: tier, points: points }
      event: { name_field: event }
      consent: { email_marketing: optin }
  crm:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { crm_id: crm, email: email }
      traits: { tier: tier, points: points }
      consent: { email_marketing: optin, sms: sms }
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
    email: { normalize: email }
    anonymous_id: {}
  priority: [crm_id, email, anonymous_id]
model:
  traits:
    tier: { type: string }
    points: { type: integer, merge: sum }
  events:
    order_completed: { properties: { total: number } }
    page_viewed: {}
  entities:
    booking: { key: booking_id, fields: { booking_id: string, nights: integer } }
  computed:
    spend: { sum: order_completed.total }
    views: { count: page_viewed }
consent:
  purposes: [email_marketing, sms]
audiences:
  big: { where: "spend >= 100" }
  mailable: { where: 'consent.email_marketing && !consent.sms && tier != "bronze"' }
  browsing: { where: "views >= 2 && !audiences.big" }
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

/// 60 people: CRM contacts (some with two answers), anonymous web sessions
/// that sign in later (merging into the contact), events on shared
/// days, bookings; one identifier split off by hand.
async fn fill(store: &Store, m: &Manifest) {
    let cfg = IdentityConfig::from_manifest(m);
    let day = |d: u32| format!("2026-03-{:02}T10:00:00Z", 1 + d % 28);
    let (mut crm, mut web, mut pos) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..60u32 {
        let email = format!("p{i}@x.org");
        if i % 4 != 3 {
            let tier = ["bronze", "silver", "gold"][i as usize % 3];
            crm.push(json!({"id": format!("c{i}"), "at": day(i), "crm": format!("C{i}"), "email": email,
                "tier": tier, "points": i, "optin": i % 2 == 0,
                "sms": i % 5 == 0}));
        }
        for s in 0..(i % 5) {
            let mut r = json!({"id": format!("w{i}-{s}"), "at": day(i + s), "anon": format!("a{i}-{}", s % 2),
                "event": if s % 2 == 0 { "order_completed" } else { "page_viewed" }, "total": 30 + s * 20});
            if s == 1 {
                r["email"] = json!(email);
                r["points"] = json!(5);
                r["tier"] = json!("gold");
                r["optin"] = json!(i % 3 == 0);
            }
            web.push(r);
        }
        if i % 6 == 0 {
            pos.push(
                json!({"id": format!("b{i}"), "at": day(i), "crm": format!("C{i}"), "booking_id": format!("B{i}"),
                "nights": i % 4}),
            );
        }
    }
    for (source, raws) in [("crm", crm), ("web", web), ("pos", pos)] {
        store.apply_batch(&cfg, records(m, source, &raws), None).await.expect("apply");
    }
    store.unmerge(m, "anonymous_id", "a9-0").await.expect("unmerge");
}

#[test]
fn a_page_of_profiles_reads_as_each_profile_alone() {
    rt().block_on(async {
        let m = manifest();
        let model = Model::new(&m).expect("model");
        for (name, store, db, _dir) in backends("bulk").await {
            fill(&store, &m).await;
            let live = store.live_profiles().await.expect("live");
            assert!(live.len() > 60, "{name}: {} profiles", live.len());

            let mut paged = Vec::new();
            let mut after = i64::MIN;
            loop {
                let page = store.live_profile_page(after, 7).await.expect("page");
                let Some(&last) = page.last() else { break };
                assert!(page.len() <= 7 && page.windows(2).all(|w| w[0] < w[1]), "{name}: {page:?}");
                after = last;
                paged.extend(page);
            }
            assert_eq!(paged, live, "{name}: pages cover every live profile once, ascending");
            assert!(store.live_profile_page(i64::MAX, 10).await.expect("past the end").is_empty());
            assert_eq!(store.live_profile_page(i64::MIN, usize::MAX).await.expect("no limit"), live, "{name}");

            // Newest first, an id that holds nothing, and a repeat.
            let mut asked: Vec<i64> = live.iter().rev().copied().collect();
            asked.insert(3, 42);
            asked.push(live[0]);
            let many = store.profile_rows_many(&asked).await.expect("many");
            assert_eq!(many.len(), asked.len(), "{name}");
            let mut multi = 0;
            for (p, rows) in asked.iter().zip(&many) {
                let alone = store.profile_rows(*p).await.expect("alone");
                assert_eq!(rows, &alone, "{name}: profile {p}");
                multi += usize::from(rows.identities.len() > 1);
                let g = golden_record(&m, &model, rows.clone(), 0, 0);
                assert_eq!(audiences_of(&m, &model, rows, 0), g.audiences, "{name}: profile {p}");
            }
            assert_eq!(many[3], ProfileRows { profile: 42, ..ProfileRows::default() }, "{name}");
            assert_eq!(many[many.len() - 1], many[many.len() - 2], "{name}: a repeat reads the same rows");
            assert!(multi > 20, "{name}: merged profiles were read ({multi})");
            // Each identifier is read with the profile the store puts it in.
            let mut groups: Vec<Vec<String>> = store
                .profile_rows_many(&live)
                .await
                .expect("live")
                .iter()
                .map(|r| {
                    let mut ids: Vec<String> = r.identities.iter().map(|i| format!("{}={}", i.key, i.value)).collect();
                    ids.sort();
                    ids
                })
                .collect();
            groups.sort();
            assert_eq!(groups, store.partition().await.expect("partition"), "{name}");
            let all_parts = |f: fn(&ProfileRows) -> usize| many.iter().map(f).sum::<usize>();
            for (part, n) in [
                ("traits", all_parts(|r| r.traits.len())),
                ("consent", all_parts(|r| r.consent.len())),
                ("events", all_parts(|r| r.events.len())),
                ("entities", all_parts(|r| r.entities.len())),
            ] {
                assert!(n > 0, "{name}: no {part} read");
            }
            assert!(store.profile_rows_many(&[]).await.expect("none").is_empty());
            drop_db(db).await;
        }
    });
}
