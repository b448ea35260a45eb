//! What one plugin instance may touch: the store data behind every call. Deny
//! by default, in one place: no environment, no arguments, no sockets, no
//! filesystem beyond the entry's `mount`s, standard output and error captured
//! into logs, a memory cap across all of the instance's memories, and a
//! per-call deadline checked on every epoch tick.
//!
//! What a guest could otherwise exhaust on the host side is bounded here
//! too: open handles per instance ([`MAX_HANDLES`]), output per call
//! ([`MAX_LOG_LINES`], [`MAX_LOG_BYTES`]; the rest is dropped and counted),
//! and files that would block a host thread (FIFOs, devices, sockets) are
//! refused inside mounts.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::PluginError;
use super::bindings::{host, types};
use super::http::HttpGate;

/// Default memory cap of one instance.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Default deadline of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of plugin output (logs, stdout, stderr) kept per instance for reports.
const RECENT_LINES: usize = 200;
/// Longest line of plugin output kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 8 << 10;
/// Lines of output (logs, stdout, stderr) one call may emit; the rest is
/// dropped and counted, so a flooding plugin cannot fill the host's logs.
pub const MAX_LOG_LINES: u64 = 1_000;
/// Bytes of output one call may emit (see [`MAX_LOG_LINES`]).
pub const MAX_LOG_BYTES: u64 = 1 << 20;
/// Resources one instance may hold at once: open files and directories,
/// streams, pollables. Each open file is a host descriptor, so this keeps
/// one plugin from using up the process's descriptor limit.
pub const MAX_HANDLES: usize = 1_024;

/// A read-only (sources) or read-write (destinations) directory lent to a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Directory on the host.
    pub host: PathBuf,
    /// Absolute path the plugin sees, e.g. `/input`.
    pub guest: String,
    /// Whether the plugin may create and change files in it.
    pub writable: bool,
}

/// Everything an instance is granted; nothing else is reachable.
#[derive(Debug, Clone)]
pub struct Grants {
    /// Directories, see [`Mount`].
    pub mounts: Vec<Mount>,
    /// Hosts reachable over HTTP (`host`, `host:port`, `*.domain`, IP literals).
    pub allow_hosts: Vec<String>,
    /// Memory cap in bytes, summed over the instance's memories.
    pub memory: u64,
    /// Deadline of each call into the plugin.
    pub timeout: Duration,
}

impl Default for Grants {
    fn default() -> Self {
        Grants { mounts: Vec::new(), allow_hosts: Vec::new(), memory: DEFAULT_MEMORY, timeout: DEFAULT_TIMEOUT }
    }
}

/// One line of plugin output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// `trace` … `error` for the log import, `stdout` or `stderr` for output.
    pub level: &'static str,
    pub message: String,
}

/// Recent output of an instance, shared with its stdout/stderr pipes, and
/// the per-call output budget.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recent(Arc<Mutex<Output>>);

#[derive(Debug, Default)]
struct Output {
    lines: VecDeque<LogLine>,
    /// Lines and bytes emitted in the running call.
    call_lines: u64,
    call_bytes: u64,
    /// Lines and bytes dropped over the budget in the running call.
    dropped_lines: u64,
    dropped_bytes: u64,
    /// Lines dropped over the life of the instance.
    dropped_total: u64,
}

