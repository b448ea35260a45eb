//! `cdp bench collector`: events through the HTTP collector of a real
//! `cdp run` on loopback — `/v1/batch` requests of 100 events from many
//! connections, each answered only once its events are committed — next to
//! `cdp ingest --file` of the same events, in the same run, each into a
//! fresh SQLite store. The load generator runs in this process and shares
//! the machine's cores with the server, as a co-located client would.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Events per request, as SDKs batch them.
const PER_REQUEST: usize = 100;
const WRITE_KEY: &str = "bench-write-key";

fn manifest(store: &str) -> String {
    format!(
        r#"version: 1
name: bench-collector
storage: {{ url: "sqlite://{store}" }}
sources:
  web:
    collector: {{ write_keys: ["${{env:CDP_BENCH_WRITE_KEY}}"] }}
    map:
      message_id: messageId
      timestamp: timestamp
      identities: {{ user_id: userId, anonymous_id: anonymousId, email: traits.email }}
      traits: {{ first_name: traits.first_name }}
      event:
        name_field: event
        names: {{ "Order Completed": order_completed }}
identity:
  keys:
    user_id: {{ limit: 1 }}
    email: {{ normalize: email, limit: 5 }}
    anonymous_id: {{ limit: 100 }}
  priority: [user_id, email, anonymous_id]
model:
  traits:
    email: {{ type: string }}
    first_name: {{ type: string }}
  events:
    order_completed: {{ properties: {{ order_id: string, revenue: number }} }}
consent:
  purposes: [analytics]
"#
    )
}

/// Event `i`: every fifth is an identify carrying the person's email, the
/// others are orders; five events per person.
fn event(i: usize) -> Value {
    let person = i / 5;
    let ts = format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + person % 28, i % 24, i % 60);
    if i.is_multiple_of(5) {
        json!({"type": "identify", "messageId": format!("m-{i}"), "userId": format!("u-{person}"),
               "anonymousId": format!("a-{person}"), "timestamp": ts,
               "traits": {"email": format!("p{person}@example.org"), "first_name": format!("Ann{}", person % 97)}})
    } else {
        json!({"type": "track", "messageId": format!("m-{i}"), "userId": format!("u-{person}"),
               "event": "Order Completed", "timestamp": ts,
               "properties": {"order_id": format!("o-{i}"), "revenue": (i % 500) as f64 + 0.5}})
    }
}

/// Runs the benchmark: `events` events, `connections` concurrent
/// connections, `runs` runs of each path.
pub async fn run(events: usize, connections: usize, runs: usize, dir: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the cdp binary")?;
    eprintln!("writing {events} events…");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("events.jsonl"))?);
        for i in 0..events {
            serde_json::to_writer(&mut f, &event(i))?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
    }
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..events)
            .step_by(PER_REQUEST)
            .map(|start| {
                let batch: Vec<Value> = (start..(start + PER_REQUEST).min(events)).map(event).collect();
                serde_json::to_vec(&json!({"batch": batch, "sentAt": "2026-11-30T00:00:00Z"})).unwrap_or_default()
            })
            .collect(),
    );
    std::fs::write(dir.join("ingest.yaml"), manifest("ingest.db"))?;
    std::fs::write(dir.join("collector.yaml"), manifest("collector.db"))?;

    let mut ingest = Vec::new();
    let mut collector = Vec::new();
    let mut latencies = Vec::new();
    for i in 0..runs.max(1) {
        let order: [&str; 2] = if i % 2 == 0 { ["ingest", "collector"] } else { ["collector", "ingest"] };
        for which in order {
            for f in
                ["ingest.db", "ingest.db-wal", "ingest.db-shm", "collector.db", "collector.db-wal", "collector.db-shm"]
            {
                let _ = std::fs::remove_file(dir.join(f));
            }
            eprintln!("run {}/{}: {which}…", i + 1, runs.max(1));
            if which == "ingest" {
                let start = Instant::now();
                let out = Command::new(&exe)
                    .current_dir(dir)
                    .args(["-f", "ingest.yaml", "ingest", "web", "--file", "events.jsonl", "--quiet", "--no-match"])
                    .env("CDP_BENCH_WRITE_KEY", WRITE_KEY)
                    .output()?;
                if !out.status.success() {
                    bail!("`cdp ingest` failed:\n{}", String::from_utf8_lossy(&out.stderr));
                }
                ingest.push(start.elapsed());
            } else {
                let (took, mut lat) = collect(&exe, dir, bodies.clone(), connections).await?;
                collector.push(took);
                latencies.append(&mut lat);
                let stored = count(dir, "collector.db").await?;
                if stored != events as i64 {
                    bail!("the collector acknowledged {events} events but stored {stored}");
                }
            }
        }
    }
    let (mi, ingest_runs) = super::median_of(&mut ingest);
    let (mc, collector_runs) = super::median_of(&mut collector);
    latencies.sort();
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let mut out = String::new();
    writeln!(
        out,
        "bench collector: {events} events, /v1/batch of {PER_REQUEST} from {connections} connections, each path {} time(s), alternating, fresh SQLite store each run",
        runs.max(1)
    )?;
    writeln!(
        out,
        "  cdp ingest --file (baseline)  median {:>7.2} s  {:>8.0} events/s  runs: {} s",
        mi.as_secs_f64(),
        rate(mi),
        ingest_runs
    )?;
    writeln!(
        out,
        "  collector (HTTP, durable 200) median {:>7.2} s  {:>8.0} events/s  runs: {} s",
        mc.as_secs_f64(),
        rate(mc),
        collector_runs
    )?;
    writeln!(
        out,
        "  acknowledgement latency       p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} requests)",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        latencies.len()
    )?;
    writeln!(out, "  collector / ingest            {:.0} %", 100.0 * rate(mc) / rate(mi))?;
    Ok(out)
}

