//! The JSON-level half of the export layer, independent of the target:
//! config and state parsing, batch decoding and index remapping.

use serde_json::Value;

use crate::config::parse_config;
use crate::error::ConnectorError;
use crate::records::{DeleteRecord, DestinationRecordRef, Rejection, WriteAck};
use crate::{Destination, DestinationWriter, Source, SourceReader};

pub(crate) fn source_check<S: Source>(config: &str) -> Result<(), ConnectorError> {
    let config = parse_config::<S::Config>(config)?;
    S::check(&config)
}

pub(crate) fn parse_state(state: Option<&str>) -> Result<Option<Value>, ConnectorError> {
    let Some(text) = state else { return Ok(None) };
    if text.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Null) => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(e) => Err(ConnectorError::internal(
            "invalid_state",
            format!("the persisted checkpoint is not JSON: {e}"),
        )),
    }
}

pub(crate) fn source_open<S: Source>(config: &str, state: Option<&str>) -> Result<S::Reader, ConnectorError> {
    let config = parse_config::<S::Config>(config)?;
    let state = parse_state(state)?;
    S::open(config, state)
}

pub(crate) fn source_ack<R: SourceReader>(reader: &mut R, checkpoint: &str) {
    match serde_json::from_str::<Value>(checkpoint) {
        Ok(v) => reader.ack(v),
        Err(e) => crate::log::warn!("ack with a checkpoint that is not JSON ignored: {e}"),
    }
}

pub(crate) fn destination_check<D: Destination>(config: &str) -> Result<(), ConnectorError> {
    let config = parse_config::<D::Config>(config)?;
    D::check(&config)
}

pub(crate) fn destination_open<D: Destination>(config: &str) -> Result<D::Writer, ConnectorError> {
    let config = parse_config::<D::Config>(config)?;
    D::open(config)
}

/// Decodes the batch, hands the decodable rows to `op`, and maps the indexes
/// of its rejections back to line indexes of the original batch.
fn dispatch<'a, T, F>(ndjson: &'a str, op: F) -> Result<WriteAck, ConnectorError>
where
    T: serde::Deserialize<'a>,
    F: FnOnce(Vec<T>) -> Result<WriteAck, ConnectorError>,
{
    let mut rows = Vec::new();
    let mut positions = Vec::new();
    let mut rejected = crate::records::decode_each(ndjson, |index, row| {
        rows.push(row);
        positions.push(index);
    });
    if rows.is_empty() {
        return Ok(WriteAck { accepted: 0, rejected });
    }
    let ack = op(rows)?;
    for r in ack.rejected {
        match positions.get(r.index as usize) {
            Some(&line) => rejected.push(Rejection {
                index: line,
                reason: r.reason,
            }),
            None => crate::log::warn!(
                "the plugin rejected record {} of a batch of {}; ignored",
                r.index,
                positions.len()
            ),
        }
    }
    rejected.sort_by_key(|r| r.index);
    Ok(WriteAck {
        accepted: ack.accepted,
        rejected,
    })
}

pub(crate) fn destination_write<W: DestinationWriter>(
    writer: &mut W,
    ndjson: &str,
) -> Result<WriteAck, ConnectorError> {
    dispatch::<DestinationRecordRef, _>(ndjson, |rows| writer.write_ref(rows))
}

