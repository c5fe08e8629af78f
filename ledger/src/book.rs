//! The payout book: every statement with its paid mark, and each node's earnings split into
//! pending / settled / paid, built from the settlement lines alone (reversals, statements, paid).
//!
//! It reads only lines of kinds 3-5, so the operator keeps it current by reading the lines
//! appended since it last looked, never the receipts. It trusts the lines it is given (the
//! writer made them and `ledger verify` checks them): it mirrors, it does not verify.

use std::collections::{BTreeMap, HashMap};

use kommune_core::pricing::Micros;

use crate::entry::{Entry, EntryKind};
use crate::export::ExportLine;
use crate::payout::{PaidBody, ReversalBody, Statement};
use crate::statement_file::PaidMark;

/// One statement as the book keeps it: the signed line and its decoded content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookStatement {
    pub line: ExportLine,
    pub statement: Statement,
    pub paid: Option<PaidMark>,
}

/// A node's earnings by state, in micro-credits. `settled` and `paid` are the node's lines of
/// statements (credits minus reversals, which can be negative when reversals exceed a period's
/// credits); `pending` is what no statement has covered yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeSplit {
    pub pending: i128,
    pub settled: i128,
    pub paid: i128,
    /// Receipts of this node reversed so far (settled or not).
    pub reversed: i128,
}

/// A reversed receipt, for the provider's listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookReversal {
    pub seq: u64,
    pub receipt_seq: u64,
    pub node: String,
    pub credits: Micros,
    pub reason: String,
}

/// What one node is told of its earnings: the newest statements that include it and the
/// newest reversals of its receipts, each capped, with how many older ones were left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAccount {
    /// The last settlement line read.
    pub as_of_seq: u64,
    /// (statement line seq, the statement, its paid mark), oldest first.
    pub statements: Vec<(u64, Statement, Option<PaidMark>)>,
    pub reversals: Vec<BookReversal>,
    pub statements_omitted: u64,
    pub reversals_omitted: u64,
}

/// Statements, paid marks and reversals read so far.
#[derive(Debug, Clone, Default)]
pub struct PayoutBook {
    /// Highest seq applied: the next read starts after it.
    applied: u64,
    statements: BTreeMap<u64, BookStatement>,
    /// Per node: credits covered by any statement, and reversals since that node's owner's
    /// last statement (they lower pending until a statement takes them).
    stated_credits: HashMap<String, i128>,
    open_reversed: HashMap<String, i128>,
    reversals: Vec<BookReversal>,
}

impl PayoutBook {
    /// The seq after which the next lines are to be read.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Applies settlement lines in seq order; other kinds and lines already applied are skipped.
    /// A body that does not read is skipped too (verification names it; the book only mirrors).
    pub fn apply(&mut self, e: &Entry) {
        if e.seq <= self.applied {
            return;
        }
        self.applied = e.seq;
        match e.kind {
            EntryKind::Reversal => {
                if let Ok(b) = serde_json::from_slice::<ReversalBody>(&e.body) {
                    *self.open_reversed.entry(e.node.clone()).or_default() += e.cost.0 as i128;
                    self.reversals.push(BookReversal { seq: e.seq, receipt_seq: b.receipt_seq, node: e.node.clone(), credits: e.cost, reason: b.reason });
                }
            }
            EntryKind::Statement => {
                if let Ok(st) = Statement::parse(&e.body) {
                    for (node, line) in &st.nodes {
                        *self.stated_credits.entry(node.clone()).or_default() += line.credits_micros as i128;
                        *self.open_reversed.entry(node.clone()).or_default() -= line.reversed_micros as i128;
                    }
                    self.statements.insert(e.seq, BookStatement { line: ExportLine::from(e), statement: st, paid: None });
                }
            }
            EntryKind::Paid => {
                if let Ok(p) = serde_json::from_slice::<PaidBody>(&e.body)
                    && let Some(s) = self.statements.get_mut(&p.statement_seq)
                {
                    s.paid = Some(PaidMark { seq: e.seq, reference: p.reference });
                }
            }
            _ => {}
        }
    }

    /// Every statement by seq.
    pub fn statements(&self) -> &BTreeMap<u64, BookStatement> {
        &self.statements
    }

    /// Reversals of `node`'s receipts, oldest first.
    pub fn reversals_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a BookReversal> + 'a {
        self.reversals.iter().filter(move |r| r.node == node)
    }

    /// `node`'s statements and reversals, at most `max_statements` and `max_reversals` of the
    /// newest of each.
    pub fn account_of(&self, node: &str, max_statements: usize, max_reversals: usize) -> NodeAccount {
        let statements: Vec<_> = self.statements.iter().filter(|(_, s)| s.statement.nodes.contains_key(node)).collect();
        let reversals: Vec<_> = self.reversals_of(node).collect();
        let (skip_s, skip_r) = (statements.len().saturating_sub(max_statements), reversals.len().saturating_sub(max_reversals));
        NodeAccount {
            as_of_seq: self.applied,
            statements: statements[skip_s..].iter().map(|(seq, s)| (**seq, s.statement.clone(), s.paid.clone())).collect(),
            reversals: reversals[skip_r..].iter().map(|r| (*r).clone()).collect(),
            statements_omitted: skip_s as u64,
            reversals_omitted: skip_r as u64,
        }
    }

    /// `node`'s earnings by state, given what its accepted receipts earned in all (`earned`,
    /// the ledger's running total for the node).
    pub fn split(&self, node: &str, earned: Micros) -> NodeSplit {
        let mut out = NodeSplit::default();
        for s in self.statements.values() {
            if let Some(line) = s.statement.nodes.get(node) {
                let net = line.credits_micros as i128 - line.reversed_micros as i128;
                if s.paid.is_some() {
                    out.paid += net;
                } else {
                    out.settled += net;
                }
            }
        }
        let open_reversed = self.open_reversed.get(node).copied().unwrap_or(0);
        out.pending = earned.0 as i128 - self.stated_credits.get(node).copied().unwrap_or(0) - open_reversed;
        out.reversed = self.reversals_of(node).map(|r| r.credits.0 as i128).sum();
        out
    }
}

