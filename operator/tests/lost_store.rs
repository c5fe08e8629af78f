//! Finished work survives a lost store: an operator that starts on an empty data directory (a
//! replaced volume) reads what is done from the job's status, so it runs and bills nothing
//! again, and resumes a half-done job with only the tasks not done. Real agents, real ledger.

#[allow(dead_code)]
#[path = "support/operator.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::*;
use kommune_operator::crd::{ComputeJobStatus, JobPhase};
use kommune_operator::dispatch::{JobRef, Synced};
use kommune_operator::job::status::{self, Observed};
use kommune_operator::job::{JobPolicy, Recorded, recorded};
use kommune_operator::pki::Ca;
use kommune_operator::tokens::MemoryTokens;

const FOUR: &str = "workload:\n  exec:\n    command: [echo, done]\ntasks: 4\nresources: {cpu: 100m, memory: 16Mi}\n";

/// The status the controller would publish after `synced` (the record that outlives the store).
fn published(policy: &JobPolicy, synced: &Synced) -> ComputeJobStatus {
    let observed = Observed {
        generation: Some(1),
        runtime: policy.workload.runtime(),
        progress: &synced.progress,
        attempts: &synced.attempts,
        unplaced: synced.unplaced.as_ref(),
        module_sha256: None,
        suspended: false,
        now_ms: kommune_proto::now_ms(),
        budget_exhausted: None,
        usage: synced.usage.clone(),
    };
    status::summarize(&ComputeJobStatus::default(), &observed)
}

/// Syncs with what `status` records until the job ends, as the controller's loop does.
async fn run_recorded(op: &Operator, jr: &JobRef, policy: &JobPolicy, status: &ComputeJobStatus) -> (Synced, usize) {
    let (recorded, errors) = recorded::from_status(status);
    assert!(errors.is_empty(), "{errors:?}");
    let mut changed = op.changed.lock().await;
    let mut placed = 0;
    for _ in 0..300 {
        let synced = op.dispatcher.sync_recorded(jr, policy, None, &recorded).await.unwrap();
        placed += synced.placed;
        if matches!(synced.progress.phase, JobPhase::Succeeded | JobPhase::Failed) {
            return (synced, placed);
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), changed.recv()).await;
    }
    panic!("job {} did not finish", jr.key);
}

/// A new operator process on an empty data directory (same CA and tokens: the cluster's
/// Secrets survive), with a freshly joined agent (the lost store forgot the old ones).
async fn on_an_empty_data_dir(ca: Arc<Ca>, dir: &std::path::Path) -> (Operator, Agent) {
    let op = start_operator(tempfile::tempdir().unwrap(), ca, Arc::new(MemoryTokens::default()), 0, RATES).await;
    let agent = join_agent(&op, dir, &format!("agent-{}", rand_suffix()), true).await;
    let name = agent.state.config.node_name.clone();
    wait_connected(&op, &[&name]).await;
    (op, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_job_stays_succeeded_with_no_new_attempt_or_receipt_after_the_store_is_lost() {
    let (ca, dir) = (Arc::new(Ca::generate().unwrap()), tempfile::tempdir().unwrap());
    let first = start_operator(tempfile::tempdir().unwrap(), ca.clone(), Arc::new(MemoryTokens::default()), 0, RATES).await;
    let _a = join_agent(&first, dir.path(), "agent-a", true).await;
    wait_connected(&first, &["agent-a"]).await;
    let (jr, policy) = (job("finished"), policy(FOUR));
    let done = first.run_to_end(&jr, &policy, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    assert_eq!(first.metered_at_least(&jr.uid, 4).await.receipts, 4);
    let status = published(&policy, &done);
    assert_eq!((status.completed_indexes.as_deref(), status.progress.as_deref()), (Some("0-3"), Some("4/4")));
    drop(first);

    let (op, _b) = on_an_empty_data_dir(ca, dir.path()).await;
    let (synced, placed) = run_recorded(&op, &jr, &policy, &status).await;
    assert_eq!(synced.progress.phase, JobPhase::Succeeded, "{:?}", synced.progress);
    assert_eq!((placed, synced.progress.counts.succeeded), (0, 4));
    assert!(op.dispatcher.store().attempts_for_job(&jr.uid).await.unwrap().is_empty(), "no attempt was made");
    assert!(op.dispatcher.job_ended(&jr.uid, &policy, &recorded::from_status(&status).0).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(op.dispatcher.ledger().unwrap().job_usage(&jr.uid).await.unwrap().receipts, 0, "nothing billed again");
    let again = published(&policy, &synced);
    assert_eq!((again.phase, again.completed_indexes, again.progress), (Some(JobPhase::Succeeded), Some("0-3".into()), Some("4/4".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_half_done_job_resumes_with_only_the_tasks_its_status_does_not_record() {
    let dir = tempfile::tempdir().unwrap();
    let (op, _agent) = on_an_empty_data_dir(Arc::new(Ca::generate().unwrap()), dir.path()).await;
    let (jr, policy) = (job("half-done"), policy(FOUR));
    // What the lost operator had published: tasks 0 and 1 done.
    let status = ComputeJobStatus {
        phase: Some(JobPhase::Running),
        completed_indexes: Some("0-1".into()),
        start_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())),
        ..Default::default()
    };
    let (synced, placed) = run_recorded(&op, &jr, &policy, &status).await;
    assert_eq!((synced.progress.phase, synced.progress.completed.clone()), (JobPhase::Succeeded, vec![0, 1, 2, 3]));
    assert_eq!(placed, 2);
    let mut ran: Vec<u32> = op.dispatcher.store().attempts_for_job(&jr.uid).await.unwrap().iter().map(|a| a.index).collect();
    ran.sort();
    assert_eq!(ran, vec![2, 3], "only the tasks not recorded ran");
    assert_eq!(op.metered_at_least(&jr.uid, 2).await.receipts, 2, "and only they were billed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_its_status_the_same_empty_store_would_run_everything_again() {
    // The control: the record, not the empty store, is what keeps the work from running again.
    let dir = tempfile::tempdir().unwrap();
    let (op, _agent) = on_an_empty_data_dir(Arc::new(Ca::generate().unwrap()), dir.path()).await;
    let (jr, policy) = (job("no-record"), policy(FOUR));
    let synced = op.dispatcher.sync_recorded(&jr, &policy, None, &Recorded::default()).await.unwrap();
    assert_eq!(synced.placed, 4);
}
