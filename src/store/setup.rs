//! Opening the store: the connection pools and their settings, migrations
//! that several processes (replicas) may run at the same moment, and on
//! SQLite the record of which processes write to the file, so one that waits
//! for the write lock can say who holds it.
//!
//! Migrations are cdp's own runner rather than sqlx's `Migrator`: one list
//! serves both backends (statements rendered per backend, some for one
//! backend only), and databases created before keep their `cdp_migrations`
//! history. It gives the same guarantees: each version applied once, in its
//! own transaction, under a lock (a PostgreSQL advisory lock held for the
//! whole run; SQLite's write lock per version, the version re-checked inside
//! it), and a checksum per applied version that must match the binary's.

use super::{Backend, Result, Store, StoreError, now_ms, schema};
use sha2::Digest;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor, Row};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Key of the PostgreSQL advisory lock migrations run under ("cdp mig").
const MIGRATION_LOCK: i64 = 0x0000_6364_706d_6967;

/// How long a SQLite writer waits for another process's write lock before
/// giving up, in all (each attempt waits `busy_timeout`):
/// `CDP_STORE_WAIT_SECS`, 600 by default.
fn sqlite_write_wait() -> Duration {
    let secs = std::env::var("CDP_STORE_WAIT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    Duration::from_secs(secs)
}

/// The pools of a store.
pub(super) struct Pools {
    pub backend: Backend,
    pub readers: AnyPool,
    pub writer: AnyPool,
    /// The audit log's: on a SQLite file, its own database next to it
    /// (see [`Store::open_audit`]); otherwise `writer`.
    pub audit: AnyPool,
    pub audit_apart: bool,
}

/// Opens the pools.
pub(super) async fn open(url: &str, base_dir: &Path, readers: u32) -> Result<Pools> {
    sqlx::any::install_default_drivers();
    let (backend, url, memory, exists) =
        if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            let (path, query) = path.split_once('?').unwrap_or((path, ""));
            let memory = path == ":memory:";
            let full = if memory || Path::new(path).is_absolute() {
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
            let exists = !memory && Path::new(&full).exists();
            (Backend::Sqlite, format!("sqlite://{full}?{query}"), memory, exists)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned(), false, true)
        } else {
            return Err(StoreError::Url(url.to_owned()));
        };
    let opts = AnyConnectOptions::from_str(&url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Info, Duration::from_secs(2));
    let writer_options = pool_options(backend)
        // SQLite has one writer; more connections would only wait on its lock.
        .max_connections(if backend == Backend::Sqlite { 1 } else { 16 })
        .after_connect(move |conn, _| Box::pin(async move { configure(conn, backend, true).await }));
    if backend == Backend::Postgres || memory {
        let writer = writer_options.connect_with(opts).await?;
        return Ok(Pools { backend, readers: writer.clone(), audit: writer.clone(), writer, audit_apart: false });
    }
    // A new file is created and switched to WAL (which the file keeps)
    // before readers open it. An existing one is opened for writing only
    // when something writes: a command that only reads (`cdp profile get`)
    // opens one connection less.
    let writer = if exists {
        writer_options.connect_lazy_with(opts.clone())
    } else {
        let writer = writer_options.connect_with(opts.clone()).await?;
        drop(writer.acquire().await?);
        writer
    };
    let readers = pool_options(backend)
        .max_connections(readers.max(1))
        .after_connect(move |conn, _| Box::pin(async move { configure(conn, backend, false).await }))
        .connect_with(opts)
        .await?;
    let audit_url = match url.split_once('?') {
        Some((path, query)) => format!("{path}{AUDIT_SUFFIX}?{query}"),
        None => format!("{url}{AUDIT_SUFFIX}"),
    };
    let audit_opts = AnyConnectOptions::from_str(&audit_url)?.log_statements(tracing::log::LevelFilter::Trace);
    let audit = pool_options(backend)
        .max_connections(1)
        .after_connect(move |conn, _| Box::pin(async move { configure(conn, backend, true).await }))
        .connect_with(audit_opts)
        .await?;
    Ok(Pools { backend, readers, writer, audit, audit_apart: true })
}

