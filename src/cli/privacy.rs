//! `cdp privacy export|delete|status|suppress|unsuppress`: a person's rights
//! over their data, run by [`crate::privacy::perform`] as the admin API runs
//! them. Each appends an audit row naming the request and the identifier's
//! type, never its value; an export shows nothing unless its row is written.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::ReportFormat;
use crate::privacy::{Kind, Outcome, perform};
use crate::store::privacy::Request;

fn split(kv: &str) -> Result<(&str, &str)> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
        _ => bail!("expected KEY=VALUE, e.g. email=ada@example.org; got `{kv}`"),
    }
}

/// Runs `kind` on the person `kv` names and appends the audit row.
async fn run(manifest: &Path, kind: Kind, kv: &str) -> Result<(Outcome, crate::store::Store)> {
    let (k, v) = split(kv)?;
    let r = super::load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    let store = super::connect(m, base).await?;
    // Which destinations' plugins can delete, from their specs.
    let mut deletes = std::collections::HashMap::new();
    if kind == Kind::Delete {
        let host = crate::plugin::Host::with_default_cache()?;
        for (name, d) in &m.destinations {
            let can = match crate::plugin::entries::load(&host, m, base, &d.plugin) {
                Ok(p) => p.spec(name).await.ok().map(|s| s.capabilities.iter().any(|c| c == "delete")),
                Err(_) => None,
            };
            deletes.insert(name.clone(), can.unwrap_or(false));
        }
    }
    let actor = super::audit::actor();
    let outcome = perform(&store, m, kind, k, v, &actor, &|d| deletes.get(d).copied()).await?;
    let target = format!("request {} ({k})", outcome.request);
    let result = if outcome.not_found { "not_found" } else { "ok" };
    super::audit::record(&store, &format!("privacy.{}", kind.as_str()), &target, result)
        .await
        .context("cannot write the audit log")?;
    if outcome.not_found {
        eprintln!("no profile has {k} `{v}` (request {})", outcome.request);
    }
    Ok((outcome, store))
}

/// `cdp privacy export KEY=VALUE [--out FILE]`.
pub async fn export(manifest: &Path, kv: &str, out: Option<&Path>) -> Result<ExitCode> {
    let (o, _) = run(manifest, Kind::Export, kv).await?;
    let Some(doc) = o.export else { return Ok(ExitCode::FAILURE) };
    let text = serde_json::to_string_pretty(&doc)?;
    match out {
        Some(path) => {
            let tmp = path.with_extension("partial");
            std::fs::write(&tmp, format!("{text}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path)?;
            eprintln!("wrote {} (request {}: {})", path.display(), o.request, o.summary);
        }
        None => outln!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `cdp privacy delete KEY=VALUE`.
pub async fn delete(manifest: &Path, kv: &str) -> Result<ExitCode> {
    let (o, _) = run(manifest, Kind::Delete, kv).await?;
    let Some(er) = o.erasure else { return Ok(ExitCode::FAILURE) };
    outln!("request {}: {}", o.request, o.summary);
    for (table, n) in &er.rows {
        if *n > 0 {
            outln!("  {table:<22} {n}");
        }
    }
    if !er.destinations.is_empty() {
        outln!(
            "destinations: {} (a running `cdp run` sends the deletes; `cdp privacy status {}`)",
            er.destinations.join(", "),
            o.request
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cdp privacy suppress|unsuppress KEY=VALUE`.
pub async fn suppress(manifest: &Path, kv: &str, on: bool) -> Result<ExitCode> {
    let (o, _) = run(manifest, if on { Kind::Suppress } else { Kind::Unsuppress }, kv).await?;
    if o.not_found {
        return Ok(ExitCode::FAILURE);
    }
    outln!("request {}: {}", o.request, o.summary);
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
    let (store, _) = super::connect_file(manifest).await?;
    let rows = store.requests(id, 100).await?;
    if let Some(id) = id
        && rows.is_empty()
    {
        bail!("no privacy request {id}");
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
