//! The dispatcher: the kube-free core between the job controller and the gateway. It turns a
//! job's progress into placements and Assign messages, and agents' updates into durable attempt
//! transitions. Placement runs under one lock against the fleet's in-memory pool of
//! reservations (rebuilt from the store's active attempts on first use), so concurrent jobs
//! never overcommit a node; every path that finishes an attempt releases its reservation.
//!
//! `sync` is a pipeline of named steps (below); the attempts it records are built by the pure
//! functions of `build`. Node lifecycle is in `node`, agents' updates in `update`, receipts and
//! budgets in `metering`, protocol messages in `wire`.

mod build;
mod live;
mod metering;
mod modules;
mod node;
mod observe;
pub mod outputs;
pub mod presign;
mod retention;
mod settle;
mod timeouts;
mod update;
mod verification;
mod wire;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod settle_tests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kommune_proto::v1::operator_message::Kind as OpKind;
use tokio::sync::mpsc;
use tracing::{Instrument as _, info, trace, warn};

pub use self::retention::DEFAULT_ATTEMPT_RETENTION;
pub(crate) use self::wire::short;
pub use self::wire::{TAIL_LIMIT, assign_message, result_span, trace_context};
use crate::STAGE;
use crate::attempt::{Attempt, AttemptPhase, AttemptResult};
use crate::crd::JobPhase;
use crate::fleet::Fleet;
use crate::job::progress::progress_recorded;
use crate::job::{JobPolicy, Progress, Recorded, conduct};
use crate::ledger::Ledger;
use crate::pricing::{Micros, RateBook};
use crate::scheduler::pool::Batch;
use crate::scheduler::{Demand, Explanation, GpuRequest, Request, Resources};
use crate::store::{Store, StoreError};
use kommune_proto::now_ms;

/// A job as the dispatcher knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    pub uid: String,
    /// "namespace/name".
    pub key: String,
}

/// The module a wasm job runs, resolved by the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRef {
    pub sha256: String,
    /// Where agents download it; None means from the operator (FetchBlob).
    pub url: Option<String>,
}

/// The result of one sync of a job.
#[derive(Debug, Clone)]
pub struct Synced {
    pub progress: Progress,
    /// Every attempt of the job, in (index, number) order; shared with the store's in-memory
    /// copy, so a sync copies pointers, not attempts.
    pub attempts: Vec<Arc<Attempt>>,
    /// Why tasks that should run now could not be placed.
    pub unplaced: Option<Explanation>,
    /// Attempts handed to nodes by this sync (with replicas, every copy counts).
    pub placed: usize,
    /// Why no further task may start within the job's budget.
    pub budget_exhausted: Option<String>,
    /// Usage and cost metered so far (None without a ledger).
    pub usage: Option<crate::crd::JobUsage>,
}

/// Store failures bubble up; everything else is handled here.
/// Why a dispatch step failed: the attempt store or the ledger, each with its own typed error,
/// so the controller's label, the gateway's status and the tests can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

/// Most attempt ids a Hello may list (running plus finished-but-unacknowledged): far more than
/// any machine runs at once, and few enough that looking each up stays cheap.
pub const MAX_RUNNING_IDS: usize = 4096;

pub type Result<T> = std::result::Result<T, DispatchError>;

