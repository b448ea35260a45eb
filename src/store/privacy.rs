//! Privacy operations on the store: erasure, suppression, the access export's
//! rows, and the requests and destination receipts that track them.
//!
//! Erasure removes a person — every profile id that was ever theirs (merged
//! ones included) and every identifier of those profiles — from every table
//! in one transaction, and keeps only keyed hashes of the identifiers
//! (`privacy_marks`, HMAC-SHA256 under a key generated once per store), so
//! ingest can refuse what carries them without knowing the values. Rows of
//! other people stay, also when they shared an identifier the person's
//! profile did not hold (a household address, a recycled phone owned by
//! another profile). The audit log is append-only except for this: an
//! erasure redacts the person's identifier values from row targets (on a
//! SQLite store, whose audit log is a file of its own, right after the
//! erasure commits).

use std::collections::{BTreeSet, HashMap};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::Row;

use super::{Result, Store, StoreError, now_ms};

/// A mark's kind.
pub const ERASED: &str = "erased";
pub const SUPPRESSED: &str = "suppressed";

/// The keyed hash of an identifier: HMAC-SHA256 of `key`, a NUL and `value`, hex.
pub fn mark_hash(secret: &[u8], key: &str, value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(key.as_bytes());
    mac.update(&[0]);
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// What an erasure removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Erasure {
    pub request_id: i64,
    /// Profile ids erased (the person's, and those merged into it).
    pub profiles: usize,
    pub identifiers: usize,
    /// Rows deleted, by table.
    pub rows: std::collections::BTreeMap<String, u64>,
    /// Destinations the person was delivered to, which the erasure must reach.
    pub destinations: Vec<String>,
    /// Of those, the ones whose plugin can delete: a receipt is pending for each.
    pub pending: usize,
}

/// The person an erasure is about.
struct Person {
    profile: i64,
    /// Every profile id that was ever theirs.
    profiles: Vec<i64>,
    /// (id, key, value) of every identifier of those profiles.
    ids: Vec<(i64, String, String)>,
}

/// A privacy request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Request {
    pub id: i64,
    pub kind: String,
    pub key: String,
    pub state: String,
    pub actor: String,
    pub summary: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub receipts: Vec<Receipt>,
}

/// Where an erasure stands at one destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Receipt {
    pub destination: String,
    /// `pending`, `done`, `unsupported` (the plugin cannot delete) or `failed`.
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub receipt: Option<String>,
    pub updated_at: i64,
}

/// A receipt due to be attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueReceipt {
    pub request_id: i64,
    pub destination: String,
    pub attempts: i64,
    /// JSON Lines for the plugin's `delete`.
    pub payload: String,
}

impl Store {
    /// The store's privacy hashing key, generated on first use.
    pub async fn privacy_secret(&self) -> Result<Vec<u8>> {
        let read = || async {
            let row = sqlx::query("SELECT value FROM cdp_meta WHERE name = 'privacy_key'")
                .fetch_optional(self.pool())
                .await?;
            row.map(|r| r.try_get::<String, _>(0)).transpose().map_err(StoreError::from)
        };
        let text =
            match read().await? {
                Some(t) => t,
                None => {
                    let mut fresh = [0u8; 32];
                    getrandom::fill(&mut fresh)
                        .map_err(|e| StoreError::Invariant(format!("no randomness for the privacy key: {e}")))?;
                    sqlx::query(&self.sql(
                        "INSERT INTO cdp_meta (name, value) VALUES ('privacy_key', ?) ON CONFLICT (name) DO NOTHING",
                    ))
                    .bind(hex::encode(fresh))
                    .execute(self.pool())
                    .await?;
                    read().await?.ok_or_else(|| StoreError::Invariant("the privacy key was not stored".into()))?
                }
            };
        hex::decode(text).map_err(|e| StoreError::Invariant(format!("the stored privacy key is unreadable: {e}")))
    }

