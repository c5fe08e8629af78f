//! What the operator observes about providers' attempts (verification outcomes, reliability):
//! stored first, so a restart rebuilds it, then applied to the standings and the quarantine.

use kommune_core::reputation::{Observation, Observed, Standing};
use tracing::{info, warn};

use super::{Dispatcher, Result};
use crate::attempt::{Attempt, AttemptPhase};
use kommune_proto::now_ms;

/// Most observations of one node read to apply an admin's quarantine lift.
const LIFT_READ_LIMIT: u32 = 200_000;

/// What an attempt ending in `phase` says about its provider's reliability, when it ended by
/// the provider's doing or failing. A finished run is `Completed` whatever its exit code: a
/// task that crashes everywhere is the submitter's failure, not the provider's. Cancellations
/// (the operator's or the admin's choice) say nothing.
pub(super) fn reliability(phase: AttemptPhase) -> Option<Observed> {
    match phase {
        AttemptPhase::Succeeded | AttemptPhase::Failed => Some(Observed::Completed),
        AttemptPhase::Preempted => Some(Observed::Preempted),
        AttemptPhase::Lost => Some(Observed::Lost),
        _ => None,
    }
}

impl Dispatcher {
    /// Records observations: durably first, then in the in-memory standings (reputation for
    /// placement and scoring) and the quarantine check. Every observation goes through here.
    pub async fn observe(&self, observations: Vec<Observation>) -> Result<()> {
        if observations.is_empty() {
            return Ok(());
        }
        // A rebuild reads the store and replaces the standings: observations applied between
        // its read and its replacement would be lost, or counted twice.
        let _guard = self.observing.lock().await;
        self.store.observe(observations.clone()).await?;
        for (node, q) in self.fleet.observe(&observations, now_ms()) {
            warn!(%node, why = %q.why, "provider quarantined: no more tasks are placed there until an admin lifts it");
        }
        Ok(())
    }

    /// An observation of attempt `a`, at `now`.
    pub(super) fn observation(&self, a: &Attempt, observed: Observed, now: i64) -> Observation {
        let workload = self.limits(&a.job_uid).map_or_else(String::new, |j| j.workload.to_string());
        Observation { node: a.node.clone(), workload, job_uid: a.job_uid.clone(), attempt_id: a.id.clone(), observed, at_ms: now }
    }

    /// Records observations of attempts that just ended, logging a failed write rather than
    /// failing the transition that already happened (the attempt is finished either way; one
    /// observation less only makes a standing a little less informed).
    pub(super) async fn observe_ended(&self, ended: &[(&Attempt, Observed)], now: i64) {
        let observations = ended.iter().map(|(a, o)| self.observation(a, *o, now)).collect();
        if let Err(e) = self.observe(observations).await {
            warn!(error = %e, "cannot record what providers' attempts showed; their standings miss it");
        }
    }

    /// Rebuilds every node's standing from the observations of the last few half-lives.
    pub(super) async fn rebuild_standings(&self) -> Result<()> {
        let _guard = self.observing.lock().await;
        let now = now_ms();
        let observations = self.store.observations_since(now.saturating_sub(self.fleet.reputation_model().decay.window_ms())).await?;
        for (node, q) in self.fleet.rebuild_standings(&observations, now) {
            warn!(%node, why = %q.why, "provider quarantined: no more tasks are placed there until an admin lifts it");
        }
        info!(observations = observations.len(), "provider standings rebuilt");
        Ok(())
    }

    /// Applies an admin's quarantine lift (`spec.quarantineLiftedAt`, Unix ms) once: the
    /// node's verification outcomes before it no longer count towards quarantine, and a
    /// quarantine that began before it ends. Read from the store, so a lift is exact after a
    /// restart too. Returns whether a quarantine ended.
    pub async fn apply_quarantine_lift(&self, node: &str, lifted_ms: i64) -> Result<bool> {
        if self.fleet.lift_applied(node) == Some(lifted_ms) {
            return Ok(false);
        }
        let _guard = self.observing.lock().await;
        let decay = self.fleet.reputation_model().decay;
        let since = now_ms().saturating_sub(decay.window_ms());
        let mut before = Standing::default();
        for o in self.store.observations_of(node, LIFT_READ_LIMIT).await? {
            if o.at_ms < lifted_ms && o.at_ms >= since {
                before.record(o.observed, o.at_ms, decay);
            }
        }
        let ended = self.fleet.apply_lift(node, lifted_ms, before);
        if ended {
            info!(node, "quarantine lifted by an admin");
        }
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_providers_doing_is_a_reliability_observation() {
        assert_eq!(reliability(AttemptPhase::Succeeded), Some(Observed::Completed));
        assert_eq!(reliability(AttemptPhase::Failed), Some(Observed::Completed), "a non-zero exit is the submitter's");
        assert_eq!(reliability(AttemptPhase::Preempted), Some(Observed::Preempted));
        assert_eq!(reliability(AttemptPhase::Lost), Some(Observed::Lost));
        assert_eq!(reliability(AttemptPhase::Cancelled), None);
    }
}
