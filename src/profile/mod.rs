//! The golden record: one profile as `cdp profile get`, `cdp export`,
//! `cdp test` and the admin API show it. The store reads a profile's rows
//! ([`ProfileRows`]: identifiers, folded trait observations, consent ledger,
//! events, entities); [`golden_record`] turns them into the record: traits
//! merged by each trait's policy ([`merge`]), consent decided ([`crate::consent`]),
//! computed traits over the events ([`computed`]) and audience membership
//! ([`audiences`]). [`audiences_of`] answers the membership alone, for
//! evaluating many profiles. Pure: rows and the time in, a record out.

pub mod audiences;
pub mod computed;
pub mod merge;

use indexmap::{IndexMap, IndexSet};
use rustc_hash::FxBuildHasher;
use serde::Serialize;
use serde_json::{Value, json};

use crate::audience::Val;
use crate::consent::{self, Basis, Decision, LedgerRow};
use crate::manifest::{FieldType, Manifest, TraitType};
pub use computed::{Event, computed_traits};
pub use merge::TraitObs;

/// One identifier of the profile, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRow {
    pub id: i64,
    pub key: String,
    pub value: String,
    /// When it was first seen, milliseconds since the epoch.
    pub first_at: i64,
    /// The record that first carried it.
    pub source: String,
    pub message_id: String,
    /// Split off by hand (`cdp profile unmerge`): alone in its profile for good.
    pub isolated: bool,
}

/// One event of the profile, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub name: Option<String>,
    pub at: i64,
    pub source: String,
    pub message_id: String,
    /// The event's properties, JSON text.
    pub payload: String,
}

/// One related entity (an order, a booking, …) of the profile, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRow {
    pub entity: String,
    pub key: String,
    /// Its fields, JSON text.
    pub fields: String,
    pub at: i64,
}

/// Everything the store holds of one profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileRows {
    pub profile: i64,
    /// Ordered by first seen.
    pub identities: Vec<IdentityRow>,
    pub traits: Vec<TraitObs>,
    pub consent: Vec<LedgerRow>,
    pub events: Vec<EventRow>,
    /// Ordered by entity, then key.
    pub entities: Vec<EntityRow>,
}

#[derive(Debug, Serialize)]
pub struct IdentityView {
    #[serde(rename = "type")]
    pub key: String,
    pub value: String,
    pub first_seen: String,
    pub source: String,
    pub message_id: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TraitValue {
    pub value: Value,
    pub source: String,
    pub observed_at: String,
    pub policy: String,
}

#[derive(Debug, Serialize)]
pub struct ConsentView {
    pub granted: bool,
    /// `recorded` when the person answered, `expired` when their grant
    /// lapsed, `default` when they never answered.
    pub basis: Basis,
    pub at: Option<String>,
    pub source: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EventView {
    pub name: String,
    pub at: String,
    pub source: String,
    pub message_id: String,
    pub properties: Value,
}

/// The golden record, in the stable shape of `cdp profile get --format json`.
#[derive(Debug, Serialize)]
pub struct GoldenRecord {
    pub profile_id: String,
    pub identities: Vec<IdentityView>,
    pub traits: IndexMap<String, TraitValue>,
    pub computed: IndexMap<String, Value>,
    pub consent: IndexMap<String, ConsentView>,
    pub audiences: Vec<String>,
    pub events: Vec<EventView>,
    pub entities: Vec<Value>,
}

/// What the golden record evaluates, resolved from a manifest once: each
/// computed trait's window parsed and filter compiled, each audience's rule
/// compiled, the consent expiry parsed, and what the rules read. Build it
/// when the manifest is loaded; evaluate any number of profiles with it.
#[derive(Debug, Clone)]
pub struct Model {
    computed: Vec<(String, computed::Spec)>,
    audiences: Vec<(String, crate::audience::Program)>,
    consent_expiry: Option<std::time::Duration>,
    /// Every name the audience rules read, once (`audiences.*` aside: the
    /// rules answer those themselves).
    reads: IndexSet<String, FxBuildHasher>,
    /// The events the computed traits the rules read aggregate.
    read_events: IndexSet<String, FxBuildHasher>,
}

impl Model {
    /// The model of `m`. An error names the first part that does not resolve
    /// (a manifest `cdp validate` accepts always resolves).
    pub fn new(m: &Manifest) -> Result<Model, String> {
        let computed = computed::specs(m)?;
        let audiences = audiences::programs(m)?;
        let reads: IndexSet<String, FxBuildHasher> =
            audiences.iter().flat_map(|(_, p)| &p.vars).filter(|v| !v.starts_with("audiences.")).cloned().collect();
        let read_events =
            computed.iter().filter(|(n, _)| reads.contains(n)).map(|(_, s)| s.event().to_owned()).collect();
        Ok(Model { computed, audiences, consent_expiry: consent::expiry(m)?, reads, read_events })
    }

