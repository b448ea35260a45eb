//! The connector host: every source and destination plugin is a WebAssembly
//! component (`wit/connector.wit`, `cdp:connector@0.1.0`) run here, in a
//! sandbox, on wasmtime. Sources sit at the start of the data flow (their
//! records go to ingest), destinations at its end (activation).
//!
//! * [`Host`] owns the one `Engine` (epoch interruption, ticked by a thread
//!   of its own), the one `Linker` (WASI p2 with no ambient grants, plus the
//!   `host` and `http` imports) and the on-disk cache of compiled code, keyed
//!   by the component's sha256 and the engine's compatibility hash.
//! * [`Host::load`] checks a file against its pin and yields a [`Plugin`]:
//!   compiled (or loaded from the cache) and pre-instantiated, so starting
//!   an instance costs microseconds.
//! * [`Plugin::source`] / [`Plugin::destination`] start an instance with the
//!   [`Grants`] of one manifest entry: its own store, memory cap, per-call
//!   deadline, mounts and `allow_hosts`. A trap, a deadline or the memory
//!   cap fails that instance's call with a [`PluginError`]; the process and
//!   every other instance go on.

pub mod bindings;
pub mod conformance;
mod connector;
pub mod entries;
mod guard;
pub mod http;
mod sandbox;

pub use connector::{
    DestinationInstance, MAX_CHECKPOINT, MAX_ERROR_MESSAGE, MAX_RECORDS_BYTES, ReadEvent, SourceInstance, WriteAck,
};
pub use sandbox::{DEFAULT_MEMORY, DEFAULT_TIMEOUT, Grants, LogLine, MAX_HANDLES, MAX_LOG_BYTES, MAX_LOG_LINES, Mount};

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use bindings::{destination, source};
use sandbox::State;

/// The connector protocol this host speaks.
pub const PROTOCOL: &str = "0.1.0";
/// How often the epoch advances; deadlines are checked at this granularity.
pub const TICK: Duration = Duration::from_millis(10);
/// Export names of the two worlds, without the version.
const SOURCE_EXPORT: &str = "cdp:connector/source@";
const DESTINATION_EXPORT: &str = "cdp:connector/destination@";
/// Capabilities a plugin may declare (`spec().capabilities`).
pub const CAPABILITIES: &[(&str, &str)] = &[
    ("http", "makes outbound HTTP requests (needs allow_hosts)"),
    ("mount", "reads or writes files in a mount"),
    ("incremental", "resumes from checkpoints instead of re-reading everything"),
    ("streaming", "runs continuously; an empty read means idle, not done"),
    ("delete", "erases people at the destination (privacy requests)"),
];

/// Plugin instances alive at once (every running sync holds one).
pub const MAX_INSTANCES: u32 = 256;
/// Largest linear memory of any plugin, whatever its `memory` says.
pub const MAX_MEMORY: usize = 4 << 30;

/// The pooling allocator: slots for instances, memories, tables and stacks
/// are reserved once, so starting an instance reuses warm memory instead of
/// mapping it anew.
fn pool() -> wasmtime::PoolingAllocationConfig {
    let mut p = wasmtime::PoolingAllocationConfig::default();
    p.total_component_instances(MAX_INSTANCES)
        .total_core_instances(MAX_INSTANCES * 16)
        .total_memories(MAX_INSTANCES * 2)
        .total_tables(MAX_INSTANCES * 8)
        .total_stacks(MAX_INSTANCES)
        .max_core_instances_per_component(64)
        .max_memories_per_component(8)
        .max_tables_per_component(32)
        .max_memory_size(MAX_MEMORY);
    p
}

/// Which world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Source,
    Destination,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Source => "source",
            Kind::Destination => "destination",
        })
    }
}

