//! Running instances: a typed face over the generated bindings. Every call
//! gets a fresh deadline; a trap, a deadline or the memory cap turns into a
//! [`PluginError`] and poisons the instance (its state can no longer be
//! trusted), so the caller starts a new one. Results are checked against the
//! contract (checkpoints are JSON, rejections point into the batch).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{ResourceAny, ResourceTableError};
use wasmtime::{Engine, Store, UpdateDeadline};

use super::bindings::{destination, source, types};
use super::sandbox::{Grants, LogLine, MAX_HANDLES, State};
use super::{ConnectorError, PluginError, Spec, TICK};

/// Largest checkpoint a source may emit; it is stored with every batch.
pub const MAX_CHECKPOINT: usize = 1 << 20;
/// Most bytes of records one `next` may return.
pub const MAX_RECORDS_BYTES: usize = 32 << 20;
/// Longest message of a connector error kept; the rest is cut.
pub const MAX_ERROR_MESSAGE: usize = 4 << 10;
/// Longest code of a connector error kept.
const MAX_ERROR_CODE: usize = 128;

/// The error a call gets when its deadline passed while it was blocked in
/// the host (a sleep, a poll), where the epoch check cannot reach it.
#[derive(Debug, thiserror::Error)]
#[error("the call was still blocked in the host at its deadline")]
struct HostDeadline;

/// Runs one call into the guest, but no longer than until `until`: the
/// epoch callback stops a guest that computes; this stops one waiting in a
/// host function. Dropping the call's future unwinds the guest's stack; the
/// instance is poisoned afterwards either way.
async fn bounded<T>(
    until: tokio::time::Instant,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    match tokio::time::timeout_at(until, call).await {
        Ok(r) => r,
        Err(_) => Err(HostDeadline.into()),
    }
}

/// Cuts `s` to at most `max` bytes on a char boundary, saying how long it was.
fn cut_to(s: &mut String, max: usize) {
    if s.len() > max {
        let len = s.len();
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(&format!("… (cut at {max} of {len} bytes)"));
    }
}

/// Whether a trap is the guest running out of stack: either wasmtime's
/// own stack guard, or (Rust and C guests keep their stack at the bottom of
/// linear memory, growing down) a frame pushed below address 0: its address
/// wraps to just under 4 GiB, and with the store's static offset lands
/// within a MiB either side of 4 GiB, far past any memory the cap allows.
fn stack_overflow(e: &wasmtime::Error) -> bool {
    if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::StackOverflow) {
        return true;
    }
    e.chain().any(|c| {
        let text = c.to_string();
        text.strip_prefix("memory fault at wasm address 0x")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .is_some_and(|addr| (0xFFF0_0000..0x1_0010_0000).contains(&addr))
    })
}

