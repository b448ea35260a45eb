//! # dest-file
//!
//! A cdp destination connector that appends audience members to a
//! customer-list file inside a writable mount, in the shape ad platforms'
//! customer-list uploads take (Meta custom audiences, Google Customer
//! Match): identifiers normalised and SHA-256 hashed, one row per member,
//! with the operation so an uploader can add `enter`/`upsert` rows and
//! remove `exit` rows.
//!
//! ```yaml
//! destinations:
//!   vip_list:
//!     plugin: file
//!     audience: vip
//!     config:
//!       path: /output/vip.csv
//!       format: csv                # or jsonl
//!       hash_identifiers: true     # default
//!       identities: [email, phone] # default
//!       fields: [country]
//!     mount: { "exports": /output }
//! ```
//!
//! ## Rows
//!
//! * `csv`: header `key,op,audience,<identities…>,<fields…>` written when
//!   the file is empty; an existing file must have that same header (else a
//!   `config` error, so two configs never mix in one file). A field named
//!   like an identity or fixed column is written as `trait.<name>`. A
//!   profile with several values of an identity type gives one row per
//!   value (row *i* has the *i*-th email and the *i*-th phone). RFC 4180
//!   quoting, CRLF line ends.
//! * `jsonl`: one line per record: `{"key", "op", "audience", "identities":
//!   {"email": [...], ...}, "traits": {<fields>}}`.
//! * Only the identity types in `identities` are written; `email` and
//!   `phone` are normalised first (see [`normalize`] for the exact rules,
//!   which follow Meta's: emails trimmed and lower-cased with Gmail dots
//!   kept; phones as E.164 digits without `+`), other types trimmed. With
//!   `hash_identifiers` every written identifier is the lower-case hex
//!   SHA-256 of its normalised value. Values that do not normalise are
//!   dropped with a warning; a record left with no identifier is rejected
//!   as a `data` error.
//! * Traits in `fields` are written as they are (strings raw, other JSON
//!   values as JSON text); list none that the platform wants hashed.
//!
//! Every `write` appends its rows with one write call; `flush` calls
//! `sync_all`. A file whose last row was cut short (no final line break) gets
//! a line break before the next rows.

pub mod normalize;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use cdp_plugin_sdk::{
    ConnectorError, Destination, DestinationRecord, DestinationWriter, Rejection, Spec, WriteAck, capability, log,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use normalize::{normalize_email, normalize_phone, sha256_hex};

/// The file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// CSV with a header row.
    #[default]
    Csv,
    /// JSON Lines.
    Jsonl,
}

/// The `config:` of a file destination.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// File path inside a writable mount, e.g. `/output/vip.csv`.
    pub path: String,
    /// `csv` (default) or `jsonl`.
    #[serde(default)]
    pub format: Format,
    /// Hash identifiers with SHA-256 (default `true`).
    #[serde(default = "default_true")]
    pub hash_identifiers: bool,
    /// Identity types to write, in column order (default `email`, `phone`).
    #[serde(default = "default_identities")]
    pub identities: Vec<String>,
    /// Traits to write, in column order.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Country calling code (digits, e.g. `46`) for phone numbers written
    /// without one.
    #[serde(default)]
    pub default_country_code: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_identities() -> Vec<String> {
    vec!["email".to_string(), "phone".to_string()]
}

