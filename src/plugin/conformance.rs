//! The conformance suite behind `cdp plugin test`: what every connector must
//! do before a manifest may use it. It runs the real component in the real
//! sandbox and reports every check, passed or failed, instead of stopping at
//! the first failure.
//!
//! * Both kinds: `spec` names the plugin, speaks a compatible protocol and
//!   declares known capabilities; its config schema is valid JSON Schema and
//!   the given config satisfies it; `check` accepts the config; a config that
//!   is not even JSON gets a typed `config` error, not a crash.
//! * Sources: a full read pages through to the end (every batch is JSON Lines
//!   of objects with the count it claims, every checkpoint is JSON), and a
//!   read resumed from each checkpoint continues exactly after it.
//! * Destinations: a batch gets a consistent ack (accepted + sparse
//!   rejections = the batch), `flush` succeeds, and `delete` works when the
//!   plugin declares `delete` and answers `unsupported` when it does not.
//!
//! Fixtures (`--fixtures DIR`): `records.jsonl` is the destination batch
//! (default: a built-in sample), `deletes.jsonl` the erasure batch, and
//! `expected.jsonl` the records a source must emit, in order.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::{CAPABILITIES, ErrorClass, Grants, Kind, Plugin, PluginError, ReadEvent, Spec, protocol_compatible};

/// What to run the suite with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The plugin's `config`.
    pub config: Value,
    pub grants: Grants,
    pub fixtures: Option<PathBuf>,
    /// Records per `next` call.
    pub page: u32,
    /// Stop a source read after this many records.
    pub max_records: usize,
    /// Most checkpoints to resume from (spread over the read).
    pub max_resumes: usize,
}

impl Options {
    pub fn new(config: Value, grants: Grants) -> Options {
        Options { config, grants, fixtures: None, page: 100, max_records: 100_000, max_resumes: 20 }
    }
}

/// One check and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// The suite's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kind: Kind,
    pub sha256: String,
    pub spec: Option<Spec>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    fn check(&mut self, name: &'static str, result: Result<String, String>) -> bool {
        let passed = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        self.checks.push(Check { name, passed, detail });
        passed
    }

    /// The report for a person.
    pub fn render(&self, file: &Path) -> String {
        let mut out = String::new();
        match &self.spec {
            Some(s) => out.push_str(&format!(
                "{} ({} {} {}, protocol {})\n",
                file.display(),
                self.kind,
                s.name,
                s.version,
                s.protocol
            )),
            None => out.push_str(&format!("{} ({})\n", file.display(), self.kind)),
        }
        for c in &self.checks {
            out.push_str(&format!("  {:<5} {}: {}\n", if c.passed { "ok" } else { "FAIL" }, c.name, c.detail));
        }
        let failed = self.checks.iter().filter(|c| !c.passed).count();
        out.push_str(&format!("{} checks passed, {failed} failed\n", self.checks.len() - failed));
        out
    }
}

/// Runs the suite on `plugin` as manifest entry `entry`.
pub async fn run(plugin: &Plugin, entry: &str, opts: &Options) -> Report {
    let mut report = Report { kind: plugin.kind(), sha256: plugin.sha256().to_owned(), spec: None, checks: Vec::new() };
    let spec = match plugin.spec_within(entry, opts.grants.memory, opts.grants.timeout).await {
        Ok(s) => s,
        Err(e) => {
            report.check("spec", Err(e.to_string()));
            return report;
        }
    };
    report.check("spec", spec_ok(&spec));
    let schema_ok = report.check("config schema", schema_valid(&spec.config_schema));
    if schema_ok {
        report.check("config matches the schema", config_matches(&spec.config_schema, &opts.config));
    }
    report.spec = Some(spec.clone());
    let check = plugin.check(entry, &opts.grants, &opts.config).await;
    let config_ok = report.check("check accepts the config", check.map(|()| "ok".into()).map_err(|e| e.to_string()));
    report.check("errors are typed", typed_errors(plugin, entry, opts).await);
    if !config_ok {
        return report;
    }
    match plugin.kind() {
        Kind::Source => source_checks(plugin, entry, opts, &mut report).await,
        Kind::Destination => destination_checks(plugin, entry, opts, &spec, &mut report).await,
    }
    report
}

