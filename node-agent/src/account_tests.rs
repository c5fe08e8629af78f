//! The account's assembly from pages (an honest operator's and a hostile one's), its file, each
//! receipt's payout state and the `earnings` output.

use super::*;
use kommune_proto::v1::{EarningsReversal, EarningsStatement, EarningsTotals};

fn totals() -> Option<EarningsTotals> {
    Some(EarningsTotals { pending_micros: 50_000, settled_micros: 100_000, paid_micros: 200_000, reversed_micros: 50_000 })
}

fn page(page: u32, count: u32) -> EarningsPage {
    EarningsPage { as_of_seq: 40, page, page_count: count, totals: totals(), head_seq: 45, ..Default::default() }
}

fn statement(seq: u64, from: u64, upto: u64, paid: &str) -> EarningsStatement {
    EarningsStatement {
        seq,
        from_seq: from,
        upto_seq: upto,
        period_end_ms: 1_700_000_000_000,
        receipts: 2,
        credits_micros: 100_000,
        reversed_receipts: 1,
        reversed_micros: 50_000,
        paid_seq: if paid.is_empty() { 0 } else { seq + 1 },
        paid_reference: paid.into(),
    }
}

/// Statement 20 (entries 1-19) paid, statement 30 (21-29) not; receipt 12 reversed.
fn account() -> EarningsAccount {
    let mut a = Assembly::default();
    let mut p0 = page(0, 2);
    p0.statements = vec![statement(20, 1, 19, "bank-42"), statement(30, 21, 29, "")];
    let mut p1 = page(1, 2);
    p1.reversals = vec![EarningsReversal { seq: 25, receipt_seq: 12, credits_micros: 50_000, reason: "outvoted by 2 of 3 replicas".into() }];
    assert_eq!(a.push(p0, 7).unwrap(), None, "one page of two");
    a.push(p1, 7).unwrap().expect("the last page completes it")
}

fn record(attempt: &str, seq: u64) -> ReceiptRecord {
    ReceiptRecord {
        epoch: 1,
        sequence: seq,
        attempt_id: attempt.into(),
        job: "ns/j".into(),
        state: "succeeded".into(),
        wall_millis: 1000,
        cpu_micros: 1000,
        memory_peak_bytes: 0,
        wasm_fuel: 0,
        finished_unix_millis: 0,
        status: "accepted".into(),
        reason: String::new(),
        cost_micros: 50_000,
        ledger_seq: seq,
        entry_hash: "ab".into(),
    }
}

#[test]
fn pages_assemble_into_an_account_that_says_what_became_of_each_receipt() {
    let a = account();
    assert_eq!((a.as_of_seq, a.head_seq, a.received_unix_millis, a.statements.len(), a.reversals.len()), (40, 45, 7, 2, 1));
    assert_eq!(a.totals, AccountTotals { pending_micros: 50_000, settled_micros: 100_000, paid_micros: 200_000, reversed_micros: 50_000 });
    assert!(matches!(a.payout_of(12), Payout::Reversed(r) if r.reason.starts_with("outvoted")));
    assert!(matches!(a.payout_of(5), Payout::Paid(s) if s.seq == 20 && s.paid_reference == "bank-42"));
    assert!(matches!(a.payout_of(22), Payout::Settled(s) if s.seq == 30));
    assert_eq!(a.payout_of(41), Payout::Pending);
    assert_eq!(a.payout_of(46), Payout::Newer);
    let older = EarningsAccount { statements: vec![a.statements[1].clone()], statements_omitted: 3, ..a.clone() };
    assert_eq!(older.payout_of(5), Payout::Unknown, "older than the statements kept");
    assert!(matches!(older.payout_of(22), Payout::Settled(_)));
}

