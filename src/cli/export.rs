//! `cdp export profiles|records [--format jsonl|csv] [--out F]`: the golden
//! records, or every ingested record with the profile it belongs to, streamed
//! page by page to a file or standard output (what a data team loads into its
//! warehouse). Progress goes to stderr. With `--out`, the file appears only
//! when the export is complete.

use super::{connect, load_manifest};
use crate::manifest::Manifest;
use crate::profile::GoldenRecord;
use crate::store::Store;
use crate::store::export::RecordRow;
use anyhow::{Context, Result};
use clap::ValueEnum;
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Profiles read per page (each is a golden record: several queries).
const PROFILE_PAGE: usize = 500;
/// Records read per page.
const RECORD_PAGE: usize = 5_000;

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// A header row, then one row per profile or record.
    Csv,
}

/// What to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Profiles,
    Records,
}

pub struct Args<'a> {
    pub manifest: &'a Path,
    pub what: What,
    pub format: ExportFormat,
    pub out: Option<&'a Path>,
    pub quiet: bool,
}

/// Where rows go: standard output, or a temporary file renamed to `--out` at the end.
enum Sink {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(std::io::BufWriter<tempfile::NamedTempFile>),
}

impl Sink {
    fn open(out: Option<&Path>) -> Result<Sink> {
        let Some(path) = out else { return Ok(Sink::Stdout(std::io::BufWriter::new(std::io::stdout()))) };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot create a file in {} for {}", dir.display(), path.display()))?;
        Ok(Sink::File(std::io::BufWriter::with_capacity(1 << 20, tmp)))
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File(w) => w,
        }
    }

    fn finish(self, out: Option<&Path>) -> Result<()> {
        match (self, out) {
            (Sink::Stdout(mut w), _) => Ok(w.flush()?),
            (Sink::File(w), Some(path)) => {
                let tmp = w.into_inner().map_err(|e| e.into_error())?;
                tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
                Ok(())
            }
            (Sink::File(_), None) => Ok(()),
        }
    }
}

