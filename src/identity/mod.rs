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
