//! What a connected agent is told of its earnings: its totals by state, the statements that
//! include it and its reversed receipts, sent after Welcome and again when they change.
//!
//! One poller per gateway reads the ledger's settlement lines (so a close, reversal or paid mark
//! made by `kommune-operator payout` in another process is seen too) and wakes the sessions; each
//! session resends its node's account only when that node's part changed. An account is paged
//! and capped: its size follows the node's statements and reversals, never its receipts.

use std::time::Duration;

use kommune_ledger::book::{NodeAccount, NodeSplit};
use kommune_proto::v1::{EarningsPage, EarningsReversal, EarningsStatement, EarningsTotals, OperatorMessage, operator_message::Kind as OpKind};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tracing::{debug, warn};

use crate::ledger::{Ledger, LedgerError};

/// The newest statements and reversals an account carries: a daily close keeps well over two
/// years of statements; a node with more reversals than this is long quarantined.
pub const ACCOUNT_STATEMENTS: usize = 1_000;
pub const ACCOUNT_REVERSALS: usize = 5_000;
/// Items (statements plus reversals) per page: a reversal's reason is at most 1 KiB, so a page
/// stays near 256 KiB, well under the agent's 4 MiB message limit.
pub const PAGE_ITEMS: usize = 250;

/// What of a node's account, when it differs from the last one sent, is worth resending: a
/// new statement or reversal, a paid mark, or a change in what was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    statements: Vec<(u64, u64)>,
    reversals: (usize, u64, u64),
}

impl Shape {
    fn of(a: &NodeAccount) -> Shape {
        Shape {
            statements: a.statements.iter().map(|(seq, _, paid)| (*seq, paid.as_ref().map_or(0, |p| p.seq))).collect(),
            reversals: (a.reversals.len(), a.reversals.last().map_or(0, |r| r.seq), a.reversals_omitted),
        }
    }
}

