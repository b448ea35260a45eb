//! Computed traits: aggregates over a profile's events that the manifest
//! declares under `model.computed` (`count`, `sum`, `avg`, `min`, `max`,
//! `first`, `last`, `distinct`, `last_seen`), optionally within a time
//! window and over the events an expression selects. Evaluated when the
//! golden record (or a profile's audience membership) is read, from the
//! profile's events.

use indexmap::IndexMap;
use serde_json::Value;

use super::{EventRow, iso, number, parse_json};
use crate::audience::{self, Program, Val};
use crate::manifest::types::Aggregate;
use crate::manifest::{Computed, EventType, FieldType, Manifest};

/// One computed trait resolved from the manifest once: its aggregate, the
/// event and property it reads, its window and its compiled filter.
#[derive(Debug, Clone)]
pub struct Spec {
    agg: Aggregate,
    event: String,
    prop: Option<String>,
    /// `within`, in milliseconds.
    window: Option<i64>,
    filter: Option<Program>,
}

impl Spec {
    /// `c` resolved against `m`'s events. An error when `c` names no
    /// aggregate or an unknown event, or its window or filter does not parse
    /// (validation refuses all of these, with their place in the file).
    pub fn resolve(m: &Manifest, c: &Computed) -> Result<Spec, String> {
        let (agg, spec) = c.aggregates().into_iter().next().ok_or("names no aggregate")?;
        let (event, prop) = spec.split_once('.').map_or((spec.as_str(), None), |(e, p)| (e, Some(p)));
        let et = m
            .model
            .events
            .get(event)
            .ok_or_else(|| format!("reads event `{event}`, which the model does not declare"))?;
        let window = match c.within.as_deref() {
            None => None,
            Some(w) => {
                let d = crate::units::parse_duration(w).map_err(|e| format!("within: {e}"))?;
                Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            }
        };
        let filter = match c.filter.as_deref() {
            None => None,
            Some(f) => {
                let mut scope = audience::Scope::new();
                for (p, t) in &et.properties {
                    scope.var(p.clone(), crate::manifest::rules::field_type(*t));
                }
                Some(audience::compile(f, &scope).map_err(|e| format!("where: {}", e.message))?)
            }
        };
        Ok(Spec { agg, event: event.to_owned(), prop: prop.map(str::to_owned), window, filter })
    }

    /// The event it aggregates.
    pub fn event(&self) -> &str {
        &self.event
    }
}

/// One event as computed traits read it: borrowed from its stored row, its
/// properties parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// Empty when the row has none.
    pub name: &'a str,
    /// When it happened, milliseconds since the epoch, as stored.
    pub at: i64,
    pub source: &'a str,
    pub message_id: &'a str,
    pub properties: Value,
}

impl Event<'_> {
    /// Its time as the golden record shows it (RFC 3339, to the second):
    /// the time windows compare and events are ordered by.
    pub fn shown_at(&self) -> i64 {
        self.at.div_euclid(1000).saturating_mul(1000)
    }
}

/// The events of `rows` whose name `keep` accepts, properties parsed,
/// newest first as the golden record lists them: by shown time, then
/// message id, both descending; rows that tie keep their stored order.
pub fn newest_first<'a>(rows: &'a [EventRow], keep: impl Fn(&str) -> bool) -> Vec<Event<'a>> {
    let mut events: Vec<Event<'a>> = rows
        .iter()
        .filter(|r| keep(r.name.as_deref().unwrap_or_default()))
        .map(|r| Event {
            name: r.name.as_deref().unwrap_or_default(),
            at: r.at,
            source: &r.source,
            message_id: &r.message_id,
            properties: parse_json(&r.payload),
        })
        .collect();
    events.sort_by(|a, b| (b.shown_at(), b.message_id).cmp(&(a.shown_at(), a.message_id)));
    events
}

/// Names the definitions computed traits are evaluated by (`model.computed`
/// and the event types they read): stored values of another are stale.
pub fn fingerprint(m: &Manifest) -> String {
    use sha2::{Digest, Sha256};
    let text = serde_json::json!({"computed": m.model.computed, "events": m.model.events}).to_string();
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}

/// Every computed trait of `m`'s model, in its order; the first that does
/// not resolve is the error, named.
pub fn specs(m: &Manifest) -> Result<Vec<(String, Spec)>, String> {
    m.model
        .computed
        .iter()
        .map(|(n, c)| Spec::resolve(m, c).map(|s| (n.clone(), s)).map_err(|e| format!("computed trait `{n}`: {e}")))
        .collect()
}

