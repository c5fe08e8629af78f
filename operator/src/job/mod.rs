//! The ComputeJob state machine, as plain functions over plain data: `validate` turns a spec
//! into a `JobPolicy` or says what is wrong; `progress` turns the job's attempts into what to
//! place next, what to cancel and the summary that becomes status.

pub mod indexes;
pub mod progress;
pub mod status;
pub mod validate;
pub mod verify;

pub use progress::{Progress, progress};
pub use validate::{Invalid, JobPolicy, ModuleSource, PlacementPolicy, TaskWorkload, validate};
