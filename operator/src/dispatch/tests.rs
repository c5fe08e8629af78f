//! The dispatcher's tests: reservations, fair sharing, replicas and restarts, driven through
//! `sync` and `on_update` against a real store and fleet.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kommune_proto::v1::{self, operator_message::Kind as OpKind};
use tokio::sync::mpsc;

use super::fixtures::{exec_policy, job, provider, replicated_policy};
use super::*;
use crate::attempt::{AttemptPhase, attempt_id, replica_attempt_id};
use crate::crd::JobPhase;
use crate::fleet::{Fleet, NodeFacts};
use crate::job::JobPolicy;
use crate::pricing::{self, Micros, RateBook};
use crate::scheduler::Resources;
use crate::store::Store;

#[tokio::test]
async fn room_is_reserved_in_memory_and_freed_the_moment_an_attempt_ends_or_is_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fleet = Arc::new(Fleet::default());
    let (changed, _changed_rx) = mpsc::channel(16);
    let (tx, _session_rx) = mpsc::channel(16);
    let facts =
        NodeFacts { capacity: Resources { cpu_millis: 2000, memory_bytes: 4 << 30, ephemeral_bytes: 0 }, runtimes: vec!["exec".into()], ..Default::default() };
    fleet.connect("n1", facts, tx);
    let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
    let (a, b) = (job("team-a", "ua"), job("team-b", "ub"));

    assert_eq!(d.sync(&a, &exec_policy(2, 1000), None).await.unwrap().placed, 2);
    let waiting = d.sync(&b, &exec_policy(1, 1000), None).await.unwrap();
    assert_eq!(waiting.placed, 0);
    assert_eq!(waiting.unplaced.unwrap().to_string(), "0/1 nodes can run it: 1 insufficient cpu (need 1)");
    assert_eq!(d.explain(&exec_policy(1, 1000)).unwrap().to_string(), "0/1 nodes can run it: 1 insufficient cpu (need 1)");

    // An attempt of A succeeds: its room is free for B at once, and the node's record improves.
    let done = v1::TaskUpdate { attempt_id: attempt_id("ua", 0, 1), state: v1::AttemptState::Succeeded as i32, ..Default::default() };
    assert!(d.on_update("n1", &[0; 32], &done).await.unwrap().is_some());
    assert!(d.on_update("n1", &[0; 32], &done).await.unwrap().is_some(), "a repeated update releases nothing twice");
    assert_eq!(fleet.reputation("n1"), crate::scheduler::Reputation(666));
    assert_eq!(d.sync(&b, &exec_policy(1, 1000), None).await.unwrap().placed, 1);
    assert_eq!(fleet.pool().allocation("n1").resources.cpu_millis, 2000);

    // Deleting A cancels its last attempt and frees its room.
    assert_eq!(d.cancel_job("ua").await.unwrap(), 1);
    assert_eq!(fleet.pool().allocation("n1").resources.cpu_millis, 1000);
    assert_eq!(fleet.pool().reservations(), 1);
    assert!(d.explain(&exec_policy(1, 1000)).is_none());

    // A restarted operator rebuilds the same reservations from the store.
    let fleet2 = Arc::new(Fleet::default());
    let (changed2, _rx2) = mpsc::channel(16);
    let d2 = Dispatcher::new(store, fleet2.clone(), changed2);
    d2.ensure_rebuilt().await.unwrap();
    assert_eq!(fleet2.pool().allocation("n1").resources.cpu_millis, 1000);
    assert_eq!(fleet2.reputation("n1"), crate::scheduler::Reputation(666));
}