fn spec_ok(s: &Spec) -> Result<String, String> {
    let mut problems = Vec::new();
    if s.name.trim().is_empty() {
        problems.push("the name is empty".to_owned());
    }
    if s.version.split('.').count() != 3 || s.version.split('.').any(|p| p.parse::<u64>().is_err() && !p.contains('-'))
    {
        problems.push(format!("version `{}` is not semver", s.version));
    }
    if !protocol_compatible(&s.protocol) {
        problems.push(format!("protocol `{}` is not compatible with {}", s.protocol, super::PROTOCOL));
    }
    for c in &s.capabilities {
        if !CAPABILITIES.iter().any(|k| k.0 == c) {
            let known: Vec<&str> = CAPABILITIES.iter().map(|k| k.0).collect();
            problems.push(format!("unknown capability `{c}` (known: {})", known.join(", ")));
        }
    }
    if problems.is_empty() {
        Ok(format!("capabilities [{}]", s.capabilities.join(", ")))
    } else {
        Err(problems.join("; "))
    }
}

/// Whether a config schema is a usable JSON Schema describing an object.
pub fn schema_valid(schema: &Value) -> Result<String, String> {
    jsonschema::validator_for(schema).map_err(|e| format!("not a valid JSON Schema: {e}"))?;
    match schema.get("type") {
        Some(Value::String(t)) if t == "object" => Ok("valid JSON Schema of an object".into()),
        None => Ok("valid JSON Schema".into()),
        Some(t) => Err(format!("a config is a mapping, but the schema's type is {t}")),
    }
}

/// Every way `config` breaks `schema`, as `path: message` lines.
pub fn config_errors(schema: &Value, config: &Value) -> Vec<(String, String)> {
    let Ok(v) = jsonschema::validator_for(schema) else {
        return Vec::new();
    };
    v.iter_errors(config).map(|e| (e.instance_path().to_string(), message(&e))).collect()
}

/// The validator's message, except that a value outside an `enum` names
/// every allowed value (the validator names two and counts the rest).
fn message(e: &jsonschema::ValidationError<'_>) -> String {
    match e.kind() {
        jsonschema::error::ValidationErrorKind::Enum { options } => {
            let allowed: Vec<String> = options.as_array().into_iter().flatten().map(Value::to_string).collect();
            format!("{} is not one of {}", e.instance(), allowed.join(", "))
        }
        _ => e.to_string(),
    }
}

fn config_matches(schema: &Value, config: &Value) -> Result<String, String> {
    let errors = config_errors(schema, config);
    if errors.is_empty() {
        return Ok("ok".into());
    }
    Err(errors
        .iter()
        .map(|(p, m)| format!("config{}: {m}", if p.is_empty() { String::new() } else { p.replace('/', ".") }))
        .collect::<Vec<_>>()
        .join("; "))
}

async fn typed_errors(plugin: &Plugin, entry: &str, opts: &Options) -> Result<String, String> {
    let garbage = "{not json";
    let r = match plugin.kind() {
        Kind::Source => match plugin.source(entry, &opts.grants).await {
            Ok(mut i) => i.check_text(garbage).await,
            Err(e) => Err(e),
        },
        Kind::Destination => match plugin.destination(entry, &opts.grants).await {
            Ok(mut i) => i.check_text(garbage).await,
            Err(e) => Err(e),
        },
    };
    match r {
        Err(PluginError::Connector { error, .. }) if error.class == ErrorClass::Config && !error.retryable => {
            Ok(format!("a config that is not JSON gets `config` error `{}`", error.code))
        }
        Err(PluginError::Connector { error, .. }) => {
            Err(format!("a config that is not JSON should be a non-retryable `config` error, got {error}"))
        }
        Err(e) => Err(format!("a config that is not JSON should be a `config` error, got: {e}")),
        Ok(()) => Err("a config that is not JSON was accepted".into()),
    }
}

/// Everything one read emitted: record lines and, per checkpoint, how many
/// records came before it.
#[derive(Default)]
struct Read {
    records: Vec<String>,
    checkpoints: Vec<(usize, String)>,
    truncated: bool,
}

