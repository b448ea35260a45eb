//! Activation in `cdp run`: one evaluator that turns profile changes into
//! audience membership and destination records, and one delivery worker per
//! destination that sends them.
//!
//! The evaluator follows the outbox (every committed ingest transaction's
//! changed profiles) and evaluates those profiles ([`crate::activation`]);
//! it runs a full pass instead when an audience's rule or a destination's
//! definition changed, an operator resumed a paused destination, a
//! `refresh:` schedule is due, or a rule that reads the clock has not been
//! swept for an hour. Only one process evaluates at a time (the store's
//! `activation` lease); every process delivers, sharing the queue.
//!
//! A delivery worker claims due records of its destination in batches of
//! `batch.max_records` (waiting up to `batch.max_wait` for a batch to fill),
//! paced by `rate_limit`, checks consent again at send time, and hands them
//! to the destination plugin. Refused records go to the dead-letter store;
//! a failed call is retried with backoff until `retry.max_attempts`, then
//! dead-lettered. A failing destination holds up only its own records.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use indexmap::IndexMap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::snapshot::{DestinationSync, Snapshot};
use crate::activation::delivery::{Bucket, guard_trips};
use crate::activation::{self, Dependencies, Held, Op, Outgoing, ProfileState, Target};
use crate::manifest::Manifest;
use crate::manifest::names::DestinationName;
use crate::plugin::{DestinationInstance, PluginError};
use crate::resolved::Resolved;
use crate::schedule::Schedule;
use crate::store::activation::{ActivationWrite, Delivery, Settle};
use crate::store::{Store, now_ms};

/// The outbox reader and lease name of the evaluator.
const READER: &str = "activation";
const LEASE_TTL: Duration = Duration::from_secs(30);
/// How often the evaluator looks for full passes to run.
const DUE_EVERY: Duration = Duration::from_secs(1);
/// How often an idle evaluator or worker looks for work.
const POLL: Duration = Duration::from_millis(20);
/// Profiles per evaluation transaction.
const PAGE: usize = 500;
/// Outbox entries read per step.
const ENTRIES: usize = 256;
/// Rules that read the clock are re-evaluated in full this often.
const CLOCK_SWEEP: i64 = 3_600_000;
/// How long a claim on a delivery lasts (longer than any plugin call).
const CLAIM_TTL: Duration = Duration::from_secs(180);
/// `cdp_meta` name of the time every profile's computed traits were last evaluated.
const SWEPT: &str = "computed_swept_at";
/// Finished deliveries kept per destination (dead letters are all kept).
const KEEP_FINISHED: i64 = 10_000;

/// The activation tasks of one `cdp run`.
pub struct Activation {
    store: Arc<Store>,
    holder: String,
    root: CancellationToken,
    tracker: TaskTracker,
    workers: IndexMap<DestinationName, (String, CancellationToken)>,
}

