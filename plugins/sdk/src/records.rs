//! Records crossing the boundary: JSON Lines batches, the typed destination
//! records and write acknowledgements.

use std::borrow::Cow;
use std::fmt;

use indexmap::IndexMap;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ConnectorError;

/// Builds one JSON Lines batch: every row is serialised to one JSON object on
/// its own line.
///
/// ```
/// use cdp_plugin_sdk::Records;
/// use serde_json::json;
///
/// let mut records = Records::new();
/// records.push(&json!({"email": "ada@example.com", "tier": "gold"}))?;
/// records.push(&json!({"email": "alan@example.com"}))?;
/// assert_eq!(records.len(), 2);
/// assert_eq!(
///     records.as_str(),
///     "{\"email\":\"ada@example.com\",\"tier\":\"gold\"}\n{\"email\":\"alan@example.com\"}\n"
/// );
/// # Ok::<(), cdp_plugin_sdk::ConnectorError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    ndjson: String,
    count: u32,
}

impl Records {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one row. The row must serialise to a JSON object; anything
    /// else (or a serialisation failure) is an `internal` error.
    pub fn push<T: Serialize + ?Sized>(&mut self, row: &T) -> Result<(), ConnectorError> {
        let line = serde_json::to_string(row)
            .map_err(|e| ConnectorError::internal("record_serialize", format!("cannot serialise a record: {e}")))?;
        if !line.starts_with('{') {
            return Err(ConnectorError::internal(
                "record_not_object",
                "every record must be a JSON object",
            ));
        }
        // serde_json escapes control characters inside strings, so a
        // serialised value never spans more than one line.
        self.ndjson.push_str(&line);
        self.ndjson.push('\n');
        self.count += 1;
        Ok(())
    }

    /// A batch of all `rows`.
    pub fn from_rows<'a, T, I>(rows: I) -> Result<Self, ConnectorError>
    where
        T: Serialize + 'a,
        I: IntoIterator<Item = &'a T>,
    {
        let mut records = Records::new();
        for row in rows {
            records.push(row)?;
        }
        Ok(records)
    }

    /// How many records the batch holds.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The JSON Lines text.
    pub fn as_str(&self) -> &str {
        &self.ndjson
    }

    /// The JSON Lines text, consuming the batch.
    pub fn into_ndjson(self) -> String {
        self.ndjson
    }
}

/// What a source reader hands to the host from [`crate::SourceReader::next`].
#[derive(Debug, Clone, PartialEq)]
pub enum ReadEvent {
    /// Records, in order.
    Records(Records),
    /// Opaque resume state: every record emitted before it is covered. The
    /// host persists it in the same transaction as those records and passes
    /// it back to [`crate::Source::open`] on the next run.
    Checkpoint(Value),
}

impl ReadEvent {
    /// A records event.
    pub fn records(records: Records) -> Self {
        ReadEvent::Records(records)
    }

    /// A checkpoint event.
    pub fn checkpoint(state: Value) -> Self {
        ReadEvent::Checkpoint(state)
    }
}

/// What happened to a profile, as delivered to a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The profile was created or changed.
    Upsert,
    /// The profile entered `audience`.
    Enter,
    /// The profile left `audience`.
    Exit,
}

impl Op {
    /// `upsert`, `enter` or `exit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Enter => "enter",
            Op::Exit => "exit",
        }
    }
}

/// Identities by type (`email`, `phone`, …), in the order the host sent them.
pub type Identities = IndexMap<String, Vec<String>>;

/// One line of a destination batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationRecord {
    /// Idempotency key: the same change is always delivered with the same key.
    pub key: String,
    /// What happened.
    pub op: Op,
    /// The unified profile this record is about.
    pub profile_id: String,
    /// For `enter`/`exit`: the audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Identities by type.
    #[serde(default)]
    pub identities: Identities,
    /// Traits by name, in the order the host sent them.
    #[serde(default)]
    pub traits: Map<String, Value>,
    /// When the change happened (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

