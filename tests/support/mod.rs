//! Shared by the store test files: a fresh store on each backend (a SQLite
//! file in a temp dir and a scratch database on the machine's PostgreSQL,
//! `CDP_TEST_PG`, default `postgres://root@127.0.0.1:5432/test`).
#![allow(dead_code)]

pub mod run;

use cdp::store::Store;
use std::sync::atomic::{AtomicUsize, Ordering};

static DB: AtomicUsize = AtomicUsize::new(0);

pub fn admin_url() -> String {
    std::env::var("CDP_TEST_PG").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// A fresh scratch PostgreSQL database: its URL and name.
pub async fn scratch_pg(tag: &str) -> (String, String) {
    let admin_url = admin_url();
    let name = format!("cdp_{tag}_{}_{}", std::process::id(), DB.fetch_add(1, Ordering::SeqCst));
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is required (set CDP_SKIP_PG=1 to skip): {e}"));
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&admin).await.expect("drop");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
    admin.close().await;
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("bad CDP_TEST_PG"),
    };
    (url, name)
}

/// Store URLs on each backend: (backend name, url, scratch database name).
pub async fn urls(dir: &std::path::Path, tag: &str) -> Vec<(&'static str, String, Option<String>)> {
    let mut out = vec![("sqlite", format!("sqlite://{}", dir.join("cdp.db").display()), None)];
    if std::env::var_os("CDP_SKIP_PG").is_none() {
        let (url, name) = scratch_pg(tag).await;
        out.push(("postgres", url, Some(name)));
    }
    out
}

/// A fresh store on each backend: (name, store, scratch database, temp dir).
pub async fn backends(tag: &str) -> Vec<(&'static str, Store, Option<String>, tempfile::TempDir)> {
    let mut out = Vec::new();
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, url, db) in urls(dir.path(), tag).await {
        let store = Store::connect(&url, dir.path()).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        out.push((name, store, db, tempfile::tempdir().expect("tempdir")));
    }
    // Keep the SQLite file's directory alive with the first entry.
    if let Some(first) = out.first_mut() {
        first.3 = dir;
    }
    out
}

pub async fn drop_db(name: Option<String>) {
    if let Some(name) = name
        && let Ok(admin) = sqlx::AnyPool::connect(&admin_url()).await
    {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await;
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime")
}