impl Activation {
    /// Starts the evaluator (which follows `snap_rx`) and a worker per destination of `snap`.
    pub fn start(
        store: Arc<Store>,
        snap_rx: watch::Receiver<Arc<Snapshot>>,
        snap: &Arc<Snapshot>,
        holder: String,
        root: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Activation {
        tracker.spawn(evaluate(store.clone(), snap_rx.clone(), holder.clone(), root.clone()));
        tracker.spawn(propagate_erasures(store.clone(), snap_rx, root.clone()));
        let mut a =
            Activation { store, holder, root: root.clone(), tracker: tracker.clone(), workers: IndexMap::new() };
        a.apply(snap);
        a
    }

    /// Starts, restarts and stops delivery workers to match `snap`: a
    /// destination whose plugin, config or delivery settings changed gets a
    /// new worker (the old one finishes the batch it is sending).
    pub fn apply(&mut self, snap: &Arc<Snapshot>) {
        let mut next = IndexMap::new();
        for (name, d) in &snap.sinks {
            let fp = worker_fingerprint(d);
            match self.workers.shift_remove(name) {
                Some((old, cancel)) if old == fp => {
                    next.insert(name.clone(), (old, cancel));
                }
                old => {
                    if let Some((_, cancel)) = old {
                        cancel.cancel();
                    }
                    let cancel = self.root.child_token();
                    let w = Worker {
                        store: self.store.clone(),
                        snap: snap.clone(),
                        name: name.clone(),
                        holder: self.holder.clone(),
                        cancel: cancel.clone(),
                    };
                    self.tracker.spawn(w.run());
                    next.insert(name.clone(), (fp, cancel));
                }
            }
        }
        for (_, (_, cancel)) in self.workers.drain(..) {
            cancel.cancel();
        }
        self.workers = next;
    }
}

fn worker_fingerprint(d: &DestinationSync) -> String {
    let t = &d.target;
    format!(
        "{}|{}|{}|{:?}|{:?}|{:?}|{:?}|{}",
        d.plugin.sha256(),
        d.config,
        t.fingerprint,
        t.rate,
        t.retry,
        t.max_records,
        t.max_wait,
        serde_json::to_string(&(&t.def.allow_hosts, &t.def.mount)).unwrap_or_default()
    )
}

/// Sleeps `d` unless cancelled first; `false` when cancelled.
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The evaluator: holds the `activation` lease and evaluates until cancelled.
async fn evaluate(
    store: Arc<Store>,
    snap_rx: watch::Receiver<Arc<Snapshot>>,
    holder: String,
    cancel: CancellationToken,
) {
    let mut lease = None;
    let mut renewed = 0;
    let mut failures = 0u32;
    let mut ev: Option<Evaluator> = None;
    while !cancel.is_cancelled() {
        let now = now_ms();
        let held = match lease.take() {
            None => store.try_acquire_lease(READER, &holder, LEASE_TTL).await,
            Some(l) if now - renewed > (LEASE_TTL.as_millis() / 3) as i64 => store.renew_lease(&l, LEASE_TTL).await,
            Some(l) => Ok(Some(l)),
        };
        match held {
            Ok(Some(l)) => {
                if now - renewed > (LEASE_TTL.as_millis() / 3) as i64 {
                    renewed = now;
                }
                lease = Some(l);
            }
            Ok(None) => {
                // Another process evaluates.
                if !pause(&cancel, Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "activation: cannot take the evaluation lease");
                if !pause(&cancel, Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        }
        let snap = snap_rx.borrow().clone();
        if ev.as_ref().is_none_or(|e| e.sha256 != snap.sha256) {
            ev = Some(Evaluator::of(&snap));
        }
        let Some(e) = ev.as_mut() else { continue };
        e.lease = lease.take();
        let stepped = e.step(&store).await;
        lease = e.lease.take();
        match stepped {
            Ok(true) => failures = 0,
            Ok(false) => {
                failures = 0;
                if !pause(&cancel, POLL).await {
                    break;
                }
            }
            Err(err) => {
                failures += 1;
                let wait = Duration::from_millis(250 << failures.min(7));
                tracing::error!(error = %err, retry_in_ms = wait.as_millis() as u64, "activation: evaluation failed");
                if !pause(&cancel, wait).await {
                    break;
                }
            }
        }
    }
    if let Some(l) = lease {
        let _ = store.release_lease(&l).await;
    }
}

/// Evaluates audiences and plans deliveries for one manifest, resolved once.
pub struct Evaluator {
    m: Arc<Manifest>,
    model: crate::profile::Model,
    targets: Vec<Target>,
    sha256: String,
    /// The fingerprint of the computed traits' definitions.
    computed_spec: String,
    /// When [`Evaluator::due`] last looked for full passes to run.
    checked_at: Option<std::time::Instant>,
    /// The `activation` lease, renewed page by page during a full pass.
    lease: Option<crate::store::lease::Lease>,
    deps: Dependencies,
    /// Audiences evaluated when their profiles change (no `refresh:`).
    realtime: Vec<String>,
    /// Audiences with a `refresh:` schedule.
    scheduled: Vec<(String, Schedule)>,
}

/// What a full pass covers.
#[derive(Debug, Default)]
struct Scope {
    audiences: BTreeSet<String>,
    targets: BTreeSet<String>,
    /// Targets reconciled without the shrink guard (an operator resumed them).
    forced: BTreeSet<String>,
    /// Every profile's computed traits are re-evaluated (windows slide with time).
    computed: bool,
}

impl Evaluator {
    fn of(snap: &Snapshot) -> Evaluator {
        let targets = snap.sinks.values().map(|d| d.target.clone()).collect();
        Evaluator::new(&snap.resolved, targets)
    }

    /// An evaluator of the resolved manifest `r` delivering to `targets`.
    pub fn new(r: &Resolved, targets: Vec<Target>) -> Evaluator {
        let m = r.manifest.clone();
        let model = r.model.clone();
        let deps = Dependencies::new(&m, &model);
        let mut realtime = Vec::new();
        let mut scheduled = Vec::new();
        for (name, a) in &r.audiences {
            match &a.refresh {
                Some(s) => scheduled.push((name.to_string(), s.clone())),
                None => realtime.push(name.to_string()),
            }
        }
        let sha256 = &r.sha256;
        let computed_spec = crate::profile::computed::fingerprint(&m);
        Evaluator {
            m,
            model,
            targets,
            sha256: sha256.to_owned(),
            computed_spec,
            checked_at: None,
            lease: None,
            deps,
            realtime,
            scheduled,
        }
    }

    fn targets(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }

    /// One unit of work: a full pass when one is due, else the next outbox
    /// entries. `false` when there was nothing to do.
    pub async fn step(&mut self, store: &Store) -> Result<bool> {
        // Full passes are looked for once a second (and at once for a new manifest).
        if self.checked_at.is_none_or(|t| t.elapsed() >= DUE_EVERY) {
            self.checked_at = Some(std::time::Instant::now());
            let scope = self.due(store).await?;
            if !scope.audiences.is_empty() || !scope.targets.is_empty() || scope.computed {
                self.full_pass(store, scope).await?;
                return Ok(true);
            }
        }
        self.follow(store).await
    }

    /// Renews the lease this evaluator holds, if it holds one.
    async fn renew(&mut self, store: &Store) -> Result<()> {
        if let Some(l) = &self.lease {
            match store.renew_lease(l, LEASE_TTL).await? {
                Some(renewed) => self.lease = Some(renewed),
                None => anyhow::bail!("the activation lease was lost during a full evaluation"),
            }
        }
        Ok(())
    }

    /// Which audiences and destinations need a full pass now.
    async fn due(&self, store: &Store) -> Result<Scope> {
        let m = &self.m;
        let now = now_ms();
        let states = store.audience_states().await?;
        let dstates = store.destination_states().await?;
        let mut scope = Scope::default();
        for (name, a) in &m.audiences {
            let due = match states.get(name) {
                None => true,
                Some(s) if s.rule != a.rule => true,
                Some(s) => match self.scheduled.iter().find(|(n, _)| n == name) {
                    Some((_, sched)) => sched.next_after(s.full_at).is_some_and(|t| t <= now),
                    None => self.deps.clocked(name) && now - s.full_at >= CLOCK_SWEEP,
                },
            };
            if due {
                scope.audiences.insert(name.clone());
            }
        }
        if !m.model.computed.is_empty() {
            // `AT SPEC`: when, and under which definitions, every profile was evaluated.
            let swept = store.meta(SWEPT).await?;
            let (at, spec) = swept.as_deref().and_then(|v| v.split_once(' ')).unwrap_or(("", ""));
            let windowed = m.model.computed.values().any(|c| c.within.is_some());
            scope.computed =
                spec != self.computed_spec || at.parse::<i64>().map_or(true, |at| windowed && now - at >= CLOCK_SWEEP);
        }
        for t in self.targets() {
            match dstates.get(&t.name) {
                Some(s) if s.reconcile => {
                    scope.targets.insert(t.name.clone());
                    scope.forced.insert(t.name.clone());
                }
                Some(s) if s.fingerprint == t.fingerprint => {}
                _ => {
                    scope.targets.insert(t.name.clone());
                }
            }
        }
        Ok(scope)
    }

    /// Evaluates the profiles of the next outbox entries.
    async fn follow(&mut self, store: &Store) -> Result<bool> {
        let entries = store.outbox_read(READER, ENTRIES).await?;
        let Some(last) = entries.last() else { return Ok(false) };
        let (last_seq, origin_at) = (last.seq, last.at);
        let mut changed: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for e in &entries {
            for (p, fields) in &e.changes {
                let f = changed.entry(*p).or_default();
                for x in fields {
                    if !f.contains(x) {
                        f.push(x.clone());
                    }
                }
            }
        }
        let paused = paused(store).await?;
        let profiles: Vec<i64> = changed.keys().copied().collect();
        let pages: Vec<&[i64]> = profiles.chunks(PAGE).collect();
        let origin = format!("outbox:{last_seq}");
        let realtime: Vec<&String> = self.realtime.iter().collect();
        for (i, page) in pages.iter().enumerate() {
            let states = load(store, &self.m, &self.model, page).await?;
            let stored = store.activation_stored(page).await?;
            let mut w =
                ActivationWrite { origin_at, computed_spec: self.computed_spec.clone(), ..ActivationWrite::default() };
            for s in &states {
                let before = stored.audiences.get(&s.profile).cloned().unwrap_or_default();
                let mut after = before.clone();
                let fields = &changed[&s.profile];
                for a in self.m.audiences.keys() {
                    let evaluate = realtime.contains(&a) && self.deps.touches(a, fields);
                    if !s.live || (evaluate && !s.audiences.contains(a)) {
                        after.remove(a);
                    } else if evaluate {
                        after.insert(a.clone());
                    }
                }
                self.emit(s, &before, &after, &stored.held, &paused, None, &origin, &mut w);
                w.computed.push((s.profile, self.computed_of(s)));
            }
            if i + 1 == pages.len() {
                w.outbox = Some(last_seq);
            }
            store.apply_activation(&w).await?;
            count_changes(&w);
        }
        if pages.is_empty() {
            store.apply_activation(&ActivationWrite { outbox: Some(last_seq), ..ActivationWrite::default() }).await?;
        }
        Ok(true)
    }

    /// Membership changes of one profile (`before` → `after`) and the
    /// records for every destination (`only`: just these), into `w`.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        s: &ProfileState,
        before: &BTreeSet<String>,
        after: &BTreeSet<String>,
        held: &HashMap<(String, i64), Held>,
        paused: &HashSet<String>,
        only: Option<&BTreeSet<String>>,
        origin: &str,
        w: &mut ActivationWrite,
    ) {
        let m = &self.m;
        for (a, entered) in activation::audience_diff(m.audiences.keys(), before, after) {
            w.audience_changes.push((a, s.profile, entered));
        }
        for t in self.targets() {
            if paused.contains(&t.name) || only.is_some_and(|o| !o.contains(&t.name)) {
                continue;
            }
            let in_audience = match &t.def.audience {
                Some(a) => after.contains(a),
                None => s.live,
            };
            let h = held.get(&(t.name.clone(), s.profile));
            if let Some(o) = activation::plan(m, t, s, in_audience, h, w.origin_at) {
                let key = activation::idempotency_key(&o, origin);
                w.outgoing.push((o, key));
            }
        }
    }

    /// The profile's computed traits as stored values (none for a profile that is gone).
    fn computed_of(&self, s: &ProfileState) -> Vec<(String, String)> {
        if !s.live {
            return Vec::new();
        }
        self.m.model.computed.keys().filter_map(|n| s.values.get(n).map(|v| (n.clone(), v.to_string()))).collect()
    }

    /// Re-evaluates `scope`'s audiences for every profile and reconciles
    /// its destinations (and those of its audiences) with what they hold.
    async fn full_pass(&mut self, store: &Store, scope: Scope) -> Result<()> {
        let m = self.m.clone();
        let now = now_ms();
        let paused = paused(store).await?;
        let mut targets: BTreeSet<String> = scope.targets.clone();
        for t in self.targets() {
            if t.def.audience.as_ref().is_some_and(|a| scope.audiences.contains(a))
                && (!paused.contains(&t.name) || scope.forced.contains(&t.name))
            {
                targets.insert(t.name.clone());
            }
        }
        let skip: HashSet<String> =
            paused.iter().filter(|p| !scope.forced.contains(*p) && !scope.targets.contains(*p)).cloned().collect();
        let guarded: HashMap<String, f64> = self
            .targets()
            .filter(|t| targets.contains(&t.name) && !scope.forced.contains(&t.name))
            .filter_map(|t| t.guard.map(|g| (t.name.clone(), g)))
            .collect();
        tracing::info!(
            audiences = ?scope.audiences, destinations = ?targets, "activation: full evaluation"
        );
        let mut profiles: BTreeSet<i64> = store.live_profiles().await?.into_iter().collect();
        for a in &scope.audiences {
            profiles.extend(store.audience_member_ids(a).await?);
        }
        let mut sizes: HashMap<String, usize> = HashMap::new();
        for t in &targets {
            let held = store.destination_held(t).await?;
            sizes.insert(t.clone(), held.len());
            profiles.extend(held.into_keys());
        }
        let profiles: Vec<i64> = profiles.into_iter().collect();
        let origin = format!("full:{now}");
        let mut buffered: HashMap<String, Vec<(Outgoing, String)>> = HashMap::new();
        let started = std::time::Instant::now();
        for page in profiles.chunks(PAGE) {
            self.renew(store).await?;
            let states = load(store, &self.m, &self.model, page).await?;
            let stored = store.activation_stored(page).await?;
            let mut w = ActivationWrite {
                origin_at: now,
                computed_spec: self.computed_spec.clone(),
                ..ActivationWrite::default()
            };
            for s in &states {
                let before = stored.audiences.get(&s.profile).cloned().unwrap_or_default();
                let mut after = before.clone();
                for a in &scope.audiences {
                    if s.live && s.audiences.contains(a) {
                        after.insert(a.clone());
                    } else {
                        after.remove(a);
                    }
                }
                self.emit(s, &before, &after, &stored.held, &skip, Some(&targets), &origin, &mut w);
                w.computed.push((s.profile, self.computed_of(s)));
            }
            let (keep, hold): (Vec<_>, Vec<_>) =
                w.outgoing.drain(..).partition(|(o, _)| !guarded.contains_key(&o.destination));
            w.outgoing = keep;
            for (o, k) in hold {
                buffered.entry(o.destination.clone()).or_default().push((o, k));
            }
            store.apply_activation(&w).await?;
            count_changes(&w);
        }
        let mut last =
            ActivationWrite { origin_at: now, computed_spec: self.computed_spec.clone(), ..ActivationWrite::default() };
        for t in self.targets() {
            if !targets.contains(&t.name) {
                continue;
            }
            let records = buffered.remove(&t.name).unwrap_or_default();
            let exits = records.iter().filter(|(o, _)| o.op == Op::Exit).count();
            let reason = guarded.get(&t.name).and_then(|g| guard_trips(*g, sizes[&t.name], exits));
            match reason {
                Some(reason) => {
                    tracing::warn!(destination = %t.name, "{reason}");
                    last.paused.push((t.name.clone(), t.fingerprint.clone(), reason));
                }
                None => {
                    last.outgoing.extend(records);
                    last.reconciled.push((t.name.clone(), t.fingerprint.clone()));
                }
            }
        }
        for a in &scope.audiences {
            last.evaluated.push((a.clone(), m.audiences[a].rule.clone(), true));
        }
        store.apply_activation(&last).await?;
        if scope.computed {
            store.set_meta(SWEPT, &format!("{now} {}", self.computed_spec)).await?;
        }
        tracing::info!(
            profiles = profiles.len(),
            seconds = started.elapsed().as_secs_f64(),
            "activation: full evaluation done"
        );
        Ok(())
    }
}

fn count_changes(w: &ActivationWrite) {
    for (a, _, entered) in &w.audience_changes {
        let change = if *entered { "entered" } else { "exited" };
        metrics::counter!(crate::metrics::AUDIENCE_CHANGES, "audience" => a.clone(), "change" => change).increment(1);
    }
}

async fn paused(store: &Store) -> Result<HashSet<String>> {
    Ok(store.destination_states().await?.into_values().filter(|s| s.paused).map(|s| s.destination).collect())
}

/// The state of each of `profiles` now.
async fn load(
    store: &Store,
    m: &Manifest,
    model: &crate::profile::Model,
    profiles: &[i64],
) -> Result<Vec<ProfileState>> {
    let now = now_ms();
    let suppressed = store.suppressed_profiles(profiles).await?;
    let rows = store.profile_rows_many(profiles).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut s = activation::state_of(m, model, r, now);
            s.suppressed = suppressed.contains(&s.profile);
            s
        })
        .collect())
}