impl DestinationRecord {
    /// A borrowed view of this record, e.g. to share one code path with
    /// [`DestinationWriter::write_ref`](crate::DestinationWriter::write_ref).
    pub fn borrowed(&self) -> DestinationRecordRef<'_> {
        DestinationRecordRef {
            key: Cow::Borrowed(&self.key),
            op: self.op,
            profile_id: Cow::Borrowed(&self.profile_id),
            audience: self.audience.as_deref().map(Cow::Borrowed),
            identities: IdentitiesRef(
                self.identities
                    .iter()
                    .map(|(k, v)| {
                        let values = v.iter().map(|s| Cow::Borrowed(s.as_str())).collect();
                        (Cow::Borrowed(k.as_str()), Values::Many(values))
                    })
                    .collect(),
            ),
            traits: TraitsRef(
                self.traits
                    .iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), TraitValue::from_value_ref(v)))
                    .collect(),
            ),
            occurred_at: self.occurred_at.as_deref().map(Cow::Borrowed),
        }
    }
}

/// One line of a destination batch, borrowed from the batch's JSON text: the
/// same fields as [`DestinationRecord`], but strings without JSON escapes
/// point into the batch instead of being copied, and identities and traits
/// are flat lists instead of hash maps. Decoding a batch this way costs a
/// few allocations per record instead of one per string.
///
/// The SDK decodes every batch into these and hands them to
/// [`DestinationWriter::write_ref`](crate::DestinationWriter::write_ref);
/// its default turns them into owned [`DestinationRecord`]s (by moving, not
/// re-parsing) and calls `write`. Override `write_ref` to skip that.
///
/// ```
/// use cdp_plugin_sdk::{DestinationRecordRef, Op, decode_json_lines};
///
/// let batch = concat!(
///     r#"{"key":"k1","op":"enter","profile_id":"p1","audience":"vip","#,
///     r#""identities":{"email":["ada@example.com"]},"traits":{"tier":"gold","ltv":12.5}}"#,
///     "\n",
/// );
/// let (rows, rejected) = decode_json_lines::<DestinationRecordRef>(batch);
/// assert!(rejected.is_empty());
/// let r = &rows[0].1;
/// assert_eq!((r.key.as_ref(), r.op), ("k1", Op::Enter));
/// assert_eq!(r.identities.get("email").unwrap()[0], "ada@example.com");
/// assert_eq!(r.traits.get("tier").and_then(|v| v.as_str()), Some("gold"));
/// assert_eq!(r.traits.get("ltv").map(|v| v.to_value()), Some(serde_json::json!(12.5)));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationRecordRef<'a> {
    /// Idempotency key: the same change is always delivered with the same key.
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    /// What happened.
    pub op: Op,
    /// The unified profile this record is about.
    #[serde(borrow)]
    pub profile_id: Cow<'a, str>,
    /// For `enter`/`exit`: the audience.
    #[serde(
        default,
        borrow,
        deserialize_with = "optional_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub audience: Option<Cow<'a, str>>,
    /// Identities by type, in the order the host sent them.
    #[serde(default, borrow)]
    pub identities: IdentitiesRef<'a>,
    /// Traits by name, in the order the host sent them.
    #[serde(default, borrow)]
    pub traits: TraitsRef<'a>,
    /// When the change happened (RFC 3339).
    #[serde(
        default,
        borrow,
        deserialize_with = "optional_str",
        skip_serializing_if = "Option::is_none"
    )]
    pub occurred_at: Option<Cow<'a, str>>,
}

impl DestinationRecordRef<'_> {
    /// The owned record; borrowed strings are copied, nothing is parsed again.
    pub fn into_owned(self) -> DestinationRecord {
        DestinationRecord {
            key: self.key.into_owned(),
            op: self.op,
            profile_id: self.profile_id.into_owned(),
            audience: self.audience.map(Cow::into_owned),
            identities: self
                .identities
                .0
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_vec().into_iter().map(Cow::into_owned).collect()))
                .collect(),
            traits: self
                .traits
                .0
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_value()))
                .collect(),
            occurred_at: self.occurred_at.map(Cow::into_owned),
        }
    }
}

/// Identities by type, borrowed: a list of `(type, values)` in the order the
/// host sent them. A type sent twice keeps its first position and its last
/// values, as a map would.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentitiesRef<'a>(Vec<(Cow<'a, str>, Values<'a>)>);

/// The values of one identity type: one value (the common case) is kept
/// without a list of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Values<'a> {
    One(Cow<'a, str>),
    Many(Vec<Cow<'a, str>>),
}

impl<'a> Values<'a> {
    fn as_slice(&self) -> &[Cow<'a, str>] {
        match self {
            Values::One(v) => std::slice::from_ref(v),
            Values::Many(v) => v,
        }
    }

    fn into_vec(self) -> Vec<Cow<'a, str>> {
        match self {
            Values::One(v) => vec![v],
            Values::Many(v) => v,
        }
    }
}

