//! The Kommune node agent: joins a Kommune pool, dials out to the operator over mTLS, runs the
//! tasks it is assigned in a sandbox (`runtime`) and reports their results until acknowledged.
//! The provider stays in control: caps (`inventory`), time windows (`schedule`) and idle-only
//! mode (`idle`) decide when and how much the machine is lent (`availability`).

pub mod account;
pub mod availability;
pub mod cli;
pub mod config;
pub mod connect;
pub mod earnings;
pub mod fetch;
pub mod gpu;
pub mod idle;
pub mod inventory;
pub mod join;
pub mod leave;
pub mod metrics;
pub mod receipts;
pub mod renew;
pub mod runtime;
pub mod schedule;
pub mod session;
pub mod spool;
pub mod state;
pub mod status;
pub mod tasks;
