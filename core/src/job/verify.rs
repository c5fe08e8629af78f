//! Verification of one round (the copies of one attempt number of one task): whether it is
//! still running, needs more copies, is verified (and who agreed or was outvoted), or failed.
//!
//! A round follows its job's [`RoundRule`]: it starts with `initial` copies on distinct owners
//! and is verified as soon as `quorum` of them returned the same answer (exit code and output
//! digest, which covers stdout and the declared output files). While a quorum is still
//! reachable within `max` copies, copies that failed, were lost or disagree are made up by new
//! ones on other owners; once it is not, the round fails: a failed or lost copy makes it
//! `Failed`, differing answers make it `Disagree`, both count against the task's retries; a
//! round that only lost copies to cancellation or preemption is `Void` and tried again free.
//! Under unanimity (`quorum == initial == max`, what `placement.replicas` means) this is the
//! old rule: any failure or difference fails the round at once.
//!
//! A sampled round (spot check, adaptive) starts with one copy; whether its result is checked
//! is decided by the caller after it arrived (`check`); a checked one needs two matching
//! copies, and on a mismatch a third copy breaks the tie.

use std::fmt;

use super::verification::RoundRule;
use crate::attempt::{Attempt, AttemptPhase};

/// How one round of a task stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Copies are still running and a quorum is still within reach.
    Running,
    /// This many more copies are needed now, on owners other than the round's.
    Extend(u32),
    /// Accepted: a quorum agreed, or a lone result was accepted unchecked.
    Verified(Decided),
    /// A copy failed or was lost and no quorum is reachable: counts against retries.
    Failed,
    /// Copies succeeded with different results and no quorum is reachable: counts against
    /// retries.
    Disagree(Disagreement),
    /// The round cannot complete but nobody failed (copies cancelled or preempted, or fewer
    /// copies than the job now asks for): tried again without using a retry.
    Void,
}

impl Verdict {
    /// Whether the round counts against the task's `retries.maxAttempts`.
    pub fn is_failure(&self) -> bool {
        matches!(self, Verdict::Failed | Verdict::Disagree(_))
    }
}

/// Who a verified round's answer came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decided {
    /// Attempt ids whose answers formed the quorum (empty when one result was accepted alone).
    pub agreed: Vec<String>,
    /// Attempt ids that succeeded with another answer.
    pub outvoted: Vec<String>,
    /// The attempt accepted without comparison (a lone result), if any.
    pub unverified: Option<String>,
    /// The round's answers when some were outvoted, in replica order (for status).
    pub dispute: Option<Disagreement>,
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

/// One counted output as compared: name, sha256, excess bytes.
type OutputKey<'a> = (&'a str, &'a str, u64);

/// The key answers are compared by: a missing result (None) never matches anything. Declared
/// outputs that count in verification are part of it (name, digest and excess, in name order),
/// so a copy with another output file disagrees even when its stdout is the same.
fn key(a: &Attempt) -> Option<(i32, &str, Vec<OutputKey<'_>>)> {
    a.result.as_ref().map(|r| {
        let mut outputs: Vec<OutputKey<'_>> = r.outputs.iter().filter(|o| o.counted).map(|o| (o.name.as_str(), o.sha256.as_str(), o.excess_bytes)).collect();
        outputs.sort();
        (r.exit_code, r.output_sha256.as_str(), outputs)
    })
}

