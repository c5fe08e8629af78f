//! Task attempts: one try at running one task index of one job on one node. Attempts live in
//! the operator's store, not in etcd; their ids are stable so every message about them is
//! idempotent.

use serde::{Deserialize, Serialize};

/// Where an attempt is in its life. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttemptPhase {
    /// Recorded and sent to the node; not yet confirmed running.
    Assigned,
    /// The agent reported it running.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, trapped, timed out or could not start.
    Failed,
    /// Stopped by the operator (job deleted, failed or past its deadline).
    Cancelled,
    /// The node no longer knows it (it reconnected without it); counts as a failure.
    Lost,
}

impl AttemptPhase {
    pub fn is_terminal(self) -> bool {
        !matches!(self, AttemptPhase::Assigned | AttemptPhase::Running)
    }

    /// Counts against the task's `retries.maxAttempts`.
    pub fn is_failure(self) -> bool {
        matches!(self, AttemptPhase::Failed | AttemptPhase::Lost)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptPhase::Assigned => "Assigned",
            AttemptPhase::Running => "Running",
            AttemptPhase::Succeeded => "Succeeded",
            AttemptPhase::Failed => "Failed",
            AttemptPhase::Cancelled => "Cancelled",
            AttemptPhase::Lost => "Lost",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Assigned" => AttemptPhase::Assigned,
            "Running" => AttemptPhase::Running,
            "Succeeded" => AttemptPhase::Succeeded,
            "Failed" => AttemptPhase::Failed,
            "Cancelled" => AttemptPhase::Cancelled,
            "Lost" => AttemptPhase::Lost,
            _ => return None,
        })
    }
}

/// What a finished attempt produced, as reported by the agent (bounded by the gateway).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptResult {
    pub exit_code: i32,
    pub output_sha256: String,
    pub output_bytes: u64,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
    pub message: String,
    pub wall_millis: u64,
}

/// One try at one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// `<job uid>.<index>.<number>`: unique and stable.
    pub id: String,
    pub job_uid: String,
    /// "namespace/name" of the job.
    pub job_key: String,
    pub index: u32,
    /// 1 for the first attempt of an index.
    pub number: u32,
    pub node: String,
    pub phase: AttemptPhase,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Unix milliseconds.
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub result: Option<AttemptResult>,
}

/// The id of attempt `number` of task `index` of the job with `job_uid`.
pub fn attempt_id(job_uid: &str, index: u32, number: u32) -> String {
    format!("{job_uid}.{index}.{number}")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_classify() {
        use AttemptPhase::*;
        for p in [Assigned, Running, Succeeded, Failed, Cancelled, Lost] {
            assert_eq!(AttemptPhase::parse(p.as_str()), Some(p));
        }
        assert_eq!(AttemptPhase::parse("running"), None);
        assert!(!Assigned.is_terminal() && !Running.is_terminal());
        assert!(Succeeded.is_terminal() && Failed.is_terminal() && Cancelled.is_terminal() && Lost.is_terminal());
        assert!(Failed.is_failure() && Lost.is_failure());
        assert!(!Cancelled.is_failure() && !Succeeded.is_failure());
    }
}
