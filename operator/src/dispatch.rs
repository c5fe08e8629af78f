//! The dispatcher: the kube-free core between the job controller and the gateway. It turns a
//! job's progress into placements and Assign messages, and agents' updates into durable attempt
//! transitions. Placement runs under one lock against the fleet's in-memory pool of
//! reservations (rebuilt from the store's active attempts on first use), so concurrent jobs
//! never overcommit a node; every path that finishes an attempt releases its reservation.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kommune_proto::v1::{self, operator_message::Kind as OpKind};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};

use crate::STAGE;
use crate::attempt::{Attempt, AttemptPhase, AttemptResult, Held, now_ms, replica_attempt_id};
use crate::crd::JobPhase;
use crate::fleet::{Fleet, NodeFacts, Outbound, SendError};
use crate::job::{JobPolicy, Progress, TaskWorkload, progress};
use crate::ledger::check::{AttemptFacts, ReceiptInput};
use crate::ledger::{Ledger, Verdict};
use crate::pricing::{self, BudgetCheck, Micros, RateBook};
use crate::scheduler::{Demand, Explanation, GpuRequest, Resources};
use crate::store::{Store, StoreError};

/// Longest output tail kept per stream.
pub const TAIL_LIMIT: usize = 4096;
const MESSAGE_LIMIT: usize = 1024;

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
pub type Result<T> = std::result::Result<T, StoreError>;

/// The kube-free job engine.
pub struct Dispatcher {
    store: Arc<Store>,
    fleet: Arc<Fleet>,
    place_lock: tokio::sync::Mutex<()>,
    changed: mpsc::Sender<String>,
    /// Reservations and reputations have been rebuilt from the store.
    rebuilt: AtomicBool,
    /// Where usage receipts are verified, priced and appended; None runs without metering.
    ledger: Option<Arc<Ledger>>,
    rates: Arc<RateBook>,
    /// Leader-election fence for writes outside the store (the API server).
    fence: crate::fence::Fence,
}

/// The namespace of a "namespace/name" job key.
fn namespace_of(job_key: &str) -> &str {
    job_key.split_once('/').map_or("", |(ns, _)| ns)
}