    /// Every audience's compiled rule, in the manifest's order.
    pub fn audiences(&self) -> &[(String, crate::audience::Program)] {
        &self.audiences
    }

    /// `consent.expiry`.
    pub fn consent_expiry(&self) -> Option<std::time::Duration> {
        self.consent_expiry
    }
}

/// The golden record of a profile from its rows, evaluated at `now`
/// (milliseconds since the epoch), with its `recent_events` newest events.
/// Computed traits and audiences read all of its events. `model` is
/// [`Model::new`] of `m`.
pub fn golden_record(m: &Manifest, model: &Model, rows: ProfileRows, recent_events: usize, now: i64) -> GoldenRecord {
    golden_record_with(m, model, rows, recent_events, now, None)
}

/// [`golden_record`] with the computed traits given (`stored`: as activation
/// keeps them, JSON text by name) instead of evaluated over the events; a
/// computed trait `stored` lacks is evaluated.
pub fn golden_record_with(
    m: &Manifest,
    model: &Model,
    rows: ProfileRows,
    recent_events: usize,
    now: i64,
    stored: Option<&[(String, String)]>,
) -> GoldenRecord {
    let traits = merge::merged_traits(m, &rows.traits);
    let decisions = consent::decide(m, model.consent_expiry, &rows.consent, now);
    let identities: Vec<IdentityView> = rows.identities.into_iter().map(IdentityView::from).collect();
    let events = computed::newest_first(&rows.events, |_| true);
    let kept: Option<IndexMap<String, Value>> = stored.and_then(|st| {
        let by: std::collections::HashMap<&str, &str> = st.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        model
            .computed
            .iter()
            .map(|(n, _)| by.get(n.as_str()).and_then(|v| serde_json::from_str(v).ok()).map(|v| (n.clone(), v)))
            .collect()
    });
    let computed = kept.unwrap_or_else(|| computed_traits(m, &model.computed, &events, now));
    let audiences = audiences::members(&model.audiences, now, |v| {
        audience_value(m, v, &traits, &computed, &decisions, &identities)
    });
    GoldenRecord {
        profile_id: rows.profile.to_string(),
        identities,
        traits,
        computed,
        consent: decisions.into_iter().map(|(p, d)| (p, ConsentView::from(d))).collect(),
        audiences,
        events: events.into_iter().take(recent_events).map(EventView::from).collect(),
        entities: rows.entities.into_iter().map(entity_json).collect(),
    }
}

/// The audiences a profile is in at `now`: the `audiences` of its
/// [`golden_record`], without the rest of the record. Only what the rules
/// read is evaluated: the traits they name merged, the consent purposes they
/// name decided, and only the events of the computed traits they name
/// parsed; no views are built. `model` is [`Model::new`] of `m`.
pub fn audiences_of(m: &Manifest, model: &Model, rows: &ProfileRows, now: i64) -> Vec<String> {
    let events = if model.read_events.is_empty() {
        Vec::new()
    } else {
        computed::newest_first(&rows.events, |name| model.read_events.contains(name))
    };
    let values: Vec<Option<Val>> = model.reads.iter().map(|v| rule_value(m, model, rows, &events, v, now)).collect();
    audiences::members(&model.audiences, now, |v| model.reads.get_index_of(v).and_then(|i| values[i].clone()))
}

/// The profile's value of a name an audience rule reads, straight from its
/// rows; what [`audience_value`] reads from the golden record.
fn rule_value(
    m: &Manifest,
    model: &Model,
    rows: &ProfileRows,
    events: &[Event<'_>],
    var: &str,
    now: i64,
) -> Option<Val> {
    if let Some(t) = m.model.traits.get(var) {
        let obs: Vec<&TraitObs> = rows.traits.iter().filter(|o| o.name == var).collect();
        if let Some(v) = merge::merge_trait(t.kind, t.merge.as_ref(), &obs) {
            return Some(audiences::json_val(&v.value, trait_field(t.kind)));
        }
    }
    if let Some((_, spec)) = model.computed.iter().find(|(n, _)| n == var)
        && let Some(c) = computed::computed_trait(m, spec, events, now)
    {
        return Some(audiences::json_val(&c, computed_field(m, var)));
    }
    if let Some(p) = var.strip_prefix("consent.") {
        let declared = m.consent.purposes.iter().any(|q| q == p);
        return Some(Val::Bool(declared && consent::decision(m, model.consent_expiry, &rows.consent, p, now).granted));
    }
    let k = var.strip_prefix("identities.")?;
    Some(Val::List(rows.identities.iter().filter(|i| i.key == k).map(|i| Val::Str(i.value.as_str().into())).collect()))
}

/// The profile's value of a name an audience rule reads.
fn audience_value(
    m: &Manifest,
    var: &str,
    traits: &IndexMap<String, TraitValue>,
    computed: &IndexMap<String, Value>,
    consent: &IndexMap<String, Decision>,
    identities: &[IdentityView],
) -> Option<Val> {
    if let Some(t) = traits.get(var) {
        return Some(audiences::json_val(&t.value, m.model.traits.get(var).and_then(|d| trait_field(d.kind))));
    }
    if let Some(c) = computed.get(var) {
        return Some(audiences::json_val(c, computed_field(m, var)));
    }
    if let Some(p) = var.strip_prefix("consent.") {
        return Some(Val::Bool(consent.get(p).is_some_and(|c| c.granted)));
    }
    let k = var.strip_prefix("identities.")?;
    Some(Val::List(identities.iter().filter(|i| i.key == k).map(|i| Val::Str(i.value.as_str().into())).collect()))
}

/// The field type a computed trait's value is read as by rules: `last_seen`
/// gives a timestamp; the rest are read as they come.
fn computed_field(m: &Manifest, name: &str) -> Option<FieldType> {
    m.model.computed.get(name).is_some_and(|c| c.last_seen.is_some()).then_some(FieldType::Timestamp)
}

/// The field type a trait's values are read as by rules (lists have none).
fn trait_field(t: TraitType) -> Option<FieldType> {
    match t {
        TraitType::String => Some(FieldType::String),
        TraitType::Number => Some(FieldType::Number),
        TraitType::Integer => Some(FieldType::Integer),
        TraitType::Boolean => Some(FieldType::Boolean),
        TraitType::Date => Some(FieldType::Date),
        TraitType::Timestamp => Some(FieldType::Timestamp),
        TraitType::List => None,
    }
}

impl From<IdentityRow> for IdentityView {
    fn from(r: IdentityRow) -> Self {
        IdentityView {
            key: r.key,
            value: r.value,
            first_seen: iso(r.first_at),
            source: r.source,
            message_id: r.message_id,
        }
    }
}

impl From<Event<'_>> for EventView {
    fn from(e: Event<'_>) -> Self {
        EventView {
            name: e.name.to_owned(),
            at: iso(e.at),
            source: e.source.to_owned(),
            message_id: e.message_id.to_owned(),
            properties: e.properties,
        }
    }
}

impl From<Decision> for ConsentView {
    fn from(d: Decision) -> Self {
        ConsentView { granted: d.granted, basis: d.basis, at: d.at.map(iso), source: d.source }
    }
}

fn entity_json(r: EntityRow) -> Value {
    json!({
        "entity": r.entity,
        "key": r.key,
        "fields": parse_json(&r.fields),
        "updated_at": iso(r.at),
    })
}

/// A time in the golden record and `cdp profile explain`: RFC 3339 in UTC,
/// to the second.
pub fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Stored JSON text as a value (null if it is not JSON).
fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

/// A number as shown and sent: a whole value of an integer field as an
/// integer (`6`, not `6.0`), and never negative zero (an empty sum is `0`).
fn number(x: f64, integer: bool) -> Value {
    let x = x + 0.0; // -0.0 + 0.0 is +0.0
    if integer && x.fract() == 0.0 && x.abs() < 9.0e15 {
        return Value::from(x as i64);
    }
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Options, load_str};

