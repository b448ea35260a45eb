//! Trait merge policies: one value per trait from every source's
//! observations of it across a profile's identifiers. Ingest folds each
//! (identifier, trait, source)'s values into a [`TraitObs`] as records
//! arrive (first, last, smallest, largest, numeric sum, min and max), so a
//! policy here reads folds, never the records, and the result does not
//! depend on the order records arrived in.

use indexmap::IndexMap;

use super::{TraitValue, iso, number, parse_json};
use crate::manifest::{Manifest, MergePolicy, SimpleMerge, TraitType};

/// One (identifier, trait, source)'s folded observations, as stored.
/// Values are JSON text; times are milliseconds since the epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitObs {
    /// The trait.
    pub name: String,
    pub source: String,
    /// The earliest observation: (time, value).
    pub first: (i64, String),
    /// The latest observation: (time, value).
    pub last: (i64, String),
    /// The smallest and largest value by their JSON text.
    pub min: String,
    pub max: String,
    /// Sum, smallest and largest of the numeric values, if any.
    pub sum: Option<f64>,
    pub nmin: Option<f64>,
    pub nmax: Option<f64>,
}

/// Every model trait that has observations, merged by its policy, in the
/// model's order.
pub fn merged_traits(m: &Manifest, obs: &[TraitObs]) -> IndexMap<String, TraitValue> {
    let mut by_name: IndexMap<&str, Vec<&TraitObs>> = IndexMap::new();
    for o in obs {
        by_name.entry(o.name.as_str()).or_default().push(o);
    }
    let mut traits = IndexMap::new();
    for (name, t) in &m.model.traits {
        if let Some(rows) = by_name.get(name.as_str())
            && let Some(v) = merge_trait(t.kind, t.merge.as_ref(), rows)
        {
            traits.insert(name.clone(), v);
        }
    }
    traits
}

/// Applies a trait's merge policy to its observations (`None` when there are none).
pub fn merge_trait(kind: TraitType, policy: Option<&MergePolicy>, all: &[&TraitObs]) -> Option<TraitValue> {
    let numeric = matches!(kind, TraitType::Number | TraitType::Integer);
    let num =
        |x: f64| if kind == TraitType::Integer { serde_json::Value::from(x.round() as i64) } else { number(x, false) };
    match policy {
        None | Some(MergePolicy::Simple(SimpleMerge::Latest)) => latest(all),
        Some(MergePolicy::Simple(SimpleMerge::First)) => {
            let o = all
                .iter()
                .min_by(|a, b| (a.first.0, &a.first.1, &a.source).cmp(&(b.first.0, &b.first.1, &b.source)))?;
            Some(TraitValue {
                value: parse_json(&o.first.1),
                source: o.source.clone(),
                observed_at: iso(o.first.0),
                policy: "first".into(),
            })
        }
        Some(MergePolicy::Simple(p @ (SimpleMerge::Max | SimpleMerge::Min))) => {
            let is_max = *p == SimpleMerge::Max;
            let name = if is_max { "max" } else { "min" };
            if numeric {
                let pick = all
                    .iter()
                    .filter_map(|o| if is_max { o.nmax } else { o.nmin }.map(|x| (x, *o)))
                    .reduce(|a, b| if (is_max && b.0 > a.0) || (!is_max && b.0 < a.0) { b } else { a })?;
                Some(TraitValue {
                    value: num(pick.0),
                    source: pick.1.source.clone(),
                    observed_at: iso(pick.1.last.0),
                    policy: name.into(),
                })
            } else {
                let pick = if is_max {
                    all.iter().max_by(|a, b| a.max.cmp(&b.max))
                } else {
                    all.iter().min_by(|a, b| a.min.cmp(&b.min))
                }?;
                let v = if is_max { &pick.max } else { &pick.min };
                Some(TraitValue {
                    value: parse_json(v),
                    source: pick.source.clone(),
                    observed_at: iso(pick.last.0),
                    policy: name.into(),
                })
            }
        }
        Some(MergePolicy::Simple(SimpleMerge::Sum)) => {
            let total: f64 = all.iter().filter_map(|o| o.sum).sum();
            let last = all.iter().map(|o| o.last.0).max()?;
            let mut sources: Vec<&str> = all.iter().map(|o| o.source.as_str()).collect();
            sources.sort_unstable();
            sources.dedup();
            Some(TraitValue {
                value: num(total),
                source: sources.join("+"),
                observed_at: iso(last),
                policy: "sum".into(),
            })
        }
        Some(MergePolicy::Priority(sp)) => {
            let first_trusted = sp.source_priority.iter().find_map(|s| {
                let from: Vec<&TraitObs> = all.iter().copied().filter(|o| o.source == *s).collect();
                latest(&from)
            });
            first_trusted.or_else(|| latest(all)).map(|v| TraitValue { policy: "source_priority".into(), ..v })
        }
    }
}

