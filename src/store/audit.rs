//! The audit log: an append-only table of who read personal data or
//! changed state — through the admin API (a token's name) or the CLI (the
//! operating-system user) — when, what, on what, and the outcome. Rows in,
//! rows out; there is no update or delete (an erasure redacts targets).
//!
//! A read appends its row before it shows anything, so appending must not
//! wait for ingest. SQLite has one writer per file and an ingest holds the
//! lock for a whole batch, so a SQLite store keeps its audit log in a file
//! of its own next to it (`cdp.db-audit`); rows an older cdp wrote into the
//! store itself move there when the store is opened. On PostgreSQL the log
//! is a table of the store.

use super::{Result, Store, now_ms};
use sqlx::{Executor as _, Row};

/// The audit file's table: the columns of the store's own `audit_log`
/// (migration 5, whose text stays as applied: its checksum is recorded).
const AUDIT_TABLE: &str = "CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    via TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL
)";
const AUDIT_INDEX: &str = "CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at)";
const COLUMNS: &str = "id, at, actor, via, action, target, outcome";

/// Longest target kept, in bytes (a target is an identifier or a route).
const MAX_TARGET_BYTES: usize = 512;

/// One action to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry<'a> {
    /// A token's name, or `os:USER` for the CLI.
    pub actor: &'a str,
    /// `api` or `cli`.
    pub via: &'a str,
    /// What was done, e.g. `profile.get`, `sync.run`, `reload`.
    pub action: &'a str,
    /// What it was done to, e.g. `email=ada@example.org`, `sync:loyalty`.
    pub target: &'a str,
    /// `ok`, `not_found`, `denied`, `error: …`.
    pub outcome: &'a str,
}

/// A row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub via: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

fn audit_row(r: &sqlx::any::AnyRow) -> Result<AuditRow> {
    Ok(AuditRow {
        id: r.try_get(0)?,
        at: r.try_get(1)?,
        actor: r.try_get(2)?,
        via: r.try_get(3)?,
        action: r.try_get(4)?,
        target: r.try_get(5)?,
        outcome: r.try_get(6)?,
    })
}

