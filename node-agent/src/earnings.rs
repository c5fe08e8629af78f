//! `kommune-agent earnings --verify`: the receipts this machine holds an Ack for, checked against
//! the statements the operator exported, with the ledger crate's check (the code the operator runs).
//!
//! The agent only knows its own Acks; whether a receipt is settled or paid is in a statement,
//! which the provider is given (`kommune-operator payout export`). So each accepted receipt is:
//! settled (listed with the Acked hash and amount), paid (settled in a statement with a paid
//! mark), reversed (listed and taken back, with the reason), MISSING or WRONG (inside a
//! statement's ledger range but absent or different: the operator's fault), or pending (in no
//! statement given, e.g. not closed yet).

use std::collections::HashMap;
use std::fmt::Write as _;

use kommune_ledger::statement_file::{AckedReceipt, Discrepancy, ExportedStatement, reconcile};

use crate::receipts::{ReceiptRecord, credits};

/// What became of one acknowledged receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// In no statement given.
    Pending,
    /// Listed as Acked in statement `statement`; `paid` is the paid mark's reference.
    Settled {
        statement: u64,
        paid: Option<String>,
    },
    Reversed {
        statement: u64,
        reason: String,
    },
    Missing {
        statement: u64,
    },
    Wrong {
        statement: u64,
        what: String,
    },
}

/// The outcome of `earnings --verify`.
#[derive(Debug, Default)]
pub struct Verification {
    /// One line per statement file that did not check (bad signature, altered list, wrong key).
    pub bad_files: Vec<String>,
    /// Every accepted receipt with a ledger position, in ledger order, with its standing.
    pub receipts: Vec<(AckedReceipt, Standing)>,
    /// Accepted receipts whose Ack carried no ledger position (an operator older than
    /// statements): they cannot be checked.
    pub unplaced: usize,
}

impl Verification {
    /// True when every file checked and no receipt is missing or wrong: the exit status.
    pub fn ok(&self) -> bool {
        self.bad_files.is_empty() && !self.receipts.iter().any(|(_, s)| matches!(s, Standing::Missing { .. } | Standing::Wrong { .. }))
    }
}

/// The accepted receipts the agent can look for in a statement.
pub fn acked(records: &[ReceiptRecord]) -> (Vec<AckedReceipt>, usize) {
    let accepted: Vec<&ReceiptRecord> = records.iter().filter(|r| r.status == "accepted").collect();
    let mut out: Vec<AckedReceipt> = accepted
        .iter()
        .filter(|r| r.ledger_seq != 0)
        .map(|r| AckedReceipt { attempt_id: r.attempt_id.clone(), ledger_seq: r.ledger_seq, entry_hash: r.entry_hash.clone(), cost_micros: r.cost_micros })
        .collect();
    out.sort_by_key(|a| a.ledger_seq);
    out.dedup_by_key(|a| a.ledger_seq);
    let unplaced = accepted.len() - accepted.iter().filter(|r| r.ledger_seq != 0).count();
    (out, unplaced)
}

