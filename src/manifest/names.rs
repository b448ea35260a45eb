//! Names the manifest gives things: plugins, sources, destinations,
//! audiences, identity keys, traits, events, purposes. One rule for all of
//! them (lowercase letters, digits and `_`, starting with a letter or `_`, at
//! most 64 long), checked by `cdp validate` ([`is_name`]) and by the
//! newtypes the resolved manifest keys its sections by: a `SourceName` is
//! a name that was checked, and cannot be confused with an audience's.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// Longest name accepted.
pub const MAX_LEN: usize = 64;

/// Whether `name` is a valid name.
pub fn is_name(name: &str) -> bool {
    name.len() <= MAX_LEN
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `name` made valid: what the diagnostic for an invalid one suggests.
pub fn fixed(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect()
}

/// A name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{name}` is not a valid {what} name: names are lowercase letters, digits and `_`, starting with a letter or `_`, at most {MAX_LEN} long"
)]
pub struct NameError {
    pub what: &'static str,
    pub name: String,
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $ty(Arc<str>);

        impl $ty {
            /// What the name names, for messages.
            pub const WHAT: &'static str = $what;

            /// `name`, checked.
            pub fn parse(name: &str) -> Result<$ty, NameError> {
                if is_name(name) {
                    Ok($ty(name.into()))
                } else {
                    Err(NameError { what: $what, name: name.to_owned() })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $ty {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), &*self.0)
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
    };
}

name_type!(
    /// A plugin's name under `plugins:`.
    PluginName,
    "plugin"
);
name_type!(
    /// A source's name under `sources:`.
    SourceName,
    "source"
);
name_type!(
    /// A destination's name under `destinations:`.
    DestinationName,
    "destination"
);
name_type!(
    /// An audience's name under `audiences:`.
    AudienceName,
    "audience"
);
name_type!(
    /// An identity key's name under `identity.keys`.
    KeyName,
    "identity key"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_once_and_compare_as_text() {
        let s = SourceName::parse("loyalty_2").expect("valid");
        assert_eq!(s, "loyalty_2");
        assert_eq!(s.to_string(), "loyalty_2");
        let map: indexmap::IndexMap<SourceName, u8> = [(s.clone(), 1)].into_iter().collect();
        assert_eq!(map.get("loyalty_2"), Some(&1));
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"loyalty_2\"");
        for bad in ["Loyalty", "2nd", "", "a-b", &"x".repeat(65)] {
            let e = SourceName::parse(bad).expect_err(bad);
            assert_eq!(e.what, "source");
        }
        assert!(is_name("_private"));
        assert_eq!(fixed("Web-Events"), "web_events");
    }
}
