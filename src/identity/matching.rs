//! Probabilistic matching (Fellegi–Sunter), for people who share no
//! deterministic key: a store receipt with a name, birth date and postcode, and
//! a CRM contact of the same person.
//!
//! Candidates come from blocking rules only (records agreeing on every field of
//! a rule), never from all pairs. Each compared field yields a level (0
//! disagree, 1 close, 2 agree; missing values contribute nothing). With `m` =
//! P(level | match) and `u` = P(level | non-match), a pair's match weight is
//! log2(λ/(1-λ)) + Σ log2(m/u) and its probability 2^w / (1 + 2^w). As splink
//! does, `u` is estimated from random pairs and `m` and λ by expectation–
//! maximisation over the candidate pairs, unless the manifest gives them.

use crate::manifest::{CompareMethod, Comparison};
use crate::rng::Rng;
use rustc_hash::{FxHashMap, FxHashSet};

/// Comparison levels: disagree, close, agree.
pub const LEVELS: usize = 3;
/// Blocks larger than this are skipped (a common surname would otherwise
/// produce millions of pairs); how many were skipped is reported.
pub const MAX_BLOCK: usize = 500;

/// One field's comparison.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    pub name: String,
    pub method: CompareMethod,
    /// Date tolerance in days, or numeric relative tolerance.
    pub tolerance: f64,
    /// Fixed agreement probabilities from the manifest: (m, u).
    pub fixed: Option<(f64, f64)>,
    /// Weigh agreement by the agreed value's frequency.
    pub term_frequency: bool,
    /// Nicknames of one name count as close.
    pub nicknames: bool,
    /// The field whose value may be written in this one's place (index into the specs).
    pub swap: Option<usize>,
}

/// The field specs of `identity.match.compare`, in order, with `swap_with`
/// resolved; an error names a tolerance that does not parse (validation
/// refuses it).
pub fn specs(compare: &indexmap::IndexMap<String, Comparison>) -> Result<Vec<FieldSpec>, String> {
    compare
        .iter()
        .map(|(n, c)| {
            let mut spec = FieldSpec::from_manifest(n, c).map_err(|e| format!("identity.match.compare.{n}: {e}"))?;
            if let Comparison::Detailed(o) = c {
                spec.swap = o.swap_with.as_ref().and_then(|w| compare.get_index_of(w));
            }
            Ok(spec)
        })
        .collect()
}

impl FieldSpec {
    pub fn from_manifest(name: &str, c: &Comparison) -> Result<Self, String> {
        Ok(match c {
            Comparison::Method(method) => FieldSpec {
                name: name.into(),
                method: *method,
                tolerance: default_tol(*method),
                fixed: None,
                term_frequency: false,
                nicknames: false,
                swap: None,
            },
            Comparison::Detailed(o) => {
                let tolerance = match (&o.tolerance, o.method) {
                    (Some(serde_json::Value::String(s)), CompareMethod::Date) => {
                        crate::manifest::units::parse_duration(s)
                            .map(|d| d.as_secs_f64() / 86_400.0)
                            .map_err(|e| format!("tolerance: {e}"))?
                    }
                    (Some(v), _) => v.as_f64().ok_or_else(|| format!("tolerance: `{v}` is not a number"))?,
                    (None, m) => default_tol(m),
                };
                FieldSpec {
                    name: name.into(),
                    method: o.method,
                    tolerance,
                    fixed: o.m.zip(o.u),
                    term_frequency: o.term_frequency,
                    nicknames: o.nicknames,
                    swap: None,
                }
            }
        })
    }
}

fn default_tol(m: CompareMethod) -> f64 {
    match m {
        CompareMethod::Date => 0.0,
        CompareMethod::Numeric => 0.01,
        _ => 0.0,
    }
}

