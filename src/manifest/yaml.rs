//! YAML reading for the manifest. The event parser of `saphyr-parser` (pure Rust,
//! YAML 1.2) feeds a builder that produces a JSON value plus the position of every
//! key and value, so later stages can point at `file:line:column` by key path.
//!
//! The builder is where hostile input is stopped: nesting depth, the number of
//! values (aliases included, so an alias bomb is cut off early), duplicate keys
//! (reported with both lines; the first value is kept), tags, complex keys and
//! extra documents. Merge keys (`<<: *defaults`) are applied. Scalars resolve
//! by the YAML 1.2 core schema, so `no`, `on` and `yes` are strings, not booleans.

use super::diag::{self, Diagnostic, Loc};
use saphyr_parser::{Event, Marker, Parser, ScalarStyle};
use serde_json::{Map, Number, Value};
use std::collections::HashMap;

/// Deepest nesting of mappings and sequences accepted.
pub const MAX_DEPTH: usize = 64;
/// Most values (scalars, mappings, sequences, counting alias copies) accepted.
pub const MAX_NODES: usize = 250_000;
/// The merge key: `<<: *defaults` copies the keys of an anchored mapping.
const MERGE_KEY: &str = "<<";

/// Where each key and value of the document sits, by JSON pointer.
#[derive(Debug, Default)]
pub struct SpanIndex {
    values: HashMap<String, Loc>,
    keys: HashMap<String, Loc>,
    // Where the text of a one-line scalar starts (after its opening quote).
    inner: HashMap<String, Loc>,
}

impl SpanIndex {
    /// The position of the value at `pointer`, or of its nearest ancestor.
    pub fn value(&self, pointer: &str) -> Loc {
        self.lookup(&self.values, pointer)
    }

    /// The position of the key that names the value at `pointer` (for unknown or
    /// misnamed keys), falling back to the value.
    pub fn key(&self, pointer: &str) -> Loc {
        self.keys.get(pointer).copied().unwrap_or_else(|| self.value(pointer))
    }

    /// The position of the character at `offset` inside the string at
    /// `pointer` (for errors inside audience expressions). Falls back to the
    /// value's start for block and multi-line scalars.
    pub fn inside(&self, pointer: &str, offset: usize) -> Loc {
        match self.inner.get(pointer) {
            Some(l) => Loc { line: l.line, column: l.column + offset },
            None => self.value(pointer),
        }
    }

    /// Whether the document had a value at exactly this pointer.
    pub fn contains(&self, pointer: &str) -> bool {
        self.values.contains_key(pointer)
    }

    fn lookup(&self, map: &HashMap<String, Loc>, pointer: &str) -> Loc {
        let mut p = pointer;
        loop {
            if let Some(loc) = map.get(p) {
                return *loc;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return Loc { line: 1, column: 1 },
            }
        }
    }
}

/// The parsed document: its value (absent if it could not be read at all), the
/// span index, and every problem found on the way.
#[derive(Debug)]
pub struct Document {
    pub value: Option<Value>,
    pub spans: SpanIndex,
    pub diagnostics: Vec<Diagnostic>,
}

/// Appends one escaped JSON pointer segment.
pub fn push_segment(pointer: &str, segment: &str) -> String {
    let mut p = String::with_capacity(pointer.len() + segment.len() + 1);
    p.push_str(pointer);
    p.push('/');
    for c in segment.chars() {
        match c {
            '~' => p.push_str("~0"),
            '/' => p.push_str("~1"),
            c => p.push(c),
        }
    }
    p
}

/// A JSON pointer as the dotted key path shown to users: `/a/b/0` → `a.b[0]`.
pub fn display_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(&seg);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            if seg.is_empty() || seg.contains(['.', ' ', '[', ']', '/']) {
                out.push('"');
                out.push_str(&seg);
                out.push('"');
            } else {
                out.push_str(&seg);
            }
        }
    }
    out
}

fn loc(m: &Marker) -> Loc {
    Loc { line: m.line(), column: m.col() + 1 }
}

enum Frame {
    Seq {
        items: Vec<Value>,
        pointer: String,
        anchor: usize,
    },
    Map {
        map: Map<String, Value>,
        pointer: String,
        anchor: usize,
        key: Option<Key>,
        seen: HashMap<String, Loc>,
        // Values of merge keys (`<<: *defaults`), applied when the mapping ends.
        merges: Vec<(Value, Loc)>,
    },
}