impl Config {
    /// Checks the config without touching the file.
    pub fn validate(&self) -> Result<(), ConnectorError> {
        if self.path.trim().is_empty() || self.path.ends_with('/') {
            return Err(ConnectorError::config("invalid_path", "config.path: must name a file"));
        }
        if self.identities.is_empty() {
            return Err(ConnectorError::config(
                "missing_identities",
                "config.identities: list at least one identity type",
            ));
        }
        if let Some(cc) = &self.default_country_code {
            let ok = (1..=3).contains(&cc.len()) && cc.bytes().all(|b| b.is_ascii_digit()) && !cc.starts_with('0');
            if !ok {
                return Err(ConnectorError::config(
                    "invalid_country_code",
                    format!("config.default_country_code: 1 to 3 digits without + or leading 0, got {cc:?}"),
                ));
            }
        }
        for (list, what) in [(&self.identities, "identities"), (&self.fields, "fields")] {
            let mut seen = std::collections::HashSet::new();
            for name in list {
                if name.is_empty() {
                    return Err(ConnectorError::config(
                        "empty_column",
                        format!("config.{what}: names must not be empty"),
                    ));
                }
                if !seen.insert(name) {
                    return Err(ConnectorError::config(
                        "duplicate_column",
                        format!("config.{what}: {name:?} is listed twice"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The CSV header.
    pub fn header(&self) -> Vec<String> {
        let mut header: Vec<String> = ["key", "op", "audience"].map(String::from).to_vec();
        header.extend(self.identities.iter().cloned());
        for f in &self.fields {
            if header.contains(f) {
                header.push(format!("trait.{f}"));
            } else {
                header.push(f.clone());
            }
        }
        header
    }
}

/// The JSON Schema of [`Config`].
pub fn config_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": false,
        "required": ["path"],
        "properties": {
            "path": {"type": "string", "description": "File inside a writable mount, e.g. /output/vip.csv"},
            "format": {"enum": ["csv", "jsonl"], "default": "csv"},
            "hash_identifiers": {"type": "boolean", "default": true},
            "identities": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "default": ["email", "phone"]},
            "fields": {"type": "array", "items": {"type": "string", "minLength": 1}, "default": []},
            "default_country_code": {"type": "string", "pattern": "^[1-9][0-9]{0,2}$"}
        }
    })
}

fn io_error(path: &str, e: &io::Error) -> ConnectorError {
    match e.kind() {
        io::ErrorKind::NotFound => ConnectorError::config(
            "path_not_found",
            format!("{path}: directory not found (is it inside a writable mount?)"),
        ),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            ConnectorError::permission("file_permission", format!("{path}: not writable"))
        }
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            ConnectorError::transient("disk_full", format!("{path}: {e}"))
        }
        _ => ConnectorError::transient("file_io", format!("{path}: {e}")),
    }
}

/// The file destination.
pub struct FileDestination;

impl Destination for FileDestination {
    type Config = Config;
    type Writer = FileWriter;

    fn spec() -> Spec {
        Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
            .description("Customer-list files (CSV or JSON Lines) with normalised, SHA-256 hashed identifiers")
            .config_schema(config_schema())
            .capability(capability::MOUNT)
    }

    fn check(config: &Config) -> Result<(), ConnectorError> {
        config.validate()
    }

    fn open(config: Config) -> Result<FileWriter, ConnectorError> {
        FileWriter::open(config)
    }
}

/// An open customer-list file.
#[derive(Debug)]
pub struct FileWriter {
    cfg: Config,
    file: File,
}

impl FileWriter {
    /// Opens (creating it and its directory if needed) `config.path` for
    /// appending and checks or writes the CSV header.
    pub fn open(cfg: Config) -> Result<Self, ConnectorError> {
        cfg.validate()?;
        let path = cfg.path.clone();
        if let Some(dir) = Path::new(&path).parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| io_error(&path, &e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io_error(&path, &e))?;
        let len = file.metadata().map_err(|e| io_error(&path, &e))?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(|e| io_error(&path, &e))?;
            file.read_exact(&mut last).map_err(|e| io_error(&path, &e))?;
            if last[0] != b'\n' {
                log::warn!("{path}: the last row has no line break (cut short?); starting a new line");
                let eol: &[u8] = if cfg.format == Format::Csv { b"\r\n" } else { b"\n" };
                file.write_all(eol).map_err(|e| io_error(&path, &e))?;
            }
        }
        if cfg.format == Format::Csv {
            let expected = csv_line(&cfg.header())?;
            if len == 0 {
                file.write_all(&expected).map_err(|e| io_error(&path, &e))?;
            } else {
                file.seek(SeekFrom::Start(0)).map_err(|e| io_error(&path, &e))?;
                let mut first = Vec::new();
                BufReader::new(&file)
                    .take(1 << 20)
                    .read_until(b'\n', &mut first)
                    .map_err(|e| io_error(&path, &e))?;
                if first != expected {
                    return Err(ConnectorError::config(
                        "header_mismatch",
                        format!(
                            "{path} exists with header {:?}, but this config writes {:?}; use another path",
                            String::from_utf8_lossy(&first).trim_end(),
                            cfg.header().join(",")
                        ),
                    ));
                }
            }
        }
        Ok(FileWriter { cfg, file })
    }