/// American Soundex.
pub fn soundex(s: &str) -> Option<String> {
    let mut chars = s.chars().filter(|c| c.is_ascii_alphabetic()).map(|c| c.to_ascii_uppercase());
    let first = chars.next()?;
    let code = |c: char| match c {
        'B' | 'F' | 'P' | 'V' => '1',
        'C' | 'G' | 'J' | 'K' | 'Q' | 'S' | 'X' | 'Z' => '2',
        'D' | 'T' => '3',
        'L' => '4',
        'M' | 'N' => '5',
        'R' => '6',
        'H' | 'W' => 'h',
        _ => '0',
    };
    let mut out = String::from(first);
    let mut last = code(first);
    for c in chars {
        let d = code(c);
        if d == 'h' {
            continue; // H and W do not separate equal codes
        }
        if d != '0' && d != last {
            out.push(d);
            if out.len() == 4 {
                break;
            }
        }
        last = d;
    }
    while out.len() < 4 {
        out.push('0');
    }
    Some(out)
}

/// Year, month and day of `YYYY-MM-DD` or `YYYYMMDD` (a date kept as text,
/// e.g. a string trait that holds dates with typos in them). The parts need
/// not make a calendar date: a swapped day and month is compared as such.
fn days(s: &str) -> Option<(i32, u32, u32)> {
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        return Some((s[..4].parse().ok()?, s[4..6].parse().ok()?, s[6..].parse().ok()?));
    }
    let mut p = s.splitn(3, '-');
    Some((p.next()?.parse().ok()?, p.next()?.parse().ok()?, p.next()?.parse().ok()?))
}

/// Common nicknames and the names they stand for (lower case): Scandinavian
/// and English. A pair is looked up both ways.
pub const NICKNAMES: &[(&str, &str)] = &[
    ("alex", "alexander"),
    ("andy", "anders"),
    ("andy", "andrew"),
    ("bill", "william"),
    ("bob", "robert"),
    ("chris", "christoffer"),
    ("chris", "christopher"),
    ("dan", "daniel"),
    ("fredde", "fredrik"),
    ("greta", "margareta"),
    ("henke", "henrik"),
    ("jim", "james"),
    ("joe", "joseph"),
    ("jojo", "johan"),
    ("kalle", "karl"),
    ("kattis", "katarina"),
    ("kate", "katherine"),
    ("lasse", "lars"),
    ("liz", "elizabeth"),
    ("lisa", "elisabeth"),
    ("mange", "magnus"),
    ("maggie", "margaret"),
    ("mike", "michael"),
    ("nisse", "nils"),
    ("olle", "olof"),
    ("pelle", "per"),
    ("peggy", "margaret"),
    ("rob", "robert"),
    ("sue", "susan"),
    ("tom", "thomas"),
    ("tompa", "tomas"),
];

/// Whether one name is a nickname of the other.
pub fn nickname_of(a: &str, b: &str) -> bool {
    NICKNAMES.iter().any(|(n, full)| (*n == a && *full == b) || (*n == b && *full == a))
}

/// The comparison level of two present values.
pub fn level(spec: &FieldSpec, a: &str, b: &str) -> usize {
    if a == b {
        return 2;
    }
    let l = method_level(spec, a, b);
    if l == 0 && spec.nicknames && nickname_of(a, b) { 1 } else { l }
}