struct Key {
    name: String,
    loc: Loc,
    // A duplicate key's value is parsed (to stay in sync) and then dropped.
    discard: bool,
}

struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Value, usize)>,
    spans: SpanIndex,
    diagnostics: Vec<Diagnostic>,
    nodes: usize,
    root: Option<Value>,
    /// Where each open mapping and sequence began (parallel to `stack`).
    opened: Vec<Loc>,
}

/// Parses `source` into a document. Never panics; every problem is a diagnostic.
pub fn parse(source: &str) -> Document {
    let mut b = Builder {
        stack: Vec::new(),
        anchors: HashMap::new(),
        spans: SpanIndex::default(),
        diagnostics: Vec::new(),
        nodes: 0,
        root: None,
        opened: Vec::new(),
    };
    let mut parser = Parser::new_from_str(source);
    let mut documents = 0;
    loop {
        let (event, span) = match parser.next_event() {
            None => break,
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                let at = loc(e.marker());
                if e.info().contains("recursion limit") {
                    b.diagnostics.push(
                        Diagnostic::error(
                            diag::TOO_DEEP,
                            "",
                            format!("values are nested deeper than {MAX_DEPTH} levels"),
                        )
                        .at(at)
                        .hint("a manifest never needs this depth; check for runaway brackets"),
                    );
                    return b.finish(false);
                }
                let d = match unclosed_flow(source, &b.opened, at) {
                    Some((bracket, open)) => Diagnostic::error(
                        diag::SYNTAX,
                        "",
                        format!(
                            "YAML syntax error: this `{bracket}` is never closed (the parser stopped at line {}: {})",
                            at.line,
                            e.info()
                        ),
                    )
                    .at(open)
                    .hint(format!("close it with `{}`", if bracket == '[' { ']' } else { '}' })),
                    None => Diagnostic::error(diag::SYNTAX, "", format!("YAML syntax error: {}", e.info()))
                        .at(at)
                        .hint("check indentation, quoting and that every `key:` is followed by a space"),
                };
                b.diagnostics.push(d);
                return b.finish(false);
            }
        };
        let at = loc(&span.start);
        match event {
            Event::StreamStart | Event::Nothing | Event::DocumentEnd => {}
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    b.diagnostics.push(
                        Diagnostic::error(diag::MULTI_DOC, "", "the file holds more than one YAML document")
                            .at(at)
                            .hint("a manifest is one document: remove the second `---` and what follows it"),
                    );
                    return b.finish(true);
                }
            }
            Event::Alias(id) => {
                let Some((value, size)) = b.anchors.get(&id).cloned() else {
                    b.diagnostics.push(Diagnostic::error(diag::SYNTAX, "", "alias to an unknown anchor").at(at));
                    return b.finish(false);
                };
                b.nodes += size;
                if b.nodes > MAX_NODES {
                    b.too_many(at);
                    return b.finish(false);
                }
                if !b.value(value, at, 0) {
                    return b.finish(false);
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                b.nodes += 1;
                if b.nodes > MAX_NODES {
                    b.too_many(at);
                    return b.finish(false);
                }
                let forced_string = match tag.as_deref() {
                    None => false,
                    Some(t) if t.handle == "tag:yaml.org,2002:" && t.suffix == "str" => true,
                    Some(t) if t.handle == "!" && t.suffix.is_empty() => true,
                    Some(t) => {
                        b.diagnostics.push(
                            Diagnostic::error(
                                diag::UNSUPPORTED_YAML,
                                "",
                                format!("YAML tag `{}{}` is not supported", t.handle, t.suffix),
                            )
                            .at(at)
                            .hint("remove the tag; quote the value if it must be a string"),
                        );
                        false
                    }
                };
                if let Some(Frame::Map { key: None, .. }) = b.stack.last() {
                    b.set_key(text.into_owned(), at);
                    continue;
                }
                if span.start.line() == span.end.line() {
                    let quote = usize::from(matches!(style, ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted));
                    if quote == 1 || style == ScalarStyle::Plain {
                        let pointer = b.child_pointer();
                        b.spans.inner.insert(pointer, Loc { line: at.line, column: at.column + quote });
                    }
                }
                if style == ScalarStyle::Plain && !forced_string && super::lint::YAML11_BOOLEANS.contains(&&*text) {
                    b.yaml11_boolean(&text, at);
                }
                let value = if forced_string || style != ScalarStyle::Plain {
                    Value::String(text.into_owned())
                } else {
                    resolve_plain(&text)
                };
                if anchor > 0 {
                    b.anchors.insert(anchor, (value.clone(), 1));
                }
                if !b.value(value, at, 0) {
                    return b.finish(false);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                b.nodes += 1;
                if b.nodes > MAX_NODES {
                    b.too_many(at);
                    return b.finish(false);
                }
                if let Some(Frame::Map { key: None, .. }) = b.stack.last() {
                    b.diagnostics.push(
                        Diagnostic::error(diag::UNSUPPORTED_YAML, "", "a mapping key must be a plain value")
                            .at(at)
                            .hint("use a string as the key"),
                    );
                    return b.finish(false);
                }
                if b.stack.len() >= MAX_DEPTH {
                    b.diagnostics.push(
                        Diagnostic::error(
                            diag::TOO_DEEP,
                            "",
                            format!("values are nested deeper than {MAX_DEPTH} levels"),
                        )
                        .at(at)
                        .hint("a manifest never needs this depth; check for runaway brackets"),
                    );
                    return b.finish(false);
                }
                let pointer = b.child_pointer();
                b.spans.values.insert(pointer.clone(), at);
                b.opened.push(at);
                b.stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq { items: Vec::new(), pointer, anchor }
                } else {
                    Frame::Map { map: Map::new(), pointer, anchor, key: None, seen: HashMap::new(), merges: Vec::new() }
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = b.stack.pop() else { continue };
                b.opened.pop();
                let (value, anchor, pointer) = match frame {
                    Frame::Seq { items, pointer, anchor } => (Value::Array(items), anchor, pointer),
                    Frame::Map { mut map, pointer, anchor, merges, .. } => {
                        b.merge(&mut map, &pointer, merges);
                        (Value::Object(map), anchor, pointer)
                    }
                };
                if anchor > 0 {
                    let size = count_nodes(&value);
                    b.anchors.insert(anchor, (value.clone(), size));
                }
                let at = b.spans.values.get(&pointer).copied().unwrap_or(at);
                if !b.value(value, at, 1) {
                    return b.finish(false);
                }
            }
        }
    }
    b.finish(true)
}

