//! `cdp bench sync`: a CSV file through the runtime's path — the shipped
//! source-csv plugin in the sandbox, mapped and committed by `cdp sync` —
//! next to `cdp ingest --file` of the same file, in the same run. Both run
//! as the real binary (process start, manifest, plugin load and store
//! included), alternating, each into a fresh SQLite store.

use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TIERS: [&str; 3] = ["bronze", "silver", "gold"];

/// Writes `rows` member rows, one person each; every 50th shares the email
/// of the one before (a household), so some records merge.
pub(crate) fn write_members(path: &Path, rows: usize) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "member_no,email,phone,first_name,last_name,tier,email_opt_in,updated_at")?;
    for i in 0..rows {
        writeln!(
            f,
            "L-{:07},m{}@example.org,070-{:03} {:02} {:02},Ann{},Lee{},{},{},2026-11-{:02}T09:00:00Z",
            i,
            if i % 50 == 49 { i - 1 } else { i },
            i % 1000,
            (i / 1000) % 100,
            (i / 100_000) % 100,
            i % 97,
            i % 89,
            TIERS[i % 3],
            i % 2 == 0,
            1 + i % 28
        )?;
    }
    f.flush()?;
    Ok(())
}

fn manifest(store: &str, sha: &str) -> String {
    format!(
        r#"version: 1
name: bench-sync
storage: {{ url: "sqlite://{store}" }}
plugins:
  csv: {{ path: source_csv.wasm, sha256: "{sha}" }}
sources:
  loyalty:
    plugin: csv
    config: {{ file: /input/members.csv }}
    mount: {{ "data": /input }}
    map:
      message_id: member_no
      timestamp: updated_at
      identities: {{ loyalty_id: member_no, email: email, phone: phone }}
      traits: {{ first_name: first_name, last_name: last_name, tier: tier }}
      consent: {{ email_marketing: email_opt_in }}
identity:
  keys:
    loyalty_id: {{ limit: 1 }}
    email: {{ normalize: email, limit: 5 }}
    phone: {{ normalize: e164, default_region: SE, limit: 3 }}
  priority: [loyalty_id, email, phone]
model:
  traits:
    first_name: {{ type: string }}
    last_name: {{ type: string }}
    tier: {{ type: string, enum: [bronze, silver, gold] }}
consent:
  purposes: [email_marketing]
"#
    )
}

/// Runs the benchmark with `rows` rows, `runs` runs of each path.
pub fn run(rows: usize, runs: usize, plugin: Option<&Path>, dir: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the cdp binary")?;
    let plugin: PathBuf = plugin.map_or_else(|| PathBuf::from("plugins/dist/source_csv.wasm"), Path::to_path_buf);
    if !plugin.exists() {
        bail!("{} not found: build the plugins (plugins/build.sh) or pass --plugin", plugin.display());
    }
    std::fs::create_dir_all(dir.join("data"))?;
    std::fs::copy(&plugin, dir.join("source_csv.wasm"))?;
    let sha = crate::plugin::sha256_hex(&std::fs::read(&plugin)?);
    eprintln!("writing {rows} rows…");
    write_members(&dir.join("data/members.csv"), rows)?;
    std::fs::write(dir.join("ingest.yaml"), manifest("ingest.db", &sha))?;
    std::fs::write(dir.join("sync.yaml"), manifest("sync.db", &sha))?;

    let mut ingest = Vec::new();
    let mut sync = Vec::new();
    for i in 0..runs.max(1) {
        // Alternate which path goes first.
        let order: [&str; 2] = if i % 2 == 0 { ["ingest", "sync"] } else { ["sync", "ingest"] };
        for which in order {
            for f in ["ingest.db", "ingest.db-wal", "ingest.db-shm", "sync.db", "sync.db-wal", "sync.db-shm"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
            let args: Vec<&str> = match which {
                "ingest" => vec![
                    "-f",
                    "ingest.yaml",
                    "ingest",
                    "loyalty",
                    "--file",
                    "data/members.csv",
                    "--quiet",
                    "--no-match",
                ],
                _ => vec!["-f", "sync.yaml", "sync", "loyalty"],
            };
            eprintln!("run {}/{}: {which}…", i + 1, runs.max(1));
            let start = Instant::now();
            let out = Command::new(&exe).current_dir(dir).args(&args).output()?;
            let took = start.elapsed();
            if !out.status.success() {
                bail!(
                    "`cdp {}` failed:\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if which == "sync" && !String::from_utf8_lossy(&out.stdout).contains(&format!("accepted {rows},")) {
                bail!("`cdp sync` did not accept every row:\n{}", String::from_utf8_lossy(&out.stdout));
            }
            if which == "ingest" { ingest.push(took) } else { sync.push(took) }
        }
    }
    let (mi, ingest_runs) = super::median_of(&mut ingest);
    let (ms, sync_runs) = super::median_of(&mut sync);
    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    let mut out = String::new();
    writeln!(
        out,
        "bench sync: {rows} CSV rows, each path {} time(s), alternating, fresh SQLite store each run",
        runs.max(1)
    )?;
    writeln!(
        out,
        "  cdp ingest --file (baseline)     median {:>8.2} s  {:>9.0} rows/s  runs: {} s",
        mi.as_secs_f64(),
        rate(mi),
        ingest_runs
    )?;
    writeln!(
        out,
        "  cdp sync (source-csv, sandboxed) median {:>8.2} s  {:>9.0} rows/s  runs: {} s",
        ms.as_secs_f64(),
        rate(ms),
        sync_runs
    )?;
    writeln!(out, "  sync / ingest                    {:.0} %", 100.0 * rate(ms) / rate(mi))?;
    Ok(out)
}
