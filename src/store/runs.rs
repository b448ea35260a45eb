//! Run history and runtime status: rows in, rows out. The runtime
//! (`src/runtime/`) writes a row per sync run as its batches commit, the
//! records a run rejected (bounded), every manifest it applies, and small
//! status documents (its heartbeat, the last reload's outcome); `cdp status`
//! and `cdp plan` read them. No evaluation happens here.

use super::{Result, Store, now_ms};
use serde_json::Value;
use sqlx::Row;

/// Most rejected records kept per run; the count goes on past it.
pub const MAX_REJECTS_PER_RUN: i64 = 1_000;
/// Longest excerpt of a rejected record kept, in bytes.
pub const MAX_REJECT_BYTES: usize = 4_096;

/// Counters of one run so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RunCounts {
    pub read: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub duplicates: u64,
}

impl RunCounts {
    pub fn add(&mut self, o: &RunCounts) {
        self.read += o.read;
        self.accepted += o.accepted;
        self.rejected += o.rejected;
        self.duplicates += o.duplicates;
    }
}

/// One row of the run history.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub sync: String,
    pub trigger: String,
    pub holder: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    /// `running`, `succeeded`, `failed`, `cancelled` or `interrupted` (its process died).
    pub state: String,
    pub counts: RunCounts,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub checkpoint: Option<String>,
}

/// A record a run rejected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RejectRow {
    pub seq: i64,
    pub reason: String,
    pub record: String,
}

/// The manifest last applied to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedManifest {
    pub sha256: String,
    pub text: String,
    pub applied_at: i64,
    pub applied_by: String,
}

const RUN_COLS: &str = "id, sync, trigger, holder, started_at, ended_at, state, records_read, accepted, rejected, \
                        duplicates, error_class, error_message, checkpoint";

