//! Deterministic identity resolution: which identifiers belong to one person.
//!
//! Records link the identifiers they carry. Connectivity alone would join two
//! CRM ids through a shared family email, so each key type has a `limit` (at
//! most N values per profile; 1 = unique) and the keys a `priority`. The
//! partition of a connected component into profiles is a pure function of the
//! component's links: links are applied in a canonical order (observed time,
//! then source and message id), each merging the clusters it touches when no
//! limit is exceeded. When one would be, the record joins the cluster of its
//! highest-priority identifier, the others join it only where limits allow,
//! and the conflict is reported. Because the order is canonical, not arrival
//! order, any permutation of the same input yields the same profiles; the
//! store recomputes a component whenever a new link touches it.
//!
//! A limit stops a union that would bring values of one key from two
//! clusters past the limit. Strong probabilistic evidence may cross it: a
//! match link (one with a probability) at or above a key's `cross`
//! probability may join clusters past that key's limit (two CRM records of
//! one person under different CRM ids), so a cluster can hold more values
//! than the limit; it then still takes identifiers of other keys, and no
//! further values of that key except by another such link.

use rustc_hash::FxHashMap;
use std::cmp::Ordering;

/// An identifier, by key type index (into the manifest's key list) and normalised value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident {
    pub key: u16,
    pub value: String,
    /// Split off by hand (`cdp profile unmerge`): never joins another cluster.
    pub isolated: bool,
}

/// Per key type: its limit, its priority rank (0 = strongest), and the
/// match probability from which a match link may exceed the limit.
#[derive(Debug, Clone, Default)]
pub struct KeyRules {
    pub limits: Vec<Option<u32>>,
    pub rank: Vec<u32>,
    pub cross: Vec<Option<f64>>,
}

impl KeyRules {
    fn limit(&self, key: u16) -> Option<u32> {
        self.limits.get(usize::from(key)).copied().flatten()
    }

    /// Whether `link` may join clusters past `key`'s limit.
    fn crosses(&self, key: u16, link: &Link) -> bool {
        match (link.probability, self.cross.get(usize::from(key)).copied().flatten()) {
            (Some(p), Some(at)) => p >= at,
            _ => false,
        }
    }

    fn rank(&self, key: u16) -> u32 {
        self.rank.get(usize::from(key)).copied().unwrap_or(u32::MAX)
    }
}

/// One record's identifiers, linked together.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// Observed time, milliseconds since the epoch.
    pub at: i64,
    pub source: String,
    pub message_id: String,
    /// Indexes into the identifier table passed to [`partition`].
    pub ids: Vec<u32>,
    /// A probabilistic match's probability; `None` for a record's link.
    pub probability: Option<f64>,
}

impl Link {
    fn canonical_cmp(&self, other: &Self) -> Ordering {
        (self.at, &self.source, &self.message_id, &self.ids).cmp(&(
            other.at,
            &other.source,
            &other.message_id,
            &other.ids,
        ))
    }
}

/// Why two clusters joined, or could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `link` joined the clusters of `a` and `b` through the identifier `via`.
    Merged { link: usize, a: u32, b: u32, via: u32 },
    /// `link` could not join `ident`'s cluster to its anchor's without exceeding
    /// the limit of `key`; it joined its anchor only.
    Conflict { link: usize, anchor: u32, ident: u32, key: u16 },
    /// `link` would have joined an identifier that was split off by hand.
    Isolated { link: usize, ident: u32 },
}

/// The result: a cluster number per identifier, the anchor identifier of each
/// link (where its record's data attaches), and what happened on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Cluster of each identifier: the smallest identifier index in it.
    pub cluster: Vec<u32>,
    /// Anchor identifier of each link, in the order links were given.
    pub anchors: Vec<u32>,
    pub events: Vec<Event>,
}

struct Clusters<'r> {
    parent: Vec<u32>,
    // Distinct values per key type in each root's cluster: (key, ident index).
    members: FxHashMap<u32, Vec<u32>>,
    idents: &'r [Ident],
    rules: &'r KeyRules,
}

