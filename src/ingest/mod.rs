//! Ingestion, first stage: a raw record (a JSON object from the collector, a
//! CSV row, a plugin's output line) is mapped by its source's `map` onto the
//! model: identifiers normalised, traits, event properties and entity fields
//! type-checked and coerced, consent read. A record that cannot be mapped is
//! rejected with its reason and the rest of its batch goes on.

pub mod file;
pub mod pipeline;

use crate::identity::normalize::{self, is_placeholder};
use crate::manifest::{FieldType, Manifest, Mapping, Normalizer, TraitType};
use serde_json::{Map, Value};
use std::collections::HashSet;

/// Longest string value accepted in a record, in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// Most identifiers one record may carry.
pub const MAX_IDENTIFIERS: usize = 32;

/// An event: its model name and typed properties.
pub type EventData = (String, Map<String, Value>);
/// An entity row: entity name, key and typed fields.
pub type EntityRow = (String, String, Map<String, Value>);

/// A mapped, validated record, ready for identity resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub source: String,
    pub message_id: String,
    /// When it was observed, milliseconds since the epoch.
    pub at: i64,
    /// `(identity key, normalised value)`, deduplicated.
    pub ids: Vec<(String, String)>,
    pub traits: Vec<(String, Value)>,
    pub event: Option<EventData>,
    pub entity: Option<EntityRow>,
    pub consent: Vec<(String, bool)>,
    /// Stored as the record's payload instead of its traits (probabilistic
    /// links keep their score and field weights here).
    pub meta: Option<Value>,
}

/// Why a record was not accepted: a stable code (see [`REJECTION_CODES`]),
/// the input field at fault when there is one, and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    pub code: &'static str,
    pub field: Option<String>,
    pub message: String,
}

impl Rejection {
    pub fn new(code: &'static str, field: Option<&str>, message: impl Into<String>) -> Rejection {
        Rejection { code, field: field.map(str::to_owned), message: message.into() }
    }
}

/// Every rejection code, with what it means.
pub const REJECTION_CODES: &[(&str, &str)] = &[
    ("unreadable", "the input line cannot be read: an I/O error, invalid UTF-8, a malformed CSV row or header"),
    ("not_json", "the input line is not JSON"),
    ("not_object", "the record is not a JSON object"),
    ("message_id", "the message id is missing, empty or too long"),
    ("timestamp", "the timestamp cannot be read or is outside the years 1 to 9999"),
    ("identifier", "an identifier is not text, too long, or one too many"),
    ("no_identifier", "the record carries no usable identifier"),
    ("trait", "a trait value does not fit the trait's type or allowed values"),
    ("consent", "a consent value is not true or false"),
    ("event", "the event is unknown or a property does not fit its type"),
    ("entity", "the entity row is unknown, lacks its key, or a field does not fit its type"),
    ("too_long", "a line or value is longer than its limit"),
    // The collector's own checks, before the map.
    ("too_large", "a collector message is larger than 32 KB"),
    ("type", "a collector message has no `type`, or one the tracking API does not know"),
    ("no_id", "a collector message has neither `userId` nor `anonymousId` (an alias: no `previousId`)"),
    ("source", "the write key's source left the running manifest"),
];

fn reject<T>(code: &'static str, field: Option<&str>, msg: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(code, field, msg))
}

/// Maps raw records of one source.
pub struct Mapper<'m> {
    m: &'m Manifest,
    source: String,
    map: &'m Mapping,
    blocklists: Vec<(String, HashSet<String>)>,
    patterns: Vec<(String, regex::Regex)>,
    /// Identifier values dropped (placeholders, blocklisted, malformed), for the summary.
    pub dropped_ids: u64,
}

impl<'m> Mapper<'m> {
    /// A mapper for `source`, or an error naming the sources that exist.
    pub fn new(m: &'m Manifest, source: &str) -> Result<Self, String> {
        let Some(src) = m.sources.get(source) else {
            let known: Vec<&str> = m.sources.keys().map(String::as_str).collect();
            return Err(format!("`{source}` is not a source in the manifest; sources: {}", known.join(", ")));
        };
        let mut blocklists = Vec::new();
        let mut patterns = Vec::new();
        for (key, spec) in &m.identity.keys {
            let opts = normalize::Options::for_key(spec);
            let list = spec
                .blocklist
                .iter()
                .map(|v| {
                    normalize::normalize(spec.normalize.unwrap_or(Normalizer::None), v, &opts)
                        .unwrap_or_else(|_| v.clone())
                })
                .collect();
            blocklists.push((key.clone(), list));
            if let Some(p) = &spec.pattern {
                let re =
                    regex::Regex::new(p).map_err(|e| format!("identity key `{key}` has an invalid pattern: {e}"))?;
                patterns.push((key.clone(), re));
            }
        }
        Ok(Mapper { m, source: source.to_owned(), map: &src.map, blocklists, patterns, dropped_ids: 0 })
    }

