//! `cdp plan`: what applying the manifest file would change, against the
//! manifest last applied to the store — section by section
//! ([`crate::manifest::diff`]) and what it does to the data, computed from
//! the store without changing it. Exit 0 no change, 2 changes, 1 error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::{Value, json};

use super::{ReportFormat, connect, load_manifest};
use crate::manifest::diff::{Change, ChangeKind};
use crate::resolved::{self, Resolved};
use crate::store::Store;

/// Example members shown per audience entry or exit list.
const EXAMPLES: usize = 3;

pub async fn run(manifest: &Path, format: ReportFormat) -> Result<ExitCode> {
    let new = load_manifest(manifest)?;
    let store = connect(&new.manifest, &new.base).await?;
    let applied = store.applied_manifest().await?;
    let old = applied.as_ref().and_then(|a| resolved::resolve_applied(&a.text, &new.base));
    let diff = resolved::diff(old.as_ref(), &new);
    let changes = diff.sections;
    let mut impact = impact(&store, old.as_ref(), &new, &changes).await?;
    // What a running `cdp run` does to its plugin syncs when it reloads this file.
    let plugin_syncs = |r: &resolved::Resolved, names: &[crate::manifest::names::SourceName]| -> Vec<String> {
        names
            .iter()
            .filter(|n| r.sources.get(n.as_str()).is_some_and(|s| s.plugin.is_some()))
            .map(|n| n.to_string())
            .collect()
    };
    let restart = plugin_syncs(&new, &diff.restarted);
    let stop = old.as_ref().map(|o| plugin_syncs(o, &diff.removed)).unwrap_or_default();
    impact["syncs"] = json!({"restart": restart, "stop": stop});
    let doc = json!({
        "applied": applied.as_ref().map(|a| json!({"sha256": a.sha256, "applied_at": a.applied_at, "applied_by": a.applied_by})),
        "changes": changes,
        "impact": impact,
    });
    match format {
        ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&doc)?),
        ReportFormat::Human => out!("{}", render(&doc, &changes)),
    }
    Ok(if changes.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

/// Sections whose change can move anyone in or out of any audience.
fn moves_every_audience(c: &Change) -> bool {
    c.section.starts_with("model.") || c.section.starts_with("identity.") || c.section.starts_with("consent.")
}

/// What the change does to the data.
async fn impact(store: &Store, old: Option<&Resolved>, new: &Resolved, changes: &[Change]) -> Result<Value> {
    let every = changes.iter().any(moves_every_audience);
    let mut audiences: BTreeSet<String> =
        changes.iter().filter(|c| c.section == "audiences").map(|c| c.name.clone()).collect();
    if every {
        audiences.extend(new.manifest.audiences.keys().cloned());
        audiences.extend(old.into_iter().flat_map(|r| r.manifest.audiences.keys().cloned()));
    }
    let destinations: Vec<&Change> =
        changes.iter().filter(|c| c.section == "destinations" && c.kind != ChangeKind::Removed).collect();
    let mut out = serde_json::Map::new();
    if !audiences.is_empty() || !destinations.is_empty() {
        let (moves, sends) = evaluate(store, old, new, &audiences, &destinations).await?;
        out.insert("audiences".into(), moves);
        out.insert("destinations".into(), sends);
    }
    let mut sources = Vec::new();
    for c in changes.iter().filter(|c| c.section == "sources" && c.kind == ChangeKind::Removed) {
        sources.push(json!({"source": c.name, "records_kept": store.records_from(&c.name).await?}));
    }
    if !sources.is_empty() {
        out.insert("removed_sources".into(), Value::Array(sources));
    }
    if changes.iter().any(|c| c.section == "retention") {
        let rules = &new.retention.rules;
        let counts = store.retention(rules, false).await?;
        let doc: Vec<Value> = counts
            .into_iter()
            .zip(rules)
            .map(|((rule, n), r)| json!({"rule": rule, "keep": crate::units::format_duration(r.keep), "would_delete": n}))
            .collect();
        out.insert("retention".into(), Value::Array(doc));
    }
    if changes.iter().any(|c| c.section.starts_with("identity.")) {
        let (idents, links) = store.identity_graph().await?;
        let cfg = &new.identity;
        let i = crate::identity::impact::impact(&idents, &links, &cfg.keys, &cfg.rules, EXAMPLES);
        let mut doc = serde_json::to_value(&i)?;
        let renormalised = changes
            .iter()
            .filter(|c| {
                c.section == "identity.keys"
                    && c.fields.iter().any(|f| f == "normalize" || f == "pattern" || f == "default_region")
            })
            .map(|c| c.name.clone())
            .collect::<Vec<_>>();
        if !renormalised.is_empty() {
            doc["note"] = json!(format!(
                "stored values of {} are not normalised again: the new rule applies to records ingested from now on",
                renormalised.join(", ")
            ));
        }
        out.insert("identity".into(), doc);
    }
    Ok(Value::Object(out))
}

/// Evaluates every live profile under both manifests: who enters and exits
/// each audience in `audiences`, and how many profiles each destination in
/// `destinations` would send on its first sync (members of its audience, or
/// everyone, who granted its purpose).
async fn evaluate(
    store: &Store,
    old: Option<&Resolved>,
    new: &Resolved,
    audiences: &BTreeSet<String>,
    destinations: &[&Change],
) -> Result<(Value, Value)> {
    #[derive(Default)]
    struct Moves {
        enter: u64,
        exit: u64,
        stay: u64,
        enter_examples: Vec<String>,
        exit_examples: Vec<String>,
    }
    let profiles = store.live_profiles().await?;
    let bar = indicatif::ProgressBar::new(profiles.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("evaluating profiles {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut moves: BTreeMap<String, Moves> = audiences.iter().map(|a| (a.clone(), Moves::default())).collect();
    let mut sends: BTreeMap<String, u64> = destinations.iter().map(|c| (c.name.clone(), 0)).collect();
    let at = crate::store::now_ms();
    // Pages of profiles read in bulk, each evaluated under both manifests.
    for page in profiles.chunks(500) {
        for rows in store.profile_rows_many(page).await? {
            let id = rows.profile;
            let before: BTreeSet<String> = match old {
                Some(o) => crate::profile::audiences_of(&o.manifest, &o.model, &rows, at).into_iter().collect(),
                None => BTreeSet::new(),
            };
            let after = crate::profile::golden_record(&new.manifest, &new.model, rows, 0, at);
            let now: BTreeSet<&str> = after.audiences.iter().map(String::as_str).collect();
            let example = || {
                after.identities.first().map_or_else(|| format!("profile {id}"), |i| format!("{}={}", i.key, i.value))
            };
            for (name, mv) in &mut moves {
                match (before.contains(name), now.contains(name.as_str())) {
                    (false, true) => {
                        mv.enter += 1;
                        if mv.enter_examples.len() < EXAMPLES {
                            mv.enter_examples.push(example());
                        }
                    }
                    (true, false) => {
                        mv.exit += 1;
                        if mv.exit_examples.len() < EXAMPLES {
                            mv.exit_examples.push(example());
                        }
                    }
                    (true, true) => mv.stay += 1,
                    (false, false) => {}
                }
            }
            for (name, n) in &mut sends {
                let Some(d) = new.manifest.destinations.get(name) else { continue };
                let member = d.audience.as_ref().is_none_or(|a| now.contains(a.as_str()));
                let consented = after.consent.get(&d.purpose).is_some_and(|c| c.granted);
                if member && consented {
                    *n += 1;
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let moves = moves
        .into_iter()
        .map(|(name, m)| {
            json!({"audience": name, "enter": m.enter, "exit": m.exit, "stay": m.stay,
                   "enter_examples": m.enter_examples, "exit_examples": m.exit_examples})
        })
        .collect();
    let sends = sends.into_iter().map(|(name, n)| json!({"destination": name, "first_sync_sends": n})).collect();
    Ok((Value::Array(moves), Value::Array(sends)))
}

fn render(doc: &Value, changes: &[Change]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match doc["applied"].as_object() {
        Some(a) => {
            let sha = a["sha256"].as_str().unwrap_or("");
            let _ = writeln!(out, "Comparing with the manifest applied to the store ({}).", &sha[..sha.len().min(12)]);
        }
        None => out.push_str("No manifest has been applied to this store yet: everything is new.\n"),
    }
    if changes.is_empty() {
        out.push_str("No changes.\n");
        return out;
    }
    out.push('\n');
    for c in changes {
        let fields = if c.fields.is_empty() { String::new() } else { format!(" ({})", c.fields.join(", ")) };
        let _ = writeln!(out, "  {} {}{fields}", c.kind.symbol(), c.path());
    }
    let impact = &doc["impact"];
    let mut lines = Vec::new();
    for a in impact["audiences"].as_array().into_iter().flatten() {
        let mut line = format!(
            "  audience {}: {} enter, {} exit, {} stay",
            a["audience"].as_str().unwrap_or(""),
            a["enter"],
            a["exit"],
            a["stay"]
        );
        for (key, label) in [("enter_examples", "entering"), ("exit_examples", "leaving")] {
            let ex: Vec<&str> = a[key].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            if !ex.is_empty() {
                line.push_str(&format!("; {label} e.g. {}", ex.join(", ")));
            }
        }
        lines.push(line);
    }
    for d in impact["destinations"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  destination {}: a first sync would send {} profiles (members who granted its purpose)",
            d["destination"].as_str().unwrap_or(""),
            d["first_sync_sends"]
        ));
    }
    let names = |v: &Value| v.as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join(", ");
    for (key, what) in [("restart", "restarts"), ("stop", "stops")] {
        let list = names(&impact["syncs"][key]);
        if !list.is_empty() {
            lines.push(format!("  syncs: a running `cdp run` {what} {list} (after the batch it is committing)"));
        }
    }
    for s in impact["removed_sources"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  source {} removed: its {} records stay in the store",
            s["source"].as_str().unwrap_or(""),
            s["records_kept"]
        ));
    }
    for r in impact["retention"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  retention {} (keep {}): {} records older than that would be deleted",
            r["rule"].as_str().unwrap_or(""),
            r["keep"].as_str().unwrap_or(""),
            r["would_delete"]
        ));
    }
    let id = &impact["identity"];
    if id.is_object() {
        let mut line = format!(
            "  identity: {} profiles would become {}: {} would merge, {} would split",
            id["profiles_before"], id["profiles_after"], id["merged_profiles"], id["split_profiles"]
        );
        for (key, label) in [("merge_examples", "merging"), ("split_examples", "splitting")] {
            if let Some(ex) = id[key].as_array().and_then(|a| a.first()).and_then(Value::as_array) {
                let ex: Vec<&str> = ex.iter().filter_map(Value::as_str).collect();
                line.push_str(&format!("; {label} e.g. [{}]", ex.join(", ")));
            }
        }
        lines.push(line);
        if let Some(note) = id["note"].as_str() {
            lines.push(format!("  identity: {note}"));
        }
    }
    if !lines.is_empty() {
        out.push_str("\nWhat it does to the data:\n");
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    let _ = writeln!(out, "\n{} change(s).", changes.len());
    out
}