impl Builder {
    fn too_many(&mut self, at: Loc) {
        self.diagnostics.push(
            Diagnostic::error(
                diag::TOO_MANY_NODES,
                "",
                format!("the document expands to more than {MAX_NODES} values"),
            )
            .at(at)
            .hint("aliases (`*name`) copy their anchor's whole value; an alias bomb is refused"),
        );
    }

    /// `NO` is the string "NO" here (YAML 1.2) but `false` to YAML 1.1 tools
    /// that may read the same file: a warning, as yamllint's `truthy` rule.
    fn yaml11_boolean(&mut self, text: &str, at: Loc) {
        let path = display_path(&self.child_pointer());
        self.diagnostics.push(
            Diagnostic::warning(
                diag::YAML11_BOOLEAN,
                path,
                format!(
                    "`{text}` is the string \"{text}\" to cdp, but a boolean to YAML 1.1 tools (PyYAML and others)"
                ),
            )
            .at(at)
            .hint(format!("quote it: \"{text}\"")),
        );
    }

    /// The pointer of the value about to be added to the top frame.
    fn child_pointer(&self) -> String {
        match self.stack.last() {
            None => String::new(),
            Some(Frame::Seq { items, pointer, .. }) => push_segment(pointer, &items.len().to_string()),
            Some(Frame::Map { key, pointer, .. }) => {
                push_segment(pointer, key.as_ref().map(|k| k.name.as_str()).unwrap_or(""))
            }
        }
    }

    fn set_key(&mut self, name: String, at: Loc) {
        let Some(Frame::Map { pointer, key, seen, .. }) = self.stack.last_mut() else { return };
        let child = push_segment(pointer, &name);
        let discard = if let Some(first) = seen.get(&name) {
            let path = display_path(&child);
            self.diagnostics.push(
                Diagnostic::error(
                    diag::DUPLICATE_KEY,
                    path,
                    format!("duplicate key `{name}`: first defined on line {}", first.line),
                )
                .at(at)
                .hint("remove one of the two; YAML mappings cannot repeat a key"),
            );
            true
        } else {
            seen.insert(name.clone(), at);
            self.spans.keys.insert(child, at);
            false
        };
        *key = Some(Key { name, loc: at, discard });
    }

