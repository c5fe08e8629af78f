//! Receipts that claim the impossible (usage near u64::MAX, a flood of oversized rejected ones),
//! and the honest CPU-bound wasm task that must be paid.

use std::time::Duration;

use kommune_operator::crd::JobPhase;
use kommune_operator::dispatch::ModuleRef;
use kommune_proto::v1::{AttemptState, Usage};

use crate::agent::{HostileAgent, claims};
use crate::harness::{hello_module, job, join_agent, operator_with, policy, wait_connected};
use crate::measure::Footprint;
use crate::{PRICED, cordon, plausible};

/// A GPU-less node signs receipts for its two wasm tasks claiming 2^63 GPU-ms, and memory and
/// output near u64::MAX. Today they are priced (at u64::MAX, saturated) and two of them
/// overflow the ledger's job sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receipt_claiming_2_pow_63_gpu_ms_on_a_gpu_less_task_is_rejected_and_the_ledger_still_opens() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut liar = HostileAgent::join(&op, dir.path(), "gpu-liar", claims(2000, 2 << 30, "")).await.unwrap();
    liar.connect(&op).await;
    let sha = op.store_module("gpu-claims", &hello_module());
    let module = ModuleRef { sha256: sha, url: None };
    let wasm = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\ntasks: 4\nresources: {cpu: 250m, memory: 64Mi}\n");
    let attacked = job("gpu-claims");
    assert_eq!(op.dispatcher.sync(&attacked, &wasm, Some(&module)).await.unwrap().placed, 4);
    let mut assigns = vec![];
    for _ in 0..4 {
        let assign = liar.assigned().await;
        assert_eq!(assign.gpus, 0, "no GPU was assigned");
        liar.say_running(&assign.attempt_id).await;
        assigns.push(assign);
    }

    // Two claim 2^63 GPU-ms, two memory and output near u64::MAX as well: a few such receipts
    // are more than a u64 sum of the job's cost can hold.
    let gpu = Usage { gpu_millis: 1 << 63, ..plausible(50, 250) };
    let everything = Usage { memory_mib_millis: u64::MAX - 1, output_bytes: u64::MAX - 1, ..gpu.clone() };
    let mut acks = vec![];
    for (i, assign) in assigns.iter().enumerate() {
        let usage = if i % 2 == 0 { gpu.clone() } else { everything.clone() };
        let ack = liar.report(assign, AttemptState::Succeeded, usage).await;
        println!("attack receipt for {}: rejected {:?}, cost {}", assign.attempt_id, ack.receipt_rejected, ack.cost_micros);
        acks.push(ack);
    }
    let usage = op.dispatcher.ledger().unwrap().job_usage(&attacked.uid).await;
    println!("the attacked job's usage: {usage:?}");

    // Honest work alongside still runs and is metered.
    cordon(&op, &liar.name);
    let _honest = join_agent(&op, dir.path(), "honest-gpu-less", false).await;
    wait_connected(&op, &["honest-gpu-less"]).await;
    let honest = job("honest-after-claims");
    op.store_module(&honest.uid, &hello_module());
    let done = op.run_to_end(&honest, &wasm, Some(&module)).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded);
    assert_eq!(op.metered_at_least(&honest.uid, 4).await.receipts, 4);

    // A restarted operator opens the same ledger (reading the sums from storage) and reads
    // both jobs; the verdicts are checked last, so a failure today shows all of the above.
    let op = op.crash_and_restart().await;
    let ledger = op.dispatcher.ledger().unwrap();
    let after = ledger.job_usage(&attacked.uid).await;
    println!("after a restart, the attacked job's usage: {after:?}");
    for ack in acks {
        assert!(!ack.receipt_rejected.is_empty(), "a claim beyond what was assigned is rejected with a reason: {ack:?}");
        assert_eq!(ack.cost_micros, 0, "{ack:?}");
    }
    let usage = after.expect("the job's usage reads after a restart");
    assert_eq!((usage.receipts, usage.cost.0), (0, 0), "nothing is paid for the claims: {usage:?}");
    assert_eq!(ledger.node_earnings("gpu-liar").await.unwrap().pending.0, 0);
    assert_eq!(ledger.job_usage(&honest.uid).await.expect("read after restart").receipts, 4);
    assert!(ledger.head().await.unwrap().is_some());
}

