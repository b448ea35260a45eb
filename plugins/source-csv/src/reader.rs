//! The CSV source reader: header handling, row mapping and checkpoints.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use cdp_plugin_sdk::{ConnectorError, ReadEvent, Records, SourceReader, log};
use serde_json::{Map, Value, json};

use crate::parse::{Row, RowReader};
use crate::{Config, Incremental};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Fails on a duplicate (trimmed, non-empty) column name.
pub(crate) fn check_unique<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), ConnectorError> {
    let mut seen = std::collections::HashSet::new();
    for name in names.map(str::trim).filter(|n| !n.is_empty()) {
        if !seen.insert(name) {
            return Err(ConnectorError::config(
                "duplicate_column",
                format!("column {name:?} appears more than once"),
            ));
        }
    }
    Ok(())
}

fn io_error(path: &str, e: &io::Error) -> ConnectorError {
    match e.kind() {
        io::ErrorKind::NotFound => ConnectorError::config(
            "file_not_found",
            format!("{path}: not found (is its directory mounted?)"),
        ),
        io::ErrorKind::PermissionDenied => {
            ConnectorError::permission("file_permission", format!("{path}: permission denied"))
        }
        _ => ConnectorError::transient("file_io", format!("{path}: {e}")),
    }
}

#[derive(Debug)]
enum Mode {
    /// Whole file, no checkpoint.
    Full,
    /// Checkpoint `{"offset", "line"}` after every batch.
    Offset,
    /// Rows with `column` > `threshold`; checkpoint `{"max"}` at the end.
    Column {
        index: usize,
        threshold: Option<String>,
        max: Option<String>,
    },
}

/// An open read of a CSV file.
#[derive(Debug)]
pub struct CsvReader {
    path: String,
    rows: RowReader<BufReader<File>>,
    /// Column names; `None` for ignored (unnamed) columns.
    names: Vec<Option<String>>,
    mode: Mode,
    done: bool,
}

/// What the previous run left, if it is an offset checkpoint.
fn offset_state(state: Option<&Value>) -> Option<(u64, u64)> {
    let s = state?;
    let offset = s.get("offset")?.as_u64()?;
    let line = s.get("line").and_then(Value::as_u64).unwrap_or(0);
    Some((offset, line))
}

fn open_at(
    path: &str,
    mut file: File,
    delimiter: u8,
    offset: u64,
    line: u64,
) -> Result<RowReader<BufReader<File>>, ConnectorError> {
    file.seek(SeekFrom::Start(offset)).map_err(|e| io_error(path, &e))?;
    Ok(RowReader::new(BufReader::new(file), delimiter, offset, line))
}

/// Whether `offset` still starts a row: the byte before it ends a line, or
/// (when the last row read had no line break) the byte at it starts one.
fn at_row_boundary(file: &mut File, offset: u64, len: u64, path: &str) -> Result<bool, ConnectorError> {
    if offset == 0 || offset == len {
        return Ok(true);
    }
    let mut two = [0u8; 2];
    file.seek(SeekFrom::Start(offset - 1)).map_err(|e| io_error(path, &e))?;
    file.read_exact(&mut two).map_err(|e| io_error(path, &e))?;
    Ok(matches!(two[0], b'\n' | b'\r') || matches!(two[1], b'\n' | b'\r'))
}

impl CsvReader {
    /// Opens `config.file`, reads the header and positions the reader after
    /// the checkpoint `state`, if any.
    pub fn open(config: Config, state: Option<Value>) -> Result<Self, ConnectorError> {
        config.validate()?;
        let delimiter = config.delimiter_byte()?;
        let path = config.file.clone();
        let mut file = File::open(&path).map_err(|e| io_error(&path, &e))?;
        let len = file.metadata().map_err(|e| io_error(&path, &e))?.len();

        let mut head = Vec::with_capacity(3);
        (&mut file)
            .take(3)
            .read_to_end(&mut head)
            .map_err(|e| io_error(&path, &e))?;
        let start = if head == BOM { BOM.len() as u64 } else { 0 };

        // The header row, and where the data starts.
        let mut data = (start, 0u64);
        let mut names: Vec<Option<String>> = Vec::new();
        let mut empty = false;
        if config.has_header {
            let mut rows = open_at(&path, file, delimiter, start, 0)?;
            loop {
                match rows.read_row().map_err(|e| io_error(&path, &e))? {
                    Some(row) if row.blank => continue,
                    Some(row) => {
                        names = row
                            .fields
                            .iter()
                            .map(|cell| {
                                let name = String::from_utf8_lossy(cell).trim().to_string();
                                (!name.is_empty()).then_some(name)
                            })
                            .collect();
                        break;
                    }
                    None => {
                        empty = true;
                        break;
                    }
                }
            }
            data = (rows.offset(), rows.line());
            file = rows_into_file(rows);
            check_unique(names.iter().flatten().map(String::as_str))?;
        }
        if let Some(columns) = &config.columns {
            if config.has_header && !empty && names.len() != columns.len() {
                log::warn!(
                    "{path}: the header has {} columns but config.columns names {}; rows are read with config.columns",
                    names.len(),
                    columns.len()
                );
            }
            names = columns
                .iter()
                .map(|c| Some(c.trim().to_string()).filter(|c| !c.is_empty()))
                .collect();
        }

        let (mut offset, mut line) = data;
        let mode = match &config.incremental {
            None => Mode::Full,
            Some(Incremental::Offset {}) => {
                match offset_state(state.as_ref()) {
                    Some((o, _)) if o > len => log::warn!(
                        "{path}: the file ({len} bytes) is shorter than the checkpoint offset {o}; it was rotated or truncated, reading it from the start"
                    ),
                    Some((o, _)) if o < data.0 => log::warn!(
                        "{path}: the checkpoint offset {o} lies before the first row; reading from the start"
                    ),
                    Some((o, l)) if o == data.0 || at_row_boundary(&mut file, o, len, &path)? => {
                        offset = o;
                        line = l;
                    }
                    Some((o, _)) => log::warn!(
                        "{path}: the checkpoint offset {o} no longer falls on a row boundary; the file was rewritten, reading it from the start"
                    ),
                    None if state.is_some() => log::warn!(
                        "{path}: the checkpoint {} is not an offset checkpoint; reading from the start",
                        state.as_ref().map(Value::to_string).unwrap_or_default()
                    ),
                    None => {}
                }
                Mode::Offset
            }
            Some(Incremental::Column { column }) => {
                let index = names.iter().position(|n| n.as_deref() == Some(column.as_str()));
                let index = match index {
                    Some(i) => i,
                    None if empty => 0,
                    None => {
                        return Err(ConnectorError::config(
                            "unknown_column",
                            format!("config.incremental.column: {column:?} is not a column of {path}"),
                        ));
                    }
                };
                let threshold = match &state {
                    None => None,
                    Some(s) => match s.get("max") {
                        Some(Value::String(m)) => Some(m.clone()),
                        Some(Value::Null) => None,
                        _ => {
                            log::warn!("{path}: the checkpoint {s} is not a column checkpoint; emitting every row");
                            None
                        }
                    },
                };
                Mode::Column {
                    index,
                    max: threshold.clone(),
                    threshold,
                }
            }
        };

        Ok(CsvReader {
            rows: open_at(&path, file, delimiter, offset, line)?,
            done: empty,
            names,
            mode,
            path,
        })
    }

