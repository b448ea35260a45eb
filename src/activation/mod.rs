//! Activation: from profile changes to destination records.
//!
//! The rule: a destination holds a profile exactly when the profile is live,
//! in the destination's audience (any live profile for a destination without
//! one) and [`consent::release`] allows the destination's purpose. Each
//! evaluation of a profile compares that with what the destination holds
//! (the store's `destination_members`) and emits the difference: an `enter`
//! (or `upsert` for `sync: upsert`) when it should hold the profile and does
//! not, an `exit` addressed with the identities it was sent when it holds a
//! profile it should not — a withdrawal of consent, a merge that retired the
//! profile, a rule that no longer matches — and, for `sync: upsert`, an
//! `upsert` when the fields it may send changed. Evaluating the same profile
//! twice emits nothing the second time, so the realtime follower (changed
//! profiles from the outbox) and a full pass (every profile, on a schedule or
//! after a rule change) agree and may overlap.
//!
//! Audiences are re-evaluated for a changed profile only when the change
//! touches a field their rule reads ([`Dependencies`]); audiences with a
//! `refresh:` schedule, and rules that read the clock, change on their full
//! passes. Pure: profile state in, changes out; [`delivery`] holds the
//! sending policy (batches, rate, backoff, the shrink guard).

pub mod delivery;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use indexmap::IndexMap;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::consent::{self, Decision, Denial, Release};
use crate::manifest::{Destination, Manifest, SyncMode};
use crate::profile::{self, ProfileRows};
use crate::units::Rate;
pub use delivery::RetryPolicy;

/// A destination as activation runs it, resolved from the manifest once.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub def: Destination,
    /// The sync mode with its default applied (membership with an audience, upsert without).
    pub mode: SyncMode,
    /// Changes whenever what the destination should hold changes: its
    /// audience's rule, purpose, fields, hashing, mode. A change reconciles
    /// the destination with a full pass.
    pub fingerprint: String,
    pub max_records: usize,
    pub max_wait: Duration,
    pub rate: Option<Rate>,
    pub retry: RetryPolicy,
    /// `shrink_guard.max_removal_percent`.
    pub guard: Option<f64>,
}

impl Target {
    /// Destination `name` of `m`, its batch, rate and retry settings parsed.
    /// An error names the setting that does not parse (validation refuses it).
    pub fn resolve(m: &Manifest, name: &str, def: &Destination) -> Result<Target, String> {
        let mode = def.sync.unwrap_or(if def.audience.is_some() { SyncMode::Membership } else { SyncMode::Upsert });
        let rule = def.audience.as_ref().and_then(|a| m.audiences.get(a)).map(|a| a.rule.as_str());
        let what = json!({
            "audience": def.audience, "rule": rule, "purpose": def.purpose, "fields": def.fields,
            "hash": def.hash, "mode": format!("{mode:?}"), "policies": m.consent.policies,
        });
        let err = |setting: &'static str| move |e: String| format!("destination `{name}`: {setting}: {e}");
        let batch = def.batch.as_ref();
        let max_wait = batch.and_then(|b| b.max_wait.as_deref()).map(crate::units::parse_duration).transpose();
        Ok(Target {
            name: name.to_owned(),
            mode,
            fingerprint: hex::encode(Sha256::digest(what.to_string().as_bytes())),
            max_records: batch.and_then(|b| b.max_records).map_or(500, |n| n.max(1) as usize),
            max_wait: max_wait.map_err(err("batch.max_wait"))?.unwrap_or(Duration::from_secs(5)),
            rate: def.rate_limit.as_deref().map(crate::units::parse_rate).transpose().map_err(err("rate_limit"))?,
            retry: RetryPolicy::from_manifest(def.retry.as_ref()).map_err(err("retry"))?,
            guard: def.shrink_guard.as_ref().map(|g| g.max_removal_percent),
            def: def.clone(),
        })
    }
}

/// Every destination of `m`, in its order.
pub fn targets(m: &Manifest) -> Result<Vec<Target>, String> {
    m.destinations.iter().map(|(n, d)| Target::resolve(m, n, d)).collect()
}

