//! What changed identity rules would do to the profiles already stored:
//! `cdp plan`'s identity impact. Each stored connected component is
//! partitioned again under the new keys' limits and priorities
//! ([`resolve::partition`], the function the store itself uses) and compared
//! with how its identifiers are grouped into profiles now. Pure: identifiers
//! and links in, counts out. Values are compared as stored (already
//! normalised): a changed `normalize` or `pattern` is not re-applied.

use std::collections::{BTreeMap, BTreeSet};

use super::resolve::{Ident, KeyRules, Link, partition};

/// A stored identifier: its id, key name, value, current profile, component.
#[derive(Debug, Clone)]
pub struct StoredIdent {
    pub id: i64,
    pub key: String,
    pub value: String,
    pub profile: i64,
    pub component: i64,
    pub isolated: bool,
}

/// A stored link: its component and the identifier ids it joined.
#[derive(Debug, Clone)]
pub struct StoredLink {
    pub component: i64,
    pub at: i64,
    pub source: String,
    pub message_id: String,
    pub ids: Vec<i64>,
    /// A probabilistic match's probability.
    pub probability: Option<f64>,
}

/// Profiles that would merge and split.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Impact {
    pub profiles_before: u64,
    pub profiles_after: u64,
    /// New profiles that would hold identifiers of two or more current ones.
    pub merged_profiles: u64,
    /// Current profiles whose identifiers would end up in two or more profiles.
    pub split_profiles: u64,
    pub merge_examples: Vec<Vec<String>>,
    pub split_examples: Vec<Vec<String>>,
}

/// Partitions every component again with `keys` (names in index order) and
/// `rules`, and compares with the stored profiles.
pub fn impact(
    idents: &[StoredIdent],
    links: &[StoredLink],
    keys: &[String],
    rules: &KeyRules,
    examples: usize,
) -> Impact {
    let mut by_component: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, id) in idents.iter().enumerate() {
        by_component.entry(id.component).or_default().push(i);
    }
    let mut links_of: BTreeMap<i64, Vec<&StoredLink>> = BTreeMap::new();
    for l in links {
        links_of.entry(l.component).or_default().push(l);
    }
    let mut out = Impact {
        profiles_before: idents.iter().map(|i| i.profile).collect::<BTreeSet<_>>().len() as u64,
        ..Impact::default()
    };
    let label = |i: &StoredIdent| format!("{}={}", i.key, i.value);
    for (component, members) in &by_component {
        let local: BTreeMap<i64, u32> = members.iter().enumerate().map(|(n, i)| (idents[*i].id, n as u32)).collect();
        let ids: Vec<Ident> = members
            .iter()
            .map(|i| {
                let s = &idents[*i];
                let key = keys.iter().position(|k| *k == s.key).map_or(u16::MAX, |k| k as u16);
                Ident { key, value: s.value.clone(), isolated: s.isolated }
            })
            .collect();
        let comp_links: Vec<Link> = links_of
            .get(component)
            .into_iter()
            .flatten()
            .map(|l| Link {
                at: l.at,
                source: l.source.clone(),
                message_id: l.message_id.clone(),
                ids: l.ids.iter().filter_map(|id| local.get(id).copied()).collect(),
                probability: l.probability,
            })
            .collect();
        let p = partition(&ids, &comp_links, rules);
        // New cluster → current profiles in it; current profile → new clusters.
        let mut profiles_in: BTreeMap<u32, BTreeSet<i64>> = BTreeMap::new();
        let mut clusters_of: BTreeMap<i64, BTreeSet<u32>> = BTreeMap::new();
        for (n, i) in members.iter().enumerate() {
            profiles_in.entry(p.cluster[n]).or_default().insert(idents[*i].profile);
            clusters_of.entry(idents[*i].profile).or_default().insert(p.cluster[n]);
        }
        out.profiles_after += profiles_in.len() as u64;
        for (cluster, profiles) in &profiles_in {
            if profiles.len() > 1 {
                out.merged_profiles += 1;
                if out.merge_examples.len() < examples {
                    let ex = members.iter().enumerate().filter(|(n, _)| p.cluster[*n] == *cluster);
                    out.merge_examples.push(ex.map(|(_, i)| label(&idents[*i])).collect());
                }
            }
        }
        for (profile, clusters) in &clusters_of {
            if clusters.len() > 1 {
                out.split_profiles += 1;
                if out.split_examples.len() < examples {
                    let ex = members.iter().filter(|i| idents[**i].profile == *profile);
                    out.split_examples.push(ex.map(|i| label(&idents[*i])).collect());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(id: i64, key: &str, value: &str, profile: i64) -> StoredIdent {
        StoredIdent { id, key: key.into(), value: value.into(), profile, component: 1, isolated: false }
    }

    fn link(at: i64, ids: &[i64]) -> StoredLink {
        StoredLink {
            component: 1,
            at,
            source: "crm".into(),
            message_id: format!("m{at}"),
            ids: ids.to_vec(),
            probability: None,
        }
    }

    /// Two CRM ids share a family email. Under `email: limit 1` (stored) they
    /// are two profiles; lifting the CRM limit and the email limit merges them;
    /// and the other way round, the merged profile splits.
    #[test]
    fn changed_limits_merge_and_split_stored_profiles() {
        let keys = vec!["crm_id".to_owned(), "email".to_owned()];
        let idents = vec![
            ident(1, "crm_id", "C1", 10),
            ident(2, "email", "family@example.org", 10),
            ident(3, "crm_id", "C2", 20),
        ];
        let links = vec![link(1, &[1, 2]), link(2, &[3, 2])];
        let unique_crm = KeyRules { limits: vec![Some(1), None], rank: vec![0, 1], cross: Vec::new() };
        let none = impact(&idents, &links, &keys, &unique_crm, 3);
        assert_eq!((none.merged_profiles, none.split_profiles), (0, 0), "{none:?}");
        assert_eq!((none.profiles_before, none.profiles_after), (2, 2));

        let no_limits = KeyRules { limits: vec![None, None], rank: vec![0, 1], cross: Vec::new() };
        let merged = impact(&idents, &links, &keys, &no_limits, 3);
        assert_eq!((merged.merged_profiles, merged.split_profiles, merged.profiles_after), (1, 0, 1));
        assert_eq!(merged.merge_examples[0].len(), 3);

        // Stored as one profile; a unique CRM id splits it.
        let one: Vec<StoredIdent> = idents
            .iter()
            .cloned()
            .map(|mut i| {
                i.profile = 10;
                i
            })
            .collect();
        let split = impact(&one, &links, &keys, &unique_crm, 3);
        assert_eq!((split.merged_profiles, split.split_profiles, split.profiles_after), (0, 1, 2));
    }
}