    /// Adds a finished value to the top frame (or makes it the root). `nested`
    /// says whether its span was already recorded when its frame opened.
    fn value(&mut self, value: Value, at: Loc, nested: usize) -> bool {
        if nested == 0 {
            let pointer = self.child_pointer();
            self.spans.values.insert(pointer, at);
        }
        match self.stack.last_mut() {
            None => {
                self.root = Some(value);
            }
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map { map, key, merges, .. }) => {
                if let Some(k) = key.take()
                    && !k.discard
                {
                    if k.name == MERGE_KEY {
                        merges.push((value, k.loc));
                    } else {
                        map.insert(k.name, value);
                    }
                }
            }
        }
        true
    }

    /// Applies a mapping's merge keys (YAML 1.1 `<<`, as YAML tools commonly
    /// support it): keys written in the mapping win, then earlier merged
    /// mappings over later ones. Merged keys are located at their `<<`.
    fn merge(&mut self, map: &mut Map<String, Value>, pointer: &str, merges: Vec<(Value, Loc)>) {
        for (value, at) in merges {
            let sources = match value {
                Value::Array(items) if items.iter().all(Value::is_object) => items,
                v @ Value::Object(_) => vec![v],
                _ => {
                    self.diagnostics.push(
                        Diagnostic::error(
                            diag::UNSUPPORTED_YAML,
                            display_path(&push_segment(pointer, MERGE_KEY)),
                            "a merge key (`<<`) takes a mapping or a list of mappings",
                        )
                        .at(at)
                        .hint("merge an anchored mapping: `<<: *defaults`"),
                    );
                    continue;
                }
            };
            for source in sources {
                let Value::Object(source) = source else { continue };
                for (k, v) in source {
                    if !map.contains_key(&k) {
                        let child = push_segment(pointer, &k);
                        self.spans.values.insert(child.clone(), at);
                        self.spans.keys.insert(child, at);
                        map.insert(k, v);
                    }
                }
            }
        }
    }

    fn finish(mut self, complete: bool) -> Document {
        let value = if complete { self.root.take() } else { None };
        if complete && value.is_none() && self.diagnostics.is_empty() {
            self.diagnostics.push(
                Diagnostic::error(diag::EMPTY, "", "the manifest is empty")
                    .at(Loc { line: 1, column: 1 })
                    .hint("start from the quickstart: `version: 1` and `name: …` are required"),
            );
        }
        Document { value, spans: self.spans, diagnostics: self.diagnostics }
    }
}

/// The innermost flow collection (`[` or `{`) still open when the parser
/// failed on a later line: the likely cause, reported where it began rather
/// than where the parser gave up.
fn unclosed_flow(source: &str, opened: &[Loc], failed_at: Loc) -> Option<(char, Loc)> {
    opened.iter().rev().filter(|o| o.line < failed_at.line).find_map(|o| {
        let c = source.lines().nth(o.line.checked_sub(1)?)?.chars().nth(o.column.checked_sub(1)?)?;
        matches!(c, '[' | '{').then_some((c, *o))
    })
}

fn count_nodes(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(count_nodes).sum::<usize>(),
        Value::Object(m) => 1 + m.values().map(count_nodes).sum::<usize>(),
        _ => 1,
    }
}

/// Resolves a plain scalar by the YAML 1.2 core schema.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = s.parse::<u64>() {
            return Value::Number(u.into());
        }
    }
    if let Some(hex) = s.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return Value::Number(i.into());
    }
    if let Some(oct) = s.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return Value::Number(i.into());
    }
    if is_float(s)
        && let Ok(f) = s.parse::<f64>()
        && let Some(n) = Number::from_f64(f)
    {
        return Value::Number(n);
    }
    Value::String(s.to_owned())
}

