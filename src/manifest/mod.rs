//! The manifest: `cdp.yaml` read, interpolated, checked and typed. This is the
//! first stage of everything cdp does: `cdp validate` stops here, every other
//! command starts from the [`Manifest`] it yields.
//!
//! Loading runs in stages and collects every problem on the way:
//! bytes (size, UTF-8) → YAML ([`yaml`]: syntax, depth, aliases, duplicate
//! keys) → `${env:…}` ([`env`]) → JSON Schema ([`schema`]) → typed sections
//! ([`types`]) → semantic rules ([`rules`]: references, expressions, cron,
//! durations, plugin digests, consent label flows). Nothing here touches the
//! network or a database.

pub mod diag;
pub mod diff;
pub mod env;
pub mod lint;
pub mod names;
pub mod rules;
pub mod schema;
pub mod secrets;
pub mod types;
pub mod yaml;

pub use crate::text::suggest;
pub use crate::units;

pub use diag::{Diagnostic, Severity};
pub use types::*;

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Largest manifest accepted. Real manifests are kilobytes; a limit keeps a
/// mistaken or hostile file from costing time and memory.
pub const MAX_BYTES: u64 = 4 << 20;

/// What loading produced: the typed manifest when there are no errors, and every diagnostic.
#[derive(Debug)]
pub struct Loaded {
    pub manifest: Option<Manifest>,
    pub diagnostics: Vec<Diagnostic>,
    /// The text, for rendering source lines (absent when it could not be read).
    pub source: Option<String>,
    /// Where every key and value sits, for checks that run after loading
    /// (plugin configs against the plugins' own schemas).
    pub spans: Option<yaml::SpanIndex>,
    /// The manifest as far as it typed, also when it has errors: entries that
    /// failed are left out. For checks that run after loading, each on the
    /// parts whose inputs are intact.
    pub partial: Option<Manifest>,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// How to load.
pub struct Options<'a> {
    pub env_mode: env::EnvMode,
    /// Environment lookup; the process environment by default.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Directory that relative paths (plugins, mounts) are resolved against.
    pub base_dir: PathBuf,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Options<'static> {
    pub fn validate(base_dir: impl Into<PathBuf>) -> Self {
        Options { env_mode: env::EnvMode::Validate, env: &process_env, base_dir: base_dir.into() }
    }

    pub fn run(base_dir: impl Into<PathBuf>) -> Self {
        Options { env_mode: env::EnvMode::Run, env: &process_env, base_dir: base_dir.into() }
    }
}

