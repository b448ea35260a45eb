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
use rustc_hash::{FxHashMap, FxHashSet};
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

/// The cursor saying up to which records matching has run: the newest
/// `received_at` of a non-link record when the last complete run started.
pub const MATCHED_STREAM: &str = "identity:matched";

/// Match links applied per transaction. A batch of links rewrites identifiers
/// and links all over the components it joins; fewer, larger commits write
/// each dirtied page once instead of once per batch, and a component two
/// batches touch is loaded once. 100,000 links (a pass over 100,000 people)
/// took 7.9 s in one transaction and 9.3 s in five (`cdp bench identity`).
const LINK_BATCH: usize = 100_000;

/// Identifiers whose compared traits one read returns.
const TRAIT_PAGE: i64 = 20_000;

impl Store {
    /// The newest `received_at` of any record that is not a match link.
    async fn newest_received(&self) -> Result<Option<i64>> {
        let row =
            sqlx::query("SELECT MAX(received_at) FROM records WHERE source <> 'match'").fetch_one(&self.pool).await?;
        Ok(row.try_get::<Option<i64>, _>(0)?)
    }

    /// The watermark of the last complete matching run, if any.
    async fn matched_up_to(&self) -> Result<Option<i64>> {
        Ok(self.cursor(MATCHED_STREAM).await?.and_then(|p| p.parse::<i64>().ok()))
    }

    /// Whether records arrived that matching has not seen: a batch's records,
    /// committed with it, are the durable "matching pending" marker, and only
    /// a complete matching run moves [`MATCHED_STREAM`] past them. A crash
    /// during matching leaves it pending for the next run.
    pub async fn matching_pending(&self) -> Result<bool> {
        let Some(newest) = self.newest_received().await? else { return Ok(false) };
        Ok(self.matched_up_to().await?.is_none_or(|d| newest > d))
    }

    /// Links profiles whose match probability reaches `identity.match.threshold`,
    /// comparing every profile against its blocks (`cdp match`).
    pub async fn match_profiles(&self, m: &Manifest) -> Result<MatchReport> {
        self.match_run(m, false).await
    }

    /// Matching after a batch: only the profiles of records that arrived since
    /// the last complete run (new or changed) are compared, each against the
    /// whole of its blocks; everything when no run ever completed.
    pub async fn match_pending(&self, m: &Manifest) -> Result<MatchReport> {
        self.match_run(m, true).await
    }

    /// A merged profile is compared again with its merged values, so passes
    /// repeat (at most five, each comparing only the profiles the previous one
    /// merged, with the model the first fitted) until one merges nothing. The
    /// compared values are read once; after a pass only the profiles its
    /// links changed are read again. The last write records that matching is
    /// done up to the records present when it started.
    async fn match_run(&self, m: &Manifest, incremental: bool) -> Result<MatchReport> {
        // Reading and comparing come first: the log a load left behind is
        // copied meanwhile, not by the first link's commit.
        self.checkpoint_in_background();
        let watermark = self.newest_received().await?;
        let mut focus = match (incremental, self.matched_up_to().await?) {
            (true, Some(done)) => Some(self.profiles_since(done).await?),
            _ => None,
        };
        let mut total = MatchReport::default();
        let mut model = None;
        let mut items = None;
        for pass in 0..5 {
            let (r, touched) = self.match_pass(m, focus.as_ref(), &mut model, &mut items).await?;
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
            focus = Some(touched);
        }
        if let Some(w) = watermark {
            let cfg = IdentityConfig::from_manifest(m);
            self.apply_batch(&cfg, Vec::<Record>::new(), Some((MATCHED_STREAM, &w.to_string()))).await?;
        }
        Ok(total)
    }