/// Checks each statement (signature, pinned key when given, its receipt list) and reconciles
/// the Acks within its range against it.
pub fn verify(records: &[ReceiptRecord], statements: &[ExportedStatement], operator_key_sha256: Option<&str>) -> Verification {
    let (acks, unplaced) = acked(records);
    let mut standing: HashMap<u64, Standing> = HashMap::new();
    let mut bad_files = vec![];
    for s in statements {
        let seq = s.file.entry.seq;
        let st = match s.file.check(operator_key_sha256) {
            Ok(st) => st,
            Err(e) => {
                bad_files.push(format!("statement {seq}: {e}"));
                continue;
            }
        };
        let problems: HashMap<u64, Discrepancy> = reconcile(&s.file, &acks)
            .into_iter()
            .map(|d| {
                let at = match &d {
                    Discrepancy::Missing { seq, .. } | Discrepancy::Wrong { seq, .. } | Discrepancy::Reversed { seq, .. } => *seq,
                };
                (at, d)
            })
            .collect();
        for a in acks.iter().filter(|a| (st.from_seq..=st.upto_seq).contains(&a.ledger_seq)) {
            let now = match problems.get(&a.ledger_seq) {
                None => Standing::Settled { statement: seq, paid: s.paid.as_ref().map(|p| p.reference.clone()) },
                Some(Discrepancy::Missing { .. }) => Standing::Missing { statement: seq },
                Some(Discrepancy::Wrong { what, .. }) => Standing::Wrong { statement: seq, what: what.clone() },
                Some(Discrepancy::Reversed { reason, .. }) => Standing::Reversed { statement: seq, reason: reason.clone() },
            };
            // Another owner's statement over the same range does not list this machine's
            // receipts; a statement that does list it (or a worse finding) wins.
            let keep = match (standing.get(&a.ledger_seq), &now) {
                (None, _) => true,
                (Some(Standing::Missing { .. }), _) => true,
                (Some(_), Standing::Missing { .. }) => false,
                (Some(_), _) => true,
            };
            if keep {
                standing.insert(a.ledger_seq, now);
            }
        }
    }
    let receipts = acks.into_iter().map(|a| (standing.remove(&a.ledger_seq).unwrap_or(Standing::Pending), a)).map(|(s, a)| (a, s)).collect();
    Verification { bad_files, receipts, unplaced }
}

/// The report `earnings --verify` prints: totals, then every receipt that is not plainly
/// settled, then each bad file.
pub fn render(node: &str, v: &Verification) -> String {
    let mut out = String::new();
    let (mut pending, mut settled, mut paid, mut reversed, mut missing, mut wrong) = ((0, 0), (0, 0), (0, 0), (0, 0), 0, 0);
    let add = |t: &mut (usize, u64), a: &AckedReceipt| {
        t.0 += 1;
        t.1 = t.1.saturating_add(a.cost_micros);
    };
    for (a, s) in &v.receipts {
        match s {
            Standing::Pending => add(&mut pending, a),
            Standing::Settled { paid: Some(_), .. } => add(&mut paid, a),
            Standing::Settled { paid: None, .. } => add(&mut settled, a),
            Standing::Reversed { .. } => add(&mut reversed, a),
            Standing::Missing { .. } => missing += 1,
            Standing::Wrong { .. } => wrong += 1,
        }
    }
    let _ = writeln!(
        out,
        "{node}: {} acknowledged receipt(s): {} paid ({} credits), {} settled unpaid ({} credits), {} reversed ({} credits), {} pending in no statement given ({} credits), {} MISSING, {} WRONG",
        v.receipts.len(),
        paid.0,
        credits(paid.1),
        settled.0,
        credits(settled.1),
        reversed.0,
        credits(reversed.1),
        pending.0,
        credits(pending.1),
        missing,
        wrong
    );
    for (a, s) in &v.receipts {
        let line = match s {
            Standing::Missing { statement } => {
                format!("MISSING: ledger entry {} (attempt {}, {} credits) is not in statement {statement}", a.ledger_seq, a.attempt_id, credits(a.cost_micros))
            }
            Standing::Wrong { statement, what } => format!("WRONG: ledger entry {} (attempt {}) in statement {statement}: {what}", a.ledger_seq, a.attempt_id),
            Standing::Reversed { statement, reason } => {
                format!("reversed: ledger entry {} (attempt {}) in statement {statement}: {reason}", a.ledger_seq, a.attempt_id)
            }
            _ => continue,
        };
        let _ = writeln!(out, "{line}");
    }
    for b in &v.bad_files {
        let _ = writeln!(out, "BAD STATEMENT: {b}");
    }
    if v.unplaced > 0 {
        let _ = writeln!(out, "{} accepted receipt(s) were acknowledged without a ledger position (an older operator) and cannot be checked", v.unplaced);
    }
    let _ = writeln!(out, "{}", if v.ok() { "OK: every acknowledged receipt in these statements is listed with the right amount" } else { "FAILED" });
    out
}
