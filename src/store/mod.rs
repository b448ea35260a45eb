//! Storage: the one place cdp talks SQL. An embedded SQLite file by default,
//! PostgreSQL when one machine is no longer enough; both through sqlx's `Any`
//! driver with the same statements, rendered per backend where they differ.
//!
//! Every batch of records is applied in one transaction together with the
//! cursor of the input it came from (`ingest.rs`), so a crash never loses or
//! half-applies a batch. SQLite runs in WAL mode with `synchronous=FULL`: a
//! committed batch survives power loss.

pub mod activation;
pub mod audit;
mod bulk;
pub mod export;
pub mod ingest;
pub mod lease;
mod locking;
pub mod matching;
pub mod outbox;
pub mod privacy;
pub mod profile;
pub mod queue;
pub mod retention;
pub mod runs;
mod scan;
mod schema;
mod setup;
mod stage;

pub use lease::Lease;
pub use outbox::OutboxEntry;
pub use queue::{Job, JobState};
pub use setup::AUDIT_SUFFIX;

use sqlx::{AnyPool, Row};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported storage URL `{0}`: use sqlite://PATH or postgres://…")]
    Url(String),
    #[error("cannot create the directory for {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("the database was written by a newer cdp (schema version {0})")]
    TooNew(i64),
    #[error(
        "migration {version} ({name}) differs from the one applied to this database (checksum {stored}, this cdp has \
         {ours}): the database was migrated by a different build of cdp"
    )]
    MigrationChanged { version: i64, name: String, stored: String, ours: String },
    #[error("lease `{name}` (token {token}) was lost before the commit: nothing was written")]
    LeaseLost { name: String, token: i64 },
    #[error("{0}")]
    Busy(String),
    /// The manifest a read was given does not resolve (see [`crate::resolved`]).
    #[error("the manifest does not resolve: {0}")]
    Manifest(String),
    /// Concurrent batches locked each other out; the store retries these.
    #[error("concurrent writers contended for the same profiles and this batch gave up: {0}")]
    Contended(String),
    #[error("{0}")]
    Invariant(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Connection pools to the state database.
#[derive(Debug)]
pub struct Store {
    /// Reads. On SQLite its own connections (WAL: readers never wait for the
    /// writer); on PostgreSQL the same pool as `writer`.
    pool: AnyPool,
    /// Writes: SQLite's one writer connection; PostgreSQL's pool.
    writer: AnyPool,
    backend: Backend,
    /// Ids handed out to this process and not used yet (see [`Store::next_id`]).
    ids: Mutex<VecDeque<(i64, i64)>>,
    /// Who this process is, as recorded in `store_writers` (SQLite).
    writer_tag: String,
    /// Whether this process's first write recorded it there.
    registered: std::sync::atomic::AtomicBool,
    /// PostgreSQL: the COPY connections of the bulk path (`stage.rs`).
    staging: Option<stage::Staging>,
    /// The audit log's pool (`audit.rs`).
    audit: AnyPool,
    /// Whether the audit log is a database of its own (a SQLite file's).
    audit_apart: bool,
}

/// Most values bound in one IN list or VALUES table.
pub(crate) const IN_CHUNK: usize = 900;

/// Ids per block from PostgreSQL's `cdp_id_blocks` sequence.
const ID_BLOCK: i64 = 1 << 20;

/// Ids one transaction took for its own use ([`Store::take_ids`]).
#[derive(Debug, Default)]
pub(crate) struct Ids {
    ranges: VecDeque<(i64, i64)>,
}

impl Ids {
    pub(crate) fn extend(&mut self, more: Ids) {
        self.ranges.extend(more.ranges);
    }

    pub(crate) fn next(&mut self) -> Result<i64> {
        while let Some(r) = self.ranges.front_mut() {
            if r.0 < r.1 {
                r.0 += 1;
                return Ok(r.0 - 1);
            }
            self.ranges.pop_front();
        }
        Err(StoreError::Invariant("a batch used more ids than it reserved".into()))
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Store {
    /// Opens (creating if needed) the database named by `url` and applies
    /// migrations. Relative SQLite paths are relative to `base_dir`.
    pub async fn connect(url: &str, base_dir: &Path) -> Result<Store> {
        Store::connect_with_readers(url, base_dir, 4).await
    }

    /// [`Store::connect`] with at most `readers` SQLite reading connections.
    /// A command that reads one thing after another wants one: a pool hands
    /// a released connection back in a task of its own, and on a
    /// single-threaded runtime that task runs only once the command waits,
    /// so the next read would open a connection (a thread and a parse of
    /// the schema) instead of reusing the one just released.
    pub async fn connect_with_readers(url: &str, base_dir: &Path, readers: u32) -> Result<Store> {
        let setup::Pools { backend, readers: pool, writer, audit, audit_apart } =
            setup::open(url, base_dir, readers).await?;
        let writer_tag = setup::writer_tag();
        let staging = match backend {
            Backend::Postgres => Some(stage::Staging::new(url)?),
            Backend::Sqlite => None,
        };
        let store = Store {
            pool,
            writer,
            backend,
            ids: Mutex::new(VecDeque::new()),
            writer_tag,
            registered: Default::default(),
            staging,
            audit,
            audit_apart,
        };
        store.open_schema().await?;
        // SQLite's ids are seeded by each write transaction ([`Store::begin_write`]).
        Ok(store)
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock
    /// at once (`BEGIN IMMEDIATE`): a transaction that reads first and
    /// upgrades later can fail with SQLITE_BUSY when another writer got there
    /// in between, and ingest relies on no other writer adding rows mid-batch.
    /// When another process holds the lock this waits (see
    /// [`Store::begin_sqlite_write`]).
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => {
                let mut tx = self.begin_sqlite_write().await?;
                self.seed_sqlite_ids(&mut tx).await?;
                tx
            }
            Backend::Postgres => {
                let mut tx = self.writer.begin().await?;
                // The bulk path's staged rows are committed by another
                // connection while this transaction runs (`stage.rs`).
                sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED").execute(&mut *tx).await?;
                self.reserve_ids(&mut tx, 64).await?;
                tx
            }
        })
    }

    /// PostgreSQL's COPY path for large row sets (`stage.rs`).
    pub(crate) fn staging(&self) -> Option<&stage::Staging> {
        self.staging.as_ref()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool that writes (and may read). The field `pool` is the readers'
    /// (where code in this module reads), this one the writers'.
    #[allow(clippy::misnamed_getters)]
    pub fn pool(&self) -> &AnyPool {
        &self.writer
    }

    /// SQLite: starts copying the write-ahead log into the database file on
    /// the writer's connection, in the background (a passive checkpoint:
    /// readers go on). For a command that reads and computes before it
    /// writes, as matching does: the log a bulk load leaves behind (up to
    /// `wal_autocheckpoint`, 256 MiB) is otherwise copied by its first
    /// commit, with nothing else running. That write waits for the
    /// checkpoint if it is still running.
    pub(crate) fn checkpoint_in_background(&self) {
        if self.backend != Backend::Sqlite {
            return;
        }
        let writer = self.writer.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_optional(&writer).await {
                Ok(_) => tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "write-ahead log checkpointed"),
                // Not an error of the command: the next commits checkpoint as usual.
                Err(e) => tracing::debug!(error = %e, "background checkpoint skipped"),
            }
        });
    }

    /// The pool for reads: on SQLite it never waits for the writer.
    pub fn read_pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Whether the database answers a query (readiness checks).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Renders a statement written with `?` placeholders and `{id}`/`{f64}`
    /// types for this backend.
    pub fn sql<'a>(&self, q: &'a str) -> Cow<'a, str> {
        render(self.backend, q)
    }

    /// SQLite: inside a write transaction no other process can add ids, so
    /// every id above those stored is free until the commit; each write
    /// transaction starts from there (and from the clock, so ids grow with
    /// time across runs).
    async fn seed_sqlite_ids(&self, conn: &mut sqlx::AnyConnection) -> Result<()> {
        let row = sqlx::query(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM profiles), 0), COALESCE((SELECT MAX(id) FROM identities), 0))",
        )
        .fetch_one(&mut *conn)
        .await?;
        let max: i64 = row.try_get(0)?;
        let clock = now_ms().saturating_sub(1_600_000_000_000) << 16;
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let next = ids.front().map_or(0, |r| r.0).max(max + 1).max(clock);
        ids.clear();
        ids.push_back((next, i64::MAX));
        Ok(())
    }

    /// PostgreSQL: makes sure at least `n` ids are at hand, taking blocks
    /// from the `cdp_id_blocks` sequence (outside any transaction's rollback:
    /// a sequence never hands a number out twice).
    pub(crate) async fn reserve_ids(&self, conn: &mut sqlx::AnyConnection, n: usize) -> Result<()> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        loop {
            let have: i64 = self.ids.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|r| r.1 - r.0).sum();
            if have >= n as i64 {
                return Ok(());
            }
            let block: i64 = sqlx::query("SELECT nextval('cdp_id_blocks')").fetch_one(&mut *conn).await?.try_get(0)?;
            let start =
                block.checked_mul(ID_BLOCK).ok_or_else(|| StoreError::Invariant("id blocks exhausted".into()))?;
            self.ids.lock().unwrap_or_else(|e| e.into_inner()).push_back((start, start + ID_BLOCK));
        }
    }

    /// Takes `n` ids for one transaction's exclusive use (reserving them
    /// first on PostgreSQL), so concurrent batches of this process never
    /// run short of ids another took.
    pub(crate) async fn take_ids(&self, conn: &mut sqlx::AnyConnection, n: usize) -> Result<Ids> {
        self.reserve_ids(conn, n).await?;
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Ids::default();
        let mut left = n as i64;
        while left > 0 {
            let Some(r) = ids.front_mut() else { break };
            let k = (r.1 - r.0).min(left);
            out.ranges.push_back((r.0, r.0 + k));
            r.0 += k;
            left -= k;
            if r.0 == r.1 {
                ids.pop_front();
            }
        }
        if left > 0 {
            return Err(StoreError::Invariant(format!("{left} of {n} ids could not be reserved")));
        }
        Ok(out)
    }

    /// Returns ids a transaction took and did not use.
    pub(crate) fn give_back_ids(&self, rest: Ids) {
        if self.backend == Backend::Postgres {
            self.ids.lock().unwrap_or_else(|e| e.into_inner()).extend(rest.ranges.into_iter().filter(|r| r.0 < r.1));
        }
    }

    /// A new id for a profile or identifier: never one another task or
    /// process holds (blocks from a sequence on PostgreSQL; above every
    /// stored id under SQLite's write lock), growing with time. Call inside
    /// a transaction from [`Store::begin_write`].
    pub(crate) fn next_id(&self) -> i64 {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(r) = ids.front_mut() {
            if r.0 < r.1 {
                r.0 += 1;
                return r.0 - 1;
            }
            ids.pop_front();
        }
        drop(ids);
        // Not reached: every write transaction starts with ids at hand. The
        // clock and a random low half keep a collision unlikely all the same.
        tracing::error!("no ids reserved; falling back to clock-based ids");
        ((now_ms().saturating_sub(1_600_000_000_000)) << 20) | (i64::from(std::process::id()) & 0xFFFFF)
    }

    /// Runs a SELECT whose `{}` is an IN list over `ids`, in chunks that stay
    /// under both backends' parameter limits, and returns every row.
    pub(crate) async fn select_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        template: &str,
        ids: &[i64],
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        let mut rows = Vec::new();
        for chunk in ids.chunks(IN_CHUNK) {
            let sql = template.replacen("{}", &in_list(chunk.len()), 1);
            let sql = self.sql(&sql).into_owned();
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            rows.extend(q.fetch_all(&mut *conn).await?);
        }
        Ok(rows)
    }

    /// `SELECT {cols} {rest}` with every row packed into one JSON text (an
    /// array of arrays), on SQLite. sqlx hands each result row from its
    /// SQLite thread to the caller's separately, two thread wake-ups per row;
    /// the lookups of a batch return thousands of rows. PostgreSQL streams
    /// rows over its socket, so there the rows come as they are.
    pub(crate) fn rows_sql(&self, cols: &str, rest: &str) -> String {
        match self.backend {
            Backend::Sqlite => format!("SELECT json_group_array(json_array({cols})) {rest}"),
            Backend::Postgres => render(self.backend, &format!("SELECT {cols} {rest}")).into_owned(),
        }
    }

    /// Runs queries built on [`Store::rows_sql`] one after another and
    /// returns their rows in order. `queries` is lazy: binding a chunk's
    /// parameters and unpacking a chunk's rows are as much work for this
    /// thread as running the chunk is for the database's, so the three
    /// overlap — while the database runs one chunk, this task binds the next
    /// and unpacks the one before.
    pub(crate) async fn fetch_chunks<'q>(
        &self,
        conn: &mut sqlx::AnyConnection,
        queries: impl Iterator<Item = ingest::Query<'q>>,
    ) -> Result<Vec<Rowish>> {
        let mut out = Vec::new();
        self.fetch_chunks_each(conn, queries, |row| {
            out.push(row);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// [`Store::fetch_chunks`], handing each row to `each` as it is unpacked
    /// instead of collecting them: for reads of many rows that keep less
    /// than a row (matching's compared traits).
    pub(crate) async fn fetch_chunks_each<'q>(
        &self,
        conn: &mut sqlx::AnyConnection,
        queries: impl Iterator<Item = ingest::Query<'q>>,
        mut each: impl FnMut(Rowish) -> Result<()>,
    ) -> Result<()> {
        enum Fetched {
            Packed(Option<String>),
            Rows(Vec<sqlx::any::AnyRow>),
        }
        let backend = self.backend;
        let (query_tx, query_rx) = tokio::sync::mpsc::channel::<ingest::Query<'q>>(1);
        let (rows_tx, rows_rx) = tokio::sync::mpsc::channel::<Fetched>(1);
        let bind = async {
            for q in queries {
                if query_tx.send(q).await.is_err() {
                    return; // a chunk failed; its error is returned below
                }
            }
            drop(query_tx);
        };
        let run = async {
            // Owned here: a failed chunk drops the receiver, which stops the binding.
            let mut query_rx = query_rx;
            while let Some(q) = query_rx.recv().await {
                let fetched = match backend {
                    Backend::Sqlite => Fetched::Packed(q.fetch_one(&mut *conn).await?.try_get(0)?),
                    Backend::Postgres => Fetched::Rows(q.fetch_all(&mut *conn).await?),
                };
                if rows_tx.send(fetched).await.is_err() {
                    break; // unpacking failed; its error is returned below
                }
            }
            drop(rows_tx);
            Ok::<(), StoreError>(())
        };
        let unpack = async {
            let mut rows_rx = rows_rx;
            while let Some(fetched) = rows_rx.recv().await {
                match fetched {
                    Fetched::Packed(None) => {}
                    Fetched::Packed(Some(text)) => {
                        let rows: Vec<Vec<serde_json::Value>> = serde_json::from_str(&text)
                            .map_err(|e| StoreError::Invariant(format!("unreadable packed rows from SQLite: {e}")))?;
                        rows.into_iter().map(Rowish::Json).try_for_each(&mut each)?;
                    }
                    Fetched::Rows(rows) => rows.into_iter().map(Rowish::Row).try_for_each(&mut each)?,
                }
            }
            Ok::<(), StoreError>(())
        };
        let ((), ran, unpacked) = tokio::join!(bind, run, unpack);
        ran?;
        unpacked
    }

    /// [`Store::rows_sql`] over an IN list: `SELECT {cols} {from}` where the
    /// `{}` of `from` is the list, in chunks under the parameter limits.
    pub(crate) async fn rows_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        cols: &str,
        from: &str,
        ids: &[i64],
    ) -> Result<Vec<Rowish>> {
        let sql = ChunkSql::new(ids.len(), IN_CHUNK, |k| self.rows_sql(cols, &from.replacen("{}", &in_list(k), 1)));
        let queries = ids.chunks(IN_CHUNK).map(|chunk| {
            let mut q = sqlx::query(sql.of(chunk.len()));
            for id in chunk {
                q = q.bind(*id);
            }
            q
        });
        self.fetch_chunks(conn, queries).await
    }

    /// Where a named input stream stopped, if it ever ran.
    pub async fn cursor(&self, stream: &str) -> Result<Option<String>> {
        let row = sqlx::query(&self.sql("SELECT position FROM cursors WHERE stream = ?"))
            .bind(stream)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }
}