/// The kube-free job engine.
pub struct Dispatcher {
    store: Arc<Store>,
    fleet: Arc<Fleet>,
    place_lock: tokio::sync::Mutex<()>,
    /// Held while observations are stored and applied, and while standings are rebuilt.
    observing: tokio::sync::Mutex<()>,
    changed: mpsc::Sender<String>,
    /// Reservations and reputations have been rebuilt from the store.
    rebuilt: AtomicBool,
    /// Where usage receipts are verified, priced and appended; None runs without metering.
    ledger: Option<Arc<Ledger>>,
    rates: Arc<RateBook>,
    /// Leader-election fence for writes outside the store (the API server).
    fence: crate::fence::Fence,
    /// What bounds each known job's attempts (runtime, task timeout), by job uid: set by every
    /// sync, dropped when the job is deleted. Kept after a job finishes, so a late receipt is
    /// still held to its job's timeout.
    jobs: std::sync::Mutex<HashMap<String, timeouts::JobLimits>>,
    /// How long past its task timeout an attempt may stay unreported before the operator
    /// fails it (the agent's own timer starts later: after the module download).
    task_grace: std::time::Duration,
    /// Whether each sampled result is checked, by attempt id (see `verification`).
    checks: std::sync::Mutex<HashMap<String, bool>>,
    /// Verification outcomes already recorded, so each is written once.
    recorded: std::sync::Mutex<HashSet<(String, kommune_core::reputation::Observed)>>,
    /// This operator's secret for spot-check draws: providers cannot predict them.
    verification_key: u64,
    metrics: Arc<crate::metrics::Metrics>,
    /// Where attempts' outputs are stored (`spec.outputs`); None refuses every upload.
    outputs: Option<crate::outputs::OutputStore>,
    /// How long an ended job's attempts stay in the store (see `retention`).
    retention: std::time::Duration,
    /// Whether each job synced by this process was last noted as ended, by uid.
    ended: std::sync::Mutex<HashMap<String, bool>>,
    /// Running attempts' live stdout and stderr, for followers (see `live`).
    live: Arc<crate::outputs::live::LiveLogs>,
}

/// The namespace of a "namespace/name" job key.
fn namespace_of(job_key: &str) -> &str {
    job_key.split_once('/').map_or("", |(ns, _)| ns)
}

/// The result recorded for an attempt that ended without one of its own.
/// How long one sync waits, in all, for room in one node's full session queue before the
/// assignments that do not fit are Lost (and retried elsewhere): a sync may place more tasks on
/// a node at once than its queue holds (256), and an agent that reads drains it in well under
/// this; one that does not read costs each sync this once, not once per attempt.
const ASSIGN_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn lost(message: &str) -> AttemptResult {
    AttemptResult { exit_code: -1, message: message.to_string(), ..Default::default() }
}

impl Dispatcher {
    /// `changed` receives "namespace/name" of jobs whose attempts changed, so the controller
    /// reconciles them; when it is full the periodic requeue catches up.
    pub fn new(store: Arc<Store>, fleet: Arc<Fleet>, changed: mpsc::Sender<String>) -> Self {
        Dispatcher {
            store,
            fleet,
            place_lock: tokio::sync::Mutex::new(()),
            observing: tokio::sync::Mutex::new(()),
            changed,
            rebuilt: AtomicBool::new(false),
            ledger: None,
            rates: Arc::default(),
            fence: crate::fence::Fence::open(),
            jobs: Default::default(),
            task_grace: timeouts::DEFAULT_TASK_GRACE,
            checks: Default::default(),
            recorded: Default::default(),
            verification_key: rand::random(),
            metrics: Arc::default(),
            outputs: None,
            retention: retention::DEFAULT_ATTEMPT_RETENTION,
            ended: Default::default(),
            live: Arc::default(),
        }
    }

    /// Fails attempts that run `grace` past their task timeout (see [`Dispatcher::enforce_timeouts`]).
    pub fn with_task_grace(mut self, grace: std::time::Duration) -> Self {
        self.task_grace = grace;
        self
    }

    /// Meters through `ledger`: terminal updates are acknowledged only once their usage receipt
    /// is in it (accepted, a duplicate, or rejected with the reason), priced at `rates`.
    pub fn with_ledger(mut self, ledger: Arc<Ledger>, rates: Arc<RateBook>) -> Self {
        self.ledger = Some(ledger);
        self.rates = rates;
        self
    }

    /// Writes to the API server (status, Events, ProviderNodes) are made only while `fence`
    /// allows, as the store's and the ledger's are.
    pub fn with_fence(mut self, fence: crate::fence::Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Whether this replica may write now (leader election); checked right before each write to
    /// the API server, so a leader frozen past its Lease does not publish a stale view when it
    /// wakes.
    pub fn may_write(&self) -> std::result::Result<(), crate::fence::Fenced> {
        self.fence.check()
    }

    /// Counts placements, attempts and receipts into `metrics` (the operator's one registry).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    pub fn ledger(&self) -> Option<&Arc<Ledger>> {
        self.ledger.as_ref()
    }