#[tokio::test]
async fn freed_room_goes_to_the_small_job_of_another_namespace_before_the_big_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fleet = Arc::new(Fleet::default());
    let (changed, mut changed_rx) = mpsc::channel(16);
    let (tx, _session_rx) = mpsc::channel(64);
    let facts =
        NodeFacts { capacity: Resources { cpu_millis: 4000, memory_bytes: 4 << 30, ephemeral_bytes: 0 }, runtimes: vec!["exec".into()], ..Default::default() };
    fleet.connect("n1", facts, tx);
    let d = Dispatcher::new(store, fleet.clone(), changed);
    let (big, small) = (job("team-a", "big"), job("team-b", "small"));

    // The big job fills the node; the small one waits and says why.
    assert_eq!(d.sync(&big, &exec_policy(100, 1000), None).await.unwrap().placed, 4);
    let waiting = d.sync(&small, &exec_policy(2, 1000), None).await.unwrap();
    assert_eq!((waiting.placed, waiting.unplaced.unwrap().to_string()), (0, "0/1 nodes can run it: 1 insufficient cpu (need 1)".to_string()));

    // Two of the big job's attempts end; the big job syncs first but keeps their room.
    for index in 0..2 {
        let done = v1::TaskUpdate { attempt_id: attempt_id("big", index, 1), state: v1::AttemptState::Succeeded as i32, ..Default::default() };
        d.on_update("n1", &[0; 32], &done).await.unwrap();
    }
    while changed_rx.try_recv().is_ok() {}
    let held = d.sync(&big, &exec_policy(100, 1000), None).await.unwrap();
    assert_eq!(held.placed, 0);
    assert_eq!(held.unplaced.unwrap().to_string(), "1/1 nodes can run it, but their room is kept for 2 task(s) of jobs ahead in the fair-share queue");
    assert_eq!(changed_rx.try_recv().ok().as_deref(), Some("team-b/small"), "the job the room is kept for is woken");
    let placed = d.sync(&small, &exec_policy(2, 1000), None).await.unwrap();
    assert_eq!((placed.placed, placed.unplaced), (2, None));
}

#[tokio::test]
async fn a_three_replica_job_puts_each_round_on_three_owners_and_says_why_when_there_are_two() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fleet = Arc::new(Fleet::default());
    let (changed, _changed_rx) = mpsc::channel(16);
    let _sessions = [provider(&fleet, "alice-1", "alice"), provider(&fleet, "alice-2", "alice"), provider(&fleet, "bob-1", "bob")];
    let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
    let j = job("team-a", "rep");

    // Three nodes, two owners: nothing is placed, not even two of the three copies.
    let waiting = d.sync(&j, &replicated_policy(2, 3), None).await.unwrap();
    let why = "3/3 nodes can run it, but they belong to 2 owner(s) and each task needs 3 replicas on distinct providers and owners";
    assert_eq!((waiting.placed, waiting.unplaced.unwrap().to_string()), (0, why.to_string()));
    assert_eq!(d.explain(&replicated_policy(2, 3)).unwrap().to_string(), why);
    assert!(store.attempts_for_job("rep").await.unwrap().is_empty());
    assert_eq!(fleet.pool().reservations(), 0);

    // A third owner arrives: both tasks run, each copy on another owner.
    let mut carol = provider(&fleet, "carol-1", "carol");
    let synced = d.sync(&j, &replicated_policy(2, 3), None).await.unwrap();
    assert_eq!((synced.placed, synced.unplaced.map(|e| e.to_string())), (6, None));
    assert_eq!(synced.progress.counts.running, 2, "counts are tasks");
    let owner = |node: &str| node.split('-').next().unwrap().to_string();
    for index in 0..2 {
        let round: Vec<&Attempt> = synced.attempts.iter().map(|a| &**a).filter(|a| a.index == index).collect();
        assert_eq!(round.iter().map(|a| (a.number, a.replica)).collect::<Vec<_>>(), vec![(1, 0), (1, 1), (1, 2)]);
        assert_eq!(round.iter().map(|a| a.id.clone()).collect::<Vec<_>>(), (0..3).map(|k| replica_attempt_id("rep", index, 1, k)).collect::<Vec<_>>());
        let owners: HashSet<String> = round.iter().map(|a| owner(&a.node)).collect();
        assert_eq!(owners.len(), 3, "{round:?}");
    }
    let Some(Ok(v1::OperatorMessage { kind: Some(OpKind::Assign(assign)) })) = carol.try_recv().ok() else { panic!("carol got no assignment") };
    assert!(assign.attempt_id.starts_with("rep.") && assign.task_count == 2);

    // Their budget counts every copy: 3 copies of a 1-core hour task cost up to 3 credits.
    let mut d = d;
    d.rates = Arc::new(RateBook::new(pricing::Rates { cpu_core_hour: Micros(1_000_000), ..Default::default() }));
    let hour = JobPolicy { cpu_millis: 1000, task_timeout: Duration::from_secs(3600), budget: Some(Micros(5_000_000)), ..replicated_policy(4, 3) };
    assert_eq!(d.budget_admits(&hour, &[], Micros(0), 4).0, 1, "5 credits admit one task of three copies");
    assert_eq!(d.budget_admits(&JobPolicy { placement: crate::job::PlacementPolicy { replicas: 1, ..Default::default() }, ..hour }, &[], Micros(0), 4).0, 4);
}

