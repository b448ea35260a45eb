//! `cdp profile explain`: why a profile's identifiers are together, built
//! from the rows the store holds — the identifiers, the links of their
//! components, the scores of probabilistic links and the ledger. Rows in,
//! the explanation out; the store only reads (`Store::explain`).
//!
//! Every link that joined an identifier to another one of the profile is
//! listed under that identifier (`linked_by`), deterministic ones as "one
//! record carried both", probabilistic ones with their probability and field
//! weights; a ledger merge made by a probabilistic link says so the same
//! way, so each link has one account.

use crate::profile::{IdentityRow, iso};
use indexmap::IndexMap;
use serde::Serialize;
use serde_json::{Value, json};

/// The rule of a link made by probabilistic matching.
pub const PROBABILISTIC: &str = "probabilistic (Fellegi-Sunter)";

/// The source of match link records.
pub const MATCH_SOURCE: &str = "match";

/// A stored link: the identifiers it joined and the record that made it.
#[derive(Debug, Clone)]
pub struct LinkRow {
    pub ids: Vec<i64>,
    pub at: i64,
    pub source: String,
    pub message_id: String,
}

/// A ledger row about the profile.
#[derive(Debug, Clone)]
pub struct LedgerRow {
    pub at: i64,
    pub kind: String,
    pub profile_id: i64,
    pub other_profile_id: Option<i64>,
    pub source: Option<String>,
    pub message_id: Option<String>,
    pub rule: String,
}

/// What the store read for one profile.
#[derive(Debug, Clone, Default)]
pub struct ExplainRows {
    pub profile: i64,
    /// The profile's identifiers, oldest first.
    pub identities: Vec<IdentityRow>,
    /// Every link of the identifiers' components, oldest first.
    pub links: Vec<LinkRow>,
    /// Match link records' payloads (probability, field weights) by message id.
    pub scores: IndexMap<String, Value>,
    pub ledger: Vec<LedgerRow>,
}

impl ExplainRows {
    /// Message ids of match records whose scores the explanation shows:
    /// the links' and the ledger's.
    pub fn match_records(&self) -> Vec<String> {
        let links = self.links.iter().filter(|l| l.source == MATCH_SOURCE).map(|l| l.message_id.clone());
        let ledger = self
            .ledger
            .iter()
            .filter(|r| r.source.as_deref() == Some(MATCH_SOURCE))
            .filter_map(|r| r.message_id.clone());
        let mut out: Vec<String> = links.chain(ledger).collect();
        out.sort();
        out.dedup();
        out
    }
}

/// `cdp profile explain`'s document.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub profile_id: String,
    pub identities: Vec<ExplainedIdentity>,
    pub ledger: Vec<Value>,
}

/// One identifier of the profile and how it joined.
#[derive(Debug, Serialize)]
pub struct ExplainedIdentity {
    #[serde(rename = "type")]
    pub key: String,
    pub value: String,
    pub first_seen: String,
    pub first_record: String,
    /// Records that carried this identifier together with another one of this profile.
    pub linked_by: Vec<Value>,
    pub isolated: bool,
}

/// Builds the explanation from the rows.
pub fn explain(rows: ExplainRows) -> Explanation {
    let by_id: IndexMap<i64, (&str, &str)> =
        rows.identities.iter().map(|i| (i.id, (i.key.as_str(), i.value.as_str()))).collect();
    let identities = rows
        .identities
        .iter()
        .map(|i| {
            let linked_by = rows
                .links
                .iter()
                .filter(|l| l.ids.contains(&i.id) && l.ids.iter().any(|o| *o != i.id && by_id.contains_key(o)))
                .map(|l| {
                    let with: Vec<String> = l
                        .ids
                        .iter()
                        .filter(|o| **o != i.id)
                        .filter_map(|o| by_id.get(o))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let record = format!("{}/{}", l.source, l.message_id);
                    match rows.scores.get(&l.message_id).filter(|_| l.source == MATCH_SOURCE) {
                        Some(score) => json!({"record": record, "at": iso(l.at), "with": with,
                            "rule": PROBABILISTIC, "probability": score["probability"], "fields": score["fields"]}),
                        None => json!({"record": record, "at": iso(l.at), "with": with,
                            "rule": "deterministic: identifiers in one record"}),
                    }
                })
                .collect();
            ExplainedIdentity {
                key: i.key.clone(),
                value: i.value.clone(),
                first_seen: iso(i.first_at),
                first_record: format!("{}/{}", i.source, i.message_id),
                linked_by,
                isolated: i.isolated,
            }
        })
        .collect();
    let ledger = rows
        .ledger
        .iter()
        .map(|r| {
            let mut entry = json!({
                "at": iso(r.at),
                "kind": r.kind,
                "profile_id": r.profile_id.to_string(),
                "other_profile_id": r.other_profile_id.map(|x| x.to_string()),
                "record": r.source.as_ref().zip(r.message_id.as_ref()).map(|(s, m)| format!("{s}/{m}")),
                "rule": r.rule,
            });
            if r.source.as_deref() == Some(MATCH_SOURCE)
                && let Some(score) = r.message_id.as_ref().and_then(|m| rows.scores.get(m))
            {
                entry["rule"] = json!(PROBABILISTIC);
                entry["probability"] = score["probability"].clone();
                entry["fields"] = score["fields"].clone();
            }
            entry
        })
        .collect();
    Explanation { profile_id: rows.profile.to_string(), identities, ledger }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(id: i64, key: &str, value: &str, at: i64) -> IdentityRow {
        IdentityRow {
            id,
            key: key.into(),
            value: value.into(),
            first_at: at,
            source: "crm".into(),
            message_id: format!("m{id}"),
            isolated: false,
        }
    }

    #[test]
    fn each_link_is_told_once_with_its_rule_and_score() {
        let rows = ExplainRows {
            profile: 7,
            identities: vec![ident(1, "email", "a@x.org", 0), ident(2, "crm_id", "C1", 0), ident(3, "crm_id", "C2", 0)],
            links: vec![
                LinkRow { ids: vec![1, 2], at: 0, source: "crm".into(), message_id: "m1".into() },
                LinkRow { ids: vec![2, 3], at: 1, source: "match".into(), message_id: "crm_id=C1~crm_id=C2".into() },
                // Another profile's identifier in the component: not this profile's link.
                LinkRow { ids: vec![1, 99], at: 2, source: "web".into(), message_id: "w1".into() },
            ],
            scores: [("crm_id=C1~crm_id=C2".to_owned(), json!({"probability": 0.998, "fields": []}))]
                .into_iter()
                .collect(),
            ledger: vec![LedgerRow {
                at: 1,
                kind: "merge".into(),
                profile_id: 7,
                other_profile_id: Some(8),
                source: Some("match".into()),
                message_id: Some("crm_id=C1~crm_id=C2".into()),
                rule: "deterministic: …".into(),
            }],
        };
        assert_eq!(rows.match_records(), ["crm_id=C1~crm_id=C2"]);
        let x = explain(rows);
        assert_eq!(x.profile_id, "7");
        assert_eq!(x.identities[0].linked_by.len(), 1, "{:?}", x.identities[0].linked_by);
        assert_eq!(x.identities[0].linked_by[0]["with"], json!(["crm_id=C1"]));
        let c2 = &x.identities[2].linked_by[0];
        assert_eq!((c2["rule"].as_str(), c2["probability"].as_f64()), (Some(PROBABILISTIC), Some(0.998)));
        assert_eq!(x.ledger[0]["rule"], PROBABILISTIC);
        assert_eq!(x.ledger[0]["other_profile_id"], "8");
    }
}