/// A new store for one instance: limits, deadline callback, grants.
pub(crate) fn new_store(engine: &Engine, entry: &str, grants: &Grants) -> Result<Store<State>, PluginError> {
    let mut store = Store::new(engine, State::new(entry, grants)?);
    store.limiter(|s| &mut s.limiter);
    // Each tick the running call either yields to the executor (other syncs
    // keep running on this thread) or, past its deadline, is stopped.
    store.epoch_deadline_callback(|mut ctx| {
        let s = ctx.data_mut();
        if Instant::now() >= s.deadline {
            s.timed_out = true;
            return Err(wasmtime::format_err!("the call ran past its deadline"));
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store.set_epoch_deadline(1);
    Ok(store)
}

/// What every instance shares: its store and call bookkeeping.
struct Core {
    store: Store<State>,
    timeout: Duration,
    poisoned: bool,
    /// The plugin's metrics label ([`super::Plugin::label`]).
    plugin: Arc<str>,
}

impl Core {
    fn entry(&self) -> String {
        self.store.data().entry.to_string()
    }

    /// Starts a call: a fresh deadline, fresh budgets. Returns when the
    /// host stops waiting for the call (a tick after the epoch deadline, so
    /// a computing guest is stopped by the epoch check first).
    fn begin(&mut self) -> Result<tokio::time::Instant, PluginError> {
        if self.poisoned {
            return Err(PluginError::Poisoned { entry: self.entry() });
        }
        let now = Instant::now();
        let s = self.store.data_mut();
        s.deadline = now + self.timeout;
        s.timed_out = false;
        s.limiter.refused = None;
        s.recent.end_call();
        self.store.set_epoch_deadline(1);
        Ok(tokio::time::Instant::from_std(now + self.timeout + 2 * TICK))
    }

    /// Turns a failed call into the error that explains it, and poisons the instance.
    fn fail(&mut self, call: &'static str, e: wasmtime::Error) -> PluginError {
        self.poisoned = true;
        let entry = self.entry();
        let s = self.store.data();
        if s.timed_out || e.is::<HostDeadline>() {
            return PluginError::Deadline { entry, call, timeout: self.timeout };
        }
        if let Some(requested) = s.limiter.refused {
            return PluginError::Memory { entry, call, cap: s.limiter.cap() as u64, requested: requested as u64 };
        }
        if e.chain().any(|c| matches!(c.downcast_ref::<ResourceTableError>(), Some(ResourceTableError::Full))) {
            return PluginError::Limit {
                entry,
                call,
                message: format!(
                    "it held more than {MAX_HANDLES} handles at once (open files, directories, streams); that is the limit per instance"
                ),
            };
        }
        if stack_overflow(&e) {
            return PluginError::Trap {
                entry,
                call,
                message: "stack overflow: the plugin ran out of stack (deep or unbounded recursion?)".into(),
            };
        }
        // The root cause is the trap itself ("wasm `unreachable` instruction
        // executed"); the outer layers only say a backtrace follows.
        let mut message = e.root_cause().to_string();
        if let Some(last) = s.recent.stderr_tail() {
            message = format!("{message} (plugin stderr: {last})");
        }
        PluginError::Trap { entry, call, message }
    }

    /// Every call into the guest ends here: its error explained, and the
    /// call counted in the plugin metrics.
    fn finish<T>(&mut self, call: &'static str, r: wasmtime::Result<T>) -> Result<T, PluginError> {
        let entry = self.store.data().entry.clone();
        self.store.data().recent.report_dropped(&entry, call);
        let r = r.map_err(|e| self.fail(call, e));
        super::observe_call(&self.plugin, call, r.as_ref().err());
        r
    }

    fn connector<T>(&self, call: &'static str, r: Result<T, types::ConnectorError>) -> Result<T, PluginError> {
        r.map_err(|e| PluginError::Connector { entry: self.entry(), call, error: bounded_error(e) })
    }

    fn limit(&self, call: &'static str, message: String) -> PluginError {
        PluginError::Limit { entry: self.entry(), call, message }
    }

    fn protocol(&self, call: &'static str, message: impl Into<String>) -> PluginError {
        PluginError::Protocol { entry: self.entry(), call, message: message.into() }
    }

    fn spec(&self, s: types::ConnectorSpec) -> Result<Spec, PluginError> {
        let config_schema = serde_json::from_str(&s.config_schema)
            .map_err(|e| self.protocol("spec", format!("config-schema is not JSON: {e}")))?;
        Ok(Spec {
            name: s.name,
            version: s.version,
            protocol: s.protocol,
            description: s.description,
            config_schema,
            capabilities: s.capabilities,
        })
    }
}

/// A connector error with its code and message cut to the host's limits.
fn bounded_error(mut e: types::ConnectorError) -> ConnectorError {
    cut_to(&mut e.message, MAX_ERROR_MESSAGE);
    cut_to(&mut e.code, MAX_ERROR_CODE);
    e.into()
}

/// What both instance kinds share: accessors, and `spec`/`check`, which the
/// two worlds export alike under different interface names.
macro_rules! instance_common {
    ($world:ident) => {
        pub async fn spec(&mut self) -> Result<Spec, PluginError> {
            let until = self.core.begin()?;
            let r = bounded(until, self.bindings.$world().call_spec(&mut self.core.store)).await;
            let s = self.core.finish("spec", r)?;
            self.core.spec(s)
        }

        pub async fn check(&mut self, config: &serde_json::Value) -> Result<(), PluginError> {
            self.check_text(&config.to_string()).await
        }

        /// `check` with the config as raw text (the conformance suite sends garbage).
        pub async fn check_text(&mut self, config: &str) -> Result<(), PluginError> {
            let until = self.core.begin()?;
            let r = bounded(until, self.bindings.$world().call_check(&mut self.core.store, &config.to_owned())).await;
            let r = self.core.finish("check", r)?;
            self.core.connector("check", r)
        }

        /// The manifest entry this instance serves.
        pub fn entry(&self) -> String {
            self.core.entry()
        }

        /// Output since the last call of this (logs, stdout, stderr), oldest first.
        pub fn take_logs(&mut self) -> Vec<LogLine> {
            self.core.store.data().recent.take()
        }

        /// Lines of output dropped over the per-call limit since the instance started.
        pub fn dropped_output(&self) -> u64 {
            self.core.store.data().recent.dropped_total()
        }

        /// Metric samples reported so far: counters summed, gauges last.
        pub fn metrics(&self) -> &BTreeMap<String, f64> {
            &self.core.store.data().metrics
        }

        /// Bytes of linear memory the instance holds.
        pub fn memory_used(&self) -> usize {
            self.core.store.data().limiter.used()
        }

        /// Whether an earlier call trapped (the instance cannot be used again).
        pub fn is_poisoned(&self) -> bool {
            self.core.poisoned
        }
    };
}

/// One event a source's `next` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEvent {
    /// Records as JSON Lines; `count` is what the plugin says it sent.
    Records { count: u32, ndjson: String },
    /// Resume state covering every record before it (JSON text).
    Checkpoint(String),
}

/// A running source instance.
pub struct SourceInstance {
    core: Core,
    bindings: source::SourceConnector,
    reader: Option<ResourceAny>,
}

impl SourceInstance {
    pub(crate) fn new(
        store: Store<State>,
        bindings: source::SourceConnector,
        timeout: Duration,
        plugin: Arc<str>,
    ) -> Self {
        SourceInstance { core: Core { store, timeout, poisoned: false, plugin }, bindings, reader: None }
    }

    instance_common!(cdp_connector_source);

    /// Opens a reader; `state` is the last persisted checkpoint (JSON text).
    pub async fn open(&mut self, config: &serde_json::Value, state: Option<&str>) -> Result<(), PluginError> {
        self.close().await?;
        let until = self.core.begin()?;
        let cfg = config.to_string();
        let r = bounded(
            until,
            self.bindings.cdp_connector_source().reader().call_open(
                &mut self.core.store,
                &cfg,
                state.map(str::to_owned).as_ref(),
            ),
        )
        .await;
        let r = self.core.finish("open", r)?;
        self.reader = Some(self.core.connector("open", r)?);
        Ok(())
    }

    fn reader(&self, call: &'static str) -> Result<ResourceAny, PluginError> {
        self.reader.ok_or_else(|| PluginError::NotOpen { entry: self.core.entry(), call, what: "reader" })
    }

    /// Up to `max` records and the checkpoints among them; empty: done (batch) or idle (streaming).
    pub async fn next(&mut self, max: u32) -> Result<Vec<ReadEvent>, PluginError> {
        let reader = self.reader("next")?;
        let until = self.core.begin()?;
        let r =
            bounded(until, self.bindings.cdp_connector_source().reader().call_next(&mut self.core.store, reader, max))
                .await;
        let r = self.core.finish("next", r)?;
        let events = self.core.connector("next", r)?;
        self.within_limits(&events)?;
        events
            .into_iter()
            .map(|e| match e {
                types::ReadEvent::Records(b) => Ok(ReadEvent::Records { count: b.records, ndjson: b.ndjson }),
                types::ReadEvent::Checkpoint(c) => match serde_json::from_str::<serde_json::Value>(&c) {
                    Ok(_) => Ok(ReadEvent::Checkpoint(c)),
                    Err(e) => Err(self.core.protocol("next", format!("a checkpoint is not JSON: {e}"))),
                },
            })
            .collect()
    }

    /// Refuses a `next` whose records or checkpoints are over the host's
    /// limits; the records are not ingested and the instance is poisoned.
    fn within_limits(&mut self, events: &[types::ReadEvent]) -> Result<(), PluginError> {
        let mut records = 0usize;
        for e in events {
            match e {
                types::ReadEvent::Records(b) => records += b.ndjson.len(),
                types::ReadEvent::Checkpoint(c) if c.len() > MAX_CHECKPOINT => {
                    self.core.poisoned = true;
                    return Err(self.core.limit(
                        "next",
                        format!(
                            "it emitted a checkpoint of {} bytes; the limit is {MAX_CHECKPOINT} bytes per checkpoint (keep resume state small: an offset, a cursor)",
                            c.len()
                        ),
                    ));
                }
                types::ReadEvent::Checkpoint(_) => {}
            }
        }
        if records > MAX_RECORDS_BYTES {
            self.core.poisoned = true;
            return Err(self.core.limit(
                "next",
                format!(
                    "it returned {records} bytes of records in one call; the limit is {MAX_RECORDS_BYTES} bytes per call (return fewer records per `next`)"
                ),
            ));
        }
        Ok(())
    }

    /// Streaming: tells the plugin a checkpoint is durable.
    pub async fn ack(&mut self, checkpoint: &str) -> Result<(), PluginError> {
        let reader = self.reader("ack")?;
        let until = self.core.begin()?;
        let r = bounded(
            until,
            self.bindings.cdp_connector_source().reader().call_ack(
                &mut self.core.store,
                reader,
                &checkpoint.to_owned(),
            ),
        )
        .await;
        self.core.finish("ack", r)
    }

    /// Drops the open reader, if any (the plugin's clean-up runs).
    pub async fn close(&mut self) -> Result<(), PluginError> {
        if let Some(reader) = self.reader.take()
            && !self.core.poisoned
        {
            let until = self.core.begin()?;
            let r = bounded(until, reader.resource_drop_async(&mut self.core.store)).await;
            self.core.finish("close", r)?;
        }
        Ok(())
    }
}

/// What a destination accepted and refused of one batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteAck {
    pub accepted: u32,
    /// Refused records by index in the batch, ascending.
    pub rejected: Vec<(u32, ConnectorError)>,
}

/// A running destination instance.
pub struct DestinationInstance {
    core: Core,
    bindings: destination::DestinationConnector,
    writer: Option<ResourceAny>,
}

impl DestinationInstance {
    pub(crate) fn new(
        store: Store<State>,
        bindings: destination::DestinationConnector,
        timeout: Duration,
        plugin: Arc<str>,
    ) -> Self {
        DestinationInstance { core: Core { store, timeout, poisoned: false, plugin }, bindings, writer: None }
    }

    instance_common!(cdp_connector_destination);

    pub async fn open(&mut self, config: &serde_json::Value) -> Result<(), PluginError> {
        self.close().await?;
        let until = self.core.begin()?;
        let cfg = config.to_string();
        let r =
            bounded(until, self.bindings.cdp_connector_destination().writer().call_open(&mut self.core.store, &cfg))
                .await;
        let r = self.core.finish("open", r)?;
        self.writer = Some(self.core.connector("open", r)?);
        Ok(())
    }

    fn writer(&self, call: &'static str) -> Result<ResourceAny, PluginError> {
        self.writer.ok_or_else(|| PluginError::NotOpen { entry: self.core.entry(), call, what: "writer" })
    }

    /// Delivers one JSON Lines batch of `records` records.
    pub async fn write(&mut self, ndjson: String, records: u32) -> Result<WriteAck, PluginError> {
        let writer = self.writer("write")?;
        let until = self.core.begin()?;
        let batch = types::Batch { records, ndjson };
        let r = bounded(
            until,
            self.bindings.cdp_connector_destination().writer().call_write(&mut self.core.store, writer, &batch),
        )
        .await;
        let r = self.core.finish("write", r)?;
        let ack = self.core.connector("write", r)?;
        self.ack("write", ack, records)
    }

    /// Makes everything accepted so far durable.
    pub async fn flush(&mut self) -> Result<(), PluginError> {
        let writer = self.writer("flush")?;
        let until = self.core.begin()?;
        let r =
            bounded(until, self.bindings.cdp_connector_destination().writer().call_flush(&mut self.core.store, writer))
                .await;
        let r = self.core.finish("flush", r)?;
        self.core.connector("flush", r)
    }

    /// Erasure: forget the people in this JSON Lines batch.
    pub async fn delete(&mut self, ndjson: String, records: u32) -> Result<WriteAck, PluginError> {
        let writer = self.writer("delete")?;
        let until = self.core.begin()?;
        let batch = types::Batch { records, ndjson };
        let r = bounded(
            until,
            self.bindings.cdp_connector_destination().writer().call_delete(&mut self.core.store, writer, &batch),
        )
        .await;
        let r = self.core.finish("delete", r)?;
        let ack = self.core.connector("delete", r)?;
        self.ack("delete", ack, records)
    }

    fn ack(&self, call: &'static str, ack: types::WriteAck, records: u32) -> Result<WriteAck, PluginError> {
        let mut rejected: Vec<(u32, ConnectorError)> =
            ack.rejected.into_iter().map(|r| (r.index, bounded_error(r.reason))).collect();
        rejected.sort_by_key(|r| r.0);
        rejected.dedup_by_key(|r| r.0);
        if let Some((i, _)) = rejected.iter().find(|r| r.0 >= records) {
            return Err(self.core.protocol(call, format!("rejected record {i} of a batch of {records}")));
        }
        if u64::from(ack.accepted) + rejected.len() as u64 != u64::from(records) {
            return Err(self.core.protocol(
                call,
                format!("accepted {} and rejected {} of a batch of {records}", ack.accepted, rejected.len()),
            ));
        }
        Ok(WriteAck { accepted: ack.accepted, rejected })
    }

    /// Drops the open writer, if any (the plugin's clean-up runs).
    pub async fn close(&mut self) -> Result<(), PluginError> {
        if let Some(writer) = self.writer.take()
            && !self.core.poisoned
        {
            let until = self.core.begin()?;
            let r = bounded(until, writer.resource_drop_async(&mut self.core.store)).await;
            self.core.finish("close", r)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_just_past_4_gib_is_a_stack_overflow() {
        let fault = |addr: u64| {
            wasmtime::Error::from(wasmtime::Trap::MemoryOutOfBounds)
                .context(format!("memory fault at wasm address 0x{addr:x} in linear memory of size 0x110000"))
        };
        assert!(stack_overflow(&fault(0x1_0000_01e0)));
        assert!(stack_overflow(&fault(0xFFFF_FF00)));
        assert!(!stack_overflow(&fault(0x11_0008)), "just past the end of memory is an ordinary fault");
        assert!(stack_overflow(&wasmtime::Error::from(wasmtime::Trap::StackOverflow)));
        assert!(!stack_overflow(&wasmtime::Error::from(wasmtime::Trap::UnreachableCodeReached)));
    }

    #[test]
    fn long_error_messages_are_cut_saying_how_long_they_were() {
        let mut s = "é".repeat(3000);
        cut_to(&mut s, MAX_ERROR_MESSAGE);
        assert!(s.ends_with("… (cut at 4096 of 6000 bytes)"), "{}", &s[4000..]);
        let mut short = "fine".to_owned();
        cut_to(&mut short, MAX_ERROR_MESSAGE);
        assert_eq!(short, "fine");
    }
}
