//! # test-hostile
//!
//! A cdp destination connector that misbehaves on request. The host's
//! integration tests load it to prove that the sandbox holds: deadlines stop
//! a spinning guest, the memory cap stops a growing one, panics and traps
//! come back as errors, HTTP and the filesystem are only reachable as the
//! manifest allows, and guest output is captured. It is not shipped.
//!
//! ```yaml
//! destinations:
//!   hostile:
//!     plugin: hostile
//!     config: { behave: http, url: "https://blocked.example/" }
//! ```
//!
//! `check` accepts every config that parses (after sleeping, for
//! `check_sleep`) and `open` always succeeds;
//! `write` does what `behave` says (see [`Behave`]). `flush` is a no-op and
//! `delete` answers `unsupported`.
//!
//! The SDK only calls `write` when the batch has at least one record that
//! decodes, so a test batch needs one valid line, e.g.
//! `{"key": "k1", "op": "upsert", "profile_id": "p1"}`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cdp_plugin_sdk::http::{self, Request};
use cdp_plugin_sdk::{
    ConnectorError, Destination, DestinationRecord, DestinationWriter, Spec, WriteAck, capability, log,
};
use serde::Deserialize;
use serde_json::json;

/// What `write` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behave {
    /// Accept every record.
    Ok,
    /// Loop forever without yielding.
    Spin,
    /// Allocate and keep 1 MiB chunks forever.
    Alloc,
    /// `panic!`.
    Panic,
    /// Execute the wasm `unreachable` instruction (a panic natively).
    Trap,
    /// `GET` `url` through the host; the host's error is returned as is.
    Http,
    /// Read the file at `path`.
    Read,
    /// Write `x` to the file at `path`.
    WriteFile,
    /// Print `lines` lines to stdout and one to stderr.
    Stdout,
    /// Compute for about 200 ms, then accept every record.
    SlowOk,
    /// Sleep `secs` seconds (default 20) in the host: a blocking WASI call.
    Sleep,
    /// Open the file at `path` `count` times (default 100,000), keeping
    /// every handle.
    OpenFiles,
    /// Fail with a connector error whose message is `size` bytes (default 64 MiB).
    HugeError,
    /// Log `lines` lines (default 200,000) through the log import and as
    /// many to stderr, then accept every record.
    LogFlood,
    /// Recurse without end.
    StackOverflow,
    /// `check` sleeps `secs` seconds (default 20); `write` accepts every record.
    CheckSleep,
}

impl Behave {
    /// Every mode, as the config spells it.
    pub const NAMES: [&'static str; 16] = [
        "ok",
        "spin",
        "alloc",
        "panic",
        "trap",
        "http",
        "read",
        "write_file",
        "stdout",
        "slow_ok",
        "sleep",
        "open_files",
        "huge_error",
        "log_flood",
        "stack_overflow",
        "check_sleep",
    ];
}

/// The `config:` of the hostile destination.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What `write` does.
    pub behave: Behave,
    /// For `http`: the URL to fetch.
    #[serde(default)]
    pub url: Option<String>,
    /// For `read` and `write_file`: the guest path.
    #[serde(default)]
    pub path: Option<String>,
    /// For `stdout` and `log_flood`: how many lines to print.
    #[serde(default)]
    pub lines: Option<u32>,
    /// For `sleep`: seconds.
    #[serde(default)]
    pub secs: Option<u64>,
    /// For `open_files`: how many times to open `path`.
    #[serde(default)]
    pub count: Option<u32>,
    /// For `huge_error`: bytes of the error message.
    #[serde(default)]
    pub size: Option<u32>,
}

/// How long `slow_ok` computes.
pub const SLOW_OK_FOR: Duration = Duration::from_millis(200);

/// The size of one `alloc` chunk.
pub const ALLOC_CHUNK: usize = 1 << 20;

/// The destination.
pub struct Hostile;

impl Destination for Hostile {
    type Config = Config;
    type Writer = HostileWriter;

    fn spec() -> Spec {
        Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
            .description("Test guest that misbehaves on request (spins, allocates, panics, traps, probes the sandbox)")
            .config_schema(json!({
                "type": "object",
                "required": ["behave"],
                "additionalProperties": false,
                "properties": {
                    "behave": {"type": "string", "enum": Behave::NAMES},
                    "url": {"type": "string", "description": "behave: http; the URL to GET"},
                    "path": {"type": "string", "description": "behave: read, write_file; the guest path"},
                    "lines": {
                        "type": "integer", "minimum": 0, "maximum": u32::MAX,
                        "description": "behave: stdout (default 3), log_flood (default 200000); lines printed"
                    },
                    "secs": {
                        "type": "integer", "minimum": 0, "default": 20,
                        "description": "behave: sleep, check_sleep; seconds to sleep"
                    },
                    "count": {
                        "type": "integer", "minimum": 0, "maximum": u32::MAX, "default": 100_000,
                        "description": "behave: open_files; handles to open"
                    },
                    "size": {
                        "type": "integer", "minimum": 0, "maximum": u32::MAX, "default": 64 << 20,
                        "description": "behave: huge_error; bytes of the error message"
                    }
                }
            }))
            .capability(capability::HTTP)
    }

