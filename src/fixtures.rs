//! `cdp test`: identity and audience rules reviewed like code. A fixture
//! file (YAML, in git next to the manifest) gives records per source and
//! expects profiles, audience members and consent decisions; the records go
//! through the real pipeline (mapping, identity resolution, probabilistic
//! matching) into a scratch SQLite store, and every expectation is checked
//! against the golden records.
//!
//! ```yaml
//! given:
//!   loyalty:
//!     - { member_no: L-1001, email: ada@example.org, tier: gold, email_opt_in: "true" }
//! expect:
//!   profiles: 1                       # how many profiles, optional
//!   profile:
//!     - lookup: loyalty_id=L-1001      # found by one of its identifiers
//!       identities: [email=ada@example.org]
//!       traits: { tier: gold }
//!       computed: { lifetime_value: 0 }
//!       consent: { email_marketing: true }
//!       audiences: [gold_members]     # exactly these
//!   audiences:
//!     gold_members: [loyalty_id=L-1001]   # exactly these members
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::ingest::Mapper;
use crate::manifest::{Manifest, yaml};
use crate::profile::GoldenRecord;
use crate::resolved::Resolved;
use crate::store::Store;

/// What one fixture file found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub file: PathBuf,
    pub checks: usize,
    /// One entry per failed check: what, expected, actual.
    pub failures: Vec<Failure>,
}

/// A failed expectation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub what: String,
    pub expected: String,
    pub actual: String,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(&mut self, what: impl Into<String>, expected: impl Into<String>, actual: impl Into<String>) {
        self.failures.push(Failure { what: what.into(), expected: expected.into(), actual: actual.into() });
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> (String, String, String)) {
        self.checks += 1;
        if !ok {
            let (w, e, a) = what();
            self.fail(w, e, a);
        }
    }
}

/// The fixture files (`*.yaml`, `*.yml`) of `dir`, sorted.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    out.sort();
    Ok(out)
}

/// Runs one fixture file against the resolved manifest `r` in a scratch store under `scratch`.
pub async fn run(r: &Resolved, file: &Path, scratch: &Path) -> Outcome {
    let mut out = Outcome { file: file.to_path_buf(), ..Outcome::default() };
    let fixture = match read(file) {
        Ok(f) => f,
        Err(e) => {
            out.fail("fixture file", "a readable fixture", e);
            return out;
        }
    };
    let store = match Store::connect("sqlite://fixture.db", scratch).await {
        Ok(s) => s,
        Err(e) => {
            out.fail("scratch store", "a store", e.to_string());
            return out;
        }
    };
    if let Err(e) = load(r, &store, &fixture, &mut out).await {
        out.fail("loading the given records", "no error", e);
        return out;
    }
    if let Err(e) = expect(r, &store, &fixture, &mut out).await {
        out.fail("reading the store", "no error", e);
    }
    out
}

fn read(file: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read it: {e}"))?;
    let doc = yaml::parse(&text);
    if let Some(d) = doc.diagnostics.iter().find(|d| d.is_error()) {
        return Err(format!("line {}:{}: {}", d.line, d.column, d.message));
    }
    let v = doc.value.ok_or("it is empty")?;
    let obj = v.as_object().ok_or("it must be a mapping with `given` and `expect`")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "given" | "expect" | "description") {
            return Err(format!("unknown key `{key}` (expected `given`, `expect`, `description`)"));
        }
    }
    Ok(v)
}

