//! Reading the golden record: a profile's identifiers, its traits merged by
//! each trait's policy with the provenance of every value, consent, recent
//! events, computed traits and audience membership; why its identifiers were
//! joined; and splitting an identifier off by hand.

use super::ingest::TraitFold;
use super::{Result, Store, now_ms};
use crate::audience::{self, Val};
use crate::identity::normalize;
use crate::manifest::{ConsentDefault, FieldType, Manifest, MergePolicy, Normalizer, SimpleMerge, TraitType};
use indexmap::IndexMap;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Row;

/// Why a profile lookup found nothing.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("`{0}` is not an identity key in the manifest; keys: {1}")]
    UnknownKey(String, String),
    #[error("`{0}` is not a valid {1}: {2}")]
    Invalid(String, String, String),
    #[error("no profile has {0} `{1}`")]
    NotFound(String, String),
    #[error("{0} `{1}` is already split off, alone in profile {2}")]
    AlreadyIsolated(String, String, i64),
    #[error(transparent)]
    Store(#[from] super::StoreError),
}

impl From<sqlx::Error> for LookupError {
    fn from(e: sqlx::Error) -> Self {
        LookupError::Store(e.into())
    }
}

#[derive(Debug, Serialize)]
pub struct IdentityView {
    #[serde(rename = "type")]
    pub key: String,
    pub value: String,
    pub first_seen: String,
    pub source: String,
    pub message_id: String,
    #[serde(skip)]
    pub id: i64,
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
    /// `recorded` when the person answered, `default` when they never did.
    pub basis: &'static str,
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

/// One line of `cdp profile explain`.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub profile_id: String,
    pub identities: Vec<ExplainedIdentity>,
    pub ledger: Vec<Value>,
}

#[derive(Debug, Serialize)]
pub struct ExplainedIdentity {
    #[serde(rename = "type")]
    pub key: String,
    pub value: String,
    pub first_seen: String,
    pub first_record: String,
    /// Records that carried this identifier together with another one of this profile.
    pub linked_by: Vec<Value>,
    pub isolated: bool,
}

/// The rule of a link made by probabilistic matching.
const PROBABILISTIC: &str = "probabilistic (Fellegi-Sunter)";

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The value a lookup of `key = value` compares: the key's own rules applied
/// as ingest applies them (its `pattern`, first group kept, then its
/// normaliser), so `loyalty_id=L-2002` finds what ingest stored as `2002`.
pub fn lookup_value(m: &Manifest, key: &str, value: &str) -> Result<String, LookupError> {
    let Some(spec) = m.identity.keys.get(key) else {
        let keys: Vec<&str> = m.identity.keys.keys().map(String::as_str).collect();
        return Err(LookupError::UnknownKey(key.to_owned(), keys.join(", ")));
    };
    let invalid = |why: String| LookupError::Invalid(value.to_owned(), key.to_owned(), why);
    let mut raw = value;
    if let Some(p) = &spec.pattern {
        // Validation compiled the pattern already; an error here is reported, not unwrapped.
        let re = regex::Regex::new(p).map_err(|e| invalid(e.to_string()))?;
        let caps = re.captures(value).ok_or_else(|| invalid(format!("it does not match the key's pattern `{p}`")))?;
        raw = caps.get(1).or_else(|| caps.get(0)).map_or(value, |g| g.as_str());
    }
    let opts = normalize::Options::for_key(spec);
    normalize::normalize(spec.normalize.unwrap_or(Normalizer::Trim), raw, &opts).map_err(|e| invalid(e.to_string()))
}

/// A trait's folded observations from one source.
struct Obs {
    source: String,
    fold: TraitFold,
}

