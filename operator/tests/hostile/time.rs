//! Time an agent can hold: a task kept past its timeout while heartbeating, and a task
//! preempted again and again.

use std::time::{Duration, Instant};

use kommune_operator::attempt::AttemptPhase;
use kommune_operator::bounds;
use kommune_operator::crd::JobPhase;
use kommune_operator::fleet::NodeAdmin;
use kommune_operator::job::conduct;
use kommune_operator::pricing::Micros;
use kommune_proto::v1::AttemptState;

use crate::agent::{HostileAgent, claims};
use crate::harness::{job, join_agent, operator_with, policy, wait_connected};
use crate::{PRICED, plausible};

/// A node heartbeats and says it runs its task with `taskSeconds: 2`, and never reports. Today
/// only the agent enforces the timeout, so the attempt runs forever on the operator's books.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heartbeating_agent_that_never_reports_loses_its_task_past_the_timeout_and_its_late_receipt_is_capped() {
    let op = operator_with(PRICED).await;
    op.expire_every_tick(Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let mut holder = HostileAgent::join(&op, dir.path(), "holder", claims(2000, 2 << 30, "")).await.unwrap();
    holder.connect(&op).await;
    let timed = policy(
        "workload:\n  exec:\n    command: [echo, done]\nresources: {cpu: 250m, memory: 64Mi}\ntimeouts: {taskSeconds: 2}\nretries: {maxAttempts: 2, backoffSeconds: 0}\n",
    );
    let jr = job("held-past-timeout");
    assert_eq!(op.dispatcher.sync(&jr, &timed, None).await.unwrap().placed, 1);
    let assign = holder.assigned().await;
    let assigned_at = Instant::now();
    assert_eq!(assign.timeout_millis, 2000);
    holder.say_running(&assign.attempt_id).await;
    let _honest = join_agent(&op, dir.path(), "punctual", true).await;
    wait_connected(&op, &["punctual"]).await;

    // Reconciles go on as the controller's would; the holder keeps heartbeating meanwhile.
    let failed_after = loop {
        op.dispatcher.sync(&jr, &timed, None).await.unwrap();
        let first = op.dispatcher.store().attempt(&assign.attempt_id).await.unwrap().unwrap();
        if first.phase.is_terminal() {
            assert!(matches!(first.phase, AttemptPhase::Failed | AttemptPhase::Lost), "{first:?}");
            break assigned_at.elapsed();
        }
        assert!(assigned_at.elapsed() < Duration::from_secs(20), "the operator never failed the attempt held past its 2 s timeout: {first:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("attempt held past its 2 s timeout was failed by the operator after {:.2} s", failed_after.as_secs_f64());
    assert!(failed_after >= Duration::from_secs(2), "not before the timeout ({failed_after:?})");
    assert!(op.dispatcher.fleet().is_connected(&holder.name), "the holder kept its session throughout");
    let done = op.run_to_end(&jr, &timed, None).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    let runs: Vec<_> = done.attempts.iter().map(|a| (a.number, a.node.as_str())).collect();
    assert_eq!(runs, vec![(1, "holder"), (2, "punctual")]);
    let honest_cost = op.metered_at_least(&jr.uid, 1).await.cost;

    // The holder then bills far more time than the task may run, at full use of its
    // reservation: refused, nothing paid.
    let claimed = 10 * assigned_at.elapsed().as_millis() as u64;
    let absurd = kommune_proto::v1::Usage { memory_mib_millis: 64 * claimed, ..plausible(claimed, 500) };
    let ack = holder.report(&assign, AttemptState::Succeeded, absurd).await;
    println!("late receipt claiming {claimed} ms: rejected {:?}, cost {}", ack.receipt_rejected, ack.cost_micros);
    assert!(!ack.receipt_rejected.is_empty() && ack.cost_micros == 0, "{ack:?}");
    // What it may bill is bounded by the timeout (plus the clock slack): a 2-core exec node for
    // 2 s + 2 s + 1%.
    let wall = 2000 + kommune_operator::ledger::check::WALL_SLACK_MILLIS + 20;
    let bound = bounds::for_attempt(&bounds::Assigned {
        runtime: Some(kommune_proto::runtime::EXEC),
        cpu_millis: 250,
        memory_bytes: 64 << 20,
        node_capacity: Some(kommune_operator::scheduler::Resources { cpu_millis: 2000, memory_bytes: 2 << 30, ephemeral_bytes: 0 }),
        timeout: Some(Duration::from_millis(wall)),
        ..Default::default()
    });
    let worst = bounds::worst_case(&bound, Duration::from_millis(wall), &PRICED);
    let total = op.metered_at_least(&jr.uid, 1).await.cost;
    assert!(total.0 <= honest_cost.0 + worst.0, "job cost {total:?} beyond the honest {honest_cost:?} + the held task's bound {worst:?}");
}

/// A node preferred by the job's data locality reports PREEMPTED for every attempt it gets,
/// with a plausible receipt. A preempted attempt does not use a retry, so today the task goes
/// back to the same node without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_preempts_every_task_is_skipped_after_a_few_and_an_honest_node_finishes_it() {
    /// The most preempted copies a node may be given before it is skipped for the job.
    const LIMIT_AT_MOST: usize = 5;
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut quitter = HostileAgent::join(&op, dir.path(), "quitter", claims(2000, 2 << 30, "")).await.unwrap();
    quitter.connect(&op).await;
    let near = NodeAdmin { labels: [(kommune_operator::scheduler::REGION_LABEL.to_string(), "near".to_string())].into(), ..Default::default() };
    op.dispatcher.fleet().set_admin(&quitter.name, near);
    let _honest = join_agent(&op, dir.path(), "stayer", true).await;
    wait_connected(&op, &["quitter", "stayer"]).await;
    let spec = "workload:\n  exec:\n    command: [echo, done]\nresources: {cpu: 250m, memory: 64Mi}\ntimeouts: {taskSeconds: 60}\n\
                placement: {dataLocality: {region: near}}\nretries: {backoffSeconds: 0}\n";
    let work = policy(spec);
    let jr = job("preempted-forever");

    let mut preempted = 0;
    let mut paid = Micros(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let synced = op.dispatcher.sync(&jr, &work, None).await.unwrap();
        if synced.progress.phase == JobPhase::Succeeded {
            break synced;
        }
        assert!(Instant::now() < deadline, "the task never finished: preempted {preempted} times on {}", quitter.name);
        if let Some(assign) = quitter.assigned_within(Duration::from_millis(200)).await {
            preempted += 1;
            assert!(preempted <= LIMIT_AT_MOST + 1, "the task went back to the node that preempted it {preempted} times (paid {paid} so far)");
            quitter.say_running(&assign.attempt_id).await;
            let ack = quitter.report(&assign, AttemptState::Preempted, plausible(1500, 250)).await;
            paid = paid.saturating_add(Micros(ack.cost_micros));
        }
    };
    println!("preempted {preempted} times before the node was skipped; paid {paid} for the preempted copies");
    assert!(preempted >= 1, "the attack ran: the preferred node got the task first");
    let last = done.attempts.last().unwrap();
    assert_eq!((last.node.as_str(), last.phase), ("stayer", AttemptPhase::Succeeded));
    assert!(preempted <= conduct::MAX_INTERRUPTIONS_PER_NODE as usize, "skipped once it had preempted the limit: {preempted}");
    // Each preempted copy is paid at most the worst case of its bounds: an exec task may use
    // every core and all the memory the node offers, for the whole timeout.
    let bound = bounds::for_attempt(&bounds::Assigned {
        runtime: Some(kommune_proto::runtime::EXEC),
        cpu_millis: 250,
        memory_bytes: 64 << 20,
        node_capacity: Some(kommune_operator::scheduler::Resources { cpu_millis: 2000, memory_bytes: 2 << 30, ephemeral_bytes: 0 }),
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    });
    let worst = bounds::worst_case(&bound, Duration::from_secs(60), &PRICED);
    assert!(paid.0 <= preempted as u64 * worst.0, "preempted copies are paid within their bounds: {paid}");
}
