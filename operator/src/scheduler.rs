//! Placement: filter the nodes a task fits on, score them, pick one. Pure and deterministic:
//! the same candidates and request always give the same placements, and every refusal comes
//! with an explanation counting the nodes excluded by each reason.

use std::collections::BTreeMap;
use std::fmt;

/// CPU and memory, in the units the scheduler works in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Resources {
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources { cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis), memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes) }
    }
    pub fn plus(self, other: Resources) -> Resources {
        Resources { cpu_millis: self.cpu_millis + other.cpu_millis, memory_bytes: self.memory_bytes + other.memory_bytes }
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// Session up and heartbeating.
    pub ready: bool,
    /// Cordoned by an admin (`spec.unschedulable`).
    pub cordoned: bool,
    /// Paused by its provider (`kommune-agent pause`).
    pub paused: bool,
    pub runtimes: Vec<String>,
    pub capacity: Resources,
    /// Reserved by attempts not yet finished.
    pub allocated: Resources,
    /// Attempts not yet finished.
    pub running: u32,
}

/// What one task needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub resources: Resources,
    pub runtime: String,
}

/// Why a node cannot take a task. Ordered as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Exclusion {
    NotReady,
    Cordoned,
    Paused,
    MissingRuntime,
    InsufficientCpu,
    InsufficientMemory,
}

impl Exclusion {
    fn describe(self, request: &Request) -> String {
        match self {
            Exclusion::NotReady => "not ready".into(),
            Exclusion::Cordoned => "cordoned".into(),
            Exclusion::Paused => "paused by their provider".into(),
            Exclusion::MissingRuntime => format!("do not offer runtime {}", request.runtime),
            Exclusion::InsufficientCpu => format!("insufficient cpu (need {})", crate::crd::quantity::format_cpu(request.resources.cpu_millis)),
            Exclusion::InsufficientMemory => format!("insufficient memory (need {})", crate::crd::quantity::format_memory(request.resources.memory_bytes)),
        }
    }
}

/// Why a task could not be placed: "0/3 nodes can run it: 2 do not offer runtime exec, 1 not ready".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub total: usize,
    pub excluded: BTreeMap<Exclusion, usize>,
    pub request: Request,
}

impl Explanation {
    /// True when no node offers the runtime at all, however much capacity frees up.
    pub fn runtime_missing_everywhere(&self) -> bool {
        self.total > 0 && self.excluded.get(&Exclusion::MissingRuntime) == Some(&self.total)
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total == 0 {
            return write!(f, "0/0 nodes: no provider node is connected");
        }
        let fits = self.total - self.excluded.values().sum::<usize>();
        write!(f, "{fits}/{} nodes can run it", self.total)?;
        // Most common reason first, as the first thing to fix.
        let mut reasons: Vec<(&Exclusion, &usize)> = self.excluded.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = reasons.iter().map(|(why, n)| format!("{n} {}", why.describe(&self.request))).collect();
        if !parts.is_empty() {
            write!(f, ": {}", parts.join(", "))?;
        }
        Ok(())
    }
}

/// The first reason `node` cannot take `request`, if any. One reason per node, checked in the
/// order an admin would look: liveness, cordon, the provider's pause, runtime, then room.
pub fn exclusion(node: &Candidate, request: &Request) -> Option<Exclusion> {
    let free = node.capacity.saturating_sub(node.allocated);
    if !node.ready {
        Some(Exclusion::NotReady)
    } else if node.cordoned {
        Some(Exclusion::Cordoned)
    } else if node.paused {
        Some(Exclusion::Paused)
    } else if !node.runtimes.iter().any(|r| r == &request.runtime) {
        Some(Exclusion::MissingRuntime)
    } else if free.cpu_millis < request.resources.cpu_millis {
        Some(Exclusion::InsufficientCpu)
    } else if free.memory_bytes < request.resources.memory_bytes {
        Some(Exclusion::InsufficientMemory)
    } else {
        None
    }
}

/// Places up to `count` identical tasks on `nodes`, reserving their resources in `nodes` as it
/// goes. Spreads: each task goes to the fitting node with the fewest running attempts, then the
/// most free CPU, then the name. Returns the chosen node indexes (in placement order) and, when
/// fewer than `count` fit, the explanation for the first task that did not.
pub fn place(nodes: &mut [Candidate], request: &Request, count: usize) -> (Vec<usize>, Option<Explanation>) {
    let mut chosen = Vec::with_capacity(count);
    for _ in 0..count {
        let best = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| exclusion(n, request).is_none())
            .min_by(|(_, a), (_, b)| {
                let free_a = a.capacity.saturating_sub(a.allocated).cpu_millis;
                let free_b = b.capacity.saturating_sub(b.allocated).cpu_millis;
                a.running.cmp(&b.running).then(free_b.cmp(&free_a)).then(a.name.cmp(&b.name))
            })
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let n = &mut nodes[i];
                n.allocated = n.allocated.plus(request.resources);
                n.running += 1;
                chosen.push(i);
            }
            None => return (chosen, Some(explain(nodes, request))),
        }
    }
    (chosen, None)
}

