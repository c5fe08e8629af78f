//! Kommune's persistence: the attempt store and node registry, the payout ledger's storage and
//! writer, and content-addressed blobs. SQLite on the operator's volume by default, PostgreSQL
//! by configuration. Kubernetes is not a dependency: the operator's shells call in here.

pub mod attempts;
pub mod blobs;
pub mod db;
pub mod ledger;
#[cfg(test)]
mod testing;

pub use attempts::{CapacityLimits, NodeGrant, NodeRecord, Registration, Removal, Store, StoreConfig, StoreError};