/// Output a call emitted beyond its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Dropped {
    pub lines: u64,
    pub bytes: u64,
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, Output> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a line of `bytes` bytes is within the call's budget; counts
    /// it as emitted or dropped.
    fn admit(&self, bytes: usize) -> bool {
        let mut o = self.lock();
        let bytes = bytes as u64;
        if o.call_lines >= MAX_LOG_LINES || o.call_bytes + bytes > MAX_LOG_BYTES {
            o.dropped_lines += 1;
            o.dropped_bytes += bytes;
            o.dropped_total += 1;
            return false;
        }
        o.call_lines += 1;
        o.call_bytes += bytes;
        true
    }

    pub(crate) fn push(&self, level: &'static str, message: String) {
        let mut o = self.lock();
        if o.lines.len() == RECENT_LINES {
            o.lines.pop_front();
        }
        o.lines.push_back(LogLine { level, message });
    }

    /// Ends the running call's budget: what it dropped, and a fresh budget.
    pub(crate) fn end_call(&self) -> Dropped {
        let mut o = self.lock();
        let d = Dropped { lines: o.dropped_lines, bytes: o.dropped_bytes };
        (o.call_lines, o.call_bytes, o.dropped_lines, o.dropped_bytes) = (0, 0, 0, 0);
        d
    }

    /// Lines of output dropped over the budget since the instance started.
    pub(crate) fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }

    /// Reports output a call dropped: one warning in the host's log and
    /// among the instance's recent lines.
    pub(crate) fn report_dropped(&self, entry: &str, call: &str) {
        let d = self.end_call();
        if d.lines == 0 {
            return;
        }
        let message = format!(
            "`{call}` dropped {} lines ({} bytes) of plugin output over the limit of {MAX_LOG_LINES} lines or {MAX_LOG_BYTES} bytes per call",
            d.lines, d.bytes
        );
        tracing::warn!(target: "cdp::plugin", plugin = entry, dropped_lines = d.lines, dropped_bytes = d.bytes, "{message}");
        self.push("warn", message);
    }

    /// The last lines of standard error (a Rust panic's location and
    /// message), without the backtrace note.
    pub(crate) fn stderr_tail(&self) -> Option<String> {
        let o = self.lock();
        let mut tail: Vec<&str> = o
            .lines
            .iter()
            .rev()
            .filter(|l| l.level == "stderr" && !l.message.starts_with("note: run with `RUST_BACKTRACE"))
            .take(2)
            .map(|l| l.message.as_str())
            .collect();
        tail.reverse();
        (!tail.is_empty()).then(|| tail.join(" "))
    }

    pub(crate) fn take(&self) -> Vec<LogLine> {
        self.lock().lines.drain(..).collect()
    }
}

/// Memory accounting across all memories of one instance.
pub(crate) struct Limiter {
    cap: usize,
    used: usize,
    /// The size a refused growth asked for, kept to explain the failure.
    pub(crate) refused: Option<usize>,
}

impl Limiter {
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    pub(crate) fn used(&self) -> usize {
        self.used
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.used - current.min(self.used) + desired;
        if total > self.cap {
            self.refused = Some(total);
            return Ok(false);
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        16
    }
}

/// The data of one store: one plugin instance.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) http: HttpGate,
    /// The manifest entry this instance serves, for logs and errors.
    pub(crate) entry: Arc<str>,
    /// When the running call must have returned.
    pub(crate) deadline: Instant,
    /// Set by the epoch callback when it stopped a call at its deadline.
    pub(crate) timed_out: bool,
    pub(crate) recent: Recent,
    /// Metric samples: counters (`…_total`) summed, gauges last value.
    pub(crate) metrics: BTreeMap<String, f64>,
}