pub(crate) fn destination_delete<W: DestinationWriter>(
    writer: &mut W,
    ndjson: &str,
) -> Result<WriteAck, ConnectorError> {
    dispatch::<DeleteRecord, _>(ndjson, |rows| writer.delete(rows))
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::records::{DestinationRecord, ReadEvent, Records};
    use crate::{ErrorClass, Spec, testing};
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Deserialize)]
    struct Cfg {
        rows: u32,
    }
    struct Counter;
    #[derive(Debug)]
    struct CounterReader {
        next: u32,
        end: u32,
        acked: Vec<Value>,
    }
    impl Source for Counter {
        type Config = Cfg;
        type Reader = CounterReader;
        fn spec() -> Spec {
            Spec::new("counter", "0.0.1")
        }
        fn check(cfg: &Cfg) -> Result<(), ConnectorError> {
            if cfg.rows == 0 {
                return Err(ConnectorError::config("no_rows", "rows must be > 0"));
            }
            Ok(())
        }
        fn open(cfg: Cfg, state: Option<Value>) -> Result<CounterReader, ConnectorError> {
            let next = state.and_then(|s| s["next"].as_u64()).unwrap_or(0) as u32;
            Ok(CounterReader {
                next,
                end: cfg.rows,
                acked: Vec::new(),
            })
        }
    }
    impl SourceReader for CounterReader {
        fn next(&mut self, max: u32) -> Result<Vec<ReadEvent>, ConnectorError> {
            if self.next >= self.end {
                return Ok(Vec::new());
            }
            let mut records = Records::new();
            while self.next < self.end && records.len() < max {
                records.push(&json!({"n": self.next}))?;
                self.next += 1;
            }
            Ok(vec![
                ReadEvent::records(records),
                ReadEvent::checkpoint(json!({"next": self.next})),
            ])
        }
        fn ack(&mut self, checkpoint: Value) {
            self.acked.push(checkpoint);
        }
    }

    #[test]
    fn source_path_parses_config_and_state() {
        assert_eq!(
            testing::check_source::<Counter>(r#"{"rows": 0}"#).unwrap_err().code,
            "no_rows"
        );
        let e = testing::check_source::<Counter>(r#"{"rows": "x"}"#).unwrap_err();
        assert_eq!(e.class, ErrorClass::Config);
        assert!(e.message.contains("rows"));

        let mut r = testing::open_source::<Counter>(r#"{"rows": 5}"#, Some(r#"{"next": 3}"#)).unwrap();
        let events = testing::read_to_end(&mut r, 10).unwrap();
        assert_eq!(testing::records_of(&events), [json!({"n": 3}), json!({"n": 4})]);
        assert_eq!(testing::checkpoints_of(&events), [json!({"next": 5})]);
        source_ack(&mut r, r#"{"next": 5}"#);
        source_ack(&mut r, "not json");
        assert_eq!(r.acked, [json!({"next": 5})]);

        let e = testing::open_source::<Counter>(r#"{"rows": 5}"#, Some("{")).unwrap_err();
        assert_eq!(e.code, "invalid_state");
        assert!(testing::open_source::<Counter>(r#"{"rows": 5}"#, Some("null")).is_ok());
    }

    struct Sink;
    struct SinkWriter {
        seen: Vec<String>,
    }
    impl Destination for Sink {
        type Config = Value;
        type Writer = SinkWriter;
        fn spec() -> Spec {
            Spec::new("sink", "0.0.1")
        }
        fn check(_: &Value) -> Result<(), ConnectorError> {
            Ok(())
        }
        fn open(_: Value) -> Result<SinkWriter, ConnectorError> {
            Ok(SinkWriter { seen: Vec::new() })
        }
    }
    impl DestinationWriter for SinkWriter {
        fn write(&mut self, batch: Vec<DestinationRecord>) -> Result<WriteAck, ConnectorError> {
            let total = batch.len();
            let rejected = batch
                .iter()
                .enumerate()
                .filter(|(_, r)| r.profile_id == "bad")
                .map(|(i, _)| Rejection::new(i, ConnectorError::data("bad", "bad profile")))
                .collect();
            self.seen.extend(batch.into_iter().map(|r| r.key));
            Ok(WriteAck::with_rejections(total, rejected))
        }
        fn flush(&mut self) -> Result<(), ConnectorError> {
            Ok(())
        }
    }

    #[test]
    fn destination_path_remaps_rejections_to_batch_lines() {
        let mut w = testing::open_destination::<Sink>("{}").unwrap();
        let batch = [
            r#"{"key":"a","op":"upsert","profile_id":"p"}"#,
            r#"{"key":"b","op":"nope","profile_id":"p"}"#,
            r#"{"key":"c","op":"upsert","profile_id":"bad"}"#,
            r#"{"key":"d","op":"exit","profile_id":"p","audience":"vip"}"#,
        ]
        .join("\n");
        let ack = testing::write(&mut w, &batch).unwrap();
        assert_eq!(w.seen, ["a", "c", "d"]);
        assert_eq!(ack.accepted, 2);
        let idx: Vec<_> = ack.rejected.iter().map(|r| (r.index, r.reason.code.as_str())).collect();
        assert_eq!(idx, [(1, "record_invalid"), (2, "bad")]);

        let ack = testing::write(&mut w, "garbage\n").unwrap();
        assert_eq!((ack.accepted, ack.rejected.len()), (0, 1));

        let e = testing::delete(&mut w, r#"{"key":"x","profile_id":"p","identities":{}}"#).unwrap_err();
        assert_eq!(e.class, ErrorClass::Unsupported);
        assert!(testing::check_destination::<Sink>("").is_ok());
    }
}