/// 2,000 distinct receipts of about 4 KiB, each validly signed by the node over a body for
/// another attempt than the one it reports, all for one attempt the node holds. Today every
/// copy is stored whole and the node sweep loads them all to count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_two_thousand_oversized_rejected_receipts_leaves_disk_and_memory_bounded() {
    const FLOOD: usize = 2000;
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut flooder = HostileAgent::join(&op, dir.path(), "flooder", claims(2000, 2 << 30, "")).await.unwrap();
    flooder.connect(&op).await;
    let exec = policy("workload:\n  exec:\n    command: [echo]\nresources: {cpu: 250m, memory: 64Mi}\n");
    let held = job("flooded");
    assert_eq!(op.dispatcher.sync(&held, &exec, None).await.unwrap().placed, 1);
    let assign = flooder.assigned().await;
    flooder.say_running(&assign.attempt_id).await;
    let before = Footprint::of(op.data_dir());

    // Padded with distinct bytes so no two rows share a digest; each body just under 4 KiB.
    let mut flood_bytes = 0;
    let mut messages = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let padding: String = format!("{i:06}-").chars().cycle().take(3800).collect();
        let usage = Usage { source: padding, ..plausible(50, 250) };
        let receipt = flooder.receipt(&format!("someone-else.{i}.1"), &assign.job, AttemptState::Failed, usage);
        assert!(receipt.body.len() <= kommune_proto::receipt::MAX_BODY_BYTES, "{}", receipt.body.len());
        flood_bytes += receipt.body.len() + receipt.signature.len();
        messages.push(HostileAgent::update(&assign.attempt_id, AttemptState::Failed, receipt));
    }
    // Sent while the Acks are read: the operator's replies are a bounded queue.
    let tx = flooder.sender();
    let sending = tokio::spawn(async move {
        for m in messages {
            tx.send(m).await.unwrap();
        }
    });
    let mut rejected = 0;
    for _ in 0..FLOOD {
        let ack = flooder.any_ack(Duration::from_secs(20)).await.expect("every receipt of the flood is acknowledged");
        assert_eq!(ack.cost_micros, 0, "{ack:?}");
        rejected += usize::from(!ack.receipt_rejected.is_empty());
    }
    sending.await.unwrap();
    assert_eq!(rejected, FLOOD, "every receipt of the flood is rejected with a reason");

    // What the node sweep reads every 10 s: counters, not rows; and what is kept is capped.
    let ledger = op.dispatcher.ledger().unwrap();
    let count = ledger.rejected_count(&flooder.name).await.unwrap();
    assert_eq!((count.received, count.distinct), (FLOOD as u64, FLOOD as u64), "every refused receipt is counted: {count:?}");
    let kept = ledger.rejected(&flooder.name, u64::MAX).await.unwrap();
    assert!(kept.len() as u64 <= kommune_operator::ledger::records::REJECTED_KEPT_PER_NODE, "{} rows kept", kept.len());
    let after = Footprint::of(op.data_dir());
    println!(
        "flood of {FLOOD} receipts, {:.2} MiB sent: before {before}; after {after}; rows the sweep loads: {}",
        flood_bytes as f64 / (1 << 20) as f64,
        kept.len()
    );
    assert!(kept.len() < FLOOD, "the sweep does not load every rejected copy ({} rows)", kept.len());
    assert_eq!(ledger.job_usage(&held.uid).await.unwrap().cost.0, 0);

    // Honest work still runs; then a restart opens the ledger, and the data is still small.
    cordon(&op, &flooder.name);
    drop(flooder);
    let _honest = join_agent(&op, dir.path(), "honest-by-flood", true).await;
    wait_connected(&op, &["honest-by-flood"]).await;
    assert_eq!(op.run_to_end(&job("after-flood"), &exec, None).await.progress.phase, JobPhase::Succeeded);
    let op = op.crash_and_restart().await;
    let restarted = Footprint::of(op.data_dir());
    let grown = restarted.disk_bytes.saturating_sub(before.disk_bytes);
    println!(
        "after a restart: {restarted} (grew {:.2} MiB); RSS grew {:.1} MiB over the flood",
        grown as f64 / (1 << 20) as f64,
        after.rss_kib.saturating_sub(before.rss_kib) as f64 / 1024.0
    );
    assert!(grown < flood_bytes as u64 / 4, "the data dir grew {grown} bytes for a {flood_bytes}-byte flood");
    assert!(after.rss_kib.saturating_sub(before.rss_kib) < 64 * 1024, "memory grew {} KiB", after.rss_kib - before.rss_kib);
    assert!(op.dispatcher.ledger().unwrap().job_usage(&held.uid).await.is_ok());
}

/// The honest case: a CPU-bound wasm task at `cpu: 250m` that runs 5 s on a real agent. Wasm
/// tasks are not throttled to their request, so it uses a whole core; today its receipt is
/// rejected (`cpu time 5s exceeds 0.25 cores x 5s wall`) and the provider is not paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_honest_cpu_bound_wasm_task_at_250m_running_5_s_is_metered_and_paid() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = join_agent(&op, dir.path(), "honest-cruncher", false).await;
    wait_connected(&op, &["honest-cruncher"]).await;
    let sha = op.store_module("cpu-bound", &crate::wasm::cpu_burner(5));
    let burn = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\nresources: {cpu: 250m, memory: 64Mi}\n");
    let jr = job("cpu-bound");
    let done = op.run_to_end(&jr, &burn, Some(&ModuleRef { sha256: sha, url: None })).await;
    assert_eq!(done.progress.phase, JobPhase::Succeeded, "{:?}", done.attempts);
    let m = op.metered_at_least(&jr.uid, 1).await;
    println!("metered: {m:?}");
    let rejected = op.dispatcher.ledger().unwrap().rejected("honest-cruncher", 10).await.unwrap();
    println!("rejected: {:?}", rejected.iter().map(|r| &r.reason).collect::<Vec<_>>());
    let history = kommune_agent::receipts::history(&agent.state.receipts_dir(), &[]);
    assert_eq!(m.receipts, 1, "the honest receipt is accepted: {history:?}");
    assert!(m.usage.wall_millis >= 5000 && m.usage.cpu_micros > 0, "{m:?}");
    assert!(m.cost.0 > 0, "the provider is paid: {m:?}");
}
