//! The runtime's status as one JSON document: the applied manifest, whether
//! a runtime is alive (its heartbeat), the last reload's outcome, and every
//! plugin sync with its state, last run, next run and last error. `cdp
//! status` renders it; the admin API serves it.

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use super::sync;
use crate::manifest::{self, Manifest};
use crate::resolved::Resolved;
use crate::store::runs::RunRow;
use crate::store::{Store, now_ms};

/// A heartbeat older than this means no runtime is running.
pub const STALE: Duration = Duration::from_secs(15);

/// The status document of `r` running on `store`.
pub async fn document(
    store: &Store,
    r: &Resolved,
    applied: Option<&crate::store::runs::AppliedManifest>,
) -> Result<Value> {
    let now = now_ms();
    let runtime = store.status_doc("runtime").await?.map(|(doc, at)| {
        let alive = doc.get("stopped_at").is_none() && now - at < STALE.as_millis() as i64;
        json!({"alive": alive, "heartbeat_at": at, "holder": doc["holder"], "pid": doc["pid"],
               "listen": doc.get("listen"), "scheme": doc.get("scheme"),
               "started_at": doc.get("started_at"), "stopped_at": doc.get("stopped_at")})
    });
    let reload = store.status_doc("reload").await?.map(|(doc, _)| doc);
    let mut syncs = Vec::new();
    let m = &r.manifest;
    for (name, src) in &r.sources {
        let Some(plugin) = &src.plugin else { continue };
        let runs = store.runs(name, 1).await?;
        let last_finished = store.last_finished_run(name).await?;
        let holder = store.lease_holder(&sync::lease_name(name)).await?;
        let schedule = src.schedule.as_ref();
        let streaming = src.mode == Some(manifest::types::SourceMode::Streaming);
        let mode = if streaming {
            "streaming"
        } else if schedule.is_some() {
            "scheduled"
        } else {
            "manual"
        };
        let running = holder.is_some() && runs.first().is_some_and(|r| r.state == "running");
        let state = if running {
            "running".to_owned()
        } else {
            last_finished.as_ref().map_or_else(|| "never run".to_owned(), |r| r.state.clone())
        };
        let next_run = if streaming { None } else { schedule.and_then(|s| s.next_after(now)) };
        let last_error = last_finished.as_ref().filter(|r| r.error_class.is_some()).map(
            |r| json!({"class": r.error_class, "message": r.error_message, "at": r.ended_at.unwrap_or(r.started_at)}),
        );
        syncs.push(json!({
            "name": name, "kind": "source", "plugin": plugin, "mode": mode, "schedule": schedule.map(|s| s.text()),
            "state": state, "holder": holder.map(|h| h.holder),
            "last_run": runs.first().map(run_json), "next_run": next_run, "last_error": last_error,
        }));
    }
    let (audiences, destinations) = activation(store, m).await?;
    let retention = store.status_doc("retention").await?.map(|(doc, _)| doc);
    Ok(json!({
        "retention": retention,
        "audiences": audiences,
        "destinations": destinations,
        "manifest": applied.map(|a| json!({"sha256": a.sha256, "applied_at": a.applied_at, "applied_by": a.applied_by})),
        "runtime": runtime,
        "reload": reload,
        "syncs": syncs,
    }))
}

/// Every audience (size, last evaluation) and destination (paused or
/// active, what it holds, its queue and dead letters).
async fn activation(store: &Store, m: &Manifest) -> Result<(Vec<Value>, Vec<Value>)> {
    let states = store.audience_states().await?;
    let audiences = m
        .audiences
        .iter()
        .map(|(name, a)| {
            let s = states.get(name);
            json!({
                "name": name,
                "mode": if a.refresh.is_some() { "scheduled" } else { "realtime" },
                "refresh": a.refresh,
                "members": s.map(|s| s.members),
                "evaluated_at": s.map(|s| s.evaluated_at),
                "full_evaluation_at": s.map(|s| s.full_at),
            })
        })
        .collect();
    let dstates = store.destination_states().await?;
    let counts = store.delivery_counts().await?;
    let sizes = store.destination_sizes().await?;
    let destinations = m
        .destinations
        .iter()
        .map(|(name, d)| {
            let s = dstates.get(name);
            let of = |state: &str| counts.iter().filter(|c| c.0 == *name && c.1 == state).map(|c| c.2).sum::<i64>();
            let state = match s {
                Some(s) if s.paused => "paused",
                Some(_) => "active",
                None => "pending",
            };
            json!({
                "name": name, "plugin": d.plugin, "audience": d.audience, "purpose": d.purpose,
                "state": state, "reason": s.and_then(|s| s.reason.clone()),
                "members": sizes.get(name).copied().unwrap_or(0),
                "queued": of("ready") + of("running"), "delivered": of("delivered"), "dead": of("dead"),
                "suppressed": of("suppressed"), "superseded": of("superseded"),
            })
        })
        .collect();
    Ok((audiences, destinations))
}

pub fn run_json(r: &RunRow) -> Value {
    json!({
        "id": r.id, "trigger": r.trigger, "state": r.state, "started_at": r.started_at, "ended_at": r.ended_at,
        "read": r.counts.read, "accepted": r.counts.accepted, "rejected": r.counts.rejected,
        "duplicates": r.counts.duplicates, "checkpoint": r.checkpoint,
        "error_class": r.error_class, "error_message": r.error_message,
    })
}
