//! The wasm-facing half of the export layer: implementations of the
//! generated `Guest` traits for any [`Source`] or [`Destination`], used by
//! [`crate::export_source!`] and [`crate::export_destination!`].

use std::cell::RefCell;
use std::marker::PhantomData;

use crate::bindings::destination_world::exports::cdp::connector::destination as wdest;
use crate::bindings::source_world::exports::cdp::connector::source as wsource;
use crate::bindings::types as wit;
use crate::error::{ConnectorError, ErrorClass};
use crate::records::{ReadEvent, WriteAck};
use crate::spec::Spec;
use crate::{Destination, DestinationWriter, Source, SourceReader, glue};

pub(crate) fn error_to_wit(e: ConnectorError) -> wit::ConnectorError {
    wit::ConnectorError {
        class: match e.class {
            ErrorClass::Config => wit::ErrorClass::Config,
            ErrorClass::Auth => wit::ErrorClass::Auth,
            ErrorClass::Permission => wit::ErrorClass::Permission,
            ErrorClass::RateLimited => wit::ErrorClass::RateLimited,
            ErrorClass::Transient => wit::ErrorClass::Transient,
            ErrorClass::Data => wit::ErrorClass::Data,
            ErrorClass::Unsupported => wit::ErrorClass::Unsupported,
            ErrorClass::Internal => wit::ErrorClass::Internal,
        },
        retryable: e.retryable,
        retry_after_ms: e.retry_after_ms,
        code: e.code,
        message: e.message,
    }
}

pub(crate) fn spec_to_wit(spec: Spec) -> wit::ConnectorSpec {
    wit::ConnectorSpec {
        protocol: spec.protocol().to_string(),
        name: spec.name,
        version: spec.version,
        description: spec.description,
        config_schema: spec.config_schema.to_string(),
        capabilities: spec.capabilities,
    }
}

pub(crate) fn event_to_wit(event: ReadEvent) -> wit::ReadEvent {
    match event {
        ReadEvent::Records(records) => wit::ReadEvent::Records(wit::Batch {
            records: records.len(),
            ndjson: records.into_ndjson(),
        }),
        ReadEvent::Checkpoint(state) => wit::ReadEvent::Checkpoint(state.to_string()),
    }
}

pub(crate) fn ack_to_wit(ack: WriteAck) -> wit::WriteAck {
    wit::WriteAck {
        accepted: ack.accepted,
        rejected: ack
            .rejected
            .into_iter()
            .map(|r| wit::Rejected {
                index: r.index,
                reason: error_to_wit(r.reason),
            })
            .collect(),
    }
}

/// Exports a [`Source`] as the `cdp:connector/source` interface.
#[doc(hidden)]
pub struct SourceExport<S>(PhantomData<S>);

/// The exported `reader` resource of a [`SourceExport`].
#[doc(hidden)]
pub struct ReaderExport<S: Source>(RefCell<S::Reader>);

impl<S: Source> wsource::Guest for SourceExport<S> {
    type Reader = ReaderExport<S>;

    fn spec() -> wit::ConnectorSpec {
        spec_to_wit(S::spec())
    }

    fn check(config: String) -> Result<(), wit::ConnectorError> {
        glue::source_check::<S>(&config).map_err(error_to_wit)
    }
}

impl<S: Source> wsource::GuestReader for ReaderExport<S> {
    fn open(config: String, state: Option<String>) -> Result<wsource::Reader, wit::ConnectorError> {
        let reader = glue::source_open::<S>(&config, state.as_deref()).map_err(error_to_wit)?;
        Ok(wsource::Reader::new(ReaderExport::<S>(RefCell::new(reader))))
    }

    fn next(&self, max_records: u32) -> Result<Vec<wit::ReadEvent>, wit::ConnectorError> {
        let events = self.0.borrow_mut().next(max_records).map_err(error_to_wit)?;
        Ok(events.into_iter().map(event_to_wit).collect())
    }