/// Signed micro-credits as credits ("-1.5" when negative), saturating at u64::MAX either way.
pub fn credits(micros: i128) -> String {
    let abs = Micros(micros.unsigned_abs().min(u64::MAX as u128) as u64);
    if micros < 0 { format!("-{abs}") } else { abs.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Verdict;
    use crate::payout_tests::Book;

    fn book_of(b: &Book) -> PayoutBook {
        let mut book = PayoutBook::default();
        b.entries.iter().for_each(|e| book.apply(e));
        book
    }

    fn earned(b: &Book, node: &str) -> Micros {
        Micros(b.entries.iter().filter(|e| e.kind == EntryKind::Receipt && e.node == node).map(|e| e.cost.0).sum())
    }

    #[test]
    fn earnings_move_from_pending_to_settled_to_paid_and_reversals_leave_them() {
        let mut b = Book::new();
        b.node(1, "alice");
        b.node(2, "alice");
        let Verdict::Accepted { seq: r1, .. } = b.receipt(1, 1) else { panic!("accepted") };
        b.receipt(1, 2);
        b.receipt(2, 1);
        let c = crate::payout_tests::cost() as i128;
        let node = "pn-1";
        assert_eq!(book_of(&b).split(node, earned(&b, node)), NodeSplit { pending: 2 * c, ..Default::default() });
        b.reverse(r1, "outvoted").unwrap();
        assert_eq!(book_of(&b).split(node, earned(&b, node)), NodeSplit { pending: c, reversed: c, ..Default::default() }, "a reversal leaves pending");
        let st = b.close()[0];
        assert_eq!(book_of(&b).split(node, earned(&b, node)), NodeSplit { settled: c, reversed: c, ..Default::default() });
        b.receipt(1, 3);
        b.paid(st, "bank-42").unwrap();
        let book = book_of(&b);
        assert_eq!(book.split(node, earned(&b, node)), NodeSplit { pending: c, paid: c, reversed: c, ..Default::default() }, "the next receipt is pending");
        assert_eq!(book.split("pn-2", earned(&b, "pn-2")), NodeSplit { paid: c, ..Default::default() });
        assert_eq!(book.statements()[&st].paid.as_ref().map(|p| p.reference.as_str()), Some("bank-42"));
        let r: Vec<_> = book.reversals_of(node).map(|r| (r.receipt_seq, r.reason.as_str())).collect();
        assert_eq!(r, [(r1, "outvoted")]);
        // A reversal after the close of its receipt's period: the next statement owes it back.
        b.reverse(r1 + 1, "disproved").unwrap();
        b.close();
        let split = book_of(&b).split(node, earned(&b, node));
        assert_eq!((split.pending, split.settled, split.paid), (0, 0, c), "{split:?}");
        assert_eq!(credits(-1_500_000), "-1.5");
    }

    #[test]
    fn a_nodes_account_lists_its_statements_and_reversals_newest_kept() {
        let mut b = Book::new();
        b.node(1, "alice");
        b.node(2, "bob");
        let Verdict::Accepted { seq: r1, .. } = b.receipt(1, 1) else { panic!("accepted") };
        let Verdict::Accepted { seq: r2, .. } = b.receipt(1, 2) else { panic!("accepted") };
        b.receipt(2, 1);
        b.reverse(r1, "outvoted").unwrap();
        let first = b.close();
        b.reverse(r2, "disproved").unwrap();
        b.close();
        let alice_first = *first.iter().find(|s| book_of(&b).statements()[s].statement.owner == "alice").unwrap();
        b.paid(alice_first, "bank-1").unwrap();
        let book = book_of(&b);
        let all = book.account_of("pn-1", 10, 10);
        assert_eq!(all.as_of_seq, book.applied());
        assert_eq!(all.statements.len(), 2, "bob's statement is not pn-1's");
        assert_eq!((all.statements[0].0, all.statements[0].2.as_ref().map(|p| p.reference.as_str())), (alice_first, Some("bank-1")));
        assert!(all.statements[1].2.is_none());
        assert_eq!(all.reversals.iter().map(|r| (r.receipt_seq, r.reason.as_str())).collect::<Vec<_>>(), [(r1, "outvoted"), (r2, "disproved")]);
        let capped = book.account_of("pn-1", 1, 1);
        assert_eq!((capped.statements_omitted, capped.reversals_omitted), (1, 1));
        assert_eq!((capped.statements[0].0, capped.reversals[0].receipt_seq), (all.statements[1].0, r2), "the newest are kept");
        assert_eq!(book.account_of("pn-9", 10, 10).statements.len(), 0);
    }

    #[test]
    fn reading_in_pieces_gives_the_same_book() {
        let (b, _) = crate::payout_tests::settled_book();
        let whole = book_of(&b);
        let mut pieces = PayoutBook::default();
        for chunk in b.entries.chunks(3) {
            chunk.iter().for_each(|e| pieces.apply(e));
            // Lines read again (an overlapping read) are skipped.
            chunk.iter().for_each(|e| pieces.apply(e));
        }
        assert_eq!(pieces.statements(), whole.statements());
        for node in ["pn-1", "pn-2", "pn-3"] {
            assert_eq!(pieces.split(node, earned(&b, node)), whole.split(node, earned(&b, node)));
        }
    }
}
