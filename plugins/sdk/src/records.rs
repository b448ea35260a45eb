//! Records crossing the boundary: JSON Lines batches, the typed destination
//! records and write acknowledgements.

use indexmap::IndexMap;
use serde::de::{self, DeserializeOwned, Deserializer};
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
pub fn decode_json_lines<T: DeserializeOwned>(ndjson: &str) -> (Vec<(u32, T)>, Vec<Rejection>) {
    let mut rows = Vec::new();
    let mut rejected = Vec::new();
    let lines = ndjson.lines().filter(|l| !l.trim().is_empty());
    for (index, line) in lines.enumerate() {
        match serde_json::from_str::<T>(line) {
            Ok(row) => rows.push((u32::try_from(index).unwrap_or(u32::MAX), row)),
            Err(e) => rejected.push(Rejection::new(
                index,
                ConnectorError::data("record_invalid", format!("record {index} does not decode: {e}")),
            )),
        }
    }
    (rows, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