/// The class of a connector error; decides retries (see the WIT contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    Config,
    Auth,
    Permission,
    RateLimited,
    Transient,
    Data,
    Unsupported,
    Internal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Config => "config",
            ErrorClass::Auth => "auth",
            ErrorClass::Permission => "permission",
            ErrorClass::RateLimited => "rate-limited",
            ErrorClass::Transient => "transient",
            ErrorClass::Data => "data",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::Internal => "internal",
        }
    }
}

/// An error a plugin reported (as opposed to one the host saw: a trap).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{} error `{code}`: {message}", class.as_str())]
pub struct ConnectorError {
    pub class: ErrorClass,
    pub retryable: bool,
    pub retry_after_ms: Option<u64>,
    pub code: String,
    pub message: String,
}

impl From<bindings::types::ConnectorError> for ConnectorError {
    fn from(e: bindings::types::ConnectorError) -> Self {
        use bindings::types::ErrorClass as W;
        let class = match e.class {
            W::Config => ErrorClass::Config,
            W::Auth => ErrorClass::Auth,
            W::Permission => ErrorClass::Permission,
            W::RateLimited => ErrorClass::RateLimited,
            W::Transient => ErrorClass::Transient,
            W::Data => ErrorClass::Data,
            W::Unsupported => ErrorClass::Unsupported,
            W::Internal => ErrorClass::Internal,
        };
        ConnectorError {
            class,
            retryable: e.retryable,
            retry_after_ms: e.retry_after_ms,
            code: e.code,
            message: e.message,
        }
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Spec {
    pub name: String,
    pub version: String,
    pub protocol: String,
    pub description: String,
    /// JSON Schema of the plugin's `config`.
    pub config_schema: serde_json::Value,
    pub capabilities: Vec<String>,
}

/// Everything that can go wrong loading or running a plugin. None of these
/// take the host down; each fails one plugin entry's work.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("plugin {path} has sha256 {actual}, but the manifest pins {expected}")]
    Digest { path: PathBuf, expected: String, actual: String },
    #[error("{path} is not a WebAssembly component cdp can run: {message}")]
    Compile { path: PathBuf, message: String },
    #[error("{path} does not implement a cdp connector world: {message}")]
    World { path: PathBuf, message: String },
    #[error("plugin `{entry}` is a {found}, but it is used as a {wanted}")]
    WrongKind { entry: String, found: Kind, wanted: Kind },
    #[error("invalid grant: {message}")]
    Grant { message: String },
    #[error("plugin `{entry}`: cannot mount {}: {message}", host.display())]
    Mount { entry: String, host: PathBuf, message: String },
    #[error("plugin `{entry}` could not start: {message}")]
    Instantiate { entry: String, message: String },
    #[error("plugin `{entry}`: `{call}` did not return within its deadline of {}", fmt_duration(*timeout))]
    Deadline { entry: String, call: &'static str, timeout: Duration },
    #[error("plugin `{entry}`: `{call}` needed {requested} bytes of memory; the cap is {cap} bytes")]
    Memory { entry: String, call: &'static str, cap: u64, requested: u64 },
    #[error("plugin `{entry}`: `{call}` went over a host limit: {message}")]
    Limit { entry: String, call: &'static str, message: String },
    #[error("plugin `{entry}` crashed in `{call}`: {message}")]
    Trap { entry: String, call: &'static str, message: String },
    #[error("plugin `{entry}` broke the connector contract in `{call}`: {message}")]
    Protocol { entry: String, call: &'static str, message: String },
    #[error("plugin `{entry}`: `{call}` failed: {error}")]
    Connector { entry: String, call: &'static str, error: ConnectorError },
    #[error("plugin `{entry}` crashed earlier and cannot be called again; start a new instance")]
    Poisoned { entry: String },
    #[error("plugin `{entry}`: `{call}` needs an open {what}; call `open` first")]
    NotOpen { entry: String, call: &'static str, what: &'static str },
    #[error("cannot set up the plugin host: {message}")]
    Engine { message: String },
}

impl PluginError {
    /// The connector error, when the plugin itself reported one.
    pub fn connector(&self) -> Option<&ConnectorError> {
        match self {
            PluginError::Connector { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            PluginError::Connector { error, .. } => error.retryable,
            PluginError::Deadline { .. } => true,
            _ => false,
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// How a plugin's code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Compiled from the component now (and written to the cache, if any).
    Compiled,
    /// Loaded from the cache of compiled code.
    Cached,
}

/// The process-wide plugin host.
pub struct Host {
    engine: Engine,
    linker: Arc<Linker<State>>,
    cache: Option<PathBuf>,
    stop: Arc<AtomicBool>,
}

impl Host {
    /// A host caching compiled code in `cache` (none: compile every load).
    pub fn new(cache: Option<PathBuf>) -> Result<Host, PluginError> {
        let engine_err = |e: wasmtime::Error| PluginError::Engine { message: format!("{e:#}") };
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool()));
        // `CDP_PLUGIN_PROFILER=perfmap` writes /tmp/perf-PID.map, naming guest
        // functions for `perf`, so a plugin can be profiled inside the host.
        match std::env::var("CDP_PLUGIN_PROFILER").as_deref() {
            Ok("perfmap") => {
                config.profiler(wasmtime::ProfilingStrategy::PerfMap);
            }
            Ok(other) => tracing::warn!("CDP_PLUGIN_PROFILER={other:?} is not `perfmap`; ignored"),
            Err(_) => {}
        }
        // The pool reserves address space up front; where that is refused
        // (a low `ulimit -v`), instances are allocated on demand instead.
        let engine = match Engine::new(&config) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("plugin instance pool unavailable, allocating on demand: {e:#}");
                config.allocation_strategy(wasmtime::InstanceAllocationStrategy::OnDemand);
                Engine::new(&config).map_err(engine_err)?
            }
        };
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_err)?;
        guard::add_to_linker(&mut linker).map_err(engine_err)?;
        source::SourceConnector::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(engine_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ticker, flag) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("cdp-plugin-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    ticker.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Engine { message: format!("cannot start the epoch ticker: {e}") })?;
        if let Some(dir) = &cache {
            create_private_dir(dir)
                .map_err(|e| PluginError::Engine { message: format!("cannot create cache {}: {e}", dir.display()) })?;
        }
        Ok(Host { engine, linker: Arc::new(linker), cache, stop })
    }

    /// A host with the default cache directory: `$CDP_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/cdp/plugins`, else `~/.cache/cdp/plugins`.
    pub fn with_default_cache() -> Result<Host, PluginError> {
        Host::new(default_cache_dir())
    }

    /// Loads a component: reads it, checks it against `pin` (hex sha256),
    /// compiles it or loads its compiled code from the cache, and
    /// pre-instantiates it.
    pub fn load(&self, path: &Path, pin: Option<&str>) -> Result<Plugin, PluginError> {
        let started = Instant::now();
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read { path: path.to_owned(), source })?;
        let sha256 = sha256_hex(&bytes);
        if let Some(expected) = pin
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(PluginError::Digest { path: path.to_owned(), expected: expected.to_owned(), actual: sha256 });
        }
        let (component, origin) = self.compile(path, &bytes, &sha256)?;
        let (kind, protocol) = world_of(&self.engine, &component)
            .map_err(|message| PluginError::World { path: path.to_owned(), message })?;
        if !protocol_compatible(&protocol) {
            return Err(PluginError::World {
                path: path.to_owned(),
                message: format!("it speaks cdp:connector@{protocol}; this cdp speaks {PROTOCOL}"),
            });
        }
        let world_err = |e: wasmtime::Error| PluginError::World { path: path.to_owned(), message: format!("{e:#}") };
        let pre = self.linker.instantiate_pre(&component).map_err(world_err)?;
        let pre = match kind {
            Kind::Source => Pre::Source(source::SourceConnectorPre::new(pre).map_err(world_err)?),
            Kind::Destination => Pre::Destination(destination::DestinationConnectorPre::new(pre).map_err(world_err)?),
        };
        let imports = component.component_type().imports(&self.engine).map(|(n, _)| n.to_owned()).collect();
        tracing::debug!(path = %path.display(), %sha256, ?origin, ms = started.elapsed().as_millis() as u64, "plugin loaded");
        Ok(Plugin {
            inner: Arc::new(Loaded {
                path: path.to_owned(),
                sha256,
                size: bytes.len(),
                kind,
                protocol,
                origin,
                load_time: started.elapsed(),
                imports,
                label: label_of(path),
                pre,
            }),
        })
    }

    fn compile(&self, path: &Path, bytes: &[u8], sha256: &str) -> Result<(Component, Origin), PluginError> {
        let compile_err = |e: wasmtime::Error| PluginError::Compile {
            path: path.to_owned(),
            message: format!("{e:#}; build it with `cargo build --release --target wasm32-wasip2`"),
        };
        if !bytes.starts_with(b"\0asm") {
            return Err(PluginError::Compile { path: path.to_owned(), message: "no WebAssembly magic number".into() });
        }
        let Some(dir) = &self.cache else {
            return Ok((Component::new(&self.engine, bytes).map_err(compile_err)?, Origin::Compiled));
        };
        let mut h = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let file = dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
        if file.exists() {
            // SAFETY: the file was written by `precompile_component` of an
            // engine with the same compatibility hash, into the host's own
            // cache directory, under the digest of the component it came from.
            match unsafe { Component::deserialize_file(&self.engine, &file) } {
                Ok(c) => return Ok((c, Origin::Cached)),
                Err(e) => tracing::warn!(file = %file.display(), "recompiling: cached code unusable: {e:#}"),
            }
        }
        let code = self.engine.precompile_component(bytes).map_err(compile_err)?;
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, &code).and_then(|()| std::fs::rename(&tmp, &file)) {
            tracing::warn!(file = %file.display(), "cannot cache compiled plugin: {e}");
            let _ = std::fs::remove_file(&tmp);
        }
        // SAFETY: `code` was produced just now by this engine.
        let c = unsafe { Component::deserialize(&self.engine, &code) }.map_err(compile_err)?;
        Ok((c, Origin::Compiled))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// `$CDP_CACHE_DIR`, else `$XDG_CACHE_HOME/cdp/plugins`, else `~/.cache/cdp/plugins`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("CDP_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("cdp/plugins")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/cdp/plugins")))
}

/// The world a component exports and its protocol version.
fn world_of(engine: &Engine, c: &Component) -> Result<(Kind, String), String> {
    let ty = c.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
    for name in &exports {
        if let Some(v) = name.strip_prefix(SOURCE_EXPORT) {
            return Ok((Kind::Source, v.to_owned()));
        }
        if let Some(v) = name.strip_prefix(DESTINATION_EXPORT) {
            return Ok((Kind::Destination, v.to_owned()));
        }
    }
    Err(format!(
        "it exports {}; a connector exports `{SOURCE_EXPORT}{PROTOCOL}` or `{DESTINATION_EXPORT}{PROTOCOL}`",
        if exports.is_empty() { "nothing".to_owned() } else { exports.join(", ") }
    ))
}

/// Semver compatibility with [`PROTOCOL`]: same major, and for 0.x the same minor.
fn protocol_compatible(v: &str) -> bool {
    let parts = |s: &str| s.split('.').map(|p| p.parse::<u64>().ok()).collect::<Option<Vec<_>>>();
    match (parts(v), parts(PROTOCOL)) {
        (Some(a), Some(b)) if a.len() == 3 && b.len() == 3 => {
            if b[0] == 0 {
                a[0] == 0 && a[1] == b[1]
            } else {
                a[0] == b[0]
            }
        }
        _ => false,
    }
}

enum Pre {
    Source(source::SourceConnectorPre<State>),
    Destination(destination::DestinationConnectorPre<State>),
}

struct Loaded {
    path: PathBuf,
    sha256: String,
    size: usize,
    kind: Kind,
    protocol: String,
    origin: Origin,
    load_time: Duration,
    imports: Vec<String>,
    label: Arc<str>,
    pre: Pre,
}

/// A loaded, pre-instantiated plugin; cheap to clone and share.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Loaded>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin").field("path", &self.inner.path).field("kind", &self.inner.kind).finish()
    }
}

impl Plugin {
    pub fn kind(&self) -> Kind {
        self.inner.kind
    }
    pub fn sha256(&self) -> &str {
        &self.inner.sha256
    }
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    /// Size of the component file in bytes.
    pub fn size(&self) -> usize {
        self.inner.size
    }
    /// The `cdp:connector` version of its export.
    pub fn protocol(&self) -> &str {
        &self.inner.protocol
    }
    pub fn origin(&self) -> Origin {
        self.inner.origin
    }
    /// How long [`Host::load`] took.
    pub fn load_time(&self) -> Duration {
        self.inner.load_time
    }
    /// How metrics name the plugin: its file's stem (`source_csv`).
    pub fn label(&self) -> &str {
        &self.inner.label
    }
    /// The interfaces the component imports (WASI, `cdp:connector/…`).
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }

    /// Starts a source instance for manifest entry `entry` with `grants`.
    pub async fn source(&self, entry: &str, grants: &Grants) -> Result<SourceInstance, PluginError> {
        let Pre::Source(pre) = &self.inner.pre else {
            return Err(PluginError::WrongKind { entry: entry.into(), found: self.kind(), wanted: Kind::Source });
        };
        let mut store = connector::new_store(pre.engine(), entry, grants)?;
        let bindings = instantiate(self.label(), entry, grants, pre.instantiate_async(&mut store)).await?;
        Ok(SourceInstance::new(store, bindings, grants.timeout, self.inner.label.clone()))
    }

    /// Starts a destination instance for manifest entry `entry` with `grants`.
    pub async fn destination(&self, entry: &str, grants: &Grants) -> Result<DestinationInstance, PluginError> {
        let Pre::Destination(pre) = &self.inner.pre else {
            return Err(PluginError::WrongKind { entry: entry.into(), found: self.kind(), wanted: Kind::Destination });
        };
        let mut store = connector::new_store(pre.engine(), entry, grants)?;
        let bindings = instantiate(self.label(), entry, grants, pre.instantiate_async(&mut store)).await?;
        Ok(DestinationInstance::new(store, bindings, grants.timeout, self.inner.label.clone()))
    }

    /// The plugin's spec, from a throwaway instance with no grants and the
    /// default limits.
    pub async fn spec(&self, entry: &str) -> Result<Spec, PluginError> {
        self.spec_within(entry, DEFAULT_MEMORY, DEFAULT_TIMEOUT).await
    }

    /// The plugin's spec, from a throwaway instance with no grants, within
    /// `memory` bytes and one call deadline of `timeout`.
    pub async fn spec_within(&self, entry: &str, memory: u64, timeout: Duration) -> Result<Spec, PluginError> {
        let grants = Grants { memory, timeout, ..Grants::default() };
        match self.kind() {
            Kind::Source => self.source(entry, &grants).await?.spec().await,
            Kind::Destination => self.destination(entry, &grants).await?.spec().await,
        }
    }

    /// `check(config)` on a throwaway instance with `grants`.
    pub async fn check(&self, entry: &str, grants: &Grants, config: &serde_json::Value) -> Result<(), PluginError> {
        match self.kind() {
            Kind::Source => self.source(entry, grants).await?.check(config).await,
            Kind::Destination => self.destination(entry, grants).await?.check(config).await,
        }
    }
}

/// Instantiation within the call deadline (a guest's start code runs in it).
async fn instantiate<T>(
    plugin: &str,
    entry: &str,
    grants: &Grants,
    start: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> Result<T, PluginError> {
    let r = match tokio::time::timeout(grants.timeout + 2 * TICK, start).await {
        Ok(r) => r.map_err(|e| PluginError::Instantiate { entry: entry.into(), message: format!("{e:#}") }),
        Err(_) => Err(PluginError::Deadline { entry: entry.into(), call: "instantiate", timeout: grants.timeout }),
    };
    observe_call(plugin, "instantiate", r.as_ref().err());
    r
}

/// A plugin's metrics label: its file's stem, which the operator chose
/// (never a record's data), the same for every entry that uses the file.
fn label_of(path: &Path) -> Arc<str> {
    Arc::from(path.file_stem().map_or_else(|| "plugin".into(), |s| s.to_string_lossy()).as_ref())
}

/// Counts one call into a guest (`instantiate` or an export) of `plugin`,
/// and the deadline or trap that ended it. Connector errors the plugin
/// returned are answers, not failed calls.
fn observe_call(plugin: &str, call: &'static str, error: Option<&PluginError>) {
    use crate::metrics::{PLUGIN_CALLS, PLUGIN_TIMEOUTS, PLUGIN_TRAPS};
    metrics::counter!(PLUGIN_CALLS, "plugin" => plugin.to_owned(), "call" => call).increment(1);
    match error {
        Some(PluginError::Deadline { .. }) => {
            metrics::counter!(PLUGIN_TIMEOUTS, "plugin" => plugin.to_owned()).increment(1)
        }
        // What `Core::fail` makes of a call wasmtime stopped: the guest trapped,
        // on its own or at the memory cap or a host limit.
        Some(PluginError::Trap { .. } | PluginError::Memory { .. } | PluginError::Limit { .. }) => {
            metrics::counter!(PLUGIN_TRAPS, "plugin" => plugin.to_owned()).increment(1)
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_versions_follow_semver() {
        assert!(protocol_compatible("0.1.0"));
        assert!(protocol_compatible("0.1.7"));
        assert!(!protocol_compatible("0.2.0"));
        assert!(!protocol_compatible("1.1.0"));
        assert!(!protocol_compatible("0.1"));
        assert!(!protocol_compatible("x"));
    }

    #[test]
    fn capabilities_are_unique() {
        let mut names: Vec<_> = CAPABILITIES.iter().map(|c| c.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CAPABILITIES.len());
    }

    #[test]
    fn calls_are_counted_with_their_traps_and_deadlines_by_file_stem() {
        let plugin = label_of(Path::new("plugins/dist/source_csv.wasm"));
        assert_eq!(&*plugin, "source_csv");
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let entry = || "loyalty".to_owned();
        metrics::with_local_recorder(&recorder, || {
            observe_call(&plugin, "next", None);
            observe_call(
                &plugin,
                "next",
                Some(&PluginError::Trap { entry: entry(), call: "next", message: "x".into() }),
            );
            let deadline = PluginError::Deadline { entry: entry(), call: "open", timeout: Duration::from_secs(1) };
            observe_call(&plugin, "open", Some(&deadline));
            let refused = ConnectorError {
                class: ErrorClass::Auth,
                retryable: false,
                retry_after_ms: None,
                code: "401".into(),
                message: "no".into(),
            };
            observe_call(
                &plugin,
                "open",
                Some(&PluginError::Connector { entry: entry(), call: "open", error: refused }),
            );
        });
        let text = handle.render();
        for line in [
            r#"cdp_plugin_calls_total{plugin="source_csv",call="next"} 2"#,
            r#"cdp_plugin_calls_total{plugin="source_csv",call="open"} 2"#,
            r#"cdp_plugin_traps_total{plugin="source_csv"} 1"#,
            r#"cdp_plugin_timeouts_total{plugin="source_csv"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}
