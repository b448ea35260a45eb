//! Consent: whether a profile may be used for each purpose the manifest
//! declares. Ingest records every answer a source carries in the store's
//! consent ledger; this module decides, from those ledger rows and the
//! manifest's `consent.default` and `consent.expiry`, each purpose's state
//! as the golden record shows it and audience rules read it
//! (`consent.<purpose>`). Pure: rows in, decisions out; no store, no clock
//! (the caller passes `now`).
//!
//! It also decides what may leave for a destination ([`release`]): nothing
//! unless the profile's state for the destination's purpose is granted
//! (fail-closed: no recorded grant and a `denied` default is no basis), and
//! of the destination's `fields` only those no label policy denies for that
//! purpose, hashed where the destination hashes them. `cdp validate` refuses
//! a label flow with the same rule ([`field_use`]), so a denied field is
//! caught before the manifest runs and dropped again at delivery.

use std::fmt;

use indexmap::IndexMap;
use serde::Serialize;

use crate::manifest::{ConsentDefault, Destination, Manifest, PolicyException};

/// One answer in the consent ledger of one of the profile's identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub purpose: String,
    pub granted: bool,
    /// When it was given, milliseconds since the epoch.
    pub at: i64,
    pub source: String,
}

/// Where a purpose's state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// The person answered; the latest answer holds.
    Recorded,
    /// The person granted it longer ago than `consent.expiry`: it lapsed.
    Expired,
    /// The person never answered: `consent.default` holds.
    Default,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Recorded => "recorded",
            Basis::Expired => "expired",
            Basis::Default => "default",
        }
    }
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A purpose's state for one profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub granted: bool,
    pub basis: Basis,
    /// When the deciding answer was given (none for the default).
    pub at: Option<i64>,
    /// The source that recorded the deciding answer (none for the default).
    pub source: Option<String>,
}

/// `consent.expiry`, parsed (validation refuses one that does not parse).
pub fn expiry(m: &Manifest) -> Result<Option<std::time::Duration>, String> {
    m.consent
        .expiry
        .as_deref()
        .map(crate::units::parse_duration)
        .transpose()
        .map_err(|e| format!("consent.expiry: {e}"))
}

/// Every declared purpose's state, in the manifest's order, from the
/// profile's ledger rows (`expiry` from [`expiry`]); see [`decision`].
pub fn decide(
    m: &Manifest,
    expiry: Option<std::time::Duration>,
    rows: &[LedgerRow],
    now: i64,
) -> IndexMap<String, Decision> {
    m.consent.purposes.iter().map(|p| (p.clone(), decision(m, expiry, rows, p, now))).collect()
}

/// One purpose's state from the profile's ledger rows. The latest answer
/// wins (at one instant, a grant over a withdrawal); a grant older than
/// `consent.expiry` has lapsed; without an answer `consent.default` holds.
pub fn decision(
    m: &Manifest,
    expiry: Option<std::time::Duration>,
    rows: &[LedgerRow],
    purpose: &str,
    now: i64,
) -> Decision {
    let latest = rows.iter().filter(|r| r.purpose == purpose).max_by_key(|r| (r.at, r.granted));
    match latest {
        Some(r) => {
            let lapsed = expiry.is_some_and(|e| {
                r.granted && now.saturating_sub(r.at) > i64::try_from(e.as_millis()).unwrap_or(i64::MAX)
            });
            Decision {
                granted: r.granted && !lapsed,
                basis: if lapsed { Basis::Expired } else { Basis::Recorded },
                at: Some(r.at),
                source: Some(r.source.clone()),
            }
        }
        None => Decision {
            granted: m.consent.default == ConsentDefault::Granted,
            basis: Basis::Default,
            at: None,
            source: None,
        },
    }
}

/// Labels a profile field carries: a trait's own labels; an identity key
/// without a trait of its name is personal data by nature and carries `pii`.
pub fn field_labels<'m>(m: &'m Manifest, field: &str) -> Vec<&'m str> {
    match m.model.traits.get(field) {
        Some(t) => t.labels.iter().map(String::as_str).collect(),
        None if m.identity.keys.contains_key(field) => vec!["pii"],
        None => Vec::new(),
    }
}

