//! `ProviderNode`: one joined provider machine. The operator creates it when an agent joins and
//! keeps its status current from the agent's session; agents never write it themselves.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kommune_core::pricing::{Micros, RateOverrides};
use kommune_proto::quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A provider machine joined to the Kommune pool.
// kube's printcolumn(...) expands to repeated attributes, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kommune.dev",
    version = "v1alpha1",
    kind = "ProviderNode",
    status = "ProviderNodeStatus",
    shortname = "pn",
    category = "kommune",
    doc = "A provider machine joined to the Kommune pool.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Ready, NotReady, Offline or Draining"),
    printcolumn(name = "CPU", type_ = "string", json_path = ".status.capacity.cpu", description = "CPU offered"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".status.capacity.memory", description = "Memory offered"),
    printcolumn(name = "Region", type_ = "string", json_path = ".status.region"),
    printcolumn(name = "Running", type_ = "integer", json_path = ".status.runningAttempts", priority = "1"),
    printcolumn(
        name = "Earned",
        type_ = "string",
        json_path = ".status.earnings.pending",
        priority = "1",
        description = "Credits earned, in no statement yet"
    ),
    printcolumn(
        name = "Settled",
        type_ = "string",
        json_path = ".status.earnings.settled",
        priority = "1",
        description = "Credits in statements not yet paid"
    ),
    printcolumn(name = "Paid", type_ = "string", json_path = ".status.earnings.paid", priority = "1", description = "Credits in paid statements"),
    printcolumn(name = "Reputation", type_ = "string", json_path = ".status.reputation", description = "Honesty × reliability, 0 to 1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProviderNodeSpec {
    /// The provider's payout account; machines with the same owner count as one party when
    /// replicas must not collude. Set at join to the join token's owner (`token:<id>` unless the
    /// token was created with --owner) when the admin has not set it; an admin's value wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub owner: Option<String>,

    /// The most this node is believed to offer, whatever its agent claims: placement uses the
    /// smaller of the claim and the cap (see status.allocatable). Set at join from the join
    /// token's --max-* flags; each cap set here wins over the token's. A resource without any
    /// cap is bounded by a built-in ceiling (128 CPUs, 1Ti memory, 16Ti scratch disk, 8 GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_limits: Option<NodeCapacityLimits>,

    /// Cordon: when true, no new task is placed here; running tasks finish.
    #[serde(default)]
    pub unschedulable: bool,

    /// Drain: when true, the node is cordoned and the tasks running here are stopped and placed
    /// elsewhere within one sweep (10 s), without using any of their retries; what they ran is
    /// still metered. Set it back to false to take tasks again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,

    /// Taints: only tasks whose job tolerates every taint (`spec.placement.tolerations`) are
    /// placed here; running tasks are not affected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub taints: Vec<Taint>,

    /// This provider's own rates, in credits; each unset rate is the cluster's (the chart's
    /// `rates` values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<NodePricing>,

    /// Lifts the operator's quarantine (condition `Quarantined`): set it to the current time
    /// (RFC 3339) once the machine is checked. A quarantine that began before it ends, and the
    /// results outvoted before it no longer count towards a new one (they still weigh on the
    /// reputation until they decay). Only an admin can write it; agents never write spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_lifted_at: Option<Time>,
}

/// Caps on what a node's agent may claim; an unset one is not capped here.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacityLimits {
    /// Most CPU believed, as a Kubernetes quantity ("8", "3500m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Most memory believed, as a quantity ("16Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Most scratch disk believed, as a quantity ("100Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<Quantity>,
    /// Most GPUs believed (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 64))]
    pub gpus: Option<u32>,
}

/// A taint keeps tasks away from a node unless their job tolerates it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    /// Taint key, e.g. "dedicated".
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// Taint value, e.g. "ml".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 63))]
    pub value: String,
    /// What the taint does. Only NoSchedule: no new task unless tolerated.
    #[serde(default)]
    pub effect: TaintEffect,
}

/// What a taint does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TaintEffect {
    /// No new task is placed unless its job tolerates the taint.
    #[default]
    NoSchedule,
}

/// Per-provider rates. Amounts are decimal strings of credits with at most 6 decimals.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePricing {
    /// Per CPU-core-hour of measured CPU time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub cpu_core_hour: Option<String>,
    /// Per GiB-hour of measured memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub memory_gib_hour: Option<String>,
    /// Per GPU-hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub gpu_hour: Option<String>,
    /// Per GiB of output written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]{1,6})?$"))]
    pub output_gib: Option<String>,
}

/// Where a provider node is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodePhase {
    /// Session open and heartbeating: tasks may be placed here.
    Ready,
    /// Session dropped or heartbeats missed; its attempts are kept for a grace period.
    NotReady,
    /// Gone longer than the grace period.
    Offline,
    /// Cordoned and finishing its running tasks.
    Draining,
}

