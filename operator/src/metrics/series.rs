//! Every series the operator exports, registered once, with one method per thing that
//! happens (a reconcile, a placement, a receipt), so call sites stay one line.

use std::borrow::Cow;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::attempt::AttemptPhase;
use crate::ledger::Verdict;
use crate::ledger::check::Rejection;
use crate::scheduler::Explanation;

/// Label values are fixed names (`&'static str`) or, for enums named by their Debug text,
/// owned strings from a bounded set.
type Value = Cow<'static, str>;
type Labels<const N: usize> = [(&'static str, Value); N];

fn label(v: &'static str) -> Value {
    Cow::Borrowed(v)
}

/// `InsufficientCpu` → `insufficient_cpu`: how an enum variant becomes a label value.
pub fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// An attempt phase as a label value: lower case, as Prometheus labels usually are.
fn phase_label(phase: AttemptPhase) -> &'static str {
    match phase {
        AttemptPhase::Assigned => "assigned",
        AttemptPhase::Running => "running",
        AttemptPhase::Succeeded => "succeeded",
        AttemptPhase::Failed => "failed",
        AttemptPhase::Cancelled => "cancelled",
        AttemptPhase::Preempted => "preempted",
        AttemptPhase::Lost => "lost",
    }
}

/// Attempt phases that end an attempt, as labels.
const ENDED: [AttemptPhase; 5] = [AttemptPhase::Succeeded, AttemptPhase::Failed, AttemptPhase::Cancelled, AttemptPhase::Preempted, AttemptPhase::Lost];
/// Runtimes a job names (`kommune_proto::runtime`), plus "unknown" for attempts of a job this
/// operator has not synced since it started.
const RUNTIMES: [&str; 3] = [kommune_proto::runtime::WASM, kommune_proto::runtime::EXEC, kommune_proto::runtime::CONTAINER];

/// The operator's series. Counters are named without `_total`: the encoder appends it.
#[derive(Debug)]
pub struct Series {
    pub reconciles: Family<Labels<1>, Counter>,
    pub reconcile_errors: Family<Labels<1>, Counter>,
    pub reconcile_duration: Histogram,
    pub placement_decisions: Family<Labels<1>, Counter>,
    pub placement_duration: Histogram,
    pub unschedulable: Family<Labels<1>, Counter>,
    pub agents_connected: Gauge,
    pub sessions_opened: Counter,
    pub sessions_closed: Family<Labels<1>, Counter>,
    pub heartbeat_lag: Histogram,
    pub attempts_started: Family<Labels<1>, Counter>,
    pub attempts_retried: Family<Labels<1>, Counter>,
    pub attempts_ended: Family<Labels<2>, Counter>,
    pub receipts: Family<Labels<1>, Counter>,
    pub receipts_rejected: Family<Labels<1>, Counter>,
    pub ledger_append_duration: Histogram,
    pub ledger_head_sequence: Gauge,
    pub store_size_bytes: Gauge,
    pub blobs_size_bytes: Gauge,
    pub blobs: Gauge,
    pub gateway_messages: Family<Labels<2>, Counter>,
    pub gateway_bytes: Family<Labels<1>, Counter>,
    pub output_bytes: Counter,
    pub live_log_chunks: Family<Labels<1>, Counter>,
    pub node_writes: Family<Labels<1>, Counter>,
}

/// 1 ms to about 16 s: reconciles, placements and ledger appends.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Series {
    pub fn register(r: &mut Registry) -> Series {
        let s = Series {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: latency(),
            placement_decisions: Family::default(),
            placement_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            unschedulable: Family::default(),
            agents_connected: Gauge::default(),
            sessions_opened: Counter::default(),
            sessions_closed: Family::default(),
            // 10 ms to about 40 s late.
            heartbeat_lag: Histogram::new(exponential_buckets(0.01, 2.0, 13)),
            attempts_started: Family::default(),
            attempts_retried: Family::default(),
            attempts_ended: Family::default(),
            receipts: Family::default(),
            receipts_rejected: Family::default(),
            ledger_append_duration: latency(),
            ledger_head_sequence: Gauge::default(),
            store_size_bytes: Gauge::default(),
            blobs_size_bytes: Gauge::default(),
            blobs: Gauge::default(),
            gateway_messages: Family::default(),
            gateway_bytes: Family::default(),
            output_bytes: Counter::default(),
            live_log_chunks: Family::default(),
            node_writes: Family::default(),
        };
        r.register(
            "provider_node_writes",
            "ProviderNode writes from gateway events (a node's create, status apply or delete), by outcome: ok, retried (failed or timed out; tried again with backoff), given_up (refused as invalid, or a panic)",
            s.node_writes.clone(),
        );
        r.register(
            "live_log_chunks",
            "Live stdout/stderr chunks from agents, by outcome (accepted, or why dropped: not_held, ended, oversize, gap, overlap, capped, full, bad_stream)",
            s.live_log_chunks.clone(),
        );
        r.register("output_bytes", "Bytes of task outputs recorded with attempts' results (spec.outputs), wherever stored", s.output_bytes.clone());
        r.register("reconciles", "ComputeJob reconciles finished, by result (success, error)", s.reconciles.clone());
        r.register("reconcile_errors", "ComputeJob reconciles that failed, by step", s.reconcile_errors.clone());
        r.register("reconcile_duration_seconds", "Time one ComputeJob reconcile took", s.reconcile_duration.clone());
        r.register("placement_decisions", "Tasks the scheduler placed or could not place, by outcome", s.placement_decisions.clone());
        r.register("placement_duration_seconds", "Time the scheduler took to place one job's batch of tasks", s.placement_duration.clone());
        r.register(
            "unschedulable_reasons",
            "Placements that left tasks waiting, by why nodes were excluded (one count per reason per placement)",
            s.unschedulable.clone(),
        );
        r.register("agents_connected", "Agents with a live session on this operator", s.agents_connected.clone());
        r.register("agent_sessions_opened", "Agent sessions opened (after Hello)", s.sessions_opened.clone());
        r.register("agent_sessions_closed", "Agent sessions closed, by reason", s.sessions_closed.clone());
        r.register("agent_heartbeat_lag_seconds", "How much later than the heartbeat interval each heartbeat arrived", s.heartbeat_lag.clone());
        r.register("attempts_started", "Task attempts placed on nodes, by runtime", s.attempts_started.clone());
        r.register("attempts_retried", "Task attempts placed again after an earlier attempt of the task ended, by runtime", s.attempts_retried.clone());
        r.register("attempts_ended", "Task attempts ended, by phase and runtime", s.attempts_ended.clone());
        r.register("receipts", "Usage receipts submitted to the ledger, by verdict (accepted, duplicate, rejected)", s.receipts.clone());
        r.register("receipts_rejected", "Usage receipts the ledger rejected, by the rule they broke", s.receipts_rejected.clone());
        r.register("ledger_append_duration_seconds", "Time from submitting a receipt to its verdict being durable", s.ledger_append_duration.clone());
        r.register("ledger_head_sequence", "Sequence number of the newest ledger entry this operator appended", s.ledger_head_sequence.clone());
        r.register("store_size_bytes", "Size of the SQLite attempt store and ledger files on the operator's volume", s.store_size_bytes.clone());
        r.register("blobs_size_bytes", "Size of the module blobs on the operator's volume", s.blobs_size_bytes.clone());
        r.register("blobs", "Module blobs on the operator's volume", s.blobs.clone());
        r.register("gateway_messages", "Session messages through the gateway, by direction (received, sent) and kind", s.gateway_messages.clone());
        r.register("gateway_message_bytes", "Encoded bytes of session messages through the gateway, by direction", s.gateway_bytes.clone());
        s.initialise();
        s
    }

    /// Creates the bounded series at zero, so a rate over them exists before the first event
    /// and a dashboard shows 0, not "no data".
    fn initialise(&self) {
        for result in ["success", "error"] {
            let _ = self.reconciles.get_or_create(&[("result", label(result))]);
        }
        for outcome in ["placed", "unschedulable"] {
            let _ = self.placement_decisions.get_or_create(&[("outcome", label(outcome))]);
        }
        for runtime in RUNTIMES {
            let _ = self.attempts_started.get_or_create(&[("runtime", label(runtime))]);
            let _ = self.attempts_retried.get_or_create(&[("runtime", label(runtime))]);
            for phase in ENDED {
                let _ = self.attempts_ended.get_or_create(&[("phase", label(phase_label(phase))), ("runtime", label(runtime))]);
            }
        }
        for verdict in ["accepted", "duplicate", "rejected"] {
            let _ = self.receipts.get_or_create(&[("verdict", label(verdict))]);
        }
        for kind in Rejection::KINDS {
            let _ = self.receipts_rejected.get_or_create(&[("reason", label(kind))]);
        }
        for direction in ["received", "sent"] {
            let _ = self.gateway_bytes.get_or_create(&[("direction", label(direction))]);
        }
    }

    /// A ComputeJob reconcile finished.
    pub fn reconciled(&self, took: Duration, ok: bool) {
        self.reconciles.get_or_create(&[("result", label(if ok { "success" } else { "error" }))]).inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// A reconcile failed at `step` (the error's label, a fixed set).
    pub fn reconcile_error(&self, step: &'static str) {
        self.reconcile_errors.get_or_create(&[("error", label(step))]).inc();
    }

    /// The scheduler placed `placed` of `wanted` tasks in `took`; `why` says why the rest wait.
    pub fn placement(&self, wanted: usize, placed: usize, took: Duration, why: Option<&Explanation>) {
        self.placement_duration.observe(took.as_secs_f64());
        self.placement_decisions.get_or_create(&[("outcome", label("placed"))]).inc_by(placed as u64);
        let waiting = wanted.saturating_sub(placed) as u64;
        if waiting == 0 {
            return;
        }
        self.placement_decisions.get_or_create(&[("outcome", label("unschedulable"))]).inc_by(waiting);
        let Some(why) = why else { return };
        for (exclusion, nodes) in &why.excluded {
            if *nodes > 0 {
                self.unschedulable.get_or_create(&[("reason", Cow::Owned(snake_case(&format!("{exclusion:?}"))))]).inc();
            }
        }
        if why.owners.is_some() {
            self.unschedulable.get_or_create(&[("reason", label("too_few_owners"))]).inc();
        }
        if why.held_for_others > 0 {
            self.unschedulable.get_or_create(&[("reason", label("held_for_others"))]).inc();
        }
    }

    /// An attempt was placed; `number` > 1 means an earlier attempt of its task ended.
    pub fn attempt_started(&self, runtime: &'static str, number: u32) {
        self.attempts_started.get_or_create(&[("runtime", label(runtime))]).inc();
        if number > 1 {
            self.attempts_retried.get_or_create(&[("runtime", label(runtime))]).inc();
        }
    }

    /// An attempt ended in `phase` (counted once, by whoever finished it in the store).
    pub fn attempt_ended(&self, phase: AttemptPhase, runtime: Option<&'static str>) {
        let runtime = label(runtime.unwrap_or("unknown"));
        self.attempts_ended.get_or_create(&[("phase", label(phase_label(phase))), ("runtime", runtime)]).inc();
    }

    /// The ledger decided a receipt after `took`.
    pub fn receipt(&self, verdict: &Verdict, took: Duration) {
        self.ledger_append_duration.observe(took.as_secs_f64());
        let name = match verdict {
            Verdict::Accepted { seq, .. } => {
                // Appends finish out of order across sessions: the head only moves forward.
                self.ledger_head_sequence.inner().fetch_max(i64::try_from(*seq).unwrap_or(i64::MAX), std::sync::atomic::Ordering::Relaxed);
                "accepted"
            }
            Verdict::Duplicate { .. } => "duplicate",
            Verdict::Rejected { kind, .. } => {
                self.receipts_rejected.get_or_create(&[("reason", label(kind))]).inc();
                "rejected"
            }
        };
        self.receipts.get_or_create(&[("verdict", label(name))]).inc();
    }

    /// An attempt's result recorded `bytes` of outputs.
    pub fn outputs_stored(&self, bytes: u64) {
        self.output_bytes.inc_by(bytes);
    }

    /// A live log chunk was accepted or dropped (`outcome`, one of a fixed set).
    pub fn live_log_chunk(&self, outcome: &'static str) {
        self.live_log_chunks.get_or_create(&[("outcome", label(outcome))]).inc();
    }

    /// A ProviderNode write from gateway events ended with `outcome` (ok, retried, given_up).
    pub fn node_write(&self, outcome: &'static str) {
        self.node_writes.get_or_create(&[("outcome", label(outcome))]).inc();
    }

    /// A session opened (its Hello was accepted).
    pub fn session_opened(&self) {
        self.sessions_opened.inc();
    }

    /// A session closed for `reason` (one of a fixed set; see the gateway's session loop).
    pub fn session_closed(&self, reason: &'static str) {
        self.sessions_closed.get_or_create(&[("reason", label(reason))]).inc();
    }

    /// A heartbeat arrived `gap` after the previous one, when `interval` was asked for.
    pub fn heartbeat(&self, gap: Duration, interval: Duration) {
        self.heartbeat_lag.observe(gap.saturating_sub(interval).as_secs_f64());
    }

    /// A session message of `kind` and `bytes` encoded bytes went `direction` ("received" or "sent").
    pub fn message(&self, direction: &'static str, kind: &'static str, bytes: usize) {
        self.gateway_messages.get_or_create(&[("direction", label(direction)), ("kind", label(kind))]).inc();
        self.gateway_bytes.get_or_create(&[("direction", label(direction))]).inc_by(bytes as u64);
    }
}