impl<'a> IdentitiesRef<'a> {
    /// The values of one identity type, if the record has it.
    pub fn get(&self, kind: &str) -> Option<&[Cow<'a, str>]> {
        self.0
            .iter()
            .find(|(k, _)| same_name(k, kind))
            .map(|(_, v)| v.as_slice())
    }

    /// `(type, values)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Cow<'a, str>])> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v.as_slice()))
    }

    /// How many identity types the record has.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the record has no identity.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Name equality for the short lists of identities and traits: length and
/// first byte settle most mismatches without a call to `memcmp` (a byte loop
/// in a WebAssembly guest).
fn same_name(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.as_bytes().first() == b.as_bytes().first() && a == b
}

/// Traits by name, borrowed: a list of `(name, value)` in the order the host
/// sent them. A name sent twice keeps its first position and its last value,
/// as a map would.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraitsRef<'a>(Vec<(Cow<'a, str>, TraitValue<'a>)>);

impl<'a> TraitsRef<'a> {
    /// The value of one trait, if the record has it (possibly JSON `null`).
    pub fn get(&self, name: &str) -> Option<&TraitValue<'a>> {
        self.0.iter().find(|(k, _)| same_name(k, name)).map(|(_, v)| v)
    }

    /// `(name, value)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TraitValue<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// How many traits the record has.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the record has no trait.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One trait value of a [`DestinationRecordRef`]: strings (the common case)
/// borrowed from the batch when they hold no escapes, any other JSON value
/// as a [`Value`] (numbers, booleans and `null` need no allocation).
#[derive(Debug, Clone, PartialEq)]
pub enum TraitValue<'a> {
    /// A JSON string, unescaped.
    String(Cow<'a, str>),
    /// Any other JSON value: `null`, a boolean, a number, an array or an
    /// object.
    Other(Cow<'a, Value>),
}

impl<'a> TraitValue<'a> {
    fn from_value_ref(v: &'a Value) -> Self {
        match v {
            Value::String(s) => TraitValue::String(Cow::Borrowed(s)),
            other => TraitValue::Other(Cow::Borrowed(other)),
        }
    }

    /// The text of a string value; `None` for any other value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            TraitValue::String(s) => Some(s),
            TraitValue::Other(_) => None,
        }
    }

    /// Whether the value is JSON `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, TraitValue::Other(v) if v.is_null())
    }

    /// The value as an owned [`Value`].
    pub fn to_value(&self) -> Value {
        match self {
            TraitValue::String(s) => Value::String(s.to_string()),
            TraitValue::Other(v) => v.clone().into_owned(),
        }
    }

    /// The value as an owned [`Value`], consuming it.
    pub fn into_value(self) -> Value {
        match self {
            TraitValue::String(s) => Value::String(s.into_owned()),
            TraitValue::Other(v) => v.into_owned(),
        }
    }
}

/// A string borrowed from the input when it holds no escapes.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

fn optional_str<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    Ok(Option::<CowStr<'de>>::deserialize(d)?.map(|s| s.0))
}

/// Replaces the value of `key` in place or appends it: a map's `insert`
/// over a short list.
fn insert<'a, T>(list: &mut Vec<(Cow<'a, str>, T)>, key: Cow<'a, str>, value: T) {
    match list.iter_mut().find(|(k, _)| same_name(k, &key)) {
        Some(slot) => slot.1 = value,
        None => list.push((key, value)),
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Values<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Values<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let Some(CowStr(first)) = seq.next_element()? else {
                    return Ok(Values::Many(Vec::new()));
                };
                let Some(CowStr(second)) = seq.next_element()? else {
                    return Ok(Values::One(first));
                };
                let mut out = vec![first, second];
                while let Some(CowStr(s)) = seq.next_element()? {
                    out.push(s);
                }
                Ok(Values::Many(out))
            }
        }
        d.deserialize_seq(V)
    }
}

