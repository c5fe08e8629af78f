//! How Kommune runs a database, written once for the attempt store and the ledger: each
//! connection lives on a thread of its own that async callers reach through a queue, work of
//! one kind queued together commits in one transaction, and a leader epoch fences old leaders.
//!
//! Why a thread per connection: SQLite calls block for an fsync and the synchronous PostgreSQL
//! client blocks on a private runtime (it panics when used or dropped on a tokio worker). On
//! their own threads neither ever stalls the operator's tokio workers, and both backends sit
//! behind the same async boundary.

pub mod epoch;
pub mod sqlite;
mod thread;

pub use thread::{Batching, Closed, Commit, DbThread, NoBatch};
