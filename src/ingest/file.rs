//! Reading input files for `cdp ingest`: JSON Lines (one object per line) or
//! CSV with a header row. Records stream out with their line numbers so a
//! malformed line is reported where it is and the rest of the file goes on.

use super::Rejection;
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// One input line: its number and the record or why it could not be read.
pub type Line = (u64, Result<Value, Rejection>);

/// Longest line accepted, in bytes.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Formats by file extension: `.csv` is CSV, everything else JSON Lines.
/// Only regular files are read: a directory, a device (`/dev/zero`), a FIFO
/// or a socket is refused before it is opened (opening a FIFO blocks, and a
/// device never ends).
pub fn open(path: &Path) -> std::io::Result<Box<dyn Iterator<Item = Line> + Send>> {
    regular(path)?;
    let file = File::open(path)?;
    let is_csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    Ok(if is_csv { Box::new(csv_lines(file)) } else { Box::new(json_lines(BufReader::with_capacity(1 << 20, file))) })
}

/// Refuses anything but a regular file, saying what it is.
fn regular(path: &Path) -> std::io::Result<()> {
    let t = std::fs::metadata(path)?.file_type();
    if t.is_file() {
        return Ok(());
    }
    let what = if t.is_dir() { "a directory" } else { special_kind(&t) };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file; give a JSON Lines or CSV file"),
    ))
}

#[cfg(unix)]
fn special_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "a special file"
}

/// Reads one line (without its newline) into `buf`, keeping at most
/// `MAX_LINE_BYTES + 1` bytes: the rest of a longer line is skipped as it
/// is read, never buffered. Returns the line's full length, `None` at the
/// end of input.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut len = 0usize;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok((len > 0).then_some(len));
        }
        let (piece, newline) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        let room = (MAX_LINE_BYTES + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&piece[..piece.len().min(room)]);
        len += piece.len();
        let used = piece.len() + usize::from(newline);
        r.consume(used);
        if newline {
            return Ok(Some(len));
        }
    }
}

/// JSON Lines; blank lines are skipped. A read error ends the input after
/// it is reported.
pub fn json_lines(mut r: impl BufRead + Send) -> impl Iterator<Item = Line> + Send {
    let mut n = 0u64;
    let mut buf = Vec::with_capacity(4096);
    let mut failed = false;
    std::iter::from_fn(move || {
        loop {
            if failed {
                return None;
            }
            buf.clear();
            n += 1;
            let len = match read_line(&mut r, &mut buf) {
                Ok(None) => return None,
                Ok(Some(len)) => len,
                Err(e) => {
                    failed = true;
                    return Some((n, Err(Rejection::new("unreadable", None, format!("read error: {e}")))));
                }
            };
            if len > MAX_LINE_BYTES {
                return Some((
                    n,
                    Err(Rejection::new(
                        "too_long",
                        None,
                        format!("line is {len} bytes; the limit is {MAX_LINE_BYTES}"),
                    )),
                ));
            }
            let text = match std::str::from_utf8(&buf) {
                Ok(t) => t.trim(),
                Err(_) => return Some((n, Err(Rejection::new("unreadable", None, "line is not valid UTF-8")))),
            };
            if text.is_empty() {
                continue;
            }
            return Some((
                n,
                serde_json::from_str::<Value>(text)
                    .map_err(|e| Rejection::new("not_json", None, format!("malformed JSON: {e}"))),
            ));
        }
    })
}

/// The CSV parser's input: a physical line past [`MAX_LINE_BYTES`] is cut
/// there (the rest is skipped as it is read, never buffered) and noted, so
/// the record holding it is rejected and the file goes on.
struct LineCap<R> {
    inner: R,
    /// Bytes of the current physical line so far.
    run: usize,
    /// The current physical line, from 1.
    line: u64,
    /// Whether the rest of the current line is being skipped.
    skipping: bool,
    /// Lines cut, with their full length, in order.
    cut: Vec<(u64, usize)>,
}

impl<R: BufRead> LineCap<R> {
    fn new(inner: R) -> Self {
        LineCap { inner, run: 0, line: 1, skipping: false, cut: Vec::new() }
    }

    /// Skips the rest of an over-long line, up to (not including) its newline.
    fn skip(&mut self) -> std::io::Result<()> {
        while self.skipping {
            let chunk = self.inner.fill_buf()?;
            let (n, end) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), chunk.is_empty()),
            };
            self.run += n;
            self.inner.consume(n);
            if end {
                self.skipping = false;
                self.cut.push((self.line, self.run));
            }
        }
        Ok(())
    }
}

impl<R: BufRead> std::io::Read for LineCap<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            self.skip()?;
            let chunk = self.inner.fill_buf()?;
            let mut n = 0;
            while n < chunk.len().min(out.len()) {
                if chunk[n] == b'\n' {
                    (self.run, self.line) = (0, self.line + 1);
                } else if self.run == MAX_LINE_BYTES {
                    break;
                } else {
                    self.run += 1;
                }
                n += 1;
            }
            out[..n].copy_from_slice(&chunk[..n]);
            let done = n > 0 || chunk.is_empty() || out.is_empty();
            self.inner.consume(n);
            if done {
                return Ok(n);
            }
            self.skipping = true;
        }
    }
}