    /// Whether the store holds any privacy mark.
    pub(crate) async fn has_marks(&self, conn: &mut sqlx::AnyConnection) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM privacy_marks LIMIT 1").fetch_optional(&mut *conn).await?.is_some())
    }

    /// The marks among `pairs` (`(key, value)`), by pair: `erased` or `suppressed`
    /// (`erased` when both). Empty without a query when the store has no marks.
    pub(crate) async fn marks_of(
        &self,
        conn: &mut sqlx::AnyConnection,
        pairs: &[(&str, &str)],
    ) -> Result<HashMap<(String, String), &'static str>> {
        let mut out = HashMap::new();
        if pairs.is_empty() || !self.has_marks(conn).await? {
            return Ok(out);
        }
        let row =
            sqlx::query("SELECT value FROM cdp_meta WHERE name = 'privacy_key'").fetch_optional(&mut *conn).await?;
        let Some(row) = row else { return Ok(out) };
        let secret = hex::decode(row.try_get::<String, _>(0)?).unwrap_or_default();
        let hashes: HashMap<String, (&str, &str)> =
            pairs.iter().map(|(k, v)| (mark_hash(&secret, k, v), (*k, *v))).collect();
        let list: Vec<&String> = hashes.keys().collect();
        for chunk in list.chunks(super::IN_CHUNK) {
            let sql = format!("SELECT hash, kind FROM privacy_marks WHERE hash IN ({})", super::in_list(chunk.len()));
            let sql = self.sql(&sql);
            let mut q = sqlx::query(&sql);
            for h in chunk {
                q = q.bind(h.as_str());
            }
            for r in q.fetch_all(&mut *conn).await? {
                let hash: String = r.try_get(0)?;
                let kind: String = r.try_get(1)?;
                if let Some((k, v)) = hashes.get(&hash) {
                    let e = out.entry(((*k).to_owned(), (*v).to_owned())).or_insert(SUPPRESSED);
                    if kind == ERASED {
                        *e = ERASED;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every profile id that was ever the person's: `profile` and those merged into it.
    async fn lineage(&self, conn: &mut sqlx::AnyConnection, profile: i64) -> Result<Vec<i64>> {
        let mut all = BTreeSet::from([profile]);
        let mut frontier = vec![profile];
        while let Some(p) = frontier.pop() {
            let rows = sqlx::query(&self.sql("SELECT id FROM profiles WHERE merged_into = ?"))
                .bind(p)
                .fetch_all(&mut *conn)
                .await?;
            for r in rows {
                let id: i64 = r.try_get(0)?;
                if all.insert(id) {
                    frontier.push(id);
                }
            }
        }
        Ok(all.into_iter().collect())
    }

    /// Opens a request and returns its id.
    pub async fn open_request(&self, kind: &str, subject: &str, key: &str, actor: &str, state: &str) -> Result<i64> {
        let now = now_ms();
        let row = sqlx::query(&self.sql(
            "INSERT INTO privacy_requests (kind, subject, key, state, actor, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        ))
        .bind(kind)
        .bind(subject)
        .bind(key)
        .bind(state)
        .bind(actor)
        .bind(now)
        .bind(now)
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get(0)?)
    }

    /// Closes a request with `state` and a summary.
    pub async fn close_request(&self, id: i64, state: &str, summary: &str) -> Result<()> {
        sqlx::query(&self.sql("UPDATE privacy_requests SET state = ?, summary = ?, updated_at = ? WHERE id = ?"))
            .bind(state)
            .bind(summary)
            .bind(now_ms())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Erases the person whose profile is `profile` (see the module comment)
    /// under request `request_id`. `deletable` says which destinations'
    /// plugins can delete: those the person was delivered to get a pending
    /// receipt with the identities to delete, the others an `unsupported` one.
    pub async fn erase(
        &self,
        request_id: i64,
        profile: i64,
        deletable: &(dyn Fn(&str) -> Option<bool> + Sync),
    ) -> Result<Erasure> {
        let secret = self.privacy_secret().await?;
        let mut tx = self.begin_write().await?;
        let p = self.person(&mut tx, profile).await?;
        let mut er = Erasure { request_id, profiles: p.profiles.len(), identifiers: p.ids.len(), ..Erasure::default() };
        // Tombstones first: from this commit on, ingest refuses the identifiers.
        self.tombstone(&mut tx, &secret, request_id, &p).await?;
        self.queue_receipts(&mut tx, request_id, &p, deletable, &mut er).await?;
        self.delete_rows(&mut tx, &p, &mut er).await?;
        self.redact(&mut tx, request_id, &p, &mut er).await?;
        tx.commit().await?;
        if let Some(pool) = self.audit_pool() {
            // The audit log's own file (`audit.rs`): redacted right after.
            let mut conn = pool.acquire().await?;
            for pattern in redactions(&p) {
                let n = self.redact_audit(&mut conn, request_id, &pattern).await?;
                *er.rows.entry("audit_log (redacted)".to_owned()).or_default() += n;
            }
        }
        Ok(er)
    }

    /// Every profile id that was ever the person's, and every identifier of them.
    async fn person(&self, tx: &mut sqlx::AnyConnection, profile: i64) -> Result<Person> {
        let profiles = self.lineage(&mut *tx, profile).await?;
        let mut ids: Vec<(i64, String, String)> = Vec::new();
        for r in self
            .select_in(&mut *tx, "SELECT id, key, value FROM identities WHERE profile_id IN ({})", &profiles)
            .await?
        {
            ids.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
        }
        Ok(Person { profile, profiles, ids })
    }

    /// A keyed-hash tombstone per identifier.
    async fn tombstone(&self, tx: &mut sqlx::AnyConnection, secret: &[u8], request_id: i64, p: &Person) -> Result<()> {
        let now = now_ms();
        for (_, k, v) in &p.ids {
            sqlx::query(&self.sql(
                "INSERT INTO privacy_marks (hash, kind, key, request_id, created_at) VALUES (?, 'erased', ?, ?, ?) \
                 ON CONFLICT (hash, kind) DO NOTHING",
            ))
            .bind(mark_hash(secret, k, v))
            .bind(k)
            .bind(request_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }

        Ok(())
    }

    /// A receipt for every destination that holds or was sent the person:
    /// `pending` with what to delete where the plugin can delete.
    async fn queue_receipts(
        &self,
        tx: &mut sqlx::AnyConnection,
        request_id: i64,
        p: &Person,
        deletable: &(dyn Fn(&str) -> Option<bool> + Sync),
        er: &mut Erasure,
    ) -> Result<()> {
        let now = now_ms();
        let in_p = super::in_list(p.profiles.len());
        // The destinations that hold or were sent the person, with what they were sent.
        let mut sent: std::collections::BTreeMap<String, serde_json::Value> = std::collections::BTreeMap::new();
        let sql = self
            .sql(&format!("SELECT destination, identities FROM destination_members WHERE profile_id IN ({in_p})"))
            .into_owned();
        let q = bind_all(sqlx::query(&sql), &p.profiles);
        for r in q.fetch_all(&mut *tx).await? {
            let d: String = r.try_get(0)?;
            let v: String = r.try_get(1)?;
            sent.insert(d, serde_json::from_str(&v).unwrap_or(serde_json::Value::Null));
        }
        let sql = self
            .sql(&format!(
                "SELECT DISTINCT destination FROM deliveries WHERE state = 'delivered' AND profile_id IN ({in_p})"
            ))
            .into_owned();
        let q = bind_all(sqlx::query(&sql), &p.profiles);
        for r in q.fetch_all(&mut *tx).await? {
            sent.entry(r.try_get(0)?).or_insert(serde_json::Value::Null);
        }
        let mut all: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
        for (_, k, v) in &p.ids {
            all.entry(k.clone()).or_default().push(v.clone());
        }
        for (d, was_sent) in &sent {
            // Every identifier, and the values the destination was sent
            // (hashed ones as it holds them).
            let mut identities = all.clone();
            for (k, vs) in was_sent.as_object().into_iter().flatten() {
                let list = identities.entry(k.clone()).or_default();
                for v in vs.as_array().into_iter().flatten().filter_map(|v| v.as_str()) {
                    if !list.iter().any(|x| x == v) {
                        list.push(v.to_owned());
                    }
                }
            }
            let line = serde_json::json!({
                "key": format!("erasure-{request_id}"),
                "profile_id": p.profile.to_string(),
                "identities": identities,
            });
            let (state, payload) = match deletable(d) {
                Some(true) => ("pending", Some(format!("{line}\n"))),
                Some(false) => ("unsupported", None),
                None => ("failed", None),
            };
            sqlx::query(&self.sql(
                "INSERT INTO privacy_receipts (request_id, destination, state, attempts, run_at, payload, last_error, updated_at) \
                 VALUES (?, ?, ?, 0, ?, ?, ?, ?)",
            ))
            .bind(request_id)
            .bind(d)
            .bind(state)
            .bind(now)
            .bind(payload)
            .bind(match state {
                "unsupported" => Some("the destination's plugin has no `delete` capability; remove the person there by hand"),
                "failed" => Some("the destination is no longer in the manifest"),
                _ => None,
            })
            .bind(now)
            .execute(&mut *tx)
            .await?;
            er.destinations.push(d.clone());
            if state == "pending" {
                er.pending += 1;
            }
        }

        Ok(())
    }

    /// The person's rows in every table.
    async fn delete_rows(&self, tx: &mut sqlx::AnyConnection, p: &Person, er: &mut Erasure) -> Result<()> {
        let id_list: Vec<i64> = p.ids.iter().map(|i| i.0).collect();
        // Rows keyed by identifier.
        for (table, col) in [("records", "identity_id"), ("trait_obs", "identity_id"), ("consent", "identity_id")] {
            let n = self.delete_in(&mut *tx, &format!("DELETE FROM {table} WHERE {col} IN ({{}})"), &id_list).await?;
            *er.rows.entry(table.to_owned()).or_default() += n;
        }
        // Links that name any of the identifiers.
        let erased: BTreeSet<i64> = id_list.iter().copied().collect();
        // A link's `ids` lists its identifiers' ids, comma-separated; links
        // are found by the components the identifiers were in.
        let mut links_deleted = 0u64;
        for r in self
            .select_in(
                &mut *tx,
                "SELECT ids FROM links WHERE component IN (SELECT component FROM identities WHERE id IN ({}))",
                &id_list,
            )
            .await?
        {
            let text: String = r.try_get(0)?;
            if text.split(',').filter_map(|x| x.parse::<i64>().ok()).any(|x| erased.contains(&x)) {
                links_deleted += sqlx::query(&self.sql("DELETE FROM links WHERE ids = ?"))
                    .bind(&text)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        *er.rows.entry("links".to_owned()).or_default() += links_deleted;

        // Rows keyed by profile.
        for (table, sql) in [
            ("entities", "DELETE FROM entities WHERE profile_id IN ({})"),
            ("ledger", "DELETE FROM ledger WHERE profile_id IN ({})"),
            ("ledger", "DELETE FROM ledger WHERE other_profile_id IN ({})"),
            ("audience_members", "DELETE FROM audience_members WHERE profile_id IN ({})"),
            ("audience_changes", "DELETE FROM audience_changes WHERE profile_id IN ({})"),
            ("destination_members", "DELETE FROM destination_members WHERE profile_id IN ({})"),
            ("deliveries", "DELETE FROM deliveries WHERE profile_id IN ({})"),
            ("identities", "DELETE FROM identities WHERE profile_id IN ({})"),
            ("profiles", "DELETE FROM profiles WHERE id IN ({})"),
        ] {
            let n = self.delete_in(&mut *tx, sql, &p.profiles).await?;
            *er.rows.entry(table.to_owned()).or_default() += n;
        }
        let n = self.delete_in(&mut *tx, "DELETE FROM entities WHERE identity_id IN ({})", &id_list).await?;
        *er.rows.entry("entities".to_owned()).or_default() += n;
        let n = self.delete_in(&mut *tx, "DELETE FROM ledger WHERE identity_id IN ({})", &id_list).await?;
        *er.rows.entry("ledger".to_owned()).or_default() += n;

        Ok(())
    }

    /// Free text that may quote an identifier: rejected records go, audit targets are redacted.
    async fn redact(&self, tx: &mut sqlx::AnyConnection, request_id: i64, p: &Person, er: &mut Erasure) -> Result<()> {
        for pattern in redactions(p) {
            let n = sqlx::query(
                &self.sql("DELETE FROM sync_rejects WHERE record LIKE ? ESCAPE '\\' OR reason LIKE ? ESCAPE '\\'"),
            )
            .bind(&pattern)
            .bind(&pattern)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            *er.rows.entry("sync_rejects".to_owned()).or_default() += n;
            if self.audit_pool().is_none() {
                let n = self.redact_audit(&mut *tx, request_id, &pattern).await?;
                *er.rows.entry("audit_log (redacted)".to_owned()).or_default() += n;
            }
        }
        Ok(())
    }

    async fn delete_in(&self, conn: &mut sqlx::AnyConnection, template: &str, ids: &[i64]) -> Result<u64> {
        let mut n = 0;
        for chunk in ids.chunks(super::IN_CHUNK) {
            let sql = template.replacen("{}", &super::in_list(chunk.len()), 1);
            let sql = self.sql(&sql).into_owned();
            n += bind_all(sqlx::query(&sql), chunk).execute(&mut *conn).await?.rows_affected();
        }
        Ok(n)
    }

    /// Marks (or, with `on` false, unmarks) every identifier of the
    /// person's profile as suppressed, and appends an outbox entry so
    /// activation removes them from every destination. Returns how many
    /// identifiers changed.
    pub async fn suppress(&self, profile: i64, on: bool, request_id: i64) -> Result<usize> {
        let secret = self.privacy_secret().await?;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(&self.sql("SELECT key, value FROM identities WHERE profile_id = ?"))
            .bind(profile)
            .fetch_all(&mut *tx)
            .await?;
        let mut n = 0;
        for r in &rows {
            let k: String = r.try_get(0)?;
            let v: String = r.try_get(1)?;
            let hash = mark_hash(&secret, &k, &v);
            let insert = self.sql(
                "INSERT INTO privacy_marks (hash, kind, key, request_id, created_at) VALUES (?, 'suppressed', ?, ?, ?) \
                 ON CONFLICT (hash, kind) DO NOTHING",
            );
            let delete = self.sql("DELETE FROM privacy_marks WHERE hash = ? AND kind = 'suppressed'");
            let q = if on {
                sqlx::query(&insert).bind(hash).bind(k).bind(request_id).bind(now)
            } else {
                sqlx::query(&delete).bind(hash)
            };
            n += q.execute(&mut *tx).await?.rows_affected() as usize;
        }
        let changes = serde_json::json!({ profile.to_string(): ["consent"] }).to_string();
        self.append_outbox(&mut tx, &changes).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Which of `profiles` are suppressed (any identifier marked).
    pub async fn suppressed_profiles(&self, profiles: &[i64]) -> Result<BTreeSet<i64>> {
        let mut out = BTreeSet::new();
        if profiles.is_empty() {
            return Ok(out);
        }
        let mut conn = self.read_pool().acquire().await?;
        let any = sqlx::query("SELECT 1 FROM privacy_marks WHERE kind = 'suppressed' LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
        if any.is_none() {
            return Ok(out);
        }
        let rows = self
            .select_in(&mut conn, "SELECT profile_id, key, value FROM identities WHERE profile_id IN ({})", profiles)
            .await?;
        let mut pairs: Vec<(i64, String, String)> = Vec::new();
        for r in rows {
            pairs.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
        }
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(_, k, v)| (k.as_str(), v.as_str())).collect();
        let marks = self.marks_of(&mut conn, &refs).await?;
        for (p, k, v) in &pairs {
            if marks.get(&(k.clone(), v.clone())) == Some(&SUPPRESSED) {
                out.insert(*p);
            }
        }
        Ok(out)
    }

    /// Requests, newest first, or the one with `id`, with their receipts.
    pub async fn requests(&self, id: Option<i64>, limit: i64) -> Result<Vec<Request>> {
        let rows = sqlx::query(&self.sql(
            "SELECT id, kind, key, state, actor, summary, created_at, updated_at FROM privacy_requests \
             WHERE (? IS NULL OR id = ?) ORDER BY id DESC LIMIT ?",
        ))
        .bind(id)
        .bind(id)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let id: i64 = r.try_get(0)?;
            let receipts = sqlx::query(&self.sql(
                "SELECT destination, state, attempts, last_error, receipt, updated_at FROM privacy_receipts \
                 WHERE request_id = ? ORDER BY destination",
            ))
            .bind(id)
            .fetch_all(self.read_pool())
            .await?
            .iter()
            .map(|x| {
                Ok(Receipt {
                    destination: x.try_get(0)?,
                    state: x.try_get(1)?,
                    attempts: x.try_get(2)?,
                    last_error: x.try_get(3)?,
                    receipt: x.try_get(4)?,
                    updated_at: x.try_get(5)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
            out.push(Request {
                id,
                kind: r.try_get(1)?,
                key: r.try_get(2)?,
                state: r.try_get(3)?,
                actor: r.try_get(4)?,
                summary: r.try_get(5)?,
                created_at: r.try_get(6)?,
                updated_at: r.try_get(7)?,
                receipts,
            });
        }
        Ok(out)
    }

    /// Pending receipts whose time has come.
    pub async fn due_receipts(&self, limit: i64) -> Result<Vec<DueReceipt>> {
        let rows = sqlx::query(&self.sql(
            "SELECT request_id, destination, attempts, payload FROM privacy_receipts \
             WHERE state = 'pending' AND run_at <= ? ORDER BY run_at LIMIT ?",
        ))
        .bind(now_ms())
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DueReceipt {
                    request_id: r.try_get(0)?,
                    destination: r.try_get(1)?,
                    attempts: r.try_get(2)?,
                    payload: r.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Records an attempt at a receipt: `Ok(receipt)` done (its payload is
    /// wiped), `Err((error, retry_at))` still pending; `retry_at` `None` fails it.
    /// A request whose receipts are all settled is closed.
    pub async fn settle_receipt(
        &self,
        request_id: i64,
        destination: &str,
        outcome: std::result::Result<String, (String, Option<i64>)>,
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.pool().begin().await?;
        match outcome {
            Ok(receipt) => {
                sqlx::query(&self.sql(
                    "UPDATE privacy_receipts SET state = 'done', payload = NULL, receipt = ?, attempts = attempts + 1, \
                     last_error = NULL, updated_at = ? WHERE request_id = ? AND destination = ?",
                ))
                .bind(receipt)
                .bind(now)
                .bind(request_id)
                .bind(destination)
                .execute(&mut *tx)
                .await?;
            }
            Err((error, retry_at)) => {
                sqlx::query(&self.sql(
                    "UPDATE privacy_receipts SET state = CASE WHEN ? IS NULL THEN 'failed' ELSE 'pending' END, \
                     payload = CASE WHEN ? IS NULL THEN NULL ELSE payload END, \
                     run_at = COALESCE(?, run_at), attempts = attempts + 1, last_error = ?, updated_at = ? \
                     WHERE request_id = ? AND destination = ?",
                ))
                .bind(retry_at)
                .bind(retry_at)
                .bind(retry_at)
                .bind(error)
                .bind(now)
                .bind(request_id)
                .bind(destination)
                .execute(&mut *tx)
                .await?;
            }
        }
        sqlx::query(&self.sql(
            "UPDATE privacy_requests SET state = 'done', updated_at = ? WHERE id = ? AND state = 'propagating' \
             AND NOT EXISTS (SELECT 1 FROM privacy_receipts WHERE request_id = ? AND state = 'pending')",
        ))
        .bind(now)
        .bind(request_id)
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Everything the store holds about the person whose profile is
    /// `profile`, as one JSON document: the golden record, every identifier
    /// with provenance, every raw record and event, trait observations,
    /// consent answers, entities, audience history, deliveries and the
    /// identity ledger — across every profile id that was ever theirs.
    pub async fn privacy_export(&self, m: &crate::manifest::Manifest, profile: i64) -> Result<serde_json::Value> {
        use serde_json::{Value, json};
        let golden = self.golden(m, profile, usize::MAX).await?;
        let mut conn = self.read_pool().acquire().await?;
        let profiles = self.lineage(&mut conn, profile).await?;
        let ids: Vec<i64> = self
            .select_in(&mut conn, "SELECT id FROM identities WHERE profile_id IN ({})", &profiles)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?;
        let text = |r: &sqlx::any::AnyRow, i: usize| r.try_get::<Option<String>, _>(i).ok().flatten();
        let json_text =
            |s: Option<String>| s.map_or(Value::Null, |t| serde_json::from_str(&t).unwrap_or(Value::String(t)));
        let identities: Vec<Value> = self
            .select_in(
                &mut conn,
                "SELECT key, value, first_at, source, message_id, isolated FROM identities WHERE id IN ({}) ORDER BY first_at",
                &ids,
            )
            .await?
            .iter()
            .map(|r| {
                json!({"type": text(r, 0), "value": text(r, 1), "first_seen": r.try_get::<i64, _>(2).ok().map(crate::profile::iso),
                       "source": text(r, 3), "message_id": text(r, 4), "split_off": r.try_get::<i64, _>(5).unwrap_or(0) != 0})
            })
            .collect();
        let records: Vec<Value> = self
            .select_in(
                &mut conn,
                "SELECT source, message_id, at, received_at, kind, name, payload FROM records WHERE identity_id IN ({}) \
                 ORDER BY at, source, message_id",
                &ids,
            )
            .await?
            .iter()
            .map(|r| {
                json!({"source": text(r, 0), "message_id": text(r, 1), "at": r.try_get::<i64, _>(2).ok().map(crate::profile::iso),
                       "received_at": r.try_get::<i64, _>(3).ok().map(crate::profile::iso), "kind": text(r, 4),
                       "name": text(r, 5), "payload": json_text(text(r, 6))})
            })
            .collect();
        let traits: Vec<Value> = self
            .select_in(
                &mut conn,
                "SELECT name, source, first_value, first_at, last_value, last_at, n FROM trait_obs WHERE identity_id IN ({}) \
                 ORDER BY name, source",
                &ids,
            )
            .await?
            .iter()
            .map(|r| {
                json!({"name": text(r, 0), "source": text(r, 1), "first": json_text(text(r, 2)),
                       "first_at": r.try_get::<i64, _>(3).ok().map(crate::profile::iso), "last": json_text(text(r, 4)),
                       "last_at": r.try_get::<i64, _>(5).ok().map(crate::profile::iso), "observations": r.try_get::<i64, _>(6).ok()})
            })
            .collect();
        let consent: Vec<Value> = self
            .select_in(&mut conn, "SELECT purpose, granted, at, source, message_id FROM consent WHERE identity_id IN ({})", &ids)
            .await?
            .iter()
            .map(|r| {
                json!({"purpose": text(r, 0), "granted": r.try_get::<i64, _>(1).unwrap_or(0) != 0,
                       "at": r.try_get::<i64, _>(2).ok().map(crate::profile::iso), "source": text(r, 3), "message_id": text(r, 4)})
            })
            .collect();
        let audiences: Vec<Value> = self
            .select_in(
                &mut conn,
                "SELECT audience, entered, at FROM audience_changes WHERE profile_id IN ({}) ORDER BY at, id",
                &profiles,
            )
            .await?
            .iter()
            .map(|r| {
                json!({"audience": text(r, 0), "change": if r.try_get::<i64, _>(1).unwrap_or(0) != 0 { "entered" } else { "exited" },
                       "at": r.try_get::<i64, _>(2).ok().map(crate::profile::iso)})
            })
            .collect();
        let deliveries: Vec<Value> = self
            .select_in(
                &mut conn,
                "SELECT destination, op, audience, state, created_at, done_at, record FROM deliveries WHERE profile_id IN ({}) ORDER BY id",
                &profiles,
            )
            .await?
            .iter()
            .map(|r| {
                json!({"destination": text(r, 0), "op": text(r, 1), "audience": text(r, 2), "state": text(r, 3),
                       "queued_at": r.try_get::<i64, _>(4).ok().map(crate::profile::iso),
                       "done_at": r.try_get::<Option<i64>, _>(5).ok().flatten().map(crate::profile::iso),
                       "record": json_text(text(r, 6))})
            })
            .collect();
        let ledger: Vec<Value> = self
            .select_in(
                &mut conn,
                "SELECT at, kind, profile_id, other_profile_id, source, message_id, rule FROM ledger WHERE profile_id IN ({}) ORDER BY at, id",
                &profiles,
            )
            .await?
            .iter()
            .map(|r| {
                json!({"at": r.try_get::<i64, _>(0).ok().map(crate::profile::iso), "kind": text(r, 1),
                       "profile_id": r.try_get::<i64, _>(2).ok().map(|p| p.to_string()),
                       "other_profile_id": r.try_get::<Option<i64>, _>(3).ok().flatten().map(|p| p.to_string()),
                       "source": text(r, 4), "message_id": text(r, 5), "rule": text(r, 6)})
            })
            .collect();
        Ok(json!({
            "profile_id": profile.to_string(),
            "profile_ids": profiles.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "golden_record": golden,
            "identities": identities,
            "records": records,
            "trait_observations": traits,
            "consent": consent,
            "audience_history": audiences,
            "deliveries": deliveries,
            "identity_ledger": ledger,
        }))
    }
}

/// LIKE patterns (`\\` escapes) for free text that may quote one of the
/// person's identifier values; values shorter than 3 characters would match
/// too much to mean them.
fn redactions(p: &Person) -> Vec<String> {
    p.ids
        .iter()
        .filter(|(_, _, v)| v.len() >= 3)
        .map(|(_, _, v)| format!("%{}%", v.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")))
        .collect()
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ids: &[i64],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for id in ids {
        q = q.bind(*id);
    }
    q
}
