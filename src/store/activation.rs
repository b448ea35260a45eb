//! Activation's rows: audience membership and its history, what each
//! destination holds, and the delivery queue with its dead letters.
//!
//! Membership, holdings and the deliveries they cause change together in one
//! transaction ([`Store::apply_activation`]), with the outbox position they
//! were computed up to, so a crash repeats an evaluation or skips none and
//! never sends a record the holdings do not account for. Deliveries are
//! claimed like jobs (a claim runs out, `FOR UPDATE SKIP LOCKED` on
//! PostgreSQL): in id order, and never one whose profile has an earlier
//! record for the same destination still pending, so a destination sees each
//! person's changes in the order they happened.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use sqlx::Row;

use super::{Backend, Result, Store, now_ms, values_clause};
use crate::activation::{Held, Outgoing};
use crate::consent::LedgerRow;

/// Rows per multi-row INSERT.
const CHUNK: usize = 400;

/// Everything one evaluation step writes.
#[derive(Debug, Default)]
pub struct ActivationWrite {
    /// (audience, profile, entered).
    pub audience_changes: Vec<(String, i64, bool)>,
    /// Records for destinations with their idempotency keys.
    pub outgoing: Vec<(Outgoing, String)>,
    /// When the changes the records follow were committed (for the
    /// event-to-delivery time).
    pub origin_at: i64,
    /// Audiences evaluated by this step: (name, rule, whether it was a full pass).
    pub evaluated: Vec<(String, String, bool)>,
    /// Destinations reconciled by this step (a full pass): (name, fingerprint).
    pub reconciled: Vec<(String, String)>,
    /// Destinations this step paused: (name, fingerprint, reason).
    pub paused: Vec<(String, String, String)>,
    /// The outbox position the step covers, for reader `activation`.
    pub outbox: Option<i64>,
    /// Computed traits of the profiles evaluated: (profile, [(name, JSON value)]);
    /// an empty list for a profile that is gone.
    pub computed: Vec<(i64, Vec<(String, String)>)>,
    /// [`crate::profile::computed::fingerprint`] of the definitions they were computed by.
    pub computed_spec: String,
}

/// The stored side of a set of profiles: their audiences and what each destination holds.
#[derive(Debug, Default)]
pub struct Stored {
    pub audiences: HashMap<i64, BTreeSet<String>>,
    /// (destination, profile) → held.
    pub held: HashMap<(String, i64), Held>,
}

/// An audience's last evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudienceState {
    pub audience: String,
    pub rule: String,
    pub members: i64,
    pub evaluated_at: i64,
    /// The last full pass.
    pub full_at: i64,
}

/// A destination's reconciliation state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationState {
    pub destination: String,
    pub fingerprint: String,
    pub paused: bool,
    pub reason: Option<String>,
    /// An operator resumed it: the next step reconciles it in full.
    pub reconcile: bool,
}

/// One delivery row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub destination: String,
    pub profile: i64,
    pub op: String,
    pub audience: Option<String>,
    pub key: String,
    /// The record, JSON, with its `key`.
    pub record: String,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub origin_at: i64,
    pub created_at: i64,
    pub done_at: Option<i64>,
}

/// How a claimed delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Delivered,
    /// Not sent: the consent check at send time denied it, or the profile is gone.
    Suppressed(String),
    /// Not sent: a later record for the same person and destination replaces it.
    Superseded,
    /// Try again at this time.
    Retry {
        at: i64,
        error: String,
    },
    /// Given up: kept in the dead-letter store.
    Dead(String),
}

impl Settle {
    /// The metric outcome: `delivered`, `retried`, `dead`, `suppressed`, `superseded`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Settle::Delivered => "delivered",
            Settle::Retry { .. } => "retried",
            Settle::Dead(_) => "dead",
            Settle::Suppressed(_) => "suppressed",
            Settle::Superseded => "superseded",
        }
    }

    fn state(&self) -> &'static str {
        match self {
            Settle::Delivered => "delivered",
            Settle::Suppressed(_) => "suppressed",
            Settle::Superseded => "superseded",
            Settle::Retry { .. } => "ready",
            Settle::Dead(_) => "dead",
        }
    }
}