/// The latest observation wins; at one instant, the larger value, then the
/// later source by name.
fn latest(rows: &[&TraitObs]) -> Option<TraitValue> {
    let o = rows.iter().max_by(|a, b| (a.last.0, &a.last.1, &a.source).cmp(&(b.last.0, &b.last.1, &b.source)))?;
    Some(TraitValue {
        value: parse_json(&o.last.1),
        source: o.source.clone(),
        observed_at: iso(o.last.0),
        policy: "latest".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::SourcePriority;
    use serde_json::json;

    /// One source's fold of `values` observed at the given times (seconds).
    fn obs(source: &str, values: &[(i64, &str)]) -> TraitObs {
        let at = |s: i64| s * 1000;
        let first = values.iter().min().expect("a value");
        let last = values.iter().max().expect("a value");
        let nums: Vec<f64> = values.iter().filter_map(|(_, v)| v.parse().ok()).collect();
        TraitObs {
            name: "t".into(),
            source: source.into(),
            first: (at(first.0), first.1.into()),
            last: (at(last.0), last.1.into()),
            min: values.iter().map(|v| v.1).min().expect("a value").into(),
            max: values.iter().map(|v| v.1).max().expect("a value").into(),
            sum: (!nums.is_empty()).then(|| nums.iter().sum()),
            nmin: nums.iter().copied().reduce(f64::min),
            nmax: nums.iter().copied().reduce(f64::max),
        }
    }

    fn merge(kind: TraitType, policy: Option<MergePolicy>, rows: &[TraitObs]) -> TraitValue {
        let refs: Vec<&TraitObs> = rows.iter().collect();
        let v = merge_trait(kind, policy.as_ref(), &refs).expect("a value");
        // The order observations are read in never changes the result.
        let reversed: Vec<&TraitObs> = rows.iter().rev().collect();
        assert_eq!(merge_trait(kind, policy.as_ref(), &reversed).as_ref(), Some(&v));
        v
    }

    #[test]
    fn latest_and_first_pick_by_time_and_say_where_from() {
        let rows = [obs("crm", &[(10, "\"silver\""), (30, "\"gold\"")]), obs("web", &[(20, "\"bronze\"")])];
        let v = merge(TraitType::String, None, &rows);
        assert_eq!(
            (v.value, v.source.as_str(), v.observed_at.as_str(), v.policy.as_str()),
            (json!("gold"), "crm", "1970-01-01T00:00:30Z", "latest")
        );
        let v = merge(TraitType::String, Some(MergePolicy::Simple(SimpleMerge::First)), &rows);
        assert_eq!((v.value, v.policy.as_str()), (json!("silver"), "first"));
    }

    #[test]
    fn sums_add_every_source_and_integers_stay_integers() {
        let rows = [obs("pos", &[(1, "2"), (2, "3")]), obs("web", &[(5, "1")])];
        let v = merge(TraitType::Integer, Some(MergePolicy::Simple(SimpleMerge::Sum)), &rows);
        assert_eq!((v.value, v.source.as_str(), v.observed_at.as_str()), (json!(6), "pos+web", "1970-01-01T00:00:05Z"));
        let v = merge(TraitType::Number, Some(MergePolicy::Simple(SimpleMerge::Max)), &rows);
        assert_eq!((v.value, v.source.as_str()), (json!(3.0), "pos"));
    }

    #[test]
    fn source_priority_prefers_trusted_sources_then_falls_back_to_latest() {
        let policy = |sources: &[&str]| {
            Some(MergePolicy::Priority(SourcePriority {
                source_priority: sources.iter().map(|s| s.to_string()).collect(),
            }))
        };
        let rows = [obs("loyalty", &[(1, "\"gold\"")]), obs("web", &[(9, "\"bronze\"")])];
        let v = merge(TraitType::String, policy(&["loyalty", "web"]), &rows);
        assert_eq!((v.value, v.source.as_str(), v.policy.as_str()), (json!("gold"), "loyalty", "source_priority"));
        let v = merge(TraitType::String, policy(&["crm"]), &rows);
        assert_eq!((v.value, v.source.as_str(), v.policy.as_str()), (json!("bronze"), "web", "source_priority"));
    }
}
