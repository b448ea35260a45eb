//! Leases: named pieces of work (a source's sync, an audience's evaluation)
//! that one holder at a time may do, shared through the database by every
//! task and process (replica) writing to the store. A lease expires unless
//! renewed, so the work moves on when its holder dies; each change of hands
//! takes a new fencing token, strictly increasing per name, and a write made
//! under a lease ([`Store::apply_batch_fenced`]) checks that token inside
//! its own transaction, so a holder whose lease expired cannot commit after
//! the next holder took over.
//!
//! Time is the database's clock on PostgreSQL (replicas on several machines
//! agree on it) and the process clock on SQLite (one machine).
//!
//! Every change is one statement: on PostgreSQL the row lock of the upsert
//! orders contenders, and a fenced commit holds a share lock on the lease
//! row from its check to its commit, so a takeover waits for that commit.
//! On SQLite the database's single writer orders them.

use super::{Backend, Result, Store};
use sqlx::Row;
use std::time::Duration;

/// A lease as held: who, under which fencing token, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// Strictly increasing per name each time the lease changes hands.
    pub token: i64,
    /// Milliseconds since the epoch (the database's clock on PostgreSQL).
    pub expires_at: i64,
}

const COLUMNS: &str = "name, holder, token, expires_at";

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4).max(1)
}

fn lease_of(row: &sqlx::any::AnyRow) -> Result<Lease> {
    Ok(Lease { name: row.try_get(0)?, holder: row.try_get(1)?, token: row.try_get(2)?, expires_at: row.try_get(3)? })
}

impl Store {
    /// The current time in milliseconds as an SQL expression: the
    /// database's clock on PostgreSQL, SQLite's (the machine's) otherwise.
    pub(crate) fn now_sql(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    /// Takes the lease if free or expired; a new fencing token (strictly
    /// increasing per name) each time it changes hands. `None` while another
    /// holder (or this one, under an earlier take) holds it.
    pub async fn try_acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        let now = self.now_sql();
        let sql = format!(
            "INSERT INTO leases ({COLUMNS}) VALUES (?, ?, 1, {now} + ?) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = leases.token + 1, \
             expires_at = excluded.expires_at WHERE leases.expires_at <= {now} RETURNING {COLUMNS}"
        );
        let row =
            sqlx::query(&self.sql(&sql)).bind(name).bind(holder).bind(ttl_ms(ttl)).fetch_optional(self.pool()).await?;
        row.as_ref().map(lease_of).transpose()
    }

    /// Extends a held lease; `Ok(None)` when it was lost (expired and taken,
    /// or token moved on, or released). A lease that expired but that nobody
    /// took yet is still this holder's: no other token was handed out.
    pub async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>> {
        let sql = format!(
            "UPDATE leases SET expires_at = {} + ? WHERE name = ? AND holder = ? AND token = ? AND expires_at > 0 \
             RETURNING {COLUMNS}",
            self.now_sql()
        );
        let row = sqlx::query(&self.sql(&sql))
            .bind(ttl_ms(ttl))
            .bind(&lease.name)
            .bind(&lease.holder)
            .bind(lease.token)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(lease_of).transpose()
    }

    /// Gives a held lease up at once (the next taker need not wait for it to
    /// expire). The token stays, so the next one is still higher. Releasing
    /// a lease already lost does nothing.
    pub async fn release_lease(&self, lease: &Lease) -> Result<()> {
        sqlx::query(&self.sql("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ? AND token = ?"))
            .bind(&lease.name)
            .bind(&lease.holder)
            .bind(lease.token)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Who holds `name` now (not expired), if anyone.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<Lease>> {
        let sql = format!("SELECT {COLUMNS} FROM leases WHERE name = ? AND expires_at > {}", self.now_sql());
        let row = sqlx::query(&self.sql(&sql)).bind(name).fetch_optional(self.read_pool()).await?;
        row.as_ref().map(lease_of).transpose()
    }

    /// Inside a committing transaction: fails with
    /// [`StoreError::LeaseLost`](super::StoreError::LeaseLost) unless `lease`
    /// is still current (its token) and unexpired. On PostgreSQL the check
    /// keeps a share lock on the lease row until the transaction ends, so
    /// nobody takes the lease over between this check and the commit.
    pub(crate) async fn check_fence(&self, conn: &mut sqlx::AnyConnection, lease: &Lease) -> Result<()> {
        let lock = if self.backend == Backend::Postgres { " FOR SHARE" } else { "" };
        let sql =
            format!("SELECT token FROM leases WHERE name = ? AND token = ? AND expires_at > {}{lock}", self.now_sql());
        let row = sqlx::query(&self.sql(&sql)).bind(&lease.name).bind(lease.token).fetch_optional(&mut *conn).await?;
        match row {
            Some(_) => Ok(()),
            None => Err(super::StoreError::LeaseLost { name: lease.name.clone(), token: lease.token }),
        }
    }
}