    fn ack(&self, checkpoint: String) {
        glue::source_ack(&mut *self.0.borrow_mut(), &checkpoint);
    }
}

/// Exports a [`Destination`] as the `cdp:connector/destination` interface.
#[doc(hidden)]
pub struct DestinationExport<D>(PhantomData<D>);

/// The exported `writer` resource of a [`DestinationExport`].
#[doc(hidden)]
pub struct WriterExport<D: Destination>(RefCell<D::Writer>);

impl<D: Destination> wdest::Guest for DestinationExport<D> {
    type Writer = WriterExport<D>;

    fn spec() -> wit::ConnectorSpec {
        spec_to_wit(D::spec())
    }

    fn check(config: String) -> Result<(), wit::ConnectorError> {
        glue::destination_check::<D>(&config).map_err(error_to_wit)
    }
}

impl<D: Destination> wdest::GuestWriter for WriterExport<D> {
    fn open(config: String) -> Result<wdest::Writer, wit::ConnectorError> {
        let writer = glue::destination_open::<D>(&config).map_err(error_to_wit)?;
        Ok(wdest::Writer::new(WriterExport::<D>(RefCell::new(writer))))
    }

    fn write(&self, batch: wit::Batch) -> Result<wit::WriteAck, wit::ConnectorError> {
        let mut writer = self.0.borrow_mut();
        glue::destination_write(&mut *writer, &batch.ndjson)
            .map(ack_to_wit)
            .map_err(error_to_wit)
    }

    fn flush(&self) -> Result<(), wit::ConnectorError> {
        self.0.borrow_mut().flush().map_err(error_to_wit)
    }

    fn delete(&self, identities: wit::Batch) -> Result<wit::WriteAck, wit::ConnectorError> {
        let mut writer = self.0.borrow_mut();
        glue::destination_delete(&mut *writer, &identities.ndjson)
            .map(ack_to_wit)
            .map_err(error_to_wit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Records, Rejection};
    use crate::spec::capability;
    use serde_json::json;

    #[test]
    fn conversions_carry_every_field() {
        let e = error_to_wit(ConnectorError::rate_limited(Some(250), "http_status_429", "slow down"));
        assert_eq!(e.class, wit::ErrorClass::RateLimited);
        assert!(e.retryable);
        assert_eq!(e.retry_after_ms, Some(250));
        assert_eq!((e.code.as_str(), e.message.as_str()), ("http_status_429", "slow down"));

        let s = spec_to_wit(
            Spec::new("source-x", "1.0.0")
                .description("d")
                .config_schema(json!({"type": "object"}))
                .capability(capability::HTTP),
        );
        assert_eq!(s.protocol, "0.1.0");
        assert_eq!(s.config_schema, r#"{"type":"object"}"#);
        assert_eq!(s.capabilities, ["http"]);

        let mut records = Records::new();
        records.push(&json!({"a": 1})).unwrap();
        match event_to_wit(ReadEvent::records(records)) {
            wit::ReadEvent::Records(b) => assert_eq!((b.records, b.ndjson.as_str()), (1, "{\"a\":1}\n")),
            wit::ReadEvent::Checkpoint(_) => panic!("expected records"),
        }
        match event_to_wit(ReadEvent::checkpoint(json!({"offset": 10}))) {
            wit::ReadEvent::Checkpoint(c) => assert_eq!(c, r#"{"offset":10}"#),
            wit::ReadEvent::Records(_) => panic!("expected a checkpoint"),
        }

        let ack = ack_to_wit(WriteAck::with_rejections(
            3,
            vec![Rejection::new(2, ConnectorError::data("bad_email", "no @"))],
        ));
        assert_eq!(ack.accepted, 2);
        assert_eq!(ack.rejected[0].index, 2);
        assert_eq!(ack.rejected[0].reason.class, wit::ErrorClass::Data);
    }
}