impl Store {
    /// Finds the profile holding `key = value` (normalised as the key says).
    pub async fn find_profile(&self, m: &Manifest, key: &str, value: &str) -> Result<i64, LookupError> {
        let n = lookup_value(m, key, value)?;
        let row = sqlx::query(&self.sql("SELECT profile_id FROM identities WHERE key = ? AND value = ?"))
            .bind(key)
            .bind(&n)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(r.try_get(0)?),
            None => Err(LookupError::NotFound(key.to_owned(), n)),
        }
    }

    async fn identities_of(&self, profile: i64) -> Result<Vec<(IdentityView, bool)>> {
        let rows = sqlx::query(&self.sql(
            "SELECT id, key, value, first_at, source, message_id, isolated FROM identities WHERE profile_id = ? ORDER BY first_at, id",
        ))
        .bind(profile)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    IdentityView {
                        id: r.try_get(0)?,
                        key: r.try_get(1)?,
                        value: r.try_get(2)?,
                        first_seen: iso(r.try_get(3)?),
                        source: r.try_get(4)?,
                        message_id: r.try_get(5)?,
                    },
                    r.try_get::<i64, _>(6)? != 0,
                ))
            })
            .collect()
    }

    /// The golden record of a profile.
    pub async fn golden(&self, m: &Manifest, profile: i64, recent_events: usize) -> Result<GoldenRecord> {
        let identities: Vec<IdentityView> = self.identities_of(profile).await?.into_iter().map(|(i, _)| i).collect();
        let ids: Vec<i64> = identities.iter().map(|i| i.id).collect();
        let mut obs: IndexMap<String, Vec<Obs>> = IndexMap::new();
        let mut consent_rows: Vec<(String, bool, i64, String)> = Vec::new();
        let mut conn = self.pool.acquire().await?;
        let rows = self
            .select_in(
                &mut conn,
                "SELECT name, source, first_value, first_at, last_value, last_at, min_value, max_value, num_sum, num_min, num_max \
                 FROM trait_obs WHERE identity_id IN ({}) ORDER BY name, source",
                &ids,
            )
            .await?;
        for r in rows {
            obs.entry(r.try_get(0)?).or_default().push(Obs {
                source: r.try_get(1)?,
                fold: TraitFold {
                    first: (r.try_get(3)?, r.try_get(2)?),
                    last: (r.try_get(5)?, r.try_get(4)?),
                    min: r.try_get(6)?,
                    max: r.try_get(7)?,
                    sum: r.try_get(8)?,
                    nmin: r.try_get(9)?,
                    nmax: r.try_get(10)?,
                    n: 0,
                },
            });
        }
        for r in self
            .select_in(&mut conn, "SELECT purpose, granted, at, source FROM consent WHERE identity_id IN ({})", &ids)
            .await?
        {
            consent_rows.push((r.try_get(0)?, r.try_get::<i64, _>(1)? != 0, r.try_get(2)?, r.try_get(3)?));
        }
        let mut traits = IndexMap::new();
        for (name, t) in &m.model.traits {
            if let Some(rows) = obs.get(name)
                && let Some(v) = merge_trait(t.kind, t.merge.as_ref(), rows)
            {
                traits.insert(name.clone(), v);
            }
        }
        let mut consent = IndexMap::new();
        let expiry = m.consent.expiry.as_deref().and_then(|e| crate::manifest::units::parse_duration(e).ok());
        let now = now_ms();
        for p in &m.consent.purposes {
            let latest = consent_rows.iter().filter(|c| c.0 == *p).max_by_key(|c| (c.2, c.1));
            let view = match latest {
                Some((_, granted, at, source)) => {
                    let lapsed = expiry.is_some_and(|e| *granted && now - at > e.as_millis() as i64);
                    ConsentView {
                        granted: *granted && !lapsed,
                        basis: if lapsed { "expired" } else { "recorded" },
                        at: Some(iso(*at)),
                        source: Some(source.clone()),
                    }
                }
                None => ConsentView {
                    granted: m.consent.default == ConsentDefault::Granted,
                    basis: "default",
                    at: None,
                    source: None,
                },
            };
            consent.insert(p.clone(), view);
        }
        // Events: computed traits read all of them; the record shows the most recent.
        let rows = self
            .select_in(
                &mut conn,
                "SELECT name, at, source, message_id, payload FROM records WHERE kind = 'event' AND identity_id IN ({})",
                &ids,
            )
            .await?;
        // SQLite has one connection: give it back before the next query.
        drop(conn);
        let mut events = Vec::with_capacity(rows.len());
        for r in rows {
            let payload: String = r.try_get(4)?;
            events.push(EventView {
                name: r.try_get::<Option<String>, _>(0)?.unwrap_or_default(),
                at: iso(r.try_get(1)?),
                source: r.try_get(2)?,
                message_id: r.try_get(3)?,
                properties: serde_json::from_str(&payload).unwrap_or(Value::Null),
            });
        }
        events.sort_by(|a, b| (&b.at, &b.message_id).cmp(&(&a.at, &a.message_id)));
        let computed = computed_traits(m, &events, now);
        let audiences = evaluate_audiences(m, &traits, &computed, &consent, &identities, now);
        let ent_rows = sqlx::query(
            &self.sql("SELECT entity, key, fields, at FROM entities WHERE profile_id = ? ORDER BY entity, key"),
        )
        .bind(profile)
        .fetch_all(&self.pool)
        .await?;
        let mut entities = Vec::new();
        for r in ent_rows {
            let fields: String = r.try_get(2)?;
            entities.push(json!({
                "entity": r.try_get::<String, _>(0)?,
                "key": r.try_get::<String, _>(1)?,
                "fields": serde_json::from_str::<Value>(&fields).unwrap_or(Value::Null),
                "updated_at": iso(r.try_get(3)?),
            }));
        }
        events.truncate(recent_events);
        Ok(GoldenRecord {
            profile_id: profile.to_string(),
            identities,
            traits,
            computed,
            consent,
            audiences,
            events,
            entities,
        })
    }

    /// Why this profile's identifiers are together.
    pub async fn explain(&self, profile: i64) -> Result<Explanation> {
        let identities = self.identities_of(profile).await?;
        let mut out = Vec::new();
        let mut by_id: IndexMap<i64, (String, String)> = IndexMap::new();
        for (i, _) in &identities {
            by_id.insert(i.id, (i.key.clone(), i.value.clone()));
        }
        let comps = sqlx::query(&self.sql("SELECT DISTINCT component FROM identities WHERE profile_id = ?"))
            .bind(profile)
            .fetch_all(&self.pool)
            .await?;
        let mut links: Vec<(Vec<i64>, i64, String, String)> = Vec::new();
        for c in comps {
            let c: i64 = c.try_get(0)?;
            for r in
                sqlx::query(&self.sql("SELECT ids, at, source, message_id FROM links WHERE component = ? ORDER BY at"))
                    .bind(c)
                    .fetch_all(&self.pool)
                    .await?
            {
                let ids: String = r.try_get(0)?;
                links.push((
                    ids.split(',').filter_map(|x| x.parse().ok()).collect(),
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                ));
            }
        }
        // Probabilistic links carry their score in the link record's payload.
        let mut scores: IndexMap<String, Value> = IndexMap::new();
        for l in links.iter().filter(|l| l.2 == "match") {
            let row = sqlx::query(&self.sql("SELECT payload FROM records WHERE source = ? AND message_id = ?"))
                .bind(&l.2)
                .bind(&l.3)
                .fetch_optional(&self.pool)
                .await?;
            if let Some(r) = row {
                scores.insert(l.3.clone(), parse_json(&r.try_get::<String, _>(0)?));
            }
        }
        for (i, isolated) in identities {
            let linked_by: Vec<Value> = links
                .iter()
                .filter(|l| l.0.contains(&i.id) && l.0.iter().any(|o| *o != i.id && by_id.contains_key(o)))
                .map(|l| {
                    let with: Vec<String> =
                        l.0.iter()
                            .filter(|o| **o != i.id)
                            .filter_map(|o| by_id.get(o))
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                    match scores.get(&l.3) {
                        Some(score) => json!({"record": format!("{}/{}", l.2, l.3), "at": iso(l.1), "with": with,
                            "rule": PROBABILISTIC, "probability": score["probability"], "fields": score["fields"]}),
                        None => json!({"record": format!("{}/{}", l.2, l.3), "at": iso(l.1), "with": with,
                            "rule": "deterministic: identifiers in one record"}),
                    }
                })
                .collect();
            out.push(ExplainedIdentity {
                key: i.key,
                value: i.value,
                first_seen: i.first_seen,
                first_record: format!("{}/{}", i.source, i.message_id),
                linked_by,
                isolated,
            });
        }
        let rows = sqlx::query(&self.sql(
            "SELECT at, kind, profile_id, other_profile_id, source, message_id, rule FROM ledger \
             WHERE profile_id = ? OR other_profile_id = ? ORDER BY id",
        ))
        .bind(profile)
        .bind(profile)
        .fetch_all(&self.pool)
        .await?;
        let mut ledger = Vec::new();
        for r in rows {
            let src: Option<String> = r.try_get(4)?;
            let msg: Option<String> = r.try_get(5)?;
            let mut entry = json!({
                "at": iso(r.try_get(0)?),
                "kind": r.try_get::<String, _>(1)?,
                "profile_id": r.try_get::<i64, _>(2)?.to_string(),
                "other_profile_id": r.try_get::<Option<i64>, _>(3)?.map(|x| x.to_string()),
                "record": src.as_ref().zip(msg.as_ref()).map(|(s, m)| format!("{s}/{m}")),
                "rule": r.try_get::<String, _>(6)?,
            });
            // A merge made by a probabilistic link says so, with its score, as
            // the identifiers' `linked_by` does: one account of each link.
            if let (Some("match"), Some(msg)) = (src.as_deref(), &msg) {
                if !scores.contains_key(msg)
                    && let Some(row) =
                        sqlx::query(&self.sql("SELECT payload FROM records WHERE source = 'match' AND message_id = ?"))
                            .bind(msg)
                            .fetch_optional(&self.pool)
                            .await?
                {
                    scores.insert(msg.clone(), parse_json(&row.try_get::<String, _>(0)?));
                }
                if let Some(score) = scores.get(msg) {
                    entry["rule"] = json!(PROBABILISTIC);
                    entry["probability"] = score["probability"].clone();
                    entry["fields"] = score["fields"].clone();
                }
            }
            ledger.push(entry);
        }
        Ok(Explanation { profile_id: profile.to_string(), identities: out, ledger })
    }

    /// Splits `key = value` off its profile for good: the identifier becomes
    /// a profile of its own and no record joins it to another again. Records
    /// anchored on it move with it. Recorded in the ledger.
    pub async fn unmerge(&self, m: &Manifest, key: &str, value: &str) -> Result<(i64, i64), LookupError> {
        let from = self.find_profile(m, key, value).await?;
        let n = lookup_value(m, key, value)?;
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&self.sql("SELECT id, isolated FROM identities WHERE key = ? AND value = ?"))
            .bind(key)
            .bind(&n)
            .fetch_one(&mut *tx)
            .await?;
        let id: i64 = row.try_get(0)?;
        // Isolated identifiers are alone in their profile for good: splitting
        // one again would only make yet another profile.
        if row.try_get::<i64, _>(1)? != 0 {
            return Err(LookupError::AlreadyIsolated(key.to_owned(), n, from));
        }
        let to = self.next_id();
        let now = now_ms();
        sqlx::query(&self.sql("INSERT INTO profiles (id, created_at) VALUES (?, ?)"))
            .bind(to)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql("UPDATE identities SET profile_id = ?, isolated = 1 WHERE id = ?"))
            .bind(to)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql("UPDATE entities SET profile_id = ? WHERE identity_id = ?"))
            .bind(to)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql(
            "INSERT INTO ledger (at, kind, profile_id, other_profile_id, identity_id, rule) VALUES (?, 'unmerge', ?, ?, ?, ?)",
        ))
        .bind(now)
        .bind(to)
        .bind(from)
        .bind(id)
        .bind(format!("manual: {key} `{n}` split off and isolated"))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((from, to))
    }

    /// Every identifier as `key=value`, grouped by profile and sorted: the
    /// partition tests and benchmarks compare.
    pub async fn partition(&self) -> Result<Vec<Vec<String>>> {
        let rows = sqlx::query("SELECT profile_id, key, value FROM identities ORDER BY profile_id, key, value")
            .fetch_all(&self.pool)
            .await?;
        let mut groups: IndexMap<i64, Vec<String>> = IndexMap::new();
        for r in rows {
            groups.entry(r.try_get(0)?).or_default().push(format!(
                "{}={}",
                r.try_get::<String, _>(1)?,
                r.try_get::<String, _>(2)?
            ));
        }
        let mut out: Vec<Vec<String>> = groups.into_values().collect();
        out.sort();
        Ok(out)
    }
}

fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

/// Applies a trait's merge policy to its observations.
fn merge_trait(kind: TraitType, policy: Option<&MergePolicy>, rows: &[Obs]) -> Option<TraitValue> {
    let latest = |rows: &[&Obs]| -> Option<TraitValue> {
        let o = rows.iter().max_by(|a, b| {
            (a.fold.last.0, &a.fold.last.1, &a.source).cmp(&(b.fold.last.0, &b.fold.last.1, &b.source))
        })?;
        Some(TraitValue {
            value: parse_json(&o.fold.last.1),
            source: o.source.clone(),
            observed_at: iso(o.fold.last.0),
            policy: "latest".into(),
        })
    };
    let all: Vec<&Obs> = rows.iter().collect();
    let numeric = matches!(kind, TraitType::Number | TraitType::Integer);
    let num = |x: f64| if kind == TraitType::Integer { Value::from(x.round() as i64) } else { number(x, false) };
    match policy {
        None | Some(MergePolicy::Simple(SimpleMerge::Latest)) => latest(&all),
        Some(MergePolicy::Simple(SimpleMerge::First)) => {
            let o = all.iter().min_by(|a, b| {
                (a.fold.first.0, &a.fold.first.1, &a.source).cmp(&(b.fold.first.0, &b.fold.first.1, &b.source))
            })?;
            Some(TraitValue {
                value: parse_json(&o.fold.first.1),
                source: o.source.clone(),
                observed_at: iso(o.fold.first.0),
                policy: "first".into(),
            })
        }
        Some(MergePolicy::Simple(p @ (SimpleMerge::Max | SimpleMerge::Min))) => {
            let is_max = *p == SimpleMerge::Max;
            let name = if is_max { "max" } else { "min" };
            if numeric {
                let pick = all
                    .iter()
                    .filter_map(|o| if is_max { o.fold.nmax } else { o.fold.nmin }.map(|x| (x, *o)))
                    .reduce(|a, b| if (is_max && b.0 > a.0) || (!is_max && b.0 < a.0) { b } else { a })?;
                Some(TraitValue {
                    value: num(pick.0),
                    source: pick.1.source.clone(),
                    observed_at: iso(pick.1.fold.last.0),
                    policy: name.into(),
                })
            } else {
                let pick = if is_max {
                    all.iter().max_by(|a, b| a.fold.max.cmp(&b.fold.max))
                } else {
                    all.iter().min_by(|a, b| a.fold.min.cmp(&b.fold.min))
                }?;
                let v = if is_max { &pick.fold.max } else { &pick.fold.min };
                Some(TraitValue {
                    value: parse_json(v),
                    source: pick.source.clone(),
                    observed_at: iso(pick.fold.last.0),
                    policy: name.into(),
                })
            }
        }
        Some(MergePolicy::Simple(SimpleMerge::Sum)) => {
            let total: f64 = all.iter().filter_map(|o| o.fold.sum).sum();
            let last = all.iter().map(|o| o.fold.last.0).max()?;
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
            for s in &sp.source_priority {
                let from: Vec<&Obs> = all.iter().copied().filter(|o| o.source == *s).collect();
                if let Some(mut v) = latest(&from) {
                    v.policy = "source_priority".into();
                    return Some(v);
                }
            }
            latest(&all).map(|mut v| {
                v.policy = "source_priority".into();
                v
            })
        }
    }
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

fn to_val(v: &Value, kind: Option<FieldType>) -> Val {
    match (v, kind) {
        (Value::Null, _) => Val::Null,
        (Value::Bool(b), _) => Val::Bool(*b),
        (Value::Number(n), Some(FieldType::Integer)) => n.as_i64().map_or(Val::Null, Val::Int),
        (Value::Number(n), _) => n
            .as_i64()
            .filter(|_| n.is_i64() && kind.is_none())
            .map_or_else(|| n.as_f64().map_or(Val::Null, Val::Num), Val::Int),
        (Value::String(s), Some(FieldType::Date)) => audience::program::parse_date(s).map_or(Val::Null, Val::Date),
        (Value::String(s), Some(FieldType::Timestamp)) => {
            audience::program::parse_timestamp(s).map_or(Val::Null, Val::Ts)
        }
        (Value::String(s), _) => Val::Str(s.as_str().into()),
        (Value::Array(a), _) => Val::List(a.iter().map(|x| to_val(x, None)).collect()),
        (Value::Object(_), _) => Val::Null,
    }
}

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

/// Computed traits from the profile's events (newest first).
pub fn computed_traits(m: &Manifest, events: &[EventView], now: i64) -> IndexMap<String, Value> {
    let mut out = IndexMap::new();
    for (name, c) in &m.model.computed {
        let Some((agg, spec)) = c.aggregates().into_iter().next() else { continue };
        let (event, prop) = spec.split_once('.').map_or((spec.as_str(), None), |(e, p)| (e, Some(p)));
        let Some(et) = m.model.events.get(event) else { continue };
        let since = c
            .within
            .as_deref()
            .and_then(|w| crate::manifest::units::parse_duration(w).ok())
            .map(|d| now - d.as_millis() as i64);
        let filter = c.filter.as_deref().and_then(|f| {
            let mut scope = audience::Scope::new();
            for (p, t) in &et.properties {
                scope.var(p.clone(), crate::manifest::rules::field_type(*t));
            }
            audience::compile(f, &scope).ok()
        });
        let matching = events.iter().filter(|e| e.name == event).filter(|e| {
            let at = audience::program::parse_timestamp(&e.at).unwrap_or(0);
            since.is_none_or(|s| at >= s)
                && filter.as_ref().is_none_or(|p| {
                    let vals: Vec<Val> = p
                        .vars
                        .iter()
                        .map(|v| e.properties.get(v).map_or(Val::Null, |x| to_val(x, et.properties.get(v).copied())))
                        .collect();
                    p.matches(&vals, now)
                })
        });
        let values = |it: &mut dyn Iterator<Item = &EventView>| -> Vec<Value> {
            it.filter_map(|e| prop.and_then(|p| e.properties.get(p)).cloned()).collect()
        };
        let v = match agg {
            "count" => Value::from(matching.count() as i64),
            "last_seen" => matching.map(|e| Value::String(e.at.clone())).next().unwrap_or(Value::Null),
            "sum" | "avg" | "min" | "max" => {
                let nums: Vec<f64> = values(&mut matching.into_iter()).iter().filter_map(Value::as_f64).collect();
                let total = nums.iter().fold(0.0, |a, b| a + b);
                let r = match agg {
                    "sum" => Some(total),
                    "avg" if !nums.is_empty() => Some(total / nums.len() as f64),
                    "min" => nums.iter().copied().reduce(f64::min),
                    "max" => nums.iter().copied().reduce(f64::max),
                    _ => None,
                };
                let integer = agg != "avg" && prop.and_then(|p| et.properties.get(p)) == Some(&FieldType::Integer);
                r.map_or(Value::Null, |x| number(x, integer))
            }
            "first" => values(&mut matching.into_iter()).pop().unwrap_or(Value::Null),
            "last" => values(&mut matching.into_iter()).into_iter().next().unwrap_or(Value::Null),
            _ => {
                let mut vs: Vec<String> = values(&mut matching.into_iter()).iter().map(Value::to_string).collect();
                vs.sort();
                vs.dedup();
                Value::from(vs.len() as i64)
            }
        };
        out.insert(name.clone(), v);
    }
    out
}

/// The audiences a profile is in, evaluated now.
fn evaluate_audiences(
    m: &Manifest,
    traits: &IndexMap<String, TraitValue>,
    computed: &IndexMap<String, Value>,
    consent: &IndexMap<String, ConsentView>,
    identities: &[IdentityView],
    now: i64,
) -> Vec<String> {
    let scope = crate::manifest::rules::audience_scope(m);
    let programs: Vec<(&String, audience::Program)> =
        m.audiences.iter().filter_map(|(n, a)| audience::compile(&a.rule, &scope).ok().map(|p| (n, p))).collect();
    let mut member: IndexMap<String, bool> = IndexMap::new();
    // Audiences may depend on audiences (no cycles: validation refuses them);
    // evaluate until nothing changes.
    for _ in 0..=programs.len() {
        let mut changed = false;
        for (name, p) in &programs {
            let vals: Vec<Val> = p
                .vars
                .iter()
                .map(|v| {
                    if let Some(t) = traits.get(v) {
                        to_val(&t.value, m.model.traits.get(v).and_then(|d| trait_field(d.kind)))
                    } else if let Some(c) = computed.get(v) {
                        let is_ts = m.model.computed.get(v).is_some_and(|c| c.last_seen.is_some());
                        to_val(c, if is_ts { Some(FieldType::Timestamp) } else { None })
                    } else if let Some(p) = v.strip_prefix("consent.") {
                        Val::Bool(consent.get(p).is_some_and(|c| c.granted))
                    } else if let Some(a) = v.strip_prefix("audiences.") {
                        Val::Bool(member.get(a).copied().unwrap_or(false))
                    } else if let Some(k) = v.strip_prefix("identities.") {
                        Val::List(
                            identities
                                .iter()
                                .filter(|i| i.key == k)
                                .map(|i| Val::Str(i.value.as_str().into()))
                                .collect(),
                        )
                    } else {
                        Val::Null
                    }
                })
                .collect();
            let now_in = p.matches(&vals, now);
            if member.insert((*name).clone(), now_in) != Some(now_in) {
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    member.into_iter().filter(|(_, v)| *v).map(|(k, _)| k).collect()
}
