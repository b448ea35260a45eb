//! When a scheduled sync runs: cron schedules (six fields, seconds first, an
//! optional seventh for the year) evaluated in UTC, so daylight-saving
//! changes never skip or double a run. Pure: times in, times out.
//!
//! The rule for a process that was down: a sync whose scheduled time passed
//! since its last run (or that never ran) runs once when the runtime starts,
//! never once per missed time. A run still going when its next time comes
//! is not started twice: the next time is counted from when it ended.

use chrono::{DateTime, TimeZone, Utc};
use std::str::FromStr;

/// A parsed cron schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
    cron: cron::Schedule,
}

impl Schedule {
    /// Parses a schedule as `cdp validate` checks it (CDP043).
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let cron = cron::Schedule::from_str(text).map_err(|e| format!("`{text}` is not a valid cron schedule: {e}"))?;
        Ok(Schedule { text: text.to_owned(), cron })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first scheduled time strictly after `after_ms` (milliseconds
    /// since the epoch), or `None` when the schedule never fires again.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = Utc.timestamp_millis_opt(after_ms).single()?;
        self.cron.after(&after).next().map(|t: DateTime<Utc>| t.timestamp_millis())
    }

    /// Whether a sync that last started at `last_start_ms` (`None`: never)
    /// is due at `now_ms`: a scheduled time passed since its last start.
    pub fn missed(&self, last_start_ms: Option<i64>, now_ms: i64) -> bool {
        match last_start_ms {
            None => true,
            Some(last) => self.next_after(last).is_some_and(|t| t <= now_ms),
        }
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).expect("time").timestamp_millis()
    }

    #[test]
    fn next_time_is_strictly_after_and_in_utc() {
        let s = Schedule::parse("0 0 3 * * *").expect("schedule");
        assert_eq!(s.next_after(ms("2026-03-29T01:00:00Z")), Some(ms("2026-03-29T03:00:00Z")));
        assert_eq!(s.next_after(ms("2026-03-29T03:00:00Z")), Some(ms("2026-03-30T03:00:00Z")));
        let every_second = Schedule::parse("* * * * * *").expect("schedule");
        assert_eq!(every_second.next_after(ms("2026-01-01T00:00:00.500Z")), Some(ms("2026-01-01T00:00:01Z")));
    }

    #[test]
    fn a_process_that_was_down_runs_a_missed_sync_once() {
        let hourly = Schedule::parse("0 0 * * * *").expect("schedule");
        let last = ms("2026-12-01T10:00:00Z");
        assert!(!hourly.missed(Some(last), ms("2026-12-01T10:59:59Z")));
        assert!(hourly.missed(Some(last), ms("2026-12-01T11:00:00Z")));
        // Down for a day: still one run due, not twenty-four.
        assert!(hourly.missed(Some(last), ms("2026-12-02T10:30:00Z")));
        assert!(hourly.missed(None, last));
    }

    #[test]
    fn a_schedule_that_never_fires_again_is_never_due() {
        let past = Schedule::parse("0 0 0 1 1 * 2020").expect("schedule");
        assert_eq!(past.next_after(ms("2026-01-01T00:00:00Z")), None);
        assert!(!past.missed(Some(ms("2026-01-01T00:00:00Z")), ms("2026-06-01T00:00:00Z")));
        assert!(Schedule::parse("0 61 * * * *").is_err());
    }
}
