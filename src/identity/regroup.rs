//! Regrouping after a change to the identity graph: the identifiers of the
//! components a batch's new links touch, partitioned again
//! ([`resolve::partition`]), become profile and component assignments, and
//! what changed is told in ledger entries. Pure: the store loads the
//! components and writes what this returns (`store::ingest`).
//!
//! Each connected set of identifiers is one component, numbered by the
//! smallest component id its identifiers had (else its smallest identifier
//! id). Each cluster keeps the profile most of its stored identifiers had,
//! the largest cluster choosing first; a cluster whose profiles were all
//! taken gets a new one (a split when it had stored identifiers). A stored
//! profile that lost every identifier was merged into the profile most of
//! them went to, explained by the new link that carried identifiers of both.

use super::IdentityConfig;
use super::resolve::{self, Ident, Link};
use rustc_hash::{FxHashMap, FxHashSet};

/// An identifier of the working set: its id, key and value, and the
/// (profile, component) it is stored with (`None` when the batch creates it).
#[derive(Debug, Clone)]
pub struct Node {
    pub id: i64,
    pub key: String,
    pub value: String,
    pub old: Option<(i64, i64)>,
    pub isolated: bool,
}

/// A link: the record that made it, the identifiers it joins, and for a
/// probabilistic match its probability (see [`resolve`]).
#[derive(Debug, Clone)]
pub struct PendingLink {
    pub at: i64,
    pub source: String,
    pub message_id: String,
    pub ids: Vec<i64>,
    pub probability: Option<f64>,
}

/// A ledger entry: a merge, split or limit conflict, with the record and rule behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    pub kind: &'static str,
    pub profile: i64,
    pub other: Option<i64>,
    pub identity: Option<i64>,
    pub source: Option<String>,
    pub message_id: Option<String>,
    pub rule: String,
}

#[allow(clippy::too_many_arguments)]
fn ledger_row(
    kind: &'static str,
    profile: i64,
    other: Option<i64>,
    identity: Option<i64>,
    source: Option<String>,
    message_id: Option<String>,
    rule: &str,
) -> LedgerEntry {
    LedgerEntry { kind, profile, other, identity, source, message_id, rule: rule.to_owned() }
}

/// Counts for the batch's report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub splits: u64,
    pub merges: u64,
    pub conflicts: u64,
}

/// What regrouping decided.
#[derive(Debug, Default)]
pub struct Regrouping {
    /// Every working-set identifier's (profile, component).
    pub profile_of: FxHashMap<i64, i64>,
    pub component_of: FxHashMap<i64, i64>,
    /// Stored identifiers that moved: (identity, profile, component).
    pub id_updates: Vec<(i64, i64, i64)>,
    /// Profiles created.
    pub new_profiles: Vec<i64>,
    /// Stored profiles merged away: (absorbed, into).
    pub absorbed: Vec<(i64, i64)>,
    /// Components joined: (kept id, ids merged into it).
    pub component_moves: Vec<(i64, Vec<i64>)>,
    /// (old profile, new profile) of stored identifiers that moved.
    pub regrouped: Vec<(i64, i64)>,
    pub ledger: Vec<LedgerEntry>,
    pub report: Counts,
}

