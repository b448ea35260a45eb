//! The resolved manifest: the one way from a manifest's bytes to what every
//! command runs on. `cdp validate`, `cdp run` and its reloads, `cdp plan` and
//! every command that acts on a store call [`resolve`] (or
//! [`resolve_file`]); none reads the manifest's text settings itself.
//!
//! The rule: whatever the manifest writes as text and means as something
//! else is parsed here, once — cron schedules, durations, rates and byte
//! sizes, audience rules and computed-trait filters (compiled), names
//! (checked newtypes). A manifest that validates always resolves; a part that
//! passes its checks and still does not resolve is an error (CDP075) naming
//! it, never a part silently left out. Pure: bytes in, a value out; plugins
//! are loaded by the runtime on top of it ([`crate::runtime::Snapshot`]).
//!
//! Two resolved manifests [`diff`] into the changes `cdp plan` shows and a
//! reload applies.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use sha2::{Digest, Sha256};

use crate::activation::Target;
use crate::identity::IdentityConfig;
use crate::manifest::diff::Change;
use crate::manifest::names::{AudienceName, DestinationName, PluginName, SourceName};
use crate::manifest::{self, Diagnostic, Loaded, Manifest, Options, SourceMode, diag, yaml::SpanIndex};
use crate::plugin::Grants;
use crate::privacy::RetentionRule;
use crate::profile::Model;
use crate::schedule::Schedule;

/// When retention runs without `retention.schedule`: hourly.
pub const DEFAULT_RETENTION_SCHEDULE: &str = "0 0 * * * *";

/// A manifest resolved: its typed sections, and every setting they hold as
/// text parsed into what it means.
#[derive(Debug)]
pub struct Resolved {
    /// The typed sections as written (what [`diff`] compares, and what the
    /// stages that read the model's declarations take).
    pub manifest: Arc<Manifest>,
    /// The file's text, and its SHA-256 (hex): the applied manifest's identity.
    pub text: String,
    pub sha256: String,
    /// Directory relative paths in the manifest are resolved against.
    pub base: PathBuf,
    /// Where every key and value sits in the text (absent for a manifest built in code).
    pub spans: Option<SpanIndex>,
    /// The warnings loading found (a resolved manifest has no errors).
    pub warnings: Vec<Diagnostic>,
    /// Identity keys with their limits, priority ranks and cross-limit probabilities.
    pub identity: IdentityConfig,
    /// Computed traits, audience rules and consent expiry, compiled.
    pub model: Model,
    /// Each plugin's memory cap and call deadline.
    pub plugins: IndexMap<PluginName, Grants>,
    pub sources: IndexMap<SourceName, Source>,
    pub audiences: IndexMap<AudienceName, Audience>,
    /// Each destination with its batch, rate and retry settings.
    pub destinations: IndexMap<DestinationName, Target>,
    pub retention: Retention,
}

/// One source, resolved.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: SourceName,
    /// The plugin it runs (none for a collector source).
    pub plugin: Option<PluginName>,
    pub schedule: Option<Schedule>,
    pub mode: Option<SourceMode>,
    /// Changes whenever anything that decides what this source reads or how
    /// its records are applied changes: its entry, its plugin's entry, the
    /// identity rules, the model and consent. A reload restarts its sync then.
    pub fingerprint: String,
}

/// One audience, resolved (its rule is compiled in [`Resolved::model`]).
#[derive(Debug, Clone)]
pub struct Audience {
    /// `refresh:`: evaluated on this schedule instead of as profiles change.
    pub refresh: Option<Schedule>,
}

/// `retention:`, resolved.
#[derive(Debug, Clone)]
pub struct Retention {
    pub rules: Vec<RetentionRule>,
    pub schedule: Schedule,
}

/// Why a manifest did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is invalid: {} error(s)", diagnostics.iter().filter(|d| d.is_error()).count())]
    Invalid { path: String, source_text: Option<String>, diagnostics: Vec<Diagnostic> },
}