/// The statement texts of a query over `n` items in chunks of `per`: one
/// for the full chunks and one for a shorter last chunk, each built once.
pub(crate) struct ChunkSql {
    per: usize,
    full: String,
    last: String,
}

impl ChunkSql {
    pub(crate) fn new(n: usize, per: usize, shape: impl Fn(usize) -> String) -> Self {
        let per = per.max(1);
        let full = if n >= per { shape(per) } else { String::new() };
        let last = if n.is_multiple_of(per) { String::new() } else { shape(n % per) };
        ChunkSql { per, full, last }
    }

    /// The text for a chunk of `len` items.
    pub(crate) fn of(&self, len: usize) -> &str {
        if len == self.per { &self.full } else { &self.last }
    }
}

/// A result row of [`Store::fetch_chunks`]: packed JSON or a database row.
pub(crate) enum Rowish {
    Json(Vec<serde_json::Value>),
    Row(sqlx::any::AnyRow),
}

impl Rowish {
    pub(crate) fn int(&self, i: usize) -> Result<i64> {
        match self {
            Rowish::Json(v) => v.get(i).and_then(serde_json::Value::as_i64).ok_or_else(|| bad_column(i, "an integer")),
            Rowish::Row(r) => Ok(r.try_get(i)?),
        }
    }

