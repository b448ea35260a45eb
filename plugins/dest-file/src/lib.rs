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
//!   quoting, CRLF line ends. A text cell starting with `=`, `+`, `-`, `@`,
//!   a tab or a carriage return (other than a plain number) gets a leading
//!   `'`, so a spreadsheet shows it instead of running it (CSV injection).
//! * `jsonl`: one line per record: `{"key", "op", "audience", "identities":
//!   {"email": [...], ...}, "traits": {<fields>}}`.
//! * Only the identity types in `identities` are written; `email` and
//!   `phone` are normalised first (see [`normalize`] for the exact rules,
//!   which follow Meta's: emails trimmed and lower-cased with Gmail dots
//!   kept; phones as E.164 digits without `+`, or with it under
//!   `phone_format: e164`, as Google Customer Match wants), other types
//!   trimmed. With
//!   `hash_identifiers` every written identifier is the lower-case hex
//!   SHA-256 of its normalised value; a value that already is a SHA-256
//!   (64 hex digits, as cdp sends fields the manifest lists under `hash:`)
//!   is written as it is, lower-cased. Values that do not normalise are
//!   dropped with a warning; a record left with no identifier is rejected
//!   as a `data` error.
//! * Traits in `fields` are written as they are (strings raw, other JSON
//!   values as JSON text); list none that the platform wants hashed.
//!
//! Every `write` appends its rows with one write call; `flush` calls
//! `sync_all`. A file whose last row was cut short (no final line break) gets
//! a line break before the next rows.

pub mod normalize;

/// Whether `v` is a hex SHA-256 digest (hashed before it reached the plugin).
fn is_sha256_hex(v: &str) -> bool {
    v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use cdp_plugin_sdk::{
    ConnectorError, Destination, DestinationRecord, DestinationRecordRef, DestinationWriter, Rejection, Spec,
    TraitValue, WriteAck, capability, log,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use cdp_plugin_sdk::hash::{Digest256, Sha256Batch, push_hex};
use normalize::{normalize_email_into, normalize_phone_into};

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
    /// How a phone number is written before hashing: `digits` (default,
    /// `46701234567`: Meta's format) or `e164` (`+46701234567`: Google
    /// Customer Match's format).
    #[serde(default)]
    pub phone_format: PhoneFormat,
}

/// The text a phone number is hashed (or written) as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhoneFormat {
    /// E.164 digits without `+` (Meta Custom Audiences).
    #[default]
    Digits,
    /// E.164 with its `+` (Google Customer Match).
    E164,
}

