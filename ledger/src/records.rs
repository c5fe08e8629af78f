//! The plain records the ledger reads and writes, shared by the operator's storage backends,
//! the agent and an auditor: refused receipts, job usage, the chain head, a node's earnings.

use crate::entry::UsageFigures;
use kommune_core::pricing::Micros;

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
