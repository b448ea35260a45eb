//! Applying a batch of mapped records: deduplicate by message id, resolve
//! identities (recomputing every identity-graph component a new link touches),
//! attach traits, events, entity rows and consent to each record's anchor
//! identifier, write the merge ledger, and commit all of it together with the
//! input's cursor in one transaction.
//!
//! Traits, events and consent hang off identifiers, not profiles: a profile is
//! the set of identifiers resolution puts together, so a merge or split only
//! re-points identifiers (and the denormalised `profile_id` columns kept for
//! reads), never rewrites trait history.

use super::outbox::Changes;
use super::{ChunkSql, IN_CHUNK, Result, Store, now_ms, values_clause, values_list};
use crate::identity::regroup::{self, Node, PendingLink};
use crate::ingest::Record;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;
use sqlx::{AnyConnection, Row};
use std::fmt::Write as _;

pub use crate::identity::IdentityConfig;

/// What a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    pub accepted: u64,
    /// Records dropped because they carry a suppressed identifier.
    pub suppressed: u64,
    /// Records dropped because every identifier they carry was erased.
    pub erased: u64,
    pub duplicates: u64,
    pub new_profiles: u64,
    pub merges: u64,
    pub splits: u64,
    pub conflicts: u64,
}

impl BatchReport {
    pub fn add(&mut self, o: &BatchReport) {
        self.accepted += o.accepted;
        self.suppressed += o.suppressed;
        self.erased += o.erased;
        self.duplicates += o.duplicates;
        self.new_profiles += o.new_profiles;
        self.merges += o.merges;
        self.splits += o.splits;
        self.conflicts += o.conflicts;
    }
}

/// A bind parameter.
#[derive(Debug, Clone)]
pub(crate) enum P {
    I(i64),
    S(String),
    OI(Option<i64>),
    OS(Option<String>),
    OF(Option<f64>),
}

pub(crate) type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

pub(crate) fn bind(q: Query<'_>, p: P) -> Query<'_> {
    match p {
        P::I(v) => q.bind(v),
        P::S(v) => q.bind(v),
        P::OI(v) => q.bind(v),
        P::OS(v) => q.bind(v),
        P::OF(Some(v)) => q.bind(v),
        // sqlx 0.8's `Any` binds a NULL `f64` as PostgreSQL float4 (and a
        // NULL `f32` as float8). PostgreSQL keeps a prepared statement's
        // parameter types from its first run, so a float8 value bound later
        // where a NULL was bound first failed with "incorrect binary data
        // format". A NULL `f32` is a float8 NULL there (and NULL on SQLite).
        P::OF(None) => q.bind(None::<f32>),
    }
}

const RECORDS_INSERT: &str =
    "INSERT INTO records (source, message_id, at, received_at, identity_id, kind, name, payload)";

/// A batch of records made ready for [`Store::apply_batch`]: deduplicated by
/// message id (the first copy stays), in canonical order so that results never
/// depend on the order records arrived in, and with each record's stored
/// payload and trait values rendered as JSON text. Preparing touches no
/// database: a reader thread prepares the next batch while the writer applies
/// this one.
#[derive(Debug, Default)]
pub struct Batch {
    records: Vec<Record>,
    /// Per record: the `records.payload` text.
    payloads: Vec<String>,
    /// Per record: the JSON text of each of its traits' values.
    trait_texts: Vec<Vec<String>>,
    duplicates: u64,
    /// The batch's identifiers and trait folds, when indexed.
    index: Option<Index>,
}

/// A record with no identifier attaches to nothing.
const NO_ANCHOR: u32 = u32::MAX;

/// The identifiers of a batch, indexed once (on the reader thread when the
/// batch is prepared with [`Batch::prepare`]): the distinct `(key, value)`
/// pairs, which of them each record carries, the one each record attaches
/// to, and the record's trait observations folded per (anchor identifier,
/// trait, source). None of it needs the database; the writer only adds what
/// the store holds for each identifier.
#[derive(Debug, Default)]
struct Index {
    /// The identity keys and ranks the anchors were chosen by.
    keys: Vec<String>,
    rank: Vec<u32>,
    /// Distinct identifiers, as `(record, position in its ids)` of their
    /// first appearance. Records are in canonical order, so that is the
    /// identifier's earliest record in the batch.
    idents: Vec<(u32, u32)>,
    /// Per record `r`: its identifiers are `ids[ids_at[r]..ids_at[r + 1]]`.
    ids_at: Vec<u32>,
    ids: Vec<u32>,
    /// Per record: the identifier it attaches to (its strongest), or
    /// [`NO_ANCHOR`].
    anchor: Vec<u32>,
    /// The identifiers by key, then value: the order the writer probes the
    /// store's `(key, value)` index in.
    by_value: Vec<u32>,
    /// Trait observations folded per (anchor, trait, source), in that order.
    folds: Vec<Fold>,
}

/// A place in a batch: `(record, position)` of a trait.
type At = (u32, u32);

/// The folded observations of one trait from one source on one identifier.
#[derive(Debug)]
struct Fold {
    anchor: u32,
    /// Where the trait's name and source are found: the first record folded.
    at: At,
    /// Values as the places of their JSON texts.
    fold: TraitFold<At>,
}

/// A trait value's JSON text while folding: ordered by the text, then place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Text<'b> {
    text: &'b str,
    at: At,
}

impl Index {
    fn build(records: &[Record], trait_texts: &[Vec<String>], cfg: &IdentityConfig) -> Index {
        let mut seen: FxHashMap<(&str, &str), u32> =
            FxHashMap::with_capacity_and_hasher(records.len() * 2, Default::default());
        let mut index = Index {
            keys: cfg.keys.clone(),
            rank: cfg.rules.rank.clone(),
            ids_at: Vec::with_capacity(records.len() + 1),
            anchor: Vec::with_capacity(records.len()),
            ..Index::default()
        };
        index.ids_at.push(0);
        for (ri, r) in records.iter().enumerate() {
            let mut best: Option<((u32, &str, &str), u32)> = None;
            for (pos, (k, v)) in r.ids.iter().enumerate() {
                let next = index.idents.len() as u32;
                let i = *seen.entry((k.as_str(), v.as_str())).or_insert(next);
                if i == next {
                    index.idents.push((ri as u32, pos as u32));
                }
                index.ids.push(i);
                let rank = (cfg.rank(k), k.as_str(), v.as_str());
                if best.is_none_or(|(b, _)| rank < b) {
                    best = Some((rank, i));
                }
            }
            index.ids_at.push(index.ids.len() as u32);
            index.anchor.push(best.map_or(NO_ANCHOR, |(_, i)| i));
        }
        let observations = records.iter().map(|r| r.traits.len()).sum();
        let mut folds: FxHashMap<(u32, &str, &str), (At, TraitFold<Text<'_>>)> =
            FxHashMap::with_capacity_and_hasher(observations, Default::default());
        for (ri, (r, texts)) in records.iter().zip(trait_texts).enumerate() {
            let anchor = index.anchor[ri];
            for (ti, ((name, v), text)) in r.traits.iter().zip(texts).enumerate() {
                let at = (ri as u32, ti as u32);
                let text = Text { text, at };
                let num = v.as_f64();
                folds
                    .entry((anchor, name.as_str(), r.source.as_str()))
                    .and_modify(|(_, f)| f.add(r.at, text, num))
                    .or_insert_with(|| (at, TraitFold::new(r.at, text, num)));
            }
        }
        let mut folds: Vec<_> = folds.into_iter().collect();
        folds.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        index.folds =
            folds.into_iter().map(|((anchor, _, _), (at, f))| Fold { anchor, at, fold: f.map(|t| t.at) }).collect();
        let ident = |i: u32| {
            let (ri, pos) = index.idents[i as usize];
            &records[ri as usize].ids[pos as usize]
        };
        let mut by_value: Vec<u32> = (0..index.idents.len() as u32).collect();
        by_value.sort_unstable_by(|a, b| ident(*a).cmp(ident(*b)));
        index.by_value = by_value;
        index
    }

    fn fits(&self, cfg: &IdentityConfig) -> bool {
        self.keys == cfg.keys && self.rank == cfg.rules.rank
    }

    /// The identifiers record `r` carries.
    fn ids_of(&self, r: usize) -> &[u32] {
        &self.ids[self.ids_at[r] as usize..self.ids_at[r + 1] as usize]
    }
}

impl Batch {
    pub fn new(mut records: Vec<Record>) -> Batch {
        for r in &mut records {
            strip_nul(r);
        }
        let keep: Vec<bool> = {
            let mut seen: FxHashSet<(&str, &str)> = FxHashSet::default();
            records.iter().map(|r| seen.insert((&r.source, &r.message_id))).collect()
        };
        let before = records.len();
        retain_flagged(&mut records, &keep);
        let duplicates = (before - records.len()) as u64;
        // (source, message id) is unique now, so an unstable sort is deterministic.
        records.sort_unstable_by(|a, b| (a.at, &a.source, &a.message_id).cmp(&(b.at, &b.source, &b.message_id)));
        let trait_texts: Vec<Vec<String>> =
            records.iter().map(|r| r.traits.iter().map(|(_, v)| v.to_string()).collect()).collect();
        let payloads = records.iter().zip(&trait_texts).map(|(r, texts)| payload(r, texts)).collect();
        Batch { records, payloads, trait_texts, duplicates, index: None }
    }

