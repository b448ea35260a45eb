//! One run of a source sync: the plugin's records through the ingest
//! pipeline into the store, each batch committed with the plugin's
//! checkpoint in one transaction, under the sync's lease.
//!
//! * **One at a time, everywhere.** A run holds the lease `sync:source:NAME`
//!   (across processes and replicas); every commit checks the lease's
//!   fencing token inside its transaction, so a holder that lost its lease
//!   commits nothing more.
//! * **Resumable.** A run opens the plugin with the last committed
//!   checkpoint. Records read after it and not yet committed are read again
//!   after a crash and dropped as duplicates by message id.
//! * **Errors follow their class.** Retryable plugin errors (transient,
//!   rate-limited) reopen the reader from the last checkpoint after a
//!   backoff (honouring `retry-after`); config, auth and permission errors,
//!   traps, deadlines and memory caps fail this run only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::snapshot::{Snapshot, SourceSync};
use crate::ingest::pipeline::{self, Committer, Job};
use crate::ingest::{Mapper, Record, Rejection};
use crate::plugin::{PluginError, ReadEvent};
use crate::store::ingest::BatchReport;
use crate::store::lease::Lease;
use crate::store::runs::RunCounts;
use crate::store::{Store, StoreError};

/// Records asked of the plugin per `next`.
const READ_MAX: u32 = 1_000;
/// Records committed together when the plugin gives no checkpoint sooner.
pub const BATCH: usize = 20_000;
/// Attempts at one run when the plugin's errors are retryable.
const MAX_ATTEMPTS: u32 = 5;
/// A streaming source that is idle is polled again after this, doubling to [`IDLE_MAX`].
const IDLE_MIN: Duration = Duration::from_millis(100);
const IDLE_MAX: Duration = Duration::from_secs(5);

/// Why a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its cron schedule fired.
    Schedule,
    /// A scheduled time passed while no runtime ran (or it never ran).
    Startup,
    /// `cdp sync`.
    Manual,
    /// A streaming source (re)started.
    Streaming,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Startup => "startup",
            Trigger::Manual => "manual",
            Trigger::Streaming => "streaming",
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("`{sync}` is not a plugin source in the manifest")]
    Unknown { sync: String },
    #[error("sync `{sync}` is running in another process ({holder}); try again when it has finished")]
    Busy { sync: String, holder: String },
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("source `{sync}`: {message}")]
    Mapping { sync: String, message: String },
}

impl SyncError {
    /// The class written to the run history and shown by `cdp status`.
    pub fn class(&self) -> &'static str {
        match self {
            SyncError::Unknown { .. } | SyncError::Mapping { .. } => "config",
            SyncError::Busy { .. } => "busy",
            SyncError::Store(StoreError::LeaseLost { .. }) => "lease-lost",
            SyncError::Store(_) => "store",
            SyncError::Plugin(e) => match e {
                PluginError::Connector { error, .. } => error.class.as_str(),
                PluginError::Deadline { .. } => "timeout",
                PluginError::Memory { .. } => "memory",
                PluginError::Trap { .. } => "trap",
                PluginError::Protocol { .. } => "protocol",
                _ => "plugin",
            },
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub run_id: i64,
    pub counts: RunCounts,
    /// `succeeded`, `failed` or `cancelled`.
    pub state: &'static str,
    pub error: Option<SyncError>,
    /// The last committed checkpoint.
    pub checkpoint: Option<String>,
}

/// What a run needs besides the snapshot: the store and who we are.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub store: Arc<Store>,
    /// This process, as lease holders are named: `cdp@HOST:PID`.
    pub holder: String,
}

/// The cursor stream of a source sync's checkpoints.
pub fn stream(sync: &str) -> String {
    format!("sync:{sync}")
}

/// The lease a source sync holds while it runs.
pub fn lease_name(sync: &str) -> String {
    format!("sync:source:{sync}")
}

/// A lease outlives any one plugin call, so a run that is waiting on its
/// plugin keeps it: three call deadlines, at least 30 s.
fn lease_ttl(sync: &SourceSync) -> Duration {
    (sync.grants.timeout * 3).max(Duration::from_secs(30))
}

