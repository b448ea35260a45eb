//! `cdp privacy export|delete|status|suppress|unsuppress`: a person's rights
//! over their data. Each operation opens a request (`cdp privacy status`
//! lists them) and appends an audit row naming the request and the
//! identifier's type, never its value.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::ReportFormat;
use crate::manifest::Manifest;
use crate::store::Store;
use crate::store::privacy::{Request, mark_hash};
use crate::store::profile::LookupError;

fn split(kv: &str) -> Result<(&str, &str)> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
        _ => bail!("expected KEY=VALUE, e.g. email=ada@example.org; got `{kv}`"),
    }
}

/// The request's subject: the keyed hash of the identifier as normalised.
async fn subject(store: &Store, m: &Manifest, k: &str, v: &str) -> Result<String> {
    let normal = crate::store::profile::lookup_value(m, k, v)?;
    Ok(mark_hash(&store.privacy_secret().await?, k, &normal))
}

/// Opens the request, finds the profile, appends the audit row.
async fn open(store: &Store, m: &Manifest, kind: &str, kv: &str) -> Result<Option<(i64, i64)>> {
    let (k, v) = split(kv)?;
    let subject = subject(store, m, k, v).await?;
    let actor = super::audit::actor();
    let id = store.open_request(kind, &subject, k, &actor, "open").await?;
    let target = format!("request {id} ({k})");
    match store.find_profile(m, k, v).await {
        Ok(p) => {
            super::audit::record(store, &format!("privacy.{kind}"), &target, "ok")
                .await
                .context("cannot write the audit log; nothing was done")?;
            Ok(Some((id, p)))
        }
        Err(LookupError::NotFound(..)) => {
            super::audit::record(store, &format!("privacy.{kind}"), &target, "not_found").await?;
            store.close_request(id, "not_found", &format!("no profile has this {k}")).await?;
            eprintln!("no profile has {k} `{v}` (request {id})");
            Ok(None)
        }
        Err(e) => {
            store.close_request(id, "failed", &e.to_string()).await?;
            Err(e.into())
        }
    }
}

/// `cdp privacy export KEY=VALUE [--out FILE]`.
pub async fn export(manifest: &Path, kv: &str, out: Option<&Path>) -> Result<ExitCode> {
    let (m, base) = super::load_manifest(manifest)?;
    let store = super::connect(&m, &base).await?;
    let Some((id, profile)) = open(&store, &m, "export", kv).await? else { return Ok(ExitCode::FAILURE) };
    let mut doc = store.privacy_export(&m, profile).await?;
    doc["request_id"] = json!(id);
    let text = serde_json::to_string_pretty(&doc)?;
    match out {
        Some(path) => {
            let tmp = path.with_extension("partial");
            std::fs::write(&tmp, format!("{text}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path)?;
            eprintln!("wrote {} (request {id})", path.display());
        }
        None => outln!("{text}"),
    }
    let n = doc["records"].as_array().map_or(0, Vec::len);
    store.close_request(id, "done", &format!("exported {n} records")).await?;
    Ok(ExitCode::SUCCESS)
}

/// `cdp privacy delete KEY=VALUE`.
pub async fn delete(manifest: &Path, kv: &str) -> Result<ExitCode> {
    let (m, base) = super::load_manifest(manifest)?;
    let store = super::connect(&m, &base).await?;
    let Some((id, profile)) = open(&store, &m, "delete", kv).await? else { return Ok(ExitCode::FAILURE) };
    let host = crate::plugin::Host::with_default_cache().ok();
    // Which destinations' plugins can delete, read from their specs.
    let mut deletable = std::collections::HashMap::new();
    for (name, d) in &m.destinations {
        let can = match host.as_ref().map(|h| crate::plugin::entries::load(h, &m, &base, &d.plugin)) {
            Some(Ok(p)) => p.spec(name).await.ok().map(|s| s.capabilities.iter().any(|c| c == "delete")),
            _ => None,
        };
        deletable.insert(name.clone(), can.unwrap_or(false));
    }
    let er = store.erase(id, profile, &|d| deletable.get(d).copied()).await?;
    let pending = !er.destinations.is_empty();
    let summary = format!(
        "erased {} profile id(s), {} identifier(s), {} row(s); {} destination(s) to reach",
        er.profiles,
        er.identifiers,
        er.rows.values().sum::<u64>(),
        er.destinations.len()
    );
    store.close_request(id, if pending { "propagating" } else { "done" }, &summary).await?;
    outln!("request {id}: {summary}");
    for (table, n) in &er.rows {
        if *n > 0 {
            outln!("  {table:<22} {n}");
        }
    }
    if pending {
        outln!(
            "destinations: {} (a running `cdp run` sends the deletes; `cdp privacy status {id}`)",
            er.destinations.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cdp privacy suppress|unsuppress KEY=VALUE`.
pub async fn suppress(manifest: &Path, kv: &str, on: bool) -> Result<ExitCode> {
    let (m, base) = super::load_manifest(manifest)?;
    let store = super::connect(&m, &base).await?;
    let kind = if on { "suppress" } else { "unsuppress" };
    let Some((id, profile)) = open(&store, &m, kind, kv).await? else { return Ok(ExitCode::FAILURE) };
    let n = store.suppress(profile, on, id).await?;
    let summary = if on {
        format!("{n} identifier(s) suppressed: their records are dropped and nothing is delivered")
    } else {
        format!("{n} identifier(s) no longer suppressed")
    };
    store.close_request(id, "done", &summary).await?;
    outln!("request {id}: {summary}");
    Ok(ExitCode::SUCCESS)
}

fn render(r: &Request) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "request {:<6} {:<11} {:<12} by {}  {}",
        r.id,
        r.kind,
        r.state,
        r.actor,
        crate::profile::iso(r.created_at)
    );
    if let Some(s) = &r.summary {
        let _ = writeln!(out, "               {s}");
    }
    for x in &r.receipts {
        let _ = writeln!(
            out,
            "               {:<20} {:<11} attempts {:<3} {}",
            x.destination,
            x.state,
            x.attempts,
            x.receipt.as_deref().or(x.last_error.as_deref()).unwrap_or("")
        );
    }
    out
}

/// `cdp privacy status [ID]`.
pub async fn status(manifest: &Path, id: Option<i64>, format: ReportFormat) -> Result<ExitCode> {
    let (m, base) = super::load_manifest(manifest)?;
    let store = super::connect(&m, &base).await?;
    let rows = store.requests(id, 100).await?;
    if id.is_some() && rows.is_empty() {
        bail!("no privacy request {}", id.unwrap_or_default());
    }
    match format {
        ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&json!({"requests": rows}))?),
        ReportFormat::Human => {
            if rows.is_empty() {
                outln!("no privacy requests");
            }
            for r in &rows {
                out!("{}", render(r));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
