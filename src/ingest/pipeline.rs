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

/// The largest batch of a bulk load (records per transaction) unless
/// `cdp ingest --batch` says otherwise; batches ramp up to it from [`FIRST_BATCH`]. Bigger
/// batches write each index page once for more records and load a component
/// once for all the records that join it: the web events of
/// `scripts/identity-eval` at 155,000 people (506,132 records into a store
/// already holding CRM and loyalty) took 10.8 s in batches of 20,000 and
/// 7.4 s in batches of 100,000; `cdp bench ingest` went from 98,000 to
/// 113,000 records/s. The cost is memory (two batches in flight: 382 →
/// 632 MiB there) and the lines redone after a crash. SQLite only: see
/// [`DEFAULT_BATCH_POSTGRES`].
pub const DEFAULT_BATCH: usize = 100_000;

/// The largest batch of a bulk load into PostgreSQL: a batch takes an
/// advisory lock per identity component and new identifier it touches
/// (`store::locking`), and the server's lock table, 6,400 locks with its
/// default settings, is exhausted by a batch of 100,000 records ("out of
/// shared memory", `cdp bench ingest --records 200000 --postgres`).
pub const DEFAULT_BATCH_POSTGRES: usize = 20_000;

/// The largest batch of a bulk load when none is given: [`DEFAULT_BATCH`]
/// or, on PostgreSQL, [`DEFAULT_BATCH_POSTGRES`].
pub fn default_batch(backend: crate::store::Backend) -> usize {
    match backend {
        crate::store::Backend::Sqlite => DEFAULT_BATCH,
        crate::store::Backend::Postgres => DEFAULT_BATCH_POSTGRES,
    }
}

/// The first batch of a bulk load ([`Ramp`]).
pub const FIRST_BATCH: usize = 10_000;

/// Batch sizes for a bulk load: the first is small, so the writer starts
/// while the reader maps the next, and each after it doubles up to `max`.
/// Large batches are what makes a bulk load fast (a batch dirties index
/// pages all over the store and loads the components it joins; each is
/// written or loaded once per batch), but a first batch of `max` records
/// would leave the writer idle until the reader had mapped all of them.
#[derive(Debug, Clone)]
pub struct Ramp {
    next: usize,
    max: usize,
}

impl Ramp {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Ramp { next: FIRST_BATCH.min(max), max }
    }
}

impl Iterator for Ramp {
    type Item = usize;

    /// The size of the next batch.
    fn next(&mut self) -> Option<usize> {
        let n = self.next;
        self.next = n.saturating_mul(2).min(self.max);
        Some(n)
    }
}

/// Gathers items into batches whose sizes follow a [`Ramp`].
pub struct Batcher<T> {
    sizes: Ramp,
    size: usize,
    items: Vec<T>,
}

impl<T> Batcher<T> {
    /// Batches ramping up to `max` items.
    pub fn new(max: usize) -> Self {
        let mut sizes = Ramp::new(max);
        let size = sizes.next().unwrap_or(1);
        Batcher { sizes, size, items: Vec::with_capacity(size) }
    }

    /// Adds `item`; returns the batch it completes.
    pub fn push(&mut self, item: T) -> Option<Vec<T>> {
        self.items.push(item);
        if self.items.len() < self.size {
            return None;
        }
        self.size = self.sizes.next().unwrap_or(self.size);
        Some(std::mem::replace(&mut self.items, Vec::with_capacity(self.size)))
    }

    /// The last batch (possibly empty).
    pub fn finish(self) -> Vec<T> {
        self.items
    }
}

/// The reader thread's end of a hand-off to an async writer: [`Handoff::send`]
/// returns once the writer has taken the item, so the reader prepares the
/// next batch while the writer applies this one — two batches in memory,
/// not the three a queue of one would hold.
pub struct Handoff<T> {
    tx: tokio::sync::mpsc::Sender<T>,
    rt: tokio::runtime::Handle,
}

/// A hand-off and the writer's receiver. Call it on the runtime the writer
/// runs on; [`Handoff::send`] belongs on a thread of its own.
pub fn handoff<T>() -> (Handoff<T>, tokio::sync::mpsc::Receiver<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    (Handoff { tx, rt: tokio::runtime::Handle::current() }, rx)
}

impl<T> Handoff<T> {
    /// Hands `item` over and waits until the writer takes it; `false` once
    /// the writer is gone (it stopped on an error: the reader should stop).
    pub fn send(&self, item: T) -> bool {
        self.tx.blocking_send(item).is_ok() && self.rt.block_on(self.tx.reserve()).is_ok()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_ramp_doubles_from_the_first_batch_up_to_its_largest() {
        let sizes: Vec<usize> = Ramp::new(100_000).take(6).collect();
        assert_eq!(sizes, [10_000, 20_000, 40_000, 80_000, 100_000, 100_000]);
        assert_eq!(Ramp::new(5_000).take(2).collect::<Vec<_>>(), [5_000, 5_000]);
        assert_eq!(Ramp::new(0).next(), Some(1), "a batch holds at least one record");
    }

    #[test]
    fn a_batcher_hands_out_batches_of_the_ramps_sizes() {
        let mut b = Batcher::new(25_000);
        let sizes: Vec<usize> = (0..70_000).filter_map(|i| b.push(i)).map(|v| v.len()).collect();
        assert_eq!(sizes, [10_000, 20_000, 25_000]);
        assert_eq!(b.finish().len(), 15_000, "what is left is the last batch");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handoff_lets_the_reader_run_one_item_ahead_and_no_more() {
        let (tx, mut rx) = handoff::<usize>();
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let reader = std::thread::spawn(move || {
            for i in 0..5 {
                counter.store(i + 1, Ordering::SeqCst);
                if !tx.send(i) {
                    return i;
                }
            }
            5
        });
        for want in 0..3 {
            let got = rx.recv().await.expect("an item");
            assert_eq!(got, want);
            // The writer "applies" item `want`; the reader may prepare the
            // next one meanwhile, never two.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(made.load(Ordering::SeqCst) <= want + 2, "the reader ran more than one item ahead");
        }
        drop(rx);
        assert!(reader.join().expect("the reader") < 5, "the reader stops once the writer is gone");
    }
}