/// One destination's delivery worker.
struct Worker {
    store: Arc<Store>,
    snap: Arc<Snapshot>,
    name: DestinationName,
    holder: String,
    cancel: CancellationToken,
}

impl Worker {
    async fn run(self) {
        let Some(d) = self.snap.sinks.get(self.name.as_str()).cloned() else { return };
        let t = d.target.clone();
        let mut instance: Option<DestinationInstance> = None;
        let mut bucket = t.rate.map(|r| Bucket::new(r, now_ms()));
        let mut rng = crate::rng::Rng::new(now_ms() as u64 ^ u64::from(std::process::id()));
        let mut settled = 0u64;
        let mut failures = 0u32;
        let mut gauges_at = 0;
        while !self.cancel.is_cancelled() {
            let now = now_ms();
            if now - gauges_at > 1000 {
                gauges_at = now;
                self.gauges().await;
            }
            let wait = match self.store.due_deliveries(&self.name).await {
                Ok((_, 0)) => Some(POLL),
                Ok((Some(oldest), n)) if (n as usize) < t.max_records => {
                    let full_at = oldest + t.max_wait.as_millis() as i64;
                    (full_at > now).then(|| POLL.min(Duration::from_millis((full_at - now) as u64)))
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(destination = %self.name, error = %e, "delivery: cannot read the queue");
                    Some(Duration::from_secs(1))
                }
            };
            if let Some(w) = wait {
                if !pause(&self.cancel, w).await {
                    break;
                }
                continue;
            }
            let mut n = t.max_records;
            if let Some(b) = bucket.as_mut() {
                let k = b.take(n, now);
                if k == 0 {
                    let w = b.wait(now);
                    if !pause(&self.cancel, w).await {
                        break;
                    }
                    continue;
                }
                n = k;
            }
            let claimed = match self.store.claim_deliveries(&self.name, &self.holder, n, CLAIM_TTL).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(destination = %self.name, error = %e, "delivery: cannot claim records");
                    if !pause(&self.cancel, Duration::from_secs(1)).await {
                        break;
                    }
                    continue;
                }
            };
            if claimed.is_empty() {
                if !pause(&self.cancel, POLL).await {
                    break;
                }
                continue;
            }
            let outcomes = self.send(&d, &mut instance, claimed, &mut rng).await;
            let count = outcomes.len() as u64;
            match self.store.settle_deliveries(&self.holder, &outcomes).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    // The claims run out and the records are sent again
                    // with the same keys.
                    failures += 1;
                    tracing::error!(destination = %self.name, error = %e, "delivery: cannot record outcomes");
                    if !pause(&self.cancel, Duration::from_millis(250 << failures.min(7))).await {
                        break;
                    }
                }
            }
            settled += count;
            if settled >= 1000 {
                settled = 0;
                if let Err(e) = self.store.prune_deliveries(&self.name, KEEP_FINISHED).await {
                    tracing::warn!(destination = %self.name, error = %e, "delivery: cannot prune finished records");
                }
            }
        }
        if let Some(mut i) = instance {
            let _ = i.close().await;
        }
    }

    async fn gauges(&self) {
        if let Ok(counts) = self.store.delivery_counts().await {
            let of = |state: &str| {
                counts
                    .iter()
                    .filter(|(d, s, _)| d.as_str() == self.name.as_str() && s == state)
                    .map(|c| c.2)
                    .sum::<i64>() as f64
            };
            metrics::gauge!(crate::metrics::DELIVERY_QUEUE, "destination" => self.name.to_string())
                .set(of("ready") + of("running"));
            metrics::gauge!(crate::metrics::DEAD_LETTERS, "destination" => self.name.to_string()).set(of("dead"));
        }
    }

    /// Sends one claimed batch and says how each record ended.
    async fn send(
        &self,
        d: &DestinationSync,
        instance: &mut Option<DestinationInstance>,
        claimed: Vec<Delivery>,
        rng: &mut crate::rng::Rng,
    ) -> Vec<(i64, Settle)> {
        let t = &d.target;
        let (mut out, sending) = match self.screen(t, &claimed).await {
            Ok(x) => x,
            Err(e) => return retry_all(t, &claimed, &e, None, rng),
        };
        if !sending.is_empty() {
            let result = self.write(d, instance, &sending).await;
            if let Err(e) = &result
                && (instance.as_ref().is_none_or(DestinationInstance::is_poisoned) || !e.retryable())
            {
                *instance = None;
            }
            out.extend(self.outcomes(t, &sending, result, rng));
        }
        for (_, s) in &out {
            metrics::counter!(crate::metrics::DELIVERIES, "destination" => self.name.to_string(), "outcome" => s.outcome())
                .increment(1);
        }
        out
    }

    /// Settles what must not be sent now — records a later one replaced,
    /// adds for people merged away, erased, suppressed or without consent —
    /// and returns the rest to send. `Err` when the store cannot say.
    async fn screen<'c>(
        &self,
        t: &Target,
        claimed: &'c [Delivery],
    ) -> Result<(Vec<(i64, Settle)>, Vec<&'c Delivery>), String> {
        let m = &self.snap.manifest;
        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        let superseded: HashSet<i64> =
            self.store.superseded(&ids).await.map_err(|e| format!("cannot read the queue: {e}"))?.into_iter().collect();
        let adds: Vec<i64> = claimed.iter().filter(|c| c.op != Op::Exit.as_str()).map(|c| c.profile).collect();
        let (ledger, live) = self.store.consent_now(&adds).await.map_err(|e| format!("cannot read consent: {e}"))?;
        let suppressed =
            self.store.suppressed_profiles(&adds).await.map_err(|e| format!("cannot read suppressions: {e}"))?;
        let (expiry, now) = (self.snap.model.consent_expiry(), now_ms());
        let mut out = Vec::new();
        let mut sending = Vec::new();
        for c in claimed {
            if superseded.contains(&c.id) {
                out.push((c.id, Settle::Superseded));
                continue;
            }
            if c.op != Op::Exit.as_str() {
                let person = crate::activation::delivery::Person {
                    live: live.contains(&c.profile),
                    suppressed: suppressed.contains(&c.profile),
                    ledger: ledger.get(&c.profile).map(Vec::as_slice).unwrap_or_default(),
                };
                if let Some(why) = crate::activation::delivery::refusal(m, expiry, &t.def.purpose, &person, now) {
                    out.push((c.id, Settle::Suppressed(why)));
                    continue;
                }
            }
            sending.push(c);
        }
        Ok((out, sending))
    }

    /// How each sent record ended, from the plugin's answer.
    fn outcomes(
        &self,
        t: &Target,
        sending: &[&Delivery],
        result: Result<crate::plugin::WriteAck, PluginError>,
        rng: &mut crate::rng::Rng,
    ) -> Vec<(i64, Settle)> {
        match result {
            Ok(ack) => {
                let rejected: HashMap<u32, &crate::plugin::ConnectorError> =
                    ack.rejected.iter().map(|(i, e)| (*i, e)).collect();
                sending
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let settle = match rejected.get(&(i as u32)) {
                            None => {
                                metrics::histogram!(crate::metrics::DELIVERY_LATENCY, "destination" => self.name.to_string())
                                    .record((now_ms() - c.origin_at).max(0) as f64 / 1e3);
                                Settle::Delivered
                            }
                            Some(e) => {
                                let msg = format!("refused by the destination: {}: {}", e.code, e.message);
                                let after = e.retry_after_ms.map(Duration::from_millis);
                                if e.retryable { retry_one(t, c, &msg, after, rng) } else { Settle::Dead(msg) }
                            }
                        };
                        (c.id, settle)
                    })
                    .collect()
            }
            Err(e) => {
                // A crash or a host limit may not recur with a fresh instance.
                let retryable = e.retryable()
                    || matches!(
                        e,
                        PluginError::Trap { .. }
                            | PluginError::Poisoned { .. }
                            | PluginError::Limit { .. }
                            | PluginError::Memory { .. }
                            | PluginError::Instantiate { .. }
                    );
                let after = e.connector().and_then(|c| c.retry_after_ms).map(Duration::from_millis);
                tracing::warn!(destination = %self.name, records = sending.len(), error = %e, "delivery failed");
                sending
                    .iter()
                    .map(|c| {
                        let settle = if retryable {
                            retry_one(t, c, &e.to_string(), after, rng)
                        } else {
                            Settle::Dead(e.to_string())
                        };
                        (c.id, settle)
                    })
                    .collect()
            }
        }
    }

    /// Writes and flushes one batch, opening the plugin instance when needed.
    /// For `sync: mirror` with a plugin that deletes, the people the batch
    /// removes are then deleted too; a refused delete refuses its record.
    async fn write(
        &self,
        d: &DestinationSync,
        instance: &mut Option<DestinationInstance>,
        sending: &[&Delivery],
    ) -> Result<crate::plugin::WriteAck, PluginError> {
        if instance.as_ref().is_none_or(DestinationInstance::is_poisoned) {
            let mut i = d.plugin.destination(&self.name, &d.grants).await?;
            i.open(&d.config).await?;
            *instance = Some(i);
        }
        let Some(i) = instance.as_mut() else {
            return Err(PluginError::NotOpen { entry: self.name.to_string(), call: "write", what: "writer" });
        };
        let mut ndjson = String::new();
        for c in sending {
            ndjson.push_str(&c.record);
            ndjson.push('\n');
        }
        let mut ack = i.write(ndjson, sending.len() as u32).await?;
        i.flush().await?;
        if d.target.mode == crate::manifest::SyncMode::Mirror && d.deletes {
            let refused: HashSet<u32> = ack.rejected.iter().map(|(i, _)| *i).collect();
            let exits: Vec<(u32, &Delivery)> = sending
                .iter()
                .enumerate()
                .map(|(i, c)| (i as u32, *c))
                .filter(|(i, c)| c.op == Op::Exit.as_str() && !refused.contains(i))
                .collect();
            if !exits.is_empty() {
                let mut lines = String::new();
                for (_, c) in &exits {
                    let r: serde_json::Value = serde_json::from_str(&c.record).unwrap_or_default();
                    let line =
                        serde_json::json!({"key": c.key, "profile_id": r["profile_id"], "identities": r["identities"]});
                    lines.push_str(&line.to_string());
                    lines.push('\n');
                }
                let del = i.delete(lines, exits.len() as u32).await?;
                for (j, e) in del.rejected {
                    if let Some((idx, _)) = exits.get(j as usize) {
                        ack.rejected.push((*idx, e));
                    }
                }
            }
        }
        Ok(ack)
    }
}

