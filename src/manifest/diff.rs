//! What changed between two manifests, section by section: the first half
//! of `cdp plan` (the second, what a change does to the data, is computed
//! from the store by the command). Pure: two typed manifests in, a list of
//! changes out, in manifest order.

use serde_json::Value;

use super::Manifest;

/// Sections compared entry by entry (maps of named entries), then sections
/// compared whole, with their dotted paths in the manifest.
const NAMED: &[&str] = &[
    "plugins",
    "sources",
    "identity.keys",
    "model.traits",
    "model.events",
    "model.entities",
    "model.computed",
    "model.predicted",
    "audiences",
    "destinations",
];
const WHOLE: &[&str] = &[
    "name",
    "storage",
    "server",
    "identity.priority",
    "identity.match",
    "consent.purposes",
    "consent.default",
    "consent.expiry",
    "consent.policies",
    "retention",
];

/// Added, changed or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Changed,
    Removed,
}

impl ChangeKind {
    pub fn symbol(self) -> char {
        match self {
            ChangeKind::Added => '+',
            ChangeKind::Changed => '~',
            ChangeKind::Removed => '-',
        }
    }
}

/// One change: a named entry of a section, or a whole section (`name` empty).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Change {
    pub section: &'static str,
    pub name: String,
    pub kind: ChangeKind,
    /// For a changed entry: its keys whose values differ.
    pub fields: Vec<String>,
    #[serde(skip)]
    pub old: Value,
    #[serde(skip)]
    pub new: Value,
}

impl Change {
    /// `section.name`, or the section alone.
    pub fn path(&self) -> String {
        if self.name.is_empty() { self.section.to_owned() } else { format!("{}.{}", self.section, self.name) }
    }
}

/// The changes from `old` to `new`.
pub fn diff(old: &Manifest, new: &Manifest) -> Vec<Change> {
    let (a, b) = (to_value(old), to_value(new));
    let mut out = Vec::new();
    for section in WHOLE {
        let (x, y) = (at(&a, section), at(&b, section));
        if x != y {
            let kind = match (x.is_null(), y.is_null()) {
                (true, false) => ChangeKind::Added,
                (false, true) => ChangeKind::Removed,
                _ => ChangeKind::Changed,
            };
            out.push(Change { section, name: String::new(), kind, fields: changed_fields(&x, &y), old: x, new: y });
        }
    }
    for section in NAMED {
        let (x, y) = (at(&a, section), at(&b, section));
        let empty = serde_json::Map::new();
        let (x, y) = (x.as_object().unwrap_or(&empty), y.as_object().unwrap_or(&empty));
        for (name, new_entry) in y {
            match x.get(name) {
                None => out.push(Change {
                    section,
                    name: name.clone(),
                    kind: ChangeKind::Added,
                    fields: Vec::new(),
                    old: Value::Null,
                    new: new_entry.clone(),
                }),
                Some(old_entry) if old_entry != new_entry => out.push(Change {
                    section,
                    name: name.clone(),
                    kind: ChangeKind::Changed,
                    fields: changed_fields(old_entry, new_entry),
                    old: old_entry.clone(),
                    new: new_entry.clone(),
                }),
                Some(_) => {}
            }
        }
        for (name, old_entry) in x {
            if !y.contains_key(name) {
                out.push(Change {
                    section,
                    name: name.clone(),
                    kind: ChangeKind::Removed,
                    fields: Vec::new(),
                    old: old_entry.clone(),
                    new: Value::Null,
                });
            }
        }
    }
    out
}

fn to_value(m: &Manifest) -> Value {
    serde_json::to_value(m).unwrap_or(Value::Null)
}

fn at(v: &Value, dotted: &str) -> Value {
    dotted.split('.').fold(v, |v, k| v.get(k).unwrap_or(&Value::Null)).clone()
}

/// Keys of two objects whose values differ (none when either is not an object).
fn changed_fields(a: &Value, b: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return Vec::new() };
    let mut keys: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    keys.dedup();
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Options, load_str};

    fn m(text: &str) -> Manifest {
        let l = load_str(text, &Options::validate("."));
        assert!(!l.has_errors(), "{:#?}", l.diagnostics);
        l.manifest.expect("manifest")
    }

    const BASE: &str = r#"
version: 1
name: t
identity:
  keys:
    email: { normalize: email }
model:
  traits:
    tier: { type: string }
audiences:
  gold: { where: 'tier == "gold"' }
  silver: { where: 'tier == "silver"' }
"#;

    #[test]
    fn no_change_is_an_empty_plan() {
        assert!(diff(&m(BASE), &m(BASE)).is_empty());
    }

    #[test]
    fn entries_added_changed_and_removed_are_named_with_their_changed_keys() {
        let new = BASE
            .replace("gold: { where: 'tier == \"gold\"' }", "gold: { where: 'tier != \"gold\"', description: x }")
            .replace("  silver: { where: 'tier == \"silver\"' }\n", "  bronze: { where: 'tier == \"bronze\"' }\n")
            .replace("name: t", "name: u");
        let changes = diff(&m(BASE), &m(&new));
        let summary: Vec<(String, ChangeKind, Vec<String>)> =
            changes.iter().map(|c| (c.path(), c.kind, c.fields.clone())).collect();
        assert_eq!(
            summary,
            vec![
                ("name".to_owned(), ChangeKind::Changed, vec![]),
                ("audiences.gold".to_owned(), ChangeKind::Changed, vec!["where".to_owned(), "description".to_owned()]),
                ("audiences.bronze".to_owned(), ChangeKind::Added, vec![]),
                ("audiences.silver".to_owned(), ChangeKind::Removed, vec![]),
            ]
        );
    }

    #[test]
    fn identity_and_model_changes_are_found_per_key() {
        let new = BASE.replace("email: { normalize: email }", "email: { normalize: email, limit: 2 }\n    phone: {}");
        let changes = diff(&m(BASE), &m(&new));
        let paths: Vec<String> = changes.iter().map(Change::path).collect();
        assert_eq!(paths, vec!["identity.keys.email", "identity.keys.phone"]);
        assert_eq!(changes[0].fields, vec!["limit"]);
    }
}
