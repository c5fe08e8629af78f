//! Why a task could not be placed, in words a user acts on: "0/120 nodes can run it: 87 no
//! GPU matching a100*, 33 reputation below 0.8". Reasons are counted per node (one reason
//! each) and listed most common first, as the first thing to fix.

use std::collections::BTreeMap;
use std::fmt;

use super::{Exclusion, Request};

/// Why a task could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Nodes the scheduler knows (connected, or gone within the grace period).
    pub total: usize,
    /// Nodes excluded, by reason.
    pub excluded: BTreeMap<Exclusion, usize>,
    pub request: Request,
    /// When replicas must land on distinct owners: how many distinct owners the fitting nodes
    /// belong to (fewer than the replicas asked for).
    pub owners: Option<usize>,
    /// Tasks of jobs ahead in the fair-share queue whose room was kept free.
    pub held_for_others: usize,
}

impl Explanation {
    /// An explanation with no node excluded yet.
    pub fn new(total: usize, request: &Request) -> Explanation {
        Explanation { total, excluded: BTreeMap::new(), request: request.clone(), owners: None, held_for_others: 0 }
    }

    /// Nodes that could take the task (none excluded them).
    pub fn fitting(&self) -> usize {
        self.total.saturating_sub(self.excluded.values().sum())
    }

    /// True when no node offers the runtime at all, however much capacity frees up.
    pub fn runtime_missing_everywhere(&self) -> bool {
        self.total > 0 && self.excluded.get(&Exclusion::MissingRuntime) == Some(&self.total)
    }

    /// Reasons with their counts, most common first (ties in check order).
    pub fn reasons(&self) -> Vec<(Exclusion, usize)> {
        let mut reasons: Vec<(Exclusion, usize)> = self.excluded.iter().map(|(e, n)| (*e, *n)).collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        reasons
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total == 0 {
            return write!(f, "0/0 nodes: no provider node is connected");
        }
        write!(f, "{}/{} nodes can run it", self.fitting(), self.total)?;
        if let Some(owners) = self.owners {
            let replicas = self.request.replicas;
            write!(f, ", but they belong to {owners} owner(s) and each task needs {replicas} replicas on distinct providers and owners")?;
        }
        if self.held_for_others > 0 {
            write!(f, ", but their room is kept for {} task(s) of jobs ahead in the fair-share queue", self.held_for_others)?;
        }
        let parts: Vec<String> = self.reasons().iter().map(|(why, n)| format!("{n} {}", why.describe(&self.request))).collect();
        if !parts.is_empty() {
            write!(f, ": {}", parts.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{GpuPattern, GpuRequest, Reputation, Resources};

    fn with(request: &Request, total: usize, reasons: &[(Exclusion, usize)]) -> Explanation {
        let mut e = Explanation::new(total, request);
        e.excluded = reasons.iter().copied().collect();
        e
    }

    #[test]
    fn explanations_list_reasons_most_common_first() {
        let mut r = Request::new("wasm", Resources { cpu_millis: 500, memory_bytes: 1 << 30, ephemeral_bytes: 0 });
        r.gpu = GpuRequest { count: 1, model: Some(GpuPattern::parse("a100*").unwrap()), min_memory_bytes: 0 };
        r.min_reputation = Reputation(800);
        let e = with(&r, 120, &[(Exclusion::ReputationTooLow, 33), (Exclusion::NoMatchingGpu, 87)]);
        assert_eq!(e.to_string(), "0/120 nodes can run it: 87 no GPU matching a100*, 33 reputation below 0.8");
        let tie = with(&r, 3, &[(Exclusion::InsufficientMemory, 1), (Exclusion::NotReady, 1), (Exclusion::InsufficientCpu, 1)]);
        assert_eq!(tie.to_string(), "0/3 nodes can run it: 1 not ready, 1 insufficient cpu (need 500m), 1 insufficient memory (need 1Gi)");
    }

    #[test]
    fn explanations_keep_the_messages_users_already_know() {
        let r = Request::new("exec", Resources { cpu_millis: 100, memory_bytes: 1 << 20, ephemeral_bytes: 0 });
        let e = with(&r, 3, &[(Exclusion::MissingRuntime, 2), (Exclusion::NotReady, 1)]);
        assert_eq!(e.to_string(), "0/3 nodes can run it: 2 do not offer runtime exec, 1 not ready");
        assert!(!e.runtime_missing_everywhere());
        assert!(with(&r, 2, &[(Exclusion::MissingRuntime, 2)]).runtime_missing_everywhere());
        assert_eq!(Explanation::new(0, &r).to_string(), "0/0 nodes: no provider node is connected");
    }

    #[test]
    fn replica_and_fair_share_refusals_say_what_is_missing() {
        let mut r = Request::new("wasm", Resources { cpu_millis: 100, memory_bytes: 1 << 20, ephemeral_bytes: 0 });
        r.replicas = 3;
        let mut e = with(&r, 10, &[(Exclusion::Cordoned, 6)]);
        e.owners = Some(2);
        assert_eq!(
            e.to_string(),
            "4/10 nodes can run it, but they belong to 2 owner(s) and each task needs 3 replicas on distinct providers and owners: 6 cordoned"
        );
        let mut e = with(&r, 10, &[]);
        e.held_for_others = 7;
        assert_eq!(e.to_string(), "10/10 nodes can run it, but their room is kept for 7 task(s) of jobs ahead in the fair-share queue");
    }
}