/// The verdict on one round: `round` holds the copies of one task with one attempt number
/// (any order); `rule` is the job's; `check` says, for a sampled round whose lone first copy
/// succeeded, whether the operator decided to check it (ignored otherwise).
pub fn verdict(round: &[&Attempt], rule: RoundRule, check: bool) -> Verdict {
    let mut copies: Vec<&Attempt> = round.to_vec();
    copies.sort_by_key(|a| a.replica);
    let succeeded: Vec<&Attempt> = copies.iter().copied().filter(|a| a.phase == AttemptPhase::Succeeded).collect();
    if rule.sampled && copies.len() == 1 && succeeded.len() == 1 && !check {
        return Verdict::Verified(Decided { unverified: Some(succeeded[0].id.clone()), ..Default::default() });
    }
    if rule.sampled && copies.len() == 1 && succeeded.is_empty() {
        // Only a success is ever checked: a lone copy that failed or stopped is judged as
        // without verification.
        return verdict(round, RoundRule { initial: 1, quorum: 1, max: 1, sampled: false }, check);
    }
    let quorum = if rule.sampled { 2 } else { rule.quorum.max(1) } as usize;
    // A quorum that failed alike (the task crashes everywhere) fails the round at once rather
    // than growing it: the submitter's failure, not a provider's.
    let failed_alike = copies
        .iter()
        .filter(|a| a.phase == AttemptPhase::Failed)
        .filter_map(|a| a.result.as_ref().map(|r| r.exit_code))
        .map(|code| copies.iter().filter(|b| b.phase == AttemptPhase::Failed && b.result.as_ref().map(|r| r.exit_code) == Some(code)).count())
        .max()
        .unwrap_or(0);
    if quorum > 1 && failed_alike >= quorum {
        return Verdict::Failed;
    }
    // The largest group of matching answers, the first to form in replica order on a tie; a
    // copy without a result is a group of its own.
    let mut best: Vec<&Attempt> = vec![];
    for a in &succeeded {
        let group: Vec<&Attempt> = match key(a) {
            Some(k) => succeeded.iter().copied().filter(|b| key(b).as_ref() == Some(&k)).collect(),
            None => vec![a],
        };
        if group.len() > best.len() {
            best = group;
        }
    }
    if best.len() >= quorum {
        let outvoted: Vec<String> = succeeded.iter().filter(|a| !best.iter().any(|b| b.id == a.id)).map(|a| a.id.clone()).collect();
        let dispute = (!outvoted.is_empty()).then(|| disagreement(&copies, &succeeded));
        return Verdict::Verified(if best.len() == 1 {
            Decided { unverified: Some(best[0].id.clone()), outvoted, dispute, ..Default::default() }
        } else {
            Decided { agreed: best.iter().map(|a| a.id.clone()).collect(), outvoted, unverified: None, dispute }
        });
    }
    let pending = copies.iter().filter(|a| !a.phase.is_terminal()).count();
    let max = rule.max.max(rule.initial).max(quorum as u32) as usize;
    let room = max.saturating_sub(copies.len());
    if best.len() + pending + room >= quorum {
        let need = quorum - best.len() - pending.min(quorum - best.len());
        return if need > 0 { Verdict::Extend(need as u32) } else { Verdict::Running };
    }
    if copies.iter().any(|a| a.phase.is_failure()) {
        Verdict::Failed
    } else if succeeded.len() >= 2 {
        Verdict::Disagree(disagreement(&copies, &succeeded))
    } else {
        Verdict::Void
    }
}

/// Whether copies of the round that succeeded returned different answers so far.
pub fn answers_differ(round: &[&Attempt]) -> bool {
    let mut ok = round.iter().filter(|a| a.phase == AttemptPhase::Succeeded).map(|a| key(a));
    match ok.next() {
        Some(first) => ok.any(|k| k.is_none() || k != first),
        None => false,
    }
}

