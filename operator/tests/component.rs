//! Component test: the operator's gateway, dispatcher and store with real agents (the
//! kommune-agent library) over loopback gRPC with TLS and mTLS. No Kubernetes: the test drives
//! the dispatcher the way the ComputeJob controller does.

// Shared with the hostile-agent tests; each test file uses part of it.
#[allow(dead_code)]
#[path = "support/operator.rs"]
mod harness;

use std::time::Duration;

use harness::*;
use kommune_agent::join::{self, JoinOptions};
use kommune_agent::tasks::Spool;
use kommune_operator::attempt::AttemptPhase;
use kommune_operator::crd::JobPhase;
use kommune_operator::dispatch::{ModuleRef, Synced};
use kommune_operator::fleet::NodeAdmin;
use kommune_operator::gateway::NodeEvent;
use kommune_operator::job::JobPolicy;
use kommune_operator::pki::Ca;
use kommune_proto::token::JoinToken;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_join_and_run_wasm_and_exec_jobs_over_mtls() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _a = join_agent(&op, dir.path(), "agent-a", true).await;
    let _b = join_agent(&op, dir.path(), "agent-b", false).await;
    wait_connected(&op, &["agent-a", "agent-b"]).await;

    // The wasm example: 4 tasks spread over both agents, module served by digest.
    let sha = op.store_module("wasm-job", &hello_module());
    let wasm = policy(
        "workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\n    args: ['20000']\n    env: [{name: GREETING, value: hello}]\ntasks: 4\nresources: {cpu: 250m, memory: 64Mi}\n",
    );
    let done = op.run_to_end(&job("wasm-job"), &wasm, Some(&ModuleRef { sha256: sha, url: None })).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    assert_eq!(done.attempts.len(), 4, "each task ran exactly once");
    for a in &done.attempts {
        let r = a.result.as_ref().unwrap();
        assert_eq!(a.phase, AttemptPhase::Succeeded);
        assert_eq!(r.exit_code, 0);
        let out = String::from_utf8_lossy(&r.stdout_tail);
        assert!(out.contains(&format!("task {}/4", a.index)), "{out}");
        assert!(out.contains("2262 primes below 20000"), "{out}");
        assert_eq!(r.output_sha256.len(), 64);
    }
    let on_a = done.attempts.iter().filter(|a| a.node == "agent-a").count();
    assert_eq!(on_a, 2, "tasks are spread over both agents");
    // Same input, same output: the module is deterministic, so digests agree per index.
    let digests: std::collections::HashSet<_> = done.attempts.iter().map(|a| a.result.as_ref().unwrap().output_sha256.clone()).collect();
    assert_eq!(digests.len(), 4);
    // Every attempt is metered once, from receipts the agents signed: fuel, CPU and output.
    let m = op.metered_at_least("wasm-job", 4).await;
    assert_eq!(m.receipts, 4);
    assert!(m.usage.wasm_fuel > 4 * 100_000 && m.usage.cpu_micros > 0, "{m:?}");
    assert_eq!(m.usage.output_bytes, done.attempts.iter().map(|a| a.result.as_ref().unwrap().output_bytes).sum::<u64>());

    // exec only lands on the agent that opted in.
    let exec = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'echo exec $KOMMUNE_TASK_INDEX of $KOMMUNE_TASK_COUNT']\ntasks: 3\n");
    let done = op.run_to_end(&job("exec-job"), &exec, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    assert!(done.attempts.iter().all(|a| a.node == "agent-a"), "{:?}", done.attempts);
    let mut outs: Vec<String> = done.attempts.iter().map(|a| String::from_utf8_lossy(&a.result.as_ref().unwrap().stdout_tail).into_owned()).collect();
    outs.sort();
    assert_eq!(outs, vec!["exec 0 of 3\n", "exec 1 of 3\n", "exec 2 of 3\n"]);
    assert_eq!(op.metered_at_least("exec-job", 3).await.receipts, 3);
    let earned = op.dispatcher.ledger().unwrap().node_earnings("agent-a").await.unwrap();
    assert_eq!(earned.receipts, 2 + 3, "agent-a ran two wasm and three exec tasks");

    let events = op.events.lock().unwrap().clone();
    assert!(events.iter().any(|e| matches!(e, NodeEvent::Joined { node, .. } if node == "agent-a")));
    assert!(events.iter().any(|e| matches!(e, NodeEvent::Connected { node, .. } if node == "agent-b")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicated_wasm_job_runs_each_task_on_two_owners_verifies_and_meters_every_copy_once() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _a = join_agent(&op, dir.path(), "alice-pc", false).await;
    let _b = join_agent(&op, dir.path(), "bob-pc", false).await;
    wait_connected(&op, &["alice-pc", "bob-pc"]).await;
    for (node, owner) in [("alice-pc", "alice"), ("bob-pc", "bob")] {
        op.dispatcher.fleet().set_admin(node, NodeAdmin { owner: owner.into(), ..Default::default() });
    }

    let sha = op.store_module("replicated", &hello_module());
    let wasm = policy(
        "workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\n    args: ['5000']\ntasks: 2\nresources: {cpu: 250m, memory: 64Mi}\nplacement: {replicas: 2}\n",
    );
    let done = op.run_to_end(&job("replicated"), &wasm, Some(&ModuleRef { sha256: sha, url: None })).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    assert_eq!(done.progress.counts.succeeded, 2, "counts are tasks");
    assert!(done.progress.disagreements.is_empty());
    assert_eq!(done.attempts.len(), 4, "two tasks, two copies each, each run once");
    for index in 0..2 {
        let copies: Vec<_> = done.attempts.iter().filter(|a| a.index == index).collect();
        assert_eq!(
            copies.iter().map(|a| (a.number, a.replica, a.phase)).collect::<Vec<_>>(),
            vec![(1, 0, AttemptPhase::Succeeded), (1, 1, AttemptPhase::Succeeded)]
        );
        assert_ne!(copies[0].node, copies[1].node, "copies run on distinct owners' machines");
        let (r0, r1) = (copies[0].result.as_ref().unwrap(), copies[1].result.as_ref().unwrap());
        assert_eq!((r0.exit_code, r0.output_sha256.len()), (0, 64));
        assert_eq!(r0.output_sha256, r1.output_sha256, "the module is deterministic: the copies agree");
    }
    // Every copy is metered once, from the receipt of the agent that ran it.
    let m = op.metered_at_least("replicated", 4).await;
    assert_eq!(m.receipts, 4);
    for node in ["alice-pc", "bob-pc"] {
        assert_eq!(op.dispatcher.ledger().unwrap().node_earnings(node).await.unwrap().receipts, 2, "{node} ran one copy of each task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_finishes_while_its_agent_is_disconnected_is_reported_once_after_reconnect() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = join_agent(&op, dir.path(), "flaky", true).await;
    wait_connected(&op, &["flaky"]).await;

    let slow = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'sleep 1; echo survived']\n");
    let jr = job("slow-job");
    let first = op.dispatcher.sync(&jr, &slow, None).await.unwrap();
    assert_eq!(first.placed, 1);
    wait_running(&op, "slow-job.0.1").await;

    // Drop the connection while the task runs; it finishes offline and is spooled.
    a.disconnect().await;
    wait_disconnected(&op, "flaky").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let offline = op.dispatcher.sync(&jr, &slow, None).await.unwrap();
    assert_eq!(offline.progress.counts.running, 1, "the attempt is kept while its node is away");
    assert_eq!(offline.placed, 0, "nothing is placed twice");

    // Reconnect: Hello lists the finished attempt, the spooled result is sent and acknowledged.
    a.connect();
    let done = op.run_to_end(&jr, &slow, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    assert_eq!(done.attempts.len(), 1, "not retried: {:?}", done.attempts);
    assert_eq!(done.attempts[0].number, 1);
    assert_eq!(done.attempts[0].result.as_ref().unwrap().stdout_tail, b"survived\n");
    for _ in 0..100 {
        if a.tasks.known_ids().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.tasks.known_ids().is_empty(), "the Ack cleared the agent's spool");
    assert_eq!(op.metered_at_least("slow-job", 1).await.receipts, 1, "metered once");
    let history = kommune_agent::receipts::history(&a.state.receipts_dir(), &[]);
    assert_eq!(history.iter().map(|r| (r.attempt_id.as_str(), r.status.as_str())).collect::<Vec<_>>(), [("slow-job.0.1", "accepted")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_of_a_node_gone_past_its_grace_are_placed_elsewhere() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = join_agent(&op, dir.path(), "keep-a", true).await;
    let mut b = join_agent(&op, dir.path(), "keep-b", true).await;
    wait_connected(&op, &["keep-a", "keep-b"]).await;
    // The first attempt hangs; a retry finishes at once.
    let hangs_once = policy(
        "workload:\n  exec:\n    command: ['/bin/sh', '-c', 'case $KOMMUNE_ATTEMPT_ID in *.1) sleep 30;; esac; echo done']\nretries: {maxAttempts: 2, backoffSeconds: 0}\n",
    );
    let jr = job("grace-job");
    assert_eq!(op.dispatcher.sync(&jr, &hangs_once, None).await.unwrap().placed, 1);
    wait_running(&op, "grace-job.0.1").await;
    let first = op.dispatcher.store().attempt("grace-job.0.1").await.unwrap().unwrap();
    let (gone, stays) = if first.node == "keep-a" { (&mut a, "keep-b") } else { (&mut b, "keep-a") };
    gone.disconnect().await;
    wait_disconnected(&op, &first.node).await;

    // Within the grace nothing moves; past it the attempt is lost and placed on the other node.
    assert_eq!(op.dispatcher.expire_absent(Duration::from_secs(60)).await.unwrap(), 0);
    let waiting = op.dispatcher.sync(&jr, &hangs_once, None).await.unwrap();
    assert_eq!((waiting.placed, waiting.progress.counts.running), (0, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(op.dispatcher.expire_absent(Duration::from_millis(200)).await.unwrap(), 1);
    let done = op.run_to_end(&jr, &hangs_once, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    let lost = &done.attempts[0];
    assert_eq!(lost.phase, AttemptPhase::Lost);
    assert!(lost.result.as_ref().unwrap().message.contains("unreachable"), "{:?}", lost.result);
    assert_eq!((done.attempts[1].node.as_str(), done.attempts[1].phase), (stays, AttemptPhase::Succeeded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_restart_mid_job_keeps_running_attempts_and_places_nothing_twice() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _a = join_agent(&op, dir.path(), "steady-a", true).await;
    let _b = join_agent(&op, dir.path(), "steady-b", true).await;
    wait_connected(&op, &["steady-a", "steady-b"]).await;
    let slow = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'sleep 1.5; echo task $KOMMUNE_TASK_INDEX']\ntasks: 4\n");
    let jr = job("restart-job");
    assert_eq!(op.dispatcher.sync(&jr, &slow, None).await.unwrap().placed, 4);
    for i in 0..4 {
        wait_running(&op, &format!("restart-job.{i}.1")).await;
    }

    // The operator dies while all four run, and comes back on the same store and address.
    let op = op.crash_and_restart().await;
    wait_connected(&op, &["steady-a", "steady-b"]).await;
    let done = op.run_to_end(&jr, &slow, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    let numbers: Vec<(u32, u32, AttemptPhase)> = done.attempts.iter().map(|a| (a.index, a.number, a.phase)).collect();
    assert_eq!(numbers, (0..4).map(|i| (i, 1, AttemptPhase::Succeeded)).collect::<Vec<_>>(), "every task ran once, on its first attempt");
    for a in &done.attempts {
        assert_eq!(a.result.as_ref().unwrap().stdout_tail, format!("task {}\n", a.index).as_bytes());
    }
    assert_eq!(op.metered_at_least("restart-job", 4).await.receipts, 4, "each attempt metered once across the restart");
}

/// The operator dies after placing two tasks and before either agent confirmed its task. One
/// Assign never reached its agent, which reconnects without it: that task is placed again
/// without using a retry (the job allows one attempt). The other agent got its Assign and
/// reconnects listing it: it keeps it and finishes it. Nothing is lost, nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restart_between_placing_and_the_agents_acknowledgement_neither_loses_nor_doubles_work() {
    use kommune_proto::v1::{AgentMessage, AttemptState, TaskResult, TaskUpdate, agent_message, operator_message};
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let missed = join_only(&op, dir.path(), "missed-it", true).await;
    let got = join_only(&op, dir.path(), "got-it", true).await;
    async fn assigned(inbound: &mut tonic::Streaming<kommune_proto::v1::OperatorMessage>) -> String {
        match next(inbound).await {
            Ok(Some(operator_message::Kind::Assign(a))) => a.attempt_id,
            other => panic!("expected an Assign, got {other:?}"),
        }
    }
    // The whole node for the first job, so the second lands on the other one.
    let whole = policy("workload:\n  exec:\n    command: [echo]\nresources: {cpu: '2', memory: 64Mi}\nretries: {maxAttempts: 1}\n");
    let small = policy("workload:\n  exec:\n    command: [echo]\nresources: {cpu: 500m, memory: 64Mi}\nretries: {maxAttempts: 1}\n");
    let (lost_job, kept_job) = (job("in-flight-lost"), job("in-flight-kept"));
    let (_missed_tx, mut missed_in) = raw_session(&op, &missed).await;
    assert_eq!(op.dispatcher.sync(&lost_job, &whole, None).await.unwrap().placed, 1);
    assert_eq!(assigned(&mut missed_in).await, "in-flight-lost.0.1");
    let (_got_tx, mut got_in) = raw_session(&op, &got).await;
    assert_eq!(op.dispatcher.sync(&kept_job, &small, None).await.unwrap().placed, 1);
    assert_eq!(assigned(&mut got_in).await, "in-flight-kept.0.1");

    // No Running from either agent yet: the operator crashes. "missed-it" comes back as if the
    // Assign had been lost on the way, "got-it" as one that has it.
    let op = op.crash_and_restart().await;
    let (missed_tx, mut missed_in) = raw_session(&op, &missed).await;
    let (got_tx, _got_in) = raw_session_running(&op, &got, vec!["in-flight-kept.0.1".into()]).await;
    let first = op.dispatcher.store().attempt("in-flight-lost.0.1").await.unwrap().unwrap();
    assert_eq!(first.phase, AttemptPhase::Cancelled, "an Assign that never arrived is not a failed attempt");
    assert!(first.result.unwrap().message.contains("never reached"));
    assert_eq!(op.dispatcher.store().attempt("in-flight-kept.0.1").await.unwrap().unwrap().phase, AttemptPhase::Assigned, "a task the agent has stays");

    let finish = |id: &str| {
        [AttemptState::Running, AttemptState::Succeeded].map(|state| AgentMessage {
            kind: Some(agent_message::Kind::TaskUpdate(TaskUpdate {
                attempt_id: id.into(),
                state: state as i32,
                result: (state == AttemptState::Succeeded).then(|| TaskResult { exit_code: 0, ..Default::default() }),
                receipt: None,
                trace: None,
            })),
        })
    };
    assert_eq!(op.dispatcher.sync(&lost_job, &whole, None).await.unwrap().placed, 1, "placed again although the job allows one attempt");
    let again = assigned(&mut missed_in).await;
    assert_eq!(again, "in-flight-lost.0.2");
    for m in finish(&again) {
        missed_tx.send(m).await.unwrap();
    }
    for m in finish("in-flight-kept.0.1") {
        got_tx.send(m).await.unwrap();
    }
    let lost_done = op.run_to_end(&lost_job, &whole, None).await;
    let kept_done = op.run_to_end(&kept_job, &small, None).await;
    let runs = |s: &Synced| s.attempts.iter().map(|a| (a.number, a.node.clone(), a.phase)).collect::<Vec<_>>();
    assert_eq!(lost_done.progress.phase, JobPhase::Succeeded);
    assert_eq!(runs(&lost_done), vec![(1, "missed-it".to_string(), AttemptPhase::Cancelled), (2, "missed-it".to_string(), AttemptPhase::Succeeded)]);
    assert_eq!(kept_done.progress.phase, JobPhase::Succeeded);
    assert_eq!(runs(&kept_done), vec![(1, "got-it".to_string(), AttemptPhase::Succeeded)], "the task the agent had ran once");
    // The room is released just after the result commits (the store shows the end first).
    for _ in 0..200 {
        if op.dispatcher.fleet().pool().reservations() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(op.dispatcher.fleet().pool().reservations(), 0, "no capacity left reserved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_job_stops_its_attempts_on_the_agent_and_frees_the_node() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let a = join_agent(&op, dir.path(), "worker", true).await;
    wait_connected(&op, &["worker"]).await;
    let long = policy("workload:\n  exec:\n    command: ['sleep', '30']\ntasks: 2\n");
    let jr = job("doomed");
    assert_eq!(op.dispatcher.sync(&jr, &long, None).await.unwrap().placed, 2);
    wait_running(&op, "doomed.0.1").await;
    wait_running(&op, "doomed.1.1").await;

    assert_eq!(op.dispatcher.cancel_job(&jr.uid).await.unwrap(), 2);
    let attempts = op.dispatcher.store().attempts_for_job(&jr.uid).await.unwrap();
    assert!(attempts.iter().all(|a| a.phase == AttemptPhase::Cancelled), "{attempts:?}");
    assert!(op.dispatcher.store().active_on_node("worker").await.unwrap().is_empty(), "the node's room is free at once");
    for _ in 0..200 {
        if a.tasks.running_ids().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the agent still runs {:?}", a.tasks.running_ids());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_disconnected_its_agent_stops_and_its_certificate_is_refused() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let state = join_only(&op, dir.path(), "evicted", true).await;
    let agent = run_detached(&state);
    wait_connected(&op, &["evicted"]).await;
    let long = policy("workload:\n  exec:\n    command: ['sleep', '30']\n");
    assert_eq!(op.dispatcher.sync(&job("evictee"), &long, None).await.unwrap().placed, 1);
    wait_running(&op, "evictee.0.1").await;

    op.dispatcher.revoke_node("evicted").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), agent).await.expect("the agent stops").unwrap();
    let err = ended.expect_err("a revoked agent does not keep retrying").to_string();
    assert!(err.contains("removed from the pool") && err.contains("join again"), "{err}");
    assert_eq!(op.dispatcher.store().attempt("evictee.0.1").await.unwrap().unwrap().phase, AttemptPhase::Lost);
    // Its certificate no longer opens a session.
    let mut client =
        kommune_agent::connect::client(&kommune_agent::connect::parse_server(&op.url).unwrap(), &state.ca_pem, Some((&state.cert_pem, &state.key_pem)))
            .await
            .unwrap();
    let (_tx, rx) = mpsc::channel(1);
    let status = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_leaves_its_tasks_move_without_losing_a_retry_and_its_identity_is_gone() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let state = join_only(&op, dir.path(), "leaver", true).await;
    let agent = run_detached(&state);
    wait_connected(&op, &["leaver"]).await;
    let long = policy("workload:\n  exec:\n    command: ['sleep', '30']\nretries: {maxAttempts: 1}\n");
    let jr = job("left-behind");
    assert_eq!(op.dispatcher.sync(&jr, &long, None).await.unwrap().placed, 1);
    wait_running(&op, "left-behind.0.1").await;

    // `kommune-agent status` sees the running agent and its task.
    let mut shown = String::new();
    for _ in 0..100 {
        let status = kommune_agent::status::AgentStatus::load(&state.dir);
        shown = kommune_agent::status::render("leaver", &op.url, status.as_ref(), true, kommune_proto::now_ms());
        if shown.contains("session:    connected") && shown.contains("left-behind.0.1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(shown.contains("session:    connected") && shown.contains("left-behind.0.1"), "{shown}");

    let left = kommune_agent::leave::leave(&state, false).await.unwrap();
    assert_eq!((left.node_name.as_str(), left.moved_attempts), ("leaver", 1));
    let ended = tokio::time::timeout(Duration::from_secs(10), agent).await.expect("the running agent stops").unwrap();
    assert!(ended.unwrap_err().to_string().contains("left the pool"));
    assert!(!state.dir.join("node.key").exists(), "the identity is deleted");
    // Cancelled, not failed: the job still has its one attempt to give, and waits for a node.
    assert_eq!(op.dispatcher.store().attempt("left-behind.0.1").await.unwrap().unwrap().phase, AttemptPhase::Cancelled);
    let after = op.dispatcher.sync(&jr, &long, None).await.unwrap();
    assert_eq!(after.progress.phase, JobPhase::Running);
    assert_eq!(after.progress.to_place, vec![(0, 2)]);
    assert!(after.unplaced.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_machine_takes_no_new_tasks_until_resumed() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let a = join_agent(&op, dir.path(), "owner-busy", true).await;
    wait_connected(&op, &["owner-busy"]).await;
    let quick = policy("workload:\n  exec:\n    command: [echo, hi]\n");
    let jr = job("waits-for-owner");

    a.state.set_paused(true).unwrap();
    // The agent tells the operator within about a second.
    for _ in 0..100 {
        if op.dispatcher.fleet().pool().nodes().any(|n| n.paused) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let synced = op.dispatcher.sync(&jr, &quick, None).await.unwrap();
    assert_eq!(synced.placed, 0, "nothing is placed on a paused machine");
    assert_eq!(synced.unplaced.unwrap().to_string(), "0/1 nodes can run it: 1 paused by their provider");

    a.state.set_paused(false).unwrap();
    let done = op.run_to_end(&jr, &quick, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_with_unacknowledged_results_needs_force() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let state = join_only(&op, dir.path(), "careful", true).await;
    let update = kommune_proto::v1::TaskUpdate { attempt_id: "some.0.1".into(), state: 2, result: None, receipt: None, trace: None };
    Spool::open(state.results_dir()).unwrap().put(&update).await.unwrap();
    let err = kommune_agent::leave::leave(&state, false).await.unwrap_err().to_string();
    assert!(err.contains("1 finished task result(s) are not acknowledged") && err.contains("--force"), "{err}");
    assert!(state.dir.join("node.key").exists(), "nothing was removed");
    kommune_agent::leave::leave(&state, true).await.unwrap();
    assert!(!state.dir.join("node.key").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_reordered_and_bogus_agent_messages_change_nothing() {
    use kommune_proto::v1::{AgentMessage, AttemptState, Hello, TaskResult, TaskUpdate, agent_message, operator_message};
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let state = join_only(&op, dir.path(), "raw", true).await;
    let (tx, mut inbound) = raw_session(&op, &state).await;
    let send = |kind: agent_message::Kind| {
        let tx = tx.clone();
        async move { tx.send(AgentMessage { kind: Some(kind) }).await.unwrap() }
    };

    let jr = job("raw-job");
    let exec = policy("workload:\n  exec:\n    command: [echo]\n");
    assert_eq!(op.dispatcher.sync(&jr, &exec, None).await.unwrap().placed, 1);
    let Ok(Some(operator_message::Kind::Assign(assign))) = next(&mut inbound).await else { panic!("no Assign") };
    let id = assign.attempt_id.clone();
    let update = |state: AttemptState, exit: i32, tail: Vec<u8>| {
        agent_message::Kind::TaskUpdate(TaskUpdate {
            attempt_id: id.clone(),
            state: state as i32,
            result: Some(TaskResult { exit_code: exit, stdout_tail: tail, output_sha256: "not-a-digest".into(), ..Default::default() }),
            receipt: None,
            trace: None,
        })
    };
    let ack = |m: Result<Option<operator_message::Kind>, tonic::Status>| match m {
        Ok(Some(operator_message::Kind::Ack(a))) => a.attempt_id,
        other => panic!("expected an Ack, got {other:?}"),
    };

    // The result, twice: both acknowledged, recorded once, bounded and sanitised.
    send(update(AttemptState::Succeeded, 0, vec![b'x'; 100_000])).await;
    assert_eq!(ack(next(&mut inbound).await), id);
    send(update(AttemptState::Succeeded, 0, b"second copy".to_vec())).await;
    assert_eq!(ack(next(&mut inbound).await), id);
    let stored = op.dispatcher.store().attempt(&id).await.unwrap().unwrap();
    assert_eq!(stored.phase, AttemptPhase::Succeeded);
    let result = stored.result.unwrap();
    assert_eq!(result.stdout_tail.len(), kommune_operator::dispatch::TAIL_LIMIT, "tails are bounded");
    assert_eq!(result.output_sha256, "", "a malformed digest is dropped");

    // Late and contradictory messages after the end change nothing.
    send(update(AttemptState::Running, -1, vec![])).await;
    send(update(AttemptState::Failed, 1, vec![])).await;
    assert_eq!(ack(next(&mut inbound).await), id, "the Running update gets no Ack; the Failed one does");
    assert_eq!(op.dispatcher.store().attempt(&id).await.unwrap().unwrap().phase, AttemptPhase::Succeeded);

    // Updates for attempts that are not this node's are acknowledged (so they stop) and ignored.
    send(agent_message::Kind::TaskUpdate(TaskUpdate {
        attempt_id: "no-such-attempt".into(),
        state: AttemptState::Failed as i32,
        result: None,
        receipt: None,
        trace: None,
    }))
    .await;
    assert_eq!(ack(next(&mut inbound).await), "no-such-attempt");
    assert_eq!(op.dispatcher.store().attempt("no-such-attempt").await.unwrap(), None);

    // A second Hello is a protocol error that ends the session with a clear status.
    send(agent_message::Kind::Hello(Hello::default())).await;
    let err = next(&mut inbound).await.expect_err("the session ends");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("Hello"), "{err}");
    let done = op.dispatcher.sync(&jr, &exec, None).await.unwrap();
    assert_eq!((done.progress.phase, done.attempts.len()), (JobPhase::Succeeded, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_node_is_gone_the_job_says_so() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = join_agent(&op, dir.path(), "lonely", false).await;
    wait_connected(&op, &["lonely"]).await;
    a.disconnect().await;
    wait_disconnected(&op, "lonely").await;
    let wasm = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: k}\n");
    let synced = op.dispatcher.sync(&job("orphan"), &wasm, Some(&ModuleRef { sha256: "0".repeat(64), url: None })).await.unwrap();
    assert_eq!(synced.placed, 0);
    assert_eq!(synced.unplaced.unwrap().to_string(), "0/1 nodes can run it: 1 not ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_without_its_attempt_gets_it_marked_lost_and_retried() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = join_agent(&op, dir.path(), "rebooted", true).await;
    wait_connected(&op, &["rebooted"]).await;
    let slow = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'sleep 0.5; echo ok']\nretries: {maxAttempts: 2, backoffSeconds: 0}\n");
    let jr = job("reboot-job");
    assert_eq!(op.dispatcher.sync(&jr, &slow, None).await.unwrap().placed, 1);
    wait_running(&op, "reboot-job.0.1").await;
    a.disconnect().await;
    wait_disconnected(&op, "rebooted").await;
    // A fresh process: same identity, empty task manager (the attempt died with the old one).
    let (tasks, updates) = tasks_for(&a.state, true, dir.path().join("other-results"));
    a.tasks = tasks;
    a.updates = Some(updates);
    a.connect();
    let done = op.run_to_end(&jr, &slow, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    let phases: Vec<_> = done.attempts.iter().map(|a| (a.number, a.phase)).collect();
    assert_eq!(phases, vec![(1, AttemptPhase::Lost), (2, AttemptPhase::Succeeded)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_wrong_servers_get_clear_errors() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let join_with = |token: String, server: String, name: &'static str| {
        let state_dir = dir.path().join(format!("{name}-{}", rand_suffix()));
        async move {
            join::join(JoinOptions {
                server: &server,
                token: &token,
                name: Some(name),
                region: "",
                zone: "",
                state_dir: &state_dir,
                force: false,
                facts: facts(false),
            })
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string()
        }
    };
    // Every bad token reads the same, with one code, so token ids cannot be probed; the
    // operator's log keeps the reason.
    let not_valid = "join token is not valid; ask the cluster admin for a new one (Unauthenticated)";
    let unknown = JoinToken::generate(&op.ca.pin()).to_string();
    let err = join_with(unknown.clone(), op.url.clone(), "n1").await;
    assert!(err.contains(not_valid), "{err}");

    let expired = op.token(1, -10);
    let err = join_with(expired, op.url.clone(), "n2").await;
    assert!(err.contains(not_valid), "{err}");

    let once = op.token(1, 600);
    join::join(JoinOptions {
        server: &op.url,
        token: &once,
        name: Some("n3"),
        region: "",
        zone: "",
        state_dir: &dir.path().join("n3"),
        force: false,
        facts: facts(false),
    })
    .await
    .unwrap();
    let err = join_with(once.clone(), op.url.clone(), "n4").await;
    assert!(err.contains(not_valid), "{err}");

    let mut wrong_secret: JoinToken = op.token(1, 600).parse().unwrap();
    wrong_secret.secret = "a".repeat(wrong_secret.secret.len());
    let err = join_with(wrong_secret.to_string(), op.url.clone(), "n8").await;
    assert!(err.contains(not_valid), "{err}");

    // Without a valid token a taken or malformed name is not even looked at.
    let err = join_with(unknown, op.url.clone(), "n3").await;
    assert!(err.contains(not_valid), "{err}");
    let err = join_with(once, op.url.clone(), "Bad_Name").await;
    assert!(err.contains(not_valid), "{err}");

    let other_ca = JoinToken::generate(&Ca::generate().unwrap().pin()).to_string();
    let err = join_with(other_ca, op.url.clone(), "n5").await;
    assert!(err.contains("did not present the CA named in the join token"), "{err}");

    let err = join_with(op.token(1, 600), "https://127.0.0.1:1".into(), "n6").await;
    assert!(err.contains("cannot reach the operator"), "{err}");

    let err = join_with("not-a-token".into(), op.url.clone(), "n7").await;
    assert!(err.contains("invalid --token"), "{err}");

    let err = join_with(op.token(1, 600), op.url.clone(), "Bad_Name").await;
    assert!(err.contains("is not valid"), "{err}");

    // With a valid token the name is checked: n3 is bound to another machine's key. The
    // refusal leaves the token unused.
    let valid = op.token(1, 600);
    let err = join_with(valid.clone(), op.url.clone(), "n3").await;
    assert!(err.contains("taken by another machine"), "{err}");
    let err = join_with(valid.clone(), op.url.clone(), "Bad_Name").await;
    assert!(err.contains("is not valid"), "{err}");
    let id = valid.parse::<JoinToken>().unwrap().id;
    assert!(op.tokens.contains(&id), "a refused name does not use up the token");
    join_only_with(&op, dir.path(), "n9", &valid).await;
    assert!(!op.tokens.contains(&id), "its last use deletes it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_are_counted_once_and_forged_or_implausible_ones_are_rejected_with_a_reason() {
    use kommune_proto::v1::{AgentMessage, AttemptState, ReceiptBody, TaskResult, TaskUpdate, Usage, UsageReceipt, agent_message, operator_message};
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let state = join_only(&op, dir.path(), "meter", true).await;
    let key = kommune_proto::receipt::signing_key_from_pem(&state.key_pem).unwrap();
    let (tx, mut inbound) = raw_session(&op, &state).await;
    let send = |kind: agent_message::Kind| {
        let tx = tx.clone();
        async move { tx.send(AgentMessage { kind: Some(kind) }).await.unwrap() }
    };

    let jr = job("metered-job");
    let exec = policy("workload:\n  exec:\n    command: [echo]\ntasks: 2\nresources: {cpu: '1'}\n");
    assert_eq!(op.dispatcher.sync(&jr, &exec, None).await.unwrap().placed, 2);
    let mut ids = vec![];
    for _ in 0..2 {
        let Ok(Some(operator_message::Kind::Assign(a))) = next(&mut inbound).await else { panic!("no Assign") };
        ids.push(a.attempt_id);
    }
    ids.sort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = |attempt: &str, sequence: u64, cpu_micros: u64| ReceiptBody {
        node: "meter".into(),
        epoch: 1,
        sequence,
        attempt_id: attempt.into(),
        job: jr.key.clone(),
        state: AttemptState::Succeeded as i32,
        usage: Some(Usage { wall_millis: 200, cpu_micros, source: "proc".into(), ..Default::default() }),
        started_unix_millis: 0,
        finished_unix_millis: 200,
    };
    let update = |attempt: &str, receipt: UsageReceipt| {
        agent_message::Kind::TaskUpdate(TaskUpdate {
            attempt_id: attempt.into(),
            state: AttemptState::Succeeded as i32,
            result: Some(TaskResult { exit_code: 0, ..Default::default() }),
            receipt: Some(receipt),
            trace: None,
        })
    };
    let ack = |m: Result<Option<operator_message::Kind>, tonic::Status>| match m {
        Ok(Some(operator_message::Kind::Ack(a))) => a,
        other => panic!("expected an Ack, got {other:?}"),
    };

    // Forged: signed by another key. Rejected with the reason, and it does not take the
    // (node, epoch, sequence) the genuine receipt then uses.
    let forger = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    send(update(&ids[0], kommune_proto::receipt::sign(&body(&ids[0], 1, 150_000), &forger))).await;
    let a = ack(next(&mut inbound).await);
    assert!(a.receipt_rejected.contains("signature"), "{a:?}");
    assert_eq!((a.cost_micros, a.ledger_seq, a.entry_hash.len()), (0, 0, 0), "a rejected receipt has no ledger position");
    let genuine = kommune_proto::receipt::sign(&body(&ids[0], 1, 150_000), &key);
    send(update(&ids[0], genuine.clone())).await;
    let a = ack(next(&mut inbound).await);
    assert_eq!((a.receipt_rejected.as_str(), a.cost_micros), ("", 150_000 * 1_000_000 / 3_600_000_000), "{a:?}");
    // The Ack names the receipt's ledger entry: what the provider checks its statement against.
    assert!(a.ledger_seq > 0 && a.entry_hash.len() == 32, "{a:?}");
    let placed = (a.ledger_seq, a.entry_hash.clone());
    // Replayed (same bytes) and duplicated: acknowledged as before, with the same entry, counted once.
    send(update(&ids[0], genuine.clone())).await;
    let again = ack(next(&mut inbound).await);
    assert_eq!((again.receipt_rejected.as_str(), again.ledger_seq, &again.entry_hash), ("", placed.0, &placed.1), "{again:?}");
    // Another receipt for an attempt already metered, under a new sequence: rejected.
    send(update(&ids[0], kommune_proto::receipt::sign(&body(&ids[0], 2, 150_000), &key))).await;
    assert!(!ack(next(&mut inbound).await).receipt_rejected.is_empty());
    // Implausible: 10 s of CPU in a 200 ms attempt with one core.
    send(update(&ids[1], kommune_proto::receipt::sign(&body(&ids[1], 3, 10_000_000), &key))).await;
    let a = ack(next(&mut inbound).await);
    assert!(a.receipt_rejected.contains("cpu"), "{a:?}");

    let m = op.metered_at_least(&jr.uid, 1).await;
    assert_eq!(m.receipts, 1, "only the genuine, plausible receipt counts: {m:?}");
    assert_eq!(m.usage.cpu_micros, 150_000);
    let rejected = op.dispatcher.ledger().unwrap().rejected("meter", 100).await.unwrap();
    assert!(rejected.len() >= 3, "forged, second and implausible receipts are kept with their reasons: {rejected:?}");
    assert_eq!(op.dispatcher.ledger().unwrap().rejected_count("meter").await.unwrap().distinct, rejected.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receipt_appended_before_the_operator_crashed_unacknowledged_is_counted_once() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = join_agent(&op, dir.path(), "crashy", true).await;
    wait_connected(&op, &["crashy"]).await;
    let slow = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'sleep 0.5; echo done']\n");
    let jr = job("append-then-crash");
    assert_eq!(op.dispatcher.sync(&jr, &slow, None).await.unwrap().placed, 1);
    wait_running(&op, "append-then-crash.0.1").await;
    // The task finishes while the agent is disconnected: its update and receipt are spooled.
    a.disconnect().await;
    wait_disconnected(&op, "crashy").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let spooled = a.tasks.unacknowledged();
    assert_eq!(spooled.len(), 1);
    // The operator appends the receipt to its ledger, then dies before the Ack goes out.
    let attempt = op.dispatcher.store().attempt("append-then-crash.0.1").await.unwrap().unwrap();
    let key = kommune_operator::pki::public_key_of(&pem_der(&a.state.cert_pem)).unwrap();
    let verdict = op
        .dispatcher
        .ledger()
        .unwrap()
        .submit(kommune_operator::ledger::check::ReceiptInput {
            receipt: spooled[0].receipt.clone().unwrap(),
            session_node: "crashy".into(),
            node_public_key: key,
            attempt: kommune_operator::ledger::check::AttemptFacts {
                attempt_id: attempt.id.clone(),
                job_uid: attempt.job_uid.clone(),
                job_key: attempt.job_key.clone(),
                node: attempt.node.clone(),
                bounds: kommune_operator::bounds::for_attempt(&kommune_operator::bounds::Assigned {
                    cpu_millis: attempt.cpu_millis,
                    memory_bytes: attempt.memory_bytes,
                    ..Default::default()
                }),
                observed_start_ms: attempt.created_ms,
                observed_end_ms: kommune_proto::now_ms(),
            },
            rates: RATES,
            received_ms: kommune_proto::now_ms(),
        })
        .await
        .unwrap();
    assert!(matches!(verdict, kommune_operator::ledger::Verdict::Accepted { .. }), "{verdict:?}");
    let op = op.crash_and_restart().await;
    // The agent comes back and resends: the result is recorded, the receipt is a duplicate.
    a.connect();
    let done = op.run_to_end(&jr, &slow, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    for _ in 0..100 {
        if a.tasks.unacknowledged().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.tasks.unacknowledged().is_empty(), "acknowledged after the restart");
    assert_eq!(op.metered_at_least(&jr.uid, 1).await.receipts, 1, "in the ledger exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_stops_placement_when_the_next_task_could_exceed_it() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _a = join_agent(&op, dir.path(), "thrifty", true).await;
    wait_connected(&op, &["thrifty"]).await;
    // At 1 credit per core-hour, an exec task with a one-hour limit may cost up to 2 credits on
    // this 2-core node (exec tasks are not throttled to their request: they may keep every core
    // the node offers busy): a budget of 5 admits two such tasks at a time, never the third.
    let capped = policy(
        "workload:\n  exec:\n    command: ['/bin/sh', '-c', 'sleep 0.3']\ntasks: 3\nresources: {cpu: 500m, memory: 1Mi}\ntimeouts: {taskSeconds: 3600}\npricing: {budget: '5'}\n",
    );
    let capped = JobPolicy { cpu_millis: 1000, ..capped };
    let jr = job("budgeted");
    let first = op.dispatcher.sync(&jr, &capped, None).await.unwrap();
    assert_eq!(first.placed, 2);
    let why = first.budget_exhausted.expect("the third task waits for the budget");
    assert_eq!(why, "budget 5 credits: 0 spent and up to 4 committed to running tasks; the next task could cost up to 2");
    assert_eq!(first.usage.as_ref().map(|u| u.budget.as_deref()), Some(Some("5")));
    // Once the two finish, what they really cost (a few micro-credits) frees the room.
    let done = op.run_to_end(&jr, &capped, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    assert_eq!(done.attempts.len(), 3);
    let usage = op.metered_at_least(&jr.uid, 3).await;
    assert!(usage.cost.0 < 1_000_000, "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_around_sending_its_receipt_resends_it_and_it_counts_once() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = join_agent(&op, dir.path(), "killed", true).await;
    wait_connected(&op, &["killed"]).await;
    let quick = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'sleep 0.3; echo ok']\n");
    let jr = job("kill-around-ack");
    assert_eq!(op.dispatcher.sync(&jr, &quick, None).await.unwrap().placed, 1);
    // Kill the agent (its session task aborted, its task manager gone: no graceful anything) the
    // moment the operator has recorded the result, so the Ack is most likely still in flight.
    for _ in 0..400 {
        if op.dispatcher.store().attempt("kill-around-ack.0.1").await.unwrap().is_some_and(|a| a.phase == AttemptPhase::Succeeded) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, handle) = a.session.take().unwrap();
    handle.abort();
    let spooled_at_kill = Spool::open(a.state.results_dir()).unwrap().all().len();
    // A new process on the same state directory: it resends whatever its spool still holds.
    let (tasks, updates) = tasks_for(&a.state, true, a.state.results_dir());
    a.tasks = tasks;
    a.updates = Some(updates);
    a.connect();
    for _ in 0..200 {
        if a.tasks.unacknowledged().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.tasks.unacknowledged().is_empty(), "the restarted agent's spool was acknowledged");
    let done = op.run_to_end(&jr, &quick, None).await;
    assert_eq!((done.progress.phase, done.attempts.len()), (JobPhase::Succeeded, 1));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(op.metered_at_least(&jr.uid, 1).await.receipts, 1, "exactly once (the spool held {spooled_at_kill} unacknowledged update(s) at the kill)");
}

/// A machine that goes silent without closing its connection (Wi-Fi gone, lid closed): the
/// operator notices when the session timeout passes after its last message, keeps its attempt
/// through the grace, and only then places it elsewhere. Prints the measured times (this
/// harness: heartbeats every 200 ms, session timeout 2 s, grace 3 s; the operator's defaults
/// are 5 s, 15 s and 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_noticed_after_the_session_timeout_and_its_work_moves_only_after_the_grace() {
    use kommune_proto::v1::{AgentMessage, AttemptState, TaskUpdate, agent_message, operator_message};
    const SESSION_TIMEOUT: Duration = Duration::from_secs(2);
    const GRACE: Duration = Duration::from_secs(3);
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let silent = join_only(&op, dir.path(), "silent", true).await;
    let (tx, mut inbound) = raw_session(&op, &silent).await;
    wait_connected(&op, &["silent"]).await;
    let work = policy("workload:\n  exec:\n    command: ['/bin/sh', '-c', 'echo done']\nretries: {maxAttempts: 2, backoffSeconds: 0}\n");
    let jr = job("silence-job");
    assert_eq!(op.dispatcher.sync(&jr, &work, None).await.unwrap().placed, 1);
    let assigned = loop {
        match next(&mut inbound).await {
            Ok(Some(operator_message::Kind::Assign(a))) => break a.attempt_id,
            Ok(Some(_)) => continue,
            other => panic!("expected an Assign, got {other:?}"),
        }
    };
    assert_eq!(assigned, "silence-job.0.1");
    // The agent says it runs the attempt, then nothing more; the stream stays open.
    let running = TaskUpdate { attempt_id: assigned.clone(), state: AttemptState::Running as i32, result: None, receipt: None, trace: None };
    tx.send(AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(running)) }).await.unwrap();
    let last_message = std::time::Instant::now();
    wait_running(&op, &assigned).await;

    let mut rescuer = join_agent(&op, dir.path(), "rescuer", true).await;
    wait_connected(&op, &["rescuer"]).await;
    let mut detected = None;
    let moved = loop {
        if detected.is_none() && !op.dispatcher.fleet().is_connected("silent") {
            detected = Some(last_message.elapsed());
        }
        // What the operator's expiry loop does (every second there, every 50 ms here).
        if op.dispatcher.expire_absent(GRACE).await.unwrap() > 0 {
            break last_message.elapsed();
        }
        assert!(last_message.elapsed() < Duration::from_secs(30), "the silent node's attempt was never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let detected = detected.expect("the node is not connected once its attempt is expired");
    println!(
        "measured: silent agent noticed {:.2} s after its last message (session timeout {} s); its attempt was placed elsewhere {:.2} s after it (grace {} s)",
        detected.as_secs_f64(),
        SESSION_TIMEOUT.as_secs(),
        moved.as_secs_f64(),
        GRACE.as_secs()
    );
    assert!(detected >= SESSION_TIMEOUT, "a session is not dropped before its timeout ({detected:?})");
    assert!(moved >= GRACE, "work is not moved within the grace ({moved:?})");
    let done = op.run_to_end(&jr, &work, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    let runs: Vec<_> = done.attempts.iter().map(|a| (a.number, a.node.as_str(), a.phase)).collect();
    assert_eq!(runs, vec![(1, "silent", AttemptPhase::Lost), (2, "rescuer", AttemptPhase::Succeeded)]);
    // In `/metrics`: one session timed out, its attempt was lost and placed again, once.
    assert_eq!(op.metric("kommune_agent_sessions_closed_total", &[("reason", "timeout")]), 1.0);
    assert_eq!(op.metric("kommune_agent_sessions_closed_total", &[]), 1.0);
    assert_eq!(op.metric("kommune_attempts_ended_total", &[("phase", "lost"), ("runtime", "exec")]), 1.0);
    assert_eq!(op.metric("kommune_attempts_ended_total", &[("phase", "succeeded"), ("runtime", "exec")]), 1.0);
    assert_eq!(op.metric("kommune_attempts_retried_total", &[("runtime", "exec")]), 1.0);
    assert_eq!(op.metric("kommune_attempts_started_total", &[("runtime", "exec")]), 2.0);
    drop(tx);
    rescuer.disconnect().await;
}

/// `spec.drain` on a ProviderNode: the node is cordoned (what the ProviderNode sweep does
/// first), its running attempt is stopped on the agent and placed elsewhere without using a
/// retry, and what both attempts ran is metered once each. The drained agent stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_its_running_task_to_another_without_using_a_retry() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut drained = join_agent(&op, dir.path(), "drained", true).await;
    wait_connected(&op, &["drained"]).await;
    // The first attempt would run for 30 s; the one placed after the drain finishes at once.
    let once = policy(
        "workload:\n  exec:\n    command: ['/bin/sh', '-c', 'case $KOMMUNE_ATTEMPT_ID in *.1) sleep 30;; esac; echo done']\nretries: {maxAttempts: 1}\n",
    );
    let jr = job("drain-job");
    assert_eq!(op.dispatcher.sync(&jr, &once, None).await.unwrap().placed, 1);
    wait_running(&op, "drain-job.0.1").await;
    let mut spare = join_agent(&op, dir.path(), "spare", true).await;
    wait_connected(&op, &["spare"]).await;

    op.dispatcher.fleet().set_admin("drained", NodeAdmin { cordoned: true, ..Default::default() });
    assert_eq!(op.dispatcher.drain_node("drained").await.unwrap(), 1);
    assert_eq!(op.dispatcher.drain_node("drained").await.unwrap(), 0, "draining again moves nothing");
    let done = op.run_to_end(&jr, &once, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    let runs: Vec<_> = done.attempts.iter().map(|a| (a.number, a.node.as_str(), a.phase)).collect();
    assert_eq!(runs, vec![(1, "drained", AttemptPhase::Cancelled), (2, "spare", AttemptPhase::Succeeded)]);
    let why = &done.attempts[0].result.as_ref().unwrap().message;
    assert!(why.contains("drained"), "{why}");
    assert_eq!(op.metered_at_least("drain-job", 2).await.receipts, 2, "the stopped attempt is metered too");
    assert!(op.dispatcher.fleet().is_connected("drained"), "draining does not disconnect the agent");
    assert_eq!(op.metric("kommune_attempts_ended_total", &[("phase", "cancelled"), ("runtime", "exec")]), 1.0);
    assert_eq!(op.metric("kommune_attempts_ended_total", &[("phase", "succeeded"), ("runtime", "exec")]), 1.0);
    assert_eq!(op.metric("kommune_attempts_ended_total", &[("phase", "lost")]), 0.0, "a drained attempt is not lost");
    drained.disconnect().await;
    spare.disconnect().await;
}

/// After a run, `/metrics` says what happened: N tasks placed, run and metered, two sessions,
/// the messages that carried them, and the module on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_after_a_run_count_its_tasks_receipts_sessions_and_messages() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let a = join_agent(&op, dir.path(), "metrics-a", false).await;
    let b = join_agent(&op, dir.path(), "metrics-b", false).await;
    wait_connected(&op, &["metrics-a", "metrics-b"]).await;
    let sha = op.store_module("metrics-job", &hello_module());
    let wasm = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\ntasks: 5\nresources: {cpu: 250m, memory: 64Mi}\n");
    let done = op.run_to_end(&job("metrics-job"), &wasm, Some(&ModuleRef { sha256: sha, url: None })).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    assert_eq!(op.metered_at_least("metrics-job", 5).await.receipts, 5);

    assert_eq!(op.metric("kommune_agents_connected", &[]), 2.0);
    assert_eq!(op.metric("kommune_agent_sessions_opened_total", &[]), 2.0);
    assert_eq!(op.metric("kommune_placement_decisions_total", &[("outcome", "placed")]), 5.0);
    assert_eq!(op.metric("kommune_placement_decisions_total", &[("outcome", "unschedulable")]), 0.0);
    assert_eq!(op.metric("kommune_attempts_started_total", &[("runtime", "wasm")]), 5.0);
    assert_eq!(op.metric("kommune_attempts_retried_total", &[]), 0.0);
    assert_eq!(op.metric("kommune_attempts_ended_total", &[("phase", "succeeded"), ("runtime", "wasm")]), 5.0);
    assert_eq!(op.metric("kommune_attempts_ended_total", &[("phase", "failed")]), 0.0);
    assert_eq!(op.metric("kommune_receipts_total", &[("verdict", "accepted")]), 5.0);
    assert_eq!(op.metric("kommune_receipts_total", &[("verdict", "rejected")]), 0.0);
    assert_eq!(op.metric("kommune_ledger_append_duration_seconds_count", &[]), 5.0);
    // Two node keys, then five receipts: the head is past both.
    assert!(op.metric("kommune_ledger_head_sequence", &[]) >= 5.0);
    assert_eq!(op.metric("kommune_gateway_messages_total", &[("direction", "sent"), ("kind", "assign")]), 5.0);
    assert_eq!(op.metric("kommune_gateway_messages_total", &[("direction", "sent"), ("kind", "ack")]), 5.0);
    assert_eq!(op.metric("kommune_gateway_messages_total", &[("direction", "received"), ("kind", "hello")]), 2.0);
    // Each task reports Running, then its result.
    assert_eq!(op.metric("kommune_gateway_messages_total", &[("direction", "received"), ("kind", "task_update")]), 10.0);
    assert!(op.metric("kommune_gateway_message_bytes_total", &[("direction", "sent")]) > 0.0);
    assert_eq!(op.metric("kommune_blobs", &[]), 1.0);
    assert_eq!(op.metric("kommune_blobs_size_bytes", &[]), hello_module().len() as f64);
    assert!(op.metric("kommune_store_size_bytes", &[]) > 0.0);

    // Heartbeats every 200 ms on loopback: they arrive about on time.
    for _ in 0..50 {
        if op.metric("kommune_agent_heartbeat_lag_seconds_count", &[]) >= 4.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let beats = op.metric("kommune_agent_heartbeat_lag_seconds_count", &[]);
    assert!(beats >= 4.0, "two agents connected for a while heartbeat: {beats}");
    let lag = op.metric("kommune_agent_heartbeat_lag_seconds_sum", &[]) / beats;
    assert!(lag < 1.0, "mean heartbeat lag {lag} s");

    // A job no machine can hold: each of its tasks is an unschedulable decision, and the
    // reason is counted once for the placement that left them waiting.
    let placements = op.metric("kommune_placement_duration_seconds_count", &[]);
    let huge = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\ntasks: 3\nresources: {cpu: '64', memory: 64Mi}\n");
    let sha = op.store_module("metrics-huge", &hello_module());
    assert_eq!(op.dispatcher.sync(&job("metrics-huge"), &huge, Some(&ModuleRef { sha256: sha, url: None })).await.unwrap().placed, 0);
    assert_eq!(op.metric("kommune_placement_decisions_total", &[("outcome", "unschedulable")]), 3.0);
    assert_eq!(op.metric("kommune_unschedulable_reasons_total", &[("reason", "insufficient_cpu")]), 1.0);
    assert_eq!(op.metric("kommune_unschedulable_reasons_total", &[]), 1.0);
    assert_eq!(op.metric("kommune_placement_duration_seconds_count", &[]), placements + 1.0);

    // Both agents hang up: two sessions closed by the agent, none connected.
    for mut agent in [a, b] {
        agent.disconnect().await;
    }
    for _ in 0..50 {
        if op.metric("kommune_agent_sessions_closed_total", &[]) >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(op.metric("kommune_agent_sessions_closed_total", &[("reason", "agent_closed")]), 2.0);
    assert_eq!(op.metric("kommune_agent_sessions_closed_total", &[]), 2.0);
    assert_eq!(op.metric("kommune_agents_connected", &[]), 0.0);
}

/// One sync places more tasks on one node than its session queue holds (256): the Assigns past
/// the queue's end wait for the agent to read them instead of being Lost. Before, the 344 past
/// it were each Lost ("could not reach node: Full"): a failure charged to the user's retries
/// for the operator's own burst. The module is new to the agent: its 600 attempts fetch and
/// compile it once (each did both before, which took minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_larger_than_the_session_queue_waits_for_the_agent_and_loses_nothing() {
    let op = operator().await;
    let dir = tempfile::tempdir().unwrap();
    let _a = join_agent(&op, dir.path(), "agent-a", false).await;
    wait_connected(&op, &["agent-a"]).await;
    // A module the agent has not seen: its 600 attempts also fetch and compile it once.
    let sha = op.store_module("burst", &hello_module());
    let burst = policy(
        "workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\n    args: ['10']\ntasks: 600\nparallelism: 600\nresources: {cpu: 1m, memory: 3Mi}\nretries: {maxAttempts: 1}\n",
    );
    let done = op.run_to_end(&job("burst"), &burst, Some(&ModuleRef { sha256: sha, url: None })).await;
    let lost: Vec<_> =
        done.attempts.iter().filter(|a| a.phase != AttemptPhase::Succeeded).map(|a| (&a.id, a.result.as_ref().map(|r| &r.message))).take(3).collect();
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "e.g. {lost:?}");
    let ran = op.dispatcher.store().attempts_for_job("burst").await.unwrap();
    assert_eq!(ran.len(), 600, "each task ran once, none Lost and retried: e.g. {lost:?}");
}