pub async fn run(a: Args<'_>) -> Result<()> {
    let r = load_manifest(a.manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    let store = connect(m, base).await?;
    let started = Instant::now();
    let (total, noun) = match a.what {
        What::Profiles => (store.profile_count().await?, "profiles"),
        What::Records => (store.record_count().await?, "records"),
    };
    // A bulk read of personal data: the audit row comes first, and without
    // it nothing is exported.
    let action = format!("export.{noun}");
    let target = a.out.map_or_else(|| "stdout".to_owned(), |p| p.display().to_string());
    super::audit::record(&store, &action, &target, "started")
        .await
        .context("cannot write the audit log; nothing is exported without it")?;
    let progress = progress_bar(total.max(0) as u64, noun, a.quiet);
    let mut sink = Sink::open(a.out)?;
    let written = match a.what {
        What::Profiles => profiles(&store, &r, a.format, sink.writer(), &progress).await?,
        What::Records => records(&store, a.format, sink.writer(), &progress).await?,
    };
    sink.finish(a.out)?;
    progress.finish_and_clear();
    if let Err(e) = super::audit::record(&store, &action, &target, &format!("ok: {written} {noun}")).await {
        tracing::warn!(error = %e, "the export finished but its closing audit row could not be written");
    }
    if !a.quiet {
        let secs = started.elapsed().as_secs_f64();
        let to = a.out.map_or_else(|| "standard output".to_owned(), |p| p.display().to_string());
        eprintln!("exported {written} {noun} to {to} in {secs:.2}s ({:.0} {noun}/s)", written as f64 / secs.max(1e-9));
    }
    Ok(())
}

fn progress_bar(total: u64, noun: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    let template = format!("{{bar:30}} {{pos}}/{{len}} {noun} [{{elapsed}}] {{per_sec}}");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Rows out, in the chosen format; both write through small buffers, so
/// memory stays at one page whatever the size of the export.
enum Rows<'w> {
    Csv(Box<csv::Writer<&'w mut dyn Write>>),
    Jsonl(&'w mut dyn Write),
}

impl<'w> Rows<'w> {
    fn new(format: ExportFormat, out: &'w mut dyn Write, header: &[String]) -> Result<Self> {
        Ok(match format {
            ExportFormat::Csv => {
                let mut w = csv::Writer::from_writer(out);
                w.write_record(header)?;
                Rows::Csv(Box::new(w))
            }
            ExportFormat::Jsonl => Rows::Jsonl(out),
        })
    }

    fn row(&mut self, cells: impl FnOnce() -> Vec<String>, json: impl FnOnce() -> Result<Value>) -> Result<()> {
        match self {
            Rows::Csv(w) => w.write_record(cells())?,
            Rows::Jsonl(out) => {
                serde_json::to_writer(&mut **out, &json()?)?;
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if let Rows::Csv(mut w) = self {
            w.flush()?;
        }
        Ok(())
    }
}

async fn profiles(
    store: &Store,
    r: &crate::resolved::Resolved,
    format: ExportFormat,
    out: &mut dyn Write,
    progress: &indicatif::ProgressBar,
) -> Result<u64> {
    let (m, model) = (&*r.manifest, &r.model);
    let columns = ProfileColumns::new(m);
    let mut rows = Rows::new(format, out, &columns.header)?;
    let mut after = i64::MIN;
    let mut written = 0u64;
    loop {
        let page = store.live_profile_page(after, PROFILE_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = *last;
        let now = crate::store::now_ms();
        for r in store.profile_rows_many(&page).await? {
            let g = crate::profile::golden_record(m, model, r, 0, now);
            rows.row(|| columns.row(&g), || profile_json(&g))?;
            written += 1;
        }
        progress.set_position(written);
    }
    rows.finish()?;
    Ok(written)
}

/// A golden record as one export line: `profile get --format json` without recent events.
fn profile_json(g: &GoldenRecord) -> Result<Value> {
    let mut v = serde_json::to_value(g)?;
    if let Value::Object(o) = &mut v {
        o.remove("events");
    }
    Ok(v)
}

/// CSV columns of a profile: `profile_id`, `id.<key>` per identity key
/// (values joined by `|`), `trait.<name>`, `computed.<name>`,
/// `consent.<purpose>` (`true`/`false`), `audiences` (joined by `|`).
struct ProfileColumns {
    header: Vec<String>,
    keys: Vec<String>,
    traits: Vec<String>,
    computed: Vec<String>,
    purposes: Vec<String>,
}

impl ProfileColumns {
    fn new(m: &Manifest) -> Self {
        let keys: Vec<String> = m.identity.keys.keys().cloned().collect();
        let traits: Vec<String> = m.model.traits.keys().cloned().collect();
        let computed: Vec<String> = m.model.computed.keys().cloned().collect();
        let purposes: Vec<String> = m.consent.purposes.clone();
        let mut header = vec!["profile_id".to_owned()];
        header.extend(keys.iter().map(|k| format!("id.{k}")));
        header.extend(traits.iter().map(|t| format!("trait.{t}")));
        header.extend(computed.iter().map(|c| format!("computed.{c}")));
        header.extend(purposes.iter().map(|p| format!("consent.{p}")));
        header.push("audiences".to_owned());
        ProfileColumns { header, keys, traits, computed, purposes }
    }

    fn row(&self, g: &GoldenRecord) -> Vec<String> {
        let mut row = Vec::with_capacity(self.header.len());
        row.push(g.profile_id.clone());
        for k in &self.keys {
            let values: Vec<&str> = g.identities.iter().filter(|i| i.key == *k).map(|i| i.value.as_str()).collect();
            row.push(values.join("|"));
        }
        for t in &self.traits {
            row.push(g.traits.get(t).map(|v| cell(&v.value)).unwrap_or_default());
        }
        for c in &self.computed {
            row.push(g.computed.get(c).map(cell).unwrap_or_default());
        }
        for p in &self.purposes {
            row.push(g.consent.get(p).map(|c| c.granted.to_string()).unwrap_or_default());
        }
        row.push(g.audiences.join("|"));
        row
    }
}

/// A JSON value as a CSV cell: text as is, null empty, lists joined by `|`, others as JSON.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join("|"),
        other => other.to_string(),
    }
}

async fn records(
    store: &Store,
    format: ExportFormat,
    out: &mut dyn Write,
    progress: &indicatif::ProgressBar,
) -> Result<u64> {
    let header: Vec<String> = ["source", "message_id", "at", "kind", "name", "profile_id", "key", "value"]
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
    let mut rows = Rows::new(format, out, &header)?;
    let mut after = None;
    let mut written = 0u64;
    loop {
        let page = store.records_after(after.as_ref(), RECORD_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some((last.source.clone(), last.message_id.clone()));
        for r in &page {
            rows.row(|| record_cells(r), || Ok(record_json(r)))?;
        }
        written += page.len() as u64;
        progress.set_position(written);
    }
    rows.finish()?;
    Ok(written)
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn record_json(r: &RecordRow) -> Value {
    json!({
        "source": r.source,
        "message_id": r.message_id,
        "at": iso(r.at),
        "kind": r.kind,
        "name": r.name,
        "profile_id": r.profile_id.to_string(),
        "identity": {"type": r.key, "value": r.value},
    })
}

fn record_cells(r: &RecordRow) -> Vec<String> {
    vec![
        r.source.clone(),
        r.message_id.clone(),
        iso(r.at),
        r.kind.clone(),
        r.name.clone().unwrap_or_default(),
        r.profile_id.to_string(),
        r.key.clone(),
        r.value.clone(),
    ]
}