/// A JSON object as a short list of `(name, value)` in arrival order, a name
/// sent twice keeping its first place and its last value. `capacity` is
/// reserved up front (JSON gives no size hint).
fn named_list<'de, D, T>(d: D, capacity: usize) -> Result<Vec<(Cow<'de, str>, T)>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(usize, std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<(Cow<'de, str>, T)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(map.size_hint().unwrap_or(self.0).min(64));
            while let Some((CowStr(k), v)) = map.next_entry::<CowStr<'de>, T>()? {
                insert(&mut out, k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V(capacity, std::marker::PhantomData))
}

impl<'de: 'a, 'a> Deserialize<'de> for IdentitiesRef<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Records carry one or two identity types.
        named_list(d, 0).map(IdentitiesRef)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for TraitsRef<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Room for a typical profile's traits instead of growing through 4 and 8.
        named_list(d, 8).map(TraitsRef)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for TraitValue<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TraitValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any valid JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(TraitValue::String(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TraitValue::String(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(TraitValue::String(Cow::Owned(v)))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(TraitValue::Other(Cow::Owned(Value::Bool(v))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(TraitValue::Other(Cow::Owned(Value::from(v))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(TraitValue::Other(Cow::Owned(Value::from(v))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                // As serde_json's own `Value`: a non-finite float is `null`.
                Ok(TraitValue::Other(Cow::Owned(Value::from(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(TraitValue::Other(Cow::Owned(Value::Null)))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(TraitValue::Other(Cow::Owned(Value::Null)))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                TraitValue::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Ok(TraitValue::Other(Cow::Owned(Value::deserialize(
                    SeqAccessDeserializer::new(seq),
                )?)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(TraitValue::Other(Cow::Owned(Value::deserialize(
                    MapAccessDeserializer::new(map),
                )?)))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for IdentitiesRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v.as_slice())?;
        }
        m.end()
    }
}

impl Serialize for TraitsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Serialize for TraitValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TraitValue::String(v) => s.serialize_str(v),
            TraitValue::Other(v) => v.serialize(s),
        }
    }
}

/// One line of an erasure batch: a person to forget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteRecord {
    /// Idempotency key of the erasure request.
    pub key: String,
    /// The unified profile being erased.
    #[serde(default)]
    pub profile_id: String,
    /// Identities by type. Also accepted on input as a list of
    /// `{"type": …, "value": …}` objects.
    #[serde(default, deserialize_with = "identities_map_or_list")]
    pub identities: Identities,
}

fn identities_map_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Identities, D::Error> {
    #[derive(Deserialize)]
    struct TypedValue {
        #[serde(rename = "type")]
        kind: String,
        value: String,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Map(Identities),
        List(Vec<TypedValue>),
    }
    match Form::deserialize(d)
        .map_err(|_| de::Error::custom("identities must be an object of arrays or a list of {type, value}"))?
    {
        Form::Map(map) => Ok(map),
        Form::List(list) => {
            let mut map = Identities::new();
            for tv in list {
                map.entry(tv.kind).or_default().push(tv.value);
            }
            Ok(map)
        }
    }
}

/// A record the destination refused; `index` is its 0-based line in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// 0-based index of the record in the batch.
    pub index: u32,
    /// Why it was refused.
    pub reason: ConnectorError,
}

impl Rejection {
    /// A rejection of record `index`.
    pub fn new(index: usize, reason: ConnectorError) -> Self {
        Rejection {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            reason,
        }
    }
}

/// The result of a write: how many were accepted, and only the failures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteAck {
    /// Records accepted.
    pub accepted: u32,
    /// Records refused, by index.
    pub rejected: Vec<Rejection>,
}

impl WriteAck {
    /// All `count` records were accepted.
    pub fn all(count: usize) -> Self {
        WriteAck {
            accepted: u32::try_from(count).unwrap_or(u32::MAX),
            rejected: Vec::new(),
        }
    }

    /// `total` records of which `rejected` were refused; rejections are
    /// sorted by index, duplicates and indexes outside the batch dropped.
    pub fn with_rejections(total: usize, mut rejected: Vec<Rejection>) -> Self {
        rejected.retain(|r| (r.index as usize) < total);
        rejected.sort_by_key(|r| r.index);
        rejected.dedup_by_key(|r| r.index);
        let accepted = total - rejected.len();
        WriteAck {
            accepted: u32::try_from(accepted).unwrap_or(u32::MAX),
            rejected,
        }
    }
}

/// Decodes a JSON Lines batch into typed rows.
///
/// Blank lines are skipped; the index of a row is its position among the
/// non-blank lines. Lines that do not decode come back as `data` rejections
/// at their index instead of failing the whole batch, so one malformed line
/// cannot hold back the others.
///
/// Rows may borrow from `ndjson` ([`DestinationRecordRef`]) or own their
/// data ([`DestinationRecord`], any `DeserializeOwned` type).
pub fn decode_json_lines<'a, T: Deserialize<'a>>(ndjson: &'a str) -> (Vec<(u32, T)>, Vec<Rejection>) {
    let mut rows = Vec::new();
    let rejected = decode_each(ndjson, |index, row| rows.push((index, row)));
    (rows, rejected)
}

/// Decodes each non-blank line of `ndjson`, handing `row` every line that
/// decodes with its index; answers the rejections of those that do not.
pub(crate) fn decode_each<'a, T: Deserialize<'a>>(ndjson: &'a str, mut row: impl FnMut(u32, T)) -> Vec<Rejection> {
    let mut rejected = Vec::new();
    for (index, line) in json_lines(ndjson).enumerate() {
        match serde_json::from_str::<T>(line) {
            Ok(r) => row(u32::try_from(index).unwrap_or(u32::MAX), r),
            Err(e) => rejected.push(Rejection::new(
                index,
                ConnectorError::data("record_invalid", format!("record {index} does not decode: {e}")),
            )),
        }
    }
    rejected
}

/// The non-blank lines of `text`, without their `\n` or `\r\n` ends, as
/// `str::lines` would give them. Newlines are found with SIMD where the
/// target has it (`memchr`; in a plugin, Wasm SIMD).
pub(crate) fn json_lines(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let ends = memchr::memchr_iter(b'\n', bytes).chain((!text.ends_with('\n')).then_some(bytes.len()));
    let mut start = 0;
    ends.filter_map(move |end| {
        // `\n` is a char boundary, so these slices are always valid.
        let line = text.get(start..end)?;
        start = end + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        (!blank(line)).then_some(line)
    })
}

/// Whether a line holds only whitespace (checked byte by byte only when it
/// does not start with a visible ASCII character, as JSON values do).
fn blank(line: &str) -> bool {
    match line.as_bytes().first() {
        None => true,
        Some(b) if b.is_ascii_graphic() => false,
        Some(_) => line.trim().is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_lines_split_like_str_lines() {
        for text in [
            "",
            "\n",
            "a",
            "a\n",
            "a\r\nb",
            "a\n\n  \n\tb\r\n",
            " \u{a0}\n{}\n\r\n",
            "x\ny\n\n",
            "é\nü",
        ] {
            let expected: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(json_lines(text).collect::<Vec<_>>(), expected, "{text:?}");
        }
    }

    #[test]
    fn records_build_json_lines() {
        let mut r = Records::new();
        assert!(r.is_empty());
        r.push(&json!({"a": "line\nbreak", "b": 1})).unwrap();
        r.push(&json!({})).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.as_str(), "{\"a\":\"line\\nbreak\",\"b\":1}\n{}\n");
        let err = r.push(&json!([1, 2])).unwrap_err();
        assert_eq!(err.code, "record_not_object");
        assert_eq!(r.len(), 2);
        let rows = [json!({"x": 1}), json!({"x": 2})];
        let built = Records::from_rows(&rows).unwrap();
        assert_eq!(built.into_ndjson(), "{\"x\":1}\n{\"x\":2}\n");
    }

    #[test]
    fn destination_records_decode_with_order_and_defaults() {
        let text = concat!(
            r#"{"key":"k1","op":"enter","profile_id":"p1","audience":"vip","identities":{"phone":["+46701234567"],"email":["a@x.com"]},"traits":{"z":1,"first_name":"Ada"},"occurred_at":"2026-11-22T10:00:00Z"}"#,
            "\n\n",
            r#"{"key":"k2","op":"upsert","profile_id":"p2","future_field":true}"#,
            "\n",
            r#"{"key":"k3","op":"teleport","profile_id":"p3"}"#,
            "\n",
        );
        let (rows, rejected) = decode_json_lines::<DestinationRecord>(text);
        assert_eq!(rows.len(), 2);
        let (i0, r0) = &rows[0];
        assert_eq!(*i0, 0);
        assert_eq!(r0.op, Op::Enter);
        assert_eq!(r0.audience.as_deref(), Some("vip"));
        assert_eq!(r0.identities.keys().collect::<Vec<_>>(), ["phone", "email"]);
        assert_eq!(r0.traits.keys().collect::<Vec<_>>(), ["z", "first_name"]);
        assert_eq!(r0.occurred_at.as_deref(), Some("2026-11-22T10:00:00Z"));
        let (i1, r1) = &rows[1];
        assert_eq!(*i1, 1);
        assert!(r1.identities.is_empty() && r1.traits.is_empty() && r1.audience.is_none());
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].index, 2);
        assert_eq!(rejected[0].reason.code, "record_invalid");
    }

    #[test]
    fn borrowed_records_decode_as_owned_ones_do() {
        let text = concat!(
            r#"{"key":"k\"1","op":"enter","profile_id":"p1","audience":"vip","identities":{"phone":["+4670"],"email":["a@x.com","b@x.com"],"device":[]},"traits":{"z":1,"n":null,"o":{"b":[1,2.5]},"s":"caf\u00e9","z":-2},"occurred_at":"2026-11-22T10:00:00Z"}"#,
            "\n\n",
            r#"{"key":"k2","op":"upsert","profile_id":"p2","audience":null,"future_field":true}"#,
            "\n",
            r#"{"key":"k3","op":"teleport","profile_id":"p3"}"#,
            "\n",
            r#"{"key":"k4","op":"exit","profile_id":"p4","identities":{"email":"x"}}"#,
            "\n",
            r#"{"key":"k5","op":"exit","profile_id":"p5","traits":null}"#,
            "\n",
        );
        let (owned, owned_rejected) = decode_json_lines::<DestinationRecord>(text);
        let (borrowed, rejected) = decode_json_lines::<DestinationRecordRef>(text);
        assert_eq!(rejected, owned_rejected);
        assert_eq!(rejected.iter().map(|r| r.index).collect::<Vec<_>>(), [2, 3, 4]);
        let r0 = &borrowed[0].1;
        assert!(
            matches!(r0.key, Cow::Owned(_)),
            "an escaped string is unescaped into a copy"
        );
        assert!(matches!(r0.profile_id, Cow::Borrowed(_)));
        assert_eq!(r0.identities.get("email").unwrap(), ["a@x.com", "b@x.com"]);
        assert_eq!(r0.identities.get("device").unwrap().len(), 0);
        assert_eq!(r0.traits.get("z").map(TraitValue::to_value), Some(json!(-2)));
        assert!(r0.traits.get("n").is_some_and(TraitValue::is_null));
        assert_eq!(r0.traits.get("s").and_then(TraitValue::as_str), Some("café"));
        let back: Vec<(u32, DestinationRecord)> = borrowed.into_iter().map(|(i, r)| (i, r.into_owned())).collect();
        assert_eq!(back, owned);
        // Serialised, a borrowed view reads as its owned record.
        for (_, rec) in &owned {
            assert_eq!(
                serde_json::to_value(rec.borrowed()).unwrap(),
                serde_json::to_value(rec).unwrap()
            );
        }
    }

    #[test]
    fn delete_records_accept_map_and_list_identities() {
        let text = concat!(
            r#"{"key":"d1","profile_id":"p1","identities":{"email":["a@x.com","b@x.com"]}}"#,
            "\n",
            r#"{"key":"d2","profile_id":"p2","identities":[{"type":"email","value":"c@x.com"},{"type":"phone","value":"+1555"}]}"#,
            "\n",
            r#"{"key":"d3","identities":"nope"}"#,
        );
        let (rows, rejected) = decode_json_lines::<DeleteRecord>(text);
        assert_eq!(rows[0].1.identities["email"], ["a@x.com", "b@x.com"]);
        assert_eq!(rows[1].1.identities["email"], ["c@x.com"]);
        assert_eq!(rows[1].1.identities["phone"], ["+1555"]);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].index, 2);
    }

    #[test]
    fn write_ack_helpers() {
        assert_eq!(WriteAck::all(3).accepted, 3);
        let ack = WriteAck::with_rejections(
            4,
            vec![
                Rejection::new(3, ConnectorError::data("a", "b")),
                Rejection::new(1, ConnectorError::data("a", "b")),
                Rejection::new(3, ConnectorError::data("a", "dup")),
                Rejection::new(9, ConnectorError::data("a", "out of range")),
            ],
        );
        assert_eq!(ack.accepted, 2);
        assert_eq!(ack.rejected.iter().map(|r| r.index).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn destination_record_round_trips() {
        let rec = DestinationRecord {
            key: "k".into(),
            op: Op::Exit,
            profile_id: "p".into(),
            audience: Some("vip".into()),
            identities: Identities::from([("email".to_string(), vec!["a@x.com".to_string()])]),
            traits: Map::new(),
            occurred_at: None,
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert_eq!(
            text,
            r#"{"key":"k","op":"exit","profile_id":"p","audience":"vip","identities":{"email":["a@x.com"]},"traits":{}}"#
        );
        assert_eq!(serde_json::from_str::<DestinationRecord>(&text).unwrap(), rec);
    }
}
