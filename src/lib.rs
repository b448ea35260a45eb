//! cdp: a customer data platform run from one YAML manifest in git.
//!
//! Data flows sources → validate and map → identity resolution → profiles →
//! audiences → destinations. This crate holds every stage as a library; the
//! `cdp` binary is a thin command-line shell over it.
//!
//! Modules, in the order dependencies point: [`manifest`] (the typed manifest
//! and its validation) ← pure domain: [`audience`] (the rule language),
//! [`identity`] (normalisation and resolution), [`ingest`] (mapping records
//! onto the model), [`profile`] (the golden record: trait merge, computed
//! traits), [`consent`] (purpose decisions) ← [`store`] (SQLite/PostgreSQL:
//! rows in, rows out), [`plugin`] (the Wasm host) ← [`runtime`] (`cdp run`:
//! schedules, syncs, reload) ← [`cli`], [`bench`].

pub mod activation;
pub mod audience;
pub mod bench;
pub mod cli;
pub mod consent;
pub mod fixtures;
pub mod identity;
pub mod ingest;
pub mod manifest;
pub mod metrics;
pub mod plugin;
pub mod privacy;
pub mod profile;
pub mod resolved;
pub mod rng;
pub mod runtime;
pub mod schedule;
pub mod server;
pub mod store;
pub mod text;
pub mod units;
