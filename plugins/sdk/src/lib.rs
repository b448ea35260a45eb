//! # cdp-plugin-sdk
//!
//! The guest SDK for cdp connector plugins. A cdp source or destination is a
//! WebAssembly component (target `wasm32-wasip2`) that the cdp host runs in a
//! sandbox; this crate implements the `cdp:connector@0.1.0` contract
//! (`wit/connector.wit`) so a plugin only implements two small traits and
//! invokes one macro. Plugins need no `wit-bindgen` dependency of their own.
//!
//! * A **source** implements [`Source`] (spec, config check, open) and a
//!   [`SourceReader`] that hands out [`ReadEvent`]s: batches of raw records
//!   ([`Records`], one JSON object per line, fields as read) and checkpoints
//!   (opaque JSON the host persists together with the records before it and
//!   passes back to [`Source::open`] on the next run).
//!   Export it with [`export_source!`].
//! * A **destination** implements [`Destination`] and a [`DestinationWriter`]
//!   that receives typed [`DestinationRecord`]s and answers a [`WriteAck`]
//!   (accepted count plus sparse [`Rejection`]s). Export it with
//!   [`export_destination!`].
//!
//! The config arrives as JSON and is parsed into the plugin's `Config` type
//! with serde; a config that does not parse is a `config` error naming the
//! field. Failures are [`ConnectorError`]s whose [`ErrorClass`] tells the host
//! whether to retry. Logs and metrics go through [`log`], outbound HTTP
//! through [`http::send`] (only to the manifest's `allow_hosts`).
//!
//! ## A complete source
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "source-members"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! cdp-plugin-sdk = { path = "../sdk" }
//! serde = { version = "1", features = ["derive"] }
//! serde_json = "1"
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use cdp_plugin_sdk::http::{self, Request};
//! use cdp_plugin_sdk::{
//!     ConnectorError, ErrorClass, ReadEvent, Records, Source, SourceReader, Spec, capability, log,
//! };
//! use serde::Deserialize;
//! use serde_json::{Value, json};
//!
//! /// `config:` in the manifest.
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! pub struct Config {
//!     /// e.g. `https://api.example.com/members`; answers `{"items": [...], "next": "…"|null}`.
//!     url: String,
//!     token: String,
//! }
//!
//! pub struct Members;
//!
//! impl Source for Members {
//!     type Config = Config;
//!     type Reader = MembersReader;
//!
//!     fn spec() -> Spec {
//!         Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
//!             .description("Pulls members from the Example API")
//!             .config_schema(json!({
//!                 "type": "object",
//!                 "required": ["url", "token"],
//!                 "properties": {
//!                     "url": {"type": "string"},
//!                     "token": {"type": "string", "x-secret": true}
//!                 }
//!             }))
//!             .capability(capability::HTTP)
//!             .capability(capability::INCREMENTAL)
//!     }
//!
//!     fn check(cfg: &Config) -> Result<(), ConnectorError> {
//!         if !cfg.url.starts_with("https://") {
//!             return Err(ConnectorError::config("url_not_https", "url must start with https://"));
//!         }
//!         Ok(())
//!     }
//!
//!     fn open(cfg: Config, state: Option<Value>) -> Result<MembersReader, ConnectorError> {
//!         // Resume where the last persisted checkpoint left off.
//!         let next = match state {
//!             Some(s) => s["next"].as_str().map(str::to_string),
//!             None => Some(cfg.url.clone()),
//!         };
//!         Ok(MembersReader { cfg, next })
//!     }
//! }
//!
//! pub struct MembersReader {
//!     cfg: Config,
//!     /// The next page to fetch; `None` when done.
//!     next: Option<String>,
//! }
//!
//! impl SourceReader for MembersReader {
//!     fn next(&mut self, _max: u32) -> Result<Vec<ReadEvent>, ConnectorError> {
//!         let Some(url) = self.next.take() else {
//!             return Ok(Vec::new()); // an empty list means done
//!         };
//!         let resp = http::send(
//!             Request::get(&url).header("Authorization", format!("Bearer {}", self.cfg.token)),
//!         )?;
//!         resp.error_for_status(ErrorClass::Config)?; // 429, 5xx, 401, 403 handled too
//!         let page: Value = resp.json()?;
//!         let mut records = Records::new();
//!         for item in page["items"].as_array().into_iter().flatten() {
//!             records.push(item)?;
//!         }
//!         log::debug!("{url}: {} members", records.len());
//!         self.next = page["next"].as_str().map(str::to_string);
//!         Ok(vec![
//!             ReadEvent::records(records),
//!             ReadEvent::checkpoint(json!({ "next": self.next })),
//!         ])
//!     }
//! }
//!
//! cdp_plugin_sdk::export_source!(Members);
//! ```
//!
//! ## A complete destination
//!
//! ```
//! use cdp_plugin_sdk::http::{self, Request};
//! use cdp_plugin_sdk::{
//!     ConnectorError, Destination, DestinationRecord, DestinationWriter, ErrorClass, Spec, WriteAck,
//!     capability,
//! };
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! #[derive(Deserialize)]
//! pub struct Config {
//!     url: String,
//! }
//!
//! pub struct Crm;
//!
//! impl Destination for Crm {
//!     type Config = Config;
//!     type Writer = CrmWriter;
//!
//!     fn spec() -> Spec {
//!         Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
//!             .description("Upserts profiles into the Example CRM")
//!             .config_schema(json!({"type": "object", "required": ["url"],
//!                                   "properties": {"url": {"type": "string"}}}))
//!             .capability(capability::HTTP)
//!     }
//!
//!     fn check(_cfg: &Config) -> Result<(), ConnectorError> {
//!         Ok(())
//!     }
//!
//!     fn open(cfg: Config) -> Result<CrmWriter, ConnectorError> {
//!         Ok(CrmWriter { cfg })
//!     }
//! }
//!
//! pub struct CrmWriter {
//!     cfg: Config,
//! }
//!
//! impl DestinationWriter for CrmWriter {
//!     fn write(&mut self, batch: Vec<DestinationRecord>) -> Result<WriteAck, ConnectorError> {
//!         let resp = http::send(Request::post(&self.cfg.url).json(&json!({ "records": batch }))?)?;
//!         resp.error_for_status(ErrorClass::Data)?;
//!         Ok(WriteAck::all(batch.len()))
//!     }
//!
//!     fn flush(&mut self) -> Result<(), ConnectorError> {
//!         Ok(()) // every write is already durable at the CRM
//!     }
//!     // `delete` defaults to an `unsupported` error.
//! }
//!
//! cdp_plugin_sdk::export_destination!(Crm);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the component
//! is `target/wasm32-wasip2/release/<crate_name>.wasm`.
//!
//! ## Testing natively
//!
//! Everything except the export layer compiles on the host target, so plugin
//! logic is tested with plain `cargo test`. Without a host, [`log`] messages
//! are kept per thread and [`http::send`] calls a handler installed with
//! [`testing::mock_http`]; [`testing`] also drives a plugin through the
//! JSON-level path the host uses (`testing::open_source::<Members>(config,
//! state)`, `testing::write(&mut writer, ndjson)`).

#![warn(missing_docs)]

mod bindings;
mod config;
mod error;
#[doc(hidden)]
pub mod export;
mod glue;
pub mod hash;
pub mod http;
pub mod log;
mod records;
mod spec;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use config::parse_config;
pub use error::{ConnectorError, ErrorClass};
pub use records::{
    DeleteRecord, DestinationRecord, DestinationRecordRef, Identities, IdentitiesRef, Op, ReadEvent, Records,
    Rejection, TraitValue, TraitsRef, WriteAck, decode_json_lines,
};
pub use serde_json;
pub use spec::{PROTOCOL_VERSION, Spec, capability};

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A source connector: describes itself, checks a config and opens readers.
pub trait Source: 'static {
    /// The plugin's config, parsed from the manifest entry's `config:`.
    type Config: DeserializeOwned;
    /// The reader [`Source::open`] returns.
    type Reader: SourceReader;

    /// Name, version, description, config schema and capabilities.
    fn spec() -> Spec;

    /// Validates a config without reading anything (`cdp plugin test`,
    /// manifest validation). Cheap checks only.
    fn check(config: &Self::Config) -> Result<(), ConnectorError>;

    /// Starts reading; `state` is the last checkpoint the host persisted, or
    /// `None` on the first run.
    fn open(config: Self::Config, state: Option<Value>) -> Result<Self::Reader, ConnectorError>;
}