/// Sends pending erasures to their destinations' plugins (`delete`) until
/// each is done, retrying failures with backoff (1 s doubling to an hour);
/// a destination removed from the manifest fails its receipt.
async fn propagate_erasures(store: Arc<Store>, snap_rx: watch::Receiver<Arc<Snapshot>>, cancel: CancellationToken) {
    while pause(&cancel, Duration::from_millis(500)).await {
        let due = match store.due_receipts(20).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "privacy: cannot read pending erasures");
                continue;
            }
        };
        let snap = snap_rx.borrow().clone();
        for r in due {
            let outcome = match snap.sinks.get(r.destination.as_str()) {
                None => Err(("the destination is no longer in the manifest".to_owned(), None)),
                Some(d) => match erase_at(&r.destination, d, &r.payload).await {
                    Ok(receipt) => Ok(receipt),
                    Err((e, retryable)) => {
                        let wait =
                            Duration::from_secs(1u64 << r.attempts.clamp(0, 12) as u32).min(Duration::from_secs(3600));
                        tracing::warn!(destination = %r.destination, request = r.request_id, error = %e, "privacy: erasure not delivered yet");
                        Err((e, retryable.then(|| now_ms() + wait.as_millis() as i64)))
                    }
                },
            };
            if let Err(e) = store.settle_receipt(r.request_id, &r.destination, outcome).await {
                tracing::warn!(error = %e, "privacy: cannot record an erasure receipt");
            }
        }
    }
}

