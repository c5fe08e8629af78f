//! Verification in the dispatcher: deciding once per result whether a sampled one is checked,
//! placing the extra copies rounds ask for, and recording who agreed and who was outvoted.
//! The decisions themselves are the pure functions of `kommune_core::job::verification`.

use std::collections::HashMap;

use tracing::{debug, info, warn};

use super::{Dispatcher, JobRef, ModuleRef, Result, build, namespace_of};
use crate::attempt::{Attempt, AttemptPhase, replica_attempt_id};
use crate::job::JobPolicy;
use crate::job::progress::Extension;
use crate::scheduler::{Explanation, Placement, Request};
use kommune_core::job::verification::{draw, should_check, trust};
use kommune_core::reputation::{Observation, Observed};
use kommune_ledger::payout::PayoutError;
use kommune_store::ledger::LedgerError;
use kommune_store::ledger::settle::ReceiptKey;

/// How many of a provider's newest observations its trust is computed from.
pub const TRUST_WINDOW: u32 = 512;

impl Dispatcher {
    /// Whether each lone result of a sampled round (spot check, adaptive) is checked, by
    /// attempt id. Decided once, after the result arrived (so the provider could not know),
    /// and kept: in memory, and for a result accepted unchecked as its `Unverified`
    /// observation, so a restarted operator does not draw again for it. A check, once decided,
    /// is kept by the extra copy it placed.
    pub(super) async fn decide_checks(&self, policy: &JobPolicy, attempts: &[std::sync::Arc<Attempt>]) -> Result<HashMap<String, bool>> {
        let mut out = HashMap::new();
        if !policy.round_rule().sampled {
            return Ok(out);
        }
        let class = policy.workload.class();
        for round in attempts.chunk_by(|a, b| (a.index, a.number) == (b.index, b.number)) {
            let [a] = round else { continue };
            if a.phase != AttemptPhase::Succeeded {
                continue;
            }
            if let Some(&c) = self.checks.lock().expect("checks lock").get(&a.id) {
                out.insert(a.id.clone(), c);
                continue;
            }
            let record = self.store.observations_of(&a.node, TRUST_WINDOW).await?;
            let accepted_before = record.iter().any(|o| o.attempt_id == a.id && o.observed == Observed::Unverified);
            let check = !accepted_before && should_check(&policy.verification.mode, trust(&record, &a.node, &class), draw(self.verification_key, &a.id));
            self.checks.lock().expect("checks lock").insert(a.id.clone(), check);
            out.insert(a.id.clone(), check);
        }
        Ok(out)
    }

    /// Places the extra copies of running rounds, each on an owner none of the round's other
    /// copies has. Returns (copies handed to nodes, why one could not be placed).
    pub(super) async fn place_extensions(
        &self,
        job: &JobRef,
        policy: &JobPolicy,
        module: Option<&ModuleRef>,
        request: &Request,
        extensions: &[Extension],
        now: i64,
    ) -> Result<(usize, Option<Explanation>)> {
        let (mut sent, mut unplaced) = (0, None);
        for ext in extensions {
            let ids: Vec<String> = (0..ext.count).map(|k| replica_attempt_id(&job.uid, ext.index, ext.number, ext.first_replica + k)).collect();
            let r = Request { replicas: ext.count, distinct_from: ext.nodes.clone(), ..request.clone() };
            let nodes = match self.fleet.pool().place(&r, &ids, namespace_of(&job.key), crate::scheduler::pool::salt(&ids[0])) {
                Ok(nodes) => nodes,
                Err(why) => {
                    unplaced = Some(*why);
                    continue;
                }
            };
            let gpu_masks: HashMap<&str, u64> = {
                let pool = self.fleet.pool();
                ids.iter().map(|id| (id.as_str(), pool.held_gpus(id).unwrap_or(0))).collect()
            };
            let placed = [Placement { task: 0, nodes }];
            let rounds = build::Rounds {
                job,
                resources: request.resources,
                slots: &[(ext.index, ext.number)],
                ids: std::slice::from_ref(&ids),
                placed: &placed,
                gpu_masks: &gpu_masks,
                now_ms: now,
            };
            // `build` numbers copies from 0; these continue the round's numbering.
            let new: Vec<Attempt> =
                build::attempts(&rounds).into_iter().enumerate().map(|(k, a)| Attempt { replica: ext.first_replica + k as u32, ..a }).collect();
            self.persist(&new).await?;
            sent += self.send_assigns(job, policy, module, &new, now).await?;
            info!(job = %job.key, task = ext.index, copies = new.len(), "placed verification copies");
        }
        Ok((sent, unplaced))
    }