    const DAY: i64 = 86_400_000;

    fn manifest() -> Manifest {
        let text = r#"
version: 1
name: t
identity:
  keys:
    email: { normalize: email }
    loyalty_id: {}
model:
  traits:
    tier: { type: string }
  events:
    order: { properties: { total: number } }
  computed:
    spend: { sum: order.total }
consent:
  purposes: [email_marketing]
audiences:
  big_spenders:
    where: 'spend >= 100 && consent.email_marketing'
  gold:
    where: 'tier == "gold" && "L-1" in identities.loyalty_id'
"#;
        let l = load_str(text, &Options::validate("."));
        assert!(!l.has_errors(), "{:#?}", l.diagnostics);
        l.manifest.expect("manifest")
    }

    fn rows() -> ProfileRows {
        let id = |id: i64, key: &str, value: &str| IdentityRow {
            id,
            key: key.into(),
            value: value.into(),
            first_at: id * DAY,
            source: "crm".into(),
            message_id: format!("c-{id}"),
            isolated: false,
        };
        let order = |day: i64, total: f64| EventRow {
            name: Some("order".into()),
            at: day * DAY,
            source: "pos".into(),
            message_id: format!("o-{day}"),
            payload: json!({ "total": total }).to_string(),
        };
        ProfileRows {
            profile: 7,
            identities: vec![id(1, "email", "ada@example.org"), id(2, "loyalty_id", "L-1")],
            traits: vec![TraitObs {
                name: "tier".into(),
                source: "crm".into(),
                first: (DAY, "\"gold\"".into()),
                last: (DAY, "\"gold\"".into()),
                min: "\"gold\"".into(),
                max: "\"gold\"".into(),
                sum: None,
                nmin: None,
                nmax: None,
            }],
            consent: vec![LedgerRow {
                purpose: "email_marketing".into(),
                granted: true,
                at: DAY,
                source: "web".into(),
            }],
            events: vec![order(3, 60.0), order(5, 50.0), order(4, 1.0)],
            entities: vec![EntityRow {
                entity: "order".into(),
                key: "o-3".into(),
                fields: "{\"n\":1}".into(),
                at: 3 * DAY,
            }],
        }
    }

