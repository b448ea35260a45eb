//! PostgreSQL's bulk path. A batch's large row sets travel by COPY into the
//! unlogged table `cdp_stage` and from there into the store's tables with one
//! set-based statement inside the batch's transaction, instead of as
//! multi-row `VALUES` lists of bound parameters (each list parsed, planned
//! and decoded parameter by parameter).
//!
//! sqlx's `Any` driver, which every other statement goes through, cannot
//! COPY, so the rows are copied on a connection of their own and committed
//! there (an unlogged table writes no WAL). The batch's transaction runs at
//! READ COMMITTED, so its next statement sees them; it reads them under the
//! batch number they were copied with and deletes them again, and the delete
//! must find every row copied: a transaction that could not see the staged
//! rows fails instead of treating them as absent. The rows of a batch that
//! failed are deleted after it; those of a process that died are swept when
//! a store is opened ([`Staging::sweep`]).
//!
//! `cdp_stage` is untyped: each row's values are text in `c1…c16`, and the
//! statement reading them casts each column to the type its values were
//! given with ([`P`]), named `column1…` as a `VALUES` list's columns are,
//! so a statement written over `VALUES` reads the staged rows unchanged.

use super::ingest::P;
use super::{Result, StoreError};
use sqlx::Row;
use std::fmt::Write as _;

/// Fewer rows than this go as a `VALUES` list: a COPY and the statements
/// around it cost more than binding a few hundred rows.
pub(crate) const STAGE_MIN: usize = 1_000;

/// Columns of `cdp_stage` that carry values.
pub(crate) const STAGE_COLUMNS: usize = 16;

/// Bytes of COPY data sent to the server at a time.
const SEND_BYTES: usize = 1 << 20;

/// A connection pool that only COPYs into `cdp_stage`.
#[derive(Debug)]
pub(crate) struct Staging {
    pool: sqlx::PgPool,
    /// Whether this process swept rows of dead batches yet: the first copy does.
    swept: std::sync::atomic::AtomicBool,
}

/// Rows copied into `cdp_stage` under one batch number.
#[derive(Debug)]
pub(crate) struct Staged {
    pub(crate) batch: i64,
    pub(crate) rows: u64,
    /// `SELECT c1::bigint AS column1, … FROM cdp_stage WHERE batch = ?
    /// ORDER BY seq`: the rows as a `VALUES` list of them would give them.
    pub(crate) select: String,
}

/// The SQL type a value is read back as.
fn cast(p: &P) -> &'static str {
    match p {
        P::I(_) | P::OI(_) => "::bigint",
        P::S(_) | P::OS(_) => "",
        P::OF(_) => "::double precision",
    }
}

/// Appends `s` as a field of COPY's text format.
fn push_text(buf: &mut String, s: &str) {
    if !s.contains(['\\', '\t', '\n', '\r', '\0']) {
        buf.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            // PostgreSQL text cannot hold NUL; ingest strips it before.
            '\0' => {}
            c => buf.push(c),
        }
    }
}

fn push_value(buf: &mut String, p: &P) {
    match p {
        P::I(v) | P::OI(Some(v)) => {
            let _ = write!(buf, "{v}");
        }
        P::S(s) | P::OS(Some(s)) => push_text(buf, s),
        P::OF(Some(v)) if v.is_finite() => {
            let _ = write!(buf, "{v:?}");
        }
        P::OF(Some(v)) if v.is_nan() => buf.push_str("NaN"),
        P::OF(Some(v)) => buf.push_str(if *v > 0.0 { "Infinity" } else { "-Infinity" }),
        P::OI(None) | P::OS(None) | P::OF(None) => buf.push_str("\\N"),
    }
}

/// The statement that reads a batch's staged rows, for rows shaped like `first`.
fn select_of(first: &[P]) -> String {
    let mut sql = String::from("SELECT ");
    for (i, p) in first.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        let _ = write!(sql, "c{n}{} AS column{n}", cast(p), n = i + 1);
    }
    sql.push_str(" FROM cdp_stage WHERE batch = ? ORDER BY seq");
    sql
}

