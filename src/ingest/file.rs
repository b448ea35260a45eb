//! Reading input files for `cdp ingest`: JSON Lines (one object per line) or
//! CSV with a header row. Records stream out with their line numbers so a
//! malformed line is reported where it is and the rest of the file goes on.

use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// One input line: its number and the record or why it could not be read.
pub type Line = (u64, Result<Value, String>);

/// Longest line accepted, in bytes.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Formats by file extension: `.csv` is CSV, everything else JSON Lines.
pub fn open(path: &Path) -> std::io::Result<Box<dyn Iterator<Item = Line> + Send>> {
    let file = File::open(path)?;
    let is_csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    Ok(if is_csv { Box::new(csv_lines(file)) } else { Box::new(json_lines(BufReader::with_capacity(1 << 20, file))) })
}

/// JSON Lines; blank lines are skipped.
pub fn json_lines(mut r: impl BufRead + Send) -> impl Iterator<Item = Line> + Send {
    let mut n = 0u64;
    let mut buf = Vec::with_capacity(4096);
    std::iter::from_fn(move || {
        loop {
            buf.clear();
            n += 1;
            match r.read_until(b'\n', &mut buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some((n, Err(format!("read error: {e}")))),
            }
            if buf.len() > MAX_LINE_BYTES {
                return Some((n, Err(format!("line is {} bytes; the limit is {MAX_LINE_BYTES}", buf.len()))));
            }
            let text = match std::str::from_utf8(&buf) {
                Ok(t) => t.trim(),
                Err(_) => return Some((n, Err("line is not valid UTF-8".into()))),
            };
            if text.is_empty() {
                continue;
            }
            return Some((n, serde_json::from_str::<Value>(text).map_err(|e| format!("malformed JSON: {e}"))));
        }
    })
}

/// CSV with a header row; empty cells are left out of the record.
pub fn csv_lines(r: impl std::io::Read + Send) -> impl Iterator<Item = Line> + Send {
    let mut reader = csv::ReaderBuilder::new().flexible(false).has_headers(true).from_reader(r);
    let headers: Result<Vec<String>, String> = reader
        .headers()
        .map(|h| h.iter().map(|s| s.trim_start_matches('\u{feff}').trim().to_owned()).collect())
        .map_err(|e| format!("cannot read the CSV header: {e}"));
    let mut records = reader.into_records();
    let mut header_error = headers.as_ref().err().cloned();
    let headers = headers.unwrap_or_default();
    std::iter::from_fn(move || {
        if let Some(e) = header_error.take() {
            return Some((1, Err(e)));
        }
        let rec = records.next()?;
        Some(match rec {
            Ok(row) => {
                let line = row.position().map_or(0, |p| p.line());
                let mut obj = Map::new();
                for (h, v) in headers.iter().zip(row.iter()) {
                    if !v.is_empty() {
                        obj.insert(h.clone(), Value::String(v.to_owned()));
                    }
                }
                (line, Ok(Value::Object(obj)))
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                (line, Err(format!("malformed CSV row: {e}")))
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_report_bad_lines_and_go_on() {
        let input = "{\"a\":1}\n\nnot json\n{\"b\":2}\n";
        let lines: Vec<Line> = json_lines(input.as_bytes()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].0, 1);
        assert_eq!(lines[1].0, 3);
        assert!(lines[1].1.as_ref().unwrap_err().contains("malformed JSON"));
        assert_eq!(lines[2].0, 4);
    }

    #[test]
    fn csv_rows_become_objects() {
        let input = "\u{feff}id,email,tier\n1,a@x.org,gold\n2,,silver\n3,x\n";
        let lines: Vec<Line> = csv_lines(input.as_bytes()).collect();
        assert_eq!(lines[0].1.as_ref().unwrap()["email"], "a@x.org");
        assert!(lines[1].1.as_ref().unwrap().get("email").is_none());
        assert_eq!(lines[1].0, 3);
        assert!(lines[2].1.is_err());
        assert_eq!(lines[2].0, 4);
    }
}
