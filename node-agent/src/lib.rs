//! The Kommune node agent: joins a Kommune pool, dials out to the operator over mTLS, runs the
//! tasks it is assigned in a sandbox (`runtime`) and reports their results until acknowledged.

pub mod connect;
pub mod inventory;
pub mod join;
pub mod leave;
pub mod receipts;
pub mod runtime;
pub mod session;
pub mod state;
pub mod status;
pub mod tasks;