impl Clusters<'_> {
    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }

    fn isolated(&self, root: u32) -> bool {
        self.members.get(&root).is_some_and(|m| m.iter().any(|i| self.idents[*i as usize].isolated))
    }

    /// Keys the union of these roots, made by `link`, would take past
    /// their limit: those with values from two or more of the roots and
    /// more values than the limit in all, unless `link` may cross it.
    /// Strongest key first.
    fn over_limit(&self, roots: &[u32], link: &Link) -> Vec<u16> {
        // Per key: values in the union, and roots holding any.
        let mut counts: FxHashMap<u16, (u32, u32)> = FxHashMap::default();
        for r in roots {
            let mut here: Vec<u16> = Vec::new();
            for &m in self.members.get(r).map(Vec::as_slice).unwrap_or_default() {
                let k = self.idents[m as usize].key;
                let e = counts.entry(k).or_default();
                e.0 += 1;
                if !here.contains(&k) {
                    here.push(k);
                    e.1 += 1;
                }
            }
        }
        let mut over: Vec<u16> = counts
            .into_iter()
            .filter(|(k, (n, from))| {
                *from > 1 && self.rules.limit(*k).is_some_and(|l| *n > l) && !self.rules.crosses(*k, link)
            })
            .map(|(k, _)| k)
            .collect();
        over.sort_by_key(|k| (self.rules.rank(*k), *k));
        over
    }

    /// Whether `link` may join these roots: none is split off by hand (when
    /// there are several) and no limit stops it.
    fn fits(&self, roots: &[u32], link: &Link) -> bool {
        if roots.len() > 1 && roots.iter().any(|r| self.isolated(*r)) {
            return false;
        }
        self.over_limit(roots, link).is_empty()
    }

    fn union(&mut self, a: u32, b: u32) -> u32 {
        let (a, b) = (self.find(a), self.find(b));
        if a == b {
            return a;
        }
        // The smaller index becomes the root: results do not depend on union order.
        let (root, child) = if a < b { (a, b) } else { (b, a) };
        self.parent[child as usize] = root;
        let moved = self.members.remove(&child).unwrap_or_default();
        self.members.entry(root).or_default().extend(moved);
        root
    }
}

