//! A hostile agent's rejected receipt shows in `/metrics` under the rule it broke, next to its
//! honest receipt, so an admin sees an attack in the numbers without reading logs.

use kommune_operator::dispatch::ModuleRef;
use kommune_proto::v1::{AttemptState, Usage};

use crate::agent::{HostileAgent, claims};
use crate::harness::{hello_module, job, operator_with, policy};
use crate::{PRICED, plausible};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receipt_claiming_gpu_time_on_a_gpu_less_task_is_counted_as_rejected_gpu_too_high() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut liar = HostileAgent::join(&op, dir.path(), "metrics-liar", claims(2000, 2 << 30, "")).await.unwrap();
    liar.connect(&op).await;
    let sha = op.store_module("metrics-claims", &hello_module());
    let wasm = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\ntasks: 2\nresources: {cpu: 250m, memory: 64Mi}\n");
    assert_eq!(op.dispatcher.sync(&job("metrics-claims"), &wasm, Some(&ModuleRef { sha256: sha, url: None })).await.unwrap().placed, 2);
    let (honest, forged) = (liar.assigned().await, liar.assigned().await);
    for a in [&honest, &forged] {
        liar.say_running(&a.attempt_id).await;
    }
    let ack = liar.report(&honest, AttemptState::Succeeded, plausible(50, 10)).await;
    assert!(ack.receipt_rejected.is_empty(), "{ack:?}");
    let ack = liar.report(&forged, AttemptState::Succeeded, Usage { gpu_millis: 1 << 40, ..plausible(50, 10) }).await;
    assert!(!ack.receipt_rejected.is_empty(), "{ack:?}");

    assert_eq!(op.metric("kommune_receipts_total", &[("verdict", "accepted")]), 1.0);
    assert_eq!(op.metric("kommune_receipts_total", &[("verdict", "rejected")]), 1.0);
    assert_eq!(op.metric("kommune_receipts_rejected_total", &[("reason", "gpu_too_high")]), 1.0);
    // Every other rule stays at zero: one label per rule, not per receipt.
    assert_eq!(op.metric("kommune_receipts_rejected_total", &[]), 1.0);
    // Both results are recorded, whatever their receipts said.
    assert_eq!(op.metric("kommune_attempts_ended_total", &[("phase", "succeeded"), ("runtime", "wasm")]), 2.0);
}
