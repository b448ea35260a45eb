//! `cdp bench identity`: how well cdp's clustering finds the real people in
//! generated data with ground truth (typos, nicknames, swapped names, missing
//! values, moved addresses, shared family emails, recycled phones). Prints
//! pairwise precision, recall and F1 over all records and over the CRM and
//! loyalty records alone (the known customers), after deterministic
//! resolution and again after probabilistic matching, and the time each took.

use super::ingest::{RawRow, insert_raw};
use super::people::{self, MANIFEST};
use crate::ingest::pipeline::{self, Ramp};
use crate::ingest::{Mapper, Record};
use crate::manifest::{self};
use crate::store::Store;
use crate::store::ingest::{Batch, IdentityConfig};
use anyhow::{Context, Result};
use rustc_hash::FxHashMap;
use sqlx::Row;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// Pairwise precision, recall and F1 of a clustering against the truth,
/// computed from the contingency table (no pair enumeration).
pub fn pairwise(pairs: &[(u64, i64)]) -> (f64, f64, f64) {
    let c2 = |n: u64| n * n.saturating_sub(1) / 2;
    let mut by_truth: FxHashMap<u64, u64> = FxHashMap::default();
    let mut by_cluster: FxHashMap<i64, u64> = FxHashMap::default();
    let mut both: FxHashMap<(u64, i64), u64> = FxHashMap::default();
    for (t, c) in pairs {
        *by_truth.entry(*t).or_default() += 1;
        *by_cluster.entry(*c).or_default() += 1;
        *both.entry((*t, *c)).or_default() += 1;
    }
    let tp: u64 = both.values().map(|n| c2(*n)).sum();
    let predicted: u64 = by_cluster.values().map(|n| c2(*n)).sum();
    let actual: u64 = by_truth.values().map(|n| c2(*n)).sum();
    let p = if predicted == 0 { 1.0 } else { tp as f64 / predicted as f64 };
    let r = if actual == 0 { 1.0 } else { tp as f64 / actual as f64 };
    let f = if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) };
    (p, r, f)
}

/// (true person, profile) per record: all records, and the CRM and loyalty records alone.
async fn clusters(store: &Store, truth: &FxHashMap<String, u64>) -> Result<[Vec<(u64, i64)>; 2]> {
    let rows = sqlx::query(
        "SELECT r.source, r.message_id, i.profile_id FROM records r JOIN identities i ON i.id = r.identity_id WHERE r.source <> 'match'",
    )
    .fetch_all(store.pool())
    .await?;
    let mut all = Vec::with_capacity(rows.len());
    let mut known = Vec::new();
    for r in rows {
        let source: String = r.try_get(0)?;
        let key = format!("{source}/{}", r.try_get::<String, _>(1)?);
        if let Some(t) = truth.get(&key) {
            let pair = (*t, r.try_get::<i64, _>(2)?);
            all.push(pair);
            if source == "crm" || source == "loyalty" {
                known.push(pair);
            }
        }
    }
    Ok([all, known])
}

/// The best clustering the records allow: each person's records joined
/// where they share an identifier, and all of a person's records that carry
/// a name joined too (a perfect matcher). What stays apart — a web session
/// under a fresh anonymous id that never signed in — no resolver can place,
/// so recall below 1 here is the data's, not cdp's. Precision is 1.
fn reachable(mapped: &[crate::ingest::Record], truth: &FxHashMap<String, u64>) -> [Vec<(u64, i64)>; 2] {
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let person = |r: &crate::ingest::Record| truth.get(&format!("{}/{}", r.source, r.message_id)).copied();
    let mut parent: Vec<usize> = (0..mapped.len()).collect();
    let mut first_with: FxHashMap<(u64, &str, &str), usize> = FxHashMap::default();
    for (i, r) in mapped.iter().enumerate() {
        let Some(p) = person(r) else { continue };
        let named = r.traits.iter().any(|(k, _)| k == "first_name" || k == "last_name");
        let keys = r.ids.iter().map(|(k, v)| (p, k.as_str(), v.as_str()));
        for key in keys.chain(named.then_some((p, "", ""))) {
            let j = *first_with.entry(key).or_insert(i);
            let (a, b) = (find(&mut parent, i), find(&mut parent, j));
            parent[a] = b;
        }
    }
    let mut out = [Vec::new(), Vec::new()];
    for (i, r) in mapped.iter().enumerate() {
        let Some(p) = person(r) else { continue };
        let pair = (p, find(&mut parent, i) as i64);
        out[0].push(pair);
        if r.source == "crm" || r.source == "loyalty" {
            out[1].push(pair);
        }
    }
    out
}

fn scores_line(out: &mut String, label: &str, [all, known]: &[Vec<(u64, i64)>; 2], tail: &str) {
    let (p, r, f) = pairwise(all);
    let (kp, kr, kf) = pairwise(known);
    let _ = writeln!(
        out,
        "  {label:<28} all records: precision {p:.4} recall {r:.4} F1 {f:.4} | CRM + loyalty: precision {kp:.4} recall {kr:.4} F1 {kf:.4}   {tail}"
    );
}

