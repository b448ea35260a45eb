//! The outbox: every ingest transaction that changed profiles appends one
//! entry, in that same transaction, saying which profiles it changed and
//! which of their fields (trait names, and `identities`, `events`,
//! `entities`, `consent`, `merged`), so audience evaluation can follow
//! changes without scanning the store.
//!
//! Entries are numbered in commit order: the number comes from one counter
//! row updated as the transaction's last statement before its commit, so the
//! row lock orders the commits (briefly: from that statement to the commit)
//! and a reader never sees entry n+1 before entry n. Each reader keeps its
//! committed position in the store and reads on from it.

use super::{Result, Store, now_ms};
use rustc_hash::FxHashMap;
use sqlx::{AnyConnection, Row};
use std::collections::BTreeMap;

/// One committed ingest transaction's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position in commit order, from 1.
    pub seq: i64,
    /// When it was committed (milliseconds since the epoch).
    pub at: i64,
    /// Changed profiles (by id) and their changed fields, sorted.
    pub changes: BTreeMap<i64, Vec<String>>,
}

/// Changed fields per profile, gathered while a batch is applied.
#[derive(Debug, Default)]
pub(crate) struct Changes<'a> {
    by_profile: FxHashMap<i64, Vec<&'a str>>,
}

impl<'a> Changes<'a> {
    pub(crate) fn add(&mut self, profile: i64, field: &'a str) {
        let fields = self.by_profile.entry(profile).or_default();
        if !fields.contains(&field) {
            fields.push(field);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_profile.is_empty()
    }

    /// The changed profiles, unordered.
    pub(crate) fn profiles(&self) -> Vec<i64> {
        self.by_profile.keys().copied().collect()
    }

    /// `{"profile id": ["field", …], …}`, profiles and fields sorted; empty
    /// when nothing changed.
    pub(crate) fn to_json(&self) -> String {
        if self.is_empty() {
            return String::new();
        }
        // Written directly: a batch of 100,000 records changes as many
        // profiles, and building a JSON value of them first cost more than
        // writing the text.
        let mut sorted: Vec<(i64, &Vec<&str>)> = self.by_profile.iter().map(|(p, f)| (*p, f)).collect();
        sorted.sort_unstable_by_key(|(p, _)| *p);
        let mut out = String::with_capacity(sorted.len() * 24);
        let mut fields: Vec<&str> = Vec::new();
        for (i, (profile, f)) in sorted.into_iter().enumerate() {
            out.push_str(if i == 0 { "{\"" } else { ",\"" });
            out.push_str(&profile.to_string());
            out.push_str("\":[");
            fields.clear();
            fields.extend(f.iter().copied());
            fields.sort_unstable();
            for (j, field) in fields.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(*field).to_string());
            }
            out.push(']');
        }
        out.push('}');
        out
    }
}

impl Store {
    /// Appends an entry inside the committing transaction, as its last
    /// write: takes the next number under the counter row's lock.
    pub(crate) async fn append_outbox(&self, conn: &mut AnyConnection, changes_json: &str) -> Result<i64> {
        let row = sqlx::query("UPDATE outbox_head SET seq = seq + 1 WHERE id = 1 RETURNING seq")
            .fetch_one(&mut *conn)
            .await?;
        let seq: i64 = row.try_get(0)?;
        sqlx::query(&self.sql("INSERT INTO outbox (seq, at, changes) VALUES (?, ?, ?)"))
            .bind(seq)
            .bind(now_ms())
            .bind(changes_json)
            .execute(&mut *conn)
            .await?;
        Ok(seq)
    }

    /// The committed position of `reader` (0 before its first commit).
    pub async fn outbox_position(&self, reader: &str) -> Result<i64> {
        let row = sqlx::query(&self.sql("SELECT position FROM outbox_readers WHERE name = ?"))
            .bind(reader)
            .fetch_optional(self.read_pool())
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0))
    }

    /// Up to `limit` entries after `reader`'s committed position, in order.
    pub async fn outbox_read(&self, reader: &str, limit: usize) -> Result<Vec<OutboxEntry>> {
        let after = self.outbox_position(reader).await?;
        self.outbox_after(after, limit).await
    }

    /// Up to `limit` entries after position `after`, in order.
    pub async fn outbox_after(&self, after: i64, limit: usize) -> Result<Vec<OutboxEntry>> {
        let rows = sqlx::query(&self.sql("SELECT seq, at, changes FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"))
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.read_pool())
            .await?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get(2)?;
                let raw: BTreeMap<String, Vec<String>> = serde_json::from_str(&text).map_err(|e| {
                    super::StoreError::Invariant(format!(
                        "outbox entry {} is unreadable: {e}",
                        r.try_get::<i64, _>(0).unwrap_or(0)
                    ))
                })?;
                let changes = raw.into_iter().filter_map(|(p, f)| Some((p.parse().ok()?, f))).collect();
                Ok(OutboxEntry { seq: r.try_get(0)?, at: r.try_get(1)?, changes })
            })
            .collect()
    }

    /// Commits `reader`'s position: entries up to `seq` are consumed. The
    /// position only moves forward.
    pub async fn outbox_commit(&self, reader: &str, seq: i64) -> Result<()> {
        let sql = "INSERT INTO outbox_readers (name, position, updated_at) VALUES (?, ?, ?) \
                   ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at \
                   WHERE excluded.position > outbox_readers.position";
        sqlx::query(&self.sql(sql)).bind(reader).bind(seq).bind(now_ms()).execute(self.pool()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_written_as_sorted_json() {
        let mut c = Changes::default();
        assert_eq!(c.to_json(), "");
        for (p, f) in [(12, "x"), (3, "b"), (3, "a"), (3, "b"), (-1, "say \"hi\"")] {
            c.add(p, f);
        }
        let json = c.to_json();
        assert_eq!(json, r#"{"-1":["say \"hi\""],"3":["a","b"],"12":["x"]}"#);
        let read: BTreeMap<String, Vec<String>> = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(read["3"], ["a", "b"]);
    }
}