impl State {
    pub(crate) fn new(entry: &str, grants: &Grants) -> Result<State, PluginError> {
        let entry: Arc<str> = Arc::from(entry);
        let recent = Recent::default();
        let mut b = WasiCtxBuilder::new();
        b.stdout(Pipe { entry: entry.clone(), stream: "stdout", recent: recent.clone() });
        b.stderr(Pipe { entry: entry.clone(), stream: "stderr", recent: recent.clone() });
        b.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        b.socket_addr_check(|_, _| Box::pin(async { false }));
        for m in &grants.mounts {
            let perms = if m.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
            b.preopened_dir(&m.host, &m.guest, perms).map_err(|e| PluginError::Mount {
                entry: entry.to_string(),
                host: m.host.clone(),
                message: e.to_string(),
            })?;
        }
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HANDLES);
        Ok(State {
            wasi: b.build(),
            table,
            limiter: Limiter { cap: usize::try_from(grants.memory).unwrap_or(usize::MAX), used: 0, refused: None },
            http: HttpGate::new(&grants.allow_hosts)?,
            entry,
            deadline: Instant::now() + grants.timeout,
            timed_out: false,
            recent,
            metrics: BTreeMap::new(),
        })
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for State {}

impl host::Host for State {
    fn log(&mut self, level: host::Level, message: String) -> wasmtime::Result<()> {
        let entry = &*self.entry;
        if !self.recent.admit(message.len().min(MAX_LINE)) {
            return Ok(());
        }
        let message = cut(message);
        let name = match level {
            host::Level::Trace => {
                tracing::trace!(target: "cdp::plugin", plugin = entry, "{message}");
                "trace"
            }
            host::Level::Debug => {
                tracing::debug!(target: "cdp::plugin", plugin = entry, "{message}");
                "debug"
            }
            host::Level::Info => {
                tracing::info!(target: "cdp::plugin", plugin = entry, "{message}");
                "info"
            }
            host::Level::Warn => {
                tracing::warn!(target: "cdp::plugin", plugin = entry, "{message}");
                "warn"
            }
            host::Level::Error => {
                tracing::error!(target: "cdp::plugin", plugin = entry, "{message}");
                "error"
            }
        };
        self.recent.push(name, message);
        Ok(())
    }

    fn metric(&mut self, name: String, value: f64) -> wasmtime::Result<()> {
        if !value.is_finite() || name.len() > 200 {
            return Ok(());
        }
        tracing::debug!(target: "cdp::plugin", plugin = &*self.entry, metric = %name, value, "plugin metric");
        if self.metrics.len() >= 1_000 && !self.metrics.contains_key(&name) {
            return Ok(()); // a plugin cannot grow the host's memory without bound
        }
        // Counters end in `_total` (the WIT contract); everything else is a gauge.
        let counter = name.ends_with("_total");
        let slot = self.metrics.entry(name).or_insert(0.0);
        *slot = if counter { *slot + value } else { value };
        Ok(())
    }

    fn sha256(&mut self, data: Vec<u8>, ends: Vec<u32>) -> wasmtime::Result<Vec<u8>> {
        if data.len() > MAX_HASH_INPUT || ends.len() > MAX_HASH_VALUES {
            wasmtime::bail!(
                "host sha256: {} bytes in {} values is over the limit of {MAX_HASH_INPUT} bytes and {MAX_HASH_VALUES} values per call; split the work",
                data.len(),
                ends.len()
            );
        }
        let mut digests = Vec::with_capacity(32 * ends.len());
        let mut start = 0;
        for (i, &end) in ends.iter().enumerate() {
            let end = end as usize;
            let Some(value) = data.get(start..end) else {
                wasmtime::bail!(
                    "host sha256: value {i} ends at byte {end}, before its start ({start}) or past the end of the data ({})",
                    data.len()
                );
            };
            digests.extend_from_slice(&Sha256::digest(value));
            start = end;
        }
        Ok(digests)
    }
}

/// Largest input of one `sha256` call: the host copies it out of the
/// guest's memory, outside the guest's memory cap and deadline.
pub const MAX_HASH_INPUT: usize = 1 << 20;
/// Most values one `sha256` call hashes.
pub const MAX_HASH_VALUES: usize = 1 << 16;

fn cut(mut s: String) -> String {
    if s.len() > MAX_LINE {
        let mut end = MAX_LINE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Standard output or error of a plugin, turned into log lines.
struct Pipe {
    entry: Arc<str>,
    stream: &'static str,
    recent: Recent,
}

impl IsTerminal for Pipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Pipe {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            entry: self.entry.clone(),
            stream: self.stream,
            recent: self.recent.clone(),
            buf: Vec::new(),
            cut: false,
        })
    }
}