/// What a SQLite store's file name gets for its audit log's file
/// (`cdp.db` → `cdp.db-audit`, next to SQLite's own `cdp.db-wal`).
pub const AUDIT_SUFFIX: &str = "-audit";

/// Pool options without sqlx's idle-connection reaper. sqlx 0.8.6's reaper
/// loops `num_idle()` times at once when a pool starts, and `release` adds
/// to that count only after the connection is back in the queue, so a pop
/// in between makes it wrap to `usize::MAX`: a process that caught the
/// window spun at full CPU forever (seen once in some 700 `cdp profile get`
/// runs). PostgreSQL connections are pinged before each use instead
/// (`test_before_acquire`), so none is reused dead. A SQLite connection is
/// a file opened by a thread of this process: it does not go stale, and a
/// ping is one more hand-over to that thread on every acquire.
pub(super) fn pool_options(backend: Backend) -> AnyPoolOptions {
    AnyPoolOptions::new().idle_timeout(None).max_lifetime(None).test_before_acquire(backend == Backend::Postgres)
}

/// Session settings of each new connection.
async fn configure(conn: &mut sqlx::AnyConnection, backend: Backend, writes: bool) -> Result<(), sqlx::Error> {
    if backend == Backend::Postgres {
        return Ok(());
    }
    // One round trip to the connection's thread for all of them: a short
    // command opens several connections, and under load every hand-over
    // between threads waits for a core.
    let settings = if writes {
        // `page_size`: new databases only (WAL mode fixes the page size).
        // Ingest touches pages all over several indexes each batch; with 8 KiB
        // pages a batch dirties fewer of them and the trees are shallower:
        // 40,000 → 45,000 records/s in `cdp bench ingest`, the raw insert
        // unchanged; 16 KiB slowed the raw insert by a quarter.
        //
        // `wal_autocheckpoint`: every ~256 MiB of WAL (32,768 pages) instead
        // of every ~4 MiB. A batch dirties pages all over the message-id and
        // identifier indexes, the same pages batch after batch; checkpointing
        // after each commit copied them into the database file (and synced
        // it) every time. The cost is disk: the WAL grows to that size
        // between checkpoints. Durability is unchanged: a commit is durable
        // once its WAL frames are synced.
        "PRAGMA page_size = 8192; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
         PRAGMA wal_autocheckpoint = 32768;"
    } else {
        "PRAGMA query_only = 1;"
    };
    conn.execute(&*format!(
        "{settings} PRAGMA busy_timeout = 10000; PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY;"
    ))
    .await?;
    Ok(())
}

/// This process as `store_writers` records it: pid, host, command.
pub(super) fn writer_tag() -> String {
    let args: Vec<String> = std::env::args().take(4).collect();
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!("{} on {} ({})", std::process::id(), if host.is_empty() { "this machine" } else { &host }, args.join(" "))
}

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS cdp_migrations \
    (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)";
const CHECKSUMS_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS cdp_migration_checksums (version BIGINT PRIMARY KEY, checksum TEXT NOT NULL)";

