//! `cdp bench ingest`: records per second through the whole ingest path
//! (mapping, normalisation, deduplication, identity resolution, trait folding,
//! one durable transaction per batch) next to the raw insert rate of the same
//! records into the same database in the same run — the physical limit of this
//! design — and, on PostgreSQL, next to COPY.

use super::people::{self, Labeled};
use crate::ingest::Mapper;
use crate::ingest::pipeline::{self, Batcher};
use crate::manifest::{self, Manifest};
use crate::store::ingest::{Batch, BatchReport, IdentityConfig};
use crate::store::{Backend, Store, values_clause};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

const PER_PERSON: usize = 10;

/// Peak resident memory of this process so far, in MiB (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn bench_manifest() -> Result<Manifest> {
    let l = manifest::load_str(people::MANIFEST, &manifest::Options::validate("."));
    l.manifest.context("the benchmark manifest is invalid")
}

/// Generates the records of `n` records' worth of people, chunk by chunk.
fn chunks(n: usize) -> impl Iterator<Item = Vec<Labeled>> {
    let ppl = people::people(42, n.div_ceil(PER_PERSON));
    let total = ppl.len();
    (0..total).step_by(500).map(move |i| people::records(42 + i as u64, &ppl[i..(i + 500).min(total)], PER_PERSON))
}

/// Runs cdp's ingest path over `n` generated records into `store`.
pub async fn run_cdp(store: &Store, n: usize, batch_size: usize) -> Result<(BatchReport, f64, u64)> {
    let m = bench_manifest()?;
    let cfg = IdentityConfig::from_manifest(&m);
    let reader_cfg = cfg.clone();
    let (tx, mut rx) = pipeline::handoff::<(Batch, u64)>();
    let producer = std::thread::spawn(move || -> Result<()> {
        let mut mappers: Vec<(&str, Mapper<'_>)> = ["crm", "web", "pos"]
            .into_iter()
            .map(|s| Mapper::new(&m, s).map(|mp| (s, mp)).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?;
        let mut batch = Batcher::new(batch_size);
        let mut rejected = 0;
        let mut sent = 0usize;
        'outer: for chunk in chunks(n) {
            for l in chunk {
                if sent >= n {
                    break 'outer;
                }
                sent += 1;
                let Some((_, mapper)) = mappers.iter_mut().find(|(s, _)| *s == l.source) else { continue };
                let full = match mapper.map(&l.record, 0) {
                    Ok(r) => batch.push(r),
                    Err(_) => {
                        rejected += 1;
                        None
                    }
                };
                if let Some(full) = full {
                    if !tx.send((Batch::prepare(full, &reader_cfg), rejected)) {
                        return Ok(());
                    }
                    rejected = 0;
                }
            }
        }
        tx.send((Batch::prepare(batch.finish(), &reader_cfg), rejected));
        Ok(())
    });
    let start = Instant::now();
    let mut total = BatchReport::default();
    let mut rejected = 0;
    while let Some((batch, rej)) = rx.recv().await {
        rejected += rej;
        total.add(&store.apply_batch(&cfg, batch, None).await?);
    }
    producer.join().map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
    Ok((total, start.elapsed().as_secs_f64(), rejected))
}

/// The baseline: the same records as rows (source, message id, time, JSON)
/// appended with multi-row INSERTs, one transaction per batch.
pub async fn run_raw(store: &Store, n: usize, batch_size: usize) -> Result<f64> {
    let rows = chunks(n).flatten().take(n).map(|l| {
        let id = l.record["id"].as_str().unwrap_or_default().to_owned();
        let at = l.record["at"].as_str().unwrap_or_default().to_owned();
        (l.source.to_owned(), id, at, l.record.to_string())
    });
    insert_raw(store, rows, batch_size).await
}

/// A row of the raw baseline: source, message id, time, the record as JSON.
pub type RawRow = (String, String, String, String);

/// Appends `rows` to a new `raw_records` table of `store` with multi-row
/// INSERTs, in transactions of the sizes `cdp ingest` ramps through (a
/// thread produces the next batch while one is written, as `cdp ingest`'s
/// reader does); the seconds the writes took.
pub async fn insert_raw(
    store: &Store,
    rows: impl Iterator<Item = RawRow> + Send + 'static,
    batch_size: usize,
) -> Result<f64> {
    sqlx::query("CREATE TABLE raw_records (source TEXT NOT NULL, message_id TEXT NOT NULL, at TEXT, payload TEXT NOT NULL, PRIMARY KEY (source, message_id))")
        .execute(store.pool())
        .await?;
    let (tx, mut rx) = pipeline::handoff::<Vec<RawRow>>();
    let producer = std::thread::spawn(move || {
        let mut batch = Batcher::new(batch_size);
        for row in rows {
            if let Some(full) = batch.push(row)
                && !tx.send(full)
            {
                return;
            }
        }
        tx.send(batch.finish());
    });
    let start = Instant::now();
    while let Some(batch) = rx.recv().await {
        let mut t = store.pool().begin().await?;
        for rows in batch.chunks(500) {
            let sql = format!(
                "INSERT INTO raw_records (source, message_id, at, payload) VALUES {}",
                values_clause(rows.len(), 4)
            );
            let sql = store.sql(&sql).into_owned();
            let mut q = sqlx::query(&sql);
            for (s, id, at, p) in rows {
                q = q.bind(s.as_str()).bind(id.as_str()).bind(at.as_str()).bind(p.as_str());
            }
            q.execute(&mut *t).await?;
        }
        t.commit().await?;
    }
    let _ = producer.join();
    Ok(start.elapsed().as_secs_f64())
}

/// PostgreSQL only: COPY of the same rows, the fastest way in.
pub async fn run_copy(url: &str, n: usize) -> Result<f64> {
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::query("CREATE TABLE copy_records (source TEXT NOT NULL, message_id TEXT NOT NULL, at TEXT, payload TEXT NOT NULL, PRIMARY KEY (source, message_id))")
        .execute(&pool)
        .await?;
    let start = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut copy =
        conn.copy_in_raw("COPY copy_records (source, message_id, at, payload) FROM STDIN WITH (FORMAT csv)").await?;
    let mut sent = 0usize;
    let mut buf = String::with_capacity(1 << 20);
    'outer: for chunk in chunks(n) {
        for l in chunk {
            if sent >= n {
                break 'outer;
            }
            sent += 1;
            let payload = l.record.to_string().replace('"', "\"\"");
            let _ = writeln!(
                buf,
                "{},{},{},\"{payload}\"",
                l.source,
                l.record["id"].as_str().unwrap_or_default(),
                l.record["at"].as_str().unwrap_or_default()
            );
            if buf.len() > (1 << 20) {
                copy.send(buf.as_bytes()).await?;
                buf.clear();
            }
        }
    }
    copy.send(buf.as_bytes()).await?;
    copy.finish().await?;
    Ok(start.elapsed().as_secs_f64())
}