    /// Records the verification outcomes of the job's decided rounds (once per attempt and
    /// outcome), and refuses payment for outvoted results, and for results of the same
    /// provider on this job that were accepted unchecked before it was caught.
    pub(super) async fn record_verifications(
        &self,
        job: &JobRef,
        policy: &JobPolicy,
        observed: &[(String, Observed)],
        attempts: &[std::sync::Arc<Attempt>],
    ) -> Result<()> {
        let fresh: Vec<&(String, Observed)> = {
            let recorded = self.recorded.lock().expect("recorded lock");
            observed.iter().filter(|(id, o)| !recorded.contains(&(id.clone(), *o))).collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let node_of: HashMap<&str, &str> = attempts.iter().map(|a| (a.id.as_str(), a.node.as_str())).collect();
        let (class, now) = (policy.workload.class(), kommune_proto::now_ms());
        let observations: Vec<Observation> = fresh
            .iter()
            .filter_map(|(id, o)| {
                let node = node_of.get(id.as_str())?;
                Some(Observation {
                    node: node.to_string(),
                    workload: class.clone(),
                    job_uid: job.uid.clone(),
                    attempt_id: id.clone(),
                    observed: *o,
                    at_ms: now,
                })
            })
            .collect();
        let outvoted: Vec<&Observation> = observations.iter().filter(|o| o.observed == Observed::Outvoted).collect();
        // Attempts whose reversal failed: not marked recorded, so the job's next sync tries again.
        let mut unreversed: Vec<String> = vec![];
        for o in &outvoted {
            unreversed.extend(
                self.refuse_payment(std::slice::from_ref(&o.attempt_id), &format!("its result was outvoted by a quorum of other providers (job {})", job.key))
                    .await,
            );
            // Its unchecked results on this job are disproved with it.
            let unchecked: Vec<String> = observed
                .iter()
                .filter(|(id, kind)| *kind == Observed::Unverified && node_of.get(id.as_str()) == Some(&o.node.as_str()))
                .map(|(id, _)| id.clone())
                .collect();
            if !unchecked.is_empty() {
                unreversed.extend(self.refuse_payment(&unchecked, &format!("a later check of node {}'s work on job {} was outvoted", o.node, job.key)).await);
            }
        }
        self.observe(observations).await?;
        self.recorded.lock().expect("recorded lock").extend(fresh.into_iter().filter(|(id, _)| !unreversed.contains(id)).cloned());
        Ok(())
    }

    /// Payment for these attempts' results is refused: an outvoted result is not paid, and a
    /// result accepted unchecked whose provider a later check on the same job disproved is
    /// reversed (a new ledger entry, never an edit).
    /// Returns the attempts whose reversal could not be written.
    pub(super) async fn refuse_payment(&self, attempt_ids: &[String], reason: &str) -> Vec<String> {
        let mut failed = vec![];
        let Some(ledger) = &self.ledger else { return failed };
        for id in attempt_ids {
            match ledger.reverse(ReceiptKey::Attempt(id.clone()), reason).await {
                Ok(r) if r.created => info!(attempt = %id, node = %r.node, credits = %r.credits, reversal = r.seq, reason, "payment refused: receipt reversed"),
                Ok(_) => {}
                // No receipt metered it (none sent, or it was rejected): nothing was to be paid.
                Err(LedgerError::Payout(PayoutError::NoReceiptForAttempt(_))) => debug!(attempt = %id, "no receipt to reverse"),
                // Logged, not failed: the verdict stands, and the next sync of the job retries
                // (a reversal is idempotent).
                Err(e) => {
                    warn!(attempt = %id, error = %e, reason, "cannot reverse the receipt of a result that failed verification");
                    failed.push(id.clone());
                }
            }
        }
        failed
    }

    /// Drops what verification keeps in memory for a job.
    pub(super) fn forget_verification(&self, job_uid: &str) {
        let prefix = format!("{job_uid}.");
        self.checks.lock().expect("checks lock").retain(|id, _| !id.starts_with(&prefix));
        self.recorded.lock().expect("recorded lock").retain(|(id, _)| !id.starts_with(&prefix));
    }
}
