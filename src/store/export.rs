//! Bulk export, the store side: profiles and records read in pages by key
//! (keyset pagination), so an export of millions of rows holds one page in
//! memory and never keeps SQLite's single connection between pages. The CLI
//! (`cdp export`) turns each page into JSON Lines or CSV as it arrives.

use super::{Result, Store};
use sqlx::Row;

/// One stored record and the profile it belongs to now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRow {
    pub source: String,
    pub message_id: String,
    /// Observed time, milliseconds since the epoch.
    pub at: i64,
    /// `identify`, `event`, `entity`, … as stored.
    pub kind: String,
    /// The event or entity name, if any.
    pub name: Option<String>,
    pub profile_id: i64,
    /// The identifier the record anchors on.
    pub key: String,
    pub value: String,
}

/// Where the previous page of records ended: `(source, message id)`.
pub type RecordKey = (String, String);

impl Store {
    /// How many profiles hold at least one identifier.
    pub async fn profile_count(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(DISTINCT profile_id) FROM identities").fetch_one(&self.pool).await?;
        Ok(row.try_get(0)?)
    }

    /// How many records were ingested (probabilistic links, source `match`, are not records of a source).
    pub async fn record_count(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM records WHERE source <> 'match'").fetch_one(&self.pool).await?;
        Ok(row.try_get(0)?)
    }

    /// Up to `limit` ingested records after `after` in `(source, message id)` order,
    /// each with its anchor identifier and current profile. The row-value
    /// comparison seeks the primary key, so each page costs its own rows only.
    pub async fn records_after(&self, after: Option<&RecordKey>, limit: usize) -> Result<Vec<RecordRow>> {
        let (source, message_id) = after.map_or(("", ""), |(s, m)| (s.as_str(), m.as_str()));
        let rows = sqlx::query(&self.sql(
            "SELECT r.source, r.message_id, r.at, r.kind, r.name, i.profile_id, i.key, i.value \
             FROM records r JOIN identities i ON i.id = r.identity_id \
             WHERE (r.source, r.message_id) > (?, ?) AND r.source <> 'match' \
             ORDER BY r.source, r.message_id LIMIT ?",
        ))
        .bind(source)
        .bind(message_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RecordRow {
                    source: r.try_get(0)?,
                    message_id: r.try_get(1)?,
                    at: r.try_get(2)?,
                    kind: r.try_get(3)?,
                    name: r.try_get(4)?,
                    profile_id: r.try_get(5)?,
                    key: r.try_get(6)?,
                    value: r.try_get(7)?,
                })
            })
            .collect()
    }
}
