use std::time::Duration;

use super::*;
use crate::attempt::{Attempt, AttemptPhase, attempt_id};
use crate::job::JobPhase;
use crate::job::policy::{JobPolicy, ModuleSource, TaskWorkload};
use crate::job::progress::{FailureCause, progress_recorded};

fn policy(tasks: u32, parallelism: u32) -> JobPolicy {
    JobPolicy {
        tasks,
        parallelism,
        cpu_millis: 100,
        memory_bytes: 1 << 20,
        max_attempts: 3,
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

fn attempt(index: u32, number: u32, phase: AttemptPhase) -> Attempt {
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
        created_ms: 100,
        finished_ms: phase.is_terminal().then_some(200),
        result: None,
    }
}

fn recorded(completed: &str, failed: &str, started_ms: Option<i64>) -> Recorded {
    Recorded { completed: IndexSet::parse(completed).unwrap(), failed: IndexSet::parse(failed).unwrap(), started_ms }
}

fn run(policy: &JobPolicy, attempts: &[Attempt], r: &Recorded) -> crate::job::Progress {
    progress_recorded(policy, attempts, 1_000, &|_| true, r)
}

#[test]
fn a_job_recorded_as_succeeded_stays_succeeded_with_no_attempt_at_hand() {
    let p = run(&policy(4, 4), &[], &recorded("0-3", "", Some(50)));
    assert_eq!(p.phase, JobPhase::Succeeded);
    assert!(p.to_place.is_empty());
    assert_eq!((p.counts.succeeded, p.completed), (4, vec![0, 1, 2, 3]));
}

#[test]
fn a_half_done_job_places_only_the_tasks_not_recorded() {
    let p = run(&policy(4, 4), &[], &recorded("0-1", "", Some(50)));
    assert_eq!(p.phase, JobPhase::Running, "it had started");
    assert_eq!(p.to_place, vec![(2, 1), (3, 1)]);
    assert_eq!((p.counts.succeeded, p.counts.pending), (2, 2));
    assert_eq!(p.started_ms, Some(50));
}

#[test]
fn a_recorded_failure_fails_the_job_but_attempts_at_hand_decide_their_task() {
    let p = run(&policy(4, 4), &[], &recorded("0", "1", Some(50)));
    assert_eq!((p.phase, p.failure), (JobPhase::Failed, Some(FailureCause::TasksFailed(vec![1]))));
    // With its attempts in the store, task 1 is judged against the current maxAttempts (3): one
    // failure leaves it pending, so a spec that allows more tries resumes it.
    let p = run(&policy(4, 4), &[attempt(1, 1, AttemptPhase::Failed)], &recorded("0", "1", Some(50)));
    assert_eq!(p.phase, JobPhase::Running);
    assert!(p.failed.is_empty());
}

#[test]
fn the_recorded_start_keeps_the_deadline() {
    let p = JobPolicy { job_deadline: Some(Duration::from_millis(100)), ..policy(4, 4) };
    let ended = run(&p, &[], &recorded("0-1", "", Some(50)));
    assert_eq!((ended.phase, ended.failure), (JobPhase::Failed, Some(FailureCause::DeadlineExceeded)));
}

#[test]
fn an_attempt_still_running_for_a_recorded_task_is_cancelled() {
    let running = attempt(2, 1, AttemptPhase::Running);
    let p = run(&policy(4, 4), std::slice::from_ref(&running), &recorded("0-3", "", None));
    assert_eq!(p.phase, JobPhase::Succeeded);
    assert_eq!(p.to_cancel, vec![running.id]);
}

#[test]
fn a_million_tasks_cost_their_attempts_and_gaps_not_their_number() {
    // 1,000,000 tasks, most recorded done, a few running: counted without a pass per task
    // (a pass per task would still pass, so the count and the placements are what is checked).
    let attempts = [attempt(600_000, 1, AttemptPhase::Running), attempt(600_001, 1, AttemptPhase::Failed)];
    let p = run(&policy(1_000_000, 1000), &attempts, &recorded("0-599999,700000-999999", "", Some(1)));
    assert_eq!((p.counts.succeeded, p.counts.running, p.counts.pending), (900_000, 1, 99_999));
    // Task 600,001 waits in backoff; the first eligible ones follow it, up to the free room.
    assert_eq!(p.to_place.len(), 999);
    assert_eq!((p.to_place[0], p.to_place[998]), ((600_002, 1), (601_000, 1)));
    assert_eq!(p.next_retry_ms, Some(200 + 10_000));
}

#[test]
fn merging_keeps_every_done_task_and_the_earliest_start() {
    let mut r = recorded("0-1", "", Some(50));
    r.merge(&recorded("3", "2", Some(20)));
    assert_eq!(r, recorded("0-1,3", "2", Some(20)));
    r.merge(&Recorded::default());
    assert_eq!(r.started_ms, Some(20));
}
