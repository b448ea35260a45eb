//! A generator of realistic people data with ground truth, from a fixed seed:
//! CRM contacts, web sessions and store receipts of the same people, with
//! typos, nicknames, swapped first and last names, missing values, moved
//! addresses, shared family emails and recycled phone numbers; and, in
//! [`traps`], loyalty members, CRM duplicates under new ids, phones written
//! with trunk prefixes and shared store tablets. Used by the ingest speed
//! benchmark and the identity accuracy benchmark.

use serde_json::{Value, json};

pub use crate::rng::Rng;

const FIRST: &[&str] = &[
    "anna", "erik", "maria", "lars", "karin", "johan", "eva", "anders", "sofia", "per", "emma", "nils", "ingrid",
    "olof", "elin", "magnus", "sara", "henrik", "lena", "gustav", "ida", "oskar", "klara", "axel", "maja", "hugo",
    "alice", "leo", "ebba", "viktor", "astrid", "filip", "linnea", "isak", "wilma", "emil", "freja", "david", "julia",
    "adam",
];
const NICK: &[(&str, &str)] = &[
    ("johan", "jojo"),
    ("magnus", "mange"),
    ("katarina", "kattis"),
    ("elisabeth", "lisa"),
    ("alexander", "alex"),
    ("christoffer", "chris"),
    ("margareta", "greta"),
    ("fredrik", "fredde"),
    ("henrik", "henke"),
    ("anders", "andy"),
];
const LAST: &[&str] = &[
    "andersson",
    "johansson",
    "karlsson",
    "nilsson",
    "eriksson",
    "larsson",
    "olsson",
    "persson",
    "svensson",
    "gustafsson",
    "pettersson",
    "jonsson",
    "jansson",
    "hansson",
    "bengtsson",
    "lindberg",
    "lindqvist",
    "lindgren",
    "berg",
    "axelsson",
    "lundberg",
    "mattsson",
    "holm",
    "sandberg",
    "forsberg",
    "sjoberg",
    "wallin",
    "engstrom",
    "danielsson",
    "hakansson",
];
const CITY: &[(&str, u32)] =
    &[("stockholm", 11), ("goteborg", 41), ("malmo", 21), ("uppsala", 75), ("umea", 90), ("lund", 22)];

/// One true person.
#[derive(Debug, Clone)]
pub struct Person {
    pub id: u64,
    pub first: String,
    pub last: String,
    pub birth: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub postcode: String,
    pub city: String,
    pub crm_id: String,
}

/// A generated record with the person it truly belongs to.
#[derive(Debug, Clone)]
pub struct Labeled {
    pub source: &'static str,
    pub person: u64,
    pub record: Value,
}

fn typo(rng: &mut Rng, s: &str) -> String {
    let mut c: Vec<char> = s.chars().collect();
    if c.len() < 3 {
        return s.to_owned();
    }
    let i = 1 + rng.below(c.len() as u64 - 2) as usize;
    match rng.below(3) {
        0 => {
            c.swap(i, i - 1);
        }
        1 => {
            c.remove(i);
        }
        _ => c.insert(i, c[i]),
    }
    c.into_iter().collect()
}

/// Generates `people` people; family emails and recycled phones are shared on purpose.
pub fn people(seed: u64, people: usize) -> Vec<Person> {
    let mut rng = Rng::new(seed);
    let mut out: Vec<Person> = Vec::with_capacity(people);
    for id in 0..people as u64 {
        let first = rng.pick(FIRST).to_owned();
        let last = rng.pick(LAST).to_owned();
        let (city, area) = CITY[rng.below(CITY.len() as u64) as usize];
        let postcode = format!("{area}{:03}", rng.below(1000));
        let birth = format!("{}-{:02}-{:02}", 1950 + rng.below(55), 1 + rng.below(12), 1 + rng.below(28));
        // An address belongs to one holder: the number in it keeps two
        // people of the same name apart (with `id % 97` there, 40 first
        // names × 30 last names × 97 × 5 domains gave some 8,600 pairs of
        // strangers one address at 100,000 people).
        let mut email = (!rng.chance(0.08)).then(|| format!("{first}.{last}{id}@mail{}.example", rng.below(5)));
        // Shared family email: a few people use a relative's address.
        if id > 0 && rng.chance(0.02) {
            let other = rng.below(id) as usize;
            email = out[other].email.clone().or(email);
        }
        let mut phone = (!rng.chance(0.15)).then(|| format!("+467{:08}", rng.below(100_000_000)));
        // Recycled number: an operator handed an old customer's number to a new one.
        if id > 0 && rng.chance(0.01) {
            let other = rng.below(id) as usize;
            phone = out[other].phone.clone().or(phone);
        }
        out.push(Person {
            id,
            first,
            last,
            birth,
            email,
            phone,
            postcode,
            city: city.to_owned(),
            crm_id: format!("CRM{:08}", id),
        });
    }
    out
}