/// Regroups the working set: `stored`, the stored identifiers of the
/// touched components; `new_nodes`, the identifiers the batch creates
/// (those a changing link joins enter the working set); `old_links`, the
/// components' stored links by key; `changing`, the batch's new or earlier
/// links by key. `next_profile` hands out ids for new profiles.
pub fn regroup<E>(
    cfg: &IdentityConfig,
    stored: Vec<Node>,
    new_nodes: &[(i64, &str, &str)],
    old_links: &[(String, PendingLink)],
    changing: &[(String, PendingLink)],
    next_profile: &mut impl FnMut() -> Result<i64, E>,
) -> Result<Regrouping, E> {
    let mut profile_of: FxHashMap<i64, i64> = FxHashMap::default();
    let mut component_of: FxHashMap<i64, i64> = FxHashMap::default();
    let mut id_updates: Vec<(i64, i64, i64)> = Vec::new();
    let mut new_profiles: Vec<i64> = Vec::new();
    let mut absorbed: Vec<(i64, i64)> = Vec::new();
    let mut ledger: Vec<LedgerEntry> = Vec::new();
    let mut component_moves: Vec<(i64, Vec<i64>)> = Vec::new();
    let mut regrouped: Vec<(i64, i64)> = Vec::new();
    let mut report = Counts::default();
    let mut nodes: Vec<Node> = stored;
    let mut index: FxHashMap<i64, u32> = nodes.iter().enumerate().map(|(i, n)| (n.id, i as u32)).collect();
    let linked: FxHashSet<i64> = changing.iter().flat_map(|(_, l)| l.ids.iter().copied()).collect();
    for n in new_nodes {
        if linked.contains(&n.0) && !index.contains_key(&n.0) {
            index.insert(n.0, nodes.len() as u32);
            nodes.push(Node { id: n.0, key: n.1.to_owned(), value: n.2.to_owned(), old: None, isolated: false });
        }
    }
    let changing_keys: FxHashSet<&String> = changing.iter().map(|(k, _)| k).collect();
    let mut links: Vec<Link> = Vec::new();
    let mut link_is_new: Vec<bool> = Vec::new();
    let as_link = |l: &PendingLink| Link {
        at: l.at,
        source: l.source.clone(),
        message_id: l.message_id.clone(),
        ids: l.ids.iter().filter_map(|i| index.get(i).copied()).collect(),
        probability: l.probability,
    };
    for (key, l) in old_links {
        if changing_keys.contains(key) {
            continue; // replaced by an earlier occurrence in this batch
        }
        links.push(as_link(l));
        link_is_new.push(false);
    }
    for (_, l) in changing {
        links.push(as_link(l));
        link_is_new.push(true);
    }
    let idents: Vec<Ident> = nodes
        .iter()
        .map(|n| Ident { key: cfg.key_index(&n.key), value: n.value.clone(), isolated: n.isolated })
        .collect();
    let part = resolve::partition(&idents, &links, &cfg.rules);

    // Components: plain connectivity of the working set.
    let mut comp_root: Vec<u32> = (0..nodes.len() as u32).collect();
    fn find(p: &mut [u32], mut x: u32) -> u32 {
        while p[x as usize] != x {
            p[x as usize] = p[p[x as usize] as usize];
            x = p[x as usize];
        }
        x
    }
    for l in &links {
        for w in l.ids.windows(2) {
            let (a, b) = (find(&mut comp_root, w[0]), find(&mut comp_root, w[1]));
            if a != b {
                let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                comp_root[hi as usize] = lo;
            }
        }
    }
    let mut comp_id: FxHashMap<u32, i64> = FxHashMap::default();
    let mut comp_members: FxHashMap<u32, Vec<usize>> = FxHashMap::default();
    for i in 0..nodes.len() {
        let r = find(&mut comp_root, i as u32);
        comp_members.entry(r).or_default().push(i);
    }
    for (root, members) in &comp_members {
        let olds: Vec<i64> = members.iter().filter_map(|i| nodes[*i].old.map(|o| o.1)).collect();
        let id = olds.iter().min().copied().unwrap_or_else(|| members.iter().map(|i| nodes[*i].id).min().unwrap_or(0));
        comp_id.insert(*root, id);
        let mut merged: Vec<i64> = olds.into_iter().filter(|c| *c != id).collect();
        merged.sort_unstable();
        merged.dedup();
        if !merged.is_empty() {
            component_moves.push((id, merged));
        }
    }

    // Profiles: each cluster keeps the profile most of its stored identifiers had.
    let mut clusters: FxHashMap<u32, Vec<usize>> = FxHashMap::default();
    for (i, c) in part.cluster.iter().enumerate() {
        clusters.entry(*c).or_default().push(i);
    }
    let mut order: Vec<(u32, Vec<usize>)> = clusters.into_iter().collect();
    order.sort_by_key(|(c, m)| (std::cmp::Reverse(m.len()), *c));
    let mut taken: FxHashSet<i64> = FxHashSet::default();
    let mut cluster_profile: FxHashMap<u32, i64> = FxHashMap::default();
    for (c, members) in &order {
        let mut counts: FxHashMap<i64, usize> = FxHashMap::default();
        for i in members {
            if let Some((p, _)) = nodes[*i].old {
                *counts.entry(p).or_default() += 1;
            }
        }
        let mut cands: Vec<(i64, usize)> = counts.into_iter().collect();
        cands.sort_by_key(|(p, n)| (std::cmp::Reverse(*n), *p));
        let pick = cands.iter().map(|(p, _)| *p).find(|p| !taken.contains(p));
        let profile = match pick {
            Some(p) => p,
            None => {
                let p = next_profile()?;
                new_profiles.push(p);
                if let Some((old, _)) = cands.first() {
                    report.splits += 1;
                    ledger.push(ledger_row(
                        "split",
                        p,
                        Some(*old),
                        None,
                        None,
                        None,
                        "a limit separated identifiers that were one profile",
                    ));
                }
                p
            }
        };
        taken.insert(profile);
        cluster_profile.insert(*c, profile);
    }
    for (i, n) in nodes.iter().enumerate() {
        let profile = cluster_profile[&part.cluster[i]];
        let component = comp_id[&find(&mut comp_root, i as u32)];
        profile_of.insert(n.id, profile);
        component_of.insert(n.id, component);
        if let Some((op, oc)) = n.old
            && (op != profile || oc != component)
        {
            id_updates.push((n.id, profile, component));
            if op != profile {
                regrouped.push((op, profile));
            }
        }
    }
    // Stored profiles that lost every identifier were merged into another.
    let mut old_profiles: FxHashMap<i64, Vec<usize>> = FxHashMap::default();
    for (i, n) in nodes.iter().enumerate() {
        if let Some((p, _)) = n.old {
            old_profiles.entry(p).or_default().push(i);
        }
    }
    // New links by the stored profiles they touch, to explain merges.
    let mut new_links_of: FxHashMap<i64, Vec<usize>> = FxHashMap::default();
    for (li, l) in links.iter().enumerate().filter(|(li, _)| link_is_new[*li]) {
        for i in &l.ids {
            if let Some((p, _)) = nodes[*i as usize].old {
                let e = new_links_of.entry(p).or_default();
                if e.last() != Some(&li) {
                    e.push(li);
                }
            }
        }
    }
    let mut olds: Vec<(i64, Vec<usize>)> = old_profiles.into_iter().collect();
    olds.sort_by_key(|(p, _)| *p);
    for (p, members) in olds {
        if taken.contains(&p) {
            continue;
        }
        let mut into: FxHashMap<i64, usize> = FxHashMap::default();
        for i in &members {
            *into.entry(cluster_profile[&part.cluster[*i]]).or_default() += 1;
        }
        let Some(q) = into.into_iter().max_by_key(|(q, n)| (*n, std::cmp::Reverse(*q))).map(|(q, _)| q) else {
            continue;
        };
        absorbed.push((p, q));
        report.merges += 1;
        // The new link that carried identifiers of both explains the merge.
        let why = new_links_of.get(&p).into_iter().flatten().map(|li| &links[*li]).find_map(|l| {
            let via = l.ids.iter().find(|i| nodes[**i as usize].old.is_some_and(|o| o.0 == p))?;
            let other = l.ids.iter().find(|i| {
                cluster_profile[&part.cluster[**i as usize]] == q && nodes[**i as usize].old.is_none_or(|o| o.0 != p)
            });
            other?;
            Some((l, *via))
        });
        let (src, msg, rule, ident) = match why {
            Some((l, via)) => {
                let n = &nodes[via as usize];
                (
                    Some(l.source.clone()),
                    Some(l.message_id.clone()),
                    format!("deterministic: the record carries {} `{}` of both profiles", n.key, n.value),
                    Some(n.id),
                )
            }
            None => (None, None, "deterministic: recomputed with an earlier record".to_owned(), None),
        };
        ledger.push(ledger_row("merge", q, Some(p), ident, src, msg, &rule));
    }
    for ev in &part.events {
        if let resolve::Event::Conflict { link, anchor, ident, key } = ev
            && link_is_new[*link]
        {
            report.conflicts += 1;
            let l = &links[*link];
            let n = &nodes[*ident as usize];
            let key_name = cfg.keys.get(usize::from(*key)).cloned().unwrap_or_default();
            let limit = cfg.rules.limits.get(usize::from(*key)).copied().flatten().unwrap_or(0);
            let profile = profile_of[&nodes[*anchor as usize].id];
            ledger.push(ledger_row(
                "conflict",
                profile,
                profile_of.get(&n.id).copied().filter(|x| *x != profile),
                Some(n.id),
                Some(l.source.clone()),
                Some(l.message_id.clone()),
                &format!("limit: a profile holds at most {limit} {key_name}; {} `{}` stays apart", n.key, n.value),
            ));
        }
    }
    Ok(Regrouping {
        profile_of,
        component_of,
        id_updates,
        new_profiles,
        absorbed,
        component_moves,
        regrouped,
        ledger,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: i64, key: &str, value: &str, profile: i64) -> Node {
        Node { id, key: key.into(), value: value.into(), old: Some((profile, id)), isolated: false }
    }

    fn link(at: i64, msg: &str, ids: &[i64]) -> (String, PendingLink) {
        let key = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let l = PendingLink { at, source: "crm".into(), message_id: msg.into(), ids: ids.to_vec(), probability: None };
        (key, l)
    }

    fn cfg() -> IdentityConfig {
        let keys = vec!["crm_id".to_owned(), "email".to_owned()];
        IdentityConfig {
            keys,
            rules: resolve::KeyRules { limits: vec![Some(1), None], rank: vec![0, 1], cross: Vec::new() },
        }
    }

    /// A new record carrying the email of one profile and a new identifier
    /// joins them; a second email of another profile merges that profile
    /// in, told in the ledger with the record behind it.
    #[test]
    fn a_new_link_merges_two_stored_profiles_and_says_why() {
        let k = cfg();
        let stored = vec![node(1, "email", "a@x.org", 100), node(2, "email", "b@x.org", 200)];
        let changing = vec![link(5, "m9", &[1, 2, 3])];
        let mut next = 1000;
        let r = regroup(&k, stored, &[(3, "crm_id", "C1")], &[], &changing, &mut || {
            next += 1;
            Ok::<i64, ()>(next)
        })
        .expect("regroup");
        assert_eq!(r.profile_of[&1], 100);
        assert_eq!((r.profile_of[&2], r.profile_of[&3]), (100, 100));
        assert_eq!(r.absorbed, vec![(200, 100)]);
        assert_eq!(r.report.merges, 1);
        assert_eq!(r.ledger.len(), 1);
        let e = &r.ledger[0];
        assert_eq!((e.kind, e.profile, e.other, e.message_id.as_deref()), ("merge", 100, Some(200), Some("m9")));
        assert!(r.new_profiles.is_empty(), "{:?}", r.new_profiles);
    }

    /// A stored profile whose CRM ids a new, earlier link puts past the limit
    /// splits: the cluster that cannot keep the old profile gets a new one.
    #[test]
    fn a_limit_splits_a_stored_profile_and_a_new_profile_takes_the_rest() {
        let k = cfg();
        // C1 and C2 were one profile through e@x (a link from before limits applied).
        let stored = vec![node(1, "crm_id", "C1", 100), node(2, "crm_id", "C2", 100), node(3, "email", "e@x", 100)];
        let old = vec![link(10, "late", &[2, 3])];
        let changing = vec![link(5, "early", &[1, 3])];
        let r = regroup(&k, stored, &[], &old, &changing, &mut || Ok::<i64, ()>(777)).expect("regroup");
        assert_eq!(r.profile_of[&1], r.profile_of[&3]);
        assert_ne!(r.profile_of[&1], r.profile_of[&2]);
        assert_eq!(r.new_profiles, vec![777]);
        assert_eq!(r.report.splits, 1);
        assert!(
            r.ledger.iter().any(|e| e.kind == "split" && e.profile == 777 && e.other == Some(100)),
            "{:?}",
            r.ledger
        );
        // The old, later link's conflict is not this batch's to report.
        assert_eq!(r.report.conflicts, 0);
    }
}
