//! Verification of replicated tasks: whether one round (the replicas of one attempt number of
//! one task) is still running, verified, void, or a failure, and why. Pure.
//!
//! A round is verified only when every replica succeeded with the same exit code and output
//! digest. There is no majority vote: replicas run on distinct owners so that no single party
//! can forge a result, and with two of three agreeing we cannot tell a cheat from a
//! non-deterministic task, so any disagreement fails the round and the task is tried again.

use std::fmt;

use crate::attempt::{Attempt, AttemptPhase};

/// How one round of a task stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Replicas are still running and nothing has gone wrong yet.
    Running,
    /// Every replica succeeded and their results agree.
    Verified,
    /// A replica failed or was lost: a failure of the task (counts against its retries).
    Failed,
    /// Replicas succeeded with different results: a failure of the task (counts against its
    /// retries). Decided as soon as two finished replicas differ.
    Disagree(Disagreement),
    /// The round cannot complete but nobody failed: a replica was cancelled or preempted, or
    /// fewer replicas ran than the job now asks for. Tried again without using a retry.
    Void,
}

impl Verdict {
    /// Whether the round counts against the task's `retries.maxAttempts`.
    pub fn is_failure(&self) -> bool {
        matches!(self, Verdict::Failed | Verdict::Disagree(_))
    }
}

/// One replica's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub node: String,
    /// None when the store holds no readable result for it.
    pub exit_code: Option<i32>,
    pub output_sha256: String,
}

/// The replicas of one round that returned different results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    pub index: u32,
    /// The attempt number of the round.
    pub number: u32,
    /// The answers of the replicas that succeeded, in replica order.
    pub answers: Vec<Answer>,
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the replicas of task {} (attempt {}) returned different results: ", self.index, self.number)?;
        for (i, a) in self.answers.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let digest: String = a.output_sha256.chars().take(12).collect();
            let digest = if digest.is_empty() { "none".to_string() } else { digest };
            match a.exit_code {
                Some(code) => write!(f, "{sep}node {} exit {code} output {digest}", a.node)?,
                None => write!(f, "{sep}node {} no result", a.node)?,
            }
        }
        Ok(())
    }
}

fn answer(a: &Attempt) -> Answer {
    let r = a.result.as_ref();
    Answer { node: a.node.clone(), exit_code: r.map(|r| r.exit_code), output_sha256: r.map(|r| r.output_sha256.clone()).unwrap_or_default() }
}