/// Applies `records` as `cdp ingest` does: batches ramping up to its
/// default size, each prepared on a thread of its own while the one before
/// it is applied.
async fn ingest(store: &Store, cfg: &IdentityConfig, records: Vec<Record>) -> Result<()> {
    let (tx, mut rx) = pipeline::handoff::<Batch>();
    let reader_cfg = cfg.clone();
    let reader = std::thread::spawn(move || {
        let mut records = records.into_iter();
        for size in Ramp::new(pipeline::DEFAULT_BATCH) {
            let batch: Vec<Record> = records.by_ref().take(size).collect();
            if batch.is_empty() || !tx.send(Batch::prepare(batch, &reader_cfg)) {
                return;
            }
        }
    });
    while let Some(batch) = rx.recv().await {
        store.apply_batch(cfg, batch, None).await?;
    }
    reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;
    Ok(())
}

pub async fn run(n_people: usize, dir: &Path) -> Result<String> {
    let m = manifest::load_str(MANIFEST, &manifest::Options::validate(".")).manifest.context("benchmark manifest")?;
    let cfg = IdentityConfig::from_manifest(&m);
    let ppl = people::people(1, n_people);
    let mut recs = people::records(1, &ppl, 10);
    recs.extend(people::traps(1, &ppl));
    let mut truth = FxHashMap::default();
    let mut mapped = Vec::with_capacity(recs.len());
    let mut plain: Vec<RawRow> = Vec::with_capacity(recs.len());
    for src in ["crm", "loyalty", "web", "pos"] {
        let mut mapper = Mapper::new(&m, src).map_err(anyhow::Error::msg)?;
        for l in recs.iter().filter(|l| l.source == src) {
            if let Ok(r) = mapper.map(&l.record, 0) {
                truth.insert(format!("{}/{}", r.source, r.message_id), l.person);
                plain.push((r.source.clone(), r.message_id.clone(), r.at.to_string(), l.record.to_string()));
                mapped.push(r);
            }
        }
    }
    drop(recs);
    let store = Store::connect(&format!("sqlite://{}", dir.join("identity.db").display()), dir).await?;
    let records = mapped.clone();
    let start = Instant::now();
    ingest(&store, &cfg, records).await?;
    let det_secs = start.elapsed().as_secs_f64();
    let deterministic = clusters(&store, &truth).await?;
    let start = Instant::now();
    let mr = store.match_profiles(&m).await?;
    let match_secs = start.elapsed().as_secs_f64();
    let matched = clusters(&store, &truth).await?;
    drop(store);
    // The baseline, in the same run: the same records stored as they came,
    // keyed by message id, in the same transactions, into a fresh database.
    let plain_store = Store::connect(&format!("sqlite://{}", dir.join("plain.db").display()), dir).await?;
    let plain_secs = insert_raw(&plain_store, plain.into_iter(), pipeline::DEFAULT_BATCH).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cdp bench identity: {n_people} people, {} records (seed 1; CRM, loyalty, web, POS, with the traps of `people::traps`)",
        mapped.len()
    );
    scores_line(&mut out, "deterministic only:", &deterministic, &format!("({det_secs:.1}s to ingest)"));
    scores_line(&mut out, "+ probabilistic matching:", &matched, &format!("({match_secs:.2}s)"));
    scores_line(&mut out, "reachable (perfect resolver):", &reachable(&mapped, &truth), "");
    let total = det_secs + match_secs;
    let _ = writeln!(
        out,
        "  end to end: {total:.1}s ({:.0} records/s) | baseline, the same records as rows keyed by message id \
         (raw multi-row INSERT, the same transactions): {plain_secs:.1}s ({:.0} records/s); cdp / plain = {:.0}%",
        mapped.len() as f64 / total,
        mapped.len() as f64 / plain_secs,
        100.0 * plain_secs / total
    );
    let pairs = mr.profiles as f64 * (mr.profiles as f64 - 1.0) / 2.0;
    let _ = writeln!(
        out,
        "  matching: {} profiles compared, {} candidate pairs, λ = {:.3e} (≈{:.0} matching pairs), {} links, {} merges, {} refused by limits",
        mr.profiles,
        mr.candidates,
        mr.lambda,
        mr.lambda * pairs.max(0.0),
        mr.links,
        mr.batch.merges,
        mr.batch.conflicts
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_scores() {
        // Truth {a,a,b}; clusters {1,1,1}: one right pair of three predicted.
        let (p, r, _) = pairwise(&[(1, 1), (1, 1), (2, 1)]);
        assert!((p - 1.0 / 3.0).abs() < 1e-9 && (r - 1.0).abs() < 1e-9);
        let (p, r, f) = pairwise(&[(1, 1), (1, 2), (2, 3)]);
        assert_eq!((p, r, f), (1.0, 0.0, 0.0));
    }
}
