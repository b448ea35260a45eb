//! A profile's rows, read for the golden record (assembled by
//! [`crate::profile::golden_record`]); looking a profile up by one of its
//! identifiers; why its identifiers were joined; and splitting an
//! identifier off by hand.

use super::{Result, Store, now_ms};
use crate::identity::explain::{self, ExplainRows, LedgerRow, LinkRow};
use crate::identity::normalize;
use crate::manifest::{Manifest, Normalizer};
use crate::profile::{self, GoldenRecord, IdentityRow, ProfileRows};
use indexmap::IndexMap;
use serde_json::Value;
use sqlx::Row;

/// Why a profile lookup found nothing.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("`{0}` is not an identity key in the manifest; keys: {1}")]
    UnknownKey(String, String),
    #[error("`{0}` is not a valid {1}: {2}")]
    Invalid(String, String, String),
    #[error("no profile has {0} `{1}`")]
    NotFound(String, String),
    #[error("{0} `{1}` is already split off, alone in profile {2}")]
    AlreadyIsolated(String, String, i64),
    #[error(transparent)]
    Store(#[from] super::StoreError),
}

impl From<sqlx::Error> for LookupError {
    fn from(e: sqlx::Error) -> Self {
        LookupError::Store(e.into())
    }
}

pub use crate::identity::explain::{ExplainedIdentity, Explanation};

/// The value a lookup of `key = value` compares: the key's own rules applied
/// as ingest applies them (its `pattern`, first group kept, then its
/// normaliser), so `loyalty_id=L-2002` finds what ingest stored as `2002`.
pub fn lookup_value(m: &Manifest, key: &str, value: &str) -> Result<String, LookupError> {
    let Some(spec) = m.identity.keys.get(key) else {
        let keys: Vec<&str> = m.identity.keys.keys().map(String::as_str).collect();
        return Err(LookupError::UnknownKey(key.to_owned(), keys.join(", ")));
    };
    let invalid = |why: String| LookupError::Invalid(value.to_owned(), key.to_owned(), why);
    let mut raw = value;
    if let Some(p) = &spec.pattern {
        // Validation compiled the pattern already; an error here is reported, not unwrapped.
        let re = regex::Regex::new(p).map_err(|e| invalid(e.to_string()))?;
        let caps = re.captures(value).ok_or_else(|| invalid(format!("it does not match the key's pattern `{p}`")))?;
        raw = caps.get(1).or_else(|| caps.get(0)).map_or(value, |g| g.as_str());
    }
    let opts = normalize::Options::for_key(spec);
    normalize::normalize(spec.normalize.unwrap_or(Normalizer::Trim), raw, &opts).map_err(|e| invalid(e.to_string()))
}

