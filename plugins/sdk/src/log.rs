//! Logging and metrics through the host, which routes them into its tracing
//! and metrics.
//!
//! ```
//! use cdp_plugin_sdk::log;
//!
//! let line = 42;
//! log::warn!("line {line}: expected 5 columns, found 4; row skipped");
//! log::metric("rows_skipped_total", 1.0);
//! ```
//!
//! Outside a wasm32 build (native unit tests) messages go to standard error
//! and are kept per thread for [`crate::testing::take_logs`].

/// Severity of a log message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal progress.
    Info,
    /// Something was skipped or looks wrong; the run goes on.
    Warn,
    /// Something failed.
    Error,
}

impl Level {
    /// Lower-case name of the level.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Sends one log message to the host.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::host::log(level.into(), message);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_log(level, message);
}

/// Records a metric sample; counters end in `_total`, others are gauges.
pub fn metric(name: &str, value: f64) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::host::metric(name, value);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_metric(name, value);
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cdp_log {
    ($level:expr, $($arg:tt)+) => {
        $crate::log::log($level, &::std::format!($($arg)+))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cdp_log_trace {
    ($($arg:tt)+) => { $crate::__cdp_log!($crate::log::Level::Trace, $($arg)+) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cdp_log_debug {
    ($($arg:tt)+) => { $crate::__cdp_log!($crate::log::Level::Debug, $($arg)+) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cdp_log_info {
    ($($arg:tt)+) => { $crate::__cdp_log!($crate::log::Level::Info, $($arg)+) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cdp_log_warn {
    ($($arg:tt)+) => { $crate::__cdp_log!($crate::log::Level::Warn, $($arg)+) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cdp_log_error {
    ($($arg:tt)+) => { $crate::__cdp_log!($crate::log::Level::Error, $($arg)+) };
}

/// Logs at `debug` level, with `format!` arguments.
#[doc(inline)]
pub use crate::__cdp_log_debug as debug;
/// Logs at `error` level, with `format!` arguments.
#[doc(inline)]
pub use crate::__cdp_log_error as error;
/// Logs at `info` level, with `format!` arguments.
#[doc(inline)]
pub use crate::__cdp_log_info as info;
/// Logs at `trace` level, with `format!` arguments.
#[doc(inline)]
pub use crate::__cdp_log_trace as trace;
/// Logs at `warn` level, with `format!` arguments.
#[doc(inline)]
pub use crate::__cdp_log_warn as warn;

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::testing::{take_logs, take_metrics};

    #[test]
    fn macros_format_and_record() {
        let n = 3;
        info!("read {n} rows");
        warn!("line {}: skipped", 7);
        error!("boom");
        debug!("d");
        trace!("t");
        metric("rows_total", 3.0);
        assert_eq!(
            take_logs(),
            [
                (Level::Info, "read 3 rows".to_string()),
                (Level::Warn, "line 7: skipped".to_string()),
                (Level::Error, "boom".to_string()),
                (Level::Debug, "d".to_string()),
                (Level::Trace, "t".to_string()),
            ]
        );
        assert!(take_logs().is_empty());
        assert_eq!(take_metrics(), [("rows_total".to_string(), 3.0)]);
        assert_eq!(Level::Warn.as_str(), "warn");
    }
}