/// Could not even start reading the file (exit code 2 territory).
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReadError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// Reads and loads a manifest file.
pub fn load_file(path: &Path, opts: &Options<'_>) -> Result<Loaded, ReadError> {
    use std::io::Read;
    let err = |source| ReadError { path: path.display().to_string(), source };
    let file = std::fs::File::open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    if len > MAX_BYTES {
        return Ok(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_BYTES + 1).read_to_end(&mut bytes).map_err(err)?;
    Ok(load_bytes(&bytes, opts))
}

fn too_large(len: u64) -> Loaded {
    Loaded {
        manifest: None,
        diagnostics: vec![
            Diagnostic::error(
                diag::TOO_LARGE,
                "",
                format!("the manifest is {len} bytes; the limit is {MAX_BYTES} bytes"),
            )
            .at(diag::Loc { line: 1, column: 1 })
            .hint("a manifest describes a deployment, not data: keep data in sources"),
        ],
        source: None,
        spans: None,
        partial: None,
    }
}

/// Loads a manifest from bytes.
pub fn load_bytes(bytes: &[u8], opts: &Options<'_>) -> Loaded {
    if bytes.len() as u64 > MAX_BYTES {
        return too_large(bytes.len() as u64);
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let good = &bytes[..e.valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
            return Loaded {
                manifest: None,
                diagnostics: vec![
                    Diagnostic::error(
                        diag::NOT_UTF8,
                        "",
                        format!(
                            "byte 0x{:02x} at offset {} is not valid UTF-8",
                            bytes[e.valid_up_to()],
                            e.valid_up_to()
                        ),
                    )
                    .at(diag::Loc { line, column })
                    .hint("save the file as UTF-8"),
                ],
                source: None,
                spans: None,
                partial: None,
            };
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut loaded = load_str(text, opts);
    loaded.source = Some(text.to_owned());
    loaded
}

/// Loads a manifest from text.
pub fn load_str(text: &str, opts: &Options<'_>) -> Loaded {
    let doc = yaml::parse(text);
    let mut diagnostics = doc.diagnostics;
    let spans = doc.spans;
    let Some(mut value) = doc.value else {
        return Loaded { manifest: None, diagnostics, source: None, spans: None, partial: None };
    };
    if !value.is_object() {
        let found = match &value {
            Value::Array(_) => "a list",
            Value::Null => "nothing",
            _ => "a single value",
        };
        diagnostics.push(
            Diagnostic::error(
                diag::NOT_A_MAPPING,
                "",
                format!("the manifest must be a mapping of sections, but it is {found}"),
            )
            .at(spans.value(""))
            .hint("start with `version: 1` and `name: …` at the top level, no leading `-`"),
        );
        return Loaded { manifest: None, diagnostics, source: None, spans: None, partial: None };
    }
    // Top-level `x-…` keys are extension fields, ignored: a place to define anchors.
    if let Value::Object(map) = &mut value {
        map.retain(|k, _| !k.starts_with("x-"));
    }
    diagnostics.extend(env::interpolate(&mut value, &spans, opts.env, opts.env_mode));
    diagnostics.extend(schema::check(&value, &spans));
    let (manifest, ghosts) = lenient(&value);
    diagnostics.extend(unreported(&ghosts, &diagnostics, &spans));
    // A rule about a value that salvage changed (it dropped a key inside it)
    // would judge something other than what was written: the schema's
    // diagnostic about the dropped key says what is wrong.
    let changed: Vec<String> = ghosts.dropped.iter().map(|(p, _)| yaml::display_path(p)).collect();
    let judged_as_written = |d: &Diagnostic| {
        !changed
            .iter()
            .any(|c| c == &d.path || c.strip_prefix(d.path.as_str()).is_some_and(|r| r.starts_with(['.', '['])))
    };
    diagnostics.extend(rules::check(&manifest, &ghosts, &spans, &opts.base_dir).into_iter().filter(judged_as_written));
    diagnostics.sort_by(|a, b| (a.line, a.column, a.code).cmp(&(b.line, b.column, b.code)));
    diagnostics.dedup();
    let ok = !diagnostics.iter().any(Diagnostic::is_error);
    let (manifest, partial) = if ok { (Some(manifest), None) } else { (None, Some(manifest)) };
    Loaded { manifest, diagnostics, source: None, spans: Some(spans), partial }
}

/// Names that exist in the file but whose entries failed to type-check. The
/// schema already reported why; the semantic rules must not also call them undefined.
#[derive(Debug, Default)]
pub struct Ghosts {
    names: HashSet<(&'static str, String)>,
    sections: HashSet<&'static str>,
    /// Values that did not type (a whole entry, or a key salvage dropped), by
    /// pointer, with serde's reason: reported when the schema said nothing.
    dropped: Vec<(String, String)>,
}

impl Ghosts {
    /// Whether every entry type-checked.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.sections.is_empty()
    }

    /// Whether references into `section` to `name` should be trusted to exist.
    pub fn covers(&self, section: &'static str, name: &str) -> bool {
        self.sections.contains(section) || self.names.contains(&(section, name.to_owned()))
    }
}

/// Types the document section by section and entry by entry, so one bad entry
/// does not hide the rest from the semantic rules.
fn lenient(v: &Value) -> (Manifest, Ghosts) {
    let mut g = Ghosts::default();
    let get = |k: &str| v.get(k);
    let version = get("version").and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()).unwrap_or(1);
    let name = get("name").and_then(Value::as_str).unwrap_or("").to_owned();
    let mut m = Manifest {
        version,
        name,
        storage: section(get("storage"), "storage", &mut g),
        server: section(get("server"), "server", &mut g),
        plugins: entries(get("plugins"), "plugins", &mut g),
        sources: entries(get("sources"), "sources", &mut g),
        identity: Identity::default(),
        model: Model::default(),
        consent: section(get("consent"), "consent", &mut g),
        audiences: entries(get("audiences"), "audiences", &mut g),
        destinations: entries(get("destinations"), "destinations", &mut g),
        retention: section(get("retention"), "retention", &mut g),
    };
    if let Some(id) = get("identity") {
        m.identity.keys = entries(id.get("keys"), "identity.keys", &mut g);
        m.identity.priority = section(id.get("priority"), "identity.priority", &mut g);
        m.identity.matching = section(id.get("match"), "identity.match", &mut g);
    }
    if let Some(model) = get("model") {
        m.model.traits = entries(model.get("traits"), "traits", &mut g);
        m.model.events = entries(model.get("events"), "events", &mut g);
        m.model.entities = entries(model.get("entities"), "entities", &mut g);
        m.model.computed = entries(model.get("computed"), "computed", &mut g);
        m.model.predicted = entries(model.get("predicted"), "predicted", &mut g);
    }
    (m, g)
}

fn section<T: DeserializeOwned + Default>(v: Option<&Value>, name: &'static str, g: &mut Ghosts) -> T {
    let pointer = section_pointer(name);
    match v {
        None | Some(Value::Null) => T::default(),
        Some(v) => match salvage(v) {
            Ok((t, dropped)) => {
                g.dropped.extend(dropped.into_iter().map(|(k, e)| (format!("{pointer}{k}"), e)));
                t
            }
            Err(e) => {
                g.sections.insert(name);
                g.dropped.push((pointer, e));
                T::default()
            }
        },
    }
}

/// Types an entry, or failing that the entry without the keys that keep it
/// from typing (an unknown key, an optional value of the wrong type; the
/// schema reported them), so one misspelt key does not hide every other
/// problem of the entry from the semantic rules. `None` when even that fails
/// (a required key is missing or wrong).
fn salvage<T: DeserializeOwned>(v: &Value) -> Result<(T, Vec<(String, String)>), String> {
    let first = match T::deserialize(v) {
        Ok(t) => return Ok((t, Vec::new())),
        Err(e) => e.to_string(),
    };
    if !v.is_object() {
        return Err(first);
    }
    let mut doc = v.clone();
    let mut error = first.clone();
    let mut dropped = Vec::new();
    for _ in 0..64 {
        let Some(culprit) = culprit::<T>(&doc, &error) else { return Err(first) };
        remove(&mut doc, &culprit);
        dropped.push((culprit, error));
        match T::deserialize(&doc) {
            Ok(t) => return Ok((t, dropped)),
            Err(e) => error = e.to_string(),
        }
    }
    Err(first)
}

/// The value to drop for `error`: the unknown key serde names, else the
/// first value whose removal clears the error without making a required key
/// missing. Keys inside a mapping value come before the mapping itself, so
/// `collector: {write_keys: 1}` loses `write_keys`, not the whole collector.
fn culprit<T: DeserializeOwned>(doc: &Value, error: &str) -> Option<String> {
    let mut candidates = Vec::new();
    for (k, v) in doc.as_object()? {
        let at = yaml::push_segment("", k);
        if let Value::Object(inner) = v {
            candidates.extend(inner.keys().map(|c| yaml::push_segment(&at, c)));
        }
        candidates.push(at);
    }
    if let Some(name) = unknown_field(error) {
        let named = candidates.iter().find(|c| c.rsplit('/').next() == Some(&yaml::push_segment("", name)[1..]));
        if let Some(c) = named {
            return Some(c.clone());
        }
    }
    candidates.into_iter().find(|c| {
        let mut without = doc.clone();
        remove(&mut without, c);
        T::deserialize(&without).map_or_else(
            |e| {
                let e = e.to_string();
                e != error && !e.starts_with("missing field")
            },
            |_| true,
        )
    })
}

/// Removes the value at a JSON pointer one or two levels deep.
fn remove(doc: &mut Value, pointer: &str) {
    let Some((parent, key)) = pointer.rsplit_once('/') else { return };
    let key = key.replace("~1", "/").replace("~0", "~");
    if let Some(Value::Object(map)) = doc.pointer_mut(parent) {
        map.remove(&key);
    }
}

/// Where a section named in [`Ghosts`] sits in the document.
fn section_pointer(name: &str) -> String {
    match name {
        "traits" | "events" | "entities" | "computed" | "predicted" => format!("/model/{name}"),
        _ => format!("/{}", name.replace('.', "/")),
    }
}

/// Values that did not type although the schema found nothing wrong with
/// them (an integer past its type's range, such as `limit: 99999999999999999999`):
/// errors, so nothing is dropped without a word.
fn unreported(g: &Ghosts, diags: &[Diagnostic], spans: &yaml::SpanIndex) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (pointer, reason) in &g.dropped {
        let path = yaml::display_path(pointer);
        let covered = diags.iter().any(|d| {
            d.is_error()
                && (d.path == path
                    || d.path.strip_prefix(path.as_str()).is_some_and(|r| r.starts_with(['.', '[']))
                    || path.strip_prefix(d.path.as_str()).is_some_and(|r| r.starts_with(['.', '['])))
        });
        if !covered {
            let reason = reason.split(", expected").next().unwrap_or(reason);
            // A number past u64 arrives as a float: say what is wrong with it.
            let reason = if reason.starts_with("invalid type: floating point") {
                format!("{} is not a whole number in range", reason.trim_start_matches("invalid type: floating point "))
            } else {
                reason.to_owned()
            };
            out.push(
                Diagnostic::error(diag::OUT_OF_RANGE, &path, format!("`{path}` cannot be read: {reason}"))
                    .at(spans.value(pointer))
                    .hint("see the field reference in the README for what this value takes"),
            );
        }
    }
    out
}

/// The key of serde's "unknown field `x`, expected …".
fn unknown_field(error: &str) -> Option<&str> {
    error.strip_prefix("unknown field `")?.split('`').next()
}

fn entries<T: DeserializeOwned>(
    v: Option<&Value>,
    name: &'static str,
    g: &mut Ghosts,
) -> indexmap::IndexMap<String, T> {
    let mut out = indexmap::IndexMap::new();
    match v {
        Some(Value::Object(map)) => {
            let section = section_pointer(name);
            for (k, e) in map {
                let pointer = yaml::push_segment(&section, k);
                match salvage(e) {
                    Ok((t, dropped)) => {
                        out.insert(k.clone(), t);
                        g.dropped.extend(dropped.into_iter().map(|(d, e)| (format!("{pointer}{d}"), e)));
                    }
                    Err(e) => {
                        g.names.insert((name, k.clone()));
                        g.dropped.push((pointer, e));
                    }
                }
            }
        }
        None | Some(Value::Null) => {}
        Some(_) => {
            g.sections.insert(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_manifest_loads() {
        let l = load_str("version: 1\nname: shop\n", &Options::validate("."));
        assert!(!l.has_errors(), "{:?}", l.diagnostics);
        let m = l.manifest.unwrap();
        assert_eq!(m.storage.url, "sqlite://.cdp/cdp.db");
    }

    #[test]
    fn list_root_is_refused() {
        let l = load_str("- a\n- b\n", &Options::validate("."));
        assert_eq!(l.diagnostics[0].code, diag::NOT_A_MAPPING);
    }

    #[test]
    fn non_utf8_points_at_the_byte() {
        let l = load_bytes(b"version: 1\nname: \xff\n", &Options::validate("."));
        let d = &l.diagnostics[0];
        assert_eq!((d.code, d.line, d.column), (diag::NOT_UTF8, 2, 7));
    }
}
