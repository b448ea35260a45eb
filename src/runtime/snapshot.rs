//! A manifest as the runtime runs it: resolved ([`crate::resolved`]),
//! checked with its plugins as `cdp validate` checks it, and each plugin
//! compiled and pre-instantiated. A reload builds a new snapshot beside the running one
//! and swaps only when it is whole; an invalid file never replaces a valid
//! snapshot.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::manifest::names::{DestinationName, SourceName};
use crate::manifest::{self, Diagnostic, Options, diag};
use crate::plugin::{Grants, Host, Plugin, entries};
use crate::resolved::{self, Resolved};
use crate::schedule::Schedule;

pub use crate::resolved::ResolveError as LoadError;

/// One plugin source the runtime runs.
#[derive(Debug, Clone)]
pub struct SourceSync {
    pub name: SourceName,
    pub plugin: Plugin,
    pub grants: Grants,
    pub config: Value,
    /// Runs continuously (`mode: streaming`, or a plugin that declares
    /// `streaming` without `mode: batch`).
    pub streaming: bool,
    pub schedule: Option<Schedule>,
    /// The source's [`resolved::Source::fingerprint`] with its plugin
    /// file's digest: a reload restarts the sync when it changes.
    pub fingerprint: String,
}

/// A resolved manifest with its plugins loaded: what `cdp run` runs.
/// Dereferences to the [`Resolved`] manifest.
#[derive(Debug)]
pub struct Snapshot {
    pub resolved: Arc<Resolved>,
    /// Every source that runs a plugin, with its plugin loaded.
    pub syncs: IndexMap<SourceName, SourceSync>,
    /// Every destination, with its plugin loaded.
    pub sinks: IndexMap<DestinationName, DestinationSync>,
}

impl Deref for Snapshot {
    type Target = Resolved;
    fn deref(&self) -> &Resolved {
        &self.resolved
    }
}

/// One destination the runtime delivers to: its resolved settings with its plugin loaded.
#[derive(Debug, Clone)]
pub struct DestinationSync {
    pub target: crate::activation::Target,
    pub plugin: Plugin,
    pub grants: Grants,
    pub config: Value,
    /// The plugin declares the `delete` capability (erasures reach it).
    pub deletes: bool,
}

impl Snapshot {
    /// Resolves the manifest at `path` with environment variables required
    /// (run mode), makes the checks `cdp validate` makes with its plugins,
    /// and loads them.
    pub async fn load(path: &Path, host: &Host) -> Result<Snapshot, LoadError> {
        let shown = path.display().to_string();
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let r = resolved::resolve_file(path, &Options::run(&base))?;
        let invalid = |diagnostics: Vec<Diagnostic>| LoadError::Invalid {
            path: shown.clone(),
            source_text: Some(r.text.clone()),
            diagnostics,
        };
        if let Some(spans) = &r.spans {
            let checks = entries::check_manifest(host, &r.manifest, &r.base, spans).await;
            if checks.iter().any(Diagnostic::is_error) {
                return Err(invalid(r.warnings.iter().cloned().chain(checks).collect()));
            }
        }
        let plugin_error = |message: String| invalid(vec![Diagnostic::error(diag::PLUGIN_LOAD, "", message)]);
        let syncs = source_syncs(&r, host).await.map_err(plugin_error)?;
        let sinks = destination_syncs(&r, host).await.map_err(plugin_error)?;
        Ok(Snapshot { resolved: Arc::new(r), syncs, sinks })
    }
}

/// Every destination, with its plugin loaded.
async fn destination_syncs(r: &Resolved, host: &Host) -> Result<IndexMap<DestinationName, DestinationSync>, String> {
    let m = &r.manifest;
    let mut out = IndexMap::new();
    for entry in entries::entries(m) {
        if entry.kind != crate::plugin::Kind::Destination {
            continue;
        }
        let err = |e: crate::plugin::PluginError| format!("destination `{}`: {e}", entry.name);
        let plugin = entries::load(host, m, &r.base, entry.plugin).map_err(err)?;
        let grants = entry.grants(plugin_limits(r, entry.plugin)?, &r.base).map_err(err)?;
        let spec = plugin.spec(entry.name).await.map_err(err)?;
        let deletes = spec.capabilities.iter().any(|c| c == "delete");
        let Some((name, target)) = r.destinations.get_key_value(entry.name) else { continue };
        let target = target.clone();
        out.insert(name.clone(), DestinationSync { target, plugin, grants, config: entry.config.clone(), deletes });
    }
    Ok(out)
}

/// Every source that runs a plugin, with its plugin loaded.
async fn source_syncs(r: &Resolved, host: &Host) -> Result<IndexMap<SourceName, SourceSync>, String> {
    let m = &r.manifest;
    let mut out = IndexMap::new();
    for entry in entries::entries(m) {
        if entry.kind != crate::plugin::Kind::Source {
            continue;
        }
        let Some(src) = r.sources.get(entry.name) else { continue };
        let err = |e: crate::plugin::PluginError| format!("source `{}`: {e}", entry.name);
        let plugin = entries::load(host, m, &r.base, entry.plugin).map_err(err)?;
        let grants = entry.grants(plugin_limits(r, entry.plugin)?, &r.base).map_err(err)?;
        let spec = plugin.spec(entry.name).await.map_err(err)?;
        let streaming = match src.mode {
            Some(manifest::types::SourceMode::Streaming) => true,
            Some(manifest::types::SourceMode::Batch) => false,
            None => spec.capabilities.iter().any(|c| c == "streaming"),
        };
        let fingerprint = hex::encode(Sha256::digest(format!("{}:{}", src.fingerprint, plugin.sha256()).as_bytes()));
        out.insert(
            src.name.clone(),
            SourceSync {
                name: src.name.clone(),
                plugin,
                grants,
                config: entry.config.clone(),
                streaming,
                schedule: src.schedule.clone(),
                fingerprint,
            },
        );
    }
    Ok(out)
}

/// The resolved memory cap and call deadline of plugin `name`.
fn plugin_limits<'r>(r: &'r Resolved, name: &str) -> Result<&'r Grants, String> {
    r.plugins.get(name).ok_or_else(|| format!("no plugin named `{name}`"))
}
