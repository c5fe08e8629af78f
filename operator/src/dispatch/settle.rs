//! Keeping a running job's memory flat: the tasks it finished leave memory as index ranges
//! (settled), and what its status recorded as done counts as done (a lost store re-runs nothing).

use std::sync::Arc;

use super::Dispatcher;
use crate::attempt::Attempt;
use crate::job::status::RECENT_RESULTS;
use crate::job::{Progress, Recorded};

/// Attempts a job keeps in memory before its succeeded tasks are settled. Small jobs never
/// reach it, so they keep every attempt until they end (and their syncs return them all); a
/// large job settles in batches of hundreds, so settling costs little per task. Every sync walks
/// the attempts in memory several times (verdicts, checks, budget, conduct), so this bounds a
/// sync's cost: at 4,096 a 10,000-task job's syncs walked about 2,000 attempts each on average.
pub const SETTLE_ABOVE: usize = 1024;

impl Dispatcher {
    /// What is known to be done of a job besides its attempts in memory: what its status
    /// recorded and what this operator settled.
    pub(super) fn known(&self, job_uid: &str, recorded: &Recorded) -> Recorded {
        let mut known = self.store.settled(job_uid);
        known.merge(recorded);
        known
    }

    /// Once the job holds more than [`SETTLE_ABOVE`] attempts, lets go of the attempts of its
    /// succeeded tasks (the store keeps them), except those of the most recent results, which
    /// the status shows. Returns how many attempts left memory.
    pub(super) fn settle_finished(&self, job_uid: &str, progress: &Progress, attempts: &[Arc<Attempt>]) -> usize {
        if attempts.len() <= SETTLE_ABOVE {
            return 0;
        }
        let mut recent: Vec<(i64, u32)> = attempts.iter().filter_map(|a| a.finished_ms.map(|f| (f, a.index))).collect();
        let keep = recent.len().saturating_sub(RECENT_RESULTS);
        if keep > 0 {
            recent.select_nth_unstable(keep - 1);
        }
        let mut kept: Vec<u32> = recent[keep..].iter().map(|(_, i)| *i).collect();
        kept.sort_unstable();
        let mut done: Vec<u32> =
            attempts.iter().map(|a| a.index).filter(|i| progress.completed.binary_search(i).is_ok() && kept.binary_search(i).is_err()).collect();
        done.dedup();
        self.store.settle(job_uid, &done)
    }
}
