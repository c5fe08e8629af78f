//! Memory flat in finished tasks, and the retention of ended jobs' attempts, through `sync`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::fixtures::{exec_policy, job};
use super::*;
use crate::attempt::{AttemptPhase, AttemptResult, attempt_id};
use crate::crd::JobPhase;
use crate::fleet::Fleet;
use crate::store::Store;

fn attempt(uid: &str, index: u32, phase: AttemptPhase) -> Attempt {
    Attempt {
        id: attempt_id(uid, index, 1),
        job_uid: uid.into(),
        job_key: format!("default/{uid}"),
        index,
        number: 1,
        replica: 0,
        node: "gone".into(),
        phase: AttemptPhase::Assigned,
        cpu_millis: 1,
        memory_bytes: 1,
        held: None,
        created_ms: 1_000 + i64::from(index),
        finished_ms: None,
        result: None,
    }
    .with_phase(phase)
}

trait WithPhase {
    fn with_phase(self, phase: AttemptPhase) -> Self;
}

impl WithPhase for Attempt {
    fn with_phase(mut self, phase: AttemptPhase) -> Self {
        self.phase = phase;
        if phase.is_terminal() {
            self.finished_ms = Some(self.created_ms + 10);
            self.result = Some(AttemptResult::default());
        }
        self
    }
}

/// A dispatcher over a store holding `done` succeeded tasks and one running one of job `uid`.
async fn with_history(uid: &str, done: u32) -> (Dispatcher, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let mut all: Vec<Attempt> = (0..done).map(|i| attempt(uid, i, AttemptPhase::Succeeded)).collect();
        all.push(attempt(uid, done, AttemptPhase::Running));
        store.insert_attempts(&all).await.unwrap();
    }
    let (changed, _) = mpsc::channel(16);
    (Dispatcher::new(Arc::new(Store::open(dir.path()).unwrap()), Arc::new(Fleet::default()), changed), dir)
}

#[tokio::test]
async fn a_large_jobs_succeeded_tasks_leave_memory_and_still_count_as_done() {
    let (d, _dir) = with_history("big", 5_000).await;
    let (j, policy) = (job("default", "big"), exec_policy(6_000, 1));
    let first = d.sync(&j, &policy, None).await.unwrap();
    assert_eq!((first.progress.counts.succeeded, first.progress.counts.running), (5_000, 1));
    let held = d.store.loaded_job_attempts("big").unwrap();
    assert!(held.len() <= 1 + crate::job::status::RECENT_RESULTS, "held {} attempts", held.len());
    assert!(held.iter().any(|a| a.phase == AttemptPhase::Running), "what runs stays");
    // The next sync knows the same, from the settled ranges, and the start did not move.
    let again = d.sync(&j, &policy, None).await.unwrap();
    assert_eq!((again.progress.counts.succeeded, again.progress.counts.running), (5_000, 1));
    assert_eq!((again.progress.completed.len(), again.progress.started_ms), (5_000, Some(1_000)));
    assert_eq!(d.store.attempts_for_job("big").await.unwrap().len(), 5_001, "the store keeps every attempt");
}

#[tokio::test]
async fn a_small_job_keeps_its_attempts_until_it_ends() {
    let (d, _dir) = with_history("small", 100).await;
    let synced = d.sync(&job("default", "small"), &exec_policy(200, 1), None).await.unwrap();
    assert_eq!(synced.attempts.len(), 101);
    assert_eq!(d.store.loaded_job_attempts("small").unwrap().len(), 101);
}

#[tokio::test]
async fn an_ended_jobs_attempts_are_pruned_after_the_retention_and_it_stays_ended_by_its_status() {
    let (d, _dir) = with_history("ends", 3).await;
    let d = d.with_attempt_retention(Duration::ZERO);
    d.store.finish(&attempt_id("ends", 3, 1), AttemptPhase::Succeeded, Some(&AttemptResult::default()), 2_000).await.unwrap();
    let (j, policy) = (job("default", "ends"), exec_policy(4, 1));
    let done = d.sync(&j, &policy, None).await.unwrap();
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(d.prune_attempts().await.unwrap(), 4);
    assert!(d.store.attempts_for_job("ends").await.unwrap().is_empty());
    // What the status recorded keeps it Succeeded with nothing to place.
    let recorded = crate::job::Recorded { completed: crate::job::indexes::IndexSet::parse("0-3").unwrap(), ..Default::default() };
    let after = d.sync_recorded(&j, &policy, None, &recorded).await.unwrap();
    assert_eq!((after.progress.phase, after.placed), (JobPhase::Succeeded, 0));
}

#[tokio::test]
async fn a_running_jobs_attempts_are_never_pruned() {
    let (d, _dir) = with_history("runs", 3).await;
    let d = d.with_attempt_retention(Duration::ZERO);
    d.sync(&job("default", "runs"), &exec_policy(4, 1), None).await.unwrap();
    assert_eq!(d.prune_attempts().await.unwrap(), 0);
    assert_eq!(d.store.attempts_for_job("runs").await.unwrap().len(), 4);
}
