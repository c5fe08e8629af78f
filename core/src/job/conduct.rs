//! How the nodes that ran a job's tasks behaved towards it: a node that preempts or loses its
//! tasks again and again is not given more of them. Pure.
//!
//! A preempted attempt is placed again without using a retry (the provider needed its
//! machine), and a lost one uses a retry of its task; neither bounds how often one node may do
//! it to one job. Without a bound, a node that reports PREEMPTED for every assignment keeps a
//! task from ever finishing while each of its copies is metered.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use crate::attempt::{Attempt, AttemptPhase};

/// Preemptions and losses of one job's attempts one node may have before the job stops
/// placing tasks there. Honest providers rarely reach it: a machine that is often needed by
/// its owner is paused, and placement already prefers others.
pub const MAX_INTERRUPTIONS_PER_NODE: u32 = 3;

/// Whether an attempt ended in a way its node is answerable for.
fn interrupted(phase: AttemptPhase) -> bool {
    matches!(phase, AttemptPhase::Preempted | AttemptPhase::Lost)
}

/// The nodes that preempted or lost at least `limit` of the job's attempts, sorted: the job's
/// placement avoids them (`scheduler::Request::avoid`).
pub fn avoided_nodes<A: Borrow<Attempt>>(attempts: &[A], limit: u32) -> Vec<String> {
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    for a in attempts.iter().map(Borrow::borrow).filter(|a| interrupted(a.phase)) {
        *counts.entry(a.node.as_str()).or_default() += 1;
    }
    counts.into_iter().filter(|(_, n)| *n >= limit.max(1)).map(|(node, _)| node.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttemptPhase::*;

    fn on(node: &str, phase: AttemptPhase, n: u32) -> Attempt {
        Attempt {
            id: format!("u.0.{n}"),
            job_uid: "u".into(),
            job_key: "ns/j".into(),
            index: 0,
            number: n,
            replica: 0,
            node: node.into(),
            phase,
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            held: None,
            created_ms: 0,
            finished_ms: phase.is_terminal().then_some(1),
            result: None,
        }
    }

    #[test]
    fn a_node_is_avoided_once_it_preempted_or_lost_the_limit_and_not_before() {
        let mut a = vec![on("bad", Preempted, 1), on("bad", Preempted, 2), on("ok", Succeeded, 3)];
        assert!(avoided_nodes(&a, 3).is_empty(), "two interruptions are below the limit");
        a.push(on("bad", Lost, 4));
        assert_eq!(avoided_nodes(&a, 3), vec!["bad".to_string()], "preemptions and losses add up");
    }

    #[test]
    fn only_what_the_node_did_counts() {
        // Cancelled (by the operator or the submitter), failed (the task's own exit) and
        // succeeded attempts never count against the node.
        let phases = [Assigned, Running, Succeeded, Failed, Cancelled, Preempted, Lost];
        for p in phases {
            let a: Vec<Attempt> = (1..=5).map(|n| on("n", p, n)).collect();
            let avoided = !avoided_nodes(&a, 3).is_empty();
            assert_eq!(avoided, matches!(p, Preempted | Lost), "{p:?}");
        }
    }

    #[test]
    fn nodes_are_counted_separately_and_returned_sorted() {
        let mut a = vec![];
        for (i, node) in ["z", "a", "m"].iter().enumerate() {
            for n in 0..3 {
                a.push(on(node, Preempted, (i * 3 + n) as u32));
            }
        }
        a.push(on("b", Preempted, 99));
        assert_eq!(avoided_nodes(&a, 3), vec!["a", "m", "z"]);
        assert_eq!(avoided_nodes(&a, 0), vec!["a", "b", "m", "z"], "a limit of 0 acts as 1");
    }
}