fn run_row(r: &sqlx::any::AnyRow) -> Result<RunRow> {
    let count = |i: usize| -> Result<u64> { Ok(u64::try_from(r.try_get::<i64, _>(i)?).unwrap_or(0)) };
    Ok(RunRow {
        id: r.try_get(0)?,
        sync: r.try_get(1)?,
        trigger: r.try_get(2)?,
        holder: r.try_get(3)?,
        started_at: r.try_get(4)?,
        ended_at: r.try_get(5)?,
        state: r.try_get(6)?,
        counts: RunCounts { read: count(7)?, accepted: count(8)?, rejected: count(9)?, duplicates: count(10)? },
        error_class: r.try_get(11)?,
        error_message: r.try_get(12)?,
        checkpoint: r.try_get(13)?,
    })
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// Starts a run of `sync` and returns its id. The caller holds the sync's
    /// lease, so a run of it still marked `running` belongs to a process
    /// that died: it is marked `interrupted`.
    pub async fn start_run(&self, sync: &str, trigger: &str, holder: &str) -> Result<i64> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        sqlx::query(
            &self.sql("UPDATE sync_runs SET state = 'interrupted', ended_at = ? WHERE sync = ? AND state = 'running'"),
        )
        .bind(now)
        .bind(sync)
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query(&self.sql(
            "INSERT INTO sync_runs (sync, trigger, holder, started_at, state) VALUES (?, ?, ?, ?, 'running') RETURNING id",
        ))
        .bind(sync)
        .bind(trigger)
        .bind(holder)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        tx.commit().await?;
        Ok(id)
    }

    /// Writes a run's counters and last committed checkpoint so far.
    pub async fn update_run(&self, id: i64, counts: &RunCounts, checkpoint: Option<&str>) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.sql(
            "UPDATE sync_runs SET records_read = ?, accepted = ?, rejected = ?, duplicates = ?, \
             checkpoint = COALESCE(?, checkpoint) WHERE id = ?",
        ))
        .bind(int(counts.read))
        .bind(int(counts.accepted))
        .bind(int(counts.rejected))
        .bind(int(counts.duplicates))
        .bind(checkpoint)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends a run: its final state, counters and error (class, message).
    pub async fn finish_run(
        &self,
        id: i64,
        state: &str,
        counts: &RunCounts,
        error: Option<(&str, &str)>,
        checkpoint: Option<&str>,
    ) -> Result<()> {
        self.update_run(id, counts, checkpoint).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            &self.sql("UPDATE sync_runs SET state = ?, ended_at = ?, error_class = ?, error_message = ? WHERE id = ?"),
        )
        .bind(state)
        .bind(now_ms())
        .bind(error.map(|e| e.0))
        .bind(error.map(|e| e.1))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Keeps rejected records of a run, numbered from `first_seq`, up to
    /// [`MAX_REJECTS_PER_RUN`]; records are cut to [`MAX_REJECT_BYTES`].
    pub async fn add_rejects(&self, run_id: i64, first_seq: i64, rejects: &[(String, String)]) -> Result<()> {
        let room = usize::try_from(MAX_REJECTS_PER_RUN.saturating_sub(first_seq)).unwrap_or(0);
        let rows = &rejects[..rejects.len().min(room)];
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for chunk in rows.chunks(200) {
            let sql = format!(
                "INSERT INTO sync_rejects (run_id, seq, reason, record) VALUES {} ON CONFLICT DO NOTHING",
                super::values_clause(chunk.len(), 4)
            );
            let sql = self.sql(&sql).into_owned();
            let mut q = sqlx::query(&sql);
            for (i, (reason, record)) in chunk.iter().enumerate() {
                let seq = first_seq + i64::try_from(i).unwrap_or(0);
                q = q.bind(run_id).bind(seq).bind(reason.as_str()).bind(cut(record, MAX_REJECT_BYTES).to_owned());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rejected records of a run, in order.
    pub async fn rejects(&self, run_id: i64, limit: i64) -> Result<Vec<RejectRow>> {
        let rows = sqlx::query(
            &self.sql("SELECT seq, reason, record FROM sync_rejects WHERE run_id = ? ORDER BY seq LIMIT ?"),
        )
        .bind(run_id)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        rows.iter()
            .map(|r| Ok(RejectRow { seq: r.try_get(0)?, reason: r.try_get(1)?, record: r.try_get(2)? }))
            .collect()
    }

    /// The newest runs of `sync`, newest first.
    pub async fn runs(&self, sync: &str, limit: i64) -> Result<Vec<RunRow>> {
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT {RUN_COLS} FROM sync_runs WHERE sync = ? ORDER BY started_at DESC, id DESC LIMIT ?"
        )))
        .bind(sync)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        rows.iter().map(run_row).collect()
    }

    /// The newest run of `sync` that is not still running.
    pub async fn last_finished_run(&self, sync: &str) -> Result<Option<RunRow>> {
        let row = sqlx::query(&self.sql(&format!(
            "SELECT {RUN_COLS} FROM sync_runs WHERE sync = ? AND state <> 'running' \
             ORDER BY started_at DESC, id DESC LIMIT 1"
        )))
        .bind(sync)
        .fetch_optional(self.read_pool())
        .await?;
        row.as_ref().map(run_row).transpose()
    }

    /// Records `text` as the applied manifest unless it already is.
    /// Returns whether it was new.
    pub async fn record_manifest(&self, sha256: &str, text: &str, applied_by: &str) -> Result<bool> {
        if self.applied_manifest().await?.is_some_and(|m| m.sha256 == sha256) {
            return Ok(false);
        }
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.sql("INSERT INTO manifests (sha256, text, applied_at, applied_by) VALUES (?, ?, ?, ?)"))
            .bind(sha256)
            .bind(text)
            .bind(now_ms())
            .bind(applied_by)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The manifest last applied to this store, if any.
    pub async fn applied_manifest(&self) -> Result<Option<AppliedManifest>> {
        let row = sqlx::query("SELECT sha256, text, applied_at, applied_by FROM manifests ORDER BY id DESC LIMIT 1")
            .fetch_optional(self.read_pool())
            .await?;
        row.map(|r| {
            Ok(AppliedManifest {
                sha256: r.try_get(0)?,
                text: r.try_get(1)?,
                applied_at: r.try_get(2)?,
                applied_by: r.try_get(3)?,
            })
        })
        .transpose()
    }

    /// Stores a status document under `name`.
    pub async fn put_status(&self, name: &str, value: &Value) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.sql(
            "INSERT INTO runtime_status (name, value, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        ))
        .bind(name)
        .bind(value.to_string())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A status document and when it was written.
    pub async fn status_doc(&self, name: &str) -> Result<Option<(Value, i64)>> {
        let row = sqlx::query(&self.sql("SELECT value, updated_at FROM runtime_status WHERE name = ?"))
            .bind(name)
            .fetch_optional(self.read_pool())
            .await?;
        let Some(r) = row else { return Ok(None) };
        let text: String = r.try_get(0)?;
        let value = serde_json::from_str(&text)
            .map_err(|e| super::StoreError::Invariant(format!("status document `{name}` is not JSON: {e}")))?;
        Ok(Some((value, r.try_get(1)?)))
    }
}