    /// Maps one raw record. `fallback_id` identifies it when the mapping names no
    /// message id field (e.g. `file:line`); `now` is used when it has no timestamp.
    pub fn map(&mut self, raw: &Value, now: i64) -> Result<Record, Rejection> {
        let Value::Object(obj) = raw else {
            return reject("not_object", None, "a record must be a JSON object");
        };
        let message_id = match &self.map.message_id {
            Some(f) => match lookup(obj, f) {
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::String(s)) if s.len() > 256 => {
                    return reject("message_id", Some(f), format!("message id in `{f}` is longer than 256 bytes"));
                }
                _ => return reject("message_id", Some(f), format!("no message id in field `{f}`")),
            },
            None => content_id(raw),
        };
        let at = match &self.map.timestamp {
            Some(f) => match lookup(obj, f) {
                None | Some(Value::Null) => now,
                Some(v) => parse_time(v).ok_or_else(|| {
                    Rejection::new(
                        "timestamp",
                        Some(f),
                        format!(
                            "`{f}` is not a timestamp between the years 1 and 9999 (RFC 3339, or epoch seconds or milliseconds): {}",
                            short(v)
                        ),
                    )
                })?,
            },
            None => now,
        };
        let mut ids: Vec<(String, String)> = Vec::new();
        for (key, field) in &self.map.identities {
            let Some(v) = lookup(obj, field) else { continue };
            let values: Vec<&Value> = match v {
                Value::Array(items) => items.iter().collect(),
                v => vec![v],
            };
            for v in values {
                let raw = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Null => continue,
                    other => {
                        return reject(
                            "identifier",
                            Some(field),
                            format!("identifier `{key}` in `{field}` must be text, not {}", kind(other)),
                        );
                    }
                };
                if raw.len() > 512 {
                    return reject(
                        "identifier",
                        Some(field),
                        format!("identifier `{key}` in `{field}` is longer than 512 bytes"),
                    );
                }
                match self.identifier(key, &raw) {
                    Some(n) => {
                        // `ids` never holds more than MAX_IDENTIFIERS, so
                        // this scan is bounded and the record's work linear.
                        if !ids.iter().any(|(k, x)| k == key && *x == n) {
                            if ids.len() == MAX_IDENTIFIERS {
                                return reject(
                                    "identifier",
                                    Some(field),
                                    format!(
                                        "more than {MAX_IDENTIFIERS} distinct identifiers in one record (at `{field}`); the limit is {MAX_IDENTIFIERS}"
                                    ),
                                );
                            }
                            ids.push((key.clone(), n));
                        }
                    }
                    None => self.dropped_ids += 1,
                }
            }
        }
        if ids.is_empty() {
            let fields: Vec<&str> = self.map.identities.values().map(String::as_str).collect();
            return reject("no_identifier", None, format!("no usable identifier (looked in {})", fields.join(", ")));
        }
        let mut traits = Vec::new();
        for (name, field) in &self.map.traits {
            let Some(v) = lookup(obj, field) else { continue };
            if v.is_null() {
                continue;
            }
            let Some(t) = self.m.model.traits.get(name) else { continue };
            let value = normalize::trait_value(t, v)
                .and_then(|v| coerce_trait(t.kind, &v))
                .map_err(|e| Rejection::new("trait", Some(field), format!("trait `{name}` (field `{field}`): {e}")))?;
            if !t.allowed.is_empty()
                && let Value::String(s) = &value
                && !t.allowed.contains(s)
            {
                return reject(
                    "trait",
                    Some(field),
                    format!("trait `{name}`: `{s}` is not one of {}", t.allowed.join(", ")),
                );
            }
            traits.push((name.clone(), value));
        }
        let event = self.event(obj)?;
        let entity = self.entity(obj)?;
        let mut consent = Vec::new();
        for (purpose, field) in &self.map.consent {
            let Some(v) = lookup(obj, field) else { continue };
            match coerce_bool(v) {
                Some(b) => consent.push((purpose.clone(), b)),
                None if v.is_null() => {}
                None => {
                    return reject(
                        "consent",
                        Some(field),
                        format!("consent `{purpose}` (field `{field}`) must be true or false, not {}", short(v)),
                    );
                }
            }
        }
        Ok(Record { source: self.source.clone(), message_id, at, ids, traits, event, entity, consent, meta: None })
    }

    fn identifier(&self, key: &str, raw: &str) -> Option<String> {
        let spec = self.m.identity.keys.get(key)?;
        let mut raw = raw.to_owned();
        if let Some((_, re)) = self.patterns.iter().find(|(k, _)| k == key) {
            let caps = re.captures(&raw)?;
            raw = caps.get(1).or_else(|| caps.get(0)).map(|m| m.as_str().to_owned())?;
        }
        let opts = normalize::Options::for_key(spec);
        let n = normalize::normalize(spec.normalize.unwrap_or(Normalizer::Trim), &raw, &opts).ok()?;
        if is_placeholder(&n) || self.blocklists.iter().any(|(k, list)| k == key && list.contains(&n)) {
            return None;
        }
        Some(n)
    }

    fn event(&self, obj: &Map<String, Value>) -> Result<Option<EventData>, Rejection> {
        let Some(em) = &self.map.event else { return Ok(None) };
        let name = match (&em.name, &em.name_field) {
            (Some(n), _) => n.clone(),
            (None, Some(f)) => match lookup(obj, f) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(s)) => match em.names.get(s) {
                    Some(n) => n.clone(),
                    None if self.m.model.events.contains_key(s) => s.clone(),
                    None => {
                        return reject(
                            "event",
                            Some(f),
                            format!("event `{s}` is not in model.events nor mapped under `event.names`"),
                        );
                    }
                },
                Some(v) => {
                    return reject("event", Some(f), format!("event name in `{f}` must be text, not {}", kind(v)));
                }
            },
            (None, None) => return Ok(None),
        };
        let Some(et) = self.m.model.events.get(&name) else {
            return reject("event", None, format!("event `{name}` is not in model.events"));
        };
        let mut props = Map::new();
        for (p, ty) in &et.properties {
            let v = match em.properties.get(p) {
                Some(f) => lookup(obj, f),
                None => lookup(obj, p).or_else(|| obj.get("properties").and_then(|x| x.get(p))),
            };
            let Some(v) = v.filter(|v| !v.is_null()) else { continue };
            let value = coerce_field(*ty, v)
                .map_err(|e| Rejection::new("event", Some(p), format!("event `{name}` property `{p}`: {e}")))?;
            props.insert(p.clone(), value);
        }
        Ok(Some((name, props)))
    }

    fn entity(&self, obj: &Map<String, Value>) -> Result<Option<EntityRow>, Rejection> {
        let Some(em) = &self.map.entity else { return Ok(None) };
        let Some(et) = self.m.model.entities.get(&em.name) else {
            return reject("entity", None, format!("entity `{}` is not in model.entities", em.name));
        };
        let mut fields = Map::new();
        for (f, ty) in &et.fields {
            let v = match em.fields.get(f) {
                Some(src) => lookup(obj, src),
                None => lookup(obj, f),
            };
            let Some(v) = v.filter(|v| !v.is_null()) else { continue };
            let value = coerce_field(*ty, v)
                .map_err(|e| Rejection::new("entity", Some(f), format!("entity `{}` field `{f}`: {e}", em.name)))?;
            fields.insert(f.clone(), value);
        }
        let key = match fields.get(&et.key) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => {
                return reject("entity", Some(&et.key), format!("entity `{}` row has no key `{}`", em.name, et.key));
            }
        };
        Ok(Some((em.name.clone(), key, fields)))
    }
}