    /// [`Batch::new`], with the identifiers indexed and trait observations
    /// folded for `cfg`: all the work of a batch that needs no database,
    /// done wherever the batch is prepared.
    pub fn prepare(records: Vec<Record>, cfg: &IdentityConfig) -> Batch {
        let mut batch = Batch::new(records);
        batch.index(cfg);
        batch
    }

    fn index(&mut self, cfg: &IdentityConfig) {
        self.index = Some(Index::build(&self.records, &self.trait_texts, cfg));
    }

    /// Records left after deduplication.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Applies privacy marks: erased identifiers are taken off their
    /// records (a record left with none is dropped), and a record carrying a
    /// suppressed identifier is dropped. Returns (suppressed, erased) drops.
    fn drop_marked(&mut self, marks: &std::collections::HashMap<(String, String), &'static str>) -> (u64, u64) {
        use super::privacy::{ERASED, SUPPRESSED};
        if marks.is_empty() {
            return (0, 0);
        }
        let mark = |k: &str, v: &str| marks.get(&(k.to_owned(), v.to_owned())).copied();
        for r in &mut self.records {
            let before = r.ids.len();
            r.ids.retain(|(k, v)| mark(k, v) != Some(ERASED));
            if r.ids.len() != before {
                self.index = None;
            }
        }
        let (mut suppressed, mut erased) = (0, 0);
        self.retain(|r| {
            if r.ids.iter().any(|(k, v)| mark(k, v) == Some(SUPPRESSED)) {
                suppressed += 1;
                false
            } else if r.ids.is_empty() {
                erased += 1;
                false
            } else {
                true
            }
        });
        (suppressed, erased)
    }

    /// Keeps the records `keep` says to, with their rendered texts.
    fn retain(&mut self, keep: impl FnMut(&Record) -> bool) {
        let flags: Vec<bool> = self.records.iter().map(keep).collect();
        retain_flagged(&mut self.records, &flags);
        retain_flagged(&mut self.trait_texts, &flags);
        retain_flagged(&mut self.payloads, &flags);
        self.index = None;
    }
}

/// Removes NUL characters from the text a record stores as plain text:
/// source, message id, identifiers, trait, event and entity names and keys,
/// consent purposes. PostgreSQL text cannot hold NUL, and both backends
/// should store the same thing. Values stored as JSON (traits, properties,
/// entity fields) keep it, escaped as `\u0000`.
fn strip_nul(r: &mut Record) {
    fn strip(s: &mut String) {
        if s.as_bytes().contains(&0) {
            s.retain(|c| c != '\0');
        }
    }
    strip(&mut r.source);
    strip(&mut r.message_id);
    for (k, v) in &mut r.ids {
        strip(k);
        strip(v);
    }
    for (name, _) in &mut r.traits {
        strip(name);
    }
    if let Some((name, _)) = &mut r.event {
        strip(name);
    }
    if let Some((entity, key, _)) = &mut r.entity {
        strip(entity);
        strip(key);
    }
    for (purpose, _) in &mut r.consent {
        strip(purpose);
    }
}

/// Keeps the items whose flag is set (items past the flags are dropped).
fn retain_flagged<T>(items: &mut Vec<T>, flags: &[bool]) {
    let mut f = flags.iter();
    items.retain(|_| f.next().copied().unwrap_or(false));
}

impl From<Vec<Record>> for Batch {
    fn from(records: Vec<Record>) -> Batch {
        Batch::new(records)
    }
}

/// What a record is stored as: its event properties, entity fields, link
/// metadata, or (an identify call) its traits as one object.
fn payload(r: &Record, trait_texts: &[String]) -> String {
    match (&r.event, &r.entity, &r.meta) {
        (Some((_, props)), _, _) => serde_json::to_string(props).unwrap_or_default(),
        (None, Some((_, _, fields)), _) => serde_json::to_string(fields).unwrap_or_default(),
        (None, None, Some(meta)) => meta.to_string(),
        (None, None, None) => {
            let mut out = String::with_capacity(16 + trait_texts.iter().map(|t| t.len() + 16).sum::<usize>());
            out.push('{');
            for (i, ((name, _), text)) in r.traits.iter().zip(trait_texts).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(name).unwrap_or_default());
                out.push(':');
                out.push_str(text);
            }
            out.push('}');
            out
        }
    }
}

/// A `records` row: what the record was and the identifier it anchors on.
fn record_row(r: &Record, payload: String, anchor: i64, received: i64) -> Vec<P> {
    let (kind, name) = match (&r.event, &r.entity, &r.meta) {
        (Some((n, _)), _, _) => ("event", Some(n.clone())),
        (None, Some((e, _, _)), _) => ("entity", Some(e.clone())),
        (None, None, Some(_)) => ("link", None),
        (None, None, None) => ("identify", None),
    };
    vec![
        P::S(r.source.clone()),
        P::S(r.message_id.clone()),
        P::I(r.at),
        P::I(received),
        P::I(anchor),
        P::S(kind.to_owned()),
        P::OS(name),
        P::S(payload),
    ]
}
const ROW_PARAMS: usize = 9_000;

/// Runs `prefix VALUES (…), (…) suffix` in chunks that stay under parameter limits.
async fn insert_rows(
    store: &Store,
    conn: &mut AnyConnection,
    prefix: &str,
    cols: usize,
    rows: impl ExactSizeIterator<Item = Vec<P>>,
    suffix: &str,
) -> Result<()> {
    insert_chunks(store, conn, prefix, cols, rows, suffix).await.map(drop)
}

/// Inserts rows that cannot exist yet (fresh ids, or keys this transaction
/// just looked up), `INSERT INTO table (columns)` given as `into`.
///
/// On SQLite the statement is `INSERT OR IGNORE`: a multi-row statement that
/// may abort halfway makes SQLite copy every page it changes into a statement
/// journal first, a quarter of an insert's cost in a long transaction; one
/// that ignores conflicts cannot abort. Nothing is ignored silently: a row
/// count short of the rows given fails the batch (and rolls it back).
async fn insert_fresh(
    store: &Store,
    conn: &mut AnyConnection,
    into: &str,
    cols: usize,
    rows: impl ExactSizeIterator<Item = Vec<P>>,
) -> Result<()> {
    insert_fresh_as(store, conn, into, None, cols, rows).await
}

/// [`insert_fresh`], with the rows given as `select … FROM (VALUES …) AS v`
/// when `select` is set: lets a row bind one value for several columns.
async fn insert_fresh_as(
    store: &Store,
    conn: &mut AnyConnection,
    into: &str,
    select: Option<&str>,
    cols: usize,
    rows: impl ExactSizeIterator<Item = Vec<P>>,
) -> Result<()> {
    let expected = rows.len() as u64;
    let prefix = match store.backend() {
        super::Backend::Sqlite => format!("INSERT OR IGNORE {}", into.trim_start_matches("INSERT ")),
        super::Backend::Postgres => into.to_owned(),
    };
    let (prefix, suffix) = match select {
        None => (prefix, ""),
        Some(select) => (format!("{prefix} {select} FROM ("), ") AS v"),
    };
    let written = insert_chunks(store, conn, &prefix, cols, rows, suffix).await?;
    if written != expected {
        return Err(super::StoreError::Invariant(format!(
            "{into}: {written} of {expected} new rows written; another writer changed the store during this batch"
        )));
    }
    Ok(())
}

/// Inserts the `records` rows of `batch` (no two with the same source and
/// message id), skipping pairs already stored, and returns the pairs that
/// were: one pass over the message-id index instead of a probe and then an
/// insert.
///
/// The insert only counts (returning the rows it wrote would send every
/// pair back); when the count falls short, the duplicates are the batch's
/// pairs whose stored row this transaction did not write: on SQLite one
/// stored under a row id from before the batch (the transaction holds the
/// write lock, so no other writer can add rows in between), on PostgreSQL
/// one whose `xmin` is another transaction's.
async fn insert_records(
    store: &Store,
    conn: &mut AnyConnection,
    batch: &[Record],
    rows: impl ExactSizeIterator<Item = Vec<P>>,
) -> Result<FxHashSet<(String, String)>> {
    // `older`: the stored row was written before this transaction.
    let (prefix, suffix, older) = match store.backend() {
        super::Backend::Postgres => (
            RECORDS_INSERT.to_owned(),
            "ON CONFLICT (source, message_id) DO NOTHING",
            "r.xmin::text <> (txid_current() % 4294967296)::text".to_owned(),
        ),
        super::Backend::Sqlite => {
            let before: i64 =
                sqlx::query("SELECT COALESCE(MAX(rowid), 0) FROM records").fetch_one(&mut *conn).await?.try_get(0)?;
            (
                format!("INSERT OR IGNORE {}", RECORDS_INSERT.trim_start_matches("INSERT ")),
                "",
                format!("r.rowid <= {before}"),
            )
        }
    };
    let written = insert_chunks(store, conn, &prefix, 8, rows, suffix).await?;
    let mut stored = FxHashSet::default();
    if written == batch.len() as u64 {
        return Ok(stored);
    }
    for chunk in batch.chunks(IN_CHUNK / 2) {
        let sql = store
            .sql(&format!(
                "SELECT r.source, r.message_id FROM (VALUES {}) AS v \
             JOIN records r ON r.source = v.column1 AND r.message_id = v.column2 WHERE {older}",
                values_clause(chunk.len(), 2)
            ))
            .into_owned();
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q.bind(r.source.as_str()).bind(r.message_id.as_str());
        }
        for row in q.fetch_all(&mut *conn).await? {
            stored.insert((row.try_get(0)?, row.try_get(1)?));
        }
    }
    if stored.len() as u64 + written != batch.len() as u64 {
        return Err(super::StoreError::Invariant(format!(
            "records: {written} written and {} already stored of {} in the batch",
            stored.len(),
            batch.len()
        )));
    }
    Ok(stored)
}

