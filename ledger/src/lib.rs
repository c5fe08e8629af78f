//! The payout ledger's format and rules: one entry's bytes and hash, the chain and its signed
//! checkpoints, the checks a receipt passes before it is appended, and whole-chain verification.
//! The operator's storage, the agent and an auditor all use it; it does no I/O of its own.

pub mod book;
pub mod chain;
pub mod check;
pub mod entry;
pub mod export;
pub mod job_totals;
pub mod payout;
#[cfg(test)]
mod payout_tests;
pub mod records;
pub mod statement_file;
pub mod verify;

pub use chain::Verdict;
pub use records::{EntryFilter, Existing, Head, JobUsage, NodeEarnings, RejectedCount, RejectedReceipt};