/// Observed state of a provider node, reported through the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderNodeStatus {
    /// Ready, NotReady, Offline or Draining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<NodePhase>,
    /// Kubernetes-style conditions; `Ready` says whether the agent's session is up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// What the machine offers to Kommune, as its agent claims it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeCapacity>,
    /// What placement uses: the claimed capacity, each resource capped by spec.capacityLimits,
    /// else by the join token's caps, else by the built-in ceiling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<NodeAllocatable>,
    /// Resources reserved by attempts placed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<NodeAllocation>,
    /// Attempts placed here and not finished.
    #[serde(default)]
    pub running_attempts: u32,
    /// Region the provider declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Zone the provider declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Last heartbeat seen (written at most every 30 seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Version of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// sha256 of the node's public key (ed25519); it signs the node's client certificate
    /// requests and its usage receipts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_sha256: Option<String>,
    /// Reputation, a decimal from "0" to "1": honesty × reliability (see `standing`). Jobs'
    /// `placement.minReputation` compares with it and placement prefers higher ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<String>,
    /// What the reputation is made of: honesty and reliability apart, and the decayed counts
    /// of what the operator observed this provider do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standing: Option<NodeStanding>,
    /// What this provider has earned, from its accepted usage receipts in the ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earnings: Option<NodeEarnings>,
}

/// A provider's record. Every count is decayed: an observation weighs 1 when made and half as
/// much each half-life later, so recent behaviour counts more.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStanding {
    /// (agreed + 1) / (agreed + 1 + 10 × outvoted), "0" to "1": 1 until a result is outvoted,
    /// and one outvoted result undoes ten agreed ones. Unverified results do not count.
    pub honesty: String,
    /// (completed + 1) / (completed + lost + timedOut + preempted/2 + 2), "0" to "1": 0.5 for a
    /// new provider. A task exiting non-zero is a completed run: the submitter's failure.
    pub reliability: String,
    /// The decay's half-life, e.g. "168h".
    pub half_life: String,
    /// Results compared with other providers' that matched.
    pub agreed: String,
    /// Results compared that a quorum of other providers contradicted.
    pub outvoted: String,
    /// Results accepted without being compared.
    pub unverified: String,
    /// Attempts run to an end and reported (any exit code).
    pub completed: String,
    /// Attempts lost with the node (no session past the grace, or restarted without them).
    pub lost: String,
    /// Attempts the operator failed for running past their timeout plus grace.
    pub timed_out: String,
    /// Attempts the provider stopped itself (the machine's owner took it back).
    pub preempted: String,
}

/// A provider's earnings and the ledger entry that backs them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEarnings {
    /// Credits earned and in no statement yet (reversed receipts excluded).
    pub pending: String,
    /// Credits in closed statements that are not paid yet (this node's lines: credits minus
    /// reversals, negative when a statement takes back more than the period earned).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub settled: String,
    /// Credits in statements a paid entry records as paid.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub paid: String,
    /// Credits of this node's receipts the operator reversed (never paid); each reversal and its
    /// reason is in the ledger (`kommune-agent earnings` lists them).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reversed: String,
    /// Accepted receipts.
    pub receipts: u64,
    /// Receipts the operator rejected (kept in the ledger store with the reason).
    #[serde(default)]
    pub rejected: u64,
    /// Sequence number of the newest ledger entry for this provider.
    #[serde(default)]
    pub ledger_seq: u64,
    /// Hash (hex) of the ledger head when these figures were computed: `kommune-operator ledger
    /// verify` recomputes the chain up to it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ledger_head: String,
    /// sha256 (hex) of the operator's ledger key, which signs checkpoints and statements: pin it
    /// with `ledger verify --operator-key` and `kommune-agent earnings --verify --operator-key`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operator_key_sha256: String,
}

/// Resources a node offers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    /// CPU offered, as a quantity.
    pub cpu: String,
    /// Memory offered, as a quantity.
    pub memory: String,
    /// Runtimes the agent runs: wasm, exec, container.
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// CPU architecture (x86_64, aarch64).
    pub arch: String,
    /// Operating system (linux, macos, windows).
    pub os: String,
    /// Scratch disk offered to tasks, as a quantity; absent when the agent does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<String>,
    /// GPU devices offered; absent when the agent reports none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<NodeGpu>,
}

/// One GPU device of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeGpu {
    /// Model name as the agent reports it.
    pub model: String,
    /// Device memory in bytes.
    pub memory_bytes: u64,
}

