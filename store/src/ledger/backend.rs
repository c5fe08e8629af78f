//! The storage interface both backends implement (SQLite embedded, PostgreSQL by
//! configuration), and the plain records it reads and writes.

use std::collections::BTreeMap;

use super::LedgerError;
use kommune_ledger::entry::{Entry, NodeTotal};
use kommune_ledger::records::REJECTED_KEPT_PER_NODE;
pub use kommune_ledger::records::{EntryFilter, Existing, JobUsage, RejectedCount, RejectedReceipt};
use kommune_ledger::verify::BadEntry;

/// One backend. Methods take `&mut self`: each thread that uses the ledger owns a handle.
pub trait Backend: Send {
    /// Appends entries (already sealed, consecutive after the head) and rejected receipts, in
    /// one durable transaction. A rejected receipt already stored gains its `times`; a new one
    /// is stored, the sender's oldest beyond `REJECTED_KEPT_PER_NODE` are evicted, and the
    /// sender's counters account for all of it. With `epoch`, the transaction first checks that the leader
    /// epoch is still this one, under a lock a later claim must wait for, and refuses with
    /// `LedgerError::Fenced` (writing nothing) if another writer has claimed since.
    fn append(&mut self, entries: &[Entry], rejected: &[RejectedReceipt], epoch: Option<u64>) -> Result<(), LedgerError>;
    /// Claims the next leader epoch (1 on a new ledger) for this writer and returns it. Waits
    /// for the write transactions in progress, so none of an older epoch commits after it.
    fn claim_epoch(&mut self, now_ms: i64) -> Result<u64, LedgerError>;
    /// For each (node, epoch, sequence), the receipt entry already using it.
    fn lookup_receipts(&mut self, keys: &[(&str, u64, u64)]) -> Result<Vec<Option<Existing>>, LedgerError>;
    /// For each attempt id, the seq of the receipt entry metering it.
    fn lookup_attempts(&mut self, ids: &[&str]) -> Result<Vec<Option<u64>>, LedgerError>;
    /// The last entry's seq and hash.
    fn head(&mut self) -> Result<Option<(u64, Vec<u8>)>, LedgerError>;
    /// The seq of the last checkpoint (0 when none).
    fn last_checkpoint(&mut self) -> Result<u64, LedgerError>;
    /// Earnings of every node with receipts (sums saturate at u64::MAX, never fail).
    fn node_totals(&mut self) -> Result<BTreeMap<String, NodeTotal>, LedgerError>;
    /// Earnings of one node; with `key`, only of the receipts signed with that key (a name
    /// used by two keys over time never merges their earnings).
    fn node_total(&mut self, node: &str, key: Option<&[u8; 32]>) -> Result<NodeTotal, LedgerError>;
    /// Every registered (node, key), in registration order.
    fn node_keys(&mut self) -> Result<Vec<(String, Vec<u8>)>, LedgerError>;
    /// Usage and cost of one job (sums saturate at u64::MAX, never fail).
    fn job_usage(&mut self, job_uid: &str) -> Result<JobUsage, LedgerError>;
    /// Usage and cost of one job with the seq of the last entry (of any kind) that the read
    /// saw, both from one snapshot, so the ledger can keep running totals from there. None when
    /// the backend cannot say (the ledger then reads `job_usage` every time).
    fn job_usage_with_head(&mut self, job_uid: &str) -> Result<Option<(JobUsage, u64)>, LedgerError> {
        let _ = job_uid;
        Ok(None)
    }
    /// The `limit` rejected receipts most recently first seen from `node`'s sessions, newest
    /// first (at most `REJECTED_KEPT_PER_NODE` are kept).
    fn rejected(&mut self, node: &str, limit: u64) -> Result<Vec<RejectedReceipt>, LedgerError>;
    /// The counters of what `node`'s sessions had rejected: one indexed row, never the rows.
    fn rejected_count(&mut self, node: &str) -> Result<RejectedCount, LedgerError>;
    /// Streams entries in seq order; `f` returns false to stop. A row that does not even read
    /// as an entry is passed as a `BadEntry`.
    fn for_each_entry(&mut self, filter: &EntryFilter, f: &mut dyn FnMut(Result<Entry, BadEntry>) -> bool) -> Result<(), LedgerError>;
    /// The settlement lines (reversal, statement, paid) after `after_seq`, in seq order: a
    /// range read on seq, so reading what was appended since the last read costs only that.
    /// A line that does not read as an entry is skipped (verification names it).
    fn payout_lines(&mut self, after_seq: u64) -> Result<Vec<Entry>, LedgerError>;
    /// The last lines the operator signs (checkpoints, node keys, settlement lines, key
    /// rotations), newest first, at most `limit`: where the key in force is read from.
    fn last_operator_lines(&mut self, limit: u64) -> Result<Vec<Entry>, LedgerError>;
}

/// u64 values are stored in signed 64-bit columns bit for bit.
pub fn to_db(v: u64) -> i64 {
    v as i64
}

pub fn from_db(v: i64) -> u64 {
    v as u64
}

/// A batch's rejected receipts by sender, as both backends store them.
#[derive(Default)]
pub struct PerNode<'a>(pub BTreeMap<&'a str, NodeRejections<'a>>);

/// One sender's part of a batch: receptions, and the receipts not stored before, in order.
#[derive(Default)]
pub struct NodeRejections<'a> {
    pub received: u64,
    pub fresh: Vec<&'a RejectedReceipt>,
}

impl<'a> PerNode<'a> {
    /// Counts `r`; `repeat` when its digest is stored already (its row was updated).
    pub fn add(&mut self, r: &'a RejectedReceipt, repeat: bool) {
        let n = self.0.entry(&r.session_node).or_default();
        n.received = n.received.saturating_add(r.times);
        if !repeat {
            n.fresh.push(r);
        }
    }
}

impl<'a> NodeRejections<'a> {
    /// The new receipts to store (the newest, at most `REJECTED_KEPT_PER_NODE`) and how many
    /// older ones of this batch are evicted before they are ever stored.
    pub fn kept_fresh(&self) -> (&[&'a RejectedReceipt], u64) {
        let skip = self.fresh.len().saturating_sub(REJECTED_KEPT_PER_NODE as usize);
        (&self.fresh[skip..], skip as u64)
    }
}