#[tokio::test]
async fn a_restarted_operator_does_not_offer_a_running_attempts_gpu_or_disk_before_its_job_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let gpu_node = |fleet: &Fleet| {
        let (tx, rx) = mpsc::channel(16);
        let facts = NodeFacts {
            capacity: Resources { cpu_millis: 8000, memory_bytes: 16 << 30, ephemeral_bytes: 30 << 30 },
            gpus: vec![crate::scheduler::Gpu { model: "a100".into(), memory_bytes: 80 << 30 }],
            runtimes: vec!["exec".into()],
            ..Default::default()
        };
        fleet.connect("g1", facts, tx);
        rx
    };
    let gpu = crate::scheduler::GpuRequest { count: 1, model: Some(crate::scheduler::GpuPattern::parse("a100*").unwrap()), min_memory_bytes: 0 };
    let trainer = JobPolicy { gpu: gpu.clone(), ephemeral_bytes: 20 << 30, ..exec_policy(1, 1000) };
    {
        let fleet = Arc::new(Fleet::default());
        let _session = gpu_node(&fleet);
        let (changed, _rx) = mpsc::channel(16);
        let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
        assert_eq!(d.sync(&job("team-a", "trainer"), &trainer, None).await.unwrap().placed, 1);
        let held = store.attempt(&attempt_id("trainer", 0, 1)).await.unwrap().unwrap().held.unwrap();
        assert_eq!((held.gpu_mask, held.ephemeral_bytes), (1, 20 << 30));
    }

    // The operator restarts; another job syncs first. The trainer has not synced since.
    let fleet = Arc::new(Fleet::default());
    let _session = gpu_node(&fleet);
    let (changed, _rx) = mpsc::channel(16);
    let d = Dispatcher::new(store, fleet.clone(), changed);
    let other_gpu = d.sync(&job("team-b", "other"), &JobPolicy { gpu, ..exec_policy(1, 1000) }, None).await.unwrap();
    assert_eq!((other_gpu.placed, other_gpu.unplaced.unwrap().to_string()), (0, "0/1 nodes can run it: 1 no free GPU matching a100*".to_string()));
    let other_disk = d.sync(&job("team-b", "scratch"), &JobPolicy { ephemeral_bytes: 20 << 30, ..exec_policy(1, 1000) }, None).await.unwrap();
    assert_eq!(other_disk.unplaced.unwrap().to_string(), "0/1 nodes can run it: 1 insufficient ephemeral storage (need 20Gi)");
    let allocated = fleet.pool().allocation("g1");
    assert_eq!((allocated.gpus, allocated.resources.ephemeral_bytes), (1, 20 << 30));
}

