//! `cdp audience list|show`, `cdp dlq list|replay` and `cdp sync resume`:
//! what activation has done, read from the store, and the two operator
//! actions it waits for (replaying dead letters, releasing a destination the
//! shrink guard paused). Both actions append an audit row first.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::ReportFormat;
use crate::store::activation::Delivery;

fn time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_owned(), crate::profile::iso)
}

/// `cdp audience list`.
pub async fn list(manifest: &Path, format: ReportFormat) -> Result<ExitCode> {
    let r = super::load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    let store = super::connect(m, base).await?;
    let states = store.audience_states().await?;
    let day_ago = crate::store::now_ms() - 86_400_000;
    let mut rows = Vec::new();
    for (name, a) in &m.audiences {
        let s = states.get(name);
        let (entered, exited) = store.audience_change_counts(name, day_ago).await?;
        rows.push(json!({
            "name": name,
            "mode": if a.refresh.is_some() { "scheduled" } else { "realtime" },
            "members": s.map(|s| s.members),
            "evaluated_at": s.map(|s| s.evaluated_at),
            "entered_24h": entered,
            "exited_24h": exited,
            "destinations": m.destinations.iter().filter(|(_, d)| d.audience.as_deref() == Some(name)).map(|(n, _)| n).collect::<Vec<_>>(),
        }));
    }
    match format {
        ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&json!({"audiences": rows}))?),
        ReportFormat::Human => {
            let mut out = format!(
                "{:<24} {:<10} {:>9} {:>9} {:>9}  {:<22} destinations\n",
                "audience", "mode", "members", "in 24h", "out 24h", "last evaluated"
            );
            for r in &rows {
                let members = r["members"].as_i64().map_or_else(|| "-".to_owned(), |n| n.to_string());
                let _ = writeln!(
                    out,
                    "{:<24} {:<10} {:>9} {:>9} {:>9}  {:<22} {}",
                    r["name"].as_str().unwrap_or(""),
                    r["mode"].as_str().unwrap_or(""),
                    members,
                    r["entered_24h"].to_string(),
                    r["exited_24h"].to_string(),
                    time(r["evaluated_at"].as_i64()),
                    r["destinations"].as_array().map_or(String::new(), |d| d
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")),
                );
            }
            if states.is_empty() {
                out.push_str("\n(not evaluated yet: `cdp run` evaluates audiences)\n");
            }
            out!("{out}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cdp audience show NAME [--members]`.
pub async fn show(manifest: &Path, name: &str, members: bool, limit: u32, format: ReportFormat) -> Result<ExitCode> {
    let r = super::load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    let Some(a) = m.audiences.get(name) else {
        let known: Vec<&str> = m.audiences.keys().map(String::as_str).collect();
        bail!("no audience `{name}` in the manifest{}", did_you_mean(name, known));
    };
    let store = super::connect(m, base).await?;
    if members {
        super::audit::record(&store, "audience.members", name, "ok").await?;
    }
    let state = store.audience_states().await?.remove(name);
    let day_ago = crate::store::now_ms() - 86_400_000;
    let (entered, exited) = store.audience_change_counts(name, day_ago).await?;
    let list = if members { store.audience_members(name, i64::from(limit)).await? } else { Vec::new() };
    let doc = json!({
        "name": name,
        "where": a.rule,
        "refresh": a.refresh,
        "description": a.description,
        "members": state.as_ref().map(|s| s.members),
        "evaluated_at": state.as_ref().map(|s| s.evaluated_at),
        "full_evaluation_at": state.as_ref().map(|s| s.full_at),
        "entered_24h": entered,
        "exited_24h": exited,
        "destinations": m.destinations.iter().filter(|(_, d)| d.audience.as_deref() == Some(name)).map(|(n, _)| n).collect::<Vec<_>>(),
        "member_list": members.then(|| list.iter().map(|(p, since)| json!({"profile_id": p.to_string(), "since": since})).collect::<Vec<_>>()),
    });
    match format {
        ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&doc)?),
        ReportFormat::Human => {
            let mut out = String::new();
            let _ = writeln!(out, "audience      {name}");
            let _ = writeln!(out, "where         {}", a.rule);
            if let Some(r) = &a.refresh {
                let _ = writeln!(out, "refresh       {r}");
            }
            let members_n = doc["members"].as_i64().map_or_else(|| "not evaluated yet".to_owned(), |n| n.to_string());
            let _ = writeln!(out, "members       {members_n}");
            let _ = writeln!(out, "evaluated     {}", time(doc["evaluated_at"].as_i64()));
            let _ = writeln!(out, "last 24 h     {entered} entered, {exited} exited");
            let _ = writeln!(out, "destinations  {}", doc["destinations"]);
            if members {
                let _ = writeln!(out, "\n{:<22} since", "profile");
                for (p, since) in &list {
                    let _ = writeln!(out, "{p:<22} {}", crate::profile::iso(*since));
                }
                if list.len() as u32 == limit {
                    let _ = writeln!(out, "(first {limit}; --limit shows more)");
                }
            }
            out!("{out}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn delivery_json(d: &Delivery) -> Value {
    json!({
        "id": d.id, "destination": d.destination, "profile_id": d.profile.to_string(), "op": d.op,
        "audience": d.audience, "key": d.key, "attempts": d.attempts, "error": d.last_error,
        "queued_at": d.created_at, "failed_at": d.done_at,
    })
}

/// `cdp dlq list [--destination D]`.
pub async fn dlq_list(
    manifest: &Path,
    destination: Option<&str>,
    limit: u32,
    format: ReportFormat,
) -> Result<ExitCode> {
    let r = super::load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    check_destination(m, destination)?;
    let store = super::connect(m, base).await?;
    let rows = store.dead_letters(destination, i64::from(limit)).await?;
    match format {
        ReportFormat::Json => {
            outln!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"dead_letters": rows.iter().map(delivery_json).collect::<Vec<_>>()})
                )?
            )
        }
        ReportFormat::Human => {
            if rows.is_empty() {
                outln!("no dead letters");
                return Ok(ExitCode::SUCCESS);
            }
            let mut out =
                format!("{:<8} {:<20} {:<20} {:<7} {:>8}  error\n", "id", "destination", "profile", "op", "attempts");
            for d in &rows {
                let _ = writeln!(
                    out,
                    "{:<8} {:<20} {:<20} {:<7} {:>8}  {}",
                    d.id,
                    d.destination,
                    d.profile,
                    d.op,
                    d.attempts,
                    d.last_error.as_deref().unwrap_or("")
                );
            }
            out.push_str("\n`cdp dlq replay [--destination D]` sends them again (consent is checked again first)\n");
            out!("{out}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cdp dlq replay [--destination D]`.
pub async fn dlq_replay(manifest: &Path, destination: Option<&str>) -> Result<ExitCode> {
    let r = super::load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    check_destination(m, destination)?;
    let store = super::connect(m, base).await?;
    super::audit::record(&store, "dlq.replay", destination.unwrap_or("*"), "ok").await?;
    let n = store.replay_dead(destination).await?;
    outln!(
        "{n} dead letter(s) queued again{}; a running `cdp run` sends them, checking consent first",
        destination.map(|d| format!(" for `{d}`")).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// `cdp sync resume NAME`: releases a destination the shrink guard paused.
pub async fn resume(manifest: &Path, name: &str) -> Result<ExitCode> {
    let r = super::load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    check_destination(m, Some(name))?;
    let store = super::connect(m, base).await?;
    super::audit::record(&store, "sync.resume", name, "ok").await?;
    if store.resume_destination(name).await? {
        outln!("`{name}` resumed: `cdp run` reconciles it in full now, sending the changes the guard held back");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("`{name}` is not paused");
        Ok(ExitCode::FAILURE)
    }
}

fn check_destination(m: &crate::manifest::Manifest, d: Option<&str>) -> Result<()> {
    if let Some(d) = d
        && !m.destinations.contains_key(d)
    {
        let known: Vec<&str> = m.destinations.keys().map(String::as_str).collect();
        bail!("no destination `{d}` in the manifest{}", did_you_mean(d, known));
    }
    Ok(())
}

/// "; did you mean `x`?" when a known name is close, else "; known: a, b".
fn did_you_mean(word: &str, known: Vec<&str>) -> String {
    match crate::text::suggest(word, known.iter().copied()) {
        Some(s) => format!("; did you mean `{s}`?"),
        None if known.is_empty() => String::new(),
        None => format!("; known: {}", known.join(", ")),
    }
}