impl Staging {
    /// A pool for `url`, connecting when first used.
    pub(super) fn new(url: &str) -> Result<Staging> {
        let opts: sqlx::postgres::PgConnectOptions = url.parse()?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            // As `setup::pool_options`: no idle reaper.
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(opts);
        Ok(Staging { pool, swept: std::sync::atomic::AtomicBool::new(false) })
    }

    /// Copies `rows` (each `cols` values of the same types, row by row) into
    /// `cdp_stage` under a new batch number, and commits them.
    pub(crate) async fn copy(&self, cols: usize, rows: impl Iterator<Item = Vec<P>>) -> Result<Staged> {
        if cols == 0 || cols > STAGE_COLUMNS {
            return Err(StoreError::Invariant(format!("cannot stage rows of {cols} columns")));
        }
        if !self.swept.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let swept = self.sweep().await?;
            if swept > 0 {
                tracing::info!(rows = swept, "deleted rows staged by batches that never finished");
            }
        }
        let mut conn = self.pool.acquire().await?;
        let batch: i64 = sqlx::query("SELECT nextval('cdp_stage_batch')").fetch_one(&mut *conn).await?.try_get(0)?;
        let columns: Vec<String> = (1..=cols).map(|i| format!("c{i}")).collect();
        let mut copy =
            conn.copy_in_raw(&format!("COPY cdp_stage (batch, seq, {}) FROM STDIN", columns.join(", "))).await?;
        let mut buf = String::with_capacity(SEND_BYTES + (SEND_BYTES >> 3));
        let mut select = None;
        let mut n = 0u64;
        let sent = async {
            for row in rows {
                if row.len() != cols {
                    return Err(StoreError::Invariant(format!("a staged row has {} values, not {cols}", row.len())));
                }
                if select.is_none() {
                    select = Some(select_of(&row));
                }
                let _ = write!(buf, "{batch}\t{n}");
                for p in &row {
                    buf.push('\t');
                    push_value(&mut buf, p);
                }
                buf.push('\n');
                n += 1;
                if buf.len() >= SEND_BYTES {
                    copy.send(buf.as_bytes()).await?;
                    buf.clear();
                }
            }
            if !buf.is_empty() {
                copy.send(buf.as_bytes()).await?;
            }
            Ok(())
        }
        .await;
        match sent {
            Ok(()) => {
                let copied = copy.finish().await?;
                if copied != n {
                    return Err(StoreError::Invariant(format!("COPY staged {copied} of {n} rows")));
                }
            }
            Err(e) => {
                let _ = copy.abort("cdp: the rows could not be staged").await;
                return Err(e);
            }
        }
        Ok(Staged { batch, rows: n, select: select.unwrap_or_default() })
    }

    /// Deletes a batch's staged rows after its transaction failed
    /// (best effort: [`Staging::sweep`] deletes what is left).
    pub(crate) async fn discard(&self, batch: i64) {
        if let Err(e) = sqlx::query("DELETE FROM cdp_stage WHERE batch = $1").bind(batch).execute(&self.pool).await {
            tracing::debug!(batch, error = %e, "could not delete staged rows; the next sweep will");
        }
    }

    /// Deletes rows staged more than an hour ago: no batch takes that long,
    /// so their process died before its transaction ended. A process's first
    /// copy sweeps; a command that never stages (a read) never connects here.
    pub(crate) async fn sweep(&self) -> Result<u64> {
        let done = sqlx::query("DELETE FROM cdp_stage WHERE staged_at < now() - interval '1 hour'")
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_the_format_reserves() {
        let mut buf = String::new();
        for p in [
            P::S("a\tb\\c\nd\re\0f".into()),
            P::OS(None),
            P::I(-7),
            P::OF(Some(0.1)),
            P::OF(Some(f64::NEG_INFINITY)),
            P::OF(None),
        ] {
            push_value(&mut buf, &p);
            buf.push('|');
        }
        assert_eq!(buf, "a\\tb\\\\c\\nd\\ref|\\N|-7|0.1|-Infinity|\\N|");
    }

    #[test]
    fn staged_rows_read_back_as_a_values_list_would() {
        let sql = select_of(&[P::I(1), P::OS(None), P::OF(None)]);
        assert_eq!(
            sql,
            "SELECT c1::bigint AS column1, c2 AS column2, c3::double precision AS column3 \
             FROM cdp_stage WHERE batch = ? ORDER BY seq"
        );
    }
}
