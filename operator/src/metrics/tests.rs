use std::time::Duration;

use super::exposition::{parse, value};
use super::*;
use crate::attempt::AttemptPhase;
use crate::ledger::Verdict;
use crate::pricing::Micros;

fn scrape(m: &Metrics) -> Vec<exposition::Sample> {
    parse(&m.render(&Fleet::default())).expect("the exposition parses")
}

#[test]
fn counts_reconciles_by_result_with_their_duration() {
    let m = Metrics::default();
    m.reconciled(Duration::from_millis(3), true);
    m.reconciled(Duration::from_millis(5), true);
    m.reconciled(Duration::from_millis(7), false);
    m.reconcile_error("kube");
    let s = scrape(&m);
    assert_eq!(value(&s, "kommune_reconciles_total", &[("result", "success")]), Some(2.0));
    assert_eq!(value(&s, "kommune_reconciles_total", &[("result", "error")]), Some(1.0));
    assert_eq!(value(&s, "kommune_reconcile_errors_total", &[("error", "kube")]), Some(1.0));
    assert_eq!(value(&s, "kommune_reconcile_duration_seconds_count", &[]), Some(3.0));
    let sum = value(&s, "kommune_reconcile_duration_seconds_sum", &[]).unwrap();
    assert!((sum - 0.015).abs() < 1e-9, "{sum}");
    assert_eq!(value(&s, "kommune_agents_connected", &[]), Some(0.0));
}

#[test]
fn bounded_series_start_at_zero() {
    let s = scrape(&Metrics::default());
    assert_eq!(value(&s, "kommune_receipts_rejected_total", &[("reason", "bad_signature")]), Some(0.0));
    assert_eq!(value(&s, "kommune_attempts_ended_total", &[("phase", "lost"), ("runtime", "wasm")]), Some(0.0));
    // No series per node, job or attempt: every label is one of a fixed set of names.
    for sample in &s {
        for k in sample.labels.keys() {
            assert!(["result", "error", "outcome", "reason", "runtime", "phase", "verdict", "direction", "kind", "le"].contains(&k.as_str()), "{sample:?}");
        }
    }
}

#[test]
fn receipts_count_by_verdict_and_rejection_rule() {
    let m = Metrics::default();
    m.receipt(&Verdict::Accepted { seq: 7, hash: [0; 32], cost: Micros(1) }, Duration::from_millis(2));
    m.receipt(&Verdict::Accepted { seq: 5, hash: [0; 32], cost: Micros(1) }, Duration::from_millis(2));
    m.receipt(&Verdict::Duplicate { seq: 7, hash: [0; 32], cost: Micros(1) }, Duration::from_millis(2));
    m.receipt(&Verdict::Rejected { reason: "no".into(), kind: "cpu_too_high" }, Duration::from_millis(2));
    let s = scrape(&m);
    assert_eq!(value(&s, "kommune_receipts_total", &[("verdict", "accepted")]), Some(2.0));
    assert_eq!(value(&s, "kommune_receipts_total", &[("verdict", "duplicate")]), Some(1.0));
    assert_eq!(value(&s, "kommune_receipts_rejected_total", &[("reason", "cpu_too_high")]), Some(1.0));
    // The head is the highest sequence appended, whatever order the appends finished in.
    assert_eq!(value(&s, "kommune_ledger_head_sequence", &[]), Some(7.0));
    assert_eq!(value(&s, "kommune_ledger_append_duration_seconds_count", &[]), Some(4.0));
}

#[test]
fn attempts_count_by_phase_runtime_and_retry() {
    let m = Metrics::default();
    m.attempt_started("wasm", 1);
    m.attempt_started("wasm", 2);
    m.attempt_ended(AttemptPhase::Preempted, Some("exec"));
    m.attempt_ended(AttemptPhase::Lost, None);
    let s = scrape(&m);
    assert_eq!(value(&s, "kommune_attempts_started_total", &[("runtime", "wasm")]), Some(2.0));
    assert_eq!(value(&s, "kommune_attempts_retried_total", &[("runtime", "wasm")]), Some(1.0));
    assert_eq!(value(&s, "kommune_attempts_ended_total", &[("phase", "preempted"), ("runtime", "exec")]), Some(1.0));
    assert_eq!(value(&s, "kommune_attempts_ended_total", &[("phase", "lost"), ("runtime", "unknown")]), Some(1.0));
}

#[test]
fn unschedulable_reasons_are_the_schedulers_exclusion_kinds() {
    use crate::scheduler::Request;
    use crate::scheduler::filter::Exclusion;
    let m = Metrics::default();
    let mut why = crate::scheduler::Explanation::new(3, &Request::default());
    why.excluded.insert(Exclusion::InsufficientCpu, 2);
    why.excluded.insert(Exclusion::Cordoned, 1);
    m.placement(4, 1, Duration::from_micros(300), Some(&why));
    let s = scrape(&m);
    assert_eq!(value(&s, "kommune_placement_decisions_total", &[("outcome", "placed")]), Some(1.0));
    assert_eq!(value(&s, "kommune_placement_decisions_total", &[("outcome", "unschedulable")]), Some(3.0));
    assert_eq!(value(&s, "kommune_unschedulable_reasons_total", &[("reason", "insufficient_cpu")]), Some(1.0));
    assert_eq!(value(&s, "kommune_unschedulable_reasons_total", &[("reason", "cordoned")]), Some(1.0));
    assert_eq!(value(&s, "kommune_placement_duration_seconds_count", &[]), Some(1.0));
}

#[test]
fn measures_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kommune.db"), [0u8; 100]).unwrap();
    std::fs::write(dir.path().join("ledger.db-wal"), [0u8; 20]).unwrap();
    std::fs::write(dir.path().join("unrelated"), [0u8; 1000]).unwrap();
    std::fs::create_dir(dir.path().join("blobs")).unwrap();
    std::fs::write(dir.path().join("blobs").join("a".repeat(64)), [0u8; 7]).unwrap();
    std::fs::write(dir.path().join("blobs").join("journal"), [0u8; 500]).unwrap();
    let m = Metrics::default();
    m.watch_data_dir(dir.path().to_path_buf());
    let s = scrape(&m);
    assert_eq!(value(&s, "kommune_store_size_bytes", &[]), Some(120.0));
    assert_eq!(value(&s, "kommune_blobs_size_bytes", &[]), Some(7.0));
    assert_eq!(value(&s, "kommune_blobs", &[]), Some(1.0));
}

#[test]
fn snake_cases_variant_names() {
    assert_eq!(snake_case("InsufficientEphemeralStorage"), "insufficient_ephemeral_storage");
    assert_eq!(snake_case("NotReady"), "not_ready");
}

#[test]
fn parse_reports_a_bad_line() {
    let e = exposition::parse("kommune_x{a=\"b\" 1\n").unwrap_err();
    assert_eq!(e.line, 1);
}