#[tokio::test]
async fn a_failed_copy_cancels_its_twin_and_copies_that_keep_disagreeing_fail_the_job_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fleet = Arc::new(Fleet::default());
    let (changed, _changed_rx) = mpsc::channel(16);
    let mut sessions = [provider(&fleet, "alice-1", "alice"), provider(&fleet, "bob-1", "bob")];
    let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
    let j = job("team-a", "twin");
    let policy = JobPolicy { max_attempts: 2, backoff: Duration::ZERO, ..replicated_policy(1, 2) };
    let update = |id: String, state: v1::AttemptState, digest: &str| v1::TaskUpdate {
        attempt_id: id,
        state: state as i32,
        result: Some(v1::TaskResult { exit_code: 0, output_sha256: digest.repeat(64), ..Default::default() }),
        ..Default::default()
    };

    assert_eq!(d.sync(&j, &policy, None).await.unwrap().placed, 2);
    let (first, twin) = (replica_attempt_id("twin", 0, 1, 0), replica_attempt_id("twin", 0, 1, 1));
    d.on_update(&node_of(&store, &twin).await, &[0; 32], &update(twin.clone(), v1::AttemptState::Failed, "a")).await.unwrap();
    for s in sessions.iter_mut() {
        while s.try_recv().is_ok() {}
    }

    // The failed copy fails the round: its twin is cancelled on its node, a new round starts.
    let synced = d.sync(&j, &policy, None).await.unwrap();
    assert_eq!(store.attempt(&first).await.unwrap().unwrap().phase, AttemptPhase::Cancelled);
    let cancelled: Vec<String> = sessions
        .iter_mut()
        .flat_map(|s| std::iter::from_fn(|| s.try_recv().ok()))
        .filter_map(|m| match m.ok()?.kind? {
            OpKind::Cancel(c) => Some(format!("{}: {}", c.attempt_id, c.reason)),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, vec![format!("{first}: not needed any more: its task succeeded, or another copy of its round failed, disagreed or stopped")]);
    assert_eq!((synced.placed, synced.progress.counts.running), (2, 1));

    // The second round's copies disagree: the task has used its two attempts.
    for (k, digest) in [(0, "a"), (1, "b")] {
        let id = replica_attempt_id("twin", 0, 2, k);
        d.on_update(&node_of(&store, &id).await, &[0; 32], &update(id.clone(), v1::AttemptState::Succeeded, digest)).await.unwrap();
    }
    let done = d.sync(&j, &policy, None).await.unwrap();
    assert_eq!(done.progress.phase, JobPhase::Failed);
    let Some(crate::job::progress::FailureCause::ResultsDisagree { failed, first }) = done.progress.failure else { panic!("{:?}", done.progress.failure) };
    assert_eq!((failed, first.index, first.number), (vec![0], 0, 2));
    let mut nodes: Vec<String> = first.answers.iter().map(|a| a.node.clone()).collect();
    nodes.sort();
    assert_eq!(nodes, vec!["alice-1", "bob-1"]);
    assert_eq!(fleet.pool().reservations(), 0, "every copy's room is free");
}

async fn node_of(store: &Store, id: &str) -> String {
    store.attempt(id).await.unwrap().unwrap().node
}

/// The one active attempt of `job_uid`.
async fn active_attempt(d: &Dispatcher, job_uid: &str) -> Option<Arc<Attempt>> {
    d.store.job_attempts(job_uid).await.unwrap().into_iter().find(|a| !a.phase.is_terminal())
}

#[tokio::test]
async fn a_node_that_preempts_every_task_it_gets_is_avoided_by_that_job_and_the_task_finishes_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Arc::new(Fleet::default());
    let (changed, _changed_rx) = mpsc::channel(1024);
    let d = Dispatcher::new(Arc::new(Store::open(dir.path()).unwrap()), fleet.clone(), changed);
    let _bad = provider(&fleet, "bad", "mallory");
    let (j, policy) = (job("ns", "u"), replicated_policy(1, 1));

    // Only the preempting node is there: it gets the task until it has preempted it three times.
    for round in 1..=conduct::MAX_INTERRUPTIONS_PER_NODE {
        assert_eq!(d.sync(&j, &policy, None).await.unwrap().placed, 1, "round {round}");
        let a = active_attempt(&d, "u").await.unwrap();
        let preempted = v1::TaskUpdate { attempt_id: a.id.clone(), state: v1::AttemptState::Preempted as i32, ..Default::default() };
        d.on_update("bad", &[0; 32], &preempted).await.unwrap();
        assert_eq!(d.store.attempt(&a.id).await.unwrap().unwrap().phase, AttemptPhase::Preempted);
    }
    let synced = d.sync(&j, &policy, None).await.unwrap();
    assert_eq!(synced.placed, 0, "a fourth copy is not handed to the node that preempted three");
    assert_eq!(synced.unplaced.unwrap().to_string(), "0/1 nodes can run it: 1 preempted or lost too many of this job's tasks");
    assert_eq!(synced.progress.counts.pending, 1, "preemptions used none of the task's retries: it is still pending, not failed");

    // An honest node arrives and finishes it; the preempting node is still free for other jobs.
    let _good = provider(&fleet, "good", "alice");
    assert_eq!(d.sync(&j, &policy, None).await.unwrap().placed, 1);
    let a = active_attempt(&d, "u").await.unwrap();
    assert_eq!(a.node, "good");
    let done = v1::TaskUpdate { attempt_id: a.id.clone(), state: v1::AttemptState::Succeeded as i32, ..Default::default() };
    d.on_update("good", &[0; 32], &done).await.unwrap();
    assert_eq!(d.sync(&j, &policy, None).await.unwrap().progress.phase, JobPhase::Succeeded);
    let other = d.sync(&job("ns", "other"), &replicated_policy(2, 1), None).await.unwrap();
    assert_eq!(other.placed, 2, "another job still uses both nodes");
}

