//! ComputeJob status as a pure function of progress, and the Events a status change deserves.
//! Status is a summary: counts, compact index ranges and a bounded sample of results.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::indexes::compact;
use super::progress::{FailureCause, Progress};
use super::validate::Invalid;
use crate::attempt::Attempt;
use crate::crd::{ComputeJobStatus, JobPhase, TaskResultSummary, condition, set_condition};
use crate::scheduler::Explanation;

/// Results kept in status.
pub const RECENT_RESULTS: usize = 16;
const TAIL_IN_STATUS: usize = 256;

pub const VALID: &str = "Valid";
pub const SCHEDULED: &str = "Scheduled";
pub const SUCCEEDED: &str = "Succeeded";
pub const FAILED: &str = "Failed";
pub const SUSPENDED: &str = "Suspended";
/// Present while a task's replicas last returned different results (False, `ResultsDisagree`).
pub const VERIFIED: &str = "Verified";

fn ts(ms: i64) -> Time {
    Time(Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Disputes shown in status.
pub const DISPUTES_IN_STATUS: usize = 8;

/// The status's verification summary: None when nothing was compared or sampled.
fn verification(p: &Progress) -> Option<crate::crd::JobVerification> {
    let c = &p.verification;
    if c.verified == 0 && c.disputed == 0 && c.extra_attempts == 0 && p.observed.is_empty() {
        return None;
    }
    let tasks = (c.verified + c.unverified).max(1) as u64;
    let tenths = c.extra_attempts * 1000 / tasks;
    let disputes = p.disputes.iter().chain(&p.disagreements).take(DISPUTES_IN_STATUS).map(|d| d.to_string()).collect();
    Some(crate::crd::JobVerification { counts: c.clone(), overhead_percent: format!("{}.{}", tenths / 10, tenths % 10), disputes })
}

/// What a sync produced, for the status.
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub runtime: &'a str,
    pub progress: &'a Progress,
    pub attempts: &'a [std::sync::Arc<Attempt>],
    pub unplaced: Option<&'a Explanation>,
    pub module_sha256: Option<&'a str>,
    pub suspended: bool,
    pub now_ms: i64,
    /// Why no further task may start within the job's budget.
    pub budget_exhausted: Option<&'a str>,
    /// Metered usage and cost so far (None keeps what the status had).
    pub usage: Option<crate::crd::JobUsage>,
}

/// The status for a job that is being run.
pub fn summarize(prev: &ComputeJobStatus, o: &Observed<'_>) -> ComputeJobStatus {
    let p = o.progress;
    let mut s = prev.clone();
    s.phase = Some(p.phase);
    s.observed_generation = o.generation;
    s.tasks = p.counts.clone();
    s.progress = Some(format!("{}/{}", p.counts.succeeded, p.counts.total));
    s.runtime = Some(o.runtime.to_string());
    s.completed_indexes = Some(compact(&p.completed)).filter(|c| !c.is_empty());
    s.failed_indexes = Some(compact(&p.failed)).filter(|c| !c.is_empty());
    s.module_sha256 = o.module_sha256.map(str::to_string);
    s.start_time = p.started_ms.map(ts);
    let g = o.generation;
    set_condition(&mut s.conditions, condition(VALID, true, "Valid", "the spec is valid", g));

    match p.phase {
        JobPhase::Succeeded | JobPhase::Failed => {
            if s.completion_time.is_none() {
                s.completion_time = Some(ts(o.now_ms));
            }
        }
        _ => s.completion_time = None,
    }

    let waiting = p.counts.pending;
    // The status never moves back: a ledger that knows fewer receipts than the status showed
    // lost them (an empty data directory), and the status is then the better record.
    if let Some(u) = o.usage.as_ref().filter(|u| prev.usage.as_ref().is_none_or(|p| u.receipts >= p.receipts)) {
        s.usage = Some(u.clone());
    }
    let scheduled = match (o.unplaced, p.phase) {
        (_, JobPhase::Succeeded | JobPhase::Failed) => None,
        _ if o.budget_exhausted.is_some() && waiting > 0 => {
            Some(condition(SCHEDULED, false, "BudgetExhausted", format!("{waiting} task(s) waiting: {}", o.budget_exhausted.unwrap_or_default()), g))
        }
        (Some(why), _) => Some(condition(
            SCHEDULED,
            false,
            if why.runtime_missing_everywhere() {
                "NoNodeOffersRuntime"
            } else if why.held_for_others > 0 {
                "WaitingForFairShare"
            } else {
                "Unschedulable"
            },
            format!("{waiting} task(s) waiting: {why}"),
            g,
        )),
        (None, _) if p.counts.running > 0 || p.counts.succeeded > 0 => {
            Some(condition(SCHEDULED, true, "Placed", format!("{} task(s) running, {} waiting", p.counts.running, waiting), g))
        }
        (None, _) => None,
    };
    if let Some(c) = scheduled {
        set_condition(&mut s.conditions, c);
    }

    let active = !matches!(p.phase, JobPhase::Succeeded | JobPhase::Failed);
    if o.suspended && active {
        set_condition(
            &mut s.conditions,
            condition(SUSPENDED, true, "Suspended", "spec.suspend is true: running attempts are cancelled and nothing new is placed", g),
        );
    } else {
        s.conditions.retain(|c| c.type_ != SUSPENDED);
    }
    // The spec is editable: a job that failed validation and was fixed is not Failed any more.
    if p.phase != JobPhase::Failed {
        s.conditions.retain(|c| c.type_ != FAILED);
    }
    if p.phase != JobPhase::Succeeded {
        s.conditions.retain(|c| c.type_ != SUCCEEDED);
    }
    match (&p.phase, &p.failure) {
        (JobPhase::Succeeded, _) => {
            set_condition(&mut s.conditions, condition(SUCCEEDED, true, "AllTasksSucceeded", format!("all {} task(s) succeeded", p.counts.total), g));
        }
        (JobPhase::Failed, Some(FailureCause::TasksFailed(idx))) => {
            set_condition(&mut s.conditions, condition(FAILED, true, "TasksFailed", format!("task(s) {} failed on every attempt", compact(idx)), g));
        }
        (JobPhase::Failed, Some(FailureCause::ResultsDisagree { failed, first })) => {
            let message = format!("task(s) {} failed on every attempt; last of task {}: {first}", compact(failed), first.index);
            set_condition(&mut s.conditions, condition(FAILED, true, "ResultsDisagree", message, g));
        }
        (JobPhase::Failed, Some(FailureCause::DeadlineExceeded)) => {
            set_condition(&mut s.conditions, condition(FAILED, true, "DeadlineExceeded", "the job ran longer than timeouts.jobSeconds", g));
        }
        _ => {}
    }

    // Disagreements of tasks still being tried; a job that ended says it in Succeeded/Failed.
    match p.disagreements.first() {
        Some(first) if active => {
            let more = match p.disagreements.len() {
                1 => String::new(),
                n => format!(" ({} other task(s) too)", n - 1),
            };
            let message = format!("{first}; the task is tried again{more}");
            set_condition(&mut s.conditions, condition(VERIFIED, false, "ResultsDisagree", message, g));
        }
        _ => s.conditions.retain(|c| c.type_ != VERIFIED),
    }

    s.verification = verification(p);
    if let Some(v) = s.verification.as_ref().filter(|_| !s.conditions.iter().any(|c| c.type_ == VERIFIED && c.status == "False")) {
        let c = &v.counts;
        let message = format!(
            "{} task(s) verified by a quorum, {} accepted unchecked, {} disputed; {} extra attempt(s) ({}% overhead)",
            c.verified, c.unverified, c.disputed, c.extra_attempts, v.overhead_percent
        );
        set_condition(&mut s.conditions, condition(VERIFIED, true, "Verified", message, g));
    }

    let mut finished: Vec<&Attempt> = o.attempts.iter().map(|a| &**a).filter(|a| a.phase.is_terminal() && a.result.is_some()).collect();
    if finished.is_empty() {
        // No result at hand (the store lost them, or pruned them past the retention): the
        // results the status shows are still the most recent ones.
        return s;
    }
    finished.sort_by(|a, b| b.finished_ms.cmp(&a.finished_ms).then(a.index.cmp(&b.index)));
    s.recent_results = finished
        .into_iter()
        .take(RECENT_RESULTS)
        .map(|a| {
            let r = a.result.as_ref().expect("filtered on result");
            let tail = &r.stdout_tail[r.stdout_tail.len().saturating_sub(TAIL_IN_STATUS)..];
            TaskResultSummary {
                index: a.index,
                attempt: a.number,
                replica: a.replica,
                node: a.node.clone(),
                exit_code: r.exit_code,
                output_sha256: r.output_sha256.clone(),
                stdout_tail: String::from_utf8_lossy(tail).into_owned(),
                message: r.message.clone(),
            }
        })
        .collect();
    s
}

/// The status for a spec that cannot run.
pub fn invalid(prev: &ComputeJobStatus, generation: Option<i64>, why: &Invalid) -> ComputeJobStatus {
    let mut s = prev.clone();
    s.phase = Some(JobPhase::Failed);
    s.observed_generation = generation;
    set_condition(&mut s.conditions, condition(VALID, false, why.reason, why.message.clone(), generation));
    set_condition(&mut s.conditions, condition(FAILED, true, why.reason, why.message.clone(), generation));
    s
}

/// The status while the job's module cannot be resolved (a missing ConfigMap may appear later).
pub fn waiting_for_module(prev: &ComputeJobStatus, generation: Option<i64>, reason: &str, message: &str) -> ComputeJobStatus {
    let mut s = prev.clone();
    // Running work keeps running while the module is unavailable; anything else waits.
    s.phase = Some(if prev.phase == Some(JobPhase::Running) { JobPhase::Running } else { JobPhase::Pending });
    s.observed_generation = generation;
    s.conditions.retain(|c| c.type_ != FAILED && c.type_ != SUCCEEDED);
    set_condition(&mut s.conditions, condition(VALID, true, "Valid", "the spec is valid", generation));
    set_condition(&mut s.conditions, condition(SCHEDULED, false, reason, message, generation));
    s
}

/// Severity of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// The Events a status change deserves: one per condition whose status or reason changed.
pub fn events(prev: &ComputeJobStatus, next: &ComputeJobStatus) -> Vec<(Severity, String, String)> {
    let mut out = vec![];
    for c in &next.conditions {
        let before = prev.conditions.iter().find(|p| p.type_ == c.type_);
        // A new disagreement is news even when the condition already said there was one. While
        // Verified stays True its counts move with every task checked: only a new dispute (a
        // result outvoted) is news then, or a job checking 1,000 tasks would tell 1,000 Events
        // that no recorder folds (their notes differ).
        let disputed = |s: &ComputeJobStatus| s.verification.as_ref().map_or(0, |v| v.counts.disputed);
        let same_news = |b: &&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition| {
            b.status == c.status
                && b.reason == c.reason
                && (c.type_ != VERIFIED || b.message == c.message || (c.status == "True" && disputed(next) <= disputed(prev)))
        };
        if before.is_some_and(|b| same_news(&b)) {
            continue;
        }
        let good = match c.type_.as_str() {
            FAILED => false,
            SUSPENDED => true,
            VALID | SCHEDULED | SUCCEEDED | VERIFIED => c.status == "True",
            _ => true,
        };
        if c.type_ == VALID && good {
            continue; // "the spec is valid" is not news.
        }
        let event = (if good { Severity::Normal } else { Severity::Warning }, c.reason.clone(), c.message.clone());
        // Valid=False and Failed=True carry the same news; say it once.
        if !out.contains(&event) {
            out.push(event);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::{AttemptPhase, AttemptResult};
    use crate::crd::{TaskCounts, is_true};
    use crate::job::verify::{Answer, Disagreement};
    use crate::scheduler::{Exclusion, Request, Resources};

    fn progress(phase: JobPhase, counts: TaskCounts) -> Progress {
        Progress {
            phase,
            counts,
            to_place: vec![],
            to_cancel: vec![],
            completed: vec![],
            failed: vec![],
            failure: None,
            disagreements: vec![],
            to_extend: vec![],
            verification: Default::default(),
            observed: vec![],
            disputes: vec![],
            next_retry_ms: None,
            started_ms: Some(1_000),
            accepted: vec![],
        }
    }

    fn observed<'a>(p: &'a Progress, attempts: &'a [std::sync::Arc<Attempt>], unplaced: Option<&'a Explanation>) -> Observed<'a> {
        Observed {
            generation: Some(2),
            runtime: "wasm",
            progress: p,
            attempts,
            unplaced,
            module_sha256: None,
            suspended: false,
            now_ms: 5_000,
            budget_exhausted: None,
            usage: None,
        }
    }

    #[test]
    fn unschedulable_job_says_why_and_emits_a_warning_once() {
        let p = Progress { started_ms: None, ..progress(JobPhase::Pending, TaskCounts { total: 2, pending: 2, ..Default::default() }) };
        let mut why = Explanation::new(2, &Request::new("exec", Resources { cpu_millis: 100, memory_bytes: 1 << 20, ephemeral_bytes: 0 }));
        why.excluded.insert(Exclusion::MissingRuntime, 2);
        let s = summarize(&ComputeJobStatus::default(), &observed(&p, &[], Some(&why)));
        let c = s.conditions.iter().find(|c| c.type_ == SCHEDULED).unwrap();
        assert_eq!(c.status, "False");
        assert_eq!(c.reason, "NoNodeOffersRuntime");
        assert_eq!(c.message, "2 task(s) waiting: 0/2 nodes can run it: 2 do not offer runtime exec");
        assert_eq!(s.phase, Some(JobPhase::Pending));
        assert_eq!(s.observed_generation, Some(2));
        let ev = events(&ComputeJobStatus::default(), &s);
        assert_eq!(ev, vec![(Severity::Warning, "NoNodeOffersRuntime".to_string(), c.message.clone())]);
        let again = summarize(&s, &observed(&p, &[], Some(&why)));
        assert_eq!(again, s);
        assert!(events(&s, &again).is_empty());
    }

    #[test]
    fn the_scheduled_condition_carries_the_new_explanations() {
        let p = Progress { started_ms: None, ..progress(JobPhase::Pending, TaskCounts { total: 3, pending: 3, ..Default::default() }) };
        let mut r = Request::new("wasm", Resources { cpu_millis: 100, memory_bytes: 1 << 20, ephemeral_bytes: 0 });
        r.gpu = crate::scheduler::GpuRequest { count: 1, model: Some(crate::scheduler::GpuPattern::parse("a100*").unwrap()), min_memory_bytes: 0 };
        r.min_reputation = crate::scheduler::Reputation(800);
        let mut why = Explanation::new(120, &r);
        why.excluded.insert(Exclusion::NoMatchingGpu, 87);
        why.excluded.insert(Exclusion::ReputationTooLow, 33);
        let s = summarize(&ComputeJobStatus::default(), &observed(&p, &[], Some(&why)));
        let c = s.conditions.iter().find(|c| c.type_ == SCHEDULED).unwrap();
        assert_eq!(
            (c.reason.as_str(), c.message.as_str()),
            ("Unschedulable", "3 task(s) waiting: 0/120 nodes can run it: 87 no GPU matching a100*, 33 reputation below 0.8")
        );

        let mut wait = Explanation::new(4, &r);
        wait.held_for_others = 2;
        let s = summarize(&ComputeJobStatus::default(), &observed(&p, &[], Some(&wait)));
        let c = s.conditions.iter().find(|c| c.type_ == SCHEDULED).unwrap();
        assert_eq!(c.reason, "WaitingForFairShare");
        assert_eq!(c.message, "3 task(s) waiting: 4/4 nodes can run it, but their room is kept for 2 task(s) of jobs ahead in the fair-share queue");
    }

    #[test]
    fn succeeded_job_has_condition_ranges_results_and_completion_time() {
        let mut p = progress(JobPhase::Succeeded, TaskCounts { total: 3, succeeded: 3, ..Default::default() });
        p.completed = vec![0, 1, 2];
        let attempts: Vec<std::sync::Arc<Attempt>> = (0..3)
            .map(|i| Attempt {
                id: format!("u.{i}.1"),
                job_uid: "u".into(),
                job_key: "ns/j".into(),
                index: i,
                number: 1,
                replica: 0,
                node: "n".into(),
                phase: AttemptPhase::Succeeded,
                cpu_millis: 1,
                memory_bytes: 1,
                held: None,
                created_ms: 1,
                finished_ms: Some(10 + i as i64),
                result: Some(AttemptResult { exit_code: 0, stdout_tail: vec![b'x'; 1000], ..Default::default() }),
            })
            .map(std::sync::Arc::new)
            .collect();
        let s = summarize(&ComputeJobStatus::default(), &observed(&p, &attempts, None));
        assert!(is_true(&s.conditions, SUCCEEDED));
        assert_eq!(s.completed_indexes.as_deref(), Some("0-2"));
        assert_eq!(s.failed_indexes, None);
        assert_eq!(s.progress.as_deref(), Some("3/3"));
        assert_eq!(s.recent_results.iter().map(|r| r.index).collect::<Vec<_>>(), vec![2, 1, 0]);
        assert_eq!(s.recent_results[0].stdout_tail.len(), TAIL_IN_STATUS);
        assert!(s.completion_time.is_some());
        let ev = events(&ComputeJobStatus::default(), &s);
        assert!(ev.contains(&(Severity::Normal, "AllTasksSucceeded".into(), "all 3 task(s) succeeded".into())));
    }

    #[test]
    fn results_and_usage_the_store_and_ledger_lost_stay_as_the_status_showed_them() {
        let mut p = progress(JobPhase::Succeeded, TaskCounts { total: 3, succeeded: 3, ..Default::default() });
        p.completed = vec![0, 1, 2];
        let shown = crate::crd::JobUsage { receipts: 3, cost: "0.5".into(), ..Default::default() };
        let prev = ComputeJobStatus {
            recent_results: vec![TaskResultSummary { index: 2, node: "n".into(), ..Default::default() }],
            usage: Some(shown.clone()),
            ..Default::default()
        };
        // An empty data directory: no attempt at hand, a ledger with no receipt of the job.
        let o = Observed { usage: Some(crate::crd::JobUsage { receipts: 0, ..Default::default() }), ..observed(&p, &[], None) };
        let s = summarize(&prev, &o);
        assert_eq!((s.recent_results.clone(), s.usage.clone()), (prev.recent_results.clone(), Some(shown)));
        // A ledger that knows as much or more is the record again.
        let more = crate::crd::JobUsage { receipts: 4, ..Default::default() };
        assert_eq!(summarize(&prev, &Observed { usage: Some(more.clone()), ..observed(&p, &[], None) }).usage, Some(more));
    }

    #[test]
    fn failed_job_names_the_failed_indexes() {
        let mut p = progress(JobPhase::Failed, TaskCounts { total: 4, failed: 2, succeeded: 2, ..Default::default() });
        p.failed = vec![1, 2];
        p.failure = Some(FailureCause::TasksFailed(vec![1, 2]));
        let s = summarize(&ComputeJobStatus::default(), &observed(&p, &[], None));
        let c = s.conditions.iter().find(|c| c.type_ == FAILED).unwrap();
        assert_eq!((c.reason.as_str(), c.message.as_str()), ("TasksFailed", "task(s) 1-2 failed on every attempt"));
        assert_eq!(s.failed_indexes.as_deref(), Some("1-2"));
    }

    fn disagreement(index: u32, number: u32) -> Disagreement {
        let answer = |node: &str, digest: &str| Answer { node: node.into(), exit_code: Some(0), output_sha256: digest.repeat(64) };
        Disagreement { index, number, answers: vec![answer("alice-1", "a"), answer("bob-1", "b")] }
    }

    #[test]
    fn verification_counts_overhead_and_capped_disputes_are_shown_with_a_verified_condition() {
        use kommune_core::job::phase::VerificationCounts;
        let counts = VerificationCounts { verified: 3, unverified: 5, disputed: 10, extra_attempts: 2 };
        let p = Progress {
            verification: counts.clone(),
            disputes: (0..10).map(|i| disagreement(i, 1)).collect(),
            ..progress(JobPhase::Succeeded, TaskCounts { total: 8, succeeded: 8, ..Default::default() })
        };
        let s = summarize(&ComputeJobStatus::default(), &observed(&p, &[], None));
        let v = s.verification.clone().unwrap();
        assert_eq!((v.counts, v.overhead_percent.as_str(), v.disputes.len()), (counts, "25.0", DISPUTES_IN_STATUS));
        assert!(v.disputes[0].contains("node alice-1 exit 0"), "{}", v.disputes[0]);
        let c = s.conditions.iter().find(|c| c.type_ == VERIFIED).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Verified"));
        assert_eq!(c.message, "3 task(s) verified by a quorum, 5 accepted unchecked, 10 disputed; 2 extra attempt(s) (25.0% overhead)");
        // Without verification there is nothing to show.
        let plain = progress(JobPhase::Succeeded, TaskCounts { total: 1, succeeded: 1, ..Default::default() });
        assert!(summarize(&ComputeJobStatus::default(), &observed(&plain, &[], None)).verification.is_none());
    }

    #[test]
    fn a_verified_job_tells_an_outvoted_result_but_not_each_task_checked() {
        use kommune_core::job::phase::VerificationCounts;
        let at = |verified, disputed| {
            let p = Progress {
                verification: VerificationCounts { verified, unverified: 0, disputed, extra_attempts: u64::from(verified + disputed) },
                ..progress(JobPhase::Running, TaskCounts { total: 100, running: 10, ..Default::default() })
            };
            summarize(&ComputeJobStatus::default(), &observed(&p, &[], None))
        };
        let first = at(1, 0);
        let told = events(&ComputeJobStatus::default(), &first);
        assert!(told.iter().any(|(s, r, _)| (*s, r.as_str()) == (Severity::Normal, "Verified")), "{told:?}");
        assert!(events(&first, &at(2, 0)).is_empty(), "one more task verified is not news");
        let outvoted = events(&at(2, 0), &at(3, 1));
        assert_eq!(outvoted.len(), 1, "{outvoted:?}");
        assert_eq!((outvoted[0].0, outvoted[0].1.as_str()), (Severity::Normal, "Verified"));
        assert!(outvoted[0].2.contains("3 task(s) verified by a quorum, 0 accepted unchecked, 1 disputed"), "{outvoted:?}");
        assert!(events(&at(3, 1), &at(9, 1)).is_empty());
    }

    #[test]
    fn disagreeing_replicas_are_a_warning_naming_the_task_and_nodes_once_per_disagreement() {
        let p = Progress { disagreements: vec![disagreement(3, 1)], ..progress(JobPhase::Running, TaskCounts { total: 5, pending: 5, ..Default::default() }) };
        let s = summarize(&ComputeJobStatus::default(), &observed(&p, &[], None));
        let c = s.conditions.iter().find(|c| c.type_ == VERIFIED).unwrap();
        let said = "the replicas of task 3 (attempt 1) returned different results: node alice-1 exit 0 output aaaaaaaaaaaa, node bob-1 exit 0 output \
                    bbbbbbbbbbbb; the task is tried again";
        assert_eq!((c.status.as_str(), c.reason.as_str(), c.message.as_str()), ("False", "ResultsDisagree", said));
        assert_eq!(events(&ComputeJobStatus::default(), &s), vec![(Severity::Warning, "ResultsDisagree".to_string(), said.to_string())]);
        assert!(events(&s, &summarize(&s, &observed(&p, &[], None))).is_empty(), "the same disagreement is told once");

        // The retry disagrees again, and another task too: news again.
        let again = Progress { disagreements: vec![disagreement(3, 2), disagreement(4, 1)], ..p.clone() };
        let s2 = summarize(&s, &observed(&again, &[], None));
        let ev = events(&s, &s2);
        assert_eq!(ev.len(), 1);
        assert!(ev[0].2.starts_with("the replicas of task 3 (attempt 2)") && ev[0].2.ends_with("tried again (1 other task(s) too)"), "{ev:?}");

        // Verified on retry: the condition goes away.
        let fine = Progress { disagreements: vec![], ..p.clone() };
        assert!(!summarize(&s2, &observed(&fine, &[], None)).conditions.iter().any(|c| c.type_ == VERIFIED));
    }

    #[test]
    fn a_job_failed_by_disagreeing_replicas_says_so() {
        let mut p = progress(JobPhase::Failed, TaskCounts { total: 4, failed: 2, succeeded: 2, ..Default::default() });
        p.failed = vec![1, 2];
        p.disagreements = vec![disagreement(2, 3)];
        p.failure = Some(FailureCause::ResultsDisagree { failed: vec![1, 2], first: disagreement(2, 3) });
        let s = summarize(&ComputeJobStatus::default(), &observed(&p, &[], None));
        let c = s.conditions.iter().find(|c| c.type_ == FAILED).unwrap();
        assert_eq!(c.reason, "ResultsDisagree");
        assert!(c.message.starts_with("task(s) 1-2 failed on every attempt; last of task 2: the replicas of task 2 (attempt 3) returned different results"));
        assert!(c.message.contains("node alice-1") && c.message.contains("node bob-1"));
        assert!(!s.conditions.iter().any(|c| c.type_ == VERIFIED), "said once, by Failed");
        assert!(events(&ComputeJobStatus::default(), &s).iter().any(|(sev, reason, _)| *sev == Severity::Warning && reason == "ResultsDisagree"));
    }

    #[test]
    fn invalid_spec_status_and_event() {
        let why = Invalid { reason: "InvalidSpec", message: "spec.tasks must be between 1 and 1000000, got 0".into() };
        let s = invalid(&ComputeJobStatus::default(), Some(1), &why);
        assert_eq!(s.phase, Some(JobPhase::Failed));
        assert!(is_true(&s.conditions, FAILED));
        assert!(!is_true(&s.conditions, VALID));
        let ev = events(&ComputeJobStatus::default(), &s);
        assert_eq!(ev.len(), 1);
        assert!(ev.iter().all(|(sev, reason, msg)| *sev == Severity::Warning && reason == "InvalidSpec" && msg.contains("spec.tasks")));
    }

    #[test]
    fn suspension_shows_as_a_condition_until_resumed() {
        let p = progress(JobPhase::Running, TaskCounts { total: 2, pending: 2, ..Default::default() });
        let suspended = summarize(&ComputeJobStatus::default(), &Observed { suspended: true, ..observed(&p, &[], None) });
        assert!(is_true(&suspended.conditions, SUSPENDED));
        assert!(events(&ComputeJobStatus::default(), &suspended).iter().any(|(sev, reason, _)| *sev == Severity::Normal && reason == "Suspended"));
        let resumed = summarize(&suspended, &observed(&p, &[], None));
        assert!(!resumed.conditions.iter().any(|c| c.type_ == SUSPENDED));
    }

    #[test]
    fn an_exhausted_budget_is_a_scheduled_false_condition_with_a_warning_and_usage_is_shown() {
        let p = progress(JobPhase::Running, TaskCounts { total: 5, pending: 3, running: 1, succeeded: 1, ..Default::default() });
        let usage = crate::crd::JobUsage { receipts: 1, cost: "0.4".into(), budget: Some("1".into()), ..Default::default() };
        let why = "budget 1 credits: 0.4 spent and up to 0.3 committed to running tasks; the next task could cost up to 0.3";
        let s = summarize(&ComputeJobStatus::default(), &Observed { budget_exhausted: Some(why), usage: Some(usage.clone()), ..observed(&p, &[], None) });
        let c = s.conditions.iter().find(|c| c.type_ == SCHEDULED).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "BudgetExhausted"));
        assert_eq!(c.message, format!("3 task(s) waiting: {why}"));
        assert_eq!(s.usage, Some(usage));
        assert!(events(&ComputeJobStatus::default(), &s).iter().any(|(sev, reason, _)| *sev == Severity::Warning && reason == "BudgetExhausted"));
        // Usage the sync could not read (None) keeps the last figures.
        assert_eq!(summarize(&s, &observed(&p, &[], None)).usage, s.usage);
    }

    #[test]
    fn a_fixed_spec_is_no_longer_failed() {
        let why = Invalid { reason: "InvalidSpec", message: "spec.workload must set exactly one".into() };
        let failed = invalid(&ComputeJobStatus::default(), Some(1), &why);
        let p = Progress { started_ms: None, ..progress(JobPhase::Pending, TaskCounts { total: 1, pending: 1, ..Default::default() }) };
        let fixed = summarize(&failed, &observed(&p, &[], None));
        assert_eq!(fixed.phase, Some(JobPhase::Pending));
        assert!(!fixed.conditions.iter().any(|c| c.type_ == FAILED));
        assert!(is_true(&fixed.conditions, VALID));
        let waiting = waiting_for_module(&failed, Some(2), "ModuleUnavailable", "ConfigMap ns/m does not exist");
        assert_eq!(waiting.phase, Some(JobPhase::Pending));
        assert!(!waiting.conditions.iter().any(|c| c.type_ == FAILED));
    }

    #[test]
    fn missing_module_keeps_the_job_pending() {
        let s = waiting_for_module(&ComputeJobStatus::default(), Some(1), "ModuleUnavailable", "ConfigMap ns/m not found");
        assert_eq!(s.phase, Some(JobPhase::Pending));
        assert!(!is_true(&s.conditions, SCHEDULED));
        assert_eq!(events(&ComputeJobStatus::default(), &s)[0].1, "ModuleUnavailable");
    }
}
