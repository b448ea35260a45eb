//! `cdp bench erase`: erasing people from a populated store — every table,
//! tombstones, receipts bookkeeping, one transaction per person, as `cdp
//! privacy delete` does — next to plain SQL deletes of the same people's
//! records, trait observations, consent, identities and profile rows in a
//! copy of the same store, in the same run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use sqlx::Row;

use crate::store::Store;

/// Runs the benchmark: a SQLite store of `records` generated records, then
/// `people` of its profiles erased.
pub async fn run(records: usize, people: usize, dir: &Path) -> Result<String> {
    let a = dir.join("erase.db");
    let b = dir.join("baseline.db");
    let store = Store::connect(&format!("sqlite://{}", a.display()), dir).await?;
    eprintln!("ingesting {records} records…");
    let (report, secs, _) = super::ingest::run_cdp(&store, records, 10_000).await?;
    eprintln!("  {} accepted in {secs:.1} s", report.accepted);
    sqlx::query(&format!("VACUUM INTO '{}'", b.display())).execute(store.pool()).await?;
    let baseline = Store::connect(&format!("sqlite://{}", b.display()), dir).await?;

    let live = store.live_profiles().await?;
    if live.len() < people {
        bail!("the store has {} profiles; ask for fewer people", live.len());
    }
    let step = live.len() / people;
    let chosen: Vec<i64> = live.iter().step_by(step.max(1)).take(people).copied().collect();
    let count = |s: &Store| {
        let pool = s.pool().clone();
        async move {
            let r = sqlx::query("SELECT COUNT(*) FROM records").fetch_one(&pool).await?;
            Ok::<i64, anyhow::Error>(r.try_get(0)?)
        }
    };
    let before = count(&store).await?;

    eprintln!("erasing {people} people…");
    let start = Instant::now();
    for (i, p) in chosen.iter().enumerate() {
        let id = store.open_request("delete", "bench", "email", "bench", "open").await?;
        store.erase(id, *p, &|_| None).await?;
        if (i + 1) % 1000 == 0 {
            eprintln!("  {}/{people}", i + 1);
        }
    }
    let cdp = start.elapsed();
    let after = count(&store).await?;

    eprintln!("baseline: plain deletes of the same people…");
    let start = Instant::now();
    for p in &chosen {
        let mut tx = baseline.begin_write().await?;
        for t in ["records", "trait_obs", "consent"] {
            sqlx::query(&format!(
                "DELETE FROM {t} WHERE identity_id IN (SELECT id FROM identities WHERE profile_id = ?)"
            ))
            .bind(*p)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM identities WHERE profile_id = ?").bind(*p).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM profiles WHERE id = ?").bind(*p).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    let raw = start.elapsed();
    let base_after = count(&baseline).await?;
    if base_after != after {
        bail!("the two stores disagree after erasure: {after} records against {base_after}");
    }

    let mut out = String::new();
    writeln!(
        out,
        "bench erase: {people} people erased from a SQLite store of {before} records ({} profiles), one transaction per person",
        live.len()
    )?;
    writeln!(
        out,
        "  cdp privacy erasure (every table, tombstones)  {:>7.2} s  {:>7.0} people/s  {} records went",
        cdp.as_secs_f64(),
        people as f64 / cdp.as_secs_f64(),
        before - after
    )?;
    writeln!(
        out,
        "  plain DELETEs of the same rows (baseline)      {:>7.2} s  {:>7.0} people/s",
        raw.as_secs_f64(),
        people as f64 / raw.as_secs_f64()
    )?;
    writeln!(
        out,
        "  cdp / baseline                                 {:.0} %",
        100.0 * raw.as_secs_f64() / cdp.as_secs_f64()
    )?;
    Ok(out)
}