fn method_level(spec: &FieldSpec, a: &str, b: &str) -> usize {
    match spec.method {
        CompareMethod::Exact => 0,
        CompareMethod::JaroWinkler => {
            let s = strsim::jaro_winkler(a, b);
            if s >= 0.94 {
                2
            } else if s >= 0.85 {
                1
            } else {
                0
            }
        }
        CompareMethod::Levenshtein => {
            let s = strsim::normalized_levenshtein(a, b);
            if s >= 0.9 {
                2
            } else if s >= 0.7 {
                1
            } else {
                0
            }
        }
        CompareMethod::Phonetic => usize::from(soundex(a).is_some() && soundex(a) == soundex(b)),
        CompareMethod::Date => match (days(a), days(b)) {
            (Some(x), Some(y)) => {
                let swapped = x.0 == y.0 && x.1 == y.2 && x.2 == y.1;
                let near = chrono::NaiveDate::from_ymd_opt(x.0, x.1, x.2)
                    .zip(chrono::NaiveDate::from_ymd_opt(y.0, y.1, y.2))
                    .is_some_and(|(p, q)| ((p - q).num_days().abs() as f64) <= spec.tolerance.max(0.0));
                usize::from(swapped || near || (x.0 == y.0 && x.1 == y.1))
            }
            _ => 0,
        },
        CompareMethod::Numeric => match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => {
                let rel = (x - y).abs() / x.abs().max(y.abs()).max(1e-9);
                usize::from(rel <= spec.tolerance)
            }
            _ => 0,
        },
    }
}

/// A record to match: its id and one optional value per field.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: i64,
    pub values: Vec<Option<String>>,
}

/// Candidate pairs from blocking rules (indexes into the field list).
pub fn candidates(items: &[Item], rules: &[Vec<usize>]) -> (Vec<(u32, u32)>, usize) {
    candidates_touching(items, rules, None)
}

/// Each rule's candidate pairs on its own (what an EM session fits on), and
/// the blocks skipped over all rules.
pub fn candidates_by_rule(items: &[Item], rules: &[Vec<usize>]) -> (Vec<Vec<(u32, u32)>>, usize) {
    let mut skipped = 0;
    let by_rule = rules
        .iter()
        .map(|rule| {
            let (pairs, s) = candidates(items, std::slice::from_ref(rule));
            skipped += s;
            pairs
        })
        .collect();
    (by_rule, skipped)
}

/// The pairs of every rule, each once, in rule order: what [`candidates`]
/// returns for the rules together, from their pairs one by one.
pub fn union(by_rule: &[Vec<(u32, u32)>]) -> Vec<(u32, u32)> {
    let mut seen: FxHashSet<(u32, u32)> = FxHashSet::default();
    by_rule.iter().flatten().filter(|p| seen.insert(**p)).copied().collect()
}

/// Candidate pairs with at least one member in `focus` (every pair when
/// `None`): after a batch only new or changed profiles need comparing, each
/// against the whole of its blocks.
pub fn candidates_touching(items: &[Item], rules: &[Vec<usize>], focus: Option<&[bool]>) -> (Vec<(u32, u32)>, usize) {
    let focused = |i: u32| focus.is_none_or(|f| f.get(i as usize).copied().unwrap_or(false));
    let mut seen: FxHashSet<(u32, u32)> = FxHashSet::default();
    let mut out = Vec::new();
    let mut skipped = 0;
    for rule in rules {
        // Focused: only the blocks of focused items matter, so only they are
        // gathered (a pass after the first focuses on a few thousand of
        // hundreds of thousands of profiles).
        let wanted: Option<FxHashSet<Vec<&str>>> = focus.map(|_| {
            items
                .iter()
                .enumerate()
                .filter(|(i, _)| focused(*i as u32))
                .filter_map(|(_, it)| block_key(it, rule))
                .collect()
        });
        let mut blocks: FxHashMap<Vec<&str>, Vec<u32>> = FxHashMap::default();
        for (i, it) in items.iter().enumerate() {
            if let Some(k) = block_key(it, rule)
                && wanted.as_ref().is_none_or(|w| w.contains(&k))
            {
                blocks.entry(k).or_default().push(i as u32);
            }
        }
        let mut keys: Vec<_> = blocks.into_iter().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, members) in keys {
            if focus.is_some() && !members.iter().any(|m| focused(*m)) {
                continue;
            }
            if members.len() > MAX_BLOCK {
                skipped += 1;
                continue;
            }
            for (x, a) in members.iter().enumerate() {
                for b in &members[x + 1..] {
                    if (focused(*a) || focused(*b)) && seen.insert((*a, *b)) {
                        out.push((*a, *b));
                    }
                }
            }
        }
    }
    (out, skipped)
}

