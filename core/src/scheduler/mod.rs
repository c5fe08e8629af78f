//! Placement: filter the nodes a task fits on, score them, pick one (or one per replica, on
//! distinct providers and owners). Pure and deterministic: the same nodes, reservations,
//! request and seed always give the same placements, and every refusal comes with an
//! explanation counting the nodes excluded by each reason.
//!
//! - [`filter`]: the reasons a node cannot take a task, checked in a fixed order.
//! - [`score`]: how fitting nodes are ranked (locality, reputation, price, balance).
//! - [`pool`]: the in-memory index of nodes and reservations the dispatcher keeps.
//! - [`explain`]: "0/120 nodes can run it: 87 no GPU matching a100*, 33 reputation below 0.8".
//! - [`fair`]: who goes first when namespaces compete for free room.

pub mod explain;
pub mod fair;
pub mod filter;
pub mod pool;
pub mod score;

use std::collections::BTreeMap;
use std::fmt;

pub use explain::Explanation;
pub use fair::{Demand, FairShare};
pub use filter::{Exclusion, GpuPattern};
pub use pool::{Placement, Pool};
pub use score::Weights;

use crate::pricing::{Micros, Rates};

/// The topology label carrying a node's region (set from the agent's declared region).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The topology label carrying a node's zone (set from the agent's declared zone).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Most GPUs one node may report; more are ignored (GPU reservations are a 64-bit mask).
pub const MAX_GPUS: usize = 64;

/// CPU, memory and ephemeral storage, in the units the scheduler works in. GPUs are devices
/// and are counted separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub ephemeral_bytes: u64,
}

impl Resources {
    /// `self - other`, never below zero.
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            ephemeral_bytes: self.ephemeral_bytes.saturating_sub(other.ephemeral_bytes),
        }
    }

    /// `self + other`, saturating.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            ephemeral_bytes: self.ephemeral_bytes.saturating_add(other.ephemeral_bytes),
        }
    }

    /// True when every resource of `need` fits in `self`.
    pub fn covers(self, need: Resources) -> bool {
        self.cpu_millis >= need.cpu_millis && self.memory_bytes >= need.memory_bytes && self.ephemeral_bytes >= need.ephemeral_bytes
    }
}

/// One GPU device a node offers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Gpu {
    /// Model name as the agent reports it ("NVIDIA A100-SXM4-80GB", "rtx4090").
    pub model: String,
    pub memory_bytes: u64,
}

/// GPUs one task needs: `count` devices whose model matches `model` and that have at least
/// `min_memory_bytes` each.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct GpuRequest {
    pub count: u32,
    pub model: Option<GpuPattern>,
    pub min_memory_bytes: u64,
}

impl GpuRequest {
    /// Whether `gpu` is one this request can use.
    pub fn accepts(&self, gpu: &Gpu) -> bool {
        gpu.memory_bytes >= self.min_memory_bytes && self.model.as_ref().is_none_or(|p| p.matches(&gpu.model))
    }
}

/// The only taint effect: no new task is placed unless it tolerates the taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum TaintEffect {
    #[default]
    NoSchedule,
}

/// A taint on a node (`spec.taints` of its ProviderNode).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: TaintEffect,
}

/// How a toleration compares its key and value with a taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TolerationOperator {
    /// Key and value must be equal.
    #[default]
    Equal,
    /// Key must be equal (or empty: every key); the value is ignored.
    Exists,
}

/// A toleration, with Kubernetes' semantics: an empty key with `Exists` tolerates every
/// taint; an empty effect matches every effect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Toleration {
    pub key: String,
    pub operator: TolerationOperator,
    pub value: String,
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    /// Whether this toleration tolerates `taint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        match self.operator {
            TolerationOperator::Exists => self.key.is_empty() || self.key == taint.key,
            TolerationOperator::Equal => self.key == taint.key && self.value == taint.value,
        }
    }
}

/// A reputation in thousandths: 0 ..= 1000 (perfect record). A provider's is its honesty times
/// its reliability (`crate::reputation::standing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reputation(pub u16);

impl Reputation {
    /// Perfect record.
    pub const MAX: Reputation = Reputation(1000);

