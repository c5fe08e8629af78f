//! The plain records the ledger reads and writes, shared by the operator's storage backends,
//! the agent and an auditor: refused receipts, job usage, the chain head, a node's earnings.

use crate::entry::UsageFigures;
use kommune_core::pricing::Micros;

/// How many refused receipts are kept per session node: the most recently first-seen ones,
/// older ones are evicted (and counted). Counters in [`RejectedCount`] are never evicted.
pub const REJECTED_KEPT_PER_NODE: u64 = 1_000;
/// How much of a refused receipt's body is kept, so an auditor still sees what it claimed.
pub const REJECTED_BODY_PREFIX: usize = 256;
/// Longest attempt id or claimed node name kept for a refused receipt, in characters.
pub const REJECTED_NAME_MAX: usize = 128;
/// Longest reason kept for a refused receipt, in characters (a reason may quote the body).
pub const REJECTED_REASON_MAX: usize = 512;

/// A refused receipt, kept as a bounded digest with the reason: a few hundred bytes, whatever
/// was sent. Identical receipts (same sender, body and signature) are kept once, with a count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RejectedReceipt {
    /// sha256 of the length-prefixed session node, body and signature: what "identical" means.
    pub digest: Vec<u8>,
    /// First and last time it was received, Unix ms.
    pub first_ms: i64,
    pub last_ms: i64,
    /// How many times it was received.
    pub times: u64,
    /// The node whose session sent it.
    pub session_node: String,
    /// What the body claims, when it decodes (else empty / 0); names capped at
    /// [`REJECTED_NAME_MAX`] characters.
    pub node: String,
    pub epoch: u64,
    pub sequence: u64,
    pub attempt_id: String,
    /// Sizes of the body and signature as received.
    pub body_bytes: u64,
    pub signature_bytes: u64,
    /// The body's first [`REJECTED_BODY_PREFIX`] bytes.
    pub body_prefix: Vec<u8>,
    /// Why it was refused (the text the provider sees), capped at [`REJECTED_REASON_MAX`].
    pub reason: String,
}

/// What a session node has had refused, from counters kept beside the bounded rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RejectedCount {
    /// Refused receptions, repeats included.
    pub received: u64,
    /// Distinct refused receipts stored (one evicted and received again counts again).
    pub distinct: u64,
    /// Of those, evicted to keep [`REJECTED_KEPT_PER_NODE`].
    pub evicted: u64,
}

impl RejectedCount {
    /// Rows still kept.
    pub fn kept(&self) -> u64 {
        self.distinct.saturating_sub(self.evicted)
    }
}

/// `s` cut to at most `max` characters.
pub fn capped(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// A receipt already in the ledger under some (node, epoch, sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub seq: u64,
    pub body: Vec<u8>,
    pub cost: Micros,
    /// The entry's hash, for the Ack of a resent receipt.
    pub hash: [u8; 32],
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

/// The chain head: the last entry's seq and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// A node's pending earnings and the ledger head that backs the figure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEarnings {
    pub node: String,
    /// Total cost of the node's receipts (nothing is settled inside the ledger).
    pub pending: Micros,
    pub receipts: u64,
    pub head: Option<Head>,
}
