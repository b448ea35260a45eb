//! `cdp bench plugin`: the cost of running a connector in the sandbox.
//!
//! * Throughput of a destination's write path: the shipped `dest-file`
//!   component turns batches of 1,000 records (~10 fields each) into a
//!   customer-list CSV (normalised, SHA-256-hashed email and phone), next to
//!   the same connector code compiled natively into the host, in the same
//!   run.
//! * Load: cold compile of the component vs loading its cached compiled code.
//! * Instantiation: a fresh store and instance per sync, from the
//!   pre-instantiated component.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::plugin::{Grants, Host, Mount};
use crate::rng::Rng;

/// Records per write call.
pub const BATCH: usize = 1_000;
const FIELDS: [&str; 6] = ["first_name", "last_name", "city", "country", "tier", "lifetime_value"];

/// Generated batches: JSON Lines of destination records.
pub fn batches(records: usize, seed: u64) -> Vec<(String, u32)> {
    const FIRST: &[&str] = &["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Frances", "Donald", "Radia", "Linus"];
    const LAST: &[&str] = &["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Allen", "Knuth"];
    const CITY: &[&str] = &["Stockholm", "Göteborg", "Malmö", "Uppsala", "Oslo", "Helsinki", "København"];
    const TIER: &[&str] = &["bronze", "silver", "gold"];
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut i = 0usize;
    while i < records {
        let n = BATCH.min(records - i);
        let mut text = String::with_capacity(n * 400);
        for _ in 0..n {
            let (first, last) = (rng.pick(FIRST), rng.pick(LAST));
            let rec = json!({
                "key": format!("bench-{i}"),
                "op": if rng.chance(0.9) { "enter" } else { "exit" },
                "profile_id": format!("p{:08}", rng.below(1 << 30)),
                "audience": "vip",
                "identities": {
                    "email": [format!(" {first}.{last}{}@Example.com", rng.below(10_000))],
                    "phone": [format!("+46 70 {:03} {:02} {:02}", rng.below(1000), rng.below(100), rng.below(100))],
                },
                "traits": {
                    "first_name": first,
                    "last_name": last,
                    "city": rng.pick(CITY),
                    "country": "SE",
                    "tier": rng.pick(TIER),
                    "lifetime_value": rng.below(100_000) as f64 / 10.0,
                },
                "occurred_at": "2026-11-30T12:00:00Z",
            });
            text.push_str(&rec.to_string());
            text.push('\n');
            i += 1;
        }
        out.push((text, n as u32));
    }
    out
}

fn config(path: &str) -> Value {
    json!({"path": path, "format": "csv", "hash_identifiers": true, "identities": ["email", "phone"], "fields": FIELDS})
}

/// The same transform natively: the shipped `dest-file` connector's own code
/// compiled into the host, driven through the SDK's JSON-level entry points
/// (the decode the component runs on the same JSON Lines) and writing with
/// `std::fs`. Natively the SDK hashes in place, with the CPU's SHA
/// instructions, as the host does for the component.
mod native {
    use cdp_plugin_sdk::{DestinationWriter as _, testing};
    use dest_file::FileDestination;

    use super::*;

    /// Writes every batch to `file`; returns the records written and the
    /// time spent in the final `sync_all`.
    pub fn run(batches: &[(String, u32)], file: &Path) -> Result<(usize, Duration)> {
        let path = file.to_str().context("the native output path is not UTF-8")?;
        let mut writer = testing::open_destination::<FileDestination>(&config(path).to_string())?;
        let mut written = 0;
        for (text, _) in batches {
            written += testing::write(&mut writer, text)?.accepted as usize;
        }
        let started = Instant::now();
        writer.flush()?;
        // The SDK keeps a native build's metric samples per thread.
        testing::take_metrics();
        Ok((written, started.elapsed()))
    }
}