    pub(crate) fn text(&self, i: usize) -> Result<String> {
        match self {
            Rowish::Json(v) => {
                v.get(i).and_then(|x| x.as_str().map(str::to_owned)).ok_or_else(|| bad_column(i, "text"))
            }
            Rowish::Row(r) => Ok(r.try_get(i)?),
        }
    }

    pub(crate) fn float_opt(&self, i: usize) -> Result<Option<f64>> {
        match self {
            Rowish::Json(v) => match v.get(i) {
                Some(serde_json::Value::Null) => Ok(None),
                x => x.and_then(serde_json::Value::as_f64).map(Some).ok_or_else(|| bad_column(i, "a number")),
            },
            Rowish::Row(r) => Ok(r.try_get(i)?),
        }
    }
}

fn bad_column(i: usize, what: &str) -> StoreError {
    StoreError::Invariant(format!("column {i} of a packed row is not {what}"))
}

/// Renders placeholders and types for a backend.
pub fn render(backend: Backend, q: &str) -> Cow<'_, str> {
    let q: Cow<'_, str> = if q.contains('{') {
        let (id, f64) = match backend {
            Backend::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "REAL"),
            Backend::Postgres => ("BIGSERIAL PRIMARY KEY", "DOUBLE PRECISION"),
        };
        Cow::Owned(q.replace("{id}", id).replace("{f64}", f64))
    } else {
        Cow::Borrowed(q)
    };
    if backend == Backend::Sqlite || !q.contains('?') {
        return q;
    }
    let mut out = String::with_capacity(q.len() + 16);
    let mut n = 0;
    let mut quoted = false;
    for c in q.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `(?, ?, …)` groups for a multi-row VALUES clause: `rows` groups of `cols`.