struct LineWriter {
    entry: Arc<str>,
    stream: &'static str,
    recent: Recent,
    /// The line being written, at most [`MAX_LINE`] bytes.
    buf: Vec<u8>,
    /// Whether the line being written was longer than [`MAX_LINE`].
    cut: bool,
}

impl LineWriter {
    fn emit(&mut self) {
        let line = std::mem::take(&mut self.buf);
        let cut = std::mem::replace(&mut self.cut, false);
        if !self.recent.admit(line.len()) {
            return;
        }
        let mut text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
        if cut {
            text.push('…');
        }
        tracing::info!(target: "cdp::plugin", plugin = &*self.entry, stream = self.stream, "{text}");
        self.recent.push(self.stream, text);
    }

    /// Splits `data` into lines; keeps at most [`MAX_LINE`] bytes of each,
    /// so a guest writing one endless line costs the host nothing more.
    fn write_lines(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (piece, newline) = match data.iter().position(|b| *b == b'\n') {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            let room = MAX_LINE - self.buf.len();
            self.buf.extend_from_slice(&piece[..piece.len().min(room)]);
            self.cut |= piece.len() > room;
            data = &data[piece.len() + usize::from(newline)..];
            if newline {
                self.emit();
            }
        }
    }
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        self.write_lines(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.buf.is_empty() {
            self.emit();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn memory_is_capped_across_memories() {
        let mut l = Limiter { cap: 10 << 16, used: 0, refused: None };
        assert!(l.memory_growing(0, 6 << 16, None).unwrap());
        assert!(l.memory_growing(0, 4 << 16, None).unwrap());
        assert!(!l.memory_growing(4 << 16, 5 << 16, None).unwrap());
        assert_eq!(l.refused, Some(11 << 16));
        assert_eq!(l.used, 10 << 16);
    }

    #[test]
    fn sha256_hashes_each_value_and_refuses_bad_bounds() {
        use host::Host as _;
        let mut state = State::new("t", &Grants::default()).unwrap();
        let digests = state.sha256(b"abc".to_vec(), vec![0, 3]).unwrap();
        assert_eq!(
            hex::encode(&digests),
            concat!(
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            )
        );
        assert!(state.sha256(Vec::new(), Vec::new()).unwrap().is_empty());
        let past = state.sha256(b"abc".to_vec(), vec![4]).unwrap_err().to_string();
        assert!(past.contains("value 0 ends at byte 4"), "{past}");
        let back = state.sha256(b"abc".to_vec(), vec![2, 1]).unwrap_err().to_string();
        assert!(back.contains("value 1 ends at byte 1, before its start (2)"), "{back}");
        let big = state.sha256(vec![0; MAX_HASH_INPUT + 1], vec![1]).unwrap_err().to_string();
        assert!(big.contains("over the limit"), "{big}");
        assert!(state.sha256(Vec::new(), vec![0; MAX_HASH_VALUES + 1]).is_err());
    }

    #[test]
    fn output_past_the_budget_is_dropped_counted_and_renewed_per_call() {
        let recent = Recent::default();
        let mut w =
            LineWriter { entry: "t".into(), stream: "stdout", recent: recent.clone(), buf: Vec::new(), cut: false };
        let flood = "line\n".repeat(MAX_LOG_LINES as usize + 10);
        w.write_lines(flood.as_bytes());
        let mut long = vec![b'x'; 3 * MAX_LINE];
        long.push(b'\n');
        w.write_lines(&long);
        assert_eq!(recent.end_call(), Dropped { lines: 11, bytes: 10 * 4 + MAX_LINE as u64 });
        assert_eq!(recent.dropped_total(), 11);
        w.write_lines(&long);
        let last = recent.take().pop().unwrap();
        assert_eq!(last.message.len(), MAX_LINE + '…'.len_utf8(), "an over-long line is cut, not split");
        assert_eq!(recent.end_call(), Dropped::default());
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_LINE);
        let c = cut(s);
        assert!(c.len() <= MAX_LINE + '…'.len_utf8());
        assert!(c.ends_with('…'));
    }
}
