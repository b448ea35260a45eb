//! Serialising concurrent batches on PostgreSQL: a batch takes transaction
//! advisory locks on every identity component it touches (keyed by the
//! component id) and on every identifier it is about to create (keyed by a
//! hash of key and value) before it reads what it will rewrite, so two
//! batches touching one person run one after the other and the result equals
//! applying them in sequence. Batches on disjoint people run in parallel.
//!
//! The components are known only after looking the identifiers up, and may
//! change (a merge) between that lookup and the lock. A lookup is valid when
//! all its locks were held while it ran, or when no batch that changes
//! identities committed between its start and the moment its locks were
//! held; the outbox counter (bumped by every such commit) says which.
//! Otherwise the batch looks up again under the locks it holds, locking what
//! is new, until the two agree. Locks taken out of order in those rounds can
//! deadlock; PostgreSQL breaks the cycle and the batch starts over
//! ([`StoreError::Contended`]), all inside the store.
//!
//! SQLite needs none of this: a batch holds the database's write lock from
//! its first read.

use super::{Result, Store, StoreError};
use rustc_hash::FxHashSet;
use sqlx::{AnyConnection, Row};
use std::hash::{Hash, Hasher};

/// Rounds of lookup and lock before a batch gives up and starts over.
const ROUNDS: usize = 8;

/// The advisory lock key of a new identifier: stable across processes.
pub(crate) fn ident_key(key: &str, value: &str) -> i64 {
    let mut h = rustc_hash::FxHasher::default();
    key.hash(&mut h);
    value.hash(&mut h);
    // Apart from component ids (identifier ids, positive): negative keys.
    (h.finish() as i64) | i64::MIN
}

fn contended(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40P01" | "40001" | "55P03")) => {
            StoreError::Contended(d.message().to_owned())
        }
        // The server's lock table holds `max_locks_per_transaction` ×
        // (`max_connections` + `max_prepared_transactions`) locks, shared by
        // every session: 6,400 with PostgreSQL's defaults.
        sqlx::Error::Database(d) if d.code().as_deref() == Some("53200") => StoreError::Busy(format!(
            "PostgreSQL ran out of lock space for this batch's advisory locks ({}): pass a smaller --batch \
             (cdp ingest's default on PostgreSQL is {}) or raise max_locks_per_transaction",
            d.message(),
            crate::ingest::pipeline::DEFAULT_BATCH_POSTGRES
        )),
        _ => StoreError::Sql(e),
    }
}

impl Store {
    async fn commits_seen(&self, conn: &mut AnyConnection) -> Result<i64> {
        Ok(sqlx::query("SELECT seq FROM outbox_head WHERE id = 1").fetch_one(&mut *conn).await?.try_get(0)?)
    }

    /// Takes the advisory locks `keys` (sorted, not yet held) for the rest
    /// of the transaction.
    async fn advisory_locks(&self, conn: &mut AnyConnection, keys: &[i64]) -> Result<()> {
        for chunk in keys.chunks(super::IN_CHUNK) {
            let sql = format!(
                "SELECT COUNT(pg_advisory_xact_lock(k)) FROM (SELECT column1 AS k FROM ({}) AS v ORDER BY 1) AS s",
                super::values_list(chunk.len())
            );
            let sql = self.sql(&sql).into_owned();
            let mut q = sqlx::query(&sql);
            for k in chunk {
                q = q.bind(*k);
            }
            q.fetch_one(&mut *conn).await.map_err(contended)?;
        }
        Ok(())
    }

    /// Locks `keys` (the lock keys of a lookup's result) as far as not held
    /// yet; says whether that lookup stands: all its locks were held while
    /// it ran, or no batch changed identities between its start (`seen`,
    /// updated here) and now. `Contended` after too many rounds.
    pub(crate) async fn lock_round(&self, conn: &mut AnyConnection, round: &mut Round, keys: Vec<i64>) -> Result<bool> {
        let mut missing: Vec<i64> = keys.into_iter().filter(|k| !round.held.contains(k)).collect();
        if missing.is_empty() {
            return Ok(true);
        }
        round.n += 1;
        if round.n > ROUNDS {
            return Err(StoreError::Contended(format!("identifiers kept moving for {ROUNDS} rounds of locking")));
        }
        missing.sort_unstable();
        missing.dedup();
        self.advisory_locks(conn, &missing).await?;
        round.held.extend(missing);
        let now = self.commits_seen(conn).await?;
        let stands = now == round.seen;
        round.seen = now;
        Ok(stands)
    }

    /// Starts the rounds of a batch: before its first lookup.
    pub(crate) async fn start_rounds(&self, conn: &mut AnyConnection) -> Result<Round> {
        Ok(Round { held: FxHashSet::default(), seen: self.commits_seen(conn).await?, n: 0 })
    }
}

/// Locks held by a batch and the commits it has seen (see the module doc).
pub(crate) struct Round {
    held: FxHashSet<i64>,
    seen: i64,
    n: usize,
}
