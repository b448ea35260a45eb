//! Retention: deleting (or counting) raw records older than the manifest's
//! `retention:` rules allow, in chunks so a large deletion never holds the
//! write lock for long. Deleted events change the computed traits and
//! audiences of their profiles, so each chunk's transaction lists those
//! profiles in the outbox, as an ingest does.

use sqlx::{AnyConnection, Row};

use super::outbox::Changes;
use super::{Result, Store, now_ms};
use crate::privacy::RetentionRule;

/// Rows deleted per statement.
const CHUNK: i64 = 5_000;

impl Store {
    /// For each rule, how many records it removes now (`delete`) or would
    /// remove (`!delete`), in the rules' order.
    pub async fn retention(&self, rules: &[RetentionRule], delete: bool) -> Result<Vec<(String, i64)>> {
        let now = now_ms();
        let mut out = Vec::new();
        for r in rules {
            let cutoff = now - i64::try_from(r.keep.as_millis()).unwrap_or(i64::MAX / 2);
            let mut filter = String::from("at < ?");
            let mut binds: Vec<String> = Vec::new();
            if let Some(s) = &r.source {
                filter.push_str(" AND source = ?");
                binds.push(s.clone());
            }
            if !r.except.is_empty() {
                filter.push_str(&format!(" AND source NOT IN ({})", super::in_list(r.except.len())));
                binds.extend(r.except.iter().cloned());
            }
            if let Some(e) = &r.event {
                filter.push_str(" AND kind = 'event' AND name = ?");
                binds.push(e.clone());
            }
            let n = if delete {
                let sql = self
                    .sql(&format!(
                        "DELETE FROM records WHERE (source, message_id) IN \
                         (SELECT source, message_id FROM records WHERE {filter} LIMIT {CHUNK}) \
                         RETURNING identity_id, kind"
                    ))
                    .into_owned();
                let mut total = 0i64;
                loop {
                    let mut q = sqlx::query(&sql).bind(cutoff);
                    for b in &binds {
                        q = q.bind(b.as_str());
                    }
                    let mut tx = self.begin_write().await?;
                    let deleted = q.fetch_all(&mut *tx).await?;
                    let n = deleted.len() as i64;
                    let mut events: Vec<i64> = Vec::new();
                    for row in &deleted {
                        if row.try_get::<String, _>(1)? == "event" {
                            events.push(row.try_get(0)?);
                        }
                    }
                    self.announce_deleted_events(&mut tx, events).await?;
                    tx.commit().await?;
                    total += n;
                    if n < CHUNK {
                        break total;
                    }
                }
            } else {
                let sql = self.sql(&format!("SELECT COUNT(*) FROM records WHERE {filter}")).into_owned();
                let mut q = sqlx::query(&sql).bind(cutoff);
                for b in &binds {
                    q = q.bind(b.as_str());
                }
                q.fetch_one(self.read_pool()).await?.try_get(0)?
            };
            out.push((r.label(), n));
        }
        Ok(out)
    }

    /// Puts the profiles whose events (of identifiers `identities`) were
    /// deleted in the outbox, in the deleting transaction: their computed
    /// traits, recent events and audiences change with no record arriving.
    async fn announce_deleted_events(&self, conn: &mut AnyConnection, mut identities: Vec<i64>) -> Result<()> {
        identities.sort_unstable();
        identities.dedup();
        let rows =
            self.select_in(conn, "SELECT DISTINCT profile_id FROM identities WHERE id IN ({})", &identities).await?;
        let mut changes = Changes::default();
        for row in rows {
            changes.add(row.try_get(0)?, "events");
        }
        if !changes.is_empty() {
            self.append_outbox(conn, &changes.to_json()).await?;
        }
        Ok(())
    }
}
