//! Retention in `cdp run`: on the manifest's `retention.schedule` (default
//! every hour), one process at a time (the store lease `retention`) deletes
//! the records the `retention:` rules no longer keep, and records what went
//! in the `retention` status document.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::snapshot::Snapshot;
use crate::store::{Store, now_ms};

/// Runs retention until cancelled, following the running manifest.
pub async fn run(
    store: Arc<Store>,
    snap_rx: watch::Receiver<Arc<Snapshot>>,
    holder: String,
    cancel: CancellationToken,
) {
    let mut last = now_ms();
    loop {
        let snap = snap_rx.borrow().clone();
        let rules = &snap.retention.rules;
        let next = snap.retention.schedule.next_after(last).unwrap_or(last + 3_600_000);
        // Wake at the next run, or sooner to pick up a changed manifest.
        let wait = Duration::from_millis((next - now_ms()).clamp(0, 60_000) as u64);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if now_ms() < next {
            continue;
        }
        last = now_ms();
        if rules.is_empty() {
            continue;
        }
        let lease = match store.try_acquire_lease("retention", &holder, Duration::from_secs(600)).await {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "retention: cannot take the lease");
                continue;
            }
        };
        match store.retention(rules, true).await {
            Ok(counts) => {
                let total: i64 = counts.iter().map(|c| c.1).sum();
                tracing::info!(deleted = total, "retention: old records deleted");
                let doc = json!({"at": now_ms(), "deleted": counts.iter().map(|(r, n)| json!({"rule": r, "deleted": n})).collect::<Vec<_>>()});
                if let Err(e) = store.put_status("retention", &doc).await {
                    tracing::warn!(error = %e, "retention: cannot record the run");
                }
            }
            Err(e) => tracing::error!(error = %e, "retention: deletion failed"),
        }
        let _ = store.release_lease(&lease).await;
    }
}