/// The answers of a round's succeeded copies (`copies` in replica order).
fn disagreement(copies: &[&Attempt], succeeded: &[&Attempt]) -> Disagreement {
    Disagreement { index: copies[0].index, number: copies[0].number, answers: succeeded.iter().map(|a| answer(a)).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::{AttemptResult, replica_attempt_id};
    use AttemptPhase::*;

    /// A copy on node `n<replica>` in `phase`; succeeded ones answer `(exit, digest)`.
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

    fn id(r: u32) -> String {
        replica_attempt_id("uid", 4, 2, r)
    }

    fn answers(answers: &[(u32, Option<(i32, &str)>)]) -> Disagreement {
        let answers = answers
            .iter()
            .map(|(r, a)| Answer { node: format!("n{r}"), exit_code: a.map(|a| a.0), output_sha256: a.map(|a| a.1.repeat(64)).unwrap_or_default() })
            .collect();
        Disagreement { index: 4, number: 2, answers }
    }

    fn disagreement(a: &[(u32, Option<(i32, &str)>)]) -> Verdict {
        Verdict::Disagree(answers(a))
    }

    /// Verified by `agreed` copies (or, with one, accepted alone), outvoting `outvoted`.
    fn verified(agreed: &[u32], outvoted: &[u32], dispute: Option<Disagreement>) -> Verdict {
        let (agreed, unverified) = match agreed {
            [one] => (vec![], Some(id(*one))),
            many => (many.iter().map(|r| id(*r)).collect(), None),
        };
        Verdict::Verified(Decided { agreed, outvoted: outvoted.iter().map(|r| id(*r)).collect(), unverified, dispute })
    }

    fn unanimity(r: u32) -> RoundRule {
        RoundRule { initial: r, quorum: r, max: r, sampled: false }
    }

    fn judge(cases: Vec<(&str, Vec<Attempt>, RoundRule, bool, Verdict)>) {
        for (name, round, rule, check, expected) in cases {
            let refs: Vec<&Attempt> = round.iter().collect();
            assert_eq!(verdict(&refs, rule, check), expected, "{name}");
            let mut reversed = refs.clone();
            reversed.reverse();
            assert_eq!(verdict(&reversed, rule, check), expected, "{name}, copies in another order");
        }
    }

    /// A copy answering stdout `a` with one output file of digest `file` (counted or not).
    fn with_output(r: u32, file: &str, counted: bool) -> Attempt {
        let mut a = ok(r, "a");
        let output = crate::attempt::OutputDigest { name: "out/result.txt".into(), size: 3, sha256: file.repeat(64), excess_bytes: 0, counted };
        a.result.as_mut().unwrap().outputs = vec![output];
        a
    }

    #[test]
    fn counted_output_files_are_part_of_the_answer_and_uncounted_ones_are_not() {
        let majority = RoundRule { initial: 3, quorum: 2, max: 3, sampled: false };
        let liar = with_output(2, "f", true);
        let refs = [&with_output(0, "e", true), &with_output(1, "e", true), &liar];
        let Verdict::Verified(d) = verdict(&refs, majority, true) else { panic!("two honest copies agree") };
        assert_eq!((d.agreed, d.outvoted), (vec![id(0), id(1)], vec![id(2)]), "a liar with the same stdout but another file is outvoted");
        let refs = [&with_output(0, "e", false), &with_output(1, "f", false)];
        assert_eq!(verdict(&refs, unanimity(2), true), verified(&[0, 1], &[], None), "a file that does not count may differ");
        let refs = [&with_output(0, "e", true), &ok(1, "a")];
        assert!(matches!(verdict(&refs, unanimity(2), true), Verdict::Disagree(_)), "a counted file left out disagrees");
    }

    #[test]
    fn under_unanimity_rounds_are_judged_by_every_replica() {
        let u = unanimity;
        judge(vec![
            ("one replica that succeeded", vec![ok(0, "a")], u(1), true, verified(&[0], &[], None)),
            ("one replica without a readable result", vec![replica(0, Succeeded, None)], u(1), true, verified(&[0], &[], None)),
            ("all agree", vec![ok(0, "a"), ok(1, "a"), ok(2, "a")], u(3), true, verified(&[0, 1, 2], &[], None)),
            ("one disagrees", vec![ok(0, "a"), ok(1, "b")], u(2), true, disagreement(&[(0, Some((0, "a"))), (1, Some((0, "b")))])),
            (
                "two of three agree: no majority vote under unanimity",
                vec![ok(0, "a"), ok(1, "a"), ok(2, "b")],
                u(3),
                true,
                disagreement(&[(0, Some((0, "a"))), (1, Some((0, "a"))), (2, Some((0, "b")))]),
            ),
            (
                "same output, other exit code",
                vec![ok(0, "a"), replica(1, Succeeded, Some((3, "a")))],
                u(2),
                true,
                disagreement(&[(0, Some((0, "a"))), (1, Some((3, "a")))]),
            ),
            ("a missing result cannot agree", vec![ok(0, "a"), replica(1, Succeeded, None)], u(2), true, disagreement(&[(0, Some((0, "a"))), (1, None)])),
            (
                "two differ while the third still runs: decided at once",
                vec![ok(0, "a"), ok(1, "b"), replica(2, Running, None)],
                u(3),
                true,
                disagreement(&[(0, Some((0, "a"))), (1, Some((0, "b")))]),
            ),
            ("agreeing so far, one still running", vec![ok(0, "a"), replica(1, Running, None)], u(2), true, Verdict::Running),
            ("all assigned", vec![replica(0, Assigned, None), replica(1, Assigned, None)], u(2), true, Verdict::Running),
            ("one failed", vec![ok(0, "a"), replica(1, Failed, Some((1, "a")))], u(2), true, Verdict::Failed),
            ("one lost while the other runs", vec![replica(0, Running, None), replica(1, Lost, None)], u(2), true, Verdict::Failed),
            ("a failure outweighs a disagreement", vec![ok(0, "a"), ok(1, "b"), replica(2, Failed, None)], u(3), true, Verdict::Failed),
            ("one cancelled (preempted), the other agreeing", vec![ok(0, "a"), replica(1, Cancelled, None)], u(2), true, Verdict::Void),
            ("one cancelled, the other running", vec![replica(0, Running, None), replica(1, Cancelled, None)], u(2), true, Verdict::Void),
            // Changed by issue 16: the round is topped up instead of started over.
            ("fewer replicas than asked (replicas raised)", vec![ok(0, "a"), ok(1, "a")], u(3), true, Verdict::Extend(1)),
        ]);
    }

    #[test]
    fn under_a_quorum_the_first_matching_results_win_and_more_copies_break_ties() {
        let q = |initial, quorum, max| RoundRule { initial, quorum, max, sampled: false };
        let ab = answers(&[(0, Some((0, "a"))), (1, Some((0, "b"))), (2, Some((0, "a")))]);
        judge(vec![
            ("two of three agree", vec![ok(0, "a"), ok(1, "a"), replica(2, Running, None)], q(3, 2, 5), true, verified(&[0, 1], &[], None)),
            ("two of three agree, the third outvoted", vec![ok(0, "a"), ok(1, "b"), ok(2, "a")], q(3, 2, 5), true, verified(&[0, 2], &[1], Some(ab.clone()))),
            ("a tie with nothing running: one more copy", vec![ok(0, "a"), ok(1, "b")], q(2, 2, 3), true, Verdict::Extend(1)),
            ("a tie with a copy running: wait for it", vec![ok(0, "a"), ok(1, "b"), replica(2, Running, None)], q(2, 2, 3), true, Verdict::Running),
            ("a lost copy is made up", vec![ok(0, "a"), replica(1, Lost, None)], q(2, 2, 3), true, Verdict::Extend(1)),
            ("a preempted copy is made up", vec![ok(0, "a"), replica(1, Preempted, None)], q(2, 2, 3), true, Verdict::Extend(1)),
            (
                "three different answers and no room: disagreement",
                vec![ok(0, "a"), ok(1, "b"), ok(2, "c")],
                q(2, 2, 3),
                true,
                disagreement(&[(0, Some((0, "a"))), (1, Some((0, "b"))), (2, Some((0, "c")))]),
            ),
            ("two copies lost, no room", vec![ok(0, "a"), replica(1, Lost, None), replica(2, Failed, None)], q(2, 2, 3), true, Verdict::Failed),
            (
                "a quorum failed alike: the task crashes, no more copies",
                vec![replica(0, Failed, Some((2, ""))), replica(1, Failed, Some((2, ""))), replica(2, Running, None)],
                q(3, 2, 5),
                true,
                Verdict::Failed,
            ),
            ("one crash alone is made up", vec![replica(0, Failed, Some((2, ""))), ok(1, "a")], q(2, 2, 5), true, Verdict::Extend(1)),
            ("two need two more at once", vec![replica(0, Lost, None), replica(1, Lost, None)], q(2, 2, 4), true, Verdict::Extend(2)),
            ("a missing result never forms a quorum", vec![replica(0, Succeeded, None), replica(1, Succeeded, None)], q(2, 2, 3), true, Verdict::Extend(1)),
        ]);
    }

    #[test]
    fn a_sampled_result_is_accepted_unchecked_or_checked_by_a_second_owner_and_a_third_breaks_the_tie() {
        let s = RoundRule { initial: 1, quorum: 2, max: 3, sampled: true };
        let tie = answers(&[(0, Some((0, "a"))), (1, Some((0, "b"))), (2, Some((0, "b")))]);
        judge(vec![
            ("running", vec![replica(0, Running, None)], s, true, Verdict::Running),
            ("not chosen: accepted unchecked", vec![ok(0, "a")], s, false, verified(&[0], &[], None)),
            ("chosen: a second copy", vec![ok(0, "a")], s, true, Verdict::Extend(1)),
            ("the check agrees", vec![ok(0, "a"), ok(1, "a")], s, true, verified(&[0, 1], &[], None)),
            ("the check agrees, whatever was decided", vec![ok(0, "a"), ok(1, "a")], s, false, verified(&[0, 1], &[], None)),
            ("the check disagrees: a third copy", vec![ok(0, "a"), ok(1, "b")], s, true, Verdict::Extend(1)),
            ("the third sides with the check: the first is outvoted", vec![ok(0, "a"), ok(1, "b"), ok(2, "b")], s, true, verified(&[1, 2], &[0], Some(tie))),
            ("the first copy failed: a failure as without verification", vec![replica(0, Failed, Some((1, "a")))], s, true, Verdict::Failed),
            ("the first copy was preempted", vec![replica(0, Preempted, None)], s, true, Verdict::Void),
        ]);
    }

    #[test]
    fn only_failures_and_disagreements_use_up_retries() {
        assert!(Verdict::Failed.is_failure() && disagreement(&[]).is_failure());
        assert!(!Verdict::Void.is_failure() && !Verdict::Running.is_failure() && !Verdict::Extend(1).is_failure());
        assert!(!verified(&[0], &[], None).is_failure());
    }

    #[test]
    fn a_disagreement_names_the_task_the_round_and_every_node_with_its_answer() {
        let Verdict::Disagree(d) = verdict(&[&ok(0, "a"), &replica(1, Succeeded, None), &replica(2, Succeeded, Some((2, "")))], unanimity(3), true) else {
            panic!()
        };
        assert_eq!(
            d.to_string(),
            "the replicas of task 4 (attempt 2) returned different results: node n0 exit 0 output aaaaaaaaaaaa, node n1 no result, node n2 exit 2 output none"
        );
    }
}
