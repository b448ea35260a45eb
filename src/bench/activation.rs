//! `cdp bench activation`: time from the collector's acknowledgement of an
//! event to the webhook delivery it causes, at a steady rate. A real `cdp
//! run` on loopback receives identify events (each a new person entering an
//! audience), evaluates them from the outbox and delivers the entries
//! through the shipped webhook connector to an HTTP server in this process.
//! The same run measures the acknowledgement latency itself, the floor the
//! delivery latency adds to.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WRITE_KEY: &str = "bench-write-key";

fn manifest(wasm: &Path, sha: &str, port: u16) -> String {
    format!(
        r#"version: 1
name: bench-activation
storage: {{ url: "sqlite://activation.db" }}
plugins:
  webhook: {{ path: "{wasm}", sha256: "{sha}" }}
sources:
  web:
    collector: {{ write_keys: ["${{env:CDP_BENCH_WRITE_KEY}}"] }}
    map:
      message_id: messageId
      timestamp: timestamp
      identities: {{ user_id: userId, email: traits.email }}
      traits: {{ plan: traits.plan }}
identity:
  keys:
    user_id: {{ limit: 1 }}
    email: {{ normalize: email }}
model:
  traits:
    plan: {{ type: string }}
consent:
  purposes: [email_marketing]
  default: granted
audiences:
  pro: {{ where: 'plan == "pro"' }}
destinations:
  hook:
    plugin: webhook
    audience: pro
    purpose: email_marketing
    fields: [email, plan]
    config: {{ url: "http://127.0.0.1:{port}/hook", format: json, batch_size: 500 }}
    allow_hosts: ["127.0.0.1:{port}"]
    batch: {{ max_records: 500, max_wait: 1ms }}
"#,
        wasm = wasm.display()
    )
}

/// Arrival time of each delivered entry, by the person's email.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

async fn receive(listener: tokio::net::TcpListener, arrivals: Arrivals) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { return };
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w: &[u8]| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()))
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let now = Instant::now();
                let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
                buf.drain(..head_end + len);
                {
                    let mut a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                    for r in body["records"].as_array().into_iter().flatten() {
                        if r["op"] == "enter"
                            && let Some(e) = r["identities"]["email"][0].as_str()
                        {
                            a.entry(e.to_owned()).or_insert(now);
                        }
                    }
                }
                if sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await.is_err() {
                    return;
                }
            }
        });
    }
}

pub(crate) fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// Runs the benchmark: `rate` events per second for `seconds` seconds.
pub async fn run(rate: usize, seconds: usize, plugin: Option<&Path>, dir: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the cdp binary")?;
    let wasm = std::path::absolute(plugin.unwrap_or(Path::new("plugins/dist/dest_webhook.wasm")))?;
    let bytes = std::fs::read(&wasm)
        .with_context(|| format!("cannot read {} (build the plugins: plugins/build.sh)", wasm.display()))?;
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::new()));
    let server = tokio::spawn(receive(listener, arrivals.clone()));
    std::fs::write(dir.join("activation.yaml"), manifest(&wasm, &sha, port))?;

    let mut child = Command::new(&exe)
        .current_dir(dir)
        .args(["-f", "activation.yaml", "run", "--listen", "127.0.0.1:0"])
        .env("CDP_BENCH_WRITE_KEY", WRITE_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("activation.log"))?)
        .spawn()?;
    let result = async {
        let base = super::collector::listen_address(&exe, dir, "activation.yaml", "activation.log", &child).await?;
        let url = format!("{base}/v1/batch");
        let client = reqwest::Client::builder().build()?;
        let auth = {
            use base64::Engine as _;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:")))
        };
        // Ticks of 10 ms, each one request with its share of the rate.
        let per_tick = (rate / 100).max(1);
        let ticks = seconds * 100;
        let total = per_tick * ticks;
        eprintln!("sending {total} events at {} events/s for {seconds} s…", per_tick * 100);
        let acks: Arc<Mutex<HashMap<String, (Instant, Duration)>>> = Arc::new(Mutex::new(HashMap::new()));
        let mut interval = tokio::time::interval(Duration::from_millis(10));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(ticks);
        for t in 0..ticks {
            interval.tick().await;
            let emails: Vec<String> = (0..per_tick).map(|i| format!("p{}@example.org", t * per_tick + i)).collect();
            let batch: Vec<Value> = emails
                .iter()
                .map(|e| {
                    json!({"type": "identify", "messageId": format!("m-{e}"), "userId": e,
                           "traits": {"email": e, "plan": "pro"}})
                })
                .collect();
            let body = serde_json::to_vec(&json!({"batch": batch}))?;
            let (client, url, auth, acks) = (client.clone(), url.clone(), auth.clone(), acks.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let res = client
                    .post(&url)
                    .header("authorization", auth)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = res.status();
                let _ = res.bytes().await;
                if !status.is_success() {
                    bail!("the collector answered {status}");
                }
                let at = Instant::now();
                let mut a = acks.lock().unwrap_or_else(|e| e.into_inner());
                for e in emails {
                    a.insert(e, (at, at - sent));
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        eprintln!("waiting for deliveries…");
        let waited = Instant::now();
        while arrivals.lock().unwrap_or_else(|e| e.into_inner()).len() < total
            && waited.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let acks = acks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok::<_, anyhow::Error>((total, arrivals, acks))
    }
    .await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    server.abort();
    let (total, arrivals, acks) = result?;

    let mut delivery: Vec<Duration> =
        acks.iter().filter_map(|(e, (at, _))| arrivals.get(e).map(|arr| arr.saturating_duration_since(*at))).collect();
    let mut ack: Vec<Duration> = acks.values().map(|(_, d)| *d).collect();
    delivery.sort();
    ack.sort();
    let mut out = String::new();
    writeln!(
        out,
        "bench activation: {total} identify events at {} events/s for {seconds} s, each a person entering an audience, \
         delivered by the shipped webhook connector to a loopback HTTP server",
        (rate / 100).max(1) * 100
    )?;
    writeln!(
        out,
        "  collector acknowledgement (baseline) p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
        pct(&ack, 0.5),
        pct(&ack, 0.99),
        pct(&ack, 1.0)
    )?;
    writeln!(
        out,
        "  acknowledgement → webhook delivery   p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  ({} of {total} delivered)",
        pct(&delivery, 0.5),
        pct(&delivery, 0.99),
        pct(&delivery, 1.0),
        delivery.len()
    )?;
    writeln!(out, "  target p99 < 250 ms: {}", if pct(&delivery, 0.99) < 250.0 { "met" } else { "NOT met" })?;
    if delivery.len() < total {
        bail!("{out}only {} of {total} entries were delivered within 60 s", delivery.len());
    }
    Ok(out)
}
