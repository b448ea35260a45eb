//! `cdp run`, `cdp sync NAME` and `cdp status`: argument handling and
//! output over [`crate::runtime`] and the run history in the store.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{ReportFormat, load_manifest, render};
use crate::runtime::sync::{self, Ctx, Trigger};
use crate::runtime::{self, Snapshot};

/// `cdp run`.
pub async fn run(manifest: &Path, drain: Duration, listen: Option<String>) -> Result<ExitCode> {
    let host = std::sync::Arc::new(crate::plugin::Host::with_default_cache()?);
    let Some(snap) = snapshot(manifest, &host).await else {
        bail!("{} cannot run: fix it (see `cdp validate`) and start again", manifest.display());
    };
    runtime::run(runtime::Options { manifest: manifest.to_path_buf(), drain, listen }, host, snap).await?;
    Ok(ExitCode::SUCCESS)
}

/// The manifest as the runtime runs it; when it cannot be, its errors are
/// shown on stderr as `cdp validate` shows them.
async fn snapshot(manifest: &Path, host: &crate::plugin::Host) -> Option<Snapshot> {
    Snapshot::load(manifest, host).await.inspect_err(|e| eprint!("{}", render::load_error(e))).ok()
}

/// `cdp sync NAME [--full]`: one run of a source sync now, through the code
/// `cdp run` uses. Exit 1 when it failed or runs elsewhere.
pub async fn sync(manifest: &Path, name: &str, full: bool) -> Result<ExitCode> {
    let host = crate::plugin::Host::with_default_cache()?;
    let Some(snap) = snapshot(manifest, &host).await else {
        bail!("{} is invalid; fix it (see `cdp validate`) and run again", manifest.display());
    };
    if !snap.syncs.contains_key(name) {
        let known: Vec<&str> = snap.syncs.keys().map(|k| k.as_str()).collect();
        bail!(
            "`{name}` is not a plugin source in the manifest{}",
            if known.is_empty() { String::new() } else { format!("; plugin sources: {}", known.join(", ")) }
        );
    }
    let store = std::sync::Arc::new(runtime::supervisor::connect(&snap).await?);
    let ctx = Ctx { store: store.clone(), holder: runtime::holder() };
    store.record_manifest(&snap.sha256, &snap.text, &ctx.holder).await?;
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop.cancel();
        }
    });
    let started = Instant::now();
    let o = sync::run(&ctx, &snap, name, Trigger::Manual, full, &cancel).await?;
    let c = &o.counts;
    outln!("sync `{name}` (run {}): {} in {:.2}s", o.run_id, o.state, started.elapsed().as_secs_f64());
    outln!("  read {}, accepted {}, rejected {}, duplicates {}", c.read, c.accepted, c.rejected, c.duplicates);
    if let Some(cp) = &o.checkpoint {
        outln!("  checkpoint {cp}");
    }
    if c.rejected > 0 {
        for r in store.rejects(o.run_id, 5).await? {
            outln!("  rejected: {} — {}", r.reason, r.record);
        }
    }
    match o.error {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => {
            eprintln!("error: sync `{name}` failed ({}): {e}", e.class());
            Ok(ExitCode::from(1))
        }
    }
}