fn saturate(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// The pages of `node`'s account, in order: statements first, then reversals, [`PAGE_ITEMS`]
/// a page; an empty account is one page (it still carries the totals).
pub fn pages(node: &str, split: NodeSplit, account: &NodeAccount, head_seq: u64) -> Vec<EarningsPage> {
    let totals = EarningsTotals {
        pending_micros: saturate(split.pending),
        settled_micros: saturate(split.settled),
        paid_micros: saturate(split.paid),
        reversed_micros: saturate(split.reversed),
    };
    let statements: Vec<EarningsStatement> = account
        .statements
        .iter()
        .map(|(seq, st, paid)| {
            let line = st.nodes.get(node).cloned().unwrap_or_default();
            EarningsStatement {
                seq: *seq,
                from_seq: st.from_seq,
                upto_seq: st.upto_seq,
                period_end_ms: st.period_end_ms,
                receipts: line.receipts,
                credits_micros: line.credits_micros,
                reversed_receipts: line.reversed_receipts,
                reversed_micros: line.reversed_micros,
                paid_seq: paid.as_ref().map_or(0, |p| p.seq),
                paid_reference: paid.as_ref().map(|p| p.reference.clone()).unwrap_or_default(),
            }
        })
        .collect();
    let reversals: Vec<EarningsReversal> = account
        .reversals
        .iter()
        .map(|r| EarningsReversal { seq: r.seq, receipt_seq: r.receipt_seq, credits_micros: r.credits.0, reason: r.reason.clone() })
        .collect();
    let page_count = (statements.len() + reversals.len()).div_ceil(PAGE_ITEMS).max(1);
    let mut out: Vec<EarningsPage> = (0..page_count)
        .map(|page| EarningsPage {
            as_of_seq: account.as_of_seq,
            page: page as u32,
            page_count: page_count as u32,
            totals: Some(totals),
            statements_omitted: account.statements_omitted,
            reversals_omitted: account.reversals_omitted,
            head_seq,
            ..Default::default()
        })
        .collect();
    for (i, s) in statements.into_iter().enumerate() {
        out[i / PAGE_ITEMS].statements.push(s);
    }
    let first = out.iter().map(|p| p.statements.len()).sum::<usize>();
    for (i, r) in reversals.into_iter().enumerate() {
        out[(first + i) / PAGE_ITEMS].reversals.push(r);
    }
    out
}

/// Reads `node`'s account now: its pages and their shape.
async fn read(ledger: &Ledger, node: &str, key: [u8; 32]) -> Result<(Shape, Vec<EarningsPage>), LedgerError> {
    let earned = ledger.node_earnings_of_key(node, key).await?;
    let (split, account) = ledger.node_account(node, earned.pending, ACCOUNT_STATEMENTS, ACCOUNT_REVERSALS).await?;
    Ok((Shape::of(&account), pages(node, split, &account, earned.head.map_or(0, |h| h.seq))))
}

/// Sends `node`'s account unless its shape is `last` (then nothing changed for this node).
/// A ledger that cannot be read is logged and skipped: the account is informational and the
/// next change sends it again. Returns false when the session's stream is gone.
pub(super) async fn send(ledger: &Ledger, node: &str, key: [u8; 32], tx: &mpsc::Sender<Result<OperatorMessage, Status>>, last: &mut Option<Shape>) -> bool {
    let (shape, pages) = match read(ledger, node, key).await {
        Ok(read) => read,
        Err(e) => {
            warn!(%node, error = %e, "cannot read the node's earnings from the ledger; the agent is told at the next change");
            return true;
        }
    };
    if last.as_ref() == Some(&shape) {
        return true;
    }
    debug!(%node, pages = pages.len(), "earnings account sent");
    for page in pages {
        if tx.send(Ok(OperatorMessage { kind: Some(OpKind::Earnings(page)) })).await.is_err() {
            return false;
        }
    }
    *last = Some(shape);
    true
}

/// Publishes the ledger's settlement version every `every` until the process ends.
pub(super) async fn poll(ledger: &Ledger, version: &watch::Sender<u64>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match ledger.payout_version().await {
            Ok(v) => {
                version.send_if_modified(|old| std::mem::replace(old, v) != v);
            }
            Err(e) => debug!(error = %e, "cannot read the ledger's settlement lines; agents' earnings are told later"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kommune_core::pricing::Micros;
    use kommune_ledger::book::BookReversal;
    use kommune_ledger::payout::{NodeLine, Statement};
    use kommune_ledger::statement_file::PaidMark;

    fn statement(seq: u64, node: &str) -> (u64, Statement, Option<PaidMark>) {
        let mut st = Statement {
            owner: "alice".into(),
            period_start_ms: 0,
            period_end_ms: 5,
            from_seq: seq - 10,
            upto_seq: seq - 1,
            head_hash: String::new(),
            receipts: 3,
            credits_micros: 300,
            reversed_micros: 0,
            payable_micros: 300,
            owed_micros: 0,
            receipts_sha256: String::new(),
            nodes: Default::default(),
            reversals: vec![],
        };
        st.nodes.insert(node.into(), NodeLine { receipts: 2, credits_micros: 200, ..Default::default() });
        st.nodes.insert("other".into(), NodeLine { receipts: 1, credits_micros: 100, ..Default::default() });
        (seq, st, Some(PaidMark { seq: seq + 1, reference: "bank-1".into() }))
    }

    #[test]
    fn an_account_is_paged_with_the_nodes_own_lines_and_the_totals_on_every_page() {
        let account = NodeAccount {
            as_of_seq: 900,
            statements: (1..=300).map(|i| statement(i * 20, "pn-1")).collect(),
            reversals: (0..260)
                .map(|i| BookReversal { seq: 7000 + i, receipt_seq: i + 1, node: "pn-1".into(), credits: Micros(5), reason: "outvoted".into() })
                .collect(),
            statements_omitted: 4,
            reversals_omitted: 0,
        };
        let split = NodeSplit { pending: 10, settled: -3, paid: i128::MAX, reversed: 1300 };
        let p = pages("pn-1", split, &account, 950);
        assert_eq!(p.len(), 3, "560 items at {PAGE_ITEMS} a page");
        assert!(p.iter().enumerate().all(|(i, page)| page.page == i as u32 && page.page_count == 3 && page.as_of_seq == 900 && page.head_seq == 950));
        assert!(p.iter().all(|page| page.statements.len() + page.reversals.len() <= PAGE_ITEMS && page.statements_omitted == 4));
        assert_eq!(p.iter().map(|page| page.statements.len()).sum::<usize>(), 300);
        assert_eq!(p.iter().map(|page| page.reversals.len()).sum::<usize>(), 260);
        let t = p[2].totals.unwrap();
        assert_eq!((t.pending_micros, t.settled_micros, t.paid_micros, t.reversed_micros), (10, -3, i64::MAX, 1300), "saturated, signed");
        let s = &p[0].statements[0];
        assert_eq!((s.seq, s.from_seq, s.upto_seq, s.receipts, s.credits_micros), (20, 10, 19, 2, 200), "the node's own line, not the owner's total");
        assert_eq!((s.paid_seq, s.paid_reference.as_str()), (21, "bank-1"));
        let empty = pages("pn-1", NodeSplit::default(), &NodeAccount::default(), 0);
        assert_eq!((empty.len(), empty[0].page_count), (1, 1));
    }

    #[test]
    fn the_shape_changes_with_a_statement_a_paid_mark_or_a_reversal() {
        let mut a = NodeAccount { statements: vec![statement(20, "pn-1")], ..Default::default() };
        let before = Shape::of(&a);
        a.statements[0].2 = None;
        assert_ne!(Shape::of(&a), before);
        let unpaid = Shape::of(&a);
        a.reversals.push(BookReversal { seq: 30, receipt_seq: 3, node: "pn-1".into(), credits: Micros(1), reason: "x".into() });
        let reversed = Shape::of(&a);
        assert_ne!(reversed, unpaid);
        a.as_of_seq = 99;
        assert_eq!(Shape::of(&a), reversed, "another node's settlement line alone changes nothing");
    }
}