/// Counts, for each reason, the nodes that cannot take `request`.
pub fn explain(nodes: &[Candidate], request: &Request) -> Explanation {
    let mut excluded = BTreeMap::new();
    for n in nodes {
        if let Some(why) = exclusion(n, request) {
            *excluded.entry(why).or_insert(0) += 1;
        }
    }
    Explanation { total: nodes.len(), excluded, request: request.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpu: u64, mem: u64) -> Candidate {
        Candidate {
            name: name.into(),
            ready: true,
            cordoned: false,
            paused: false,
            runtimes: vec!["wasm".into()],
            capacity: Resources { cpu_millis: cpu, memory_bytes: mem },
            allocated: Resources::default(),
            running: 0,
        }
    }

    fn req(cpu: u64, mem: u64, runtime: &str) -> Request {
        Request { resources: Resources { cpu_millis: cpu, memory_bytes: mem }, runtime: runtime.into() }
    }

    #[test]
    fn each_filter_excludes_with_its_reason() {
        let r = req(500, GI, "wasm");
        let mut not_ready = node("a", 4000, 4 * GI);
        not_ready.ready = false;
        let mut cordoned = node("b", 4000, 4 * GI);
        cordoned.cordoned = true;
        let mut paused = node("p", 4000, 4 * GI);
        paused.paused = true;
        let mut exec_only = node("c", 4000, 4 * GI);
        exec_only.runtimes = vec!["exec".into()];
        let small_cpu = node("d", 400, 4 * GI);
        let small_mem = node("e", 4000, GI / 2);
        let mut full = node("f", 1000, 4 * GI);
        full.allocated = Resources { cpu_millis: 800, memory_bytes: 0 };
        let table = [
            (not_ready, Exclusion::NotReady),
            (cordoned, Exclusion::Cordoned),
            (paused, Exclusion::Paused),
            (exec_only, Exclusion::MissingRuntime),
            (small_cpu, Exclusion::InsufficientCpu),
            (small_mem, Exclusion::InsufficientMemory),
            (full, Exclusion::InsufficientCpu),
        ];
        for (n, want) in table {
            assert_eq!(exclusion(&n, &r), Some(want), "{}", n.name);
        }
        assert_eq!(exclusion(&node("ok", 500, GI), &r), None);
    }

    #[test]
    fn explanations_read_like_kubectl() {
        let mut nodes = vec![node("a", 4000, 4 * GI), node("b", 4000, 4 * GI), node("c", 100, 4 * GI)];
        nodes[1].ready = false;
        let e = explain(&nodes, &req(500, GI, "exec"));
        assert_eq!(e.to_string(), "0/3 nodes can run it: 2 do not offer runtime exec, 1 not ready");
        assert!(!e.runtime_missing_everywhere());
        let e = explain(&nodes[..1], &req(500, GI, "exec"));
        assert!(e.runtime_missing_everywhere());
        let e = explain(&nodes, &req(500, 8 * GI, "wasm"));
        assert_eq!(e.to_string(), "0/3 nodes can run it: 1 not ready, 1 insufficient cpu (need 500m), 1 insufficient memory (need 8Gi)");
        assert_eq!(explain(&[], &req(1, 1, "wasm")).to_string(), "0/0 nodes: no provider node is connected");
    }

    #[test]
    fn spreads_across_nodes() {
        let mut nodes = vec![node("a", 4000, 4 * GI), node("b", 4000, 4 * GI), node("c", 4000, 4 * GI)];
        let (chosen, why) = place(&mut nodes, &req(1000, GI, "wasm"), 6);
        assert!(why.is_none());
        assert_eq!(chosen, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn stops_when_full_and_explains() {
        let mut nodes = vec![node("a", 2000, 4 * GI)];
        let (chosen, why) = place(&mut nodes, &req(1000, GI, "wasm"), 3);
        assert_eq!(chosen, vec![0, 0]);
        assert_eq!(why.unwrap().to_string(), "0/1 nodes can run it: 1 insufficient cpu (need 1)");
        assert_eq!(nodes[0].allocated, Resources { cpu_millis: 2000, memory_bytes: 2 * GI });
    }

    fn arb_node() -> impl Strategy<Value = Candidate> {
        (0u64..8000, 0u64..(8 * GI), any::<bool>(), any::<bool>(), any::<bool>(), 0u32..5).prop_map(|(cpu, mem, ready, cordoned, exec, running)| {
            let mut n = node("n", cpu, mem);
            n.ready = ready;
            n.cordoned = cordoned;
            if exec {
                n.runtimes.push("exec".into());
            }
            n.running = running;
            n
        })
    }

    proptest! {
        #[test]
        fn never_overcommits_and_is_deterministic(
            mut nodes in prop::collection::vec(arb_node(), 0..12),
            cpu in 1u64..3000, mem in 1u64..(2 * GI), count in 0usize..40, exec in any::<bool>(),
        ) {
            for (i, n) in nodes.iter_mut().enumerate() { n.name = format!("n{i:02}"); }
            let r = req(cpu, mem, if exec { "exec" } else { "wasm" });
            let before = nodes.clone();
            let mut again = nodes.clone();
            let (chosen, why) = place(&mut nodes, &r, count);
            prop_assert_eq!(place(&mut again, &r, count).0, chosen.clone());
            prop_assert!(chosen.len() <= count);
            prop_assert_eq!(why.is_none(), chosen.len() == count);
            for (i, n) in nodes.iter().enumerate() {
                let placed = chosen.iter().filter(|&&c| c == i).count() as u64;
                prop_assert_eq!(n.allocated.cpu_millis, before[i].allocated.cpu_millis + placed * cpu);
                if placed > 0 {
                    prop_assert!(n.allocated.cpu_millis <= n.capacity.cpu_millis);
                    prop_assert!(n.allocated.memory_bytes <= n.capacity.memory_bytes);
                    prop_assert!(exclusion(&before[i], &r).is_none());
                }
            }
        }
    }
}
