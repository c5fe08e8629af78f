//! The reasons a node cannot take a task, and the checks behind them. Each node gets exactly
//! one reason, the first in the order an admin would look: liveness, cordon and pause, what
//! the node offers, then standing and price, then free room.

use std::fmt;

use super::{Gpu, GpuRequest, MAX_GPUS, Node, Request, Resources};
use kommune_proto::quantity::{format_cpu, format_memory};

/// A GPU model pattern: a case-insensitive glob where `*` matches any run of characters and
/// `?` one character ("a100*", "*4090", "h100").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GpuPattern(String);

impl GpuPattern {
    /// Longest pattern accepted.
    pub const MAX_LEN: usize = 63;

    /// Parses a pattern: letters, digits, space, `-`, `_`, `.`, `/`, `*` and `?`; not empty.
    pub fn parse(s: &str) -> Result<GpuPattern, String> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(format!("{s:?} is not a GPU model pattern: it must have 1 to {} characters", Self::MAX_LEN));
        }
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || " -_./*?".contains(*c))) {
            return Err(format!(
                "{s:?} is not a GPU model pattern: {c:?} is not allowed (use letters, digits, '-', '_', '.', '/', ' ', '*' for any run of characters and '?' for one)"
            ));
        }
        Ok(GpuPattern(s.to_ascii_lowercase()))
    }

    /// The pattern as written (lowercased).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `model` matches, ignoring case.
    pub fn matches(&self, model: &str) -> bool {
        let (p, m) = (self.0.as_bytes(), model.as_bytes());
        // Iterative glob with one backtrack point: linear in practice, no recursion.
        let (mut pi, mut mi, mut star, mut mark) = (0, 0, usize::MAX, 0);
        while mi < m.len() {
            if pi < p.len() && (p[pi] == b'?' || p[pi] == m[mi].to_ascii_lowercase()) {
                pi += 1;
                mi += 1;
            } else if pi < p.len() && p[pi] == b'*' {
                star = pi;
                mark = mi;
                pi += 1;
            } else if star != usize::MAX {
                pi = star + 1;
                mark += 1;
                mi = mark;
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

impl fmt::Display for GpuPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a node cannot take a task. Declared in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Exclusion {
    NotReady,
    Cordoned,
    /// Quarantined by the operator: too many of its results were outvoted.
    Quarantined,
    Paused,
    MissingRuntime,
    WrongArch,
    WrongOs,
    NodeSelectorMismatch,
    UntoleratedTaint,
    NoMatchingGpu,
    AbovePriceCeiling,
    ReputationTooLow,
    /// Stopped or lost too many of this job's tasks (`Request::avoid`).
    AvoidedByJob,
    InsufficientCpu,
    InsufficientMemory,
    InsufficientEphemeralStorage,
    GpusInUse,
}

impl Exclusion {
    /// Every reason, in check order.
    pub const ALL: [Exclusion; 17] = [
        Exclusion::NotReady,
        Exclusion::Cordoned,
        Exclusion::Quarantined,
        Exclusion::Paused,
        Exclusion::MissingRuntime,
        Exclusion::WrongArch,
        Exclusion::WrongOs,
        Exclusion::NodeSelectorMismatch,
        Exclusion::UntoleratedTaint,
        Exclusion::NoMatchingGpu,
        Exclusion::AbovePriceCeiling,
        Exclusion::ReputationTooLow,
        Exclusion::AvoidedByJob,
        Exclusion::InsufficientCpu,
        Exclusion::InsufficientMemory,
        Exclusion::InsufficientEphemeralStorage,
        Exclusion::GpusInUse,
    ];

    /// The reason in words, completing "N nodes ...": "87 no GPU matching a100*".
    pub fn describe(self, r: &Request) -> String {
        match self {
            Exclusion::NotReady => "not ready".into(),
            Exclusion::Cordoned => "cordoned".into(),
            Exclusion::Quarantined => "quarantined (too many results outvoted)".into(),
            Exclusion::Paused => "paused by their provider".into(),
            Exclusion::MissingRuntime => format!("do not offer runtime {}", r.runtime),
            Exclusion::WrongArch => format!("not arch {}", r.arch.as_deref().unwrap_or("?")),
            Exclusion::WrongOs => format!("not os {}", r.os.as_deref().unwrap_or("?")),
            Exclusion::NodeSelectorMismatch => {
                let pairs: Vec<String> = r.node_selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("do not match node selector {}", pairs.join(","))
            }
            Exclusion::UntoleratedTaint => "have a taint the job does not tolerate".into(),
            Exclusion::NoMatchingGpu => gpu_words(&r.gpu, ""),
            Exclusion::AbovePriceCeiling => {
                format!("price above {} per hour", r.max_price_per_hour.map_or_else(|| "?".into(), |m| m.to_string()))
            }
            Exclusion::ReputationTooLow => format!("reputation below {}", r.min_reputation),
            Exclusion::AvoidedByJob => "preempted or lost too many of this job's tasks".into(),
            Exclusion::InsufficientCpu => format!("insufficient cpu (need {})", format_cpu(r.resources.cpu_millis)),
            Exclusion::InsufficientMemory => format!("insufficient memory (need {})", format_memory(r.resources.memory_bytes)),
            Exclusion::InsufficientEphemeralStorage => format!("insufficient ephemeral storage (need {})", format_memory(r.resources.ephemeral_bytes)),
            Exclusion::GpusInUse => gpu_words(&r.gpu, "free "),
        }
    }

    /// True for reasons that go away when running attempts end (room), false for reasons only
    /// a change of the job or the node fixes.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Exclusion::NotReady
                | Exclusion::Paused
                | Exclusion::InsufficientCpu
                | Exclusion::InsufficientMemory
                | Exclusion::InsufficientEphemeralStorage
                | Exclusion::GpusInUse
        )
    }
}

/// "no GPU matching a100* with at least 40Gi", "fewer than 2 free GPUs matching h100*".
fn gpu_words(g: &GpuRequest, adjective: &str) -> String {
    let mut s = if g.count <= 1 { format!("no {adjective}GPU") } else { format!("fewer than {} {adjective}GPUs", g.count) };
    if let Some(p) = &g.model {
        s.push_str(&format!(" matching {p}"));
    }
    if g.min_memory_bytes > 0 {
        s.push_str(&format!(" with at least {}", format_memory(g.min_memory_bytes)));
    }
    s
}

/// Devices of `gpus` that `want` accepts, as a bit mask (device i is bit i).
pub fn matching_gpus(gpus: &[Gpu], want: &GpuRequest) -> u64 {
    gpus.iter().take(MAX_GPUS).enumerate().filter(|(_, g)| want.accepts(g)).fold(0, |m, (i, _)| m | (1 << i))
}

/// The first reason from what a node offers (runtime through price) that it cannot take `r`:
/// the checks that do not change while the node stays connected with the same facts, so the
/// pool evaluates them once per group of alike nodes.
pub fn static_exclusion(node: &Node, r: &Request) -> Option<Exclusion> {
    if !node.runtimes.iter().any(|x| x == &r.runtime) {
        return Some(Exclusion::MissingRuntime);
    }
    if r.arch.as_ref().is_some_and(|a| !a.eq_ignore_ascii_case(&node.arch)) {
        return Some(Exclusion::WrongArch);
    }
    if r.os.as_ref().is_some_and(|o| !o.eq_ignore_ascii_case(&node.os)) {
        return Some(Exclusion::WrongOs);
    }
    if !r.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v)) {
        return Some(Exclusion::NodeSelectorMismatch);
    }
    if !node.taints.iter().all(|t| r.tolerations.iter().any(|tol| tol.tolerates(t))) {
        return Some(Exclusion::UntoleratedTaint);
    }
    if r.gpu.count > 0 && matching_gpus(&node.gpus, &r.gpu).count_ones() < r.gpu.count {
        return Some(Exclusion::NoMatchingGpu);
    }
    if r.max_price_per_hour.is_some_and(|max| r.hourly_price(&node.rates) > max) {
        return Some(Exclusion::AbovePriceCeiling);
    }
    None
}