/// `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`
fn is_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'-' | b'+')));
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let f = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = i - f;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        i += 1;
        if i < b.len() && matches!(b[i], b'-' | b'+') {
            i += 1;
        }
        let e = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == e {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resolves_core_schema_scalars() {
        let doc = parse("a: 1\nb: 1.5\nc: true\nd: no\ne: ~\nf: '1'\ng: 0x1f\nh: on\ni: 1e3\nj: 1.2.3\n");
        // `no` and `on` are strings, with a warning for YAML 1.1 readers of the file.
        let codes: Vec<(&str, usize)> = doc.diagnostics.iter().map(|d| (d.code, d.line)).collect();
        assert_eq!(codes, [(diag::YAML11_BOOLEAN, 4), (diag::YAML11_BOOLEAN, 8)]);
        assert!(doc.diagnostics.iter().all(|d| !d.is_error()));
        assert_eq!(
            doc.value.unwrap(),
            json!({"a": 1, "b": 1.5, "c": true, "d": "no", "e": null, "f": "1", "g": 31, "h": "on", "i": 1000.0, "j": "1.2.3"})
        );
    }

    #[test]
    fn merge_keys_copy_what_the_mapping_does_not_say() {
        let doc = parse("x: &d { a: 1, b: 2 }\ny:\n  <<: *d\n  b: 3\nz:\n  <<: [{ c: 1 }, { c: 2, e: 5 }]\n");
        assert!(doc.diagnostics.is_empty(), "{:?}", doc.diagnostics);
        let v = doc.value.unwrap();
        assert_eq!(v["y"], json!({"a": 1, "b": 3}));
        assert_eq!(v["z"], json!({"c": 1, "e": 5}));
        assert_eq!(doc.spans.value("/y/a"), Loc { line: 3, column: 3 });
        let bad = parse("y:\n  <<: 1\n");
        assert_eq!(bad.diagnostics[0].code, diag::UNSUPPORTED_YAML);
    }

    #[test]
    fn unclosed_flow_is_reported_where_it_opened() {
        let doc =
            parse("version: 1\nname: x\nidentity:\n  priority: [email, phone\n  keys:\n    email: {}\nmodel: {}\n");
        let d = &doc.diagnostics[0];
        assert_eq!((d.code, d.line, d.column), (diag::SYNTAX, 4, 13), "{d:?}");
        assert!(d.message.contains("never closed"), "{d:?}");
    }

    #[test]
    fn records_key_and_value_positions() {
        let doc = parse("version: 1\nsources:\n  web:\n    plugin: csv\n");
        assert_eq!(doc.spans.value("/sources/web/plugin"), Loc { line: 4, column: 13 });
        assert_eq!(doc.spans.key("/sources/web/plugin"), Loc { line: 4, column: 5 });
        assert_eq!(doc.spans.value("/sources/web/plugin/missing"), Loc { line: 4, column: 13 });
    }

    #[test]
    fn duplicate_keys_name_both_lines_and_keep_the_first() {
        let doc = parse("a: 1\nb: 2\na: 3\n");
        assert_eq!(doc.diagnostics.len(), 1);
        let d = &doc.diagnostics[0];
        assert_eq!((d.code, d.line, d.column), (diag::DUPLICATE_KEY, 3, 1));
        assert!(d.message.contains("line 1"));
        assert_eq!(doc.value.unwrap(), json!({"a": 1, "b": 2}));
    }

    #[test]
    fn anchors_and_aliases_copy_values() {
        let doc = parse("base: &b {x: 1}\nother: *b\n");
        assert!(doc.diagnostics.is_empty());
        assert_eq!(doc.value.unwrap(), json!({"base": {"x": 1}, "other": {"x": 1}}));
    }

    #[test]
    fn alias_bomb_is_refused_quickly() {
        let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            s.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        let doc = parse(&s);
        assert!(doc.value.is_none());
        assert_eq!(doc.diagnostics[0].code, diag::TOO_MANY_NODES);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let s = "[".repeat(100_000);
        let doc = parse(&s);
        assert!(doc.value.is_none());
        assert_eq!(doc.diagnostics[0].code, diag::TOO_DEEP);
    }

    #[test]
    fn empty_and_second_documents() {
        assert_eq!(parse("").diagnostics[0].code, diag::EMPTY);
        assert_eq!(parse("# only a comment\n").diagnostics[0].code, diag::EMPTY);
        let doc = parse("a: 1\n---\nb: 2\n");
        assert_eq!(doc.diagnostics[0].code, diag::MULTI_DOC);
        assert_eq!(doc.diagnostics[0].line, 2);
    }

    #[test]
    fn syntax_errors_have_positions() {
        let doc = parse("a: 1\n b: 2\n");
        assert_eq!(doc.diagnostics[0].code, diag::SYNTAX);
        assert_eq!(doc.diagnostics[0].line, 2);
    }

    #[test]
    fn paths_display_dotted() {
        assert_eq!(display_path("/sources/web/map/traits/0"), "sources.web.map.traits[0]");
        assert_eq!(display_path(&push_segment("/mount", "data/x")), "mount.\"data/x\"");
    }
}
