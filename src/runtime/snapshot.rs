//! A manifest as the runtime runs it: loaded, validated (the manifest's own
//! rules and every plugin entry's checks, as `cdp validate` makes them),
//! with each plugin source's schedule parsed and its plugin compiled and
//! pre-instantiated. A reload builds a new snapshot beside the running one
//! and swaps only when it is whole; an invalid file never replaces a valid
//! snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::schedule::Schedule;
use crate::manifest::{self, Diagnostic, Manifest, Options, diag};
use crate::plugin::{Grants, Host, Plugin, entries};
use crate::store::ingest::IdentityConfig;

/// One plugin source the runtime runs.
#[derive(Debug, Clone)]
pub struct SourceSync {
    pub name: String,
    pub plugin: Plugin,
    pub grants: Grants,
    pub config: Value,
    /// Runs continuously (`mode: streaming`, or a plugin that declares
    /// `streaming` without `mode: batch`).
    pub streaming: bool,
    pub schedule: Option<Schedule>,
    /// Changes whenever anything that decides what this sync reads or how
    /// its records are applied changes: a reload restarts it then.
    pub fingerprint: String,
}

/// A loaded, checked manifest.
#[derive(Debug)]
pub struct Snapshot {
    pub manifest: Arc<Manifest>,
    /// Directory relative paths in the manifest are resolved against.
    pub base: PathBuf,
    pub text: String,
    pub sha256: String,
    pub identity: IdentityConfig,
    /// Computed traits, audience rules and consent expiry, resolved once.
    pub model: crate::profile::Model,
    pub sources: IndexMap<String, SourceSync>,
    /// Every destination, with its plugin loaded.
    pub destinations: IndexMap<String, DestinationSync>,
}

/// One destination the runtime delivers to.
#[derive(Debug, Clone)]
pub struct DestinationSync {
    pub plugin: Plugin,
    pub grants: Grants,
    pub config: Value,
    pub target: crate::activation::Target,
    /// The plugin declares the `delete` capability (erasures reach it).
    pub deletes: bool,
}

/// Why a manifest could not become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is invalid: {} error(s)", diagnostics.iter().filter(|d| d.is_error()).count())]
    Invalid { path: String, source_text: Option<String>, diagnostics: Vec<Diagnostic> },
}

/// The CLI shows an `Invalid` error as `cdp validate` does, from its
/// diagnostics and the manifest's text; the runtime logs and records
/// [`LoadError::lines`].
impl LoadError {
    /// One line per error, for status documents and the log.
    pub fn lines(&self) -> Vec<String> {
        match self {
            LoadError::Read { .. } => vec![self.to_string()],
            LoadError::Invalid { path, diagnostics, .. } => diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| format!("{path}:{}:{}: {} {}", d.line, d.column, d.code, d.message))
                .collect(),
        }
    }
}

impl Snapshot {
    /// Loads and checks the manifest at `path` with environment variables
    /// required (run mode), and loads the plugins its sources use.
    pub async fn load(path: &Path, host: &Host) -> Result<Snapshot, LoadError> {
        let shown = path.display().to_string();
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let loaded = manifest::load_file(path, &Options::run(&base))
            .map_err(|e| LoadError::Read { path: shown.clone(), message: e.source.to_string() })?;
        let invalid = |loaded: manifest::Loaded| LoadError::Invalid {
            path: shown.clone(),
            source_text: loaded.source,
            diagnostics: loaded.diagnostics,
        };
        if loaded.has_errors() {
            return Err(invalid(loaded));
        }
        let (Some(m), Some(spans), Some(text)) = (&loaded.manifest, &loaded.spans, &loaded.source) else {
            return Err(invalid(loaded));
        };
        let checks = entries::check_manifest(host, m, &base, spans).await;
        if checks.iter().any(Diagnostic::is_error) {
            let mut loaded = loaded;
            loaded.diagnostics.extend(checks);
            return Err(invalid(loaded));
        }
        let text = text.clone();
        let m = loaded.manifest.expect("checked above");
        let sources = match source_syncs(&m, &base, host).await {
            Ok(s) => s,
            Err(message) => {
                return Err(LoadError::Invalid {
                    path: shown,
                    source_text: Some(text),
                    diagnostics: vec![Diagnostic::error(diag::PLUGIN_LOAD, "", message)],
                });
            }
        };
        let destinations = match destination_syncs(&m, &base, host).await {
            Ok(d) => d,
            Err(message) => {
                return Err(LoadError::Invalid {
                    path: shown,
                    source_text: Some(text),
                    diagnostics: vec![Diagnostic::error(diag::PLUGIN_LOAD, "", message)],
                });
            }
        };
        Ok(Snapshot {
            destinations,
            identity: IdentityConfig::from_manifest(&m),
            model: crate::profile::Model::new(&m),
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            manifest: Arc::new(m),
            base,
            text,
            sources,
        })
    }
}

