//! The supervisor of `cdp run`: starts a task per plugin source, reloads
//! the manifest when it (or a plugin it pins) changes on disk or on SIGHUP,
//! and drains on SIGINT/SIGTERM.
//!
//! A reload builds a whole new [`Snapshot`] first. An invalid one changes
//! nothing that runs: the diagnostics go to the log and to the `reload`
//! status document (`cdp status`). A valid one is diffed against the
//! running one sync by sync: a sync whose fingerprint is unchanged keeps
//! running; a changed or removed one is cancelled — it finishes the batch
//! it is committing under the old manifest — and a changed or added one
//! starts once its predecessor has ended.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indexmap::IndexMap;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::snapshot::Snapshot;
use super::sync::{self, Ctx, SyncError, Trigger};
use crate::manifest::names::SourceName;
use crate::plugin::Host;
use crate::server::{self, Control, RunRefused};
use crate::store::{Store, now_ms};

/// How `cdp run` runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub manifest: PathBuf,
    /// How long in-flight batches may take to finish after SIGINT/SIGTERM.
    pub drain: Duration,
    /// Serve HTTP here instead of the manifest's `server.listen`.
    pub listen: Option<String>,
}

/// How often the runtime writes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Changes to the manifest within this window are applied together (an
/// editor's save is often several writes and a rename).
const DEBOUNCE: Duration = Duration::from_millis(200);
/// A streaming sync that failed starts again after this, doubling to [`RESTART_MAX`].
const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);

/// A running sync task.
struct Running {
    fingerprint: String,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

/// Runs `snap`, loaded from `opts.manifest` by `host`, until SIGINT or
/// SIGTERM, loading the manifest again with `host` whenever it changes.
pub async fn run(opts: Options, host: Arc<Host>, snap: Snapshot) -> Result<()> {
    let mut snap = Arc::new(snap);
    let store = Arc::new(connect(&snap).await?);
    let ctx = Ctx { store: store.clone(), holder: super::holder() };
    let applied = store.applied_manifest().await?;
    let before = applied.and_then(|a| crate::resolved::resolve_applied(&a.text, &snap.base));
    let changes = crate::resolved::diff(before.as_ref(), &snap.resolved).summary();
    store.record_manifest(&snap.sha256, &snap.text, &ctx.holder).await?;
    store.put_status("reload", &reload_doc(&snap, "start", &changes, None)).await?;

    let root = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (reload_tx, mut reload_rx) = mpsc::channel::<&'static str>(64);
    let (snap_tx, snap_rx) = watch::channel(snap.clone());
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(16);
    let listen = opts.listen.clone().unwrap_or_else(|| snap.manifest.server.listen.clone());
    let bound = server::Bound::bind(&listen, &snap).await?;
    let http = Http { listen: bound.addr.to_string(), scheme: bound.scheme() };
    let metrics =
        crate::metrics::install().inspect_err(|e| tracing::warn!(error = %e, "metrics are not recorded")).ok();
    let collector = server::collector::start(store.clone(), snap_rx.clone(), &tracker);
    let mut activation = super::activation::Activation::start(
        store.clone(),
        snap_rx.clone(),
        &snap,
        ctx.holder.clone(),
        &root,
        &tracker,
    );
    let state = server::AppState { store: store.clone(), snapshot: snap_rx, collector, metrics, control: control_tx };
    tracker.spawn(bound.serve(state, root.clone()));
    tracker.spawn(signals(root.clone(), reload_tx.clone()));
    tracker.spawn(heartbeat(ctx.clone(), opts.manifest.clone(), http, root.clone()));
    let mut watcher = Watcher::new(&opts.manifest, reload_tx.clone())?;
    watcher.follow(&snap)?;

    let mut running = apply(&ctx, &snap, IndexMap::new(), &root, &tracker);
    tracing::info!(manifest = %opts.manifest.display(), sha256 = %snap.sha256, syncs = running.len(), "cdp run started");
    loop {
        tokio::select! {
            _ = root.cancelled() => break,
            Some(c) = control_rx.recv() => match c {
                Control::Reload => { let _ = reload_tx.send("api").await; }
                Control::RunSync { name, reply } => {
                    let _ = reply.send(run_now(&ctx, &snap, &name, &root, &tracker).await);
                }
            },
            Some(why) = reload_rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while reload_rx.try_recv().is_ok() {}
                match Snapshot::load(&opts.manifest, &host).await {
                    Ok(new) if new.sha256 == snap.sha256 && plugin_files(&new) == plugin_files(&snap) => {
                        tracing::debug!(why, "manifest unchanged");
                    }
                    Ok(new) => {
                        let new = Arc::new(new);
                        let changes = reload_changes(&snap, &new);
                        if new.manifest.server != snap.manifest.server && opts.listen.is_none() {
                            warn_server_change(&snap, &new);
                        }
                        running = apply(&ctx, &new, running, &root, &tracker);
                        store.record_manifest(&new.sha256, &new.text, &ctx.holder).await?;
                        store.put_status("reload", &reload_doc(&new, why, &changes, None)).await?;
                        metrics::counter!(crate::metrics::RELOADS, "outcome" => "ok").increment(1);
                        tracing::info!(why, sha256 = %new.sha256, changes = %changes.join(" "), "manifest reloaded");
                        let _ = snap_tx.send(new.clone());
                        activation.apply(&new);
                        snap = new;
                        watcher.follow(&snap)?;
                    }
                    Err(e) => {
                        let errors = e.lines();
                        tracing::error!(why, "the changed manifest is invalid; the running one stays:\n{}", errors.join("\n"));
                        metrics::counter!(crate::metrics::RELOADS, "outcome" => "failed").increment(1);
                        store.put_status("reload", &reload_doc(&snap, why, &[], Some(errors))).await?;
                    }
                }
            }
        }
    }

