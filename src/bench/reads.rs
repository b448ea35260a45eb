//! `cdp bench reads`: how long `cdp profile get` takes while a large
//! `cdp ingest` writes to the same SQLite store, next to the same reads on
//! the finished store with nothing else running. Both are the real binary,
//! a process per read (start, manifest, store, lookup, audit row, output).
//! Alongside, during the ingest, the store's read path alone (lookup and
//! golden record, no process start) from a thread with a store of its own,
//! and, between the reads, the two floors under a read that a process
//! cannot go below on this machine: starting a process that does nothing
//! (`cdp --version`), and one synced 8 KiB write (`fdatasync` of a block
//! already allocated in a file of its own: less than a read's audit row
//! asks of the disk).

use super::activation::pct;
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MANIFEST: &str = r#"version: 1
name: bench-reads
storage: { url: "sqlite://reads.db" }
sources:
  loyalty:
    collector: {}
    map:
      message_id: member_no
      timestamp: updated_at
      identities: { loyalty_id: member_no, email: email, phone: phone }
      traits: { first_name: first_name, last_name: last_name, tier: tier }
      consent: { email_marketing: email_opt_in }
identity:
  keys:
    loyalty_id: { limit: 1 }
    email: { normalize: email, limit: 5 }
    phone: { normalize: e164, default_region: SE, limit: 3 }
  priority: [loyalty_id, email, phone]
model:
  traits:
    first_name: { type: string }
    last_name: { type: string }
    tier: { type: string, enum: [bronze, silver, gold] }
consent:
  purposes: [email_marketing]
"#;

/// Rows of the first batch `cdp ingest` commits: reads ask for these.
const FIRST_BATCH: usize = 20_000;

/// One `cdp profile get`: its wall time, or why it failed.
fn read_once(exe: &Path, dir: &Path, n: usize) -> Result<Option<Duration>> {
    let start = Instant::now();
    let out = Command::new(exe)
        .current_dir(dir)
        .args(["-f", "cdp.yaml", "profile", "get", &format!("loyalty_id=L-{n:07}"), "--format", "json"])
        .stdin(Stdio::null())
        .output()?;
    let took = start.elapsed();
    match out.status.code() {
        Some(0) => Ok(Some(took)),
        // Not committed yet.
        Some(1) if String::from_utf8_lossy(&out.stderr).contains("no profile") => Ok(None),
        _ => bail!("`cdp profile get` failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// The store's read path alone, without a process start: in a thread of
/// its own with its own store (pools), `find_profile` and `golden` of the
/// same members every `gap` until `stop` is set. Starts once the first
/// batch is readable.
fn read_in_process(
    dir: std::path::PathBuf,
    gap: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Result<Vec<Duration>>> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let loaded = crate::manifest::load_str(MANIFEST, &crate::manifest::Options::validate(&dir));
            let m = loaded.manifest.context("the benchmark manifest is invalid")?;
            let store = crate::store::Store::connect(&m.storage.url, &dir).await?;
            let mut times = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                if let Ok(p) = store.find_profile(&m, "loyalty_id", &format!("L-{:07}", member(i))).await {
                    store.golden(&m, p, 0).await?;
                    times.push(start.elapsed());
                    i += 1;
                }
                tokio::time::sleep(gap).await;
            }
            Ok(times)
        })
    })
}

/// `cdp --version`: a process start and exit, nothing else.
fn start_once(exe: &Path) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new(exe).arg("--version").stdin(Stdio::null()).output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("`cdp --version` failed");
    }
    Ok(took)
}

/// Synced 8 KiB writes into a file of 256 blocks, allocated beforehand.
struct SyncProbe {
    file: std::fs::File,
    next: u64,
}

impl SyncProbe {
    const BLOCK: usize = 8192;
    const BLOCKS: u64 = 256;

    fn new(path: &Path) -> Result<SyncProbe> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        file.write_all(&vec![0x5a; Self::BLOCK * Self::BLOCKS as usize])?;
        file.sync_all()?;
        Ok(SyncProbe { file, next: 0 })
    }

    fn once(&mut self) -> Result<Duration> {
        use std::os::unix::fs::FileExt as _;
        let start = Instant::now();
        let block = [self.next as u8; Self::BLOCK];
        self.file.write_all_at(&block, (self.next % Self::BLOCKS) * Self::BLOCK as u64)?;
        self.file.sync_data()?;
        self.next += 1;
        Ok(start.elapsed())
    }
}