/// Every computed trait of the model, in its order, from the profile's
/// events (newest first, [`newest_first`]).
pub fn computed_traits(
    m: &Manifest,
    specs: &[(String, Spec)],
    events: &[Event<'_>],
    now: i64,
) -> IndexMap<String, Value> {
    let mut out = IndexMap::new();
    for (name, spec) in specs {
        if let Some(v) = computed_trait(m, spec, events, now) {
            out.insert(name.clone(), v);
        }
    }
    out
}

/// One computed trait over the profile's events (newest first); `None`
/// when its event is not in the model.
pub fn computed_trait(m: &Manifest, spec: &Spec, events: &[Event<'_>], now: i64) -> Option<Value> {
    let et = m.model.events.get(&spec.event)?;
    let since = spec.window.map(|w| now.saturating_sub(w));
    let matching: Vec<&Event<'_>> = events
        .iter()
        .filter(|e| e.name == spec.event)
        .filter(|e| {
            since.is_none_or(|s| e.shown_at() >= s)
                && spec.filter.as_ref().is_none_or(|p| {
                    let vals: Vec<Val> = p
                        .vars
                        .iter()
                        .map(|v| {
                            e.properties
                                .get(v)
                                .map_or(Val::Null, |x| super::audiences::json_val(x, et.properties.get(v).copied()))
                        })
                        .collect();
                    p.matches(&vals, now)
                })
        })
        .collect();
    Some(aggregate(spec.agg, spec.prop.as_deref(), et, &matching))
}

/// An aggregate over the matching events (newest first) or over their
/// property `prop`.
fn aggregate(agg: Aggregate, prop: Option<&str>, et: &EventType, matching: &[&Event<'_>]) -> Value {
    let values = || -> Vec<&Value> { matching.iter().filter_map(|e| prop.and_then(|p| e.properties.get(p))).collect() };
    let numbers = || -> Vec<f64> { values().into_iter().filter_map(Value::as_f64).collect() };
    let integer = prop.and_then(|p| et.properties.get(p)) == Some(&FieldType::Integer);
    let num = |x: Option<f64>, integer: bool| x.map_or(Value::Null, |x| number(x, integer));
    match agg {
        Aggregate::Count => Value::from(matching.len() as i64),
        Aggregate::LastSeen => matching.first().map_or(Value::Null, |e| Value::String(iso(e.at))),
        Aggregate::Sum => num(Some(numbers().iter().fold(0.0, |a, b| a + b)), integer),
        Aggregate::Avg => {
            let n = numbers();
            num((!n.is_empty()).then(|| n.iter().fold(0.0, |a, b| a + b) / n.len() as f64), false)
        }
        Aggregate::Min => num(numbers().into_iter().reduce(f64::min), integer),
        Aggregate::Max => num(numbers().into_iter().reduce(f64::max), integer),
        Aggregate::First => values().last().map_or(Value::Null, |v| (*v).clone()),
        Aggregate::Last => values().first().map_or(Value::Null, |v| (*v).clone()),
        Aggregate::Distinct => {
            let mut vs: Vec<String> = values().into_iter().map(Value::to_string).collect();
            vs.sort();
            vs.dedup();
            Value::from(vs.len() as i64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Options, load_str};
    use serde_json::json;

    const DAY: i64 = 86_400_000;

    fn manifest() -> Manifest {
        let text = r#"
version: 1
name: t
identity:
  keys:
    email: { normalize: email }
model:
  events:
    order: { properties: { total: number, items: integer, channel: string } }
  computed:
    orders: { count: order }
    spend: { sum: order.total }
    items: { sum: order.items }
    avg_total: { avg: order.total }
    recent_orders: { count: order, within: 7d }
    store_orders: { count: order, where: 'channel == "store"' }
    channels: { distinct: order.channel }
    first_channel: { first: order.channel }
    last_channel: { last: order.channel }
    last_order_at: { last_seen: order }
"#;
        let l = load_str(text, &Options::validate("."));
        assert!(!l.has_errors(), "{:#?}", l.diagnostics);
        l.manifest.expect("manifest")
    }

    fn order(day: i64, total: f64, items: i64, channel: &str) -> EventRow {
        EventRow {
            name: Some("order".into()),
            at: day * DAY,
            source: "pos".into(),
            message_id: format!("o-{day}"),
            payload: json!({ "total": total, "items": items, "channel": channel }).to_string(),
        }
    }

    #[test]
    fn aggregates_over_the_events_given_newest_first() {
        let rows = [order(10, 4.0, 1, "store"), order(1, 0.5, 3, "store"), order(20, 10.5, 2, "web")];
        let events = newest_first(&rows, |_| true);
        let m = manifest();
        let c = computed_traits(&m, &specs(&m).expect("specs"), &events, 21 * DAY);
        let want = json!({
            "orders": 3, "spend": 15.0, "items": 6, "avg_total": 5.0, "recent_orders": 1, "store_orders": 2,
            "channels": 2, "first_channel": "store", "last_channel": "web", "last_order_at": "1970-01-21T00:00:00Z",
        });
        assert_eq!(serde_json::to_value(&c).expect("json"), want);
    }

    #[test]
    fn no_events_count_zero_and_have_no_values() {
        let m = manifest();
        let c = computed_traits(&m, &specs(&m).expect("specs"), &[], 0);
        assert_eq!(c["orders"], json!(0));
        assert_eq!(c["spend"], json!(0.0));
        assert_eq!(c["avg_total"], Value::Null);
        assert_eq!(c["last_channel"], Value::Null);
        assert_eq!(c["last_order_at"], Value::Null);
    }

    /// Times count as the record shows them, to the second: an event 0.2 s
    /// inside a window that opens mid-second shows at the second before it,
    /// outside the window.
    #[test]
    fn windows_compare_times_to_the_second() {
        let m = manifest();
        let mut edge = order(1, 1.0, 1, "web");
        edge.at = DAY - 300;
        let mut older = order(1, 1.0, 1, "web");
        older.at = DAY - 2_000;
        older.message_id = "o-older".into();
        let rows = [older, edge];
        let events = newest_first(&rows, |_| true);
        assert_eq!((events[0].message_id, events[0].shown_at()), ("o-1", DAY - 1_000));
        // `recent_orders` is `within: 7d`: the window opens at DAY - 500.
        let c = computed_traits(&m, &specs(&m).expect("specs"), &events, 8 * DAY - 500);
        assert_eq!(c["recent_orders"], json!(0));
        let c = computed_traits(&m, &specs(&m).expect("specs"), &events, 8 * DAY - 1_000);
        assert_eq!(c["recent_orders"], json!(1));
    }
}