async fn read_all(plugin: &Plugin, entry: &str, opts: &Options, state: Option<&str>) -> Result<Read, String> {
    // An empty `next` ends the read: done for batch sources, idle (caught up)
    // for streaming ones.
    let mut inst = plugin.source(entry, &opts.grants).await.map_err(|e| e.to_string())?;
    inst.open(&opts.config, state).await.map_err(|e| e.to_string())?;
    let mut read = Read::default();
    loop {
        let events = inst.next(opts.page).await.map_err(|e| e.to_string())?;
        if events.is_empty() {
            break;
        }
        for e in events {
            match e {
                ReadEvent::Records { count, ndjson } => {
                    let lines: Vec<&str> = ndjson.lines().filter(|l| !l.trim().is_empty()).collect();
                    if lines.len() != count as usize {
                        return Err(format!("a batch says {count} records but holds {} lines", lines.len()));
                    }
                    for (i, l) in lines.iter().enumerate() {
                        match serde_json::from_str::<Value>(l) {
                            Ok(Value::Object(_)) => read.records.push((*l).to_owned()),
                            Ok(_) => return Err(format!("record {} is not a JSON object", read.records.len() + i)),
                            Err(e) => return Err(format!("record {} is not JSON: {e}", read.records.len() + i)),
                        }
                    }
                }
                ReadEvent::Checkpoint(c) => read.checkpoints.push((read.records.len(), c)),
            }
        }
        if read.records.len() >= opts.max_records {
            read.truncated = true;
            break;
        }
    }
    inst.close().await.map_err(|e| e.to_string())?;
    Ok(read)
}

async fn source_checks(plugin: &Plugin, entry: &str, opts: &Options, report: &mut Report) {
    let full = match read_all(plugin, entry, opts, None).await {
        Ok(r) => r,
        Err(e) => {
            report.check("reads to the end", Err(e));
            return;
        }
    };
    report.check(
        "reads to the end",
        Ok(format!(
            "{} records, {} checkpoints{}",
            full.records.len(),
            full.checkpoints.len(),
            if full.truncated { format!(" (stopped after {} records)", opts.max_records) } else { String::new() }
        )),
    );
    if let Some(expected) = fixture(opts, "expected.jsonl") {
        report.check("emits the expected records", expected.and_then(|want| same_records(&full.records, &want)));
    }
    if full.checkpoints.is_empty() {
        // Whether a source checkpoints can depend on its config (source-csv
        // without `incremental` re-reads the file every run).
        let detail = if full.records.is_empty() {
            "nothing read, nothing to resume"
        } else {
            "no checkpoints with this config: a full refresh, every run re-reads everything"
        };
        report.check("resumes from every checkpoint", Ok(detail.into()));
        return;
    }
    let step = full.checkpoints.len().div_ceil(opts.max_resumes.max(1));
    let mut tried = 0;
    for (at, state) in full.checkpoints.iter().step_by(step.max(1)) {
        tried += 1;
        let resumed = match read_all(plugin, entry, opts, Some(state)).await {
            Ok(r) => r,
            Err(e) => {
                report
                    .check("resumes from every checkpoint", Err(format!("from the checkpoint after record {at}: {e}")));
                return;
            }
        };
        let want = &full.records[*at..];
        let got = &resumed.records[..resumed.records.len().min(want.len())];
        if full.truncated && got == &want[..got.len()] {
            continue;
        }
        if let Err(e) = same_records(&resumed.records, want) {
            report.check(
                "resumes from every checkpoint",
                Err(format!("from the checkpoint after record {at} (`{state}`): {e}")),
            );
            return;
        }
    }
    report.check(
        "resumes from every checkpoint",
        Ok(format!("{tried} of {} checkpoints resumed exactly after themselves", full.checkpoints.len())),
    );
}

fn same_records(got: &[String], want: &[String]) -> Result<String, String> {
    let parse = |s: &String| serde_json::from_str::<Value>(s).ok();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if parse(g) != parse(w) {
            return Err(format!("record {i} is {g}, expected {w}"));
        }
    }
    match got.len().cmp(&want.len()) {
        std::cmp::Ordering::Equal => Ok(format!("{} records as expected", got.len())),
        std::cmp::Ordering::Less => Err(format!("{} records, expected {} (records lost)", got.len(), want.len())),
        std::cmp::Ordering::Greater => {
            Err(format!("{} records, expected {} (records repeated)", got.len(), want.len()))
        }
    }
}

/// The built-in destination batch: the shapes a destination receives.
const SAMPLE_RECORDS: &str = concat!(
    r#"{"key":"conformance-1","op":"enter","profile_id":"p-1","audience":"conformance","identities":{"email":["ada@example.com"],"phone":["+46701234567"]},"traits":{"first_name":"Ada"},"occurred_at":"2026-01-01T00:00:00Z"}"#,
    "\n",
    r#"{"key":"conformance-2","op":"upsert","profile_id":"p-2","identities":{"email":[" Grace@Example.com"]},"traits":{"first_name":"Grace","tier":"gold"},"occurred_at":"2026-01-01T00:00:01Z"}"#,
    "\n",
    r#"{"key":"conformance-3","op":"exit","profile_id":"p-3","audience":"conformance","identities":{"phone":["+1 555 0100"]},"traits":{},"occurred_at":"2026-01-01T00:00:02Z"}"#,
    "\n",
    r#"{"key":"conformance-4","op":"upsert","profile_id":"p-4","identities":{},"traits":{"note":"no identities"},"occurred_at":"2026-01-01T00:00:03Z"}"#,
    "\n",
);