/// How one field may leave for a purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldUse<'m> {
    /// As it is.
    Send,
    /// As the SHA-256 of its normalised value.
    Hash,
    /// Not at all: `policy` (index in `consent.policies`) denies `label` for the purpose.
    Deny { label: &'m str, policy: usize },
}

/// How `field` may leave for `purpose` when the destination lists it under
/// `hash` (`hashed`) or not. A policy denies a field one of whose labels it
/// lists, for the purposes it lists, unless it says `unless: hashed` and the
/// field is hashed.
pub fn field_use<'m>(m: &'m Manifest, purpose: &str, field: &str, hashed: bool) -> FieldUse<'m> {
    let labels = field_labels(m, field);
    for (i, pol) in m.consent.policies.iter().enumerate() {
        if !pol.purposes.iter().any(|p| p == purpose) {
            continue;
        }
        if pol.unless == Some(PolicyException::Hashed) && hashed {
            continue;
        }
        if let Some(label) = labels.iter().find(|l| pol.deny_labels.iter().any(|x| x == *l)) {
            return FieldUse::Deny { label, policy: i };
        }
    }
    if hashed { FieldUse::Hash } else { FieldUse::Send }
}

/// What may be sent of one profile to one destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Release {
    /// Identity values by key, in the destination's field order; hashed
    /// values are lowercase hex SHA-256.
    pub identities: IndexMap<String, Vec<String>>,
    /// Trait values (merged and computed) by name, in the destination's field order.
    pub traits: serde_json::Map<String, serde_json::Value>,
    /// Fields left out because a label policy denies them for the purpose.
    pub dropped: Vec<String>,
}

/// Why nothing may be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The purpose is not one `consent.purposes` declares.
    UnknownPurpose(String),
    /// The person never answered and `consent.default` is `denied`.
    NoBasis(String),
    /// The person withdrew the purpose (or never granted it) at `at` via `source`.
    Withdrawn { purpose: String, at: Option<i64>, source: Option<String> },
    /// The person's grant lapsed under `consent.expiry`.
    Expired { purpose: String, at: Option<i64> },
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::UnknownPurpose(p) => write!(f, "purpose `{p}` is not declared in consent.purposes"),
            Denial::NoBasis(p) => write!(f, "no consent recorded for `{p}` and consent.default is denied"),
            Denial::Withdrawn { purpose, at, source } => {
                write!(f, "consent for `{purpose}` denied")?;
                if let Some(at) = at {
                    write!(f, " at {}", crate::profile::iso(*at))?;
                }
                if let Some(s) = source {
                    write!(f, " by source `{s}`")?;
                }
                Ok(())
            }
            Denial::Expired { purpose, at } => {
                write!(f, "consent for `{purpose}` expired")?;
                if let Some(at) = at {
                    write!(f, " (granted {})", crate::profile::iso(*at))?;
                }
                Ok(())
            }
        }
    }
}

/// Whether `decisions` give a basis to use the profile for `purpose`:
/// only a granted state does (an undeclared purpose has none).
pub fn basis(decisions: &IndexMap<String, Decision>, purpose: &str) -> Result<(), Denial> {
    let Some(d) = decisions.get(purpose) else {
        return Err(Denial::UnknownPurpose(purpose.to_owned()));
    };
    if d.granted {
        return Ok(());
    }
    Err(match d.basis {
        Basis::Default => Denial::NoBasis(purpose.to_owned()),
        Basis::Expired => Denial::Expired { purpose: purpose.to_owned(), at: d.at },
        Basis::Recorded => Denial::Withdrawn { purpose: purpose.to_owned(), at: d.at, source: d.source.clone() },
    })
}