/// Partitions identifiers into profiles. `idents` must be the identifiers of
/// one or more whole connected components; `links` their links, in any order.
pub fn partition(idents: &[Ident], links: &[Link], rules: &KeyRules) -> Partition {
    let n = idents.len() as u32;
    let mut c = Clusters { parent: (0..n).collect(), members: (0..n).map(|i| (i, vec![i])).collect(), idents, rules };
    let mut order: Vec<usize> = (0..links.len()).collect();
    order.sort_by(|a, b| links[*a].canonical_cmp(&links[*b]));
    let mut anchors = vec![0u32; links.len()];
    let mut events = Vec::new();
    for li in order {
        let link = &links[li];
        let mut ids: Vec<u32> = link.ids.iter().copied().filter(|i| *i < n).collect();
        if ids.is_empty() {
            continue;
        }
        // Strongest identifier first: it anchors the record.
        ids.sort_by(|a, b| {
            let (x, y) = (&idents[*a as usize], &idents[*b as usize]);
            (rules.rank(x.key), x.key, &x.value).cmp(&(rules.rank(y.key), y.key, &y.value))
        });
        ids.dedup();
        let anchor = ids[0];
        anchors[li] = anchor;
        let mut roots: Vec<u32> = ids.iter().map(|i| c.find(*i)).collect();
        roots.sort_unstable();
        roots.dedup();
        if roots.len() == 1 {
            continue;
        }
        if c.fits(&roots, link) {
            for &i in &ids[1..] {
                let (ra, rb) = (c.find(anchor), c.find(i));
                if ra != rb {
                    events.push(Event::Merged { link: li, a: ra, b: rb, via: i });
                    c.union(ra, rb);
                }
            }
            continue;
        }
        // Conflict: join what fits, strongest identifier first.
        for &i in &ids[1..] {
            let (ra, ri) = (c.find(anchor), c.find(i));
            if ra == ri {
                continue;
            }
            if c.fits(&[ra, ri], link) {
                events.push(Event::Merged { link: li, a: ra, b: ri, via: i });
                c.union(ra, ri);
            } else if c.isolated(ra) || c.isolated(ri) {
                events.push(Event::Isolated { link: li, ident: i });
            } else {
                let key = c.over_limit(&[ra, ri], link).first().copied().unwrap_or(idents[i as usize].key);
                events.push(Event::Conflict { link: li, anchor, ident: i, key });
            }
        }
    }
    let cluster = (0..n).map(|i| c.find(i)).collect();
    Partition { cluster, anchors, events }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys: 0 crm_id (limit 1), 1 email (limit 2), 2 anonymous_id.
    fn rules() -> KeyRules {
        KeyRules { limits: vec![Some(1), Some(2), None], rank: vec![0, 1, 2], cross: vec![Some(0.99), None, None] }
    }

    fn id(key: u16, v: &str) -> Ident {
        Ident { key, value: v.into(), isolated: false }
    }

    #[test]
    fn isolated_identifiers_stay_apart() {
        let mut idents = vec![id(1, "a@x"), id(2, "anon1")];
        idents[1].isolated = true;
        let p = partition(&idents, &[link(1, "m1", &[0, 1])], &rules());
        assert_eq!(groups(&p), vec![vec![0], vec![1]]);
        assert!(matches!(p.events[0], Event::Isolated { ident: 1, .. }));
    }

    fn link(at: i64, msg: &str, ids: &[u32]) -> Link {
        Link { at, source: "s".into(), message_id: msg.into(), ids: ids.to_vec(), probability: None }
    }

    fn matched(at: i64, probability: f64, ids: &[u32]) -> Link {
        Link {
            at,
            source: "match".into(),
            message_id: format!("p{at}"),
            ids: ids.to_vec(),
            probability: Some(probability),
        }
    }

    fn groups(p: &Partition) -> Vec<Vec<u32>> {
        let mut m: FxHashMap<u32, Vec<u32>> = FxHashMap::default();
        for (i, c) in p.cluster.iter().enumerate() {
            m.entry(*c).or_default().push(i as u32);
        }
        let mut g: Vec<Vec<u32>> = m.into_values().collect();
        g.sort();
        g
    }

    #[test]
    fn shared_identifiers_join() {
        let idents = vec![id(1, "a@x"), id(2, "anon1"), id(2, "anon2")];
        let links = vec![link(1, "m1", &[0, 1]), link(2, "m2", &[0, 2])];
        let p = partition(&idents, &links, &rules());
        assert_eq!(groups(&p), vec![vec![0, 1, 2]]);
        assert_eq!(p.anchors, vec![0, 0]);
        assert_eq!(p.events.len(), 2);
    }

    #[test]
    fn unique_keys_never_merge_and_the_earliest_link_wins() {
        // Two CRM ids share a family email: the earlier record keeps the email.
        let idents = vec![id(0, "A"), id(0, "B"), id(1, "family@x")];
        let links = vec![link(20, "late", &[1, 2]), link(10, "early", &[0, 2])];
        let p = partition(&idents, &links, &rules());
        assert_eq!(groups(&p), vec![vec![0, 2], vec![1]]);
        assert!(matches!(p.events[1], Event::Conflict { key: 0, ident: 2, anchor: 1, .. }), "{:?}", p.events);
        assert_eq!(p.anchors, vec![1, 0]);
    }

    #[test]
    fn limits_count_values_per_profile() {
        let idents = vec![id(2, "anon"), id(1, "a@x"), id(1, "b@x"), id(1, "c@x")];
        let links = vec![link(1, "1", &[0, 1]), link(2, "2", &[0, 2]), link(3, "3", &[0, 3])];
        let p = partition(&idents, &links, &rules());
        // A third email would exceed limit 2: it stays on its own.
        assert_eq!(groups(&p), vec![vec![0, 1, 2], vec![3]]);
    }

    #[test]
    fn a_strong_match_crosses_a_limit_and_the_profile_still_grows() {
        // CRM ids A and B share an email; a match of their profiles at 0.995 joins them.
        let idents = vec![id(0, "A"), id(0, "B"), id(1, "e@x"), id(2, "cookie"), id(0, "C")];
        let links = vec![link(1, "a", &[0, 2]), link(2, "b", &[1, 2])];
        let apart = partition(&idents, &links, &rules());
        assert_eq!(groups(&apart), vec![vec![0, 2], vec![1], vec![3], vec![4]]);

        let mut more = links.clone();
        more.push(matched(3, 0.995, &[0, 1]));
        // Later: a cookie joins by the email, a third CRM id does not.
        more.push(link(4, "c", &[2, 3]));
        more.push(link(5, "d", &[4, 3]));
        let p = partition(&idents, &more, &rules());
        assert_eq!(groups(&p), vec![vec![0, 1, 2, 3], vec![4]]);
        assert!(
            p.events.iter().any(|e| matches!(e, Event::Conflict { key: 0, ident: 3, anchor: 4, .. })),
            "{:?}",
            p.events
        );

        // Below the key's cross probability, or without one, the limit holds.
        let mut weak = links.clone();
        weak.push(matched(3, 0.98, &[0, 1]));
        assert_eq!(groups(&partition(&idents, &weak, &rules())), groups(&apart));
        let mut no_cross = rules();
        no_cross.cross = Vec::new();
        assert_eq!(groups(&partition(&idents, &more[..3], &no_cross)), groups(&apart));
    }

    #[test]
    fn any_arrival_order_gives_the_same_partition() {
        let idents = vec![id(0, "A"), id(0, "B"), id(1, "e1"), id(1, "e2"), id(1, "e3"), id(2, "n1"), id(2, "n2")];
        let links = vec![
            link(5, "a", &[0, 2]),
            link(6, "b", &[1, 2]),
            link(7, "c", &[2, 5]),
            link(8, "d", &[5, 3]),
            link(9, "e", &[3, 4, 6]),
            link(9, "f", &[1, 6]),
        ];
        let want = partition(&idents, &links, &rules());
        let mut perm = links.clone();
        for round in 0..50 {
            let n = perm.len();
            perm.rotate_left(round % n + 1);
            if round % 3 == 0 {
                perm.reverse();
            }
            let got = partition(&idents, &perm, &rules());
            assert_eq!(groups(&got), groups(&want));
        }
    }
}
