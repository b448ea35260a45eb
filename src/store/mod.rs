//! Storage: the one place cdp talks SQL. An embedded SQLite file by default,
//! PostgreSQL when one machine is no longer enough; both through sqlx's `Any`
//! driver with the same statements, rendered per backend where they differ.
//!
//! Every batch of records is applied in one transaction together with the
//! cursor of the input it came from (`ingest.rs`), so a crash never loses or
//! half-applies a batch. SQLite runs in WAL mode with `synchronous=FULL`: a
//! committed batch survives power loss.

pub mod ingest;
pub mod matching;
pub mod profile;
pub mod runs;
mod scan;
mod schema;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor, Row};
use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};

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
    #[error("{0}")]
    Invariant(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool to the state database.
#[derive(Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    ids: AtomicI64,
}

/// Most values bound in one IN list or VALUES table.
pub(crate) const IN_CHUNK: usize = 900;

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Store {
    /// Opens (creating if needed) the database named by `url` and applies
    /// migrations. Relative SQLite paths are relative to `base_dir`.
    pub async fn connect(url: &str, base_dir: &Path) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            let (path, query) = path.split_once('?').unwrap_or((path, ""));
            let full = if path == ":memory:" || Path::new(path).is_absolute() {
                path.to_owned()
            } else {
                base_dir.join(path).to_string_lossy().into_owned()
            };
            if let Some(dir) = Path::new(&full).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: full.clone(), source })?;
            }
            let query = if query.is_empty() { "mode=rwc".to_owned() } else { query.to_owned() };
            (Backend::Sqlite, format!("sqlite://{full}?{query}"))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(StoreError::Url(url.to_owned()));
        };
        let opts = AnyConnectOptions::from_str(&url)?
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Info, std::time::Duration::from_secs(2));
        let pool = AnyPoolOptions::new()
            // SQLite has one writer; more connections would only wait on its lock.
            .max_connections(if backend == Backend::Sqlite { 1 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Postgres {
                        // Ingest joins batches of hundreds of keys against large
                        // tables; while a table grows fast its statistics lag and
                        // the planner picks whole-table scans it would never pick
                        // with fresh ones. Every statement cdp runs has an index
                        // path, so steer the planner to it.
                        conn.execute("SET enable_seqscan = off").await?;
                    }
                    if backend == Backend::Sqlite {
                        // New databases only (WAL mode fixes the page size).
                        // Ingest touches pages all over several indexes each
                        // batch; with 8 KiB pages a batch dirties fewer of them
                        // and the trees are shallower: 40,000 → 45,000 records/s
                        // in `cdp bench ingest`, the raw insert unchanged; 16 KiB
                        // slowed the raw insert by a quarter.
                        conn.execute("PRAGMA page_size = 8192").await?;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA cache_size = -65536").await?;
                        // Checkpoint every ~256 MiB of WAL (32,768 pages) instead
                        // of every ~4 MiB. A batch dirties pages all over the
                        // message-id and identifier indexes, the same pages batch
                        // after batch; checkpointing after each commit copied them
                        // into the database file (and synced it) every time. The
                        // cost is disk: the WAL grows to that size between
                        // checkpoints. Durability is unchanged: a commit is
                        // durable once its WAL frames are synced.
                        conn.execute("PRAGMA wal_autocheckpoint = 32768").await?;
                        conn.execute("PRAGMA temp_store = MEMORY").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        let store = Store { pool, backend, ids: AtomicI64::new(0) };
        store.migrate().await?;
        store.seed_ids().await?;
        Ok(store)
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock
    /// at once (`BEGIN IMMEDIATE`): a transaction that reads first and
    /// upgrades later can fail with SQLITE_BUSY when another writer got there
    /// in between, and ingest relies on no other writer adding rows mid-batch.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Renders a statement written with `?` placeholders and `{id}`/`{f64}`
    /// types for this backend.
    pub fn sql<'a>(&self, q: &'a str) -> Cow<'a, str> {
        render(self.backend, q)
    }

    async fn migrate(&self) -> Result<()> {
        self.pool
            .execute("CREATE TABLE IF NOT EXISTS cdp_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)")
            .await?;
        let current: Option<i64> =
            sqlx::query("SELECT MAX(version) FROM cdp_migrations").fetch_one(&self.pool).await?.try_get(0)?;
        let current = current.unwrap_or(0);
        let newest = schema::MIGRATIONS.last().map_or(0, |m| m.0);
        if current > newest {
            return Err(StoreError::TooNew(current));
        }
        for (version, name, statements) in schema::MIGRATIONS {
            if *version <= current {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            for s in *statements {
                let only_sqlite = schema::sqlite_only(s);
                if only_sqlite.is_some() && self.backend == Backend::Postgres {
                    continue;
                }
                tx.execute(&*self.sql(only_sqlite.unwrap_or(s))).await?;
            }
            sqlx::query(&self.sql("INSERT INTO cdp_migrations (version, name, applied_at) VALUES (?, ?, ?)"))
                .bind(*version)
                .bind(*name)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, name, "applied migration");
        }
        Ok(())
    }

    /// Ids are allocated in the process: time-ordered (good for B-tree inserts)
    /// and above anything already stored.
    async fn seed_ids(&self) -> Result<()> {
        let mut max = 0i64;
        for table in ["profiles", "identities"] {
            let v: Option<i64> =
                sqlx::query(&format!("SELECT MAX(id) FROM {table}")).fetch_one(&self.pool).await?.try_get(0)?;
            max = max.max(v.unwrap_or(0));
        }
        // Millisecond clock in the high bits keeps ids from different runs apart.
        let clock = now_ms().saturating_sub(1_600_000_000_000) << 16;
        self.ids.store(max.max(clock) + 1, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn next_id(&self) -> i64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
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

    /// Runs a query built on [`Store::rows_sql`].
    pub(crate) async fn fetch_rows(&self, conn: &mut sqlx::AnyConnection, q: ingest::Query<'_>) -> Result<Vec<Rowish>> {
        match self.backend {
            Backend::Sqlite => {
                let text: Option<String> = q.fetch_one(&mut *conn).await?.try_get(0)?;
                let rows: Vec<Vec<serde_json::Value>> = match text {
                    Some(t) => serde_json::from_str(&t)
                        .map_err(|e| StoreError::Invariant(format!("unreadable packed rows from SQLite: {e}")))?,
                    None => Vec::new(),
                };
                Ok(rows.into_iter().map(Rowish::Json).collect())
            }
            Backend::Postgres => Ok(q.fetch_all(&mut *conn).await?.into_iter().map(Rowish::Row).collect()),
        }
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
        let mut rows = Vec::new();
        for chunk in ids.chunks(IN_CHUNK) {
            let sql = self.rows_sql(cols, &from.replacen("{}", &in_list(chunk.len()), 1));
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            rows.extend(self.fetch_rows(conn, q).await?);
        }
        Ok(rows)
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

/// A result row of [`Store::fetch_rows`]: packed JSON or a database row.
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
