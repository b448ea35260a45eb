//! `cdp profile get|explain|unmerge KEY=VALUE`. Each appends a row to the
//! audit log (actor `os:USER`, via `cli`, action `profile.get|explain|unmerge`,
//! the target as typed, outcome `ok`, `not_found` or `error: …`) before it
//! shows anything; when the row cannot be written the command shows nothing
//! and fails.

use super::{ReportFormat as Format, connect, connect_one_reader, load_manifest};
use crate::store::Store;
use crate::store::profile::LookupError;
use anyhow::{Result, bail};
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

fn split(kv: &str) -> Result<(&str, &str)> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
        _ => bail!("expected KEY=VALUE, e.g. email=ada@example.org; got `{kv}`"),
    }
}

/// What a profile command found: something to show, or why nothing.
enum Lookup<T> {
    Found(T),
    /// No profile has the identifier: the message for standard error.
    NotFound(String),
}

async fn find(store: &Store, m: &crate::manifest::Manifest, kv: &str) -> Result<Lookup<i64>> {
    let (k, v) = split(kv)?;
    match store.find_profile(m, k, v).await {
        Ok(p) => Ok(Lookup::Found(p)),
        Err(e @ LookupError::NotFound(..)) => Ok(Lookup::NotFound(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Whether a command only reads, or changes state (committed before its
/// audit row is written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Reads,
    Changes,
}

/// Runs `work` — `action` on the profile `kv` names — and appends its audit
/// row before handing back what it found: nothing reaches the screen unless
/// the row is written.
async fn audited<T>(
    store: &Store,
    effect: Effect,
    action: &str,
    kv: &str,
    work: impl Future<Output = Result<Lookup<T>>>,
) -> Result<Lookup<T>> {
    let result = work.await;
    let outcome = match &result {
        Ok(Lookup::Found(_)) => "ok".to_owned(),
        Ok(Lookup::NotFound(_)) => "not_found".to_owned(),
        Err(e) => format!("error: {e:#}"),
    };
    if let Err(e) = super::audit::record(store, action, kv, &outcome).await {
        let why = match (&result, effect) {
            (Ok(Lookup::Found(_)), Effect::Changes) => {
                format!("`{action} {kv}` was done, but the audit log cannot be written, so it has no row for it")
            }
            (Err(failed), _) => {
                eprintln!("error: {action} {kv}: {failed:#}");
                "cannot write the audit log".to_owned()
            }
            _ => "cannot write the audit log; nothing is shown without it".to_owned(),
        };
        return Err(anyhow::Error::new(e).context(why));
    }
    result
}

/// Looks up `kv` and reads what `read` makes of the profile, under the audit row of `action`.
async fn read_audited<'a, T, F>(
    store: &'a Store,
    m: &'a crate::manifest::Manifest,
    action: &str,
    kv: &str,
    read: impl FnOnce(i64) -> F,
) -> Result<Lookup<T>>
where
    F: Future<Output = Result<T>> + 'a,
{
    audited(store, Effect::Reads, action, kv, async {
        Ok(match find(store, m, kv).await? {
            Lookup::Found(p) => Lookup::Found(read(p).await?),
            Lookup::NotFound(why) => Lookup::NotFound(why),
        })
    })
    .await
}

pub async fn get(manifest: &Path, kv: &str, format: Format, events: usize) -> Result<ExitCode> {
    let r = load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    let (store, m) = (&connect_one_reader(m, base).await?, &m);
    let model = &r.model;
    let read = |p| async move { Ok(store.golden_with(m, model, p, events).await?) };
    let g = match read_audited(store, m, "profile.get", kv, read).await? {
        Lookup::Found(g) => g,
        Lookup::NotFound(why) => {
            eprintln!("{why}");
            return Ok(ExitCode::from(1));
        }
    };
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
    let r = load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    let store = &connect_one_reader(m, base).await?;
    let read = |p| async move { Ok(store.explain(p).await?) };
    let x = match read_audited(store, m, "profile.explain", kv, read).await? {
        Lookup::Found(x) => x,
        Lookup::NotFound(why) => {
            eprintln!("{why}");
            return Ok(ExitCode::from(1));
        }
    };
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

/// What `unmerge` did.
enum Unmerged {
    /// Split off profile `.0` into the new profile `.1`.
    Split(i64, i64),
    /// The identifier (normalised) is already alone in this profile: nothing changed.
    Already(String, String, i64),
}

pub async fn unmerge(manifest: &Path, kv: &str) -> Result<ExitCode> {
    let r = load_manifest(manifest)?;
    let (m, base) = (&*r.manifest, r.base.as_path());
    let store = connect(m, base).await?;
    // The split is committed before its audit row is written (the row holds
    // its outcome); if the row then fails, the command says so and exits 1.
    let done = audited(&store, Effect::Changes, "profile.unmerge", kv, async {
        let (k, v) = split(kv)?;
        match store.unmerge(m, k, v).await {
            Ok((from, to)) => Ok(Lookup::Found(Unmerged::Split(from, to))),
            Err(e @ LookupError::NotFound(..)) => Ok(Lookup::NotFound(e.to_string())),
            Err(LookupError::AlreadyIsolated(k, v, p)) => Ok(Lookup::Found(Unmerged::Already(k, v, p))),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    match done {
        Lookup::Found(Unmerged::Split(from, to)) => {
            outln!("split {kv} off profile {from} into profile {to}; records anchored on it moved with it");
        }
        Lookup::Found(Unmerged::Already(k, v, p)) => {
            outln!("{k}={v} is already split off, alone in profile {p}; nothing changed");
        }
        Lookup::NotFound(why) => {
            eprintln!("{why}");
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}