    pub fn rates(&self) -> &Arc<RateBook> {
        &self.rates
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn notify(&self, job_key: &str) {
        let _ = self.changed.try_send(job_key.to_string());
    }

    /// Rebuilds the pool's reservations (from active attempts) and providers' standings (from
    /// their recent observations) the first time placement needs them. Every finish releases after its
    /// store write, so an attempt finishing meanwhile must not stay reserved: the active set is
    /// read, reserved, then read again, and what is no longer active is released. An attempt
    /// whose finish commits after the second read began is released by that finish, which
    /// comes after the reservation: never leaked. (The pool is not locked across a store read:
    /// the read is awaited, and the pool's lock is a plain mutex.)
    async fn ensure_rebuilt(&self) -> Result<()> {
        if self.rebuilt.load(Ordering::Acquire) {
            return Ok(());
        }
        let active = self.store.all_active().await?;
        {
            let mut pool = self.fleet.pool();
            if self.rebuilt.load(Ordering::Acquire) {
                return Ok(());
            }
            for a in &active {
                let ns = namespace_of(&a.job_key);
                let ephemeral_bytes = a.held.map_or(0, |h| h.ephemeral_bytes);
                let resources = Resources { cpu_millis: a.cpu_millis, memory_bytes: a.memory_bytes, ephemeral_bytes };
                match a.held {
                    Some(held) => pool.reserve_exact(&a.id, &a.node, resources, held.gpu_mask, ns),
                    // Recorded by an older operator: disk and GPUs are filled in by the job's next sync.
                    None => pool.reserve(&a.id, &a.node, resources, &GpuRequest::default(), ns),
                };
            }
            self.rebuilt.store(true, Ordering::Release);
        }
        let still: HashSet<String> = self.store.all_active().await?.into_iter().map(|a| a.id).collect();
        {
            let mut pool = self.fleet.pool();
            for a in active.iter().filter(|a| !still.contains(&a.id)) {
                pool.release(&a.id);
                self.live.end(&a.id, "ended");
            }
        }
        self.rebuild_standings().await
    }

    /// Finishes an attempt in the store, then frees its reservation. Every path that ends an
    /// attempt goes through here; the paths where the provider's doing ended it also observe
    /// that (`observe`). Returns the attempt if this call finished it (not a repeat).
    async fn finish(&self, id: &str, phase: AttemptPhase, result: Option<&AttemptResult>, now: i64) -> Result<Option<Attempt>> {
        let runtime = self.runtime_of(id);
        let done = self.store.finish(id, phase, result, now).await?;
        self.released(id, phase, done.is_some(), runtime);
        Ok(done)
    }

    /// The runtime label of an attempt's job, read before its end is stored: once the store
    /// says a job's last attempt ended, a concurrent sync may forget the job's limits, and the
    /// attempt would be counted under `unknown`.
    fn runtime_of(&self, attempt_id: &str) -> Option<&'static str> {
        // Attempt ids start with their job's uid (`attempt::attempt_id`).
        self.limits(attempt_id.split('.').next().unwrap_or_default()).map(|l| l.runtime)
    }

    /// After an attempt was finished in the store its room is free at once (even when the store
    /// says it was already finished: release is idempotent); if this call finished it (not a
    /// repeat), the metrics count how it ended.
    fn released(&self, id: &str, phase: AttemptPhase, finished_now: bool, runtime: Option<&'static str>) {
        self.fleet.pool().release(id);
        self.live.end(id, phase.as_str());
        if finished_now {
            self.metrics.attempt_ended(phase, runtime);
        }
    }

    /// Why a task of this job would not be placed right now (a full scan of the pool), or
    /// None when it would fit. The same text the Scheduled condition carries.
    pub fn explain(&self, policy: &JobPolicy) -> Option<Explanation> {
        let e = self.fleet.pool().explain(&policy.request());
        // With replicas, nodes may fit and still be too few owners.
        (e.fitting() == 0 || e.owners.is_some()).then_some(e)
    }

