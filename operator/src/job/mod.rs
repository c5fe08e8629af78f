//! The ComputeJob state machine, as plain functions over plain data: `validate` turns a spec
//! into a `JobPolicy` or says what is wrong; `progress` turns the job's attempts into what to
//! place next, what to cancel and the summary that becomes status.

pub mod data;
pub mod recorded;
pub mod secret_env;
pub mod status;
pub mod validate;

pub use kommune_core::job::Recorded;
pub use kommune_core::job::{conduct, indexes, progress, verify};
pub use progress::Progress;
pub use validate::{Invalid, JobPolicy, ModuleSource, PlacementPolicy, TaskWorkload, validate};
