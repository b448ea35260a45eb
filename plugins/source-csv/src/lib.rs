//! # source-csv
//!
//! A cdp source connector that reads the rows of a CSV file inside a
//! read-only mount (WASI preopen) and emits one raw record per row: a JSON
//! object keyed by column name, values as the strings read.
//!
//! ```yaml
//! sources:
//!   loyalty:
//!     plugin: csv
//!     config:
//!       file: /input/members.csv
//!       delimiter: ";"              # default ","
//!       has_header: true            # default true
//!       incremental: { by: offset } # or { by: column, column: updated_at }
//!     mount: { "data/loyalty": /input }
//! ```
//!
//! ## Parsing
//!
//! * RFC 4180 quoting (quoted delimiters, doubled quotes, line breaks inside
//!   quotes), LF or CRLF line ends, a leading UTF-8 byte order mark is
//!   skipped.
//! * Column names come from the header row, or from `columns` (which then
//!   replaces the header row's names; with `has_header: false` it is
//!   required). Header names are trimmed; columns with an empty name are
//!   ignored; duplicate names are a `config` error.
//! * Empty cells are omitted from the record. Blank lines are skipped.
//! * A row with a different number of cells than there are columns, or that
//!   is not valid UTF-8, is skipped with a warning naming its line number;
//!   the run goes on (metric `rows_skipped_total`).
//!
//! ## Incremental reads and checkpoints
//!
//! * No `incremental`: every run reads the whole file; no checkpoint.
//! * `{by: offset}` — for append-only files. After every batch the reader
//!   emits `{"offset": <byte offset of the next unread row>, "line": <lines
//!   consumed>}`; a run opened with that checkpoint continues exactly after
//!   it. If the file is now shorter than the offset (rotated or truncated),
//!   or the offset no longer falls on a row boundary, the file is read from
//!   the start again and a warning is logged. A rewritten file that is
//!   longer than the offset and still has a line break there cannot be told
//!   apart from an appended one.
//! * `{by: column, column: updated_at}` — for files rewritten in full. Each
//!   run reads the whole file and emits only rows whose value in `column` is
//!   greater than the largest value of the previous run, comparing the
//!   strings byte-wise (right for ISO 8601 timestamps in one zone and format,
//!   and for zero-padded numbers; not for `9` vs `10`). Rows without a value
//!   are emitted on the first run only. One checkpoint `{"max": "<largest
//!   value seen>"}` is emitted when the file has been read to the end, since
//!   an unsorted file gives no earlier point every row before which is
//!   covered.

mod parse;
mod reader;

pub use reader::CsvReader;

use cdp_plugin_sdk::{ConnectorError, Source, Spec, capability};
use serde::Deserialize;
use serde_json::{Value, json};

/// The `config:` of a CSV source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of the file inside a mount, e.g. `/input/members.csv`.
    pub file: String,
    /// Field delimiter: one ASCII character. Default `,`.
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Whether the first row holds the column names. Default `true`.
    #[serde(default = "default_true")]
    pub has_header: bool,
    /// Explicit column names; replace the header row's names.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// How a run resumes from the previous one; absent = full read.
    #[serde(default)]
    pub incremental: Option<Incremental>,
}

/// How a run resumes from the previous one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "by", rename_all = "lowercase", deny_unknown_fields)]
pub enum Incremental {
    /// Continue after the byte offset of the last row read (append-only files).
    Offset {},
    /// Emit only rows whose `column` value is greater than the last run's maximum.
    Column {
        /// The column compared, e.g. `updated_at`.
        column: String,
    },
}

fn default_delimiter() -> String {
    ",".to_string()
}

fn default_true() -> bool {
    true
}

impl Config {
    /// The delimiter as a byte, or a `config` error.
    pub fn delimiter_byte(&self) -> Result<u8, ConnectorError> {
        match self.delimiter.as_bytes() {
            [b] if b.is_ascii() && !matches!(b, b'"' | b'\n' | b'\r') => Ok(*b),
            _ => Err(ConnectorError::config(
                "invalid_delimiter",
                format!(
                    "config.delimiter: must be one ASCII character other than a quote or line break, got {:?}",
                    self.delimiter
                ),
            )),
        }
    }

    /// Checks the config without touching the file.
    pub fn validate(&self) -> Result<(), ConnectorError> {
        if self.file.trim().is_empty() {
            return Err(ConnectorError::config("missing_file", "config.file: must not be empty"));
        }
        self.delimiter_byte()?;
        match &self.columns {
            None if !self.has_header => {
                return Err(ConnectorError::config(
                    "missing_columns",
                    "config.columns: required when has_header is false",
                ));
            }
            Some(cols) => {
                if cols.is_empty() {
                    return Err(ConnectorError::config(
                        "missing_columns",
                        "config.columns: must not be empty",
                    ));
                }
                reader::check_unique(cols.iter().map(String::as_str))?;
            }
            None => {}
        }
        if let Some(Incremental::Column { column }) = &self.incremental {
            if column.trim().is_empty() {
                return Err(ConnectorError::config(
                    "missing_column",
                    "config.incremental.column: must not be empty",
                ));
            }
            if let Some(cols) = &self.columns
                && !cols.iter().any(|c| c.trim() == column)
            {
                return Err(ConnectorError::config(
                    "unknown_column",
                    format!("config.incremental.column: {column:?} is not one of config.columns"),
                ));
            }
        }
        Ok(())
    }
}

/// The JSON Schema of [`Config`].
pub fn config_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": false,
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "description": "Path inside a mount, e.g. /input/members.csv"},
            "delimiter": {"type": "string", "minLength": 1, "maxLength": 1, "default": ","},
            "has_header": {"type": "boolean", "default": true},
            "columns": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "incremental": {
                "oneOf": [
                    {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["by"],
                        "properties": {"by": {"const": "offset"}}
                    },
                    {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["by", "column"],
                        "properties": {"by": {"const": "column"}, "column": {"type": "string"}}
                    }
                ]
            }
        }
    })
}

/// The CSV source.
pub struct CsvSource;

impl Source for CsvSource {
    type Config = Config;
    type Reader = CsvReader;

    fn spec() -> Spec {
        Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
            .description("Rows of a CSV file inside a read-only mount, one record per row")
            .config_schema(config_schema())
            .capability(capability::MOUNT)
            .capability(capability::INCREMENTAL)
    }

    fn check(config: &Config) -> Result<(), ConnectorError> {
        config.validate()
    }

    fn open(config: Config, state: Option<Value>) -> Result<CsvReader, ConnectorError> {
        CsvReader::open(config, state)
    }
}

cdp_plugin_sdk::export_source!(CsvSource);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests;