    /// The identifiers of `record` to write, by configured type (normalised,
    /// hashed if configured); values that do not normalise are dropped with
    /// a warning.
    fn identifiers(&self, record: &DestinationRecord) -> Vec<Vec<String>> {
        self.cfg
            .identities
            .iter()
            .map(|kind| {
                let values = record.identities.get(kind).map(Vec::as_slice).unwrap_or_default();
                values
                    .iter()
                    .filter_map(|raw| {
                        let normalised = match kind.as_str() {
                            "email" => normalize_email(raw),
                            "phone" => normalize_phone(raw, self.cfg.default_country_code.as_deref()),
                            _ => Some(raw.trim().to_string()).filter(|v| !v.is_empty()),
                        };
                        if normalised.is_none() {
                            log::warn!("record {}: {kind} value is not usable; left out", record.key);
                        }
                        normalised
                    })
                    .map(|v| if self.cfg.hash_identifiers { sha256_hex(&v) } else { v })
                    .collect()
            })
            .collect()
    }

    fn render(&self, record: &DestinationRecord, ids: &[Vec<String>], out: &mut Vec<u8>) -> Result<(), ConnectorError> {
        let audience = record.audience.as_deref().unwrap_or_default();
        match self.cfg.format {
            Format::Csv => {
                // One CSV writer per batch, fields written in place: no
                // per-row writer or cell copies.
                let rows = ids.iter().map(Vec::len).max().unwrap_or(0);
                let err = |e: csv::Error| ConnectorError::internal("csv_write", e.to_string());
                let mut w = csv::WriterBuilder::new()
                    .terminator(csv::Terminator::CRLF)
                    .buffer_capacity(1024)
                    .from_writer(&mut *out);
                for i in 0..rows {
                    w.write_field(&record.key).map_err(err)?;
                    w.write_field(record.op.as_str()).map_err(err)?;
                    w.write_field(audience).map_err(err)?;
                    for values in ids {
                        w.write_field(values.get(i).map_or("", String::as_str)).map_err(err)?;
                    }
                    for f in &self.cfg.fields {
                        match record.traits.get(f) {
                            None | Some(Value::Null) => w.write_field("").map_err(err)?,
                            Some(Value::String(s)) => w.write_field(s).map_err(err)?,
                            Some(other) => w.write_field(other.to_string()).map_err(err)?,
                        }
                    }
                    w.write_record(None::<&[u8]>).map_err(err)?;
                }
                w.flush()
                    .map_err(|e| ConnectorError::internal("csv_write", e.to_string()))?;
            }
            Format::Jsonl => {
                let identities: Map<String, Value> = self
                    .cfg
                    .identities
                    .iter()
                    .zip(ids)
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect();
                let traits: Map<String, Value> = self
                    .cfg
                    .fields
                    .iter()
                    .filter_map(|f| record.traits.get(f).map(|v| (f.clone(), v.clone())))
                    .collect();
                let mut line = json!({"key": record.key, "op": record.op, "identities": identities, "traits": traits});
                if let Some(a) = &record.audience {
                    line["audience"] = json!(a);
                }
                serde_json::to_writer(&mut *out, &line)
                    .map_err(|e| ConnectorError::internal("jsonl_write", e.to_string()))?;
                out.push(b'\n');
            }
        }
        Ok(())
    }
}

/// One CSV row with RFC 4180 quoting and a CRLF line end.
fn csv_line(cells: &[String]) -> Result<Vec<u8>, ConnectorError> {
    let err = |e: String| ConnectorError::internal("csv_write", e);
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    w.write_record(cells).map_err(|e| err(e.to_string()))?;
    w.into_inner().map_err(|e| err(e.to_string()))
}

impl DestinationWriter for FileWriter {
    fn write(&mut self, batch: Vec<DestinationRecord>) -> Result<WriteAck, ConnectorError> {
        let mut out = Vec::new();
        let mut rejected = Vec::new();
        for (i, record) in batch.iter().enumerate() {
            let ids = self.identifiers(record);
            if ids.iter().all(Vec::is_empty) {
                rejected.push(Rejection::new(
                    i,
                    ConnectorError::data(
                        "no_identifiers",
                        format!(
                            "record {} has no usable identifier among {}",
                            record.key,
                            self.cfg.identities.join(", ")
                        ),
                    ),
                ));
                continue;
            }
            self.render(record, &ids, &mut out)?;
        }
        if !out.is_empty() {
            self.file.write_all(&out).map_err(|e| io_error(&self.cfg.path, &e))?;
        }
        log::metric("records_written_total", (batch.len() - rejected.len()) as f64);
        Ok(WriteAck::with_rejections(batch.len(), rejected))
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.file.sync_all().map_err(|e| io_error(&self.cfg.path, &e))
    }
}

cdp_plugin_sdk::export_destination!(FileDestination);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests;