    /// Brings one job forward: cancels what must stop, places what may start, and returns the
    /// progress to publish. Idempotent: calling it again with nothing changed does nothing.
    pub async fn sync(&self, job: &JobRef, policy: &JobPolicy, module: Option<&ModuleRef>) -> Result<Synced> {
        self.sync_recorded(job, policy, module, &Recorded::default()).await
    }

    /// [`Dispatcher::sync`] for a job whose status records `recorded` as done: those tasks are
    /// not run again even when the store has no attempt of them (it was lost or restored from
    /// an older backup), and a job recorded as ended stays ended.
    #[tracing::instrument(name = "sync", skip_all, fields(job = %job.key))]
    pub async fn sync_recorded(&self, job: &JobRef, policy: &JobPolicy, module: Option<&ModuleRef>, recorded: &Recorded) -> Result<Synced> {
        let _guard = self.place_lock.lock().await;
        let now = now_ms();
        self.remember_limits(&job.uid, policy);
        let attempts = self.store.job_attempts(&job.uid).await?;
        let known = self.known(&job.uid, recorded);
        let checks = self.decide_checks(policy, &attempts).await?;
        let before = progress_recorded(policy, &attempts, now, &|a| checks.get(&a.id).copied().unwrap_or(true), &known);
        self.cancel_unneeded(policy, &before, &attempts).await?;
        self.ensure_rebuilt().await?;
        let mut request = policy.request();
        // Nodes that keep preempting or losing this job's tasks get no more of them.
        request.avoid = conduct::avoided_nodes(&attempts, conduct::MAX_INTERRUPTIONS_PER_NODE);
        self.complete_reservations(&request, &attempts);
        let metered = self.job_usage(&job.uid, policy.budget).await?;
        let spent = metered.as_ref().map_or(Micros(0), |(_, cost)| *cost);
        let (admitted, budget_exhausted) = self.budget_admits(policy, &attempts, spent, before.to_place.len());
        let place_span = kommune_telemetry::span!("place", job = %job.key, tasks_placed = tracing::field::Empty);
        let (extended, unextended) = self.place_extensions(job, policy, module, &request, &before.to_extend, now).instrument(place_span.clone()).await?;
        let (placed, unplaced) = self.place(job, policy, module, &request, &before.to_place[..admitted], now).instrument(place_span.clone()).await?;
        let (placed, unplaced) = (placed + extended, unplaced.or(unextended));
        place_span.record("tasks_placed", placed);
        let changed = placed > 0 || !before.to_cancel.is_empty() || unplaced.is_some();
        let (progress, attempts) = self.progress_after(job, policy, attempts, changed, &checks, &known, now).await?;
        self.record_verifications(job, policy, &progress.observed, &attempts).await?;
        self.keep_accepted_outputs(policy, &progress).await;
        self.settle_finished(&job.uid, &progress, &attempts);
        let ended = matches!(progress.phase, JobPhase::Succeeded | JobPhase::Failed) && attempts.iter().all(|a| a.phase.is_terminal());
        self.note_retention(&job.uid, ended).await?;
        self.forget_if_done(&job.uid, &progress, &attempts);
        Ok(Synced { progress, attempts, unplaced, placed, budget_exhausted, usage: metered.map(|(u, _)| u) })
    }

    /// Cancels the attempts the job's progress no longer needs, telling their nodes why.
    async fn cancel_unneeded(&self, policy: &JobPolicy, p: &Progress, attempts: &[Arc<Attempt>]) -> Result<()> {
        let why = match p.phase {
            JobPhase::Succeeded | JobPhase::Failed => "job finished",
            _ if policy.suspended => "job suspended",
            // A late duplicate of a task that succeeded, or a copy of a round that can no longer verify.
            _ => "not needed any more: its task succeeded, or another copy of its round failed, disagreed or stopped",
        };
        for id in &p.to_cancel {
            self.cancel_attempt(attempts, id, why).await?;
        }
        Ok(())
    }