/// Follows a dotted path (`traits.email`) into an object.
pub fn lookup<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut cur = obj.get(parts.next()?)?;
    for p in parts {
        cur = match cur {
            Value::Object(m) => m.get(p)?,
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A stable id for records without one: SHA-256 of their canonical JSON.
pub fn content_id(v: &Value) -> String {
    use sha2::Digest;
    let text = serde_json::to_string(v).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..16])
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 { format!("{}…", s.chars().take(60).collect::<String>()) } else { s }
}

/// Earliest timestamp accepted: 0001-01-01T00:00:00Z, in epoch milliseconds.
pub const MIN_TIME_MS: i64 = -62_135_596_800_000;
/// Latest timestamp accepted: 9999-12-31T23:59:59.999Z, in epoch milliseconds.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Timestamps: RFC 3339, `YYYY-MM-DD`, or epoch seconds / milliseconds,
/// between the years 1 and 9999 ([`MIN_TIME_MS`], [`MAX_TIME_MS`]): every
/// store, chrono and RFC 3339 can represent those, and anything outside is
/// a broken value (`1e300`, `i64::MAX`) rather than a date.
pub fn parse_time(v: &Value) -> Option<i64> {
    parse_time_unchecked(v).filter(|ms| (MIN_TIME_MS..=MAX_TIME_MS).contains(ms))
}

