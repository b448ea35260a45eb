//! Computed traits: aggregates over a profile's events that the manifest
//! declares under `model.computed` (`count`, `sum`, `avg`, `min`, `max`,
//! `first`, `last`, `distinct`, `last_seen`), optionally within a time
//! window and over the events an expression selects. Evaluated when the
//! golden record is read, from all of the profile's events.

use indexmap::IndexMap;
use serde_json::Value;

use super::{EventView, number};
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
    /// `None` when `c` names no aggregate or an unknown event, or its window
    /// or filter does not parse (validation refuses all of these).
    pub fn resolve(m: &Manifest, c: &Computed) -> Option<Spec> {
        let (agg, spec) = c.aggregates().into_iter().next()?;
        let (event, prop) = spec.split_once('.').map_or((spec.as_str(), None), |(e, p)| (e, Some(p)));
        let et = m.model.events.get(event)?;
        let window = match c.within.as_deref() {
            None => None,
            Some(w) => Some(crate::units::parse_duration(w).ok()?.as_millis() as i64),
        };
        let filter = match c.filter.as_deref() {
            None => None,
            Some(f) => {
                let mut scope = audience::Scope::new();
                for (p, t) in &et.properties {
                    scope.var(p.clone(), crate::manifest::rules::field_type(*t));
                }
                Some(audience::compile(f, &scope).ok()?)
            }
        };
        Some(Spec { agg, event: event.to_owned(), prop: prop.map(str::to_owned), window, filter })
    }
}

/// Every computed trait of `m`'s model that resolves, in its order.
pub fn specs(m: &Manifest) -> Vec<(String, Spec)> {
    m.model.computed.iter().filter_map(|(n, c)| Spec::resolve(m, c).map(|s| (n.clone(), s))).collect()
}

/// Every computed trait of the model, in its order, from the profile's
/// events (newest first).
pub fn computed_traits(
    m: &Manifest,
    specs: &[(String, Spec)],
    events: &[EventView],
    now: i64,
) -> IndexMap<String, Value> {
    let mut out = IndexMap::new();
    for (name, spec) in specs {
        if let Some(et) = m.model.events.get(&spec.event) {
            out.insert(name.clone(), computed_trait(spec, et, events, now));
        }
    }
    out
}

/// One computed trait over the profile's events.
fn computed_trait(spec: &Spec, et: &EventType, events: &[EventView], now: i64) -> Value {
    let since = spec.window.map(|w| now - w);
    let matching: Vec<&EventView> = events
        .iter()
        .filter(|e| e.name == spec.event)
        .filter(|e| {
            let at = audience::program::parse_timestamp(&e.at).unwrap_or(0);
            since.is_none_or(|s| at >= s)
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
    aggregate(spec.agg, spec.prop.as_deref(), et, &matching)
}

/// An aggregate over the matching events (newest first) or over their
/// property `prop`.
fn aggregate(agg: Aggregate, prop: Option<&str>, et: &EventType, matching: &[&EventView]) -> Value {
    let values = || -> Vec<&Value> { matching.iter().filter_map(|e| prop.and_then(|p| e.properties.get(p))).collect() };
    let numbers = || -> Vec<f64> { values().into_iter().filter_map(Value::as_f64).collect() };
    let integer = prop.and_then(|p| et.properties.get(p)) == Some(&FieldType::Integer);
    let num = |x: Option<f64>, integer: bool| x.map_or(Value::Null, |x| number(x, integer));
    match agg {
        Aggregate::Count => Value::from(matching.len() as i64),
        Aggregate::LastSeen => matching.first().map_or(Value::Null, |e| Value::String(e.at.clone())),
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

    fn order(day: i64, total: f64, items: i64, channel: &str) -> EventView {
        EventView {
            name: "order".into(),
            at: super::super::iso(day * DAY),
            source: "pos".into(),
            message_id: format!("o-{day}"),
            properties: json!({ "total": total, "items": items, "channel": channel }),
        }
    }

    #[test]
    fn aggregates_over_the_events_given_newest_first() {
        let events = [order(20, 10.5, 2, "web"), order(10, 4.0, 1, "store"), order(1, 0.5, 3, "store")];
        let m = manifest();
        let c = computed_traits(&m, &specs(&m), &events, 21 * DAY);
        let want = json!({
            "orders": 3, "spend": 15.0, "items": 6, "avg_total": 5.0, "recent_orders": 1, "store_orders": 2,
            "channels": 2, "first_channel": "store", "last_channel": "web", "last_order_at": "1970-01-21T00:00:00Z",
        });
        assert_eq!(serde_json::to_value(&c).expect("json"), want);
    }

    #[test]
    fn no_events_count_zero_and_have_no_values() {
        let m = manifest();
        let c = computed_traits(&m, &specs(&m), &[], 0);
        assert_eq!(c["orders"], json!(0));
        assert_eq!(c["spend"], json!(0.0));
        assert_eq!(c["avg_total"], Value::Null);
        assert_eq!(c["last_channel"], Value::Null);
        assert_eq!(c["last_order_at"], Value::Null);
    }
}
