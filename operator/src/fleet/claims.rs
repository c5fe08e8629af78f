//! What an agent claims about its machine, and the bounds the fleet puts on it: strings are
//! cut, unknown runtimes dropped, and capacity capped by the admin's limits or a ceiling.

use crate::scheduler::{Gpu, Resources};
use crate::store::CapacityLimits;

/// What a node without a cap of its own is believed to offer at most, per resource: a large
/// single machine. An agent may claim anything, and the balance score sends more tasks where
/// more is free, so an unbounded claim would draw every task. A bigger machine is believed once
/// its admin sets `spec.capacityLimits` (or its join token's `--max-*`).
pub const CEILING: CapacityLimits = CapacityLimits { cpu_millis: Some(128_000), memory_bytes: Some(1 << 40), ephemeral_bytes: Some(16 << 40), gpus: Some(8) };

/// What an agent says its machine offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// CPU, memory and ephemeral storage (0 when the agent does not report disk).
    pub capacity: Resources,
    /// GPU devices (none when the agent does not report them).
    pub gpus: Vec<Gpu>,
    pub runtimes: Vec<String>,
    pub arch: String,
    pub os: String,
    pub region: String,
    pub zone: String,
    pub agent_version: String,
}

/// Kubernetes and Go name architectures differently from Rust; the scheduler speaks Rust's.
pub fn normalize_arch(arch: &str) -> String {
    match arch.to_ascii_lowercase().as_str() {
        "amd64" | "x86-64" | "x64" => "x86_64".into(),
        "arm64" => "aarch64".into(),
        other => other.into(),
    }
}

impl NodeFacts {
    /// Converts and bounds what the agent sent: strings are truncated, unknown runtimes dropped.
    pub fn from_proto(f: Option<&kommune_proto::v1::NodeFacts>) -> NodeFacts {
        let Some(f) = f else { return NodeFacts::default() };
        let cap = f.capacity.clone().unwrap_or_default();
        let short = |s: &str| s.chars().take(63).collect::<String>();
        let known = [kommune_proto::runtime::WASM, kommune_proto::runtime::EXEC, kommune_proto::runtime::CONTAINER];
        let mut runtimes: Vec<String> = cap.runtimes.iter().filter(|r| known.contains(&r.as_str())).cloned().collect();
        runtimes.sort();
        runtimes.dedup();
        // At most 64 GPUs per machine are believed; a longer list is cut, never padded.
        let gpus = cap.gpus.iter().take(64).map(|g| Gpu { model: short(&g.model), memory_bytes: g.memory_bytes }).collect();
        NodeFacts {
            capacity: Resources { cpu_millis: cap.cpu_millis, memory_bytes: cap.memory_bytes, ephemeral_bytes: cap.ephemeral_storage_bytes },
            gpus,
            runtimes,
            arch: normalize_arch(&short(&cap.arch)),
            os: short(&cap.os).to_ascii_lowercase(),
            region: short(&f.region),
            zone: short(&f.zone),
            agent_version: short(&f.agent_version),
        }
    }
}

/// What placement uses: the agent's claim, each resource capped by `limits` (a cap left unset
/// is the [`CEILING`]'s). GPUs beyond the cap are dropped from the end of the list, so the
/// indices of those kept (attempts hold GPUs by index) do not move.
pub fn bounded(facts: &NodeFacts, limits: &CapacityLimits) -> (Resources, Vec<Gpu>) {
    let cap = |claim: u64, limit: Option<u64>, ceiling: Option<u64>| claim.min(limit.or(ceiling).unwrap_or(u64::MAX));
    let c = facts.capacity;
    let resources = Resources {
        cpu_millis: cap(c.cpu_millis, limits.cpu_millis, CEILING.cpu_millis),
        memory_bytes: cap(c.memory_bytes, limits.memory_bytes, CEILING.memory_bytes),
        ephemeral_bytes: cap(c.ephemeral_bytes, limits.ephemeral_bytes, CEILING.ephemeral_bytes),
    };
    let gpus = limits.gpus.or(CEILING.gpus).map_or(usize::MAX, |g| g as usize);
    (resources, facts.gpus.iter().take(gpus).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_from_agents_are_bounded() {
        let f = kommune_proto::v1::NodeFacts {
            capacity: Some(kommune_proto::v1::Capacity {
                cpu_millis: 4000,
                memory_bytes: 1 << 30,
                runtimes: vec!["exec".into(), "wasm".into(), "bogus".into(), "wasm".into()],
                arch: "x".repeat(500),
                os: "linux".into(),
                gpus: (0..100)
                    .map(|i| kommune_proto::v1::Gpu { model: "NVIDIA A100-SXM4-80GB".into(), memory_bytes: 80 << 30, uuid: format!("GPU-{i}") })
                    .collect(),
                ephemeral_storage_bytes: 20 << 30,
            }),
            agent_version: "1".into(),
            region: "eu".into(),
            zone: String::new(),
        };
        let facts = NodeFacts::from_proto(Some(&f));
        assert_eq!(facts.runtimes, vec!["exec", "wasm"]);
        assert_eq!(facts.arch.len(), 63);
        assert_eq!(facts.gpus.len(), 64, "GPUs the agent detected are believed, up to a bound");
        assert_eq!(facts.gpus[0], Gpu { model: "NVIDIA A100-SXM4-80GB".into(), memory_bytes: 80 << 30 });
        assert_eq!(facts.capacity.ephemeral_bytes, 20 << 30);
        assert_eq!(NodeFacts::from_proto(None), NodeFacts::default());
    }

    #[test]
    fn claims_are_capped_by_limits_and_else_by_the_ceiling() {
        let gpu = Gpu { model: "A100".into(), memory_bytes: 80 << 30 };
        let liar = NodeFacts {
            capacity: Resources { cpu_millis: 1_000_000_000, memory_bytes: u64::MAX, ephemeral_bytes: 1 << 30 },
            gpus: vec![gpu.clone(); 64],
            ..NodeFacts::default()
        };
        let (r, gpus) = bounded(&liar, &CapacityLimits::default());
        assert_eq!(
            (r.cpu_millis, r.memory_bytes, r.ephemeral_bytes, gpus.len()),
            (128_000, 1 << 40, 1 << 30, 8),
            "the ceiling; an honest claim below it stays"
        );
        let limits = CapacityLimits { cpu_millis: Some(4000), memory_bytes: Some(8 << 30), ephemeral_bytes: None, gpus: Some(0) };
        let (r, gpus) = bounded(&liar, &limits);
        assert_eq!((r.cpu_millis, r.memory_bytes, r.ephemeral_bytes, gpus.len()), (4000, 8 << 30, 1 << 30, 0));
        // A cap above the ceiling is the admin's word for a big machine.
        let big = CapacityLimits { cpu_millis: Some(512_000), ..CapacityLimits::default() };
        assert_eq!(bounded(&liar, &big).0.cpu_millis, 512_000);
        let honest = NodeFacts { capacity: Resources { cpu_millis: 2000, memory_bytes: 4 << 30, ephemeral_bytes: 0 }, gpus: vec![gpu], ..NodeFacts::default() };
        assert_eq!(bounded(&honest, &limits).0, honest.capacity, "a claim under its caps is believed as is");
    }
}