/// Calls the destination plugin's `delete` with one erasure; the receipt, or
/// the error and whether to retry it.
async fn erase_at(name: &str, d: &DestinationSync, payload: &str) -> std::result::Result<String, (String, bool)> {
    let fail = |e: PluginError| {
        let retryable = !matches!(
            e.connector().map(|c| c.class),
            Some(crate::plugin::ErrorClass::Config | crate::plugin::ErrorClass::Unsupported)
        );
        (e.to_string(), retryable)
    };
    let mut i = d.plugin.destination(name, &d.grants).await.map_err(fail)?;
    i.open(&d.config).await.map_err(fail)?;
    let ack = i.delete(payload.to_owned(), 1).await.map_err(fail)?;
    let _ = i.close().await;
    match ack.rejected.first() {
        None => Ok(format!("deleted, acknowledged at {}", crate::profile::iso(now_ms()))),
        Some((_, e)) => Err((format!("refused by the destination: {}: {}", e.code, e.message), e.retryable)),
    }
}

fn retry_one(t: &Target, c: &Delivery, error: &str, after: Option<Duration>, rng: &mut crate::rng::Rng) -> Settle {
    let attempts = u32::try_from(c.attempts).unwrap_or(u32::MAX);
    let jitter = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    match t.retry.next(attempts, after, jitter) {
        Some(wait) => Settle::Retry { at: now_ms() + wait.as_millis() as i64, error: error.to_owned() },
        None => Settle::Dead(format!("gave up after {attempts} attempts: {error}")),
    }
}

fn retry_all(
    t: &Target,
    claimed: &[Delivery],
    error: &str,
    after: Option<Duration>,
    rng: &mut crate::rng::Rng,
) -> Vec<(i64, Settle)> {
    claimed.iter().map(|c| (c.id, retry_one(t, c, error, after, rng))).collect()
}