const DELIVERY_COLUMNS: &str = "id, destination, profile_id, op, audience, key, record, state, attempts, last_error, origin_at, created_at, done_at";

fn delivery_of(r: &sqlx::any::AnyRow) -> Result<Delivery> {
    Ok(Delivery {
        id: r.try_get(0)?,
        destination: r.try_get(1)?,
        profile: r.try_get(2)?,
        op: r.try_get(3)?,
        audience: r.try_get(4)?,
        key: r.try_get(5)?,
        record: r.try_get(6)?,
        state: r.try_get(7)?,
        attempts: r.try_get(8)?,
        last_error: r.try_get(9)?,
        origin_at: r.try_get(10)?,
        created_at: r.try_get(11)?,
        done_at: r.try_get(12)?,
    })
}

impl Store {
    /// The stored audiences and holdings of `profiles`.
    pub async fn activation_stored(&self, profiles: &[i64]) -> Result<Stored> {
        let mut out = Stored::default();
        if profiles.is_empty() {
            return Ok(out);
        }
        let mut conn = self.read_pool().acquire().await?;
        for r in self
            .select_in(
                &mut conn,
                "SELECT profile_id, audience FROM audience_members WHERE profile_id IN ({})",
                profiles,
            )
            .await?
        {
            out.audiences.entry(r.try_get(0)?).or_default().insert(r.try_get(1)?);
        }
        for r in self
            .select_in(
                &mut conn,
                "SELECT destination, profile_id, digest, identities FROM destination_members WHERE profile_id IN ({})",
                profiles,
            )
            .await?
        {
            out.held.insert((r.try_get(0)?, r.try_get(1)?), Held { digest: r.try_get(2)?, identities: r.try_get(3)? });
        }
        Ok(out)
    }