pub fn values_clause(rows: usize, cols: usize) -> String {
    let group = format!("({})", vec!["?"; cols].join(", "));
    let mut s = String::with_capacity(rows * (group.len() + 2));
    for i in 0..rows {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&group);
    }
    s
}

/// `VALUES (?), (?), …`: a one-column derived table (its column is `column1`
/// on both backends). Joining against it plans as one index probe per value,
/// where a long IN list makes PostgreSQL estimate every element while planning.
pub fn values_list(n: usize) -> String {
    let mut s = String::with_capacity(n * 5 + 8);
    s.push_str("VALUES ");
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str("(?)");
    }
    s
}

/// `?, ?, …` for an IN list.
pub fn in_list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sql_builds_a_text_for_full_chunks_and_one_for_the_last() {
        let shape = |k: usize| format!("IN ({})", in_list(k));
        let sql = ChunkSql::new(5, 2, shape);
        assert_eq!((sql.of(2), sql.of(1)), ("IN (?, ?)", "IN (?)"));
        let sql = ChunkSql::new(4, 2, shape);
        assert_eq!((sql.of(2), sql.of(1)), ("IN (?, ?)", ""));
        let sql = ChunkSql::new(1, 2, shape);
        assert_eq!(sql.of(1), "IN (?)");
        assert_eq!(ChunkSql::new(0, 2, shape).of(2), "", "no chunks, nothing built");
    }
    use sqlx::Executor;

    #[test]
    fn renders_placeholders_for_postgres() {
        assert_eq!(render(Backend::Postgres, "SELECT ? WHERE a = '?' AND b = ?"), "SELECT $1 WHERE a = '?' AND b = $2");
        assert_eq!(render(Backend::Sqlite, "SELECT ?"), "SELECT ?");
        assert!(render(Backend::Postgres, "id {id}").contains("BIGSERIAL"));
        assert_eq!(values_clause(2, 3), "(?, ?, ?), (?, ?, ?)");
    }

    /// A database written before migration 2 keeps every row when it is
    /// rebuilt into the new SQLite layout, and new ids stay above the old ones.
    #[tokio::test]
    async fn migration_2_keeps_the_rows_of_a_version_1_database() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("v1.db");
        let pool = sqlx::AnyPool::connect(&format!("sqlite://{}?mode=rwc", path.display())).await.expect("open");
        pool.execute(
            "CREATE TABLE cdp_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .await
        .expect("migrations table");
        let (version, name, statements) = schema::MIGRATIONS[0];
        for s in statements {
            pool.execute(&*render(Backend::Sqlite, s)).await.expect("migration 1");
        }
        sqlx::query("INSERT INTO cdp_migrations VALUES (?, ?, 0)")
            .bind(version)
            .bind(name)
            .execute(&pool)
            .await
            .expect("v1");
        for s in [
            "INSERT INTO profiles (id, created_at, merged_into) VALUES (7000000000001, 10, NULL), (7000000000002, 10, 7000000000001)",
            "INSERT INTO identities (id, key, value, profile_id, component, first_at, source, message_id, isolated) \
             VALUES (7000000000005, 'email', 'a@example.se', 7000000000001, 7000000000005, 10, 'crm', 'm1', 1)",
            "INSERT INTO trait_obs VALUES (7000000000005, 'tier', 'crm', '\"gold\"', 10, '\"gold\"', 10, '\"gold\"', '\"gold\"', NULL, NULL, NULL, 1)",
            "INSERT INTO links (component, at, source, message_id, ids) VALUES (7000000000005, 10, 'crm', 'm1', '7000000000005,7000000000006')",
        ] {
            pool.execute(s).await.expect("v1 rows");
        }
        pool.close().await;

        let store = Store::connect(&format!("sqlite://{}", path.display()), dir.path()).await.expect("migrate");
        let p = store.pool();
        let row = sqlx::query("SELECT key, value, profile_id, isolated FROM identities WHERE id = 7000000000005")
            .fetch_one(p)
            .await
            .expect("identity kept");
        assert_eq!(row.try_get::<String, _>(1).expect("value"), "a@example.se");
        assert_eq!(row.try_get::<i64, _>(2).expect("profile"), 7000000000001);
        assert_eq!(row.try_get::<i64, _>(3).expect("isolated"), 1);
        let merged: i64 = sqlx::query("SELECT merged_into FROM profiles WHERE id = 7000000000002")
            .fetch_one(p)
            .await
            .and_then(|r| r.try_get(0))
            .expect("profile kept");
        assert_eq!(merged, 7000000000001);
        let tier: String = sqlx::query("SELECT last_value FROM trait_obs WHERE identity_id = 7000000000005")
            .fetch_one(p)
            .await
            .and_then(|r| r.try_get(0))
            .expect("trait kept");
        assert_eq!(tier, "\"gold\"");
        let link: String = sqlx::query("SELECT ids FROM links WHERE component = 7000000000005")
            .fetch_one(p)
            .await
            .and_then(|r| r.try_get(0))
            .expect("link kept");
        assert_eq!(link, "7000000000005,7000000000006");
        for table in ["trait_obs", "links"] {
            let sql: String = sqlx::query("SELECT sql FROM sqlite_master WHERE name = ?")
                .bind(table)
                .fetch_one(p)
                .await
                .and_then(|r| r.try_get(0))
                .expect("schema");
            assert!(sql.contains("WITHOUT ROWID"), "{table}: {sql}");
        }
        assert!(store.next_id() > 7000000000005);
    }
}
