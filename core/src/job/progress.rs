//! From a job's attempts to its progress: which tasks are done, which to place next, which
//! attempts to cancel, and the phase. Pure: time comes in as an argument.

use std::borrow::Borrow;
use std::time::Duration;

use super::phase::VerificationCounts;
use super::policy::{JobPolicy, MAX_BACKOFF};
use super::recorded::{Recorded, Untried};
use super::verify::{Disagreement, Verdict, verdict};
use super::{JobPhase, TaskCounts};
use crate::attempt::Attempt;
use crate::reputation::Observed;

/// Most disputes a progress keeps (status shows a few; counts cover all).
pub const MAX_DISPUTES: usize = 32;

/// More copies for a round that is still running (a tie to break, a lost copy to make up, a
/// result chosen for a check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub index: u32,
    pub number: u32,
    /// The replica number of the first new copy (one past the round's highest).
    pub first_replica: u32,
    pub count: u32,
    /// Nodes of the round's copies: the new ones go to other owners.
    pub nodes: Vec<String>,
}

/// Why a job ended in Failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureCause {
    /// These task indexes used up their attempts.
    TasksFailed(Vec<u32>),
    /// These task indexes used up their attempts, and the last failed round of at least one
    /// ended with replicas returning different results: `first` is the lowest such task's.
    ResultsDisagree { failed: Vec<u32>, first: Disagreement },
    /// `timeouts.jobSeconds` passed.
    DeadlineExceeded,
}

/// What the operator should do next for one job, and how it stands. With replicas, an
/// "attempt" of a task is a round of `replicas` attempts sharing its number; counts, indexes
/// and `to_place` are per task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub phase: JobPhase,
    pub counts: TaskCounts,
    /// (index, attempt number) pairs to place now, in index order, within parallelism. Each
    /// is one round: all of the job's replicas.
    pub to_place: Vec<(u32, u32)>,
    /// Ids of active attempts to cancel (the job has ended, or they are no longer needed).
    pub to_cancel: Vec<String>,
    pub completed: Vec<u32>,
    pub failed: Vec<u32>,
    pub failure: Option<FailureCause>,
    /// Tasks not done whose last failed round ended with replicas that disagreed, in index
    /// order (retried, or failed for good).
    pub disagreements: Vec<Disagreement>,
    /// More copies to place for rounds already running (not limited by parallelism: their
    /// tasks are running already).
    pub to_extend: Vec<Extension>,
    /// How finished tasks were verified.
    pub verification: VerificationCounts,
    /// Verification outcomes of the copies of decided rounds (attempt id, outcome), for
    /// reputation: only when results were compared or sampled (not under mode none).
    pub observed: Vec<(String, Observed)>,
    /// Verified tasks where some copy was outvoted, in index order, at most [`MAX_DISPUTES`].
    pub disputes: Vec<Disagreement>,
    /// When a task waiting in backoff becomes eligible (Unix ms), so the caller can requeue.
    pub next_retry_ms: Option<i64>,
    /// When the first attempt was created.
    pub started_ms: Option<i64>,
    /// The attempt whose result was accepted, by completed task index (its outputs are kept):
    /// only for a job with declared outputs (`policy.outputs`), the only use; empty otherwise,
    /// so a sync does not copy an id per task for nothing.
    pub accepted: Vec<(u32, String)>,
}