    tracing::info!(drain_s = opts.drain.as_secs_f64(), "stopping: finishing in-flight batches");
    for r in running.values() {
        r.cancel.cancel();
    }
    tracker.close();
    if tokio::time::timeout(opts.drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            "some syncs did not finish within the drain deadline; what they had not committed is read again next time"
        );
    }
    let mut doc = store.status_doc("runtime").await?.map(|(d, _)| d).unwrap_or_else(|| json!({}));
    doc["stopped_at"] = json!(now_ms());
    store.put_status("runtime", &doc).await?;
    Ok(())
}

/// Where the HTTP server listens, for the heartbeat (`cdp status`).
#[derive(Debug, Clone)]
struct Http {
    listen: String,
    scheme: &'static str,
}

/// Starts source sync `name` now for the admin API, unless it is not a
/// plugin source or its lease is held (a run is going on).
async fn run_now(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    name: &str,
    root: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), RunRefused> {
    if !snap.syncs.contains_key(name) {
        return Err(RunRefused::Unknown(format!("`{name}` is not a plugin source in the running manifest")));
    }
    match ctx.store.lease_holder(&sync::lease_name(name)).await {
        Ok(Some(l)) => return Err(RunRefused::Busy(format!("sync `{name}` is running now (held by {})", l.holder))),
        Ok(None) => {}
        Err(e) => return Err(RunRefused::Busy(format!("cannot read the lease of sync `{name}`: {e}"))),
    }
    let (ctx, snap, name, cancel) = (ctx.clone(), snap.clone(), name.to_owned(), root.child_token());
    tracker.spawn(async move {
        if let Err(e) = sync::run(&ctx, &snap, &name, Trigger::Manual, false, &cancel).await {
            tracing::warn!(sync = name, error = %e, "sync requested through the admin API did not start");
        }
    });
    Ok(())
}

/// The listen address and TLS files are read once, at start.
fn warn_server_change(old: &Snapshot, new: &Snapshot) {
    let (a, b) = (&old.manifest.server, &new.manifest.server);
    if a.listen != b.listen || a.tls != b.tls {
        tracing::warn!(
            "`server.listen` or `server.tls` changed; they apply when `cdp run` restarts (tokens apply now)"
        );
    }
}

/// Opens the snapshot's store.
pub async fn connect(snap: &Snapshot) -> Result<Store> {
    let url = &snap.manifest.storage.url;
    if crate::manifest::env::is_reference(url) {
        bail!("storage.url needs an environment variable that is not set: {url}");
    }
    Store::connect(url, &snap.base).await.with_context(|| format!("cannot open the store at {url}"))
}

/// The digest of each plugin file `snap` runs, by its name under `plugins:`
/// (sources' and destinations' alike: a rebuilt file at an unpinned path
/// changes nothing in the manifest's text).
fn plugin_files(snap: &Snapshot) -> BTreeMap<&str, &str> {
    let sources = snap.syncs.iter().filter_map(|(name, sync)| {
        let plugin = snap.sources.get(name)?.plugin.as_ref()?;
        Some((plugin.as_str(), sync.plugin.sha256()))
    });
    let destinations = snap.sinks.values().map(|d| (d.target.def.plugin.as_str(), d.plugin.sha256()));
    sources.chain(destinations).collect()
}

/// What a reload from `old` to `new` changed, as `cdp plan` names it, with
/// `~plugins.NAME` for a plugin whose file alone changed.
fn reload_changes(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut changes = crate::resolved::diff(Some(&old.resolved), &new.resolved).summary();
    let before = plugin_files(old);
    for (name, sha) in plugin_files(new) {
        let entry = format!("~plugins.{name}");
        if before.get(name).is_some_and(|b| *b != sha) && !changes.contains(&entry) {
            changes.push(entry);
        }
    }
    changes
}