#[test]
fn a_hostile_or_broken_page_drops_the_account_being_assembled_and_never_panics() {
    let cases: Vec<(EarningsPage, &str)> = vec![
        (page(0, 0), "1 to 64 pages"),
        (page(0, MAX_PAGES + 1), "1 to 64 pages"),
        (page(3, 2), "1 to 64 pages"),
        (page(1, 2), "page 0"),
        (EarningsPage { totals: None, ..page(0, 1) }, "no totals"),
        (EarningsPage { statements: vec![statement(5, 1, 9, "")], ..page(0, 1) }, "not before it"),
        (EarningsPage { statements: vec![statement(50, 10, 9, "")], ..page(0, 1) }, "not before it"),
        (EarningsPage { statements: vec![statement(50, 1, 9, &"r".repeat(REFERENCE_MAX + 1))], ..page(0, 1) }, "payment reference"),
        (EarningsPage { reversals: vec![EarningsReversal { reason: "x".repeat(REASON_MAX + 1), ..Default::default() }], ..page(0, 1) }, "reversal reason"),
        (EarningsPage { reversals: vec![EarningsReversal::default(); MAX_PAGE_ITEMS + 1], ..page(0, 1) }, "at most 1000 a page"),
    ];
    for (p, says) in cases {
        let e = Assembly::default().push(p.clone(), 0).unwrap_err();
        assert!(e.to_string().contains(says), "{p:?}: {e}");
    }

    // A page from another account, or out of order, mid-way: what was assembled is dropped…
    let mut a = Assembly::default();
    assert_eq!(a.push(page(0, 3), 0).unwrap(), None);
    assert!(a.push(EarningsPage { as_of_seq: 41, ..page(1, 3) }, 0).is_err());
    assert!(a.push(page(2, 3), 0).is_err(), "page 1 was never taken");
    // …and a whole account afterwards is taken.
    assert_eq!(a.push(page(0, 1), 0).unwrap().map(|x| x.as_of_seq), Some(40));

    // More reversals than an account may hold, across pages of allowed size.
    let mut a = Assembly::default();
    let full = |i: u32| EarningsPage { reversals: vec![EarningsReversal::default(); MAX_PAGE_ITEMS], ..page(i, MAX_PAGES) };
    let mut outcome = Ok(None);
    for i in 0..MAX_PAGES {
        outcome = a.push(full(i), 0);
        if outcome.is_err() {
            break;
        }
    }
    assert_eq!(outcome.unwrap_err(), PageError::TooMany);

    // Random pages: errors or accounts, no panic.
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut a = Assembly::default();
    for _ in 0..2000 {
        let mut p = page(rng.gen_range(0..4), rng.gen_range(0..4));
        p.as_of_seq = rng.gen_range(39..42);
        if rng.gen_bool(0.3) {
            p.statements.push(statement(rng.r#gen(), rng.r#gen(), rng.r#gen(), ""));
        }
        let _ = a.push(p, 0);
    }
}

#[test]
fn the_account_is_written_atomically_and_a_corrupt_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(EarningsAccount::load(dir.path()).unwrap(), None);
    let a = account();
    a.save(dir.path()).unwrap();
    assert_eq!(EarningsAccount::load(dir.path()).unwrap(), Some(a));
    assert!(!dir.path().join(".earnings.json.tmp").exists());
    std::fs::write(dir.path().join("earnings.json"), b"{\"asOfSeq\": [").unwrap();
    assert!(EarningsAccount::load(dir.path()).unwrap_err().contains("does not read"));
}

#[test]
fn earnings_prints_totals_by_state_each_statement_and_every_reversal_with_its_reason() {
    let records = vec![record("a-paid", 5), record("a-reversed", 12), record("a-settled", 22), record("a-pending", 41)];
    let a = account();
    let out = crate::receipts::render("pn-1", &records, Some(&a));
    println!("{out}");
    let row = |attempt: &str| out.lines().find(|l| l.ends_with(attempt)).unwrap_or_else(|| panic!("{attempt}: {out}")).to_string();
    assert!(row("a-paid").contains("paid@20"));
    assert!(row("a-reversed").contains("REVERSED"));
    assert!(row("a-settled").contains("settled@30"));
    assert!(row("a-pending").contains("pending"));
    assert!(
        out.contains(
            "The operator's account (as of ledger entry 45, received 1970-01-01 00:00:00Z): pending 0.05, settled 0.1, paid 0.2, reversed 0.05 credits\n"
        ),
        "{out}"
    );
    assert!(out.contains("  statement 20 (ledger entries 1-19, closed 2023-11-14 22:13:20Z): 2 receipt(s), 0.1 credits, 1 reversed (0.05 credits); paid (entry 21, reference bank-42); 2 of them in this machine's log\n"), "{out}");
    assert!(out.contains("  statement 30 (ledger entries 21-29, closed 2023-11-14 22:13:20Z): 2 receipt(s), 0.1 credits, 1 reversed (0.05 credits); settled, not paid yet; 1 of them in this machine's log\n"), "{out}");
    assert!(
        out.contains(
            "Reversed receipts (recorded, not paid):\n  ledger entry 12 (attempt a-reversed, 0.05 credits), reversed by entry 25: outvoted by 2 of 3 replicas\n"
        ),
        "{out}"
    );
    assert!(out.contains("--verify"), "the claim is named as such: {out}");

    // Without an account, the table says so; negative totals and escapes from the operator print safely.
    assert!(crate::receipts::render("pn-1", &records, None).contains("has not sent an account"));
    let mut hostile = a.clone();
    hostile.totals.settled_micros = -1_500_000;
    hostile.reversals[0].reason = "\u{1b}[2J\u{1b}]0;pwned\u{7}".into();
    let out = render(&[], Some(&hostile));
    assert!(out.contains("settled -1.5,") && out.contains("?[2J?]0;pwned?") && !out.contains('\u{1b}'), "{out}");
    assert!(out.contains("(attempt not in this machine's log"), "{out}");
}
