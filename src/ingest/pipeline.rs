//! The one ingest pipeline every input goes through — `cdp ingest`, source
//! syncs and the HTTP collector: raw values are **mapped** by the source's
//! `map` ([`Mapper`], a bad record is rejected with its reason and the rest
//! go on), **prepared** off the async threads ([`Batch::prepare`]: dedup,
//! canonical order, JSON rendered), and **applied** in one transaction with
//! the cursor of the input they came from, fenced by a lease when the
//! caller holds one.
//!
//! [`Committer`] overlaps the stages: while one batch is applied, the
//! caller reads and maps the next. At most one batch is in flight, so
//! batches commit in order and a cursor never passes a record that is not
//! committed.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::{Mapper, Record, Rejection};
use crate::store::ingest::{Batch, BatchReport, IdentityConfig};
use crate::store::{Lease, Store, StoreError};

/// Where a batch came from, for metrics: `cli`, `sync` or `collector`.
pub type Origin = &'static str;

/// Maps one raw line of JSON.
pub fn map_json_line(mapper: &mut Mapper<'_>, line: &str, now: i64) -> Result<Record, Rejection> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| Rejection::new("not_json", None, format!("the line is not JSON: {e}")))?;
    mapper.map(&value, now)
}

/// Prepares `records` on a blocking thread and applies them with `cursor`
/// in one transaction (fenced by `fence`), recording the batch's metrics.
pub async fn commit(
    store: &Store,
    cfg: &IdentityConfig,
    records: Vec<Record>,
    cursor: Option<(&str, &str)>,
    fence: Option<&Lease>,
    origin: Origin,
) -> Result<BatchReport, StoreError> {
    let started = Instant::now();
    let batch = prepare(cfg, records).await?;
    apply_timed(store, cfg, batch, cursor, fence, origin, started).await
}

/// Applies an already prepared batch (see [`commit`]).
pub async fn apply(
    store: &Store,
    cfg: &IdentityConfig,
    batch: Batch,
    cursor: Option<(&str, &str)>,
    fence: Option<&Lease>,
    origin: Origin,
) -> Result<BatchReport, StoreError> {
    apply_timed(store, cfg, batch, cursor, fence, origin, Instant::now()).await
}

async fn prepare(cfg: &IdentityConfig, records: Vec<Record>) -> Result<Batch, StoreError> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || Batch::prepare(records, &cfg))
        .await
        .map_err(|e| StoreError::Invariant(format!("preparing a batch failed: {e}")))
}

async fn apply_timed(
    store: &Store,
    cfg: &IdentityConfig,
    batch: Batch,
    cursor: Option<(&str, &str)>,
    fence: Option<&Lease>,
    origin: Origin,
    started: Instant,
) -> Result<BatchReport, StoreError> {
    let report = store.apply_batch_fenced(cfg, batch, cursor, fence).await?;
    crate::metrics::batch_committed(origin, &report, started.elapsed().as_secs_f64());
    Ok(report)
}

/// One batch handed to a [`Committer`], with what the caller needs back
/// once it is committed.
pub struct Job<T> {
    pub records: Vec<Record>,
    /// `(stream, position)` committed with the records.
    pub cursor: Option<(String, String)>,
    pub fence: Option<Lease>,
    /// Given back with the report (rejections to record, a checkpoint to acknowledge…).
    pub tag: T,
}

/// Applies batches in the background, one at a time, in order.
pub struct Committer<T> {
    store: Arc<Store>,
    cfg: IdentityConfig,
    origin: Origin,
    in_flight: Option<tokio::task::JoinHandle<Result<(BatchReport, T), StoreError>>>,
}

impl<T: Send + 'static> Committer<T> {
    pub fn new(store: Arc<Store>, cfg: IdentityConfig, origin: Origin) -> Self {
        Committer { store, cfg, origin, in_flight: None }
    }

    /// Starts committing `job` once the batch before it is committed, and
    /// returns that one's outcome (if there was one).
    pub async fn submit(&mut self, job: Job<T>) -> Option<Result<(BatchReport, T), StoreError>> {
        let done = self.wait().await;
        let (store, cfg, origin) = (self.store.clone(), self.cfg.clone(), self.origin);
        self.in_flight = Some(tokio::spawn(async move {
            let cursor = job.cursor.as_ref().map(|(s, p)| (s.as_str(), p.as_str()));
            let r = commit(&store, &cfg, job.records, cursor, job.fence.as_ref(), origin).await;
            r.map(|report| (report, job.tag))
        }));
        done
    }

    /// Waits for the batch in flight, if any.
    pub async fn wait(&mut self) -> Option<Result<(BatchReport, T), StoreError>> {
        let h = self.in_flight.take()?;
        Some(h.await.unwrap_or_else(|e| Err(StoreError::Invariant(format!("a batch commit task failed: {e}")))))
    }
}
