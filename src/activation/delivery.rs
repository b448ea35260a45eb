//! How records reach a destination: retries with exponential backoff and
//! jitter that honour a remote's `Retry-After`, one token bucket per
//! destination for its `rate_limit`, and the shrink guard that stops a
//! reconciliation from removing too much of an audience at once. Pure: the
//! caller passes the clock and the randomness.

use std::time::Duration;

use crate::consent::LedgerRow;
use crate::manifest::{Manifest, Retry};
use crate::units::Rate;

/// What the store says of a person when a queued add is about to be sent.
#[derive(Debug, Clone, Copy)]
pub struct Person<'a> {
    /// The profile still has identifiers (not merged away, not erased).
    pub live: bool,
    pub suppressed: bool,
    /// Their consent ledger now.
    pub ledger: &'a [LedgerRow],
}

/// Why an `enter` or `upsert` queued for a destination of `purpose` may not
/// be sent now, if it may not: the profile went, the person is suppressed,
/// or consent for the purpose is no longer granted.
pub fn refusal(m: &Manifest, expiry: Option<Duration>, purpose: &str, p: &Person<'_>, now: i64) -> Option<String> {
    if !p.live {
        return Some("the profile was merged or erased before sending".into());
    }
    if p.suppressed {
        return Some("the person is suppressed (cdp privacy suppress)".into());
    }
    let decisions = crate::consent::decide(m, expiry, p.ledger, now);
    crate::consent::basis(&decisions, purpose).err().map(|why| format!("at send time: {why}"))
}

/// `retry:` with its defaults: 8 attempts, 1 s doubling to 5 min.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts per record, the first included.
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 8, initial: Duration::from_secs(1), max: Duration::from_secs(300) }
    }
}

impl RetryPolicy {
    pub fn from_manifest(r: Option<&Retry>) -> Result<RetryPolicy, String> {
        let d = RetryPolicy::default();
        let Some(r) = r else { return Ok(d) };
        let dur = |what: &str, v: &Option<String>, default| match v.as_deref() {
            None => Ok(default),
            Some(s) => crate::units::parse_duration(s).map_err(|e| format!("{what}: {e}")),
        };
        Ok(RetryPolicy {
            max_attempts: r.max_attempts.unwrap_or(d.max_attempts).max(1),
            initial: dur("initial_backoff", &r.initial_backoff, d.initial)?,
            max: dur("max_backoff", &r.max_backoff, d.max)?,
        })
    }

    /// The wait before attempt `attempts + 1` after `attempts` failed ones:
    /// `initial · 2^(attempts−1)` capped at `max`, scaled by a jitter in
    /// [0.5, 1) (`jitter` in [0, 1)), and never shorter than the remote's
    /// `retry_after`. `None` when the attempts are used up.
    pub fn next(&self, attempts: u32, retry_after: Option<Duration>, jitter: f64) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let exp = self.initial.saturating_mul(1u32 << attempts.saturating_sub(1).min(30)).min(self.max);
        let wait = exp.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0);
        Some(retry_after.map_or(wait, |r| r.max(wait)))
    }
}

/// A token bucket: at most `rate.count` records per `rate.per`, in bursts
/// of up to one period's worth.
#[derive(Debug, Clone)]
pub struct Bucket {
    per_ms: f64,
    capacity: f64,
    tokens: f64,
    at: i64,
}

impl Bucket {
    pub fn new(rate: Rate, now: i64) -> Bucket {
        let per_ms = f64::from(rate.count) / (rate.per.as_millis().max(1) as f64);
        let capacity = f64::from(rate.count);
        Bucket { per_ms, capacity, tokens: capacity, at: now }
    }

    /// How many of `want` records may go now (at least one when the bucket
    /// holds a token), taking their tokens; 0 when it is empty.
    pub fn take(&mut self, want: usize, now: i64) -> usize {
        self.refill(now);
        let n = (self.tokens.floor() as usize).min(want);
        self.tokens -= n as f64;
        n
    }

