//! The CSV reader: header handling, row mapping and checkpoints.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use cdp_plugin_sdk::{ConnectorError, ReadEvent, Records, SourceReader, log};
use csv::ByteRecord;
use serde_json::{Map, Value, json};

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
    rdr: csv::Reader<File>,
    /// File offset the csv reader started at.
    base_offset: u64,
    /// Physical lines before `base_offset`.
    base_line: u64,
    /// Column names; `None` for ignored (unnamed) columns.
    names: Vec<Option<String>>,
    mode: Mode,
    done: bool,
}

fn csv_reader(file: File, delimiter: u8) -> csv::Reader<File> {
    csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(file)
}

fn is_blank(rec: &ByteRecord) -> bool {
    rec.len() == 1 && rec[0].is_empty()
}

/// What the previous run left, if it applies to this config.
fn offset_state(state: &Option<Value>) -> Option<(u64, u64)> {
    let s = state.as_ref()?;
    let offset = s.get("offset")?.as_u64()?;
    let line = s.get("line").and_then(Value::as_u64).unwrap_or(0);
    Some((offset, line))
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

        let mut head = [0u8; 3];
        let mut got = 0;
        while got < head.len() {
            match file.read(&mut head[got..]).map_err(|e| io_error(&path, &e))? {
                0 => break,
                n => got += n,
            }
        }
        let start = if head[..got] == *BOM { BOM.len() as u64 } else { 0 };
        file.seek(SeekFrom::Start(start)).map_err(|e| io_error(&path, &e))?;

        // The header row, and where the data starts.
        let mut data_offset = start;
        let mut data_line = 0u64;
        let mut names: Vec<Option<String>> = Vec::new();
        if config.has_header {
            let mut rdr = csv_reader(file, delimiter);
            let mut rec = ByteRecord::new();
            loop {
                match rdr.read_byte_record(&mut rec) {
                    Ok(true) if is_blank(&rec) => continue,
                    Ok(true) => {
                        names = rec
                            .iter()
                            .map(|cell| {
                                let name = String::from_utf8_lossy(cell).trim().to_string();
                                (!name.is_empty()).then_some(name)
                            })
                            .collect();
                        break;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        return Err(ConnectorError::transient("file_io", format!("{path}: {e}")));
                    }
                }
            }
            data_offset = start + rdr.position().byte();
            data_line = rdr.position().line() - 1;
            file = rdr.into_inner();
            check_unique(names.iter().flatten().map(String::as_str))?;
        }
        if let Some(columns) = &config.columns {
            if config.has_header && !names.is_empty() && names.len() != columns.len() {
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
        let header_seen = !names.is_empty();

        let (mut offset, mut line) = (data_offset, data_line);
        let mode = match &config.incremental {
            None => Mode::Full,
            Some(Incremental::Offset) => {
                match offset_state(&state) {
                    Some((o, _)) if o > len => log::warn!(
                        "{path}: the file ({len} bytes) is shorter than the checkpoint offset {o}; it was rotated or truncated, reading it from the start"
                    ),
                    Some((o, _)) if o < data_offset => log::warn!(
                        "{path}: the checkpoint offset {o} lies inside the header; reading from the start"
                    ),
                    Some((o, l)) if o == data_offset || at_row_boundary(&mut file, o, len, &path)? => {
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
                let index = names
                    .iter()
                    .position(|n| n.as_deref() == Some(column.as_str()));
                let index = match index {
                    Some(i) => i,
                    None if !header_seen => 0,
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
                            log::warn!(
                                "{path}: the checkpoint {s} is not a column checkpoint; emitting every row"
                            );
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

        file.seek(SeekFrom::Start(offset)).map_err(|e| io_error(&path, &e))?;
        Ok(CsvReader {
            rdr: csv_reader(file, delimiter),
            base_offset: offset,
            base_line: line,
            done: !header_seen,
            names,
            mode,
            path,
        })
    }

    /// The checkpoint of the current position (offset mode).
    fn offset_checkpoint(&self) -> Value {
        let pos = self.rdr.position();
        json!({
            "offset": self.base_offset + pos.byte(),
            "line": self.base_line + pos.line() - 1,
        })
    }

    /// Maps one row to a record, or `None` (with a warning) if it is malformed.
    fn row(&self, rec: &ByteRecord, line: u64) -> Option<Map<String, Value>> {
        if rec.len() != self.names.len() {
            log::warn!(
                "{} line {line}: expected {} fields, found {}; row skipped",
                self.path,
                self.names.len(),
                rec.len()
            );
            return None;
        }
        let mut map = Map::new();
        for (name, cell) in self.names.iter().zip(rec.iter()) {
            let Some(name) = name else { continue };
            if cell.is_empty() {
                continue;
            }
            match std::str::from_utf8(cell) {
                Ok(s) => {
                    map.insert(name.clone(), Value::String(s.to_string()));
                }
                Err(_) => {
                    log::warn!("{} line {line}: not valid UTF-8; row skipped", self.path);
                    return None;
                }
            }
        }
        Some(map)
    }
}

/// Whether `offset` still starts a row: the byte before it ends a line, or
/// (when the last row had no line break) the byte at it starts one.
fn at_row_boundary(file: &mut File, offset: u64, len: u64, path: &str) -> Result<bool, ConnectorError> {
    if offset == 0 {
        return Ok(true);
    }
    let mut two = [0u8; 2];
    file.seek(SeekFrom::Start(offset - 1)).map_err(|e| io_error(path, &e))?;
    let want = if offset < len { 2 } else { 1 };
    file.read_exact(&mut two[..want]).map_err(|e| io_error(path, &e))?;
    let before_is_break = matches!(two[0], b'\n' | b'\r');
    let at_is_break = want == 2 && matches!(two[1], b'\n' | b'\r');
    Ok(before_is_break || at_is_break || offset == len)
}

impl SourceReader for CsvReader {
    fn next(&mut self, max: u32) -> Result<Vec<ReadEvent>, ConnectorError> {
        if self.done {
            return Ok(Vec::new());
        }
        let max = max.max(1);
        let mut records = Records::new();
        let mut rec = ByteRecord::new();
        let mut progressed = false;
        let mut skipped = 0u32;
        let mut eof = false;
        while records.len() < max {
            match self.rdr.read_byte_record(&mut rec) {
                Ok(false) => {
                    eof = true;
                    break;
                }
                Ok(true) => {
                    progressed = true;
                    if is_blank(&rec) {
                        continue;
                    }
                    let line = self.base_line + rec.position().map_or(0, |p| p.line());
                    let Some(row) = self.row(&rec, line) else {
                        skipped += 1;
                        continue;
                    };
                    if let Mode::Column { index, threshold, max } = &mut self.mode {
                        let value = std::str::from_utf8(&rec[*index]).unwrap_or_default();
                        if !value.is_empty() && max.as_deref().is_none_or(|m| value > m) {
                            *max = Some(value.to_string());
                        }
                        let newer = match threshold.as_deref() {
                            None => true,
                            Some(t) => !value.is_empty() && value > t,
                        };
                        if !newer {
                            continue;
                        }
                    }
                    records.push(&row)?;
                }
                Err(e) => {
                    return Err(ConnectorError::transient("file_io", format!("{}: {e}", self.path)));
                }
            }
        }
        if skipped > 0 {
            log::metric("rows_skipped_total", f64::from(skipped));
        }

        let mut events = Vec::new();
        let emitted = !records.is_empty();
        if emitted {
            events.push(ReadEvent::records(records));
        }
        match &self.mode {
            Mode::Full => {}
            Mode::Offset => {
                if progressed {
                    events.push(ReadEvent::checkpoint(self.offset_checkpoint()));
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
