//! Keeps ProviderNode objects current from what the gateway sees: created on join, Ready while
//! a session is open, NotReady when it closes. Heartbeats are written at most every
//! `HEARTBEAT_WRITE` per node, so thousands of agents do not become thousands of writes a second.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::MANAGER;
use crate::crd::quantity::{format_cpu, format_memory};
use crate::crd::{NodeAllocation, NodeCapacity, NodeGpu, NodePhase, ProviderNode, ProviderNodeStatus, condition, set_condition};
use crate::dispatch::Dispatcher;
use crate::fleet::{NodeAdmin, NodeFacts};
use crate::gateway::NodeEvent;
use crate::scheduler::{Taint, TaintEffect};
use crate::store::Store;

/// Minimum time between two heartbeat writes of one node.
pub const HEARTBEAT_WRITE: Duration = Duration::from_secs(30);
/// How often all ProviderNodes are compared with the live sessions.
const SWEEP: Duration = Duration::from_secs(10);

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
                set_condition(&mut s.conditions, condition("Ready", false, "Joined", "joined; waiting for the agent's session", None));
            }
        }
        NodeEvent::Connected { facts, .. } => {
            s.capacity = Some(cap(facts));
            s.region = non_empty(&facts.region);
            s.zone = non_empty(&facts.zone);
            s.agent_version = non_empty(&facts.agent_version);
            s.phase = Some(NodePhase::Ready);
            s.last_heartbeat_time = Some(Time(now));
            set_condition(&mut s.conditions, condition("Ready", true, "SessionOpen", "the agent's session is open", None));
        }
        NodeEvent::Heartbeat { .. } => {
            s.last_heartbeat_time = Some(Time(now));
        }
        NodeEvent::Disconnected { reason, .. } => {
            s.phase = Some(NodePhase::NotReady);
            set_condition(&mut s.conditions, condition("Ready", false, "SessionClosed", reason.clone(), None));
        }
        NodeEvent::Left { .. } => {
            s.phase = Some(NodePhase::Offline);
            set_condition(&mut s.conditions, condition("Ready", false, "Left", "the provider left the pool", None));
        }
    }
    s.running_attempts = running;
    s.allocated = Some(NodeAllocation { cpu: format_cpu(allocated.0), memory: format_memory(allocated.1) });
    s
}

/// Status merge patches carry the operator's field manager, so `managedFields` says who wrote.
fn status_patch() -> PatchParams {
    PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() }
}

fn node_of(event: &NodeEvent) -> &str {
    match event {
        NodeEvent::Joined { node, .. }
        | NodeEvent::Connected { node, .. }
        | NodeEvent::Heartbeat { node }
        | NodeEvent::Disconnected { node, .. }
        | NodeEvent::Left { node } => node,
    }
}

/// Writes ProviderNodes from gateway events, and sweeps every `SWEEP`: nodes without a session
/// here turn NotReady, then Offline past `grace`; a ProviderNode an admin deleted revokes its
/// node. Sends on `capacity_changed` when a node connects so waiting jobs are tried again.
pub async fn run(
    client: kube::Client,
    dispatcher: Arc<Dispatcher>,
    mut events: mpsc::Receiver<NodeEvent>,
    capacity_changed: mpsc::Sender<()>,
    grace: Duration,
) {
    let api: Api<ProviderNode> = Api::all(client);
    let mut last_heartbeat_write: HashMap<String, Instant> = HashMap::new();
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut sweep = tokio::time::interval(SWEEP);
    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { return };
                let node = node_of(&ev).to_string();
                if matches!(ev, NodeEvent::Heartbeat { .. }) && last_heartbeat_write.get(&node).is_some_and(|t| t.elapsed() < HEARTBEAT_WRITE) {
                    continue;
                }
                last_heartbeat_write.insert(node.clone(), Instant::now());
                if let Err(e) = write(&api, &dispatcher, &ev).await {
                    warn!(%node, error = %e, "cannot update ProviderNode");
                }
                if matches!(ev, NodeEvent::Connected { .. }) {
                    let _ = capacity_changed.try_send(());
                }
            }
            _ = sweep.tick() => {
                if let Err(e) = sweep_nodes(&api, &dispatcher, grace, &mut known).await {
                    debug!(error = %e, "ProviderNode sweep failed");
                }
            }
        }
    }
}

/// The phase of a node with a session: Draining while an admin cordons it, else Ready.
pub fn connected_phase(unschedulable: bool) -> NodePhase {
    if unschedulable { NodePhase::Draining } else { NodePhase::Ready }
}

/// The phase of a node without a session: NotReady for a blip, Offline past the grace.
pub fn absent_phase(absent: Duration, grace: Duration) -> NodePhase {
    if absent > grace { NodePhase::Offline } else { NodePhase::NotReady }
}

