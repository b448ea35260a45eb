//! Retention: deleting (or counting) raw records older than the manifest's
//! `retention:` rules allow, in chunks so a large deletion never holds the
//! write lock for long.

use sqlx::Row;

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
                         (SELECT source, message_id FROM records WHERE {filter} LIMIT {CHUNK})"
                    ))
                    .into_owned();
                let mut total = 0i64;
                loop {
                    let mut q = sqlx::query(&sql).bind(cutoff);
                    for b in &binds {
                        q = q.bind(b.as_str());
                    }
                    let mut tx = self.begin_write().await?;
                    let n = q.execute(&mut *tx).await?.rows_affected() as i64;
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
}