/// CSV with a header row; empty cells are left out of the record. A row
/// with a line over [`MAX_LINE_BYTES`] is rejected; a read error ends the
/// input after it is reported.
pub fn csv_lines(r: impl std::io::Read + Send) -> impl Iterator<Item = Line> + Send {
    let r = LineCap::new(BufReader::with_capacity(64 << 10, r));
    let mut reader = csv::ReaderBuilder::new().flexible(false).has_headers(true).from_reader(r);
    let headers: Result<Vec<String>, String> = reader
        .headers()
        .map(|h| h.iter().map(|s| s.trim_start_matches('\u{feff}').trim().to_owned()).collect())
        .map_err(|e| format!("cannot read the CSV header: {e}"))
        .and_then(unique_headers);
    let mut records = reader.into_records();
    let mut header_error = headers.as_ref().err().cloned();
    let mut readable = header_error.is_none();
    let headers = headers.unwrap_or_default();
    // Lines cut before this index belong to rows already returned.
    let mut cut_seen = 0;
    std::iter::from_fn(move || {
        if let Some(e) = header_error.take() {
            return Some((1, Err(Rejection::new("unreadable", None, e))));
        }
        if !readable {
            return None;
        }
        let rec = records.next()?;
        let start = match &rec {
            Ok(row) => row.position(),
            Err(e) => e.position(),
        }
        .map_or(0, |p| p.line());
        // The parser reads at most a buffer ahead, and a line is noted only
        // once it is longer than that buffer: a noted line at or after the
        // row's start is within the row.
        let cut = records.reader().get_ref().cut.get(cut_seen..).unwrap_or_default();
        cut_seen += cut.iter().take_while(|(l, _)| *l < start).count();
        if let Some(&(line, len)) = records.reader().get_ref().cut.get(cut_seen) {
            cut_seen += 1;
            return Some((
                line,
                Err(Rejection::new("too_long", None, format!("line is {len} bytes; the limit is {MAX_LINE_BYTES}"))),
            ));
        }
        if let Err(e) = &rec
            && let csv::ErrorKind::Io(io) = e.kind()
        {
            readable = false;
            return Some((start, Err(Rejection::new("unreadable", None, format!("read error: {io}")))));
        }
        Some(match rec {
            Ok(row) => {
                let mut obj = Map::new();
                for (h, v) in headers.iter().zip(row.iter()) {
                    if !v.is_empty() {
                        obj.insert(h.clone(), Value::String(v.to_owned()));
                    }
                }
                (start, Ok(Value::Object(obj)))
            }
            Err(e) => (start, Err(Rejection::new("unreadable", None, format!("malformed CSV row: {e}")))),
        })
    })
}

/// Refuses a header row naming a column twice: which of the two values a
/// record meant would be a guess.
fn unique_headers(headers: Vec<String>) -> Result<Vec<String>, String> {
    let mut seen = std::collections::HashMap::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        if let Some(first) = seen.insert(h.as_str(), i) {
            return Err(format!(
                "the CSV header names column `{h}` twice (columns {} and {}); rename or remove one",
                first + 1,
                i + 1
            ));
        }
    }
    Ok(headers)
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
        assert!(lines[1].1.as_ref().unwrap_err().message.contains("malformed JSON"));
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

    #[test]
    fn a_long_line_is_skipped_without_being_buffered() {
        let mut input = vec![b'x'; MAX_LINE_BYTES * 3];
        input.extend_from_slice(b"\n{\"a\":1}\n");
        let lines: Vec<Line> = json_lines(std::io::BufReader::with_capacity(4096, &input[..])).collect();
        assert_eq!(lines.len(), 2);
        let e = &lines[0].1.as_ref().unwrap_err().message;
        assert_eq!(e, &format!("line is {} bytes; the limit is {MAX_LINE_BYTES}", MAX_LINE_BYTES * 3));
        assert_eq!((lines[1].0, lines[1].1.as_ref().unwrap()["a"].as_i64()), (2, Some(1)));
    }

    #[test]
    fn a_long_csv_line_is_rejected_and_the_file_goes_on() {
        let mut input = b"id,email\n1,a@x.org\n2,".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES * 2));
        input.extend_from_slice(b"\n3,c@x.org\n4,");
        input.extend(std::iter::repeat_n(b'y', MAX_LINE_BYTES + 1));
        let lines: Vec<Line> = csv_lines(&input[..]).collect();
        let numbers: Vec<u64> = lines.iter().map(|l| l.0).collect();
        assert_eq!(numbers, [2, 3, 4, 5]);
        assert_eq!(lines[0].1.as_ref().unwrap()["email"], "a@x.org");
        let e = &lines[1].1.as_ref().unwrap_err().message;
        assert_eq!(e, &format!("line is {} bytes; the limit is {MAX_LINE_BYTES}", MAX_LINE_BYTES * 2 + 2));
        assert_eq!(lines[2].1.as_ref().unwrap()["email"], "c@x.org");
        assert!(lines[3].1.as_ref().unwrap_err().message.contains(&format!("{} bytes", MAX_LINE_BYTES + 3)));
    }

    #[test]
    fn a_duplicate_csv_header_is_refused() {
        let lines: Vec<Line> = csv_lines("id,email,Email,email\n1,a,b,c\n".as_bytes()).collect();
        assert_eq!(lines.len(), 1);
        let e = &lines[0].1.as_ref().unwrap_err().message;
        assert!(e.contains("column `email` twice (columns 2 and 4)"), "{e}");
        assert_eq!(lines[0].0, 1);
    }
}
