//! Native test support (not built for wasm32).
//!
//! On a native target there is no host: log messages and metrics are kept per
//! thread, and [`crate::http::send`] calls the handler installed with
//! [`mock_http`]. The `*_source`/`*_destination` helpers drive a plugin
//! through the same JSON-level path the wasm export uses, so config parsing,
//! state handling and batch decoding are tested as the host will exercise
//! them.
//!
//! ```
//! use cdp_plugin_sdk::{http::Response, testing};
//!
//! testing::mock_http(|req| {
//!     assert_eq!(req.method, "GET");
//!     Ok(Response::new(200).with_body(r#"{"items": []}"#))
//! });
//! let resp = cdp_plugin_sdk::http::Request::get("https://api.example.com/x").send().unwrap();
//! assert_eq!(resp.status, 200);
//! testing::clear_http_mock();
//! ```

use std::cell::RefCell;

use serde_json::Value;

use crate::error::ConnectorError;
use crate::http::{HttpError, HttpErrorKind, Request, Response};
use crate::log::Level;
use crate::records::{ReadEvent, WriteAck};
use crate::{Destination, Source, SourceReader, glue};

type Handler = Box<dyn FnMut(&Request) -> Result<Response, HttpError>>;

thread_local! {
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    static METRICS: RefCell<Vec<(String, f64)>> = const { RefCell::new(Vec::new()) };
    static HTTP: RefCell<Option<Handler>> = const { RefCell::new(None) };
}

pub(crate) fn record_log(level: Level, message: &str) {
    eprintln!("[{}] {message}", level.as_str());
    LOGS.with(|l| l.borrow_mut().push((level, message.to_string())));
}

pub(crate) fn record_metric(name: &str, value: f64) {
    METRICS.with(|m| m.borrow_mut().push((name.to_string(), value)));
}

pub(crate) fn mocked_send(request: Request) -> Result<Response, HttpError> {
    HTTP.with(|h| match h.borrow_mut().as_mut() {
        Some(handler) => handler(&request),
        None => Err(HttpError {
            kind: HttpErrorKind::Other,
            message: "no cdp host: install a handler with testing::mock_http".to_string(),
        }),
    })
}

/// Takes the log messages this thread recorded so far.
pub fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// Takes the metric samples this thread recorded so far.
pub fn take_metrics() -> Vec<(String, f64)> {
    METRICS.with(|m| std::mem::take(&mut *m.borrow_mut()))
}

/// Answers this thread's HTTP requests with `handler`.
pub fn mock_http<F>(handler: F)
where
    F: FnMut(&Request) -> Result<Response, HttpError> + 'static,
{
    HTTP.with(|h| *h.borrow_mut() = Some(Box::new(handler)));
}

/// Removes this thread's HTTP handler.
pub fn clear_http_mock() {
    HTTP.with(|h| *h.borrow_mut() = None);
}

/// `check` as the host calls it: config given as JSON text.
pub fn check_source<S: Source>(config: &str) -> Result<(), ConnectorError> {
    glue::source_check::<S>(config)
}

/// `open` as the host calls it: config and state given as JSON text.
pub fn open_source<S: Source>(config: &str, state: Option<&str>) -> Result<S::Reader, ConnectorError> {
    glue::source_open::<S>(config, state)
}

/// Calls `next(max)` until it returns no event, returning every event.
///
/// Fails with an `internal` error after 100 000 calls, so a reader that never
/// finishes cannot hang a test.
pub fn read_to_end<R: SourceReader>(reader: &mut R, max: u32) -> Result<Vec<ReadEvent>, ConnectorError> {
    let mut events = Vec::new();
    for _ in 0..100_000 {
        let batch = reader.next(max)?;
        if batch.is_empty() {
            return Ok(events);
        }
        events.extend(batch);
    }
    Err(ConnectorError::internal(
        "reader_never_done",
        "next() kept returning events",
    ))
}

/// The records of `events` as JSON values, in order.
pub fn records_of(events: &[ReadEvent]) -> Vec<Value> {
    events
        .iter()
        .filter_map(|e| match e {
            ReadEvent::Records(r) => Some(r),
            ReadEvent::Checkpoint(_) => None,
        })
        .flat_map(|r| {
            r.as_str()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("records hold JSON lines"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The checkpoints of `events`, in order.
pub fn checkpoints_of(events: &[ReadEvent]) -> Vec<Value> {
    events
        .iter()
        .filter_map(|e| match e {
            ReadEvent::Checkpoint(c) => Some(c.clone()),
            ReadEvent::Records(_) => None,
        })
        .collect()
}

/// `check` as the host calls it: config given as JSON text.
pub fn check_destination<D: Destination>(config: &str) -> Result<(), ConnectorError> {
    glue::destination_check::<D>(config)
}

/// `open` as the host calls it: config given as JSON text.
pub fn open_destination<D: Destination>(config: &str) -> Result<D::Writer, ConnectorError> {
    glue::destination_open::<D>(config)
}

/// `write` as the host calls it: the batch given as JSON Lines text.
pub fn write<W: crate::DestinationWriter>(writer: &mut W, ndjson: &str) -> Result<WriteAck, ConnectorError> {
    glue::destination_write(writer, ndjson)
}

/// `delete` as the host calls it: the batch given as JSON Lines text.
pub fn delete<W: crate::DestinationWriter>(writer: &mut W, ndjson: &str) -> Result<WriteAck, ConnectorError> {
    glue::destination_delete(writer, ndjson)
}
