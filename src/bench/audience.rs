//! `cdp bench audience`: the membership of ten audiences over every profile
//! of a store of generated customers, evaluated as cdp does — pages of live
//! profiles ([`Store::live_profile_page`]), their rows read in bulk
//! ([`Store::profile_rows_many`]), each profile's rules evaluated
//! ([`crate::profile::audiences_of`]) — next to the same ten rules written
//! as SQL over the same tables, one query per audience, in the same run.
//! Both must count the same members.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indexmap::IndexMap;
use serde_json::{Value, json};
use sqlx::Row;

use crate::ingest::Mapper;
use crate::ingest::pipeline::{Committer, Job};
use crate::manifest::{self, Manifest};
use crate::profile::{self, Model, ProfileRows};
use crate::rng::Rng;
use crate::store::Store;
use crate::store::ingest::{BatchReport, IdentityConfig};

/// Profiles per page of the cdp evaluation.
const PAGE: usize = 1_000;

/// Records per ingest transaction (`cdp ingest`'s default).
const BATCH: usize = 20_000;

const DAY_S: i64 = 86_400;

/// The customers' model and the ten audiences: plain comparisons, `in`
/// lists, dates, computed traits over windows (one with a filter), consent,
/// identities, `!`/`&&`/`||` nesting and an audience of audiences.
pub const MANIFEST: &str = r#"
version: 1
name: bench-audience
storage: { url: "sqlite://bench.db" }
sources:
  crm:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { customer_id: customer_id, email: email }
      traits: { tier: tier, country: country, points: points, birthday: birthday }
      consent: { email_marketing: email_optin, sms: sms_optin }
  web:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { customer_id: customer_id, email: email }
      event: { name_field: event }
      consent: { email_marketing: email_optin }
identity:
  keys:
    customer_id: { limit: 1 }
    email: { normalize: email, limit: 1 }
  priority: [customer_id, email]
model:
  traits:
    tier: { type: string, enum: [bronze, silver, gold, platinum] }
    country: { type: string }
    points: { type: integer }
    birthday: { type: date }
  events:
    order_completed: { properties: { total: number } }
    page_viewed: { properties: { path: string } }
  computed:
    orders_30d: { count: order_completed, within: 30d }
    spend_90d: { sum: order_completed.total, within: 90d }
    big_orders_60d: { count: order_completed, within: 60d, where: "total >= 100" }
    views_7d: { count: page_viewed, within: 7d }
consent:
  purposes: [email_marketing, sms]
audiences:
  gold_tier: { where: 'tier in ["gold", "platinum"]' }
  nordic: { where: 'country in ["SE", "NO", "DK", "FI"]' }
  points_1000: { where: "points >= 1000" }
  born_80s: { where: 'birthday >= date("1980-01-01") && birthday < date("1990-01-01")' }
  recent_buyers: { where: "orders_30d >= 1" }
  big_spenders: { where: "spend_90d >= 500 && big_orders_60d >= 1" }
  email_reachable: { where: "consent.email_marketing && size(identities.email) > 0" }
  winback: { where: '!(orders_30d >= 1) && spend_90d > 0 && (tier == "silver" || points > 1500)' }
  browsers_no_sms: { where: "views_7d >= 2 && !consent.sms" }
  vip_mail: { where: "audiences.gold_tier && audiences.email_reachable && spend_90d >= 200" }
"#;

/// The latest-wins value of trait `{name}` per profile, as cdp merges by
/// default: the observation with the latest time, then the larger value,
/// then the later source.
const TRAIT: &str = "SELECT profile_id, v FROM (
    SELECT i.profile_id, o.last_value AS v, ROW_NUMBER() OVER (
        PARTITION BY i.profile_id ORDER BY o.last_at DESC, o.last_value DESC, o.source DESC) AS rn
    FROM trait_obs o JOIN identities i ON i.id = o.identity_id WHERE o.name = '{name}') WHERE rn = 1";