    #[test]
    fn the_record_assembles_every_part_from_the_rows() {
        let m = manifest();
        let g = golden_record(&m, &Model::new(&m).expect("model"), rows(), 2, 10 * DAY);
        assert_eq!(g.profile_id, "7");
        assert_eq!(g.identities[1].first_seen, "1970-01-03T00:00:00Z");
        assert_eq!(g.traits["tier"].value, json!("gold"));
        assert_eq!(g.computed["spend"], json!(111.0));
        assert_eq!((g.consent["email_marketing"].granted, g.consent["email_marketing"].basis), (true, Basis::Recorded));
        assert_eq!(g.audiences, ["big_spenders", "gold"]);
        // The newest events, newest first; computed traits read them all.
        let shown: Vec<&str> = g.events.iter().map(|e| e.message_id.as_str()).collect();
        assert_eq!(shown, ["o-5", "o-4"]);
        assert_eq!(serde_json::to_value(&g.entities).expect("json")[0]["updated_at"], "1970-01-04T00:00:00Z");
    }

    #[test]
    fn withdrawn_consent_takes_a_profile_out_of_an_audience_that_needs_it() {
        let mut r = rows();
        r.consent.push(LedgerRow {
            purpose: "email_marketing".into(),
            granted: false,
            at: 2 * DAY,
            source: "crm".into(),
        });
        let m = manifest();
        let g = golden_record(&m, &Model::new(&m).expect("model"), r, 0, 10 * DAY);
        assert_eq!(g.audiences, ["gold"]);
        assert!(g.events.is_empty());
    }

    /// A model whose rules read every kind of name: traits under several
    /// merge policies, computed traits with windows and filters (one read by
    /// no rule), consent with an expiry, identities, other audiences.
    const MIXED: &str = r#"
version: 1
name: t
sources:
  crm: { collector: {}, map: { identities: { email: email } } }
identity:
  keys:
    email: { normalize: email }
    loyalty_id: {}
model:
  traits:
    tier: { type: string, merge: { source_priority: [crm] } }
    points: { type: integer, merge: max }
    visits: { type: integer, merge: sum }
    born: { type: date, merge: first }
  events:
    order: { properties: { total: number, channel: string } }
    view: { properties: { path: string } }
  computed:
    orders_30d: { count: order, within: 30d }
    store_spend: { sum: order.total, where: 'channel == "store"' }
    last_order: { last_seen: order }
    views: { count: view }
consent:
  purposes: [email_marketing, sms]
  expiry: 60d
audiences:
  top: { where: 'audiences.gold && orders_30d >= 2' }
  gold: { where: 'tier in ["gold", "platinum"] || points > 800' }
  mailable: { where: 'consent.email_marketing && size(identities.email) > 0' }
  lapsed: { where: 'has(last_order) && now - last_order > duration("20d") && !consent.sms' }
  spenders: { where: 'store_spend >= 100.5 && !(visits < 3)' }
  nineties: { where: 'born >= date("1990-01-01") && born < date("2000-01-01") || "L-7" in identities.loyalty_id' }
"#;