impl Store {
    /// Finds the profile holding `key = value` (normalised as the key says).
    pub async fn find_profile(&self, m: &Manifest, key: &str, value: &str) -> Result<i64, LookupError> {
        let n = lookup_value(m, key, value)?;
        let row = sqlx::query(&self.sql("SELECT profile_id FROM identities WHERE key = ? AND value = ?"))
            .bind(key)
            .bind(&n)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(r.try_get(0)?),
            None => Err(LookupError::NotFound(key.to_owned(), n)),
        }
    }

    /// The golden record of a profile, with its `recent_events` newest events.
    /// Resolves `m`'s model for this one read; to read many profiles, resolve
    /// it once and use [`Store::golden_with`].
    pub async fn golden(&self, m: &Manifest, profile: i64, recent_events: usize) -> Result<GoldenRecord> {
        let model = profile::Model::new(m).map_err(super::StoreError::Manifest)?;
        self.golden_with(m, &model, profile, recent_events).await
    }

    /// [`Store::golden`] with the model already resolved.
    pub async fn golden_with(
        &self,
        m: &Manifest,
        model: &profile::Model,
        profile: i64,
        recent_events: usize,
    ) -> Result<GoldenRecord> {
        let rows = self.profile_rows(profile).await?;
        // Computed traits as activation keeps them, when it is current.
        let stored = if m.model.computed.is_empty() {
            None
        } else {
            self.computed_current(profile, &profile::computed::fingerprint(m)).await?
        };
        Ok(profile::golden_record_with(m, model, rows, recent_events, now_ms(), stored.as_deref()))
    }

    /// Everything stored of a profile: the rows its golden record is made of.
    /// Identifiers by first sighting, trait observations by trait and
    /// source, consent answers by identifier and purpose, events oldest
    /// first, entities by entity and key. The read of one profile by
    /// [`Store::profile_rows_many`].
    pub async fn profile_rows(&self, profile: i64) -> Result<ProfileRows> {
        let mut rows = self.profile_rows_many(&[profile]).await?;
        rows.pop().ok_or_else(|| super::StoreError::Invariant(format!("no rows came back for profile {profile}")))
    }

    async fn identities_of(&self, profile: i64) -> Result<Vec<IdentityRow>> {
        let rows = sqlx::query(&self.sql(
            "SELECT id, key, value, first_at, source, message_id, isolated FROM identities WHERE profile_id = ? ORDER BY first_at, id",
        ))
        .bind(profile)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(IdentityRow {
                    id: r.try_get(0)?,
                    key: r.try_get(1)?,
                    value: r.try_get(2)?,
                    first_at: r.try_get(3)?,
                    source: r.try_get(4)?,
                    message_id: r.try_get(5)?,
                    isolated: r.try_get::<i64, _>(6)? != 0,
                })
            })
            .collect()
    }

    /// Why this profile's identifiers are together: the rows
    /// [`explain::explain`] builds the answer from.
    pub async fn explain(&self, profile: i64) -> Result<Explanation> {
        let mut rows = ExplainRows { profile, identities: self.identities_of(profile).await?, ..Default::default() };
        let comps = sqlx::query(&self.sql("SELECT DISTINCT component FROM identities WHERE profile_id = ?"))
            .bind(profile)
            .fetch_all(&self.pool)
            .await?;
        for c in comps {
            let c: i64 = c.try_get(0)?;
            for r in
                sqlx::query(&self.sql("SELECT ids, at, source, message_id FROM links WHERE component = ? ORDER BY at"))
                    .bind(c)
                    .fetch_all(&self.pool)
                    .await?
            {
                let ids: String = r.try_get(0)?;
                rows.links.push(LinkRow {
                    ids: ids.split(',').filter_map(|x| x.parse().ok()).collect(),
                    at: r.try_get(1)?,
                    source: r.try_get(2)?,
                    message_id: r.try_get(3)?,
                });
            }
        }
        for r in sqlx::query(&self.sql(
            "SELECT at, kind, profile_id, other_profile_id, source, message_id, rule FROM ledger \
             WHERE profile_id = ? OR other_profile_id = ? ORDER BY id",
        ))
        .bind(profile)
        .bind(profile)
        .fetch_all(&self.pool)
        .await?
        {
            rows.ledger.push(LedgerRow {
                at: r.try_get(0)?,
                kind: r.try_get(1)?,
                profile_id: r.try_get(2)?,
                other_profile_id: r.try_get(3)?,
                source: r.try_get(4)?,
                message_id: r.try_get(5)?,
                rule: r.try_get(6)?,
            });
        }
        // Probabilistic links carry their score in the link record's payload.
        for msg in rows.match_records() {
            let row = sqlx::query(&self.sql("SELECT payload FROM records WHERE source = ? AND message_id = ?"))
                .bind(explain::MATCH_SOURCE)
                .bind(&msg)
                .fetch_optional(&self.pool)
                .await?;
            if let Some(r) = row {
                rows.scores.insert(msg, parse_json(&r.try_get::<String, _>(0)?));
            }
        }
        Ok(explain::explain(rows))
    }

    /// Splits `key = value` off its profile for good: the identifier becomes
    /// a profile of its own and no record joins it to another again. Records
    /// anchored on it move with it. Recorded in the ledger.
    pub async fn unmerge(&self, m: &Manifest, key: &str, value: &str) -> Result<(i64, i64), LookupError> {
        let from = self.find_profile(m, key, value).await?;
        let n = lookup_value(m, key, value)?;
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&self.sql("SELECT id, isolated FROM identities WHERE key = ? AND value = ?"))
            .bind(key)
            .bind(&n)
            .fetch_one(&mut *tx)
            .await?;
        let id: i64 = row.try_get(0)?;
        // Isolated identifiers are alone in their profile for good: splitting
        // one again would only make yet another profile.
        if row.try_get::<i64, _>(1)? != 0 {
            return Err(LookupError::AlreadyIsolated(key.to_owned(), n, from));
        }
        let to = self.next_id();
        let now = now_ms();
        sqlx::query(&self.sql("INSERT INTO profiles (id, created_at) VALUES (?, ?)"))
            .bind(to)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql("UPDATE identities SET profile_id = ?, isolated = 1 WHERE id = ?"))
            .bind(to)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql("UPDATE entities SET profile_id = ? WHERE identity_id = ?"))
            .bind(to)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql(
            "INSERT INTO ledger (at, kind, profile_id, other_profile_id, identity_id, rule) VALUES (?, 'unmerge', ?, ?, ?, ?)",
        ))
        .bind(now)
        .bind(to)
        .bind(from)
        .bind(id)
        .bind(format!("manual: {key} `{n}` split off and isolated"))
        .execute(&mut *tx)
        .await?;
        // Both profiles changed: activation re-evaluates them.
        let changes = serde_json::json!({ from.to_string(): ["identities"], to.to_string(): ["identities"] });
        self.append_outbox(&mut tx, &changes.to_string()).await?;
        tx.commit().await?;
        Ok((from, to))
    }

    /// Every identifier as `key=value`, grouped by profile and sorted: the
    /// partition tests and benchmarks compare.
    pub async fn partition(&self) -> Result<Vec<Vec<String>>> {
        let rows = sqlx::query("SELECT profile_id, key, value FROM identities ORDER BY profile_id, key, value")
            .fetch_all(&self.pool)
            .await?;
        let mut groups: IndexMap<i64, Vec<String>> = IndexMap::new();
        for r in rows {
            groups.entry(r.try_get(0)?).or_default().push(format!(
                "{}={}",
                r.try_get::<String, _>(1)?,
                r.try_get::<String, _>(2)?
            ));
        }
        let mut out: Vec<Vec<String>> = groups.into_values().collect();
        out.sort();
        Ok(out)
    }
}

fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}
