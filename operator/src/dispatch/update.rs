//! Agents' updates: a TaskUpdate becomes a durable attempt transition and a metered receipt,
//! and the Ack that tells the agent it may forget the result.

use kommune_proto::v1;
use tracing::{Instrument as _, debug, trace, warn};

use super::metering::Metered;
use super::wire::{self, Reported};
use super::{Dispatcher, Result};
use crate::STAGE;
use kommune_proto::now_ms;

impl Dispatcher {
    /// Applies an agent's TaskUpdate and returns the Ack to send, if any. A terminal update is
    /// acknowledged once its result is durable and its usage receipt is in the ledger
    /// (accepted, already there, or rejected with the reason), including repeats, so the agent
    /// stops resending; if either write fails nothing is acknowledged and the agent resends.
    /// `public_key` is the node's ed25519 key from its client certificate.
    #[tracing::instrument(skip_all, fields(node = %node, attempt = %update.attempt_id.chars().take(128).collect::<String>()))]
    pub async fn on_update(&self, node: &str, public_key: &[u8; 32], update: &v1::TaskUpdate) -> Result<Option<v1::Ack>> {
        let ack = |rejected: String| Metered { rejected, ..Metered::default() }.ack(&update.attempt_id);
        let Some(a) = self.store.attempt(&update.attempt_id).await? else {
            warn!(node, attempt = %wire::short(&update.attempt_id), "update for an unknown attempt; acknowledging so the agent drops it");
            return Ok(Some(ack("no such attempt is recorded by the operator".into())));
        };
        if a.node != node {
            warn!(node, attempt = %a.id, owner = %a.node, "update for an attempt placed on another node; ignored");
            return Ok(Some(ack(format!("attempt {} was not assigned to {node}", a.id))));
        }
        let phase = match wire::reported(update.state) {
            Reported::Running => {
                // No reconcile: Assigned and Running count alike in progress and status, so it
                // would change nothing (and it was half of all syncs of a busy job).
                // Handed over without waiting, so the session reads the agent's next message at
                // once: the store's thread applies it before anything queued after it.
                self.store.mark_running_soon(&a.id)?;
                return Ok(None);
            }
            Reported::Ended(phase) => phase,
            Reported::Unknown => {
                warn!(node, attempt = %a.id, state = update.state, "update without a known state; ignored");
                return Ok(None);
            }
        };
        let mut result = wire::bounded_result(update.result.as_ref());
        self.collected_outputs(&a, update.result.as_ref(), &mut result).await;
        // The result (store) and its receipt (ledger) are made durable at the same time, each
        // in a group commit shared with other sessions' updates; the Ack waits for both. If
        // either fails nothing is acknowledged and the agent resends: both are idempotent.
        let runtime = self.runtime_of(&a.id);
        let (finished, metered) = tokio::join!(
            async {
                let span = kommune_telemetry::span!("record", job = %a.job_key, task_index = a.index, attempt = %a.id, phase = phase.as_str());
                let r = self.store.finish_batched(&a.id, phase, &result, kommune_proto::now_ms()).instrument(span).await;
                trace!(target: STAGE, attempt = %a.id, "result stored");
                r
            },
            async {
                let span = kommune_telemetry::span!("receipt", job = %a.job_key, task_index = a.index, attempt = %a.id, node = %node);
                let r = self.meter(node, public_key, &a, update.receipt.as_ref()).instrument(span).await;
                trace!(target: STAGE, attempt = %a.id, "receipt recorded");
                r
            }
        );
        let finished = finished?;
        self.released(&a.id, phase, finished, runtime);
        if finished {
            // Counted once, by the update that recorded the result (a resent one is a repeat).
            self.metrics.outputs_stored(result.outputs.iter().map(|o| o.size).sum());
            debug!(node, attempt = %a.id, phase = phase.as_str(), exit = result.exit_code, "attempt finished");
            // Ran to an end (any exit code: a crash is the submitter's) or preempted.
            if let Some(o) = super::observe::reliability(phase) {
                self.observe_ended(&[(&a, o)], now_ms()).await;
            }
        }
        let metered = metered?;
        if !metered.rejected.is_empty() {
            warn!(node, attempt = %a.id, reason = %metered.rejected, "usage receipt rejected");
        }
        // After metering, so the reconcile this triggers sees the usage too.
        self.notify(&a.job_key);
        trace!(target: STAGE, attempt = %a.id, "job notified");
        Ok(Some(metered.ack(&update.attempt_id)))
    }
}
