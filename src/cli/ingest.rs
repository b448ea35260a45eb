//! `cdp ingest SOURCE --file F`: load a JSON Lines or CSV file as if SOURCE
//! had produced it. Reading, mapping and preparing batches run on their own
//! thread; each batch is applied in one transaction with the file's cursor.

use super::{connect, load_manifest};
use crate::ingest::{Mapper, Rejection, file, pipeline};
use crate::store::ingest::{Batch, BatchReport};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

pub struct Args<'a> {
    pub manifest: &'a Path,
    pub source: &'a str,
    pub file: &'a Path,
    /// The largest batch; the backend's default when `None`
    /// ([`pipeline::default_batch`]).
    pub batch: Option<usize>,
    pub resume: bool,
    pub rejects: Option<&'a Path>,
    pub quiet: bool,
    /// Run probabilistic matching afterwards when the manifest configures it.
    pub run_match: bool,
}

/// How many rejected lines an ingest tolerates (`--max-rejects N` or `P%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RejectLimit {
    Lines(u64),
    /// Percent of the lines read in this run.
    Percent(f64),
}

impl std::str::FromStr for RejectLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("`{s}` is neither a number of lines (`100`) nor a percentage (`2.5%`)");
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(RejectLimit::Percent(p)),
                _ => Err(bad()),
            },
            None => s.parse().map(RejectLimit::Lines).map_err(|_| bad()),
        }
    }
}

impl std::fmt::Display for RejectLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectLimit::Lines(n) => write!(f, "{n} lines"),
            RejectLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl RejectLimit {
    /// Whether `rejected` of `read` lines is more than the limit allows.
    pub fn exceeded(&self, rejected: u64, read: u64) -> bool {
        match *self {
            RejectLimit::Lines(n) => rejected > n,
            RejectLimit::Percent(p) => read > 0 && rejected as f64 * 100.0 > p * read as f64,
        }
    }
}

/// Exit code of an ingest that ran to the end but rejected more lines than `--max-rejects` allows.
pub const EXIT_TOO_MANY_REJECTS: u8 = 3;

impl Summary {
    /// Lines this run read (not those a `--resume` skipped).
    pub fn read(&self) -> u64 {
        self.lines.saturating_sub(self.skipped)
    }

    /// `Some(message)` when the rejections exceed `limit`.
    pub fn over_limit(&self, limit: Option<RejectLimit>) -> Option<String> {
        let limit = limit?;
        limit.exceeded(self.rejected, self.read()).then(|| {
            let pct = self.rejected as f64 * 100.0 / self.read().max(1) as f64;
            format!(
                "{} of {} lines rejected ({pct:.1}%), more than --max-rejects {limit} allows; \
                 the accepted records are stored",
                self.rejected,
                self.read()
            )
        })
    }
}

/// What an ingest did, for the summary and for benchmarks.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Records read (a CSV header is none), skipped ones not counted.
    pub lines: u64,
    pub rejected: u64,
    pub skipped: u64,
    pub dropped_ids: u64,
    pub report: BatchReport,
    pub seconds: f64,
}