    /// The materialised computed traits of `profile`, when activation keeps
    /// them current: it has read the whole outbox (so no change of the
    /// profile is pending) and evaluated the profile under definitions
    /// `spec`. Windowed traits are as of the last evaluation (swept hourly).
    pub async fn computed_current(&self, profile: i64, spec: &str) -> Result<Option<Vec<(String, String)>>> {
        let read: Option<(i64, i64)> = sqlx::query(
            "SELECT h.seq, COALESCE(r.position, 0) FROM outbox_head h \
             LEFT JOIN outbox_readers r ON r.name = 'activation' WHERE h.id = 1",
        )
        .fetch_optional(self.read_pool())
        .await?
        .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;
        if read.is_some_and(|(head, position)| position < head) {
            return Ok(None);
        }
        let rows = sqlx::query(&self.sql("SELECT name, value FROM computed_values WHERE profile_id = ? AND spec = ?"))
            .bind(profile)
            .bind(spec)
            .fetch_all(self.read_pool())
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_>>()?))
    }

    /// A value of the store's own (`cdp_meta`).
    pub async fn meta(&self, name: &str) -> Result<Option<String>> {
        let row = sqlx::query(&self.sql("SELECT value FROM cdp_meta WHERE name = ?"))
            .bind(name)
            .fetch_optional(self.read_pool())
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    pub async fn set_meta(&self, name: &str, value: &str) -> Result<()> {
        sqlx::query(&self.sql(
            "INSERT INTO cdp_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        ))
        .bind(name)
        .bind(value)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Every member of `audience`.
    pub async fn audience_member_ids(&self, audience: &str) -> Result<Vec<i64>> {
        let rows =
            sqlx::query(&self.sql("SELECT profile_id FROM audience_members WHERE audience = ? ORDER BY profile_id"))
                .bind(audience)
                .fetch_all(self.read_pool())
                .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Members of `audience` with the time they entered, `limit` at most, newest first.
    pub async fn audience_members(&self, audience: &str, limit: i64) -> Result<Vec<(i64, i64)>> {
        let rows = sqlx::query(&self.sql(
            "SELECT profile_id, since FROM audience_members WHERE audience = ? ORDER BY since DESC, profile_id LIMIT ?",
        ))
        .bind(audience)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    /// Entries and exits of `audience` since `since`: (entered, exited).
    pub async fn audience_change_counts(&self, audience: &str, since: i64) -> Result<(i64, i64)> {
        let row = sqlx::query(&self.sql(
            "SELECT CAST(COALESCE(SUM(entered), 0) AS BIGINT), CAST(COALESCE(SUM(1 - entered), 0) AS BIGINT) \
             FROM audience_changes \
             WHERE audience = ? AND at >= ?",
        ))
        .bind(audience)
        .bind(since)
        .fetch_one(self.read_pool())
        .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// What `destination` holds, by profile.
    pub async fn destination_held(&self, destination: &str) -> Result<HashMap<i64, Held>> {
        let rows = sqlx::query(
            &self.sql("SELECT profile_id, digest, identities FROM destination_members WHERE destination = ?"),
        )
        .bind(destination)
        .fetch_all(self.read_pool())
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, Held { digest: r.try_get(1)?, identities: r.try_get(2)? }))).collect()
    }

    /// Every audience's last evaluation.
    pub async fn audience_states(&self) -> Result<HashMap<String, AudienceState>> {
        let rows = sqlx::query("SELECT audience, rule, members, evaluated_at, full_at FROM audience_state")
            .fetch_all(self.read_pool())
            .await?;
        rows.iter()
            .map(|r| {
                let s = AudienceState {
                    audience: r.try_get(0)?,
                    rule: r.try_get(1)?,
                    members: r.try_get(2)?,
                    evaluated_at: r.try_get(3)?,
                    full_at: r.try_get(4)?,
                };
                Ok((s.audience.clone(), s))
            })
            .collect()
    }

    /// Every destination's reconciliation state.
    pub async fn destination_states(&self) -> Result<HashMap<String, DestinationState>> {
        let rows = sqlx::query("SELECT destination, fingerprint, paused, reason, reconcile FROM destination_state")
            .fetch_all(self.read_pool())
            .await?;
        rows.iter()
            .map(|r| {
                let s = DestinationState {
                    destination: r.try_get(0)?,
                    fingerprint: r.try_get(1)?,
                    paused: r.try_get::<i64, _>(2)? != 0,
                    reason: r.try_get(3)?,
                    reconcile: r.try_get::<i64, _>(4)? != 0,
                };
                Ok((s.destination.clone(), s))
            })
            .collect()
    }

    /// Releases a destination the shrink guard paused: the next evaluation
    /// reconciles it in full, without the guard. `false` when it was not paused.
    pub async fn resume_destination(&self, destination: &str) -> Result<bool> {
        let r = sqlx::query(&self.sql(
            "UPDATE destination_state SET paused = 0, reason = NULL, reconcile = 1, updated_at = ? \
             WHERE destination = ? AND paused = 1",
        ))
        .bind(now_ms())
        .bind(destination)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Writes one evaluation step in one transaction: membership changes and
    /// their history, holdings, deliveries, audience and destination states,
    /// and the outbox position.
    pub async fn apply_activation(&self, w: &ActivationWrite) -> Result<()> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        for chunk in w.audience_changes.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO audience_changes (audience, profile_id, entered, at) VALUES {}",
                values_clause(chunk.len(), 4)
            );
            let sql = self.sql(&sql);
            let mut q = sqlx::query(&sql);
            for (a, p, e) in chunk {
                q = q.bind(a).bind(*p).bind(i64::from(*e)).bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        let (entered, exited): (Vec<_>, Vec<_>) = w.audience_changes.iter().partition(|c| c.2);
        for chunk in entered.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO audience_members (audience, profile_id, since) VALUES {} ON CONFLICT DO NOTHING",
                values_clause(chunk.len(), 3)
            );
            let sql = self.sql(&sql);
            let mut q = sqlx::query(&sql);
            for (a, p, _) in chunk {
                q = q.bind(a).bind(*p).bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        for (a, p, _) in exited {
            sqlx::query(&self.sql("DELETE FROM audience_members WHERE audience = ? AND profile_id = ?"))
                .bind(a)
                .bind(*p)
                .execute(&mut *tx)
                .await?;
        }
        for chunk in w.outgoing.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO deliveries (destination, profile_id, op, audience, key, record, state, attempts, run_at, \
                 origin_at, created_at) VALUES {}",
                values_clause(chunk.len(), 11)
            );
            let sql = self.sql(&sql);
            let mut q = sqlx::query(&sql);
            for (o, key) in chunk {
                let mut record = o.record.clone();
                record["key"] = serde_json::Value::String(key.clone());
                q = q
                    .bind(&o.destination)
                    .bind(o.profile)
                    .bind(o.op.as_str())
                    .bind(o.audience.clone())
                    .bind(key)
                    .bind(record.to_string())
                    .bind("ready")
                    .bind(0_i64)
                    .bind(now)
                    .bind(w.origin_at)
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        // What each destination holds afterwards: the last record per
        // (destination, profile) of this step decides.
        let mut last: std::collections::BTreeMap<(&str, i64), Option<&Held>> = std::collections::BTreeMap::new();
        for (o, _) in &w.outgoing {
            last.insert((o.destination.as_str(), o.profile), o.hold.as_ref());
        }
        let holds: Vec<((&str, i64), &Held)> = last.iter().filter_map(|(k, h)| h.map(|h| (*k, h))).collect();
        let drops: Vec<(&str, i64)> = last.iter().filter(|(_, h)| h.is_none()).map(|(k, _)| *k).collect();
        for chunk in holds.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO destination_members (destination, profile_id, digest, identities, since) VALUES {} \
                 ON CONFLICT (destination, profile_id) DO UPDATE SET digest = excluded.digest, identities = excluded.identities",
                values_clause(chunk.len(), 5)
            );
            let sql = self.sql(&sql);
            let mut q = sqlx::query(&sql);
            for ((d, p), h) in chunk {
                q = q.bind(*d).bind(*p).bind(&h.digest).bind(&h.identities).bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        for (d, p) in drops {
            sqlx::query(&self.sql("DELETE FROM destination_members WHERE destination = ? AND profile_id = ?"))
                .bind(d)
                .bind(p)
                .execute(&mut *tx)
                .await?;
        }
        // Computed traits: each evaluated profile's values replace its stored ones.
        let profiles: Vec<i64> = w.computed.iter().map(|c| c.0).collect();
        for chunk in profiles.chunks(super::IN_CHUNK) {
            let sql = format!("DELETE FROM computed_values WHERE profile_id IN ({})", super::in_list(chunk.len()));
            let sql = self.sql(&sql);
            let mut q = sqlx::query(&sql);
            for p in chunk {
                q = q.bind(*p);
            }
            q.execute(&mut *tx).await?;
        }
        let values: Vec<(i64, &str, &str)> =
            w.computed.iter().flat_map(|(p, vs)| vs.iter().map(move |(n, v)| (*p, n.as_str(), v.as_str()))).collect();
        for chunk in values.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO computed_values (profile_id, name, value, spec, updated_at) VALUES {}",
                values_clause(chunk.len(), 5)
            );
            let sql = self.sql(&sql);
            let mut q = sqlx::query(&sql);
            for (p, n, v) in chunk {
                q = q.bind(*p).bind(*n).bind(*v).bind(&w.computed_spec).bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        // Realtime steps keep each audience's size by its entries and exits.
        let mut delta: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for (a, _, entered) in &w.audience_changes {
            if !w.evaluated.iter().any(|e| e.0 == *a) {
                *delta.entry(a.as_str()).or_default() += if *entered { 1 } else { -1 };
            }
        }
        for (a, d) in delta {
            sqlx::query(
                &self.sql("UPDATE audience_state SET members = members + ?, evaluated_at = ? WHERE audience = ?"),
            )
            .bind(d)
            .bind(now)
            .bind(a)
            .execute(&mut *tx)
            .await?;
        }
        for (a, rule, full) in &w.evaluated {
            sqlx::query(&self.sql(
                "INSERT INTO audience_state (audience, rule, members, evaluated_at, full_at) \
                 VALUES (?, ?, (SELECT COUNT(*) FROM audience_members WHERE audience = ?), ?, ?) \
                 ON CONFLICT (audience) DO UPDATE SET rule = excluded.rule, members = excluded.members, \
                 evaluated_at = excluded.evaluated_at, \
                 full_at = CASE WHEN ? = 1 THEN excluded.full_at ELSE audience_state.full_at END",
            ))
            .bind(a)
            .bind(rule)
            .bind(a)
            .bind(now)
            .bind(if *full { now } else { 0 })
            .bind(i64::from(*full))
            .execute(&mut *tx)
            .await?;
        }
        for (d, fingerprint) in &w.reconciled {
            sqlx::query(&self.sql(
                "INSERT INTO destination_state (destination, fingerprint, paused, reason, reconcile, updated_at) \
                 VALUES (?, ?, 0, NULL, 0, ?) ON CONFLICT (destination) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 paused = 0, reason = NULL, reconcile = 0, updated_at = excluded.updated_at",
            ))
            .bind(d)
            .bind(fingerprint)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        for (d, fingerprint, reason) in &w.paused {
            sqlx::query(&self.sql(
                "INSERT INTO destination_state (destination, fingerprint, paused, reason, reconcile, updated_at) \
                 VALUES (?, ?, 1, ?, 0, ?) ON CONFLICT (destination) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 paused = 1, reason = excluded.reason, reconcile = 0, updated_at = excluded.updated_at",
            ))
            .bind(d)
            .bind(fingerprint)
            .bind(reason)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(seq) = w.outbox {
            sqlx::query(&self.sql(
                "INSERT INTO outbox_readers (name, position, updated_at) VALUES ('activation', ?, ?) \
                 ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at \
                 WHERE excluded.position > outbox_readers.position",
            ))
            .bind(seq)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Claims up to `limit` due deliveries of `destination` for `worker` for
    /// `ttl`, oldest first, skipping any whose person has an earlier pending
    /// record for the destination. Each claim counts an attempt.
    pub async fn claim_deliveries(
        &self,
        destination: &str,
        worker: &str,
        limit: usize,
        ttl: Duration,
    ) -> Result<Vec<Delivery>> {
        let now = now_ms();
        let skip = if self.backend == Backend::Postgres { " FOR UPDATE SKIP LOCKED" } else { "" };
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4).max(1);
        let sql = format!(
            "UPDATE deliveries SET state = 'running', attempts = attempts + 1, claimed_by = ?, claimed_until = ? \
             WHERE id IN (SELECT d.id FROM deliveries d WHERE d.destination = ? \
               AND ((d.state = 'ready' AND d.run_at <= ?) OR (d.state = 'running' AND d.claimed_until <= ?)) \
               AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.destination = d.destination \
                 AND e.profile_id = d.profile_id AND e.id < d.id AND e.state IN ('ready', 'running')) \
               ORDER BY d.id LIMIT ?{skip}) \
             RETURNING {DELIVERY_COLUMNS}"
        );
        let rows = sqlx::query(&self.sql(&sql))
            .bind(worker)
            .bind(now + ttl)
            .bind(destination)
            .bind(now)
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await?;
        let mut out: Vec<Delivery> = rows.iter().map(delivery_of).collect::<Result<_>>()?;
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    /// Ids among `ids` that a later record of the same person and destination replaces.
    pub async fn superseded(&self, ids: &[i64]) -> Result<Vec<i64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.read_pool().acquire().await?;
        let rows = self
            .select_in(
                &mut conn,
                "SELECT d.id FROM deliveries d WHERE d.id IN ({}) AND EXISTS (SELECT 1 FROM deliveries e \
                 WHERE e.destination = d.destination AND e.profile_id = d.profile_id AND e.id > d.id \
                 AND e.state IN ('ready', 'running', 'delivered'))",
                ids,
            )
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// When the oldest due delivery of `destination` was queued, and how many are due.
    pub async fn due_deliveries(&self, destination: &str) -> Result<(Option<i64>, i64)> {
        let row = sqlx::query(&self.sql(
            "SELECT MIN(created_at), COUNT(*) FROM deliveries WHERE destination = ? AND state = 'ready' AND run_at <= ?",
        ))
        .bind(destination)
        .bind(now_ms())
        .fetch_one(self.read_pool())
        .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// The next time a delivery of `destination` becomes due, if any is waiting.
    pub async fn next_due(&self, destination: &str) -> Result<Option<i64>> {
        let row = sqlx::query(&self.sql(
            "SELECT MIN(CASE WHEN state = 'ready' THEN run_at ELSE claimed_until END) FROM deliveries \
             WHERE destination = ? AND state IN ('ready', 'running')",
        ))
        .bind(destination)
        .fetch_one(self.read_pool())
        .await?;
        Ok(row.try_get(0)?)
    }

    /// Records how claimed deliveries ended. Only rows still claimed by
    /// `worker` change (a claim that ran out belongs to someone else now).
    pub async fn settle_deliveries(&self, worker: &str, outcomes: &[(i64, Settle)]) -> Result<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool().begin().await?;
        // Delivered and superseded records settle in one statement each.
        for (state, ids) in [
            ("delivered", outcomes.iter().filter(|o| o.1 == Settle::Delivered).map(|o| o.0).collect::<Vec<_>>()),
            ("superseded", outcomes.iter().filter(|o| o.1 == Settle::Superseded).map(|o| o.0).collect::<Vec<_>>()),
        ] {
            for chunk in ids.chunks(crate::store::IN_CHUNK) {
                let sql = format!(
                    "UPDATE deliveries SET state = ?, done_at = ?, claimed_until = NULL \
                     WHERE claimed_by = ? AND state = 'running' AND id IN ({})",
                    crate::store::in_list(chunk.len())
                );
                let sql = self.sql(&sql);
                let mut q = sqlx::query(&sql).bind(state).bind(now).bind(worker);
                for id in chunk {
                    q = q.bind(*id);
                }
                q.execute(&mut *tx).await?;
            }
        }
        for (id, s) in outcomes.iter().filter(|o| !matches!(o.1, Settle::Delivered | Settle::Superseded)) {
            let (run_at, error) = match s {
                Settle::Retry { at, error } => (Some(*at), Some(error.as_str())),
                Settle::Dead(e) | Settle::Suppressed(e) => (None, Some(e.as_str())),
                Settle::Delivered | Settle::Superseded => (None, None),
            };
            let done = (!matches!(s, Settle::Retry { .. })).then_some(now);
            sqlx::query(&self.sql(
                "UPDATE deliveries SET state = ?, run_at = COALESCE(?, run_at), last_error = COALESCE(?, last_error), \
                 done_at = ?, claimed_until = NULL WHERE id = ? AND claimed_by = ? AND state = 'running'",
            ))
            .bind(s.state())
            .bind(run_at)
            .bind(error)
            .bind(done)
            .bind(*id)
            .bind(worker)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Dead letters, oldest first, of one destination or all.
    pub async fn dead_letters(&self, destination: Option<&str>, limit: i64) -> Result<Vec<Delivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE state = 'dead' AND (? IS NULL OR destination = ?) \
             ORDER BY id LIMIT ?"
        );
        let rows = sqlx::query(&self.sql(&sql))
            .bind(destination)
            .bind(destination)
            .bind(limit)
            .fetch_all(self.read_pool())
            .await?;
        rows.iter().map(delivery_of).collect()
    }

    /// The newest deliveries of a destination, any state.
    pub async fn recent_deliveries(&self, destination: &str, limit: i64) -> Result<Vec<Delivery>> {
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE destination = ? ORDER BY id DESC LIMIT ?");
        let rows = sqlx::query(&self.sql(&sql)).bind(destination).bind(limit).fetch_all(self.read_pool()).await?;
        rows.iter().map(delivery_of).collect()
    }

    /// Puts dead letters (of one destination or all) back in the queue with
    /// their keys, attempts counted afresh; the consent and supersession
    /// checks run again when they are sent. Returns how many.
    pub async fn replay_dead(&self, destination: Option<&str>) -> Result<u64> {
        let r = sqlx::query(&self.sql(
            "UPDATE deliveries SET state = 'ready', attempts = 0, run_at = ?, done_at = NULL \
             WHERE state = 'dead' AND (? IS NULL OR destination = ?)",
        ))
        .bind(now_ms())
        .bind(destination)
        .bind(destination)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// Deliveries by destination and state.
    pub async fn delivery_counts(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state ORDER BY 1, 2",
        )
        .fetch_all(self.read_pool())
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect()
    }

    /// How many profiles each destination holds.
    pub async fn destination_sizes(&self) -> Result<HashMap<String, i64>> {
        let rows = sqlx::query("SELECT destination, COUNT(*) FROM destination_members GROUP BY destination")
            .fetch_all(self.read_pool())
            .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    /// Forgets finished deliveries (delivered, suppressed, superseded) of
    /// `destination` beyond the newest `keep`; dead letters stay.
    pub async fn prune_deliveries(&self, destination: &str, keep: i64) -> Result<u64> {
        let r = sqlx::query(&self.sql(
            "DELETE FROM deliveries WHERE destination = ? AND state IN ('delivered', 'suppressed', 'superseded') \
             AND id < (SELECT COALESCE(MIN(id), 0) FROM (SELECT id FROM deliveries WHERE destination = ? \
             AND state IN ('delivered', 'suppressed', 'superseded') ORDER BY id DESC LIMIT ?) AS newest)",
        ))
        .bind(destination)
        .bind(destination)
        .bind(keep)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// The consent ledger of each of `profiles` as it stands now, and which
    /// of them still have identifiers (a merged or erased profile has none).
    pub async fn consent_now(&self, profiles: &[i64]) -> Result<(HashMap<i64, Vec<LedgerRow>>, BTreeSet<i64>)> {
        let mut conn = self.read_pool().acquire().await?;
        let mut ledger: HashMap<i64, Vec<LedgerRow>> = HashMap::new();
        for r in self
            .select_in(
                &mut conn,
                "SELECT i.profile_id, c.purpose, c.granted, c.at, c.source FROM consent c \
                 JOIN identities i ON i.id = c.identity_id WHERE i.profile_id IN ({})",
                profiles,
            )
            .await?
        {
            ledger.entry(r.try_get(0)?).or_default().push(LedgerRow {
                purpose: r.try_get(1)?,
                granted: r.try_get::<i64, _>(2)? != 0,
                at: r.try_get(3)?,
                source: r.try_get(4)?,
            });
        }
        let live = self
            .select_in(&mut conn, "SELECT DISTINCT profile_id FROM identities WHERE profile_id IN ({})", profiles)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?;
        Ok((ledger, live))
    }
}