/// Profiles whose latest answer for purpose `{name}` is a grant (at one
/// instant, a grant over a withdrawal); an unanswered purpose is denied.
const GRANTED: &str = "SELECT profile_id FROM (
    SELECT i.profile_id, c.granted, ROW_NUMBER() OVER (
        PARTITION BY i.profile_id ORDER BY c.at DESC, c.granted DESC) AS rn
    FROM consent c JOIN identities i ON i.id = c.identity_id WHERE c.purpose = '{name}') WHERE rn = 1 AND granted = 1";

/// `order_completed` events per profile since `{since}` (milliseconds):
/// their count, the count of those of 100 or more, the sum of their totals.
const ORDERS: &str = "SELECT i.profile_id, COUNT(*) AS n, SUM(json_extract(r.payload, '$.total') >= 100) AS big,
        TOTAL(json_extract(r.payload, '$.total')) AS spend
    FROM records r JOIN identities i ON i.id = r.identity_id
    WHERE r.kind = 'event' AND r.name = 'order_completed' AND r.at >= {since} GROUP BY i.profile_id";

/// The ten rules as SQL over the store's tables at `now_ms`, one query per
/// audience, each counting members.
fn sql_rules(now_ms: i64) -> Vec<(&'static str, String)> {
    let tr = |name: &str| TRAIT.replace("{name}", name);
    let granted = |purpose: &str| GRANTED.replace("{name}", purpose);
    let orders = |days: i64| ORDERS.replace("{since}", &(now_ms - days * DAY_S * 1000).to_string());
    let gold = format!("SELECT profile_id FROM ({}) WHERE json_extract(v, '$') IN ('gold', 'platinum')", tr("tier"));
    let reachable = format!(
        "SELECT profile_id FROM ({}) g WHERE EXISTS (SELECT 1 FROM identities e WHERE e.profile_id = g.profile_id AND e.key = 'email')",
        granted("email_marketing")
    );
    vec![
        ("gold_tier", format!("SELECT COUNT(*) FROM ({gold})")),
        (
            "nordic",
            format!("SELECT COUNT(*) FROM ({}) WHERE json_extract(v, '$') IN ('SE', 'NO', 'DK', 'FI')", tr("country")),
        ),
        ("points_1000", format!("SELECT COUNT(*) FROM ({}) WHERE json_extract(v, '$') >= 1000", tr("points"))),
        (
            "born_80s",
            format!(
                "SELECT COUNT(*) FROM ({}) WHERE json_extract(v, '$') >= '1980-01-01' AND json_extract(v, '$') < '1990-01-01' \
                 AND date(json_extract(v, '$')) IS NOT NULL",
                tr("birthday")
            ),
        ),
        ("recent_buyers", format!("SELECT COUNT(*) FROM ({})", orders(30))),
        (
            "big_spenders",
            format!(
                "SELECT COUNT(*) FROM ({}) s90 JOIN ({}) s60 ON s60.profile_id = s90.profile_id \
                 WHERE s90.spend >= 500 AND s60.big >= 1",
                orders(90),
                orders(60)
            ),
        ),
        ("email_reachable", format!("SELECT COUNT(*) FROM ({reachable})")),
        (
            "winback",
            format!(
                "SELECT COUNT(*) FROM ({}) s90 \
                 LEFT JOIN ({}) tier ON tier.profile_id = s90.profile_id \
                 LEFT JOIN ({}) pts ON pts.profile_id = s90.profile_id \
                 WHERE s90.spend > 0 \
                 AND s90.profile_id NOT IN (SELECT profile_id FROM ({})) \
                 AND (json_extract(tier.v, '$') IS 'silver' OR COALESCE(json_extract(pts.v, '$') > 1500, 0))",
                orders(90),
                tr("tier"),
                tr("points"),
                orders(30)
            ),
        ),
        (
            "browsers_no_sms",
            format!(
                "SELECT COUNT(*) FROM (SELECT i.profile_id FROM records r JOIN identities i ON i.id = r.identity_id \
                 WHERE r.kind = 'event' AND r.name = 'page_viewed' AND r.at >= {} \
                 GROUP BY i.profile_id HAVING COUNT(*) >= 2) v \
                 WHERE v.profile_id NOT IN ({})",
                now_ms - 7 * DAY_S * 1000,
                granted("sms")
            ),
        ),
        (
            "vip_mail",
            format!(
                "SELECT COUNT(*) FROM ({gold}) g JOIN ({reachable}) r ON r.profile_id = g.profile_id \
                 JOIN ({}) s90 ON s90.profile_id = g.profile_id WHERE s90.spend >= 200",
                orders(90)
            ),
        ),
    ]
}

