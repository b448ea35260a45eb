//! Migrations when replicas start together: several processes' worth of
//! connections open one fresh store at the same moment, on both backends;
//! each migration is applied once and every opener succeeds. A database
//! migrated by a different build (checksum mismatch) is refused.

mod support;

use cdp::store::{Store, StoreError};
use sqlx::Row;
use support::{drop_db, rt, urls};

#[test]
fn stores_opened_at_the_same_moment_apply_each_migration_once() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        for (backend, url, db) in urls(dir.path(), "mig").await {
            let opens: Vec<_> = (0..6)
                .map(|_| {
                    let (url, path) = (url.clone(), dir.path().to_owned());
                    tokio::spawn(async move { Store::connect(&url, &path).await })
                })
                .collect();
            let mut stores = Vec::new();
            for o in opens {
                stores.push(o.await.expect("task").unwrap_or_else(|e| panic!("{backend}: {e}")));
            }
            let store = &stores[0];
            let rows = sqlx::query("SELECT version, COUNT(*) FROM cdp_migrations GROUP BY version ORDER BY version")
                .fetch_all(store.pool())
                .await
                .expect("history");
            assert!(rows.len() >= 3, "{backend}");
            for r in &rows {
                assert_eq!(r.try_get::<i64, _>(1).expect("count"), 1, "{backend}");
            }
            // A different build's migration: refused with what and why.
            sqlx::query("UPDATE cdp_migration_checksums SET checksum = 'feedface' WHERE version = 1")
                .execute(store.pool())
                .await
                .expect("tamper");
            drop(stores);
            match Store::connect(&url, dir.path()).await {
                Err(StoreError::MigrationChanged { version: 1, .. }) => {}
                other => panic!("{backend}: expected MigrationChanged, got {other:?}"),
            }
            drop_db(db).await;
        }
    });
}
