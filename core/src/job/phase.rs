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

/// How a job's finished tasks were verified (`spec.verification`), and what it cost.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerificationCounts {
    /// Succeeded tasks whose result a quorum of copies on distinct owners agreed on.
    pub verified: u32,
    /// Succeeded tasks whose result was accepted without comparison (mode none, or not chosen
    /// by a spot check or adaptive replication).
    pub unverified: u32,
    /// Tasks where copies returned different results (outvoted, or no quorum yet or ever).
    pub disputed: u32,
    /// Copies run beyond the first of each round: the verification overhead, in attempts.
    pub extra_attempts: u64,
}
