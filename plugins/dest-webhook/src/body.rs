//! Rendering a batch as a request body: JSON, NDJSON, XML or CSV.

use cdp_plugin_sdk::{ConnectorError, DestinationRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The body format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"records": [...]}`
    #[default]
    Json,
    /// One record per line.
    Ndjson,
    /// `<records><record …>…</record></records>`
    Xml,
    /// A header row and one row per record (RFC 4180).
    Csv,
}

impl Format {
    /// The `Content-Type` of the body.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Xml => "application/xml; charset=utf-8",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

/// Keeps only the traits named in `fields` (in that order), or all when `None`.
pub fn select_traits(record: &DestinationRecord, fields: Option<&[String]>) -> DestinationRecord {
    let mut out = record.clone();
    if let Some(fields) = fields {
        let mut traits = Map::new();
        for f in fields {
            if let Some(v) = record.traits.get(f) {
                traits.insert(f.clone(), v.clone());
            }
        }
        out.traits = traits;
    }
    out
}

/// Renders `records` (already filtered by [`select_traits`]) as `format`.
/// `fields` fixes the CSV trait columns.
pub fn render(
    format: Format,
    records: &[DestinationRecord],
    fields: Option<&[String]>,
) -> Result<Vec<u8>, ConnectorError> {
    let ser = |e: serde_json::Error| ConnectorError::internal("body_serialize", e.to_string());
    match format {
        Format::Json => serde_json::to_vec(&json!({ "records": records })).map_err(ser),
        Format::Ndjson => {
            let mut out = Vec::new();
            for r in records {
                serde_json::to_writer(&mut out, r).map_err(ser)?;
                out.push(b'\n');
            }
            Ok(out)
        }
        Format::Xml => Ok(render_xml(records).into_bytes()),
        Format::Csv => render_csv(records, fields),
    }
}

// ---------------------------------------------------------------- XML

/// Escapes text content or a double-quoted attribute value. Characters
/// XML 1.0 does not allow at all (most C0 controls, U+FFFE, U+FFFF) become
/// U+FFFD.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic()
        || c == '_'
        || matches!(c as u32,
            0xC0..=0xD6 | 0xD8..=0xF6 | 0xF8..=0x2FF | 0x370..=0x37D | 0x37F..=0x1FFF
            | 0x200C..=0x200D | 0x2070..=0x218F | 0x2C00..=0x2FEF | 0x3001..=0xD7FF
            | 0xF900..=0xFDCF | 0xFDF0..=0xFFFD | 0x10000..=0xEFFFF)
}

fn is_name_char(c: char) -> bool {
    is_name_start(c)
        || c.is_ascii_digit()
        || c == '-'
        || c == '.'
        || matches!(c as u32, 0xB7 | 0x300..=0x36F | 0x203F..=0x2040)
}

/// A valid XML element name for `name`: invalid characters (including `:`,
/// which would mean a namespace prefix) become `_`, and a name that does not
/// start with a letter or `_`, or starts with `xml` (reserved), gets a `_`
/// prefix. Returns whether the name had to change.
pub fn xml_name(name: &str) -> (String, bool) {
    let mut out: String = name.chars().map(|c| if is_name_char(c) { c } else { '_' }).collect();
    let needs_prefix = match out.chars().next() {
        None => true,
        Some(c) => !is_name_start(c) || out.to_ascii_lowercase().starts_with("xml"),
    };
    if needs_prefix {
        out.insert(0, '_');
    }
    let changed = out != name;
    (out, changed)
}

fn xml_element(out: &mut String, name: &str, value: &Value) {
    let (tag, changed) = xml_name(name);
    out.push('<');
    out.push_str(&tag);
    if changed {
        out.push_str(" name=\"");
        out.push_str(&xml_escape(name));
        out.push('"');
    }
    match value {
        Value::Null => out.push_str("/>"),
        Value::Array(items) => {
            out.push('>');
            for item in items {
                xml_element(out, "item", item);
            }
            close(out, &tag);
        }
        Value::Object(map) => {
            out.push('>');
            for (k, v) in map {
                xml_element(out, k, v);
            }
            close(out, &tag);
        }
        Value::String(s) => {
            out.push('>');
            out.push_str(&xml_escape(s));
            close(out, &tag);
        }
        other => {
            out.push('>');
            out.push_str(&other.to_string());
            close(out, &tag);
        }
    }
}

fn close(out: &mut String, tag: &str) {
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
}

/// `<records><record key="…" op="…">…</record></records>`.
pub fn render_xml(records: &[DestinationRecord]) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<records>");
    for r in records {
        out.push_str("<record key=\"");
        out.push_str(&xml_escape(&r.key));
        out.push_str("\" op=\"");
        out.push_str(r.op.as_str());
        out.push_str("\">");
        xml_element(&mut out, "profile_id", &Value::String(r.profile_id.clone()));
        if let Some(a) = &r.audience {
            xml_element(&mut out, "audience", &Value::String(a.clone()));
        }
        out.push_str("<identities>");
        for (kind, values) in &r.identities {
            for v in values {
                xml_element(&mut out, kind, &Value::String(v.clone()));
            }
        }
        out.push_str("</identities><traits>");
        for (k, v) in &r.traits {
            xml_element(&mut out, k, v);
        }
        out.push_str("</traits>");
        if let Some(at) = &r.occurred_at {
            xml_element(&mut out, "occurred_at", &Value::String(at.clone()));
        }
        out.push_str("</record>");
    }
    out.push_str("</records>\n");
    out
}

// ---------------------------------------------------------------- CSV

/// Separator of several values of one identity type in one CSV cell.
pub const MULTI_VALUE_SEPARATOR: &str = ";";

fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => text_cell(s),
        other => other.to_string(),
    }
}

/// Text as a CSV cell a spreadsheet shows rather than runs: a leading `=`,
/// `+`, `-`, `@`, tab or carriage return gets a `'` in front (OWASP's advice
/// against CSV injection). Numbers are written as numbers, not through here.
pub fn text_cell(s: &str) -> String {
    let number = s.len() > 1 && s.starts_with(['+', '-']) && s[1..].bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && !number {
        format!("'{s}")
    } else {
        s.to_owned()
    }
}