/// Records about `ppl`: one CRM contact each, web sessions (anonymous ids,
/// sometimes with the email), and store receipts with only name, birth date
/// and postcode (typos, nicknames, swaps, moves) for probabilistic matching.
/// About `per_person` records per person.
pub fn records(seed: u64, ppl: &[Person], per_person: usize) -> Vec<Labeled> {
    let mut rng = Rng::new(seed ^ 0x00C0_FFEE);
    let mut out = Vec::with_capacity(ppl.len() * per_person);
    // Unique across calls: derived from the person id and a per-person counter;
    // multiplying by an odd constant is a bijection, so ids look random but never repeat.
    for p in ppl {
        let mut msg = p.id * 1024;
        let mut next = |_: &mut Rng| {
            msg += 1;
            format!("{:016x}", msg.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        };
        let day = rng.below(300);
        let at = |d: u64| format!("2026-{:02}-{:02}T{:02}:00:00Z", 1 + (d / 28) % 12, 1 + d % 28, d % 24);
        out.push(Labeled {
            source: "crm",
            person: p.id,
            record: json!({
                "id": next(&mut rng), "at": at(day), "crm_id": p.crm_id, "email": p.email, "phone": p.phone,
                "first_name": p.first, "last_name": p.last, "birth_date": p.birth, "postcode": p.postcode, "city": p.city,
            }),
        });
        let sessions = per_person.saturating_sub(2).max(1);
        let anon = format!("anon-{:x}-{}", p.id, rng.below(1000));
        for s in 0..sessions {
            let with_email = rng.chance(0.3) && p.email.is_some();
            let anon = if rng.chance(0.1) { format!("anon-{:x}-{}", p.id, 1000 + s) } else { anon.clone() };
            let mut r = json!({"id": next(&mut rng), "at": at(day + 1 + s as u64), "anonymousId": anon,
                "event": if rng.chance(0.2) { "order_completed" } else { "product_viewed" },
                "revenue": rng.below(2000) as f64 / 2.0, "sku": format!("SKU-{}", rng.below(500))});
            if with_email {
                r["email"] = json!(p.email.as_deref().map(str::to_uppercase));
            }
            out.push(Labeled { source: "web", person: p.id, record: r });
        }
        // A store receipt: no email, no phone; name as the cashier typed it.
        let mut first = p.first.clone();
        let mut last = p.last.clone();
        if rng.chance(0.15) {
            first = typo(&mut rng, &first);
        }
        if rng.chance(0.10) {
            last = typo(&mut rng, &last);
        }
        if let Some((_, nick)) = NICK.iter().find(|(n, _)| *n == first)
            && rng.chance(0.5)
        {
            first = (*nick).to_owned();
        }
        if rng.chance(0.03) {
            std::mem::swap(&mut first, &mut last);
        }
        let postcode =
            if rng.chance(0.1) { format!("{}{:03}", CITY[0].1, rng.below(1000)) } else { p.postcode.clone() };
        let birth = if rng.chance(0.05) { Value::Null } else { Value::String(p.birth.clone()) };
        out.push(Labeled {
            source: "pos",
            person: p.id,
            record: json!({"id": next(&mut rng), "at": at(day + 40), "receipt": format!("R{}", p.id),
                "first_name": first, "last_name": last, "birth_date": birth, "postcode": postcode}),
        });
    }
    out
}

/// Records that trip naive resolution, about the same people, drawn from
/// their own random stream so [`records`] stays as it was:
/// - a loyalty membership for most people, its phone written nationally with
///   the trunk prefix (`070-123 45 67`) or as `+46 (0)70 123 45 67`, a
///   nickname now and then, the email in another case;
/// - CRM duplicates: the same person entered again under a new CRM id, with
///   another spelling of the phone and sometimes no email;
/// - shared devices: a store tablet's anonymous id in web sessions of many
///   people, each signing in with their own email.
pub fn traps(seed: u64, ppl: &[Person]) -> Vec<Labeled> {
    let mut rng = Rng::new(seed ^ 0x0010_7A17);
    let mut out = Vec::with_capacity(ppl.len());
    for p in ppl {
        // Disjoint from the message ids of `records` (person id × 1024 + a small counter).
        let mut msg = p.id * 1024 + 512;
        let mut next = || {
            msg += 1;
            format!("{:016x}", msg.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        };
        let day = 10 + rng.below(300);
        let at = |d: u64| format!("2026-{:02}-{:02}T{:02}:30:00Z", 1 + (d / 28) % 12, 1 + d % 28, d % 24);
        if rng.chance(0.6) {
            let mut first = p.first.clone();
            if let Some((_, nick)) = NICK.iter().find(|(n, _)| *n == first)
                && rng.chance(0.3)
            {
                first = (*nick).to_owned();
            }
            let email = p.email.as_ref().filter(|_| rng.chance(0.7)).map(|e| capitalised(e));
            let phone = p.phone.as_deref().map(|ph| written_phone(&mut rng, ph));
            out.push(Labeled {
                source: "loyalty",
                person: p.id,
                record: json!({"id": next(), "at": at(day), "member_no": format!("L{:07}", p.id), "email": email,
                    "phone": phone, "first_name": first, "last_name": p.last, "birth_date": p.birth,
                    "postcode": p.postcode}),
            });
        }
        if rng.chance(0.04) {
            let last = if rng.chance(0.1) { typo(&mut rng, &p.last) } else { p.last.clone() };
            let email = p.email.clone().filter(|_| rng.chance(0.5));
            let phone = p.phone.as_deref().map(|ph| written_phone(&mut rng, ph));
            out.push(Labeled {
                source: "crm",
                person: p.id,
                record: json!({"id": next(), "at": at(day + 20), "crm_id": format!("CRM{:08}", p.id + 50_000_000),
                    "email": email, "phone": phone, "first_name": p.first, "last_name": last, "birth_date": p.birth,
                    "postcode": p.postcode, "city": p.city}),
            });
        }
        if let Some(email) = &p.email
            && rng.chance(0.01)
        {
            out.push(Labeled {
                source: "web",
                person: p.id,
                record: json!({"id": next(), "at": at(day + 5), "anonymousId": format!("tablet-{}", rng.below(20)),
                    "email": email, "event": "product_viewed", "sku": format!("SKU-{}", rng.below(500))}),
            });
        }
    }
    out
}

/// `ada.l@x` → `Ada.L@x`: the same address as another system stores it.
fn capitalised(email: &str) -> String {
    let mut c = email.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// A `+467XXXXXXXX` number as people write it: national with the trunk
/// prefix, international with the trunk prefix in brackets, or as stored.
fn written_phone(rng: &mut Rng, e164: &str) -> String {
    let Some(d) = e164.strip_prefix("+46").filter(|d| d.len() == 9 && d.is_ascii()) else { return e164.to_owned() };
    let groups = format!("{} {} {}", &d[2..5], &d[5..7], &d[7..9]);
    match rng.below(3) {
        0 => format!("0{}-{groups}", &d[0..2]),
        1 => format!("+46 (0){} {groups}", &d[0..2]),
        _ => e164.to_owned(),
    }
}

/// The manifest the generated records fit.
pub const MANIFEST: &str = r#"
version: 1
name: bench
storage: { url: "sqlite://bench.db" }
sources:
  crm:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { crm_id: crm_id, email: email, phone: phone }
      traits: { first_name: first_name, last_name: last_name, birth_date: birth_date, postcode: postcode, city: city }
  web:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { anonymous_id: anonymousId, email: email }
      event: { name_field: event }
  pos:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { receipt: receipt }
      traits: { first_name: first_name, last_name: last_name, birth_date: birth_date, postcode: postcode }
  loyalty:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { loyalty_id: member_no, email: email, phone: phone }
      traits: { first_name: first_name, last_name: last_name, birth_date: birth_date, postcode: postcode }
identity:
  keys:
    crm_id: { limit: 1 }
    loyalty_id: { limit: 1 }
    email: { normalize: email, limit: 3 }
    phone: { normalize: e164, default_region: SE, limit: 2 }
    anonymous_id: { limit: 100 }
    receipt: { limit: 50 }
  priority: [crm_id, loyalty_id, email, phone, anonymous_id, receipt]
  match:
    compare:
      first_name: { method: jaro_winkler, nicknames: true, swap_with: last_name }
      last_name: jaro_winkler
      birth_date: { method: date, tolerance: 1d }
      postcode: exact
    block_on: [[last_name, postcode], [birth_date, postcode], [first_name, birth_date]]
    threshold: 0.95
    cross_limits: { crm_id: 0.995 }
model:
  traits:
    first_name: { type: string }
    last_name: { type: string }
    birth_date: { type: date }
    postcode: { type: string }
    city: { type: string }
  events:
    order_completed: { properties: { revenue: number, sku: string } }
    product_viewed: { properties: { sku: string } }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_repeatable_and_mapped_cleanly() {
        let a = records(7, &people(7, 50), 10);
        let b = records(7, &people(7, 50), 10);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.record == y.record));
        let l = crate::manifest::load_str(MANIFEST, &crate::manifest::Options::validate("."));
        assert!(!l.has_errors(), "{:?}", l.diagnostics);
        let m = l.manifest.expect("manifest");
        let t = traps(7, &people(7, 300));
        assert!(t.iter().any(|r| r.source == "loyalty") && t.iter().any(|r| r.source == "crm"));
        for src in ["crm", "web", "pos", "loyalty"] {
            let mut mapper = crate::ingest::Mapper::new(&m, src).expect("mapper");
            for r in a.iter().chain(&t).filter(|r| r.source == src) {
                mapper.map(&r.record, 0).unwrap_or_else(|e| panic!("{}: {e}", r.record));
            }
        }
    }
}