impl ResolveError {
    /// One line per error, for status documents and the log.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ResolveError::Read { .. } => vec![self.to_string()],
            ResolveError::Invalid { path, diagnostics, .. } => diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| format!("{path}:{}:{}: {} {}", d.line, d.column, d.code, d.message))
                .collect(),
        }
    }
}

/// Reads, checks and resolves the manifest at `path`.
pub fn resolve_file(path: &Path, opts: &Options<'_>) -> Result<Resolved, ResolveError> {
    let shown = path.display().to_string();
    let loaded = manifest::load_file(path, opts)
        .map_err(|e| ResolveError::Read { path: shown.clone(), message: e.source.to_string() })?;
    resolve_loaded(loaded, &opts.base_dir).map_err(|loaded| ResolveError::Invalid {
        path: shown,
        source_text: loaded.source,
        diagnostics: loaded.diagnostics,
    })
}

/// Checks and resolves a manifest's bytes.
pub fn resolve(bytes: &[u8], opts: &Options<'_>) -> Result<Resolved, Box<Loaded>> {
    resolve_loaded(manifest::load_bytes(bytes, opts), &opts.base_dir)
}

/// Resolves what loading produced; `Err` gives it back, with a CDP075
/// diagnostic added when the manifest loaded without errors yet a part of it
/// does not resolve (the partial manifest stays for checks that run on
/// intact parts, as `cdp validate`'s plugin checks do).
pub fn resolve_loaded(mut loaded: Loaded, base: &Path) -> Result<Resolved, Box<Loaded>> {
    if loaded.has_errors() {
        return Err(Box::new(loaded));
    }
    let (Some(m), true) = (loaded.manifest.take(), loaded.source.is_some()) else {
        return Err(Box::new(loaded));
    };
    match Parts::of(&m) {
        Ok(parts) => {
            let mut r = parts.with(m, loaded.source.unwrap_or_default(), base);
            r.spans = loaded.spans;
            r.warnings = loaded.diagnostics;
            Ok(r)
        }
        Err(message) => {
            loaded.diagnostics.push(
                Diagnostic::error(diag::UNRESOLVED, "", message)
                    .at(diag::Loc { line: 1, column: 1 })
                    .hint("`cdp validate` should have refused this; please report it with the manifest"),
            );
            loaded.partial = Some(m);
            Err(Box::new(loaded))
        }
    }
}

/// The manifest last applied to a store (its recorded text), resolved as
/// `cdp validate` resolves (environment references need not be set).
/// `None` when it no longer resolves: one applied by an older cdp whose
/// checks were looser is compared as if nothing had been applied.
pub fn resolve_applied(text: &str, base: &Path) -> Option<Resolved> {
    resolve(text.as_bytes(), &Options::validate(base)).ok()
}

impl Resolved {
    /// Resolves a typed manifest (`text` is what it was read from; for one
    /// built in code, any text that names it). An error names the first part
    /// that does not resolve.
    pub fn new(m: Manifest, text: String, base: &Path) -> Result<Resolved, String> {
        Ok(Parts::of(&m)?.with(m, text, base))
    }

    /// A manifest built in code, resolved (its text is its JSON form).
    pub fn from_manifest(m: Manifest) -> Result<Resolved, String> {
        let text = serde_json::to_string_pretty(&m).map_err(|e| e.to_string())?;
        Resolved::new(m, text, Path::new("."))
    }
}

/// What a manifest resolves to besides itself: resolved from a borrowed
/// manifest, so one that does not resolve is still there to give back.
struct Parts {
    identity: IdentityConfig,
    model: Model,
    plugins: IndexMap<PluginName, Grants>,
    sources: IndexMap<SourceName, Source>,
    audiences: IndexMap<AudienceName, Audience>,
    destinations: IndexMap<DestinationName, Target>,
    retention: Retention,
}