fn bench_manifest() -> Result<Manifest> {
    let l = manifest::load_str(MANIFEST, &manifest::Options::validate("."));
    if l.has_errors() {
        anyhow::bail!("the benchmark manifest is invalid: {:?}", l.diagnostics);
    }
    l.manifest.context("the benchmark manifest is invalid")
}

/// An RFC 3339 time `secs` seconds after the epoch.
fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(String::new, |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// The records of customer `i` relative to `now` (seconds): a CRM contact
/// with traits and consent answers, 0–6 events over the last 120 days
/// (more of them recent)
/// (orders of 5–600 in steps of 0.5, so sums are exact in any order), and
/// for one in ten a later change of email consent on the web.
fn customer(rng: &mut Rng, i: usize, now: i64, out: &mut Vec<(&'static str, Value)>) {
    let cid = format!("C{i:09}");
    let email = (!rng.chance(0.08)).then(|| format!("c{i}@example.com"));
    let pick = |rng: &mut Rng, weighted: &[(&'static str, u64)]| -> &'static str {
        let total: u64 = weighted.iter().map(|w| w.1).sum();
        let mut x = rng.below(total);
        for (v, w) in weighted {
            if x < *w {
                return v;
            }
            x -= w;
        }
        weighted[0].0
    };
    let mut crm = json!({
        "id": format!("crm-{i}"), "at": rfc3339(now - (150 + rng.below(200) as i64) * DAY_S),
        "customer_id": cid, "email": email,
    });
    if !rng.chance(0.03) {
        crm["tier"] = json!(pick(rng, &[("bronze", 50), ("silver", 30), ("gold", 15), ("platinum", 5)]));
    }
    if !rng.chance(0.02) {
        crm["country"] =
            json!(pick(rng, &[("SE", 30), ("NO", 15), ("DK", 10), ("FI", 10), ("DE", 15), ("GB", 10), ("US", 10)]));
    }
    if !rng.chance(0.05) {
        crm["points"] = json!(rng.below(2000));
    }
    if !rng.chance(0.10) {
        crm["birthday"] = json!(format!("{}-{:02}-{:02}", 1950 + rng.below(56), 1 + rng.below(12), 1 + rng.below(28)));
    }
    if rng.chance(0.75) {
        crm["email_optin"] = json!(rng.chance(0.65));
    }
    if rng.chance(0.60) {
        crm["sms_optin"] = json!(rng.chance(0.40));
    }
    out.push(("crm", crm));
    for e in 0..rng.below(7) {
        // Two in five events in the last fortnight, the rest over 120 days.
        let days = if rng.chance(0.4) { 14 } else { 120 };
        let at = rfc3339(now - rng.below(days * DAY_S as u64) as i64);
        // Half the events carry the email only (the web shop), anchored on
        // the email identifier of the same profile.
        let who = match &email {
            Some(m) if rng.chance(0.5) => json!({"email": m}),
            _ => json!({"customer_id": cid}),
        };
        let mut r = if rng.chance(0.35) {
            json!({"id": format!("e-{i}-{e}"), "at": at, "event": "order_completed",
                   "total": (10 + rng.below(1190)) as f64 / 2.0})
        } else {
            json!({"id": format!("e-{i}-{e}"), "at": at, "event": "page_viewed", "path": "/"})
        };
        if let (Value::Object(r), Value::Object(w)) = (&mut r, who) {
            r.extend(w);
        }
        out.push(("web", r));
    }
    if rng.chance(0.10) {
        out.push((
            "web",
            json!({"id": format!("pref-{i}"), "at": rfc3339(now - rng.below(30 * DAY_S as u64) as i64),
                   "customer_id": cid, "email_optin": rng.chance(0.5)}),
        ));
    }
}

/// Ingests `n` generated customers through cdp's pipeline (mapping,
/// preparation, one transaction per batch overlapped with the next batch's
/// mapping), with progress on stderr.
async fn ingest(store: Arc<Store>, m: &Manifest, n: usize, now: i64) -> Result<(BatchReport, u64)> {
    let cfg = IdentityConfig::from_manifest(m);
    let mut crm = Mapper::new(m, "crm").map_err(anyhow::Error::msg)?;
    let mut web = Mapper::new(m, "web").map_err(anyhow::Error::msg)?;
    let mut committer: Committer<()> = Committer::new(store, cfg, "cli");
    let mut rng = Rng::new(7);
    let mut total = BatchReport::default();
    let mut rejected = 0u64;
    let mut batch = Vec::with_capacity(BATCH);
    let mut generated = Vec::new();
    let started = Instant::now();
    let step = (n / 10).max(1);
    for i in 0..n {
        generated.clear();
        customer(&mut rng, i, now, &mut generated);
        for (source, raw) in &generated {
            let mapper = if *source == "crm" { &mut crm } else { &mut web };
            match mapper.map(raw, 0) {
                Ok(r) => batch.push(r),
                Err(e) => {
                    rejected += 1;
                    tracing::warn!(record = %raw, reason = %e, "generated record rejected");
                }
            }
        }
        if batch.len() >= BATCH || i + 1 == n {
            let records = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            if let Some(done) = committer.submit(Job { records, cursor: None, fence: None, tag: () }).await {
                total.add(&done?.0);
            }
        }
        if (i + 1) % step == 0 {
            eprintln!("  ingested {:>10} / {n} customers ({:.0} s)", i + 1, started.elapsed().as_secs_f64());
        }
    }
    if let Some(done) = committer.wait().await {
        total.add(&done?.0);
    }
    Ok((total, rejected))
}

/// What one evaluation found: members per audience and how many profiles were read.
struct Counts {
    members: IndexMap<String, u64>,
    profiles: u64,
}

/// cdp's evaluation of every live profile: a task reads pages of ids and
/// their rows in bulk, two pages at once on two connections (one parses
/// while SQLite answers the other), one step ahead of the evaluation of each
/// profile's membership. Returns the time the reader was busy too.
async fn run_cdp(store: &Arc<Store>, m: &Manifest, model: &Model, now_ms: i64) -> Result<(Counts, Duration)> {
    type Pages = crate::store::Result<(Vec<ProfileRows>, Duration)>;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Pages>(1);
    let reader = tokio::spawn({
        let store = store.clone();
        async move {
            let mut after = i64::MIN;
            loop {
                let t = Instant::now();
                let ids = match store.live_profile_page(after, 2 * PAGE).await {
                    Ok(ids) => ids,
                    Err(e) => return tx.send(Err(e)).await.unwrap_or(()),
                };
                let Some(&last) = ids.last() else { return };
                after = last;
                let (a, b) = ids.split_at(ids.len().min(PAGE));
                let (a, b) = tokio::join!(store.profile_rows_many(a), store.profile_rows_many(b));
                let rows = a.and_then(|mut a| {
                    a.extend(b?);
                    Ok((a, t.elapsed()))
                });
                if tx.send(rows).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut members: IndexMap<String, u64> = m.audiences.keys().map(|a| (a.clone(), 0)).collect();
    let mut profiles = 0u64;
    let mut reading = Duration::ZERO;
    while let Some(page) = rx.recv().await {
        let (rows, took) = page?;
        reading += took;
        for r in &rows {
            for a in profile::audiences_of(m, model, r, now_ms) {
                *members.entry(a).or_default() += 1;
            }
        }
        profiles += rows.len() as u64;
    }
    reader.await.context("the page reader failed")?;
    Ok((Counts { members, profiles }, reading))
}

/// The baseline: each audience's SQL, one query each, two at a time (one
/// per core, as cdp reads and evaluates at once).
async fn run_sql(store: &Arc<Store>, rules: &Arc<Vec<(&'static str, String)>>) -> Result<Counts> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (store, rules, next) = (store.clone(), rules.clone(), next.clone());
            tokio::spawn(async move {
                let mut counted = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((name, sql)) = rules.get(i) else { return anyhow::Ok(counted) };
                    let row = sqlx::query(sql)
                        .fetch_one(store.read_pool())
                        .await
                        .with_context(|| format!("the SQL of `{name}`"))?;
                    counted.push((i, row.try_get::<i64, _>(0)?.max(0) as u64));
                }
            })
        })
        .collect();
    let mut counted = Vec::new();
    for w in workers {
        counted.extend(w.await.context("a baseline query task failed")??);
    }
    counted.sort();
    let members = counted.into_iter().map(|(i, n)| (rules[i].0.to_owned(), n)).collect();
    let profiles: i64 = sqlx::query("SELECT COUNT(DISTINCT profile_id) FROM identities")
        .fetch_one(store.read_pool())
        .await?
        .try_get(0)?;
    Ok(Counts { members, profiles: profiles.max(0) as u64 })
}

/// What the alternating evaluations measured: the last counts of each, and
/// every run's time (cdp's reader's busy time too).
struct Measured {
    cdp: Counts,
    sql: Counts,
    cdp_times: Vec<Duration>,
    read_times: Vec<Duration>,
    sql_times: Vec<Duration>,
}

/// Runs the benchmark with `n` customers, `runs` evaluations of each kind
/// (alternating), in a fresh SQLite store in `dir`.
pub async fn run(n: usize, runs: usize, dir: &Path) -> Result<String> {
    let m = bench_manifest()?;
    let db = dir.join("audience.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let store = Arc::new(Store::connect(&format!("sqlite://{}", db.display()), dir).await?);
    // Whole seconds: windows compare times to the second, as the SQL does.
    let now_s = crate::store::now_ms() / 1000;
    eprintln!("generating and ingesting {n} customers…");
    let started = Instant::now();
    let (report, rejected) = ingest(store.clone(), &m, n, now_s).await?;
    let ingest_secs = started.elapsed().as_secs_f64();
    let runs = runs.max(1);
    let measured = measure(&store, &m, now_s * 1000, runs).await?;
    let mut out = String::new();
    writeln!(
        out,
        "bench audience: {n} generated customers, {} records ({rejected} rejected), {} live profiles, {} audiences; \
         ingested in {ingest_secs:.1} s; each evaluation {runs} time(s), alternating",
        report.accepted,
        measured.cdp.profiles,
        m.audiences.len()
    )?;
    out.push_str(&report_lines(measured));
    Ok(out)
}

/// Evaluates every profile `runs` times each way, alternating which goes first.
async fn measure(store: &Arc<Store>, m: &Manifest, now_ms: i64, runs: usize) -> Result<Measured> {
    let model = Model::new(m).map_err(anyhow::Error::msg)?;
    let rules = Arc::new(sql_rules(now_ms));
    let (mut cdp_times, mut read_times, mut sql_times) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cdp, mut sql) = (None, None);
    for i in 0..runs {
        let order: [&str; 2] = if i % 2 == 0 { ["cdp", "sql"] } else { ["sql", "cdp"] };
        for which in order {
            eprintln!("run {}/{runs}: {which}…", i + 1);
            let t = Instant::now();
            if which == "cdp" {
                let (c, reading) = run_cdp(store, m, &model, now_ms).await?;
                cdp_times.push(t.elapsed());
                read_times.push(reading);
                cdp = Some(c);
            } else {
                sql = Some(run_sql(store, &rules).await?);
                sql_times.push(t.elapsed());
            }
        }
    }
    let (cdp, sql) = cdp.zip(sql).context("no evaluation ran")?;
    Ok(Measured { cdp, sql, cdp_times, read_times, sql_times })
}

/// Members per audience both ways (a `MISMATCH` where they differ), then
/// the medians, rates and their ratio.
fn report_lines(mut r: Measured) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "  {:<18} {:>12} {:>12}", "audience", "cdp", "SQL");
    let mut mismatches = 0;
    for (name, c) in &r.cdp.members {
        let s = r.sql.members.get(name).copied();
        let flag = if s == Some(*c) { "" } else { "  MISMATCH" };
        mismatches += usize::from(!flag.is_empty());
        let _ = writeln!(out, "  {name:<18} {c:>12} {:>12}{flag}", s.map_or_else(|| "-".into(), |s| s.to_string()));
    }
    if r.cdp.profiles != r.sql.profiles {
        mismatches += 1;
        let _ = writeln!(out, "  MISMATCH: cdp read {} profiles, the store holds {}", r.cdp.profiles, r.sql.profiles);
    }
    let (cdp, cdp_runs) = super::median_of(&mut r.cdp_times);
    let (sql, sql_runs) = super::median_of(&mut r.sql_times);
    let (read, _) = super::median_of(&mut r.read_times);
    let rate = |d: Duration| r.cdp.profiles as f64 / d.as_secs_f64();
    let line = |what: &str, d: Duration, runs: &str| {
        format!("  {what:<52} median {:>7.2} s  {:>8.0} profiles/s  runs: {runs} s\n", d.as_secs_f64(), rate(d))
    };
    out.push_str(&line(&format!("cdp: pages of {PAGE}, rows read in bulk, audiences_of"), cdp, &cdp_runs));
    let _ = writeln!(out, "  {:<52} median {:>7.2} s", "  of which reading, beside the evaluation", read.as_secs_f64());
    out.push_str(&line("SQL: a query per audience, two at once (baseline)", sql, &sql_runs));
    let _ = writeln!(
        out,
        "  {:<52} {:.2}× the time ({:.0} % of the baseline's rate)",
        "cdp / SQL",
        cdp.as_secs_f64() / sql.as_secs_f64(),
        100.0 * sql.as_secs_f64() / cdp.as_secs_f64()
    );
    if mismatches > 0 {
        let _ = writeln!(out, "MISMATCH: cdp and the SQL baseline disagree on {mismatches} count(s)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated records all map, and on a small store cdp and the SQL
    /// baseline count the same members of every audience, none of them empty.
    #[tokio::test]
    async fn cdp_and_the_sql_baseline_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = run(500, 1, dir.path()).await.expect("bench");
        assert!(!out.contains("MISMATCH"), "{out}");
        assert!(out.contains("(0 rejected)"), "{out}");
        for name in bench_manifest().expect("manifest").audiences.keys() {
            let line = out.lines().find(|l| l.split_whitespace().next() == Some(name)).expect("a line per audience");
            assert_ne!(line.split_whitespace().nth(1), Some("0"), "every audience has members: {out}");
        }
    }

    #[test]
    fn a_count_that_differs_is_flagged() {
        let counts = |gold: u64| Counts {
            members: [("gold_tier".to_owned(), gold), ("nordic".to_owned(), 5)].into_iter().collect(),
            profiles: 10,
        };
        let secs = |s: u64| vec![Duration::from_secs(s)];
        let out = report_lines(Measured {
            cdp: counts(3),
            sql: counts(4),
            cdp_times: secs(2),
            read_times: secs(1),
            sql_times: secs(1),
        });
        let flagged: Vec<&str> = out.lines().filter(|l| l.contains("MISMATCH")).collect();
        assert_eq!(flagged.len(), 2, "{out}");
        assert!(flagged[0].trim_start().starts_with("gold_tier"), "{out}");
        assert!(out.contains("2.00× the time (50 % of the baseline's rate)"), "{out}");
    }
}