/// An open read of a source.
pub trait SourceReader: 'static {
    /// Up to `max` records and any checkpoints, in order. An empty list means
    /// done (batch sources) or idle (streaming sources).
    ///
    /// A checkpoint covers every record emitted before it; emit one after
    /// each batch you can resume from.
    fn next(&mut self, max: u32) -> Result<Vec<ReadEvent>, ConnectorError>;

    /// Streaming sources: the host made `checkpoint` durable; commit it
    /// upstream (e.g. acknowledge messages). Batch sources ignore it.
    fn ack(&mut self, checkpoint: Value) {
        let _ = checkpoint;
    }
}

/// A destination connector: describes itself, checks a config and opens
/// writers.
pub trait Destination: 'static {
    /// The plugin's config, parsed from the manifest entry's `config:`.
    type Config: DeserializeOwned;
    /// The writer [`Destination::open`] returns.
    type Writer: DestinationWriter;

    /// Name, version, description, config schema and capabilities.
    fn spec() -> Spec;

    /// Validates a config without writing anything. Cheap checks only.
    fn check(config: &Self::Config) -> Result<(), ConnectorError>;

    /// Opens a writer.
    fn open(config: Self::Config) -> Result<Self::Writer, ConnectorError>;
}

/// An open writer of a destination.
pub trait DestinationWriter: 'static {
    /// Delivers a batch. Refuse single records with [`Rejection`]s in the ack
    /// (indexes into `batch`); fail the whole call only when nothing was
    /// delivered. Records are delivered with an idempotency `key`; the host
    /// may send the same batch again after a retryable error.
    fn write(&mut self, batch: Vec<DestinationRecord>) -> Result<WriteAck, ConnectorError>;

    /// Delivers a batch of records borrowed from the batch text; the SDK
    /// calls this for every batch. The default makes the records owned (a
    /// copy of each string, nothing parsed twice) and calls
    /// [`DestinationWriter::write`]. Override it when the copies matter, as
    /// a file or bulk exporter's do; `write` then only serves direct calls
    /// (typically delegating with [`DestinationRecord::borrowed`]).
    fn write_ref(&mut self, batch: Vec<DestinationRecordRef<'_>>) -> Result<WriteAck, ConnectorError> {
        self.write(batch.into_iter().map(DestinationRecordRef::into_owned).collect())
    }

    /// Makes everything accepted so far durable.
    fn flush(&mut self) -> Result<(), ConnectorError>;

    /// Erasure: forget these people. Destinations that implement it list the
    /// `delete` capability; the default answers `unsupported`.
    fn delete(&mut self, batch: Vec<DeleteRecord>) -> Result<WriteAck, ConnectorError> {
        let _ = batch;
        Err(ConnectorError::unsupported(
            "delete_unsupported",
            "this destination does not implement erasure",
        ))
    }
}