/// Runs source sync `name` of `snap` once. Batch sources read until the
/// plugin is done; streaming sources until `cancel`. `full` ignores the
/// stored checkpoint (records already stored are still dropped as
/// duplicates). Errors before a run could start (unknown sync, lease held
/// elsewhere) are `Err`; a run that started always ends in an [`Outcome`].
pub async fn run(
    ctx: &Ctx,
    snap: &Snapshot,
    name: &str,
    trigger: Trigger,
    full: bool,
    cancel: &CancellationToken,
) -> Result<Outcome, SyncError> {
    let sync = snap.syncs.get(name).ok_or_else(|| SyncError::Unknown { sync: name.to_owned() })?;
    let ttl = lease_ttl(sync);
    let lease = match ctx.store.try_acquire_lease(&lease_name(name), &ctx.holder, ttl).await? {
        Some(l) => l,
        None => {
            let holder = ctx.store.lease_holder(&lease_name(name)).await?.map_or_else(|| "?".into(), |l| l.holder);
            return Err(SyncError::Busy { sync: name.to_owned(), holder });
        }
    };
    let run_id = ctx.store.start_run(name, trigger.as_str(), &ctx.holder).await?;
    let started = Instant::now();
    tracing::info!(sync = name, run = run_id, trigger = trigger.as_str(), "sync started");
    let mut run = Run {
        ctx,
        snap,
        sync,
        run_id,
        lease,
        ttl,
        renewed: Instant::now(),
        counts: RunCounts::default(),
        rejects_kept: 0,
        checkpoint: None,
    };
    let result = run.attempts(full, cancel).await;
    let state = match &result {
        Ok(()) if cancel.is_cancelled() => "cancelled",
        Ok(()) => "succeeded",
        Err(_) => "failed",
    };
    let error = result.err();
    run_ended(name, state, started.elapsed());
    let err_fields = error.as_ref().map(|e| (e.class(), e.to_string()));
    ctx.store
        .finish_run(
            run_id,
            state,
            &run.counts,
            err_fields.as_ref().map(|(c, m)| (*c, m.as_str())),
            run.checkpoint.as_deref(),
        )
        .await?;
    if error.is_none() && run.counts.accepted > 0 && snap.manifest.identity.matching.is_some() {
        // As after `cdp ingest`: records with no shared key are matched
        // probabilistically once they are in. Still under the lease, so two
        // runs never match at once.
        if let Err(e) = ctx.store.match_profiles(&snap.manifest).await {
            tracing::warn!(sync = name, error = %e, "probabilistic matching after the sync failed; `cdp match` runs it");
        }
    }
    if let Err(e) = ctx.store.release_lease(&run.lease).await {
        tracing::warn!(sync = name, error = %e, "could not release the lease; it expires by itself");
    }
    match &error {
        None => tracing::info!(
            sync = name,
            run = run_id,
            state,
            read = run.counts.read,
            accepted = run.counts.accepted,
            rejected = run.counts.rejected,
            "sync ended"
        ),
        Some(e) => tracing::warn!(sync = name, run = run_id, class = e.class(), error = %e, "sync failed"),
    }
    Ok(Outcome { run_id, counts: run.counts, state, error, checkpoint: run.checkpoint })
}

/// Records read and not yet committed, with what they carry to the run's
/// accounting once committed.
#[derive(Debug, Default)]
struct Pending {
    records: Vec<Record>,
    after: Accounting,
}

/// What a batch leaves to the run's accounting once it is committed.
#[derive(Debug, Default)]
struct Accounting {
    /// `(reason, line)` of the lines rejected among the batch's records.
    rejects: Vec<(String, String)>,
    /// The newest checkpoint read.
    checkpoint: Option<String>,
}

/// Records a run that ended in `state` after `took`.
fn run_ended(sync: &str, state: &'static str, took: Duration) {
    use crate::metrics::{SYNC_DURATION, SYNC_RUNS};
    metrics::counter!(SYNC_RUNS, "sync" => sync.to_owned(), "state" => state).increment(1);
    metrics::histogram!(SYNC_DURATION, "sync" => sync.to_owned()).record(took.as_secs_f64());
}

/// A run in progress.
struct Run<'a> {
    ctx: &'a Ctx,
    snap: &'a Snapshot,
    sync: &'a SourceSync,
    run_id: i64,
    lease: Lease,
    ttl: Duration,
    renewed: Instant,
    counts: RunCounts,
    rejects_kept: i64,
    checkpoint: Option<String>,
}