#[tokio::test]
async fn an_attempt_past_its_timeout_is_failed_by_the_operator_even_while_its_node_stays_connected() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Arc::new(Fleet::default());
    let (changed, _changed_rx) = mpsc::channel(1024);
    let d = Dispatcher::new(Arc::new(Store::open(dir.path()).unwrap()), fleet.clone(), changed).with_task_grace(Duration::from_millis(100));
    let mut silent = provider(&fleet, "silent", "mallory");
    let policy = JobPolicy { task_timeout: Duration::from_millis(200), max_attempts: 2, backoff: Duration::ZERO, ..replicated_policy(1, 1) };
    let j = job("ns", "u");
    assert_eq!(d.sync(&j, &policy, None).await.unwrap().placed, 1);
    let first = active_attempt(&d, "u").await.unwrap();
    let running = v1::TaskUpdate { attempt_id: first.id.clone(), state: v1::AttemptState::Running as i32, ..Default::default() };
    d.on_update("silent", &[0; 32], &running).await.unwrap();

    // Within the timeout and its grace nothing happens, however often the sweep runs.
    assert_eq!(d.enforce_timeouts().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(d.enforce_timeouts().await.unwrap(), 1, "200 ms timeout + 100 ms grace have passed");
    assert_eq!(d.enforce_timeouts().await.unwrap(), 0, "failed once");
    let failed = d.store.attempt(&first.id).await.unwrap().unwrap();
    assert_eq!(failed.phase, AttemptPhase::Failed);
    let message = failed.result.unwrap().message;
    assert!(message.contains("ran past its task timeout") && message.contains("node silent"), "{message}");
    // The node is told to stop it.
    let mut cancelled = false;
    while let Ok(Ok(m)) = silent.try_recv() {
        cancelled |= matches!(m.kind, Some(OpKind::Cancel(ref c)) if c.attempt_id == first.id);
    }
    assert!(cancelled, "the agent is told to stop the attempt");
    assert_eq!(fleet.pool().allocation("silent").resources.cpu_millis, 0, "its room is free");

    // It counts as a failure of the task and is placed again, within the task's retries.
    let synced = d.sync(&j, &policy, None).await.unwrap();
    assert_eq!(synced.placed, 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(d.enforce_timeouts().await.unwrap(), 1);
    let synced = d.sync(&j, &policy, None).await.unwrap();
    assert_eq!((synced.placed, synced.progress.phase), (0, JobPhase::Failed), "two attempts were all the job allowed");
}

#[tokio::test]
async fn attempts_of_a_job_not_synced_since_a_restart_are_left_until_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fleet = Arc::new(Fleet::default());
    let (changed, _rx) = mpsc::channel(1024);
    let d = Dispatcher::new(store.clone(), fleet.clone(), changed).with_task_grace(Duration::ZERO);
    let _n = provider(&fleet, "n", "alice");
    let policy = JobPolicy { task_timeout: Duration::from_millis(10), ..replicated_policy(1, 1) };
    d.sync(&job("ns", "u"), &policy, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;

    // A new operator on the same store does not know the job's timeout until it syncs the job.
    let (changed2, _rx2) = mpsc::channel(1024);
    let d2 = Dispatcher::new(store, fleet.clone(), changed2).with_task_grace(Duration::ZERO);
    assert_eq!(d2.enforce_timeouts().await.unwrap(), 0);
    d2.sync(&job("ns", "u"), &policy, None).await.unwrap();
    assert_eq!(d2.enforce_timeouts().await.unwrap(), 1);
}

/// Runs `policy` for job `uid` with providers alice-1, bob-1 (who always returns a wrong
/// digest) and carol-1; bob (and alice, with `two_first`) alone at first so the first copy is
/// his: every copy handed out is reported finished, until the job ends. Returns the last sync
/// and the store.
async fn run_with_a_liar(uid: &str, policy: &JobPolicy, two_first: bool) -> (Synced, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let fleet = Arc::new(Fleet::default());
    let (changed, _changed_rx) = mpsc::channel(64);
    let d = Dispatcher::new(store.clone(), fleet.clone(), changed);
    let j = job("team-a", uid);
    let _bob = provider(&fleet, "bob-1", "bob");
    let _alice = two_first.then(|| provider(&fleet, "alice-1", "alice"));
    let mut synced = d.sync(&j, policy, None).await.unwrap();
    let _alice = _alice.unwrap_or_else(|| provider(&fleet, "alice-1", "alice"));
    let _carol = provider(&fleet, "carol-1", "carol");
    for _ in 0..6 {
        for a in synced.attempts.iter().filter(|a| !a.phase.is_terminal()) {
            let digest = if a.node == "bob-1" { "b".repeat(64) } else { "a".repeat(64) };
            let result = v1::TaskResult { exit_code: 0, output_sha256: digest, ..Default::default() };
            let done = v1::TaskUpdate { attempt_id: a.id.clone(), state: v1::AttemptState::Succeeded as i32, result: Some(result), ..Default::default() };
            d.on_update(&a.node, &[0; 32], &done).await.unwrap();
        }
        synced = d.sync(&j, policy, None).await.unwrap();
        if synced.progress.phase == JobPhase::Succeeded {
            break;
        }
    }
    std::mem::forget(dir);
    (synced, store)
}

#[tokio::test]
async fn a_lying_provider_is_outvoted_under_a_quorum_and_caught_by_a_spot_check_and_its_outcome_is_observed() {
    use kommune_core::job::verification::{Mode, PPM};
    use kommune_core::reputation::Observed;
    let modes = [
        ("quorum", Mode::Replicate { replicas: 2, quorum: 2, max_replicas: 3 }, true),
        ("spot", Mode::SpotCheck { fraction_ppm: PPM, max_replicas: 3 }, false),
    ];
    for (uid, mode, two_first) in modes {
        let mut policy = replicated_policy(1, 1);
        policy.verification.mode = mode;
        let (synced, store) = run_with_a_liar(uid, &policy, two_first).await;
        assert_eq!(synced.progress.phase, JobPhase::Succeeded, "{uid}");
        let v = &synced.progress.verification;
        assert_eq!((v.verified, v.unverified, v.disputed), (1, 0, 1), "{uid}: verified by a quorum, after a dispute");
        let by_node = |node: &str| synced.attempts.iter().filter(|a| a.node == node).count();
        assert_eq!((by_node("bob-1"), synced.attempts.len()), (1, 3), "{uid}: the liar ran the first copy; two others outvoted it");
        // Verification outcomes only: every copy that ran to an end is also observed Completed.
        let bob: Vec<_> = store.observations_of("bob-1", 10).await.unwrap().into_iter().filter(|o| o.observed.is_verification()).collect();
        assert_eq!(bob.iter().map(|o| o.observed).collect::<Vec<_>>(), vec![Observed::Outvoted], "{uid}");
        assert_eq!(bob[0].workload, policy.workload.class());
        for honest in ["alice-1", "carol-1"] {
            let o = store.observations_of(honest, 10).await.unwrap();
            let verdicts: Vec<_> = o.iter().map(|o| o.observed).filter(|o| o.is_verification()).collect();
            assert_eq!(verdicts, vec![Observed::Agreed], "{uid} {honest}");
            assert!(o.iter().any(|o| o.observed == Observed::Completed), "{uid} {honest}: its run is observed too");
        }
        let winner = synced.attempts.iter().find(|a| a.node != "bob-1").unwrap();
        assert_eq!(winner.result.as_ref().unwrap().output_sha256, "a".repeat(64));
    }
}

#[tokio::test]
async fn a_result_not_chosen_for_a_spot_check_is_accepted_unchecked_and_observed_so() {
    use kommune_core::job::verification::Mode;
    use kommune_core::reputation::Observed;
    let mut policy = replicated_policy(1, 1);
    policy.verification.mode = Mode::SpotCheck { fraction_ppm: 0, max_replicas: 3 };
    let (synced, store) = run_with_a_liar("unchecked", &policy, false).await;
    assert_eq!((synced.progress.phase, synced.attempts.len()), (JobPhase::Succeeded, 1));
    assert_eq!(synced.progress.verification.unverified, 1);
    let o = store.observations_of("bob-1", 10).await.unwrap();
    let mut seen: Vec<Observed> = o.iter().map(|o| o.observed).collect();
    seen.sort();
    assert_eq!(seen, vec![Observed::Unverified, Observed::Completed], "accepted unchecked, and its run observed");
}