/// The `reload` status document: the manifest running, what the last
/// applied reload changed (`~audiences.vip`, as `cdp plan` lists it) and,
/// when the last attempt failed, its errors.
fn reload_doc(snap: &Snapshot, trigger: &str, changes: &[String], errors: Option<Vec<String>>) -> serde_json::Value {
    json!({
        "ok": errors.is_none(),
        "trigger": trigger,
        "at": now_ms(),
        "running_sha256": snap.sha256,
        "changes": changes,
        "errors": errors.unwrap_or_default(),
    })
}

/// Diffs `snap` against what runs: keeps unchanged syncs, cancels changed
/// and removed ones, starts changed and added ones after their predecessor.
fn apply(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    mut old: IndexMap<SourceName, Running>,
    root: &CancellationToken,
    tracker: &TaskTracker,
) -> IndexMap<SourceName, Running> {
    let mut out = IndexMap::new();
    for (name, sync) in &snap.syncs {
        let prev = match old.shift_remove(name) {
            Some(r) if r.fingerprint == sync.fingerprint => {
                out.insert(name.clone(), r);
                continue;
            }
            Some(r) => {
                tracing::info!(sync = %name, "sync changed; restarting it after its current batch");
                r.cancel.cancel();
                Some(r.handle)
            }
            None => None,
        };
        let cancel = root.child_token();
        let handle = tracker.spawn(sync_task(ctx.clone(), snap.clone(), name.clone(), cancel.clone(), prev));
        out.insert(name.clone(), Running { fingerprint: sync.fingerprint.clone(), cancel, handle });
    }
    for (name, r) in old {
        tracing::info!(sync = %name, "sync removed from the manifest; stopping it after its current batch");
        r.cancel.cancel();
    }
    out
}

/// One sync for as long as its manifest entry stays unchanged.
async fn sync_task(
    ctx: Ctx,
    snap: Arc<Snapshot>,
    name: SourceName,
    cancel: CancellationToken,
    prev: Option<JoinHandle<()>>,
) {
    if let Some(h) = prev {
        let _ = h.await;
    }
    let Some(sync) = snap.syncs.get(name.as_str()) else { return };
    if sync.streaming {
        streaming(&ctx, &snap, &name, &cancel).await;
    } else if let Some(schedule) = &sync.schedule {
        scheduled(&ctx, &snap, &name, schedule, &cancel).await;
    } else {
        tracing::info!(sync = %name, "no schedule: runs only with `cdp sync {name}`");
    }
}

