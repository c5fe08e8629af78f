//! Providers' reputations with real agents over loopback (issue 16): honesty and reliability
//! are earned apart, a submitter's crashing task costs no provider anything, and a provider
//! outvoted too often is quarantined and gets no more work until an admin lifts it.

// Shared with the component and hostile tests; each test file uses part of it.
#[allow(dead_code)]
#[path = "support/operator.rs"]
mod harness;

use harness::*;
use kommune_core::reputation::{Observation, Observed};
use kommune_operator::attempt::AttemptPhase;
use kommune_operator::crd::JobPhase;
use kommune_operator::scheduler::Reputation;
use kommune_proto::now_ms;

fn observation(node: &str, n: usize, observed: Observed) -> Observation {
    Observation {
        node: node.into(),
        workload: "exec:/bin/sh".into(),
        job_uid: "checked".into(),
        attempt_id: format!("checked.{n}.1"),
        observed,
        at_ms: now_ms(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_honest_providers_reputation_is_not_lowered_by_a_task_that_crashes_everywhere() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _a = join_agent(&op, dir.path(), "honest-a", true).await;
    let _b = join_agent(&op, dir.path(), "honest-b", true).await;
    wait_connected(&op, &["honest-a", "honest-b"]).await;
    let crashes = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'exit 3']\ntasks: 2\nretries: {maxAttempts: 2, backoffSeconds: 0}\n");
    let done = op.run_to_end(&job("crash-job"), &crashes, None).await;
    assert_eq!(done.progress.phase, JobPhase::Failed);
    // Every attempt crashed, except a second run cancelled because the other task's last
    // failure had already failed the job.
    let crashed = |a: &kommune_operator::attempt::Attempt| a.phase == AttemptPhase::Failed && a.result.as_ref().is_some_and(|r| r.exit_code == 3);
    let cancelled = |a: &kommune_operator::attempt::Attempt| a.phase == AttemptPhase::Cancelled && a.number == 2;
    assert!(done.attempts.iter().all(|a| crashed(a) || cancelled(a)), "{:?}", done.attempts);
    assert!(done.attempts.iter().filter(|a| crashed(a)).count() >= 3, "{:?}", done.attempts);
    // A result is stored a moment before it is observed: wait for the observations.
    let reported = done.attempts.iter().filter(|a| a.result.as_ref().is_some_and(|r| r.exit_code == 3)).count();
    let fleet = op.dispatcher.fleet();
    let completed = || ["honest-a", "honest-b"].iter().map(|n| fleet.standing(n, now_ms()).counts.completed).sum::<f64>();
    for _ in 0..100 {
        if completed() > reported as f64 - 0.5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stored = op.dispatcher.store().observations_since(0).await.unwrap();
    for node in ["honest-a", "honest-b"] {
        let s = fleet.standing(node, now_ms());
        if s.counts.completed == 0.0 {
            continue; // every attempt went to the other node
        }
        assert!(fleet.reputation(node) > Reputation::NEW, "{node}: {:?}", s);
        assert_eq!((s.counts.lost, s.counts.timed_out, s.counts.honesty()), (0.0, 0.0, Reputation::MAX), "{node}");
    }
    // The job fails once one task used its retries: the other's second run may be cancelled.
    assert!(reported >= 2);
    let ran = completed();
    assert!((ran - reported as f64).abs() < 0.01, "every crashed run is a Completed run of its provider: {ran} of {reported}");
    assert_eq!(stored.len(), reported, "{stored:?}");
    assert!(stored.iter().all(|o| o.observed == Observed::Completed && o.workload == "exec:/bin/sh" && o.job_uid == "crash-job"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_outvoted_too_often_loses_reputation_is_quarantined_and_gets_no_more_work() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _liar = join_agent(&op, dir.path(), "liar", true).await;
    let _honest = join_agent(&op, dir.path(), "honest", true).await;
    wait_connected(&op, &["liar", "honest"]).await;
    let fleet = op.dispatcher.fleet().clone();

    // One outvoted result: the reputation falls at once, but one result quarantines no one.
    op.dispatcher.observe(vec![observation("liar", 0, Observed::Outvoted)]).await.unwrap();
    assert!(fleet.reputation("liar") < Reputation(100), "{}", fleet.reputation("liar"));
    assert_eq!(fleet.quarantine("liar"), None);
    // Seven agreed and two more outvoted: 3 of 10 compared results, over the 10% limit.
    let mut more: Vec<Observation> = (1..8).map(|i| observation("liar", i, Observed::Agreed)).collect();
    more.extend((8..10).map(|i| observation("liar", i, Observed::Outvoted)));
    op.dispatcher.observe(more).await.unwrap();
    let q = fleet.quarantine("liar").expect("quarantined");
    assert!(q.why.starts_with("3.0 of 10.0 compared results outvoted (30%"), "{}", q.why);
    let s = fleet.standing("liar", now_ms());
    assert!(s.counts.honesty() < Reputation(250) && s.counts.reliability() == Reputation::NEW, "honesty falls, reliability is untouched: {s:?}");

    // No more placements, and the scheduler says why.
    let work = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'echo ok']\ntasks: 6\n");
    let why = fleet.pool().explain(&work.request()).to_string();
    assert!(why.contains("1 quarantined (too many results outvoted)"), "{why}");
    let done = op.run_to_end(&job("after"), &work, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    assert!(done.attempts.iter().all(|a| a.node == "honest"), "{:?}", done.attempts.iter().map(|a| &a.node).collect::<Vec<_>>());

    // A restarted operator rebuilds the standing from the store and quarantines it again.
    let op = op.crash_and_restart().await;
    op.dispatcher.sync(&job("after"), &work, None).await.unwrap();
    let fleet = op.dispatcher.fleet().clone();
    assert!(fleet.quarantine("liar").is_some(), "the quarantine survives a restart");
    assert!(fleet.reputation("liar") < Reputation(150), "{}", fleet.reputation("liar"));

    // An admin lifts it: what was outvoted before no longer counts towards a new quarantine,
    // so one more bad result does not bring it back; the reputation still remembers.
    assert!(op.dispatcher.apply_quarantine_lift("liar", now_ms() + 1).await.unwrap());
    assert_eq!(fleet.quarantine("liar"), None);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    op.dispatcher.observe(vec![observation("liar", 10, Observed::Outvoted)]).await.unwrap();
    assert_eq!(fleet.quarantine("liar"), None, "one outvoted result after the lift is under the minimum");
    assert!(fleet.reputation("liar") < Reputation(150), "{}", fleet.reputation("liar"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_attempts_loses_reliability_but_not_honesty() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = join_agent(&op, dir.path(), "flaky", true).await;
    wait_connected(&op, &["flaky"]).await;
    op.dispatcher.observe(vec![observation("flaky", 0, Observed::Agreed)]).await.unwrap();
    let slow = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'sleep 0.5; echo ok']\nretries: {maxAttempts: 2, backoffSeconds: 0}\n");
    let jr = job("flaky-job");
    assert_eq!(op.dispatcher.sync(&jr, &slow, None).await.unwrap().placed, 1);
    wait_running(&op, "flaky-job.0.1").await;
    // The machine restarts: same identity, its attempt died with the old process.
    a.disconnect().await;
    wait_disconnected(&op, "flaky").await;
    let (tasks, updates) = tasks_for(&a.state, true, dir.path().join("other-results"));
    a.tasks = tasks;
    a.updates = Some(updates);
    a.connect();
    let done = op.run_to_end(&jr, &slow, None).await;
    assert_eq!(done.attempts.iter().map(|a| a.phase).collect::<Vec<_>>(), vec![AttemptPhase::Lost, AttemptPhase::Succeeded]);
    let s = op.dispatcher.fleet().standing("flaky", now_ms());
    assert!((s.counts.lost - 1.0).abs() < 0.01 && (s.counts.completed - 1.0).abs() < 0.01, "{s:?}");
    assert_eq!(s.counts.honesty(), Reputation::MAX, "losing work is not lying");
    assert_eq!(s.counts.reliability(), Reputation(500), "one lost, one completed");
    let kinds: Vec<Observed> = op.dispatcher.store().observations_of("flaky", 10).await.unwrap().iter().map(|o| o.observed).collect();
    assert!(kinds.contains(&Observed::Lost) && kinds.contains(&Observed::Completed), "{kinds:?}");
}
