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
    /// Stopped by its provider (the machine was needed, paused or shutting down): placed again
    /// without using a retry, but counted against the node for this job (see
    /// [`crate::job::conduct`]), so a node cannot keep a task from finishing this way.
    Preempted,
    /// The node no longer knows it (it reconnected without it); counts as a failure.
    Lost,
}

impl AttemptPhase {
    pub fn is_terminal(self) -> bool {
        !matches!(self, AttemptPhase::Assigned | AttemptPhase::Running)
    }

    /// Stopped before it could finish, by the operator or the provider: its round is void and
    /// placed again without using a retry.
    pub fn is_stopped(self) -> bool {
        matches!(self, AttemptPhase::Cancelled | AttemptPhase::Preempted)
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
            AttemptPhase::Preempted => "Preempted",
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
            "Preempted" => AttemptPhase::Preempted,
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
    /// The attempt's collected outputs (`spec.outputs`), sizes and digests as the operator
    /// observed them when it stored them itself; empty for a job without outputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputDigest>,
}

/// One collected output of an attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDigest {
    /// `stdout`, `stderr` or `out/<path>`.
    pub name: String,
    /// Bytes stored.
    pub size: u64,
    /// Lower-case hex sha256 of the stored bytes.
    pub sha256: String,
    /// Bytes beyond the limits that were not stored.
    pub excess_bytes: u64,
    /// Whether it counts in verification (set by the operator from `spec.outputs.verify`,
    /// never by the agent).
    #[serde(default)]
    pub counted: bool,
}

/// One try at one task: with replicas, one of the round's copies (all copies of a round share
/// `index` and `number` and differ in `replica`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// `<job uid>.<index>.<number>` (replica 0) or `<job uid>.<index>.<number>.r<replica>`:
    /// unique and stable (see [`replica_attempt_id`]).
    pub id: String,
    pub job_uid: String,
    /// "namespace/name" of the job.
    pub job_key: String,
    pub index: u32,
    /// 1 for the first attempt (round) of an index.
    pub number: u32,
    /// Which copy of the round this is, 0..replicas.
    pub replica: u32,
    pub node: String,
    pub phase: AttemptPhase,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// What the attempt holds on its node beyond cpu and memory, so reservations rebuilt
    /// after a restart are exact. None for attempts recorded by an operator older than that
    /// record: their disk and GPUs are filled in from the job's policy on its next sync.
    pub held: Option<Held>,
    /// Unix milliseconds.
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub result: Option<AttemptResult>,
}

/// Scratch disk and GPU devices an attempt holds on its node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub ephemeral_bytes: u64,
    /// The node's GPU devices it holds, one bit per device in the scheduler pool's order.
    pub gpu_mask: u64,
}

/// The id of attempt `number` of task `index` of the job with `job_uid` (its replica 0).
pub fn attempt_id(job_uid: &str, index: u32, number: u32) -> String {
    format!("{job_uid}.{index}.{number}")
}

/// The id of replica `replica` of attempt `number` of task `index`. Replica 0 keeps the plain
/// [`attempt_id`], so ids of jobs without replicas (and of agents and ledgers that know them)
/// do not change; the others get a `.r<replica>` suffix. Ids stay within the characters agents
/// accept for spool file names (alphanumerics, `.`, `-`, `_`).
pub fn replica_attempt_id(job_uid: &str, index: u32, number: u32, replica: u32) -> String {
    match replica {
        0 => attempt_id(job_uid, index, number),
        k => format!("{job_uid}.{index}.{number}.r{k}"),
    }
}

/// The parts of an attempt id ([`replica_attempt_id`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptIdParts<'a> {
    pub job_uid: &'a str,
    pub index: u32,
    pub number: u32,
    pub replica: u32,
}

/// Reads an attempt id back into its parts; None for anything that is not one.
pub fn parse_attempt_id(id: &str) -> Option<AttemptIdParts<'_>> {
    let mut parts = id.split('.');
    let job_uid = parts.next().filter(|u| !u.is_empty())?;
    let index = parts.next()?.parse().ok()?;
    let number = parts.next()?.parse().ok()?;
    let replica = match parts.next() {
        None => 0,
        Some(r) => r.strip_prefix('r')?.parse().ok().filter(|r| *r > 0)?,
    };
    parts.next().is_none().then_some(AttemptIdParts { job_uid, index, number, replica })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_classify() {
        use AttemptPhase::*;
        for p in [Assigned, Running, Succeeded, Failed, Cancelled, Preempted, Lost] {
            assert_eq!(AttemptPhase::parse(p.as_str()), Some(p));
        }
        assert_eq!(AttemptPhase::parse("running"), None);
        assert!(!Assigned.is_terminal() && !Running.is_terminal());
        assert!(Succeeded.is_terminal() && Failed.is_terminal() && Cancelled.is_terminal() && Lost.is_terminal());
        assert!(Failed.is_failure() && Lost.is_failure());
        assert!(!Cancelled.is_failure() && !Succeeded.is_failure() && !Preempted.is_failure());
        assert!(Preempted.is_terminal() && Preempted.is_stopped());
    }

    #[test]
    fn replica_zero_keeps_the_plain_id_and_other_replicas_get_distinct_ones() {
        assert_eq!(replica_attempt_id("u-1", 3, 2, 0), "u-1.3.2");
        assert_eq!(replica_attempt_id("u-1", 3, 2, 1), "u-1.3.2.r1");
        assert_eq!(replica_attempt_id("u-1", 3, 2, 15), "u-1.3.2.r15");
        let ids: std::collections::HashSet<String> =
            (0..3).flat_map(|i| (1..3).flat_map(move |n| (0..4).map(move |r| replica_attempt_id("u", i, n, r)))).collect();
        assert_eq!(ids.len(), 3 * 2 * 4, "every (index, number, replica) has its own id");
    }
}
