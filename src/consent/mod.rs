//! Consent: whether a profile may be used for each purpose the manifest
//! declares. Ingest records every answer a source carries in the store's
//! consent ledger; this module decides, from those ledger rows and the
//! manifest's `consent.default` and `consent.expiry`, each purpose's state
//! as the golden record shows it and audience rules read it
//! (`consent.<purpose>`). Pure: rows in, decisions out; no store, no clock
//! (the caller passes `now`).

use std::fmt;

use indexmap::IndexMap;
use serde::Serialize;

use crate::manifest::{ConsentDefault, Manifest};

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
pub fn expiry(m: &Manifest) -> Option<std::time::Duration> {
    m.consent.expiry.as_deref().and_then(|e| crate::units::parse_duration(e).ok())
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
        let d = decide(&m, expiry(&m), &rows, 30 * DAY);
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
        assert_eq!(decide(&m, expiry(&m), &rows, 30 * DAY)["email_marketing"].basis, Basis::Recorded);
        let lapsed = &decide(&m, expiry(&m), &rows, 30 * DAY + 1)["email_marketing"];
        assert_eq!((lapsed.granted, lapsed.basis, lapsed.at), (false, Basis::Expired, Some(0)));
        assert!(decide(&m, expiry(&m), &rows, 0)["analytics"].granted);
    }
}