impl Run<'_> {
    /// Reads until done, retrying retryable plugin errors from the last
    /// committed checkpoint with exponential backoff and jitter.
    async fn attempts(&mut self, full: bool, cancel: &CancellationToken) -> Result<(), SyncError> {
        let mut attempt = 0;
        loop {
            // `--full` ignores the stored checkpoint only on the first attempt:
            // a retry resumes from what this run committed.
            let state =
                if full && attempt == 0 { None } else { self.ctx.store.cursor(&stream(&self.sync.name)).await? };
            match self.read(state.as_deref(), cancel).await {
                Err(SyncError::Plugin(e)) if retryable(&e) && attempt + 1 < MAX_ATTEMPTS && !cancel.is_cancelled() => {
                    attempt += 1;
                    let wait = retry_wait(&e, attempt);
                    tracing::warn!(sync = %self.sync.name, attempt, wait_ms = wait.as_millis() as u64, error = %e, "retryable plugin error; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => return Ok(()),
                    }
                }
                r => return r,
            }
        }
    }

    /// One pass over the plugin's reader. While a batch is committed the
    /// next is read and mapped ([`Committer`]); whatever way the pass ends,
    /// the batch in flight is waited for and accounted before it returns.
    async fn read(&mut self, state: Option<&str>, cancel: &CancellationToken) -> Result<(), SyncError> {
        let sync = self.sync;
        let mut instance = sync.plugin.source(&sync.name, &sync.grants).await?;
        instance.open(&sync.config, state).await?;
        let mut committer = Committer::new(self.ctx.store.clone(), self.snap.identity.clone(), "sync");
        let read = self.read_all(&mut instance, &mut committer, cancel).await;
        let last = committer.wait().await;
        let accounted = self.account(&mut instance, last).await;
        read?;
        accounted?;
        instance.close().await?;
        Ok(())
    }

    async fn read_all(
        &mut self,
        instance: &mut crate::plugin::SourceInstance,
        committer: &mut Committer<Accounting>,
        cancel: &CancellationToken,
    ) -> Result<(), SyncError> {
        let sync = self.sync;
        let mut mapper = Mapper::new(&self.snap.manifest, &sync.name)
            .map_err(|message| SyncError::Mapping { sync: sync.name.to_string(), message })?;
        let mut pending = Pending::default();
        let mut idle = IDLE_MIN;
        let now = crate::store::now_ms();
        while !cancel.is_cancelled() {
            let events = instance.next(READ_MAX).await?;
            self.keep_lease().await?;
            if events.is_empty() {
                // Idle or done: commit what is pending and wait for it.
                self.submit(instance, committer, std::mem::take(&mut pending)).await?;
                let done = committer.wait().await;
                self.account(instance, done).await?;
                if !sync.streaming {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = cancel.cancelled() => {}
                }
                idle = (idle * 2).min(IDLE_MAX);
                continue;
            }
            idle = IDLE_MIN;
            for event in events {
                match event {
                    ReadEvent::Records { ndjson, .. } => {
                        for line in ndjson.lines().filter(|l| !l.trim().is_empty()) {
                            self.counts.read += 1;
                            match pipeline::map_json_line(&mut mapper, line, now) {
                                Ok(r) => pending.records.push(r),
                                Err(Rejection { message, code: "not_json", .. }) => pending.after.rejects.push((
                                    format!("the plugin sent a line that is not JSON: {message}"),
                                    line.to_owned(),
                                )),
                                Err(r) => pending.after.rejects.push((r.message, line.to_owned())),
                            }
                        }
                    }
                    // The newest checkpoint read covers every record before
                    // it, and all of those are pending or committed, so
                    // committing the pending records with it is always safe
                    // (records after it are read again after a crash and
                    // dropped as duplicates).
                    ReadEvent::Checkpoint(c) => pending.after.checkpoint = Some(c),
                }
            }
            if pending.records.len() >= BATCH {
                self.submit(instance, committer, std::mem::take(&mut pending)).await?;
            }
        }
        Ok(())
    }

    /// Hands `pending` to the committer, fenced by the lease, and accounts
    /// the batch committed before it.
    async fn submit(
        &mut self,
        instance: &mut crate::plugin::SourceInstance,
        committer: &mut Committer<Accounting>,
        pending: Pending,
    ) -> Result<(), SyncError> {
        let Pending { records, after } = pending;
        if records.is_empty() && after.rejects.is_empty() && after.checkpoint.is_none() {
            return Ok(());
        }
        let job = Job {
            records,
            cursor: after.checkpoint.clone().map(|c| (stream(&self.sync.name), c)),
            fence: Some(self.lease.clone()),
            tag: after,
        };
        let done = committer.submit(job).await;
        self.account(instance, done).await
    }

    /// Records a committed batch in the run: counts, rejected records, the
    /// checkpoint; then tells a streaming plugin its checkpoint is durable.
    async fn account(
        &mut self,
        instance: &mut crate::plugin::SourceInstance,
        done: Option<Result<(BatchReport, Accounting), StoreError>>,
    ) -> Result<(), SyncError> {
        let Some(done) = done else { return Ok(()) };
        let (report, batch) = done?;
        self.counts.accepted += report.accepted;
        self.counts.duplicates += report.duplicates;
        self.counts.rejected += batch.rejects.len() as u64;
        if !batch.rejects.is_empty() {
            self.ctx.store.add_rejects(self.run_id, self.rejects_kept, &batch.rejects).await?;
            self.rejects_kept += batch.rejects.len() as i64;
        }
        if batch.checkpoint.is_some() {
            self.checkpoint = batch.checkpoint.clone();
        }
        self.ctx.store.update_run(self.run_id, &self.counts, self.checkpoint.as_deref()).await?;
        if let Some(c) = batch.checkpoint.filter(|_| self.sync.streaming) {
            instance.ack(&c).await?;
        }
        Ok(())
    }

    /// Renews the lease once a third of its time has passed.
    async fn keep_lease(&mut self) -> Result<(), SyncError> {
        if self.renewed.elapsed() < self.ttl / 3 {
            return Ok(());
        }
        match self.ctx.store.renew_lease(&self.lease, self.ttl).await? {
            Some(l) => {
                self.lease = l;
                self.renewed = Instant::now();
                Ok(())
            }
            None => {
                Err(SyncError::Store(StoreError::LeaseLost { name: self.lease.name.clone(), token: self.lease.token }))
            }
        }
    }
}

