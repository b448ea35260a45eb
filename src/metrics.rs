//! Every metric cdp exports, in one place: its name, kind, labels and
//! help text. Code records through the `metrics` facade with these
//! constants; `cdp run` installs the Prometheus recorder and serves
//! `GET /metrics` from it. Without an installed recorder (every other
//! command, and unit tests) recording is a no-op.
//!
//! Labels stay low-cardinality: source, sync, plugin, route, state,
//! outcome and rejection reason — never a person's identifier.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// `{source}`: events that reached the collector with a valid write key.
pub const EVENTS_RECEIVED: &str = "cdp_events_received_total";
/// `{source}`: events durably stored (duplicates included: they are acknowledged).
pub const EVENTS_ACCEPTED: &str = "cdp_events_accepted_total";
/// `{source, reason}`: events refused, by rejection code
/// ([`crate::ingest::REJECTION_CODES`]: `too_large`, `no_id`, `type`, and
/// the map's codes such as `no_identifier` or `trait`).
pub const EVENTS_REJECTED: &str = "cdp_events_rejected_total";
/// `{route, status}`: HTTP requests answered.
pub const HTTP_REQUESTS: &str = "cdp_http_requests_total";
/// `{route}`: seconds from request to response.
pub const HTTP_DURATION: &str = "cdp_http_request_duration_seconds";
/// `{origin}`: batches committed by the ingest pipeline (`collector`, `sync`, `cli`).
pub const INGEST_BATCHES: &str = "cdp_ingest_batches_total";
/// `{origin}`: seconds to prepare and commit one batch.
pub const INGEST_BATCH_DURATION: &str = "cdp_ingest_batch_duration_seconds";
/// `{origin}`: records stored by the ingest pipeline.
pub const INGEST_RECORDS: &str = "cdp_ingest_records_total";
/// Profiles merged by identity resolution.
pub const IDENTITY_MERGES: &str = "cdp_identity_merges_total";
/// Profiles split (limits, unmerge).
pub const IDENTITY_SPLITS: &str = "cdp_identity_splits_total";
/// `{sync, state}`: source sync runs ended, by final state.
pub const SYNC_RUNS: &str = "cdp_sync_runs_total";
/// `{sync}`: seconds a sync run took.
pub const SYNC_DURATION: &str = "cdp_sync_run_duration_seconds";
/// `{outcome}`: manifest reloads, `ok` or `failed`.
pub const RELOADS: &str = "cdp_reloads_total";
/// `{plugin, call}`: calls into plugin components (`instantiate`, `spec`,
/// `check`, `open`, `next`, `ack`, `close`, `write`, `flush`, `delete`);
/// `plugin` is the component file's stem.
pub const PLUGIN_CALLS: &str = "cdp_plugin_calls_total";
/// `{plugin}`: plugin calls that trapped (a crash, the memory cap, a host limit).
pub const PLUGIN_TRAPS: &str = "cdp_plugin_traps_total";
/// `{plugin}`: plugin calls stopped at their deadline.
pub const PLUGIN_TIMEOUTS: &str = "cdp_plugin_timeouts_total";
/// `{action}`: rows appended to the audit log.
pub const AUDIT_ROWS: &str = "cdp_audit_rows_total";

/// `{destination, outcome}`: delivery records settled: `delivered`,
/// `retried`, `dead`, `suppressed` (consent denied at send time),
/// `superseded` (a later record replaced it).
pub const DELIVERIES: &str = "cdp_deliveries_total";
/// `{destination}`: seconds from the commit of the change to its delivery.
pub const DELIVERY_LATENCY: &str = "cdp_delivery_latency_seconds";
/// `{destination}`: records waiting to be sent (ready or being sent).
pub const DELIVERY_QUEUE: &str = "cdp_delivery_queue_depth";
/// `{destination}`: records in the dead-letter store.
pub const DEAD_LETTERS: &str = "cdp_dead_letters";
/// `{audience, change}`: audience entries and exits (`entered`, `exited`).
pub const AUDIENCE_CHANGES: &str = "cdp_audience_changes_total";

/// `{origin, reason}`: records dropped by privacy marks: `suppressed` (a
/// suppressed identifier), `erased` (every identifier erased).
pub const PRIVACY_DROPS: &str = "cdp_privacy_dropped_total";

/// Histogram buckets for request and batch latencies, in seconds.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Installs the process-wide Prometheus recorder once and returns its
/// handle; later calls return the same handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    describe_counter!(EVENTS_RECEIVED, "Events received by the collector with a valid write key.");
    describe_counter!(EVENTS_ACCEPTED, "Events durably stored by the collector (duplicates included).");
    describe_counter!(EVENTS_REJECTED, "Events the collector refused, by reason.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status.");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request latency by route.");
    describe_counter!(INGEST_BATCHES, "Batches committed by the ingest pipeline.");
    describe_histogram!(INGEST_BATCH_DURATION, Unit::Seconds, "Time to prepare and commit one ingest batch.");
    describe_counter!(INGEST_RECORDS, "Records stored by the ingest pipeline.");
    describe_counter!(IDENTITY_MERGES, "Profiles merged by identity resolution.");
    describe_counter!(IDENTITY_SPLITS, "Profiles split by identity limits or unmerge.");
    describe_counter!(SYNC_RUNS, "Source sync runs ended, by final state.");
    describe_histogram!(SYNC_DURATION, Unit::Seconds, "Duration of source sync runs.");
    describe_counter!(RELOADS, "Manifest reloads by outcome.");
    describe_counter!(PLUGIN_CALLS, "Calls into plugin components.");
    describe_counter!(PLUGIN_TRAPS, "Plugin calls that trapped (a crash, the memory cap, a host limit).");
    describe_counter!(PLUGIN_TIMEOUTS, "Plugin calls stopped at their deadline.");
    describe_counter!(AUDIT_ROWS, "Rows appended to the audit log.");
    describe_counter!(DELIVERIES, "Delivery records settled, by destination and outcome.");
    describe_histogram!(DELIVERY_LATENCY, Unit::Seconds, "Time from a committed change to its delivery.");
    describe_gauge!(DELIVERY_QUEUE, "Delivery records waiting to be sent, by destination.");
    describe_gauge!(DEAD_LETTERS, "Delivery records in the dead-letter store, by destination.");
    describe_counter!(AUDIENCE_CHANGES, "Audience entries and exits.");
    describe_counter!(PRIVACY_DROPS, "Records dropped because their person is suppressed or erased.");
}

/// Records one committed ingest batch.
pub fn batch_committed(origin: &'static str, report: &crate::store::ingest::BatchReport, seconds: f64) {
    metrics::counter!(INGEST_BATCHES, "origin" => origin).increment(1);
    metrics::histogram!(INGEST_BATCH_DURATION, "origin" => origin).record(seconds);
    metrics::counter!(INGEST_RECORDS, "origin" => origin).increment(report.accepted);
    metrics::counter!(IDENTITY_MERGES).increment(report.merges);
    metrics::counter!(IDENTITY_SPLITS).increment(report.splits);
    if report.suppressed > 0 {
        metrics::counter!(PRIVACY_DROPS, "origin" => origin, "reason" => "suppressed").increment(report.suppressed);
    }
    if report.erased > 0 {
        metrics::counter!(PRIVACY_DROPS, "origin" => origin, "reason" => "erased").increment(report.erased);
    }
}
