//! Benchmarks behind `cdp bench …`. Each one measures cdp next to a baseline
//! taken in the same run on the same machine and prints the ratio, so figures
//! from noisy machines still compare. They are commands, not timed tests.

pub mod activation;
pub mod audience;
pub mod collector;
pub mod erase;
pub mod identity;
pub mod ingest;
pub mod people;
pub mod plugin;
pub mod reads;
pub mod sync;
pub mod validate;

use std::time::{Duration, Instant};

/// The median of `times` (sorted in place) and every time in seconds, in
/// order, for a report line (`2.27, 2.32, 2.71`).
pub fn median_of(times: &mut [Duration]) -> (Duration, String) {
    times.sort();
    let all = times.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(", ");
    (times.get(times.len() / 2).copied().unwrap_or_default(), all)
}

/// Runs `f` `runs` times and returns the median duration and the last result.
pub fn median<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let out = f();
        times.push(start.elapsed());
        last = Some(out);
    }
    times.sort();
    (times[times.len() / 2], last.expect("at least one run"))
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}