/// A member number of the first batch, spread over it.
fn member(i: usize) -> usize {
    (i * 7_919) % FIRST_BATCH
}

fn line(out: &mut String, label: &str, times: &mut [Duration]) {
    times.sort();
    let _ = writeln!(
        out,
        "  {label:<42} p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  ({} runs)",
        pct(times, 0.5),
        pct(times, 0.99),
        pct(times, 1.0),
        times.len()
    );
}

/// Runs the benchmark: an ingest of `rows` CSV rows, reads every `gap` while it runs.
pub fn run(rows: usize, gap: Duration, dir: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the cdp binary")?;
    if rows < FIRST_BATCH * 2 {
        bail!("--rows must be at least {}", FIRST_BATCH * 2);
    }
    eprintln!("writing {rows} rows…");
    std::fs::create_dir_all(dir.join("data"))?;
    super::sync::write_members(&dir.join("data/members.csv"), rows)?;
    std::fs::write(dir.join("cdp.yaml"), MANIFEST)?;

    eprintln!("ingesting them, reading profiles meanwhile…");
    let started = Instant::now();
    let mut ingest = Command::new(&exe)
        .current_dir(dir)
        .args(["-f", "cdp.yaml", "ingest", "loyalty", "--file", "data/members.csv", "--quiet", "--no-match"])
        .args(["--batch", &FIRST_BATCH.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut during = Vec::new();
    let (mut starts, mut syncs) = (Vec::new(), Vec::new());
    let mut probe = SyncProbe::new(&dir.join("sync-probe"))?;
    let mut i = 0;
    let mut in_process = None;
    let status = loop {
        if let Some(status) = ingest.try_wait()? {
            break status;
        }
        if let Some(took) = read_once(&exe, dir, member(i))? {
            during.push(took);
            i += 1;
            if in_process.is_none() {
                in_process = Some(read_in_process(dir.to_path_buf(), gap, stop.clone()));
            }
        }
        // Halfway to the next read, once the first batch is in: a floor,
        // each every other time.
        std::thread::sleep(gap / 2);
        if i > 0 {
            if i % 2 == 0 {
                starts.push(start_once(&exe)?);
            } else {
                syncs.push(probe.once()?);
            }
        }
        std::thread::sleep(gap / 2);
    };
    drop(probe);
    let _ = std::fs::remove_file(dir.join("sync-probe"));
    let ingest_secs = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut store_reads = match in_process {
        Some(h) => h.join().map_err(|_| anyhow::anyhow!("the in-process reader panicked"))??,
        None => Vec::new(),
    };
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = ingest.stderr.take() {
            use std::io::Read as _;
            let _ = e.read_to_string(&mut err);
        }
        bail!("`cdp ingest` failed: {err}");
    }
    if during.is_empty() {
        bail!("the ingest ended before its first batch could be read; use more --rows");
    }
    eprintln!("the same reads with nothing else running…");
    let mut idle = Vec::with_capacity(during.len());
    for j in 0..during.len() {
        idle.push(read_once(&exe, dir, member(j))?.context("a profile read during the ingest is gone")?);
        std::thread::sleep(gap);
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "cdp bench reads: `cdp profile get` (a process per read, one every {} ms) while `cdp ingest` writes {rows} \
         rows to the same SQLite store ({:.1} s, {:.0} rows/s, {FIRST_BATCH} per transaction)",
        gap.as_millis(),
        ingest_secs,
        rows as f64 / ingest_secs
    );
    line(&mut out, "during the ingest:", &mut during);
    line(&mut out, "the store's read path, in-process:", &mut store_reads);
    line(&mut out, "floor: `cdp --version`, during it:", &mut starts);
    line(&mut out, "floor: a synced 8 KiB write, during it:", &mut syncs);
    line(&mut out, "baseline, nothing else running:", &mut idle);
    let met = |t: &[Duration]| if pct(t, 0.99) < 50.0 { "met" } else { "NOT met" };
    let _ = writeln!(
        out,
        "  target p99 < 50 ms during the ingest: {} for the store's read path, {} for a whole `cdp profile get` process",
        met(&store_reads),
        met(&during)
    );
    Ok(out)
}