impl Store {
    /// A SQLite store's audit file: creates its table, and moves there the
    /// rows the store itself holds (written before the log had a file of
    /// its own; read through `conn`, a reader of the store), keeping their
    /// ids. A copy that stopped halfway is redone.
    pub(super) async fn open_audit(&self, conn: &mut sqlx::AnyConnection) -> Result<()> {
        if !self.audit_apart {
            return Ok(());
        }
        // One round trip: a short command (`cdp profile get`) opens the log
        // each time, and under load every hand-over to the connection's
        // thread waits for a core.
        self.audit.execute(&*format!("{AUDIT_TABLE}; {AUDIT_INDEX};")).await?;
        let old = sqlx::query(&format!("SELECT {COLUMNS} FROM audit_log ORDER BY id"))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(audit_row)
            .collect::<Result<Vec<AuditRow>>>()?;
        let Some(last) = old.last().map(|r| r.id) else { return Ok(()) };
        let mut tx = self.audit.begin().await?;
        for r in &old {
            sqlx::query(&format!("INSERT OR IGNORE INTO audit_log ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"))
                .bind(r.id)
                .bind(r.at)
                .bind(&r.actor)
                .bind(&r.via)
                .bind(&r.action)
                .bind(&r.target)
                .bind(&r.outcome)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM audit_log WHERE id <= ?").bind(last).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(rows = old.len(), "moved the audit log into its own file");
        Ok(())
    }

    /// Redacts targets that contain `pattern` (a LIKE pattern, `\` escapes)
    /// to `erased (request N)`; returns how many.
    pub(super) async fn redact_audit(
        &self,
        conn: &mut sqlx::AnyConnection,
        request_id: i64,
        pattern: &str,
    ) -> Result<u64> {
        Ok(sqlx::query(&self.sql("UPDATE audit_log SET target = ? WHERE target LIKE ? ESCAPE '\\'"))
            .bind(format!("erased (request {request_id})"))
            .bind(pattern)
            .execute(&mut *conn)
            .await?
            .rows_affected())
    }

    /// Whether the audit log is a database of its own, and its pool.
    pub(super) fn audit_pool(&self) -> Option<&sqlx::AnyPool> {
        self.audit_apart.then_some(&self.audit)
    }

    /// Appends one row.
    pub async fn audit_append(&self, e: &AuditEntry<'_>) -> Result<i64> {
        let mut target = e.target;
        if target.len() > MAX_TARGET_BYTES {
            let mut end = MAX_TARGET_BYTES;
            while !target.is_char_boundary(end) {
                end -= 1;
            }
            target = &target[..end];
        }
        let sql = self.sql(
            "INSERT INTO audit_log (at, actor, via, action, target, outcome) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        );
        let insert =
            sqlx::query(&sql).bind(now_ms()).bind(e.actor).bind(e.via).bind(e.action).bind(target).bind(e.outcome);
        let id: i64 = match self.audit_pool() {
            // A file of its own: one statement, its own transaction, that
            // never waits for ingest.
            Some(pool) => insert.fetch_one(pool).await?.try_get(0)?,
            None => {
                let mut tx = self.begin_write().await?;
                let id = insert.fetch_one(&mut *tx).await?.try_get(0)?;
                tx.commit().await?;
                id
            }
        };
        metrics::counter!(crate::metrics::AUDIT_ROWS, "action" => e.action.to_owned()).increment(1);
        Ok(id)
    }

    /// Rows at or after `since` (epoch ms), oldest first, at most `limit`.
    pub async fn audit_rows(&self, since: Option<i64>, limit: i64) -> Result<Vec<AuditRow>> {
        let rows =
            sqlx::query(&self.sql(&format!("SELECT {COLUMNS} FROM audit_log WHERE at >= ? ORDER BY at, id LIMIT ?")))
                .bind(since.unwrap_or(i64::MIN))
                .bind(limit)
                .fetch_all(self.audit_pool().unwrap_or(self.read_pool()))
                .await?;
        rows.iter().map(audit_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(target: &str) -> AuditEntry<'_> {
        AuditEntry { actor: "os:test", via: "cli", action: "profile.get", target, outcome: "ok" }
    }

    /// A read's audit row does not wait for a batch that holds the store's
    /// write lock, and rows an older cdp wrote into the store itself move
    /// into the audit file with their ids.
    #[tokio::test]
    async fn appends_never_wait_for_the_writer_and_old_rows_move_to_the_audit_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect("sqlite://cdp.db", dir.path()).await.expect("store");
        let held = store.begin_write().await.expect("write lock");
        let appended =
            tokio::time::timeout(std::time::Duration::from_secs(2), store.audit_append(&entry("email=a@x.org"))).await;
        assert!(appended.is_ok_and(|r| r.is_ok()), "the append waited for the store's write lock");
        drop(held);
        assert!(dir.path().join(format!("cdp.db{}", crate::store::AUDIT_SUFFIX)).exists());

        // Rows in the store's own table, as an older cdp left them.
        let mut tx = store.begin_write().await.expect("write");
        for (id, target) in [(7, "email=old@x.org"), (8, "phone=+4670")] {
            sqlx::query(
                "INSERT INTO audit_log (id, at, actor, via, action, target, outcome) VALUES (?, 1, 'os:old', 'cli', 'profile.get', ?, 'ok')",
            )
            .bind(id)
            .bind(target)
            .execute(&mut *tx)
            .await
            .expect("old row");
        }
        tx.commit().await.expect("commit");
        drop(store);
        let store = Store::connect("sqlite://cdp.db", dir.path()).await.expect("reopen");
        let rows = store.audit_rows(None, 10).await.expect("rows");
        let targets: Vec<(i64, &str)> = rows.iter().map(|r| (r.id, r.target.as_str())).collect();
        assert_eq!(targets, [(7, "email=old@x.org"), (8, "phone=+4670"), (1, "email=a@x.org")]);
        let left: i64 =
            sqlx::query("SELECT COUNT(*) FROM audit_log").fetch_one(store.read_pool()).await.expect("count").get(0);
        assert_eq!(left, 0, "the store's own table is emptied");
        // Reopening again moves nothing twice.
        drop(store);
        let store = Store::connect("sqlite://cdp.db", dir.path()).await.expect("reopen");
        assert_eq!(store.audit_rows(None, 10).await.expect("rows").len(), 3);
    }
}