/// What a destination holds of one profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Digest of the fields last sent.
    pub digest: String,
    /// The identities last sent (JSON), which a removal is addressed with.
    pub identities: String,
}

/// A profile as activation sees it at one moment.
#[derive(Debug, Clone, Default)]
pub struct ProfileState {
    pub profile: i64,
    /// It has identifiers (a merge retires the profile it merged away).
    pub live: bool,
    /// The audiences whose rules match now, evaluated by the golden record.
    pub audiences: BTreeSet<String>,
    pub decisions: IndexMap<String, Decision>,
    /// (key, value), by first seen.
    pub identities: Vec<(String, String)>,
    /// Merged and computed trait values by name.
    pub values: HashMap<String, Value>,
    /// Suppressed (`cdp privacy suppress`): nothing is sent, it exits everywhere.
    pub suppressed: bool,
}

/// A profile's state from its stored rows at `now`.
pub fn state_of(m: &Manifest, model: &profile::Model, rows: ProfileRows, now: i64) -> ProfileState {
    let decisions = consent::decide(m, model.consent_expiry(), &rows.consent, now);
    let profile = rows.profile;
    let g = profile::golden_record(m, model, rows, 0, now);
    let mut values: HashMap<String, Value> = g.traits.into_iter().map(|(k, v)| (k, v.value)).collect();
    values.extend(g.computed);
    ProfileState {
        profile,
        live: !g.identities.is_empty(),
        audiences: g.audiences.into_iter().collect(),
        decisions,
        identities: g.identities.into_iter().map(|i| (i.key, i.value)).collect(),
        values,
        suppressed: false,
    }
}

/// The consent decision for one profile and destination, with the fields it may send.
pub fn release_for(m: &Manifest, t: &Target, s: &ProfileState) -> Result<Release, Denial> {
    consent::release(m, &t.def, &s.decisions, s.identities.iter().map(|(k, v)| (k.as_str(), v.as_str())), |f| {
        s.values.get(f).cloned()
    })
}

/// What a destination receives for one profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Enter,
    Exit,
    Upsert,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Enter => "enter",
            Op::Exit => "exit",
            Op::Upsert => "upsert",
        }
    }
}

/// One record for a destination, and what the destination holds after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub destination: String,
    pub profile: i64,
    pub op: Op,
    pub audience: Option<String>,
    /// The record as the destination plugin receives it, without its `key`.
    pub record: Value,
    /// `Some`: the destination holds the profile afterwards; `None`: it does not.
    pub hold: Option<Held>,
}

/// The record for a destination of one profile: `in_audience` says whether
/// the profile is in the target's audience now (any live profile for a
/// target without one), `held` what the destination holds of it. `None`
/// when nothing changes.
pub fn plan(
    m: &Manifest,
    t: &Target,
    s: &ProfileState,
    in_audience: bool,
    held: Option<&Held>,
    occurred_at: i64,
) -> Option<Outgoing> {
    let release = if s.live && in_audience && !s.suppressed { Some(release_for(m, t, s)) } else { None };
    let record = |op: Op, identities: Value, traits: Value| {
        let mut r = json!({
            "op": op.as_str(),
            "profile_id": s.profile.to_string(),
            "identities": identities,
            "traits": traits,
            "occurred_at": profile::iso(occurred_at),
        });
        if let Some(a) = &t.def.audience {
            r["audience"] = json!(a);
        }
        r
    };
    let out = |op: Op, rec: Value, hold: Option<Held>| Outgoing {
        destination: t.name.clone(),
        profile: s.profile,
        op,
        audience: t.def.audience.clone(),
        record: rec,
        hold,
    };
    match (release, held) {
        (Some(Ok(r)), None) => {
            let hold = held_of(&r);
            let op = if t.mode == SyncMode::Upsert { Op::Upsert } else { Op::Enter };
            Some(out(op, record(op, json!(r.identities), Value::Object(r.traits)), Some(hold)))
        }
        (Some(Ok(r)), Some(h)) if t.mode == SyncMode::Upsert => {
            let hold = held_of(&r);
            (hold.digest != h.digest)
                .then(|| out(Op::Upsert, record(Op::Upsert, json!(r.identities), Value::Object(r.traits)), Some(hold)))
        }
        (Some(Ok(_)), Some(_)) | (None | Some(Err(_)), None) => None,
        (None | Some(Err(_)), Some(h)) => {
            let ids: Value = serde_json::from_str(&h.identities).unwrap_or_else(|_| json!({}));
            Some(out(Op::Exit, record(Op::Exit, ids, json!({})), None))
        }
    }
}

