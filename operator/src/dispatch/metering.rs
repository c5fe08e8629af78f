//! Metering: usage receipts into the ledger, a job's metered usage for its status, and how
//! many more tasks its budget admits.

use std::sync::Arc;

use kommune_proto::v1;
use tracing::warn;

use super::{Dispatcher, Result};
use crate::attempt::Attempt;
use crate::bounds;
use crate::job::JobPolicy;
use crate::ledger::Verdict;
use crate::ledger::check::{AttemptFacts, ReceiptInput};
use crate::pricing::{BudgetCheck, Micros};
use kommune_proto::now_ms;

/// Longest rejection reason sent back in an Ack.
const REASON_LIMIT: usize = 512;

/// What the ledger made of a receipt, as the Ack tells the agent.
#[derive(Debug, Default)]
pub(super) struct Metered {
    /// Why it was rejected; empty when accepted (or there is no ledger).
    pub rejected: String,
    pub cost: Micros,
    /// The receipt's ledger entry (seq, hash) when accepted: what the provider checks its
    /// statement against.
    pub ledger: Option<(u64, [u8; 32])>,
}

impl Metered {
    pub fn ack(&self, attempt_id: &str) -> v1::Ack {
        let (ledger_seq, entry_hash) = self.ledger.map(|(s, h)| (s, h.to_vec())).unwrap_or_default();
        v1::Ack { attempt_id: attempt_id.to_string(), receipt_rejected: self.rejected.clone(), cost_micros: self.cost.0, ledger_seq, entry_hash }
    }
}

impl Dispatcher {
    /// The job's metered usage, for its status.
    pub(super) async fn job_usage(&self, job_uid: &str, budget: Option<Micros>) -> Result<Option<(crate::crd::JobUsage, Micros)>> {
        let Some(ledger) = &self.ledger else { return Ok(None) };
        let u = ledger.job_usage(job_uid).await?;
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
    pub(super) fn budget_admits(&self, policy: &JobPolicy, attempts: &[Arc<Attempt>], spent: Micros, wanted: usize) -> (usize, Option<String>) {
        let Some(budget) = policy.budget else { return (wanted, None) };
        // What each attempt may cost is what its receipt may claim and still be accepted.
        let reserved = attempts
            .iter()
            .filter(|a| !a.phase.is_terminal())
            .map(|a| bounds::worst_case(&self.usage_bounds(a), policy.task_timeout, &self.rates.for_node(&a.node)))
            .fold(Micros(0), Micros::saturating_add);
        // A task is a round of all its replicas, each of which may cost the worst case on
        // whichever node it lands (an exec task may use all of the largest one).
        let unplaced = bounds::for_attempt(&bounds::Assigned {
            runtime: Some(policy.workload.runtime()),
            cpu_millis: policy.cpu_millis,
            memory_bytes: policy.memory_bytes,
            gpus: policy.gpu.count,
            node_capacity: Some(self.fleet.largest_capacity()),
            timeout: Some(policy.task_timeout),
            output_files_bytes: Some(policy.outputs.as_ref().map_or(0, |o| o.max_attempt_bytes)),
        });
        let replica = bounds::worst_case(&unplaced, policy.task_timeout, &self.rates.ceiling());
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

    /// Puts a terminal update's usage receipt in the ledger. Returns what the Ack says of it.
    pub(super) async fn meter(&self, node: &str, public_key: &[u8; 32], a: &Attempt, receipt: Option<&v1::UsageReceipt>) -> Result<Metered> {
        let Some(ledger) = &self.ledger else { return Ok(Metered::default()) };
        let Some(receipt) = receipt else {
            warn!(node, attempt = %a.id, "terminal update without a usage receipt (an older agent?); nothing metered");
            return Ok(Metered { rejected: "the update carried no usage receipt".into(), ..Metered::default() });
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
                bounds: self.usage_bounds(a),
                observed_start_ms: a.created_ms,
                // The attempt cannot have run longer than from its placement to this report.
                observed_end_ms: now,
            },
            rates: self.rates.for_node(node),
            received_ms: now,
        };
        let started = std::time::Instant::now();
        let verdict = ledger.submit(input).await?;
        self.metrics.receipt(&verdict, started.elapsed());
        match verdict {
            Verdict::Accepted { seq, hash, cost } | Verdict::Duplicate { seq, hash, cost } => {
                Ok(Metered { cost, ledger: Some((seq, hash)), ..Metered::default() })
            }
            // The reason may quote what the agent sent (a node name from the body): bounded.
            Verdict::Rejected { reason, .. } => Ok(Metered { rejected: reason.chars().take(REASON_LIMIT).collect(), ..Metered::default() }),
        }
    }
}
