//! What a ProviderNode's status should be, and which Event a change deserves: pure functions
//! of the object, a gateway event or sweep observation, and the time. No client in here.

use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::quantity::{format_cpu, format_memory};
use crate::crd::{NodeAllocatable, NodeAllocation, NodeCapacity, NodeEarnings, NodeGpu, NodePhase, ProviderNode, ProviderNodeStatus, condition, set_condition};
use crate::fleet::{NodeAdmin, NodeFacts};
use crate::gateway::NodeEvent;
use crate::job::status::Severity;
use crate::scheduler::{Taint, TaintEffect};

/// Why a node's `Ready` condition says what it says, and why an Event about a node was sent.
/// The strings are part of the API (`kubectl describe pn`, alerts), so they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeReason {
    /// The agent joined; its session is not open yet.
    Joined,
    /// The agent's session is open.
    SessionOpen,
    /// The agent's session closed (the message says why).
    SessionClosed,
    /// The provider left the pool.
    Left,
    /// The node claims a session this operator does not have (e.g. after a restart).
    NoSession,
    /// No session for longer than the grace; its attempts were placed elsewhere.
    Offline,
    /// Event only: an admin cordoned the connected node, so it drains.
    Cordoned,
    /// Event only: the cordon was lifted.
    Uncordoned,
    /// Event only: `spec.drain` stopped the attempts running here.
    Drained,
    /// Event only: the ProviderNode was deleted, so the node was removed from the pool.
    Revoked,
    /// Too many of its results were outvoted: no task is placed here (condition `Quarantined`).
    Quarantined,
    /// An admin lifted the quarantine (`spec.quarantineLiftedAt`).
    QuarantineLifted,
}

impl NodeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeReason::Joined => "Joined",
            NodeReason::SessionOpen => "SessionOpen",
            NodeReason::SessionClosed => "SessionClosed",
            NodeReason::Left => "Left",
            NodeReason::NoSession => "NoSession",
            NodeReason::Offline => "Offline",
            NodeReason::Cordoned => "Cordoned",
            NodeReason::Uncordoned => "Uncordoned",
            NodeReason::Drained => "Drained",
            NodeReason::Revoked => "Revoked",
            NodeReason::Quarantined => "Quarantined",
            NodeReason::QuarantineLifted => "QuarantineLifted",
        }
    }

    /// Reasons that mean the node cannot take work through no choice of its admin.
    fn severity(self) -> Severity {
        match self {
            NodeReason::SessionClosed | NodeReason::NoSession | NodeReason::Offline | NodeReason::Revoked | NodeReason::Quarantined => Severity::Warning,
            _ => Severity::Normal,
        }
    }
}

impl fmt::Display for NodeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a node since its status was last computed.
#[derive(Debug)]
pub enum Change<'a> {
    /// A gateway event, with what the store and fleet say about the node now.
    Event { event: &'a NodeEvent, running: u32, allocated: (u64, u64) },
    /// The periodic sweep: how long the node has had no session here (None: connected), and its
    /// earnings from the ledger (None: no ledger, or unreadable; the last figures stay).
    Sweep { absent: Option<Duration>, grace: Duration, earnings: Option<NodeEarnings> },
}

/// The status `node` should have after `change`, from its current status and spec. Equal to the
/// current status when nothing needs writing.
pub fn desired_status(node: &ProviderNode, change: &Change<'_>, now: Timestamp) -> ProviderNodeStatus {
    let prev = node.status.clone().unwrap_or_default();
    let cordoned = node.spec.unschedulable || node.spec.drain;
    match change {
        Change::Event { event, running, allocated } => {
            let mut s = apply_event(&prev, event, *running, *allocated, now);
            if matches!(event, NodeEvent::Connected { .. }) {
                // A cordoned node that reconnects drains at once rather than flickering Ready
                // until the next sweep.
                s.phase = Some(connected_phase(cordoned));
            }
            s
        }
        Change::Sweep { absent, grace, earnings } => {
            let mut s = prev;
            if let Some(e) = earnings {
                s.earnings = Some(e.clone());
            }
            match absent {
                // Connected: only a node that already claims its session follows the cordon; a
                // NotReady node waits for its Connected event, which carries its facts.
                None => {
                    if matches!(s.phase, Some(NodePhase::Ready | NodePhase::Draining)) {
                        s.phase = Some(connected_phase(cordoned));
                    }
                }
                Some(absent) => {
                    let phase = absent_phase(*absent, *grace);
                    let stale = match s.phase {
                        Some(NodePhase::Ready | NodePhase::Draining) => true,
                        Some(NodePhase::NotReady) => phase == NodePhase::Offline,
                        _ => false,
                    };
                    if stale {
                        s.phase = Some(phase);
                        let (reason, message) = match phase {
                            NodePhase::Offline => (
                                NodeReason::Offline,
                                format!("no session for {}s, longer than the {}s grace; its attempts were placed elsewhere", absent.as_secs(), grace.as_secs()),
                            ),
                            _ => (NodeReason::NoSession, "the agent has no session with this operator".to_string()),
                        };
                        set_ready(&mut s, false, reason, message, now);
                    }
                }
            }
            s
        }
    }
}