/// Only errors the plugin itself marks retryable are retried within a run;
/// a deadline, trap or memory cap fails it (the next scheduled run tries
/// again).
fn retryable(e: &PluginError) -> bool {
    e.connector().is_some_and(|c| c.retryable)
}

/// How long to wait before retry `attempt` (1-based): the plugin's
/// `retry-after` when it gave one, else 1 s doubled per attempt up to 60 s,
/// with up to a quarter of jitter.
fn retry_wait(e: &PluginError, attempt: u32) -> Duration {
    if let Some(ms) = e.connector().and_then(|c| c.retry_after_ms) {
        return Duration::from_millis(ms).min(Duration::from_secs(600));
    }
    let base =
        Duration::from_secs(1).saturating_mul(1 << attempt.min(6).saturating_sub(1)).min(Duration::from_secs(60));
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let jitter = crate::rng::Rng::new(seed).below(1_000) as f64 / 1_000.0;
    base.mul_f64(1.0 + jitter * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ingest::BatchReport;

    #[test]
    fn a_run_and_its_batches_show_up_in_the_metrics() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            run_ended("loyalty", "succeeded", Duration::from_millis(1_500));
            run_ended("loyalty", "failed", Duration::from_millis(500));
            let report = BatchReport { accepted: 7, merges: 2, splits: 1, ..BatchReport::default() };
            crate::metrics::batch_committed("sync", &report, 0.25);
        });
        let text = handle.render();
        for line in [
            r#"cdp_sync_runs_total{sync="loyalty",state="succeeded"} 1"#,
            r#"cdp_sync_runs_total{sync="loyalty",state="failed"} 1"#,
            r#"cdp_sync_run_duration_seconds_sum{sync="loyalty"} 2"#,
            r#"cdp_sync_run_duration_seconds_count{sync="loyalty"} 2"#,
            r#"cdp_ingest_batches_total{origin="sync"} 1"#,
            r#"cdp_ingest_records_total{origin="sync"} 7"#,
            r#"cdp_ingest_batch_duration_seconds_count{origin="sync"} 1"#,
            "cdp_identity_merges_total 2",
            "cdp_identity_splits_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}
