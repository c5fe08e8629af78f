//! `ProviderNode`: one joined provider machine. The operator creates it when an agent joins and
//! keeps its status current from the agent's session; agents never write it themselves.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kommune_core::pricing::{Micros, RateOverrides};
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
    printcolumn(name = "Earned", type_ = "string", json_path = ".status.earnings.pending", priority = "1", description = "Credits earned, not yet paid out"),
    printcolumn(name = "Reputation", type_ = "string", json_path = ".status.reputation", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProviderNodeSpec {
    /// The provider's payout account; machines with the same owner count as one party when
    /// replicas must not collude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub owner: Option<String>,

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
    /// What the machine offers to Kommune, as measured by its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeCapacity>,
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
    /// Reputation from the node's finished attempts, (succeeded + 1) / (finished + 2), as a
    /// decimal from "0" to "1"; failed and lost attempts lower it, cancelled ones do not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<String>,
    /// What this provider has earned, from its accepted usage receipts in the ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earnings: Option<NodeEarnings>,
}

/// A provider's earnings and the ledger entry that backs them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEarnings {
    /// Credits earned and not paid out yet.
    pub pending: String,
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

#[cfg(test)]
mod tests {
    use super::*;
    use {Micros, RateOverrides};

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