    /// How long until one token is there.
    pub fn wait(&mut self, now: i64) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_millis(((1.0 - self.tokens) / self.per_ms).ceil() as u64)
    }

    fn refill(&mut self, now: i64) {
        let elapsed = (now - self.at).max(0) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.at = now;
    }
}

/// Whether removing `removals` of `members` exceeds the guard's
/// `max_removal_percent`; the reason to show when it does.
pub fn guard_trips(max_percent: f64, members: usize, removals: usize) -> Option<String> {
    if removals == 0 || members == 0 {
        return None;
    }
    let pct = removals as f64 * 100.0 / members as f64;
    (pct > max_percent).then(|| {
        format!(
            "shrink guard: this change would remove {removals} of {members} members ({pct:.1} % > {max_percent} %); \
             nothing is sent until `cdp sync resume` releases it"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() {
        let p = RetryPolicy { max_attempts: 5, initial: Duration::from_secs(1), max: Duration::from_secs(5) };
        assert_eq!(p.next(1, None, 0.0), Some(Duration::from_millis(500)));
        assert_eq!(p.next(1, None, 0.999_999).map(|d| d.as_millis()), Some(999));
        assert_eq!(p.next(2, None, 0.0), Some(Duration::from_secs(1)));
        assert_eq!(p.next(4, None, 0.0), Some(Duration::from_millis(2500)), "8 s capped at 5 s, jittered");
        assert_eq!(p.next(2, Some(Duration::from_secs(30)), 0.5), Some(Duration::from_secs(30)));
        assert_eq!(p.next(5, None, 0.0), None, "five attempts used");
        assert_eq!(p.next(40, None, 0.0), None);
    }

    #[test]
    fn the_bucket_allows_a_period_then_paces() {
        let mut b = Bucket::new(Rate { count: 10, per: Duration::from_secs(1) }, 0);
        assert_eq!(b.take(25, 0), 10);
        assert_eq!(b.take(1, 0), 0);
        assert_eq!(b.wait(0), Duration::from_millis(100));
        assert_eq!(b.take(5, 500), 5);
        assert_eq!(b.take(5, 10_000), 5, "refills to its capacity, no more");
        assert_eq!(b.take(20, 10_000), 5);
    }

    #[test]
    fn a_queued_add_is_refused_once_the_person_withdrew_went_or_is_suppressed() {
        let l = crate::manifest::load_str(
            "version: 1\nname: t\nidentity:\n  keys:\n    email: {}\nconsent:\n  purposes: [ads]\n",
            &crate::manifest::Options::validate("."),
        );
        let m = l.manifest.expect("manifest");
        let granted = [LedgerRow { purpose: "ads".into(), granted: true, at: 1, source: "web".into() }];
        let withdrawn = [granted[0].clone(), LedgerRow { granted: false, at: 2, ..granted[0].clone() }];
        let person = |live, suppressed, ledger| Person { live, suppressed, ledger };
        assert_eq!(refusal(&m, None, "ads", &person(true, false, &granted), 3), None);
        assert!(refusal(&m, None, "ads", &person(true, false, &withdrawn), 3).unwrap().contains("denied"));
        assert!(refusal(&m, None, "ads", &person(true, false, &[]), 3).unwrap().contains("no consent recorded"));
        assert!(refusal(&m, None, "ads", &person(false, false, &granted), 3).unwrap().contains("merged or erased"));
        assert!(refusal(&m, None, "ads", &person(true, true, &granted), 3).unwrap().contains("suppressed"));
    }

    #[test]
    fn the_guard_trips_above_its_share_only() {
        assert!(guard_trips(20.0, 100, 20).is_none());
        assert!(guard_trips(20.0, 100, 21).unwrap().contains("21 of 100"));
        assert!(guard_trips(20.0, 0, 0).is_none());
        assert!(guard_trips(0.0, 10, 1).is_some());
    }
}
