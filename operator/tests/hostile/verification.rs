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
