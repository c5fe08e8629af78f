//! The ComputeJob state machine as plain functions over plain data: `policy` is a validated
//! job, `progress` turns its attempts into what to place next, what to cancel and a summary.

pub mod conduct;
pub mod data;
pub mod indexes;
pub mod phase;
pub mod policy;
pub mod progress;
pub mod recorded;
pub mod verification;
pub mod verify;

pub use data::{InputDigest, InputSource, JobInput, S3Credentials, S3Object};
pub use phase::{JobPhase, TaskCounts};
pub use policy::{JobPolicy, ModuleSource, PlacementPolicy, TaskWorkload};
pub use progress::{Progress, progress};
pub use recorded::Recorded;