/// Finds the shipped `dest-file` component.
fn find_component(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let candidates = [
        PathBuf::from("plugins/dist/dest_file.wasm"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist/dest_file.wasm"),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .context("plugins/dist/dest_file.wasm not found: build the plugins first (`plugins/build.sh`) or pass --plugin")
}

/// Runs the benchmark over `records` records.
pub async fn run(records: usize, runs: usize, component: Option<&Path>) -> Result<String> {
    let path = find_component(component)?;
    let tmp = tempfile::tempdir()?;
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir)?;
    let mut report = String::new();
    writeln!(report, "plugin benchmark: {} ({} records, batches of {BATCH})", path.display(), records)?;

    // Load: cold compile vs cached compiled code.
    let cold_host = Host::new(None)?;
    let started = Instant::now();
    let compiled = cold_host.load(&path, None)?;
    let cold = started.elapsed();
    let cache = tmp.path().join("cache");
    let host = Host::new(Some(cache))?;
    host.load(&path, None)?; // fills the cache
    let started = Instant::now();
    let plugin = host.load(&path, None)?;
    let cached = started.elapsed();
    if plugin.origin() != crate::plugin::Origin::Cached {
        bail!("the second load did not come from the cache");
    }
    writeln!(report, "\nload")?;
    writeln!(report, "  cold compile         {:>10}", super::ms(cold))?;
    writeln!(report, "  cached code          {:>10}   ({:.0}x faster)", super::ms(cached), ratio(cold, cached))?;
    // Under a profiler the rest runs the code compiled in this process:
    // `perf` names JIT code from the perf map only in anonymous memory, and
    // code loaded from the cache is a file mapping.
    let plugin = if std::env::var_os("CDP_PLUGIN_PROFILER").is_some() { compiled } else { plugin };

    // Instantiation per sync.
    let grants = Grants {
        mounts: vec![Mount { host: out_dir.canonicalize()?, guest: "/out".into(), writable: true }],
        ..Grants::default()
    };
    // Rounds of 200, the median round reported: a slow spell of the machine
    // spoils a round, not the figure.
    let mut rounds = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        for _ in 0..200 {
            let inst = plugin.destination("bench", &grants).await?;
            drop(inst);
        }
        rounds.push(started.elapsed() / 200);
    }
    rounds.sort();
    let per_instance = rounds[rounds.len() / 2];
    let cfg = config("/out/warm.csv");
    let mut inst = plugin.destination("bench", &grants).await?;
    let started = Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < Duration::from_millis(300) {
        inst.check(&cfg).await?;
        calls += 1;
    }
    let per_call = started.elapsed() / calls.max(1);
    drop(inst);
    writeln!(report, "\ninstantiation")?;
    writeln!(
        report,
        "  store + instance     {:>10.1} µs   (target ≤ 50 µs; median of 10 rounds of 200, {:.1}–{:.1} µs)",
        per_instance.as_secs_f64() * 1e6,
        rounds[0].as_secs_f64() * 1e6,
        rounds[rounds.len() - 1].as_secs_f64() * 1e6
    )?;
    writeln!(report, "  warm call (check)    {:>10.1} µs", per_call.as_secs_f64() * 1e6)?;

    // Throughput: write path in the sandbox vs natively.
    let data = batches(records, 7);
    let total: u64 = data.iter().map(|b| u64::from(b.1)).sum();
    let bytes: usize = data.iter().map(|b| b.0.len()).sum();

    // Alternating runs, so a slow spell of the machine hits both paths; the
    // paths swap order every run, so neither always goes first.
    let native_file = tmp.path().join("native.csv");
    let wasm_file = out_dir.join("list.csv");
    let mut native_runs = Vec::new();
    let mut wasm_runs = Vec::new();
    let (mut native_written, mut accepted) = (0, 0u64);
    for run in 0..runs.max(1) {
        for f in [&native_file, &wasm_file] {
            if f.exists() {
                std::fs::remove_file(f)?;
            }
        }
        for native_now in [run % 2 == 0, run % 2 == 1] {
            if native_now {
                let started = Instant::now();
                let (written, sync) = native::run(&data, &native_file)?;
                native_runs.push((started.elapsed(), sync));
                native_written = written;
                continue;
            }
            // The host hands batches over by value; the copies are made
            // before the clock starts, as the native path reads them in place.
            let owned: Vec<(String, u32)> = data.clone();
            let started = Instant::now();
            let mut inst = plugin.destination("bench", &grants).await?;
            inst.open(&config("/out/list.csv")).await?;
            accepted = 0;
            for (text, n) in owned {
                accepted += u64::from(inst.write(text, n).await?.accepted);
            }
            let flush_started = Instant::now();
            inst.flush().await?;
            let sync = flush_started.elapsed();
            inst.close().await?;
            wasm_runs.push((started.elapsed(), sync));
        }
    }
    // Each run's two paths ran back to back: the ratio per run cancels most
    // of a slow spell, and their median is the figure reported.
    let mut ratios: Vec<f64> =
        native_runs.iter().zip(&wasm_runs).map(|(n, w)| n.0.as_secs_f64() / w.0.as_secs_f64().max(1e-9)).collect();
    ratios.sort_by(f64::total_cmp);
    native_runs.sort();
    wasm_runs.sort();
    let (native_time, native_sync) = native_runs[native_runs.len() / 2];
    let (wasm_time, wasm_sync) = wasm_runs[wasm_runs.len() / 2];

    let native_bytes = std::fs::metadata(&native_file)?.len();
    let wasm_bytes = std::fs::metadata(&wasm_file)?.len();
    if accepted != native_written as u64 || native_bytes != wasm_bytes {
        bail!(
            "the two paths disagree: plugin accepted {accepted} records ({wasm_bytes} bytes), native wrote {native_written} ({native_bytes} bytes)"
        );
    }
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    writeln!(
        report,
        "\nwrite path ({total} records, {:.1} MiB of JSON Lines in, {:.1} MiB of CSV out; {runs} runs, each path's median)",
        bytes as f64 / 1048576.0,
        wasm_bytes as f64 / 1048576.0
    )?;
    writeln!(
        report,
        "  native transform     {:>10.0} records/s  {:>10}   (of which fsync {})",
        rate(native_time),
        super::ms(native_time),
        super::ms(native_sync)
    )?;
    writeln!(
        report,
        "  dest-file plugin     {:>10.0} records/s  {:>10}   (of which fsync {})",
        rate(wasm_time),
        super::ms(wasm_time),
        super::ms(wasm_sync)
    )?;
    writeln!(
        report,
        "  plugin / native      {:>10.0} %          (target ≥ 50 %; median of the runs' ratios, {:.0}–{:.0} %)",
        100.0 * ratios[ratios.len() / 2],
        100.0 * ratios[0],
        100.0 * ratios[ratios.len() - 1]
    )?;
    writeln!(
        report,
        "  outputs identical    {:>10}",
        if std::fs::read(&native_file)? == std::fs::read(&wasm_file)? { "yes" } else { "no" }
    )?;
    Ok(report)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_what_they_say() {
        let b = batches(2_500, 1);
        assert_eq!(b.iter().map(|x| x.1).collect::<Vec<_>>(), [1000, 1000, 500]);
        for (text, n) in &b {
            assert_eq!(text.lines().count(), *n as usize);
        }
    }

    #[test]
    fn native_transform_writes_a_row_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.csv");
        let b = batches(10, 3);
        assert_eq!(native::run(&b, &file).unwrap().0, 10);
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 11);
        assert!(text.starts_with("key,op,audience,email,phone,first_name"));
    }
}