/// Ingests the `given` records, source by source, then matches.
async fn load(r: &Resolved, store: &Store, fixture: &Value, out: &mut Outcome) -> Result<(), String> {
    let (m, cfg) = (&*r.manifest, &r.identity);
    let now = crate::store::now_ms();
    let given = fixture.get("given").and_then(Value::as_object).ok_or("`given` must map sources to record lists")?;
    for (source, records) in given {
        let mut mapper = Mapper::new(m, source)?;
        let list = records.as_array().ok_or_else(|| format!("given.{source} must be a list of records"))?;
        let mut batch = Vec::with_capacity(list.len());
        for (i, raw) in list.iter().enumerate() {
            match mapper.map(raw, now) {
                Ok(r) => batch.push(r),
                Err(e) => out.fail(format!("given.{source}[{i}]"), "accepted", format!("rejected: {e}")),
            }
        }
        store.apply_batch(cfg, batch, None).await.map_err(|e| e.to_string())?;
    }
    if m.identity.matching.is_some() {
        store.match_profiles(m).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn expect(r: &Resolved, store: &Store, fixture: &Value, out: &mut Outcome) -> Result<(), String> {
    let m = &*r.manifest;
    let empty = Map::new();
    let expect = fixture.get("expect").and_then(Value::as_object).unwrap_or(&empty);
    let profiles = store.live_profiles().await.map_err(|e| e.to_string())?;
    let model = &r.model;
    if let Some(n) = expect.get("profiles") {
        out.check(n.as_u64() == Some(profiles.len() as u64), || {
            ("number of profiles".into(), n.to_string(), profiles.len().to_string())
        });
    }
    for p in expect.get("profile").and_then(Value::as_array).into_iter().flatten() {
        let lookup = p.get("lookup").and_then(Value::as_str).unwrap_or("");
        let what = format!("profile {lookup}");
        let Some(id) = find(m, store, lookup).await else {
            out.check(false, || (what.clone(), format!("a profile with {lookup}"), "none".into()));
            continue;
        };
        let g = store.golden_with(m, model, id, 0).await.map_err(|e| e.to_string())?;
        check_profile(p, &g, &what, out);
    }
    if let Some(auds) = expect.get("audiences").and_then(Value::as_object) {
        let mut members: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        let mut names: BTreeMap<i64, String> = BTreeMap::new();
        for id in &profiles {
            let g = store.golden_with(m, model, *id, 0).await.map_err(|e| e.to_string())?;
            for a in &g.audiences {
                members.entry(a.clone()).or_default().insert(*id);
            }
            names.insert(
                *id,
                g.identities.first().map_or_else(|| format!("profile {id}"), |i| format!("{}={}", i.key, i.value)),
            );
        }
        for (aud, want) in auds {
            let mut expected = BTreeSet::new();
            let mut labels = Vec::new();
            for w in want.as_array().into_iter().flatten().filter_map(Value::as_str) {
                labels.push(w.to_owned());
                match find(m, store, w).await {
                    Some(id) => {
                        expected.insert(id);
                    }
                    None => out.fail(format!("audience {aud}"), format!("a profile with {w}"), "none"),
                }
            }
            let actual = members.get(aud).cloned().unwrap_or_default();
            out.check(actual == expected, || {
                let show = |s: &BTreeSet<i64>| s.iter().map(|id| names[id].clone()).collect::<Vec<_>>().join(", ");
                let missing: BTreeSet<i64> = expected.difference(&actual).copied().collect();
                let extra: BTreeSet<i64> = actual.difference(&expected).copied().collect();
                (
                    format!("audience {aud} members"),
                    format!("[{}]", labels.join(", ")),
                    format!("missing [{}], unexpected [{}]", show(&missing), show(&extra)),
                )
            });
        }
    }
    Ok(())
}

/// The profile holding `KEY=VALUE`.
async fn find(m: &Manifest, store: &Store, lookup: &str) -> Option<i64> {
    let (key, value) = lookup.split_once('=')?;
    store.find_profile(m, key, value).await.ok()
}

fn check_profile(p: &Value, g: &GoldenRecord, what: &str, out: &mut Outcome) {
    let have: BTreeSet<String> = g.identities.iter().map(|i| format!("{}={}", i.key, i.value)).collect();
    for want in p.get("identities").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        out.check(have.contains(want), || {
            (format!("{what}: identity {want}"), want.to_owned(), have.iter().cloned().collect::<Vec<_>>().join(", "))
        });
    }
    for (name, want) in p.get("traits").and_then(Value::as_object).into_iter().flatten() {
        let actual = g.traits.get(name).map(|t| t.value.clone()).unwrap_or(Value::Null);
        out.check(same(want, &actual), || (format!("{what}: trait {name}"), want.to_string(), actual.to_string()));
    }
    for (name, want) in p.get("computed").and_then(Value::as_object).into_iter().flatten() {
        let actual = g.computed.get(name).cloned().unwrap_or(Value::Null);
        out.check(same(want, &actual), || (format!("{what}: computed {name}"), want.to_string(), actual.to_string()));
    }
    for (purpose, want) in p.get("consent").and_then(Value::as_object).into_iter().flatten() {
        let actual = g.consent.get(purpose).map(|c| c.granted);
        out.check(want.as_bool() == actual, || {
            (
                format!("{what}: consent {purpose}"),
                want.to_string(),
                actual.map_or("no such purpose".into(), |b| b.to_string()),
            )
        });
    }
    if let Some(want) = p.get("audiences").and_then(Value::as_array) {
        let want: BTreeSet<&str> = want.iter().filter_map(Value::as_str).collect();
        let actual: BTreeSet<&str> = g.audiences.iter().map(String::as_str).collect();
        out.check(want == actual, || (format!("{what}: audiences"), format!("{want:?}"), format!("{actual:?}")));
    }
}

/// Equal as values; numbers compare by value (`2` equals `2.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_by_value() {
        assert!(same(&serde_json::json!(2), &serde_json::json!(2.0)));
        assert!(!same(&serde_json::json!("2"), &serde_json::json!(2)));
        assert!(same(&serde_json::json!("gold"), &serde_json::json!("gold")));
    }
}