fn held_of(r: &Release) -> Held {
    let identities = json!(r.identities).to_string();
    let digest =
        hex::encode(&Sha256::digest(format!("{identities}\n{}", Value::Object(r.traits.clone())).as_bytes())[..16]);
    Held { digest, identities }
}

/// The idempotency key of a record: the same for every retry and replay of
/// it, different for every other record. `origin` names the evaluation that
/// produced it (an outbox position, a full pass).
pub fn idempotency_key(o: &Outgoing, origin: &str) -> String {
    let text = format!(
        "{}\n{}\n{}\n{}\n{origin}",
        o.destination,
        o.profile,
        o.op.as_str(),
        o.audience.as_deref().unwrap_or("")
    );
    hex::encode(&Sha256::digest(text.as_bytes())[..16])
}

/// Which outbox fields each audience's rule depends on: trait names as
/// themselves, computed and predicted traits as `events`, `consent.*` as
/// `consent`, `identities.*` as `identities`, other audiences by their own
/// dependencies. A rule that reads the clock depends on time, which no
/// change carries: [`Dependencies::clocked`].
#[derive(Debug, Clone, Default)]
pub struct Dependencies {
    by_audience: HashMap<String, HashSet<String>>,
    clocked: HashSet<String>,
}

impl Dependencies {
    /// What each audience of `m` reads, from its rule compiled in `model`.
    pub fn new(m: &Manifest, model: &profile::Model) -> Dependencies {
        let programs: HashMap<&str, &crate::audience::Program> =
            model.audiences().iter().map(|(n, p)| (n.as_str(), p)).collect();
        let mut deps = Dependencies::default();
        for name in m.audiences.keys() {
            let mut fields = HashSet::new();
            let mut clocked = false;
            let mut seen = HashSet::new();
            let mut stack = vec![name.clone()];
            while let Some(a) = stack.pop() {
                if !seen.insert(a.clone()) {
                    continue;
                }
                let Some(p) = programs.get(a.as_str()) else { continue };
                clocked |= p.reads_clock();
                for v in &p.vars {
                    if let Some(other) = v.strip_prefix("audiences.") {
                        stack.push(other.to_owned());
                    } else if v.starts_with("consent.") {
                        fields.insert("consent".to_owned());
                    } else if v.starts_with("identities.") {
                        fields.insert("identities".to_owned());
                    } else if m.model.computed.contains_key(v) || m.model.predicted.contains_key(v) {
                        fields.insert("events".to_owned());
                        if m.model.computed.get(v).is_some_and(|c| c.within.is_some()) {
                            clocked = true;
                        }
                    } else {
                        fields.insert(v.clone());
                    }
                }
            }
            if clocked {
                deps.clocked.insert(name.clone());
            }
            deps.by_audience.insert(name.clone(), fields);
        }
        deps
    }

    /// Whether a change of `changed` fields can change membership of `audience`.
    /// A merge (`merged`) or a new identifier (`identities`: its traits,
    /// events and consent join the profile) can change anything.
    pub fn touches(&self, audience: &str, changed: &[String]) -> bool {
        let Some(fields) = self.by_audience.get(audience) else { return true };
        changed.iter().any(|c| c == "merged" || c == "identities" || fields.contains(c))
    }

    /// Whether `audience`'s membership can change with time alone (its rule
    /// reads `now`, or a computed trait with a `within` window).
    pub fn clocked(&self, audience: &str) -> bool {
        self.clocked.contains(audience)
    }
}

/// Entries and exits of one profile: `before` the stored membership of the
/// audiences in `scope`, `after` the evaluated one.
pub fn audience_diff<'a>(
    scope: impl IntoIterator<Item = &'a String>,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for a in scope {
        match (before.contains(a), after.contains(a)) {
            (false, true) => out.push((a.clone(), true)),
            (true, false) => out.push((a.clone(), false)),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests;