/// The verdict on one round: `round` holds the attempts of one task with one attempt number
/// (any order), `replicas` is how many the job asks for (0 is taken as 1).
pub fn verdict(round: &[&Attempt], replicas: u32) -> Verdict {
    if round.iter().any(|a| a.phase.is_failure()) {
        return Verdict::Failed;
    }
    let mut succeeded: Vec<&Attempt> = round.iter().copied().filter(|a| a.phase == AttemptPhase::Succeeded).collect();
    if let Some((first, rest)) = succeeded.split_first() {
        let agreed = |a: &Answer, b: &Answer| a.exit_code.is_some() && a.exit_code == b.exit_code && a.output_sha256 == b.output_sha256;
        let first = answer(first);
        // One replica alone has nothing to agree with; a missing result cannot be compared.
        if !rest.is_empty() && rest.iter().any(|a| !agreed(&first, &answer(a))) {
            succeeded.sort_by_key(|a| a.replica);
            let (index, number) = (round[0].index, round[0].number);
            return Verdict::Disagree(Disagreement { index, number, answers: succeeded.iter().map(|a| answer(a)).collect() });
        }
    }
    if round.iter().any(|a| a.phase.is_stopped()) {
        Verdict::Void
    } else if round.iter().any(|a| !a.phase.is_terminal()) {
        Verdict::Running
    } else if succeeded.len() >= replicas.max(1) as usize {
        Verdict::Verified
    } else {
        Verdict::Void
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::{AttemptResult, replica_attempt_id};
    use AttemptPhase::*;

    /// A replica on node `n<replica>` in `phase`; succeeded ones answer `(exit, digest)`.
    fn replica(replica: u32, phase: AttemptPhase, answer: Option<(i32, &str)>) -> Attempt {
        Attempt {
            id: replica_attempt_id("uid", 4, 2, replica),
            job_uid: "uid".into(),
            job_key: "ns/job".into(),
            index: 4,
            number: 2,
            replica,
            node: format!("n{replica}"),
            phase,
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            held: None,
            created_ms: 0,
            finished_ms: phase.is_terminal().then_some(10),
            result: answer.map(|(exit_code, d)| AttemptResult { exit_code, output_sha256: d.repeat(64), ..Default::default() }),
        }
    }

    fn ok(r: u32, digest: &str) -> Attempt {
        replica(r, Succeeded, Some((0, digest)))
    }

    fn disagreement(answers: &[(u32, Option<(i32, &str)>)]) -> Verdict {
        let answers = answers
            .iter()
            .map(|(r, a)| Answer { node: format!("n{r}"), exit_code: a.map(|a| a.0), output_sha256: a.map(|a| a.1.repeat(64)).unwrap_or_default() })
            .collect();
        Verdict::Disagree(Disagreement { index: 4, number: 2, answers })
    }

    #[test]
    fn rounds_are_judged_by_every_replica_and_only_unanimity_verifies() {
        let cases: Vec<(&str, Vec<Attempt>, u32, Verdict)> = vec![
            ("one replica that succeeded", vec![ok(0, "a")], 1, Verdict::Verified),
            ("one replica without a readable result", vec![replica(0, Succeeded, None)], 1, Verdict::Verified),
            ("all agree", vec![ok(0, "a"), ok(1, "a"), ok(2, "a")], 3, Verdict::Verified),
            ("one disagrees", vec![ok(0, "a"), ok(1, "b")], 2, disagreement(&[(0, Some((0, "a"))), (1, Some((0, "b")))])),
            (
                "two of three agree: no majority vote",
                vec![ok(0, "a"), ok(1, "a"), ok(2, "b")],
                3,
                disagreement(&[(0, Some((0, "a"))), (1, Some((0, "a"))), (2, Some((0, "b")))]),
            ),
            (
                "same output, other exit code",
                vec![ok(0, "a"), replica(1, Succeeded, Some((3, "a")))],
                2,
                disagreement(&[(0, Some((0, "a"))), (1, Some((3, "a")))]),
            ),
            ("a missing result cannot agree", vec![ok(0, "a"), replica(1, Succeeded, None)], 2, disagreement(&[(0, Some((0, "a"))), (1, None)])),
            (
                "two differ while the third still runs: decided at once",
                vec![ok(0, "a"), ok(1, "b"), replica(2, Running, None)],
                3,
                disagreement(&[(0, Some((0, "a"))), (1, Some((0, "b")))]),
            ),
            ("agreeing so far, one still running", vec![ok(0, "a"), replica(1, Running, None)], 2, Verdict::Running),
            ("all assigned", vec![replica(0, Assigned, None), replica(1, Assigned, None)], 2, Verdict::Running),
            ("one failed", vec![ok(0, "a"), replica(1, Failed, Some((1, "a")))], 2, Verdict::Failed),
            ("one lost while the other runs", vec![replica(0, Running, None), replica(1, Lost, None)], 2, Verdict::Failed),
            ("a failure outweighs a disagreement", vec![ok(0, "a"), ok(1, "b"), replica(2, Failed, None)], 3, Verdict::Failed),
            ("one cancelled (preempted), the other agreeing", vec![ok(0, "a"), replica(1, Cancelled, None)], 2, Verdict::Void),
            ("one cancelled, the other running", vec![replica(0, Running, None), replica(1, Cancelled, None)], 2, Verdict::Void),
            ("fewer replicas than asked (replicas raised)", vec![ok(0, "a"), ok(1, "a")], 3, Verdict::Void),
        ];
        for (name, round, replicas, expected) in cases {
            let refs: Vec<&Attempt> = round.iter().collect();
            assert_eq!(verdict(&refs, replicas), expected, "{name}");
            let mut reversed = refs.clone();
            reversed.reverse();
            assert_eq!(verdict(&reversed, replicas), expected, "{name}, replicas in another order");
        }
    }

    #[test]
    fn only_failures_and_disagreements_use_up_retries() {
        assert!(Verdict::Failed.is_failure() && disagreement(&[]).is_failure());
        assert!(!Verdict::Void.is_failure() && !Verdict::Running.is_failure() && !Verdict::Verified.is_failure());
    }

    #[test]
    fn a_disagreement_names_the_task_the_round_and_every_node_with_its_answer() {
        let Verdict::Disagree(d) = verdict(&[&ok(0, "a"), &replica(1, Succeeded, None), &replica(2, Succeeded, Some((2, "")))], 3) else { panic!() };
        assert_eq!(
            d.to_string(),
            "the replicas of task 4 (attempt 2) returned different results: node n0 exit 0 output aaaaaaaaaaaa, node n1 no result, node n2 exit 2 output none"
        );
    }
}
