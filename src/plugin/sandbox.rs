//! What one plugin instance may touch: the store data behind every call. Deny
//! by default, in one place: no environment, no arguments, no sockets, no
//! filesystem beyond the entry's `mount`s, standard output and error captured
//! into logs, a memory cap across all of the instance's memories, and a
//! per-call deadline checked on every epoch tick.

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
/// Longest line of plugin output kept; longer output is cut into pieces.
const MAX_LINE: usize = 8 << 10;

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

/// Recent output of an instance, shared with its stdout/stderr pipes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recent(Arc<Mutex<VecDeque<LogLine>>>);

impl Recent {
    fn push(&self, level: &'static str, message: String) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == RECENT_LINES {
            q.pop_front();
        }
        q.push_back(LogLine { level, message });
    }

    /// The last lines of standard error (a Rust panic's location and
    /// message), without the backtrace note.
    pub(crate) fn stderr_tail(&self) -> Option<String> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut tail: Vec<&str> = q
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
        self.0.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
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
        Ok(State {
            wasi: b.build(),
            table: ResourceTable::new(),
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
        })
    }
}

struct LineWriter {
    entry: Arc<str>,
    stream: &'static str,
    recent: Recent,
    buf: Vec<u8>,
}

impl LineWriter {
    fn emit(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).trim_end_matches('\r').to_owned();
        tracing::info!(target: "cdp::plugin", plugin = &*self.entry, stream = self.stream, "{text}");
        self.recent.push(self.stream, text);
    }

    fn drain_lines(&mut self) {
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            self.emit(&line[..line.len() - 1]);
        }
        if self.buf.len() > MAX_LINE {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
    }
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        self.buf.extend_from_slice(data);
        self.drain_lines();
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
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
    fn long_lines_are_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_LINE);
        let c = cut(s);
        assert!(c.len() <= MAX_LINE + '…'.len_utf8());
        assert!(c.ends_with('…'));
    }
}