pub async fn run(a: Args<'_>) -> Result<Summary> {
    let r = load_manifest(a.manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    // Check the source before touching the database.
    Mapper::new(m, a.source).map_err(anyhow::Error::msg)?;
    // And the file: a directory or a device is refused here.
    let canonical = a.file.canonicalize().with_context(|| format!("cannot open {}", a.file.display()))?;
    let lines = file::open(&canonical).with_context(|| format!("cannot open {}", a.file.display()))?;
    let store = connect(m, base).await?;
    super::record_applied(&store, a.manifest, "cdp ingest").await?;
    let cfg = &r.identity;
    let stream = format!("file:{}:{}", a.source, canonical.display());
    let start_after: u64 =
        if a.resume { store.cursor(&stream).await?.and_then(|p| p.parse().ok()).unwrap_or(0) } else { 0 };
    let mut rejects_out = match a.rejects {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };

    let progress = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} lines read, {msg} [{elapsed}] {per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    };

    // The reader thread maps records and prepares batches; this task writes them.
    // (records, rejections, last line, lines skipped, identifiers dropped, records read)
    type Chunk = (Batch, Vec<(u64, Rejection)>, u64, u64, u64, u64);
    let (tx, mut rx) = pipeline::handoff::<Chunk>();
    let manifest = m.clone();
    let source = a.source.to_owned();
    let max_batch = a.batch.unwrap_or_else(|| pipeline::default_batch(store.backend()));
    let reader_cfg = cfg.clone();
    let reader = std::thread::spawn(move || -> Result<()> {
        let mut mapper = Mapper::new(&manifest, &source).map_err(anyhow::Error::msg)?;
        let now = crate::store::now_ms();
        let (mut recs, mut rejs) = (pipeline::Batcher::new(max_batch), Vec::new());
        let mut last_line = 0u64;
        let mut skipped = 0u64;
        let mut read = 0u64;
        for (line, rec) in lines {
            last_line = line;
            if line <= start_after {
                skipped += 1;
                continue;
            }
            read += 1;
            let full = match rec.and_then(|v| mapper.map(&v, now)) {
                Ok(r) => recs.push(r),
                Err(e) => {
                    rejs.push((line, e));
                    None
                }
            };
            if let Some(full) = full {
                let dropped = std::mem::take(&mut mapper.dropped_ids);
                let prepared = Batch::prepare(full, &reader_cfg);
                let batch = (prepared, std::mem::take(&mut rejs), last_line, skipped, dropped, read);
                (skipped, read) = (0, 0);
                if !tx.send(batch) {
                    return Ok(());
                }
            }
        }
        let dropped = std::mem::take(&mut mapper.dropped_ids);
        tx.send((Batch::prepare(recs.finish(), &reader_cfg), rejs, last_line, skipped, dropped, read));
        Ok(())
    });

    let started = Instant::now();
    let mut s = Summary::default();
    let mut shown = 0;
    while let Some((recs, rejs, last_line, skipped, dropped, read)) = rx.recv().await {
        s.skipped += skipped;
        s.dropped_ids += dropped;
        s.lines += read;
        s.rejected += rejs.len() as u64;
        for (line, reason) in &rejs {
            if let Some(out) = rejects_out.as_mut() {
                let row = serde_json::json!({"line": line, "code": reason.code, "field": reason.field, "reason": reason.message});
                writeln!(out, "{row}")?;
            }
            // Shown under --quiet too: it silences progress, not failures.
            if shown < 20 {
                progress.suspend(|| eprintln!("{}:{line}: rejected: {reason}", a.file.display()));
                shown += 1;
            }
        }
        let position = last_line.to_string();
        let r = pipeline::apply(&store, cfg, recs, Some((&stream, &position)), None, "cli").await?;
        s.report.add(&r);
        progress.set_position(last_line);
        progress.set_message(format!("{} accepted, {} rejected", s.report.accepted, s.rejected));
    }
    reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    progress.finish_and_clear();
    if let Some(mut out) = rejects_out {
        out.flush()?;
    }
    s.seconds = started.elapsed().as_secs_f64();
    // New records, or a matching run a crash interrupted, leave matching pending.
    if a.run_match && m.identity.matching.is_some() && store.matching_pending().await? {
        let started = Instant::now();
        let r = store.match_pending(m).await?;
        if !a.quiet {
            print_match(&r)?;
            outln!("  matching took {:.2}s", started.elapsed().as_secs_f64());
        }
    }
    if s.rejected > 20 {
        eprintln!(
            "… {} more rejections{}",
            s.rejected - 20,
            if a.rejects.is_some() { " in the rejects file" } else { "; pass --rejects FILE for all" }
        );
    }
    if !a.quiet {
        print_summary(a.source, &s)?;
    } else if s.rejected > 0 {
        eprintln!("{} of {} records rejected", s.rejected, s.lines);
    }
    Ok(s)
}

pub(crate) fn print_match(r: &crate::store::matching::MatchReport) -> Result<()> {
    // λ is the prior that two random profiles match: tiny (about one in the
    // number of profiles), so it is shown with its exponent and as the number
    // of matches it implies.
    let pairs = r.profiles as f64 * (r.profiles as f64 - 1.0) / 2.0;
    outln!(
        "probabilistic matching: {} profiles compared, {} candidate pairs{}, λ = {:.3e} (≈{:.0} matching pairs expected)",
        r.profiles,
        r.candidates,
        if r.skipped_blocks > 0 { format!(" ({} oversize blocks skipped)", r.skipped_blocks) } else { String::new() },
        r.lambda,
        r.lambda * pairs.max(0.0)
    );
    outln!(
        "  {} pairs above the threshold: {} merges, {} limit conflicts, {} already linked",
        r.links,
        r.batch.merges,
        r.batch.conflicts,
        r.batch.duplicates
    );
    Ok(())
}

fn print_summary(source: &str, s: &Summary) -> Result<()> {
    let r = &s.report;
    outln!(
        "ingested {} record{} into `{source}` in {:.2}s ({:.0} records/s)",
        s.lines,
        if s.lines == 1 { "" } else { "s" },
        s.seconds,
        r.accepted as f64 / s.seconds.max(1e-9)
    );
    outln!("  accepted        {}", r.accepted);
    outln!("  duplicates      {} (already stored, skipped by message id)", r.duplicates);
    outln!("  rejected        {}", s.rejected);
    if s.skipped > 0 {
        outln!("  resumed after   {} lines", s.skipped);
    }
    outln!("  new profiles    {}", r.new_profiles);
    outln!("  merges          {}", r.merges);
    outln!("  splits          {}", r.splits);
    outln!("  limit conflicts {}", r.conflicts);
    outln!("  identifiers dropped (placeholders, blocklisted, malformed) {}", s.dropped_ids);
    Ok(())
}