/// The reason from a node's standing and free room that it cannot take `r`, given what is
/// allocated on it (`gpus_used`: a mask of devices in use; `matching`: devices `r` accepts;
/// `avoided`: the node is in `r.avoid`).
#[allow(clippy::too_many_arguments)]
pub fn dynamic_exclusion(
    node_rep: super::Reputation,
    avoided: bool,
    capacity: Resources,
    allocated: Resources,
    gpus_used: u64,
    matching: u64,
    r: &Request,
) -> Option<Exclusion> {
    if node_rep < r.min_reputation {
        return Some(Exclusion::ReputationTooLow);
    }
    if avoided {
        return Some(Exclusion::AvoidedByJob);
    }
    let free = capacity.saturating_sub(allocated);
    if free.cpu_millis < r.resources.cpu_millis {
        Some(Exclusion::InsufficientCpu)
    } else if free.memory_bytes < r.resources.memory_bytes {
        Some(Exclusion::InsufficientMemory)
    } else if free.ephemeral_bytes < r.resources.ephemeral_bytes {
        Some(Exclusion::InsufficientEphemeralStorage)
    } else if r.gpu.count > 0 && (matching & !gpus_used).count_ones() < r.gpu.count {
        Some(Exclusion::GpusInUse)
    } else {
        None
    }
}

