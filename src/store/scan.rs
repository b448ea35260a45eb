//! Whole-store reads for commands that look at every profile (`cdp plan`'s
//! data impact): rows out, no evaluation.

use super::{Result, Store};
use sqlx::Row;

impl Store {
    /// Every profile that holds an identifier, ascending.
    pub async fn live_profiles(&self) -> Result<Vec<i64>> {
        let rows = sqlx::query("SELECT DISTINCT profile_id FROM identities ORDER BY profile_id")
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// How many records the store holds from `source`.
    pub async fn records_from(&self, source: &str) -> Result<i64> {
        Ok(sqlx::query(&self.sql("SELECT COUNT(*) FROM records WHERE source = ?"))
            .bind(source)
            .fetch_one(self.pool())
            .await?
            .try_get(0)?)
    }
}