/// The status change one gateway event causes, applied to the current status. Pure.
pub fn apply_event(prev: &ProviderNodeStatus, event: &NodeEvent, running: u32, allocated: (u64, u64), now: Timestamp) -> ProviderNodeStatus {
    let mut s = prev.clone();
    let cap = |f: &NodeFacts| NodeCapacity {
        cpu: format_cpu(f.capacity.cpu_millis),
        memory: format_memory(f.capacity.memory_bytes),
        runtimes: f.runtimes.clone(),
        arch: f.arch.clone(),
        os: f.os.clone(),
        ephemeral_storage: Some(f.capacity.ephemeral_bytes).filter(|b| *b > 0).map(format_memory),
        gpus: f.gpus.iter().map(|g| NodeGpu { model: g.model.clone(), memory_bytes: g.memory_bytes }).collect(),
    };
    let non_empty = |v: &str| Some(v.to_string()).filter(|v| !v.is_empty());
    match event {
        NodeEvent::Joined { facts, public_key_sha256, .. } => {
            s.capacity = Some(cap(facts));
            s.public_key_sha256 = Some(public_key_sha256.clone());
            s.region = non_empty(&facts.region);
            s.zone = non_empty(&facts.zone);
            s.agent_version = non_empty(&facts.agent_version);
            if s.phase.is_none() {
                s.phase = Some(NodePhase::NotReady);
                set_ready(&mut s, false, NodeReason::Joined, "joined; waiting for the agent's session", now);
            }
        }
        NodeEvent::Connected { facts, .. } => {
            s.capacity = Some(cap(facts));
            s.region = non_empty(&facts.region);
            s.zone = non_empty(&facts.zone);
            s.agent_version = non_empty(&facts.agent_version);
            s.phase = Some(NodePhase::Ready);
            s.last_heartbeat_time = Some(Time(now));
            set_ready(&mut s, true, NodeReason::SessionOpen, "the agent's session is open", now);
        }
        NodeEvent::Heartbeat { .. } => {
            s.last_heartbeat_time = Some(Time(now));
        }
        NodeEvent::Disconnected { reason, .. } => {
            s.phase = Some(NodePhase::NotReady);
            set_ready(&mut s, false, NodeReason::SessionClosed, reason.clone(), now);
        }
        NodeEvent::Left { .. } => {
            s.phase = Some(NodePhase::Offline);
            set_ready(&mut s, false, NodeReason::Left, "the provider left the pool", now);
        }
    }
    s.running_attempts = running;
    s.allocated = Some(NodeAllocation { cpu: format_cpu(allocated.0), memory: format_memory(allocated.1) });
    s
}

/// Sets the `Ready` condition, stamped `now` if its status flips.
fn set_ready(s: &mut ProviderNodeStatus, up: bool, reason: NodeReason, message: impl Into<String>, now: Timestamp) {
    let mut c = condition("Ready", up, reason.as_str(), message, None);
    c.last_transition_time = Time(now);
    set_condition(&mut s.conditions, c);
}

/// The phase of a node with a session: Draining while an admin cordons it, else Ready.
pub fn connected_phase(unschedulable: bool) -> NodePhase {
    if unschedulable { NodePhase::Draining } else { NodePhase::Ready }
}

/// The phase of a node without a session: NotReady for a blip, Offline past the grace.
pub fn absent_phase(absent: Duration, grace: Duration) -> NodePhase {
    if absent > grace { NodePhase::Offline } else { NodePhase::NotReady }
}

