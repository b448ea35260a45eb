//! Manifest entries as the plugin host sees them: which plugin a source or
//! destination runs, with which config and which grants, and the checks
//! `cdp validate` makes with the plugins themselves (kind, config against the
//! plugin's own schema, the plugin's `check`). Still offline: plugins are
//! local files and run with no grants here.

use std::collections::HashMap;
use std::path::Path;

use indexmap::IndexMap;
use serde_json::Value;

use super::{Grants, Host, Kind, Mount, Plugin, PluginError, Spec};
use crate::manifest::diag::{self, Diagnostic};
use crate::manifest::yaml::{SpanIndex, display_path, push_segment};
use crate::manifest::{Manifest, units};

/// A source or destination that runs a plugin.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub kind: Kind,
    /// Its name under `sources` or `destinations`.
    pub name: &'a str,
    /// The name of its plugin under `plugins`.
    pub plugin: &'a str,
    /// Its `config`, `{}` when absent.
    pub config: Value,
    mount: &'a IndexMap<String, String>,
    allow_hosts: &'a [String],
}

impl Entry<'_> {
    /// The JSON pointer of this entry in the manifest.
    pub fn pointer(&self) -> String {
        let section = match self.kind {
            Kind::Source => "/sources",
            Kind::Destination => "/destinations",
        };
        push_segment(section, self.name)
    }

    /// What the entry's instances may touch: its mounts (relative to
    /// `base`; writable for destinations), `allow_hosts`, and `limits`, its
    /// plugin's memory cap and call deadline ([`limits`]).
    pub fn grants(&self, limits: &Grants, base: &Path) -> Result<Grants, PluginError> {
        let mut g = Grants { allow_hosts: self.allow_hosts.to_vec(), mounts: Vec::new(), ..limits.clone() };
        for (host, guest) in self.mount {
            let path = base.join(host);
            let host = path.canonicalize().map_err(|e| PluginError::Mount {
                entry: self.name.to_owned(),
                host: path.clone(),
                message: e.to_string(),
            })?;
            g.mounts.push(Mount { host, guest: guest.clone(), writable: self.kind == Kind::Destination });
        }
        Ok(g)
    }
}

/// Grants with nothing but plugin `name`'s memory cap and call deadline
/// (the defaults where the manifest sets none).
pub fn limits(m: &Manifest, name: &str) -> Result<Grants, PluginError> {
    let mut g = Grants::default();
    if let Some(p) = m.plugins.get(name) {
        if let Some(mem) = &p.memory {
            g.memory = units::parse_bytes(mem).map_err(|e| PluginError::Grant { message: format!("memory: {e}") })?;
        }
        if let Some(t) = &p.timeout {
            g.timeout =
                units::parse_duration(t).map_err(|e| PluginError::Grant { message: format!("timeout: {e}") })?;
        }
    }
    Ok(g)
}

/// Every source and destination that runs a plugin, in manifest order.
pub fn entries(m: &Manifest) -> Vec<Entry<'_>> {
    let config = |c: &Option<serde_json::Map<String, Value>>| Value::Object(c.clone().unwrap_or_default());
    let sources = m.sources.iter().filter_map(|(name, s)| {
        Some(Entry {
            kind: Kind::Source,
            name,
            plugin: s.plugin.as_deref()?,
            config: config(&s.config),
            mount: &s.mount,
            allow_hosts: &s.allow_hosts,
        })
    });
    let destinations = m.destinations.iter().map(|(name, d)| Entry {
        kind: Kind::Destination,
        name,
        plugin: &d.plugin,
        config: config(&d.config),
        mount: &d.mount,
        allow_hosts: &d.allow_hosts,
    });
    sources.chain(destinations).collect()
}

/// Loads the plugin named `name` in the manifest (checked against its pin).
pub fn load(host: &Host, m: &Manifest, base: &Path, name: &str) -> Result<Plugin, PluginError> {
    let p = m.plugins.get(name).ok_or_else(|| PluginError::Grant { message: format!("no plugin named `{name}`") })?;
    host.load(&base.join(&p.path), p.sha256.as_deref())
}

/// The checks `cdp validate` makes with the plugins of a valid manifest:
/// each loads and is the kind its entries use, each entry's `config`
/// satisfies the plugin's config schema, and the plugin's `check` accepts it.
pub async fn check_manifest(host: &Host, m: &Manifest, base: &Path, spans: &SpanIndex) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let mut loaded: HashMap<&str, Option<(Plugin, Spec)>> = HashMap::new();
    for entry in entries(m) {
        if !loaded.contains_key(entry.plugin) {
            let pointer = push_segment(&push_segment("/plugins", entry.plugin), "path");
            let r = match (load(host, m, base, entry.plugin), limits(m, entry.plugin)) {
                (Ok(p), Ok(g)) => p.spec_within(entry.plugin, g.memory, g.timeout).await.map(|s| (p, s)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            let v = match r {
                Ok(v) => Some(v),
                Err(e) => {
                    out.push(
                        Diagnostic::error(diag::PLUGIN_LOAD, display_path(&pointer), e.to_string())
                            .at(spans.value(&pointer))
                            .hint("rebuild the plugin (`cdp plugin build`) and check it with `cdp plugin test`"),
                    );
                    None
                }
            };
            loaded.insert(entry.plugin, v);
        }
        let Some(Some((plugin, spec))) = loaded.get(entry.plugin) else { continue };
        let base_ptr = entry.pointer();
        if plugin.kind() != entry.kind {
            let pointer = push_segment(&base_ptr, "plugin");
            out.push(
                Diagnostic::error(
                    diag::PLUGIN_KIND,
                    display_path(&pointer),
                    format!(
                        "{} `{}` uses plugin `{}`, which is a {} connector",
                        entry.kind,
                        entry.name,
                        entry.plugin,
                        plugin.kind()
                    ),
                )
                .at(spans.value(&pointer))
                .hint(format!("use a {} plugin here", entry.kind)),
            );
            continue;
        }
        let config_ptr = push_segment(&base_ptr, "config");
        let errors = super::conformance::config_errors(&spec.config_schema, &entry.config);
        for (path, message) in &errors {
            let pointer = format!("{config_ptr}{path}");
            let loc = if spans.contains(&pointer) { spans.value(&pointer) } else { spans.key(&config_ptr) };
            out.push(
                Diagnostic::error(diag::PLUGIN_CONFIG, display_path(&pointer), format!("{}: {message}", spec.name))
                    .at(loc)
                    .hint(format!("`cdp plugin inspect {}` shows the config schema", m.plugins[entry.plugin].path)),
            );
        }
        if !errors.is_empty() {
            continue;
        }
        // The entry's own memory cap and deadline, and no other grant:
        // validation stays offline.
        let Ok(grants) = limits(m, entry.plugin) else { continue };
        match plugin.check(entry.name, &grants, &entry.config).await {
            Ok(()) => {}
            Err(PluginError::Connector { error, .. }) => out.push(
                Diagnostic::error(
                    diag::PLUGIN_CHECK,
                    display_path(&config_ptr),
                    format!("{} refused this config: {} ({})", spec.name, error.message, error.code),
                )
                .at(spans.key(&config_ptr))
                .hint(format!("`cdp plugin inspect {}` shows what the config takes", m.plugins[entry.plugin].path)),
            ),
            Err(e) => out.push(
                Diagnostic::error(diag::PLUGIN_CHECK, display_path(&config_ptr), e.to_string())
                    .at(spans.key(&config_ptr))
                    .hint("the plugin failed while checking its config; test it with `cdp plugin test`"),
            ),
        }
    }
    out
}