/// `cdp status`: every sync with its state, last run, next run and last
/// error; the applied manifest; whether a runtime is alive; the last reload.
pub async fn status(manifest: &Path, format: ReportFormat) -> Result<ExitCode> {
    // The file may be invalid (that is what `status` shows after a failed
    // reload), so only its storage URL is read from it, from the YAML alone.
    let (store, base) = super::connect_file(manifest).await?;
    let applied = store.applied_manifest().await?;
    let running = match applied.as_ref().and_then(|a| crate::resolved::resolve_applied(&a.text, &base)) {
        Some(r) => r,
        None => load_manifest(manifest)?,
    };
    let doc = runtime::status::document(&store, &running, applied.as_ref()).await?;
    match format {
        ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&doc)?),
        ReportFormat::Human => out!("{}", render_status(&doc)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Milliseconds since the epoch as RFC 3339, seconds precision.
fn time(v: &Value) -> String {
    v.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "-".to_owned(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn render_status(doc: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match doc["manifest"].as_object() {
        Some(m) => {
            let sha = m["sha256"].as_str().unwrap_or("");
            let _ = writeln!(
                out,
                "manifest  {} applied {} by {}",
                &sha[..sha.len().min(12)],
                time(&m["applied_at"]),
                m["applied_by"].as_str().unwrap_or("?")
            );
        }
        None => out.push_str("manifest  never applied to this store (`cdp run` or `cdp sync` applies it)\n"),
    }
    match doc["runtime"].as_object() {
        Some(r) if r["alive"] == true => {
            let _ = writeln!(
                out,
                "runtime   running: {} since {}, heartbeat {}",
                r["holder"].as_str().unwrap_or("?"),
                time(&r["started_at"]),
                time(&r["heartbeat_at"])
            );
            if let Some(listen) = r["listen"].as_str() {
                let _ = writeln!(out, "server    {}://{listen}", r["scheme"].as_str().unwrap_or("http"));
            }
        }
        Some(r) => {
            let _ = writeln!(out, "runtime   not running (last heartbeat {})", time(&r["heartbeat_at"]));
        }
        None => out.push_str("runtime   never ran on this store\n"),
    }
    if let Some(r) = doc["reload"].as_object() {
        if r["ok"] == true {
            let changes: Vec<&str> = r["changes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let what = if changes.is_empty() { String::new() } else { format!(": {}", changes.join(" ")) };
            let _ =
                writeln!(out, "reload    ok at {} ({}){what}", time(&r["at"]), r["trigger"].as_str().unwrap_or("?"));
        } else {
            let sha = r["running_sha256"].as_str().unwrap_or("");
            let _ = writeln!(
                out,
                "reload    FAILED at {} ({}); still running manifest {}:",
                time(&r["at"]),
                r["trigger"].as_str().unwrap_or("?"),
                &sha[..sha.len().min(12)]
            );
            for e in r["errors"].as_array().into_iter().flatten() {
                let _ = writeln!(out, "            {}", e.as_str().unwrap_or(""));
            }
        }
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:<12} {:<22} {:<26} next run",
        "sync", "mode", "state", "last run", "read/accepted/rejected"
    );
    for s in doc["syncs"].as_array().into_iter().flatten() {
        let last = &s["last_run"];
        let counts = if last.is_null() {
            "-".to_owned()
        } else {
            format!("{}/{}/{}", last["read"], last["accepted"], last["rejected"])
        };
        let next = match s["mode"].as_str() {
            Some("streaming") => "continuous".to_owned(),
            Some("manual") => "manual (cdp sync)".to_owned(),
            _ => time(&s["next_run"]),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:<12} {:<22} {:<26} {next}",
            s["name"].as_str().unwrap_or(""),
            s["mode"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            time(&last["started_at"]),
            counts
        );
        if let Some(e) = s["last_error"].as_object() {
            let _ = writeln!(
                out,
                "{:<20} last error ({}): {}",
                "",
                e["class"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            );
        }
    }
    let destinations = doc["destinations"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !destinations.is_empty() {
        out.push('\n');
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:>9} {:>8} {:>10} {:>6} {:>10}",
            "destination", "state", "members", "queued", "delivered", "dead", "suppressed"
        );
        for d in destinations {
            let _ = writeln!(
                out,
                "{:<20} {:<8} {:>9} {:>8} {:>10} {:>6} {:>10}",
                d["name"].as_str().unwrap_or(""),
                d["state"].as_str().unwrap_or(""),
                d["members"].to_string(),
                d["queued"].to_string(),
                d["delivered"].to_string(),
                d["dead"].to_string(),
                d["suppressed"].to_string()
            );
            if let Some(r) = d["reason"].as_str() {
                let _ = writeln!(out, "{:<20} PAUSED: {r}", "");
            }
        }
    }
    out
}
