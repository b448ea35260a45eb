//! The audit log on both backends: rows come back as appended, oldest
//! first, from a time on and up to a limit; long targets are cut on a
//! character boundary.

mod support;

use cdp::store::audit::{AuditEntry, AuditRow};
use std::time::Duration;
use support::{backends, drop_db, rt};

fn entry<'a>(actor: &'a str, action: &'a str, target: &'a str, outcome: &'a str) -> AuditEntry<'a> {
    AuditEntry { actor, via: if actor.starts_with("os:") { "cli" } else { "api" }, action, target, outcome }
}

fn summary(rows: &[AuditRow]) -> Vec<(&str, &str, &str, &str, &str)> {
    rows.iter()
        .map(|r| (r.actor.as_str(), r.via.as_str(), r.action.as_str(), r.target.as_str(), r.outcome.as_str()))
        .collect()
}

#[test]
fn audit_rows_come_back_oldest_first_from_a_time_and_up_to_a_limit() {
    rt().block_on(async {
        for (name, store, db, _dir) in backends("audit").await {
            assert!(store.audit_rows(None, 10).await.expect("rows").is_empty(), "{name}");
            let first = store
                .audit_append(&entry("os:ada", "profile.get", "email=ada@example.org", "ok"))
                .await
                .expect("append");
            // A later millisecond for the rows `since` keeps.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let second = store
                .audit_append(&entry(
                    "ops",
                    "GET /admin/v1/profiles/{key}/{value}",
                    "profiles/email/x@y.org",
                    "not_found",
                ))
                .await
                .expect("append");
            let third = store
                .audit_append(&entry("os:bo", "profile.unmerge", "phone=070", "error: the store is busy"))
                .await
                .expect("append");
            assert!(first < second && second < third, "{name}: ids grow");

            let all = store.audit_rows(None, 10).await.expect("rows");
            assert_eq!(
                summary(&all),
                [
                    ("os:ada", "cli", "profile.get", "email=ada@example.org", "ok"),
                    ("ops", "api", "GET /admin/v1/profiles/{key}/{value}", "profiles/email/x@y.org", "not_found"),
                    ("os:bo", "cli", "profile.unmerge", "phone=070", "error: the store is busy"),
                ],
                "{name}"
            );
            assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), [first, second, third], "{name}");
            let now = cdp::store::now_ms();
            assert!(all.iter().all(|r| r.at <= now && r.at > now - 60_000), "{name}: {all:?}");
            assert!(all[0].at < all[1].at && all[1].at <= all[2].at, "{name}: {all:?}");

            let limited = store.audit_rows(None, 2).await.expect("rows");
            assert_eq!(limited, all[..2], "{name}: the oldest two");
            let since = store.audit_rows(Some(all[1].at), 10).await.expect("rows");
            assert_eq!(since, all[1..], "{name}: at or after the second row's time");
            let since_limited = store.audit_rows(Some(all[1].at), 1).await.expect("rows");
            assert_eq!(since_limited, all[1..2], "{name}");
            assert!(store.audit_rows(Some(now + 60_000), 10).await.expect("rows").is_empty(), "{name}");
            drop_db(db).await;
        }
    });
}

#[test]
fn a_long_target_is_cut_on_a_character_boundary() {
    rt().block_on(async {
        for (name, store, db, _dir) in backends("audit_cut").await {
            // 1 + 3 × 200 bytes: byte 512 falls inside a `€`.
            let target = format!("x{}", "€".repeat(200));
            store.audit_append(&entry("os:ada", "profile.get", &target, "ok")).await.expect("append");
            let rows = store.audit_rows(None, 10).await.expect("rows");
            assert_eq!(rows[0].target, format!("x{}", "€".repeat(170)), "{name}");
            drop_db(db).await;
        }
    });
}