    /// Every observation of the traits `names`: (profile, trait, latest
    /// value as stored, when it was observed), a page of identifiers at a
    /// time, its rows packed on SQLite ([`Store::rows_sql`]): there is a row
    /// per identifier and trait (2.1–2.5 s of a matching pass went to
    /// handing them over one by one at 100,000 people).
    async fn compared_traits(&self, names: &[&str]) -> Result<Vec<(i64, String, String, i64)>> {
        let sql = self.rows_sql(
            "i.profile_id, t.name, t.last_value, t.last_at",
            &format!(
                "FROM trait_obs t JOIN identities i ON i.id = t.identity_id \
                 WHERE t.name IN ({}) AND t.identity_id > ? AND t.identity_id <= ?",
                super::in_list(names.len())
            ),
        );
        let page = self.sql("SELECT MAX(id) FROM (SELECT id FROM identities WHERE id > ? ORDER BY id LIMIT ?) AS page");
        let mut conn = self.pool.acquire().await?;
        // The pages' bounds first (a walk of the identities' key), then the
        // pages, each unpacked while the database reads the next.
        let mut pages = Vec::new();
        let mut after = i64::MIN;
        loop {
            let last: Option<i64> =
                sqlx::query(&page).bind(after).bind(TRAIT_PAGE).fetch_one(&mut *conn).await?.try_get(0)?;
            let Some(last) = last else { break };
            pages.push((after, last));
            after = last;
        }
        let queries = pages.iter().map(|(after, last)| {
            let mut q = sqlx::query(&sql);
            for n in names {
                q = q.bind(*n);
            }
            q.bind(*after).bind(*last)
        });
        let mut out = Vec::new();
        self.fetch_chunks_each(&mut conn, queries, |r| {
            out.push((r.int(0)?, r.text(1)?, r.text(2)?, r.int(3)?));
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// [`Store::compared_traits`] of the profiles `ids` only (every trait
    /// their identifiers hold; the caller keeps the compared ones).
    async fn compared_traits_of(&self, ids: &[i64]) -> Result<Vec<(i64, String, String, i64)>> {
        let mut conn = self.pool.acquire().await?;
        let rows = self
            .rows_in(
                &mut conn,
                "i.profile_id, t.name, t.last_value, t.last_at",
                "FROM identities i JOIN trait_obs t ON t.identity_id = i.id WHERE i.profile_id IN ({})",
                ids,
            )
            .await?;
        rows.iter().map(|r| Ok((r.int(0)?, r.text(1)?, r.text(2)?, r.int(3)?))).collect()
    }

    /// Profiles holding records received after `done`.
    async fn profiles_since(&self, done: i64) -> Result<FxHashSet<i64>> {
        let rows = sqlx::query(&self.sql(
            "SELECT DISTINCT i.profile_id FROM records r JOIN identities i ON i.id = r.identity_id \
             WHERE r.received_at > ? AND r.source <> 'match'",
        ))
        .bind(done)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Each profile's strongest identifier (key rank, key, value, id), which
    /// a match link names it by: the smallest value of its best-ranked key.
    /// Packed rows: a pass links tens of thousands of profiles.
    async fn anchors(
        &self,
        cfg: &IdentityConfig,
        profiles: &[i64],
    ) -> Result<FxHashMap<i64, (u32, String, String, i64)>> {
        let mut anchor: FxHashMap<i64, (u32, String, String, i64)> = FxHashMap::default();
        let mut conn = self.pool.acquire().await?;
        let rows = self
            .rows_in(&mut conn, "profile_id, key, value, id", "FROM identities WHERE profile_id IN ({})", profiles)
            .await?;
        for r in rows {
            let (p, k, v) = (r.int(0)?, r.text(1)?, r.text(2)?);
            let cand = (cfg.rank(&k), k, v, r.int(3)?);
            match anchor.get(&p) {
                Some(cur) if *cur <= cand => {}
                _ => {
                    anchor.insert(p, cand);
                }
            }
        }
        Ok(anchor)
    }

    /// One pass: compares the profiles in `focus` (all when `None`) against
    /// their blocks, fitting the model unless an earlier pass did, and links
    /// the pairs above the threshold. `compared` holds each profile's
    /// compared values (read here when `None`) and is brought up to date
    /// with the profiles the links changed. Returns what it did and the
    /// profiles its links touched, as they are after the merges.
    async fn match_pass(
        &self,
        m: &Manifest,
        focus: Option<&FxHashSet<i64>>,
        model: &mut Option<matching::Model>,
        compared: &mut Option<Vec<Item>>,
    ) -> Result<(MatchReport, FxHashSet<i64>)> {
        let Some(mt) = &m.identity.matching else { return Ok((MatchReport::default(), FxHashSet::default())) };
        let cfg = IdentityConfig::from_manifest(m);
        let specs: Vec<FieldSpec> = matching::specs(&mt.compare).map_err(super::StoreError::Manifest)?;
        let field_index: FxHashMap<&str, usize> = specs.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();

        let started = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        if compared.is_none() {
            *compared = Some(latest_values(self.compared_traits(&names).await?, &specs, &field_index));
        }
        let items: &[Item] = compared.as_deref().unwrap_or_default();
        let rules: Vec<Vec<usize>> = mt
            .block_on
            .iter()
            .map(|r| r.iter().filter_map(|f| field_index.get(f.as_str()).copied()).collect())
            .collect();
        let read_ms = ms(started);
        let step = std::time::Instant::now();
        // Fitting needs each rule's pairs among all profiles; an unfocused
        // pass scores exactly their union, so it blocks once for both.
        let by_rule = model.is_none().then(|| matching::candidates_by_rule(items, &rules));
        let (pairs, skipped) = match (&by_rule, focus) {
            (Some((by_rule, skipped)), None) => (matching::union(by_rule), *skipped),
            _ => {
                let flags: Option<Vec<bool>> = focus.map(|f| items.iter().map(|i| f.contains(&i.id)).collect());
                matching::candidates_touching(items, &rules, flags.as_deref())
            }
        };
        let blocks_ms = ms(step);
        let step = std::time::Instant::now();
        let model: &matching::Model = match by_rule {
            Some((by_rule, _)) => model.insert(matching::estimate_blocked(&specs, items, &rules, &by_rule, 17)),
            None => model.as_ref().ok_or_else(|| super::StoreError::Invariant("matching: no model".into()))?,
        };
        let fit_ms = ms(step);
        let step = std::time::Instant::now();
        let mut report = MatchReport {
            profiles: items.len(),
            candidates: pairs.len(),
            skipped_blocks: skipped,
            lambda: model.lambda,
            ..MatchReport::default()
        };
        let linked: Vec<matching::Scored> = matching::par_map(&pairs, |(a, b)| {
            Some(matching::score(model, &specs, items, *a, *b)).filter(|s| s.probability >= mt.threshold)
        })
        .into_iter()
        .flatten()
        .collect();
        if linked.is_empty() {
            return Ok((report, FxHashSet::default()));
        }

        // Each profile is represented by its strongest identifier.
        let profiles: Vec<i64> = {
            let mut p: Vec<i64> =
                linked.iter().flat_map(|s| [items[s.a as usize].id, items[s.b as usize].id]).collect();
            p.sort_unstable();
            p.dedup();
            p
        };
        let anchor = self.anchors(&cfg, &profiles).await?;
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
        let score_ms = ms(step);
        let step = std::time::Instant::now();
        let mut changed = Vec::new();
        for chunk in records.chunks(LINK_BATCH) {
            let (r, c) = self.apply_batch_tracked(&cfg, chunk.to_vec(), None, None).await?;
            report.batch.add(&r);
            changed.extend(c);
        }
        let items_len = items.len();
        tracing::debug!(
            profiles = items_len,
            pairs = pairs.len(),
            links = report.links,
            read_ms,
            blocks_ms,
            fit_ms,
            score_ms,
            link_ms = ms(step),
            "match pass"
        );
        let mut anchors: Vec<i64> = anchor.values().map(|a| a.3).collect();
        anchors.sort_unstable();
        let mut conn = self.pool.acquire().await?;
        let rows = self.rows_in(&mut conn, "profile_id", "FROM identities WHERE id IN ({})", &anchors).await?;
        let touched = rows.iter().map(|r| r.int(0)).collect::<Result<_>>()?;
        drop(conn);
        // Only the profiles the links changed hold other values now.
        changed.sort_unstable();
        changed.dedup();
        let fresh = latest_values(self.compared_traits_of(&changed).await?, &specs, &field_index);
        if let Some(items) = compared.as_mut() {
            items.retain(|i| changed.binary_search(&i.id).is_err());
            items.extend(fresh);
            items.sort_by_key(|i| i.id);
        }
        Ok((report, touched))
    }
}

/// Each profile's compared values from trait observations (profile, trait,
/// value as stored, observed at): the latest value of each compared trait,
/// trimmed and lowercased, profiles in id order. Rows may come in any order.
fn latest_values(
    rows: Vec<(i64, String, String, i64)>,
    specs: &[FieldSpec],
    field_index: &FxHashMap<&str, usize>,
) -> Vec<Item> {
    let mut latest: FxHashMap<i64, Vec<Option<(i64, String)>>> = FxHashMap::default();
    for (profile, name, raw, at) in rows {
        let Some(&f) = field_index.get(name.as_str()) else { continue };
        let value = match serde_json::from_str::<serde_json::Value>(&raw) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(v) => v.to_string(),
            Err(_) => raw,
        };
        let value = value.trim().to_lowercase();
        // The latest; of two observed at once, the greater, so that the
        // order rows arrive in never matters.
        let slot = &mut latest.entry(profile).or_insert_with(|| vec![None; specs.len()])[f];
        if slot.as_ref().is_none_or(|(t, v)| (at, &value) > (*t, v)) {
            *slot = Some((at, value));
        }
    }
    let mut items: Vec<Item> = latest
        .into_iter()
        .map(|(id, vals)| Item { id, values: vals.into_iter().map(|v| v.map(|(_, s)| s)).collect() })
        .collect();
    items.sort_by_key(|i| i.id);
    items
}