/// An item's values of a blocking rule's fields: none when one is missing
/// or empty.
fn block_key<'a>(it: &'a Item, rule: &[usize]) -> Option<Vec<&'a str>> {
    let key: Option<Vec<&str>> = rule.iter().map(|f| it.values.get(*f).and_then(|v| v.as_deref())).collect();
    key.filter(|k| k.iter().all(|v| !v.is_empty()))
}

/// `f` of each of `xs`, in order, on up to four threads: comparing pairs is
/// the CPU-bound part of matching (estimating `u`, the EM sessions'
/// comparison vectors, scoring), and each pair's comparison is independent
/// of the others'. Small inputs stay on the calling thread.
pub fn par_map<T: Sync, R: Send>(xs: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    const SERIAL_BELOW: usize = 4_096;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    if threads < 2 || xs.len() < SERIAL_BELOW {
        return xs.iter().map(f).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = xs
            .chunks(xs.len().div_ceil(threads))
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out = Vec::with_capacity(xs.len());
        for part in parts {
            match part.join() {
                Ok(done) => out.extend(done),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// The fitted model.
#[derive(Debug, Clone)]
pub struct Model {
    pub m: Vec<[f64; LEVELS]>,
    pub u: Vec<[f64; LEVELS]>,
    pub lambda: f64,
    /// Per field with `term_frequency`: each value's share of the profiles.
    pub tf: Vec<Option<FxHashMap<String, f64>>>,
}

/// Each value's share of the items, per field that asks for it.
fn term_frequencies(specs: &[FieldSpec], items: &[Item]) -> Vec<Option<FxHashMap<String, f64>>> {
    specs
        .iter()
        .enumerate()
        .map(|(f, spec)| {
            if !spec.term_frequency {
                return None;
            }
            let mut counts: FxHashMap<String, f64> = FxHashMap::default();
            let mut n = 0.0;
            for it in items {
                if let Some(v) = value(it, f) {
                    *counts.entry(v.to_owned()).or_default() += 1.0;
                    n += 1.0;
                }
            }
            for c in counts.values_mut() {
                *c /= n;
            }
            Some(counts)
        })
        .collect()
}

/// A scored pair and why.
#[derive(Debug, Clone)]
pub struct Scored {
    pub a: u32,
    pub b: u32,
    pub weight: f64,
    pub probability: f64,
    /// (field, level, weight contribution)
    pub contributions: Vec<(usize, usize, f64)>,
}

fn value(item: &Item, f: usize) -> Option<&str> {
    item.values.get(f).and_then(|v| v.as_deref()).filter(|v| !v.is_empty())
}

fn levels_of(specs: &[FieldSpec], a: &Item, b: &Item) -> Vec<Option<usize>> {
    let mut levels: Vec<Option<usize>> =
        specs.iter().enumerate().map(|(f, spec)| Some(level(spec, value(a, f)?, value(b, f)?))).collect();
    // Crossed fields (first and last name the other way round) are close, both of them.
    for (f, spec) in specs.iter().enumerate() {
        if let Some(g) = spec.swap
            && levels[f] == Some(0)
            && swapped(specs, spec, f, a, b)
        {
            levels[f] = Some(1);
            if levels.get(g) == Some(&Some(0)) {
                levels[g] = Some(1);
            }
        }
    }
    // Fixed parameters are two-level: agree (1 or 2) or not.
    for (l, spec) in levels.iter_mut().zip(specs) {
        if spec.fixed.is_some()
            && let Some(x) = l
            && *x > 0
        {
            *x = 2;
        }
    }
    levels
}

/// Whether field `f` and its `swap` partner are crossed between `a` and `b`
/// (first and last name written the other way round).
fn swapped(specs: &[FieldSpec], spec: &FieldSpec, f: usize, a: &Item, b: &Item) -> bool {
    let Some(g) = spec.swap else { return false };
    let (Some(af), Some(ag), Some(bf), Some(bg)) = (value(a, f), value(a, g), value(b, f), value(b, g)) else {
        return false;
    };
    level(spec, af, bg) > 0 && specs.get(g).is_some_and(|sg| level(sg, ag, bf) > 0)
}

const FLOOR: f64 = 1e-4;

fn normalise(p: &mut [f64; LEVELS]) {
    for x in p.iter_mut() {
        *x = x.max(FLOOR);
    }
    let s: f64 = p.iter().sum();
    for x in p.iter_mut() {
        *x /= s;
    }
}

/// Estimates `u` from random pairs, then `m` by expectation–maximisation in
/// one session per blocking rule: pairs blocked on a field always agree on it,
/// so a session leaves the `m` of its own rule's fields alone and estimates the
/// others (as splink does); each field's `m` is the mean over the sessions
/// that estimated it. λ, the probability that two random records match, is
/// the largest number of matches any session expects, over all pairs.
pub fn estimate(specs: &[FieldSpec], items: &[Item], rules: &[Vec<usize>], seed: u64) -> Model {
    estimate_blocked(specs, items, rules, &candidates_by_rule(items, rules).0, seed)
}

/// [`estimate`] with each rule's candidate pairs already blocked
/// ([`candidates_by_rule`]; matching blocks once for both fitting and scoring).
pub fn estimate_blocked(
    specs: &[FieldSpec],
    items: &[Item],
    rules: &[Vec<usize>],
    by_rule: &[Vec<(u32, u32)>],
    seed: u64,
) -> Model {
    let nf = specs.len();
    let mut u = vec![[1.0; LEVELS]; nf];
    let n = items.len() as u64;
    if n >= 2 {
        let mut rng = Rng::new(seed);
        let samples = (n * (n - 1) / 2).min(200_000);
        let pairs: Vec<(usize, usize)> = (0..samples)
            .map(|_| {
                let a = rng.below(n) as usize;
                let b = rng.below(n) as usize;
                (a, if a == b { (b + 1) % n as usize } else { b })
            })
            .collect();
        for levels in par_map(&pairs, |(a, b)| levels_of(specs, &items[*a], &items[*b])) {
            for (f, l) in levels.into_iter().enumerate() {
                if let Some(l) = l {
                    u[f][l] += 1.0;
                }
            }
        }
    }
    for p in u.iter_mut() {
        normalise(p);
    }
    let mut m = vec![[0.05, 0.15, 0.80]; nf];
    for (f, s) in specs.iter().enumerate() {
        if let Some((mm, uu)) = s.fixed {
            m[f] = [1.0 - mm, 0.0, mm];
            u[f] = [1.0 - uu, 0.0, uu];
            normalise(&mut m[f]);
            normalise(&mut u[f]);
        }
    }
    let mut m_sum = vec![[0.0; LEVELS]; nf];
    let mut m_count = vec![0usize; nf];
    let mut expected_matches = 0.0f64;
    for (rule, pairs) in rules.iter().zip(by_rule) {
        if pairs.is_empty() {
            continue;
        }
        let free: Vec<bool> = (0..nf).map(|f| !rule.contains(&f) && specs[f].fixed.is_none()).collect();
        let (session_m, lambda) = em(pairs, specs, items, &m, &u, &free);
        expected_matches = expected_matches.max(lambda * pairs.len() as f64);
        for f in 0..nf {
            if free[f] {
                for l in 0..LEVELS {
                    m_sum[f][l] += session_m[f][l];
                }
                m_count[f] += 1;
            }
        }
    }
    for f in 0..nf {
        if m_count[f] > 0 {
            for l in 0..LEVELS {
                m[f][l] = m_sum[f][l] / m_count[f] as f64;
            }
            normalise(&mut m[f]);
        }
    }
    let all_pairs = (n as f64) * (n as f64 - 1.0) / 2.0;
    let lambda = if all_pairs > 0.0 { (expected_matches / all_pairs).clamp(1e-12, 0.5) } else { 0.5 };
    Model { m, u, lambda, tf: term_frequencies(specs, items) }
}

/// One EM session: returns `m` (only `free` fields change) and the share of
/// candidate pairs that match.
fn em(
    pairs: &[(u32, u32)],
    specs: &[FieldSpec],
    items: &[Item],
    m0: &[[f64; LEVELS]],
    u: &[[f64; LEVELS]],
    free: &[bool],
) -> (Vec<[f64; LEVELS]>, f64) {
    let nf = specs.len();
    // Pairs with the same comparison vector weigh the same: iterate over the
    // distinct vectors with their counts (a handful of patterns, however many
    // pairs), in a fixed order.
    let mut counts: FxHashMap<Vec<Option<usize>>, f64> = FxHashMap::default();
    for v in par_map(pairs, |(a, b)| levels_of(specs, &items[*a as usize], &items[*b as usize])) {
        *counts.entry(v).or_default() += 1.0;
    }
    let mut vectors: Vec<(Vec<Option<usize>>, f64)> = counts.into_iter().collect();
    vectors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut m = m0.to_vec();
    let mut lambda = 0.5f64;
    for _ in 0..100 {
        let mut acc = vec![[0.0; LEVELS]; nf];
        let mut total_p = 0.0;
        for (v, count) in &vectors {
            let mut w = (lambda / (1.0 - lambda)).log2();
            for (f, l) in v.iter().enumerate() {
                if let Some(l) = l
                    && free[f]
                {
                    w += (m[f][*l] / u[f][*l]).log2();
                }
            }
            let p = count / (1.0 + (-w).exp2());
            total_p += p;
            for (f, l) in v.iter().enumerate() {
                if let Some(l) = l {
                    acc[f][*l] += p;
                }
            }
        }
        let new_lambda = (total_p / pairs.len().max(1) as f64).clamp(1e-6, 1.0 - 1e-6);
        let mut delta = (new_lambda - lambda).abs();
        for (f, a) in acc.iter_mut().enumerate() {
            if !free[f] {
                continue;
            }
            normalise(a);
            for l in 0..LEVELS {
                delta = delta.max((a[l] - m[f][l]).abs());
            }
            m[f] = *a;
        }
        lambda = new_lambda;
        if delta < 1e-6 {
            break;
        }
    }
    (m, lambda)
}

/// Scores one pair.
pub fn score(model: &Model, specs: &[FieldSpec], items: &[Item], a: u32, b: u32) -> Scored {
    let mut weight = (model.lambda / (1.0 - model.lambda)).log2();
    let mut contributions = Vec::new();
    let (x, y) = (&items[a as usize], &items[b as usize]);
    for (f, l) in levels_of(specs, x, y).into_iter().enumerate() {
        if let Some(l) = l {
            // Term frequency: an exact agreement on a value a share `tf` of
            // profiles hold is as likely by chance as `tf` (splink's adjustment).
            let tf = model.tf.get(f).and_then(Option::as_ref).filter(|_| l == 2).and_then(|tf| {
                let (vx, vy) = (value(x, f)?, value(y, f)?);
                if vx == vy { tf.get(vx).copied() } else { None }
            });
            let u = tf.map_or(model.u[f][l], |t| t.max(FLOOR));
            let w = (model.m[f][l] / u).log2();
            weight += w;
            contributions.push((f, l, w));
        }
    }
    Scored { a, b, weight, probability: 1.0 / (1.0 + (-weight).exp2()), contributions }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, method: CompareMethod) -> FieldSpec {
        FieldSpec {
            name: name.into(),
            method,
            tolerance: 1.0,
            fixed: None,
            term_frequency: false,
            nicknames: false,
            swap: None,
        }
    }

    #[test]
    fn nicknames_swaps_and_common_values() {
        let mut first = spec("first", CompareMethod::JaroWinkler);
        assert_eq!(level(&first, "mange", "magnus"), 0);
        first.nicknames = true;
        assert_eq!(level(&first, "mange", "magnus"), 1);
        assert_eq!(level(&first, "bill", "william"), 1);
        first.swap = Some(1);
        first.term_frequency = true;
        let specs = vec![first, spec("last", CompareMethod::JaroWinkler)];
        let item = |i: i64, f: &str, l: &str| Item { id: i, values: vec![Some(f.into()), Some(l.into())] };
        let a = item(0, "anna", "lindqvist");
        let b = item(1, "lindqvist", "anna");
        assert_eq!(levels_of(&specs, &a, &b), vec![Some(1), Some(1)]);
        // Term frequency: "lars" agreeing weighs less than "ebbe" agreeing.
        let mut items: Vec<Item> = (0..50).map(|i| item(i, "lars", &format!("x{i}"))).collect();
        items.push(item(50, "ebbe", "y"));
        items.push(item(51, "ebbe", "z"));
        let model = estimate(&specs, &items, &[vec![0]], 3);
        let common = score(&model, &specs, &items, 0, 1);
        let rare = score(&model, &specs, &items, 50, 51);
        assert!(rare.weight > common.weight + 3.0, "{} vs {}", rare.weight, common.weight);
    }

    #[test]
    fn soundex_matches_the_reference() {
        for (w, c) in [
            ("Robert", "R163"),
            ("Rupert", "R163"),
            ("Ashcraft", "A261"),
            ("Tymczak", "T522"),
            ("Pfister", "P236"),
            ("Lee", "L000"),
        ] {
            assert_eq!(soundex(w).as_deref(), Some(c), "{w}");
        }
    }

    #[test]
    fn levels() {
        let jw = spec("n", CompareMethod::JaroWinkler);
        assert_eq!(level(&jw, "martha", "marhta"), 2);
        assert_eq!(level(&jw, "dwayne", "duane"), 0);
        assert_eq!(level(&jw, "johansson", "johanson"), 2);
        let d = spec("d", CompareMethod::Date);
        assert_eq!(level(&d, "1980-03-04", "1980-04-03"), 1);
        assert_eq!(level(&d, "1980-03-04", "1980-03-05"), 1);
        assert_eq!(level(&d, "1980-03-04", "1981-07-05"), 0);
    }

    #[test]
    fn em_separates_matches_from_non_matches() {
        // 300 people, each twice: once clean, once with a typo in half the cases.
        let mut rng = Rng::new(3);
        let names = ["anna", "erik", "maria", "lars", "karin", "johan", "eva", "per", "nils", "elin"];
        let mut items = Vec::new();
        for i in 0..300i64 {
            let first = names[rng.below(10) as usize].to_owned();
            let last = format!("svens{}", rng.below(40));
            let pc = format!("{}", 11000 + rng.below(30));
            items.push(Item { id: i, values: vec![Some(first.clone()), Some(last.clone()), Some(pc.clone())] });
            let typo = if rng.chance(0.5) { format!("{first}h") } else { first };
            items.push(Item { id: 1000 + i, values: vec![Some(typo), Some(last), Some(pc)] });
        }
        let specs = vec![
            spec("first", CompareMethod::JaroWinkler),
            spec("last", CompareMethod::Exact),
            spec("pc", CompareMethod::Exact),
        ];
        let rules = [vec![1], vec![2]];
        let (pairs, skipped) = candidates(&items, &rules);
        assert_eq!(skipped, 0);
        let model = estimate(&specs, &items, &rules, 1);
        let mut tp = 0;
        let mut fp = 0;
        for (a, b) in &pairs {
            let s = score(&model, &specs, &items, *a, *b);
            let same = items[*a as usize].id % 1000 == items[*b as usize].id % 1000;
            if s.probability > 0.9 {
                if same { tp += 1 } else { fp += 1 }
            }
        }
        assert!(tp >= 270, "found {tp} of 300 ({fp} false)");
        // Some non-matches agree on every field by chance (same first name, surname
        // and postcode): no model can tell those apart.
        assert!(fp <= 40, "{fp} false matches");
    }

    #[test]
    fn dates_compare_written_with_or_without_dashes() {
        let date = spec("dob", CompareMethod::Date);
        assert_eq!(level(&date, "19560409", "1956-04-09"), 1, "one date, two spellings: close");
        assert_eq!(level(&date, "19560409", "19560904"), 1, "day and month swapped");
        assert_eq!(level(&date, "19551192", "19551129"), 1, "a typo that is no date still shares year and month");
        assert_eq!(level(&date, "19560409", "19720101"), 0);
        assert_eq!(level(&date, "1956040", "1956040"), 2, "equal text agrees");
    }

    #[test]
    fn par_map_keeps_the_order_of_a_serial_map() {
        let xs: Vec<u64> = (0..10_007).collect();
        let f = |x: &u64| x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7;
        assert_eq!(par_map(&xs, f), xs.iter().map(f).collect::<Vec<_>>());
        assert_eq!(par_map(&xs[..3], f), xs[..3].iter().map(f).collect::<Vec<_>>());
        assert!(par_map(&[] as &[u64], f).is_empty());
    }

    #[test]
    fn focused_blocking_keeps_only_pairs_touching_the_focus() {
        let items: Vec<Item> = (0..20).map(|i| Item { id: i, values: vec![Some(format!("{}", i % 4))] }).collect();
        let (all, _) = candidates(&items, &[vec![0]]);
        let mut focus = vec![false; 20];
        focus[1] = true;
        focus[5] = true;
        let (some, _) = candidates_touching(&items, &[vec![0]], Some(&focus));
        let want: Vec<_> = all.iter().filter(|(a, b)| focus[*a as usize] || focus[*b as usize]).copied().collect();
        assert_eq!(some, want);
        // Items 1 and 5 share the block {1, 5, 9, 13, 17}: 10 pairs, 3 of them among the others.
        assert_eq!(some.len(), 7, "{some:?}");

        // Several rules, missing and empty values: the focused pairs are the
        // full blocking's pairs that touch the focus, in the same order.
        let items: Vec<Item> = (0..60)
            .map(|i| Item {
                id: i,
                values: vec![
                    (i % 7 != 0).then(|| format!("{}", i % 5)),
                    Some(if i % 11 == 0 { String::new() } else { format!("{}", i % 3) }),
                ],
            })
            .collect();
        let rules = [vec![0], vec![1], vec![0, 1]];
        let (all, _) = candidates(&items, &rules);
        for focused in [vec![3], vec![0, 22, 59], (0..60).collect::<Vec<usize>>()] {
            let mut focus = vec![false; 60];
            for i in &focused {
                focus[*i] = true;
            }
            let (some, _) = candidates_touching(&items, &rules, Some(&focus));
            let want: Vec<_> = all.iter().filter(|(a, b)| focus[*a as usize] || focus[*b as usize]).copied().collect();
            assert_eq!(some, want, "focus {focused:?}");
        }
    }

    #[test]
    fn blocking_never_repeats_a_pair() {
        let items: Vec<Item> =
            (0..20).map(|i| Item { id: i, values: vec![Some("x".into()), Some(format!("{}", i % 3))] }).collect();
        let rules = [vec![0], vec![1], vec![0, 1]];
        let (pairs, _) = candidates(&items, &rules);
        let (by_rule, _) = candidates_by_rule(&items, &rules);
        assert_eq!(union(&by_rule), pairs, "the rules one by one, joined, are the rules together");
        let set: FxHashSet<_> = pairs.iter().collect();
        assert_eq!(set.len(), pairs.len());
        assert_eq!(pairs.len(), 190);
    }
}