fn parse_time_unchecked(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
                return Some(t.timestamp_millis());
            }
            if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
                return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp_millis());
            }
            if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
                return Some(t.and_utc().timestamp_millis());
            }
            s.parse::<f64>().ok().and_then(|n| parse_time_unchecked(&Value::from(n)))
        }
        Value::Number(n) => {
            let x = n.as_f64()?;
            if !x.is_finite() || x < 0.0 || x > MAX_TIME_MS as f64 {
                return None;
            }
            // Epoch milliseconds are > 1e11 for any date after 1973.
            Some(if x > 1e11 { x as i64 } else { (x * 1000.0) as i64 })
        }
        _ => None,
    }
}

fn coerce_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_i64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" | "granted" | "opt-in" | "optin" => Some(true),
            "false" | "no" | "n" | "0" | "denied" | "opt-out" | "optout" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn check_len(s: &str) -> Result<(), String> {
    if s.len() > MAX_VALUE_BYTES {
        Err(format!("value is {} bytes; the limit is {MAX_VALUE_BYTES}", s.len()))
    } else {
        Ok(())
    }
}

/// Coerces a value to a field type (CSV gives text for everything).
pub fn coerce_field(ty: FieldType, v: &Value) -> Result<Value, String> {
    let bad = |what: &str| format!("expected {what}, found {}", short(v));
    match ty {
        FieldType::String => match v {
            Value::String(s) => {
                check_len(s)?;
                Ok(Value::String(s.clone()))
            }
            Value::Number(n) => Ok(Value::String(n.to_string())),
            Value::Bool(b) => Ok(Value::String(b.to_string())),
            _ => Err(bad("text")),
        },
        FieldType::Number => match v {
            Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => Ok(v.clone()),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| bad("a number")),
            _ => Err(bad("a number")),
        },
        FieldType::Integer => match v {
            Value::Number(n) if n.is_i64() => Ok(v.clone()),
            Value::Number(n) if n.as_f64().is_some_and(|x| x.fract() == 0.0 && x.abs() < 9e15) => {
                Ok(Value::from(n.as_f64().unwrap_or_default() as i64))
            }
            Value::String(s) => s.trim().parse::<i64>().map(Value::from).map_err(|_| bad("an integer")),
            _ => Err(bad("an integer")),
        },
        FieldType::Boolean => coerce_bool(v).map(Value::Bool).ok_or_else(|| bad("true or false")),
        FieldType::Date => {
            let s = v.as_str().ok_or_else(|| bad("a date (YYYY-MM-DD)"))?.trim();
            let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .or_else(|_| chrono::DateTime::parse_from_rfc3339(s).map(|t| t.date_naive()))
                .map_err(|_| bad("a date (YYYY-MM-DD)"))?;
            // chrono reads `-9999-01-01` and `+12345-01-01`; a date is
            // between the years 1 and 9999, like a timestamp.
            if !(1..=9999).contains(&chrono::Datelike::year(&d)) {
                return Err(format!("date {} is outside the years 1 to 9999", short(v)));
            }
            Ok(Value::String(d.format("%Y-%m-%d").to_string()))
        }
        FieldType::Timestamp => {
            let ms = parse_time(v)
                .ok_or_else(|| bad("a timestamp (RFC 3339, or epoch seconds or milliseconds, years 1 to 9999)"))?;
            let t = chrono::DateTime::from_timestamp_millis(ms).ok_or_else(|| bad("a timestamp"))?;
            Ok(Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        }
    }
}