/// PostgreSQL only: the server's own floor under any ingest that keeps what
/// cdp keeps. After `run_cdp`, every table it wrote (rows cdp stored:
/// records, identifiers, links, trait observations, profiles, outbox …) is
/// copied server-side into an empty table with the same columns, defaults
/// and indexes, in one transaction: no client, no parsing, no lookups, no
/// resolution — only writing those rows and their index entries. Returns
/// the seconds and the rows written.
pub async fn run_store_floor(url: &str) -> Result<(f64, u64)> {
    let pool = sqlx::PgPool::connect(url).await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relpersistence = 'p' \
         AND c.relname NOT LIKE 'cdp\\_%' AND c.relname NOT IN ('raw_records', 'copy_records') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    sqlx::query("CREATE SCHEMA floor").execute(&pool).await?;
    let mut written = Vec::new();
    for t in tables {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {t}")).fetch_one(&pool).await?;
        if rows > 0 {
            sqlx::query(&format!("CREATE TABLE floor.{t} (LIKE {t} INCLUDING ALL)")).execute(&pool).await?;
            written.push((t, rows as u64));
        }
    }
    let start = Instant::now();
    let mut tx = pool.begin().await?;
    for (t, _) in &written {
        sqlx::query(&format!("INSERT INTO floor.{t} SELECT * FROM {t}")).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    let secs = start.elapsed().as_secs_f64();
    sqlx::query("DROP SCHEMA floor CASCADE").execute(&pool).await?;
    pool.close().await;
    Ok((secs, written.iter().map(|(_, n)| n).sum()))
}

/// Runs the benchmark on SQLite in `dir`, and on PostgreSQL when `pg` names a
/// server database to create scratch databases from.
/// `batch` is the largest batch, each backend's default when `None`.
pub async fn run(n: usize, batch: Option<usize>, dir: &Path, pg: Option<&str>) -> Result<String> {
    let mut out = String::new();
    let sizes = |backend| batch.unwrap_or_else(|| pipeline::default_batch(backend)).max(1);
    let _ = writeln!(
        out,
        "cdp bench ingest: {n} generated records ({} people, ~{PER_PERSON} records each), up to {} per transaction{}",
        n.div_ceil(PER_PERSON),
        sizes(Backend::Sqlite),
        if pg.is_some() && batch.is_none() {
            format!(" ({} on PostgreSQL)", sizes(Backend::Postgres))
        } else {
            String::new()
        }
    );
    let batch = sizes(Backend::Sqlite);
    let cdp_db = dir.join("cdp.db");
    let raw_db = dir.join("raw.db");
    for p in [&cdp_db, &raw_db] {
        let _ = std::fs::remove_file(p);
    }
    let store = Store::connect(&format!("sqlite://{}", cdp_db.display()), dir).await?;
    let (report, secs, rejected) = run_cdp(&store, n, batch).await?;
    let rss = peak_rss_mib().unwrap_or(0.0);
    let raw_store = Store::connect(&format!("sqlite://{}", raw_db.display()), dir).await?;
    let raw_secs = run_raw(&raw_store, n, batch).await?;
    report_lines(
        &mut out,
        "SQLite (WAL, synchronous=FULL)",
        &report,
        rejected,
        secs,
        raw_secs,
        "raw multi-row INSERT",
        rss,
    );
    if let Some(admin) = pg {
        let name = format!("cdp_bench_{}", std::process::id());
        let admin_pool = sqlx::PgPool::connect(admin).await.context("connect to PostgreSQL")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&admin_pool).await?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin_pool).await?;
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => anyhow::bail!("bad PostgreSQL URL {admin}"),
        };
        let result = async {
            let store = Store::connect(&url, dir).await?;
            anyhow::ensure!(store.backend() == Backend::Postgres, "{url} is not a PostgreSQL store");
            let batch = sizes(Backend::Postgres);
            let (report, secs, rejected) = run_cdp(&store, n, batch).await?;
            let raw_secs = run_raw(&store, n, batch).await?;
            let copy_secs = run_copy(&url, n).await?;
            let (floor_secs, floor_rows) = run_store_floor(&url).await?;
            report_lines(&mut out, "PostgreSQL", &report, rejected, secs, raw_secs, "raw multi-row INSERT", 0.0);
            let _ = writeln!(
                out,
                "  baseline COPY: {:>10.0} rows/s   cdp / COPY = {:.0}%",
                n as f64 / copy_secs,
                100.0 * copy_secs / secs
            );
            let _ = writeln!(
                out,
                "  floor: the {floor_rows} rows cdp stored, copied server-side into empty tables with cdp's indexes, \
                 {floor_secs:.1}s = {:.0} records/s ({:.0}% of COPY; cdp / floor = {:.0}%)",
                n as f64 / floor_secs,
                100.0 * copy_secs / floor_secs,
                100.0 * floor_secs / secs
            );
            anyhow::Ok(())
        }
        .await;
        // After a failed run the scratch store's sessions may still be
        // rolling back (and holding their locks): try again for a while.
        let drop_sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let mut dropped = sqlx::query(&drop_sql).execute(&admin_pool).await;
        for _ in 0..20 {
            if dropped.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            dropped = sqlx::query(&drop_sql).execute(&admin_pool).await;
        }
        if let Err(e) = dropped {
            eprintln!("warning: could not drop the scratch database {name}: {e}");
        }
        result?;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn report_lines(
    out: &mut String,
    what: &str,
    r: &BatchReport,
    rejected: u64,
    secs: f64,
    raw_secs: f64,
    base: &str,
    rss: f64,
) {
    let n = r.accepted + r.duplicates + rejected;
    let _ = writeln!(out, "{what}:");
    let _ = writeln!(
        out,
        "  cdp ingest:    {:>10.0} records/s  ({} accepted, {} profiles, {} merges, {} conflicts, {} rejected) in {:.1}s",
        r.accepted as f64 / secs,
        r.accepted,
        r.new_profiles.saturating_sub(r.merges),
        r.merges,
        r.conflicts,
        rejected,
        secs
    );
    let _ = writeln!(
        out,
        "  baseline {base}: {:>10.0} rows/s   cdp / raw = {:.0}%",
        n as f64 / raw_secs,
        100.0 * raw_secs / secs
    );
    if rss > 0.0 {
        let _ = writeln!(out, "  peak memory after cdp ingest: {rss:.0} MiB");
    }
}