/// The first reason `node`, with `allocated` reserved and `gpus_used` devices taken, cannot
/// take `r`; None when it can.
pub fn exclusion(node: &Node, allocated: Resources, gpus_used: u64, r: &Request) -> Option<Exclusion> {
    if !node.ready {
        return Some(Exclusion::NotReady);
    }
    if node.cordoned {
        return Some(Exclusion::Cordoned);
    }
    if node.quarantined {
        return Some(Exclusion::Quarantined);
    }
    if node.paused {
        return Some(Exclusion::Paused);
    }
    static_exclusion(node, r)
        .or_else(|| dynamic_exclusion(node.reputation, r.avoid.contains(&node.name), node.capacity, allocated, gpus_used, matching_gpus(&node.gpus, &r.gpu), r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::{Micros, Rates};
    use crate::scheduler::{Locality, Reputation, Taint, TaintEffect, Toleration, TolerationOperator};

    const GI: u64 = 1 << 30;

    fn node() -> Node {
        let mut n = Node::new("n", Resources { cpu_millis: 4000, memory_bytes: 8 * GI, ephemeral_bytes: 0 }, &["wasm", "container"]);
        n.arch = "x86_64".into();
        n.os = "linux".into();
        n.labels.insert("tier".into(), "fast".into());
        n.reputation = Reputation(900);
        n
    }

    fn req() -> Request {
        Request::new("wasm", Resources { cpu_millis: 500, memory_bytes: GI, ephemeral_bytes: 0 })
    }

    fn a100() -> Gpu {
        Gpu { model: "NVIDIA-A100-80GB".into(), memory_bytes: 80 * GI }
    }

    #[test]
    fn each_filter_excludes_with_its_reason() {
        let gpu = |count, model: &str, mem| GpuRequest { count, model: Some(GpuPattern::parse(model).unwrap()), min_memory_bytes: mem };
        type Case = (&'static str, Box<dyn Fn(&mut Node, &mut Request, &mut Resources, &mut u64)>, Exclusion);
        let cases: Vec<Case> = vec![
            ("not ready", Box::new(|n, _, _, _| n.ready = false), Exclusion::NotReady),
            ("cordoned", Box::new(|n, _, _, _| n.cordoned = true), Exclusion::Cordoned),
            ("quarantined", Box::new(|n, _, _, _| n.quarantined = true), Exclusion::Quarantined),
            ("paused", Box::new(|n, _, _, _| n.paused = true), Exclusion::Paused),
            ("runtime", Box::new(|_, r, _, _| r.runtime = "exec".into()), Exclusion::MissingRuntime),
            ("arch", Box::new(|_, r, _, _| r.arch = Some("aarch64".into())), Exclusion::WrongArch),
            ("os", Box::new(|_, r, _, _| r.os = Some("windows".into())), Exclusion::WrongOs),
            ("selector value", Box::new(|_, r, _, _| _ = r.node_selector.insert("tier".into(), "slow".into())), Exclusion::NodeSelectorMismatch),
            ("selector key", Box::new(|_, r, _, _| _ = r.node_selector.insert("gpu".into(), "yes".into())), Exclusion::NodeSelectorMismatch),
            (
                "taint",
                Box::new(|n, _, _, _| n.taints.push(Taint { key: "dedicated".into(), value: "ml".into(), ..Default::default() })),
                Exclusion::UntoleratedTaint,
            ),
            ("no gpu at all", Box::new(move |_, r, _, _| r.gpu = gpu(1, "a100*", 0)), Exclusion::NoMatchingGpu),
            (
                "wrong gpu model",
                Box::new(move |n, r, _, _| {
                    n.gpus = vec![Gpu { model: "rtx4090".into(), memory_bytes: 24 * GI }];
                    r.gpu = gpu(1, "*a100*", 0)
                }),
                Exclusion::NoMatchingGpu,
            ),
            (
                "gpu too small",
                Box::new(move |n, r, _, _| {
                    n.gpus = vec![a100()];
                    r.gpu = gpu(1, "*a100*", 96 * GI)
                }),
                Exclusion::NoMatchingGpu,
            ),
            (
                "too few gpus",
                Box::new(move |n, r, _, _| {
                    n.gpus = vec![a100()];
                    r.gpu = gpu(2, "*a100*", 0)
                }),
                Exclusion::NoMatchingGpu,
            ),
            (
                "price",
                Box::new(|n, r, _, _| {
                    n.rates = Rates { cpu_core_hour: Micros(1_000_000), ..Default::default() };
                    r.max_price_per_hour = Some(Micros(400_000))
                }),
                Exclusion::AbovePriceCeiling,
            ),
            ("reputation", Box::new(|_, r, _, _| r.min_reputation = Reputation(950)), Exclusion::ReputationTooLow),
            ("avoided by the job", Box::new(|n, r, _, _| r.avoid = vec![n.name.clone()]), Exclusion::AvoidedByJob),
            ("cpu", Box::new(|_, _, a, _| a.cpu_millis = 3600), Exclusion::InsufficientCpu),
            ("memory", Box::new(|_, r, _, _| r.resources.memory_bytes = 9 * GI), Exclusion::InsufficientMemory),
            ("storage unknown", Box::new(|_, r, _, _| r.resources.ephemeral_bytes = 1), Exclusion::InsufficientEphemeralStorage),
            (
                "gpus busy",
                Box::new(move |n, r, _, used| {
                    n.gpus = vec![a100(), a100()];
                    r.gpu = gpu(2, "*a100*", 0);
                    *used = 0b10
                }),
                Exclusion::GpusInUse,
            ),
        ];
        for (name, setup, want) in cases {
            let (mut n, mut r, mut alloc, mut used) = (node(), req(), Resources::default(), 0u64);
            setup(&mut n, &mut r, &mut alloc, &mut used);
            assert_eq!(exclusion(&n, alloc, used, &r), Some(want), "{name}");
        }
    }

    #[test]
    fn a_node_that_offers_everything_asked_is_not_excluded() {
        let mut n = node();
        n.gpus = vec![a100(), a100(), Gpu { model: "rtx4090".into(), memory_bytes: 24 * GI }];
        n.capacity.ephemeral_bytes = 100 * GI;
        n.taints.push(Taint { key: "dedicated".into(), value: "ml".into(), effect: TaintEffect::NoSchedule });
        n.rates = Rates { cpu_core_hour: Micros(100_000), ..Default::default() };
        let mut r = req();
        r.gpu = GpuRequest { count: 2, model: Some(GpuPattern::parse("*A100*").unwrap()), min_memory_bytes: 40 * GI };
        r.arch = Some("X86_64".into());
        r.os = Some("linux".into());
        r.node_selector.insert("tier".into(), "fast".into());
        r.tolerations.push(Toleration { key: "dedicated".into(), operator: TolerationOperator::Equal, value: "ml".into(), effect: None });
        r.min_reputation = Reputation(900);
        r.max_price_per_hour = Some(Micros(50_000));
        r.resources.ephemeral_bytes = 10 * GI;
        r.data_locality = Some(Locality { region: Some("eu".into()), zone: None });
        assert_eq!(exclusion(&n, Resources::default(), 0b100, &r), None);
        // A node reporting no disk still runs jobs that ask for none.
        assert_eq!(exclusion(&node(), Resources::default(), 0, &req()), None);
    }

    #[test]
    fn tolerations_follow_kubernetes_semantics() {
        let t = Taint { key: "k".into(), value: "v".into(), effect: TaintEffect::NoSchedule };
        let tol = |key: &str, operator, value: &str| Toleration { key: key.into(), operator, value: value.into(), effect: None };
        assert!(tol("k", TolerationOperator::Equal, "v").tolerates(&t));
        assert!(!tol("k", TolerationOperator::Equal, "w").tolerates(&t));
        assert!(tol("k", TolerationOperator::Exists, "").tolerates(&t));
        assert!(tol("", TolerationOperator::Exists, "").tolerates(&t), "an empty key with Exists tolerates everything");
        assert!(!tol("", TolerationOperator::Equal, "").tolerates(&t));
        assert!(!tol("other", TolerationOperator::Exists, "").tolerates(&t));
        assert!(Toleration { effect: Some(TaintEffect::NoSchedule), ..tol("k", TolerationOperator::Exists, "") }.tolerates(&t));
    }

    #[test]
    fn gpu_patterns_are_case_insensitive_globs() {
        let p = |s: &str| GpuPattern::parse(s).unwrap();
        for (pattern, model, want) in [
            ("a100*", "A100-SXM4-80GB", true),
            ("a100*", "NVIDIA A100", false),
            ("*a100*", "NVIDIA A100", true),
            ("h100", "H100", true),
            ("h100", "H1000", false),
            ("rtx?090", "RTX4090", true),
            ("*", "", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
        ] {
            assert_eq!(p(pattern).matches(model), want, "{pattern} vs {model}");
        }
        for bad in ["", "a100[", "x".repeat(64).as_str(), "a100{x}"] {
            assert!(GpuPattern::parse(bad).unwrap_err().contains("is not a GPU model pattern"), "{bad}");
        }
    }

    #[test]
    fn every_reason_reads_as_plain_words() {
        let mut r = req();
        r.runtime = "exec".into();
        r.arch = Some("aarch64".into());
        r.os = Some("linux".into());
        r.node_selector.insert("tier".into(), "fast".into());
        r.node_selector.insert("gpu".into(), "yes".into());
        r.gpu = GpuRequest { count: 1, model: Some(GpuPattern::parse("a100*").unwrap()), min_memory_bytes: 0 };
        r.min_reputation = Reputation(800);
        r.max_price_per_hour = Some(Micros(500_000));
        r.resources.ephemeral_bytes = 10 * GI;
        let want = [
            (Exclusion::NotReady, "not ready"),
            (Exclusion::Cordoned, "cordoned"),
            (Exclusion::Quarantined, "quarantined (too many results outvoted)"),
            (Exclusion::Paused, "paused by their provider"),
            (Exclusion::MissingRuntime, "do not offer runtime exec"),
            (Exclusion::WrongArch, "not arch aarch64"),
            (Exclusion::WrongOs, "not os linux"),
            (Exclusion::NodeSelectorMismatch, "do not match node selector gpu=yes,tier=fast"),
            (Exclusion::UntoleratedTaint, "have a taint the job does not tolerate"),
            (Exclusion::NoMatchingGpu, "no GPU matching a100*"),
            (Exclusion::AbovePriceCeiling, "price above 0.5 per hour"),
            (Exclusion::ReputationTooLow, "reputation below 0.8"),
            (Exclusion::AvoidedByJob, "preempted or lost too many of this job's tasks"),
            (Exclusion::InsufficientCpu, "insufficient cpu (need 500m)"),
            (Exclusion::InsufficientMemory, "insufficient memory (need 1Gi)"),
            (Exclusion::InsufficientEphemeralStorage, "insufficient ephemeral storage (need 10Gi)"),
            (Exclusion::GpusInUse, "no free GPU matching a100*"),
        ];
        assert_eq!(want.len(), Exclusion::ALL.len());
        for (why, text) in want {
            assert_eq!(why.describe(&r), text, "{why:?}");
        }
        r.gpu = GpuRequest { count: 4, model: None, min_memory_bytes: 40 * GI };
        assert_eq!(Exclusion::NoMatchingGpu.describe(&r), "fewer than 4 GPUs with at least 40Gi");
        assert_eq!(Exclusion::GpusInUse.describe(&r), "fewer than 4 free GPUs with at least 40Gi");
    }
}