async fn write(api: &Api<ProviderNode>, dispatcher: &Dispatcher, ev: &NodeEvent) -> Result<(), super::Error> {
    dispatcher.may_write()?;
    let store: &Store = dispatcher.store();
    let node = node_of(ev);
    if let NodeEvent::Left { .. } = ev {
        match api.delete(node, &Default::default()).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    if let NodeEvent::Joined { .. } = ev {
        // Create (or adopt) the object; the operator owns only its labels, never the admin's spec.
        let obj = json!({
            "apiVersion": "kommune.dev/v1alpha1",
            "kind": "ProviderNode",
            "metadata": { "name": node, "labels": { "app.kubernetes.io/managed-by": "kommune-operator" } },
            "spec": {},
        });
        api.patch(node, &PatchParams::apply(MANAGER), &Patch::Apply(&obj)).await?;
    }
    let Some(current) = api.get_opt(node).await? else {
        debug!(%node, "no ProviderNode yet; status not written");
        return Ok(());
    };
    let active = store.active_on_node(node)?;
    let allocated = active.iter().fold((0, 0), |(c, m), a| (c + a.cpu_millis, m + a.memory_bytes));
    let prev = current.status.clone().unwrap_or_default();
    let mut next = apply_event(&prev, ev, active.len() as u32, allocated, Timestamp::now());
    next.reputation = Some(dispatcher.fleet().reputation(node).to_string());
    if next != prev {
        api.patch_status(node, &status_patch(), &Patch::Merge(&json!({ "status": next }))).await?;
    }
    Ok(())
}

/// A node's earnings from the ledger, for its status (None without a ledger or on a read
/// error, which is logged: the status keeps its last figures).
async fn earnings(dispatcher: &Dispatcher, node: &str) -> Option<crate::crd::NodeEarnings> {
    let ledger = dispatcher.ledger()?;
    let read = async { Ok::<_, crate::ledger::LedgerError>((ledger.node_earnings(node).await?, ledger.rejected(node).await?.len() as u64)) };
    match read.await {
        Ok((e, rejected)) => Some(crate::crd::NodeEarnings {
            pending: e.pending.to_string(),
            receipts: e.receipts,
            rejected,
            ledger_seq: e.head.map_or(0, |h| h.seq),
            ledger_head: e.head.map(|h| hex::encode(h.hash)).unwrap_or_default(),
        }),
        Err(e) => {
            warn!(%node, error = %e, "cannot read the node's earnings from the ledger");
            None
        }
    }
}

/// What the admin says about a node, for the scheduler.
pub fn admin_of(n: &ProviderNode) -> NodeAdmin {
    let mut labels = n.metadata.labels.clone().unwrap_or_default();
    labels.retain(|k, _| k.len() <= 317);
    NodeAdmin {
        owner: n.spec.owner.clone().unwrap_or_default(),
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

/// Brings phases of nodes without a session here up to date (Ready → NotReady → Offline),
/// mirrors cordons into the fleet, and revokes nodes whose ProviderNode was deleted since the
/// last sweep (only nodes seen before, so a just-joined node is not revoked before its object
/// exists).
async fn sweep_nodes(api: &Api<ProviderNode>, dispatcher: &Dispatcher, grace: Duration, known: &mut BTreeSet<String>) -> Result<(), super::Error> {
    dispatcher.may_write()?;
    let fleet = dispatcher.fleet();
    let nodes = api.list(&ListParams::default()).await?;
    let present: BTreeSet<String> = nodes.items.iter().map(|n| n.name_any()).collect();
    for gone in known.difference(&present) {
        dispatcher.revoke_node(gone).await?;
    }
    *known = present;
    for n in nodes.items {
        let name = n.name_any();
        match crate::pricing::overrides_from(n.spec.pricing.as_ref()) {
            Ok(o) => dispatcher.rates().set_overrides(&name, o),
            Err(e) => warn!(node = %name, error = %e, "ProviderNode pricing ignored; the cluster rates apply"),
        }
        let mut admin = admin_of(&n);
        admin.rates = dispatcher.rates().for_node(&name);
        fleet.set_admin(&name, admin);
        if n.spec.drain {
            // Cordoned just above, so nothing drained comes back here.
            dispatcher.drain_node(&name).await?;
        }
        let status = n.status.clone().unwrap_or_default();
        if let Some(earnings) = earnings(dispatcher, &name).await
            && status.earnings.as_ref() != Some(&earnings)
        {
            api.patch_status(&name, &status_patch(), &Patch::Merge(&json!({ "status": { "earnings": earnings } }))).await?;
        }
        let Some(absent) = fleet.absent_for(&name) else {
            // Connected: a cordoned node is Draining (its running tasks finish, none are added).
            let want = connected_phase(n.spec.unschedulable || n.spec.drain);
            if matches!(status.phase, Some(NodePhase::Ready | NodePhase::Draining)) && status.phase != Some(want) {
                api.patch_status(&name, &status_patch(), &Patch::Merge(&json!({ "status": { "phase": want } }))).await?;
            }
            continue;
        };
        let phase = absent_phase(absent, grace);
        let stale = match status.phase {
            Some(NodePhase::Ready | NodePhase::Draining) => true,
            Some(NodePhase::NotReady) => phase == NodePhase::Offline,
            _ => false,
        };
        if stale {
            let mut next = status.clone();
            next.phase = Some(phase);
            let (reason, message) = match phase {
                NodePhase::Offline => {
                    ("Offline", format!("no session for {}s, longer than the {}s grace; its attempts were placed elsewhere", absent.as_secs(), grace.as_secs()))
                }
                _ => ("NoSession", "the agent has no session with this operator".to_string()),
            };
            set_condition(&mut next.conditions, condition("Ready", false, reason, message, None));
            api.patch_status(&name, &status_patch(), &Patch::Merge(&json!({ "status": next }))).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::is_true;
    use crate::scheduler::Resources;

    fn facts() -> NodeFacts {
        NodeFacts {
            capacity: Resources { cpu_millis: 4000, memory_bytes: 8 << 30, ephemeral_bytes: 0 },
            gpus: vec![],
            runtimes: vec!["wasm".into()],
            arch: "x86_64".into(),
            os: "linux".into(),
            region: "eu-west".into(),
            zone: String::new(),
            agent_version: "0.1.0".into(),
        }
    }

    #[test]
    fn lifecycle_join_connect_heartbeat_disconnect() {
        let now = Timestamp::now();
        let joined =
            apply_event(&ProviderNodeStatus::default(), &NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "k".into() }, 0, (0, 0), now);
        assert_eq!(joined.phase, Some(NodePhase::NotReady));
        assert_eq!(joined.capacity.as_ref().unwrap().cpu, "4");
        assert_eq!(joined.capacity.as_ref().unwrap().memory, "8Gi");
        assert_eq!(joined.region.as_deref(), Some("eu-west"));
        assert_eq!(joined.zone, None);

        let ready = apply_event(&joined, &NodeEvent::Connected { node: "n".into(), facts: facts() }, 2, (500, 1 << 30), now);
        assert_eq!(ready.phase, Some(NodePhase::Ready));
        assert!(is_true(&ready.conditions, "Ready"));
        assert_eq!(ready.running_attempts, 2);
        assert_eq!(ready.allocated.as_ref().unwrap().cpu, "500m");

        let hb = apply_event(&ready, &NodeEvent::Heartbeat { node: "n".into() }, 2, (500, 1 << 30), now);
        assert_eq!(hb.conditions, ready.conditions);

        let gone = apply_event(&hb, &NodeEvent::Disconnected { node: "n".into(), reason: "no message for 15s".into() }, 2, (500, 1 << 30), now);
        assert_eq!(gone.phase, Some(NodePhase::NotReady));
        let c = gone.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str(), c.message.as_str()), ("False", "SessionClosed", "no message for 15s"));
    }

    #[test]
    fn a_cordoned_connected_node_is_draining() {
        assert_eq!(connected_phase(true), NodePhase::Draining);
        assert_eq!(connected_phase(false), NodePhase::Ready);
    }

    #[test]
    fn a_cordon_or_a_drain_keeps_new_tasks_away() {
        let node = |unschedulable: bool, drain: bool| {
            let spec = crate::crd::ProviderNodeSpec { unschedulable, drain, ..Default::default() };
            admin_of(&ProviderNode::new("n", spec)).cordoned
        };
        assert_eq!([node(false, false), node(true, false), node(false, true), node(true, true)], [false, true, true, true]);
    }

    #[test]
    fn an_absent_node_is_not_ready_then_offline_after_the_grace() {
        let grace = Duration::from_secs(30);
        assert_eq!(absent_phase(Duration::from_secs(5), grace), NodePhase::NotReady);
        assert_eq!(absent_phase(Duration::from_secs(30), grace), NodePhase::NotReady);
        assert_eq!(absent_phase(Duration::from_secs(31), grace), NodePhase::Offline);
    }

    #[test]
    fn rejoining_a_ready_node_keeps_it_ready() {
        let now = Timestamp::now();
        let ready = apply_event(&ProviderNodeStatus::default(), &NodeEvent::Connected { node: "n".into(), facts: facts() }, 0, (0, 0), now);
        let rejoined = apply_event(&ready, &NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "k".into() }, 0, (0, 0), now);
        assert_eq!(rejoined.phase, Some(NodePhase::Ready));
    }
}