/// Resources placement counts on for a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAllocatable {
    /// CPU, as a quantity.
    pub cpu: String,
    /// Memory, as a quantity.
    pub memory: String,
    /// Scratch disk, as a quantity; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<String>,
    /// GPUs.
    #[serde(default)]
    pub gpus: u32,
    /// Whether any claimed resource was cut to its cap.
    #[serde(default)]
    pub capped: bool,
}

/// Resources reserved on a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAllocation {
    /// CPU reserved, as a quantity.
    pub cpu: String,
    /// Memory reserved, as a quantity.
    pub memory: String,
}

/// A ProviderNode's `spec.pricing` as overrides. Each amount is checked; a bad one is an
/// error naming the field (the CRD's pattern normally stops it at admission).
pub fn overrides_from(p: Option<&NodePricing>) -> Result<RateOverrides, String> {
    let Some(p) = p else { return Ok(RateOverrides::default()) };
    let field = |name: &str, v: &Option<String>| -> Result<Option<Micros>, String> {
        v.as_deref().map(|s| Micros::parse_credits(s).map_err(|e| format!("spec.pricing.{name}: {e}"))).transpose()
    };
    Ok(RateOverrides {
        cpu_core_hour: field("cpuCoreHour", &p.cpu_core_hour)?,
        memory_gib_hour: field("memoryGibHour", &p.memory_gib_hour)?,
        gpu_hour: field("gpuHour", &p.gpu_hour)?,
        output_gib: field("outputGib", &p.output_gib)?,
    })
}

/// A ProviderNode's `spec.capacityLimits` as caps. A bad quantity is an error naming the field
/// (quantities normally stop it at admission).
pub fn limits_from(l: Option<&NodeCapacityLimits>) -> Result<crate::store::CapacityLimits, String> {
    let Some(l) = l else { return Ok(Default::default()) };
    let q = |name: &'static str, v: &Option<Quantity>, parse: fn(&'static str, &str) -> Result<u64, quantity::QuantityError>| {
        v.as_ref().map(|q| parse(name, &q.0).map_err(|e| e.to_string())).transpose()
    };
    Ok(crate::store::CapacityLimits {
        cpu_millis: q("spec.capacityLimits.cpu", &l.cpu, quantity::cpu_millis)?,
        memory_bytes: q("spec.capacityLimits.memory", &l.memory, quantity::memory_bytes)?,
        ephemeral_bytes: q("spec.capacityLimits.ephemeralStorage", &l.ephemeral_storage, quantity::memory_bytes)?,
        gpus: l.gpus,
    })
}

/// Caps as `spec.capacityLimits` (what a join copies from its token); None when there are none.
pub fn limits_spec(l: &crate::store::CapacityLimits) -> Option<NodeCapacityLimits> {
    (!l.is_empty()).then(|| NodeCapacityLimits {
        cpu: l.cpu_millis.map(|m| Quantity(quantity::format_cpu(m))),
        memory: l.memory_bytes.map(|b| Quantity(quantity::format_memory(b))),
        ephemeral_storage: l.ephemeral_bytes.map(|b| Quantity(quantity::format_memory(b))),
        gpus: l.gpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use {Micros, RateOverrides};

    #[test]
    fn capacity_limits_become_caps_both_ways_and_bad_quantities_name_their_field() {
        let caps = crate::store::CapacityLimits { cpu_millis: Some(3500), memory_bytes: Some(16 << 30), ephemeral_bytes: None, gpus: Some(0) };
        let spec = limits_spec(&caps).unwrap();
        assert_eq!((spec.cpu.as_ref().unwrap().0.as_str(), spec.memory.as_ref().unwrap().0.as_str()), ("3500m", "16Gi"));
        assert_eq!(limits_from(Some(&spec)), Ok(caps));
        assert_eq!(limits_from(None), Ok(Default::default()));
        assert_eq!(limits_spec(&Default::default()), None);
        let bad = NodeCapacityLimits { memory: Some(Quantity("a lot".into())), ..Default::default() };
        assert!(limits_from(Some(&bad)).unwrap_err().contains("spec.capacityLimits.memory"));
    }

    #[test]
    fn provider_pricing_becomes_overrides_and_bad_amounts_name_their_field() {
        let p = NodePricing { cpu_core_hour: Some("0.02".into()), gpu_hour: Some("1".into()), ..Default::default() };
        assert_eq!(
            overrides_from(Some(&p)),
            Ok(RateOverrides { cpu_core_hour: Some(Micros(20_000)), gpu_hour: Some(Micros(1_000_000)), ..Default::default() })
        );
        assert_eq!(overrides_from(None), Ok(RateOverrides::default()));
        let bad = NodePricing { memory_gib_hour: Some("cheap".into()), ..Default::default() };
        assert!(overrides_from(Some(&bad)).unwrap_err().starts_with("spec.pricing.memoryGibHour: \"cheap\" is not an amount of credits"));
    }
}
