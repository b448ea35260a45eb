//! Privacy requests as the CLI and the admin API run them: open a request
//! whose subject is the keyed hash of the identifier named (never its
//! value), find the person, act, close the request with a summary.
//! `cdp privacy …` and `POST /admin/v1/privacy/{kind}` share this, so the
//! two record the same requests.

use serde_json::Value;

use crate::manifest::Manifest;
use crate::store::Store;
use crate::store::privacy::{Erasure, mark_hash};
use crate::store::profile::{LookupError, lookup_value};

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Everything held about the person, as one document.
    Export,
    /// Erase the person here and at every destination that can delete.
    Delete,
    Suppress,
    Unsuppress,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Export => "export",
            Kind::Delete => "delete",
            Kind::Suppress => "suppress",
            Kind::Unsuppress => "unsuppress",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::Export, Kind::Delete, Kind::Suppress, Kind::Unsuppress].into_iter().find(|k| k.as_str() == s)
    }
}

/// How a request ended.
#[derive(Debug)]
pub struct Outcome {
    pub request: i64,
    /// No profile has the identifier (the request is closed `not_found`).
    pub not_found: bool,
    pub summary: String,
    /// For an export: the document.
    pub export: Option<Value>,
    /// For an erasure: what went.
    pub erasure: Option<Erasure>,
}

/// Why a request could not run.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Runs request `kind` for the person holding identifier `key`=`value`, on
/// behalf of `actor`. `deletes` says whether a destination's plugin can
/// delete (`None`: the destination is unknown).
pub async fn perform(
    store: &Store,
    m: &Manifest,
    kind: Kind,
    key: &str,
    value: &str,
    actor: &str,
    deletes: &(dyn Fn(&str) -> Option<bool> + Sync),
) -> Result<Outcome, RequestError> {
    let normal = lookup_value(m, key, value)?;
    let subject = mark_hash(&store.privacy_secret().await?, key, &normal);
    let request = store.open_request(kind.as_str(), &subject, key, actor, "open").await?;
    let profile = match store.find_profile(m, key, value).await {
        Ok(p) => p,
        Err(LookupError::NotFound(..)) => {
            let summary = format!("no profile has this {key}");
            store.close_request(request, "not_found", &summary).await?;
            return Ok(Outcome { request, not_found: true, summary, export: None, erasure: None });
        }
        Err(e) => {
            store.close_request(request, "failed", &e.to_string()).await?;
            return Err(e.into());
        }
    };
    let mut out = Outcome { request, not_found: false, summary: String::new(), export: None, erasure: None };
    match kind {
        Kind::Export => {
            let mut doc = store.privacy_export(m, profile).await?;
            doc["request_id"] = Value::from(request);
            out.summary = format!("exported {} records", doc["records"].as_array().map_or(0, Vec::len));
            out.export = Some(doc);
            store.close_request(request, "done", &out.summary).await?;
        }
        Kind::Delete => {
            let er = store.erase(request, profile, deletes).await?;
            out.summary = format!(
                "erased {} profile id(s), {} identifier(s), {} row(s); {} destination(s) to reach",
                er.profiles,
                er.identifiers,
                er.rows.values().sum::<u64>(),
                er.destinations.len()
            );
            let pending = er.pending > 0;
            store.close_request(request, if pending { "propagating" } else { "done" }, &out.summary).await?;
            out.erasure = Some(er);
        }
        Kind::Suppress | Kind::Unsuppress => {
            let on = kind == Kind::Suppress;
            let n = store.suppress(profile, on, request).await?;
            out.summary = if on {
                format!("{n} identifier(s) suppressed: their records are dropped and nothing is delivered")
            } else {
                format!("{n} identifier(s) no longer suppressed")
            };
            store.close_request(request, "done", &out.summary).await?;
        }
    }
    Ok(out)
}

/// One retention rule, resolved from `retention:`: records (of `source`, or
/// of every source not listed when `None`; only events named `event` when
/// set) observed more than `keep` ago go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    pub source: Option<String>,
    /// Sources with a rule of their own, which a rule without `source` skips.
    pub except: Vec<String>,
    pub event: Option<String>,
    pub keep: std::time::Duration,
}

impl RetentionRule {
    /// `records`, `source web`, `event page_viewed`.
    pub fn label(&self) -> String {
        match (&self.source, &self.event) {
            (_, Some(e)) => format!("event {e}"),
            (Some(s), None) => format!("source {s}"),
            (None, None) => "records".to_owned(),
        }
    }
}

/// The manifest's retention rules (none without `retention:`); an error
/// names a duration that does not parse (validation refuses it).
pub fn retention_rules(m: &Manifest) -> Result<Vec<RetentionRule>, String> {
    let Some(r) = &m.retention else { return Ok(Vec::new()) };
    let dur = |what: String, s: &str| crate::units::parse_duration(s).map_err(|e| format!("retention.{what}: {e}"));
    let mut out = Vec::new();
    if let Some(keep) = r.records.as_deref().map(|d| dur("records".into(), d)).transpose()? {
        out.push(RetentionRule { source: None, except: r.sources.keys().cloned().collect(), event: None, keep });
    }
    for (s, d) in &r.sources {
        let keep = dur(format!("sources.{s}"), d)?;
        out.push(RetentionRule { source: Some(s.clone()), except: Vec::new(), event: None, keep });
    }
    for (e, d) in &r.events {
        let keep = dur(format!("events.{e}"), d)?;
        out.push(RetentionRule { source: None, except: Vec::new(), event: Some(e.clone()), keep });
    }
    Ok(out)
}