    /// Completes the reservations of the job's active attempts that were rebuilt from an older
    /// operator's records, which know only cpu and memory (exact ones are left alone).
    fn complete_reservations(&self, request: &Request, attempts: &[Arc<Attempt>]) {
        let mut pool = self.fleet.pool();
        for a in attempts.iter().filter(|a| !a.phase.is_terminal()) {
            let resources = Resources { cpu_millis: a.cpu_millis, memory_bytes: a.memory_bytes, ephemeral_bytes: request.resources.ephemeral_bytes };
            pool.refresh(&a.id, resources, &request.gpu);
        }
    }

    /// Places the admitted rounds (`to_place`: (index, number) each), records their attempts
    /// and hands them to their nodes. Returns (attempts handed over, why the rest waits).
    async fn place(
        &self,
        job: &JobRef,
        policy: &JobPolicy,
        module: Option<&ModuleRef>,
        request: &Request,
        to_place: &[(u32, u32)],
        now: i64,
    ) -> Result<(usize, Option<Explanation>)> {
        if to_place.is_empty() {
            self.fleet.pool().forget_demand(&job.key);
            return Ok((0, None));
        }
        let ids = build::round_ids(&job.uid, to_place, request.replicas);
        let batch = self.schedule(job, policy, request, &ids, now);
        let new = self.build_attempts(job, request, to_place, &ids, &batch, now);
        self.persist(&new).await?;
        for a in &new {
            self.metrics.attempt_started(policy.workload.runtime(), a.number);
        }
        let placed = self.send_assigns(job, policy, module, &new, now).await?;
        if !new.is_empty() {
            info!(job = %job.key, attempts = new.len(), tasks = batch.placed.len(), "placed tasks");
        }
        Ok((placed, batch.unplaced))
    }

    /// Asks the pool to place one round per task (all its replicas on distinct owners, or
    /// none) and wakes the jobs whose room it kept free.
    fn schedule(&self, job: &JobRef, policy: &JobPolicy, request: &Request, ids: &[Vec<String>], now: i64) -> Batch {
        let demand = Demand {
            job: job.key.clone(),
            namespace: namespace_of(&job.key).to_string(),
            priority: policy.priority,
            request: request.clone(),
            remaining: 0,
            seen_ms: now,
        };
        let started = std::time::Instant::now();
        let batch = self.fleet.pool().place_batch(demand, ids, now);
        self.metrics.placement(ids.len(), batch.placed.len(), started.elapsed(), batch.unplaced.as_ref());
        for other in &batch.held_for {
            self.notify(other);
        }
        batch
    }

    /// Reads the GPUs the pool gave each placed copy, then builds the attempts (pure).
    fn build_attempts(&self, job: &JobRef, request: &Request, slots: &[(u32, u32)], ids: &[Vec<String>], batch: &Batch, now: i64) -> Vec<Attempt> {
        let gpu_masks: HashMap<&str, u64> = {
            let pool = self.fleet.pool();
            batch.placed.iter().flat_map(|pl| &ids[pl.task]).map(|id| (id.as_str(), pool.held_gpus(id).unwrap_or(0))).collect()
        };
        build::attempts(&build::Rounds { job, resources: request.resources, slots, ids, placed: &batch.placed, gpu_masks: &gpu_masks, now_ms: now })
    }

