//! The storage interface both backends implement (SQLite embedded, PostgreSQL by
//! configuration), and the plain records it reads and writes.

use std::collections::BTreeMap;

use super::LedgerError;
use super::entry::{Entry, NodeTotal, UsageFigures};
use super::verify::BadEntry;
use crate::pricing::Micros;

/// A refused receipt, kept with the reason. Identical receipts (same body and signature) are
/// stored once, with a count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RejectedReceipt {
    /// sha256 of the length-prefixed body and signature: what "identical" means.
    pub digest: Vec<u8>,
    /// First and last time it was received, Unix ms.
    pub first_ms: i64,
    pub last_ms: i64,
    /// How many times it was received.
    pub times: u64,
    /// The node whose session sent it.
    pub session_node: String,
    /// What the body claims, when it decodes (else empty / 0).
    pub node: String,
    pub epoch: u64,
    pub sequence: u64,
    pub attempt_id: String,
    /// The receipt as received.
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
    /// Why it was refused (the text the provider sees).
    pub reason: String,
}

/// A receipt already in the ledger under some (node, epoch, sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub seq: u64,
    pub body: Vec<u8>,
    pub cost: Micros,
}

/// Usage and cost of one job so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct JobUsage {
    /// Receipts counted.
    pub receipts: u64,
    /// Sums of the usage fields, except `memory_peak_bytes`, which is the largest peak.
    pub usage: UsageFigures,
    /// Sum of the receipts' costs.
    pub cost: Micros,
}

/// Which entries to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Only entries recorded at or after this Unix ms.
    pub since_ms: Option<i64>,
    /// Only entries recorded before this Unix ms.
    pub until_ms: Option<i64>,
    /// Only receipts and key registrations of this node.
    pub node: Option<String>,
}

/// One backend. Methods take `&mut self`: each thread that uses the ledger owns a handle.
pub trait Backend: Send {
    /// Appends entries (already sealed, consecutive after the head) and rejected receipts, in
    /// one durable transaction. With `epoch`, the transaction first checks that the leader
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
    /// Earnings of every node with receipts.
    fn node_totals(&mut self) -> Result<BTreeMap<String, NodeTotal>, LedgerError>;
    /// Earnings of one node.
    fn node_total(&mut self, node: &str) -> Result<NodeTotal, LedgerError>;
    /// Every registered (node, key), in registration order.
    fn node_keys(&mut self) -> Result<Vec<(String, Vec<u8>)>, LedgerError>;
    /// Usage and cost of one job.
    fn job_usage(&mut self, job_uid: &str) -> Result<JobUsage, LedgerError>;
    /// Usage and cost of one job with the seq of the last entry (of any kind) that the read
    /// saw, both from one snapshot, so the ledger can keep running totals from there. None when
    /// the backend cannot say (the ledger then reads `job_usage` every time).
    fn job_usage_with_head(&mut self, job_uid: &str) -> Result<Option<(JobUsage, u64)>, LedgerError> {
        let _ = job_uid;
        Ok(None)
    }
    /// Rejected receipts sent by `node`'s sessions, oldest first.
    fn rejected(&mut self, node: &str) -> Result<Vec<RejectedReceipt>, LedgerError>;
    /// Streams entries in seq order; `f` returns false to stop. A row that does not even read
    /// as an entry is passed as a `BadEntry`.
    fn for_each_entry(&mut self, filter: &EntryFilter, f: &mut dyn FnMut(Result<Entry, BadEntry>) -> bool) -> Result<(), LedgerError>;
}

/// u64 values are stored in signed 64-bit columns bit for bit.
pub(crate) fn to_db(v: u64) -> i64 {
    v as i64
}

pub(crate) fn from_db(v: i64) -> u64 {
    v as u64
}