fn checksum(statements: &[&str]) -> String {
    let mut h = sha2::Sha256::new();
    for s in statements {
        h.update(s.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

fn is_busy(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.message().contains("database is locked") || d.message().contains("busy"))
}

impl Store {
    /// Brings the schema up to date, then opens the audit log. A SQLite
    /// file's startup checks read through one connection (see
    /// [`Store::connect_with_readers`] on why reads right after each other
    /// may not reuse a connection).
    pub(super) async fn open_schema(&self) -> Result<()> {
        if !self.audit_apart {
            // PostgreSQL, or SQLite in memory (whose one connection is the writer's).
            return self.migrate().await;
        }
        let mut conn = self.pool.acquire().await?;
        if !self.sqlite_up_to_date(&mut conn).await? {
            drop(conn);
            self.migrate().await?;
            conn = self.pool.acquire().await?;
        }
        self.open_audit(&mut conn).await
    }

    async fn migrate(&self) -> Result<()> {
        if self.backend == Backend::Sqlite {
            // A store already up to date is not locked at all: a reader
            // (`cdp profile get`) never waits for an ingest to open it.
            if self.sqlite_up_to_date(&mut *self.pool.acquire().await?).await? {
                return Ok(());
            }
            // Each statement waits for SQLite's write lock by itself.
            self.writer.execute(MIGRATIONS_TABLE).await?;
            self.writer.execute(CHECKSUMS_TABLE).await?;
            for m in schema::MIGRATIONS {
                let mut tx = self.begin_sqlite_write().await?;
                self.apply_migration(&mut tx, m).await?;
                tx.commit().await?;
            }
            return Ok(());
        }
        let mut conn = self.writer.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await?;
        let r = async {
            conn.execute(MIGRATIONS_TABLE).await?;
            conn.execute(CHECKSUMS_TABLE).await?;
            for m in schema::MIGRATIONS {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                self.apply_migration(&mut tx, m).await?;
                tx.commit().await?;
            }
            Ok(())
        }
        .await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await;
        if unlocked.is_err() {
            // Never hand a connection holding the lock back to the pool.
            drop(conn.detach());
        }
        r
    }

    /// Whether every migration is applied with its checksum recorded and
    /// matching (read without the write lock).
    async fn sqlite_up_to_date(&self, conn: &mut sqlx::AnyConnection) -> Result<bool> {
        // One statement (a short command opens the store each time): a store
        // without the two tables is not up to date.
        let rows = match sqlx::query(
            "SELECT m.version, c.checksum FROM cdp_migrations m LEFT JOIN cdp_migration_checksums c ON c.version = m.version",
        )
        .fetch_all(&mut *conn)
        .await
        {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(e)) if e.message().starts_with("no such table") => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let stored: std::collections::HashMap<i64, Option<String>> =
            rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, sqlx::Error>>()?;
        Ok(schema::MIGRATIONS
            .iter()
            .all(|(v, _, st)| stored.get(v).is_some_and(|c| c.as_deref() == Some(&checksum(st))))
            && stored.len() == schema::MIGRATIONS.len())
    }

    /// Applies one migration inside `conn`'s transaction unless the
    /// database has it; checks (or records) its checksum either way.
    async fn apply_migration(
        &self,
        conn: &mut sqlx::AnyConnection,
        (version, name, statements): &(i64, &str, &[&str]),
    ) -> Result<()> {
        let newest = schema::MIGRATIONS.last().map_or(0, |m| m.0);
        let current: Option<i64> =
            sqlx::query("SELECT MAX(version) FROM cdp_migrations").fetch_one(&mut *conn).await?.try_get(0)?;
        if current.unwrap_or(0) > newest {
            return Err(StoreError::TooNew(current.unwrap_or(0)));
        }
        let sum = checksum(statements);
        let applied = sqlx::query(&self.sql("SELECT 1 FROM cdp_migrations WHERE version = ?"))
            .bind(*version)
            .fetch_optional(&mut *conn)
            .await?
            .is_some();
        let stored: Option<String> =
            sqlx::query(&self.sql("SELECT checksum FROM cdp_migration_checksums WHERE version = ?"))
                .bind(*version)
                .fetch_optional(&mut *conn)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
        if let Some(s) = stored {
            if s != sum {
                return Err(StoreError::MigrationChanged {
                    version: *version,
                    name: (*name).to_owned(),
                    stored: s,
                    ours: sum,
                });
            }
            if applied {
                return Ok(());
            }
        }
        if !applied {
            for s in *statements {
                let one = match (schema::sqlite_only(s), schema::postgres_only(s), self.backend) {
                    (Some(_), _, Backend::Postgres) | (_, Some(_), Backend::Sqlite) => continue,
                    (Some(s), _, _) | (_, Some(s), _) => s,
                    _ => s,
                };
                conn.execute(&*self.sql(one)).await?;
            }
            sqlx::query(&self.sql("INSERT INTO cdp_migrations (version, name, applied_at) VALUES (?, ?, ?)"))
                .bind(*version)
                .bind(*name)
                .bind(now_ms())
                .execute(&mut *conn)
                .await?;
            tracing::info!(version, name, "applied migration");
        }
        // Versions applied before checksums were kept get theirs now.
        sqlx::query(&self.sql("INSERT INTO cdp_migration_checksums (version, checksum) VALUES (?, ?)"))
            .bind(*version)
            .bind(&sum)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Retries `op` while SQLite says another process holds the write lock
    /// (each attempt already waited `busy_timeout`), up to
    /// [`sqlite_write_wait`]; then fails naming the processes writing.
    async fn retry_busy<T, Fut>(&self, mut op: impl FnMut() -> Fut) -> Result<T>
    where
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let started = Instant::now();
        let mut told = false;
        loop {
            match op().await {
                Ok(t) => return Ok(t),
                Err(e) if is_busy(&e) => {
                    let holders = self.other_writers().await;
                    if started.elapsed() >= sqlite_write_wait() {
                        return Err(StoreError::Busy(format!(
                            "the store is locked by another writer{holders}; waited {}s. Stop that process or wait \
                             for it to finish, then run again",
                            started.elapsed().as_secs()
                        )));
                    }
                    if !told {
                        tracing::warn!("waiting for the store's write lock, held by another writer{holders}");
                        told = true;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A write transaction on SQLite, waiting for another process's. The
    /// first one of this process also records it among the store's writers.
    pub(super) async fn begin_sqlite_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        let mut tx = self.retry_busy(|| self.writer.begin_with("BEGIN IMMEDIATE")).await?;
        if !self.registered.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.register_writer(&mut tx).await?;
        }
        Ok(tx)
    }

    /// Records this process among the store's writers (SQLite), dropping
    /// entries of processes that are gone.
    async fn register_writer(&self, tx: &mut sqlx::AnyConnection) -> Result<()> {
        let exists: i64 = sqlx::query("SELECT COUNT(*) FROM sqlite_master WHERE name = 'store_writers'")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if exists == 0 {
            // Still migrating: the table comes with migration 3.
            self.registered.store(false, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        let tag = self.writer_tag.clone();
        let pid = i64::from(std::process::id());
        let rows = sqlx::query("SELECT pid FROM store_writers").fetch_all(&mut *tx).await?;
        for r in rows {
            let other: i64 = r.try_get(0)?;
            if other == pid || !Path::new(&format!("/proc/{other}")).exists() {
                sqlx::query("DELETE FROM store_writers WHERE pid = ?").bind(other).execute(&mut *tx).await?;
            }
        }
        sqlx::query("INSERT INTO store_writers (pid, tag, since) VALUES (?, ?, ?)")
            .bind(pid)
            .bind(tag)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// `: process 123 on host (cdp ingest …) since …` for the other live
    /// writers of a SQLite store, read without the write lock.
    async fn other_writers(&self) -> String {
        let Ok(rows) =
            sqlx::query("SELECT pid, tag, since FROM store_writers ORDER BY since").fetch_all(&self.pool).await
        else {
            return String::new();
        };
        let me = i64::from(std::process::id());
        let list: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                let pid: i64 = r.try_get(0).ok()?;
                let alive = Path::new(&format!("/proc/{pid}")).exists();
                (pid != me && alive).then(|| {
                    let since: i64 = r.try_get(2).unwrap_or(0);
                    let when =
                        chrono::DateTime::from_timestamp_millis(since).map(|t| t.to_rfc3339()).unwrap_or_default();
                    format!("process {} since {when}", r.try_get::<String, _>(1).unwrap_or_default())
                })
            })
            .collect();
        if list.is_empty() { String::new() } else { format!(": {}", list.join("; ")) }
    }
}