    /// Records the new attempts before any is sent; if that fails their reservations are
    /// released, so nothing is held for attempts that do not exist.
    async fn persist(&self, new: &[Attempt]) -> Result<()> {
        // Durable first, then sent: a crash in between leaves an Assigned attempt that the
        // node's next Hello does not list, so it is marked Lost and retried.
        if let Err(e) = self.store.insert_attempts(new).await {
            let mut pool = self.fleet.pool();
            for a in new {
                pool.release(&a.id);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Sends each new attempt's Assign to its node; one that cannot be sent is Lost. Returns
    /// how many were sent.
    async fn send_assigns(&self, job: &JobRef, policy: &JobPolicy, module: Option<&ModuleRef>, new: &[Attempt], now: i64) -> Result<usize> {
        let mut sent = 0;
        // Per node, until when this batch waits for room in a full session queue.
        let mut wait_until: HashMap<&str, std::time::Instant> = HashMap::new();
        for a in new {
            let mut assign = assign_message(a, policy, module);
            // One span per attempt sent; the agent's spans of the attempt are its children.
            let span = kommune_telemetry::span!("assign", job = %a.job_key, task_index = a.index, attempt = %a.id, node = %a.node);
            assign.trace = wire::trace_context(&span);
            let until = *wait_until.entry(a.node.as_str()).or_insert_with(|| std::time::Instant::now() + ASSIGN_QUEUE_WAIT);
            let sent_to = self.fleet.send_or_wait(&a.node, OpKind::Assign(assign), until.saturating_duration_since(std::time::Instant::now())).await;
            drop(span);
            if let Err(e) = sent_to {
                warn!(attempt = %a.id, node = %a.node, error = ?e, "could not hand attempt to node; marking it lost");
                self.finish(&a.id, AttemptPhase::Lost, Some(&lost(&format!("could not reach node: {e:?}"))), now).await?;
                // With replicas, the round's other copies are now wasted: the next sync cancels them.
                self.notify(&job.key);
            } else {
                trace!(target: STAGE, attempt = %a.id, "assign queued");
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// The job's progress after this sync: its attempts are read again only if the sync
    /// `changed` them, so a sync that did nothing costs one read.
    #[allow(clippy::too_many_arguments)]
    async fn progress_after(
        &self,
        job: &JobRef,
        policy: &JobPolicy,
        attempts: Vec<Arc<Attempt>>,
        changed: bool,
        checks: &HashMap<String, bool>,
        known: &Recorded,
        now: i64,
    ) -> Result<(Progress, Vec<Arc<Attempt>>)> {
        let attempts = if changed { self.store.job_attempts(&job.uid).await? } else { attempts };
        Ok((progress_recorded(policy, &attempts, now, &|a| checks.get(&a.id).copied().unwrap_or(true), known), attempts))
    }

    /// Frees the memory the store and ledger keep for a job that ended with nothing of it
    /// running any more; a later sync reads the store again.
    fn forget_if_done(&self, job_uid: &str, p: &Progress, attempts: &[Arc<Attempt>]) {
        if matches!(p.phase, JobPhase::Succeeded | JobPhase::Failed) && attempts.iter().all(|a| a.phase.is_terminal()) {
            self.forget_job(job_uid);
        }
    }

    /// Drops the job from the store's and the ledger's in-memory caches.
    fn forget_job(&self, job_uid: &str) {
        self.store.forget_job(job_uid);
        self.forget_verification(job_uid);
        if let Some(l) = &self.ledger {
            l.forget_job(job_uid);
        }
    }

    /// Stops one of `attempts` on its node and records it Cancelled with `reason`.
    async fn cancel_attempt(&self, attempts: &[Arc<Attempt>], id: &str, reason: &str) -> Result<()> {
        let Some(a) = attempts.iter().find(|a| a.id == id) else { return Ok(()) };
        let _ = self.fleet.send(&a.node, wire::cancel_message(id, reason));
        self.finish(id, AttemptPhase::Cancelled, Some(&lost(reason)), now_ms()).await?;
        Ok(())
    }

    /// Cancels every active attempt of a job (it is being deleted). Returns how many.
    pub async fn cancel_job(&self, job_uid: &str) -> Result<usize> {
        let _guard = self.place_lock.lock().await;
        let attempts = self.store.job_attempts(job_uid).await?;
        if let Some(key) = attempts.first().map(|a| a.job_key.clone()) {
            self.fleet.pool().forget_demand(&key);
        }
        let active: Vec<String> = attempts.iter().filter(|a| !a.phase.is_terminal()).map(|a| a.id.clone()).collect();
        for id in &active {
            self.cancel_attempt(&attempts, id, "job deleted").await?;
        }
        self.forget_job(job_uid);
        self.forget_limits(job_uid);
        // A deleted job's history goes after the retention too; it is not synced again.
        self.note_retention(job_uid, true).await?;
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).remove(job_uid);
        Ok(active.len())
    }
}
