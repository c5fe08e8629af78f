//! What is known of a job's tasks besides the attempts at hand: its published status (which
//! survives a lost store) and the tasks whose finished attempts left memory.

use super::TaskCounts;
use super::indexes::IndexSet;

/// What is known to be done besides the attempts at hand: the job's status as last published
/// (authoritative when the store lost its attempts: a replaced volume, a restored backup) and
/// the tasks whose finished attempts the dispatcher let go of to keep memory flat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Tasks that succeeded: done for good, whatever attempts remain.
    pub completed: IndexSet,
    /// Tasks that used up their attempts. Applies only to a task with no attempt at hand: the
    /// attempts count its failures against the current `maxAttempts` (an edited spec may allow
    /// more).
    pub failed: IndexSet,
    /// When the job's first attempt was created, so the job deadline survives too.
    pub started_ms: Option<i64>,
}

impl Recorded {
    /// Adds what `other` knows.
    pub fn merge(&mut self, other: &Recorded) {
        self.completed.extend(&other.completed);
        self.failed.extend(&other.failed);
        self.started_ms = match (self.started_ms, other.started_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Counts a run of tasks that have no attempt at hand: recorded ones as done, the rest as
/// pending on their first attempt (eligible now).
pub(super) struct Untried<'a> {
    pub recorded: &'a Recorded,
    pub eligible_cap: usize,
}

impl Untried<'_> {
    pub fn count(&self, from: u32, to: u32, counts: &mut TaskCounts, completed: &mut Vec<u32>, failed: &mut Vec<u32>, eligible: &mut Vec<(u32, u32)>) {
        let (done, lost) = (&self.recorded.completed, &self.recorded.failed);
        let mut at = from;
        while at < to {
            if let Some(end) = done.run_end(at) {
                let end = end.min(to - 1);
                counts.succeeded += end - at + 1;
                completed.extend(at..=end);
                at = end + 1;
            } else if let Some(end) = lost.run_end(at) {
                // Up to where a completed run starts: success wins over a stale failure.
                let end = done.next_after(at).map_or(end, |d| end.min(d - 1)).min(to - 1);
                counts.failed += end - at + 1;
                failed.extend(at..=end);
                at = end + 1;
            } else {
                let next = [done.next_after(at), lost.next_after(at)].into_iter().flatten().min().unwrap_or(to).min(to);
                counts.pending += next - at;
                let room = self.eligible_cap.saturating_sub(eligible.len()).min((next - at) as usize) as u32;
                eligible.extend((at..at + room).map(|i| (i, 1)));
                at = next;
            }
        }
    }
}

#[cfg(test)]
mod tests;