const SAMPLE_DELETES: &str = concat!(
    r#"{"key":"conformance-delete-1","profile_id":"p-1","identities":{"email":["ada@example.com"],"phone":["+46701234567"]}}"#,
    "\n",
);

/// `Some(lines)` when the fixture file exists.
fn fixture(opts: &Options, name: &str) -> Option<Result<Vec<String>, String>> {
    let path = opts.fixtures.as_ref()?.join(name);
    if !path.exists() {
        return None;
    }
    Some(
        std::fs::read_to_string(&path)
            .map(|t| t.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect())
            .map_err(|e| format!("cannot read {}: {e}", path.display())),
    )
}

fn batch(opts: &Options, name: &str, sample: &str) -> Result<Vec<String>, String> {
    fixture(opts, name).unwrap_or_else(|| Ok(sample.lines().map(str::to_owned).collect()))
}

async fn destination_checks(plugin: &Plugin, entry: &str, opts: &Options, spec: &Spec, report: &mut Report) {
    let records = match batch(opts, "records.jsonl", SAMPLE_RECORDS) {
        Ok(r) => r,
        Err(e) => {
            report.check("writes a batch", Err(e));
            return;
        }
    };
    let mut inst = match plugin.destination(entry, &opts.grants).await {
        Ok(i) => i,
        Err(e) => {
            report.check("writes a batch", Err(e.to_string()));
            return;
        }
    };
    if let Err(e) = inst.open(&opts.config).await {
        report.check("writes a batch", Err(e.to_string()));
        return;
    }
    let n = records.len() as u32;
    match inst.write(records.join("\n") + "\n", n).await {
        Ok(ack) => {
            let reasons: Vec<String> =
                ack.rejected.iter().map(|(i, e)| format!("#{i} {} `{}`", e.class.as_str(), e.code)).collect();
            report.check(
                "writes a batch",
                Ok(format!(
                    "{} accepted, {} rejected{}",
                    ack.accepted,
                    ack.rejected.len(),
                    if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) }
                )),
            );
        }
        Err(e) => {
            report.check("writes a batch", Err(e.to_string()));
            return;
        }
    }
    report.check("flush", inst.flush().await.map(|()| "ok".into()).map_err(|e| e.to_string()));
    let deletes = match batch(opts, "deletes.jsonl", SAMPLE_DELETES) {
        Ok(d) => d,
        Err(e) => {
            report.check("delete", Err(e));
            return;
        }
    };
    let declared = spec.capabilities.iter().any(|c| c == "delete");
    let n = deletes.len() as u32;
    let r = inst.delete(deletes.join("\n") + "\n", n).await;
    let r = match (declared, r) {
        (true, Ok(ack)) => Ok(format!("{} erased, {} refused", ack.accepted, ack.rejected.len())),
        (true, Err(PluginError::Connector { error, .. })) if error.class == ErrorClass::Unsupported => {
            Ok(format!("declared, but this config does not enable it: {}", error.message))
        }
        (true, Err(e)) => Err(format!("declares `delete` but: {e}")),
        (false, Err(PluginError::Connector { error, .. })) if error.class == ErrorClass::Unsupported => {
            Ok("not declared, answers `unsupported`".into())
        }
        (false, Err(e)) => Err(format!("without the `delete` capability it must answer `unsupported`, got: {e}")),
        (false, Ok(_)) => Err("erases without declaring the `delete` capability".into()),
    };
    report.check("delete", r);
    let _ = inst.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_outside_an_enum_names_every_allowed_value() {
        let schema = serde_json::json!({"properties": {"format": {"enum": ["json", "ndjson", "csv", "xml"]}}});
        let errors = config_errors(&schema, &serde_json::json!({"format": "yaml"}));
        assert_eq!(
            errors,
            vec![("/format".to_owned(), r#""yaml" is not one of "json", "ndjson", "csv", "xml""#.to_owned())]
        );
    }
}
