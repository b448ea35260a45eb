//! The audit log: an append-only table of who read personal data or
//! changed state — through the admin API (a token's name) or the CLI (the
//! operating-system user) — when, what, on what, and the outcome. Rows in,
//! rows out; there is no update or delete.

use super::{Result, Store, now_ms};
use sqlx::Row;

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

impl Store {
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
        let mut tx = self.begin_write().await?;
        let id: i64 = sqlx::query(&self.sql(
            "INSERT INTO audit_log (at, actor, via, action, target, outcome) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        ))
        .bind(now_ms())
        .bind(e.actor)
        .bind(e.via)
        .bind(e.action)
        .bind(target)
        .bind(e.outcome)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        tx.commit().await?;
        metrics::counter!(crate::metrics::AUDIT_ROWS, "action" => e.action.to_owned()).increment(1);
        Ok(id)
    }

    /// Rows at or after `since` (epoch ms), oldest first, at most `limit`.
    pub async fn audit_rows(&self, since: Option<i64>, limit: i64) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(&self.sql(
            "SELECT id, at, actor, via, action, target, outcome FROM audit_log WHERE at >= ? ORDER BY at, id LIMIT ?",
        ))
        .bind(since.unwrap_or(i64::MIN))
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(AuditRow {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    actor: r.try_get(2)?,
                    via: r.try_get(3)?,
                    action: r.try_get(4)?,
                    target: r.try_get(5)?,
                    outcome: r.try_get(6)?,
                })
            })
            .collect()
    }
}