/// Runs the chunks; returns the rows written.
///
/// Binding a chunk's parameters is as much work for this thread as running
/// the chunk is for the database's, so the two overlap: while the database
/// runs one chunk, this task binds the next. On PostgreSQL many rows take
/// the bulk path instead ([`insert_staged`]).
async fn insert_chunks(
    store: &Store,
    conn: &mut AnyConnection,
    prefix: &str,
    cols: usize,
    rows: impl ExactSizeIterator<Item = Vec<P>>,
    suffix: &str,
) -> Result<u64> {
    let per = (ROW_PARAMS / cols).max(1);
    let n = rows.len();
    if n == 0 {
        return Ok(0);
    }
    if let Some(staging) = store.staging()
        && n >= super::stage::STAGE_MIN
        && cols <= super::stage::STAGE_COLUMNS
        && !prefix.contains('?')
        && !suffix.contains('?')
    {
        return insert_staged(store, staging, conn, prefix, cols, rows, suffix).await;
    }
    let sql = ChunkSql::new(n, per, |k| {
        store.sql(&format!("{prefix} VALUES {} {suffix}", values_clause(k, cols))).into_owned()
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<Query<'_>>(1);
    let bind_chunks = async {
        let mut rows = rows;
        while rows.len() > 0 {
            let k = rows.len().min(per);
            let mut q = sqlx::query(sql.of(k));
            for row in rows.by_ref().take(k) {
                for p in row {
                    q = bind(q, p);
                }
            }
            if tx.send(q).await.is_err() {
                return; // a chunk failed; its error is returned below
            }
        }
        drop(tx);
    };
    let run_chunks = async {
        // Owned here: a failed chunk drops the receiver, which stops the binding.
        let mut rx = rx;
        let mut written = 0;
        while let Some(q) = rx.recv().await {
            written += q.execute(&mut *conn).await?.rows_affected();
        }
        Ok(written)
    };
    tokio::join!(bind_chunks, run_chunks).1
}

/// [`insert_chunks`] on PostgreSQL's bulk path (see `stage.rs`): the rows
/// go over COPY and one statement reads them.
async fn insert_staged(
    store: &Store,
    staging: &super::stage::Staging,
    conn: &mut AnyConnection,
    prefix: &str,
    cols: usize,
    rows: impl ExactSizeIterator<Item = Vec<P>>,
    suffix: &str,
) -> Result<u64> {
    let started = std::time::Instant::now();
    let staged = staging.copy(cols, rows).await?;
    let copied = started.elapsed();
    let sql = store.sql(&format!("{prefix} {} {suffix}", staged.select)).into_owned();
    let run = async {
        let written = sqlx::query(&sql).bind(staged.batch).execute(&mut *conn).await?.rows_affected();
        let seen = sqlx::query("DELETE FROM cdp_stage WHERE batch = $1")
            .bind(staged.batch)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        tracing::trace!(
            rows = staged.rows,
            copy_ms = copied.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "staged rows applied"
        );
        if seen != staged.rows {
            return Err(super::StoreError::Invariant(format!(
                "the batch's transaction saw {seen} of {} staged rows (is its isolation level READ COMMITTED?)",
                staged.rows
            )));
        }
        Ok(written)
    };
    let result = run.await;
    if result.is_err() {
        staging.discard(staged.batch).await;
    }
    result
}

/// `UPDATE {set} FROM (VALUES …) AS v WHERE {cond}` over `rows`, in chunks:
/// one statement per chunk instead of one per row or per target value.
/// `set` names the table and its assignments from `v.column1…`; every row's
/// key must be unique, as both backends apply one source row per target.
async fn update_rows(
    store: &Store,
    conn: &mut AnyConnection,
    set: &str,
    cols: usize,
    rows: impl ExactSizeIterator<Item = Vec<P>>,
    cond: &str,
) -> Result<()> {
    insert_rows(store, conn, &format!("UPDATE {set} FROM ("), cols, rows, &format!(") AS v WHERE {cond}")).await
}

/// The probability a match link record carries (`cdp match` writes it).
fn match_probability(r: &Record) -> Option<f64> {
    if r.source != "match" {
        return None;
    }
    r.meta.as_ref()?.get("probability")?.as_f64()
}

/// An identifier of a batch: its id, and what the store holds for it
/// (nothing when this batch creates it).
#[derive(Debug, Clone, Copy)]
struct Known {
    id: i64,
    stored: Option<Stored>,
}

#[derive(Debug, Clone, Copy)]
struct Stored {
    profile: i64,
    component: i64,
    first_at: i64,
}

/// Wall time of each step of applying a batch, for the debug log.
struct Steps {
    last: std::time::Instant,
    done: Vec<(&'static str, std::time::Duration)>,
}

impl Steps {
    fn start() -> Steps {
        Steps { last: std::time::Instant::now(), done: Vec::with_capacity(16) }
    }

    /// Ends the step `name` now.
    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, d)) in self.done.iter().enumerate() {
            write!(f, "{}{name}={:.1}ms", if i > 0 { " " } else { "" }, d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// The id of the identifier a record anchors on (0: none).
fn anchor_id(known: &[Known], anchor: u32) -> i64 {
    known.get(anchor as usize).map_or(0, |k| k.id)
}

/// An identifier a batch creates: (id, key, value, first record carrying it).
type NewNode<'a> = (i64, &'a str, &'a str, &'a Record);

/// The identifiers `batch` creates, in index order.
fn new_identifiers<'a>(batch: &'a Batch, index: &Index, known: &[Known]) -> Vec<NewNode<'a>> {
    known
        .iter()
        .enumerate()
        .filter(|(_, k)| k.stored.is_none())
        .map(|(i, k)| {
            let (ri, pos) = index.idents[i];
            let r = &batch.records[ri as usize];
            let (key, value) = &r.ids[pos as usize];
            (k.id, key.as_str(), value.as_str(), r)
        })
        .collect()
}

/// The links of the batch's records with several identifiers, by the key of
/// their sorted identifier ids (`3,17,42`). Records are in canonical order,
/// so the first record of a set is its earliest and the one kept.
fn batch_links(records: &[Record], index: &Index, known: &[Known]) -> FxHashMap<String, PendingLink> {
    let mut links: FxHashMap<String, PendingLink> = FxHashMap::default();
    for (ri, r) in records.iter().enumerate() {
        let of = index.ids_of(ri);
        if of.len() < 2 {
            continue;
        }
        let mut ids: Vec<i64> = of.iter().map(|i| known[*i as usize].id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() < 2 {
            continue;
        }
        let mut key = String::with_capacity(ids.len() * 18);
        for (n, id) in ids.iter().enumerate() {
            if n > 0 {
                key.push(',');
            }
            let _ = write!(key, "{id}");
        }
        if let std::collections::hash_map::Entry::Vacant(e) = links.entry(key) {
            e.insert(PendingLink {
                at: r.at,
                source: r.source.clone(),
                message_id: r.message_id.clone(),
                ids,
                probability: match_probability(r),
            });
        }
    }
    links
}

/// Entity rows by (entity, key) and consent answers by (identifier,
/// purpose) the records attach to their anchor identifiers; records are in
/// canonical order, so the last row kept for a key is the newest.
#[allow(clippy::type_complexity)]
fn attachments(
    records: &[Record],
    anchor_of: &impl Fn(usize) -> i64,
    profile_of: &FxHashMap<i64, i64>,
) -> (FxHashMap<(String, String), Vec<P>>, FxHashMap<(i64, String), Vec<P>>) {
    let mut entity_rows: FxHashMap<(String, String), Vec<P>> = FxHashMap::default();
    let mut consent_rows: FxHashMap<(i64, String), Vec<P>> = FxHashMap::default();
    for (ri, r) in records.iter().enumerate() {
        if r.entity.is_none() && r.consent.is_empty() {
            continue;
        }
        let anchor = anchor_of(ri);
        let profile = profile_of.get(&anchor).copied().unwrap_or_default();
        if let Some((entity, key, fields)) = &r.entity {
            entity_rows.insert(
                (entity.clone(), key.clone()),
                vec![
                    P::S(entity.clone()),
                    P::S(key.clone()),
                    P::OI(Some(anchor)),
                    P::OI(Some(profile)),
                    P::S(r.source.clone()),
                    P::I(r.at),
                    P::S(Value::Object(fields.clone()).to_string()),
                ],
            );
        }
        for (purpose, granted) in &r.consent {
            consent_rows.insert(
                (anchor, purpose.clone()),
                vec![
                    P::I(anchor),
                    P::S(purpose.clone()),
                    P::I(i64::from(*granted)),
                    P::I(r.at),
                    P::S(r.source.clone()),
                    P::S(r.message_id.clone()),
                ],
            );
        }
    }
    (entity_rows, consent_rows)
}

/// What resolving a batch's links needs from the store, read by
/// [`Store::plan_resolution`]; [`Resolution::resolve`] is pure and runs on
/// any thread.
struct Resolution {
    /// The batch's new or earlier links, by key.
    changing: Vec<(String, PendingLink)>,
    /// The stored links among the batch's, by key: (at, source, message id).
    stored_links: FxHashMap<String, (i64, String, String)>,
    /// The batch's stored identifiers, where they are.
    stored: Vec<(i64, Stored)>,
    /// Every identifier and link of the components `changing` touches.
    stored_nodes: Vec<Node>,
    old_links: Vec<(String, PendingLink)>,
    /// The identifiers the batch creates: (id, key, value), in index order.
    fresh: Vec<(i64, String, String)>,
    /// Ids for new profiles.
    profile_ids: super::Ids,
}

impl Resolution {
    /// The batch's identifiers resolved: stored ones where they are, the
    /// components `changing` links touch regrouped ([`regroup::regroup`]),
    /// and a profile of its own for each new identifier no changing link
    /// joins. `profile_of` and `component_of` of the result cover all of
    /// them. Returns the plan too: what is left of it is written next.
    fn resolve(mut self, cfg: &IdentityConfig) -> Result<(regroup::Regrouping, Resolution)> {
        let mut profile_of: FxHashMap<i64, i64> = self.stored.iter().map(|(id, s)| (*id, s.profile)).collect();
        let mut component_of: FxHashMap<i64, i64> = self.stored.iter().map(|(id, s)| (*id, s.component)).collect();
        let mut graph = regroup::Regrouping::default();
        if !self.changing.is_empty() {
            let fresh: Vec<(i64, &str, &str)> =
                self.fresh.iter().map(|(id, key, value)| (*id, key.as_str(), value.as_str())).collect();
            let ids = &mut self.profile_ids;
            let nodes = std::mem::take(&mut self.stored_nodes);
            graph = regroup::regroup(cfg, nodes, &fresh, &self.old_links, &self.changing, &mut || ids.next())?;
        }
        profile_of.extend(graph.profile_of.drain());
        component_of.extend(graph.component_of.drain());
        // New identifiers outside any link (or in links already resolved) get profiles of their own.
        for (id, _, _) in &self.fresh {
            if let std::collections::hash_map::Entry::Vacant(e) = profile_of.entry(*id) {
                let p = self.profile_ids.next()?;
                graph.new_profiles.push(p);
                e.insert(p);
                component_of.insert(*id, *id);
            }
        }
        graph.profile_of = profile_of;
        graph.component_of = component_of;
        Ok((graph, self))
    }
}

fn unindexed() -> super::StoreError {
    super::StoreError::Invariant("a batch was applied without its identifier index".to_owned())
}

/// Folded trait observations of one (identifier, trait, source): enough to
/// answer every merge policy. Values are JSON text.
#[derive(Debug, Clone)]
pub(crate) struct TraitFold<T = String> {
    pub first: (i64, T),
    pub last: (i64, T),
    pub min: T,
    pub max: T,
    pub sum: Option<f64>,
    pub nmin: Option<f64>,
    pub nmax: Option<f64>,
    pub n: i64,
}

/// Folding in a batch borrows the values' texts from the batch.
impl<T: Ord + Clone> TraitFold<T> {
    fn new(at: i64, text: T, num: Option<f64>) -> Self {
        TraitFold {
            first: (at, text.clone()),
            last: (at, text.clone()),
            min: text.clone(),
            max: text,
            sum: num,
            nmin: num,
            nmax: num,
            n: 1,
        }
    }

    fn map<U>(self, f: impl Fn(T) -> U) -> TraitFold<U> {
        TraitFold {
            first: (self.first.0, f(self.first.1)),
            last: (self.last.0, f(self.last.1)),
            min: f(self.min),
            max: f(self.max),
            sum: self.sum,
            nmin: self.nmin,
            nmax: self.nmax,
            n: self.n,
        }
    }

    fn add(&mut self, at: i64, text: T, num: Option<f64>) {
        if (at, &text) < (self.first.0, &self.first.1) {
            self.first = (at, text.clone());
        }
        if (at, &text) > (self.last.0, &self.last.1) {
            self.last = (at, text.clone());
        }
        if text < self.min {
            self.min = text.clone();
        }
        if text > self.max {
            self.max = text;
        }
        if let Some(x) = num {
            self.sum = Some(self.sum.unwrap_or(0.0) + x);
            self.nmin = Some(self.nmin.map_or(x, |m| m.min(x)));
            self.nmax = Some(self.nmax.map_or(x, |m| m.max(x)));
        }
        self.n += 1;
    }
}

impl Store {
    /// Drops (or strips) what privacy marks refuse from `batch`, inside the
    /// committing transaction, so an erasure or suppression committed
    /// before it is seen.
    async fn drop_marked(&self, conn: &mut AnyConnection, batch: &mut Batch) -> Result<(u64, u64)> {
        if !self.has_marks(conn).await? {
            return Ok((0, 0));
        }
        let pairs: Vec<(String, String)> = {
            let mut seen = FxHashSet::default();
            batch
                .records
                .iter()
                .flat_map(|r| r.ids.iter())
                .filter(|p| seen.insert((p.0.as_str(), p.1.as_str())))
                .cloned()
                .collect()
        };
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let marks = self.marks_of(conn, &refs).await?;
        Ok(batch.drop_marked(&marks))
    }

    /// Applies one batch of records (a `Vec<Record>`, or a [`Batch`] prepared
    /// off this task), and the cursor `(stream, position)` of the input they
    /// came from, in one transaction.
    pub async fn apply_batch(
        &self,
        cfg: &IdentityConfig,
        records: impl Into<Batch>,
        cursor: Option<(&str, &str)>,
    ) -> Result<BatchReport> {
        self.apply_batch_fenced(cfg, records, cursor, None).await
    }

    /// [`Store::apply_batch`] under a lease: inside the committing
    /// transaction the lease's token must still be current and unexpired,
    /// else nothing is committed and the error is
    /// [`StoreError::LeaseLost`](super::StoreError::LeaseLost).
    pub async fn apply_batch_fenced(
        &self,
        cfg: &IdentityConfig,
        records: impl Into<Batch>,
        cursor: Option<(&str, &str)>,
        fence: Option<&super::Lease>,
    ) -> Result<BatchReport> {
        Ok(self.apply_batch_tracked(cfg, records, cursor, fence).await?.0)
    }

    /// [`Store::apply_batch_fenced`], also returning the profiles the batch
    /// changed (those its outbox entry lists, unordered): matching reads
    /// again only what its links changed.
    pub(crate) async fn apply_batch_tracked(
        &self,
        cfg: &IdentityConfig,
        records: impl Into<Batch>,
        cursor: Option<(&str, &str)>,
        fence: Option<&super::Lease>,
    ) -> Result<(BatchReport, Vec<i64>)> {
        let mut batch = records.into();
        let started = std::time::Instant::now();
        let mut attempt = 0u32;
        let (mut tx, applied) = loop {
            let mut tx = self.begin_write().await?;
            if self.backend() == super::Backend::Postgres {
                // Plan each statement of a batch for the tables as they are
                // now. A prepared statement's cached generic plan was chosen
                // when the tables were small (whole-table scans) and kept as
                // they grew: 8,159 records/s against 11,798 planned fresh
                // (`cdp bench ingest --records 100000`, debug build). The
                // planner is otherwise left to plan.
                sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan").execute(&mut *tx).await?;
            }
            let dropped = self.drop_marked(&mut tx, &mut batch).await?;
            match self.apply_in(&mut tx, cfg, &mut batch).await.map(|(mut r, c, p)| {
                (r.suppressed, r.erased) = dropped;
                (r, c, p)
            }) {
                // Only the locking step reports contention, before the batch
                // wrote anything or was changed: start over.
                Err(super::StoreError::Contended(why)) if attempt < 50 => {
                    drop(tx);
                    attempt += 1;
                    tracing::debug!(attempt, %why, "batch contended; retrying");
                    let pause = 5 + u64::from(attempt) * 7 + u64::from(std::process::id() % 11);
                    tokio::time::sleep(std::time::Duration::from_millis(pause.min(250))).await;
                }
                applied => break (tx, applied),
            }
        };
        // Freeing a batch's hundreds of thousands of strings is work the
        // writer need not wait for.
        tokio::task::spawn_blocking(move || drop(batch));
        let (report, changes, changed) = applied?;
        if let Some(lease) = fence {
            self.check_fence(&mut tx, lease).await?;
        }
        if let Some((stream, position)) = cursor {
            sqlx::query(&self.sql(
                "INSERT INTO cursors (stream, position, updated_at) VALUES (?, ?, ?) \
                 ON CONFLICT (stream) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
            ))
            .bind(stream)
            .bind(position)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        // Last: the outbox number is taken under a row lock held to the commit.
        if !changes.is_empty() {
            self.append_outbox(&mut tx, &changes).await?;
        }
        let applied = std::time::Instant::now();
        tx.commit().await?;
        tracing::debug!(
            accepted = report.accepted,
            duplicates = report.duplicates,
            apply_ms = (applied - started).as_secs_f64() * 1e3,
            commit_ms = applied.elapsed().as_secs_f64() * 1e3,
            "batch committed"
        );
        Ok((report, changed))
    }

    /// Applies `batch` on `conn`; returns what it did, the outbox entry of
    /// the profiles it changed (JSON; empty when none) and those profiles.
    /// The steps, each below: look up the batch's identifiers (locking what
    /// it touches), store its new records, resolve the components its links
    /// change, write the graph, then what the records attach (traits, entity
    /// rows, consent) and the ledger.
    async fn apply_in(
        &self,
        conn: &mut AnyConnection,
        cfg: &IdentityConfig,
        batch: &mut Batch,
    ) -> Result<(BatchReport, String, Vec<i64>)> {
        let mut report = BatchReport { duplicates: batch.duplicates, ..BatchReport::default() };
        let received = now_ms();
        if batch.is_empty() {
            return Ok((report, String::new(), Vec::new()));
        }
        // 1. Identifiers: stored ones, and new ones with fresh ids (duplicates
        // within the batch went when it was prepared, and so did the index of
        // its identifiers when a reader thread prepared it).
        let mut steps = Steps::start();
        if !batch.index.as_ref().is_some_and(|i| i.fits(cfg)) {
            batch.index(cfg);
        }
        let mut known = self.lookup_locked(conn, batch).await?;
        steps.mark("lookup");

        // 2. The records, and resolution: the components the batch's links
        // change are read and regrouped. A batch that creates identifiers
        // holds new records, so it is resolved on a thread of its own while
        // this task stores the records (two cores at work instead of one);
        // one that creates none may be input stored before (a re-run), so its
        // records go first and only what is left is resolved. Should records
        // stored before leave a batch resolved early, it is resolved again.
        let early = if known.iter().any(|k| k.stored.is_none()) {
            let plan = self.plan_resolution(conn, batch, &known, &mut steps).await?;
            let cfg = cfg.clone();
            Some(tokio::task::spawn_blocking(move || plan.resolve(&cfg)))
        } else {
            None
        };
        let dropped = self.store_records(conn, cfg, batch, &mut known, received).await?;
        report.duplicates += dropped;
        steps.mark("records");
        let mut early = match early {
            Some(task) => {
                Some(task.await.map_err(|e| super::StoreError::Invariant(format!("resolution failed: {e}")))??)
            }
            None => None,
        };
        if dropped > 0
            && let Some((_, plan)) = early.take()
        {
            self.give_back_ids(plan.profile_ids);
        }
        if batch.is_empty() {
            return Ok((report, String::new(), Vec::new()));
        }
        let (graph, plan) = match early {
            Some(resolved) => resolved,
            None => self.plan_resolution(conn, batch, &known, &mut steps).await?.resolve(cfg)?,
        };
        steps.mark("resolve");
        let batch: &Batch = batch;
        let records = &batch.records;
        let index = batch.index.as_ref().ok_or_else(unindexed)?;
        let anchor_of = |ri: usize| anchor_id(&known, index.anchor[ri]);
        let new_nodes = new_identifiers(batch, index, &known);
        let redated = self.write_first_sightings(conn, records, index, &known).await?;
        steps.mark("first_seen");
        report.splits += graph.report.splits;
        report.merges += graph.report.merges;
        report.conflicts += graph.report.conflicts;
        report.new_profiles = graph.new_profiles.len() as u64;
        let Resolution { changing, stored_links, profile_ids, .. } = plan;

        // 3. Writes: the graph, then what each record attaches.
        let stored = |key: &str| stored_links.contains_key(key);
        self.write_graph(conn, &graph, &new_nodes, &changing, &stored, received, &mut steps).await?;
        report.accepted = records.len() as u64;
        let (entity_rows, consent_rows) = attachments(records, &anchor_of, &graph.profile_of);
        if !index.folds.is_empty() {
            self.write_folds(conn, batch, &known).await?;
        }
        steps.mark("traits");
        self.write_attachments(conn, entity_rows, consent_rows).await?;
        self.write_ledger(conn, &graph.ledger, received).await?;
        let changes = changed_profiles(
            records,
            &anchor_of,
            &graph.profile_of,
            &new_nodes,
            &redated,
            &graph.regrouped,
            &graph.absorbed,
        );
        let (changed, changes) = (changes.profiles(), changes.to_json());
        self.give_back_ids(profile_ids);
        steps.mark("rest");
        tracing::debug!(accepted = report.accepted, %steps, "batch applied");
        Ok((report, changes, changed))
    }

    /// Stores the batch's records and drops from it those already stored
    /// (a re-run over input stored before), re-indexing what is left so that
    /// `known` keeps matching it. Returns how many were dropped.
    ///
    /// The insert itself says which records are new (`ON CONFLICT DO
    /// NOTHING`, on both backends): one pass over the message-id index
    /// instead of a probe and then an insert.
    async fn store_records(
        &self,
        conn: &mut AnyConnection,
        cfg: &IdentityConfig,
        batch: &mut Batch,
        known: &mut Vec<Known>,
        received: i64,
    ) -> Result<u64> {
        let index = batch.index.as_ref().ok_or_else(unindexed)?;
        let payloads = std::mem::take(&mut batch.payloads);
        let rows = batch
            .records
            .iter()
            .zip(payloads)
            .enumerate()
            .map(|(ri, (r, payload))| record_row(r, payload, anchor_id(known, index.anchor[ri]), received));
        let stored = insert_records(self, conn, &batch.records, rows).await?;
        if stored.is_empty() {
            return Ok(0);
        }
        // Index the records left, keeping the ids the records just written anchor on.
        let before = batch.len();
        let ids: FxHashMap<(String, String), Known> = index
            .idents
            .iter()
            .zip(known.iter())
            .map(|(&(ri, pos), k)| (batch.records[ri as usize].ids[pos as usize].clone(), *k))
            .collect();
        batch.retain(|r| !stored.contains(&(r.source.clone(), r.message_id.clone())));
        batch.index(cfg);
        let index = batch.index.as_ref().ok_or_else(unindexed)?;
        *known = index
            .idents
            .iter()
            .map(|&(ri, pos)| ids.get(&batch.records[ri as usize].ids[pos as usize]).copied())
            .collect::<Option<Vec<Known>>>()
            .ok_or_else(unindexed)?;
        Ok((before - batch.len()) as u64)
    }

    /// A record older than an identifier's first sighting becomes its first
    /// sighting: the earliest record of the batch that carries it. Returns
    /// the identifiers re-dated (their profiles' identities now read
    /// differently: first seen, and the order they are listed in).
    async fn write_first_sightings(
        &self,
        conn: &mut AnyConnection,
        records: &[Record],
        index: &Index,
        known: &[Known],
    ) -> Result<Vec<i64>> {
        let mut rows: Vec<(i64, (i64, &str, &str))> = Vec::new();
        for (i, k) in known.iter().enumerate() {
            let r = &records[index.idents[i].0 as usize];
            if let Some(e) = k.stored
                && r.at < e.first_at
            {
                rows.push((k.id, (r.at, &r.source, &r.message_id)));
            }
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        rows.sort_unstable_by_key(|(id, _)| *id);
        let redated = rows.iter().map(|(id, _)| *id).collect();
        update_rows(
            self,
            conn,
            "identities SET first_at = v.column2, source = v.column3, message_id = v.column4",
            4,
            rows.into_iter()
                .map(|(id, (at, src, msg))| vec![P::I(id), P::I(at), P::S(src.to_owned()), P::S(msg.to_owned())]),
            "identities.id = v.column1 AND identities.first_at > v.column2",
        )
        .await?;
        Ok(redated)
    }

    /// Reads what resolving `batch` needs: its links (a link changes the
    /// graph when its identifier set is new, or earlier than the stored
    /// one), and every identifier and link of the components the changing
    /// ones touch; takes the ids its new profiles may need.
    async fn plan_resolution(
        &self,
        conn: &mut AnyConnection,
        batch: &Batch,
        known: &[Known],
        steps: &mut Steps,
    ) -> Result<Resolution> {
        let index = batch.index.as_ref().ok_or_else(unindexed)?;
        let links = batch_links(&batch.records, index, known);
        let stored_links = self.lookup_links(conn, links.keys().cloned().collect()).await?;
        steps.mark("links");
        let changing: Vec<(String, PendingLink)> = links
            .into_iter()
            .filter(|(key, l)| match stored_links.get(key) {
                None => true,
                Some((at, src, msg)) => (l.at, &l.source, &l.message_id) < (*at, src, msg),
            })
            .collect();
        let fresh: Vec<(i64, String, String)> = new_identifiers(batch, index, known)
            .into_iter()
            .map(|(id, key, value, _)| (id, key.to_owned(), value.to_owned()))
            .collect();
        let stored: Vec<(i64, Stored)> = known.iter().filter_map(|k| Some((k.id, k.stored?))).collect();
        let mut profile_ids = self.take_ids(conn, fresh.len()).await?;
        let (mut stored_nodes, mut old_links) = (Vec::new(), Vec::new());
        if !changing.is_empty() {
            let component_of: FxHashMap<i64, i64> = stored.iter().map(|(id, s)| (*id, s.component)).collect();
            let mut touched: Vec<i64> = changing
                .iter()
                .flat_map(|(_, l)| l.ids.iter())
                .filter_map(|id| component_of.get(id).copied())
                .collect();
            touched.sort_unstable();
            touched.dedup();
            (stored_nodes, old_links) = self.load_components(conn, &touched).await?;
            // A profile per cluster at most: one per node.
            profile_ids.extend(self.take_ids(conn, stored_nodes.len() + fresh.len()).await?);
        }
        steps.mark("components");
        Ok(Resolution { changing, stored_links, stored, stored_nodes, old_links, fresh, profile_ids })
    }

    /// Writes what resolution decided: new profiles, merges, new
    /// identifiers, moved identifiers (and their entity rows), joined
    /// components, and the changing links (`stored`: whether a link's key
    /// is stored already, looked up under this batch's locks).
    #[allow(clippy::too_many_arguments)]
    async fn write_graph(
        &self,
        conn: &mut AnyConnection,
        graph: &regroup::Regrouping,
        new_nodes: &[NewNode<'_>],
        changing: &[(String, PendingLink)],
        stored: &impl Fn(&str) -> bool,
        received: i64,
        steps: &mut Steps,
    ) -> Result<()> {
        let (profile_of, component_of) = (&graph.profile_of, &graph.component_of);
        if !graph.new_profiles.is_empty() {
            let rows = graph.new_profiles.iter().map(|p| vec![P::I(*p), P::I(received)]);
            insert_fresh(self, conn, "INSERT INTO profiles (id, created_at)", 2, rows).await?;
        }
        if !graph.absorbed.is_empty() {
            // Set-based, a statement per chunk rather than two per merge
            // (matching a store merges tens of thousands of profiles). Each
            // absorbed profile is absorbed once, into a profile this
            // regrouping keeps, so no target is itself absorbed: profiles
            // merged into an absorbed one earlier point at its target, then
            // it does.
            let mut pairs = graph.absorbed.clone();
            pairs.sort_unstable();
            let rows = || pairs.iter().map(|(p, q)| vec![P::I(*p), P::I(*q)]);
            update_rows(
                self,
                conn,
                "profiles SET merged_into = v.column2",
                2,
                rows(),
                "profiles.merged_into = v.column1",
            )
            .await?;
            update_rows(self, conn, "profiles SET merged_into = v.column2", 2, rows(), "profiles.id = v.column1")
                .await?;
        }
        if !new_nodes.is_empty() {
            let rows = new_nodes.iter().map(|&(id, k, v, r)| {
                vec![
                    P::I(id),
                    P::S(k.to_owned()),
                    P::S(v.to_owned()),
                    P::I(profile_of[&id]),
                    P::I(component_of[&id]),
                    P::I(r.at),
                    P::S(r.source.clone()),
                    P::S(r.message_id.clone()),
                ]
            });
            insert_fresh(
                self,
                conn,
                "INSERT INTO identities (id, key, value, profile_id, component, first_at, source, message_id)",
                8,
                rows,
            )
            .await?;
        }
        steps.mark("identities");
        if !graph.id_updates.is_empty() {
            let mut moved = graph.id_updates.clone();
            moved.sort_unstable();
            update_rows(
                self,
                conn,
                "identities SET profile_id = v.column2, component = v.column3",
                3,
                moved.iter().map(|(id, p, c)| vec![P::I(*id), P::I(*p), P::I(*c)]),
                "identities.id = v.column1",
            )
            .await?;
            update_rows(
                self,
                conn,
                "entities SET profile_id = v.column2",
                2,
                moved.iter().map(|(id, p, _)| vec![P::I(*id), P::I(*p)]),
                "entities.identity_id = v.column1",
            )
            .await?;
        }
        if !graph.component_moves.is_empty() {
            let mut moves: Vec<(i64, i64)> =
                graph.component_moves.iter().flat_map(|(into, from)| from.iter().map(|f| (*f, *into))).collect();
            moves.sort_unstable();
            update_rows(
                self,
                conn,
                "links SET component = v.column2",
                2,
                moves.into_iter().map(|(from, into)| vec![P::I(from), P::I(into)]),
                "links.component = v.column1",
            )
            .await?;
        }
        steps.mark("updates");
        // New keys are plain inserts (no statement journal on SQLite, see
        // `insert_fresh`); a stored key seen earlier now is updated.
        let (again, fresh): (Vec<_>, Vec<_>) = changing.iter().partition(|(key, _)| stored(key));
        let row = |(key, l): &&(String, PendingLink)| {
            vec![
                P::I(component_of[&l.ids[0]]),
                P::I(l.at),
                P::S(l.source.clone()),
                P::S(l.message_id.clone()),
                P::S(key.clone()),
                P::OF(l.probability),
            ]
        };
        const LINKS: &str = "INSERT INTO links (component, at, source, message_id, ids, probability)";
        if !fresh.is_empty() {
            insert_fresh(self, conn, LINKS, 6, fresh.iter().map(row)).await?;
        }
        if !again.is_empty() {
            insert_rows(
                self,
                conn,
                LINKS,
                6,
                again.iter().map(row),
                "ON CONFLICT (ids) DO UPDATE SET component = excluded.component, at = excluded.at, \
                 source = excluded.source, message_id = excluded.message_id, probability = excluded.probability",
            )
            .await?;
        }
        steps.mark("link_writes");
        Ok(())
    }

    /// Writes the newest entity row per (entity, key) and consent answer per
    /// (identifier, purpose) of the batch, each kept only over an older stored one.
    async fn write_attachments(
        &self,
        conn: &mut AnyConnection,
        entity_rows: FxHashMap<(String, String), Vec<P>>,
        consent_rows: FxHashMap<(i64, String), Vec<P>>,
    ) -> Result<()> {
        if !entity_rows.is_empty() {
            insert_rows(
                self,
                conn,
                "INSERT INTO entities (entity, key, identity_id, profile_id, source, at, fields)",
                7,
                sorted_values(entity_rows),
                "ON CONFLICT (entity, key) DO UPDATE SET identity_id = excluded.identity_id, profile_id = excluded.profile_id, \
                 source = excluded.source, at = excluded.at, fields = excluded.fields WHERE excluded.at >= entities.at",
            )
            .await?;
        }
        if !consent_rows.is_empty() {
            insert_rows(
                self,
                conn,
                "INSERT INTO consent (identity_id, purpose, granted, at, source, message_id)",
                6,
                sorted_values(consent_rows),
                "ON CONFLICT (identity_id, purpose) DO UPDATE SET granted = excluded.granted, at = excluded.at, \
                 source = excluded.source, message_id = excluded.message_id WHERE excluded.at >= consent.at",
            )
            .await?;
        }
        Ok(())
    }

    /// Writes the ledger entries (merges, splits, conflicts) resolution decided.
    async fn write_ledger(
        &self,
        conn: &mut AnyConnection,
        ledger: &[regroup::LedgerEntry],
        received: i64,
    ) -> Result<()> {
        if ledger.is_empty() {
            return Ok(());
        }
        let rows = ledger.iter().map(|e| {
            vec![
                P::I(received),
                P::S(e.kind.to_owned()),
                P::I(e.profile),
                P::OI(e.other),
                P::OI(e.identity),
                P::OS(e.source.clone()),
                P::OS(e.message_id.clone()),
                P::S(e.rule.clone()),
                P::OS(None),
            ]
        });
        insert_rows(
            self,
            conn,
            "INSERT INTO ledger (at, kind, profile_id, other_profile_id, identity_id, source, message_id, rule, detail)",
            9,
            rows,
            "",
        )
        .await
    }

    /// Writes folded trait observations. Those of identifiers created by this
    /// batch are plain inserts, and a single observation (most of them) binds
    /// its value once for the first, last, min and max columns; the rest fold
    /// into the stored rows.
    async fn write_folds(&self, conn: &mut AnyConnection, batch: &Batch, known: &[Known]) -> Result<()> {
        const COLUMNS: &str = "INSERT INTO trait_obs (identity_id, name, source, first_value, first_at, last_value, \
                               last_at, min_value, max_value, num_sum, num_min, num_max, n)";
        let index = batch.index.as_ref().ok_or_else(unindexed)?;
        let text = |(ri, ti): At| batch.trait_texts[ri as usize][ti as usize].as_str();
        // (identity, fresh, name, source, fold), in key order.
        let mut folds: Vec<(i64, bool, &str, &str, TraitFold<&str>)> = index
            .folds
            .iter()
            .map(|f| {
                let r = &batch.records[f.at.0 as usize];
                let name = r.traits[f.at.1 as usize].0.as_str();
                let k = known.get(f.anchor as usize);
                let (id, fresh) = k.map_or((0, false), |k| (k.id, k.stored.is_none()));
                (id, fresh, name, r.source.as_str(), f.fold.clone().map(text))
            })
            .collect();
        // The index has them by (anchor, name, source) and one identifier has
        // one id: a stable sort by id puts them in key order.
        folds.sort_by_key(|f| f.0);
        let s = |x: &str| P::S(x.to_owned());
        let (mut single, mut multi, mut stored) = (Vec::new(), Vec::new(), Vec::new());
        for (id, fresh, name, source, f) in folds {
            if fresh && f.n == 1 {
                single.push(vec![P::I(id), s(name), s(source), s(f.first.1), P::I(f.first.0), P::OF(f.sum)]);
                continue;
            }
            let row = vec![
                P::I(id),
                s(name),
                s(source),
                s(f.first.1),
                P::I(f.first.0),
                s(f.last.1),
                P::I(f.last.0),
                s(f.min),
                s(f.max),
                P::OF(f.sum),
                P::OF(f.nmin),
                P::OF(f.nmax),
                P::I(f.n),
            ];
            if fresh { multi.push(row) } else { stored.push(row) }
        }
        if !single.is_empty() {
            insert_fresh_as(
                self,
                conn,
                COLUMNS,
                Some(
                    "SELECT column1, column2, column3, column4, column5, column4, column5, column4, column4, \
                     column6, column6, column6, 1",
                ),
                6,
                single.into_iter(),
            )
            .await?;
        }
        if !multi.is_empty() {
            insert_fresh(self, conn, COLUMNS, 13, multi.into_iter()).await?;
        }
        if !stored.is_empty() {
            insert_rows(
                self,
                conn,
                COLUMNS,
                13,
                stored.into_iter(),
                "ON CONFLICT (identity_id, name, source) DO UPDATE SET \
                 first_value = CASE WHEN excluded.first_at < trait_obs.first_at OR (excluded.first_at = trait_obs.first_at AND excluded.first_value < trait_obs.first_value) THEN excluded.first_value ELSE trait_obs.first_value END, \
                 first_at = CASE WHEN excluded.first_at < trait_obs.first_at THEN excluded.first_at ELSE trait_obs.first_at END, \
                 last_value = CASE WHEN excluded.last_at > trait_obs.last_at OR (excluded.last_at = trait_obs.last_at AND excluded.last_value > trait_obs.last_value) THEN excluded.last_value ELSE trait_obs.last_value END, \
                 last_at = CASE WHEN excluded.last_at > trait_obs.last_at THEN excluded.last_at ELSE trait_obs.last_at END, \
                 min_value = CASE WHEN excluded.min_value < trait_obs.min_value THEN excluded.min_value ELSE trait_obs.min_value END, \
                 max_value = CASE WHEN excluded.max_value > trait_obs.max_value THEN excluded.max_value ELSE trait_obs.max_value END, \
                 num_sum = COALESCE(trait_obs.num_sum, 0) + COALESCE(excluded.num_sum, 0), \
                 num_min = CASE WHEN trait_obs.num_min IS NULL OR excluded.num_min < trait_obs.num_min THEN excluded.num_min ELSE trait_obs.num_min END, \
                 num_max = CASE WHEN trait_obs.num_max IS NULL OR excluded.num_max > trait_obs.num_max THEN excluded.num_max ELSE trait_obs.num_max END, \
                 n = trait_obs.n + excluded.n",
            )
            .await?;
        }
        Ok(())
    }

    /// [`Store::lookup_identities`], on PostgreSQL under the advisory locks
    /// of what it found (see `locking.rs`), looked up again until those
    /// locks protect the result.
    async fn lookup_locked(&self, conn: &mut AnyConnection, batch: &Batch) -> Result<Vec<Known>> {
        if self.backend() != super::Backend::Postgres {
            return self.lookup_identities(conn, batch).await;
        }
        let mut round = self.start_rounds(conn).await?;
        loop {
            let known = self.lookup_identities(conn, batch).await?;
            let keys = lock_keys(batch, &known)?;
            if self.lock_round(conn, &mut round, keys).await? {
                return Ok(known);
            }
        }
    }

    /// What the store holds for each identifier of the batch, by its place
    /// in the batch's index; identifiers it does not hold get fresh ids, in
    /// the order they first appear.
    async fn lookup_identities(&self, conn: &mut AnyConnection, batch: &Batch) -> Result<Vec<Known>> {
        let index = batch.index.as_ref().ok_or_else(unindexed)?;
        let ident = |i: u32| -> &(String, String) {
            let (ri, pos) = index.idents[i as usize];
            &batch.records[ri as usize].ids[pos as usize]
        };
        // By key, then value: neighbouring probes of the (key, value) index.
        let chunks: Vec<(&str, &[u32])> = index
            .by_value
            .chunk_by(|a, b| ident(*a).0 == ident(*b).0)
            .flat_map(|group| group.chunks(IN_CHUNK).map(|chunk| (ident(chunk[0]).0.as_str(), chunk)))
            .collect();
        let mut shapes: FxHashMap<usize, String> = FxHashMap::default();
        for (_, chunk) in &chunks {
            shapes.entry(chunk.len()).or_insert_with(|| {
                self.rows_sql(
                    "v.column2, i.id, i.profile_id, i.component, i.first_at",
                    &format!(
                        "FROM (VALUES {}) AS v JOIN identities i ON i.value = v.column1 AND i.key = ?",
                        values_clause(chunk.len(), 2)
                    ),
                )
            });
        }
        let queries = chunks.iter().map(|(key, chunk)| {
            let mut q = sqlx::query(&shapes[&chunk.len()]);
            for i in *chunk {
                q = q.bind(ident(*i).1.as_str()).bind(i64::from(*i));
            }
            q.bind(*key)
        });
        let mut found: Vec<Option<Known>> = vec![None; index.by_value.len()];
        for row in self.fetch_chunks(conn, queries).await? {
            let slot = usize::try_from(row.int(0)?)
                .ok()
                .and_then(|i| found.get_mut(i))
                .ok_or_else(|| super::StoreError::Invariant("identifier lookup: a row for no value".into()))?;
            let stored = Stored { profile: row.int(2)?, component: row.int(3)?, first_at: row.int(4)? };
            *slot = Some(Known { id: row.int(1)?, stored: Some(stored) });
        }
        let mut fresh = self.take_ids(conn, found.iter().filter(|k| k.is_none()).count()).await?;
        found.into_iter().map(|k| k.map_or_else(|| Ok(Known { id: fresh.next()?, stored: None }), Ok)).collect()
    }

    async fn lookup_links(
        &self,
        conn: &mut AnyConnection,
        keys: Vec<String>,
    ) -> Result<FxHashMap<String, (i64, String, String)>> {
        let sql = ChunkSql::new(keys.len(), IN_CHUNK, |k| {
            self.rows_sql(
                "l.ids, l.at, l.source, l.message_id",
                &format!("FROM ({}) AS v JOIN links l ON l.ids = v.column1", values_list(k)),
            )
        });
        let queries = keys.chunks(IN_CHUNK).map(|chunk| {
            let mut q = sqlx::query(sql.of(chunk.len()));
            for k in chunk {
                q = q.bind(k.as_str());
            }
            q
        });
        let mut out = FxHashMap::default();
        for row in self.fetch_chunks(conn, queries).await? {
            out.insert(row.text(0)?, (row.int(1)?, row.text(2)?, row.text(3)?));
        }
        Ok(out)
    }

    /// Every identifier and link (by its key) of the given components.
    async fn load_components(
        &self,
        conn: &mut AnyConnection,
        components: &[i64],
    ) -> Result<(Vec<Node>, Vec<(String, PendingLink)>)> {
        let mut nodes = Vec::new();
        let mut links = Vec::new();
        let rows = self
            .rows_in(
                conn,
                "id, key, value, profile_id, component, isolated",
                "FROM identities WHERE component IN ({})",
                components,
            )
            .await?;
        for row in rows {
            nodes.push(Node {
                id: row.int(0)?,
                key: row.text(1)?,
                value: row.text(2)?,
                old: Some((row.int(3)?, row.int(4)?)),
                isolated: row.int(5)? != 0,
            });
        }
        let rows = self
            .rows_in(conn, "ids, at, source, message_id, probability", "FROM links WHERE component IN ({})", components)
            .await?;
        for row in rows {
            let key = row.text(0)?;
            let ids = key.split(',').filter_map(|x| x.parse().ok()).collect();
            let l = PendingLink {
                at: row.int(1)?,
                source: row.text(2)?,
                message_id: row.text(3)?,
                ids,
                probability: row.float_opt(4)?,
            };
            links.push((key, l));
        }
        nodes.sort_by_key(|n| n.id);
        Ok((nodes, links))
    }
}

/// Rows by their key, in key order: concurrent batches upserting the same
/// rows take their row locks in the same order and cannot deadlock.
fn sorted_values<K: Ord, V>(rows: FxHashMap<K, V>) -> std::vec::IntoIter<V> {
    let mut rows: Vec<(K, V)> = rows.into_iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows.into_iter().map(|(_, v)| v).collect::<Vec<V>>().into_iter()
}

/// What a batch locks on PostgreSQL: the components of its stored
/// identifiers and its new identifiers (see `locking.rs`).
fn lock_keys(batch: &Batch, known: &[Known]) -> Result<Vec<i64>> {
    let index = batch.index.as_ref().ok_or_else(unindexed)?;
    Ok(known
        .iter()
        .zip(&index.idents)
        .map(|(k, &(ri, pos))| match k.stored {
            Some(s) => s.component,
            None => {
                let (key, value) = &batch.records[ri as usize].ids[pos as usize];
                super::locking::ident_key(key, value)
            }
        })
        .collect())
}

/// The outbox entry of a batch: each record's profile gets the fields it
/// carried (trait names, `events`, `entities`, `consent`); new and moved
/// identifiers mark their profiles' `identities`, and so do identifiers
/// seen earlier than before (`redated`); a profile merged away is `merged`.
fn changed_profiles<'a>(
    records: &'a [Record],
    anchor_of: &impl Fn(usize) -> i64,
    profile_of: &FxHashMap<i64, i64>,
    new_nodes: &[(i64, &str, &str, &Record)],
    redated: &[i64],
    regrouped: &[(i64, i64)],
    absorbed: &[(i64, i64)],
) -> Changes<'a> {
    let mut changes = Changes::default();
    for (ri, r) in records.iter().enumerate() {
        let Some(&profile) = profile_of.get(&anchor_of(ri)) else { continue };
        for (name, _) in &r.traits {
            changes.add(profile, name);
        }
        if r.event.is_some() {
            changes.add(profile, "events");
        }
        if r.entity.is_some() {
            changes.add(profile, "entities");
        }
        if !r.consent.is_empty() {
            changes.add(profile, "consent");
        }
    }
    for id in new_nodes.iter().map(|n| &n.0).chain(redated) {
        if let Some(&p) = profile_of.get(id) {
            changes.add(p, "identities");
        }
    }
    for (old, new) in regrouped {
        changes.add(*old, "identities");
        changes.add(*new, "identities");
    }
    for (p, into) in absorbed {
        changes.add(*p, "merged");
        changes.add(*into, "identities");
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::resolve::KeyRules;
    use serde_json::json;

    fn record(source: &str, id: &str, at: i64, traits: &[(&str, Value)]) -> Record {
        Record {
            source: source.into(),
            message_id: id.into(),
            at,
            ids: vec![("email".into(), format!("{id}@example.com"))],
            traits: traits.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
            event: None,
            entity: None,
            consent: Vec::new(),
            meta: None,
        }
    }

    /// A chunk that fails ends the insert with its error while later chunks
    /// are still being bound (the binding must not wait for a runner that
    /// stopped).
    #[tokio::test]
    async fn a_failing_chunk_ends_a_pipelined_insert() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("s.db").display()), dir.path())
            .await
            .expect("store");
        let mut conn = store.pool().acquire().await.expect("connection");
        sqlx::query("CREATE TABLE t (a BIGINT NOT NULL UNIQUE)").execute(&mut *conn).await.expect("table");
        // Chunks of 9,000 rows; the duplicate is in the first one.
        let rows = (0..40_000u32).map(|i| vec![P::I(if i == 1 { 0 } else { i64::from(i) })]);
        let done = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            insert_rows(&store, &mut conn, "INSERT INTO t (a)", 1, rows, ""),
        )
        .await
        .expect("the insert returns instead of waiting forever");
        assert!(done.is_err(), "the unique violation is reported");
        let rows = (0..20_000u32).map(|i| vec![P::I(100_000 + i64::from(i))]);
        insert_rows(&store, &mut conn, "INSERT INTO t (a)", 1, rows, "").await.expect("a clean insert");
    }

    /// The index a reader thread builds: each identifier once, records
    /// anchored on their strongest key, observations folded per anchor,
    /// trait and source.
    #[test]
    fn a_prepared_batch_indexes_identifiers_and_folds_traits() {
        let cfg = IdentityConfig {
            keys: vec!["crm_id".into(), "email".into()],
            rules: KeyRules { limits: vec![Some(1), None], rank: vec![0, 1], cross: Vec::new() },
        };
        let mut a = record("crm", "a", 1, &[("tier", json!("silver")), ("ltv", json!(10))]);
        a.ids.insert(0, ("crm_id".into(), "c1".into()));
        let mut b = record("crm", "b", 3, &[("tier", json!("gold")), ("ltv", json!(5))]);
        b.ids = a.ids.clone();
        let mut c = record("web", "c", 2, &[("tier", json!("bronze"))]);
        c.ids = vec![a.ids[1].clone()];
        let batch = Batch::prepare(vec![b, c, a], &cfg);
        let index = batch.index.as_ref().expect("indexed");
        assert!(index.fits(&cfg));
        // Canonical order: a (1), c (2), b (3); two identifiers, first seen in a.
        assert_eq!(index.idents, [(0, 0), (0, 1)]);
        assert_eq!((index.ids_of(0), index.ids_of(1), index.ids_of(2)), (&[0, 1][..], &[1][..], &[0, 1][..]));
        // a and b anchor on the CRM id, c (email only) on the email.
        assert_eq!(index.anchor, [0, 1, 0]);
        let text = |at: At| batch.trait_texts[at.0 as usize][at.1 as usize].as_str();
        // (anchor, trait, source, observations, first, last, sum)
        type Row<'a> = (u32, &'a str, &'a str, i64, &'a str, &'a str, Option<f64>);
        let mut folds: Vec<Row<'_>> = index
            .folds
            .iter()
            .map(|f| {
                let r = &batch.records[f.at.0 as usize];
                let name = r.traits[f.at.1 as usize].0.as_str();
                (f.anchor, name, r.source.as_str(), f.fold.n, text(f.fold.first.1), text(f.fold.last.1), f.fold.sum)
            })
            .collect();
        folds.sort_by(|x, y| (x.0, x.1, x.2).cmp(&(y.0, y.1, y.2)));
        assert_eq!(
            folds,
            [
                (0, "ltv", "crm", 2, "10", "5", Some(15.0)),
                (0, "tier", "crm", 2, "\"silver\"", "\"gold\"", None),
                (1, "tier", "web", 1, "\"bronze\"", "\"bronze\"", None),
            ]
        );
        let other = IdentityConfig {
            keys: cfg.keys.clone(),
            rules: KeyRules { limits: vec![None, None], rank: vec![1, 0], cross: Vec::new() },
        };
        assert!(!index.fits(&other), "an index is rebuilt for other priorities");
    }

    #[test]
    fn a_batch_keeps_first_copies_in_canonical_order() {
        let batch = Batch::new(vec![
            record("web", "b", 2, &[("tier", json!("gold"))]),
            record("crm", "a", 2, &[]),
            record("web", "b", 1, &[("tier", json!("silver"))]),
            record("crm", "c", 1, &[]),
        ]);
        let order: Vec<(&str, &str, i64)> =
            batch.records.iter().map(|r| (r.source.as_str(), r.message_id.as_str(), r.at)).collect();
        assert_eq!(order, [("crm", "c", 1), ("crm", "a", 2), ("web", "b", 2)]);
        assert_eq!(batch.duplicates, 1);
        assert_eq!(batch.trait_texts[2], ["\"gold\""]);
    }

    #[test]
    fn identify_payloads_are_the_traits_as_one_object() {
        let traits = [("first \"name\"", json!("Åsa")), ("ltv", json!(12.5)), ("tags", json!(["a", "b"]))];
        let batch = Batch::new(vec![record("crm", "a", 1, &traits)]);
        let expected: serde_json::Map<String, Value> =
            traits.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        assert_eq!(batch.payloads[0], Value::Object(expected).to_string());
        let mut event = record("web", "e", 1, &[]);
        event.event = Some(("order".into(), serde_json::Map::from_iter([("total".to_owned(), json!(3))])));
        assert_eq!(Batch::new(vec![event]).payloads[0], r#"{"total":3}"#);
    }
}