/// Coerces a value to a trait type.
pub fn coerce_trait(ty: TraitType, v: &Value) -> Result<Value, String> {
    let field = match ty {
        TraitType::String => FieldType::String,
        TraitType::Number => FieldType::Number,
        TraitType::Integer => FieldType::Integer,
        TraitType::Boolean => FieldType::Boolean,
        TraitType::Date => FieldType::Date,
        TraitType::Timestamp => FieldType::Timestamp,
        TraitType::List => {
            let items: Vec<Value> = match v {
                Value::Array(a) => a.clone(),
                Value::String(s) => {
                    s.split(',').map(|x| Value::String(x.trim().to_owned())).filter(|x| x != "").collect()
                }
                _ => return Err(format!("expected a list, found {}", short(v))),
            };
            let mut out = Vec::with_capacity(items.len());
            for i in &items {
                out.push(coerce_field(FieldType::String, i)?);
            }
            return Ok(Value::Array(out));
        }
    };
    coerce_field(field, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Options, load_str};
    use serde_json::json;

    fn manifest() -> Manifest {
        let text = r#"
version: 1
name: t
sources:
  web:
    collector: {}
    map:
      message_id: messageId
      timestamp: timestamp
      identities: { email: traits.email, anonymous_id: anonymousId, phone: traits.phone }
      traits: { tier: traits.tier, points: traits.points }
      event: { name_field: event, names: { "Order Completed": order_completed } }
      consent: { email_marketing: context.consent.email }
identity:
  keys:
    email: { normalize: email, blocklist: [kassa@shop.example] }
    phone: { normalize: e164, default_region: SE }
    anonymous_id: {}
model:
  traits:
    tier: { type: string, enum: [gold, silver] }
    points: { type: integer }
  events:
    order_completed: { properties: { revenue: number, order_id: string } }
consent:
  purposes: [email_marketing]
"#;
        let l = load_str(text, &Options::validate("."));
        assert!(!l.has_errors(), "{:?}", l.diagnostics);
        l.manifest.unwrap()
    }

    #[test]
    fn maps_a_segment_style_record() {
        let m = manifest();
        let mut mapper = Mapper::new(&m, "web").unwrap();
        let raw = json!({"messageId": "m1", "timestamp": "2026-11-05T10:00:00Z", "anonymousId": "a1",
            "event": "Order Completed", "properties": {"revenue": "12.5", "order_id": 7},
            "traits": {"email": " Ada@Example.org ", "tier": "gold", "points": "120", "phone": "070-123 45 67"},
            "context": {"consent": {"email": "yes"}}});
        let r = mapper.map(&raw, 0).unwrap();
        assert_eq!(r.message_id, "m1");
        assert_eq!(r.at, 1_793_872_800_000);
        assert_eq!(
            r.ids,
            vec![
                ("email".into(), "ada@example.org".into()),
                ("anonymous_id".into(), "a1".into()),
                ("phone".into(), "+46701234567".into())
            ]
        );
        assert_eq!(r.traits, vec![("tier".into(), json!("gold")), ("points".into(), json!(120))]);
        let (name, props) = r.event.unwrap();
        assert_eq!(name, "order_completed");
        assert_eq!(props["revenue"], json!(12.5));
        assert_eq!(props["order_id"], json!("7"));
        assert_eq!(r.consent, vec![("email_marketing".into(), true)]);
    }

    #[test]
    fn rejects_with_reasons() {
        let m = manifest();
        let mut mapper = Mapper::new(&m, "web").unwrap();
        let reason = |v: Value| mapper_reason(&m, v);
        assert!(reason(json!({"messageId": "m", "anonymousId": "a", "traits": {"points": "lots"}})).contains("points"));
        assert!(
            reason(json!({"messageId": "m", "anonymousId": "a", "traits": {"tier": "bronze"}})).contains("not one of")
        );
        assert!(reason(json!({"messageId": "m", "traits": {"email": "n/a"}})).contains("no usable identifier"));
        assert!(reason(json!({"anonymousId": "a"})).contains("no message id"));
        assert!(reason(json!({"messageId": "m", "anonymousId": "a", "event": "Signed Up"})).contains("Signed Up"));
        assert!(reason(json!({"messageId": "m", "anonymousId": "a", "timestamp": "yesterday"})).contains("timestamp"));
        assert!(reason(json!([1, 2])).contains("object"));
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(reason(json!({"messageId": "m", "anonymousId": "a", "traits": {"tier": big}})).contains("limit"));
        // Blocklisted identifiers are dropped, not fatal.
        let r = mapper
            .map(&json!({"messageId": "m", "anonymousId": "a", "traits": {"email": "KASSA@shop.example"}}), 0)
            .unwrap();
        assert_eq!(r.ids.len(), 1);
    }

    fn mapper_reason(m: &Manifest, v: Value) -> String {
        Mapper::new(m, "web").unwrap().map(&v, 0).unwrap_err().message
    }

    #[test]
    fn unknown_source_names_the_known_ones() {
        let m = manifest();
        assert!(Mapper::new(&m, "crm").err().unwrap().contains("web"));
    }
}