/// Every destination, with its plugin loaded and its delivery settings resolved.
async fn destination_syncs(
    m: &Manifest,
    base: &Path,
    host: &Host,
) -> Result<IndexMap<String, DestinationSync>, String> {
    let mut out = IndexMap::new();
    for entry in entries::entries(m) {
        if entry.kind != crate::plugin::Kind::Destination {
            continue;
        }
        let plugin =
            entries::load(host, m, base, entry.plugin).map_err(|e| format!("destination `{}`: {e}", entry.name))?;
        let grants = entry.grants(m, base).map_err(|e| format!("destination `{}`: {e}", entry.name))?;
        let spec = plugin.spec(entry.name).await.map_err(|e| format!("destination `{}`: {e}", entry.name))?;
        let target = crate::activation::Target::resolve(m, entry.name, &m.destinations[entry.name]);
        let deletes = spec.capabilities.iter().any(|c| c == "delete");
        out.insert(
            entry.name.to_owned(),
            DestinationSync { plugin, grants, config: entry.config.clone(), target, deletes },
        );
    }
    Ok(out)
}

/// Every source that runs a plugin, with its plugin loaded.
async fn source_syncs(m: &Manifest, base: &Path, host: &Host) -> Result<IndexMap<String, SourceSync>, String> {
    // What every source's records depend on besides its own entry.
    let shared = serde_json::json!({
        "identity": m.identity, "model": m.model, "consent": m.consent,
    });
    let mut out = IndexMap::new();
    for entry in entries::entries(m) {
        if entry.kind != crate::plugin::Kind::Source {
            continue;
        }
        let src = &m.sources[entry.name];
        let plugin = entries::load(host, m, base, entry.plugin).map_err(|e| format!("source `{}`: {e}", entry.name))?;
        let grants = entry.grants(m, base).map_err(|e| format!("source `{}`: {e}", entry.name))?;
        let spec = plugin.spec(entry.name).await.map_err(|e| format!("source `{}`: {e}", entry.name))?;
        let streaming = match src.mode {
            Some(manifest::types::SourceMode::Streaming) => true,
            Some(manifest::types::SourceMode::Batch) => false,
            None => spec.capabilities.iter().any(|c| c == "streaming"),
        };
        let schedule = src.schedule.as_deref().map(Schedule::parse).transpose()?;
        let fingerprint = {
            let def = serde_json::json!({
                "source": src, "plugin": m.plugins.get(entry.plugin), "sha256": plugin.sha256(),
                "shared": shared,
            });
            hex::encode(Sha256::digest(def.to_string().as_bytes()))
        };
        out.insert(
            entry.name.to_owned(),
            SourceSync {
                name: entry.name.to_owned(),
                plugin,
                grants,
                config: entry.config.clone(),
                streaming,
                schedule,
                fingerprint,
            },
        );
    }
    Ok(out)
}
