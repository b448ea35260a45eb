//! The job queue: work items (a delivery, an evaluation) that any task or
//! replica may run, shared through the database. A claim marks a job running
//! for a while; a worker that dies leaves it to be claimed again once that
//! time is up. A failed job is retried at the time its worker gives, or
//! stays failed.
//!
//! On PostgreSQL a claim picks the oldest due job with `FOR UPDATE SKIP
//! LOCKED`, so concurrent claimers never wait on one another nor get the
//! same job; on SQLite the single writer orders the claims (same API, one
//! process).

use super::{Backend, Result, Store};
use sqlx::Row;
use std::time::Duration;

/// A claimed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub queue: String,
    pub payload: String,
    /// Claims so far, this one included; identifies this claim.
    pub attempts: i64,
    pub claimed_by: String,
    /// Milliseconds since the epoch; another worker may claim it after.
    pub claimed_until: i64,
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub state: String,
    pub attempts: i64,
    pub run_at: i64,
    pub last_error: Option<String>,
}

const JOB_COLUMNS: &str = "id, queue, payload, attempts, claimed_by, claimed_until";

fn job_of(row: &sqlx::any::AnyRow) -> Result<Job> {
    Ok(Job {
        id: row.try_get(0)?,
        queue: row.try_get(1)?,
        payload: row.try_get(2)?,
        attempts: row.try_get(3)?,
        claimed_by: row.try_get(4)?,
        claimed_until: row.try_get(5)?,
    })
}

impl Store {
    /// Adds a job to `queue`, due at `run_at` (milliseconds since the epoch;
    /// `None`: now). Returns its id.
    pub async fn enqueue(&self, queue: &str, payload: &str, run_at: Option<i64>) -> Result<i64> {
        let sql = format!(
            "INSERT INTO jobs (queue, payload, state, run_at, attempts, created_at) \
             VALUES (?, ?, 'ready', COALESCE(?, {now}), 0, {now}) RETURNING id",
            now = self.now_sql()
        );
        let row = sqlx::query(&self.sql(&sql)).bind(queue).bind(payload).bind(run_at).fetch_one(self.pool()).await?;
        Ok(row.try_get(0)?)
    }

    /// Claims the oldest due job of `queue` for `worker` for `ttl`: a ready
    /// job whose time has come, or a running one whose claim ran out.
    pub async fn claim_job(&self, queue: &str, worker: &str, ttl: Duration) -> Result<Option<Job>> {
        let skip = if self.backend == Backend::Postgres { " FOR UPDATE SKIP LOCKED" } else { "" };
        let now = self.now_sql();
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, claimed_by = ?, claimed_until = {now} + ? \
             WHERE id = (SELECT id FROM jobs WHERE queue = ? AND ((state = 'ready' AND run_at <= {now}) \
             OR (state = 'running' AND claimed_until <= {now})) ORDER BY run_at, id LIMIT 1{skip}) \
             RETURNING {JOB_COLUMNS}"
        );
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4).max(1);
        let row = sqlx::query(&self.sql(&sql)).bind(worker).bind(ttl).bind(queue).fetch_optional(self.pool()).await?;
        row.as_ref().map(job_of).transpose()
    }

    /// Marks a claimed job done. `false` when the claim was lost (it ran out
    /// and another worker claimed the job).
    pub async fn complete_job(&self, job: &Job) -> Result<bool> {
        let r = sqlx::query(&self.sql(
            "UPDATE jobs SET state = 'done', claimed_until = NULL WHERE id = ? AND claimed_by = ? AND attempts = ? \
             AND state = 'running'",
        ))
        .bind(job.id)
        .bind(&job.claimed_by)
        .bind(job.attempts)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a failed attempt: the job is due again at `retry_at`
    /// (milliseconds since the epoch), or stays failed when `None`. `false`
    /// when the claim was lost.
    pub async fn fail_job(&self, job: &Job, error: &str, retry_at: Option<i64>) -> Result<bool> {
        let r = sqlx::query(&self.sql(
            "UPDATE jobs SET state = CASE WHEN ? IS NULL THEN 'failed' ELSE 'ready' END, \
             run_at = COALESCE(?, run_at), last_error = ?, claimed_until = NULL \
             WHERE id = ? AND claimed_by = ? AND attempts = ? AND state = 'running'",
        ))
        .bind(retry_at)
        .bind(retry_at)
        .bind(error)
        .bind(job.id)
        .bind(&job.claimed_by)
        .bind(job.attempts)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Where job `id` stands, if it exists.
    pub async fn job_state(&self, id: i64) -> Result<Option<JobState>> {
        let row = sqlx::query(&self.sql("SELECT state, attempts, run_at, last_error FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(self.read_pool())
            .await?;
        row.map(|r| {
            Ok(JobState {
                state: r.try_get(0)?,
                attempts: r.try_get(1)?,
                run_at: r.try_get(2)?,
                last_error: r.try_get(3)?,
            })
        })
        .transpose()
    }
}
