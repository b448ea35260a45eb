//! Identity resolution: from the identifiers records carry to one profile per
//! person. [`normalize`] makes equal identifiers compare equal; [`resolve`]
//! decides, deterministically and independent of arrival order, which
//! identifiers belong together under the manifest's limits and priorities;
//! [`matching`] links people who share no key, probabilistically.

pub mod explain;
pub mod impact;
pub mod matching;
pub mod normalize;
pub mod regroup;
pub mod resolve;

use crate::manifest::Manifest;
use resolve::KeyRules;

/// The manifest's identity keys, in declaration order (their index is the
/// key number [`resolve`] works with), with their limits, priority ranks and
/// the match probabilities that may cross a limit.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub keys: Vec<String>,
    pub rules: KeyRules,
}

impl IdentityConfig {
    pub fn from_manifest(m: &Manifest) -> Self {
        let keys: Vec<String> = m.identity.keys.keys().cloned().collect();
        let limits = m.identity.keys.values().map(|k| k.limit).collect();
        // Priority: the listed order first, then the declaration order.
        let mut order: Vec<&String> = m.identity.priority.iter().collect();
        order.extend(keys.iter().filter(|k| !m.identity.priority.contains(k)));
        let rank = keys.iter().map(|k| order.iter().position(|o| *o == k).unwrap_or(usize::MAX) as u32).collect();
        let cross =
            keys.iter().map(|k| m.identity.matching.as_ref().and_then(|mt| mt.cross_limits.get(k).copied())).collect();
        IdentityConfig { keys, rules: KeyRules { limits, rank, cross } }
    }

    pub(crate) fn key_index(&self, key: &str) -> u16 {
        self.keys.iter().position(|k| k == key).map_or(u16::MAX, |i| i as u16)
    }

    pub(crate) fn rank(&self, key: &str) -> u32 {
        self.rules.rank.get(usize::from(self.key_index(key))).copied().unwrap_or(u32::MAX)
    }
}