/// The Event one status change deserves: one per phase change, none otherwise (so heartbeats,
/// allocation and earnings updates are silent). The reason is the `Ready` condition's when it
/// changed with the phase, else the cordon that moved the node between Ready and Draining.
pub fn transition(prev: &ProviderNodeStatus, next: &ProviderNodeStatus) -> Option<(Severity, NodeReason, String)> {
    let phase = next.phase?;
    if prev.phase == Some(phase) {
        return None;
    }
    let ready = |s: &ProviderNodeStatus| s.conditions.iter().find(|c| c.type_ == "Ready").map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    let (prev_ready, next_ready) = (ready(prev), ready(next));
    let condition_moved = next_ready.as_ref().is_some_and(|(s, r, _)| prev_ready.as_ref().is_none_or(|(ps, pr, _)| (ps, pr) != (s, r)));
    let (reason, note) = match (prev.phase, phase, next_ready) {
        (_, _, Some((_, reason, message))) if condition_moved => (parse_reason(&reason)?, message),
        (Some(NodePhase::Ready), NodePhase::Draining, _) => {
            (NodeReason::Cordoned, "cordoned by its admin: running tasks finish, no new task is placed".to_string())
        }
        (Some(NodePhase::Draining), NodePhase::Ready, _) => (NodeReason::Uncordoned, "the cordon was lifted: tasks are placed here again".to_string()),
        // A phase change its condition does not explain (a status edited by hand): say where it is.
        (_, _, Some((_, reason, message))) => (parse_reason(&reason)?, message),
        (_, _, None) => return None,
    };
    let note = match phase {
        NodePhase::Draining if reason != NodeReason::Cordoned => format!("{note}; cordoned by its admin, so it drains"),
        _ => note,
    };
    Some((reason.severity(), reason, note))
}

fn parse_reason(s: &str) -> Option<NodeReason> {
    [NodeReason::Joined, NodeReason::SessionOpen, NodeReason::SessionClosed, NodeReason::Left, NodeReason::NoSession, NodeReason::Offline]
        .into_iter()
        .find(|r| r.as_str() == s)
}

/// What placement counts on for a node (the fleet's bounded view of it), against what its agent
/// claimed.
pub fn allocatable(node: &crate::scheduler::Node, claimed: &NodeCapacity) -> NodeAllocatable {
    let ephemeral = Some(node.capacity.ephemeral_bytes).filter(|b| *b > 0).map(format_memory);
    let cpu = format_cpu(node.capacity.cpu_millis);
    let memory = format_memory(node.capacity.memory_bytes);
    let capped = cpu != claimed.cpu || memory != claimed.memory || ephemeral != claimed.ephemeral_storage || node.gpus.len() != claimed.gpus.len();
    NodeAllocatable { cpu, memory, ephemeral_storage: ephemeral, gpus: node.gpus.len() as u32, capped }
}

/// Whether a node's last heartbeat time needs writing again: none shown yet, or `refresh` old.
/// Between refreshes heartbeats write nothing; the operator tracks liveness in memory.
pub fn heartbeat_due(status: Option<&ProviderNodeStatus>, now: Timestamp, refresh: Duration) -> bool {
    let Some(last) = status.and_then(|s| s.last_heartbeat_time.as_ref()) else { return true };
    let age_ms = now.as_millisecond().saturating_sub(last.0.as_millisecond());
    age_ms >= i64::try_from(refresh.as_millis()).unwrap_or(i64::MAX)
}

/// The node a gateway event is about.
pub fn node_of(event: &NodeEvent) -> &str {
    match event {
        NodeEvent::Joined { node, .. }
        | NodeEvent::Connected { node, .. }
        | NodeEvent::Heartbeat { node }
        | NodeEvent::Disconnected { node, .. }
        | NodeEvent::Left { node } => node,
    }
}

/// What the admin says about a node, for the scheduler.
pub fn admin_of(n: &ProviderNode) -> NodeAdmin {
    let mut labels = n.metadata.labels.clone().unwrap_or_default();
    labels.retain(|k, _| k.len() <= 317);
    NodeAdmin {
        owner: n.spec.owner.clone().unwrap_or_default(),
        // A bad quantity leaves that node to its token's caps and the ceiling; the sweep warns.
        limits: crate::crd::limits_from(n.spec.capacity_limits.as_ref()).unwrap_or_default(),
        cordoned: n.spec.unschedulable || n.spec.drain,
        labels,
        taints: n
            .spec
            .taints
            .iter()
            .map(|t| Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: match t.effect {
                    crate::crd::TaintEffect::NoSchedule => TaintEffect::NoSchedule,
                },
            })
            .collect(),
        // The caller fills in the effective rates (cluster rates with `spec.pricing` applied).
        rates: Default::default(),
    }
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
