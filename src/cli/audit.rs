//! `cdp audit [--since T] [--limit N]`: the audit log, oldest first; and the
//! CLI's side of writing it — who runs this process (`os:USER`) and the row
//! a profile command appends before it shows anything.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use super::ReportFormat;
use crate::store::Store;
use crate::store::audit::{AuditEntry, AuditRow};

/// Rows `cdp audit` lists when `--limit` is not given.
pub const DEFAULT_LIMIT: u32 = 1_000;

/// `--since`: a point in time, or how long before now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Epoch milliseconds.
    At(i64),
    /// This long before the command runs.
    Ago(Duration),
}

impl std::str::FromStr for Since {
    type Err = String;

    /// A duration needs a unit (`24h`, `7d`, `90m`), so it never reads as a
    /// time; anything else is a time as ingest reads one: RFC 3339, a date,
    /// or epoch seconds / milliseconds.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(d) = crate::manifest::units::parse_duration(s) {
            return Ok(Since::Ago(d));
        }
        crate::ingest::parse_time(&serde_json::Value::String(s.to_owned())).map(Since::At).ok_or_else(|| {
            format!("`{s}` is neither a time (`2026-12-01T10:00:00Z`, `2026-12-01`) nor a duration ago (`24h`, `7d`)")
        })
    }
}

impl Since {
    /// Epoch milliseconds, with `now_ms` as now.
    pub fn resolve(self, now_ms: i64) -> i64 {
        match self {
            Since::At(ms) => ms,
            Since::Ago(d) => now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

/// `cdp audit`.
pub async fn run(manifest: &Path, since: Option<Since>, limit: u32, format: ReportFormat) -> Result<ExitCode> {
    // Like `status`: the log is readable whatever state the rest of the file is in.
    let (store, _) = super::connect_file(manifest).await?;
    let since = since.map(|s| s.resolve(crate::store::now_ms()));
    // One more than asked, to say whether rows were left out.
    let mut rows = store.audit_rows(since, i64::from(limit) + 1).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    match format {
        ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "rows": rows }))?),
        ReportFormat::Human => {
            for r in &rows {
                outln!("{}", human_line(r));
            }
            if rows.is_empty() {
                eprintln!("no audit rows{}", if since.is_some() { " in that time" } else { "" });
            }
        }
    }
    if more {
        eprintln!("more rows follow the {limit} shown; pass a later --since or a larger --limit");
    }
    Ok(ExitCode::SUCCESS)
}

/// One row for people: time, actor, via, action, target, outcome.
fn human_line(r: &AuditRow) -> String {
    let at = chrono::DateTime::from_timestamp_millis(r.at)
        .map_or_else(|| r.at.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    format!("{at}  {:<16} {:<3}  {:<16} {}  {}", r.actor, r.via, r.action, r.target, r.outcome)
}

/// Appends a row for a CLI command run by this process's user. An `Err` here
/// means the command must not show what it read.
pub(super) async fn record(store: &Store, action: &str, target: &str, outcome: &str) -> crate::store::Result<()> {
    let actor = actor();
    store.audit_append(&AuditEntry { actor: &actor, via: "cli", action, target, outcome }).await.map(|_| ())
}

/// The CLI's actor: `os:` and the operating-system user.
pub(super) fn actor() -> String {
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let passwd = std::fs::read_to_string("/etc/passwd").ok();
    format!("os:{}", os_user(|k| std::env::var(k).ok(), status.as_deref(), passwd.as_deref()))
}

/// `$USER`, else `$LOGNAME`, else the real uid (from `/proc/self/status`)
/// by its name in `/etc/passwd`, else `uid=N`; `unknown` when none is
/// known (no `/proc`).
fn os_user(var: impl Fn(&str) -> Option<String>, status: Option<&str>, passwd: Option<&str>) -> String {
    if let Some(u) =
        ["USER", "LOGNAME"].into_iter().filter_map(var).map(|u| u.trim().to_owned()).find(|u| !u.is_empty())
    {
        return u;
    }
    let uid = status.and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().next()).map(str::to_owned)
    });
    let Some(uid) = uid else { return "unknown".to_owned() };
    passwd
        .and_then(|p| {
            p.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)? == uid && !name.is_empty()).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| format!("uid={uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tcdp\nUmask:\t0022\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n";
    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nada:x:1000:1000:Ada:/home/ada:/bin/sh\n";

    #[test]
    fn the_os_user_is_user_then_logname_then_the_uids_name() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
        };
        assert_eq!(os_user(env(&[("USER", "bo"), ("LOGNAME", "cy")]), Some(STATUS), Some(PASSWD)), "bo");
        assert_eq!(os_user(env(&[("USER", " "), ("LOGNAME", "cy")]), Some(STATUS), Some(PASSWD)), "cy");
        assert_eq!(os_user(env(&[]), Some(STATUS), Some(PASSWD)), "ada");
        assert_eq!(os_user(env(&[]), Some(STATUS), Some("root:x:0:0::/root:/bin/sh\n")), "uid=1000");
        assert_eq!(os_user(env(&[]), Some(STATUS), None), "uid=1000");
        assert_eq!(os_user(env(&[]), None, Some(PASSWD)), "unknown");
    }

    #[test]
    fn since_takes_a_time_a_date_or_a_duration_ago() {
        assert_eq!("24h".parse::<Since>(), Ok(Since::Ago(Duration::from_secs(86_400))));
        assert_eq!("7d".parse::<Since>().map(|s| s.resolve(700_000_000)), Ok(700_000_000 - 7 * 86_400_000));
        assert_eq!("2026-12-01".parse::<Since>(), Ok(Since::At(1_796_083_200_000)));
        assert_eq!("2026-12-01T10:00:00+01:00".parse::<Since>(), Ok(Since::At(1_796_115_600_000)));
        assert_eq!(Since::Ago(Duration::MAX).resolve(5), 5 - i64::MAX);
        let e = "yesterday".parse::<Since>().unwrap_err();
        assert!(e.contains("neither a time"), "{e}");
    }
}
