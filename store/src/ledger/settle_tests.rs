//! Settlement through the stored ledger on both backends: reversals (what issue 16's verification
//! calls), closing periods into statements, marking them paid, and the commands around them.

use super::tests::{Env, key_of, rt};
use super::*;
use kommune_ledger::check::tests::input;
use kommune_ledger::payout::PayoutError;

backend_suite!(
    a_reversed_receipt_is_left_out_of_the_statement_and_reversing_again_returns_the_same_reversal,
    a_reversal_of_an_unknown_receipt_is_refused_naming_it,
    a_receipt_after_the_close_lands_in_the_next_period_and_mark_paid_is_recorded_once,
    settlement_survives_a_reopen_and_verifies_strictly,
);

fn cost() -> kommune_core::pricing::Micros {
    check::check(&input(1, 1, 1)).unwrap().cost
}

/// alice owns pn-1 and pn-2, pn-3 is its own owner; each sends `n` receipts.
fn ledger_with_receipts(env: &Env, n: u64) -> Ledger {
    let l = env.open();
    rt().block_on(async {
        l.register_owned_node_key("pn-1", key_of(1), "alice").await.unwrap();
        l.register_owned_node_key("pn-2", key_of(2), "alice").await.unwrap();
        l.register_node_key("pn-3", key_of(3)).await.unwrap();
        for s in 1..=n {
            for node in 1..=3 {
                assert!(matches!(l.submit(input(node, 1, s)).await.unwrap(), Verdict::Accepted { .. }));
            }
        }
    });
    l
}

fn a_reversed_receipt_is_left_out_of_the_statement_and_reversing_again_returns_the_same_reversal(env: &Env) {
    let l = ledger_with_receipts(env, 2);
    let rt = rt();
    let r = rt.block_on(l.reverse(ReceiptKey::Attempt("a-1-1-2".into()), "outvoted by 2 of 3 replicas")).unwrap();
    assert!(r.created);
    assert_eq!((r.node.as_str(), r.credits), ("pn-1", cost()));
    let again = rt.block_on(l.reverse(ReceiptKey::Seq(r.receipt_seq), "disproved by spot check of task 17")).unwrap();
    assert_eq!(again, Reversal { created: false, ..r.clone() }, "a receipt is reversed once; the second call returns the first reversal");
    let closed = rt.block_on(l.close_period()).unwrap();
    let owners: Vec<&str> = closed.iter().map(|c| c.statement.owner.as_str()).collect();
    assert_eq!(owners, ["alice", "pn-3"]);
    let alice = &closed[0].statement;
    assert_eq!((alice.receipts, alice.credits_micros, alice.reversed_micros), (4, 4 * cost().0, cost().0));
    assert_eq!(alice.payable_micros, 3 * cost().0, "the reversed receipt is not paid");
    assert_eq!(alice.reversals[0].receipt_seq, r.receipt_seq);
    assert_eq!(closed[1].statement.payable_micros, 2 * cost().0);
    drop(l);
    let report = verify_stored(env.backend().as_mut(), verify::VerifyOptions::default()).unwrap().expect("reversals and statements verify strictly");
    assert_eq!((report.reversals, report.statements, report.reversed), (1, 2, cost()));
}

fn a_reversal_of_an_unknown_receipt_is_refused_naming_it(env: &Env) {
    let l = ledger_with_receipts(env, 1);
    let rt = rt();
    let err = rt.block_on(l.reverse(ReceiptKey::Attempt("a-9-9-9".into()), "x")).unwrap_err();
    assert!(matches!(&err, LedgerError::Payout(PayoutError::NoReceiptForAttempt(a)) if a == "a-9-9-9"), "{err}");
    assert_eq!(err.to_string(), "ledger: no receipt in this ledger meters attempt \"a-9-9-9\"");
    let err = rt.block_on(l.reverse(ReceiptKey::Seq(1), "x")).unwrap_err();
    assert_eq!(err.to_string(), "ledger: entry 1 is not a receipt in this ledger");
    let err = rt.block_on(l.reverse(ReceiptKey::Seq(4), "")).unwrap_err();
    assert!(err.to_string().contains("reversal reason is empty"), "{err}");
    // The ledger still works after refusals.
    assert!(rt.block_on(l.reverse(ReceiptKey::Seq(4), "outvoted")).unwrap().created);
}

fn a_receipt_after_the_close_lands_in_the_next_period_and_mark_paid_is_recorded_once(env: &Env) {
    let l = ledger_with_receipts(env, 1);
    let rt = rt();
    let first = rt.block_on(l.close_period()).unwrap();
    assert!(rt.block_on(l.close_period()).unwrap().is_empty(), "nothing new to settle");
    rt.block_on(l.submit(input(1, 1, 2))).unwrap();
    let next = rt.block_on(l.close_period()).unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].statement.owner.as_str(), next[0].statement.receipts), ("alice", 1));
    assert_eq!(next[0].statement.from_seq, first[0].statement.upto_seq + 1);
    let paid = rt.block_on(l.mark_paid(first[0].seq, "SEPA-42")).unwrap();
    let err = rt.block_on(l.mark_paid(first[0].seq, "SEPA-43")).unwrap_err();
    assert_eq!(err.to_string(), format!("ledger: statement {} was already marked paid by entry {paid}", first[0].seq));
    assert!(matches!(rt.block_on(l.mark_paid(2, "x")), Err(LedgerError::Payout(PayoutError::NotAStatement(2)))));
    drop(l);
    let all = payout_cli::statements(env.backend().as_mut()).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].paid, Some(payout_cli::PaidMark { seq: paid, reference: "SEPA-42".into() }));
    assert_eq!(all[2].paid, None);
    for s in &all {
        s.file.check(None).unwrap();
    }
}