async fn scheduled(
    ctx: &Ctx,
    snap: &Snapshot,
    name: &str,
    schedule: &crate::schedule::Schedule,
    cancel: &CancellationToken,
) {
    let last = match ctx.store.runs(name, 1).await {
        Ok(runs) => runs.first().map(|r| r.started_at),
        Err(e) => {
            tracing::warn!(sync = name, error = %e, "cannot read the run history; treating the sync as never run");
            None
        }
    };
    let mut due = schedule.missed(last, now_ms());
    loop {
        let trigger = if due {
            due = false;
            Trigger::Startup
        } else {
            let Some(next) = schedule.next_after(now_ms()) else {
                tracing::info!(sync = name, schedule = schedule.text(), "the schedule never fires again");
                return;
            };
            let wait = Duration::from_millis(u64::try_from(next - now_ms()).unwrap_or(0));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return,
            }
            Trigger::Schedule
        };
        match sync::run(ctx, snap, name, trigger, false, cancel).await {
            Ok(_) => {}
            Err(SyncError::Busy { holder, .. }) => tracing::debug!(sync = name, holder, "running elsewhere; skipped"),
            Err(e) => tracing::warn!(sync = name, error = %e, "sync could not start"),
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}

async fn streaming(ctx: &Ctx, snap: &Snapshot, name: &str, cancel: &CancellationToken) {
    let mut backoff = RESTART_MIN;
    while !cancel.is_cancelled() {
        let wait = match sync::run(ctx, snap, name, Trigger::Streaming, false, cancel).await {
            Ok(o) if o.error.is_none() => {
                backoff = RESTART_MIN;
                RESTART_MIN
            }
            Ok(_) => grow(&mut backoff),
            Err(SyncError::Busy { .. }) => Duration::from_secs(5),
            Err(e) => {
                tracing::warn!(sync = name, error = %e, "streaming sync could not start");
                grow(&mut backoff)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// The current backoff; doubles it for next time, up to [`RESTART_MAX`].
fn grow(backoff: &mut Duration) -> Duration {
    let now = *backoff;
    *backoff = (now * 2).min(RESTART_MAX);
    now
}

/// SIGINT/SIGTERM stop the runtime; SIGHUP reloads the manifest.
async fn signals(root: CancellationToken, reload: mpsc::Sender<&'static str>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => { let _ = reload.send("SIGHUP").await; }
            _ = root.cancelled() => return,
        }
    }
    tracing::info!("shutdown requested");
    root.cancel();
}

/// Writes the `runtime` status document every [`HEARTBEAT`].
async fn heartbeat(ctx: Ctx, manifest: PathBuf, http: Http, root: CancellationToken) {
    let started = now_ms();
    loop {
        let doc = json!({
            "holder": ctx.holder, "pid": std::process::id(), "started_at": started,
            "manifest": manifest.display().to_string(), "listen": http.listen, "scheme": http.scheme,
        });
        if let Err(e) = ctx.store.put_status("runtime", &doc).await {
            tracing::warn!(error = %e, "cannot write the heartbeat");
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = root.cancelled() => return,
        }
    }
}

/// Watches the manifest's directory (editors save by writing a new file
/// and renaming it over the old one) and the directories of the plugins it
/// pins, and asks for a reload when one of those files changes.
struct Watcher {
    inner: notify::RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    files: Arc<std::sync::Mutex<HashSet<PathBuf>>>,
    manifest: PathBuf,
}

impl Watcher {
    fn new(manifest: &Path, reload: mpsc::Sender<&'static str>) -> Result<Watcher> {
        let manifest = absolute(manifest);
        let files = Arc::new(std::sync::Mutex::new(HashSet::from([manifest.clone()])));
        let watched = files.clone();
        let inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let hit = watched.lock().map(|f| event.paths.iter().any(|p| f.contains(&absolute(p)))).unwrap_or(false);
            if hit {
                let _ = reload.try_send("file");
            }
        })
        .context("cannot watch the manifest for changes")?;
        Ok(Watcher { inner, dirs: HashSet::new(), files, manifest })
    }

    /// Watches the manifest and the plugin files `snap` pins.
    fn follow(&mut self, snap: &Snapshot) -> Result<()> {
        use notify::Watcher as _;
        let mut files = HashSet::from([self.manifest.clone()]);
        for p in snap.manifest.plugins.values() {
            files.insert(absolute(&snap.base.join(&p.path)));
        }
        for f in &files {
            if let Some(dir) = f.parent()
                && self.dirs.insert(dir.to_path_buf())
            {
                self.inner
                    .watch(dir, notify::RecursiveMode::NonRecursive)
                    .with_context(|| format!("cannot watch {}", dir.display()))?;
            }
        }
        if let Ok(mut f) = self.files.lock() {
            *f = files;
        }
        Ok(())
    }
}

/// `path` made absolute and free of `.` parts (without touching the file,
/// which may be mid-rename).
fn absolute(path: &Path) -> PathBuf {
    let p =
        if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
version: 1
name: t
storage: { url: "sqlite://t.db" }
identity:
  keys:
    email: { normalize: email }
consent:
  purposes: [advertising]
plugins:
  file: { path: plugins/dest.wasm }
destinations:
  list:
    plugin: file
    purpose: advertising
    fields: [email]
    config: { path: /output/list.csv, format: csv }
    mount: { "out": /output }
"#;

    /// A destination plugin rebuilt at an unpinned path is a change: the
    /// reload is applied (its worker restarts on the new file) and named.
    #[tokio::test]
    async fn a_rebuilt_destination_plugin_is_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("plugins")).expect("plugins dir");
        std::fs::create_dir_all(dir.path().join("out")).expect("out dir");
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist/dest_file.wasm");
        let mut wasm = std::fs::read(&built).expect("plugins/dist/dest_file.wasm (plugins/build.sh builds it)");
        let file = dir.path().join("plugins/dest.wasm");
        std::fs::write(&file, &wasm).expect("write plugin");
        std::fs::write(dir.path().join("cdp.yaml"), MANIFEST).expect("write manifest");
        let host = Host::new(Some(dir.path().join("cache"))).expect("host");
        let before = Snapshot::load(&dir.path().join("cdp.yaml"), &host).await.expect("loads");
        // The same component with a custom section more: another file, the same code.
        wasm.extend_from_slice(&[0, 5, 4, b'n', b'o', b't', b'e']);
        std::fs::write(&file, &wasm).expect("rewrite plugin");
        let after = Snapshot::load(&dir.path().join("cdp.yaml"), &host).await.expect("loads again");
        assert_eq!(before.sha256, after.sha256, "the manifest's text is the same");
        assert_ne!(plugin_files(&before), plugin_files(&after));
        assert_eq!(reload_changes(&before, &after), vec!["~plugins.file"]);
        assert_eq!(reload_changes(&after, &after), Vec::<String>::new());
    }
}
