//! Credentials of the HTTP server: collector write keys (each names its
//! source) and admin-API bearer tokens (each names a person or system and
//! carries a role). Presented secrets are compared as SHA-256 digests in
//! constant time, so neither a secret's bytes nor its length leak through
//! timing; secrets are never logged — only a token's name is.

use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::manifest::types::Role;
use crate::runtime::Snapshot;

type Sha = [u8; 32];

fn digest(secret: &str) -> Sha {
    Sha256::digest(secret.as_bytes()).into()
}

/// The credentials of one manifest.
#[derive(Debug, Default)]
pub struct Keys {
    /// Write key digest → source.
    write: Vec<(Sha, String)>,
    /// Token digest → (name, role).
    tokens: Vec<(Sha, String, Role)>,
}

impl Keys {
    /// The keys of `snap`'s manifest. Values still written as `${env:…}`
    /// (a variable that was not set) are left out: nobody can present them.
    pub fn of(snap: &Snapshot) -> Keys {
        let m = &snap.manifest;
        let usable = |v: &str| !v.is_empty() && !crate::manifest::env::is_reference(v);
        let mut keys = Keys::default();
        for (name, src) in &m.sources {
            if let Some(c) = &src.collector {
                for k in c.write_keys.iter().filter(|k| usable(k)) {
                    keys.write.push((digest(k), name.clone()));
                }
            }
        }
        if let Some(t) = m.server.admin_token.as_deref().filter(|t| usable(t)) {
            keys.tokens.push((digest(t), "admin".into(), Role::Admin));
        }
        for (name, t) in &m.server.tokens {
            if usable(&t.token) {
                keys.tokens.push((digest(&t.token), name.clone(), t.role));
            }
        }
        keys
    }

    /// The source a write key belongs to.
    pub fn source(&self, key: &str) -> Option<&str> {
        let d = digest(key);
        // Compare with every key, never stopping early.
        let mut found = None;
        for (k, source) in &self.write {
            if bool::from(k.ct_eq(&d)) {
                found = Some(source.as_str());
            }
        }
        found
    }

    /// The name and role of a bearer token.
    pub fn token(&self, token: &str) -> Option<(&str, Role)> {
        let d = digest(token);
        let mut found = None;
        for (k, name, role) in &self.tokens {
            if bool::from(k.ct_eq(&d)) {
                found = Some((name.as_str(), *role));
            }
        }
        found
    }

    /// Whether any admin token is configured.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }
}

/// [`Keys`] of the running manifest, computed once per manifest.
#[derive(Debug, Default, Clone)]
pub struct KeyCache(Arc<Mutex<Option<Cached>>>);

/// The manifest's sha256 and its keys.
type Cached = (String, Arc<Keys>);

impl KeyCache {
    pub fn get(&self, snap: &Snapshot) -> Arc<Keys> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some((sha, keys)) if *sha == snap.sha256 => keys.clone(),
            _ => {
                let keys = Arc::new(Keys::of(snap));
                *slot = Some((snap.sha256.clone(), keys.clone()));
                keys
            }
        }
    }
}

/// The user name of an HTTP basic `Authorization` header (Segment's SDKs
/// send the write key as the user name with an empty password).
pub fn basic_user(header: &str) -> Option<String> {
    use base64::Engine as _;
    let (scheme, b64) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    (!user.is_empty()).then(|| user.to_owned())
}

/// The token of an HTTP `Authorization: Bearer …` header.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_user_is_the_write_key() {
        // "wk_123:" and "wk_123" both carry the key as the user name.
        assert_eq!(basic_user("Basic d2tfMTIzOg==").as_deref(), Some("wk_123"));
        assert_eq!(basic_user("basic d2tfMTIz").as_deref(), Some("wk_123"));
        assert_eq!(basic_user("Bearer d2tfMTIzOg=="), None);
        assert_eq!(basic_user("Basic !!!"), None);
        assert_eq!(basic_user("Basic Og=="), None, "an empty user name is no key");
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn lookups_compare_digests() {
        let keys = Keys {
            write: vec![(digest("k1"), "web".into()), (digest("k2"), "app".into())],
            tokens: vec![(digest("t1"), "ops".into(), Role::ReadOnly)],
        };
        assert_eq!(keys.source("k2"), Some("app"));
        assert_eq!(keys.source("k3"), None);
        assert_eq!(keys.token("t1"), Some(("ops", Role::ReadOnly)));
        assert_eq!(keys.token("t"), None);
    }
}
