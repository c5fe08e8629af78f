//! A provider that lies about its results (issue 16): it returns a made-up stdout digest with a
//! valid receipt. Verification must not accept the lie, and must record who lied.

use kommune_operator::crd::JobPhase;
use kommune_operator::dispatch::ModuleRef;
use kommune_proto::v1::{AgentMessage, AttemptState, TaskResult, TaskUpdate, agent_message};

use crate::agent::{HostileAgent, claims};
use crate::harness::*;
use crate::{PRICED, plausible};

/// The liar alone gets the job's only task and answers with a wrong digest; two honest real
/// agents then join. Under `spotCheck` with fraction 1 the result is checked on another owner,
/// the mismatch is broken by a third copy, the honest answer is accepted and the liar is
/// observed `Outvoted`, the honest agents `Agreed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lying_provider_is_caught_by_a_spot_check_and_its_answer_is_not_accepted() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut liar = HostileAgent::join(&op, dir.path(), "liar", claims(2000, 2 << 30, "")).await.unwrap();
    liar.connect(&op).await;

    let module = ModuleRef { sha256: op.store_module("spot", &hello_module()), url: None };
    let wasm = policy(
        "workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\n    args: ['5000']\nresources: {cpu: 250m, memory: 64Mi}\nverification: {mode: spotCheck, fraction: '1'}\n",
    );
    let jr = job("spot");
    assert_eq!(op.dispatcher.sync(&jr, &wasm, Some(&module)).await.unwrap().placed, 1);
    let assign = liar.assigned().await;
    let lie = "f".repeat(64);
    let receipt = liar.receipt(&assign.attempt_id, &assign.job, AttemptState::Succeeded, plausible(100, 250));
    let result = TaskResult { exit_code: 0, output_sha256: lie.clone(), ..Default::default() };
    let update =
        TaskUpdate { trace: None, attempt_id: assign.attempt_id.clone(), state: AttemptState::Succeeded as i32, result: Some(result), receipt: Some(receipt) };
    liar.sender().send(AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(update)) }).await.unwrap();
    liar.ack_for(&assign.attempt_id).await;

    let _alice = join_agent(&op, dir.path(), "alice-pc", false).await;
    let _bob = join_agent(&op, dir.path(), "bob-pc", false).await;
    wait_connected(&op, &["alice-pc", "bob-pc"]).await;
    let done = op.run_to_end(&jr, &wasm, Some(&module)).await;

    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    assert_eq!(done.attempts.len(), 3, "the lie, its check, and the copy that broke the tie");
    let v = &done.progress.verification;
    assert_eq!((v.verified, v.unverified, v.disputed, v.extra_attempts), (1, 0, 1, 2));
    let honest: Vec<_> = done.attempts.iter().filter(|a| a.node != "liar").collect();
    assert_eq!(honest.len(), 2);
    let digest = &honest[0].result.as_ref().unwrap().output_sha256;
    assert!(digest != &lie && digest == &honest[1].result.as_ref().unwrap().output_sha256, "the honest copies agree");
    let observed = |node: &'static str| {
        let store = op.dispatcher.store().clone();
        // Verification outcomes only: each copy that ran to an end is also observed Completed.
        async move {
            store.observations_of(node, 10).await.unwrap().into_iter().filter(|o| o.observed.is_verification()).map(|o| o.observed.as_str()).collect::<Vec<_>>()
        }
    };
    assert_eq!(observed("liar").await, vec!["Outvoted"]);
    assert_eq!((observed("alice-pc").await, observed("bob-pc").await), (vec!["Agreed"], vec!["Agreed"]));
}