impl Dispatcher {
    /// `changed` receives "namespace/name" of jobs whose attempts changed, so the controller
    /// reconciles them; when it is full the periodic requeue catches up.
    pub fn new(store: Arc<Store>, fleet: Arc<Fleet>, changed: mpsc::Sender<String>) -> Self {
        Dispatcher {
            store,
            fleet,
            place_lock: tokio::sync::Mutex::new(()),
            changed,
            rebuilt: AtomicBool::new(false),
            ledger: None,
            rates: Arc::default(),
            fence: crate::fence::Fence::open(),
        }
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

    pub fn ledger(&self) -> Option<&Arc<Ledger>> {
        self.ledger.as_ref()
    }

    pub fn rates(&self) -> &Arc<RateBook> {
        &self.rates
    }

    /// The job's metered usage, for its status.
    async fn job_usage(&self, job_uid: &str, budget: Option<Micros>) -> Result<Option<(crate::crd::JobUsage, Micros)>> {
        let Some(ledger) = &self.ledger else { return Ok(None) };
        let u = ledger.job_usage(job_uid).await.map_err(ledger_error)?;
        let f = &u.usage;
        let usage = crate::crd::JobUsage {
            receipts: u.receipts,
            cpu_seconds: format!("{:.3}", f.cpu_micros as f64 / 1e6),
            wall_seconds: format!("{:.3}", f.wall_millis as f64 / 1e3),
            memory_gib_hours: format!("{:.6}", f.memory_mib_millis as f64 / (1024.0 * 3_600_000.0)),
            wasm_fuel: f.wasm_fuel,
            output_bytes: f.output_bytes,
            cost: u.cost.to_string(),
            budget: budget.map(|b| b.to_string()),
        };
        Ok(Some((usage, u.cost)))
    }

    /// How many of `wanted` new tasks (rounds of `replicas` attempts each) the job's budget
    /// admits, and why not all.
    fn budget_admits(&self, policy: &JobPolicy, attempts: &[Arc<Attempt>], spent: Micros, wanted: usize) -> (usize, Option<String>) {
        let Some(budget) = policy.budget else { return (wanted, None) };
        let reserved = attempts
            .iter()
            .filter(|a| !a.phase.is_terminal())
            .map(|a| pricing::worst_case(a.cpu_millis, a.memory_bytes, policy.task_timeout, &self.rates.for_node(&a.node)))
            .fold(Micros(0), Micros::saturating_add);
        // A task is a round of all its replicas, each of which may cost the worst case.
        let replica = pricing::worst_case(policy.cpu_millis, policy.memory_bytes, policy.task_timeout, &self.rates.ceiling());
        let next = Micros(replica.0.saturating_mul(policy.placement.replicas.max(1) as u64));
        let check = BudgetCheck { budget, spent, reserved, next };
        let admits = usize::try_from(check.allows()).unwrap_or(usize::MAX);
        if admits >= wanted {
            return (wanted, None);
        }
        // Said as it will be once the admitted tasks run: they are committed too.
        let reserved = Micros(reserved.0.saturating_add(next.0.saturating_mul(admits as u64)));
        (admits, Some(BudgetCheck { reserved, ..check }.explain()))
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

    /// Rebuilds the pool's reservations (from active attempts) and node reputations (from
    /// finished ones) the first time placement needs them. The store is read while the pool is
    /// locked, and every finish releases after its store write, so an attempt finishing
    /// meanwhile is either not read as active or released after being reserved: never leaked.
    fn ensure_rebuilt(&self) -> Result<()> {
        if self.rebuilt.load(Ordering::Acquire) {
            return Ok(());
        }
        {
            let mut pool = self.fleet.pool();
            if self.rebuilt.load(Ordering::Acquire) {
                return Ok(());
            }
            for a in self.store.all_active()? {
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
        for (node, succeeded, failed) in self.store.outcomes_by_node()? {
            self.fleet.set_history(&node, succeeded, failed);
        }
        Ok(())
    }

    /// Finishes an attempt in the store, then frees its reservation and counts the outcome
    /// towards its node's reputation. Every path that ends an attempt goes through here.
    fn finish(&self, id: &str, phase: AttemptPhase, result: Option<&AttemptResult>, now: i64) -> Result<Option<Attempt>> {
        let done = self.store.finish(id, phase, result, now)?;
        let node = done.as_ref().map_or("", |a| a.node.as_str());
        self.released(id, node, phase, done.is_some());
        Ok(done)
    }

    /// After an attempt was finished in the store: its room is free at once, and if this call
    /// finished it (not a repeat) its node's record counts the outcome.
    fn released(&self, id: &str, node: &str, phase: AttemptPhase, finished_now: bool) {
        // Released even when the store says it was already finished: release is idempotent.
        self.fleet.pool().release(id);
        if finished_now {
            match phase {
                AttemptPhase::Succeeded => self.fleet.record_outcome(node, true),
                AttemptPhase::Failed | AttemptPhase::Lost => self.fleet.record_outcome(node, false),
                _ => {}
            }
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
    #[tracing::instrument(skip_all, fields(job = %job.key))]
    pub async fn sync(&self, job: &JobRef, policy: &JobPolicy, module: Option<&ModuleRef>) -> Result<Synced> {
        let _guard = self.place_lock.lock().await;
        let now = now_ms();
        let mut attempts = self.store.job_attempts(&job.uid)?;
        let p = progress(policy, &attempts, now);

        let why = match p.phase {
            JobPhase::Succeeded | JobPhase::Failed => "job finished",
            _ if policy.suspended => "job suspended",
            // A late duplicate of a task that succeeded, or a copy of a round that can no longer verify.
            _ => "not needed any more: its task succeeded, or another copy of its round failed, disagreed or stopped",
        };
        for id in &p.to_cancel {
            self.cancel_attempt(&attempts, id, why)?;
        }

        self.ensure_rebuilt()?;
        let request = policy.request();
        {
            // Reservations rebuilt from attempts an older operator recorded know only cpu and
            // memory; fill in the rest (exact ones are left alone).
            let mut pool = self.fleet.pool();
            for a in attempts.iter().filter(|a| !a.phase.is_terminal()) {
                let resources = Resources { cpu_millis: a.cpu_millis, memory_bytes: a.memory_bytes, ephemeral_bytes: request.resources.ephemeral_bytes };
                pool.refresh(&a.id, resources, &request.gpu);
            }
        }
        let metered = self.job_usage(&job.uid, policy.budget).await?;
        let spent = metered.as_ref().map_or(Micros(0), |(_, cost)| *cost);
        let (admitted, budget_exhausted) = self.budget_admits(policy, &attempts, spent, p.to_place.len());
        let to_place = &p.to_place[..admitted];

        let mut placed = 0;
        let mut unplaced = None;
        if to_place.is_empty() {
            self.fleet.pool().forget_demand(&job.key);
        } else {
            // One round per task: all its replicas are placed together, on distinct owners, or none.
            let tasks: Vec<Vec<String>> =
                to_place.iter().map(|&(index, number)| (0..request.replicas).map(|k| replica_attempt_id(&job.uid, index, number, k)).collect()).collect();
            let demand = Demand {
                job: job.key.clone(),
                namespace: namespace_of(&job.key).to_string(),
                priority: policy.priority,
                request: request.clone(),
                remaining: 0,
                seen_ms: now,
            };
            let batch = self.fleet.pool().place_batch(demand, &tasks, now);
            for other in &batch.held_for {
                self.notify(other);
            }
            unplaced = batch.unplaced;
            let new: Vec<Attempt> = {
                let pool = self.fleet.pool();
                batch
                    .placed
                    .iter()
                    .flat_map(|pl| pl.nodes.iter().zip(&tasks[pl.task]).enumerate().map(move |(k, (node, id))| (pl.task, k as u32, node, id)))
                    .map(|(task, replica, node, id)| {
                        let (index, number) = to_place[task];
                        let gpu_mask = pool.held_gpus(id).unwrap_or(0);
                        Attempt {
                            id: id.clone(),
                            job_uid: job.uid.clone(),
                            job_key: job.key.clone(),
                            index,
                            number,
                            replica,
                            node: node.clone(),
                            phase: AttemptPhase::Assigned,
                            cpu_millis: policy.cpu_millis,
                            memory_bytes: policy.memory_bytes,
                            held: Some(Held { ephemeral_bytes: request.resources.ephemeral_bytes, gpu_mask }),
                            created_ms: now,
                            finished_ms: None,
                            result: None,
                        }
                    })
                    .collect()
            };
            // Durable first, then sent: a crash in between leaves an Assigned attempt that the
            // node's next Hello does not list, so it is marked Lost and retried.
            if let Err(e) = self.store.insert_attempts(&new) {
                let mut pool = self.fleet.pool();
                for a in &new {
                    pool.release(&a.id);
                }
                return Err(e);
            }
            for a in &new {
                let assign = OpKind::Assign(assign_message(a, policy, module));
                if let Err(e) = self.fleet.send(&a.node, assign) {
                    warn!(attempt = %a.id, node = %a.node, error = ?e, "could not hand attempt to node; marking it lost");
                    self.finish(&a.id, AttemptPhase::Lost, Some(&lost(&format!("could not reach node: {e:?}"))), now)?;
                    // With replicas, the round's other copies are now wasted: the next sync cancels them.
                    self.notify(&job.key);
                } else {
                    trace!(target: STAGE, attempt = %a.id, "assign queued");
                    placed += 1;
                }
            }
            if !new.is_empty() {
                info!(job = %job.key, attempts = new.len(), tasks = batch.placed.len(), "placed tasks");
            }
        }

        if placed > 0 || !p.to_cancel.is_empty() || unplaced.is_some() {
            attempts = self.store.job_attempts(&job.uid)?;
        }
        let p = progress(policy, &attempts, now);
        if matches!(p.phase, JobPhase::Succeeded | JobPhase::Failed) && attempts.iter().all(|a| a.phase.is_terminal()) {
            // Nothing of it runs any more: free the memory; a later sync reads the store again.
            self.store.forget_job(&job.uid);
            if let Some(l) = &self.ledger {
                l.forget_job(&job.uid);
            }
        }
        Ok(Synced { progress: p, attempts, unplaced, placed, budget_exhausted, usage: metered.map(|(u, _)| u) })
    }

    fn cancel_attempt(&self, attempts: &[Arc<Attempt>], id: &str, reason: &str) -> Result<()> {
        let Some(a) = attempts.iter().find(|a| a.id == id) else { return Ok(()) };
        let _ = self.fleet.send(&a.node, OpKind::Cancel(v1::Cancel { attempt_id: id.to_string(), reason: reason.to_string() }));
        self.finish(id, AttemptPhase::Cancelled, Some(&lost(reason)), now_ms())?;
        Ok(())
    }

    /// Gives up on attempts whose node has had no session for longer than `grace`: they become
    /// Lost (a failure, retried elsewhere with backoff). A node back within the grace keeps
    /// them. Returns how many were expired.
    pub async fn expire_absent(&self, grace: std::time::Duration) -> Result<usize> {
        let _guard = self.place_lock.lock().await;
        let now = now_ms();
        let mut expired = 0;
        for a in self.store.all_active()? {
            let Some(absent) = self.fleet.absent_for(&a.node).filter(|d| *d > grace) else { continue };
            let why = format!("node {} has been unreachable for {}s (grace {}s)", a.node, absent.as_secs(), grace.as_secs());
            if self.finish(&a.id, AttemptPhase::Lost, Some(&lost(&why)), now)?.is_some() {
                info!(attempt = %a.id, node = %a.node, "attempt lost with its node");
                self.notify(&a.job_key);
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Drains a node (its admin set `spec.drain`; the caller has cordoned it): every attempt
    /// running there is stopped on the agent and Cancelled, so it is placed elsewhere at once
    /// without counting against its retries. The agent still sends what the attempt used, which
    /// is metered. Returns how many attempts moved.
    pub async fn drain_node(&self, node: &str) -> Result<usize> {
        let _guard = self.place_lock.lock().await;
        let why = format!("node {node} is being drained by its admin");
        let now = now_ms();
        let mut moved = 0;
        for a in self.store.active_on_node(node)? {
            let _ = self.fleet.send(node, OpKind::Cancel(v1::Cancel { attempt_id: a.id.clone(), reason: why.clone() }));
            if self.finish(&a.id, AttemptPhase::Cancelled, Some(&lost(&why)), now)?.is_some() {
                self.notify(&a.job_key);
                moved += 1;
            }
        }
        if moved > 0 {
            info!(node, moved, "node drained");
        }
        Ok(moved)
    }

    /// Revokes a node (its ProviderNode was deleted): the registration goes, so its certificate
    /// opens no further session; an open session is ended with PermissionDenied, which makes
    /// the agent stop; its running attempts are Lost and placed elsewhere.
    pub async fn revoke_node(&self, node: &str) -> Result<usize> {
        self.remove_node(node, "was removed from the pool by an admin", AttemptPhase::Lost).await
    }

    /// A node leaves of its own accord: like a revocation, but its attempts are Cancelled, so
    /// they are placed elsewhere without counting against their retries. Returns how many.
    pub async fn leave(&self, node: &str) -> Result<usize> {
        self.remove_node(node, "left the pool", AttemptPhase::Cancelled).await
    }

    async fn remove_node(&self, node: &str, why: &str, phase: AttemptPhase) -> Result<usize> {
        let _guard = self.place_lock.lock().await;
        self.store.remove_node(node)?;
        let closed = self.fleet.close(node, tonic::Status::permission_denied(format!("node {node} {why}")));
        let now = now_ms();
        let mut moved = 0;
        for a in self.store.active_on_node(node)? {
            if self.finish(&a.id, phase, Some(&lost(&format!("node {node} {why}"))), now)?.is_some() {
                self.notify(&a.job_key);
                moved += 1;
            }
        }
        info!(node, closed, moved, why, "node removed");
        Ok(moved)
    }

    /// Cancels every active attempt of a job (it is being deleted). Returns how many.
    pub async fn cancel_job(&self, job_uid: &str) -> Result<usize> {
        let _guard = self.place_lock.lock().await;
        let attempts = self.store.job_attempts(job_uid)?;
        if let Some(key) = attempts.first().map(|a| a.job_key.clone()) {
            self.fleet.pool().forget_demand(&key);
        }
        let active: Vec<String> = attempts.iter().filter(|a| !a.phase.is_terminal()).map(|a| a.id.clone()).collect();
        for id in &active {
            self.cancel_attempt(&attempts, id, "job deleted")?;
        }
        self.store.forget_job(job_uid);
        if let Some(l) = &self.ledger {
            l.forget_job(job_uid);
        }
        Ok(active.len())
    }

    /// Opens a node's session: reconciles what the node runs with what the store says it should
    /// run, then registers the session, both under the placement lock so no placement lands in
    /// between. Attempts the node should run but does not know are Lost; attempts it runs that
    /// it should not are returned for cancelling. Returns (session id, attempts to cancel).
    #[tracing::instrument(skip_all, fields(node = %node))]
    pub async fn open_session(&self, node: &str, facts: NodeFacts, tx: Outbound, running: &[String]) -> Result<(u64, Vec<String>)> {
        let _guard = self.place_lock.lock().await;
        let running: HashSet<&str> = running.iter().map(String::as_str).collect();
        let expected = self.store.active_on_node(node)?;
        let now = now_ms();
        for a in expected.iter().filter(|a| !running.contains(a.id.as_str())) {
            if a.phase == AttemptPhase::Assigned {
                // Never confirmed running, and the node does not have it: the Assign was lost
                // on the way (the session or the operator ended first). Nothing ran, so it is
                // placed again without using a retry.
                info!(attempt = %a.id, node, "node reconnected without an attempt it never confirmed; placing it again");
                let why = "the assignment never reached the node (it reconnected without it); placed again without using a retry";
                self.finish(&a.id, AttemptPhase::Cancelled, Some(&lost(why)), now)?;
            } else {
                info!(attempt = %a.id, node, "node reconnected without this attempt; marking it lost");
                self.finish(&a.id, AttemptPhase::Lost, Some(&lost("the node restarted or reconnected without this attempt")), now)?;
            }
            self.notify(&a.job_key);
        }
        let expected: HashSet<&str> = expected.iter().map(|a| a.id.as_str()).collect();
        let mut unwanted = vec![];
        for id in running.iter().filter(|id| !expected.contains(**id)) {
            // Finished-but-unacknowledged attempts are listed too; their TaskUpdate follows.
            match self.store.attempt(id)? {
                Some(a) if a.node == node && a.phase.is_terminal() => {}
                _ => unwanted.push(id.to_string()),
            }
        }
        let session = self.fleet.connect(node, facts, tx);
        Ok((session, unwanted))
    }

    /// Applies an agent's TaskUpdate and returns the Ack to send, if any. A terminal update is
    /// acknowledged once its result is durable and its usage receipt is in the ledger
    /// (accepted, already there, or rejected with the reason), including repeats, so the agent
    /// stops resending; if either write fails nothing is acknowledged and the agent resends.
    /// `public_key` is the node's ed25519 key from its client certificate.
    #[tracing::instrument(skip_all, fields(node = %node, attempt = %update.attempt_id.chars().take(128).collect::<String>()))]
    pub async fn on_update(&self, node: &str, public_key: &[u8; 32], update: &v1::TaskUpdate) -> Result<Option<v1::Ack>> {
        let ack = |rejected: String, cost: Micros| v1::Ack { attempt_id: update.attempt_id.clone(), receipt_rejected: rejected, cost_micros: cost.0 };
        let Some(a) = self.store.attempt(&update.attempt_id)? else {
            warn!(node, attempt = %short(&update.attempt_id), "update for an unknown attempt; acknowledging so the agent drops it");
            return Ok(Some(ack("no such attempt is recorded by the operator".into(), Micros(0))));
        };
        if a.node != node {
            warn!(node, attempt = %a.id, owner = %a.node, "update for an attempt placed on another node; ignored");
            return Ok(Some(ack(format!("attempt {} was not assigned to {node}", a.id), Micros(0))));
        }
        let state = v1::AttemptState::try_from(update.state).unwrap_or(v1::AttemptState::Unspecified);
        let phase = match state {
            v1::AttemptState::Running => {
                // No reconcile: Assigned and Running count alike in progress and status, so it
                // would change nothing (and it was half of all syncs of a busy job).
                self.store.mark_running(&a.id)?;
                return Ok(None);
            }
            v1::AttemptState::Succeeded => AttemptPhase::Succeeded,
            v1::AttemptState::Failed => AttemptPhase::Failed,
            v1::AttemptState::Cancelled => AttemptPhase::Cancelled,
            // The provider took its machine back: re-placed like a cancel, no retry used up.
            v1::AttemptState::Preempted => AttemptPhase::Cancelled,
            v1::AttemptState::Unspecified => {
                warn!(node, attempt = %a.id, state = update.state, "update without a known state; ignored");
                return Ok(None);
            }
        };
        let result = bounded_result(update.result.as_ref());
        // The result (store) and its receipt (ledger) are made durable at the same time, each
        // in a group commit shared with other sessions' updates; the Ack waits for both. If
        // either fails nothing is acknowledged and the agent resends: both are idempotent.
        let (finished, metered) = tokio::join!(
            async {
                let r = self.store.finish_batched(&a.id, phase, &result, now_ms()).await;
                trace!(target: STAGE, attempt = %a.id, "result stored");
                r
            },
            async {
                let r = self.meter(node, public_key, &a, update.receipt.as_ref()).await;
                trace!(target: STAGE, attempt = %a.id, "receipt recorded");
                r
            }
        );
        let finished = finished?;
        self.released(&a.id, &a.node, phase, finished);
        if finished {
            debug!(node, attempt = %a.id, phase = phase.as_str(), exit = result.exit_code, "attempt finished");
        }
        let (rejected, cost) = metered?;
        if !rejected.is_empty() {
            warn!(node, attempt = %a.id, reason = %rejected, "usage receipt rejected");
        }
        // After metering, so the reconcile this triggers sees the usage too.
        self.notify(&a.job_key);
        trace!(target: STAGE, attempt = %a.id, "job notified");
        Ok(Some(ack(rejected, cost)))
    }

    /// Puts a terminal update's usage receipt in the ledger. Returns (why it was rejected, or
    /// empty; what it was priced at).
    async fn meter(&self, node: &str, public_key: &[u8; 32], a: &Attempt, receipt: Option<&v1::UsageReceipt>) -> Result<(String, Micros)> {
        let Some(ledger) = &self.ledger else { return Ok((String::new(), Micros(0))) };
        let Some(receipt) = receipt else {
            warn!(node, attempt = %a.id, "terminal update without a usage receipt (an older agent?); nothing metered");
            return Ok(("the update carried no usage receipt".into(), Micros(0)));
        };
        let now = now_ms();
        let input = ReceiptInput {
            receipt: receipt.clone(),
            session_node: node.to_string(),
            node_public_key: *public_key,
            attempt: AttemptFacts {
                attempt_id: a.id.clone(),
                job_uid: a.job_uid.clone(),
                job_key: a.job_key.clone(),
                node: a.node.clone(),
                cpu_millis: a.cpu_millis,
                observed_start_ms: a.created_ms,
                // The attempt cannot have run longer than from its placement to this report.
                observed_end_ms: now,
            },
            rates: self.rates.for_node(node),
            received_ms: now,
        };
        match ledger.submit(input).await.map_err(ledger_error)? {
            Verdict::Accepted { cost, .. } | Verdict::Duplicate { cost, .. } => Ok((String::new(), cost)),
            Verdict::Rejected { reason } => Ok((reason, Micros(0))),
        }
    }
}

fn ledger_error(e: crate::ledger::LedgerError) -> StoreError {
    StoreError::Ledger(e.to_string())
}

fn short(s: &str) -> String {
    s.chars().take(128).collect()
}

fn lost(message: &str) -> AttemptResult {
    AttemptResult { exit_code: -1, message: message.to_string(), ..Default::default() }
}

/// Copies a result from an agent, bounding every field.
fn bounded_result(r: Option<&v1::TaskResult>) -> AttemptResult {
    let Some(r) = r else { return lost("the agent sent no result") };
    let tail = |b: &[u8]| b[b.len().saturating_sub(TAIL_LIMIT)..].to_vec();
    AttemptResult {
        exit_code: r.exit_code,
        output_sha256: if kommune_proto::is_sha256_hex(&r.output_sha256) { r.output_sha256.clone() } else { String::new() },
        output_bytes: r.output_bytes,
        stdout_tail: tail(&r.stdout_tail),
        stderr_tail: tail(&r.stderr_tail),
        message: r.message.chars().take(MESSAGE_LIMIT).collect(),
        wall_millis: r.wall_millis,
    }
}

/// The Assign message for an attempt.
pub fn assign_message(a: &Attempt, policy: &JobPolicy, module: Option<&ModuleRef>) -> v1::Assign {
    let workload = match &policy.workload {
        TaskWorkload::Wasm { args, env, .. } => {
            let m = module.cloned().unwrap_or(ModuleRef { sha256: String::new(), url: None });
            v1::workload::Kind::Wasm(v1::WasmWorkload {
                module_sha256: m.sha256,
                url: m.url.unwrap_or_default(),
                args: args.clone(),
                env: env.iter().cloned().collect(),
            })
        }
        TaskWorkload::Exec { command, env } => v1::workload::Kind::Exec(v1::ExecWorkload { command: command.clone(), env: env.iter().cloned().collect() }),
        TaskWorkload::Container { image, command, args, env, network } => v1::workload::Kind::Container(v1::ContainerWorkload {
            image: image.clone(),
            command: command.clone(),
            args: args.clone(),
            env: env.iter().cloned().collect(),
            network: *network,
        }),
    };
    v1::Assign {
        attempt_id: a.id.clone(),
        job: a.job_key.clone(),
        task_index: a.index,
        task_count: policy.tasks,
        workload: Some(v1::Workload { kind: Some(workload) }),
        memory_bytes: policy.memory_bytes,
        cpu_millis: policy.cpu_millis,
        timeout_millis: policy.task_timeout.as_millis() as u64,
        gpus: policy.gpu.count,
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotConnected => write!(f, "no session"),
            SendError::Full => write!(f, "session queue full"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::attempt::attempt_id;

    #[test]
    fn a_container_job_is_assigned_with_its_image_command_and_network_wish() {
        let image = format!("busybox@sha256:{}", "a".repeat(64));
        let workload = TaskWorkload::Container {
            image: image.clone(),
            command: vec!["sh".into(), "-c".into()],
            args: vec!["echo $A".into()],
            env: vec![("A".into(), "b".into())],
            network: true,
        };
        let policy = JobPolicy { workload, ..exec_policy(3, 500) };
        let attempt = Attempt {
            id: attempt_id("uid", 2, 1),
            job_uid: "uid".into(),
            job_key: "ns/job".into(),
            index: 2,
            number: 1,
            replica: 0,
            node: "n1".into(),
            phase: AttemptPhase::Assigned,
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            held: None,
            created_ms: 0,
            finished_ms: None,
            result: None,
        };
        let assign = assign_message(&attempt, &policy, None);
        assert_eq!((assign.task_index, assign.task_count, assign.cpu_millis, assign.memory_bytes, assign.timeout_millis), (2, 3, 500, 64 << 20, 60_000));
        let expected = v1::ContainerWorkload {
            image,
            command: vec!["sh".into(), "-c".into()],
            args: vec!["echo $A".into()],
            env: [("A".to_owned(), "b".to_owned())].into(),
            network: true,
        };
        assert_eq!(assign.workload.and_then(|w| w.kind), Some(v1::workload::Kind::Container(expected)));
    }

    fn exec_policy(tasks: u32, cpu_millis: u64) -> JobPolicy {
        JobPolicy {
            tasks,
            parallelism: tasks,
            cpu_millis,
            memory_bytes: 64 << 20,
            max_attempts: 1,
            backoff: Duration::from_secs(1),
            task_timeout: Duration::from_secs(60),
            job_deadline: None,
            suspended: false,
            budget: None,
            workload: TaskWorkload::Exec { command: vec!["true".into()], env: vec![] },
            ephemeral_bytes: 0,
            gpu: Default::default(),
            placement: crate::job::PlacementPolicy { replicas: 1, ..Default::default() },
            priority: 0,
            max_price_per_hour: None,
        }
    }

    fn job(ns: &str, uid: &str) -> JobRef {
        JobRef { uid: uid.into(), key: format!("{ns}/{uid}") }
    }

    #[tokio::test]
    async fn room_is_reserved_in_memory_and_freed_the_moment_an_attempt_ends_or_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let fleet = Arc::new(Fleet::default());
        let (changed, _changed_rx) = mpsc::channel(16);
        let (tx, _session_rx) = mpsc::channel(16);
        let facts = NodeFacts {
            capacity: Resources { cpu_millis: 2000, memory_bytes: 4 << 30, ephemeral_bytes: 0 },
            runtimes: vec!["exec".into()],
            ..Default::default()
        };
        fleet.connect("n1", facts, tx);
        let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
        let (a, b) = (job("team-a", "ua"), job("team-b", "ub"));

        assert_eq!(d.sync(&a, &exec_policy(2, 1000), None).await.unwrap().placed, 2);
        let waiting = d.sync(&b, &exec_policy(1, 1000), None).await.unwrap();
        assert_eq!(waiting.placed, 0);
        assert_eq!(waiting.unplaced.unwrap().to_string(), "0/1 nodes can run it: 1 insufficient cpu (need 1)");
        assert_eq!(d.explain(&exec_policy(1, 1000)).unwrap().to_string(), "0/1 nodes can run it: 1 insufficient cpu (need 1)");

        // An attempt of A succeeds: its room is free for B at once, and the node's record improves.
        let done = v1::TaskUpdate { attempt_id: attempt_id("ua", 0, 1), state: v1::AttemptState::Succeeded as i32, ..Default::default() };
        assert!(d.on_update("n1", &[0; 32], &done).await.unwrap().is_some());
        assert!(d.on_update("n1", &[0; 32], &done).await.unwrap().is_some(), "a repeated update releases nothing twice");
        assert_eq!(fleet.reputation("n1"), crate::scheduler::Reputation(666));
        assert_eq!(d.sync(&b, &exec_policy(1, 1000), None).await.unwrap().placed, 1);
        assert_eq!(fleet.pool().allocation("n1").resources.cpu_millis, 2000);

        // Deleting A cancels its last attempt and frees its room.
        assert_eq!(d.cancel_job("ua").await.unwrap(), 1);
        assert_eq!(fleet.pool().allocation("n1").resources.cpu_millis, 1000);
        assert_eq!(fleet.pool().reservations(), 1);
        assert!(d.explain(&exec_policy(1, 1000)).is_none());

        // A restarted operator rebuilds the same reservations from the store.
        let fleet2 = Arc::new(Fleet::default());
        let (changed2, _rx2) = mpsc::channel(16);
        let d2 = Dispatcher::new(store, fleet2.clone(), changed2);
        d2.ensure_rebuilt().unwrap();
        assert_eq!(fleet2.pool().allocation("n1").resources.cpu_millis, 1000);
        assert_eq!(fleet2.reputation("n1"), crate::scheduler::Reputation(666));
    }

    #[tokio::test]
    async fn freed_room_goes_to_the_small_job_of_another_namespace_before_the_big_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let fleet = Arc::new(Fleet::default());
        let (changed, mut changed_rx) = mpsc::channel(16);
        let (tx, _session_rx) = mpsc::channel(64);
        let facts = NodeFacts {
            capacity: Resources { cpu_millis: 4000, memory_bytes: 4 << 30, ephemeral_bytes: 0 },
            runtimes: vec!["exec".into()],
            ..Default::default()
        };
        fleet.connect("n1", facts, tx);
        let d = Dispatcher::new(store, fleet.clone(), changed);
        let (big, small) = (job("team-a", "big"), job("team-b", "small"));

        // The big job fills the node; the small one waits and says why.
        assert_eq!(d.sync(&big, &exec_policy(100, 1000), None).await.unwrap().placed, 4);
        let waiting = d.sync(&small, &exec_policy(2, 1000), None).await.unwrap();
        assert_eq!((waiting.placed, waiting.unplaced.unwrap().to_string()), (0, "0/1 nodes can run it: 1 insufficient cpu (need 1)".to_string()));

        // Two of the big job's attempts end; the big job syncs first but keeps their room.
        for index in 0..2 {
            let done = v1::TaskUpdate { attempt_id: attempt_id("big", index, 1), state: v1::AttemptState::Succeeded as i32, ..Default::default() };
            d.on_update("n1", &[0; 32], &done).await.unwrap();
        }
        while changed_rx.try_recv().is_ok() {}
        let held = d.sync(&big, &exec_policy(100, 1000), None).await.unwrap();
        assert_eq!(held.placed, 0);
        assert_eq!(held.unplaced.unwrap().to_string(), "1/1 nodes can run it, but their room is kept for 2 task(s) of jobs ahead in the fair-share queue");
        assert_eq!(changed_rx.try_recv().ok().as_deref(), Some("team-b/small"), "the job the room is kept for is woken");
        let placed = d.sync(&small, &exec_policy(2, 1000), None).await.unwrap();
        assert_eq!((placed.placed, placed.unplaced), (2, None));
    }

    /// A wasm job of `tasks` tasks with `replicas` copies each, 500m per copy.
    fn replicated_policy(tasks: u32, replicas: u32) -> JobPolicy {
        let source = crate::job::ModuleSource::Url { url: "https://example.com/m.wasm".into(), sha256: "0".repeat(64) };
        JobPolicy {
            workload: TaskWorkload::Wasm { source, args: vec![], env: vec![] },
            placement: crate::job::PlacementPolicy { replicas, ..Default::default() },
            ..exec_policy(tasks, 500)
        }
    }

    /// Connects `node` (1 cpu, 1Gi, wasm) owned by `owner`; returns its session's receiver.
    fn provider(fleet: &Fleet, node: &str, owner: &str) -> mpsc::Receiver<std::result::Result<v1::OperatorMessage, tonic::Status>> {
        let (tx, rx) = mpsc::channel(16);
        let facts = NodeFacts {
            capacity: Resources { cpu_millis: 1000, memory_bytes: 1 << 30, ephemeral_bytes: 0 },
            runtimes: vec!["wasm".into()],
            ..Default::default()
        };
        fleet.connect(node, facts, tx);
        fleet.set_admin(node, crate::fleet::NodeAdmin { owner: owner.into(), ..Default::default() });
        rx
    }

    #[tokio::test]
    async fn a_three_replica_job_puts_each_round_on_three_owners_and_says_why_when_there_are_two() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let fleet = Arc::new(Fleet::default());
        let (changed, _changed_rx) = mpsc::channel(16);
        let _sessions = [provider(&fleet, "alice-1", "alice"), provider(&fleet, "alice-2", "alice"), provider(&fleet, "bob-1", "bob")];
        let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
        let j = job("team-a", "rep");

        // Three nodes, two owners: nothing is placed, not even two of the three copies.
        let waiting = d.sync(&j, &replicated_policy(2, 3), None).await.unwrap();
        let why = "3/3 nodes can run it, but they belong to 2 owner(s) and each task needs 3 replicas on distinct providers and owners";
        assert_eq!((waiting.placed, waiting.unplaced.unwrap().to_string()), (0, why.to_string()));
        assert_eq!(d.explain(&replicated_policy(2, 3)).unwrap().to_string(), why);
        assert!(store.attempts_for_job("rep").unwrap().is_empty());
        assert_eq!(fleet.pool().reservations(), 0);

        // A third owner arrives: both tasks run, each copy on another owner.
        let mut carol = provider(&fleet, "carol-1", "carol");
        let synced = d.sync(&j, &replicated_policy(2, 3), None).await.unwrap();
        assert_eq!((synced.placed, synced.unplaced.map(|e| e.to_string())), (6, None));
        assert_eq!(synced.progress.counts.running, 2, "counts are tasks");
        let owner = |node: &str| node.split('-').next().unwrap().to_string();
        for index in 0..2 {
            let round: Vec<&Attempt> = synced.attempts.iter().map(|a| &**a).filter(|a| a.index == index).collect();
            assert_eq!(round.iter().map(|a| (a.number, a.replica)).collect::<Vec<_>>(), vec![(1, 0), (1, 1), (1, 2)]);
            assert_eq!(round.iter().map(|a| a.id.clone()).collect::<Vec<_>>(), (0..3).map(|k| replica_attempt_id("rep", index, 1, k)).collect::<Vec<_>>());
            let owners: HashSet<String> = round.iter().map(|a| owner(&a.node)).collect();
            assert_eq!(owners.len(), 3, "{round:?}");
        }
        let Some(Ok(v1::OperatorMessage { kind: Some(OpKind::Assign(assign)) })) = carol.try_recv().ok() else { panic!("carol got no assignment") };
        assert!(assign.attempt_id.starts_with("rep.") && assign.task_count == 2);

        // Their budget counts every copy: 3 copies of a 1-core hour task cost up to 3 credits.
        let mut d = d;
        d.rates = Arc::new(RateBook::new(pricing::Rates { cpu_core_hour: Micros(1_000_000), ..Default::default() }));
        let hour = JobPolicy { cpu_millis: 1000, task_timeout: Duration::from_secs(3600), budget: Some(Micros(5_000_000)), ..replicated_policy(4, 3) };
        assert_eq!(d.budget_admits(&hour, &[], Micros(0), 4).0, 1, "5 credits admit one task of three copies");
        assert_eq!(
            d.budget_admits(&JobPolicy { placement: crate::job::PlacementPolicy { replicas: 1, ..Default::default() }, ..hour }, &[], Micros(0), 4).0,
            4
        );
    }

    #[tokio::test]
    async fn a_restarted_operator_does_not_offer_a_running_attempts_gpu_or_disk_before_its_job_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let gpu_node = |fleet: &Fleet| {
            let (tx, rx) = mpsc::channel(16);
            let facts = NodeFacts {
                capacity: Resources { cpu_millis: 8000, memory_bytes: 16 << 30, ephemeral_bytes: 30 << 30 },
                gpus: vec![crate::scheduler::Gpu { model: "a100".into(), memory_bytes: 80 << 30 }],
                runtimes: vec!["exec".into()],
                ..Default::default()
            };
            fleet.connect("g1", facts, tx);
            rx
        };
        let gpu = crate::scheduler::GpuRequest { count: 1, model: Some(crate::scheduler::GpuPattern::parse("a100*").unwrap()), min_memory_bytes: 0 };
        let trainer = JobPolicy { gpu: gpu.clone(), ephemeral_bytes: 20 << 30, ..exec_policy(1, 1000) };
        {
            let fleet = Arc::new(Fleet::default());
            let _session = gpu_node(&fleet);
            let (changed, _rx) = mpsc::channel(16);
            let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
            assert_eq!(d.sync(&job("team-a", "trainer"), &trainer, None).await.unwrap().placed, 1);
            let held = store.attempt(&attempt_id("trainer", 0, 1)).unwrap().unwrap().held.unwrap();
            assert_eq!((held.gpu_mask, held.ephemeral_bytes), (1, 20 << 30));
        }

        // The operator restarts; another job syncs first. The trainer has not synced since.
        let fleet = Arc::new(Fleet::default());
        let _session = gpu_node(&fleet);
        let (changed, _rx) = mpsc::channel(16);
        let d = Dispatcher::new(store, fleet.clone(), changed);
        let other_gpu = d.sync(&job("team-b", "other"), &JobPolicy { gpu, ..exec_policy(1, 1000) }, None).await.unwrap();
        assert_eq!((other_gpu.placed, other_gpu.unplaced.unwrap().to_string()), (0, "0/1 nodes can run it: 1 no free GPU matching a100*".to_string()));
        let other_disk = d.sync(&job("team-b", "scratch"), &JobPolicy { ephemeral_bytes: 20 << 30, ..exec_policy(1, 1000) }, None).await.unwrap();
        assert_eq!(other_disk.unplaced.unwrap().to_string(), "0/1 nodes can run it: 1 insufficient ephemeral storage (need 20Gi)");
        let allocated = fleet.pool().allocation("g1");
        assert_eq!((allocated.gpus, allocated.resources.ephemeral_bytes), (1, 20 << 30));
    }

    #[tokio::test]
    async fn a_failed_copy_cancels_its_twin_and_copies_that_keep_disagreeing_fail_the_job_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let fleet = Arc::new(Fleet::default());
        let (changed, _changed_rx) = mpsc::channel(16);
        let mut sessions = [provider(&fleet, "alice-1", "alice"), provider(&fleet, "bob-1", "bob")];
        let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
        let j = job("team-a", "twin");
        let policy = JobPolicy { max_attempts: 2, backoff: Duration::ZERO, ..replicated_policy(1, 2) };
        let update = |id: String, state: v1::AttemptState, digest: &str| v1::TaskUpdate {
            attempt_id: id,
            state: state as i32,
            result: Some(v1::TaskResult { exit_code: 0, output_sha256: digest.repeat(64), ..Default::default() }),
            ..Default::default()
        };
        let node_of = |id: &str| store.attempt(id).unwrap().unwrap().node;

        assert_eq!(d.sync(&j, &policy, None).await.unwrap().placed, 2);
        let (first, twin) = (replica_attempt_id("twin", 0, 1, 0), replica_attempt_id("twin", 0, 1, 1));
        d.on_update(&node_of(&twin), &[0; 32], &update(twin.clone(), v1::AttemptState::Failed, "a")).await.unwrap();
        for s in sessions.iter_mut() {
            while s.try_recv().is_ok() {}
        }

        // The failed copy fails the round: its twin is cancelled on its node, a new round starts.
        let synced = d.sync(&j, &policy, None).await.unwrap();
        assert_eq!(store.attempt(&first).unwrap().unwrap().phase, AttemptPhase::Cancelled);
        let cancelled: Vec<String> = sessions
            .iter_mut()
            .flat_map(|s| std::iter::from_fn(|| s.try_recv().ok()))
            .filter_map(|m| match m.ok()?.kind? {
                OpKind::Cancel(c) => Some(format!("{}: {}", c.attempt_id, c.reason)),
                _ => None,
            })
            .collect();
        assert_eq!(cancelled, vec![format!("{first}: not needed any more: its task succeeded, or another copy of its round failed, disagreed or stopped")]);
        assert_eq!((synced.placed, synced.progress.counts.running), (2, 1));

        // The second round's copies disagree: the task has used its two attempts.
        for (k, digest) in [(0, "a"), (1, "b")] {
            let id = replica_attempt_id("twin", 0, 2, k);
            d.on_update(&node_of(&id), &[0; 32], &update(id.clone(), v1::AttemptState::Succeeded, digest)).await.unwrap();
        }
        let done = d.sync(&j, &policy, None).await.unwrap();
        assert_eq!(done.progress.phase, JobPhase::Failed);
        let Some(crate::job::progress::FailureCause::ResultsDisagree { failed, first }) = done.progress.failure else { panic!("{:?}", done.progress.failure) };
        assert_eq!((failed, first.index, first.number), (vec![0], 0, 2));
        let mut nodes: Vec<String> = first.answers.iter().map(|a| a.node.clone()).collect();
        nodes.sort();
        assert_eq!(nodes, vec!["alice-1", "bob-1"]);
        assert_eq!(fleet.pool().reservations(), 0, "every copy's room is free");
    }
}