    /// A new provider's: honest until outvoted, half reliable.
    pub const NEW: Reputation = Reputation(500);

    /// Parses "0.8", "1", "0.955": a decimal between 0 and 1 with at most 3 decimals.
    pub fn parse(s: &str) -> Result<Reputation, String> {
        let bad = || format!("{s:?} is not a reputation: expected a decimal between 0 and 1 with at most 3 decimals, like \"0.8\"");
        let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
        if whole.is_empty() || frac.len() > 3 || !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        if s.trim().ends_with('.') {
            return Err(bad());
        }
        let whole: u64 = whole.parse().map_err(|_| bad())?;
        let frac: u64 = if frac.is_empty() { 0 } else { format!("{frac:0<3}").parse().map_err(|_| bad())? };
        let permille = whole.checked_mul(1000).and_then(|w| w.checked_add(frac)).filter(|p| *p <= 1000).ok_or_else(bad)?;
        Ok(Reputation(permille as u16))
    }
}

impl fmt::Display for Reputation {
    /// "0.8", "1", "0.955".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 { write!(f, "{whole}") } else { write!(f, "{whole}.{}", format!("{frac:03}").trim_end_matches('0')) }
    }
}

/// Where a job's input data lives; nodes in the same zone (then region) score higher.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Locality {
    pub region: Option<String>,
    pub zone: Option<String>,
}

/// A node as the scheduler sees it: what it offers and who owns it. Reservations are kept by
/// the [`Pool`], not here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    pub name: String,
    /// The provider's payout account (`spec.owner`); empty means the node is its own party.
    pub owner: String,
    /// Session up and heartbeating.
    pub ready: bool,
    /// Cordoned by an admin (`spec.unschedulable`).
    pub cordoned: bool,
    /// Quarantined by the operator (too many of its results outvoted) until an admin lifts it.
    pub quarantined: bool,
    /// Paused by its provider (`kommune-agent pause`).
    pub paused: bool,
    pub runtimes: Vec<String>,
    pub arch: String,
    pub os: String,
    /// ProviderNode labels plus the topology labels from the agent's region and zone.
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub capacity: Resources,
    pub gpus: Vec<Gpu>,
    pub reputation: Reputation,
    /// The node's effective rates (cluster rates with its overrides applied).
    pub rates: Rates,
}

impl Node {
    /// A ready node with `capacity`, offering `runtimes`, with a neutral reputation.
    pub fn new(name: &str, capacity: Resources, runtimes: &[&str]) -> Node {
        Node {
            name: name.into(),
            ready: true,
            runtimes: runtimes.iter().map(|r| r.to_string()).collect(),
            capacity,
            reputation: Reputation(500),
            ..Default::default()
        }
    }
}

/// What one task needs and where it may run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Request {
    /// The runtime the workload needs: wasm, exec or container.
    pub runtime: String,
    pub resources: Resources,
    pub gpu: GpuRequest,
    pub arch: Option<String>,
    pub os: Option<String>,
    /// Labels a node must carry, all of them, with these values.
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub min_reputation: Reputation,
    /// Most the task may cost per hour on a node (see `pricing::hourly_ceiling`).
    pub max_price_per_hour: Option<Micros>,
    pub data_locality: Option<Locality>,
    /// Copies of each task, each on a distinct provider and a distinct owner. At least 1.
    pub replicas: u32,
    /// Nodes this job no longer uses (they preempted or lost too many of its tasks, see
    /// `job::conduct`), sorted. Short: a few nodes per job at most.
    pub avoid: Vec<String>,
    /// Nodes whose owners the copies must not share: the other copies of the round being
    /// extended (a verification check runs on another owner). Empty for a new round.
    pub distinct_from: Vec<String>,
}

impl Request {
    /// A request for `runtime` with `resources`, one replica, no other constraint.
    pub fn new(runtime: &str, resources: Resources) -> Request {
        Request { runtime: runtime.into(), resources, replicas: 1, ..Default::default() }
    }

    /// The most this task costs per hour at `rates`.
    pub fn hourly_price(&self, rates: &Rates) -> Micros {
        crate::pricing::hourly_ceiling(self.resources.cpu_millis, self.resources.memory_bytes, self.gpu.count, rates)
    }
}