impl Parts {
    /// An error names the first part that does not resolve.
    fn of(m: &Manifest) -> Result<Parts, String> {
        let plugins = m
            .plugins
            .keys()
            .map(|n| {
                let limits = crate::plugin::entries::limits(m, n).map_err(|e| format!("plugin `{n}`: {e}"))?;
                Ok((name(PluginName::parse(n))?, limits))
            })
            .collect::<Result<_, String>>()?;
        // What every source's records depend on, hashed once for all of them.
        let shared = serde_json::json!({"identity": m.identity, "model": m.model, "consent": m.consent});
        let shared = hex::encode(Sha256::digest(shared.to_string().as_bytes()));
        let sources = m
            .sources
            .iter()
            .map(|(n, s)| {
                let schedule =
                    s.schedule.as_deref().map(Schedule::parse).transpose().map_err(|e| format!("source `{n}`: {e}"))?;
                let plugin = s.plugin.as_deref().map(|p| name(PluginName::parse(p))).transpose()?;
                let def = serde_json::json!({"source": s, "plugin": s.plugin.as_ref().and_then(|p| m.plugins.get(p)), "shared": shared});
                let source = Source {
                    name: name(SourceName::parse(n))?,
                    plugin,
                    schedule,
                    mode: s.mode,
                    fingerprint: hex::encode(Sha256::digest(def.to_string().as_bytes())),
                };
                Ok((source.name.clone(), source))
            })
            .collect::<Result<_, String>>()?;
        let audiences = m
            .audiences
            .iter()
            .map(|(n, a)| {
                let refresh = a
                    .refresh
                    .as_deref()
                    .map(Schedule::parse)
                    .transpose()
                    .map_err(|e| format!("audience `{n}`: refresh: {e}"))?;
                Ok((name(AudienceName::parse(n))?, Audience { refresh }))
            })
            .collect::<Result<_, String>>()?;
        let destinations = m
            .destinations
            .iter()
            .map(|(n, d)| Ok((name(DestinationName::parse(n))?, Target::resolve(m, n, d)?)))
            .collect::<Result<_, String>>()?;
        let retention_schedule = m.retention.as_ref().and_then(|r| r.schedule.as_deref());
        let retention = Retention {
            rules: crate::privacy::retention_rules(m)?,
            schedule: Schedule::parse(retention_schedule.unwrap_or(DEFAULT_RETENTION_SCHEDULE))
                .map_err(|e| format!("retention.schedule: {e}"))?,
        };
        if let Some(mt) = &m.identity.matching {
            // Matching runs in the store on the typed section; it must parse.
            crate::identity::matching::specs(&mt.compare)?;
        }
        Ok(Parts {
            identity: IdentityConfig::from_manifest(m),
            model: Model::new(m)?,
            plugins,
            sources,
            audiences,
            destinations,
            retention,
        })
    }

    /// The resolved manifest of `m`, read from `text`, with these parts.
    fn with(self, m: Manifest, text: String, base: &Path) -> Resolved {
        Resolved {
            identity: self.identity,
            model: self.model,
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            text,
            base: base.to_path_buf(),
            spans: None,
            warnings: Vec::new(),
            plugins: self.plugins,
            sources: self.sources,
            audiences: self.audiences,
            destinations: self.destinations,
            retention: self.retention,
            manifest: Arc::new(m),
        }
    }
}

fn name<T>(r: Result<T, manifest::names::NameError>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// What changed from one resolved manifest to the next.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Section by section, in manifest order (what `cdp plan` lists).
    pub sections: Vec<Change>,
    /// Sources that are new or whose [`Source::fingerprint`] changed: a
    /// running sync of theirs restarts under the new manifest.
    pub restarted: Vec<SourceName>,
    /// Sources that are gone: their syncs stop.
    pub removed: Vec<SourceName>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// Each change as `~audiences.vip` (`+` added, `~` changed, `-` removed).
    pub fn summary(&self) -> Vec<String> {
        self.sections.iter().map(|c| format!("{}{}", c.kind.symbol(), c.path())).collect()
    }
}