fn settlement_survives_a_reopen_and_verifies_strictly(env: &Env) {
    let l = ledger_with_receipts(env, 1);
    let rt = rt();
    let r = rt.block_on(l.reverse(ReceiptKey::Attempt("a-2-1-1".into()), "outvoted")).unwrap();
    drop(l);
    let l = env.open();
    let again = rt.block_on(l.reverse(ReceiptKey::Attempt("a-2-1-1".into()), "other")).unwrap();
    assert_eq!((again.seq, again.created, again.reason.as_str()), (r.seq, false, "outvoted"), "read back from the chain");
    let closed = rt.block_on(l.close_period()).unwrap();
    assert_eq!(closed[0].statement.reversed_micros, cost().0);
    drop(l);
    assert!(verify_stored(env.backend().as_mut(), verify::VerifyOptions::default()).unwrap().is_ok());
}

/// The commands an operator runs: close, mark paid, export, and verify of the export file.
#[test]
fn the_payout_commands_close_mark_paid_export_and_the_export_verifies_offline() {
    let env = Env::sqlite();
    drop(ledger_with_receipts(&env, 2));
    let location = || cli::Location { data_dir: env.dir.path().to_path_buf(), database_url: None };
    let write = || payout_cli::WriteArgs { location: location(), ledger_key_file: None };
    let run = |cmd| {
        let mut out = Vec::new();
        payout_cli::run(cmd, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    };
    let out = run(payout_cli::PayoutCommand::Reverse { attempt: Some("a-3-1-1".into()), seq: None, reason: "disproved".into(), write: write() });
    assert!(out.starts_with("receipt 6 (pn-3, ") && out.contains("reversed by entry"), "{out}");
    let out = run(payout_cli::PayoutCommand::Close(write()));
    assert!(out.contains("owner alice entries 1..=11: 4 receipts") && out.contains("owner pn-3"), "{out}");
    let alice_seq: u64 = out.split_whitespace().nth(1).unwrap().trim_end_matches(':').parse().unwrap();
    let out = run(payout_cli::PayoutCommand::MarkPaid { statement: alice_seq, reference: "tx-1".into(), write: write() });
    assert!(out.contains("marked paid (reference tx-1)"), "{out}");
    let export = |format| payout_cli::ExportArgs { location: location(), format, owner: Some("alice".into()), statement: None, output: None };
    let csv = run(payout_cli::PayoutCommand::Export(export(payout_cli::StatementFormat::Csv)));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[1].starts_with(&format!("{alice_seq},alice,")) && lines[1].ends_with(",tx-1"), "{csv}");
    let json = run(payout_cli::PayoutCommand::Export(export(payout_cli::StatementFormat::Json)));
    let files: Vec<kommune_ledger::statement_file::StatementFile> = serde_json::from_str(&json).unwrap();
    assert_eq!(files[0].receipts.len(), 4);
    files[0].check(None).unwrap();

    // The whole ledger exported, then verified from the file alone.
    let file = env.dir.path().join("export.jsonl");
    let args = cli::ExportArgs { location: location(), format: cli::Format::Jsonl, since: None, until: None, provider: None, output: Some(file.clone()) };
    cli::run(cli::LedgerCommand::Export(args), &mut Vec::new()).unwrap();
    let elsewhere = || cli::Location { data_dir: env.dir.path().join("no-database-here"), database_url: None };
    let verify_file = |file: &std::path::Path| {
        let mut out = Vec::new();
        let args = cli::VerifyArgs { location: elsewhere(), file: Some(file.to_path_buf()), ..Default::default() };
        cli::run(cli::LedgerCommand::Verify(args), &mut out).map(|_| String::from_utf8(out).unwrap())
    };
    let out = verify_file(&file).unwrap();
    assert!(out.contains("settlement: 1 reversals, 2 statements, 1 paid, 0 key rotations"), "{out}");
    // The paid line is after the close's checkpoint: a strict verify of a ledger whose head is
    // not covered is refused, so an export for an auditor is taken after a close.
    let text = std::fs::read_to_string(&file).unwrap();
    let cut = env.dir.path().join("cut.jsonl");
    std::fs::write(&cut, text.lines().take(9).collect::<Vec<_>>().join("\n")).unwrap();
    let err = verify_file(&cut).unwrap_err().to_string();
    assert!(err.starts_with("ledger verification FAILED: entry 1: entries 1..=9 come after the last checkpoint (there is none)"), "{err}");
}

/// Writes the small ledger docs/LEDGER.md's auditor walk-through runs its commands against:
/// `KOMMUNE_DEMO_DIR=/tmp/demo cargo test -p kommune-store demo_ledger -- --ignored`.
#[test]
#[ignore = "writes a demo ledger for the docs"]
fn demo_ledger_for_the_docs() {
    let dir = std::path::PathBuf::from(std::env::var("KOMMUNE_DEMO_DIR").expect("set KOMMUNE_DEMO_DIR"));
    let config =
        LedgerConfig { data_dir: dir.join("data"), database_url: None, fence: kommune_core::fence::Fence::open(), key_file: Some(dir.join("ledger.key")) };
    let l = Ledger::open(config).unwrap();
    rt().block_on(async {
        l.register_owned_node_key("pn-1", key_of(1), "alice").await.unwrap();
        l.register_owned_node_key("pn-2", key_of(2), "alice").await.unwrap();
        l.register_owned_node_key("pn-3", key_of(3), "bob").await.unwrap();
        for s in 1..=3 {
            for node in 1..=3 {
                l.submit(input(node, 1, s)).await.unwrap();
            }
        }
    });
}