    /// Maps one row to a record, or `None` (with a warning) if it is malformed.
    fn record(&self, row: &Row) -> Option<Map<String, Value>> {
        if row.fields.len() != self.names.len() {
            log::warn!(
                "{} line {}: expected {} fields, found {}; row skipped",
                self.path,
                row.line,
                self.names.len(),
                row.fields.len()
            );
            return None;
        }
        let mut map = Map::new();
        for (name, cell) in self.names.iter().zip(&row.fields) {
            let Some(name) = name else { continue };
            if cell.is_empty() {
                continue;
            }
            match std::str::from_utf8(cell) {
                Ok(s) => {
                    map.insert(name.clone(), Value::String(s.to_string()));
                }
                Err(_) => {
                    log::warn!("{} line {}: not valid UTF-8; row skipped", self.path, row.line);
                    return None;
                }
            }
        }
        Some(map)
    }
}

fn rows_into_file(rows: RowReader<BufReader<File>>) -> File {
    rows.into_inner().into_inner()
}

impl SourceReader for CsvReader {
    fn next(&mut self, max: u32) -> Result<Vec<ReadEvent>, ConnectorError> {
        if self.done {
            return Ok(Vec::new());
        }
        let max = max.max(1);
        let mut records = Records::new();
        let mut progressed = false;
        let mut skipped = 0u32;
        let mut eof = false;
        // Where the checkpoint may point: after the last row handled.
        let mut resume = (self.rows.offset(), self.rows.line());
        while records.len() < max {
            let row = self.rows.read_row().map_err(|e| io_error(&self.path, &e))?;
            let Some(row) = row else {
                eof = true;
                break;
            };
            if row.unterminated {
                // Possibly still being written: do not move past it.
                log::warn!(
                    "{} line {}: a quoted field is not closed by the end of the file; row skipped",
                    self.path,
                    row.line
                );
                skipped += 1;
                eof = true;
                break;
            }
            progressed = true;
            resume = (self.rows.offset(), self.rows.line());
            if row.blank {
                continue;
            }
            let Some(record) = self.record(&row) else {
                skipped += 1;
                continue;
            };
            if let Mode::Column { index, threshold, max } = &mut self.mode {
                let value = record
                    .get(self.names[*index].as_deref().unwrap_or_default())
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if !value.is_empty() && max.as_deref().is_none_or(|m| value.as_str() > m) {
                    *max = Some(value.clone());
                }
                let newer = match threshold.as_deref() {
                    None => true,
                    Some(t) => !value.is_empty() && value.as_str() > t,
                };
                if !newer {
                    continue;
                }
            }
            records.push(&record)?;
        }
        if skipped > 0 {
            log::metric("rows_skipped_total", f64::from(skipped));
        }

        let mut events = Vec::new();
        if !records.is_empty() {
            events.push(ReadEvent::records(records));
        }
        match &self.mode {
            Mode::Full => {}
            Mode::Offset => {
                if progressed {
                    events.push(ReadEvent::checkpoint(json!({ "offset": resume.0, "line": resume.1 })));
                }
            }
            Mode::Column { max, .. } => {
                if eof && let Some(max) = max {
                    events.push(ReadEvent::checkpoint(json!({ "max": max })));
                }
            }
        }
        if eof {
            self.done = true;
        }
        Ok(events)
    }
}
