//! `cdp profile get|explain|unmerge KEY=VALUE`.

use super::{ReportFormat as Format, connect, load_manifest};
use crate::store::profile::LookupError;
use anyhow::{Result, bail};
use std::path::Path;
use std::process::ExitCode;

fn split(kv: &str) -> Result<(&str, &str)> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
        _ => bail!("expected KEY=VALUE, e.g. email=ada@example.org; got `{kv}`"),
    }
}

async fn find(store: &crate::store::Store, m: &crate::manifest::Manifest, kv: &str) -> Result<Option<i64>> {
    let (k, v) = split(kv)?;
    match store.find_profile(m, k, v).await {
        Ok(p) => Ok(Some(p)),
        Err(LookupError::NotFound(k, v)) => {
            eprintln!("no profile has {k} `{v}`");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn get(manifest: &Path, kv: &str, format: Format, events: usize) -> Result<ExitCode> {
    let (m, base) = load_manifest(manifest)?;
    let store = connect(&m, &base).await?;
    let Some(p) = find(&store, &m, kv).await? else { return Ok(ExitCode::from(1)) };
    let g = store.golden(&m, p, events).await?;
    if format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(&g)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("profile {}", g.profile_id);
    outln!("identities:");
    for i in &g.identities {
        outln!("  {:<14} {:<32} first seen {} in {}/{}", i.key, i.value, i.first_seen, i.source, i.message_id);
    }
    outln!("traits:");
    for (n, t) in &g.traits {
        outln!("  {:<14} {:<24} from {} at {} ({})", n, t.value.to_string(), t.source, t.observed_at, t.policy);
    }
    if !g.computed.is_empty() {
        outln!("computed:");
        for (n, v) in &g.computed {
            outln!("  {n:<14} {v}");
        }
    }
    outln!("consent:");
    for (p, c) in &g.consent {
        let state = if c.granted { "granted" } else { "denied" };
        match (&c.at, &c.source) {
            (Some(at), Some(src)) => outln!("  {p:<16} {state:<8} ({} by {src} at {at})", c.basis),
            _ => outln!("  {p:<16} {state:<8} ({})", c.basis),
        }
    }
    outln!("audiences: {}", if g.audiences.is_empty() { "(none)".to_owned() } else { g.audiences.join(", ") });
    if !g.entities.is_empty() {
        outln!("entities:");
        for e in &g.entities {
            outln!("  {} {} {}", e["entity"].as_str().unwrap_or(""), e["key"].as_str().unwrap_or(""), e["fields"]);
        }
    }
    outln!("recent events:");
    for e in &g.events {
        outln!("  {} {:<18} {} ({}/{})", e.at, e.name, e.properties, e.source, e.message_id);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn explain(manifest: &Path, kv: &str, format: Format) -> Result<ExitCode> {
    let (m, base) = load_manifest(manifest)?;
    let store = connect(&m, &base).await?;
    let Some(p) = find(&store, &m, kv).await? else { return Ok(ExitCode::from(1)) };
    let x = store.explain(p).await?;
    if format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(&x)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("profile {}: {} identifiers", x.profile_id, x.identities.len());
    for i in &x.identities {
        let iso = if i.isolated { " (split off by hand)" } else { "" };
        outln!("  {}={}{iso}", i.key, i.value);
        outln!("    first seen {} in record {}", i.first_seen, i.first_record);
        for l in &i.linked_by {
            let with: Vec<&str> =
                l["with"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
            outln!(
                "    joined by record {} at {} with {}: {}",
                l["record"].as_str().unwrap_or(""),
                l["at"].as_str().unwrap_or(""),
                with.join(", "),
                rule(l)
            );
        }
    }
    if !x.ledger.is_empty() {
        outln!("ledger:");
        for e in &x.ledger {
            outln!(
                "  {} {:<9} {} {}",
                e["at"].as_str().unwrap_or(""),
                e["kind"].as_str().unwrap_or(""),
                rule(e),
                e["record"].as_str().map(|r| format!("(record {r})")).unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A link's rule as shown to people: a probabilistic one with its match
/// probability and each field's weight, as `--format json` has them.
fn rule(link: &serde_json::Value) -> String {
    let rule = link["rule"].as_str().unwrap_or("").to_owned();
    let Some(p) = link["probability"].as_f64() else { return rule };
    let fields: Vec<String> = link["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let (field, level) = (f["field"].as_str().unwrap_or(""), f["level"].as_str().unwrap_or(""));
            format!("{field} {level} {:+.2}", f["weight"].as_f64().unwrap_or(0.0))
        })
        .collect();
    format!("{rule}, probability {p}, weights: {}", fields.join(", "))
}

pub async fn unmerge(manifest: &Path, kv: &str) -> Result<ExitCode> {
    let (m, base) = load_manifest(manifest)?;
    let store = connect(&m, &base).await?;
    let (k, v) = split(kv)?;
    match store.unmerge(&m, k, v).await {
        Ok((from, to)) => {
            outln!("split {k}={v} off profile {from} into profile {to}; records anchored on it moved with it");
            Ok(ExitCode::SUCCESS)
        }
        Err(LookupError::NotFound(k, v)) => {
            eprintln!("no profile has {k} `{v}`");
            Ok(ExitCode::from(1))
        }
        Err(LookupError::AlreadyIsolated(k, v, p)) => {
            outln!("{k}={v} is already split off, alone in profile {p}; nothing changed");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}