/// Exports a [`Source`] implementation as the plugin's `source` interface.
///
/// Invoke it once, at the crate root of a `cdylib` crate. It expands to
/// nothing outside wasm32, so the crate still builds and tests natively.
#[macro_export]
macro_rules! export_source {
    ($source:ty) => {
        #[doc(hidden)]
        #[allow(non_camel_case_types, dead_code)]
        type __cdp_plugin_sdk_source_export = $crate::export::SourceExport<$source>;
        #[cfg(target_arch = "wasm32")]
        $crate::__private::source_world::__export_source_world!(
            __cdp_plugin_sdk_source_export with_types_in $crate::__private::source_world
        );
    };
}

/// Exports a [`Destination`] implementation as the plugin's `destination`
/// interface.
///
/// Invoke it once, at the crate root of a `cdylib` crate. It expands to
/// nothing outside wasm32, so the crate still builds and tests natively.
#[macro_export]
macro_rules! export_destination {
    ($destination:ty) => {
        #[doc(hidden)]
        #[allow(non_camel_case_types, dead_code)]
        type __cdp_plugin_sdk_destination_export = $crate::export::DestinationExport<$destination>;
        #[cfg(target_arch = "wasm32")]
        $crate::__private::destination_world::__export_destination_world!(
            __cdp_plugin_sdk_destination_export with_types_in $crate::__private::destination_world
        );
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::{destination_world, source_world};
}
