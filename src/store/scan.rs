//! Whole-store reads for commands that look at every profile (`cdp plan`'s
//! data impact): rows out, no evaluation.

use super::{Result, Store};
use sqlx::Row;

impl Store {
    /// Every profile that holds an identifier, ascending.
    pub async fn live_profiles(&self) -> Result<Vec<i64>> {
        let rows = sqlx::query("SELECT DISTINCT profile_id FROM identities ORDER BY profile_id")
            .fetch_all(self.read_pool())
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// How many records the store holds from `source`.
    pub async fn records_from(&self, source: &str) -> Result<i64> {
        Ok(sqlx::query(&self.sql("SELECT COUNT(*) FROM records WHERE source = ?"))
            .bind(source)
            .fetch_one(self.read_pool())
            .await?
            .try_get(0)?)
    }
}

impl Store {
    /// Every identifier and link, for re-partitioning under other rules.
    pub async fn identity_graph(
        &self,
    ) -> Result<(Vec<crate::identity::impact::StoredIdent>, Vec<crate::identity::impact::StoredLink>)> {
        use crate::identity::impact::{StoredIdent, StoredLink};
        let rows = sqlx::query("SELECT id, key, value, profile_id, component, isolated FROM identities")
            .fetch_all(self.read_pool())
            .await?;
        let idents = rows
            .iter()
            .map(|r| {
                Ok(StoredIdent {
                    id: r.try_get(0)?,
                    key: r.try_get(1)?,
                    value: r.try_get(2)?,
                    profile: r.try_get(3)?,
                    component: r.try_get(4)?,
                    isolated: r.try_get::<i64, _>(5)? != 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = sqlx::query("SELECT component, at, source, message_id, ids, probability FROM links")
            .fetch_all(self.read_pool())
            .await?;
        let links = rows
            .iter()
            .map(|r| {
                let ids: String = r.try_get(4)?;
                Ok(StoredLink {
                    component: r.try_get(0)?,
                    at: r.try_get(1)?,
                    source: r.try_get(2)?,
                    message_id: r.try_get(3)?,
                    ids: ids.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
                    probability: r.try_get(5)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((idents, links))
    }
}
