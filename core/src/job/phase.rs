//! A job's phase and task counts: plain data the state machine computes and the ComputeJob
//! status shows as is (so they carry serde and schema derives, but nothing of Kubernetes).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum JobPhase {
    /// Accepted; no task has been placed yet.
    Pending,
    /// At least one task is placed or finished, and the job is not done.
    Running,
    /// Every task succeeded.
    Succeeded,
    /// A task used up its attempts, the deadline passed, or the spec is invalid.
    Failed,
}

/// Number of tasks in each state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskCounts {
    /// All tasks of the job.
    pub total: u32,
    /// Not placed yet (including those waiting to retry).
    pub pending: u32,
    /// Placed on a provider and not finished.
    pub running: u32,
    /// Finished successfully.
    pub succeeded: u32,
    /// Used up their attempts.
    pub failed: u32,
}