/// The changes from `old` (`None`: a store that never had a manifest
/// applied, as if everything were new) to `new`.
pub fn diff(old: Option<&Resolved>, new: &Resolved) -> Changes {
    let empty;
    let before = match old {
        Some(o) => &*o.manifest,
        None => {
            empty = nothing_like(&new.manifest);
            &empty
        }
    };
    let sections = crate::manifest::diff::diff(before, &new.manifest);
    let no_sources = IndexMap::new();
    let old_sources = old.map_or(&no_sources, |o| &o.sources);
    let restarted = new
        .sources
        .values()
        .filter(|s| old_sources.get(&s.name).is_none_or(|o| o.fingerprint != s.fingerprint))
        .map(|s| s.name.clone())
        .collect();
    let removed = old_sources.keys().filter(|n| !new.sources.contains_key(*n)).cloned().collect();
    Changes { sections, restarted, removed }
}

/// A manifest with nothing in it but `like`'s name, storage and server.
fn nothing_like(like: &Manifest) -> Manifest {
    let mut m = like.clone();
    m.plugins.clear();
    m.sources.clear();
    m.identity = Default::default();
    m.model = Default::default();
    m.consent.purposes.clear();
    m.consent.policies.clear();
    m.audiences.clear();
    m.destinations.clear();
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::diff::ChangeKind;

    const BASE: &str = r#"
version: 1
name: t
identity:
  keys:
    email: { normalize: email }
model:
  traits:
    tier: { type: string }
  events:
    order: { properties: { total: number } }
  computed:
    orders_90d: { count: order, within: 90d }
consent:
  purposes: [email_marketing]
  expiry: 365d
plugins:
  csv: { path: plugins/source-csv.wasm, memory: 64MiB, timeout: 5s }
  hook: { path: plugins/dest-webhook.wasm }
sources:
  loyalty:
    plugin: csv
    schedule: "*/1 * * * * *"
    map: { identities: { email: email } }
  web:
    collector: {}
    map: { identities: { email: email } }
audiences:
  gold: { where: 'tier == "gold"' }
  nightly: { where: 'orders_90d > 2', refresh: "0 0 3 * * *" }
destinations:
  crm:
    plugin: hook
    purpose: email_marketing
    fields: [email]
    batch: { max_records: 100, max_wait: 2s }
    rate_limit: 20/s
    retry: { max_attempts: 4, initial_backoff: 1s, max_backoff: 1m }
retention:
  records: 400d
"#;

    /// A directory holding the plugin files `BASE` names.
    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("plugins")).expect("mkdir");
        for f in ["source-csv.wasm", "dest-webhook.wasm"] {
            std::fs::write(d.path().join("plugins").join(f), b"\0asm").expect("write");
        }
        d
    }

    fn resolved(text: &str) -> Resolved {
        let d = dir();
        match resolve(text.as_bytes(), &Options::validate(d.path())) {
            Ok(r) => r,
            Err(l) => panic!("{:#?}", l.diagnostics),
        }
    }

    #[test]
    fn every_text_setting_is_parsed_once_into_what_it_means() {
        use std::time::Duration;
        let r = resolved(BASE);
        assert_eq!(r.sha256, hex::encode(Sha256::digest(BASE.as_bytes())));
        let limits = &r.plugins["csv"];
        assert_eq!((limits.memory, limits.timeout), (64 << 20, Duration::from_secs(5)));
        let loyalty = &r.sources["loyalty"];
        assert_eq!(loyalty.plugin.as_deref(), Some("csv"));
        assert_eq!(loyalty.schedule.as_ref().map(Schedule::text), Some("*/1 * * * * *"));
        assert!(r.sources["web"].plugin.is_none() && r.sources["web"].schedule.is_none());
        assert!(r.audiences["gold"].refresh.is_none());
        assert_eq!(r.audiences["nightly"].refresh.as_ref().map(Schedule::text), Some("0 0 3 * * *"));
        let crm = &r.destinations["crm"];
        assert_eq!((crm.max_records, crm.max_wait), (100, Duration::from_secs(2)));
        assert_eq!(
            (crm.retry.max_attempts, crm.retry.initial, crm.retry.max),
            (4, Duration::from_secs(1), Duration::from_secs(60))
        );
        assert!(crm.rate.is_some());
        assert_eq!(r.model.consent_expiry(), Some(Duration::from_secs(365 * 86_400)));
        assert_eq!(r.model.audiences().len(), 2);
        assert_eq!(r.retention.rules.len(), 1);
        assert_eq!(r.retention.rules[0].keep, Duration::from_secs(400 * 86_400));
        assert_eq!(r.retention.schedule.text(), DEFAULT_RETENTION_SCHEDULE);
        assert_eq!(r.identity.keys, ["email"]);
    }

    #[test]
    fn an_invalid_manifest_gives_back_its_diagnostics() {
        let bad = BASE.replace("max_wait: 2s", "max_wait: 2 fortnights");
        let d = dir();
        let loaded = resolve(bad.as_bytes(), &Options::validate(d.path())).expect_err("invalid");
        assert!(
            loaded.diagnostics.iter().any(|d| d.is_error() && d.message.contains("fortnights")),
            "{:#?}",
            loaded.diagnostics
        );
    }

    #[test]
    fn a_part_that_passed_its_checks_but_does_not_resolve_is_named_not_dropped() {
        let mut m = resolved(BASE).manifest.as_ref().clone();
        m.model.computed.get_mut("orders_90d").expect("computed").within = Some("ninety days".into());
        let e = Resolved::from_manifest(m).expect_err("does not resolve");
        assert!(e.contains("orders_90d") && e.contains("within"), "{e}");
    }

    #[test]
    fn diff_names_sections_and_the_syncs_a_reload_restarts() {
        let old = resolved(BASE);
        assert!(diff(Some(&old), &old).is_empty());
        let new = resolved(
            &BASE
                .replace("gold: { where: 'tier == \"gold\"' }", "gold: { where: 'tier != \"gold\"' }")
                .replace("schedule: \"*/1 * * * * *\"", "schedule: \"*/5 * * * * *\""),
        );
        let c = diff(Some(&old), &new);
        assert_eq!(c.summary(), ["~sources.loyalty", "~audiences.gold"]);
        assert_eq!(c.restarted, ["loyalty"]);
        assert!(c.removed.is_empty());

        // A change to what every source's records mean restarts every source.
        let model =
            resolved(&BASE.replace("tier: { type: string }", "tier: { type: string }\n    points: { type: integer }"));
        let c = diff(Some(&old), &model);
        assert_eq!(c.restarted, ["loyalty", "web"]);

        let gone =
            resolved(&BASE.replace("  web:\n    collector: {}\n    map: { identities: { email: email } }\n", ""));
        let c = diff(Some(&old), &gone);
        assert_eq!(c.removed, ["web"]);
        assert_eq!(
            c.sections.iter().map(|s| (s.path(), s.kind)).collect::<Vec<_>>(),
            [("sources.web".to_owned(), ChangeKind::Removed)]
        );

        let first = diff(None, &old);
        // Against a store that never had a manifest: every entry is new.
        let entries = first.sections.iter().filter(|s| !s.name.is_empty());
        assert!(entries.clone().all(|s| s.kind == ChangeKind::Added), "{:?}", first.summary());
        assert_eq!(entries.count(), 11, "{:?}", first.summary());
        assert_eq!(first.restarted, ["loyalty", "web"]);
    }
}