/// The one decision on sending a profile to a destination: the consent
/// state of the destination's purpose from `decisions` ([`decide`]), then
/// each of its `fields` by [`field_use`]. A field named like an identity key
/// is sent from the profile's identifiers (with the labels of a trait of
/// its name, if the model has one); any other field is a trait's value. `identities` are the profile's
/// (key, value) pairs, `value` gives a trait's (merged or computed) value.
pub fn release<'a>(
    m: &Manifest,
    dest: &Destination,
    decisions: &IndexMap<String, Decision>,
    identities: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    value: impl Fn(&str) -> Option<serde_json::Value>,
) -> Result<Release, Denial> {
    let purpose = &dest.purpose;
    basis(decisions, purpose)?;
    let mut out = Release::default();
    for field in &dest.fields {
        let hashed = dest.hash.iter().any(|h| h == field);
        let how = field_use(m, purpose, field, hashed);
        if matches!(how, FieldUse::Deny { .. }) {
            out.dropped.push(field.clone());
            continue;
        }
        let hash = how == FieldUse::Hash;
        if m.identity.keys.contains_key(field) {
            let values: Vec<String> = identities
                .clone()
                .into_iter()
                .filter(|(k, _)| *k == field)
                .map(|(_, v)| if hash { hash_text(v) } else { v.to_owned() })
                .collect();
            out.identities.insert(field.clone(), values);
        } else {
            let v = value(field).unwrap_or(serde_json::Value::Null);
            let v = if hash { hash_value(&v) } else { v };
            out.traits.insert(field.clone(), v);
        }
    }
    Ok(out)
}

/// SHA-256 hex of a normalised text value: trimmed and lowercased, as ad
/// platforms match hashed identifiers.
pub fn hash_text(v: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(v.trim().to_lowercase().as_bytes()))
}

/// A trait value hashed: text and numbers by [`hash_text`] of their text,
/// lists element by element; null stays null (there is nothing to match).
fn hash_value(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Null => Value::Null,
        Value::String(s) => Value::String(hash_text(s)),
        Value::Array(a) => Value::Array(a.iter().map(hash_value).collect()),
        other => Value::String(hash_text(&other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Options, load_str};

    const DAY: i64 = 86_400_000;

    fn manifest(consent: &str) -> Manifest {
        let text =
            format!("version: 1\nname: t\nidentity:\n  keys:\n    email: {{ normalize: email }}\nconsent:\n{consent}");
        let l = load_str(&text, &Options::validate("."));
        assert!(!l.has_errors(), "{:#?}", l.diagnostics);
        l.manifest.expect("manifest")
    }

    fn row(purpose: &str, granted: bool, at: i64, source: &str) -> LedgerRow {
        LedgerRow { purpose: purpose.into(), granted, at, source: source.into() }
    }

    #[test]
    fn the_latest_answer_wins_and_unanswered_purposes_take_the_default() {
        let m = manifest("  purposes: [email_marketing, advertising, analytics]\n  default: denied\n");
        let rows = [
            row("email_marketing", true, 10 * DAY, "web"),
            row("email_marketing", false, 20 * DAY, "crm"),
            row("advertising", false, 5 * DAY, "web"),
            row("advertising", true, 5 * DAY, "app"),
        ];
        let d = decide(&m, expiry(&m).expect("expiry"), &rows, 30 * DAY);
        assert_eq!(d.keys().collect::<Vec<_>>(), ["email_marketing", "advertising", "analytics"]);
        let email = &d["email_marketing"];
        assert_eq!(
            (email.granted, email.basis, email.at, email.source.as_deref()),
            (false, Basis::Recorded, Some(20 * DAY), Some("crm"))
        );
        // Two answers at one instant: the grant holds.
        assert_eq!((d["advertising"].granted, d["advertising"].source.as_deref()), (true, Some("app")));
        assert_eq!(d["analytics"], Decision { granted: false, basis: Basis::Default, at: None, source: None });
    }

    #[test]
    fn a_grant_lapses_after_the_expiry_and_an_opt_out_default_grants() {
        let m = manifest("  purposes: [email_marketing, analytics]\n  default: granted\n  expiry: 30d\n");
        let rows = [row("email_marketing", true, 0, "web")];
        assert_eq!(decide(&m, expiry(&m).expect("expiry"), &rows, 30 * DAY)["email_marketing"].basis, Basis::Recorded);
        let lapsed = &decide(&m, expiry(&m).expect("expiry"), &rows, 30 * DAY + 1)["email_marketing"];
        assert_eq!((lapsed.granted, lapsed.basis, lapsed.at), (false, Basis::Expired, Some(0)));
        assert!(decide(&m, expiry(&m).expect("expiry"), &rows, 0)["analytics"].granted);
    }
}