/// Delay before attempt `number` (>= 2): backoff × 2^(number-2), capped at MAX_BACKOFF.
pub fn retry_delay(backoff: Duration, number: u32) -> Duration {
    let exp = number.saturating_sub(2).min(20);
    backoff.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

/// Computes the progress of a job with `policy` whose attempts are `attempts`, at `now_ms`.
/// A task succeeds when one round verifies (see [`verdict`]); a failed or disagreeing round
/// uses up one of its `max_attempts`; a round that failed, disagreed or became void has its
/// replicas still running cancelled, since they can no longer verify anything. Linear in the
/// attempts (apart from sorting each task's own). Attempts may be owned or shared
/// (`Arc<Attempt>`, as the dispatcher holds them).
pub fn progress<A: Borrow<Attempt>>(policy: &JobPolicy, attempts: &[A], now_ms: i64) -> Progress {
    progress_with(policy, attempts, now_ms, &|_| true)
}

/// [`progress`] with the operator's decisions: `check(first copy)` says whether the lone
/// result of a sampled round (spot check, adaptive) is checked; it must answer the same for
/// the same attempt every time.
pub fn progress_with<A: Borrow<Attempt>>(policy: &JobPolicy, attempts: &[A], now_ms: i64, check: &dyn Fn(&Attempt) -> bool) -> Progress {
    progress_recorded(policy, attempts, now_ms, check, &Recorded::default())
}

/// [`progress_with`] where tasks in `recorded` count as done even without attempts, and tasks
/// without any attempt are counted in bulk (a job of a million tasks mostly has none in memory:
/// not started yet, or recorded), so a sync costs the attempts at hand, not the job's size.
pub fn progress_recorded<A: Borrow<Attempt>>(
    policy: &JobPolicy,
    attempts: &[A],
    now_ms: i64,
    check: &dyn Fn(&Attempt) -> bool,
    recorded: &Recorded,
) -> Progress {
    // Grouped by index in one sorted Vec (a map of Vecs cost an allocation per task, and this
    // runs on every sync); the store hands attempts over already in index order.
    let mut by_index: Vec<&Attempt> = attempts.iter().map(Borrow::borrow).filter(|a| a.index < policy.tasks).collect();
    if !by_index.is_sorted_by_key(|a| a.index) {
        by_index.sort_by_key(|a| a.index);
    }
    let mut rest = by_index.as_slice();
    let started_ms = attempts.iter().map(|a| a.borrow().created_ms).chain(recorded.started_ms).min();
    let rule = policy.round_rule();
    // Outcomes are observed only where results are compared or sampled.
    let observe = rule.max > 1;
    let mut verification = VerificationCounts::default();
    let (mut to_extend, mut observed, mut disputes) = (vec![], vec![], vec![]);

    let mut counts = TaskCounts { total: policy.tasks, ..Default::default() };
    let (mut completed, mut failed, mut active) = (vec![], vec![], vec![]);
    // Active attempts no longer needed (their task succeeded, or their round cannot verify),
    // collected here in one pass (checking each active id against every attempt made large
    // jobs quadratic).
    let mut unneeded: Vec<String> = vec![];
    let mut disagreements = vec![];
    let mut eligible = vec![];
    // Only the first `parallelism` eligible tasks can be placed; more would only cost memory.
    let eligible_cap = policy.parallelism as usize;
    let mut next_retry_ms: Option<i64> = None;
    let mut accepted = vec![];
    let keeps_outputs = policy.outputs.is_some();

    let mut index = 0;
    while index < policy.tasks {
        let next_attempted = rest.first().map_or(policy.tasks, |a| a.index);
        if next_attempted > index {
            let untried = Untried { recorded, eligible_cap };
            untried.count(index, next_attempted, &mut counts, &mut completed, &mut failed, &mut eligible);
            index = next_attempted;
            continue;
        }
        let here = rest.iter().take_while(|a| a.index == index).count();
        let (tries, after) = rest.split_at(here);
        rest = after;
        // In (number, replica) order already when they come from the store (a copy otherwise).
        let sorted;
        let tries = if tries.is_sorted_by_key(|a| (a.number, a.replica)) {
            tries
        } else {
            let mut t = tries.to_vec();
            t.sort_by_key(|a| (a.number, a.replica));
            sorted = t;
            &sorted[..]
        };
        let (mut verified, mut failures) = (false, 0u32);
        let (mut running, mut wasted) = (vec![], vec![]);
        // The last failed round's disagreement, if it was one.
        let mut last_failure: Option<Disagreement> = None;
        let (mut disputed, mut extending) = (false, false);
        for round in tries.chunk_by(|a, b| a.number == b.number) {
            verification.extra_attempts += round.len() as u64 - 1;
            let first = round.iter().min_by_key(|a| a.replica).expect("chunks are not empty");
            let v = verdict(round, rule, check(first));
            let still_active = round.iter().filter(|a| !a.phase.is_terminal()).map(|a| a.id.clone());
            match &v {
                Verdict::Running | Verdict::Extend(_) => running.extend(still_active),
                _ => wasted.extend(still_active),
            }
            if v.is_failure() {
                failures += 1;
                last_failure = match v {
                    Verdict::Disagree(d) => {
                        disputed = true;
                        Some(d)
                    }
                    _ => None,
                };
            } else if let Verdict::Extend(count) = v {
                if !verified {
                    extending = true;
                    disputed |= super::verify::answers_differ(round);
                    let first_replica = round.iter().map(|a| a.replica).max().unwrap_or(0) + 1;
                    let nodes = round.iter().map(|a| a.node.clone()).collect();
                    to_extend.push(Extension { index, number: first.number, first_replica, count, nodes });
                }
            } else if let Verdict::Verified(d) = v {
                if verified {
                    continue;
                }
                verified = true;
                if keeps_outputs && let Some(id) = d.agreed.first().or(d.unverified.as_ref()) {
                    accepted.push((index, id.clone()));
                }
                if d.unverified.is_some() {
                    verification.unverified += 1;
                } else {
                    verification.verified += 1;
                }
                if observe {
                    observed.extend(d.agreed.into_iter().map(|id| (id, Observed::Agreed)));
                    observed.extend(d.outvoted.into_iter().map(|id| (id, Observed::Outvoted)));
                    observed.extend(d.unverified.into_iter().map(|id| (id, Observed::Unverified)));
                }
                if let Some(dispute) = d.dispute {
                    disputed = true;
                    if disputes.len() < MAX_DISPUTES {
                        disputes.push(dispute);
                    }
                }
            }
        }
        verification.disputed += disputed as u32;
        let next_number = tries.last().map_or(0, |a| a.number) + 1;
        if verified || recorded.completed.contains(index) {
            counts.succeeded += 1;
            completed.push(index);
            // Rounds still running after success (e.g. a late duplicate) are not needed.
            unneeded.extend(running.iter().cloned());
            active.extend(running);
        } else {
            disagreements.extend(last_failure);
            if !running.is_empty() || extending {
                counts.running += 1;
                active.extend(running);
            } else if failures >= policy.max_attempts {
                counts.failed += 1;
                failed.push(index);
            } else {
                counts.pending += 1;
                let last_end = tries.iter().filter_map(|a| a.finished_ms).max();
                let ready_at = match (failures, last_end) {
                    (0, _) | (_, None) => now_ms,
                    (_, Some(end)) => end + retry_delay(policy.backoff, next_number).as_millis() as i64,
                };
                if ready_at <= now_ms {
                    if eligible.len() < eligible_cap {
                        eligible.push((index, next_number));
                    }
                } else {
                    next_retry_ms = Some(next_retry_ms.map_or(ready_at, |t: i64| t.min(ready_at)));
                }
            }
        }
        unneeded.extend(wasted.iter().cloned());
        active.extend(wasted);
        index += 1;
    }

    let deadline_passed = match (policy.job_deadline, started_ms) {
        (Some(limit), Some(start)) => now_ms >= start + limit.as_millis() as i64,
        _ => false,
    };
    let all_done = counts.succeeded == policy.tasks;
    let failure = if all_done {
        None
    } else if !failed.is_empty() {
        match disagreements.iter().find(|d| failed.binary_search(&d.index).is_ok()) {
            Some(first) => Some(FailureCause::ResultsDisagree { failed: failed.clone(), first: first.clone() }),
            None => Some(FailureCause::TasksFailed(failed.clone())),
        }
    } else if deadline_passed {
        Some(FailureCause::DeadlineExceeded)
    } else {
        None
    };

    let (phase, to_place, to_cancel) = if policy.suspended && !all_done && failure.is_none() {
        let phase = if started_ms.is_some() { JobPhase::Running } else { JobPhase::Pending };
        (phase, vec![], active)
    } else if all_done {
        (JobPhase::Succeeded, vec![], unneeded)
    } else if failure.is_some() {
        (JobPhase::Failed, vec![], active)
    } else {
        let in_flight = counts.running;
        let room = policy.parallelism.saturating_sub(in_flight) as usize;
        let phase = if started_ms.is_some() { JobPhase::Running } else { JobPhase::Pending };
        (phase, eligible.into_iter().take(room).collect(), unneeded)
    };
    let next_retry_ms = if phase == JobPhase::Running || phase == JobPhase::Pending { next_retry_ms } else { None };

    // Extensions of rounds that stopped mattering (the job ended or is suspended) are dropped.
    let to_extend = if phase == JobPhase::Running && !policy.suspended { to_extend } else { vec![] };
    Progress {
        phase,
        counts,
        to_place,
        to_cancel,
        completed,
        failed,
        failure,
        disagreements,
        to_extend,
        verification,
        observed,
        disputes,
        next_retry_ms,
        started_ms,
        accepted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::{AttemptPhase, AttemptResult, attempt_id, replica_attempt_id};
    use crate::job::policy::{ModuleSource, TaskWorkload};

    fn policy(tasks: u32, parallelism: u32, max_attempts: u32) -> JobPolicy {
        JobPolicy {
            tasks,
            parallelism,
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            max_attempts,
            backoff: Duration::from_secs(10),
            task_timeout: Duration::from_secs(60),
            job_deadline: None,
            suspended: false,
            budget: None,
            workload: TaskWorkload::Wasm { source: ModuleSource::Url { url: "https://x".into(), sha256: "0".repeat(64) }, args: vec![], env: vec![] },
            ephemeral_bytes: 0,
            gpu: Default::default(),
            placement: Default::default(),
            priority: 0,
            max_price_per_hour: None,
            verification: Default::default(),
            inputs: vec![],
            outputs: None,
        }
    }

    fn attempt(index: u32, number: u32, phase: AttemptPhase, created: i64, finished: Option<i64>) -> Attempt {
        Attempt {
            id: attempt_id("uid", index, number),
            job_uid: "uid".into(),
            job_key: "ns/job".into(),
            index,
            number,
            replica: 0,
            node: "n1".into(),
            phase,
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            held: None,
            created_ms: created,
            finished_ms: finished,
            result: None,
        }
    }

    #[test]
    fn a_new_job_places_up_to_parallelism() {
        let p = progress::<Attempt>(&policy(5, 2, 3), &[], 1000);
        assert_eq!(p.phase, JobPhase::Pending);
        assert_eq!(p.to_place, vec![(0, 1), (1, 1)]);
        assert_eq!(p.counts, TaskCounts { total: 5, pending: 5, ..Default::default() });
        assert_eq!(p.started_ms, None);
    }

    #[test]
    fn running_attempts_use_up_parallelism() {
        let a = [attempt(0, 1, AttemptPhase::Running, 10, None), attempt(1, 1, AttemptPhase::Assigned, 10, None)];
        let p = progress(&policy(5, 2, 3), &a, 1000);
        assert_eq!(p.phase, JobPhase::Running);
        assert!(p.to_place.is_empty());
        assert_eq!(p.counts.running, 2);
        assert_eq!(p.started_ms, Some(10));
        let p = progress(&policy(5, 3, 3), &a, 1000);
        assert_eq!(p.to_place, vec![(2, 1)]);
    }

    #[test]
    fn all_succeeded_is_succeeded() {
        let a = [
            attempt(0, 1, AttemptPhase::Succeeded, 1, Some(5)),
            attempt(1, 2, AttemptPhase::Succeeded, 1, Some(5)),
            attempt(1, 1, AttemptPhase::Failed, 1, Some(2)),
        ];
        let p = progress(&policy(2, 2, 3), &a, 1000);
        assert_eq!(p.phase, JobPhase::Succeeded);
        assert_eq!(p.completed, vec![0, 1]);
        assert!(p.to_place.is_empty() && p.to_cancel.is_empty() && p.failure.is_none());
    }

    #[test]
    fn a_failed_attempt_is_retried_after_backoff() {
        let a = [attempt(0, 1, AttemptPhase::Failed, 0, Some(1_000))];
        let p = progress(&policy(1, 1, 3), &a, 5_000);
        assert!(p.to_place.is_empty());
        assert_eq!(p.next_retry_ms, Some(11_000));
        assert_eq!(p.phase, JobPhase::Running);
        let p = progress(&policy(1, 1, 3), &a, 11_000);
        assert_eq!(p.to_place, vec![(0, 2)]);
        assert_eq!(p.next_retry_ms, None);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Duration::from_secs(10);
        assert_eq!(retry_delay(b, 2), Duration::from_secs(10));
        assert_eq!(retry_delay(b, 3), Duration::from_secs(20));
        assert_eq!(retry_delay(b, 4), Duration::from_secs(40));
        assert_eq!(retry_delay(b, 50), MAX_BACKOFF);
        assert_eq!(retry_delay(Duration::ZERO, 5), Duration::ZERO);
    }

    #[test]
    fn lost_counts_as_failure_and_cancelled_does_not() {
        let a = [attempt(0, 1, AttemptPhase::Lost, 0, Some(1)), attempt(0, 2, AttemptPhase::Cancelled, 0, Some(1))];
        let p = progress(&policy(1, 1, 2), &a, 1_000_000);
        assert_eq!(p.to_place, vec![(0, 3)]);
        let a = [attempt(0, 1, AttemptPhase::Lost, 0, Some(1)), attempt(0, 2, AttemptPhase::Failed, 0, Some(1))];
        let p = progress(&policy(1, 1, 2), &a, 1_000_000);
        assert_eq!(p.phase, JobPhase::Failed);
    }

    #[test]
    fn exhausted_task_fails_the_job_and_cancels_the_rest() {
        let a =
            [attempt(0, 1, AttemptPhase::Failed, 0, Some(1)), attempt(0, 2, AttemptPhase::Failed, 0, Some(2)), attempt(1, 1, AttemptPhase::Running, 0, None)];
        let p = progress(&policy(3, 3, 2), &a, 100);
        assert_eq!(p.phase, JobPhase::Failed);
        assert_eq!(p.failed, vec![0]);
        assert_eq!(p.failure, Some(FailureCause::TasksFailed(vec![0])));
        assert_eq!(p.to_cancel, vec![attempt_id("uid", 1, 1)]);
        assert!(p.to_place.is_empty());
    }

    #[test]
    fn a_suspended_job_cancels_what_runs_and_places_nothing_until_resumed() {
        let mut pol = policy(3, 3, 2);
        pol.suspended = true;
        let a = [attempt(0, 1, AttemptPhase::Running, 0, None), attempt(1, 1, AttemptPhase::Succeeded, 0, Some(1))];
        let p = progress(&pol, &a, 100);
        assert_eq!(p.phase, JobPhase::Running);
        assert!(p.to_place.is_empty());
        assert_eq!(p.to_cancel, vec![attempt_id("uid", 0, 1)]);
        // Once cancelled and resumed, the task is placed again without losing an attempt.
        let a = [attempt(0, 1, AttemptPhase::Cancelled, 0, Some(5)), attempt(1, 1, AttemptPhase::Succeeded, 0, Some(1))];
        pol.suspended = false;
        assert_eq!(progress(&pol, &a, 100).to_place, vec![(0, 2), (2, 1)]);
    }

    #[test]
    fn deadline_fails_the_job() {
        let mut pol = policy(2, 2, 3);
        pol.job_deadline = Some(Duration::from_secs(10));
        let a = [attempt(0, 1, AttemptPhase::Succeeded, 1_000, Some(2_000)), attempt(1, 1, AttemptPhase::Running, 1_000, None)];
        assert_eq!(progress(&pol, &a, 10_999).phase, JobPhase::Running);
        let p = progress(&pol, &a, 11_000);
        assert_eq!(p.phase, JobPhase::Failed);
        assert_eq!(p.failure, Some(FailureCause::DeadlineExceeded));
        assert_eq!(p.to_cancel, vec![attempt_id("uid", 1, 1)]);
    }

    #[test]
    fn a_late_duplicate_after_success_is_cancelled() {
        let a = [attempt(0, 1, AttemptPhase::Running, 0, None), attempt(0, 2, AttemptPhase::Succeeded, 0, Some(5))];
        let p = progress(&policy(2, 2, 3), &a, 100);
        assert_eq!(p.to_cancel, vec![attempt_id("uid", 0, 1)]);
        assert_eq!(p.to_place, vec![(1, 1)]);
    }

    #[test]
    fn attempts_of_indexes_beyond_tasks_are_ignored() {
        let a = [attempt(7, 1, AttemptPhase::Failed, 0, Some(1))];
        let p = progress(&policy(1, 1, 1), &a, 100);
        assert_eq!(p.phase, JobPhase::Running);
        assert_eq!(p.to_place, vec![(0, 1)]);
    }

    /// A job of `tasks` tasks with `replicas` copies each.
    fn replicated(tasks: u32, replicas: u32, max_attempts: u32) -> JobPolicy {
        let mut p = policy(tasks, tasks, max_attempts);
        p.placement.replicas = replicas;
        p
    }

    /// Replica `replica` of attempt `number` of task `index`, on node `n<replica>`; succeeded
    /// ones answer `digest`.
    fn copy(index: u32, number: u32, replica: u32, phase: AttemptPhase, digest: &str) -> Attempt {
        let result = (phase == AttemptPhase::Succeeded).then(|| AttemptResult { exit_code: 0, output_sha256: digest.repeat(64), ..Default::default() });
        Attempt {
            id: replica_attempt_id("uid", index, number, replica),
            replica,
            node: format!("n{replica}"),
            result,
            ..attempt(index, number, phase, 0, phase.is_terminal().then_some(1_000))
        }
    }

    fn verifying(tasks: u32, mode: crate::job::verification::Mode) -> JobPolicy {
        let mut p = policy(tasks, tasks, 3);
        p.verification.mode = mode;
        p
    }

    #[test]
    fn a_quorum_extends_rounds_on_other_owners_and_observes_who_agreed_and_who_was_outvoted() {
        use crate::job::verification::Mode;
        use AttemptPhase::*;
        let pol = verifying(3, Mode::Replicate { replicas: 2, quorum: 2, max_replicas: 3 });
        let attempts = [
            // Task 0: the copies agree.
            copy(0, 1, 0, Succeeded, "a"),
            copy(0, 1, 1, Succeeded, "a"),
            // Task 1: a tie, broken by a third copy against copy 1.
            copy(1, 1, 0, Succeeded, "a"),
            copy(1, 1, 1, Succeeded, "b"),
            copy(1, 1, 2, Succeeded, "a"),
            // Task 2: a tie: one more copy, on an owner other than n0's and n1's.
            copy(2, 1, 0, Succeeded, "a"),
            copy(2, 1, 1, Succeeded, "b"),
        ];
        let p = progress(&pol, &attempts, 20_000);
        assert_eq!(p.phase, JobPhase::Running);
        assert_eq!(p.to_extend, vec![Extension { index: 2, number: 1, first_replica: 2, count: 1, nodes: vec!["n0".into(), "n1".into()] }]);
        assert!(p.to_place.is_empty(), "a task whose round grows is running, not placed again");
        assert_eq!((p.counts.succeeded, p.counts.running), (2, 1));
        assert_eq!(p.verification, VerificationCounts { verified: 2, unverified: 0, disputed: 2, extra_attempts: 4 });
        let r = |i, k| replica_attempt_id("uid", i, 1, k);
        assert_eq!(
            p.observed,
            vec![
                (r(0, 0), Observed::Agreed),
                (r(0, 1), Observed::Agreed),
                (r(1, 0), Observed::Agreed),
                (r(1, 2), Observed::Agreed),
                (r(1, 1), Observed::Outvoted)
            ]
        );
        assert_eq!(p.disputes.iter().map(|d| d.index).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_spot_check_follows_the_decision_and_mode_none_observes_nothing() {
        use crate::job::verification::{Mode, PPM};
        use AttemptPhase::*;
        let pol = verifying(2, Mode::SpotCheck { fraction_ppm: PPM / 2, max_replicas: 3 });
        let attempts = [copy(0, 1, 0, Succeeded, "a"), copy(1, 1, 0, Succeeded, "a")];
        let p = progress_with(&pol, &attempts, 20_000, &|a| a.index == 1);
        assert_eq!(p.to_extend.iter().map(|e| (e.index, e.first_replica, e.count)).collect::<Vec<_>>(), vec![(1, 1, 1)]);
        assert_eq!(p.observed, vec![(replica_attempt_id("uid", 0, 1, 0), Observed::Unverified)]);
        assert_eq!(p.verification, VerificationCounts { unverified: 1, ..Default::default() });
        let p = progress(&policy(2, 2, 3), &attempts, 20_000);
        assert!(p.observed.is_empty() && p.to_extend.is_empty());
        assert_eq!(p.verification, VerificationCounts { unverified: 2, ..Default::default() });
    }

    #[test]
    fn replicated_tasks_succeed_fail_retry_and_cancel_by_round() {
        use AttemptPhase::*;
        struct Case {
            name: &'static str,
            policy: JobPolicy,
            attempts: Vec<Attempt>,
            phase: JobPhase,
            to_place: Vec<(u32, u32)>,
            to_cancel: Vec<String>,
            disagreeing: Vec<u32>,
        }
        let suspended = JobPolicy { suspended: true, ..replicated(1, 2, 3) };
        let deadline = JobPolicy { job_deadline: Some(Duration::from_secs(1)), ..replicated(1, 2, 3) };
        let r = |index, number, replica| replica_attempt_id("uid", index, number, replica);
        let cases = vec![
            Case {
                name: "all agree",
                policy: replicated(1, 3, 3),
                attempts: vec![copy(0, 1, 0, Succeeded, "a"), copy(0, 1, 1, Succeeded, "a"), copy(0, 1, 2, Succeeded, "a")],
                phase: JobPhase::Succeeded,
                to_place: vec![],
                to_cancel: vec![],
                disagreeing: vec![],
            },
            Case {
                name: "one of two agreeing so far, the other still running",
                policy: replicated(1, 2, 3),
                attempts: vec![copy(0, 1, 0, Succeeded, "a"), copy(0, 1, 1, Running, "")],
                phase: JobPhase::Running,
                to_place: vec![],
                to_cancel: vec![],
                disagreeing: vec![],
            },
            Case {
                name: "one disagrees: retried as a new round after the backoff",
                policy: replicated(1, 2, 3),
                attempts: vec![copy(0, 1, 0, Succeeded, "a"), copy(0, 1, 1, Succeeded, "b")],
                phase: JobPhase::Running,
                to_place: vec![(0, 2)],
                to_cancel: vec![],
                disagreeing: vec![0],
            },
            Case {
                name: "two of three agree: no majority vote, the third still running is cancelled",
                policy: replicated(1, 4, 3),
                attempts: vec![copy(0, 1, 0, Succeeded, "a"), copy(0, 1, 1, Succeeded, "a"), copy(0, 1, 2, Succeeded, "b"), copy(0, 1, 3, Running, "")],
                phase: JobPhase::Running,
                to_place: vec![(0, 2)],
                to_cancel: vec![r(0, 1, 3)],
                disagreeing: vec![0],
            },
            Case {
                name: "the retry after a disagreement verifies",
                policy: replicated(1, 2, 3),
                attempts: vec![copy(0, 1, 0, Succeeded, "a"), copy(0, 1, 1, Succeeded, "b"), copy(0, 2, 0, Succeeded, "c"), copy(0, 2, 1, Succeeded, "c")],
                phase: JobPhase::Succeeded,
                to_place: vec![],
                to_cancel: vec![],
                disagreeing: vec![],
            },
            Case {
                name: "one lost: the round fails and the copy still running is cancelled",
                policy: replicated(1, 2, 3),
                attempts: vec![copy(0, 1, 0, Running, ""), copy(0, 1, 1, Lost, "")],
                phase: JobPhase::Running,
                to_place: vec![(0, 2)],
                to_cancel: vec![r(0, 1, 0)],
                disagreeing: vec![],
            },
            Case {
                name: "one preempted: the round starts over without using a retry",
                policy: replicated(1, 2, 1),
                attempts: vec![copy(0, 1, 0, Running, ""), copy(0, 1, 1, Cancelled, "")],
                phase: JobPhase::Running,
                to_place: vec![(0, 2)],
                to_cancel: vec![r(0, 1, 0)],
                disagreeing: vec![],
            },
            Case {
                name: "late duplicates of a verified task are cancelled",
                policy: replicated(2, 2, 3),
                attempts: vec![copy(0, 1, 0, Succeeded, "a"), copy(0, 1, 1, Succeeded, "a"), copy(0, 2, 0, Running, ""), copy(0, 2, 1, Assigned, "")],
                phase: JobPhase::Running,
                to_place: vec![(1, 1)],
                to_cancel: vec![r(0, 2, 0), r(0, 2, 1)],
                disagreeing: vec![],
            },
            Case {
                name: "suspended: every running copy is cancelled, nothing placed",
                policy: suspended,
                attempts: vec![copy(0, 1, 0, Running, ""), copy(0, 1, 1, Succeeded, "a")],
                phase: JobPhase::Running,
                to_place: vec![],
                to_cancel: vec![r(0, 1, 0)],
                disagreeing: vec![],
            },
            Case {
                name: "past the deadline: the job fails and every running copy is cancelled",
                policy: deadline,
                attempts: vec![copy(0, 1, 0, Running, ""), copy(0, 1, 1, Assigned, "")],
                phase: JobPhase::Failed,
                to_place: vec![],
                to_cancel: vec![r(0, 1, 0), r(0, 1, 1)],
                disagreeing: vec![],
            },
        ];
        for c in cases {
            let p = progress(&c.policy, &c.attempts, 20_000);
            assert_eq!(p.phase, c.phase, "{}", c.name);
            assert_eq!(p.to_place, c.to_place, "{}", c.name);
            assert_eq!(p.to_cancel, c.to_cancel, "{}", c.name);
            assert_eq!(p.disagreements.iter().map(|d| d.index).collect::<Vec<_>>(), c.disagreeing, "{}", c.name);
            let k = &p.counts;
            assert_eq!(k.pending + k.running + k.succeeded + k.failed, c.policy.tasks, "{}: counts are tasks, not attempts", c.name);
        }
    }

    #[test]
    fn a_task_whose_replicas_keep_disagreeing_fails_the_job_naming_the_nodes() {
        use AttemptPhase::*;
        let attempts = [
            copy(0, 1, 0, Failed, ""),
            copy(0, 1, 1, Succeeded, "a"),
            copy(1, 1, 0, Succeeded, "a"),
            copy(1, 1, 1, Succeeded, "b"),
            copy(2, 1, 0, Running, ""),
            copy(2, 1, 1, Running, ""),
        ];
        let p = progress(&replicated(3, 2, 1), &attempts, 20_000);
        assert_eq!(p.phase, JobPhase::Failed);
        assert_eq!(p.failed, vec![0, 1]);
        let Some(FailureCause::ResultsDisagree { failed, first }) = &p.failure else { panic!("{:?}", p.failure) };
        assert_eq!(failed, &vec![0, 1]);
        assert_eq!((first.index, first.number), (1, 1));
        assert_eq!(first.answers.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(), vec!["n0", "n1"]);
        assert_eq!(p.to_cancel, vec![replica_attempt_id("uid", 2, 1, 0), replica_attempt_id("uid", 2, 1, 1)]);
        assert_eq!(p.counts, TaskCounts { total: 3, running: 1, failed: 2, ..Default::default() });
        // Task 0 alone (a plain failure) is not a disagreement.
        let p = progress(&replicated(1, 2, 1), &attempts[..2], 20_000);
        assert_eq!(p.failure, Some(FailureCause::TasksFailed(vec![0])));
    }

    #[test]
    fn parallelism_counts_tasks_not_replicas() {
        use AttemptPhase::*;
        let mut pol = replicated(3, 3, 3);
        pol.parallelism = 2;
        let running: Vec<Attempt> = (0..2).flat_map(|i| (0..3).map(move |k| copy(i, 1, k, Running, ""))).collect();
        let p = progress(&pol, &running, 20_000);
        assert_eq!((p.counts.running, p.to_place.clone()), (2, vec![]));
        let p = progress(&pol, &running[..3], 20_000);
        assert_eq!(p.to_place, vec![(1, 1)], "one task running with three copies leaves room for one more task");
    }

    #[test]
    fn every_pair_of_replica_outcomes_is_accounted_for() {
        use AttemptPhase::*;
        let phases = [Assigned, Running, Succeeded, Failed, Cancelled, Preempted, Lost];
        for a in phases {
            for b in phases {
                for digest in ["a", "b"] {
                    let atts = [copy(0, 1, 0, a, "a"), copy(0, 1, 1, b, digest)];
                    let p = progress(&replicated(1, 2, 2), &atts, 20_000);
                    let k = &p.counts;
                    assert_eq!(k.pending + k.running + k.succeeded + k.failed, 1, "{a:?} {b:?} {digest}");
                    let active: Vec<&str> = atts.iter().filter(|x| !x.phase.is_terminal()).map(|x| x.id.as_str()).collect();
                    assert!(p.to_cancel.iter().all(|id| active.contains(&id.as_str())), "only active copies are cancelled: {a:?} {b:?}");
                    let verified = a == Succeeded && b == Succeeded && digest == "a";
                    assert_eq!(p.phase == JobPhase::Succeeded, verified, "{a:?} {b:?} {digest}");
                    let one_failed = a.is_failure() || b.is_failure() || (a == Succeeded && b == Succeeded && digest == "b");
                    let one_stopped = one_failed || a.is_stopped() || b.is_stopped();
                    if one_stopped {
                        assert_eq!(p.to_cancel.len(), active.len(), "a round that cannot verify frees its copies: {a:?} {b:?} {digest}");
                        assert_eq!(p.to_place, vec![(0, 2)], "{a:?} {b:?} {digest}");
                    } else if !active.is_empty() {
                        assert!(p.to_cancel.is_empty() && p.to_place.is_empty(), "{a:?} {b:?} {digest}");
                    }
                }
            }
        }
    }

    #[test]
    fn counts_always_add_up() {
        // Every combination of phases for three tasks with up to two attempts each.
        use AttemptPhase::*;
        let phases = [Assigned, Running, Succeeded, Failed, Cancelled, Preempted, Lost];
        for a in &phases {
            for b in &phases {
                for c in &phases {
                    let atts = [attempt(0, 1, *a, 0, Some(0)), attempt(0, 2, *b, 0, Some(0)), attempt(1, 1, *c, 0, Some(0))];
                    let p = progress(&policy(3, 3, 2), &atts, 1_000_000);
                    let k = &p.counts;
                    assert_eq!(k.pending + k.running + k.succeeded + k.failed, 3, "{a:?} {b:?} {c:?}");
                    assert!(p.to_place.len() <= 3);
                    if p.phase == JobPhase::Failed {
                        assert!(p.to_place.is_empty());
                    }
                }
            }
        }
    }
}