/// Starts `cdp run` on the collector manifest, sends every body, stops it.
/// Returns the time from the first request to the last acknowledgement and
/// each request's latency.
async fn collect(
    exe: &Path,
    dir: &Path,
    bodies: Arc<Vec<Vec<u8>>>,
    connections: usize,
) -> Result<(Duration, Vec<Duration>)> {
    let mut child = Command::new(exe)
        .current_dir(dir)
        .args(["-f", "collector.yaml", "run", "--listen", "127.0.0.1:0"])
        .env("CDP_BENCH_WRITE_KEY", WRITE_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("collector.log"))?)
        .spawn()?;
    let result = async {
        let base = listen_address(exe, dir, "collector.yaml", "collector.log", &child).await?;
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..connections.max(1) {
            let (bodies, next, url) = (bodies.clone(), next.clone(), format!("{base}/v1/batch"));
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let t = Instant::now();
                    let res = client
                        .post(&url)
                        .basic_auth(WRITE_KEY, Some(""))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    let status = res.status();
                    let text = res.text().await?;
                    if status != reqwest::StatusCode::OK || text != r#"{"success":true}"# {
                        bail!("request {i} answered {status}: {text}");
                    }
                    lat.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.append(&mut t.await??);
        }
        Ok::<_, anyhow::Error>((start.elapsed(), lat))
    }
    .await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    result
}

/// Waits for the runtime's heartbeat to show where it listens.
/// The address `cdp run -f manifest` (process `child`, logging to `log`)
/// listens on, once it does.
pub(crate) async fn listen_address(exe: &Path, dir: &Path, manifest: &str, log: &str, child: &Child) -> Result<String> {
    let started = Instant::now();
    loop {
        let out = Command::new(exe).current_dir(dir).args(["-f", manifest, "status", "--format", "json"]).output()?;
        if let Ok(doc) = serde_json::from_slice::<Value>(&out.stdout)
            && doc["runtime"]["pid"] == child.id()
            && let Some(listen) = doc["runtime"]["listen"].as_str()
        {
            return Ok(format!("http://{listen}"));
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "cdp run did not start listening within 60 s; its log:\n{}",
                std::fs::read_to_string(dir.join(log)).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(dir: &Path, db: &str) -> Result<i64> {
    let store = crate::store::Store::connect(&format!("sqlite://{}", dir.join(db).display()), dir).await?;
    Ok(store.records_from("web").await?)
}
