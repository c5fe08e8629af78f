//! Kommune's domain core: task attempts, the job state machine and result verification,
//! placement, pricing and the write fence, as plain types and functions with time passed in.
//! No Kubernetes, database or network crate is a dependency, so the compiler keeps it pure.

pub mod attempt;
pub mod attempt_index;
pub mod bounds;
pub mod fence;
pub mod job;
pub mod pricing;
pub mod reputation;
pub mod scheduler;
