//! The operator's payout book: statements, paid marks and each node's earnings by state, kept
//! current from the settlement lines appended since the last read (never the receipts).

use std::sync::{Mutex, PoisonError};

use kommune_core::pricing::Micros;
use kommune_ledger::book::{BookReversal, BookStatement, NodeAccount, NodeSplit, PayoutBook};

use super::{Ledger, LedgerError};

/// A node's earnings by state, and its reversed receipts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePayouts {
    pub split: NodeSplit,
    pub reversals: Vec<BookReversal>,
}

/// The book behind a ledger handle.
#[derive(Default)]
pub(super) struct SharedBook(pub(super) Mutex<PayoutBook>);

impl Ledger {
    /// Reads the settlement lines appended since the last call into the book.
    async fn refresh_book(&self) -> Result<(), LedgerError> {
        let after = self.book.0.lock().unwrap_or_else(PoisonError::into_inner).applied();
        let lines = self.read(move |b| b.payout_lines(after)).await?;
        let mut book = self.book.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Another refresh may have applied some of them meanwhile: `apply` skips those.
        lines.iter().for_each(|e| book.apply(e));
        Ok(())
    }

    /// Every statement in the ledger with its paid mark, by seq.
    pub async fn statements(&self) -> Result<Vec<BookStatement>, LedgerError> {
        self.refresh_book().await?;
        Ok(self.book.0.lock().unwrap_or_else(PoisonError::into_inner).statements().values().cloned().collect())
    }

    /// `node`'s earnings split into pending / settled / paid, given what its accepted receipts
    /// earned (`NodeEarnings::pending`, the running total), and its reversed receipts.
    pub async fn node_payouts(&self, node: &str, earned: Micros) -> Result<NodePayouts, LedgerError> {
        self.refresh_book().await?;
        let book = self.book.0.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(NodePayouts { split: book.split(node, earned), reversals: book.reversals_of(node).cloned().collect() })
    }

    /// The seq of the last settlement line in the ledger (read now): it changes exactly when a
    /// statement, reversal or paid line is appended, by this process or another.
    pub async fn payout_version(&self) -> Result<u64, LedgerError> {
        self.refresh_book().await?;
        Ok(self.book.0.lock().unwrap_or_else(PoisonError::into_inner).applied())
    }

    /// `node`'s earnings split (as [`Ledger::node_payouts`]) and the account a connected agent
    /// is told: its newest `max_statements` statements and `max_reversals` reversals.
    pub async fn node_account(&self, node: &str, earned: Micros, max_statements: usize, max_reversals: usize) -> Result<(NodeSplit, NodeAccount), LedgerError> {
        self.refresh_book().await?;
        let book = self.book.0.lock().unwrap_or_else(PoisonError::into_inner);
        Ok((book.split(node, earned), book.account_of(node, max_statements, max_reversals)))
    }
}