/// The longest prefix of `s` within `max` bytes, cut at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_characters_whole() {
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(cut("åäö", 3), "å");
        assert_eq!(cut("åäö", 4), "åä");
    }

    #[tokio::test]
    async fn runs_are_recorded_and_a_dead_holders_run_is_marked_interrupted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect("sqlite://s.db", dir.path()).await.expect("store");
        let first = store.start_run("loyalty", "schedule", "a").await.expect("start");
        let counts = RunCounts { read: 3, accepted: 2, rejected: 1, duplicates: 0 };
        store.update_run(first, &counts, Some("{\"offset\":3}")).await.expect("update");
        // A second run starts while the first is still `running`: its holder died.
        let second = store.start_run("loyalty", "manual", "b").await.expect("start");
        store.add_rejects(second, 0, &[("no message id".into(), "{\"x\":1}".into())]).await.expect("rejects");
        store.finish_run(second, "failed", &counts, Some(("config", "bad file")), None).await.expect("finish");
        let runs = store.runs("loyalty", 10).await.expect("runs");
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].id, second);
        assert_eq!(runs[0].state, "failed");
        assert_eq!(runs[0].error_class.as_deref(), Some("config"));
        assert_eq!(runs[1].state, "interrupted");
        assert_eq!(runs[1].checkpoint.as_deref(), Some("{\"offset\":3}"));
        assert_eq!(runs[1].counts, counts);
        let rejects = store.rejects(second, 10).await.expect("rejects");
        assert_eq!(rejects, vec![RejectRow { seq: 0, reason: "no message id".into(), record: "{\"x\":1}".into() }]);
        assert_eq!(store.last_finished_run("loyalty").await.expect("last").map(|r| r.id), Some(second));
    }

    #[tokio::test]
    async fn the_applied_manifest_is_recorded_once_per_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect("sqlite://s.db", dir.path()).await.expect("store");
        assert!(store.applied_manifest().await.expect("none").is_none());
        assert!(store.record_manifest("aa", "version: 1", "run").await.expect("first"));
        assert!(!store.record_manifest("aa", "version: 1", "run").await.expect("same"));
        assert!(store.record_manifest("bb", "version: 1 # changed", "run").await.expect("changed"));
        assert_eq!(store.applied_manifest().await.expect("applied").map(|m| m.sha256), Some("bb".into()));
        store.put_status("reload", &serde_json::json!({"ok": false})).await.expect("put");
        let (doc, _) = store.status_doc("reload").await.expect("get").expect("present");
        assert_eq!(doc["ok"], false);
    }
}