/// A text cell a spreadsheet shows rather than runs: a leading `=`, `+`,
/// `-`, `@`, tab or carriage return gets a `'` in front (OWASP's advice
/// against CSV injection), unless the cell is a plain number such as an
/// E.164 phone (`+46701234567`), which no spreadsheet runs.
fn text_cell(s: &str) -> std::borrow::Cow<'_, str> {
    let number = s.len() > 1 && s.starts_with(['+', '-']) && s[1..].bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && !number {
        std::borrow::Cow::Owned(format!("'{s}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
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
            "default_country_code": {"type": "string", "pattern": "^[1-9][0-9]{0,2}$"},
            "phone_format": {"enum": ["digits", "e164"], "default": "digits",
                "description": "Phone text before hashing: digits (Meta) or e164 with + (Google Customer Match)"}
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
    scratch: Scratch,
}

/// Buffers a write reuses, so that in steady state a batch allocates
/// nothing per record.
#[derive(Debug, Default)]
struct Scratch {
    /// The batch's rows.
    out: Vec<u8>,
    /// One normalised identifier, before hashing.
    normalised: String,
    /// The batch's identifier cells as written (hex digests or normalised
    /// values), one after another.
    ids: String,
    /// Each identifier cell's place in `ids`, record by record and, within
    /// a record, by configured identity type.
    cells: Vec<Range<usize>>,
    /// Per record and configured identity type (`record * types + type`):
    /// its cells in `cells`.
    spans: Vec<Range<usize>>,
    /// The normalised identifiers to hash, one per cell.
    hashes: Sha256Batch,
    digests: Vec<Digest256>,
    /// One non-string trait as JSON text.
    cell: Vec<u8>,
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
        Ok(FileWriter {
            cfg,
            file,
            scratch: Scratch::default(),
        })
    }

    /// Normalises the identifiers of every record of `batch` into cells
    /// (`scratch.ids`, `cells`, `spans`), hashing them all in one go if
    /// configured; values that do not normalise are dropped with a warning.
    fn identifiers(cfg: &Config, batch: &[DestinationRecordRef<'_>], scratch: &mut Scratch) {
        let Scratch {
            normalised,
            ids,
            cells,
            spans,
            hashes,
            digests,
            ..
        } = scratch;
        ids.clear();
        cells.clear();
        spans.clear();
        hashes.clear();
        for record in batch {
            for kind in &cfg.identities {
                let first = cells.len();
                for raw in record.identities.get(kind).unwrap_or_default() {
                    if cfg.hash_identifiers && is_sha256_hex(raw) {
                        // Hashed already (a manifest's `hash:`): written as it is.
                        let start = ids.len();
                        ids.extend(raw.chars().map(|c| c.to_ascii_lowercase()));
                        cells.push(start..ids.len());
                        continue;
                    }
                    normalised.clear();
                    let ok = match kind.as_str() {
                        "email" => normalize_email_into(raw, normalised),
                        "phone" => {
                            let ok = normalize_phone_into(raw, cfg.default_country_code.as_deref(), normalised);
                            if ok && cfg.phone_format == PhoneFormat::E164 {
                                normalised.insert(0, '+');
                            }
                            ok
                        }
                        _ => {
                            normalised.push_str(raw.trim());
                            !normalised.is_empty()
                        }
                    };
                    if !ok {
                        log::warn!("record {}: {kind} value is not usable; left out", record.key);
                        continue;
                    }
                    if cfg.hash_identifiers {
                        hashes.push(normalised.as_bytes());
                        cells.push(0..0); // placed once hashed
                    } else {
                        let start = ids.len();
                        ids.push_str(normalised);
                        cells.push(start..ids.len());
                    }
                }
                spans.push(first..cells.len());
            }
        }
        if cfg.hash_identifiers {
            // The cells still to place (empty) and the digests are in the same order.
            hashes.digests_into(digests);
            for (cell, digest) in cells.iter_mut().filter(|c| c.start == c.end).zip(digests.iter()) {
                let start = ids.len();
                push_hex(digest, ids);
                *cell = start..ids.len();
            }
        }
    }

    /// The CSV rows of one record: one per value of its most-valued
    /// identity type.
    fn render_csv<W: Write>(
        cfg: &Config,
        record: &DestinationRecordRef<'_>,
        ids: &Ids<'_>,
        cell: &mut Vec<u8>,
        w: &mut csv::Writer<W>,
    ) -> Result<(), ConnectorError> {
        let err = |e: csv::Error| ConnectorError::internal("csv_write", e.to_string());
        let audience = record.audience.as_deref().unwrap_or_default();
        let rows = ids.spans.iter().map(ExactSizeIterator::len).max().unwrap_or(0);
        for i in 0..rows {
            w.write_field(text_cell(&record.key).as_bytes()).map_err(err)?;
            w.write_field(record.op.as_str()).map_err(err)?;
            w.write_field(text_cell(audience).as_bytes()).map_err(err)?;
            for span in ids.spans {
                w.write_field(text_cell(ids.get(span, i).unwrap_or_default()).as_bytes())
                    .map_err(err)?;
            }
            for f in &cfg.fields {
                match record.traits.get(f) {
                    None => w.write_field("").map_err(err)?,
                    Some(TraitValue::String(s)) => w.write_field(text_cell(s).as_bytes()).map_err(err)?,
                    Some(TraitValue::Other(v)) if v.is_null() => w.write_field("").map_err(err)?,
                    Some(TraitValue::Other(v)) => {
                        cell.clear();
                        serde_json::to_writer(&mut *cell, v.as_ref())
                            .map_err(|e| ConnectorError::internal("csv_write", e.to_string()))?;
                        w.write_field(&cell[..]).map_err(err)?;
                    }
                }
            }
            w.write_record(None::<&[u8]>).map_err(err)?;
        }
        Ok(())
    }

    fn render_jsonl(
        cfg: &Config,
        record: &DestinationRecordRef<'_>,
        ids: &Ids<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ConnectorError> {
        let identities: Map<String, Value> = cfg
            .identities
            .iter()
            .zip(ids.spans)
            .filter(|(_, span)| !span.is_empty())
            .map(|(k, span)| (k.clone(), (0..span.len()).filter_map(|i| ids.get(span, i)).collect()))
            .collect();
        let traits: Map<String, Value> = cfg
            .fields
            .iter()
            .filter_map(|f| record.traits.get(f).map(|v| (f.clone(), v.to_value())))
            .collect();
        let mut line = json!({"key": record.key, "op": record.op, "identities": identities, "traits": traits});
        if let Some(a) = &record.audience {
            line["audience"] = json!(a);
        }
        serde_json::to_writer(&mut *out, &line).map_err(|e| ConnectorError::internal("jsonl_write", e.to_string()))?;
        out.push(b'\n');
        Ok(())
    }
}

/// One record's identifier cells, by configured identity type.
struct Ids<'a> {
    text: &'a str,
    cells: &'a [Range<usize>],
    /// Per identity type: its cells in `cells`.
    spans: &'a [Range<usize>],
}

impl Ids<'_> {
    /// The `i`-th cell of one identity type.
    fn get(&self, span: &Range<usize>, i: usize) -> Option<&str> {
        let cell = span.clone().nth(i)?;
        self.text.get(self.cells.get(cell)?.clone())
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

/// Where a batch's rows go.
// One per batch, on the stack: boxing the writer would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Sink {
    Csv(csv::Writer<Vec<u8>>),
    Jsonl(Vec<u8>),
}

impl DestinationWriter for FileWriter {
    fn write(&mut self, batch: Vec<DestinationRecord>) -> Result<WriteAck, ConnectorError> {
        self.write_ref(batch.iter().map(DestinationRecord::borrowed).collect())
    }

    fn write_ref(&mut self, batch: Vec<DestinationRecordRef<'_>>) -> Result<WriteAck, ConnectorError> {
        let cfg = &self.cfg;
        Self::identifiers(cfg, &batch, &mut self.scratch);
        let Scratch {
            out,
            ids,
            cells,
            spans,
            cell,
            ..
        } = &mut self.scratch;
        let mut buf = std::mem::take(out);
        buf.clear();
        // One CSV writer for the batch, fields written in place.
        let mut sink = match cfg.format {
            Format::Csv => Sink::Csv(
                csv::WriterBuilder::new()
                    .terminator(csv::Terminator::CRLF)
                    .from_writer(buf),
            ),
            Format::Jsonl => Sink::Jsonl(buf),
        };
        let types = cfg.identities.len();
        let mut rejected = Vec::new();
        for (i, record) in batch.iter().enumerate() {
            let record_ids = Ids {
                text: ids,
                cells,
                spans: spans.get(i * types..(i + 1) * types).unwrap_or_default(),
            };
            if record_ids.spans.iter().all(Range::is_empty) {
                rejected.push(Rejection::new(
                    i,
                    ConnectorError::data(
                        "no_identifiers",
                        format!(
                            "record {} has no usable identifier among {}",
                            record.key,
                            cfg.identities.join(", ")
                        ),
                    ),
                ));
                continue;
            }
            match &mut sink {
                Sink::Csv(w) => Self::render_csv(cfg, record, &record_ids, cell, w)?,
                Sink::Jsonl(v) => Self::render_jsonl(cfg, record, &record_ids, v)?,
            }
        }
        *out = match sink {
            Sink::Csv(w) => w
                .into_inner()
                .map_err(|e| ConnectorError::internal("csv_write", e.to_string()))?,
            Sink::Jsonl(v) => v,
        };
        if !out.is_empty() {
            self.file.write_all(out).map_err(|e| io_error(&cfg.path, &e))?;
        }
        // A batch far larger than usual leaves no lasting reservation.
        if out.capacity() > 16 << 20 {
            *out = Vec::new();
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
