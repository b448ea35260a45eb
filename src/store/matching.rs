//! Running probabilistic matching over the stored profiles: read each
//! profile's compared traits, block, fit the Fellegi–Sunter model, and turn
//! every pair above the manifest's threshold into a link record between the
//! two profiles' strongest identifiers. Links go through the same resolution
//! as deterministic ones, so limits still hold (two CRM ids never merge) and
//! every merge is in the ledger with its score and field weights.

use super::ingest::{BatchReport, IdentityConfig};
use super::{Result, Store, now_ms};
use crate::identity::matching::{self, FieldSpec, Item};
use crate::ingest::Record;
use crate::manifest::Manifest;
use rustc_hash::FxHashMap;
use serde_json::json;
use sqlx::Row;

/// What a matching run did.
#[derive(Debug, Default, Clone)]
pub struct MatchReport {
    pub profiles: usize,
    pub candidates: usize,
    pub skipped_blocks: usize,
    pub lambda: f64,
    pub links: usize,
    pub batch: BatchReport,
}

impl Store {
    /// Links profiles whose match probability reaches `identity.match.threshold`.
    /// A merged profile is compared again with its merged values, so passes
    /// repeat (at most five) until one merges nothing.
    pub async fn match_profiles(&self, m: &Manifest) -> Result<MatchReport> {
        let mut total = MatchReport::default();
        for pass in 0..5 {
            let r = self.match_pass(m).await?;
            if pass == 0 {
                total.profiles = r.profiles;
                total.candidates = r.candidates;
                total.skipped_blocks = r.skipped_blocks;
                total.lambda = r.lambda;
            }
            total.links += r.links;
            total.batch.add(&r.batch);
            if r.batch.merges == 0 {
                break;
            }
        }
        Ok(total)
    }

    async fn match_pass(&self, m: &Manifest) -> Result<MatchReport> {
        let Some(mt) = &m.identity.matching else { return Ok(MatchReport::default()) };
        let cfg = IdentityConfig::from_manifest(m);
        let specs: Vec<FieldSpec> = mt.compare.iter().map(|(n, c)| FieldSpec::from_manifest(n, c)).collect();
        let field_index: FxHashMap<&str, usize> = specs.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();

        // Latest value of each compared trait per profile.
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let sql = format!(
            "SELECT i.profile_id, t.name, t.last_value, t.last_at FROM trait_obs t JOIN identities i ON i.id = t.identity_id \
             WHERE t.name IN ({})",
            super::in_list(names.len())
        );
        let sql = self.sql(&sql).into_owned();
        let mut q = sqlx::query(&sql);
        for n in &names {
            q = q.bind(*n);
        }
        let mut latest: FxHashMap<i64, Vec<Option<(i64, String)>>> = FxHashMap::default();
        for r in q.fetch_all(&self.pool).await? {
            let profile: i64 = r.try_get(0)?;
            let name: String = r.try_get(1)?;
            let raw: String = r.try_get(2)?;
            let at: i64 = r.try_get(3)?;
            let Some(&f) = field_index.get(name.as_str()) else { continue };
            let value = match serde_json::from_str::<serde_json::Value>(&raw) {
                Ok(serde_json::Value::String(s)) => s,
                Ok(v) => v.to_string(),
                Err(_) => raw,
            };
            let slot = &mut latest.entry(profile).or_insert_with(|| vec![None; specs.len()])[f];
            if slot.as_ref().is_none_or(|(t, _)| at > *t) {
                *slot = Some((at, value.trim().to_lowercase()));
            }
        }
        let mut items: Vec<Item> = latest
            .into_iter()
            .map(|(id, vals)| Item { id, values: vals.into_iter().map(|v| v.map(|(_, s)| s)).collect() })
            .collect();
        items.sort_by_key(|i| i.id);
        let rules: Vec<Vec<usize>> = mt
            .block_on
            .iter()
            .map(|r| r.iter().filter_map(|f| field_index.get(f.as_str()).copied()).collect())
            .collect();
        let (pairs, skipped) = matching::candidates(&items, &rules);
        let model = matching::estimate(&specs, &items, &rules, 17);
        let mut report = MatchReport {
            profiles: items.len(),
            candidates: pairs.len(),
            skipped_blocks: skipped,
            lambda: model.lambda,
            ..MatchReport::default()
        };
        let linked: Vec<matching::Scored> = pairs
            .iter()
            .map(|(a, b)| matching::score(&model, &specs, &items, *a, *b))
            .filter(|s| s.probability >= mt.threshold)
            .collect();
        if linked.is_empty() {
            return Ok(report);
        }

        // Each profile is represented by its strongest identifier.
        let profiles: Vec<i64> = {
            let mut p: Vec<i64> =
                linked.iter().flat_map(|s| [items[s.a as usize].id, items[s.b as usize].id]).collect();
            p.sort_unstable();
            p.dedup();
            p
        };
        let mut anchor: FxHashMap<i64, (u32, String, String)> = FxHashMap::default();
        let mut conn = self.pool.acquire().await?;
        let rows = self
            .select_in(&mut conn, "SELECT profile_id, key, value FROM identities WHERE profile_id IN ({})", &profiles)
            .await?;
        // SQLite has one connection: give it back before writing.
        drop(conn);
        for r in rows {
            let (p, k, v): (i64, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let cand = (cfg.rank(&k), k, v);
            match anchor.get(&p) {
                Some(cur) if *cur <= cand => {}
                _ => {
                    anchor.insert(p, cand);
                }
            }
        }
        let at = now_ms();
        let mut records = Vec::with_capacity(linked.len());
        for s in &linked {
            let (Some(a), Some(b)) = (anchor.get(&items[s.a as usize].id), anchor.get(&items[s.b as usize].id)) else {
                continue;
            };
            let (x, y) = if (&a.1, &a.2) <= (&b.1, &b.2) { (a, b) } else { (b, a) };
            let fields: Vec<serde_json::Value> = s
                .contributions
                .iter()
                .map(|(f, l, w)| {
                    let level = ["disagree", "close", "agree"][*l];
                    json!({"field": specs[*f].name, "level": level, "weight": (w * 100.0).round() / 100.0})
                })
                .collect();
            records.push(Record {
                source: "match".into(),
                message_id: format!("{}={}~{}={}", x.1, x.2, y.1, y.2),
                at,
                ids: vec![(x.1.clone(), x.2.clone()), (y.1.clone(), y.2.clone())],
                traits: Vec::new(),
                event: None,
                entity: None,
                consent: Vec::new(),
                meta: Some(json!({
                    "rule": "probabilistic (Fellegi-Sunter)",
                    "probability": (s.probability * 10_000.0).round() / 10_000.0,
                    "weight": (s.weight * 100.0).round() / 100.0,
                    "fields": fields,
                })),
            });
        }
        report.links = records.len();
        for chunk in records.chunks(5_000) {
            let r = self.apply_batch(&cfg, chunk.to_vec(), None).await?;
            report.batch.add(&r);
        }
        Ok(report)
    }
}
