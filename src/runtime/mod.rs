//! The runtime: `cdp run` runs what the manifest declares. It sits over
//! everything else in the data flow: it loads and checks the manifest
//! ([`snapshot`]), runs each plugin source on its cron schedule or
//! continuously ([`crate::schedule`], [`sync`]) through the ingest pipeline into
//! the store, watches the manifest and the plugins it pins, and applies a
//! changed manifest without a restart ([`supervisor`]).
//!
//! One supervisor owns every task: a root cancellation token with a child
//! per sync, tasks tracked and drained with a deadline on SIGINT/SIGTERM.
//! A sync never runs twice at once, across processes too: each run holds
//! the sync's lease in the store, and every commit is fenced by it.

pub mod activation;
pub mod retention;
pub mod snapshot;
pub mod status;
pub mod supervisor;
pub mod sync;

pub use snapshot::{LoadError, Snapshot};
pub use supervisor::{Options, run};

/// This process as lease holders and run rows name it: `cdp@HOST:PID`.
pub fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("cdp@{host}:{}", std::process::id())
}
