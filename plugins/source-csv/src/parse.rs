//! A small RFC 4180 row reader that knows the exact byte offset and line of
//! every row, so a read can stop and resume at any row boundary.
//!
//! * Fields are separated by a one-byte delimiter; rows end at LF, CRLF or a
//!   lone CR.
//! * A field starting with `"` is quoted: delimiters and line breaks inside
//!   it are data, `""` is a quote. Bytes after the closing quote and before
//!   the next delimiter are kept (lenient, like most spreadsheet exports).
//! * A quote inside an unquoted field is kept as is.

use std::io::{self, BufRead};

/// One physical row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The cells, raw bytes.
    pub fields: Vec<Vec<u8>>,
    /// 1-based line the row starts on.
    pub line: u64,
    /// Byte offset the row starts at.
    pub start: u64,
    /// An empty line (no bytes before the line break).
    pub blank: bool,
    /// The input ended inside a quoted field: the row is incomplete.
    pub unterminated: bool,
}

/// Reads rows from `inner`, which starts at byte `offset` after `line` line
/// breaks of the file.
#[derive(Debug)]
pub struct RowReader<R> {
    inner: R,
    delimiter: u8,
    offset: u64,
    line: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a field.
    FieldStart,
    /// Inside an unquoted field.
    Unquoted,
    /// Inside a quoted field.
    Quoted,
    /// Just after a quote inside a quoted field: either `""` or the end.
    QuoteInQuoted,
}

impl<R: BufRead> RowReader<R> {
    /// A reader positioned at byte `offset`, after `line` line breaks.
    pub fn new(inner: R, delimiter: u8, offset: u64, line: u64) -> Self {
        RowReader {
            inner,
            delimiter,
            offset,
            line,
        }
    }

    /// Byte offset of the next unread row.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Line breaks consumed before [`RowReader::offset`].
    pub fn line(&self) -> u64 {
        self.line
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        loop {
            match self.inner.fill_buf() {
                Ok(buf) => return Ok(buf.first().copied()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn bump(&mut self) {
        self.inner.consume(1);
        self.offset += 1;
    }

    /// Consumes a line break starting with `b` (already peeked).
    fn line_break(&mut self, b: u8) -> io::Result<()> {
        self.bump();
        if b == b'\r' && self.peek()? == Some(b'\n') {
            self.bump();
        }
        self.line += 1;
        Ok(())
    }

    /// The next row, or `None` at the end of the input.
    pub fn read_row(&mut self) -> io::Result<Option<Row>> {
        let start = self.offset;
        let line = self.line + 1;
        let mut fields: Vec<Vec<u8>> = Vec::new();
        let mut field: Vec<u8> = Vec::new();
        let mut state = State::FieldStart;
        let mut any = false;
        loop {
            let Some(b) = self.peek()? else {
                // End of input.
                if !any {
                    return Ok(None);
                }
                let unterminated = state == State::Quoted;
                fields.push(field);
                return Ok(Some(Row {
                    fields,
                    line,
                    start,
                    blank: false,
                    unterminated,
                }));
            };
            let is_break = b == b'\n' || b == b'\r';
            match state {
                State::Quoted => {
                    any = true;
                    if b == b'"' {
                        self.bump();
                        state = State::QuoteInQuoted;
                    } else if is_break {
                        field.push(b);
                        self.bump();
                        if b == b'\r' && self.peek()? == Some(b'\n') {
                            field.push(b'\n');
                            self.bump();
                        }
                        self.line += 1;
                    } else {
                        field.push(b);
                        self.bump();
                    }
                }
                State::QuoteInQuoted if b == b'"' => {
                    field.push(b'"');
                    self.bump();
                    state = State::Quoted;
                }
                _ if is_break => {
                    let blank = !any;
                    self.line_break(b)?;
                    fields.push(field);
                    return Ok(Some(Row {
                        fields,
                        line,
                        start,
                        blank,
                        unterminated: false,
                    }));
                }
                _ if b == self.delimiter => {
                    any = true;
                    self.bump();
                    fields.push(std::mem::take(&mut field));
                    state = State::FieldStart;
                }
                State::FieldStart if b == b'"' => {
                    any = true;
                    self.bump();
                    state = State::Quoted;
                }
                State::FieldStart | State::Unquoted => {
                    any = true;
                    field.push(b);
                    self.bump();
                    state = State::Unquoted;
                }
                State::QuoteInQuoted => {
                    // Bytes after the closing quote: kept.
                    field.push(b);
                    self.bump();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(input: &[u8]) -> Vec<Row> {
        let mut r = RowReader::new(input, b',', 0, 0);
        let mut out = Vec::new();
        while let Some(row) = r.read_row().unwrap() {
            out.push(row);
        }
        assert_eq!(r.offset(), input.len() as u64);
        out
    }

    fn cells(row: &Row) -> Vec<String> {
        row.fields
            .iter()
            .map(|f| String::from_utf8(f.clone()).unwrap())
            .collect()
    }

    #[test]
    fn fields_quotes_and_line_ends() {
        let input = b"a,b,c\r\n\"x,1\",\"say \"\"hi\"\"\",\r\n\"multi\nline\",2,3\n\n4,,\"\"\r5,6\"7,\"q\"tail\n8";
        let rows = rows(input);
        let got: Vec<(Vec<String>, u64, &[u8], bool)> = rows
            .iter()
            .map(|r| {
                (
                    cells(r),
                    r.line,
                    &input[r.start as usize..][..2.min(input.len() - r.start as usize)],
                    r.blank,
                )
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            [
                (s(&["a", "b", "c"]), 1, &b"a,"[..], false),
                (s(&["x,1", "say \"hi\"", ""]), 2, b"\"x", false),
                (s(&["multi\nline", "2", "3"]), 3, b"\"m", false),
                (s(&[""]), 5, b"\n4", true),
                (s(&["4", "", ""]), 6, b"4,", false),
                (s(&["5", "6\"7", "qtail"]), 7, b"5,", false),
                (s(&["8"]), 8, b"8", false),
            ]
        );
        assert!(rows.iter().all(|r| !r.unterminated));
    }

    #[test]
    fn offsets_and_lines_resume_exactly() {
        let input: &[u8] = b"h1,h2\r\n1,\"a\r\nb\"\r\n\r\n2,c\n3,d";
        let all = rows(input);
        let mut r = RowReader::new(input, b',', 0, 0);
        while r.read_row().unwrap().is_some() {
            let (offset, line) = (r.offset(), r.line());
            let mut resumed = RowReader::new(&input[offset as usize..], b',', offset, line);
            let mut rest = Vec::new();
            while let Some(row) = resumed.read_row().unwrap() {
                rest.push(row);
            }
            let expected: Vec<Row> = all.iter().filter(|row| row.start >= offset).cloned().collect();
            assert_eq!(rest, expected, "resumed at {offset}");
        }
    }

    #[test]
    fn unterminated_quote_at_end() {
        let rows = rows(b"1,\"open\nstill open");
        assert_eq!(rows.len(), 1);
        assert!(rows[0].unterminated);
        assert_eq!(rows[0].fields[1], b"open\nstill open");
    }

    #[test]
    fn other_delimiters_and_empty_input() {
        let mut r = RowReader::new(&b"a;b\tc\n"[..], b';', 0, 0);
        assert_eq!(r.read_row().unwrap().unwrap().fields, [b"a".to_vec(), b"b\tc".to_vec()]);
        assert!(r.read_row().unwrap().is_none());
        assert!(rows(b"").is_empty());
    }
}