    /// A random profile: a few identifiers, observations from two sources,
    /// consent answers and orders over 60 days (some at one instant).
    fn random_rows(rng: &mut crate::rng::Rng, profile: i64) -> ProfileRows {
        let mut rows = ProfileRows { profile, ..ProfileRows::default() };
        for i in 0..rng.below(3) as i64 {
            let key = if rng.chance(0.5) { "email" } else { "loyalty_id" };
            let value = if key == "email" { format!("p{profile}-{i}@x.org") } else { format!("L-{}", rng.below(10)) };
            rows.identities.push(IdentityRow {
                id: profile * 10 + i,
                key: key.into(),
                value,
                first_at: i * DAY,
                source: "crm".into(),
                message_id: format!("i-{i}"),
                isolated: false,
            });
        }
        let obs = |name: &str, source: &str, at: i64, v: String| TraitObs {
            name: name.into(),
            source: source.into(),
            first: (at, v.clone()),
            last: (at, v.clone()),
            min: v.clone(),
            max: v.clone(),
            sum: v.parse().ok(),
            nmin: v.parse().ok(),
            nmax: v.parse().ok(),
        };
        for source in ["crm", "web"] {
            let at = rng.below(50) as i64 * DAY;
            if rng.chance(0.7) {
                rows.traits.push(obs("tier", source, at, format!("\"{}\"", rng.pick(&["gold", "silver", "platinum"]))));
            }
            if rng.chance(0.7) {
                rows.traits.push(obs("points", source, at, rng.below(1000).to_string()));
            }
            if rng.chance(0.7) {
                rows.traits.push(obs("visits", source, at, rng.below(3).to_string()));
            }
            if rng.chance(0.5) {
                rows.traits.push(obs("born", source, at, format!("\"19{}-06-01\"", 80 + rng.below(20))));
            }
        }
        for purpose in ["email_marketing", "sms", "email_marketing"] {
            if rng.chance(0.6) {
                let source = if rng.chance(0.5) { "crm" } else { "web" };
                rows.consent.push(LedgerRow {
                    purpose: purpose.into(),
                    granted: rng.chance(0.6),
                    at: rng.below(100) as i64 * DAY,
                    source: source.into(),
                });
            }
        }
        for e in 0..rng.below(6) {
            let (name, payload) = if rng.chance(0.7) {
                let channel = if rng.chance(0.5) { "store" } else { "web" };
                ("order", json!({ "total": rng.below(200) as f64 / 2.0, "channel": channel }))
            } else {
                ("view", json!({ "path": "/" }))
            };
            rows.events.push(EventRow {
                name: Some(name.into()),
                at: 40 * DAY + rng.below(60) as i64 * DAY + rng.below(3) as i64 * 700,
                source: "web".into(),
                message_id: format!("e-{}", e % 4),
                payload: payload.to_string(),
            });
        }
        rows
    }

    #[test]
    fn audiences_of_agrees_with_the_golden_record() {
        let l = load_str(MIXED, &Options::validate("."));
        assert!(!l.has_errors(), "{:#?}", l.diagnostics);
        let m = l.manifest.expect("manifest");
        let model = Model::new(&m).expect("model");
        assert!(!model.read_events.contains("view"), "no rule reads `views`");
        let mut rng = crate::rng::Rng::new(11);
        let mut seen: std::collections::BTreeSet<String> = Default::default();
        for profile in 0..500 {
            let rows = random_rows(&mut rng, profile);
            let now = 100 * DAY + rng.below(10) as i64 * DAY;
            let want = golden_record(&m, &model, rows.clone(), 0, now).audiences;
            assert_eq!(audiences_of(&m, &model, &rows, now), want, "profile {profile}: {rows:#?}");
            seen.extend(want);
        }
        // Every audience had members: the comparison covered each rule.
        assert_eq!(seen.len(), m.audiences.len(), "{seen:?}");
        let r = rows();
        assert_eq!(
            audiences_of(&manifest(), &Model::new(&manifest()).expect("model"), &r, 10 * DAY),
            ["big_spenders", "gold"]
        );
    }

    #[test]
    fn numbers_are_never_negative_zero_and_whole_integers_lose_their_fraction() {
        assert_eq!(number(-0.0, false).to_string(), "0.0");
        assert_eq!(number(6.0, true), json!(6));
        assert_eq!(number(6.5, true), json!(6.5));
    }
}