/// A provider that answers every copy it is given with a made-up digest under `replicate` (2
/// copies, quorum 2, at most 3). While only the liar and one honest real agent are joined,
/// every task runs once on each and disagrees; a second honest agent then joins and breaks
/// every tie. No wrong result is accepted, the liar is outvoted on every task, quarantined
/// (more than 10% of at least 10 comparisons went against it), and every receipt it sent is
/// reversed: its statement pays nothing, the honest owners' statements pay their work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lying_provider_under_replicate_is_outvoted_quarantined_and_not_paid() {
    const TASKS: usize = 12;
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut liar = HostileAgent::join(&op, dir.path(), "liar", claims(16_000, 4 << 30, "")).await.unwrap();
    liar.connect(&op).await;
    let _alice = join_agent(&op, dir.path(), "alice-pc", false).await;
    wait_connected(&op, &["liar", "alice-pc"]).await;

    // It answers each copy at once with the same wrong digest (a crowd of colluding liars
    // would agree with each other; one liar cannot reach a quorum).
    let lie = "f".repeat(64);
    let lying = {
        let lie = lie.clone();
        tokio::spawn(async move {
            for _ in 0..TASKS {
                // The next copy comes when the honest agent has finished one of its own.
                let assign = liar.assigned_within(std::time::Duration::from_secs(60)).await.expect("a copy of every task");
                let receipt = liar.receipt(&assign.attempt_id, &assign.job, AttemptState::Succeeded, plausible(100, 250));
                let result = TaskResult { exit_code: 0, output_sha256: lie.clone(), ..Default::default() };
                let update = TaskUpdate {
                    trace: None,
                    attempt_id: assign.attempt_id.clone(),
                    state: AttemptState::Succeeded as i32,
                    result: Some(result),
                    receipt: Some(receipt),
                };
                liar.sender().send(AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(update)) }).await.unwrap();
                liar.ack_for(&assign.attempt_id).await;
            }
            liar
        })
    };

    // A whole core per copy keeps the honest agents to two copies at a time, quick on a loaded
    // test host; the subject is the verdict, not the workload.
    let module = ModuleRef { sha256: op.store_module("replicate", &hello_module()), url: None };
    let wasm = policy(&format!(
        "tasks: {TASKS}\nworkload:\n  wasm:\n    configMapRef: {{name: m, key: module.wasm}}\n    args: ['500']\nresources: {{cpu: 1000m, memory: 64Mi}}\nverification: {{mode: replicate, replicas: 2, quorum: 2, maxReplicas: 3}}\n"
    ));
    let jr = job("replicate");
    // Two owners: every task runs on both, and each disagreement waits for a third owner.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(180);
    while !lying.is_finished() {
        let s = op.dispatcher.sync(&jr, &wasm, Some(&module)).await.unwrap();
        assert!(tokio::time::Instant::now() < deadline, "the liar was not given a copy of every task: {:?}", s.progress);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut liar = lying.await.unwrap();

    let _bob = join_agent(&op, dir.path(), "bob-pc", false).await;
    wait_connected(&op, &["bob-pc"]).await;
    let done = op.run_to_end(&jr, &wasm, Some(&module)).await;
    assert!(liar.assigned_within(std::time::Duration::from_millis(200)).await.is_none(), "the liar got no copy beyond one per task");

    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.progress);
    let v = &done.progress.verification;
    assert_eq!((v.verified as usize, v.disputed as usize), (TASKS, TASKS), "{v:?}");
    assert_eq!(done.attempts.iter().filter(|a| a.node == "liar").count(), TASKS);
    // Each task's quorum is its two honest copies: the accepted digest of every task is theirs.
    for index in 0..TASKS as u32 {
        let honest: Vec<&String> =
            done.attempts.iter().filter(|a| a.index == index && a.node != "liar").filter_map(|a| a.result.as_ref().map(|r| &r.output_sha256)).collect();
        assert!(honest.len() == 2 && honest[0] == honest[1] && *honest[0] != lie, "task {index}: {honest:?}");
    }

    let fleet = op.dispatcher.fleet();
    let quarantine = fleet.quarantine("liar").expect("the liar is quarantined");
    assert!(quarantine.why.contains("outvoted"), "{}", quarantine.why);
    assert_eq!(fleet.standing("liar", kommune_proto::now_ms()).counts.agreed, 0.0);
    assert!(fleet.reputation("alice-pc") > fleet.reputation("liar") && fleet.reputation("bob-pc") > fleet.reputation("liar"));

    // Money follows truth: the period's statements pay the honest owners and not the liar.
    let statements = op.dispatcher.ledger().expect("ledger").close_period().await.unwrap();
    let of = |node: &str| statements.iter().find(|s| s.statement.nodes.contains_key(node)).map(|s| &s.statement).unwrap();
    let lied = of("liar");
    assert_eq!(lied.receipts, TASKS as u64);
    assert!(lied.credits_micros > 0 && lied.reversed_micros == lied.credits_micros, "{lied:?}");
    assert_eq!((lied.payable_micros, lied.reversals.len()), (0, TASKS));
    for node in ["alice-pc", "bob-pc"] {
        let s = of(node);
        // (This tiny task's real usage rounds to almost nothing: what counts is that none of it
        // is reversed and all of it is payable.)
        assert!(s.receipts == TASKS as u64 && s.reversals.is_empty() && s.payable_micros == s.credits_micros, "{node}: {s:?}");
    }
}