/// Header `key, op, profile_id, audience`, then identity types and trait
/// names (the union over the batch in first-seen order, or `fields` for the
/// traits when given), then `occurred_at`. A trait whose name is already a
/// column is written as `trait.<name>`. Several values of one identity type
/// share a cell, separated by `;`. Rows end in CRLF; cells are quoted only
/// when needed, quotes doubled (RFC 4180).
pub fn render_csv(records: &[DestinationRecord], fields: Option<&[String]>) -> Result<Vec<u8>, ConnectorError> {
    let mut identity_cols: Vec<&str> = Vec::new();
    let mut trait_cols: Vec<&str> = Vec::new();
    for r in records {
        for k in r.identities.keys() {
            if !identity_cols.contains(&k.as_str()) {
                identity_cols.push(k);
            }
        }
    }
    match fields {
        Some(fields) => trait_cols.extend(fields.iter().map(String::as_str)),
        None => {
            for r in records {
                for k in r.traits.keys() {
                    if !trait_cols.contains(&k.as_str()) {
                        trait_cols.push(k);
                    }
                }
            }
        }
    }
    let mut header: Vec<String> = ["key", "op", "profile_id", "audience"].map(String::from).to_vec();
    header.extend(identity_cols.iter().map(|s| s.to_string()));
    for t in &trait_cols {
        let name = if header.iter().any(|h| h == t) || *t == "occurred_at" {
            format!("trait.{t}")
        } else {
            t.to_string()
        };
        header.push(name);
    }
    header.push("occurred_at".into());

    let err = |e: csv::Error| ConnectorError::internal("csv_write", e.to_string());
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    w.write_record(&header).map_err(err)?;
    for r in records {
        let mut row: Vec<String> = vec![
            text_cell(&r.key),
            r.op.as_str().to_string(),
            text_cell(&r.profile_id),
            text_cell(r.audience.as_deref().unwrap_or_default()),
        ];
        for col in &identity_cols {
            row.push(
                r.identities
                    .get(*col)
                    .map(|v| text_cell(&v.join(MULTI_VALUE_SEPARATOR)))
                    .unwrap_or_default(),
            );
        }
        for col in &trait_cols {
            row.push(r.traits.get(*col).map(cell).unwrap_or_default());
        }
        row.push(r.occurred_at.clone().unwrap_or_default());
        w.write_record(&row).map_err(err)?;
    }
    w.into_inner()
        .map_err(|e| ConnectorError::internal("csv_write", e.to_string()))
}