    fn check(cfg: &Config) -> Result<(), ConnectorError> {
        if cfg.behave == Behave::CheckSleep {
            std::thread::sleep(Duration::from_secs(cfg.secs.unwrap_or(20)));
        }
        Ok(())
    }

    fn open(cfg: Config) -> Result<HostileWriter, ConnectorError> {
        Ok(HostileWriter { cfg })
    }
}

/// An open writer; every `write` behaves as configured.
pub struct HostileWriter {
    cfg: Config,
}

impl HostileWriter {
    fn path(&self) -> Result<&str, ConnectorError> {
        self.cfg
            .path
            .as_deref()
            .ok_or_else(|| ConnectorError::config("missing_path", "config.path: required for this behave"))
    }
}

impl DestinationWriter for HostileWriter {
    fn write(&mut self, batch: Vec<DestinationRecord>) -> Result<WriteAck, ConnectorError> {
        let all = WriteAck::all(batch.len());
        match self.cfg.behave {
            Behave::Ok | Behave::CheckSleep => Ok(all),
            Behave::Spin => spin(),
            Behave::Alloc => alloc(),
            Behave::Panic => panic!("hostile guest panics on purpose"),
            Behave::Trap => trap(),
            Behave::Http => {
                let url =
                    self.cfg.url.as_deref().ok_or_else(|| {
                        ConnectorError::config("missing_url", "config.url: required for behave: http")
                    })?;
                let resp = http::send(Request::get(url))?;
                log::info!("GET {url}: HTTP {}", resp.status);
                Ok(all)
            }
            Behave::Read => {
                let path = self.path()?;
                let bytes = std::fs::read(path)
                    .map_err(|e| ConnectorError::permission("read_failed", format!("{path}: {e}")))?;
                log::info!("read {} bytes from {path}", bytes.len());
                Ok(all)
            }
            Behave::WriteFile => {
                let path = self.path()?;
                std::fs::write(path, b"x")
                    .map_err(|e| ConnectorError::permission("write_failed", format!("{path}: {e}")))?;
                log::info!("wrote 1 byte to {path}");
                Ok(all)
            }
            Behave::Stdout => {
                for n in 1..=self.cfg.lines.unwrap_or(3) {
                    println!("hostile line {n}");
                }
                eprintln!("hostile stderr");
                Ok(all)
            }
            Behave::SlowOk => {
                busy_for(SLOW_OK_FOR);
                Ok(all)
            }
            Behave::Sleep => {
                std::thread::sleep(Duration::from_secs(self.cfg.secs.unwrap_or(20)));
                Ok(all)
            }
            Behave::OpenFiles => {
                let path = self.path()?;
                let mut kept = Vec::new();
                for _ in 0..self.cfg.count.unwrap_or(100_000) {
                    let f = std::fs::File::open(path)
                        .map_err(|e| ConnectorError::permission("open_failed", format!("{path}: {e}")))?;
                    kept.push(f);
                }
                log::info!("holding {} handles to {path}", kept.len());
                Ok(all)
            }
            Behave::HugeError => {
                let size = self.cfg.size.unwrap_or(64 << 20) as usize;
                Err(ConnectorError::data("huge_error", "e".repeat(size)))
            }
            Behave::LogFlood => {
                for n in 0..self.cfg.lines.unwrap_or(200_000) {
                    log::info!("hostile log line {n}");
                    eprintln!("hostile stderr line {n}");
                }
                Ok(all)
            }
            Behave::StackOverflow => {
                black_box(recurse(black_box(1)));
                Ok(all)
            }
        }
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        Ok(())
    }
}

/// Recurses until the stack runs out; the frame's array and `black_box`
/// keep the optimiser from turning it into a loop.
fn recurse(n: u64) -> u64 {
    let frame = black_box([n; 64]);
    if frame[0] == u64::MAX {
        return 0; // never: `n` counts up from 1
    }
    frame[0].wrapping_add(recurse(black_box(n + 1)))
}

/// Loops forever; `black_box` keeps the optimiser from removing the loop.
fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Allocates 1 MiB chunks forever and keeps every one, touching each page so
/// the memory is really used.
fn alloc() -> ! {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; ALLOC_CHUNK];
        for i in (0..chunk.len()).step_by(4096) {
            chunk[i] = 1;
        }
        kept.push(black_box(chunk));
        black_box(&kept);
    }
}

/// The wasm `unreachable` instruction: a trap, not a panic.
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("hostile guest traps on purpose (a panic outside wasm32)");
}

/// Computes until `duration` has passed on the monotonic clock.
fn busy_for(duration: Duration) {
    let start = Instant::now();
    let mut x: u64 = 1;
    while start.elapsed() < duration {
        for _ in 0..10_000 {
            x = black_box(
                x.wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407),
            );
        }
    }
    black_box(x);
}

cdp_plugin_sdk::export_destination!(Hostile);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests;
